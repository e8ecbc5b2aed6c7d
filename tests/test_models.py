"""Backbones: shapes, validation, conditioning, init, gradients, precision, round trips, FLOPs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mnistdiff.atomic import atomic_path
from mnistdiff.config import DiTConfig, ModelConfig, UNetConfig
from mnistdiff.models import (
    BACKBONES,
    DiT,
    UNet,
    build_backbone,
    count_parameters,
    describe,
    forward_flops,
    model_report,
    train_flops,
)
from mnistdiff.models.dit import sincos_pos_embed_2d
from mnistdiff.models.flops import flop_counter
from mnistdiff.models.layers import norm_groups, sinusoidal_embedding

SPEC = SimpleNamespace(channels=1, size=28, num_classes=10)
TINY_UNET = UNetConfig(
    channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2
)
TINY_DIT = DiTConfig(size="tiny", patch_size=7, width=32, depth=2, heads=2)


def unet_cfg(conditional: bool = True, **kw) -> ModelConfig:
    fields = {**TINY_UNET.__dict__, **kw}
    return ModelConfig(type="unet", conditional=conditional, unet=UNetConfig(**fields))


def dit_cfg(conditional: bool = True, **kw) -> ModelConfig:
    fields = {**TINY_DIT.__dict__, **kw}
    return ModelConfig(type="dit", conditional=conditional, dit=DiTConfig(**fields))


TINY = {"unet": unet_cfg, "dit": dit_cfg}


def inputs(batch: int = 3, size: int = 28, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    labels = torch.arange(batch) % 10
    return x, t, labels


def build(kind: str, conditional: bool = True, spec=SPEC, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(TINY[kind](conditional, **kw), spec)


def perturb_(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    """Move every parameter off its init (zero-init layers would otherwise hide paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------- shapes, validation


@pytest.mark.parametrize(
    "mults,attn",
    [((1, 2), ()), ((1, 2), (0, 1)), ((1, 2, 2), ()), ((1, 2, 2), (2,)), ((2,), (0,))],
)
def test_unet_output_shape(mults, attn):
    model = build("unet", channel_mults=mults, attention_levels=attn)
    x, t, y = inputs()
    assert isinstance(model, UNet)
    assert model(x, t, y).shape == x.shape


def test_unet_four_levels_on_32_pixels():
    spec = SimpleNamespace(channels=1, size=32, num_classes=10)
    model = build("unet", spec=spec, channel_mults=(1, 1, 2, 2), attention_levels=(3,))
    x, t, y = inputs(size=32)
    assert model(x, t, y).shape == x.shape


def test_unet_patch_size_runs_levels_at_half_resolution():
    model = build("unet", patch_size=2, channel_mults=(1, 2), attention_levels=(1,))
    x, t, y = inputs()
    assert model(x, t, y).shape == x.shape
    seen = []
    hook = model.down[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    model(x, t, y)
    hook.remove()
    assert seen == [14]
    with pytest.raises(ValueError, match="model.unet.channel_mults"):
        build("unet", patch_size=2, channel_mults=(1, 2, 2))  # 14 -> 7 -> 3.5


@pytest.mark.parametrize("patch", [2, 4, 7])
def test_dit_output_shape_every_patch(patch):
    model = build("dit", patch_size=patch)
    x, t, y = inputs()
    assert isinstance(model, DiT)
    assert model.pos_embed.shape == (1, (28 // patch) ** 2, 32)
    assert perturb_(model)(x, t, y).shape == x.shape


def test_dit_patch_8_on_32_pixels_and_learned_pos():
    spec = SimpleNamespace(channels=1, size=32, num_classes=10)
    model = build("dit", spec=spec, patch_size=8, pos_embed="learned")
    x, t, y = inputs(size=32)
    assert isinstance(model.pos_embed, nn.Parameter)
    assert model(x, t, y).shape == x.shape


def test_bad_patch_size_names_key_and_allowed():
    with pytest.raises(
        ValueError, match=r"model\.dit\.patch_size.*allowed: \[1, 2, 4, 7, 14, 28\]"
    ):
        build("dit", patch_size=5)
    spec32 = SimpleNamespace(channels=1, size=32, num_classes=10)
    with pytest.raises(ValueError, match=r"model\.dit\.patch_size.*\[1, 2, 4, 8, 16, 32\]"):
        build("dit", spec=spec32, patch_size=7)


def test_bad_level_count_names_key_and_allowed():
    with pytest.raises(ValueError, match=r"model\.unet\.channel_mults.*1\.\.3 levels"):
        build("unet", channel_mults=(1, 1, 2, 2))


def test_bad_heads_and_width():
    with pytest.raises(ValueError, match=r"model\.unet\.num_heads"):
        build("unet", num_heads=3)
    with pytest.raises(
        ValueError, match=r"model\.dit\.width 32 is not divisible by model\.dit\.heads 5"
    ):
        build("dit", heads=5)
    with pytest.raises(ValueError, match=r"model\.unet\.attention_levels"):
        build("unet", attention_levels=(2,))


def test_unknown_backbone_lists_registered():
    assert set(BACKBONES) == {"unet", "dit"}
    with pytest.raises(ValueError, match=r"'resnet'.*\['dit', 'unet'\]"):
        build_backbone(ModelConfig(type="resnet"), SPEC)


def test_wrong_input_shape_is_a_clear_error():
    model = build("unet")
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 1, 28, 28\]"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_cond"):
        model(torch.zeros(2, 1, 28, 28), torch.zeros(3))


def test_dit_preset_and_overrides():
    model = build_backbone(ModelConfig(type="dit", dit=DiTConfig(size="tiny")), SPEC)
    assert (model.patch_embed.out_channels, len(model.blocks)) == (128, 4)
    assert model.blocks[0].attn.num_heads == 4
    small = build("dit")  # width 32, depth 2, heads 2 override the preset
    assert (small.patch_embed.out_channels, len(small.blocks)) == (32, 2)


def test_builds_from_real_dataspec():
    from mnistdiff.data import DataSpec  # an import error fails the test

    spec = DataSpec(channels=1, size=28, num_classes=10)
    model = build_backbone(unet_cfg(), spec)
    x, t, y = inputs()
    assert model(x, t, y).shape == x.shape


# --------------------------------------------------------------------------- init and conditioning


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_output_exactly_zero_at_init(kind):
    x, t, y = inputs()
    out = build(kind)(x, t, y)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_labels_change_output_and_null_label(kind):
    model = perturb_(build(kind)).eval()
    x, t, _ = inputs()
    out = {k: model(x, t, torch.full((3,), k)) for k in (1, 2, 10)}
    assert not torch.allclose(out[1], out[2])
    assert torch.equal(model(x, t, None), out[10])  # None means the null label (index 10)
    assert model.cond.label_emb.num_embeddings == 11


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_unconditional_model_ignores_labels(kind):
    model = perturb_(build(kind, conditional=False)).eval()
    x, t, _ = inputs()
    assert model.cond.label_emb is None
    ref = model(x, t, None)
    assert torch.equal(model(x, t, torch.full((3,), 4)), ref)
    assert torch.equal(model(x, t, torch.full((3,), 7)), ref)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_noise_cond_changes_output(kind):
    model = perturb_(build(kind)).eval()
    x, t, y = inputs()
    assert not torch.allclose(model(x, t, y), model(x, 1.0 - t, y))


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("unet", {"channel_mults": (1, 2, 2), "attention_levels": (0, 2)}),
        ("dit", {"pos_embed": "learned"}),
    ],
)
def test_gradient_reaches_every_parameter(kind, kw):
    model = perturb_(build(kind, **kw))
    x, t, y = inputs(batch=4)
    model(x, t, y).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bf16_autocast_forward(kind):
    model = perturb_(build(kind)).eval()
    x, t, y = inputs()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_safetensors_round_trip(kind, tmp_path):
    model = perturb_(build(kind, seed=0)).eval()
    path = tmp_path / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file(model.state_dict(), str(tmp))
    fresh = build(kind, seed=123).eval()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x, t, y = inputs()
    assert torch.equal(fresh(x, t, y), model(x, t, y))


