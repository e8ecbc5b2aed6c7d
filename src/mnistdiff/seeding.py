"""The randomness policy of training, on which exact resume rests.

Every random stream is a pure function of a few integers, so "train N steps" equals "train k,
stop, resume, train N - k" bit for bit, on any number of processes:

- the train/validation split: ``(seed)`` (:func:`train_val_split`);
- the data order: a permutation per ``(seed, epoch)`` plus a saved position counted in global
  batches, sharded by rank (:class:`BatchIterator`);
- each training step's draws (times, noise, label drops for the whole global batch):
  ``(seed, step)`` (:func:`step_generator`), and dropout: ``(seed, step, rank)``
  (:func:`seed_for`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchIterator", "permutation", "seed_for", "step_generator", "train_val_split"]


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")


def seed_for(seed: int, step: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed derived from ``(seed, step, rank)``."""
    x = seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB
    x ^= x >> 31
    return x % (2**63 - 1)


def step_generator(
    seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator for one training step (exact resume depends only on these numbers)."""
    return torch.Generator(device=device).manual_seed(seed_for(seed, step, rank))


def permutation(n: int, seed: int, stream: int) -> Tensor:
    """Permutation of ``range(n)`` derived only from ``(seed, stream)`` (stream = epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    return torch.randperm(n, generator=g)


def train_val_split(num_examples: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic disjoint split of ``range(num_examples)`` into (train, val) indices.

    Both index tensors are int64 and sorted. ``val_size`` 0 gives an empty val set.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("val_size", val_size, 0, num_examples - 1)
    _check_int("seed", seed, 0)
    perm = permutation(num_examples, seed, stream=-1)  # "epoch -1": never a training epoch
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
            self._perm = permutation(self.num_examples, self.seed, stream=self.epoch)
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
