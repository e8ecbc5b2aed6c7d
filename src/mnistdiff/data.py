"""MNIST-family data: verified IDX reading, verified download, in-memory tensors, seeded batches.

Every file is checked (magic number, dimensions, counts, exact size, MD5 against the official
value) and any problem raises :class:`DataError` with a message that names the file, what was
expected, what was found and how to fix it. Downloads try each mirror in turn and are written
atomically, so a failed or interrupted download never leaves a file under its final name.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mnistdiff.atomic import atomic_path

__all__ = [
    "DATASETS",
    "BatchIterator",
    "DataError",
    "DataSpec",
    "DatasetInfo",
    "IdxFile",
    "MnistArrays",
    "dataset_stats",
    "download_dataset",
    "find_missing_files",
    "from_model_range",
    "get_dataset_info",
    "load_dataset",
    "pad_to",
    "read_idx_file",
    "resolve_data_dir",
    "to_model_range",
    "train_val_split",
]

log = logging.getLogger(__name__)

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_CHUNK = 1 << 20


class DataError(Exception):
    """A data file is missing, corrupt, or could not be downloaded."""


# ----------------------------------------------------------------------------- dataset table


@dataclass(frozen=True)
class IdxFile:
    """One official IDX file of a dataset.

    Attributes:
        name: Uncompressed file name; the gzipped file is ``name + ".gz"``.
        kind: ``"images"`` or ``"labels"``.
        count: Expected number of examples.
        gz_md5: Official MD5 of the ``.gz`` file.
        raw_md5: MD5 of the uncompressed file, where known (else raw files are checked by
            structure only).
    """

    name: str
    kind: Literal["images", "labels"]
    count: int
    gz_md5: str
    raw_md5: str | None = None

    @property
    def gz_name(self) -> str:
        """File name of the gzipped file."""
        return self.name + ".gz"


@dataclass(frozen=True)
class DatasetInfo:
    """Everything needed to find, download and verify one MNIST-family dataset."""

    name: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    image_size: int = 28

    @property
    def files(self) -> tuple[IdxFile, IdxFile, IdxFile, IdxFile]:
        """The four files in order: train images, train labels, test images, test labels."""
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)

    @property
    def env_var(self) -> str:
        """Environment variable naming the data folder, e.g. ``MNIST_DIR``."""
        return f"{self.name.upper()}_DIR"

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)


def _standard_files(
    gz_md5: Sequence[str], raw_md5: Sequence[str | None] = (None,) * 4
) -> dict[str, IdxFile]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    kinds = ("images", "labels", "images", "labels")
    counts = (60000, 60000, 10000, 10000)
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    rows = zip(keys, names, kinds, counts, gz_md5, raw_md5, strict=True)
    return {key: IdxFile(name, kind, count, gz, raw) for key, name, kind, count, gz, raw in rows}


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        **_standard_files(
            gz_md5=(
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
            raw_md5=(
                "6bbc9ace898e44ae57da46a324031adb",
                "a25bea736e30d166cdddb491f175f624",
                "2646ac647ad5339dbf082846283269ea",
                "27ae3e4e09519cfbb04c329615203637",
            ),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        **_standard_files(
            gz_md5=(
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "kmnist": DatasetInfo(
        name="kmnist",
        **_standard_files(
            gz_md5=(
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            )
        ),
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def get_dataset_info(dataset: str | DatasetInfo) -> DatasetInfo:
    """Return the table entry for ``dataset`` (a name in :data:`DATASETS` or a DatasetInfo)."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[dataset]


# ----------------------------------------------------------------------------- locations


