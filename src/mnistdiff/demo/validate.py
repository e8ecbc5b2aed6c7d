"""Checks of the demo's input fields: every value a browser sends is validated here.

A bad value raises :class:`DemoInputError` (a ``ValueError``) whose message names the field,
what was given and what is allowed; the app shows it in the page. Over-large requests are not
errors: :func:`cap_count` trims them and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..samplers import SAMPLERS, get_sampler, steps_for_nfe

MAX_IMAGES = 100  # images per Generate request (a 2-core CPU answers 100 in ~30 s)
MAX_NFE = 100
GUIDANCE_RANGE = (0.0, 10.0)
SEED_MAX = 2**31 - 1
MAX_FRAMES = 16


class DemoInputError(ValueError):
    """A field of a demo request is missing or out of range; the message says which and why."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise DemoInputError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise DemoInputError(f"{name}: expected a finite number, got {value!r}")
    return number


def integer(name: str, value: Any, lo: int, hi: int | None) -> int:
    """``value`` as an int in ``[lo, hi]`` (no upper bound if ``hi`` is None; whole floats
    such as 7.0 are accepted)."""
    number = _number(name, value)
    if number != int(number):
        raise DemoInputError(f"{name}: expected a whole number, got {value!r}")
    if hi is None and number < lo:
        raise DemoInputError(f"{name} must be >= {lo}, got {int(number)}")
    if hi is not None and not lo <= number <= hi:
        raise DemoInputError(f"{name} must be in {lo}..{hi}, got {int(number)}")
    return int(number)


def real(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a float in ``[lo, hi]``."""
    number = _number(name, value)
    if not lo <= number <= hi:
        raise DemoInputError(f"{name} must be in [{lo:g}, {hi:g}], got {number:g}")
    return number


def seed(value: Any) -> int:
    """A sampling seed in ``0..2**31 - 1``."""
    return integer("seed", value, 0, SEED_MAX)


def guidance(value: Any) -> float:
    """A classifier-free guidance scale ``w`` in :data:`GUIDANCE_RANGE`."""
    return real("guidance", value, *GUIDANCE_RANGE)


def sampler(value: Any) -> str:
    """A sampler name from the registry."""
    if value not in SAMPLERS:
        raise DemoInputError(f"sampler {value!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    return str(value)


def nfe_steps(sampler_name: str, value: Any) -> int:
    """Sampler steps for an NFE budget in ``[the sampler's one-step NFE, MAX_NFE]``."""
    least = get_sampler(sampler_name).nfe(1)
    budget = integer(f"NFE ({sampler_name})", value, least, MAX_NFE)
    return steps_for_nfe(sampler_name, budget)


def digit(name: str, value: Any, num_classes: int = 10) -> int:
    """A class index ``0..num_classes - 1`` (strings such as ``"7"`` are accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return integer(name, value, 0, num_classes - 1)


def digits(values: Iterable[Any] | None, num_classes: int = 10) -> list[int]:
    """A non-empty list of distinct classes, in increasing order."""
    chosen = sorted({digit("digits", v, num_classes) for v in values or []})
    if not chosen:
        raise DemoInputError(f"digits: pick at least one of 0..{num_classes - 1}")
    return chosen


def cap_count(per_digit: Any, num_digits: int, limit: int = MAX_IMAGES) -> tuple[int, str]:
    """Samples per digit, trimmed so ``per_digit * num_digits <= limit``, and a note if trimmed.

    Returns:
        ``(count, note)``: ``note`` is empty unless the request was capped.
    """
    asked = integer("samples per digit", per_digit, 1, None)
    fits = max(1, limit // max(1, num_digits))
    if asked <= fits:
        return asked, ""
    note = (
        f"asked for {asked} per digit ({asked * num_digits} images); capped at {fits} per "
        f"digit ({fits * num_digits} images, the limit is {limit} per request)"
    )
    return fits, note


NO_LABEL = "none"


def optional_digit(name: str, value: Any, num_classes: int = 10) -> int | None:
    """A class index, or None for ``"none"`` / empty (unconditional)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", NO_LABEL)):
        return None
    return digit(name, value, num_classes)


def strength(value: Any) -> float:
    """An editing strength (start time t0) in (0, 1]."""
    number = _number("strength", value)
    if not 0.0 < number <= 1.0:
        raise DemoInputError(f"strength must be in (0, 1], got {number:g}")
    return number


def frames(value: Any) -> int:
    """Interpolation frames including both ends: ``2..MAX_FRAMES``."""
    return integer("frames", value, 2, MAX_FRAMES)


REGIONS = ("bottom", "top", "left", "right", "box")


def region(value: Any, box: Any = "") -> str:
    """An inpainting mask spec for :func:`mnistdiff.edit.make_mask`: a half, or ``box:...``.

    ``box`` is ``"x0,y0,x1,y1"`` in the 28x28 view's pixels (columns x0..x1-1, rows y0..y1-1).
    """
    if value not in REGIONS:
        raise DemoInputError(f"region {value!r} unknown; allowed: {', '.join(REGIONS)}")
    if value != "box":
        return str(value)
    text = str(box or "").replace(" ", "")
    if not text:
        raise DemoInputError("region 'box' needs the box as x0,y0,x1,y1 (pixels of the 28x28 view)")
    return f"box:{text}"
