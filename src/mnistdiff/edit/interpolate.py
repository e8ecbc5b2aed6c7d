"""Interpolation between two seeds, two images (via inversion) and two classes.

Papers: spherical interpolation of the starting noise (Shoemake 1985 "slerp"; used for
diffusion latents by Song, Meng & Ermon 2021, DDIM sec. 5.3, Fig. 6), DDIM inversion for
images (ibid. sec. 5.4), and interpolation of the class embedding for the condition
(as in BigGAN's class-embedding interpolation, Brock et al. 2019, sec. 3 / app.).

Maths. For latents ``z0, z1`` (per image, flattened) with angle
``theta = arccos(<z0, z1> / (|z0| |z1|))``:
``slerp(z0, z1; w) = sin((1 - w) theta) / sin(theta) z0 + sin(w theta) / sin(theta) z1``,
which keeps the norm of Gaussian noise (a linear mix ``(1 - w) z0 + w z1`` shrinks it by up to
``1/sqrt(2)``, and the model then sees an off-distribution, too-clean start). Each frame is
decoded by the deterministic sampler, so w = 0 and w = 1 give exactly the endpoints' images.
Across classes the label embedding ``e(y)`` is replaced by ``(1 - w) e(y0) + w e(y1)`` in the
conditional branch (the null branch of classifier-free guidance is unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import SampleOptions
from ..samplers import initial_sample
from .core import (
    EditResult,
    check_labels,
    generator,
    randn,
    sample_from,
    sampling,
    to_uint8,
)
from .inversion import generation_grid, invert

if TYPE_CHECKING:
    from ..sample import Pipeline


def slerp(z0: Tensor, z1: Tensor, w: float) -> Tensor:
    """Spherical interpolation per leading index (``[B, ...]``); exact endpoints.

    Falls back to the linear mix when the vectors are (anti)parallel within 1e-7 rad.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if w == 0.0:
        return z0.clone()
    if w == 1.0:
        return z1.clone()
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]  # [B, 1]
    sin = torch.sin(theta)
    small = sin.abs() < 1e-7
    c0 = torch.where(small, 1.0 - w, torch.sin((1.0 - w) * theta) / sin.where(~small, 1.0))
    c1 = torch.where(small, w, torch.sin(w * theta) / sin.where(~small, 1.0))
    return (c0 * a + c1 * b).to(z0.dtype).view_as(z0)


@contextlib.contextmanager
def mixed_label_embedding(backbone, other: Tensor, weights: Tensor) -> Iterator[None]:
    """Inside the block, the label embedding of conditional rows becomes a mix.

    Row ``r`` of a call with labels ``y`` (not the null label) gets
    ``(1 - weights[r]) e(y[r]) + weights[r] e(other[r])``; rows past ``len(weights)`` (the null
    half of a guided batch) and null-label rows are unchanged.
    """
    table = getattr(getattr(backbone, "cond", None), "label_emb", None)
    if table is None:
        raise ValueError("this backbone has no class embedding (unconditional model)")
    null = table.num_embeddings - 1

    def hook(module, inputs, output):
        (labels,) = inputs
        n = min(len(weights), len(labels))
        w = weights[:n].to(output.dtype).to(output.device)[:, None]
        keep = (labels[:n] != null)[:, None]
        e_other = torch.nn.functional.embedding(other[:n].to(labels.device), module.weight)
        mixed = (1 - w) * output[:n] + w * e_other.to(output.dtype)
        out = output.clone()
        out[:n] = torch.where(keep, mixed, output[:n])
        return out

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _weights(num: int) -> list[float]:
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num (frames) must be an integer >= 2, got {num!r}")
    return [i / (num - 1) for i in range(num)]


def _pair(value, name: str) -> tuple:
    if value is None:
        return (None, None)
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be two values (start, end), got {value!r}")
    return value


