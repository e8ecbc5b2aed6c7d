"""Sampling straight to disk, batch by batch, so memory stays bounded whatever ``num`` is.

:func:`sample_to_file` generates the same images as :meth:`Pipeline.sample` with the same seed
and batch size (batch ``b`` is seeded by ``(seed, b)``), but holds one batch per process at a
time: each is written to an ``.npz`` as it arrives (:class:`NpzStream`, an uncompressed zip of
``.npy`` members, the layout of ``numpy.savez``), and only the few images a preview grid shows
are kept. Before any work the free disk space is checked against the file's size; after the
first batch the total time is estimated and, if long, printed. An interruption (Ctrl-C or
SIGTERM) leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .atomic import atomic_path
from .distributed import DistContext, gather_rows
from .outputs import OutputError, format_bytes, free_bytes
from .sample import Pipeline

NPZ_OVERHEAD = 4096  # zip headers and .npy headers of the two members, generously
WARN_SECONDS = 600.0  # print the time estimate when sampling will take longer than this
GRID_MAX_IMAGES = 1024  # a preview grid shows at most this many images


def npz_bytes(num: int, image_shape: tuple[int, ...]) -> int:
    """Size in bytes of an ``.npz`` of ``num`` uint8 images and int64 labels."""
    return num * (int(np.prod(image_shape)) + 8) + NPZ_OVERHEAD


def check_npz_fits(path: str | Path, num: int, image_shape: tuple[int, ...]) -> None:
    """Refuse, before any work, an ``.npz`` of ``num`` images larger than the free disk space.

    Raises:
        OutputError: naming ``--num``, the size needed, the space free and how many images fit.
    """
    need = npz_bytes(num, image_shape)
    free, where = free_bytes(path)
    if need > free:
        fit = max(0, npz_max_images(free, image_shape))
        raise OutputError(
            f"--num {num}: --save-npz {path} would need {format_bytes(need)} but only "
            f"{format_bytes(free)} is free at {where}; at most {fit} images fit there "
            "(lower --num or write the .npz elsewhere)"
        )


def npz_max_images(free: int, image_shape: tuple[int, ...]) -> int:
    """How many images an ``.npz`` may hold within ``free`` bytes."""
    return (free - NPZ_OVERHEAD) // (int(np.prod(image_shape)) + 8)


class NpzStream:
    """Write ``images`` uint8 ``[num, *shape]`` and ``labels`` int64 ``[num]`` to an ``.npz``.

    The labels are written when the stream opens; images are appended with :meth:`write` in
    order and must add up to ``num``. The file appears atomically on a clean exit; on an error
    or interruption nothing is left behind.
    """

    def __init__(self, path: str | Path, labels: Tensor, image_shape: tuple[int, ...]):
        self.path, self.labels, self.shape = Path(path), labels, tuple(image_shape)
        self.num, self.written = len(labels), 0

    def __enter__(self) -> NpzStream:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._handles: list = []
        try:
            self._handles.append(open(tmp, "wb"))  # noqa: SIM115 (closed in __exit__)
            self._zip = zipfile.ZipFile(self._handles[0], "w", zipfile.ZIP_STORED, allowZip64=True)
            self._handles.append(self._zip)
            with self._member("labels.npy", np.int64, (self.num,)) as member:
                for start in range(0, self.num, 1 << 20):
                    chunk = self.labels[start : start + (1 << 20)]
                    member.write(chunk.numpy().astype(np.int64).tobytes())
            self._images = self._member("images.npy", np.uint8, (self.num, *self.shape))
            self._handles.append(self._images)
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def _member(self, name: str, dtype: type, shape: tuple[int, ...]) -> IO[bytes]:
        member = self._zip.open(name, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype))}
        header |= {"fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        return member

    def write(self, images: Tensor) -> None:
        """Append uint8 images ``[n, *shape]`` (the next ``n`` rows)."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"expected uint8 [n, {self.shape}], got {images.dtype} {images.shape}")
        if self.written + len(images) > self.num:
            raise ValueError(f"more than the announced {self.num} images")
        self._images.write(images.contiguous().numpy().tobytes())
        self.written += len(images)

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc
        if failed is None and self.written != self.num:
            failed = ValueError(f"{self.path}: wrote {self.written} of {self.num} images")
        for handle in reversed(self._handles):  # images member, zip directory, file
            try:
                handle.close()
            except (OSError, ValueError) as err:
                failed = failed or err
        self._handles = []
        if failed is None:
            self._atomic.__exit__(None, None, None)  # os.replace onto the final name
            return
        self._atomic.__exit__(type(failed), failed, failed.__traceback__)  # removes the temp
        if failed is not exc:
            raise failed


@dataclass(frozen=True)
class StreamResult:
    """What :func:`sample_to_file` returns on rank 0 (``None`` on the others)."""

    preview: Tensor  # uint8 [len(keep), H, W]: the requested rows, in order
    first: Tensor  # uint8 [rows of batch 0, H, W]
    nfe: int
    seconds: float
    passes_per_image: float = 0.0  # network passes (CFG: two per denoise call)


