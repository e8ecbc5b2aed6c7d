import dataclasses

import pytest
import yaml

from conftest import ROOT
from mnistdiff.config import (
    Config,
    ConfigError,
    apply_overrides,
    diff,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)


def test_defaults_valid_and_round_trip():
    cfg = Config()
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["smoke", "unet", "quick", "quick30", "dit"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    path = ROOT / "configs" / f"{name}.yaml"  # a missing shipped config fails the test
    cfg = load_config(path)
    out = tmp_path / "c.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(yaml.safe_load(out.read_text())) == cfg


def test_quick30_is_quick_with_more_capacity_only():
    """configs/quick30.yaml says which keys it changes; anything else drifting apart fails."""
    quick, quick30 = (load_config(ROOT / "configs" / f"{n}.yaml") for n in ("quick", "quick30"))
    changed = {key for key, _, _ in diff(quick, quick30)}
    assert changed == {
        "model.unet.channels",
        "model.unet.channel_mults",
        "train.time_budget_minutes",
        "sample.guidance",
    }
    assert quick30.train.time_budget_minutes == 3 * quick.train.time_budget_minutes


def test_overrides_types_and_nesting():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.unet.channel_mults=[1,2]",
            "model.unet.attention_levels=[]",
            "train.steps=7",
            "model.conditional=false",
            "train.ema_half_life=100",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.unet.channel_mults == (1, 2)
    assert cfg.model.unet.attention_levels == ()
    assert cfg.train.steps == 7 and cfg.model.conditional is False
    assert cfg.train.ema_half_life == 100.0


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a.b=none_text") == (["a", "b"], "none_text")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'.*Did you mean 'train.lr'"),
        ("trian.lr=1", r"unknown config key 'trian'.*Did you mean 'train'"),
        ("diffusion.schedule=foo", r"diffusion.schedule: 'foo' is not allowed.*cosine"),
        ("train.epochs=0", r"train.epochs: 0 is out of range"),
        ("train.epochs=1.5", r"train.epochs: expected int, got float"),
        ("train.ema=yes please", r"train.ema: expected bool"),
        ("train.lr=-1", r"train.lr: -1.0 is out of range"),
        ("model.unet.channel_mults=3", r"model.unet.channel_mults: expected a list"),
        ("model.unet.attention_levels=[5]", r"attention_levels: \[5\] out of range"),
        ("diffusion.prediction=velocity", r"'velocity' requires diffusion.schedule 'flow'"),
        ("train.batch_size=10", None),
    ],
)
def test_rejections(override, message):
    if message is None:  # control: a valid override passes
        assert load_config(None, [override]).train.batch_size == 10
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_grad_accum_divides_batch():
    with pytest.raises(ConfigError, match="divisible by train.grad_accum"):
        load_config(None, ["train.batch_size=10", "train.grad_accum=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    sec = tmp_path / "sec.yaml"
    sec.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(sec)


def test_frozen_and_diff():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    other = load_config(None, ["train.lr=0.1", "model.unet.channels=32"])
    changes = dict((k, (a, b)) for k, a, b in diff(cfg, other))
    assert changes == {"train.lr": (2e-4, 0.1), "model.unet.channels": (64, 32)}


def test_apply_overrides_does_not_mutate():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2.0"])
    assert data["train"]["lr"] == 1.0 and out["train"]["lr"] == 2.0


# --------------------------------------------------------------------------- options defined once


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=.nan", r"train.lr: nan is not allowed; expected a finite number"),
        ("sample.guidance=.nan", r"sample.guidance: nan is not allowed"),
        ("train.time_budget_minutes=.inf", r"train.time_budget_minutes: inf is not allowed"),
        ("sample.guidance_interval=[0.1, .nan]", r"guidance_interval\[1\]: nan is not allowed"),
        ("sample.guidance=-1", r"sample.guidance: -1.0 is out of range; allowed \[0.0, 100.0\]"),
        ("sample.sampler=eulr", r"sample.sampler: 'eulr' is not allowed.*'euler'.*'heun'"),
        ("sample.guidance_interval=[0.8, 0.2]", r"guidance_interval: expected \[t_lo, t_hi\]"),
        ("sample.guidance_interval=[0.1, 0.2, 0.3]", r"guidance_interval: expected \[t_lo"),
        ("sample.guidance_rescale=1.5", r"sample.guidance_rescale: 1.5 is out of range"),
    ],
)
def test_float_and_sample_rejections(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_sample_section_has_rescale_interval_and_sampler_options():
    cfg = load_config(
        None,
        [
            "sample.sampler=euler",
            "sample.s_churn=2",
            "sample.guidance_rescale=0.7",
            "sample.guidance_interval=[0.2, 0.8]",
        ],
    )
    assert cfg.sample.guidance_rescale == 0.7 and cfg.sample.guidance_interval == (0.2, 0.8)
    assert cfg.sample.s_churn == 2.0 and cfg.sample.eta == 0.0
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddpm"])
def test_option_of_another_sampler_is_an_error(sampler):
    with pytest.raises(ConfigError, match=rf"sample.eta \(0.7\).*'{sampler}'.*option of ddim"):
        load_config(None, [f"sample.sampler={sampler}", "sample.eta=0.7"])
    with pytest.raises(ConfigError, match=r"sample.s_churn .* option of euler, heun"):
        load_config(None, ["sample.sampler=ddim", "sample.s_churn=1"])
    assert load_config(None, ["sample.sampler=ddim", "sample.eta=0.7"]).sample.eta == 0.7


def test_sample_options_validate_when_constructed_directly():
    from mnistdiff.config import SampleOptions

    with pytest.raises(ConfigError, match="guidance: nan is not allowed"):
        SampleOptions(guidance=float("nan"))
    with pytest.raises(ConfigError, match="eta"):
        SampleOptions(sampler="heun", eta=0.5)
    assert SampleOptions(guidance_interval=[0.1, 0.9]).guidance_interval == (0.1, 0.9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "unipc"])
