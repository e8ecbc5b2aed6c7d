"""A student's config and initial weights, derived from its teacher.

The student is a normal model: its config is the teacher's with ``distill`` filled in, the
``model`` section changed only by ``guidance_embed`` (guidance distillation adds the scale
input) and the ``sample`` section set to how the student is meant to be sampled, so
``mnistdiff sample --checkpoint STUDENT`` needs no flags:

- ``guidance``: the teacher's sampler, steps, scale and guidance interval; now one network
  pass per step.
- ``progressive`` / ``reflow``: ``ddim`` (one Euler step on rectified flow) on the ``uniform``
  grid with ``distill.steps`` steps; scale 1 (plain conditional, one pass) when the guidance
  (and its interval, ``distill.guidance_interval``) is baked in, the teacher's scale and
  interval when the student takes the scale as an input.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import Config, ConfigError, DistillConfig, from_dict, to_dict

# Training settings of a distillation run that differ from the teacher's recipe.
DISTILL_TRAIN = {
    "lr": 5e-4,
    "warmup_steps": 20,
    "ema_half_life": 100.0,
    "ema_start_step": 0,
    "preview_every_epochs": 0,
    "eval_every_epochs": 0,
    "val_every": 0,
    "checkpoint_every": 0,
    "epochs": 100000,
}


def student_config(
    teacher: Config,
    method: str,
    *,
    teacher_path: str,
    steps: int | None = None,
    overrides: dict | None = None,
) -> Config:
    """The config of a student of ``teacher`` distilled by ``method``.

    Args:
        teacher: the teacher's saved config.
        method: ``guidance``, ``progressive`` or ``reflow``.
        teacher_path: where the teacher was loaded from (recorded in ``distill.teacher``).
        steps: the student's sampler steps (progressive, reflow); default ``distill.steps``.
        overrides: dotted ``key: value`` overrides applied last (e.g. ``train.lr``).

    Raises:
        ConfigError: an unknown method, a teacher that is itself unsuitable, or a bad override.
    """
    from ..config import DISTILL_METHODS, apply_overrides

    if method not in DISTILL_METHODS:
        raise ConfigError(f"--method: {method!r} is not allowed; choose one of {DISTILL_METHODS}")
    if method == "guidance" and not teacher.model.conditional:
        raise ConfigError("guidance distillation needs a class-conditional teacher")
    if method == "guidance" and teacher.model.guidance_embed:
        raise ConfigError("the teacher is already guidance-distilled (model.guidance_embed)")
    data = to_dict(teacher)
    w = teacher.sample.guidance
    distill = {
        **to_dict(DistillConfig()),
        "method": method,
        "teacher": teacher_path,
        "guidance": w,
        "guidance_interval": teacher.sample.guidance_interval,
    }
    if steps is not None:
        distill["steps"] = steps
    data["distill"] = distill
    data["train"].update(DISTILL_TRAIN)
    data["train"]["steps"] = None
    data["train"]["time_budget_minutes"] = None
    cfg = from_dict(apply_overrides(data, overrides or {}))
    return _with_sampling(_with_model(cfg))


def _with_model(cfg: Config) -> Config:
    if cfg.distill.method != "guidance":
        return cfg
    return cfg.replace(model=dataclasses.replace(cfg.model, guidance_embed=True))


def takes_guidance(cfg: Config) -> bool:
    """Whether the student gets the scale as an input (else it is baked in at
    ``distill.guidance``)."""
    return cfg.model.guidance_embed


def _with_sampling(cfg: Config) -> Config:
    """The ``sample`` section that samples this student as it was trained."""
    d, s = cfg.distill, cfg.sample
    if d.method == "guidance":
        sample = dataclasses.replace(s, guidance=d.guidance, guidance_interval=d.guidance_interval)
    else:
        # baked-in guidance (interval included): plain conditional, one pass per step
        w, interval = (d.guidance, d.guidance_interval) if takes_guidance(cfg) else (1.0, None)
        sample = dataclasses.replace(
            s,
            sampler="ddim",
            steps=d.steps,
            grid="uniform",
            eta=0.0,
            guidance=w,
            guidance_interval=interval,
        )
    return cfg.replace(sample=sample)


def load_teacher_weights(student: nn.Module, weights: dict) -> None:
    """Copy the teacher's backbone weights into the student; only a new guidance embedding
    (``cond.guidance_mlp.*``, zero output at init) may be missing from ``weights``.

    Raises:
        ValueError: any other missing or unexpected key (the architectures differ).
    """
    try:
        result = student.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"student and teacher architectures differ: {first}") from None
    missing = [k for k in result.missing_keys if not k.startswith("cond.guidance_mlp.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            "student and teacher architectures differ: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
