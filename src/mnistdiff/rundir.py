"""Run-directory ownership: one writing ``train`` process per run directory, no stale litter.

:func:`lock_run_dir` takes an exclusive ``fcntl.flock`` on ``<run_dir>/.train.lock`` for as
long as a ``train`` process writes there. The kernel releases a flock when its process ends, so
the lock of a crashed (even ``kill -9``-ed) holder is stale at once and needs no clean-up; a
second writer is refused with the holder's PID. :func:`remove_stale_temps` then deletes the
temporary files of writes that such a crash interrupted (``.last.pt.<random>.tmp`` …): with the
lock held, no other process can be writing them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".train.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock errors of lockless mounts

# Temporary files of the atomic writes ``train`` makes (``atomic.atomic_path`` names a temp
# ``.<target name>.<random>.tmp`` beside its target), relative to the run directory.
TRAIN_TEMP_PATTERNS = (
    "checkpoints/.step_*.pt.*.tmp",
    "checkpoints/.last.pt.*.tmp",
    "checkpoints/.best.pt.*.tmp",
    ".metrics.jsonl.*.tmp",
    ".config.yaml.*.tmp",
    ".loss_curves.png.*.tmp",
    "samples/.samples_epoch_*.png.*.tmp",
)


class RunDirBusyError(RuntimeError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (created if missing) for the ``with`` body.

    The lock file keeps the holder's PID for the message a refused writer prints. It is
    released when the body ends, and by the kernel if the process dies.

    Raises:
        RunDirBusyError: another process holds the lock (the message names the run directory
            and that process's PID).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _try_lock(fd, run_dir)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_lock(fd: int, run_dir: Path) -> bool:
    """Lock ``fd`` exclusively; False (with a warning) on a file system without locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
        warnings.warn(f"{run_dir}: cannot lock the run directory ({exc})", stacklevel=4)
        return False
    raise RunDirBusyError(
        f"run directory {run_dir} is in use by another train process (PID {holder}); "
        "wait for it to finish (or stop it), or choose another --run-dir"
    )


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by interrupted writes of ``train``; return their paths.

    Call only while holding :func:`lock_run_dir`: then no live process is writing them.
    """
    run_dir = Path(run_dir)
    removed = []
    for pattern in TRAIN_TEMP_PATTERNS:
        for path in sorted(run_dir.glob(pattern)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
