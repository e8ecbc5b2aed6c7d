"""Training: ``train(cfg) -> run_dir``. The loop is one visible function.

Randomness of step ``s`` comes only from ``(seed, s)`` (dropout also from the rank) and the data
order only from ``(seed, epoch)`` plus a saved position, so training N steps equals training k,
stopping, resuming and training N - k, bit for bit on CPU. Times, noise and label drops are drawn
for the whole global batch and each rank takes its shard, so 1 process, N processes and gradient
accumulation see the same per-example randomness.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from . import distributed, make_callable
from .build import (
    TrainData,
    build_denoiser,
    crop_to,
    load_train_data,
    original_size,
    seed_for,
    step_generator,
)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, diff, from_dict, save_config, to_dict
from .data import from_model_range
from .device import describe, select_device, select_precision
from .ema import EMA
from .images import make_grid, save_grid
from .losses import diffusion_loss, loss_by_time_bin
from .sample import SampleOptions, generate, label_tensor
from .schedules import sample_training_times
from .tracking import RunLogger, plot_loss_curves

# Sections that define the model: a resumed run must not change them.
FROZEN_KEYS = ("model.", "diffusion.", "data.dataset", "data.val_size", "data.pad_to_32")


class TrainingError(RuntimeError):
    """Training cannot start or continue (message says why and what to do)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    best_value: float = math.inf
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # wall-clock time spent in the loop, over all invocations


