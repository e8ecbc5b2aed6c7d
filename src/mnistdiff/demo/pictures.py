"""Pictures the demo shows: upscaled digit grids (and their exact inverse) and figures as arrays.

The browser shows a grid :data:`SCALE` times larger than the 28x28 digits, with nearest-neighbour
upscaling, so :func:`split_grid` recovers every digit exactly from the picture a page displays
(the browser test reads the digits back this way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..images import make_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCALE = 4
PADDING = 2
SIZE = 28


def upscale(image: np.ndarray | Tensor, scale: int = SCALE) -> np.ndarray:
    """Nearest-neighbour upscaling of a uint8 ``[H, W]`` image."""
    array = np.asarray(image.cpu() if isinstance(image, Tensor) else image)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] image, got {array.dtype} {array.shape}")
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def grid(images: Tensor, nrow: int, scale: int = SCALE) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` images as one upscaled grid, ``nrow`` per row (:func:`split_grid`)."""
    return upscale(make_grid(images, nrow=nrow, padding=PADDING), scale)


def split_grid(picture: np.ndarray, n: int, nrow: int, scale: int = SCALE) -> Tensor:
    """The ``n`` digits of a :func:`grid` picture, uint8 ``[n, 28, 28]``.

    Args:
        picture: the grid as displayed: uint8 ``[H, W]`` or ``[H, W, C]`` (the first channel
            is used; gray pictures have equal channels).
        n: number of digits in the grid.
        nrow: digits per row.
        scale: the upscaling factor the grid was drawn with.
    """
    array = np.asarray(picture)
    if array.ndim == 3:
        array = array[..., 0]
    cols, rows = min(nrow, n), -(-n // nrow)
    expect = (
        (rows * (SIZE + PADDING) + PADDING) * scale,
        (cols * (SIZE + PADDING) + PADDING) * scale,
    )
    if array.shape != expect:
        raise ValueError(f"a grid of {n} digits, {nrow} per row, is {expect}; got {array.shape}")
    small = array[::scale, ::scale]
    out = torch.empty((n, SIZE, SIZE), dtype=torch.uint8)
    for i in range(n):
        top = PADDING + (i // nrow) * (SIZE + PADDING)
        left = PADDING + (i % nrow) * (SIZE + PADDING)
        out[i] = torch.from_numpy(np.ascontiguousarray(small[top : top + SIZE, left : left + SIZE]))
    return out


def figure_array(fig: Figure, dpi: int = 90) -> np.ndarray:
    """A matplotlib figure rendered to uint8 RGB ``[H, W, 3]``; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        fig.set_dpi(dpi)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])
    finally:
        plt.close(fig)
