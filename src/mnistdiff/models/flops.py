"""FLOP counts of a backbone, measured with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts matrix multiplies, convolutions and attention as 2 FLOPs per
multiply-accumulate (2 * MACs) and ignores elementwise ops (norms, activations, additions,
softmax), which are a small share for these models. Counts are taken on a batch and divided by
the batch size, so they are per image. CPU fused attention
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward) is not in PyTorch's table; it
is added here with the standard count (two batched matmuls forward, five backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import SpecLike

_aten = torch.ops.aten


def _attention_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``q @ k^T`` then ``softmax @ v`` for ``[B, heads, T, d]`` inputs."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _attention_backward_flops(
    grad_shape: Any, q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any
) -> int:
    """Recompute the scores, then the grads of both matmuls w.r.t. both operands: 5 matmuls."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


_CUSTOM = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM)


def _example_inputs(
    model: nn.Module, spec: SpecLike, batch_size: int, conditional: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    x = torch.randn(batch_size, spec.channels, spec.size, spec.size, device=device)
    t = torch.full((batch_size,), 0.5, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device) if conditional else None
    return x, t, labels


def forward_flops(
    model: nn.Module, spec: SpecLike, *, batch_size: int = 1, conditional: bool = True
) -> int:
    """FLOPs (2 * MACs of matmul/conv/attention; elementwise ops ignored) of one forward pass,
    per image.

    Args:
        model: a backbone ``(x, noise_cond, labels) -> x-shaped tensor``.
        spec: data shape (``channels``, ``size``, ``num_classes``).
        batch_size: batch on which to count (the result is divided by it).
        conditional: pass labels (ignored by unconditional models) or None.
    """
    x, t, labels = _example_inputs(model, spec, batch_size, conditional)
    with torch.no_grad(), flop_counter() as counter:
        model(x, t, labels)
    return counter.get_total_flops() // batch_size


def train_flops(
    model: nn.Module, spec: SpecLike, *, batch_size: int = 1, conditional: bool = True
) -> int:
    """FLOPs of one forward + backward pass (gradients for the parameters only), per image.

    Same counting rules as :func:`forward_flops`. Uses ``torch.autograd.grad`` so the model's
    ``.grad`` fields are left untouched.
    """
    x, t, labels = _example_inputs(model, spec, batch_size, conditional)
    params = [p for p in model.parameters() if p.requires_grad]
    with flop_counter() as counter:
        out = model(x, t, labels)
        torch.autograd.grad(out.float().square().sum(), params, allow_unused=True)
    return counter.get_total_flops() // batch_size


def model_report(model: nn.Module, spec: SpecLike) -> dict[str, int | str]:
    """Parameters and per-image forward / train FLOPs of ``model`` built for ``spec``."""
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_image": forward_flops(model, spec),
        "train_flops_per_image": train_flops(model, spec),
    }
