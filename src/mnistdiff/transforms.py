"""Image transforms between stored uint8 images and model-range tensors, and their inverses.

``to_model_range`` / ``from_model_range`` map uint8 ``[0, 255]`` to float ``[-1, 1]`` and back;
``pad_to`` / ``crop_to`` add and remove the symmetric border of the 32x32 option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import DataConfig
    from .data import DataSpec

__all__ = ["crop_to", "from_model_range", "original_size", "pad_to", "to_model_range"]


def to_model_range(images_uint8: Tensor) -> Tensor:
    """Map uint8 images ``[N,H,W]`` or ``[N,1,H,W]`` to float32 ``[N,1,H,W]`` in ``[-1, 1]``."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    if images_uint8.dim() != 4:
        raise ValueError(f"expected [N,H,W] or [N,C,H,W], got shape {tuple(images_uint8.shape)}")
    return images_uint8.float() / 127.5 - 1.0


def from_model_range(x: Tensor) -> Tensor:
    """Map model-range images ``[N,1,H,W]`` (or ``[N,H,W]``) to uint8 ``[N,H,W]``.

    Values are clamped to ``[-1, 1]`` and rounded; nothing is cropped.

    Raises:
        ValueError: if ``x`` contains NaN (a diverged model), or has more than one channel.
    """
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected [N,1,H,W] or [N,H,W], got shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"images contain {int(torch.isnan(x).sum())} NaN values")
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def pad_to(x: Tensor, size: int, value: float = -1.0) -> Tensor:
    """Pad ``[N,C,H,W]`` images symmetrically to ``size x size`` (default -1 = black).

    Odd padding puts the extra row/column at the bottom/right.
    """
    h, w = x.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"pad_to size {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    pad = (left, size - w - left, top, size - h - top)
    return torch.nn.functional.pad(x, pad, mode="constant", value=value)


def crop_to(x: Tensor, size: int) -> Tensor:
    """Center-crop ``[..., S, S]`` images to ``size`` (undo :func:`pad_to`)."""
    s = x.shape[-1]
    if s == size:
        return x
    o = (s - size) // 2
    return x[..., o : o + size, o : o + size]


def original_size(spec: DataSpec, cfg: DataConfig) -> int:
    """Image size before padding (what users and the evaluator see)."""
    return 28 if cfg.pad_to_32 else spec.size
