"""Convolutional UNet backbone (DDPM / ADM family) for small images.

Residual blocks (GroupNorm, SiLU, 3x3 conv) are conditioned on the time + class embedding by
scale-and-shift of the second norm, ``h = norm(h) * (1 + scale) + shift``. One resolution level
per entry of ``channel_mults``; stride-2 conv downsampling, nearest + conv upsampling,
self-attention at ``attention_levels`` and in the middle, one skip per down-path activation.
The last conv of every residual block, every attention output projection and the output conv
start at zero, so each block starts as the identity and the model output is zero at init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, UNetConfig
from .layers import ConditionEmbedding, SelfAttention, SpecLike, check_inputs, group_norm, modulate


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with FiLM conditioning; ``[B, in, H, W] -> [B, out, H, W]``."""

    takes_skip = False

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is the already-activated conditioning ``silu(c)``, ``[B, emb_dim]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # [B, out, 1, 1]
        h = F.silu(modulate(self.norm2(h), shift, scale))
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the H*W positions with a residual connection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = SelfAttention(channels, num_heads)
        _zero_(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """A residual block optionally followed by attention; may consume a skip connection."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None, takes_skip: bool) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.takes_skip = takes_skip

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    takes_skip = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    takes_skip = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet mapping ``(x, noise_cond, labels) -> tensor shaped like x``.

    Args:
        cfg: the ``model.unet`` section.
        in_channels: image channels.
        image_size: image height = width (divisible by ``2 ** (len(channel_mults) - 1)``).
        num_classes: real classes for conditioning, or None for an unconditional model.
        guidance_embed: also take a guidance scalar per example (see ``ConditionEmbedding``).
    """

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        image_size: int,
        num_classes: int | None,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        ch, emb_dim, levels = cfg.channels, 4 * cfg.channels, len(cfg.channel_mults)
        self.cond = ConditionEmbedding(emb_dim, num_classes, guidance_embed=guidance_embed)
        p = self.patch_size = cfg.patch_size  # space-to-depth: levels run at size / p
        self.stem = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(in_channels * p * p, ch, 3, padding=1)
        )

        def stage(cin: int, cout: int, level: int, takes_skip: bool) -> Stage:
            attn = AttentionBlock(cout, cfg.num_heads) if level in cfg.attention_levels else None
            return Stage(ResBlock(cin, cout, emb_dim, cfg.dropout), attn, takes_skip)

        self.down = nn.ModuleList()
        skip_chans, cur = [ch], ch
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(cur, ch * mult, level, takes_skip=False))
                cur = ch * mult
                skip_chans.append(cur)
            if level < levels - 1:
                self.down.append(Downsample(cur))
                skip_chans.append(cur)

        self.mid1 = ResBlock(cur, cur, emb_dim, cfg.dropout)
        self.mid_attn = AttentionBlock(cur, cfg.num_heads)
        self.mid2 = ResBlock(cur, cur, emb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                cout = ch * cfg.channel_mults[level]
                self.up.append(stage(cur + skip_chans.pop(), cout, level, takes_skip=True))
                cur = cout
            if level > 0:
                self.up.append(Upsample(cur))

        self.out_norm = group_norm(cur)
        self.out_conv = nn.Sequential(
            _zero_(nn.Conv2d(cur, in_channels * p * p, 3, padding=1)), nn.PixelShuffle(p)
        )

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
        emb = F.silu(self.cond(noise_cond, labels, guidance))
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if layer.takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.to(x.dtype)


def validate_unet(cfg: UNetConfig, spec: SpecLike) -> None:
    """Raise ValueError naming the config key and allowed values if ``cfg`` cannot fit ``spec``."""
    mults = cfg.channel_mults
    if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
        raise ValueError(
            f"model.unet.channel_mults: {list(mults)} must be a non-empty list of positive ints"
        )
    if spec.size % cfg.patch_size:
        raise ValueError(
            f"model.unet.patch_size: {cfg.patch_size} does not divide the image size {spec.size}"
        )
    size = spec.size // cfg.patch_size
    max_levels = 1
    while size % (2**max_levels) == 0:
        max_levels += 1
    if len(mults) > max_levels:
        raise ValueError(
            f"model.unet.channel_mults: {len(mults)} levels need the working size {size} "
            f"(image size / patch_size) to be divisible by {2 ** (len(mults) - 1)}; allowed: "
            f"1..{max_levels} levels for size {size} (for more levels on 28x28 MNIST set "
            "data.pad_to_32)"
        )
    bad = [i for i in cfg.attention_levels if not 0 <= i < len(mults)]
    if bad:
        raise ValueError(
            f"model.unet.attention_levels: {bad} out of range; allowed 0..{len(mults) - 1}"
        )
    widths = {cfg.channels * mults[i] for i in (*cfg.attention_levels, len(mults) - 1)}
    bad_w = sorted(w for w in widths if w % cfg.num_heads)
    if bad_w:
        raise ValueError(
            f"model.unet.num_heads: {cfg.num_heads} does not divide the attention widths "
            f"{bad_w} (model.unet.channels x channel_mults); choose a divisor of all of "
            f"{sorted(widths)}"
        )


def build_unet(cfg: ModelConfig, spec: SpecLike) -> UNet:
    """Build a :class:`UNet` for ``spec`` (channels, size, num_classes) from ``cfg.unet``."""
    validate_unet(cfg.unet, spec)
    num_classes = spec.num_classes if cfg.conditional else None
    return UNet(cfg.unet, spec.channels, spec.size, num_classes, cfg.guidance_embed)
