"""Building blocks shared by the backbones: embeddings, conditioning, norms and attention.

Nothing here knows about diffusion: ``noise_cond`` is just a scalar per example in [0, 1].
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

TIME_SCALE = 1000.0  # noise_cond in [0, 1] is embedded as 1000 * noise_cond
GUIDANCE_SCALE = 100.0  # a guidance scalar w (typically 0..10) is embedded as 100 * w
DEFAULT_GUIDANCE = 1.0  # the guidance scalar a guidance-embedding model assumes when none is given


class SpecLike(Protocol):
    """What a backbone needs to know about the data (``mnistdiff.data.DataSpec`` fits)."""

    channels: int
    size: int
    num_classes: int


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of a scalar per example.

    Args:
        t: ``[B]`` float values (any scale; callers pass ``1000 * noise_cond``).
        dim: feature size (even).
        max_period: longest wavelength.

    Returns:
        ``[B, dim]`` float32 tensor ``[cos(t * f_k), sin(t * f_k)]`` with geometric ``f_k``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Time embedding (sinusoidal + MLP) plus optional class and guidance-scale embeddings.

    The class table has ``num_classes + 1`` rows; row ``num_classes`` is the null label used for
    classifier-free guidance and whenever ``labels`` is None. Unconditional models have no table
    and ignore labels.

    With ``guidance_embed`` a second conditioning scalar ``w`` per example (for a
    guidance-distilled student, Meng et al. 2023: the guidance scale) is embedded like the time
    (sinusoidal features of ``GUIDANCE_SCALE * w`` + MLP) and added. The MLP's last layer starts
    at zero, so a model built with the embedding computes exactly what the same weights without
    it compute, for every ``w``. ``w`` defaults to ``DEFAULT_GUIDANCE`` when not given.

    Args:
        dim: output embedding size.
        num_classes: number of real classes, or None for an unconditional model.
        freq_dim: size of the sinusoidal features fed to the MLPs.
        guidance_embed: add the embedding of a guidance scalar.
    """

    def __init__(
        self, dim: int, num_classes: int | None, freq_dim: int = 256, guidance_embed: bool = False
    ) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, dim) if num_classes is not None else None
        self.guidance_mlp = None
        if guidance_embed:
            self.guidance_mlp = nn.Sequential(
                nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
            )
            self.zero_guidance_output()

    def zero_guidance_output(self) -> None:
        """Zero the guidance MLP's last layer (the model then ignores ``w``)."""
        if self.guidance_mlp is not None:
            nn.init.zeros_(self.guidance_mlp[2].weight)
            nn.init.zeros_(self.guidance_mlp[2].bias)

    @property
    def null_label(self) -> int | None:
        """Index of the null (unconditional) label, or None for unconditional models."""
        return self.num_classes

    def forward(
        self,
        noise_cond: torch.Tensor,
        labels: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]`` noise_cond (``[B]`` int64 labels or None, ``[B]`` guidance or None) ->
        ``[B, dim]``."""
        emb = self.time_mlp(sinusoidal_embedding(TIME_SCALE * noise_cond, self.freq_dim))
        if self.guidance_mlp is not None:
            if guidance is None:
                guidance = torch.full_like(noise_cond, DEFAULT_GUIDANCE)
            feats = sinusoidal_embedding(GUIDANCE_SCALE * guidance, self.freq_dim)
            emb = emb + self.guidance_mlp(feats)
        elif guidance is not None:
            raise ValueError(
                "this model has no guidance-scale input (built without model.guidance_embed); "
                "sample it with classifier-free guidance instead"
            )
        if self.label_emb is None:
            return emb
        if labels is None:
            labels = torch.full_like(noise_cond, self.num_classes, dtype=torch.long)
        return emb + self.label_emb(labels)


def check_inputs(
    x: torch.Tensor,
    noise_cond: torch.Tensor,
    channels: int,
    size: int,
    guidance: torch.Tensor | None = None,
) -> None:
    """Raise ValueError when ``x``/``noise_cond``/``guidance`` do not match the shape the model
    was built for."""
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(
            f"expected x of shape [B, {channels}, {size}, {size}], got {list(x.shape)}"
        )
    if noise_cond.shape != (x.shape[0],):
        raise ValueError(
            f"expected noise_cond of shape [{x.shape[0]}], got {list(noise_cond.shape)}"
        )
    if guidance is not None and guidance.shape != (x.shape[0],):
        raise ValueError(f"expected guidance of shape [{x.shape[0]}], got {list(guidance.shape)}")


def norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm group count: the largest divisor of ``channels`` that is at most ``max_groups``
    and leaves at least ``min_group_size`` channels per group (1 if none does)."""
    for g in range(min(max_groups, channels // min_group_size), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with a group count that always divides ``channels``."""
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FiLM / adaLN modulation ``x * (1 + scale) + shift`` (shift/scale broadcast over x)."""
    return torch.addcmul(shift, x, 1 + scale)


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens ``[B, T, D]`` via ``F.scaled_dot_product_attention``.

    Args:
        dim: token width (divisible by ``num_heads``).
        num_heads: attention heads.
        dropout: dropout on the attention weights (training only) and on the output.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        p = self.dropout if self.training else 0.0
        if x.device.type == "cpu":  # fp32 even under autocast: the CPU bf16 kernel (forward +
            # backward) was 12x slower than fp32 at the quick recipe's shape (README)
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=p)
            out = out.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out))
