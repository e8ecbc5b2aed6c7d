"""A distillation run: teacher checkpoint -> a normal run directory holding the student.

``distill(cfg)`` is :func:`mnistdiff.train.train` with a :class:`DistillTask`: the same
data order, per-step randomness, optimizer, LR schedule, EMA, time budget, checkpoints,
metrics, signals and exact resume ("distill N" equals "distill k, stop, resume, distill N - k"
bit for bit on CPU). A resumed run takes its teacher from its own checkpoint. At the end a
grid of the student's samples, drawn as its config records, goes to ``samples/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_checkpoint, read_export, resolve
from ..config import Config, from_dict
from ..data import DataSpec
from ..device import select_device
from ..images import save_grid
from ..sample import Pipeline, label_tensor
from ..train import TrainingError, _resume_path, train
from .task import DistillTask


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


def distill(
    cfg: Config, *, resume: str | None = None, stop_after_steps: int | None = None, log=print
) -> Path:
    """Distill the student ``cfg`` describes; return the run directory.

    Args:
        cfg: the student's config (``distill.method``, ``distill.teacher`` and
            ``train.run_dir`` set; see :func:`mnistdiff.distill.student_config`).
        resume: ``"auto"`` (continue ``run_dir`` if it has a checkpoint), a checkpoint path,
            or None (start fresh).
        stop_after_steps: end this invocation after this many optimizer steps, with a
            checkpoint, as an interruption would.
        log: where one-line messages go.
    """
    if cfg.distill.method is None:
        raise TrainingError("distill.method is null: this config describes no distillation")
    run_dir = Path(cfg.train.run_dir or "runs/distill")
    resume_path = _resume_path(resume, run_dir / "checkpoints")
    if resume_path is not None:  # the teacher travels in the student's checkpoint
        saved = load_checkpoint(resume_path)
        state = saved["task"]["state"]
        t_cfg, weights = from_dict(state["teacher_config"]), state["teacher"]
        spec = DataSpec.from_dict(saved["data_spec"])
    else:
        t_cfg, spec, weights = load_teacher(cfg.distill.teacher)
    task = DistillTask(cfg, t_cfg, spec, weights, select_device(cfg.train.device))
    log(f"distill ({cfg.distill.method}) from {cfg.distill.teacher}")
    out = train(cfg, resume=resume, stop_after_steps=stop_after_steps, task=task, log=log)
    save_preview(out, cfg)
    return out


@torch.no_grad()
def save_preview(run_dir: Path, cfg: Config) -> Path:
    """``samples/samples_final.png``: the student's samples as its config records them."""
    pipe = Pipeline.load(run_dir, device=cfg.train.device)
    per_class = cfg.train.preview_per_class
    labels = label_tensor(per_class=per_class, num_classes=pipe.spec.num_classes)
    out = pipe.generate(labels if pipe.conditional else None, len(labels), seed=cfg.train.seed)
    return save_grid(
        pipe.to_uint8(out.x), run_dir / "samples" / "samples_final.png", nrow=per_class, scale=2
    )


__all__ = ["distill", "load_teacher", "save_preview"]
