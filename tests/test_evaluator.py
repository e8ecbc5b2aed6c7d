"""Tests for mnistdiff.evaluator: shipped weights, checksum verification, embedding, training."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from mnistdiff.evaluator import (
    ASSET_DIR,
    EvaluatorError,
    FeatureNet,
    load_evaluator,
    random_shift,
    require_evaluator,
    sha256_file,
    train_evaluator,
)

MNIST_DIR = os.environ.get("MNIST_DIR")
WEIGHTS = ASSET_DIR / "evaluator.safetensors"
META = ASSET_DIR / "evaluator.json"


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def _copy_assets(tmp_path):
    for p in (WEIGHTS, META):
        shutil.copy(p, tmp_path / p.name)
    return tmp_path / WEIGHTS.name


def test_shipped_asset_checksum_size_and_metadata():
    meta = json.loads(META.read_text())
    assert sha256_file(WEIGHTS) == meta["sha256"]
    assert WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    assert meta["test_accuracy"] >= 0.993
    assert meta["torch_version"] and meta["training"]["seed"] == 0


def test_load_from_directory_or_file(tmp_path, evaluator):
    weights = _copy_assets(tmp_path)
    assert load_evaluator(tmp_path).checksum == evaluator.checksum
    assert load_evaluator(weights).checksum == evaluator.checksum


def test_corrupted_weights_raise_checksum_error(tmp_path, evaluator):
    weights = _copy_assets(tmp_path)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EvaluatorError, match="checksum mismatch") as err:
        load_evaluator(tmp_path)
    msg = str(err.value)
    assert str(weights) in msg and evaluator.checksum in msg and sha256_file(weights) in msg
    assert "mnistdiff train-evaluator --out DIR" in msg


def test_missing_file_raises(tmp_path):
    with pytest.raises(EvaluatorError, match="not found.*evaluator.safetensors"):
        load_evaluator(tmp_path)
    with pytest.raises(EvaluatorError, match="Reinstall mnistdiff"):
        load_evaluator(tmp_path / "nothing.safetensors")


def test_incompatible_tensors_raise(tmp_path):
    weights = tmp_path / "evaluator.safetensors"
    save_file({"head.weight": torch.zeros(3, 3)}, str(weights))
    meta = {"sha256": sha256_file(weights), "architecture": {"widths": [32, 32, 64, 64]}}
    (tmp_path / "evaluator.json").write_text(json.dumps(meta))
    with pytest.raises(EvaluatorError, match="do not fit architecture"):
        load_evaluator(tmp_path)


def test_embed_shapes_dtypes_and_padding(evaluator):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=g)
    feats, logits = evaluator.embed(x, batch_size=3)
    assert feats.shape == (7, 128) and feats.dtype == torch.float64
    assert logits.shape == (7, 10) and logits.dtype == torch.float32
    f4, _ = evaluator.embed(x.unsqueeze(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))  # [7, 32, 32]
    f32, _ = evaluator.embed(padded)
    torch.testing.assert_close(f32, f4)  # same batch size: bitwise equal inputs
    torch.testing.assert_close(f4, feats, rtol=1e-4, atol=1e-5)  # batch size changes kernels


def test_embed_rejects_bad_input(evaluator):
    with pytest.raises(ValueError, match="uint8"):
        evaluator.embed(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        evaluator.embed(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_random_shift_is_a_translation():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 9:15] = torch.rand(16, 1, 8, 6, generator=g)  # content away from borders
    out = random_shift(x, 2, g)
    for i in range(16):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], x[i].roll((dy, dx), (1, 2))) for dy, dx in shifts)
    assert torch.equal(random_shift(x, 0, g), x)


@pytest.fixture
def tiny_mnist(monkeypatch):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    images = (torch.rand(200, 28, 28, generator=g) * 40).to(torch.uint8)
    for c in range(10):  # class c: a bright bar at row 2c
        images[labels == c, 2 * c + 2 : 2 * c + 5, 4:24] = 255
    arrays = types.SimpleNamespace(
        train_images=images, train_labels=labels, test_images=images[:50], test_labels=labels[:50]
    )
    module = types.ModuleType("mnistdiff.data")
    module.load_dataset = lambda dataset="mnist", data_dir=None: arrays
    monkeypatch.setitem(sys.modules, "mnistdiff.data", module)


def test_train_evaluator_is_deterministic_and_loadable(tiny_mnist, tmp_path):
    kw = dict(epochs=1, batch_size=50, seed=3, num_threads=1, log=None)
    meta_a = train_evaluator(tmp_path / "a", **kw)
    meta_b = train_evaluator(tmp_path / "b", **kw)
    assert meta_a["sha256"] == meta_b["sha256"]
    saved = json.loads((tmp_path / "a" / "evaluator.json").read_text())
    assert saved == meta_a and 0.0 <= saved["test_accuracy"] <= 1.0
    assert load_evaluator(tmp_path / "a").checksum == meta_a["sha256"]


def test_featurenet_rejects_bad_widths():
    with pytest.raises(ValueError, match="widths"):
        FeatureNet(widths=(32, 32, 64))


@pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to the MNIST IDX files")
def test_shipped_network_test_accuracy(evaluator):
    from mnistdiff.data import load_dataset

    data = load_dataset(dataset="mnist", data_dir=MNIST_DIR)
    _, logits = evaluator.embed(data.test_images)
    accuracy = (logits.argmax(1) == data.test_labels).double().mean().item()
    assert accuracy >= 0.993


def test_shipped_network_reads_the_synthetic_digits(evaluator, synthetic_data):
    """The synthetic set is scored with the MNIST evaluator (pipeline tests): it must name
    most of its seven-segment digits (82% of the training split when this was written)."""
    from mnistdiff.data import load_dataset

    data = load_dataset(dataset="synthetic", data_dir=synthetic_data, download=False)
    _, logits = evaluator.embed(data.test_images)
    accuracy = (logits.argmax(1) == data.test_labels).double().mean().item()
    assert accuracy > 0.7


def test_train_evaluator_rejects_bad_arguments(tiny_mnist, tmp_path):
    with pytest.raises(ValueError, match="epochs >= 1"):
        train_evaluator(tmp_path, epochs=0, log=None)
    assert not (tmp_path / "evaluator.safetensors").exists()


# --------------------------------------------------------------------------- datasets without one


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_evaluation_refused_on_datasets_without_an_evaluator(dataset):
    """The MNIST digit classifier would score these against MNIST digits: refused, not scored."""
    from mnistdiff.evaluate import evaluate_images, evaluate_pipeline

    message = rf"dataset '{dataset}': only mnist has a shipped evaluator"
    with pytest.raises(EvaluatorError, match=message):
        require_evaluator(dataset)
    images = torch.zeros(8, 28, 28, dtype=torch.uint8)
    with pytest.raises(EvaluatorError, match=message):
        evaluate_images(images, dataset=dataset, data_dir="/nonexistent")  # before any loading
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(dataset=dataset))
    pipe = types.SimpleNamespace(cfg=cfg)  # sampling it would fail: it has no model
    with pytest.raises(EvaluatorError, match=message):
        evaluate_pipeline(pipe, num_samples=8)
    assert require_evaluator("mnist") == require_evaluator("synthetic") == "mnist"
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        require_evaluator("cifar10")