class TimeBudget:
    """Fit the run to a wall-clock budget (``train.time_budget_minutes``).

    From ``CALIBRATION`` steps on, the average seconds per step so far (timed from step
    ``SKIP``, so one-time start-up costs do not count) set the total number of steps, never
    more than the configured epochs/steps, so that warmup and cosine decay span the budget. The
    total is refitted every step: on a shared machine the speed drifts (seen: 330 images/s
    during the warmup, 240 later), and a total fixed early would stop the cosine far from its
    end. The total is saved in checkpoints and is the starting estimate on resume. The loop
    also stops when the time is up, whatever the estimate said.

    Every decision is a function of the step and of the elapsed seconds passed to
    :meth:`update`; with several processes the loop passes the slowest rank's clock (agreed in
    the per-step collective), so all ranks fit the same schedule and stop after the same step.
    """

    SKIP = 5
    CALIBRATION = 20

    def __init__(self, minutes: float | None, cap: int, warmup_steps: int = 0):
        self.seconds = None if minutes is None else minutes * 60.0
        self.cap = cap
        self.warmup_steps = warmup_steps
        self.announced = minutes is None
        self.fitted_now = False  # True once, when the warmup ends (for the log)

    def resume(self, saved: dict, total_steps: int) -> int:
        """Start from the schedule length of the interrupted invocation."""
        saved_total = saved.get("lr_schedule", {}).get("total_steps")
        if self.seconds is not None and saved_total:
            return min(saved_total, self.cap)
        return total_steps

    def start(self, progress: Progress) -> None:
        self._t0, self._steps0 = time.perf_counter(), progress.step
        self._elapsed_skip = 0.0
        self._seconds0 = progress.train_seconds

    def elapsed(self) -> float:
        """Seconds since :meth:`start` on this process's clock."""
        return time.perf_counter() - self._t0

    def update(self, progress: Progress, total_steps: int, elapsed: float | None = None) -> int:
        """Account ``elapsed`` seconds since start (default: this process's clock); return
        the (possibly new) total number of steps."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        progress.train_seconds = self._seconds0 + elapsed
        self.fitted_now = False
        if self.seconds is None:
            return total_steps
        if progress.train_seconds >= self.seconds:
            return progress.step  # time is up: this step is the last
        done = progress.step - self._steps0
        if done == self.SKIP:
            self._elapsed_skip = elapsed
        if done < self.CALIBRATION:
            return total_steps
        rate = (done - self.SKIP) / (elapsed - self._elapsed_skip)  # steps per second
        left = int((self.seconds - progress.train_seconds) * rate)
        self.fitted_now = not self.announced and progress.step >= self.warmup_steps
        self.announced |= self.fitted_now
        return max(progress.step + 1, min(self.cap, progress.step + left))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; the fused kernel where PyTorch has one.

    Fused AdamW does the whole update in one kernel instead of a chain of foreach ops (on the
    quick recipe's CPU step: ~1 ms instead of ~4.5). Its moments are the plain AdamW ones;
    :func:`load_optimizer_state` keeps this device's choice when a checkpoint is resumed.
    """
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=device.type in FUSED_ADAMW_DEVICES,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's own ``fused`` setting.

    ``load_state_dict`` would copy the flag of the device that wrote the checkpoint (a CPU
    run's ``fused=True`` onto a device without the kernel, an older run's unfused setting onto
    a CPU).
    """
    fused = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flag in zip(optimizer.param_groups, fused, strict=True):
        group["fused"] = flag


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


class _StopFlag:
    """Catch SIGINT/SIGTERM: remember the signal, let the current step finish.

    A second signal stops at once, unless it comes within ``grace`` seconds of the first: under
    torchrun/SLURM a worker often receives the same SIGTERM twice (from the scheduler and from
    the launcher), and that must not cancel the checkpoint write.
    """

    grace = 2.0

    def __init__(self):
        self.signum: int | None = None
        self._t = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            if time.monotonic() - self._t > self.grace:
                raise KeyboardInterrupt
            return
        self.signum, self._t = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def default_run_dir(config_path: str | None) -> str:
    """``runs/<config file stem>`` (or ``runs/default``)."""
    return f"runs/{Path(config_path).stem if config_path else 'default'}"


def train(
    cfg: Config, *, resume: str | None = None, stop_after_steps: int | None = None, log=print
) -> Path:
    """Train as ``cfg`` says; return the run directory.

    Args:
        cfg: the resolved config (``cfg.train.run_dir`` must be set).
        resume: ``"auto"`` (continue ``run_dir`` if it has a checkpoint), a checkpoint path,
            or None (start fresh; refuses a run directory that already has checkpoints).
        stop_after_steps: end this invocation after this many optimizer steps, with a
            checkpoint, as an interruption would.
        log: where one-line messages go (rank 0 only).
    """
    ctx = distributed.setup(cfg.train.device)
    log = log if ctx.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.train.run_dir or default_run_dir(None))
    ckpt_dir = run_dir / "checkpoints"
    resume_path = _resume_path(resume, ckpt_dir)

    device = ctx.device or select_device(cfg.train.device)
    precision = select_precision(cfg.train.precision, device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    log(describe(device, precision))

    with distributed.local_main_first(ctx):  # one download per node
        data = load_train_data(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and run
    denoiser = build_denoiser(cfg, data.spec).to(device)
    backbone = denoiser.backbone
    log(
        f"{cfg.model.type}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M "
        f"parameters; {len(data.train_y)} training / {len(data.val_y)} validation images"
    )
    optimizer = build_optimizer(backbone, cfg.train, device)
    ema = (
        EMA(
            backbone,
            cfg.train.ema_decay,
            half_life=cfg.train.ema_half_life,
            start_step=cfg.train.ema_start_step,
        )
        if cfg.train.ema
        else None
    )
    batches = distributed.batch_iterator(
        len(data.train_y), cfg.train.batch_size, cfg.train.seed, ctx
    )
    total_steps = cfg.train.steps or cfg.train.epochs * batches.batches_per_epoch
    progress = Progress()
    budget = TimeBudget(cfg.train.time_budget_minutes, total_steps, cfg.train.warmup_steps)

    if resume_path is not None:
        saved = _restore(resume_path, cfg, backbone, optimizer, ema, batches, progress, log)
        total_steps = budget.resume(saved, total_steps)
    elif ckpt_dir.exists() and any(ckpt_dir.glob("*.pt")):
        raise TrainingError(
            f"{run_dir} already holds checkpoints; continue it with --resume auto, or choose "
            "a new --run-dir"
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard)
    logger.reset(progress.history)

    train_model = distributed.wrap(denoiser, ctx, cfg.train.compile)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    micro = distributed.micro_batch_size(cfg.train.batch_size, cfg.train.grad_accum, ctx)
    x_all, y_all = data.train_x.to(device), data.train_y.to(device)

    def save(tag: str | None = None) -> None:
        if not ctx.is_main:
            return
        state = _checkpoint_state(
            cfg, data, backbone, ema, optimizer, batches, progress, total_steps
        )
        _write_checkpoints(state, ckpt_dir, tag, progress, cfg.train.keep_last, cfg.train.best_by)

    start_step, t_start = progress.step, time.perf_counter()
    budget.start(progress)
    window = {
        "loss": 0.0,
        "n": 0,
        "t0": time.perf_counter(),
        "images": 0,
        "bins": torch.zeros(10, dtype=torch.float64),
        "counts": torch.zeros(10),
    }
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc="train",
        unit="step",
        disable=not (ctx.is_main and cfg.train.progress),
        dynamic_ncols=True,
    )
    stopped_by = None
    with _StopFlag() as stop:
        while progress.step < total_steps:
            step = progress.step
            epoch_before = batches.epoch
            lr = lr_at(step, total_steps, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # ---- one optimizer step (grad accumulation over micro-batches)
            with record_function("train/data"):  # named phases for benchmarks/throughput.py
                idx = batches.next_batch().to(device)
                torch.manual_seed(seed_for(cfg.train.seed, step, ctx.rank))  # dropout etc.
                gen = step_generator(cfg.train.seed, step, 0, device)  # same on every rank
                t_all, noise_all, u_all = _draw_step(
                    cfg, denoiser.schedule, x_all.shape[1:], gen, ctx
                )
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k, part in enumerate(idx.split(micro)):
                mb = slice(k * micro, (k + 1) * micro)  # this micro-batch within the shard
                x0, y = x_all[part], y_all[part]
                t, noise = t_all[mb], noise_all[mb]
                y = _drop_labels(y, u_all[mb], cfg, denoiser.null_label)
                sync = k == cfg.train.grad_accum - 1
                no_sync = distributed.maybe_no_sync(train_model, sync)
                with no_sync, precision.autocast(device), record_function("train/forward"):
                    losses = diffusion_loss(
                        train_model,
                        x0,
                        y,
                        t,
                        noise,
                        loss=cfg.diffusion.loss,
                        min_snr_gamma=cfg.diffusion.min_snr_gamma,
                    )
                loss = losses.mean() / cfg.train.grad_accum
                with record_function("train/backward"):
                    (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.item()
                b_sum, b_cnt = loss_by_time_bin(t, losses)
                window["bins"] += b_sum
                window["counts"] += b_cnt
            step_loss, signum, elapsed = distributed.agree_step(
                step_loss, stop.signum, budget.elapsed(), ctx
            )

            if not math.isfinite(step_loss):
                progress.skipped_steps += 1
                if cfg.train.nonfinite == "stop" or (
                    progress.skipped_steps > cfg.train.max_skipped_steps
                ):
                    bar.close()
                    raise TrainingError(
                        f"non-finite loss ({step_loss}) at step {step}; the last good "
                        f"checkpoint in {ckpt_dir} is kept. Lower train.lr, enable "
                        "train.grad_clip, or set train.nonfinite=skip"
                    )
                log(f"step {step}: non-finite loss, step skipped ({progress.skipped_steps} so far)")
                optimizer.zero_grad(set_to_none=True)
                grad_norm = float("nan")
            else:
                with record_function("train/optimizer"):
                    if scaler:
                        scaler.unscale_(optimizer)
                    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip).item()
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                if ema is not None:
                    with record_function("train/ema"):
                        ema.update(backbone, step)
            progress.step += 1
            bar.update(1)

            # ---- logging
            window["loss"] += step_loss if math.isfinite(step_loss) else 0.0
            window["n"] += 1
            window["images"] += cfg.train.batch_size
            if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:
                with record_function("train/logging"):
                    distributed.sum_([window["bins"], window["counts"]], ctx)
                    record = _window_record(window, progress, lr, grad_norm)
                    progress.history.append(record)
                    logger.log(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}"
                    )
                    window.update(loss=0.0, n=0, t0=time.perf_counter(), images=0)
                    window["bins"].zero_()
                    window["counts"].zero_()

            # ---- wall-clock budget: fit the schedule length, then stop on time
            new_total = budget.update(progress, total_steps, elapsed)
            if budget.fitted_now:
                log(
                    f"time budget: {new_total} steps fit in {cfg.train.time_budget_minutes:g} min "
                    "at the speed so far (refitted every step)"
                )
            if new_total != total_steps:
                total_steps = bar.total = new_total

            # ---- events: validation, previews, checkpoints
            epoch_done = batches.epoch != epoch_before
            progress.epoch = batches.epoch
            finished = progress.step == total_steps
            interrupted = signum is not None or (
                stop_after_steps is not None and progress.step - start_step >= stop_after_steps
            )
            if ctx.is_main and (_due(cfg.train.val_every, progress.step, epoch_done) or finished):
                _validate(cfg, denoiser, ema, data, device, precision, progress, logger, log)
            if (
                epoch_done
                and ctx.is_main
                and cfg.train.preview_every_epochs
                and (progress.epoch % cfg.train.preview_every_epochs == 0)
            ):
                _preview(cfg, denoiser, ema, data, precision, run_dir, progress, logger)
            if (
                epoch_done
                and ctx.is_main
                and cfg.train.eval_every_epochs
                and (progress.epoch % cfg.train.eval_every_epochs == 0)
            ):
                _evaluate(cfg, denoiser, ema, data, precision, progress, logger, log)
            if _due(cfg.train.checkpoint_every, progress.step, epoch_done) or finished:
                save("periodic")
            elif interrupted:
                save()
            if interrupted:
                stopped_by = signum or "stop_after_steps"
                break
        distributed.barrier(ctx)  # no rank exits before rank 0 has written its checkpoint
    bar.close()
    logger.close()
    if ctx.is_main:
        plot_loss_curves(progress.history, run_dir / "loss_curves.png")
    elapsed = time.perf_counter() - t_start
    done = progress.step - start_step
    if stopped_by is None or not ctx.is_main:  # other ranks: rank 0 reports and sets the code
        log(
            f"finished {progress.step} steps in {elapsed / 60:.1f} min "
            f"({done * cfg.train.batch_size / max(elapsed, 1e-9):.0f} images/s); run: {run_dir}"
        )
        return run_dir
    hint = f"resume with: mnistdiff train --config {run_dir / 'config.yaml'} --resume auto"
    if stopped_by == "stop_after_steps":
        log(f"stopped after {done} steps at step {progress.step}/{total_steps}; {hint}")
        return run_dir
    name = signal.Signals(stopped_by).name
    raise TrainingInterrupted(
        f"{name}: checkpoint written at step {progress.step}/{total_steps}; {hint}",
        exit_code=128 + int(stopped_by),
    )


# --------------------------------------------------------------------------- step helpers


def _draw_step(cfg: Config, schedule, image_shape, gen: torch.Generator, ctx):
    """Times, noise and label-drop uniforms drawn for the whole global batch of one step;
    returns this rank's shard of each (so they do not depend on the number of processes)."""
    n, device = cfg.train.batch_size, gen.device
    t = _training_times(cfg, schedule, n, gen, device)
    noise = torch.randn((n, *image_shape), generator=gen, device=device)
    u = torch.rand(n, generator=gen, device=device)
    return tuple(distributed.shard(v, ctx) for v in (t, noise, u))


