"""Multi-process training with PyTorch's DistributedDataParallel (launched by torchrun).

Single-process runs go through the same functions with ``world_size = 1``, so the training loop
has one code path. NCCL on CUDA, gloo on CPU; a timeout makes a dead rank bring the job down.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .data import BatchIterator
from .parameterization import Denoiser

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MNISTDIFF_DIST_TIMEOUT_MIN", "10")))


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set by setup() under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def teardown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def batch_iterator(
    num_examples: int, batch_size: int, seed: int, ctx: DistContext
) -> BatchIterator:
    """This rank's shard of every global batch."""
    if batch_size % ctx.world_size:
        raise ValueError(
            f"train.batch_size {batch_size} (the global batch) must be divisible by the "
            f"number of processes {ctx.world_size}"
        )
    return BatchIterator(num_examples, batch_size, seed, rank=ctx.rank, world_size=ctx.world_size)


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
    return Denoiser(
        backbone, denoiser.schedule, denoiser.prediction, denoiser.num_classes, denoiser.image_shape
    )


def maybe_no_sync(model: Denoiser, sync: bool):
    """Skip the gradient all-reduce on non-final micro-batches of an accumulation."""
    if not sync and isinstance(model.backbone, DistributedDataParallel):
        return model.backbone.no_sync()
    return contextlib.nullcontext()


def mean_scalar(value: float, ctx: DistContext) -> float:
    """Average a Python float over ranks."""
    if not ctx.is_distributed:
        return value
    t = torch.tensor(
        [value], dtype=torch.float64, device=ctx.device if ctx.device is not None else "cpu"
    )
    dist.all_reduce(t)
    return t.item() / ctx.world_size
