"""Guidance distillation (Meng et al. 2023, "On distillation of guided diffusion models",
CVPR 2023, stage one).

Classifier-free guidance costs two network passes per solver step: ``u + w (c - u)`` needs
the conditional ``c = D(x_t, t, y)`` and the unconditional ``u = D(x_t, t, null)``. A student
``S(x_t, t, y, w)`` that also takes the scale ``w`` as an input learns to give the guided
answer in one pass:

    L(S) = E_{x0, y, t, eps, w} || S(x_t, t, y, w) - [u + w (c - u)](x_t, t, y) ||^2,
    x_t = alpha_t x0 + sigma_t eps,   w ~ U[w_min, w_max],

with ``t`` drawn as the teacher was trained (its ``diffusion.time_sampling``), labels replaced
by the null label with probability ``label_dropout`` (their target is ``u`` for every ``w``,
so the student keeps its unconditional mode), and the error measured in the student's own
prediction space (eps / x0 / v / velocity) as the teacher's training loss was: the teacher's
guided x0_hat is converted to that space at the same ``(x_t, alpha_t, sigma_t)``
(:func:`mnistdiff.parameterization.target_from_x0`).

The student starts as the teacher: same weights, plus a guidance-scale embedding whose last
layer is zero (``model.guidance_embed``), so at step 0 it computes ``c`` for every ``w``.
The guidance scale is just one more conditioning scalar for the backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..parameterization import Denoiser, target_from_x0
from ..schedules import sample_training_times
from .batch import Batch
from .teacher import GuidancePlan, drop_labels, guided_x0


def guidance_distillation_loss(
    student: Denoiser,
    teacher: Denoiser,
    batch: Batch,
    generator: torch.Generator,
    *,
    plan: GuidancePlan,
    label_dropout: float = 0.1,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Per-example loss ``[B]`` of ``student`` against the teacher's guided prediction.

    Randomness (times, noise, scales, label drops, in that order) comes only from
    ``generator``.

    Args:
        student: the student (takes ``w`` as input when ``plan.student_input``).
        teacher: the frozen teacher.
        batch: real images and labels.
        generator: the step's generator.
        plan: the guidance scales (``w`` range; whether the student takes ``w``).
        label_dropout: probability of the null label.
        time_sampling, logit_mean, logit_std: the training-time distribution
            (:func:`mnistdiff.schedules.sample_training_times`).
    """
    x0 = batch.x0.float()
    n, device = x0.shape[0], x0.device
    t = sample_training_times(
        student.schedule,
        n,
        generator,
        device,
        kind=time_sampling,
        logit_mean=logit_mean,
        logit_std=logit_std,
    )
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    teacher_w, student_w = plan.draw(n, generator, device)
    labels = drop_labels(batch.labels, label_dropout, student.null_label, generator)
    alpha, sigma = student.coefficients(t, x0)
    x_t = alpha * x0 + sigma * noise  # [B, C, H, W]
    target_x0 = guided_x0(teacher, x_t, t, labels, teacher_w, clip=False)
    target = target_from_x0(student.prediction, target_x0, x_t, alpha, sigma)
    pred = student.predict(x_t, t, labels, student_w).float()
    return (pred - target).square().flatten(1).mean(dim=1)
