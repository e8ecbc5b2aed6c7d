"""What one distillation step trains on."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """Clean images (or teacher samples) and their labels, plus paired noise for reflow.

    Attributes:
        x0: images in model range ``[B, C, H, W]``.
        labels: int64 ``[B]`` or None (unconditional teacher).
        noise: the noise each image came from (reflow pairs) ``[B, C, H, W]``, else None.
        guidance: the guidance scale each pair was generated at (reflow) ``[B]``, else None.
    """

    x0: Tensor
    labels: Tensor | None
    noise: Tensor | None = None
    guidance: Tensor | None = None