def grid_rows(labels: Tensor | None, num: int, nrow: int) -> tuple[Tensor, int]:
    """Rows a preview grid shows, and its images per row.

    Up to :data:`GRID_MAX_IMAGES` images, all of them with ``nrow`` unchanged; beyond, the first
    ``k`` of every class in order of appearance (one class per grid row, ``k`` per row) or,
    unconditional (``labels`` None), the first ``GRID_MAX_IMAGES`` in rows of 32.
    """
    if num <= GRID_MAX_IMAGES:
        return torch.arange(num), nrow
    if labels is None:
        return torch.arange(GRID_MAX_IMAGES), 32
    classes = list(dict.fromkeys(torch.unique_consecutive(labels).tolist()))
    k = max(1, GRID_MAX_IMAGES // len(classes))
    rows = [(labels == c).nonzero().flatten()[:k] for c in classes]
    return torch.cat(rows).sort().values, k


def sample_to_file(
    pipe: Pipeline,
    labels: Tensor | None,
    num: int,
    ctx: DistContext,
    *,
    npz: str | Path | None = None,
    keep: Tensor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    callback: Callable | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> StreamResult | None:
    """Sample ``num`` images, writing them to ``npz`` batch by batch (bounded memory).

    Rounds of ``world_size`` batches: rank r samples batch ``round * world_size + r``; rank 0
    gathers and writes the round, then forgets it except the rows listed in ``keep``.

    Args:
        pipe: The loaded model.
        labels: int64 ``[num]`` class labels, or None (unconditional).
        num: Number of images.
        ctx: The distributed context (one process: rank 0 of 1).
        npz: Where to write images and labels (-1 = none); None writes nothing.
        keep: Sorted row indices whose images are returned (e.g. a preview grid's).
        seed: Base seed; batch ``b`` uses ``(seed, b)``, as in :func:`mnistdiff.sample.generate`.
        batch_size: Images per batch (default the config's ``sample.batch_size``).
        progress: Show a progress bar on rank 0.
        callback: ``callback(i, x_t, x0_hat)`` for every step of batch 0.
        log: Where rank 0 prints the time estimate.
        **options: Sampling options (see :meth:`Pipeline.default_options`).

    Returns:
        The kept images, NFE per image and sampling seconds on rank 0; None elsewhere.

    Raises:
        OutputError: before any sampling, when the ``.npz`` will not fit on the disk.
    """
    size = batch_size or pipe.cfg.sample.batch_size
    keep = torch.empty(0, dtype=torch.long) if keep is None else keep.long()
    total = -(-num // size)
    shape = _image_shape(pipe)
    if npz is not None and ctx.is_main:
        check_npz_fits(npz, num, shape)
    file_labels = labels if labels is not None else torch.full((num,), -1, dtype=torch.long)
    stream = NpzStream(npz, file_labels, shape) if npz is not None and ctx.is_main else None
    kept, first_batch, nfe, passes, t0 = [], None, 0, 0.0, time.perf_counter()
    bar = tqdm(total=num, desc="sampling", disable=not (progress and ctx.is_main), leave=False)
    with _sigterm_as_interrupt(), stream or contextlib.nullcontext():
        for head in range(0, total, ctx.world_size):  # head: first batch of this round
            rounds = _round(head, ctx.world_size, total)
            counts = [_rows(r, num, size) for r in rounds]
            out = pipe.generate(
                labels,
                num,
                seed=seed,
                batch_size=size,
                callback=callback if head == 0 else None,
                batches=rounds[ctx.rank],
                **options,
            )
            nfe = out.nfe or nfe
            passes = out.passes_per_image or passes
            images = gather_rows(pipe.to_uint8(out.x), counts, ctx)
            if images is None:
                continue
            start = head * size
            kept.append(_select(images, keep, start))
            if stream is not None:
                stream.write(images)
            bar.update(len(images))
            if head == 0:
                first_batch = images[: min(size, num)].clone()
                _estimate(time.perf_counter() - t0, len(images), num, log)
    bar.close()
    if not ctx.is_main:
        return None
    empty = torch.empty((0, *shape), dtype=torch.uint8)
    preview = torch.cat(kept) if kept else empty
    first_batch = empty if first_batch is None else first_batch
    return StreamResult(
        preview, first_batch, nfe, seconds=time.perf_counter() - t0, passes_per_image=passes
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so an unfinished ``.npz`` temp is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _image_shape(pipe: Pipeline) -> tuple[int, ...]:
    probe = torch.zeros((1, *pipe.denoiser.image_shape))
    return tuple(pipe.to_uint8(probe).shape[1:])


def _round(head: int, world_size: int, total: int) -> list[range]:
    """Every rank's batch (a one-batch range, empty past the end) in the round from ``head``."""
    ends = [min(b, total) for b in range(head, head + world_size + 1)]
    return [range(a, b) for a, b in zip(ends, ends[1:], strict=False)]


def _rows(batches: range, num: int, size: int) -> int:
    return max(0, min(batches.stop * size, num) - min(batches.start * size, num))


def _select(images: Tensor, keep: Tensor, start: int) -> Tensor:
    """The rows of ``images`` (global rows ``start..``) listed in ``keep``."""
    local = keep[(keep >= start) & (keep < start + len(images))] - start
    return images[local].clone()


def _estimate(seconds: float, done: int, num: int, log: Callable[[str], None]) -> None:
    """Print the expected total time when it exceeds :data:`WARN_SECONDS`."""
    if done == 0 or done >= num:
        return
    expected = seconds / done * num
    if expected > WARN_SECONDS:
        log(
            f"note: {num} images at {done / seconds:.1f} images/s will take about "
            f"{_duration(expected)}; Ctrl-C stops without writing the .npz"
        )


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
