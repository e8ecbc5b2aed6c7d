"""A distillation run: teacher checkpoint -> a normal run directory holding the student.

``distill(cfg)`` trains the student that ``cfg`` (from :func:`student_config`) describes,
with the same pieces as :func:`mnistdiff.train.train`: AdamW, warmup + cosine LR, EMA, the
wall-clock budget, atomic checkpoints (``last.pt``, ``step_*.pt``), ``metrics.jsonl``,
SIGINT/SIGTERM handling and exact resume. Randomness of step ``s`` comes only from ``(seed,
s)`` and the data order from ``(seed, epoch)`` plus the saved position, so "distill N" equals
"distill k, stop, resume, distill N - k" bit for bit on CPU. A checkpoint also holds the
current teacher's weights and config (``distill`` entry), so a resumed run never reads the
teacher's run directory again (it may have moved on). Single process.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..build import load_train_data, seed_for, step_generator
from ..checkpoint import CheckpointError, load_checkpoint, read_export, resolve
from ..config import Config, from_dict, save_config, to_dict
from ..data import BatchIterator, DataSpec
from ..device import describe, select_device, select_precision
from ..ema import EMA
from ..images import save_grid
from ..parameterization import Denoiser
from ..sample import SampleOptions, generate, label_tensor
from ..tracking import RunLogger, plot_loss_curves
from ..train import (
    Progress,
    TimeBudget,
    TrainingError,
    TrainingInterrupted,
    _resume_path,
    _StopFlag,
    _write_checkpoints,
    build_optimizer,
    load_optimizer_state,
    lr_at,
)
from .batch import Batch
from .methods import guidance_plan, step_loss
from .progressive import round_steps
from .reflow import check_flow, generate_pairs
from .student import load_teacher_weights
from .teacher import frozen_copy

PAIRS_FILE = "reflow_pairs.pt"
PAIR_SEED_STREAM = 10**9  # pair batch b is seeded by (seed, PAIR_SEED_STREAM + b)


def load_teacher(path: str | Path) -> tuple[Config, DataSpec, dict]:
    """``(config, data spec, backbone weights)`` of a checkpoint, run directory or export
    (EMA weights when present)."""
    kind, resolved = resolve(path)
    if kind == "export":
        blob = read_export(resolved)
        weights = blob["weights"]
    else:
        blob = load_checkpoint(resolved)
        weights = blob["ema"]["model"] if blob.get("ema") is not None else blob["model"]
    try:
        cfg = from_dict(blob["config"])
    except Exception as exc:
        raise CheckpointError(f"{resolved}: saved config is invalid ({exc})") from None
    return cfg, DataSpec.from_dict(blob["data_spec"]), weights


def _build(cfg: Config, spec: DataSpec, weights: dict, device) -> Denoiser:
    from ..build import build_denoiser

    denoiser = build_denoiser(cfg, spec)
    denoiser.backbone.load_state_dict(weights)
    return denoiser.to(device)


def _rounds(cfg: Config) -> list[int | None]:
    d = cfg.distill
    return round_steps(d.start_steps, d.steps) if d.method == "progressive" else [None]


def _round_at(step: int, total: int, num_rounds: int) -> int:
    """The round that step ``step`` of ``total`` belongs to (equal shares of the steps)."""
    return min(num_rounds - 1, step * num_rounds // max(total, 1))


def _round_end(r: int, total: int, num_rounds: int) -> int:
    return -(-(r + 1) * total // num_rounds)


def distill(
    cfg: Config, *, resume: str | None = None, stop_after_steps: int | None = None, log=print
) -> Path:
    """Distill the student ``cfg`` describes; return the run directory.

    Args:
        cfg: the student's config (``distill.method`` and ``distill.teacher`` set,
            ``train.run_dir`` set).
        resume: ``"auto"`` (continue ``run_dir`` if it has a checkpoint), a checkpoint path,
            or None (start fresh; refuses a run directory that already has checkpoints).
        stop_after_steps: end this invocation after this many optimizer steps, with a
            checkpoint, as an interruption would.
        log: where one-line messages go.
    """
    if cfg.distill.method is None:
        raise TrainingError("distill.method is null: this config describes no distillation")
    run_dir = Path(cfg.train.run_dir or "runs/distill")
    ckpt_dir = run_dir / "checkpoints"
    resume_path = _resume_path(resume, ckpt_dir)
    if resume_path is None and ckpt_dir.exists() and any(ckpt_dir.glob("*.pt")):
        raise TrainingError(
            f"{run_dir} already holds checkpoints; continue it with --resume auto, or choose "
            "a new --run-dir"
        )
    device = select_device(cfg.train.device)
    precision = select_precision(cfg.train.precision, device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    log(describe(device, precision))

    saved = load_checkpoint(resume_path) if resume_path is not None else None
    if saved is not None:
        t_cfg = from_dict(saved["distill"]["teacher_config"])
        spec = DataSpec.from_dict(saved["data_spec"])
        t_weights = saved["distill"]["teacher"]
    else:
        t_cfg, spec, t_weights = load_teacher(cfg.distill.teacher)
    teacher = frozen_copy(_build(t_cfg, spec, t_weights, device))
    torch.manual_seed(cfg.train.seed)
    from ..build import build_denoiser

    student = build_denoiser(cfg, spec).to(device)
    if saved is None:
        load_teacher_weights(student.backbone, t_weights)
    log(
        f"distill ({cfg.distill.method}): {sum(p.numel() for p in student.backbone.parameters())}"
        f" student parameters; teacher {cfg.distill.teacher}"
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    pair_seconds = 0.0
    if cfg.distill.method == "reflow":
        check_flow(teacher)
        pool, pair_seconds = _pair_pool(cfg, teacher, run_dir, precision, log)
    else:
        data = load_train_data(cfg)
        pool = Batch(data.train_x.to(device), data.train_y.to(device))
    num_examples = pool.x0.shape[0]
    batches = BatchIterator(num_examples, min(cfg.train.batch_size, num_examples), cfg.train.seed)
    optimizer = build_optimizer(student.backbone, cfg.train, device)
    ema = (
        EMA(
            student.backbone,
            cfg.train.ema_decay,
            half_life=cfg.train.ema_half_life,
            start_step=cfg.train.ema_start_step,
        )
        if cfg.train.ema
        else None
    )
    progress = Progress()
    total_steps = cfg.train.steps or cfg.train.epochs * batches.batches_per_epoch
    minutes = cfg.train.time_budget_minutes
    if minutes is not None:  # the pairs were paid for out of the same budget
        minutes = max(minutes - pair_seconds / 60.0, 0.01)
    budget = TimeBudget(minutes, total_steps, cfg.train.warmup_steps)
    rounds = _rounds(cfg)
    dstate = {"round": 0, "round_start": 0, "pair_seconds": pair_seconds}
    if saved is not None:
        _restore(saved, student, optimizer, ema, batches, progress, dstate)
        total_steps = budget.resume(saved, total_steps)
        log(f"resumed from {resume_path} at step {progress.step}")
    save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, tensorboard=cfg.train.tensorboard)
    logger.reset(progress.history)

    def save(tag: str | None = None) -> None:
        state = {
            "config": to_dict(cfg),
            "data_spec": spec.to_dict(),
            "model": student.backbone.state_dict(),
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
            "distill": {
                **dstate,
                "teacher": teacher.backbone.state_dict(),
                "teacher_config": to_dict(t_cfg),
            },
        }
        _write_checkpoints(state, ckpt_dir, tag, progress, cfg.train.keep_last)

    start_step, t_start = progress.step, time.perf_counter()
    budget.start(progress)
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter()}
    stopped_by = None
    try:
        with _StopFlag() as stop:
            while progress.step < total_steps:
                step = progress.step
                r = dstate["round"]
                if _round_at(step, total_steps, len(rounds)) > r:  # progressive: next round
                    teacher = frozen_copy(_with_backbone(student, ema))
                    t_cfg = cfg
                    dstate.update(round=r + 1, round_start=step)
                    r += 1
                    log(f"step {step}: round {r + 1}/{len(rounds)}, {rounds[r]} student steps")
                loss_fn = step_loss(cfg, student_steps=rounds[r], round_index=r)
                span = _round_end(r, total_steps, len(rounds)) - dstate["round_start"]
                lr = lr_at(step - dstate["round_start"], span, cfg.train)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = batches.next_batch().to(device)
                batch = Batch(*(None if v is None else v[idx] for v in pool))
                torch.manual_seed(seed_for(cfg.train.seed, step))  # dropout
                gen = step_generator(cfg.train.seed, step, 0, device)
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast(device):
                    losses = loss_fn(student, teacher, batch, gen)
                loss = losses.mean()
                loss.backward()
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingError(
                        f"non-finite distillation loss at step {step}; lower train.lr"
                    )
                clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(student.backbone.parameters(), clip)
                optimizer.step()
                if ema is not None:
                    ema.update(student.backbone, step)
                progress.step += 1
                progress.epoch = batches.epoch
                window["loss"] += value
                window["n"] += 1
                if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:
                    record = _record(window, progress, lr, float(grad_norm), cfg, rounds[r])
                    progress.history.append(record)
                    logger.log(record)
                    window.update(loss=0.0, n=0, t0=time.perf_counter())
                new_total = budget.update(progress, total_steps)
                if budget.fitted_now:
                    log(f"time budget: {new_total} steps fit at the speed so far")
                total_steps = new_total
                finished = progress.step >= total_steps
                interrupted = stop.signum is not None or (
                    stop_after_steps is not None and progress.step - start_step >= stop_after_steps
                )
                every = cfg.train.checkpoint_every
                if finished or (every and progress.step % every == 0):
                    save("periodic")
                elif interrupted:
                    save()
                if interrupted and not finished:
                    stopped_by = stop.signum or "stop_after_steps"
                    break
    finally:
        logger.close()
    plot_loss_curves(progress.history, run_dir / "loss_curves.png")
    elapsed = time.perf_counter() - t_start
    if stopped_by is None:
        _preview(cfg, student, ema, spec, precision, run_dir)
        log(f"distilled {progress.step} steps in {elapsed / 60:.1f} min; run: {run_dir}")
        return run_dir
    hint = f"resume with: mnistdiff distill --run-dir {run_dir} --resume auto"
    if stopped_by == "stop_after_steps":
        log(f"stopped at step {progress.step}/{total_steps}; {hint}")
        return run_dir
    raise TrainingInterrupted(
        f"{signal.Signals(stopped_by).name}: checkpoint written at step {progress.step}; {hint}",
        exit_code=128 + int(stopped_by),
    )


def _with_backbone(student: Denoiser, ema: EMA | None) -> Denoiser:
    """The student with its EMA weights (when EMA is on)."""
    if ema is None:
        return student
    return Denoiser(
        ema.model, student.schedule, student.prediction, student.num_classes, student.image_shape
    )


def _record(window: dict, progress: Progress, lr: float, grad_norm: float, cfg, steps) -> dict:
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": window["loss"] / max(window["n"], 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "images_per_sec": window["n"] * cfg.train.batch_size / elapsed,
    }
    if steps is not None:
        record["student_steps"] = steps
    return record


def _restore(saved: dict, student, optimizer, ema, batches, progress: Progress, dstate) -> None:
    student.backbone.load_state_dict(saved["model"])
    load_optimizer_state(optimizer, saved["optimizer"])
    if ema is not None and saved.get("ema") is not None:
        ema.load_state_dict(saved["ema"])
    batches.load_state_dict(saved["data_state"])
    progress.step, progress.epoch = saved["step"], saved["epoch"]
    progress.skipped_steps, progress.best_value = saved["skipped_steps"], saved["best_value"]
    progress.history = list(saved["history"])
    progress.train_seconds = saved.get("train_seconds", 0.0)
    for key in ("round", "round_start", "pair_seconds"):
        dstate[key] = saved["distill"][key]


def _pair_pool(
    cfg: Config, teacher: Denoiser, run_dir: Path, precision, log
) -> tuple[Batch, float]:
    """The reflow pairs: read from ``run_dir`` or generated (and saved) from ``(seed, b)``."""
    path = run_dir / PAIRS_FILE
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        device = next(teacher.parameters()).device
        pool = Batch(*(None if blob[k] is None else blob[k].to(device) for k in Batch._fields))
        return pool, float(blob["seconds"])
    d = cfg.distill
    n, size = d.pairs, cfg.sample.batch_size
    labels = None
    if cfg.model.conditional:
        k = teacher.num_classes
        labels = label_tensor(per_class=-(-n // k), num_classes=k)[:n]
    plan = guidance_plan(cfg)
    device = next(teacher.parameters()).device
    t0, parts = time.perf_counter(), []
    log(f"reflow: generating {n} teacher pairs ({d.pair_sampler}, {d.pair_steps} steps)")
    for b in range(-(-n // size)):
        gen = step_generator(cfg.train.seed, PAIR_SEED_STREAM + b, 0, device)
        y = None if labels is None else labels[b * size : (b + 1) * size].to(device)
        with precision.autocast(device):
            parts.append(
                generate_pairs(
                    teacher,
                    y if y is not None else None,
                    gen,
                    plan=plan,
                    label_dropout=d.label_dropout,
                    sampler=d.pair_sampler,
                    steps=d.pair_steps,
                    grid=cfg.sample.grid or "uniform",
                )
            )
    seconds = time.perf_counter() - t0
    pool = Batch(
        *(None if v is None else torch.cat([p[i] for p in parts]) for i, v in enumerate(parts[0]))
    )
    blob = {k: (None if v is None else v.cpu()) for k, v in pool._asdict().items()}
    blob["seconds"] = seconds
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    log(f"reflow: {n} pairs in {seconds:.0f} s")
    return pool, seconds


@torch.no_grad()
def _preview(cfg: Config, student, ema, spec: DataSpec, precision, run_dir: Path) -> None:
    """A grid of the student's samples with its recorded sampler, one row per class."""
    model = _with_backbone(student, ema).eval()
    per_class = cfg.train.preview_per_class
    labels = label_tensor(per_class=per_class, num_classes=spec.num_classes)
    if not cfg.model.conditional:
        labels = None
    out = generate(
        model,
        labels,
        spec.num_classes * per_class,
        SampleOptions.from_config(cfg.sample),
        seed=cfg.train.seed,
        batch_size=cfg.sample.batch_size,
        conditional=cfg.model.conditional,
        precision=precision,
    )
    from ..build import crop_to, original_size
    from ..data import from_model_range

    images = from_model_range(crop_to(out.x, original_size(spec, cfg.data)))
    save_grid(images, run_dir / "samples" / "samples_final.png", nrow=per_class, scale=2)
