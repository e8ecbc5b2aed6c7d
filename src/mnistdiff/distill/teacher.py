"""The frozen teacher as a guided clean-image estimate, and the guidance scales of a step.

Every distillation loss asks the teacher the same question: what is the classifier-free guided
x0_hat ``u + w (c - u)`` at ``(x_t, t, labels)``, with ``w`` per example (the convention of
:mod:`mnistdiff.guidance`: ``w = 1`` is the plain conditional model)? A CFG teacher answers
with one network pass on a 2B batch (only the conditional half where every ``w`` is 1); a
guidance-distilled teacher (``Denoiser.accepts_guidance``) with one pass taking ``w`` as input.
Null labels give ``u`` whatever ``w`` is, so a batch may mix real and null labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..parameterization import Denoiser


@torch.no_grad()
def guided_x0(
    teacher: Denoiser,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor | None,
    w: Tensor,
    *,
    clip: bool = True,
) -> Tensor:
    """The teacher's guided clean-image estimate ``u + w (c - u)``, float32 ``[B, C, H, W]``.

    Args:
        teacher: the frozen teacher.
        x_t: noisy images ``[B, C, H, W]``.
        t: times ``[B]``.
        labels: int64 ``[B]`` (the null label allowed) or None (unconditional teacher).
        w: guidance scales ``[B]``.
        clip: clamp x0_hat to [-1, 1] as the samplers do by default (``sample.threshold``).
    """
    if teacher.accepts_guidance:
        x0 = teacher(x_t, t, labels, w)
    elif labels is None or bool((w == 1.0).all()):
        x0 = teacher(x_t, t, labels)
    else:
        null = torch.full_like(labels, teacher.null_label)
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)  # [B, C, H, W] each
        x0 = uncond + w.view(-1, *([1] * (x_t.ndim - 1))) * (cond - uncond)
    return x0.clamp(-1.0, 1.0) if clip else x0


@dataclass(frozen=True)
class GuidancePlan:
    """How the guidance scale enters one distillation step.

    Attributes:
        w_min: smallest scale drawn (``w_min == w_max``: a fixed scale).
        w_max: largest scale drawn.
        student_input: the student takes ``w`` as an input (a guidance-distilled student);
            otherwise the scale is baked into it and it is called without one.
        teacher_scale: a fixed scale for the teacher (e.g. 1.0 for a teacher that already has
            the guidance baked in), or None to give the teacher the drawn ``w``.
        interval: ``(t_lo, t_hi)``: the teacher is guided only there and plain conditional
            elsewhere, as its sampler with ``sample.guidance_interval`` is.
    """

    w_min: float
    w_max: float
    student_input: bool
    teacher_scale: float | None = None
    interval: tuple[float, float] | None = None

    def draw(
        self, n: int, generator: torch.Generator, device: torch.device | str
    ) -> tuple[Tensor, Tensor | None]:
        """``(teacher w [n], student w [n] or None)``; one uniform draw from ``generator``."""
        u = torch.rand(n, generator=generator, device=generator.device).to(device)
        w = self.w_min + (self.w_max - self.w_min) * u
        teacher_w = w if self.teacher_scale is None else torch.full_like(w, self.teacher_scale)
        return teacher_w, (w if self.student_input else None)


def drop_labels(
    labels: Tensor | None, p: float, null_label: int, generator: torch.Generator
) -> Tensor | None:
    """Labels with each replaced by ``null_label`` with probability ``p`` (one draw per row)."""
    if labels is None:
        return None
    u = torch.rand(labels.shape[0], generator=generator, device=generator.device)
    return torch.where(u.to(labels.device) < p, torch.full_like(labels, null_label), labels)


def frozen_copy(denoiser: Denoiser) -> Denoiser:
    """A deep copy in eval mode with gradients off (a teacher that training cannot change)."""
    import copy

    teacher = copy.deepcopy(denoiser).eval()
    teacher.requires_grad_(False)
    return teacher
