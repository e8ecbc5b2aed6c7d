"""The distillation methods as one table: each method's loss bound to the run's config.

``step_loss(cfg)`` returns ``loss(student, teacher, batch, generator) -> [B]``, so the
training task never branches on the method. Labels arrive already replaced by the null label
where the training loop dropped them (``diffusion.label_dropout``), so the losses drop none.
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
from .reflow import online_reflow_loss
from .teacher import GuidancePlan

LossFn = Callable[[Denoiser, Denoiser, Batch, torch.Generator], Tensor]


def guidance_plan(cfg: Config) -> GuidancePlan:
    """The scales of a step: a range for a student with a guidance input, else the fixed
    ``distill.guidance`` in ``distill.guidance_interval`` (the teacher's own scale and
    interval unless overridden), baked in."""
    d = cfg.distill
    if cfg.model.guidance_embed:
        return GuidancePlan(d.guidance_min, d.guidance_max, student_input=True)
    return GuidancePlan(d.guidance, d.guidance, student_input=False, interval=d.guidance_interval)


def step_loss(cfg: Config) -> LossFn:
    """The loss of ``cfg.distill.method`` with the run's settings bound."""
    d, diff = cfg.distill, cfg.diffusion
    if d.method == "guidance":
        return functools.partial(
            guidance_distillation_loss,
            plan=guidance_plan(cfg),
            label_dropout=0.0,
            time_sampling=diff.time_sampling,
            logit_mean=diff.logit_mean,
            logit_std=diff.logit_std,
        )
    if d.method == "progressive":
        return functools.partial(
            progressive_loss, student_steps=d.steps, plan=guidance_plan(cfg), label_dropout=0.0
        )
    if d.method == "reflow":
        return functools.partial(
            online_reflow_loss,
            plan=guidance_plan(cfg),
            sampler=d.pair_sampler,
            steps=d.pair_steps,
            grid=cfg.sample.grid or "uniform",
        )
    raise ValueError(f"distill.method {d.method!r} has no loss")
