"""Multi-process training with PyTorch's DistributedDataParallel (launched by torchrun).

Single-process runs go through the same functions with ``world_size = 1``, so the training loop
has one code path. NCCL on CUDA, gloo on CPU. A process-group timeout
(``MNISTDIFF_DIST_TIMEOUT_MIN``, default 10 minutes) turns a hung collective into an error;
torchrun stops the other workers as soon as one exits with an error.

Conventions (see ``docs/distributed.md``):

- ``train.batch_size`` is the *global* batch; rank ``r`` of ``W`` takes the contiguous slice
  ``[r*B/W, (r+1)*B/W)`` of every global batch, for data and for per-example randomness alike
  (:func:`shard`), so the examples, times, noise and label drops of a step do not depend on the
  number of processes or on gradient accumulation.
- Only rank 0 writes files; every rank holds the same weights, optimizer state and EMA.
- Sampling for evaluation splits the *batches* of a request: rank ``r`` generates a contiguous
  run of global batch indices (:func:`batch_shares`), each batch seeded by ``(seed, batch)``, and
  rank 0 gathers the images (:func:`gather_rows`), so the images do not depend on the number of
  processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .parameterization import Denoiser
from .seeding import BatchIterator

TIMEOUT_ENV = "MNISTDIFF_DIST_TIMEOUT_MIN"


class DistributedError(ValueError):
    """The distributed launch or batch split is misconfigured (message says what to change)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set by setup() under torchrun

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def timeout() -> datetime.timedelta:
    """Process-group timeout: ``$MNISTDIFF_DIST_TIMEOUT_MIN`` minutes (default 10)."""
    raw = os.environ.get(TIMEOUT_ENV, "10")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Args:
        device_name: ``train.device``. Under torchrun, ``auto``/``cuda``/``cuda:N`` mean "the GPU
            of my ``LOCAL_RANK``" (NCCL) when CUDA is present, ``cpu`` (or ``auto`` without CUDA)
            means gloo on CPU; MPS cannot be shared by several processes.

    Returns:
        The context; ``DistContext()`` (rank 0 of 1) for a plain single-process run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device, backend = _device_and_backend(device_name, local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout())
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def _device_and_backend(device_name: str, local_rank: int) -> tuple[torch.device, str]:
    kind = device_name.split(":")[0]
    if kind == "mps":
        raise DistributedError(
            "multi-process training supports CUDA (NCCL) and CPU (gloo), not MPS; "
            "use --device cpu or a single process"
        )
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "set --nproc_per_node to at most the number of GPUs, or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    if kind not in ("auto", "cpu"):
        raise DistributedError(f"unsupported device {device_name!r}; use auto, cpu or cuda")
    return torch.device("cpu"), "gloo"


def teardown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process); fails after the process-group timeout."""
    if ctx.is_distributed:
        dist.all_reduce(torch.zeros(1, device=_comm_device(ctx)))


@contextlib.contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """Run the body on each node's local rank 0 first (e.g. a download), then on the others."""
    first = ctx.local_rank == 0
    if not first:
        barrier(ctx)
    yield
    if first:
        barrier(ctx)


def micro_batch_size(batch_size: int, grad_accum: int, ctx: DistContext) -> int:
    """Examples per forward pass: ``batch_size / (world_size * grad_accum)``.

    Raises:
        DistributedError: when the global batch does not split evenly.
    """
    parts = ctx.world_size * grad_accum
    if batch_size % parts:
        raise DistributedError(
            f"train.batch_size {batch_size} (the global batch) must be divisible by "
            f"processes x train.grad_accum = {ctx.world_size} x {grad_accum} = {parts}; "
            f"choose a batch size that is a multiple of {parts}"
        )
    return batch_size // parts


def batch_iterator(
    num_examples: int, batch_size: int, seed: int, ctx: DistContext
) -> BatchIterator:
    """This rank's shard of every global batch (the position is counted in global batches)."""
    micro_batch_size(batch_size, 1, ctx)
    return BatchIterator(num_examples, batch_size, seed, rank=ctx.rank, world_size=ctx.world_size)


def shard(x: Tensor, ctx: DistContext) -> Tensor:
    """This rank's contiguous slice (along dim 0) of a tensor over the global batch."""
    n = x.shape[0] // ctx.world_size
    return x[ctx.rank * n : (ctx.rank + 1) * n]


