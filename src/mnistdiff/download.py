"""Fetch the missing files of a dataset: mirrored, MD5-checked, atomic downloads.

Each file is tried on every mirror in turn; it is streamed to a temporary file and only renamed
to its final name once complete and verified, so a failed or interrupted download never leaves
a file under its final name. A dataset made locally (the synthetic digits) is generated instead;
its files are verified on loading like downloaded ones.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .atomic import atomic_path
from .datasets import DatasetInfo, find_missing_files, fix_hint, get_dataset_info
from .idx import DataError, IdxFile

__all__ = ["download_dataset"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


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
        f"If this machine is offline, copy the official files into {root}, or {fix_hint(info)}."
    )


def download_dataset(
    dataset: str | DatasetInfo,
    root: str | os.PathLike,
    *,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download (or, for a generated dataset, write) the missing files of ``dataset``.

    Args:
        dataset: Dataset name or info.
        root: Destination folder (created if needed).
        mirrors: Base URLs to try instead of the dataset's own mirrors (downloads only).
        progress: Show a progress bar (only when stderr is a terminal).
        timeout: Socket timeout in seconds for each connection and read.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: if the folder cannot be created or some file could not be fetched from
            any mirror.
    """
    info = get_dataset_info(dataset)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create data folder {root} ({err}); {fix_hint(info)}") from None
    missing = find_missing_files(info, root)
    if missing and info.generator is not None and mirrors is None:
        log.info("generating %s into %s", info.name, root)
        try:
            info.generator(root, {spec.gz_name for spec in missing})
        except OSError as err:
            raise DataError(
                f"cannot write {info.name} into {root} ({err}); {fix_hint(info)}"
            ) from None
        return root
    mirrors = info.mirrors if mirrors is None else tuple(mirrors)
    for spec in missing:
        _download_file(spec, root, mirrors, info, progress=progress, timeout=timeout)
    return root
