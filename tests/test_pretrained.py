"""The pretrained model shipped in the package: checksums, default loading, quality sanity."""

from __future__ import annotations

import shutil

import pytest
import torch

import mnistdiff
from mnistdiff.cli import main
from mnistdiff.evaluator import load_evaluator
from mnistdiff.pretrained import PRETRAINED_DIR, PretrainedError, metadata, verified_dir


def test_shipped_asset_verifies_and_is_small():
    directory = verified_dir()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 6e6
    meta = metadata()
    assert meta["metrics"]["class_accuracy"] >= 0.99  # what the README quotes
    assert "mnistdiff train" in meta["command"]


def test_load_without_argument_returns_the_pretrained_model_and_it_draws_digits():
    pipe = mnistdiff.load()
    assert pipe.conditional and pipe.cfg.sample.guidance == 1.3
    labels = list(range(10)) * 2
    images = pipe.sample(labels, steps=10, seed=0)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    predicted = load_evaluator().embed(images)[1].argmax(1)
    assert (predicted == torch.tensor(labels)).float().mean() >= 0.9


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, name):
    copy = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED_DIR, copy)
    data = bytearray((copy / name).read_bytes())
    data[-10] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=f"checksum mismatch for .*{name}"):
        verified_dir(copy)


def test_missing_metadata_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedError, match="metadata not found"):
        verified_dir(tmp_path)


def test_sample_cli_uses_the_pretrained_model_and_says_so(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--digits", "3", "--num", "2", "--steps", "4", "--out", str(out)]) == 0
    assert "using the pretrained model shipped with mnistdiff" in capsys.readouterr().out
    assert out.is_file()


def test_compose_cli_uses_the_pretrained_model_and_says_so(tmp_path, capsys):
    out = tmp_path / "n.png"
    assert main(["compose", "12", "--steps", "4", "--out", str(out)]) == 0
    assert "using the pretrained model shipped with mnistdiff" in capsys.readouterr().out
    assert out.is_file()


def test_damaged_asset_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    import mnistdiff.pretrained as pretrained

    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(pretrained.verified_dir, "__defaults__", (tmp_path,))
    monkeypatch.setattr(pretrained.describe, "__defaults__", (tmp_path,))
    assert main(["sample", "--digits", "3", "--num", "1", "--out", str(tmp_path / "g.png")]) == 1
    assert "pretrained model metadata not found" in capsys.readouterr().err
