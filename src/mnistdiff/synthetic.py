"""A small synthetic MNIST-like dataset in the official IDX format, generated locally.

Ten seven-segment digit glyphs (labels 0-9, balanced) with per-image jitter in size, stroke
width, position, slant and brightness, softened by a 3x3 binomial blur: 600 training and 100
test images of 28x28 uint8. Generation uses integer arithmetic only (a splitmix64 stream per
image), so the bytes, and hence the MD5s pinned in the dataset table, are the same on every
machine. It lets the whole pipeline (training, resume, DDP, sampling, evaluation plumbing) run
in seconds without a download; the files are verified exactly like downloaded ones.
"""

from __future__ import annotations

import gzip
from collections.abc import Collection
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .idx import idx_bytes

__all__ = ["NUM_TEST", "NUM_TRAIN", "SEGMENTS", "synthetic_arrays", "write_synthetic"]

NUM_TRAIN, NUM_TEST = 600, 100
SIZE = 28
_MASK = (1 << 64) - 1
_SPLIT_IDS = {"train": 1, "test": 2}

# Seven-segment display: a top, b upper right, c lower right, d bottom, e lower left,
# f upper left, g middle.
SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


class _Stream:
    """splitmix64: a tiny integer random stream, identical on every platform."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def below(self, n: int) -> int:
        """An integer in ``[0, n)``."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return (z ^ (z >> 31)) % n


def _segment_boxes(x0: int, y0: int, w: int, h: int, t: int) -> dict[str, tuple[int, ...]]:
    """Rectangles ``(row0, row1, col0, col1)`` of the seven segments of a ``w x h`` glyph."""
    ym = y0 + h // 2
    x1, y1 = x0 + w, y0 + h
    return {
        "a": (y0, y0 + t, x0, x1),
        "g": (ym - t // 2, ym - t // 2 + t, x0, x1),
        "d": (y1 - t, y1, x0, x1),
        "f": (y0, ym + 1, x0, x0 + t),
        "b": (y0, ym + 1, x1 - t, x1),
        "e": (ym, y1, x0, x0 + t),
        "c": (ym, y1, x1 - t, x1),
    }


def _glyph(label: int, stream: _Stream) -> np.ndarray:
    """One jittered, slanted, blurred seven-segment digit as uint8 ``[28, 28]``."""
    w, h, t = 8 + stream.below(5), 14 + stream.below(5), 2 + stream.below(2)
    x0 = (SIZE - w) // 2 - 2 + stream.below(5)
    y0 = (SIZE - h) // 2 - 2 + stream.below(5)
    slant, value = stream.below(3) - 1, 160 + stream.below(96)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    cols = cols - ((rows - SIZE // 2) * slant) // 6  # integer shear
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    boxes = _segment_boxes(x0, y0, w, h, t)
    for seg in SEGMENTS[label]:
        r0, r1, c0, c1 = boxes[seg]
        mask |= (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    img = np.pad(mask.astype(np.int64) * value, 1)
    kernel = ((1, 2, 1), (2, 4, 2), (1, 2, 1))  # binomial blur, weights sum to 16
    blurred = sum(
        kernel[i][j] * img[i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)
    )
    return np.minimum(blurred // 16, 255).astype(np.uint8)


def synthetic_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images ``[N, 28, 28]`` and labels ``[N]`` (uint8) of the ``train`` or ``test`` split.

    Raises:
        ValueError: for another split name.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLIT_IDS)}")
    n = NUM_TRAIN if split == "train" else NUM_TEST
    labels = (np.arange(n) % 10).astype(np.uint8)
    seeds = (_SPLIT_IDS[split] << 32 | i for i in range(n))
    images = np.stack([_glyph(int(y), _Stream(s)) for y, s in zip(labels, seeds, strict=True)])
    return images, labels


def write_synthetic(root: str | Path, only: Collection[str] | None = None) -> Path:
    """Write the four gzipped IDX files into ``root`` (atomically; ``only``: these file names).

    File names follow MNIST (``train-images-idx3-ubyte.gz`` ...). Gzip runs at level 9 with
    mtime 0, so the bytes match the dataset table's MD5s.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = synthetic_arrays(split)
        names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        for name, array in zip(names, (images, labels), strict=True):
            if only is not None and name not in only:
                continue
            data = gzip.compress(idx_bytes(array), compresslevel=9, mtime=0)
            atomic_write_bytes(root / name, data)
    return root
