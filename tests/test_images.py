"""Tests for mnistdiff.images: grid layout, PNG and GIF writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnistdiff.images import make_grid, save_gif, save_grid


def _images(n: int = 5, h: int = 4, w: int = 3) -> np.ndarray:
    return (np.arange(n * h * w) % 251 + 1).astype(np.uint8).reshape(n, h, w)


def test_grid_shape_and_placement() -> None:
    images = _images()
    grid = make_grid(images, nrow=3, padding=2, pad_value=7)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (4 + 2) + 2, 3 * (3 + 2) + 2)
    for i, image in enumerate(images):
        top, left = 2 + (i // 3) * 6, 2 + (i % 3) * 5
        assert np.array_equal(grid[top : top + 4, left : left + 3], image)
    assert grid[0, 0] == 7 and grid[1, 5] == 7  # border and gap
    assert (grid[8:12, 12:15] == 7).all()  # unused 6th cell


def test_grid_accepts_tensor_with_channel_and_no_padding() -> None:
    images = torch.from_numpy(_images(4))[:, None]  # [N,1,H,W]
    grid = make_grid(images, nrow=2, padding=0)
    assert grid.shape == (8, 6)
    assert np.array_equal(grid[4:, 3:], images[3, 0].numpy())
    assert make_grid(images, nrow=10, padding=0).shape == (4, 12)  # cols = min(nrow, N)


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        make_grid(np.zeros((2, 4, 4), np.float32), nrow=2)
    with pytest.raises(ValueError, match="nrow"):
        make_grid(_images(), nrow=0)
    with pytest.raises(ValueError, match="non-empty"):
        make_grid(np.zeros((0, 4, 4), np.uint8), nrow=2)


def test_save_grid_png_round_trip(tmp_path: Path) -> None:
    images = _images()
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3, scale=2)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L"
        loaded = np.array(png)
    grid = make_grid(images, nrow=3)
    assert np.array_equal(loaded, grid.repeat(2, 0).repeat(2, 1))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left


def test_save_gif_frame_count(tmp_path: Path) -> None:
    frames = [np.full((6, 8), 30 * k, np.uint8) for k in range(4)]
    path = save_gif(frames, tmp_path / "anim.gif", duration_ms=50)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (8, 6)
        gif.seek(2)
        assert np.array(gif.convert("L"))[0, 0] == 60
    with pytest.raises(ValueError, match="frame 1"):
        save_gif([frames[0], np.zeros((3, 3), np.uint8)], tmp_path / "bad.gif")
    assert not (tmp_path / "bad.gif").exists()
