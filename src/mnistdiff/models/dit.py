"""Diffusion Transformer on pixels (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), sized for MNIST.

Patchify (p x p conv) -> + 2-D position embedding -> N blocks with adaLN-Zero (shift, scale,
gate for attention and MLP regressed from the conditioning ``c = time_emb + class_emb``) ->
final adaLN + linear -> unpatchify. The adaLN regressors and the final linear start at zero,
so every block starts as the identity and the output is exactly zero at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig, ModelConfig
from .layers import ConditionEmbedding, SelfAttention, SpecLike, check_inputs, modulate


@dataclass(frozen=True)
class DiTSize:
    """Width (token dim), depth (blocks) and attention heads of a named DiT preset."""

    width: int
    depth: int
    heads: int


DIT_SIZES: dict[str, DiTSize] = {
    "tiny": DiTSize(width=128, depth=4, heads=4),
    "small": DiTSize(width=256, depth=6, heads=4),
    "base": DiTSize(width=384, depth=12, heads=6),
}


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, ``[grid * grid, dim]`` (``dim`` divisible by 4).

    Half of the channels encode the row, half the column, each with 1-D sin/cos features at
    geometric frequencies ``1 / 10000 ** (k / (dim / 4))``. Tokens are in row-major order.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [grid, grid] each

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega[None, :]  # [T, quarter]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning; ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )
        self.ada = nn.Linear(width, 6 * width)  # zero-initialised by DiT._init_weights

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``c`` is the activated conditioning ``silu(cond)``, ``[B, D]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to ``p * p * C`` values per token."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer mapping ``(x, noise_cond, labels) -> tensor shaped like x``.

    Args:
        cfg: the ``model.dit`` section (``width/depth/heads`` override the ``size`` preset).
        in_channels: image channels.
        image_size: image height = width (divisible by ``cfg.patch_size``).
        num_classes: real classes for conditioning, or None for an unconditional model.
        guidance_embed: also take a guidance scalar per example (see ``ConditionEmbedding``).
    """

    def __init__(
        self,
        cfg: DiTConfig,
        in_channels: int,
        image_size: int,
        num_classes: int | None,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        size = resolve_dit_size(cfg)
        p, width = cfg.patch_size, size.width
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, p
        self.grid = image_size // p
        self.patch_embed = nn.Conv2d(in_channels, width, p, stride=p)
        num_tokens = self.grid * self.grid
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        else:
            pe = sincos_pos_embed_2d(width, self.grid)[None]  # [1, T, D]
            self.register_buffer("pos_embed", pe, persistent=False)
        self.cond = ConditionEmbedding(width, num_classes, guidance_embed=guidance_embed)
        self.blocks = nn.ModuleList(
            DiTBlock(width, size.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(size.depth)
        )
        self.final = FinalLayer(width, p * p * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in (self.cond.time_mlp[0], self.cond.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.cond.guidance_mlp is not None:
            nn.init.normal_(self.cond.guidance_mlp[0].weight, std=0.02)
            self.cond.zero_guidance_output()
        if self.cond.label_emb is not None:
            nn.init.normal_(self.cond.label_emb.weight, std=0.02)
        for lin in [b.ada for b in self.blocks] + [self.final.ada, self.final.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, p * p * C]`` -> ``[B, C, H, W]`` (tokens in row-major patch order)."""
        b, g, p, c = tokens.shape[0], self.grid, self.patch_size, self.in_channels
        x = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return x.reshape(b, c, g * p, g * p)

    @property
    def accepts_guidance(self) -> bool:
        """True when built with a guidance-scale embedding."""
        return self.cond.guidance_mlp is not None

    def forward(
        self,
        x: torch.Tensor,
        noise_cond: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: x ``[B, C, H, W]``; noise_cond ``[B]`` in [0, 1]; labels ``[B]`` int64 in
        ``[0, num_classes]`` (``num_classes`` = null) or None; guidance ``[B]`` float or None
        (only for models with a guidance embedding). Returns ``[B, C, H, W]``."""
        check_inputs(x, noise_cond, self.in_channels, self.image_size, guidance)
        c = F.silu(self.cond(noise_cond, labels, guidance))  # [B, D]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, D]
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c)).to(x.dtype)


def resolve_dit_size(cfg: DiTConfig) -> DiTSize:
    """The preset named by ``cfg.size`` with ``width/depth/heads`` overrides applied."""
    if cfg.size not in DIT_SIZES:
        raise ValueError(
            f"model.dit.size: {cfg.size!r} is not allowed; choose one of {list(DIT_SIZES)}"
        )
    base = DIT_SIZES[cfg.size]
    return DiTSize(
        width=cfg.width if cfg.width is not None else base.width,
        depth=cfg.depth if cfg.depth is not None else base.depth,
        heads=cfg.heads if cfg.heads is not None else base.heads,
    )


def validate_dit(cfg: DiTConfig, spec: SpecLike) -> None:
    """Raise ValueError naming the config key and allowed values if ``cfg`` cannot fit ``spec``."""
    allowed = [d for d in range(1, spec.size + 1) if spec.size % d == 0]
    if cfg.patch_size not in allowed:
        raise ValueError(
            f"model.dit.patch_size: {cfg.patch_size} does not divide the image size "
            f"{spec.size}; allowed: {allowed}"
        )
    size = resolve_dit_size(cfg)
    if size.width % size.heads:
        raise ValueError(
            f"model.dit.width {size.width} is not divisible by model.dit.heads {size.heads}; "
            f"choose heads dividing the width (preset {cfg.size!r} unless overridden)"
        )
    if cfg.pos_embed == "sincos" and size.width % 4:
        raise ValueError(
            f"model.dit.width: {size.width} must be divisible by 4 for pos_embed 'sincos' "
            "(or use model.dit.pos_embed=learned)"
        )


def build_dit(cfg: ModelConfig, spec: SpecLike) -> DiT:
    """Build a :class:`DiT` for ``spec`` (channels, size, num_classes) from ``cfg.dit``."""
    validate_dit(cfg.dit, spec)
    num_classes = spec.num_classes if cfg.conditional else None
    return DiT(cfg.dit, spec.channels, spec.size, num_classes, cfg.guidance_embed)
