"""Edit inputs: user PNGs, MNIST test digits and ``.npz`` files -> uint8 ``[N, 28, 28]``.

A PNG of any size or mode is converted the way MNIST was made (LeCun et al. 1998; the MNIST
page): grayscale, light digit on a dark background, the digit's bounding box scaled to fit
20x20 with its aspect ratio kept, then placed in a 28x28 frame with its centre of mass at the
centre. A dark-on-light image (a digit drawn on white paper) is recognised by its border, which
is mostly background, and inverted; transparent pixels count as background. An opaque 28x28
image keeps its gray levels (only inverted if needed): a saved MNIST digit reads back exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SIZE, BOX = 28, 20


@dataclass(frozen=True)
class EditInputs:
    """A batch of inputs.

    Attributes:
        images: uint8 ``[N, 28, 28]`` as the model sees them.
        labels: int64 ``[N]``, -1 where unknown (user images).
        names: one description per image (``file.png``, ``test[12]``, ``file.npz[3]``).
        inverted: whether each image was dark-on-light and inverted.
    """

    images: Tensor
    labels: Tensor
    names: list[str] = field(default_factory=list)
    inverted: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def load_image(path: str | os.PathLike) -> tuple[Tensor, bool]:
    """Read an image file as a uint8 ``[28, 28]`` MNIST-style digit.

    Returns:
        ``(image, inverted)``: ``inverted`` is True if the file was dark-on-light.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image, or it is blank.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            gray, alpha = _gray_and_alpha(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not an image PIL can read ({exc})") from None
    if gray.shape == (SIZE, SIZE) and alpha is None:  # already MNIST-sized: keep the levels
        inverted = bool(np.median(_border(gray)) >= 128.0)
        levels = 255.0 - gray if inverted else gray
        if levels.max() == levels.min():
            raise ValueError(f"{path}: the image is blank (a single gray level)")
        return torch.from_numpy(levels.astype(np.uint8)), inverted
    digit, inverted = _polarity(gray, alpha)
    if float(digit.max()) - float(digit.min()) < 1e-6:
        raise ValueError(f"{path}: the image is blank (a single gray level)")
    return torch.from_numpy(to_mnist_frame(digit)), inverted


def _gray_and_alpha(im) -> tuple[np.ndarray, np.ndarray | None]:
    """float [H, W] gray levels in [0, 255] and the alpha channel in [0, 1] (None if opaque)."""
    alpha = None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3].astype(np.float64) / 255.0
        gray = np.asarray(rgba.convert("L")).astype(np.float64)
        if alpha.min() == 1.0:
            alpha = None
    else:
        gray = np.asarray(im.convert("L")).astype(np.float64)
    return gray, alpha


