"""The IDX file format of MNIST-family datasets: verified reading and writing.

Every file is checked (magic number, dimensions, counts, exact size, MD5 against the expected
value) and any problem raises :class:`DataError` with a message that names the file, what was
expected, what was found and how to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "DataError", "IdxFile", "idx_bytes", "read_idx_file"]

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

_Fail = Callable[[str], Exception]


class DataError(Exception):
    """A data file is missing, corrupt, or could not be downloaded."""


@dataclass(frozen=True)
class IdxFile:
    """One IDX file of a dataset, as the dataset's table describes it.

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


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array ``[N]`` (labels) or ``[N, H, W]`` (images) as IDX.

    Raises:
        ValueError: if the array is not uint8 or has another number of dimensions.
    """
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(
            f"IDX arrays must be uint8 [N] or [N,H,W], got {array.dtype} {array.shape}"
        )
    magic = LABELS_MAGIC if array.ndim == 1 else IMAGES_MAGIC
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    return header + np.ascontiguousarray(array).tobytes()


def _read_bytes(path: Path, fail: _Fail) -> tuple[bytes, bytes]:
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
    data: bytes, spec: IdxFile, image_size: int, fail: _Fail
) -> tuple[int, tuple[int, ...]]:
    """Validate the IDX header and size; return (header length, array shape)."""
    is_images = spec.kind == "images"
    header_len = 16 if is_images else 8
    if len(data) < header_len:
        raise fail(f"file is truncated: {len(data)} bytes, less than its {header_len}-byte header")
    words = [int.from_bytes(data[i : i + 4], "big") for i in range(0, header_len, 4)]
    magic, count = words[0], words[1]
    want_magic = IMAGES_MAGIC if is_images else LABELS_MAGIC
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


def _check_md5(path: Path, stored: bytes, content: bytes, spec: IdxFile, fail: _Fail) -> None:
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
        return DataError(
            f"{path}: {problem}. To fix: delete this file and run again to re-download it, "
            f"or {hint}."
        )

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
