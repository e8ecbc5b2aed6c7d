"""Few-step students distilled from a teacher checkpoint.

One module per method, each naming its paper with the maths in its docstring:

- :mod:`.guidance`: guidance distillation (Meng et al. 2023): one pass per step instead of
  classifier-free guidance's two; the student takes the scale ``w`` as an input.
- :mod:`.progressive`: progressive distillation (Salimans & Ho 2022): halve the steps per round.
- :mod:`.reflow`: reflow of a rectified flow (Liu et al. 2023; InstaFlow 2024): straighten
  the paths on (noise, teacher sample) pairs so a few Euler steps suffice.

Every loss is ``loss(student, teacher, batch, generator) -> [B]`` with randomness only from
``generator`` (:mod:`.methods` binds each method's settings). :mod:`.student` derives the
student's config (its ``sample`` section records how to sample it) and initial weights from
the teacher; :mod:`.run` is the training run that writes a normal run directory.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, apply_overrides, from_dict, load_yaml
from .run import distill, load_teacher
from .student import student_config

__all__ = ["distill", "distill_checkpoint", "load_teacher", "student_config"]


def distill_checkpoint(
    checkpoint: str | None,
    method: str | None,
    *,
    run_dir: str,
    steps: int | None = None,
    time_budget_minutes: float | None = None,
    train_steps: int | None = None,
    overrides: list[str] | None = None,
    resume: str | None = None,
    stop_after_steps: int | None = None,
    log=print,
) -> Path:
    """Distill ``checkpoint`` (a run directory, checkpoint or export) with ``method`` into
    ``run_dir``; with ``resume="auto"`` an existing ``run_dir`` continues from its own config.

    Args:
        checkpoint: the teacher (not needed to resume).
        method: ``guidance``, ``progressive`` or ``reflow`` (not needed to resume).
        run_dir: the student's run directory.
        steps: the student's sampler steps (progressive, reflow).
        time_budget_minutes: wall-clock budget of the run (pairs for reflow included).
        train_steps: optimizer steps (a cap when a budget is given).
        overrides: dotted ``key=value`` overrides of the student's config.
        resume: ``"auto"`` or a checkpoint path, as for training.
        stop_after_steps: end this invocation after N steps with a checkpoint.
        log: one-line messages.
    """
    saved = Path(run_dir) / "config.yaml"
    flags = {"train.run_dir": str(run_dir)}
    if time_budget_minutes is not None:
        flags["train.time_budget_minutes"] = time_budget_minutes
    if train_steps is not None:
        flags["train.steps"] = train_steps
    if resume is not None and saved.is_file():
        data = apply_overrides(load_yaml(saved), flags)
        cfg = from_dict(apply_overrides(data, overrides or []))
        return distill(cfg, resume=resume, stop_after_steps=stop_after_steps, log=log)
    if checkpoint is None or method is None:
        raise ConfigError("distill: give --checkpoint (the teacher) and --method")
    teacher_cfg, _, _ = load_teacher(checkpoint)
    from ..config import parse_override

    extra = dict(flags)
    for text in overrides or []:
        parts, value = parse_override(text)
        extra[".".join(parts)] = value
    cfg = student_config(
        teacher_cfg, method, teacher_path=str(checkpoint), steps=steps, overrides=extra
    )
    return distill(cfg, resume=resume, stop_after_steps=stop_after_steps, log=log)