# --------------------------------------------------------------------------- layers


def test_sinusoidal_embedding_at_zero_and_shape():
    emb = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))  # first frequency is 1


def test_sincos_pos_embed_2d():
    pe = sincos_pos_embed_2d(8, 3)  # [9, 8]: rows, then columns, each [sin(2), cos(2)]
    assert pe.shape == (9, 8)
    assert torch.allclose(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.allclose(pe[1, 4:], pe[3, :4])  # column 1 of token 1 == row 1 of token 3
    assert len({tuple(r.tolist()) for r in pe}) == 9  # every position distinct


def test_unpatchify_inverts_patchify():
    model = build("dit", patch_size=4)
    x, _, _ = inputs(batch=2)
    g, p = 7, 4
    tokens = x.reshape(2, 1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p)
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("c", [8, 16, 24, 40, 64, 80, 96, 128, 192, 256, 320, 7])
def test_norm_groups_always_divides(c):
    g = norm_groups(c)
    assert c % g == 0 and 1 <= g <= 32
    assert g == 1 or c // g >= 4


def test_count_and_describe():
    model = build("unet")
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert describe(model) == f"UNet: {n / 1e6:.2f}M parameters"


# --------------------------------------------------------------------------- FLOPs


def test_flop_counter_matches_hand_count_linear_conv_attention():
    with flop_counter() as fc:
        nn.Linear(16, 32)(torch.randn(3, 16))
    assert fc.get_total_flops() == 2 * 3 * 16 * 32
    with flop_counter() as fc:
        nn.Conv2d(2, 4, 3, padding=1)(torch.randn(5, 2, 8, 8))
    assert fc.get_total_flops() == 2 * 5 * 4 * 8 * 8 * 2 * 9
    b, h, s, d = 2, 3, 10, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    with flop_counter() as fc:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert fc.get_total_flops() == 2 * b * h * s * s * d * (2 + 5)  # forward 2 + backward 5 mm


class _OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x, noise_cond, labels=None):
        return self.conv(x)[:, :1]


