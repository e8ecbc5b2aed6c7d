"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of
diffusion models", ICLR 2022, Algorithm 2), for any schedule (alpha_t, sigma_t).

A student that takes N deterministic DDIM steps on the uniform grid ``t_i = i / N`` learns to
do in one step what its teacher does in two. For ``t = i / N`` (``i`` uniform in 1..N),
``t' = t - 1/(2N)``, ``t'' = t - 1/N`` and ``x_t = alpha_t x0 + sigma_t eps``, the teacher
takes two DDIM steps (``x0_hat`` clipped to [-1, 1] as the samplers do):

    x0_a = T(x_t, t),     z' = alpha_t' x0_a + sigma_t' (x_t - alpha_t x0_a) / sigma_t,
    x0_b = T(z', t'),     z'' = alpha_t'' x0_b + sigma_t'' (z' - alpha_t' x0_b) / sigma_t',

and the student's one DDIM step from ``x_t`` lands on ``z''`` exactly when its clean-image
estimate is

    x0_target = (z'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(at the last step, ``t'' = 0``, this is ``z'' = x0_b``). The loss is the squared error of the
student's prediction against ``x0_target`` in its own prediction space (eps / x0 / v /
velocity, via :func:`mnistdiff.parameterization.target_from_x0`); for rectified flow with
velocity prediction this weights the x0 error by ``1 / t^2``, as the teacher's training did.

Rounds: one distillation run is one round, a student of N steps from a teacher sampled at
2N; the paper's halving schedule is a chain of runs, each student the next run's teacher
(``mnistdiff distill --checkpoint PREVIOUS_STUDENT --method progressive --steps N/2``). On
rectified flow one DDIM step is exactly one Euler step of the velocity field, so the student
samples with ``ddim`` on the ``uniform`` grid. Guidance: the teacher is asked for
``u + w (c - u)`` (:func:`mnistdiff.distill.teacher.guided_x0`) at ``distill.guidance``,
which defaults to the teacher's own ``sample.guidance``; a student without a guidance input
has ``w`` baked in and records ``sample.guidance: 1``, so its own student asks it at ``w = 1``
(one pass); a student with one (of a guidance-distilled teacher, Meng et al. 2023 stage two)
gets the same drawn ``w`` as its teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..guidance import scale_in_interval
from ..parameterization import Denoiser, target_from_x0
from .batch import Batch
from .teacher import GuidancePlan, drop_labels, guided_x0


def _ddim_step(x: Tensor, x0: Tensor, a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor) -> Tensor:
    """Deterministic DDIM from time t to s given the clean-image estimate ``x0``."""
    return a_s * x0 + s_s * (x - a_t * x0) / s_t


@torch.no_grad()
def two_step_target(
    teacher: Denoiser,
    x_t: Tensor,
    t: Tensor,
    student_steps: int,
    labels: Tensor | None,
    w: Tensor,
    *,
    interval: tuple[float, float] | None = None,
) -> Tensor:
    """The clean-image estimate whose one DDIM step ``t -> t - 1/N`` lands where the teacher's
    two steps ``t -> t - 1/(2N) -> t - 1/N`` land (the module docstring's ``x0_target``).

    Args:
        teacher: the frozen teacher.
        x_t: noisy images at ``t`` ``[B, C, H, W]``.
        t: float64 times ``[B]`` on the student's grid (multiples of ``1 / student_steps``).
        student_steps: N.
        labels: int64 ``[B]`` or None.
        w: the teacher's guidance scales ``[B]``.
        interval: ``(t_lo, t_hi)``: guide only there, 1 elsewhere (the teacher's sampler's
            ``sample.guidance_interval``).
    """
    t = t.to(torch.float64)
    t_mid = t - 0.5 / student_steps
    t_end = (t - 1.0 / student_steps).clamp(min=0.0)
    a_t, s_t = teacher.coefficients(t, x_t)
    a_m, s_m = teacher.coefficients(t_mid, x_t)
    a_e, s_e = teacher.coefficients(t_end, x_t)
    x_t = x_t.float()
    x0_a = guided_x0(teacher, x_t, t.float(), labels, scale_in_interval(w, t, interval))
    z_mid = _ddim_step(x_t, x0_a, a_t, s_t, a_m, s_m)
    x0_b = guided_x0(teacher, z_mid, t_mid.float(), labels, scale_in_interval(w, t_mid, interval))
    z_end = _ddim_step(z_mid, x0_b, a_m, s_m, a_e, s_e)
    ratio = s_e / s_t
    return (z_end - ratio * x_t) / (a_e - ratio * a_t)


def progressive_loss(
    student: Denoiser,
    teacher: Denoiser,
    batch: Batch,
    generator: torch.Generator,
    *,
    student_steps: int,
    plan: GuidancePlan,
    label_dropout: float = 0.1,
) -> Tensor:
    """Per-example loss ``[B]``: the student's one step against the teacher's two.

    Randomness (grid index, noise, scales, label drops, in that order) comes only from
    ``generator``.

    Args:
        student: the student (N = ``student_steps`` steps).
        teacher: the frozen teacher (2N steps).
        batch: real images and labels.
        generator: the step's generator.
        student_steps: N.
        plan: the guidance scales of teacher and student.
        label_dropout: probability of the null label.
    """
    x0 = batch.x0.float()
    n, device = x0.shape[0], x0.device
    i = torch.randint(1, student_steps + 1, (n,), generator=generator, device=generator.device)
    t = (i.to(torch.float64) / student_steps).to(device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
    teacher_w, student_w = plan.draw(n, generator, device)
    labels = drop_labels(batch.labels, label_dropout, student.null_label, generator)
    a_t, s_t = student.coefficients(t, x0)
    x_t = a_t * x0 + s_t * noise  # [B, C, H, W]
    x0_target = two_step_target(
        teacher, x_t, t, student_steps, labels, teacher_w, interval=plan.interval
    )
    target = target_from_x0(student.prediction, x0_target, x_t, a_t, s_t)
    pred = student.predict(x_t, t.float(), labels, student_w).float()
    return (pred - target).square().flatten(1).mean(dim=1)
