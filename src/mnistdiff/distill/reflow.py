"""Reflow of a rectified flow (Liu, Gong & Liu 2023, "Flow straight and fast: learning to
generate and transfer data with rectified flow", ICLR 2023; with a guided teacher as in
InstaFlow, Liu et al. 2024).

The teacher's probability-flow ODE couples each noise ``z`` with a sample ``x1 = ODE_T(z, y,
w)`` (guided, ``u + w (c - u)``). Training a flow on straight lines between the members of
these pairs,

    x_t = (1 - t) x1 + t z,   L(S) = E_{(z, x1), t} || v_S(x_t, t, y) - (z - x1) ||^2,

gives a flow whose paths are straighter than the teacher's (they cross less: the coupling is
deterministic), so a few Euler steps land close to where the full ODE would. ``t`` is uniform
on (0, 1]; the student starts from the teacher's weights; the loss is measured in the
student's prediction space (for ``velocity`` exactly the formula above). On rectified flow
one DDIM step is one Euler step, so the student samples with ``ddim`` on the ``uniform`` grid.

Pairs are generated online (:func:`online_reflow_loss`): every training example is a fresh
pair from the step's generator, so nothing is stored, no pair is seen twice, and a resumed
run is exact. It costs the teacher's solver (``distill.pair_sampler``, ``pair_steps``; two
passes per step with classifier-free guidance) per example. Guidance: a student without a
guidance input learns the pairs of one fixed ``w``; a student with one learns pairs of scales
drawn from ``[w_min, w_max]`` and is told the scale of each pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..guidance import scale_in_interval
from ..parameterization import Denoiser, prediction_target
from ..samplers import get_sampler, initial_sample
from ..schedules import sample_training_times, time_grid
from .batch import Batch
from .teacher import GuidancePlan, drop_labels, guided_x0


def check_flow(denoiser: Denoiser) -> None:
    """Reflow straightens a rectified flow: refuse any other schedule."""
    if denoiser.schedule.name != "flow":
        raise ValueError(
            f"reflow needs a rectified-flow teacher (diffusion.schedule 'flow'), got "
            f"{denoiser.schedule.name!r}; use --method progressive for other schedules"
        )


@torch.no_grad()
def generate_pairs(
    teacher: Denoiser,
    labels: Tensor | None,
    generator: torch.Generator,
    *,
    plan: GuidancePlan,
    label_dropout: float = 0.1,
    sampler: str = "dpmpp_2m",
    steps: int = 10,
    grid: str = "uniform",
    num: int | None = None,
) -> Batch:
    """One batch of (noise, guided teacher sample) pairs.

    Randomness (noise, scales, label drops, then any sampler noise) comes only from
    ``generator``.

    Args:
        teacher: the frozen teacher (rectified flow).
        labels: int64 ``[B]`` class labels, or None for an unconditional teacher.
        generator: the generator of this batch.
        plan: the guidance scales (fixed ``w``, or a range with ``student_input``).
        label_dropout: probability of a null-label (unconditional) pair.
        sampler, steps, grid: the teacher's solver.
        num: number of pairs when ``labels`` is None (default 1).

    Returns:
        ``Batch(x0=samples, labels=labels used, noise=z, guidance=w or None)``.
    """
    check_flow(teacher)
    device = next(teacher.parameters()).device
    n = labels.shape[0] if labels is not None else (num or 1)
    noise = torch.randn((n, *teacher.image_shape), generator=generator, device=generator.device)
    noise = noise.to(device)
    teacher_w, student_w = plan.draw(n, generator, device)
    labels = drop_labels(labels, label_dropout, teacher.null_label, generator)
    ts = time_grid(teacher.schedule, grid, steps)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        return guided_x0(teacher, x, t, labels, scale_in_interval(teacher_w, t, plan.interval))

    x = initial_sample(teacher.schedule, ts, noise)
    out = get_sampler(sampler).fn(denoise, x, teacher.schedule, ts, generator=generator)
    return Batch(x0=out.x.float(), labels=labels, noise=noise, guidance=student_w)


def reflow_loss(
    student: Denoiser,
    teacher: Denoiser,
    batch: Batch,
    generator: torch.Generator,
) -> Tensor:
    """Per-example loss ``[B]`` of ``student`` on straight lines between the pairs in ``batch``.

    The teacher is not called (its knowledge is in the pairs); the argument keeps the
    signature of every distillation loss. Randomness (the times) comes only from
    ``generator``.
    """
    if batch.noise is None:
        raise ValueError("reflow_loss needs (noise, sample) pairs: batch.noise is None")
    x1, z = batch.x0.float(), batch.noise.float()
    t = sample_training_times(student.schedule, x1.shape[0], generator, x1.device)
    alpha, sigma = student.coefficients(t, x1)
    x_t = alpha * x1 + sigma * z  # (1 - t) x1 + t z on rectified flow
    target = prediction_target(student.prediction, x1, z, alpha, sigma)
    pred = student.predict(x_t, t, batch.labels, batch.guidance).float()
    return (pred - target).square().flatten(1).mean(dim=1)


def online_reflow_loss(
    student: Denoiser,
    teacher: Denoiser,
    batch: Batch,
    generator: torch.Generator,
    *,
    plan: GuidancePlan,
    sampler: str = "dpmpp_2m",
    steps: int = 6,
    grid: str = "uniform",
) -> Tensor:
    """:func:`reflow_loss` on fresh pairs of ``batch.labels`` (the images are not used).

    Randomness (the pairs' noise, scales and sampler noise, then the times) comes only from
    ``generator``; labels arrive already dropped to the null label where the loop chose to.
    """
    pairs = generate_pairs(
        teacher,
        batch.labels,
        generator,
        plan=plan,
        label_dropout=0.0,
        sampler=sampler,
        steps=steps,
        grid=grid,
        num=batch.x0.shape[0],
    )
    return reflow_loss(student, teacher, pairs, generator)
