"""Multi-digit numbers and simple equations in one handwriting: ``compose("2026")``.

Method. Every digit of the string is generated in one batch by the class-conditional model
with the SAME starting noise and its own label, so the writer-specific part of the start
(stroke width, slant, size, position -- what the noise fixes, Ho et al. 2020 sec. 4.3 show
coarse attributes are set at the first steps) is shared while the label changes the class.
With a style reference the digits are instead handwriting transfers of that one image
(:func:`mnistdiff.edit.restyle`: DDIM inversion, Song, Meng & Ermon 2021, then decoding with
each digit's label). Operators ``+ - =`` are drawn as strokes whose width is the digits'
median stroke width (the median length of horizontal ink runs).

Layout, as handwritten numbers are: each glyph is cut to its ink columns and placed left to
right with a gap drawn uniformly from ``gap`` pixels and a vertical jitter in ``[-jitter,
jitter]`` (seeded), merged by maximum on a 28-pixel-high canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..samplers import initial_sample
from ..seeding import seed_for
from .core import check_labels, generator, randn, sample_from, sampling, to_uint8
from .inversion import generation_grid
from .restyle import restyle

if TYPE_CHECKING:
    from ..sample import Pipeline


OPERATORS = "+-="
SIZE = 28
INK = 64  # uint8 level above which a pixel counts as ink for layout


@dataclass(frozen=True)
class Composition:
    """A composed number.

    Attributes:
        image: uint8 ``[28, W]`` canvas.
        glyphs: uint8 ``[K, 28, 28]``, one generated (or drawn) frame per character.
        boxes: ``(left, right)`` canvas columns each glyph's ink occupies (right exclusive).
        offsets: ``(x, y)`` canvas position of each glyph frame's top-left corner.
        text: the composed string.
        nfe: network evaluations per digit.
    """

    image: Tensor
    glyphs: Tensor
    boxes: list[tuple[int, int]]
    offsets: list[tuple[int, int]]
    text: str
    nfe: int

    def cut(self, i: int) -> Tensor:
        """Glyph ``i`` cut from the canvas at its known position, in a 28x28 frame (uint8)."""
        x, y = self.offsets[i]
        left, right = self.boxes[i]
        frame = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
        rows = slice(max(y, 0), min(y + SIZE, SIZE))
        part = self.image[rows, left:right]
        frame[rows.start - y : rows.stop - y, left - x : right - x] = part
        return frame


def check_text(text: str) -> str:
    """``text`` if it has only digits and ``+ - =`` (spaces are dropped); ValueError otherwise."""
    text = str(text).replace(" ", "")
    bad = sorted({c for c in text if not (c.isdigit() and c.isascii()) and c not in OPERATORS})
    if not text:
        raise ValueError("nothing to compose: give digits, e.g. '2026' or '3+4=7'")
    if bad:
        raise ValueError(
            f"cannot compose {''.join(bad)!r} in {text!r}: allowed are the digits 0-9 and "
            f"the operators {' '.join(OPERATORS)}"
        )
    if all(c in OPERATORS for c in text):
        raise ValueError(f"{text!r} has no digit to set the handwriting")
    return text


@torch.no_grad()
def compose(
    pipe: Pipeline,
    text: str,
    *,
    seed: int = 0,
    style: Tensor | None = None,
    style_label: int | None = None,
    strength: float = 1.0,
    gap: tuple[int, int] = (1, 4),
    jitter: int = 1,
    **options,
) -> Composition:
    """Write ``text`` (digits and ``+ - =``) as one handwritten line.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline` trained on digits: class-conditional, or
            unconditional and steered by a noisy classifier (``classifier=FILE``).
        text: e.g. ``"2026"`` or ``"3+4=7"``.
        seed: shared starting noise and layout randomness.
        style: optional uint8 ``[28, 28]`` reference digit to restyle to every digit.
        style_label: the reference's class (better inversion), or None.
        strength: inversion depth for ``style`` (0, 1].
        gap: (min, max) pixels between neighbouring glyphs' ink.
        jitter: max vertical shift in pixels.
        **options: sampling options (:func:`mnistdiff.edit.core.sampling`): ``sampler``,
            ``steps``/``nfe``, ``grid``, ``guidance``, ``threshold``, the sampler's own, ...

    Returns:
        A :class:`Composition`.

    Raises:
        ValueError: characters other than digits and ``+ - =``, an unconditional model without
            a classifier, a
            digit outside the model's classes, bad gap/jitter.
    """
    text = check_text(text)
    lo, hi = gap
    if not (0 <= lo <= hi) or jitter < 0:
        raise ValueError(f"need 0 <= gap min <= gap max and jitter >= 0, got {gap}, {jitter}")
    opts = sampling(pipe, **options)
    if not pipe.conditional and opts.classifier is None:
        raise ValueError(
            "compose needs a class-conditional model to choose each digit, or a noisy "
            "classifier to steer this unconditional one (classifier=FILE)"
        )
    digits = [int(c) for c in text if c.isdigit()]
    labels = check_labels(pipe, digits, len(digits), opts)
    glyphs, nfe = _digit_glyphs(pipe, labels, seed, style, style_label, strength, options)
    width = stroke_width(glyphs)
    it = iter(glyphs)
    frames = [next(it) if c.isdigit() else draw_operator(c, width) for c in text]
    canvas, boxes, offsets = layout(frames, seed, gap, jitter)
    return Composition(canvas, torch.stack(frames), boxes, offsets, text, nfe)


def _digit_glyphs(pipe: Pipeline, labels, seed, style, style_label, strength, options):
    if style is not None:
        style = torch.as_tensor(style)
        style = style.reshape(1, SIZE, SIZE) if style.numel() == SIZE * SIZE else style
        refs = style.expand(len(labels), SIZE, SIZE).clone()
        src = None if style_label is None else [style_label] * len(labels)
        out = restyle(pipe, refs, labels, src, strength=strength, **options)
        return out.images, out.nfe
    opts = sampling(pipe, **options)
    ts = generation_grid(pipe, opts)
    gen = generator(pipe, seed)
    noise = randn(pipe, 1, gen).expand(len(labels), *pipe.denoiser.image_shape)
    x = initial_sample(pipe.denoiser.schedule, ts, noise.contiguous())
    out = sample_from(pipe, x, ts, labels.to(pipe.device), opts, gen=gen)
    return to_uint8(pipe, out.x), out.nfe


def stroke_width(glyphs: Tensor) -> float:
    """Median length of horizontal ink runs (pixels > 127) over uint8 images ``[K, H, W]``."""
    ink = (torch.as_tensor(glyphs) > 127).numpy()
    runs = []
    for row in ink.reshape(-1, ink.shape[-1]):
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(padded))
        runs.extend(edges[1::2] - edges[0::2])
    return float(np.median(runs)) if runs else 2.0


def draw_operator(op: str, width: float) -> Tensor:
    """An operator ``+``, ``-`` or ``=`` drawn with strokes ``width`` pixels wide (uint8 28x28).

    Drawn at 4x resolution and box-downsampled for anti-aliased edges like MNIST's.
    """
    from PIL import Image, ImageDraw

    if op not in OPERATORS:
        raise ValueError(f"unknown operator {op!r}; allowed: {' '.join(OPERATORS)}")
    k = 4
    im = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(im)
    w = max(1, round(width * k))
    c, half = SIZE * k // 2, 6 * k
    if op in "+-":
        draw.line([(c - half, c), (c + half, c)], fill=255, width=w)
    if op == "+":
        draw.line([(c, c - half), (c, c + half)], fill=255, width=w)
    if op == "=":
        for dy in (-3 * k, 3 * k):
            draw.line([(c - half, c + dy), (c + half, c + dy)], fill=255, width=w)
    small = im.resize((SIZE, SIZE), Image.BOX)
    return torch.from_numpy(np.asarray(small).copy())


def ink_columns(glyph: Tensor) -> tuple[int, int]:
    """``(first, last + 1)`` columns holding ink (> ``INK``); the middle 4 if there is none."""
    cols = torch.nonzero((glyph > INK).any(0)).flatten()
    if len(cols) == 0:
        return SIZE // 2 - 2, SIZE // 2 + 2
    return int(cols[0]), int(cols[-1]) + 1


def layout(
    frames: list[Tensor], seed: int, gap: tuple[int, int], jitter: int
) -> tuple[Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Place 28x28 frames left to right by their ink with random gaps and vertical jitter.

    Returns:
        ``(canvas uint8 [28, W], ink boxes (left, right), frame offsets (x, y))``.
    """
    rng = np.random.default_rng(seed_for(seed, 1))
    spans = [ink_columns(f) for f in frames]
    margin, cursor = 2, 2
    offsets, boxes = [], []
    for i, (a, b) in enumerate(spans):
        if i > 0:
            cursor += int(rng.integers(gap[0], gap[1] + 1))
        dy = int(rng.integers(-jitter, jitter + 1)) if jitter else 0
        offsets.append((cursor - a, dy))
        boxes.append((cursor, cursor + b - a))
        cursor += b - a
    canvas = torch.zeros(SIZE, cursor + margin, dtype=torch.uint8)
    for frame, (x, y), (left, right) in zip(frames, offsets, boxes, strict=True):
        src = frame[:, left - x : right - x]
        rows = slice(max(y, 0), min(SIZE + y, SIZE))
        part = src[rows.start - y : rows.stop - y]
        canvas[rows, left:right] = torch.maximum(canvas[rows, left:right], part)
    return canvas, boxes, offsets
