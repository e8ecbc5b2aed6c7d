"""Reliability fixes of issue 15: bounded-memory sampling, input and output checks, caches, modes.

Each test here failed before its fix.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from mnistdiff import outputs, streaming
from mnistdiff.atomic import atomic_path, atomic_write_text
from mnistdiff.build import build_denoiser
from mnistdiff.cli import main
from mnistdiff.config import load_config
from mnistdiff.data import DataSpec
from mnistdiff.device import select_precision
from mnistdiff.distributed import current_context
from mnistdiff.sample import Pipeline, load_npz
from mnistdiff.streaming import NpzStream, grid_rows, sample_to_file


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    """An untrained smoke-config model (sampling needs no data)."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    spec = DataSpec(channels=1, size=28, num_classes=10)
    denoiser = build_denoiser(cfg, spec).eval()
    device = torch.device("cpu")
    return Pipeline(cfg, spec, denoiser, device, select_precision("fp32", device), Path("x"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_data) -> Path:
    """A 2-step smoke run on the synthetic digits (for the CLI)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    cfg = ROOT / "configs" / "smoke.yaml"
    data = ["--dataset", "synthetic", "--data-dir", synthetic_data]
    argv = ["train", "--config", cfg, "--run-dir", out, "--steps", "2", *data]
    assert run(*argv) == 0
    return out


# --------------------------------------------------------------------------- streaming


def test_npz_stream_writes_what_numpy_reads(tmp_path):
    labels = torch.arange(7) % 3
    images = torch.randint(0, 256, (7, 4, 5), dtype=torch.uint8)
    path = tmp_path / "s.npz"
    with NpzStream(path, labels, (4, 5)) as stream:
        for chunk in images.split(3):
            stream.write(chunk)
    with np.load(path) as f:
        assert np.array_equal(f["images"], images.numpy())
        assert f["labels"].dtype == np.int64 and np.array_equal(f["labels"], labels.numpy())


def test_npz_stream_leaves_nothing_when_short_or_interrupted(tmp_path):
    path = tmp_path / "s.npz"
    labels, two = torch.zeros(5, dtype=torch.long), torch.zeros((2, 2, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match="wrote 2 of 5"), NpzStream(path, labels, (2, 2)) as s:
        s.write(two)
    with pytest.raises(KeyboardInterrupt), NpzStream(path, labels, (2, 2)) as s:
        s.write(two)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_sample_to_file_equals_in_memory_sampling_one_batch_at_a_time(pipe, tmp_path):
    labels = torch.arange(10).repeat_interleave(2)[:19]
    seen = []
    generate = pipe.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        seen.append(len(out.x))
        return out

    npz = tmp_path / "s.npz"
    keep = torch.tensor([0, 5, 18])
    opts = {"steps": 2, "seed": 3, "batch_size": 4}
    pipe.generate = spy
    try:
        result = sample_to_file(pipe, labels, 19, current_context(), npz=npz, keep=keep, **opts)
    finally:
        del pipe.generate
    expected = pipe.sample(labels, **opts)
    assert max(seen) <= 4 and sum(seen) == 19  # never more than one batch in memory
    with np.load(npz) as f:
        assert np.array_equal(f["images"], expected.numpy())
        assert np.array_equal(f["labels"], labels.numpy())
    assert torch.equal(result.preview, expected[keep])
    assert torch.equal(result.first, expected[:4]) and result.nfe == 2


def test_sigterm_while_streaming_leaves_no_file(pipe, tmp_path):
    generate, calls = pipe.generate, []

    def killed_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    pipe.generate = killed_on_second_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            sample_to_file(pipe, None, 4, current_context(), npz=tmp_path / "s.npz", batch_size=1)
    finally:
        del pipe.generate
    assert list(tmp_path.iterdir()) == [] and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_time_estimate_is_printed_for_long_requests(pipe, monkeypatch):
    monkeypatch.setattr(streaming, "WARN_SECONDS", 0.0)
    notes = []
    sample_to_file(pipe, None, 3, current_context(), steps=1, batch_size=1, log=notes.append)
    assert len(notes) == 1 and "3 images at" in notes[0] and "will take about" in notes[0]


def test_grid_rows_caps_the_preview():
    keep, nrow = grid_rows(None, 64, 8)
    assert torch.equal(keep, torch.arange(64)) and nrow == 8
    keep, nrow = grid_rows(None, 10**7, 8)
    assert torch.equal(keep, torch.arange(streaming.GRID_MAX_IMAGES)) and nrow == 32
    labels = torch.tensor([3, 7]).repeat_interleave(5000)
    keep, nrow = grid_rows(labels, len(labels), 5000)
    k = streaming.GRID_MAX_IMAGES // 2
    assert nrow == k and torch.equal(labels[keep], torch.tensor([3, 7]).repeat_interleave(k))


def test_sample_streams_batches_to_the_npz(run_dir, tmp_path, monkeypatch):
    sizes = []
    generate = Pipeline.generate

    def spy(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        sizes.append(len(out.x))
        return out

    monkeypatch.setattr(Pipeline, "generate", spy)
    npz, png = tmp_path / "s.npz", tmp_path / "g.png"
    argv = ["--per-class", "3", "--steps", "2", "--batch-size", "8", "--seed", "4"]
    assert run("sample", "--checkpoint", run_dir, *argv, "--out", png, "--save-npz", npz) == 0
    assert max(sizes) <= 8 and sum(sizes) == 30
    images, labels = load_npz(npz)
    again = Pipeline.load(run_dir, device="cpu").sample(labels, steps=2, batch_size=8, seed=4)
    assert torch.equal(images, again)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(3))


def test_sample_refuses_upfront_when_the_npz_cannot_fit(run_dir, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage._replace(free=10**6))

    def never(*args, **kwargs):
        raise AssertionError("sampled although the output cannot fit")

    monkeypatch.setattr(Pipeline, "generate", never)
    npz = tmp_path / "big.npz"
    argv = ["--num", "100000", "--out", tmp_path / "g.png", "--save-npz", npz]
    assert run("sample", "--checkpoint", run_dir, *argv) == 1
    err = capsys.readouterr().err
    assert f"--num 100000: --save-npz {npz} would need 75.5 MB" in err
    assert "only 976.6 KB is free" in err and "at most 1257 images fit" in err
    assert not npz.exists()


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize(
    ("flag", "name", "message"),
    [
        ("--out", "dir", "is a directory"),
        ("--out", "grid.jpg", "give a path ending in .png"),
        ("--save-npz", "s.txt", "give a path ending in .npz"),
        ("--gif", "dir", "is a directory"),
    ],
)
def test_sample_checks_output_paths_before_loading(tmp_path, capsys, flag, name, message):
    (tmp_path / "dir").mkdir()
    missing = tmp_path / "no-such-checkpoint"  # the path check must come first
    assert run("sample", "--checkpoint", missing, flag, tmp_path / name) == 1
    err = capsys.readouterr().err
    assert f"{flag} {tmp_path / name}" in err and message in err


def test_export_to_an_existing_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert run("export", "--checkpoint", tmp_path / "missing", "--out", target) == 1
    err = capsys.readouterr().err
    assert f"--out {target}: exists and is a file" in err
    assert run("export", "--checkpoint", tmp_path, "--out", target / "sub") == 1
    assert "is a file, so no directory can be made there" in capsys.readouterr().err
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- evaluate --samples


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 3, 32, 32), np.uint8)}, "must be uint8 [N, 28, 28]"),
        ({"images": np.zeros((4, 1, 32, 32), np.uint8)}, "uint8 [4, 1, 32, 32]"),
        ({"images": np.zeros((4, 28, 28), np.float32)}, "'images' must be uint8"),
        ({"images": np.zeros((0, 28, 28), np.uint8)}, "no images"),
        (
            {"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([0.5, 1.5])},
            "'labels' must be integer [2]",
        ),
        (
            {"images": np.zeros((2, 28, 28), np.uint8), "labels": np.array([1, 2, 3])},
            "'labels' must be integer [2]",
        ),
    ],
)
def test_evaluate_samples_refuses_other_forms(tmp_path, capsys, arrays, message):
    path = _npz(tmp_path / "s.npz", **arrays)
    assert run("evaluate", "--samples", path) == 1
    assert message in capsys.readouterr().err


def test_evaluate_samples_of_a_non_npz_file(tmp_path, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    npy = tmp_path / "images.npy"
    np.save(npy, np.zeros((2, 28, 28), np.uint8))
    for path in (text, npy):
        assert run("evaluate", "--samples", path) == 1
        err = capsys.readouterr().err
        assert f"{path}: not an .npz file" in err and "pickled" not in err


def test_load_npz_accepts_the_documented_forms(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 1, 28, 28).astype(np.uint8)
    path = _npz(tmp_path / "s.npz", images=images, labels=np.array([3, 4], np.int32))
    got, labels = load_npz(path)
    assert np.array_equal(got.numpy(), images[:, 0]) and labels.tolist() == [3, 4]
    path = _npz(tmp_path / "u.npz", images=images[:, 0], labels=np.array([-1, -1]))
    assert load_npz(path)[1] is None


# --------------------------------------------------------------------------- data and caches


def test_unreadable_data_folder_is_a_data_error(tmp_path, synthetic_data):
    folder = tmp_path / "digits"
    shutil.copytree(synthetic_data, folder)
    folder.chmod(0)
    prefix = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that allow it
        assert shutil.which("setpriv"), "need setpriv to test permissions as root"
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    argv = ["data", "--dataset", "synthetic", "--data-dir", folder, "--no-download"]
    argv += ["--out", tmp_path / "g.png"]
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "mnistdiff", *map(str, argv)],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(tmp_path)},
            timeout=120,
        )
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert f"{folder}: cannot read the data folder (Permission denied)" in proc.stderr
    assert "Traceback" not in proc.stderr


class _TinyEvaluator:
    checksum = "f" * 64

    def embed(self, images):
        x = images.double().flatten(1)
        return torch.stack([x.mean(1), x.std(1), x[:, 400]], 1), None


def test_truncated_reference_cache_is_recomputed(tmp_path, synthetic_data):
    from mnistdiff.metrics import reference_stats

    data = {"dataset": "synthetic", "data_dir": synthetic_data, "cache_dir": tmp_path}
    first = reference_stats(_TinyEvaluator(), **data)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = reference_stats(_TinyEvaluator(), **data)
    assert np.array_equal(again["mu"], first["mu"]) and np.allclose(again["sigma"], first["sigma"])
    with np.load(path) as z:  # the cache was rewritten whole
        assert np.array_equal(z["features"], first["features"])


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.safetensors") as tmp:  # a writer that recreates the file
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == mode
