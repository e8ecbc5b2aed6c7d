"""Inpainting: regenerate the masked pixels so they fit the known ones.

Papers: RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
Probabilistic Models", CVPR, Alg. 1) and, for comparison, the plain replacement method
(Song et al. 2021, "Score-based generative modeling through SDEs", app. I.2; RePaint with
R = 1).

Maths. With a mask ``m`` (1 = regenerate, 0 = known) and the known image ``x0``, every reverse
step from t to s of the registry sampler is followed by
``x_s <- m * x_s + (1 - m) * (alpha_s x0 + sigma_s z)``, ``z ~ N(0, I)`` fresh each step: the
known region is replaced by a sample of the forward process ``q(x_s | x0)``, so the sampler sees
a consistent noisy image. Plain replacement harmonizes poorly because the unknown region only
sees the known one through one step at a time; RePaint repeats every step R times, jumping back
with ``x_t = (alpha_t/alpha_s) x_s + sigma_(t|s) z`` (``sigma_(t|s)^2 = sigma_t^2 -
(alpha_t/alpha_s)^2 sigma_s^2``) between repeats, so information flows between the regions
(jump length 1; NFE about R times the steps). At t = 0 the known pixels are set to ``x0``
itself, and the returned uint8 images take the known pixels from the input, so they come back
bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..seeding import seed_for
from ..transforms import pad_to
from .core import (
    EditResult,
    batches,
    check_labels,
    denoise_fn,
    grid_for,
    label_or_none,
    noise_to,
    rows,
    run_steps,
    sampling,
    to_model,
    to_uint8,
)

if TYPE_CHECKING:
    from ..sample import Pipeline


MASK_NAMES = ("bottom", "top", "left", "right")
METHODS = ("repaint", "replace")
SIZE = 28


def make_mask(spec: str | Path | np.ndarray | Tensor, size: int = SIZE) -> Tensor:
    """A bool mask ``[size, size]``, True = regenerate.

    Args:
        spec: ``bottom`` / ``top`` / ``left`` / ``right`` (that half), ``box:x0,y0,x1,y1``
            (columns x0..x1-1, rows y0..y1-1), a PNG file (white = regenerate, size x size), or
            an array/tensor ``[size, size]`` (nonzero = regenerate).
        size: image size.

    Raises:
        ValueError: unknown name, bad box, not an image, wrong size, empty or full mask.
    """
    if isinstance(spec, (np.ndarray, Tensor)):
        mask = torch.as_tensor(np.asarray(spec)) != 0
    elif str(spec) in MASK_NAMES:
        mask = torch.zeros(size, size, dtype=torch.bool)
        half = size // 2
        {
            "bottom": lambda: mask[half:].fill_(True),
            "top": lambda: mask[:half].fill_(True),
            "left": lambda: mask[:, :half].fill_(True),
            "right": lambda: mask[:, half:].fill_(True),
        }[str(spec)]()
    elif str(spec).startswith("box:"):
        mask = _box(str(spec), size)
    else:
        mask = _mask_file(Path(spec))
    if tuple(mask.shape) != (size, size):
        raise ValueError(f"mask must be {size}x{size} (the digit size), got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError("mask is empty: nothing to regenerate (white/nonzero = regenerate)")
    if bool(mask.all()):
        raise ValueError("mask covers the whole image: nothing is known (use `sample` instead)")
    return mask


def _box(spec: str, size: int) -> Tensor:
    try:
        x0, y0, x1, y1 = (int(v) for v in spec[4:].split(","))
    except ValueError:
        raise ValueError(f"bad box {spec!r}: expected box:x0,y0,x1,y1 (integers)") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(
            f"bad box {spec!r}: need 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}"
        )
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _mask_file(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(
            f"mask {str(path)!r} is not one of {', '.join(MASK_NAMES)}, box:x0,y0,x1,y1 "
            "or an existing PNG file"
        )
    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"mask {path}: not an image ({exc})") from None
    return torch.from_numpy(gray >= 128)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; allowed: {', '.join(METHODS)}")
    return method


def _model_mask(pipe: Pipeline, mask: Tensor) -> Tensor:
    """``[1, 1, S, S]`` float mask in model space (padding counts as known)."""
    m = mask.float()[None, None]
    size = pipe.denoiser.image_shape[-1]
    return pad_to(m, size, value=0.0).to(pipe.device) if size != m.shape[-1] else m.to(pipe.device)


@torch.no_grad()
def inpaint(
    pipe: Pipeline,
    images: Tensor,
    mask: str | Path | np.ndarray | Tensor,
    labels: Sequence[int] | Tensor | int | None = None,
    *,
    method: str = "repaint",
    resample: int = 5,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    **options,
) -> EditResult:
    """Fill the masked pixels of uint8 images ``[N, 28, 28]``.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        images: uint8 ``[N, 28, 28]``.
        mask: anything :func:`make_mask` takes (one mask for all images), or bool ``[N, 28, 28]``.
        labels: classes to complete to (an int is repeated), or None.
        method: ``repaint`` (R = ``resample`` repeats per step) or ``replace`` (R = 1).
        resample: RePaint's R (>= 1).
        seed: batch ``b`` draws its noise from a generator seeded by ``(seed, b)``.
        batch_size: images per batch.
        progress: progress bar over the steps.
        **options: sampling options (:func:`mnistdiff.edit.core.sampling`): ``sampler``,
            ``steps``/``nfe``, ``grid``, ``guidance``, ``threshold``, the sampler's own
            (``eta``, ``s_churn``, ...).

    Returns:
        :class:`EditResult`; pixels outside the mask equal the input exactly
        (``info``: method, resample, masked fraction, ``options`` = ``SampleOptions.record()``).
    """
    resample = 1 if _check_method(method) == "replace" else resample
    opts = sampling(pipe, **options)
    images = images if images.ndim == 3 else images[:, 0]
    x0 = to_model(pipe, images)
    masks = _masks(mask, len(x0))
    labels = check_labels(pipe, labels, len(x0), opts)
    schedule = pipe.denoiser.schedule
    ts = grid_for(opts, schedule)
    outs, nfe = [], 0
    for b, sl in enumerate(tqdm(batches(len(x0), batch_size, pipe), disable=not progress)):
        gen = torch.Generator(device=pipe.device).manual_seed(seed_for(seed, b))
        m = torch.cat([_model_mask(pipe, mk) for mk in masks[sl]])  # [B, 1, S, S]
        known = x0[sl]

        def keep_known(i: int, x: Tensor, t: float, known=known, m=m, gen=gen) -> Tensor:
            if t == 0.0:
                return torch.where(m > 0, x, known)
            noise = torch.randn(known.shape, generator=gen, device=known.device)
            return torch.where(m > 0, x, noise_to(schedule, known, t, noise))

        start = torch.randn(known.shape, generator=gen, device=known.device)
        x = keep_known(-1, start * float(schedule.alpha_sigma(ts[0])[1]), float(ts[0]))
        fn = denoise_fn(pipe, rows(labels, sl), opts)
        out = run_steps(
            opts.sampler, fn, x, schedule, ts, hook=keep_known, resample=resample, gen=gen,
            sampler_kwargs=opts.sampler_kwargs(), progress=progress, desc="inpainting",
        )  # fmt: skip
        outs.append(out.x)
        nfe = out.nfe
    generated = to_uint8(pipe, torch.cat(outs))
    result = torch.where(masks, generated, images.cpu())  # known pixels bit for bit
    info = {
        "method": method,
        "resample": resample,
        "masked_fraction": float(masks.float().mean()),
        "options": opts.record(),
    }
    return EditResult(result, label_or_none(labels, len(x0)), nfe, info)


def _masks(mask, n: int) -> Tensor:
    """bool ``[n, 28, 28]`` from one mask spec or a per-image stack."""
    if isinstance(mask, (np.ndarray, Tensor)) and np.asarray(mask).ndim == 3:
        stack = torch.as_tensor(np.asarray(mask)) != 0
        if stack.shape[0] != n:
            raise ValueError(f"got {stack.shape[0]} masks for {n} images")
        return torch.stack([make_mask(s) for s in stack])
    return make_mask(mask).expand(n, SIZE, SIZE).clone()