def resolve_data_dir(
    data_dir: str | os.PathLike | None, dataset: str | DatasetInfo = "mnist"
) -> Path:
    """Pick the data folder: explicit argument > ``<NAME>_DIR`` env var > user cache.

    The env var is ``MNIST_DIR`` for MNIST, ``FASHION_MNIST_DIR`` and ``KMNIST_DIR`` for the
    others; the fallback is ``~/.cache/mnistdiff/<dataset>``.

    Args:
        data_dir: Folder given by the user (``--data-dir``), or None.
        dataset: Dataset name or info.

    Returns:
        The folder (``~`` expanded); it need not exist yet.
    """
    info = get_dataset_info(dataset)
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(info.env_var, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mnistdiff" / info.name


def _locate(root: Path, spec: IdxFile) -> Path | None:
    """Return the file for ``spec`` in ``root``, preferring the ``.gz`` name, else None."""
    for name in (spec.gz_name, spec.name):
        try:
            if (root / name).is_file():
                return root / name
        except PermissionError as err:  # e.g. a folder without read/search permission
            raise DataError(
                f"{root}: cannot read the data folder ({err.strerror}); make it readable "
                "(chmod u+rx) or point --data-dir elsewhere"
            ) from None
    return None


def find_missing_files(dataset: str | DatasetInfo, root: str | os.PathLike) -> list[IdxFile]:
    """Return the files of ``dataset`` present in ``root`` neither gzipped nor raw."""
    info = get_dataset_info(dataset)
    return [spec for spec in info.files if _locate(Path(root), spec) is None]


def _fix_hint(info: DatasetInfo) -> str:
    names = ", ".join(spec.gz_name for spec in info.files)
    return (
        f"point --data-dir (or {info.env_var}) at a folder holding the official files "
        f"({names}; gzipped or uncompressed)"
    )


# ----------------------------------------------------------------------------- IDX reading


def _bad_file(path: Path, problem: str, info_hint: str) -> DataError:
    return DataError(
        f"{path}: {problem}. To fix: delete this file and run again to re-download it, "
        f"or {info_hint}."
    )


def _read_bytes(path: Path, fail: Any) -> tuple[bytes, bytes]:
    """Return (file bytes, content), gunzipping ``.gz`` files; clean error on a corrupt stream."""
    try:
        stored = path.read_bytes()
    except OSError as err:
        raise fail(f"cannot read the file ({err})") from None
    if path.suffix != ".gz":
        return stored, stored
    try:
        return stored, gzip.decompress(stored)
    except (EOFError, OSError, zlib.error) as err:
        raise fail(f"gzip data is truncated or corrupt ({err})") from None


def _check_structure(
    data: bytes, spec: IdxFile, image_size: int, fail: Any
) -> tuple[int, tuple[int, ...]]:
    """Validate the IDX header and size; return (header length, array shape)."""
    is_images = spec.kind == "images"
    header_len = 16 if is_images else 8
    if len(data) < header_len:
        raise fail(f"file is truncated: {len(data)} bytes, less than its {header_len}-byte header")
    words = [int.from_bytes(data[i : i + 4], "big") for i in range(0, header_len, 4)]
    magic, count = words[0], words[1]
    want_magic = _IMAGES_MAGIC if is_images else _LABELS_MAGIC
    if magic != want_magic:
        raise fail(
            f"wrong magic number: expected 0x{want_magic:08x} ({spec.kind} file), "
            f"found 0x{magic:08x}"
        )
    if is_images and (words[2], words[3]) != (image_size, image_size):
        raise fail(
            f"wrong image dimensions: expected {image_size}x{image_size}, "
            f"found {words[2]}x{words[3]}"
        )
    if count != spec.count:
        raise fail(f"count mismatch: expected {spec.count} {spec.kind}, header says {count}")
    shape = (count, image_size, image_size) if is_images else (count,)
    want_len = header_len + int(np.prod(shape))
    if len(data) < want_len:
        raise fail(f"file is truncated: expected {want_len} bytes, found {len(data)}")
    if len(data) > want_len:
        raise fail(f"wrong size: expected {want_len} bytes, found {len(data)} (trailing data)")
    return header_len, shape


def _check_md5(path: Path, stored: bytes, content: bytes, spec: IdxFile, fail: Any) -> None:
    """Compare against the official MD5 of the .gz file, or of the uncompressed content.

    A gzipped file whose content has the official raw MD5 is accepted (re-compressed copy).
    A raw file with no known raw MD5 is accepted on structure alone.
    """
    is_gz = path.suffix == ".gz"
    gz_md5 = hashlib.md5(stored).hexdigest() if is_gz else None
    if gz_md5 is not None and gz_md5 == spec.gz_md5:
        return
    if spec.raw_md5 is None and not is_gz:
        return
    raw_md5 = hashlib.md5(content).hexdigest()
    if raw_md5 == spec.raw_md5:
        return
    if is_gz:
        alt = f" (or content MD5 {spec.raw_md5})" if spec.raw_md5 else ""
        found = f"{gz_md5} (content MD5 {raw_md5})"
        raise fail(f"MD5 mismatch: expected {spec.gz_md5}{alt}, found {found}")
    raise fail(f"MD5 mismatch: expected {spec.raw_md5}, found {raw_md5}")


def read_idx_file(
    path: str | os.PathLike,
    spec: IdxFile,
    *,
    image_size: int = 28,
    num_classes: int = 10,
    hint: str | None = None,
) -> np.ndarray:
    """Read and fully verify one IDX file (gzipped if its name ends in ``.gz``).

    Args:
        path: File to read.
        spec: Expected kind, count and MD5s.
        image_size: Expected height and width of images.
        num_classes: Labels must lie in ``0 .. num_classes - 1``.
        hint: How to fix a bad file (appended to error messages).

    Returns:
        uint8 array ``[count, image_size, image_size]`` (images) or ``[count]`` (labels).

    Raises:
        DataError: on any read, structure, checksum or label-range problem.
    """
    path = Path(path)
    hint = hint or "point --data-dir (or MNIST_DIR) at a folder holding the official files"

    def fail(problem: str) -> DataError:
        return _bad_file(path, problem, hint)

    stored, data = _read_bytes(path, fail)
    offset, shape = _check_structure(data, spec, image_size, fail)
    _check_md5(path, stored, data, spec, fail)
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()
    if spec.kind == "labels" and array.size and int(array.max()) >= num_classes:
        bad = int((array >= num_classes).sum())
        raise fail(
            f"labels out of range: expected 0..{num_classes - 1}, found {bad} label(s) "
            f"above {num_classes - 1} (max {int(array.max())})"
        )
    return array


# ----------------------------------------------------------------------------- download


class _DownloadFailed(Exception):
    """One mirror failed for one file (reason in the message)."""


def _fetch(url: str, dest: Path, md5: str, *, progress: bool, timeout: float) -> None:
    """Stream ``url`` to ``dest`` atomically; raise _DownloadFailed unless complete and MD5 ok."""
    request = urllib.request.Request(url, headers={"User-Agent": "mnistdiff"})
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(dest) as tmp:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        digest, received = hashlib.md5(), 0
        show = progress and sys.stderr.isatty()
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not show)
        with bar, tmp.open("wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise _DownloadFailed(f"connection closed after {received} of {total} bytes")
        if digest.hexdigest() != md5:
            raise _DownloadFailed(f"MD5 mismatch: expected {md5}, got {digest.hexdigest()}")


def _download_file(
    spec: IdxFile,
    root: Path,
    mirrors: Sequence[str],
    info: DatasetInfo,
    *,
    progress: bool,
    timeout: float,
) -> Path:
    dest = root / spec.gz_name
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + spec.gz_name
        log.info("downloading %s", url)
        try:
            _fetch(url, dest, spec.gz_md5, progress=progress, timeout=timeout)
            return dest
        except (_DownloadFailed, urllib.error.URLError, http.client.HTTPException) as err:
            reason = str(err) or type(err).__name__
        except (OSError, ValueError) as err:  # timeouts, resets, bad URLs, disk errors
            reason = f"{type(err).__name__}: {err}"
        log.warning("download of %s failed (%s); trying the next mirror", url, reason)
        failures.append(f"  - {url}: {reason}")
    tried = "\n".join(failures) or "  (no mirrors given)"
    raise DataError(
        f"could not download {spec.gz_name} ({info.name}) into {root}. Tried:\n{tried}\n"
        f"If this machine is offline, copy the official files into {root}, or {_fix_hint(info)}."
    )


def download_dataset(
    dataset: str | DatasetInfo,
    root: str | os.PathLike,
    *,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download the missing files of ``dataset`` into ``root``, verifying each MD5.

    Each file is tried on every mirror in order; it is streamed to a temporary file and only
    renamed to its final name once complete and verified.

    Args:
        dataset: Dataset name or info.
        root: Destination folder (created if needed).
        mirrors: Base URLs to try instead of the dataset's own mirrors.
        progress: Show a progress bar (only when stderr is a terminal).
        timeout: Socket timeout in seconds for each connection and read.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: if some file could not be fetched from any mirror.
    """
    info = get_dataset_info(dataset)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create data folder {root} ({err}); {_fix_hint(info)}") from None
    mirrors = info.mirrors if mirrors is None else tuple(mirrors)
    for spec in find_missing_files(info, root):
        _download_file(spec, root, mirrors, info, progress=progress, timeout=timeout)
    return root


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class DataSpec:
    """Shape of the data that models are built for."""

    channels: int = 1
    size: int = 28
    num_classes: int = 10

    def to_dict(self) -> dict[str, int]:
        """Plain dict for configs and checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`; rejects unknown keys and non-positive values."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown DataSpec keys {unknown}; allowed: {allowed}")
        for key, value in d.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataSpec.{key} must be a positive int, got {value!r}")
        return cls(**d)


@dataclass(frozen=True)
class MnistArrays:
    """The whole dataset in memory. Tensors are shared (cached): do not modify them in place.

    Attributes:
        train_images: uint8 ``[N_train, H, W]``.
        train_labels: int64 ``[N_train]``.
        test_images: uint8 ``[N_test, H, W]``.
        test_labels: int64 ``[N_test]``.
        spec: Channels, size and number of classes.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    spec: DataSpec


@functools.lru_cache(maxsize=4)
def _load_cached(
    paths: tuple[Path, ...], info: DatasetInfo, signature: tuple[tuple[int, int], ...]
) -> MnistArrays:
    del signature  # only part of the cache key: a changed file is re-read
    hint = _fix_hint(info)
    arrays = [
        read_idx_file(p, s, image_size=info.image_size, num_classes=info.num_classes, hint=hint)
        for p, s in zip(paths, info.files, strict=True)
    ]
    tensors = [torch.from_numpy(a) for a in arrays]
    return MnistArrays(
        train_images=tensors[0],
        train_labels=tensors[1].long(),
        test_images=tensors[2],
        test_labels=tensors[3].long(),
        spec=DataSpec(channels=1, size=info.image_size, num_classes=info.num_classes),
    )


def load_dataset(
    dataset: str | DatasetInfo = "mnist",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
) -> MnistArrays:
    """Load (downloading missing files if allowed) and verify a whole dataset.

    Results are cached in-process per folder and dataset; a file changed on disk is re-read.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"``, ``"kmnist"`` or a custom DatasetInfo.
        data_dir: Data folder; None means ``<NAME>_DIR`` env var, else the user cache.
        download: Download missing files from the mirrors; if False, missing files are an error.

    Returns:
        The four tensors and the DataSpec.

    Raises:
        DataError: on missing, corrupt or undownloadable files.
    """
    info = get_dataset_info(dataset)
    root = resolve_data_dir(data_dir, info).resolve()
    missing = find_missing_files(info, root)
    if missing and download:
        download_dataset(info, root)
    elif missing:
        names = ", ".join(spec.gz_name for spec in missing)
        raise DataError(
            f"{root}: missing {names} (downloads disabled). To fix: allow downloads "
            f"(data.download: true), or {_fix_hint(info)}."
        )
    paths = []
    for spec in info.files:
        path = _locate(root, spec)
        if path is None:  # removed while we were working
            raise DataError(f"{root / spec.gz_name}: file disappeared; {_fix_hint(info)}")
        paths.append(path)
    signature = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_cached(tuple(paths), info, signature)


# ----------------------------------------------------------------------------- transforms


def to_model_range(images_uint8: Tensor) -> Tensor:
    """Map uint8 images ``[N,H,W]`` or ``[N,1,H,W]`` to float32 ``[N,1,H,W]`` in ``[-1, 1]``."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    if images_uint8.dim() != 4:
        raise ValueError(f"expected [N,H,W] or [N,C,H,W], got shape {tuple(images_uint8.shape)}")
    return images_uint8.float() / 127.5 - 1.0


def pad_to(x: Tensor, size: int, value: float = -1.0) -> Tensor:
    """Pad ``[N,C,H,W]`` images symmetrically to ``size x size`` (default -1 = black).

    Odd padding puts the extra row/column at the bottom/right.
    """
    h, w = x.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"pad_to size {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    pad = (left, size - w - left, top, size - h - top)
    return torch.nn.functional.pad(x, pad, mode="constant", value=value)


def from_model_range(x: Tensor) -> Tensor:
    """Map model-range images ``[N,1,H,W]`` (or ``[N,H,W]``) to uint8 ``[N,H,W]``.

    Values are clamped to ``[-1, 1]`` and rounded; nothing is cropped.

    Raises:
        ValueError: if ``x`` contains NaN (a diverged model), or has more than one channel.
    """
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected [N,1,H,W] or [N,H,W], got shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"images contain {int(torch.isnan(x).sum())} NaN values")
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- splits, batches


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")


def _permutation(n: int, seed: int, stream: int) -> Tensor:
    """Permutation of ``range(n)`` derived only from ``(seed, stream)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    return torch.randperm(n, generator=g)


def train_val_split(num_examples: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic disjoint split of ``range(num_examples)`` into (train, val) indices.

    Both index tensors are int64 and sorted. ``val_size`` 0 gives an empty val set.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("val_size", val_size, 0, num_examples - 1)
    _check_int("seed", seed, 0)
    perm = _permutation(num_examples, seed, stream=-1)  # "epoch -1": never a training epoch
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class BatchIterator:
    """Seeded, resumable, rank-sharded batches of example indices.

    Epoch ``e`` visits ``range(num_examples)`` in a permutation derived only from
    ``(seed, e)``. Global batch ``p`` is ``perm[p*B:(p+1)*B]`` and rank ``r`` of ``W`` takes the
    contiguous slice ``[r*B/W, (r+1)*B/W)`` of it, so the union over ranks is the global batch
    and the order does not depend on the world size. After the last batch of an epoch the
    iterator moves to the next epoch (``position`` 0).

    Args:
        num_examples: Number of examples to index.
        batch_size: Global batch size ``B`` (over all ranks).
        seed: Data-order seed.
        rank: This process's rank.
        world_size: Number of ranks ``W``; must divide ``B``.
        drop_last: Drop the ragged final batch of each epoch (else it is split over ranks as
            evenly as possible).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        _check_int("num_examples", num_examples, 1)
        _check_int("batch_size", batch_size, 1, num_examples if drop_last else None)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0, world_size - 1)
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by world_size {world_size}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        full, ragged = divmod(num_examples, batch_size)
        self.batches_per_epoch = full + (1 if ragged and not drop_last else 0)
        self.epoch = 0
        self.position = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _epoch_perm(self) -> Tensor:
        if self._perm_epoch != self.epoch:
            self._perm = _permutation(self.num_examples, self.seed, stream=self.epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> Tensor:
        """Return this rank's int64 indices for the next batch and advance."""
        b = self.batch_size
        batch = self._epoch_perm()[self.position * b : (self.position + 1) * b]
        if len(batch) == b:
            per_rank = b // self.world_size
            local = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        else:  # ragged final batch (drop_last=False)
            local = torch.tensor_split(batch, self.world_size)[self.rank]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return local.clone()

    def __iter__(self) -> Iterator[Tensor]:
        """Yield the remaining batches of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Position in the data order (independent of rank and world size)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, d: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; seed and global batch size must match."""
        for key in ("seed", "batch_size"):
            if d[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: saved {key}={d[key]} but this iterator has "
                    f"{key}={getattr(self, key)}; the data order would differ"
                )
        _check_int("epoch", d["epoch"], 0)
        _check_int("position", d["position"], 0, self.batches_per_epoch - 1)
        self.epoch, self.position = d["epoch"], d["position"]


# ----------------------------------------------------------------------------- statistics


def _split_stats(images: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    hist = torch.bincount(images.flatten(), minlength=256).double()  # exact pixel histogram
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = hist.sum()
    mean = float((hist * values).sum() / n)
    std = float(((hist * (values - mean) ** 2).sum() / n).sqrt())
    return {
        "count": int(images.shape[0]),
        "label_hist": torch.bincount(labels, minlength=num_classes).tolist(),
        "pixel_mean_01": mean,
        "pixel_std_01": std,
        "pixel_mean_pm1": 2.0 * mean - 1.0,
        "pixel_std_pm1": 2.0 * std,
    }


def dataset_stats(arrays: MnistArrays) -> dict[str, dict[str, Any]]:
    """Counts, label histograms and pixel mean/std (in [0,1] and [-1,1]) of train and test."""
    k = arrays.spec.num_classes
    return {
        "train": _split_stats(arrays.train_images, arrays.train_labels, k),
        "test": _split_stats(arrays.test_images, arrays.test_labels, k),
    }
