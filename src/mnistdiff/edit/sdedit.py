"""SDEdit: noise an image part of the way and denoise it with the model.

Paper: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations" (ICLR), Alg. 1.

Maths. For a guide image ``x_g`` (a rough sketch, or a digit of another class) and a strength
``t0`` in (0, 1]: draw ``x_t0 = alpha_t0 x_g + sigma_t0 z`` with ``z ~ N(0, I)`` (the forward
process at t0), then run the reverse sampler from t0 to 0 -- the part of the usual grid below
t0 (:func:`mnistdiff.edit.core.truncate_grid`). Small t0 keeps the guide (faithful), t0 = 1 is
plain sampling (realistic); the realism-faithfulness trade-off is the paper's Fig. 3. With a
label and classifier-free guidance the result is steered to that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from ..seeding import seed_for
from .core import (
    EditResult,
    batches,
    check_labels,
    check_strength,
    grid_for,
    label_or_none,
    noise_to,
    randn,
    rows,
    sample_from,
    sampling,
    to_model,
    to_uint8,
    truncate_grid,
)

if TYPE_CHECKING:
    from ..sample import Pipeline


@torch.no_grad()
def sdedit(
    pipe: Pipeline,
    images: Tensor,
    strength: float = 0.6,
    labels: Sequence[int] | Tensor | int | None = None,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    **options,
) -> EditResult:
    """SDEdit uint8 images ``[N, 28, 28]``: noise to t = ``strength``, then denoise.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        images: uint8 guide images ``[N, 28, 28]``.
        strength: start time t0 in (0, 1].
        labels: target classes (an int is repeated) or None (unconditional denoising).
        seed: batch ``b`` draws its noise from a generator seeded by ``(seed, b)``.
        batch_size: images per batch (default: the config's).
        progress: show a progress bar over batches.
        **options: sampling options (:func:`mnistdiff.edit.core.sampling`): ``sampler``,
            ``steps``/``nfe`` of the full grid, ``grid``, ``guidance``, ``threshold``, the
            sampler's own (``eta``, ``s_churn``, ...); its noise comes from the batch's generator.

    Returns:
        :class:`EditResult` (``info``: strength, steps run, ``options`` =
        ``SampleOptions.record()``).
    """
    t0 = check_strength(strength)
    opts = sampling(pipe, **options)
    x_g = to_model(pipe, images)
    labels = check_labels(pipe, labels, len(x_g), opts)
    schedule = pipe.denoiser.schedule
    ts = truncate_grid(grid_for(opts, schedule), t0)
    outs, nfe = [], 0
    parts = batches(len(x_g), batch_size, pipe)
    for b, sl in enumerate(tqdm(parts, desc="sdedit", disable=not progress)):
        gen = torch.Generator(device=pipe.device).manual_seed(seed_for(seed, b))
        x = noise_to(schedule, x_g[sl], t0, randn(pipe, sl.stop - sl.start, gen))
        out = sample_from(pipe, x, ts, rows(labels, sl), opts, gen=gen)
        outs.append(out.x)
        nfe = out.nfe
    info = {"strength": t0, "steps_run": len(ts) - 1, "options": opts.record()}
    return EditResult(to_uint8(pipe, torch.cat(outs)), label_or_none(labels, len(x_g)), nfe, info)