def wrap(denoiser: Denoiser, ctx: DistContext, compile_backbone: bool = False) -> Denoiser:
    """A Denoiser for the training forward: backbone compiled and/or wrapped in DDP.

    The original ``denoiser.backbone`` keeps the plain weights (for checkpoints and EMA).
    """
    backbone = denoiser.backbone
    if compile_backbone:
        backbone = torch.compile(backbone)
    if ctx.is_distributed:
        ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" else None
        backbone = DistributedDataParallel(backbone, device_ids=ids)
    if backbone is denoiser.backbone:
        return denoiser
    return denoiser.with_backbone(backbone)


def maybe_no_sync(model: Denoiser, sync: bool):
    """Skip the gradient all-reduce on non-final micro-batches of an accumulation."""
    if not sync and isinstance(model.backbone, DistributedDataParallel):
        return model.backbone.no_sync()
    return contextlib.nullcontext()


def current_context() -> DistContext:
    """The context of the initialized default process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
    )


def batch_shares(num_items: int, batch_size: int, world_size: int) -> list[range]:
    """Global batch indices of every rank: contiguous runs, one more for the first ranks.

    ``num_items`` split into ``ceil(num_items / batch_size)`` batches; rank 0 gets a batch
    whenever there is one, and ranks beyond the number of batches get an empty range.
    """
    if batch_size < 1 or num_items < 0 or world_size < 1:
        raise DistributedError(
            f"cannot split {num_items} items in batches of {batch_size} over {world_size} "
            "processes; need items >= 0, batch size >= 1, processes >= 1"
        )
    num_batches = -(-num_items // batch_size)
    base, extra = divmod(num_batches, world_size)
    shares, start = [], 0
    for rank in range(world_size):
        stop = start + base + (rank < extra)
        shares.append(range(start, stop))
        start = stop
    return shares


def share_rows(share: range, num_items: int, batch_size: int) -> range:
    """Item indices covered by a run of batch indices."""
    return range(min(share.start * batch_size, num_items), min(share.stop * batch_size, num_items))


def gather_rows(x: Tensor, counts: list[int], ctx: DistContext) -> Tensor | None:
    """Concatenate every rank's rows (dim 0) on rank 0, in rank order.

    Args:
        x: this rank's rows, ``counts[rank]`` of them; the other dims match on every rank.
        counts: rows of every rank (known to all, so no sizes are exchanged).
        ctx: the job; with one process ``x`` is returned as is.

    Returns:
        The ``sum(counts)`` rows on rank 0 (on CPU), None on the other ranks.
    """
    if len(x) != counts[ctx.rank]:
        raise DistributedError(f"rank {ctx.rank} has {len(x)} rows, expected {counts[ctx.rank]}")
    if not ctx.is_distributed:
        return x
    device = _comm_device(ctx)
    buf = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    buf[: len(x)] = x.to(device)  # padded: gather needs one shape on every rank
    parts = [torch.empty_like(buf) for _ in counts] if ctx.is_main else None
    dist.gather(buf, parts, dst=0)
    if not ctx.is_main:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).cpu()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (plain data, pickled by torch) on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device(ctx))
    return box[0]


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.device is not None else torch.device("cpu")


def mean_scalar(value: float, ctx: DistContext) -> float:
    """Average a Python float over ranks."""
    if not ctx.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t)
    return t.item() / ctx.world_size


def agree_step(
    loss: float, signum: int | None, elapsed: float, ctx: DistContext
) -> tuple[float, int | None, float]:
    """One collective per step: the loss averaged over ranks, whether any rank got a signal,
    and the slowest rank's clock.

    Every rank then takes the same decision (skip a non-finite step, stop on SIGTERM, fit or
    end a time budget), so no rank waits in a collective the others have left.

    Returns:
        ``(mean loss, the largest signal number seen by any rank or None, the largest
        elapsed seconds)``.
    """
    if not ctx.is_distributed:
        return loss, signum, elapsed
    mine = torch.tensor(
        [loss, float(signum or 0), elapsed], dtype=torch.float64, device=_comm_device(ctx)
    )
    rows = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(rows, mine)
    table = torch.stack(rows).cpu()  # [world, 3]
    top = int(table[:, 1].max().item())
    return table[:, 0].sum().item() / ctx.world_size, (top or None), table[:, 2].max().item()


def sum_(tensors: list[Tensor], ctx: DistContext) -> None:
    """Sum each tensor over ranks, in place (no-op for one process)."""
    if not ctx.is_distributed:
        return
    for t in tensors:
        buf = t.to(_comm_device(ctx))
        dist.all_reduce(buf)
        t.copy_(buf)
