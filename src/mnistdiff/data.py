"""A verified dataset in memory: ``load_dataset`` -> uint8 tensors + ``DataSpec``; statistics.

Where files live and what they must contain is in :mod:`mnistdiff.datasets`, the file format
and its checks in :mod:`mnistdiff.idx`, fetching in :mod:`mnistdiff.download`. Every file is
verified on every (uncached) load, whether it was downloaded, copied or generated.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .datasets import (
    DatasetInfo,
    find_missing_files,
    fix_hint,
    get_dataset_info,
    locate,
    resolve_data_dir,
)
from .download import download_dataset
from .idx import DataError, read_idx_file

__all__ = ["DataSpec", "MnistArrays", "dataset_stats", "load_dataset"]


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
    hint = fix_hint(info)
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
    """Load (downloading or generating missing files if allowed) and verify a whole dataset.

    Results are cached in-process per folder and dataset; a file changed on disk is re-read.

    Args:
        dataset: A name in :data:`mnistdiff.datasets.DATASETS` (``"mnist"``,
            ``"fashion_mnist"``, ``"kmnist"``, ``"synthetic"``) or a custom DatasetInfo.
        data_dir: Data folder; None means ``<NAME>_DIR`` env var, else the user cache.
        download: Fetch missing files; if False, missing files are an error.

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
            f"(data.download: true), or {fix_hint(info)}."
        )
    paths = []
    for spec in info.files:
        path = locate(root, spec)
        if path is None:  # removed while we were working
            raise DataError(f"{root / spec.gz_name}: file disappeared; {fix_hint(info)}")
        paths.append(path)
    signature = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_cached(tuple(paths), info, signature)


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
