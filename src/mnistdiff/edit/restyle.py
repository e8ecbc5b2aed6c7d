"""Handwriting transfer / class swap: keep the writer's style, change the digit.

Papers: DDIM inversion (Song, Meng & Ermon 2021, sec. 5.4) for the encoding, then decoding
with another condition -- the "encode with DDIM, decode with the new condition" step of
DiffEdit (Couairon et al. 2023, sec. 3.2), here with a class label instead of a text query; at
partial depth it is SDEdit (Meng et al. 2022) started from the inverted latent instead of fresh
noise.

Maths. With the probability-flow ODE ``Phi_y`` of the class-``y`` model from t = 0 to t0:
``z = Phi_(y_src)(x_src)`` (deterministic, so ``z`` keeps what the network reads as style:
position, slant, stroke width; coarse layout is set early in sampling, Ho et al. 2020 sec. 4.3),
then ``x_out = Phi_(y_tgt)^(-1)(z)`` decoded with the target label and classifier-free
guidance ``u + w (c_tgt - u)``, or, for an unconditional model, with classifier guidance toward
``y_tgt`` (Dhariwal & Nichol 2021; the inversion is then unconditional). ``strength`` = t0
in (0, 1] sets the depth: 1 inverts all the way to noise (largest change of identity), small
values keep more of the source pixels. Without a source label the inversion is unconditional.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .core import EditResult, check_labels, check_strength, sampling, to_model, to_uint8
from .inversion import decode, invert

if TYPE_CHECKING:
    from ..sample import Pipeline


@torch.no_grad()
def restyle(
    pipe: Pipeline,
    images: Tensor,
    to_labels: Sequence[int] | Tensor | int,
    from_labels: Sequence[int] | Tensor | int | None = None,
    *,
    strength: float = 1.0,
    guidance: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    **options,
) -> EditResult:
    """Turn uint8 digits ``[N, 28, 28]`` into the classes ``to_labels``, keeping their style.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`, conditional or steered by a noisy
            classifier (``classifier=FILE`` in ``options``, used for the decoding only).
        images: uint8 ``[N, 28, 28]`` source digits.
        to_labels: target classes (an int is repeated).
        from_labels: the sources' classes (better inversion), or None (unconditional).
        strength: inversion depth t0 in (0, 1].
        guidance: CFG scale of the regeneration (default: the config's).
        batch_size: images per batch.
        progress: progress bar.
        **options: sampling options for both directions (:func:`mnistdiff.edit.core.sampling`
            with ``ode=True``): ``sampler`` in ddim/euler/heun, ``steps``/``nfe``, ``grid``,
            ``threshold``, ...; ``eta`` / ``s_churn`` above 0 are errors (inversion).

    Returns:
        :class:`EditResult` with the target labels (``info``: strength, NFE each way).

    Raises:
        ValueError: an unconditional model without a classifier, labels out of range, strength
            outside (0, 1].
    """
    t0 = check_strength(strength)
    n = len(to_model(pipe, images))
    steer = {k: options.pop(k) for k in ("classifier", "classifier_scale") if k in options}
    decode_opts = {**options, **steer}
    decode_opts["guidance"] = pipe.cfg.sample.guidance if guidance is None else guidance
    decoding = sampling(pipe, **decode_opts)
    if not pipe.conditional and decoding.classifier is None:
        raise ValueError(
            "restyle needs a class-conditional model, or a noisy classifier to steer this "
            "unconditional one to the targets (classifier=FILE, `mnistdiff train-classifier`)"
        )
    targets = check_labels(pipe, to_labels, n, decoding)
    sources = check_labels(pipe, from_labels, n)  # the inversion takes no classifier
    inv = invert(
        pipe, images, sources, t_end=t0, batch_size=batch_size, progress=progress, **options
    )
    x, nfe = decode(pipe, inv, targets, batch_size=batch_size, **decode_opts)
    info = {"strength": t0, "nfe_invert": inv.nfe, "nfe_decode": nfe}
    return EditResult(to_uint8(pipe, x), targets.cpu(), inv.nfe + nfe, info)