def _training_times(cfg: Config, schedule, n: int, gen: torch.Generator, device) -> torch.Tensor:
    d = cfg.diffusion
    return sample_training_times(
        schedule,
        n,
        gen,
        device,
        kind=d.time_sampling,
        logit_mean=d.logit_mean,
        logit_std=d.logit_std,
    )


def _drop_labels(
    y: torch.Tensor, u: torch.Tensor, cfg: Config, null_label: int
) -> torch.Tensor | None:
    """Replace labels by the null label where ``u < label_dropout`` (CFG training)."""
    if not cfg.model.conditional:
        return None
    drop = u < cfg.diffusion.label_dropout
    return torch.where(drop, torch.full_like(y, null_label), y)


def _due(every: int, step: int, epoch_done: bool) -> bool:
    """Interval rule: ``every`` steps, or at each epoch end when ``every`` is 0."""
    return step % every == 0 if every else epoch_done


def _window_record(window: dict, progress: Progress, lr: float, grad_norm: float) -> dict:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": window["loss"] / max(window["n"], 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "images_per_sec": window["images"] / elapsed,
    }
    per_bin = window["bins"] / window["counts"].clamp(min=1)
    for i, (value, count) in enumerate(
        zip(per_bin.tolist(), window["counts"].tolist(), strict=True)
    ):
        if count:
            record[f"loss_t{i}"] = value
    return record


