"""The distillation methods as one table: each method's loss bound to the run's config.

``step_loss(method, cfg, ...)`` returns ``loss(student, teacher, batch, generator) -> [B]``
for the step at hand, so the training loop never branches on the method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import Config
from ..parameterization import Denoiser
from .batch import Batch
from .guidance import guidance_distillation_loss
from .progressive import progressive_loss
from .reflow import reflow_loss
from .teacher import GuidancePlan

LossFn = Callable[[Denoiser, Denoiser, Batch, torch.Generator], Tensor]


def guidance_plan(cfg: Config, *, baked_teacher: bool = False) -> GuidancePlan:
    """The scales of a step: a range for a student with a guidance input, else the fixed
    ``distill.guidance``; ``baked_teacher``: the teacher already has it baked in (w = 1)."""
    d = cfg.distill
    if cfg.model.guidance_embed:
        return GuidancePlan(d.guidance_min, d.guidance_max, student_input=True)
    return GuidancePlan(
        d.guidance, d.guidance, student_input=False, teacher_scale=1.0 if baked_teacher else None
    )


def step_loss(cfg: Config, *, student_steps: int | None = None, round_index: int = 0) -> LossFn:
    """The loss of ``cfg.distill.method`` for one step.

    Args:
        cfg: the student's config.
        student_steps: progressive: the current round's student steps.
        round_index: progressive: 0 for the first round (the original teacher).
    """
    d, diff = cfg.distill, cfg.diffusion
    if d.method == "guidance":
        return functools.partial(
            guidance_distillation_loss,
            plan=guidance_plan(cfg),
            label_dropout=d.label_dropout,
            time_sampling=diff.time_sampling,
            logit_mean=diff.logit_mean,
            logit_std=diff.logit_std,
        )
    if d.method == "progressive":
        return functools.partial(
            progressive_loss,
            student_steps=student_steps or d.start_steps,
            plan=guidance_plan(cfg, baked_teacher=round_index > 0),
            label_dropout=d.label_dropout,
        )
    if d.method == "reflow":
        return reflow_loss
    raise ValueError(f"distill.method {d.method!r} has no loss")
