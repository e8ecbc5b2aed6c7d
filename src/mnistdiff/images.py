"""Image grids (PNG) and animations (GIF) of uint8 grayscale images, without torchvision."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnistdiff.atomic import atomic_path

__all__ = ["make_grid", "save_gif", "save_grid"]


def _as_uint8_stack(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return images as a uint8 array ``[N,H,W]`` (accepts ``[N,H,W]`` or ``[N,1,H,W]``)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"expected uint8 images, got {images.dtype}; convert model outputs with "
            "mnistdiff.transforms.from_model_range"
        )
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"expected non-empty [N,H,W] or [N,1,H,W] images, got {images.shape}")
    return images


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def make_grid(
    images: torch.Tensor | np.ndarray, nrow: int, padding: int = 2, pad_value: int = 0
) -> np.ndarray:
    """Tile images into one uint8 image, ``nrow`` images per row, row-major.

    Image ``i`` sits at row ``i // nrow``, column ``i % nrow``, with its top-left pixel at
    ``(padding + row * (H + padding), padding + col * (W + padding))``. Unused cells and the
    borders are filled with ``pad_value``.

    Args:
        images: uint8 ``[N,H,W]`` or ``[N,1,H,W]`` tensor or array.
        nrow: Images per row (the grid has ``min(nrow, N)`` columns).
        padding: Pixels between images and around the border.
        pad_value: Gray level (0..255) of the padding.

    Returns:
        uint8 array ``[rows*(H+padding)+padding, cols*(W+padding)+padding]``.
    """
    stack = _as_uint8_stack(images)
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1, got {nrow!r}")
    if padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"need padding >= 0 and pad_value in 0..255, got {padding}, {pad_value}")
    n, h, w = stack.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, np.uint8
    )
    for i, image in enumerate(stack):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int,
    *,
    scale: int = 1,
    padding: int = 2,
    pad_value: int = 0,
) -> Path:
    """Write a grid of uint8 images as a grayscale PNG (atomically).

    Args:
        images: uint8 ``[N,H,W]`` or ``[N,1,H,W]``.
        path: Destination ``.png`` file.
        nrow: Images per row.
        scale: Nearest-neighbour upscaling factor for visibility.
        padding: Pixels between images.
        pad_value: Gray level of the padding.

    Returns:
        ``path`` as a Path.
    """
    grid = _upscale(make_grid(images, nrow, padding, pad_value), scale)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def save_gif(
    frames: list[np.ndarray],
    path: str | os.PathLike,
    duration_ms: int = 80,
    *,
    scale: int = 1,
    loop: int = 0,
) -> Path:
    """Write uint8 grayscale frames ``[H,W]`` (all the same shape) as an animated GIF.

    Pillow merges consecutive identical frames (adding up their durations).

    Args:
        frames: uint8 2-D arrays or tensors, e.g. :func:`make_grid` outputs.
        path: Destination ``.gif`` file.
        duration_ms: Display time of each frame.
        scale: Nearest-neighbour upscaling factor.
        loop: Number of loops; 0 repeats forever.

    Returns:
        ``path`` as a Path.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    arrays = [np.asarray(f.cpu() if isinstance(f, torch.Tensor) else f) for f in frames]
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8 or a.shape != arrays[0].shape or a.ndim != 2:
            raise ValueError(
                f"frame {i}: expected uint8 [H,W] of shape {arrays[0].shape}, "
                f"got {a.dtype} {a.shape}"
            )
    pictures = [Image.fromarray(_upscale(a, scale)) for a in arrays]
    path = Path(path)
    with atomic_path(path) as tmp:
        pictures[0].save(
            tmp, format="GIF", save_all=True, append_images=pictures[1:],
            duration=duration_ms, loop=loop,
        )  # fmt: skip
    return path
