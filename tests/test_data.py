"""Tests of the data modules: IDX reading and verification (idx), the dataset table and folders
(datasets), downloads (download), loading and statistics (data), the synthetic digits
(synthetic), transforms (transforms), and splits, batches and per-step seeds (seeding)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import os
import socket
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistdiff import synthetic
from mnistdiff.data import DataSpec, MnistArrays, dataset_stats, load_dataset
from mnistdiff.datasets import DATASETS, DatasetInfo, get_dataset_info, resolve_data_dir
from mnistdiff.download import download_dataset
from mnistdiff.idx import DataError, IdxFile, idx_bytes, read_idx_file
from mnistdiff.seeding import BatchIterator, seed_for, step_generator, train_val_split
from mnistdiff.transforms import crop_to, from_model_range, original_size, pad_to, to_model_range

N_TRAIN, N_TEST = 5, 3


# ----------------------------------------------------------------------------- tiny IDX files


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": np.array([9, 0, 4], dtype=np.uint8),
    }


def tiny_info(arrays: dict[str, np.ndarray], mirrors: tuple[str, ...] = ()) -> DatasetInfo:
    """A DatasetInfo whose MD5s and counts describe the tiny files (gz stored with mtime 0)."""
    files = {}
    for key, array in arrays.items():
        raw = idx_bytes(array)
        name = key.replace("_", "-") + "-idx"
        files[key] = IdxFile(
            name=name,
            kind="images" if array.ndim == 3 else "labels",
            count=len(array),
            gz_md5=hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest(),
            raw_md5=hashlib.md5(raw).hexdigest(),
        )
    return DatasetInfo(name="tiny", mirrors=mirrors, classes=tuple("0123456789"), **files)


def write_files(root: Path, arrays: dict[str, np.ndarray], *, gz: bool = True) -> DatasetInfo:
    info = tiny_info(arrays)
    root.mkdir(parents=True, exist_ok=True)
    for spec, array in zip(info.files, arrays.values(), strict=True):
        raw = idx_bytes(array)
        if gz:
            (root / spec.gz_name).write_bytes(gzip.compress(raw, mtime=0))
        else:
            (root / spec.name).write_bytes(raw)
    return info


@pytest.mark.parametrize("gz", [True, False])
def test_load_tiny_dataset_gz_and_raw(tmp_path: Path, gz: bool) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays, gz=gz)
    out = load_dataset(info, tmp_path, download=False)
    assert out.train_images.dtype == torch.uint8 and out.train_images.shape == (N_TRAIN, 28, 28)
    assert out.train_labels.dtype == torch.int64 and out.test_labels.shape == (N_TEST,)
    assert np.array_equal(out.train_images.numpy(), arrays["train_images"])
    assert np.array_equal(out.test_images.numpy(), arrays["test_images"])
    assert out.test_labels.tolist() == [9, 0, 4]
    assert out.spec == DataSpec(channels=1, size=28, num_classes=10)


def test_load_is_cached_and_rereads_changed_files(tmp_path: Path) -> None:
    info = write_files(tmp_path, tiny_arrays())
    first = load_dataset(info, tmp_path, download=False)
    assert load_dataset(info, tmp_path, download=False) is first
    path = tmp_path / info.test_labels.gz_name
    os.utime(path, ns=(0, 123456789))  # same bytes, new mtime -> re-read
    assert load_dataset(info, tmp_path, download=False) is not first


def test_gz_preferred_over_raw(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays, gz=True)
    (tmp_path / info.train_labels.name).write_bytes(b"garbage")  # ignored: .gz wins
    out = load_dataset(info, tmp_path, download=False)
    assert out.train_labels.tolist() == [0, 1, 2, 3, 4]


def test_recompressed_gz_accepted_by_content_md5(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays)
    spec = info.test_images
    raw = idx_bytes(arrays["test_images"])
    (tmp_path / spec.gz_name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=7))
    assert np.array_equal(read_idx_file(tmp_path / spec.gz_name, spec), arrays["test_images"])


# ----------------------------------------------------------------------------- corruption


def _corrupt(tmp_path: Path, case: str) -> tuple[DatasetInfo, str, list[str]]:
    """Write tiny files, damage one per ``case``; return info, damaged name, expected phrases."""
    arrays = tiny_arrays()
    gz = case != "truncated_raw"
    info = write_files(tmp_path, arrays, gz=gz)
    spec = info.train_images
    path = tmp_path / (spec.gz_name if gz else spec.name)
    raw = idx_bytes(arrays["train_images"])
    if case == "missing":
        path.unlink()
        return info, spec.gz_name, ["missing", "downloads disabled", "--data-dir", "TINY_DIR"]
    if case == "truncated_raw":
        path.write_bytes(raw[:-100])
        return info, path.name, ["truncated", f"expected {len(raw)} bytes"]
    if case == "truncated_gz":
        path.write_bytes(path.read_bytes()[:-40])
        return info, path.name, ["gzip", "truncated"]
    if case == "magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
        return info, path.name, ["magic", "expected 0x00000803", "found 0x00000801"]
    if case == "dims":
        bad = np.zeros((N_TRAIN, 28, 27), np.uint8)
        path.write_bytes(gzip.compress(idx_bytes(bad)))
        return info, path.name, ["dimensions", "expected 28x28", "found 28x27"]
    if case == "count":
        path.write_bytes(gzip.compress(idx_bytes(arrays["train_images"][:4])))
        return info, path.name, ["count", f"expected {N_TRAIN}", "header says 4"]
    if case == "trailing":
        path.write_bytes(gzip.compress(raw + b"\x00"))
        return info, path.name, ["wrong size", f"expected {len(raw)} bytes"]
    if case == "md5":
        changed = arrays["train_images"].copy()
        changed[0, 0, 0] ^= 1
        path.write_bytes(gzip.compress(idx_bytes(changed)))
        return info, path.name, ["MD5 mismatch", spec.gz_md5, spec.raw_md5]
    if case == "labels":
        spec = info.test_labels
        bad = np.array([1, 10, 2], np.uint8)
        info = dataclasses.replace(
            info,
            test_labels=dataclasses.replace(spec, raw_md5=hashlib.md5(idx_bytes(bad)).hexdigest()),
        )
        (tmp_path / spec.gz_name).write_bytes(gzip.compress(idx_bytes(bad)))
        return info, spec.gz_name, ["labels out of range", "expected 0..9"]
    raise AssertionError(case)


CASES = ["missing", "truncated_raw", "truncated_gz", "magic", "dims", "count", "trailing"]


@pytest.mark.parametrize("case", [*CASES, "md5", "labels"])
def test_corrupt_files_give_clear_errors(tmp_path: Path, case: str) -> None:
    info, name, phrases = _corrupt(tmp_path, case)
    with pytest.raises(DataError) as excinfo:
        load_dataset(info, tmp_path, download=False)
    message = str(excinfo.value)
    assert name in message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    if case != "missing":
        assert "delete this file" in message and "TINY_DIR" in message


def test_raw_file_with_wrong_md5(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays, gz=False)
    spec = dataclasses.replace(info.train_labels, raw_md5="0" * 32)
    with pytest.raises(DataError, match=f"MD5 mismatch: expected {'0' * 32}"):
        read_idx_file(tmp_path / spec.name, spec)


def test_raw_file_without_known_md5_checked_by_structure(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays, gz=False)
    spec = dataclasses.replace(info.train_labels, raw_md5=None)
    assert read_idx_file(tmp_path / spec.name, spec).tolist() == [0, 1, 2, 3, 4]


def test_tiny_header_is_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "x-idx"
    path.write_bytes(b"\x00\x00")
    spec = IdxFile("x-idx", "labels", 3, gz_md5="0" * 32)
    with pytest.raises(DataError, match="truncated: 2 bytes"):
        read_idx_file(path, spec)


# ----------------------------------------------------------------------------- download


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        mode, body = self.routes.get(self.path, ("404", b""))
        if mode == "404":
            self.send_error(404)
            return
        self.send_response(200)
        extra = 1000 if mode == "die" else 0
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "die" else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    _Handler.routes = {}


def _serve(arrays: dict[str, np.ndarray], info: DatasetInfo, prefix: str, mode: str) -> None:
    for spec, array in zip(info.files, arrays.values(), strict=True):
        body = gzip.compress(idx_bytes(array), mtime=0)
        if mode == "bad":
            body = gzip.compress(idx_bytes(array), mtime=1)  # valid gzip, wrong MD5
        _Handler.routes[f"/{prefix}/{spec.gz_name}"] = (mode if mode != "bad" else "ok", body)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_success_then_load(tmp_path: Path, server: str) -> None:
    arrays = tiny_arrays()
    info = tiny_info(arrays, mirrors=(f"{server}/good/",))
    _serve(arrays, info, "good", "ok")
    out = load_dataset(info, tmp_path / "d")
    assert np.array_equal(out.train_images.numpy(), arrays["train_images"])
    assert _leftovers(tmp_path / "d") == sorted(s.gz_name for s in info.files)


def test_dying_mirror_then_good_mirror(tmp_path: Path, server: str) -> None:
    arrays = tiny_arrays()
    info = tiny_info(arrays)
    _serve(arrays, info, "dies", "die")
    _serve(arrays, info, "good", "ok")
    root = download_dataset(info, tmp_path, mirrors=[f"{server}/dies", f"{server}/good"])
    assert _leftovers(root) == sorted(s.gz_name for s in info.files)
    assert load_dataset(info, root, download=False).test_labels.tolist() == [9, 0, 4]


@pytest.mark.parametrize("mode", ["die", "bad", "404"])
def test_failed_download_leaves_no_file(tmp_path: Path, server: str, mode: str) -> None:
    arrays = tiny_arrays()
    info = tiny_info(arrays)
    _serve(arrays, info, "m", mode)
    with socket.socket() as closed:  # bound but not listening: connection refused
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        with pytest.raises(DataError) as excinfo:
            download_dataset(info, tmp_path, mirrors=[f"{server}/m/", dead], progress=False)
    message = str(excinfo.value)
    first = info.train_images.gz_name
    assert f"{server}/m/{first}" in message and f"{dead}{first}" in message
    expected_reason = {"die": "bytes", "bad": "MD5 mismatch", "404": "404"}[mode]
    assert expected_reason in message
    assert "offline" in message and str(tmp_path) in message
    assert _leftovers(tmp_path) == []  # no final file, no temp file


def test_download_keeps_existing_files(tmp_path: Path, server: str) -> None:
    arrays = tiny_arrays()
    info = write_files(tmp_path, arrays)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    download_dataset(info, tmp_path, mirrors=[f"{server}/nothing/"])  # nothing to fetch
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


# ----------------------------------------------------------------------------- table, dirs


def test_dataset_table() -> None:
    assert set(DATASETS) == {"mnist", "fashion_mnist", "kmnist", "synthetic"}
    for name, info in DATASETS.items():
        assert info.name == name and info.num_classes == 10
        assert all(len(s.gz_md5) == 32 for s in info.files)
        downloaded = name != "synthetic"
        assert bool(info.mirrors) is downloaded and (info.generator is None) is downloaded
        counts = [60000, 60000, 10000, 10000] if downloaded else [600, 600, 100, 100]
        assert [s.count for s in info.files] == counts
    assert {n for n, i in DATASETS.items() if i.evaluator} == {"mnist", "synthetic"}
    mnist = DATASETS["mnist"]
    assert mnist.train_images.gz_name == "train-images-idx3-ubyte.gz"
    assert mnist.train_images.raw_md5 == "6bbc9ace898e44ae57da46a324031adb"
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert DATASETS["fashion_mnist"].classes[-1] == "Ankle boot"
    with pytest.raises(ValueError, match="allowed: mnist, fashion_mnist, kmnist, synthetic$"):
        get_dataset_info("cifar10")


def test_mnist_gz_md5s_match_shared_md5sums() -> None:
    md5sums = Path("/work/shared/data/mnist/MD5SUMS")
    if not md5sums.exists():
        pytest.skip("no shared MD5SUMS")
    listed = dict(reversed(line.split()) for line in md5sums.read_text().splitlines())
    assert {s.gz_name: s.gz_md5 for s in DATASETS["mnist"].files} == listed


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("KMNIST_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(None, "kmnist") == tmp_path / "home/.cache/mnistdiff/kmnist"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "f"))
    assert resolve_data_dir(None, "fashion_mnist") == tmp_path / "f"
    monkeypatch.delenv("MNIST_DIR")
    assert resolve_data_dir(None) == tmp_path / "home/.cache/mnistdiff/mnist"


# ----------------------------------------------------------------------------- synthetic digits


def test_synthetic_files_are_official_idx_with_pinned_md5s(synthetic_data: str) -> None:
    root = Path(synthetic_data)
    info = DATASETS["synthetic"]
    assert sorted(p.name for p in root.iterdir()) == sorted(s.gz_name for s in info.files)
    for spec in info.files:
        stored = (root / spec.gz_name).read_bytes()
        raw = gzip.decompress(stored)
        magic = 0x00000803 if spec.kind == "images" else 0x00000801
        assert int.from_bytes(raw[:4], "big") == magic
        assert int.from_bytes(raw[4:8], "big") == spec.count
        assert hashlib.md5(raw).hexdigest() == spec.raw_md5  # same bytes on every machine
    out = load_dataset("synthetic", root, download=False)
    assert out.train_images.shape == (600, 28, 28) and out.test_images.shape == (100, 28, 28)
    assert out.train_labels.bincount().tolist() == [60] * 10
    assert out.test_labels.bincount().tolist() == [10] * 10
    assert out.spec == DataSpec(channels=1, size=28, num_classes=10)


def test_synthetic_digits_are_learnable_and_varied(synthetic_data: str) -> None:
    """Nearest class mean (fit on train) names test digits far above chance (10%; jitter in
    position, size and slant keeps it from being trivial); no two images are equal."""
    out = load_dataset("synthetic", synthetic_data, download=False)
    x = out.train_images.flatten(1).double()
    means = torch.stack([x[out.train_labels == c].mean(0) for c in range(10)])
    test = out.test_images.flatten(1).double()
    predicted = torch.cdist(test, means).argmin(1)
    assert float((predicted == out.test_labels).double().mean()) > 0.5
    assert len(torch.unique(out.train_images.flatten(1), dim=0)) == 600
    assert 0 < int(out.train_images.max()) <= 255 and int(out.train_images.min()) == 0


def test_synthetic_is_generated_on_demand_and_verified(tmp_path: Path) -> None:
    out = load_dataset("synthetic", tmp_path / "gen")  # "download" writes it locally
    assert len(out.train_labels) == 600
    path = tmp_path / "gen" / DATASETS["synthetic"].train_images.gz_name
    images, _ = synthetic.synthetic_arrays("train")
    images[0, 14, 14] ^= 1  # one pixel off: a valid file that is not the synthetic set
    path.write_bytes(gzip.compress(idx_bytes(images)))
    with pytest.raises(DataError, match="MD5 mismatch") as info:
        load_dataset("synthetic", tmp_path / "gen", download=False)
    assert path.name in str(info.value) and "SYNTHETIC_DIR" in str(info.value)
    with pytest.raises(ValueError, match="allowed: train, test"):
        synthetic.synthetic_arrays("val")


def test_generation_into_unwritable_folder_is_clear(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot create data folder"):
        load_dataset("synthetic", blocker / "sub")


# ----------------------------------------------------------------------------- real data


def test_real_mnist() -> None:
    if not os.environ.get("MNIST_DIR"):
        pytest.skip("MNIST_DIR not set")
    out = load_dataset("mnist", download=False)
    assert out.train_images.shape == (60000, 28, 28) and out.test_images.shape == (10000, 28, 28)
    assert out.train_images.dtype == torch.uint8 and out.train_labels.dtype == torch.int64
    assert out.train_labels.shape == (60000,) and out.test_labels.shape == (10000,)
    hist = torch.bincount(out.train_labels, minlength=10)
    assert len(hist) == 10 and bool(((hist >= 5000) & (hist <= 7000)).all())
    assert int(out.train_images.min()) == 0 and int(out.train_images.max()) == 255
    stats = dataset_stats(out)
    assert stats["train"]["label_hist"] == hist.tolist()
    assert abs(stats["train"]["pixel_mean_01"] - 0.1307) < 1e-3
    assert abs(stats["train"]["pixel_std_pm1"] - 0.6162) < 1e-3


# ----------------------------------------------------------------------------- spec, transforms


def test_dataspec_round_trip_and_validation() -> None:
    spec = DataSpec(channels=1, size=32, num_classes=10)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown DataSpec keys \\['colour'\\]"):
        DataSpec.from_dict({"colour": 3})
    with pytest.raises(ValueError, match="size must be a positive int"):
        DataSpec.from_dict({"size": 0})


def test_model_range_round_trip_all_values() -> None:
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_model_range(u8)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(from_model_range(x), u8)
    assert torch.equal(from_model_range(torch.tensor([[[-3.0, 3.0]]])), torch.tensor([[[0, 255]]]))
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(x)
    with pytest.raises(ValueError, match="NaN"):
        from_model_range(torch.full((1, 1, 2, 2), float("nan")))


def test_pad_to() -> None:
    x = torch.ones(2, 1, 28, 28)
    y = pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32)
    assert torch.equal(y[:, :, 2:30, 2:30], x)
    assert float(y.sum()) == 2 * (28 * 28 - (32 * 32 - 28 * 28))  # border is -1
    assert from_model_range(y)[0, 0, 0] == 0  # black background
    with pytest.raises(ValueError, match="smaller"):
        pad_to(x, 27)


def test_crop_to_undoes_pad_to_and_original_size() -> None:
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(crop_to(pad_to(x, 32), 28), x)
    assert crop_to(x, 28) is x
    padded, plain = types.SimpleNamespace(pad_to_32=True), types.SimpleNamespace(pad_to_32=False)
    assert original_size(DataSpec(size=32), padded) == 28
    assert original_size(DataSpec(size=28), plain) == 28


def test_dataset_stats_analytic() -> None:
    images = torch.tensor([[[0, 255]], [[0, 255]]], dtype=torch.uint8)  # half black, half white
    labels = torch.tensor([1, 1])
    arrays = MnistArrays(images, labels, images, labels, DataSpec(size=2, num_classes=3))
    stats = dataset_stats(arrays)["train"]
    assert stats["count"] == 2 and stats["label_hist"] == [0, 2, 0]
    assert stats["pixel_mean_01"] == pytest.approx(0.5) and stats["pixel_std_01"] == 0.5
    assert stats["pixel_mean_pm1"] == pytest.approx(0.0) and stats["pixel_std_pm1"] == 1.0


# ----------------------------------------------------------------------------- split, batches


def test_train_val_split() -> None:
    train, val = train_val_split(100, 10, seed=3)
    assert len(train) == 90 and len(val) == 10 and train.dtype == torch.int64
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    again = train_val_split(100, 10, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(train_val_split(100, 10, seed=4)[1], val)
    train0, val0 = train_val_split(7, 0, seed=0)
    assert torch.equal(train0, torch.arange(7)) and len(val0) == 0
    with pytest.raises(ValueError, match="val_size must be an int in \\[0, 99\\]"):
        train_val_split(100, 100, seed=0)


def test_step_seeds_depend_on_seed_step_and_rank_only() -> None:
    seeds = {seed_for(s, step, r) for s in (0, 1) for step in (-1, 0, 1, 2) for r in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 - 1 for s in seeds)
    assert seed_for(3, 7, 1) == seed_for(3, 7, 1)
    a = torch.rand(5, generator=step_generator(3, 7))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 7)))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(3, 8)))


def _epoch(it: BatchIterator) -> list[list[int]]:
    return [b.tolist() for b in it]


def test_batches_seeded_and_cover_each_index_once() -> None:
    a, b = BatchIterator(23, 4, seed=7), BatchIterator(23, 4, seed=7)
    assert a.batches_per_epoch == 5 and len(a) == 5
    e0 = _epoch(a)
    assert e0 == _epoch(b) and a.epoch == 1 and a.position == 0
    flat = sorted(i for batch in e0 for i in batch)
    assert len(flat) == 20 and len(set(flat)) == 20  # drop_last: 3 examples dropped
    e1 = _epoch(a)
    assert e1 != e0
    full = BatchIterator(23, 4, seed=7, drop_last=False)
    epoch = _epoch(full)
    assert [len(x) for x in epoch] == [4, 4, 4, 4, 4, 3]
    assert sorted(i for x in epoch for i in x) == list(range(23))
    assert _epoch(BatchIterator(23, 4, seed=8)) != e0


def test_next_batch_rolls_over_and_resumes_exactly() -> None:
    ref = BatchIterator(50, 8, seed=1)
    stream = [ref.next_batch().tolist() for _ in range(15)]  # 6 per epoch: crosses 2 epochs
    it = BatchIterator(50, 8, seed=1)
    for _ in range(9):
        it.next_batch()
    state = it.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 1, "batch_size": 8}
    resumed = BatchIterator(50, 8, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().tolist() for _ in range(6)] == stream[9:]
    with pytest.raises(ValueError, match="saved seed=1"):
        BatchIterator(50, 8, seed=2).load_state_dict(state)


def test_rank_shards_and_world_size_change() -> None:
    ref = BatchIterator(40, 8, seed=5)
    globals_ = [ref.next_batch().tolist() for _ in range(6)]
    ranks = [BatchIterator(40, 8, seed=5, rank=r, world_size=4) for r in range(4)]
    for g in globals_[:3]:
        shards = [it.next_batch().tolist() for it in ranks]
        assert all(len(s) == 2 for s in shards)
        assert sum(shards, []) == g  # contiguous slices, disjoint, union = global batch
    state = ranks[0].state_dict()
    two = [BatchIterator(40, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for it in two:
        it.load_state_dict(state)
    for g in globals_[3:]:
        assert sum((it.next_batch().tolist() for it in two), []) == g


def test_batch_iterator_validation() -> None:
    with pytest.raises(ValueError, match="divisible by world_size 3"):
        BatchIterator(100, 8, seed=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be an int in \\[0, 1\\]"):
        BatchIterator(100, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int in \\[1, 10\\]"):
        BatchIterator(10, 16, seed=0)