def test_forward_and_train_flops_per_image():
    model = _OneConv()
    per_image = 2 * 3 * 1 * 9 * 28 * 28
    assert forward_flops(model, SPEC, batch_size=4) == per_image
    # input needs no grad, so backward computes only the weight gradient: one more conv
    assert train_flops(model, SPEC, batch_size=4) == 2 * per_image
    assert model.conv.weight.grad is None


def test_model_report_of_tiny_dit():
    model = build("dit")
    report = model_report(model, SPEC)
    assert report["parameters"] == count_parameters(model)
    fwd = report["forward_flops_per_image"]
    # the 2 blocks' qkv/proj/MLP matmuls (12 * width^2 per token) dominate; attention and the
    # patch/final layers add a little
    tokens, w = 16, 32
    assert 2 * tokens * 12 * w * w * 2 < fwd < 2 * 2 * tokens * 12 * w * w * 2
    assert 2.5 * fwd < report["train_flops_per_image"] < 3.5 * fwd


def test_cpu_attention_runs_in_fp32_under_bf16_autocast(monkeypatch):
    """The CPU bf16 attention kernel is slow, so SelfAttention upcasts q, k, v on CPU."""
    from mnistdiff.models import layers

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    attn = layers.SelfAttention(32, num_heads=4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert seen[-1] == (torch.float32, torch.float32, torch.float32, False)
    assert out.dtype == torch.bfloat16  # the output projection still runs under autocast
    assert (out.float() - ref).norm() / ref.norm() < 0.03
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
