"""Every sampler x schedule x objective through the sampling pipeline on a smoke-sized model."""

from dataclasses import replace

import pytest
import torch

from conftest import ROOT
from mnistdiff.build import build_denoiser
from mnistdiff.config import ConfigError, load_config
from mnistdiff.data import DataSpec
from mnistdiff.sample import SampleOptions, generate, label_tensor
from mnistdiff.samplers import SAMPLERS, nfe_for

COMBOS = [(s, p) for s in ("linear", "cosine", "sigmoid") for p in ("eps", "x0", "v")] + [
    ("flow", p) for p in ("velocity", "x0", "v")
]


def _denoiser(schedule, prediction, model_type="unet"):
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"diffusion.schedule={schedule}",
            f"diffusion.prediction={prediction}",
            f"model.type={model_type}",
        ],
    )
    torch.manual_seed(0)
    den = build_denoiser(cfg, DataSpec()).eval()
    with torch.no_grad():  # leave the zero-initialised output: give every layer some weight
        for p in den.backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return den


@pytest.mark.parametrize("schedule,prediction", COMBOS)
def test_every_sampler_schedule_objective(schedule, prediction):
    den = _denoiser(schedule, prediction)
    labels = label_tensor(per_class=1)[:4]
    for name in SAMPLERS:
        opts = SampleOptions(sampler=name, steps=3, guidance=2.0, threshold="clip")
        a = generate(den, labels, 4, opts, seed=1, batch_size=4)
        b = generate(den, labels, 4, opts, seed=1, batch_size=4)
        assert a.x.shape == (4, 1, 28, 28) and torch.isfinite(a.x).all(), name
        assert torch.equal(a.x, b.x), f"{name}: same seed must give the same images"
        expected = nfe_for(name, 3)
        # Heun's first step from alpha = 0 (flow at t = 1) is an Euler step: one call fewer
        assert a.nfe in (expected, expected - 1), (name, a.nfe, expected)


@pytest.mark.parametrize("model_type", ["unet", "dit"])
def test_guidance_changes_samples_and_w1_is_conditional(model_type):
    den = _denoiser("cosine", "eps", model_type)
    labels = torch.tensor([1, 7])
    runs = {
        w: generate(
            den, labels, 2, SampleOptions(sampler="ddim", steps=4, guidance=w), seed=3, batch_size=2
        ).x
        for w in (1.0, 3.0)
    }
    assert not torch.allclose(runs[1.0], runs[3.0])
    other = generate(
        den,
        torch.tensor([2, 2]),
        2,
        SampleOptions(sampler="ddim", steps=4, guidance=1.0),
        seed=3,
        batch_size=2,
    )
    assert not torch.allclose(runs[1.0], other.x)  # labels matter


def test_config_grid_reaches_the_sampler():
    cfg = load_config(None, ["sample.grid=uniform", "sample.sampler=dpmpp_2m", "sample.steps=4"])
    opts = SampleOptions.from_config(cfg.sample, guidance=1.0)
    assert (opts.grid, opts.sampler, opts.steps, opts.guidance) == ("uniform", "dpmpp_2m", 4, 1.0)
    assert SampleOptions.from_config(load_config(None).sample).grid is None  # sampler's own
    den = _denoiser("flow", "velocity")
    labels = torch.tensor([3, 8])
    run = {g: generate(den, labels, 2, replace(opts, grid=g), seed=5).x for g in ("logsnr", None)}
    uniform = generate(den, labels, 2, opts, seed=5).x
    assert torch.equal(run[None], run["logsnr"])  # dpmpp_2m's default grid
    assert not torch.allclose(uniform, run["logsnr"])
    with pytest.raises(ConfigError, match=r"sample.grid: 'cosine' is not allowed.*uniform"):
        load_config(None, ["sample.grid=cosine"])
