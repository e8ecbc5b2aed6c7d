"""Inversion: run the deterministic sampler backwards, from an image at t = 0 to noise at t = 1.

Paper: DDIM inversion (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", sec. 4.3
and 5.4: DDIM with eta = 0 is an Euler discretization of an ODE, so it can be run in reverse to
encode an image), i.e. integrating the probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through SDEs", sec. 4.3) forward in time.

Maths. With ``x_t = alpha_t x0 + sigma_t eps``, the probability-flow ODE in
``x_tilde = x / alpha``, ``sigma_tilde = sigma / alpha`` is
``d x_tilde / d sigma_tilde = (x_tilde - x0_hat(x, t)) / sigma_tilde = eps_hat``. A DDIM step from
t to s, ``x_s = alpha_s x0_hat(x_t) + sigma_s eps_hat(x_t)``, is its Euler step and is valid in
either direction; Heun adds the trapezoid correction. Inversion runs the SAME registry sampler on
the generation grid reversed, ``0 < t_(N-1) < ... < t_0 = t_end``, with one exception: the model
is never run at t = 0, so the first interval [0, t_(N-1)] inverts the generator's last step
``x0 = x0_hat(x_(t_(N-1)))`` by the fixed-point iteration
``x <- alpha x0 + sigma eps_hat(x)`` started from ``x = alpha x0`` (``refine`` iterations, one
network evaluation each; it converges because ``sigma`` is small there).

Decoding the latents with the same grid reconstructs the image up to the solvers' error
(first order for DDIM/Euler, second for Heun): on Gaussian data with the exact denoiser the
reconstruction error shrinks with the step count at that order (``tests/test_edit.py``).
NFE each way: DDIM N, Heun 2N - 1 (with ``refine = 1``).

Only a deterministic sampler can be run backwards: the options come from
:func:`mnistdiff.edit.core.sampling` with ``ode=True``, which refuses ``eta > 0`` (DDIM) and
``s_churn > 0`` (Euler/Heun) when asked for and sets the config's own values of them to 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import SampleOptions
from .core import (
    Denoise,
    EditResult,
    alpha_sigma,
    batches,
    check_labels,
    denoise_fn,
    grid_for,
    label_or_none,
    psnr,
    rows,
    run_sampler,
    sample_from,
    sampling,
    to_model,
    to_uint8,
    truncate_grid,
)

if TYPE_CHECKING:
    from ..sample import Pipeline


@dataclass(frozen=True)
class Inversion:
    """Latents of inverted images.

    Attributes:
        latents: float ``[N, C, S, S]`` at time ``t``.
        t: the time the latents sit at (1 = full inversion).
        labels: int64 ``[N]`` labels used while inverting (-1 = none).
        nfe: network evaluations per image.
        sampling: the options used (deterministic; decode with the same ones to reconstruct).
    """

    latents: Tensor
    t: float
    labels: Tensor
    nfe: int
    sampling: SampleOptions


def generation_grid(pipe: Pipeline, opts: SampleOptions, t_end: float = 1.0) -> Tensor:
    """The descending grid from ``t_end`` to 0 that decoding uses (and inversion reverses)."""
    ts = grid_for(opts, pipe.denoiser.schedule)
    return ts if t_end >= float(ts[0]) else truncate_grid(ts, t_end)


def invert_x(
    denoise: Denoise,
    x0: Tensor,
    schedule,
    ts_desc: Tensor,
    sampler: str,
    refine: int = 1,
    sampler_kwargs: Mapping[str, float] | None = None,
) -> tuple[Tensor, int]:
    """Model-range images -> latents at ``ts_desc[0]`` (the pure-tensor core of :func:`invert`).

    Args:
        denoise: ``denoise(x, t) -> x0_hat``.
        x0: images ``[B, C, S, S]`` at t = 0.
        schedule: the noise schedule.
        ts_desc: the descending generation grid (ends at 0) to reverse.
        sampler: ``ddim``, ``euler`` or ``heun``.
        refine: fixed-point iterations of the first interval (>= 1).
        sampler_kwargs: the sampler's own options; they must not add noise (``eta`` and
            ``s_churn`` 0, as :func:`mnistdiff.edit.core.sampling` with ``ode=True`` ensures).

    Returns:
        ``(latents, nfe)``.
    """
    if refine < 1:
        raise ValueError(f"refine must be >= 1, got {refine}")
    ts = ts_desc.flip(0)  # ascending, starts at 0
    t1 = float(ts[1])
    a, s = alpha_sigma(schedule, t1)
    x = a * x0
    t_batch = torch.full((x0.shape[0],), t1, dtype=x0.dtype, device=x0.device)
    for _ in range(refine):  # x = a x0 + s eps_hat(x): inverse of "x0 = x0_hat(x, t1)"
        x = a * x0 + (x - a * denoise(x, t_batch))
    nfe = refine
    if len(ts) > 2:
        out = run_sampler(sampler, denoise, x, schedule, ts[1:], sampler_kwargs=sampler_kwargs)
        x, nfe = out.x, nfe + out.nfe
    return x, nfe


@torch.no_grad()
def invert(
    pipe: Pipeline,
    images: Tensor,
    labels: Sequence[int] | Tensor | int | None = None,
    *,
    t_end: float = 1.0,
    refine: int = 1,
    batch_size: int | None = None,
    progress: bool = False,
    **options,
) -> Inversion:
    """Encode uint8 images ``[N, 28, 28]`` into latents at ``t_end`` by the reversed ODE.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        images: uint8 ``[N, 28, 28]``.
        labels: the images' classes (an int is repeated), or None to invert unconditionally.
        t_end: where to stop (1 = pure noise; smaller = partial inversion, for restyling).
        refine: fixed-point iterations of the first interval.
        batch_size: images per forward pass (default: the config's sample batch size).
        progress: show a progress bar over batches.
        **options: sampling options as :func:`mnistdiff.edit.core.sampling` takes them, with
            ``ode=True``: ``sampler`` in ddim/euler/heun, ``steps``/``nfe``, ``grid``,
            ``guidance`` (default 1: plain conditional), ``threshold``, ... ; the sampler must
            stay deterministic (``eta`` / ``s_churn`` above 0 are errors).

    Returns:
        An :class:`Inversion`.

    Raises:
        ValueError: a sampler that cannot run backwards, an option that adds noise, bad input.
    """
    if options.get("guidance") is None:
        options["guidance"] = 1.0
    opts = sampling(pipe, ode=True, **options)
    x0 = to_model(pipe, images)
    labels = check_labels(pipe, labels, len(x0), opts)
    ts = generation_grid(pipe, opts, t_end)
    outs, nfe = [], 0
    for sl in tqdm(batches(len(x0), batch_size, pipe), desc="inverting", disable=not progress):
        fn = denoise_fn(pipe, rows(labels, sl), opts)
        z, nfe = invert_x(
            fn, x0[sl], pipe.denoiser.schedule, ts, opts.sampler, refine, opts.sampler_kwargs()
        )
        outs.append(z)
    return Inversion(torch.cat(outs), float(ts[0]), label_or_none(labels, len(x0)), nfe, opts)


@torch.no_grad()
def decode(
    pipe: Pipeline,
    inversion: Inversion,
    labels: Sequence[int] | Tensor | int | None = None,
    *,
    batch_size: int | None = None,
    **options,
) -> tuple[Tensor, int]:
    """Run the sampler from the latents down to t = 0.

    Args:
        pipe: the pipeline.
        inversion: from :func:`invert`.
        labels: labels to decode with; default the inversion's (None if it had none).
        batch_size: images per forward pass.
        **options: sampling options overriding the inversion's (``inversion.sampling``).

    Returns:
        ``(model-range images [N, C, S, S], nfe)``.
    """
    opts = sampling(pipe, inversion.sampling, **options)
    n = len(inversion.latents)
    if labels is None and bool((inversion.labels >= 0).all()):
        labels = inversion.labels
    labels = check_labels(pipe, labels, n, opts)
    ts = generation_grid(pipe, opts, inversion.t)
    outs, nfe = [], 0
    for sl in batches(n, batch_size, pipe):
        out = sample_from(pipe, inversion.latents[sl], ts, rows(labels, sl), opts)
        outs.append(out.x)
        nfe = out.nfe
    return torch.cat(outs), nfe


def reconstruct(
    pipe: Pipeline,
    images: Tensor,
    labels: Sequence[int] | Tensor | int | None = None,
    **options,
) -> EditResult:
    """Invert and decode again; ``info`` holds the PSNR per image and its mean, and the NFE.

    Args:
        pipe: the pipeline.
        images: uint8 ``[N, 28, 28]``.
        labels: classes to invert and decode with, or None (unconditional).
        **options: as :func:`invert` (``steps``/``nfe``, ``sampler``, ``refine``, ...).

    Returns:
        :class:`EditResult` with ``info = {"psnr": [...], "mean_psnr", "nfe_invert",
        "nfe_decode", "options", "labels"}`` (PSNR in dB, capped at 100; ``options`` is
        ``SampleOptions.record()`` of the inversion, which decoding shares).
    """
    keys = ("t_end", "refine", "batch_size", "progress")
    inv = invert(pipe, images, labels, **options)
    decode_opts = {k: v for k, v in options.items() if k not in keys}
    x, nfe = decode(pipe, inv, batch_size=options.get("batch_size"), **decode_opts)
    out = to_uint8(pipe, x)
    scores = psnr(out, images.reshape(out.shape)).clamp(max=100.0)  # identical: 100, not inf
    return EditResult(
        out,
        inv.labels,
        nfe,
        {
            "psnr": [round(float(v), 3) for v in scores],
            "mean_psnr": round(float(scores.mean()), 3),
            "nfe_invert": inv.nfe,
            "nfe_decode": nfe,
            "options": inv.sampling.record(),
            "labels": labels is not None,
        },
    )