@torch.no_grad()
def _validate(cfg, denoiser, ema, data: TrainData, device, precision, progress, logger, log):
    """Mean loss on the held-out split with fixed randomness (EMA weights when present)."""
    if len(data.val_y) == 0:
        return
    model = _with_weights(denoiser, ema)
    model.eval()
    gen = step_generator(cfg.train.seed, -1, 0, device)  # the same noise at every validation
    bs = cfg.train.batch_size
    n_batches = math.ceil(len(data.val_y) / bs)
    if cfg.train.val_batches:
        n_batches = min(n_batches, cfg.train.val_batches)
    total, count = 0.0, 0
    for b in range(n_batches):
        x0 = data.val_x[b * bs : (b + 1) * bs].to(device)
        y = data.val_y[b * bs : (b + 1) * bs].to(device) if cfg.model.conditional else None
        t = _training_times(cfg, model.schedule, len(x0), gen, device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        with precision.autocast(device):
            losses = diffusion_loss(
                model,
                x0,
                y,
                t,
                noise,
                loss=cfg.diffusion.loss,
                min_snr_gamma=cfg.diffusion.min_snr_gamma,
            )
        total += losses.sum().item()
        count += len(x0)
    denoiser.train()
    value = total / count
    record = {"step": progress.step, "epoch": progress.epoch, "val_loss": value}
    progress.history.append(record)
    logger.log(record)
    log(f"step {progress.step}: validation loss {value:.5f}")


def _with_weights(denoiser, ema):
    """A denoiser that uses the EMA backbone when EMA is on."""
    if ema is None:
        return denoiser
    return denoiser.with_backbone(ema.model)


def _sample_ema(cfg, denoiser, ema, data: TrainData, precision, num: int, per_class: int):
    """``num`` uint8 images from the EMA weights with the config's sample settings
    (``per_class`` of every class when conditional); returns ``(images, labels)``."""
    model = _with_weights(denoiser, ema).eval()
    labels = None
    if cfg.model.conditional:
        labels = label_tensor(per_class=per_class, num_classes=data.spec.num_classes)[:num]
    s = cfg.sample
    opts = SampleOptions.from_config(s)
    out = generate(
        model,
        labels,
        num,
        opts,
        seed=cfg.train.seed,
        batch_size=s.batch_size,
        conditional=cfg.model.conditional,
        precision=precision,
    )
    denoiser.train()
    return from_model_range(crop_to(out.x, original_size(data.spec, cfg.data))), labels


def _preview(cfg, denoiser, ema, data: TrainData, precision, run_dir: Path, progress, logger):
    """A grid of samples, one row per class, written as ``samples/samples_epoch_XXX.png``."""
    per_class = cfg.train.preview_per_class
    num = data.spec.num_classes * per_class
    images, _ = _sample_ema(cfg, denoiser, ema, data, precision, num, per_class)
    path = run_dir / "samples" / f"samples_epoch_{progress.epoch:03d}.png"
    save_grid(images, path, nrow=per_class, scale=2)
    logger.image("samples", make_grid(images, nrow=per_class), progress.step)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_state(
    cfg, data, backbone, ema, optimizer, batches, progress: Progress, total_steps: int
) -> dict:
    return {
        "config": to_dict(cfg),
        "data_spec": data.spec.to_dict(),
        "model": backbone.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "lr_schedule": {"kind": cfg.train.lr_schedule, "total_steps": total_steps},
        "train_seconds": progress.train_seconds,
        "step": progress.step,
        "epoch": progress.epoch,
        "data_state": batches.state_dict(),
        "skipped_steps": progress.skipped_steps,
        "best_value": progress.best_value,
        "history": progress.history,
    }


def _evaluate(cfg, denoiser, ema, data: TrainData, precision, progress, logger, log):
    """In-training sample quality at small N (``train.eval_num_samples``), EMA weights."""
    from .evaluate import evaluate_images

    n = cfg.train.eval_num_samples
    per_class = -(-n // data.spec.num_classes)
    images, labels = _sample_ema(cfg, denoiser, ema, data, precision, n, per_class)
    metrics = evaluate_images(images, labels, seed=cfg.train.seed, data_dir=cfg.data.data_dir)
    record = {"step": progress.step, "epoch": progress.epoch, "eval_num_samples": n}
    for key in ("fd_mnist", "kid", "precision", "recall", "class_accuracy"):
        if metrics.get(key) is not None:
            record[key] = metrics[key]
    progress.history.append(record)
    logger.log(record)
    log(
        f"step {progress.step}: fd_mnist {record['fd_mnist']:.3f} (N={n})"
        + (f", class accuracy {record['class_accuracy']:.3f}" if "class_accuracy" in record else "")
    )


def _write_checkpoints(
    state: dict,
    ckpt_dir: Path,
    tag: str | None,
    progress: Progress,
    keep_last: int,
    best_by: str = "val_loss",
) -> None:
    """``last.pt`` always; ``step_XXXXXXX.pt`` for periodic saves (keep the newest k);
    ``best.pt`` when ``best_by`` (validation loss or in-training FD) improved."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if tag == "periodic":
        save_checkpoint(state, ckpt_dir / f"step_{progress.step:07d}.pt")
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep_last]:
            old.unlink()
    val = [r[best_by] for r in progress.history if best_by in r]
    if val and val[-1] < progress.best_value:
        progress.best_value = val[-1]
        state["best_value"] = val[-1]
        save_checkpoint(state, ckpt_dir / "best.pt")
    save_checkpoint(state, ckpt_dir / "last.pt")


def _resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise TrainingError(f"--resume: checkpoint not found: {path}")
    return path


def _restore(
    path: Path, cfg: Config, backbone, optimizer, ema, batches, progress: Progress, log
) -> dict:
    """Load a checkpoint into the live objects after checking the config is compatible."""
    state = load_checkpoint(path)
    try:
        saved = from_dict(state["config"])
    except Exception as exc:
        raise CheckpointError(f"{path}: saved config is invalid ({exc})") from None
    changes = diff(saved, cfg)
    frozen = [c for c in changes if c[0].startswith(FROZEN_KEYS)]
    if frozen:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in frozen)
        raise TrainingError(
            f"cannot resume {path}: the model/diffusion/data config differs from the "
            f"checkpoint ({lines}). Use the run's config.yaml, or start a new --run-dir"
        )
    for key, a, b in changes:
        log(f"resume: {key} changed {a!r} -> {b!r}")
    backbone.load_state_dict(state["model"])
    load_optimizer_state(optimizer, state["optimizer"])
    if ema is not None:
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        else:
            ema.model.load_state_dict(state["model"])
    try:
        batches.load_state_dict(state["data_state"])
    except ValueError as exc:
        raise TrainingError(
            f"cannot resume {path}: {exc}. The data position is counted in global batches: "
            "keep train.batch_size (the global batch over all processes) and train.seed as "
            "saved; the number of processes may change if it divides the batch"
        ) from None
    progress.step, progress.epoch = state["step"], state["epoch"]
    progress.skipped_steps = state["skipped_steps"]
    progress.best_value = state["best_value"]
    progress.history = list(state["history"])
    progress.train_seconds = state.get("train_seconds", 0.0)
    log(f"resumed from {path} at step {progress.step} (epoch {progress.epoch})")
    return state


make_callable(__name__, train)  # mnistdiff.train(cfg) == mnistdiff.train.train(cfg)
