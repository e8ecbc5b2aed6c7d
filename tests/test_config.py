import dataclasses

import pytest
import yaml

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


@pytest.mark.parametrize("name", ["smoke", "unet", "quick", "dit"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    path = f"configs/{name}.yaml"
    import os

    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    cfg = load_config(path)
    out = tmp_path / "c.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(yaml.safe_load(out.read_text())) == cfg


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