def test_record_reproduces_the_options(sampler):
    from mnistdiff.config import SampleOptions
    from mnistdiff.samplers import SAMPLERS

    opts = SampleOptions(sampler=sampler, steps=7, guidance_interval=(0.1, 0.9), threshold="none")
    record = opts.record()
    common = {"sampler", "steps", "guidance", "guidance_rescale", "guidance_interval", "grid"}
    own = {o.name for o in SAMPLERS[sampler].options}
    assert set(record) == common | {"threshold", "classifier", "classifier_scale"} | own
    assert SampleOptions(**yaml.safe_load(yaml.safe_dump(record))) == opts


def test_from_config_overrides_and_sampler_change():
    from mnistdiff.config import SampleOptions

    section = load_config(None, ["sample.sampler=ddim", "sample.eta=0.5"]).sample
    assert SampleOptions.from_config(section).eta == 0.5
    # the section's eta belongs to its ddim; another sampler starts from its own defaults
    heun = SampleOptions.from_config(section, sampler="heun", s_churn=3)
    assert heun.eta == 0.0 and heun.s_churn == 3.0
    with pytest.raises(ConfigError, match=r"sample.eta .*'euler'.*option of ddim"):
        SampleOptions.from_config(section, sampler="euler", eta=0.0)  # given explicitly
    with pytest.raises(ConfigError, match="sample.steps: 0 is out of range"):
        SampleOptions.from_config(section, steps=0)


def test_choice_lists_are_the_registries():
    from mnistdiff.config import DataConfig, DiffusionConfig, ModelConfig, SampleConfig, choices_of
    from mnistdiff.datasets import DATASETS
    from mnistdiff.guidance import THRESHOLD_MODES
    from mnistdiff.losses import LOSSES
    from mnistdiff.models import BACKBONES
    from mnistdiff.parameterization import PREDICTIONS
    from mnistdiff.samplers import SAMPLERS
    from mnistdiff.schedules import SCHEDULE_NAMES, TIME_SAMPLINGS

    def allowed(cls, name):
        return tuple(choices_of({f.name: f.metadata for f in dataclasses.fields(cls)}[name]))

    assert allowed(DataConfig, "dataset") == tuple(DATASETS)
    assert allowed(ModelConfig, "type") == tuple(BACKBONES)
    assert allowed(DiffusionConfig, "schedule") == tuple(SCHEDULE_NAMES)
    assert allowed(DiffusionConfig, "prediction") == tuple(PREDICTIONS)
    assert allowed(DiffusionConfig, "loss") == tuple(LOSSES)
    assert allowed(DiffusionConfig, "time_sampling") == tuple(TIME_SAMPLINGS)
    assert allowed(SampleConfig, "threshold") == tuple(THRESHOLD_MODES)
    assert allowed(SampleConfig, "sampler") == tuple(SAMPLERS)


def test_registering_a_backbone_or_sampler_makes_it_selectable(monkeypatch):
    import torch

    from mnistdiff.build import build_denoiser
    from mnistdiff.data import DataSpec
    from mnistdiff.models import BACKBONES
    from mnistdiff.samplers import SAMPLERS

    with pytest.raises(ConfigError, match="model.type: 'linear' is not allowed"):
        load_config(None, ["model.type=linear"])

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, noise_cond, labels=None):
            return x * self.scale

    monkeypatch.setitem(BACKBONES, "linear", lambda cfg, spec: Linear())
    monkeypatch.setitem(SAMPLERS, "ddim_copy", SAMPLERS["ddim"])
    cfg = load_config(None, ["model.type=linear", "sample.sampler=ddim_copy", "sample.eta=0.3"])
    den = build_denoiser(cfg, DataSpec(channels=1, size=28, num_classes=10))
    assert isinstance(den.backbone, Linear) and cfg.sample.eta == 0.3


@pytest.mark.parametrize("section", ["train", "sample", "model"])
def test_section_given_as_a_scalar(tmp_path, section):
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}: 5\n")
    with pytest.raises(ConfigError, match=rf"^{section}: expected a mapping, got 5"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"'{section}' must be a section.*got 5"):
        load_config(path, [f"{section}.x=1"])