def _polarity(gray: np.ndarray, alpha: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """Light-on-dark float image in [0, 1] and whether it was inverted.

    The background is the median of the border pixels (opaque ones if there is transparency);
    a light background means dark ink, so the image is inverted. Transparent pixels become
    background; the result is stretched so background -> 0 and the strongest ink -> 1.
    """
    border = _border(gray)
    if alpha is not None:
        a_border = _border(alpha)
        opaque = border[a_border > 0.5]
        if opaque.size == 0:  # transparent border: the ink is whatever is opaque
            ink = 255.0 - gray if np.median(gray[alpha > 0.5]) < 128 else gray
            inverted = bool(np.median(gray[alpha > 0.5]) < 128)
            return _stretch(ink * alpha, 0.0), inverted
        border = opaque
    background = float(np.median(border))
    inverted = background >= 128.0
    ink = 255.0 - gray if inverted else gray
    if alpha is not None:
        ink = ink * alpha + (255.0 - background if inverted else background) * (1 - alpha)
    return _stretch(ink, 255.0 - background if inverted else background), inverted


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _stretch(ink: np.ndarray, background: float) -> np.ndarray:
    ink = np.clip(ink - background, 0.0, None)
    top = float(ink.max())
    return ink / top if top > 0 else ink


def to_mnist_frame(digit: np.ndarray) -> np.ndarray:
    """Light-on-dark float ``[H, W]`` in [0, 1] -> uint8 ``[28, 28]`` (MNIST's normalisation)."""
    from PIL import Image

    if digit.shape == (SIZE, SIZE):
        return np.round(digit * 255.0).astype(np.uint8)
    ys, xs = np.nonzero(digit > 0.1)
    if ys.size == 0:
        ys, xs = np.nonzero(digit > 0)
    crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(np.round(crop * 255).astype(np.uint8)).resize(new, Image.LANCZOS)
    small = np.asarray(small).astype(np.float64) / 255.0
    total = small.sum()
    cy, cx = (np.indices(small.shape) * small).reshape(2, -1).sum(1) / max(total, 1e-12)
    frame = np.zeros((SIZE, SIZE))
    top = int(np.clip(round(SIZE / 2 - cy - 0.5), 0, SIZE - small.shape[0]))
    left = int(np.clip(round(SIZE / 2 - cx - 0.5), 0, SIZE - small.shape[1]))
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.round(np.clip(frame, 0, 1) * 255.0).astype(np.uint8)


def parse_indices(text: str) -> list[int]:
    """``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad index {part!r} in {text!r}: expected N, N,M or N-M") from None
    return out


def test_digits(
    indices: Sequence[int], data_dir: str | os.PathLike | None = None, dataset: str = "mnist"
) -> tuple[Tensor, Tensor]:
    """uint8 ``[N, 28, 28]`` test images and their labels at ``indices``."""
    from ..data import load_dataset

    arrays = load_dataset(dataset, data_dir)
    n = len(arrays.test_labels)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"test indices {bad} out of range; the {dataset} test set has 0..{n - 1}")
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    return arrays.test_images[idx].clone(), arrays.test_labels[idx].clone()


def npz_digits(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """uint8 ``[N, 28, 28]`` images and labels (-1 = none) of a samples ``.npz``."""
    from ..sample import load_npz

    images, labels = load_npz(path)
    images = torch.as_tensor(images)
    if tuple(images.shape[1:]) == (32, 32):
        images = images[:, 2:30, 2:30]
    if tuple(images.shape[1:]) != (SIZE, SIZE):
        raise ValueError(f"{path}: images must be 28x28, got {tuple(images.shape[1:])}")
    labels = torch.full((len(images),), -1) if labels is None else torch.as_tensor(labels)
    return images, labels.long()


def load_inputs(
    images: Sequence[str | os.PathLike] = (),
    from_test: Sequence[int] | str = (),
    npz: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
) -> EditInputs:
    """Gather user images, test digits of ``dataset`` and ``.npz`` images into one batch (in
    that order). The CLI passes the model's own dataset, so ``--from-test`` reads its test split.

    Raises:
        ValueError: nothing given, an unreadable image, an index out of range.
    """
    if isinstance(from_test, str):
        from_test = parse_indices(from_test)
    parts, labels, names, inverted = [], [], [], []
    for path in images:
        image, inv = load_image(path)
        parts.append(image[None])
        labels.append(torch.tensor([-1]))
        names.append(Path(path).name)
        inverted.append(inv)
    if from_test:
        x, y = test_digits(from_test, data_dir, dataset)
        parts.append(x)
        labels.append(y)
        names += [f"test[{i}]" for i in from_test]
        inverted += [False] * len(x)
    if npz is not None:
        x, y = npz_digits(npz)
        parts.append(x)
        labels.append(y)
        names += [f"{Path(npz).name}[{i}]" for i in range(len(x))]
        inverted += [False] * len(x)
    if not parts:
        raise ValueError("no input: give --image FILE, --from-test INDEX[,INDEX] or --npz FILE")
    return EditInputs(torch.cat(parts), torch.cat(labels).long(), names, inverted)
