"""The state of a training run: what one step hands the next, and what a checkpoint holds.

:class:`TrainState` bundles the model, EMA, optimizer, grad scaler, data position,
:class:`Progress` and the step budget (:class:`TimeBudget`); its :meth:`TrainState.state_dict`
and :meth:`TrainState.load_state_dict` are the only code that writes and reads checkpoint
state. :class:`StopFlag` turns SIGINT/SIGTERM into a flag the loop reads between steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed
from .build import build_denoiser
from .checkpoint import load_weights
from .config import Config, to_dict
from .data import DataSpec
from .device import Precision
from .distributed import DistContext
from .ema import EMA
from .parameterization import Denoiser
from .seeding import BatchIterator

if TYPE_CHECKING:
    from .train import TrainTask

DEFAULT_TASK = "diffusion"  # the task of checkpoints written before tasks were recorded


class TrainingError(RuntimeError):
    """Training cannot start or continue (message says why and what to do)."""


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    best_value: float = math.inf
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # wall-clock time spent in the loop, over all invocations

    def note_best(self, key: str) -> bool:
        """Take the newest ``key`` record as the best value if it beats it; True if it did."""
        values = [r[key] for r in self.history if key in r]
        if values and values[-1] < self.best_value:
            self.best_value = values[-1]
            return True
        return False


class TimeBudget:
    """Fit the run to a wall-clock budget (``train.time_budget_minutes``).

    From ``CALIBRATION`` steps on, the average seconds per step so far (timed from step
    ``SKIP``, so one-time start-up costs do not count) set the total number of steps, never
    more than the configured epochs/steps, so that warmup and cosine decay span the budget. The
    total is refitted every step: on a shared machine the speed drifts (seen: 330 images/s
    during the warmup, 240 later), and a total fixed early would stop the cosine far from its
    end. The total is saved in checkpoints and is the starting estimate on resume. The loop
    also stops when the time is up, whatever the estimate said.

    Every decision is a function of the step and of the elapsed seconds passed to
    :meth:`update`; with several processes the loop passes the slowest rank's clock (agreed in
    the per-step collective), so all ranks fit the same schedule and stop after the same step.
    """

    SKIP = 5
    CALIBRATION = 20

    def __init__(self, minutes: float | None, cap: int, warmup_steps: int = 0):
        self.seconds = None if minutes is None else minutes * 60.0
        self.cap = cap
        self.warmup_steps = warmup_steps
        self.announced = minutes is None
        self.fitted_now = False  # True once, when the warmup ends (for the log)

    def resume(self, saved: dict, total_steps: int) -> int:
        """Start from the schedule length of the interrupted invocation."""
        saved_total = saved.get("lr_schedule", {}).get("total_steps")
        if self.seconds is not None and saved_total:
            return min(saved_total, self.cap)
        return total_steps

    def start(self, progress: Progress) -> None:
        self._t0, self._steps0 = time.perf_counter(), progress.step
        self._elapsed_skip = 0.0
        self._seconds0 = progress.train_seconds

    def elapsed(self) -> float:
        """Seconds since :meth:`start` on this process's clock."""
        return time.perf_counter() - self._t0

    def update(self, progress: Progress, total_steps: int, elapsed: float | None = None) -> int:
        """Account ``elapsed`` seconds since start (default: this process's clock); return
        the (possibly new) total number of steps."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        progress.train_seconds = self._seconds0 + elapsed
        self.fitted_now = False
        if self.seconds is None:
            return total_steps
        if progress.train_seconds >= self.seconds:
            return progress.step  # time is up: this step is the last
        done = progress.step - self._steps0
        if done == self.SKIP:
            self._elapsed_skip = elapsed
        if done < self.CALIBRATION:
            return total_steps
        rate = (done - self.SKIP) / (elapsed - self._elapsed_skip)  # steps per second
        left = int((self.seconds - progress.train_seconds) * rate)
        self.fitted_now = not self.announced and progress.step >= self.warmup_steps
        self.announced |= self.fitted_now
        return max(progress.step + 1, min(self.cap, progress.step + left))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; the fused kernel where PyTorch has one.

    Fused AdamW does the whole update in one kernel instead of a chain of foreach ops (on the
    quick recipe's CPU step: ~1 ms instead of ~4.5). Its moments are the plain AdamW ones;
    :func:`load_optimizer_state` keeps this device's choice when a checkpoint is resumed.
    """
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=device.type in FUSED_ADAMW_DEVICES,
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's own ``fused`` setting.

    ``load_state_dict`` would copy the flag of the device that wrote the checkpoint (a CPU
    run's ``fused=True`` onto a device without the kernel, an older run's unfused setting onto
    a CPU).
    """
    fused = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flag in zip(optimizer.param_groups, fused, strict=True):
        group["fused"] = flag


class StopFlag:
    """Catch SIGINT/SIGTERM: remember the signal, let the current step finish.

    A second signal stops at once, unless it comes within ``grace`` seconds of the first: under
    torchrun/SLURM a worker often receives the same SIGTERM twice (from the scheduler and from
    the launcher), and that must not cancel the checkpoint write.
    """

    grace = 2.0

    def __init__(self):
        self.signum: int | None = None
        self._t = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            if time.monotonic() - self._t > self.grace:
                raise KeyboardInterrupt
            return
        self.signum, self._t = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass(eq=False)
class TrainState:
    """Everything a run carries from one step to the next.

    Saved in checkpoints (through :meth:`state_dict` only): the backbone weights, EMA, optimizer,
    grad scaler, data position, :class:`Progress`, the step budget, and the task's name and
    own state (``TrainTask.state_dict``). The rest is how this process runs them (device,
    precision, process group, the task object, signal flag) and is rebuilt on resume.

    ``model`` is the one handle to the weights; ``forward_model`` is the same weights wrapped
    for the training forward pass (DDP and/or ``torch.compile``; ``model`` itself when neither
    is on).
    """

    cfg: Config
    spec: DataSpec
    model: Denoiser
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    scaler: torch.amp.GradScaler | None
    batches: BatchIterator
    budget: TimeBudget
    total_steps: int
    task: TrainTask
    ctx: DistContext
    device: torch.device
    precision: Precision
    forward_model: Denoiser
    progress: Progress = field(default_factory=Progress)
    stop: StopFlag = field(default_factory=StopFlag)

    @classmethod
    def create(
        cls,
        cfg: Config,
        spec: DataSpec,
        num_examples: int,
        *,
        ctx: DistContext,
        device: torch.device,
        precision: Precision,
        task: TrainTask,
    ) -> TrainState:
        """A fresh state: initial weights from ``cfg.train.seed`` (the same on every rank)."""
        torch.manual_seed(cfg.train.seed)
        model = build_denoiser(cfg, spec).to(device)
        task.prepare(model)
        t = cfg.train
        ema = (
            EMA(model.backbone, t.ema_decay, half_life=t.ema_half_life, start_step=t.ema_start_step)
            if t.ema
            else None
        )
        batches = distributed.batch_iterator(num_examples, t.batch_size, t.seed, ctx)
        total = t.steps or t.epochs * batches.batches_per_epoch
        return cls(
            cfg=cfg,
            spec=spec,
            model=model,
            optimizer=build_optimizer(model.backbone, t, device),
            ema=ema,
            scaler=torch.amp.GradScaler(device.type) if precision.grad_scaler else None,
            batches=batches,
            budget=TimeBudget(t.time_budget_minutes, total, t.warmup_steps),
            total_steps=total,
            task=task,
            ctx=ctx,
            device=device,
            precision=precision,
            forward_model=distributed.wrap(model, ctx, t.compile),
        )

    def state_dict(self) -> dict:
        """The checkpoint content: tensors and plain data only (see ``docs/architecture.md``)."""
        p = self.progress
        return {
            "config": to_dict(self.cfg),
            "data_spec": self.spec.to_dict(),
            "task": {"name": self.task.name, "state": self.task.state_dict()},
            "model": self.model.backbone.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "lr_schedule": {"kind": self.cfg.train.lr_schedule, "total_steps": self.total_steps},
            "train_seconds": p.train_seconds,
            "step": p.step,
            "epoch": p.epoch,
            "data_state": self.batches.state_dict(),
            "skipped_steps": p.skipped_steps,
            "best_value": p.best_value,
            "history": list(p.history),
        }

    def load_state_dict(self, state: dict, source: str | Path = "checkpoint") -> None:
        """Continue from :meth:`state_dict` output (``source`` names it in errors).

        The config is not read here: the caller decides which changes a resume may make.
        Checkpoints older than the ``task`` and ``scaler`` entries load as diffusion runs with
        a fresh grad scaler.
        """
        saved_task = state.get("task") or {"name": DEFAULT_TASK, "state": {}}
        if saved_task["name"] != self.task.name:
            raise TrainingError(
                f"cannot resume {source}: it was trained by task {saved_task['name']!r}, "
                f"this run uses {self.task.name!r}"
            )
        self.task.load_state_dict(saved_task["state"])
        load_weights(self.model.backbone, state["model"], source)
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.ema is not None:
            ema_weights = state["ema"]["model"] if state.get("ema") is not None else state["model"]
            load_weights(self.ema.model, ema_weights, source)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.batches.load_state_dict(state["data_state"])
        except ValueError as exc:
            raise TrainingError(
                f"cannot resume {source}: {exc}. The data position is counted in global "
                "batches: keep train.batch_size (the global batch over all processes) and "
                "train.seed as saved; the number of processes may change if it divides the batch"
            ) from None
        self.progress = Progress(
            step=state["step"],
            epoch=state["epoch"],
            skipped_steps=state["skipped_steps"],
            best_value=state["best_value"],
            history=list(state["history"]),
            train_seconds=state.get("train_seconds", 0.0),
        )
        self.total_steps = self.budget.resume(state, self.total_steps)

    def eval_model(self) -> Denoiser:
        """The model used for validation and samples: the EMA weights when EMA is on."""
        if self.ema is None:
            return self.model
        return self.model.with_backbone(self.ema.model)
