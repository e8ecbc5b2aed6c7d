"""Backbones: a registry of builders ``(ModelConfig, DataSpec) -> nn.Module``.

Every backbone maps ``(x [B, C, H, W], noise_cond [B] in [0, 1], labels [B] int64 | None)`` to a
tensor shaped like ``x`` and knows nothing about diffusion (schedules, parameterizations,
guidance). Conditional models embed labels with ``num_classes + 1`` rows; row ``num_classes`` is
the null label (used when ``labels`` is None).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import ModelConfig
from .dit import DIT_SIZES, DiT, DiTSize, build_dit, resolve_dit_size
from .flops import forward_flops, model_report, train_flops
from .layers import SpecLike
from .unet import UNet, build_unet

__all__ = [
    "BACKBONES",
    "DIT_SIZES",
    "DiT",
    "DiTSize",
    "UNet",
    "build_backbone",
    "count_parameters",
    "describe",
    "forward_flops",
    "model_report",
    "resolve_dit_size",
    "train_flops",
]

BACKBONES: dict[str, Callable[[ModelConfig, SpecLike], nn.Module]] = {
    "unet": build_unet,
    "dit": build_dit,
}


def build_backbone(cfg: ModelConfig, spec: SpecLike) -> nn.Module:
    """Build the backbone named by ``cfg.type`` for data described by ``spec``.

    Args:
        cfg: the ``model`` config section.
        spec: data shape with ``channels``, ``size`` and ``num_classes`` (e.g. ``DataSpec``).

    Returns:
        An fp32 ``nn.Module`` in training mode.

    Raises:
        ValueError: unknown ``cfg.type`` or an architecture that does not fit ``spec``.
    """
    if cfg.type not in BACKBONES:
        raise ValueError(
            f"model.type: {cfg.type!r} is not registered; choose one of {sorted(BACKBONES)}"
        )
    return BACKBONES[cfg.type](cfg, spec)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """One line such as ``"UNet: 2.71M parameters"``."""
    return f"{type(model).__name__}: {count_parameters(model) / 1e6:.2f}M parameters"
