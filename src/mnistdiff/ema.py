"""Exponential moving average of model weights, as an explicit copy of the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An EMA copy of ``model`` (parameters averaged, buffers copied).

    The decay at optimizer step ``n`` (counted from ``start_step``) is
    ``min(decay, (1 + n) / (10 + n))`` with warmup, so early averages are not dominated by the
    random initialisation. Before ``start_step`` the copy simply tracks the model.

    Args:
        model: the model to average (the EMA copy has the same architecture).
        decay: per-step decay; ignored when ``half_life`` is given.
        half_life: optimizer steps after which an old weight's influence halves.
        start_step: first step at which averaging starts.
        warmup: use the ``(1 + n) / (10 + n)`` warmup.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        half_life: float | None = None,
        start_step: int = 0,
        warmup: bool = True,
    ):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = 0.5 ** (1.0 / half_life) if half_life else decay
        self.start_step = start_step
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        """Decay used by the update at optimizer step ``step`` (0 means copy)."""
        n = step - self.start_step
        if n < 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model`` into the average: ``ema = d * ema + (1 - d) * model``."""
        d = self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "decay": self.decay,
            "start_step": self.start_step,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged weights; decay settings come from the current config."""
        self.model.load_state_dict(state["model"])
