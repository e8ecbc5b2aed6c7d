"""Checks of user-given output paths and of free disk space, made before any work starts.

A command that samples for minutes must not fail at its last line because ``--out`` names a
directory, has the wrong extension, or the disk cannot hold the result.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class OutputError(ValueError):
    """An output path or size that cannot work (the message names the flag and the fix)."""


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` (or ``path`` itself) that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | os.PathLike, flag: str, suffix: str) -> Path:
    """Refuse an output file path that cannot be written as a ``suffix`` file.

    Args:
        path: The user's path.
        flag: The option that gave it (named in the message), e.g. ``"--out"``.
        suffix: The required extension, e.g. ``".png"`` (compared case-insensitively).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputError: ``path`` is a directory, has another extension, or an ancestor is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{flag} {path}: is a directory; give a file name, e.g. {path / ('out' + suffix)}"
        )
    if path.suffix.lower() != suffix:
        raise OutputError(
            f"{flag} {path}: the file is written as {suffix[1:].upper()}; "
            f"give a path ending in {suffix}"
        )
    _check_parent(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output directory path that exists as a file (or lies below one).

    Raises:
        OutputError: naming ``flag`` and the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"{flag} {path}: exists and is a file; give a directory path (new or existing)"
        )
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str) -> None:
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, so no directory can be made there")


def free_bytes(path: str | os.PathLike) -> tuple[int, Path]:
    """Free bytes on the file system that would hold ``path``, and the folder measured."""
    where = _existing_ancestor(Path(path))
    return shutil.disk_usage(where).free, where


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
