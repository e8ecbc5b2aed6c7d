"""Training: ``train(cfg) -> run_dir``. The loop is one visible function, :func:`_loop`.

Pieces, each in one place:

* :class:`TrainState`: the model, EMA, optimizer, grad scaler, data position, progress and step
  budget. :meth:`TrainState.state_dict` / :meth:`TrainState.load_state_dict` are the only code
  that writes and reads checkpoint state.
* :func:`next_batch` draws this rank's share of the next global batch with the step's
  randomness; :func:`train_step` does one optimizer step on it and returns :class:`StepStats`.
* :func:`periodic_events`: logging, validation, previews, in-training evaluation, checkpoints.
* :class:`TrainTask`: what is minimized. The default :class:`DiffusionTask` is the config's
  diffusion loss; another objective (distillation) passes its own task,
  ``train(cfg, task=MyTask(...))``, and reuses everything else: data order, randomness,
  micro-batching, DDP, precision, optimizer, EMA, checkpoints, time budget and signals.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import record_function
from tqdm import tqdm

from . import distributed, make_callable
from .build import TrainData, load_train_data
from .checkpoint import (
    DiskFullError,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, diff, save_config
from .device import describe, select_device, select_precision
from .distributed import DistContext
from .images import make_grid, save_grid
from .losses import diffusion_loss, loss_by_time_bin
from .parameterization import Denoiser
from .rundir import RunDirBusyError, lock_run_dir, remove_stale_temps
from .sample import SampleOptions, generate, label_tensor
from .schedules import sample_training_times
from .seeding import seed_for, step_generator
from .tracking import RunLogger, plot_loss_curves
from .trainstate import (  # re-exported: the public names of training live here
    DEFAULT_TASK,
    Progress,
    StopFlag,
    TimeBudget,
    TrainingError,
    TrainState,
    build_optimizer,
    load_optimizer_state,
)
from .transforms import crop_to, from_model_range, original_size

__all__ = [
    "Batch",
    "DiffusionTask",
    "Progress",
    "StepStats",
    "StopFlag",
    "TimeBudget",
    "TrainState",
    "TrainTask",
    "TrainingError",
    "TrainingInterrupted",
    "build_optimizer",
    "load_optimizer_state",
    "lr_at",
    "next_batch",
    "periodic_events",
    "train",
    "train_step",
]

# Sections that define the model: a resumed run must not change them.
FROZEN_KEYS = ("model.", "diffusion.", "data.dataset", "data.val_size", "data.pad_to_32")


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def default_run_dir(config_path: str | None) -> str:
    """``runs/<config file stem>`` (or ``runs/default``)."""
    return f"runs/{Path(config_path).stem if config_path else 'default'}"


# --------------------------------------------------------------------------- what is minimized


@dataclass
class Batch:
    """This rank's share of one global batch, with the step's randomness drawn for it.

    Attributes:
        x0: clean images ``[B, C, S, S]`` in [-1, 1].
        labels: class labels ``[B]`` (the null label where dropped for guidance training), or
            None for an unconditional model.
        t: training times ``[B]`` in [0, 1].
        noise: standard normal noise ``[B, C, S, S]``.
        generator: the step's generator after those draws, for a task that needs more
            randomness (distillation: guidance scales, grid indices); micro-batches share it
            and draw in turn, so such a task's draws depend on ``train.grad_accum``.
    """

    x0: Tensor
    labels: Tensor | None
    t: Tensor
    noise: Tensor
    generator: torch.Generator | None = None

    def split(self, size: int) -> list[Batch]:
        """Consecutive micro-batches of ``size`` examples."""
        return [
            Batch(
                self.x0[i : i + size],
                None if self.labels is None else self.labels[i : i + size],
                self.t[i : i + size],
                self.noise[i : i + size],
                self.generator,
            )
            for i in range(0, len(self.x0), size)
        ]


class TrainTask:
    """What the training loop minimizes: the extension point for other objectives.

    Subclass, set ``name``, implement :meth:`loss`, and pass an instance as
    ``train(cfg, task=...)``. The loop calls ``loss`` on every micro-batch with the DDP/compile
    wrapped model under autocast (gradients on), and on validation batches with the EMA model
    (no gradients); it does the rest. A distillation task holds its teacher, loads it in
    :meth:`prepare`, and computes a student-vs-teacher loss in :meth:`loss`. The task's ``name``
    and :meth:`state_dict` are saved in checkpoints; resuming with another task is refused.
    """

    name = "task"

    def loss(self, model: Denoiser, batch: Batch) -> Tensor:
        """Per-example loss ``[B]`` of ``model`` on ``batch`` (deterministic given its inputs)."""
        raise NotImplementedError

    def prepare(self, model: Denoiser) -> None:
        """Called once the model is built and on its device, before the optimizer and EMA copy
        it (e.g. initialise a student from its teacher). On resume the checkpoint's weights
        then replace whatever this set."""

    def state_dict(self) -> dict:
        """Plain data to keep in checkpoints (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues an interrupted run in ``run_dir``."""
        return f"mnistdiff train --config {run_dir / 'config.yaml'} --resume auto"


@dataclass
class DiffusionTask(TrainTask):
    """The default objective: the diffusion loss of the config (``diffusion.loss``, min-SNR)."""

    loss_kind: str = "mse"
    min_snr_gamma: float = 0.0
    name = DEFAULT_TASK

    @classmethod
    def from_config(cls, cfg: Config) -> DiffusionTask:
        """The loss ``cfg.diffusion`` describes."""
        return cls(cfg.diffusion.loss, cfg.diffusion.min_snr_gamma)

    def loss(self, model: Denoiser, batch: Batch) -> Tensor:
        """Per-example diffusion loss (see :func:`mnistdiff.losses.diffusion_loss`)."""
        return diffusion_loss(
            model,
            batch.x0,
            batch.labels,
            batch.t,
            batch.noise,
            loss=self.loss_kind,
            min_snr_gamma=self.min_snr_gamma,
        )


@dataclass
class StepStats:
    """What one optimizer step reports (the same on every rank)."""

    loss: float  # mean loss over the global batch (non-finite if the step was skipped)
    lr: float
    grad_norm: float  # before clipping; nan on a skipped step
    signum: int | None  # a stop signal that any rank received
    elapsed: float  # the slowest rank's seconds since the loop started
    bin_sums: Tensor  # loss summed per t bin (this rank)
    bin_counts: Tensor

    @property
    def skipped(self) -> bool:
        """The loss was not finite: no update was made."""
        return not math.isfinite(self.loss)


# --------------------------------------------------------------------------- one step


def next_batch(state: TrainState, images: Tensor, labels: Tensor) -> Batch:
    """This rank's share of the next global batch, with randomness from ``(seed, step)``.

    Also seeds the global RNG for the step's dropout from ``(seed, step, rank)``.
    """
    cfg, step, ctx = state.cfg, state.progress.step, state.ctx
    with record_function("train/data"):  # named phases for benchmarks/throughput.py
        idx = state.batches.next_batch().to(state.device)
        torch.manual_seed(seed_for(cfg.train.seed, step, ctx.rank))  # dropout etc.
        gen = step_generator(cfg.train.seed, step, 0, state.device)  # the same on every rank
        n = cfg.train.batch_size  # drawn for the global batch, then sharded
        t = _training_times(cfg, state.model.schedule, n, gen, state.device)
        noise = torch.randn((n, *images.shape[1:]), generator=gen, device=state.device)
        u = torch.rand(n, generator=gen, device=state.device)
        t, noise, u = (distributed.shard(v, ctx) for v in (t, noise, u))
        y = _drop_labels(labels[idx], u, cfg, state.model.null_label)
        return Batch(images[idx], y, t, noise, gen)


def train_step(state: TrainState, batch: Batch) -> StepStats:
    """One optimizer step on ``batch`` (gradient accumulation over micro-batches).

    The loss is agreed over ranks before the update, so every rank steps or skips together.

    Raises:
        TrainingError: the loss is not finite and ``train.nonfinite`` is ``stop`` (or too
            many steps were skipped).
    """
    cfg, step = state.cfg.train, state.progress.step
    lr = lr_at(step, state.total_steps, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    micro = distributed.micro_batch_size(cfg.batch_size, cfg.grad_accum, state.ctx)
    loss_sum, bin_sums, bin_counts = 0.0, torch.zeros(10, dtype=torch.float64), torch.zeros(10)
    for k, mb in enumerate(batch.split(micro)):
        sync = distributed.maybe_no_sync(state.forward_model, k == cfg.grad_accum - 1)
        with sync, state.precision.autocast(state.device), record_function("train/forward"):
            losses = state.task.loss(state.forward_model, mb)
        loss = losses.mean() / cfg.grad_accum
        with record_function("train/backward"):
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        loss_sum += loss.item()
        sums, counts = loss_by_time_bin(mb.t, losses)
        bin_sums += sums
        bin_counts += counts
    loss_sum, signum, elapsed = distributed.agree_step(
        loss_sum, state.stop.signum, state.budget.elapsed(), state.ctx
    )
    if math.isfinite(loss_sum):
        grad_norm = _update(state, step)
    else:
        grad_norm = math.nan
        _skip_step(state, loss_sum)
    return StepStats(loss_sum, lr, grad_norm, signum, elapsed, bin_sums, bin_counts)


def _update(state: TrainState, step: int) -> float:
    """Unscale, clip, step the optimizer, update the EMA; return the gradient norm."""
    with record_function("train/optimizer"):
        if state.scaler:
            state.scaler.unscale_(state.optimizer)
        clip = state.cfg.train.grad_clip if state.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.backbone.parameters(), clip).item()
        if state.scaler:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    if state.ema is not None:
        with record_function("train/ema"):
            state.ema.update(state.model.backbone, step)
    return grad_norm


def _skip_step(state: TrainState, loss: float) -> None:
    """Count a non-finite step (no update); stop with an error when the config says so."""
    p, cfg = state.progress, state.cfg.train
    p.skipped_steps += 1
    if cfg.nonfinite == "stop" or p.skipped_steps > cfg.max_skipped_steps:
        ckpt_dir = Path(cfg.run_dir or default_run_dir(None)) / "checkpoints"
        raise TrainingError(
            f"non-finite loss ({loss}) at step {p.step}; the last good checkpoint in "
            f"{ckpt_dir} is kept. Lower train.lr, enable train.grad_clip, or set "
            "train.nonfinite=skip"
        )
    state.optimizer.zero_grad(set_to_none=True)


def _training_times(cfg: Config, schedule, n: int, gen: torch.Generator, device) -> Tensor:
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


def _drop_labels(y: Tensor, u: Tensor, cfg: Config, null_label: int) -> Tensor | None:
    """Replace labels by the null label where ``u < label_dropout`` (CFG training)."""
    if not cfg.model.conditional:
        return None
    drop = u < cfg.diffusion.label_dropout
    return torch.where(drop, torch.full_like(y, null_label), y)


# --------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    stop_after_steps: int | None = None,
    task: TrainTask | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train as ``cfg`` says; return the run directory.

    Args:
        cfg: the resolved config (``cfg.train.run_dir`` must be set).
        resume: ``"auto"`` (continue ``run_dir`` if it has a checkpoint), a checkpoint path,
            or None (start fresh; refuses a run directory that already has checkpoints).
        stop_after_steps: end this invocation after this many optimizer steps, with a
            checkpoint, as an interruption would.
        task: what to minimize (default: :class:`DiffusionTask` from the config). The
            extension point for other objectives such as distillation; see :class:`TrainTask`.
        log: where one-line messages go (rank 0 only).

    Raises:
        TrainingError: the run cannot start or continue (another process holds the run
            directory, a non-finite loss, a full disk, an incompatible resume, ...).
        TrainingInterrupted: stopped by SIGINT/SIGTERM after writing ``last.pt``.
    """
    ctx = distributed.setup(cfg.train.device)
    log = log if ctx.is_main else _silent
    run_dir = Path(cfg.train.run_dir or default_run_dir(None))
    with _owned(run_dir, ctx, log):
        state, run = _start(cfg, ctx, run_dir, resume, task or DiffusionTask.from_config(cfg), log)
        first, t0 = state.progress.step, time.perf_counter()
        try:
            stopped_by = _loop(state, run, stop_after_steps)
        finally:
            run.close()
    return _report(state, run, stopped_by, state.progress.step - first, time.perf_counter() - t0)


def _loop(state: TrainState, run: _Run, stop_after_steps: int | None) -> int | str | None:
    """Step until the budget is spent or a stop is asked for; return the signal number or
    ``"stop_after_steps"`` that ended it early, else None."""
    progress, first, stopped_by = state.progress, state.progress.step, None
    state.budget.start(progress)
    with state.stop:
        while progress.step < state.total_steps:
            epoch = state.batches.epoch
            stats = train_step(state, next_batch(state, run.images, run.labels))
            progress.step += 1
            progress.epoch = state.batches.epoch
            _fit_time_budget(state, stats, run)
            if stats.signum is not None:
                stopped_by = stats.signum
            elif stop_after_steps is not None and progress.step - first >= stop_after_steps:
                stopped_by = "stop_after_steps"
            periodic_events(state, run, stats, progress.epoch != epoch, stopped_by is not None)
            if stopped_by is not None:
                break
        distributed.barrier(state.ctx)  # no rank exits before rank 0 has written its checkpoint
    return stopped_by


def periodic_events(
    state: TrainState, run: _Run, stats: StepStats, epoch_done: bool, stopping: bool
) -> None:
    """After a step: log, validate, preview, evaluate and checkpoint when each is due.

    Intervals count steps (``every`` > 0) or epoch ends (``every`` = 0); the last step always
    logs, validates and writes a periodic checkpoint; a stopping run writes ``last.pt``.
    """
    cfg, p = state.cfg.train, state.progress
    finished = p.step == state.total_steps
    run.bar.update(1)
    if stats.skipped:
        run.log(f"step {p.step - 1}: non-finite loss, step skipped ({p.skipped_steps} so far)")
    run.window.add(stats, cfg.batch_size)
    if p.step % cfg.log_every == 0 or finished:
        with record_function("train/logging"):
            _log_window(state, run, stats)
    if state.ctx.is_main and (_due(cfg.val_every, p.step, epoch_done) or finished):
        _validate(state, run)
    if state.ctx.is_main and epoch_done and _every(cfg.preview_every_epochs, p.epoch):
        _preview(state, run)
    if state.ctx.is_main and epoch_done and _every(cfg.eval_every_epochs, p.epoch):
        _evaluate(state, run)
    if _due(cfg.checkpoint_every, p.step, epoch_done) or finished:
        _save(state, run, periodic=True)
    elif stopping:
        _save(state, run, periodic=False)


def _due(every: int, step: int, epoch_done: bool) -> bool:
    """Interval rule: ``every`` steps, or at each epoch end when ``every`` is 0."""
    return step % every == 0 if every else epoch_done


def _every(every_epochs: int, epoch: int) -> bool:
    """Epoch interval rule: 0 disables."""
    return bool(every_epochs) and epoch % every_epochs == 0


def _fit_time_budget(state: TrainState, stats: StepStats, run: _Run) -> None:
    """Refit the number of steps to the wall-clock budget (stops the run when time is up)."""
    total = state.budget.update(state.progress, state.total_steps, stats.elapsed)
    if state.budget.fitted_now:
        run.log(
            f"time budget: {total} steps fit in {state.cfg.train.time_budget_minutes:g} min "
            "at the speed so far (refitted every step)"
        )
    state.total_steps = run.bar.total = total


# --------------------------------------------------------------------------- run environment


class LossWindow:
    """Training losses accumulated between two log records."""

    def __init__(self) -> None:
        self.bin_sums = torch.zeros(10, dtype=torch.float64)
        self.bin_counts = torch.zeros(10)
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.images, self.t0 = 0.0, 0, 0, time.perf_counter()
        self.bin_sums.zero_()
        self.bin_counts.zero_()

    def add(self, stats: StepStats, images: int) -> None:
        self.loss += stats.loss if math.isfinite(stats.loss) else 0.0
        self.steps += 1
        self.images += images
        self.bin_sums += stats.bin_sums
        self.bin_counts += stats.bin_counts


@dataclass
class _Run:
    """The outside of a run: its directory, data, logger, progress bar and messages."""

    dir: Path
    data: TrainData
    images: Tensor  # all training images on the device, [N, C, S, S]
    labels: Tensor  # [N]
    logger: RunLogger
    bar: tqdm
    log: Callable[[str], None]
    window: LossWindow = field(default_factory=LossWindow)

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    def close(self) -> None:
        """Close the progress bar and the logger (TensorBoard writer)."""
        self.bar.close()
        self.logger.close()


def _silent(*args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _owned(run_dir: Path, ctx: DistContext, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the run directory's lock on rank 0 (the only writer); remove stale temp files."""
    if not ctx.is_main:
        yield
        return
    try:
        with lock_run_dir(run_dir):
            stale = remove_stale_temps(run_dir)
            if stale:
                log(f"removed {len(stale)} temporary file(s) of interrupted writes in {run_dir}")
            yield
    except RunDirBusyError as exc:
        raise TrainingError(str(exc)) from None


def _start(
    cfg: Config,
    ctx: DistContext,
    run_dir: Path,
    resume: str | None,
    task: TrainTask,
    log: Callable[[str], None],
) -> tuple[TrainState, _Run]:
    """Build (or resume) the state, write the run's config, open its logger."""
    ckpt_dir = run_dir / "checkpoints"
    resume_path = _resume_path(resume, ckpt_dir)
    if resume_path is None and ckpt_dir.exists() and any(ckpt_dir.glob("*.pt")):
        raise TrainingError(
            f"{run_dir} already holds checkpoints; continue it with --resume auto, or choose "
            "a new --run-dir"
        )
    device = ctx.device or select_device(cfg.train.device)
    precision = select_precision(cfg.train.precision, device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    log(describe(device, precision))
    with distributed.local_main_first(ctx):  # one download per node
        data = load_train_data(cfg)
    state = TrainState.create(
        cfg, data.spec, len(data.train_y), ctx=ctx, device=device, precision=precision, task=task
    )
    log(
        f"{cfg.model.type}: {sum(p.numel() for p in state.model.backbone.parameters()) / 1e6:.2f}M "
        f"parameters; {len(data.train_y)} training / {len(data.val_y)} validation images"
    )
    if resume_path is not None:
        _resume(state, resume_path, log)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, enabled=ctx.is_main, tensorboard=cfg.train.tensorboard)
    bar = tqdm(
        total=state.total_steps,
        initial=state.progress.step,
        desc="train",
        unit="step",
        disable=not (ctx.is_main and cfg.train.progress),
        dynamic_ncols=True,
    )
    run = _Run(run_dir, data, data.train_x.to(device), data.train_y.to(device), logger, bar, log)
    try:
        logger.reset(state.progress.history)
    except BaseException:
        run.close()
        raise
    return state, run


def _report(
    state: TrainState, run: _Run, stopped_by: int | str | None, steps: int, seconds: float
) -> Path:
    """Plot the loss curves and say how the run ended (raise for a signal)."""
    p = state.progress
    if state.ctx.is_main:
        plot_loss_curves(p.history, run.dir / "loss_curves.png")
    if stopped_by is None or not state.ctx.is_main:  # other ranks: rank 0 reports
        run.log(
            f"finished {p.step} steps in {seconds / 60:.1f} min "
            f"({steps * state.cfg.train.batch_size / max(seconds, 1e-9):.0f} images/s); "
            f"run: {run.dir}"
        )
        return run.dir
    hint = f"resume with: {state.task.resume_command(run.dir)}"
    if stopped_by == "stop_after_steps":
        run.log(f"stopped after {steps} steps at step {p.step}/{state.total_steps}; {hint}")
        return run.dir
    raise TrainingInterrupted(
        f"{signal.Signals(stopped_by).name}: checkpoint written at step "
        f"{p.step}/{state.total_steps}; {hint}",
        exit_code=128 + int(stopped_by),
    )


# --------------------------------------------------------------------------- events


def _log_window(state: TrainState, run: _Run, stats: StepStats) -> None:
    """One ``metrics.jsonl`` record of the losses since the last one."""
    w, p = run.window, state.progress
    distributed.sum_([w.bin_sums, w.bin_counts], state.ctx)
    record = {
        "step": p.step,
        "epoch": p.epoch,
        "loss": w.loss / max(w.steps, 1),
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "images_per_sec": w.images / max(time.perf_counter() - w.t0, 1e-9),
    }
    per_bin = w.bin_sums / w.bin_counts.clamp(min=1)
    for i, (value, count) in enumerate(zip(per_bin.tolist(), w.bin_counts.tolist(), strict=True)):
        if count:
            record[f"loss_t{i}"] = value
    _record(state, run, record)
    run.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}")
    w.reset()


def _record(state: TrainState, run: _Run, record: dict) -> None:
    state.progress.history.append(record)
    run.logger.log(record)


@torch.no_grad()
def _validate(state: TrainState, run: _Run) -> None:
    """Mean task loss on the held-out split with fixed randomness (EMA weights when present)."""
    cfg, data, device = state.cfg, run.data, state.device
    if len(data.val_y) == 0:
        return
    model = state.eval_model().eval()
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
        with state.precision.autocast(device):
            losses = state.task.loss(model, Batch(x0, y, t, noise, gen))
        total += losses.sum().item()
        count += len(x0)
    state.model.train()
    value = total / count
    _record(
        state, run, {"step": state.progress.step, "epoch": state.progress.epoch, "val_loss": value}
    )
    run.log(f"step {state.progress.step}: validation loss {value:.5f}")


def _sample(state: TrainState, run: _Run, num: int, per_class: int) -> tuple[Tensor, Tensor | None]:
    """``num`` uint8 images from the EMA weights with the config's sample settings
    (``per_class`` of every class when conditional); returns ``(images, labels)``."""
    cfg = state.cfg
    model = state.eval_model().eval()
    labels = None
    if cfg.model.conditional:
        labels = label_tensor(per_class=per_class, num_classes=state.spec.num_classes)[:num]
    out = generate(
        model,
        labels,
        num,
        SampleOptions.from_config(cfg.sample),
        seed=cfg.train.seed,
        batch_size=cfg.sample.batch_size,
        conditional=cfg.model.conditional,
        precision=state.precision,
    )
    state.model.train()
    return from_model_range(crop_to(out.x, original_size(state.spec, cfg.data))), labels


def _preview(state: TrainState, run: _Run) -> None:
    """A grid of samples, one row per class, written as ``samples/samples_epoch_XXX.png``."""
    per_class = state.cfg.train.preview_per_class
    images, _ = _sample(state, run, state.spec.num_classes * per_class, per_class)
    path = run.dir / "samples" / f"samples_epoch_{state.progress.epoch:03d}.png"
    save_grid(images, path, nrow=per_class, scale=2)
    run.logger.image("samples", make_grid(images, nrow=per_class), state.progress.step)


def _evaluate(state: TrainState, run: _Run) -> None:
    """In-training sample quality at small N (``train.eval_num_samples``), EMA weights."""
    from .evaluate import evaluate_images

    cfg, p = state.cfg, state.progress
    n = cfg.train.eval_num_samples
    images, labels = _sample(state, run, n, -(-n // state.spec.num_classes))
    metrics = evaluate_images(
        images, labels, seed=cfg.train.seed, data_dir=cfg.data.data_dir, dataset=cfg.data.dataset
    )
    record = {"step": p.step, "epoch": p.epoch, "eval_num_samples": n}
    for key in ("fd_mnist", "kid", "precision", "recall", "class_accuracy"):
        if metrics.get(key) is not None:
            record[key] = metrics[key]
    _record(state, run, record)
    run.log(
        f"step {p.step}: fd_mnist {record['fd_mnist']:.3f} (N={n})"
        + (f", class accuracy {record['class_accuracy']:.3f}" if "class_accuracy" in record else "")
    )


# --------------------------------------------------------------------------- checkpoints


def _save(state: TrainState, run: _Run, *, periodic: bool) -> None:
    """Rank 0: ``last.pt`` always; ``step_XXXXXXX.pt`` when periodic (keep the newest
    ``keep_last``); ``best.pt`` when ``train.best_by`` improved. All record the best value
    including this step's validation.

    Raises:
        TrainingError: the disk is full (the message names the newest intact checkpoint).
    """
    if not state.ctx.is_main:
        return
    cfg = state.cfg.train
    improved = state.progress.note_best(cfg.best_by)
    blob = state.state_dict()
    names = [f"step_{state.progress.step:07d}.pt"] if periodic else []
    names += ["best.pt"] if improved else []
    last_good = run.ckpt_dir / "last.pt"
    last_good = last_good if last_good.is_file() else None
    for name in [*names, "last.pt"]:
        try:
            save_checkpoint(blob, run.ckpt_dir / name)
        except DiskFullError as exc:
            intact = (
                f"last good checkpoint {last_good} is intact"
                if last_good
                else ("no checkpoint was written before")
            )
            raise TrainingError(f"{exc}; {intact}. Free disk space, then resume") from None
        last_good = run.ckpt_dir / name
        if name.startswith("step_"):
            for old in sorted(run.ckpt_dir.glob("step_*.pt"))[: -cfg.keep_last]:
                old.unlink()


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


def _resume(state: TrainState, path: Path, log: Callable[[str], None]) -> None:
    """Load a checkpoint into ``state`` after checking the config is compatible."""
    blob = load_checkpoint(path)
    changes = diff(checkpoint_config(blob, path), state.cfg)
    frozen = [c for c in changes if c[0].startswith(FROZEN_KEYS)]
    if frozen:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in frozen)
        raise TrainingError(
            f"cannot resume {path}: the model/diffusion/data config differs from the "
            f"checkpoint ({lines}). Use the run's config.yaml, or start a new --run-dir"
        )
    for key, a, b in changes:
        log(f"resume: {key} changed {a!r} -> {b!r}")
    state.load_state_dict(blob, source=path)
    log(f"resumed from {path} at step {state.progress.step} (epoch {state.progress.epoch})")


make_callable(__name__, train)  # mnistdiff.train(cfg) == mnistdiff.train.train(cfg)