@torch.no_grad()
def interpolate(
    pipe: Pipeline,
    num: int = 8,
    *,
    seeds: Sequence[int] | None = None,
    images: Tensor | None = None,
    labels: Sequence[int] | int | None = None,
    **options,
) -> EditResult:
    """Frames between two endpoints: seeds (fresh noise) or two images (inverted).

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        num: frames including both ends (>= 2).
        seeds: ``(seed0, seed1)``: endpoints are the samples these seeds give.
        images: uint8 ``[2, 28, 28]``: endpoints are the images' reconstructions (inverted with
            their labels when given).
        labels: ``(y0, y1)`` or one label for both (conditional models); different labels
            interpolate the class embedding.
        **options: sampling options (:func:`mnistdiff.edit.core.sampling` with
            ``deterministic=True``, ``ode=True`` for images): ``sampler``, ``steps``/``nfe``,
            ``grid``, ``guidance``, ``threshold``, ...; ``eta`` / ``s_churn`` above 0 are errors.

    Returns:
        :class:`EditResult` with ``num`` frames; ``labels`` is the nearer endpoint's label per
        frame (-1 for unconditional); ``info["weights"]`` the interpolation weights,
        ``info["options"]`` the ``SampleOptions.record()``.
    """
    weights = _weights(num)
    y0, y1 = _pair(labels, "labels")
    if (y0 is None) != (y1 is None):
        raise ValueError("give both labels or neither")
    pair = check_labels(pipe, [y0, y1], 2) if y0 is not None else None
    z, opts = _endpoints(pipe, seeds, images, pair, options)
    ts = generation_grid(pipe, opts)
    x = torch.cat([slerp(z[:1], z[1:], w) for w in weights])  # [num, C, S, S]
    if pair is None:
        out = sample_from(pipe, x, ts, None, opts)
        frame_labels = torch.full((num,), -1)
    else:
        start = pair[0].repeat(num)
        w = torch.tensor(weights)
        ctx = (
            mixed_label_embedding(pipe.denoiser.backbone, pair[1].repeat(num), w)
            if int(pair[0]) != int(pair[1])
            else contextlib.nullcontext()
        )
        with ctx:
            out = sample_from(pipe, x, ts, start.to(pipe.device), opts)
        frame_labels = torch.where(w < 0.5, pair[0], pair[1])
    info = {"weights": weights, "options": opts.record()}
    return EditResult(to_uint8(pipe, out.x), frame_labels.long(), out.nfe, info)


def _endpoints(pipe: Pipeline, seeds, images, pair, options) -> tuple[Tensor, SampleOptions]:
    """Start latents ``[2, C, S, S]`` and the sampling settings."""
    if (seeds is None) == (images is None):
        raise ValueError("give exactly one of seeds=(a, b) or images=[2, 28, 28]")
    if images is not None:
        if len(images) != 2:
            raise ValueError(f"interpolation between images needs exactly 2, got {len(images)}")
        inv = invert(pipe, images, pair, **options)
        return inv.latents, inv.sampling
    s0, s1 = _pair(seeds, "seeds")
    opts = sampling(pipe, deterministic=True, **options)
    ts = generation_grid(pipe, opts)
    noise = torch.cat([randn(pipe, 1, generator(pipe, int(s))) for s in (s0, s1)])
    return initial_sample(pipe.denoiser.schedule, ts, noise), opts


def endpoint_sample(pipe: Pipeline, seed: int, label: int | None = None, **options) -> Tensor:
    """The uint8 image ``[1, 28, 28]`` that seed ``seed`` gives alone (an interpolation end)."""
    opts = sampling(pipe, deterministic=True, **options)
    ts = generation_grid(pipe, opts)
    x = initial_sample(pipe.denoiser.schedule, ts, randn(pipe, 1, generator(pipe, seed)))
    y = None if label is None else check_labels(pipe, [label], 1).to(pipe.device)
    return to_uint8(pipe, sample_from(pipe, x, ts, y, opts).x)
