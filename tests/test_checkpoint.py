import errno
import json

import pytest
import torch

import mnistdiff.checkpoint as ckpt
from conftest import ROOT
from mnistdiff.build import build_denoiser
from mnistdiff.checkpoint import (
    CheckpointError,
    DiskFullError,
    content_sha256,
    export_checkpoint,
    load_checkpoint,
    read_export,
    save_checkpoint,
    write_export,
)
from mnistdiff.config import load_config, to_dict
from mnistdiff.data import DataSpec
from mnistdiff.sample import Pipeline

# 64 float32 values whose bytes are easy to find in a file
PATTERN = torch.arange(1000.0, 1064.0)


def _flip_pattern_byte(path, tensor=PATTERN):
    """Flip one payload byte of ``tensor``'s stored bytes inside ``path`` (structure intact)."""
    data = bytearray(path.read_bytes())
    needle = tensor.numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "pattern must occur exactly once"
    data[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _state(**extra):
    return {
        "config": {"train": {"lr": 1e-3}},
        "data_spec": {"channels": 1, "size": 28, "num_classes": 10},
        "model": {"w": PATTERN.clone(), "b": torch.zeros(3)},
        "step": 7,
        "history": [{"step": 5, "loss": 0.25}],
        **extra,
    }


def _smoke_checkpoint(tmp_path, mutate=None):
    """A real (untrained) smoke-config checkpoint, built without data."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    spec = DataSpec(channels=1, size=28, num_classes=10)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, spec)
    state = {
        "config": to_dict(cfg),
        "data_spec": spec.to_dict(),
        "model": denoiser.backbone.state_dict(),
        "ema": None,
        "step": 0,
    }
    if mutate:
        mutate(state)
    return save_checkpoint(state, tmp_path / "model.pt")


def test_checkpoint_round_trip_stores_and_verifies_checksum(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["checksum"]["algorithm"] == "sha256" and len(raw["checksum"]["value"]) == 64
    state = load_checkpoint(path)
    assert "checksum" not in state  # verified and removed
    assert torch.equal(state["model"]["w"], PATTERN) and state["step"] == 7
    # saving a loaded state again gives the same digest (canonical content hash)
    again = torch.load(save_checkpoint(state, tmp_path / "b.pt"), weights_only=True)
    assert again["checksum"] == raw["checksum"]


def test_flipped_tensor_byte_in_pt_is_named(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    _flip_pattern_byte(path)
    with pytest.raises(CheckpointError, match=r"last\.pt: checksum mismatch.*corrupt"):
        load_checkpoint(path)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format_version": 1, **_state()}, path)  # as written before checksums
    assert load_checkpoint(path)["step"] == 7


def test_content_hash_is_canonical_and_sees_every_value():
    a = {"x": torch.ones(2), "y": [1, 2.5, None], "z": {"k": "v"}}
    b = {"z": {"k": "v"}, "y": [1, 2.5, None], "x": torch.ones(2)}
    assert content_sha256(a) == content_sha256(b)  # key order does not matter
    for changed in (
        {**a, "y": [1, 2.5000001, None]},
        {**a, "x": torch.ones(2, dtype=torch.float64)},
        {**a, "x": torch.ones(1, 2)},
        {**a, "z": {"k": "w"}},
        {**a, "y": (1, 2.5, None)},
    ):
        assert content_sha256(changed) != content_sha256(a)


def test_flipped_payload_byte_in_safetensors_export_is_named(tmp_path):
    out = write_export(tmp_path / "export", {"a": 1}, {"b": 2}, {"w": PATTERN.clone()})
    meta = json.loads((out / "config.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    assert torch.equal(read_export(out)["weights"]["w"], PATTERN)
    _flip_pattern_byte(out / "model.safetensors")  # the JSON header stays intact
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        read_export(out)


def test_export_without_checksum_still_loads(tmp_path):
    out = write_export(tmp_path / "export", {"a": 1}, {"b": 2}, {"w": PATTERN.clone()})
    meta = json.loads((out / "config.json").read_text())
    del meta["weights_sha256"]
    (out / "config.json").write_text(json.dumps(meta))
    assert torch.equal(read_export(out)["weights"]["w"], PATTERN)


def test_export_of_a_checkpoint_verifies_on_sampling_load(tmp_path):
    path = _smoke_checkpoint(tmp_path)
    out = export_checkpoint(path, tmp_path / "export")
    pipe = Pipeline.load(out, device="cpu")
    assert pipe.info["ema"] is True
    # corrupt one weight of the export: the pipeline refuses it, naming the file
    weights = read_export(out)["weights"]
    name = max(weights, key=lambda k: weights[k].numel())
    _flip_pattern_byte(out / "model.safetensors", weights[name])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        Pipeline.load(out, device="cpu")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    def mutate(state):
        model = state["model"]
        first = next(iter(model))
        del model[first]
        model["extra.weight"] = torch.zeros(2)
        key = next(k for k, v in model.items() if v.dim() == 4)
        model[key] = torch.zeros(1, 1, 1, 1)

    path = _smoke_checkpoint(tmp_path, mutate)
    with pytest.raises(CheckpointError) as info:
        Pipeline.load(path, device="cpu")
    message = str(info.value)
    assert str(path) in message and "do not fit" in message
    assert "missing (1)" in message and "unexpected (1): extra.weight" in message
    assert "(1, 1, 1, 1) vs" in message


def test_invalid_saved_config_is_named(tmp_path):
    def mutate(state):
        state["config"]["model"]["type"] = "transformer9000"

    path = _smoke_checkpoint(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=rf"{path}: saved config is invalid.*model\.type"):
        Pipeline.load(path, device="cpu")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    before = path.read_bytes()
    real = ckpt.atomic_write_bytes

    def full_disk(target, data):
        def half_then_fail(tmp):
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        with ckpt.atomic_path(target) as tmp:
            half_then_fail(tmp)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)
    with pytest.raises(DiskFullError, match=rf"disk full while writing {path}"):
        save_checkpoint(_state(step=8), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    assert load_checkpoint(path)["step"] == 7
