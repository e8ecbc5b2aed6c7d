"""What each demo button does, as plain functions of a loaded model (no Gradio here).

Every handler validates its fields (:mod:`mnistdiff.demo.validate`), calls the library
(:mod:`mnistdiff.sample`, :mod:`mnistdiff.visualize`, :mod:`mnistdiff.edit`) and returns
pictures as uint8 arrays plus a one-line message. ``progress(fraction, text)`` is called on
long loops (the app passes Gradio's progress bar). The unit tests call these directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..transforms import to_model_range
from ..samplers import get_sampler, nfe_for
from ..schedules import SCHEDULE_NAMES, time_grid
from ..visualize import (
    DEFAULT_TIMES,
    Trajectory,
    forward_figure,
    load_digit,
    save_trajectory_gif,
    schedules_figure,
)
from . import pictures, validate
from .validate import DemoInputError

if TYPE_CHECKING:
    from ..sample import Pipeline

Progress = Callable[[float, str], Any]
SOURCES = ("model", "test")  # Explain: a digit drawn by the model, or an MNIST test digit


def _no_progress(fraction: float, text: str) -> None:
    return None


def default_threads() -> int:
    """Half the usable cores (at least 1, at most 8).

    The models are small: on a CPU one request gains little from many threads, and when other
    work shares the cores OpenMP's spin-waiting makes every extra thread costly (measured on a
    loaded 2-core machine: 10 digits in 3 s with 1 thread, about 60 s with 2).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (usable or 1) // 2))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default :func:`default_threads`) and return the number."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def load_model(checkpoint: str | Path | None = None, device: str = "auto") -> Pipeline:
    """The demo's model: ``checkpoint`` (run dir, ``.pt`` or export dir), else the shipped one."""
    from ..sample import Pipeline

    if checkpoint is None:
        from ..pretrained import verified_dir

        checkpoint = verified_dir()
    return Pipeline.load(checkpoint, device=device)


@dataclass(frozen=True)
class Defaults:
    """The model's own sampling defaults, shown as the initial values of the fields."""

    sampler: str
    nfe: int
    guidance: float
    schedule: str
    conditional: bool
    num_classes: int


def defaults(pipe: Pipeline) -> Defaults:
    """Initial field values from the model's ``sample`` config section."""
    opts = pipe.default_options()
    return Defaults(
        sampler=opts.sampler,
        nfe=min(validate.MAX_NFE, nfe_for(opts.sampler, opts.steps)),
        guidance=float(opts.guidance),
        schedule=pipe.cfg.diffusion.schedule,
        conditional=pipe.conditional,
        num_classes=pipe.spec.num_classes,
    )


# --------------------------------------------------------------------------- Generate


@dataclass(frozen=True)
class Generated:
    """A Generate answer.

    Attributes:
        grid: upscaled uint8 grid (one row per digit, ``nrow`` samples per row).
        images: uint8 ``[N, 28, 28]``; labels: int64 ``[N]`` (-1 for unconditional).
        nrow: digits per grid row (for :func:`mnistdiff.demo.pictures.split_grid`).
        strip: upscaled uint8 two-row strip of the first image's trajectory (x_t over x̂₀).
        gif: animated GIF of the same trajectory.
        message: what was sampled, NFE and the time it took (and any cap applied).
    """

    grid: np.ndarray
    images: Tensor
    labels: Tensor
    nrow: int
    strip: np.ndarray
    gif: Path
    message: str


def generate(
    pipe: Pipeline,
    digits: Sequence[Any] | None,
    per_digit: Any,
    sampler: Any,
    nfe: Any,
    guidance: Any,
    seed: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Generated:
    """Sample ``per_digit`` images of each digit in one batch, recording the first's trajectory.

    Raises:
        DemoInputError: a field is out of range (the message names it and the allowed values).
    """
    name = validate.sampler(sampler)
    steps = validate.nfe_steps(name, nfe)
    w, s = validate.guidance(guidance), validate.seed(seed)
    # an unconditional model draws one row of samples whatever the digits say
    chosen = validate.digits(digits, pipe.spec.num_classes) if pipe.conditional else [-1]
    count, note = validate.cap_count(per_digit, len(chosen))
    labels = torch.tensor(chosen).repeat_interleave(count)
    opts = pipe.default_options(sampler=name, steps=steps, guidance=w)
    recorder = _TrajectoryRecorder(pipe, steps, progress)
    start = time.perf_counter()
    out = pipe.generate(
        labels if pipe.conditional else None,
        len(labels),
        seed=s,
        batch_size=len(labels),
        callback=recorder,
        **opts.__dict__,
    )
    seconds = time.perf_counter() - start
    images = pipe.to_uint8(out.x)
    nrow = count if count > 1 else len(images)
    traj = recorder.trajectory(opts, int(labels[0]) if pipe.conditional else None, out.nfe)
    gif = save_trajectory_gif(traj, Path(work_dir) / "trajectory.gif", scale=4)
    strip = pictures.grid(torch.cat([traj.x_t, traj.x0_hat]), nrow=len(traj.x_t), scale=2)
    what = "unconditional" if not pipe.conditional else f"digits {', '.join(map(str, chosen))}"
    message = (
        f"{len(images)} images ({what}; {name}, {steps} steps, NFE {out.nfe} per image, "
        f"guidance {w:g}, seed {s}) in {seconds:.1f} s"
    )
    if note:
        message += f". Note: {note}"
    return Generated(pictures.grid(images, nrow), images, out.labels, nrow, strip, gif, message)


class _TrajectoryRecorder:
    """The samplers' per-step callback: keeps image 0's x_t and x̂₀ and moves the progress bar."""

    def __init__(self, pipe: Pipeline, steps: int, progress: Progress):
        self.pipe, self.steps, self.progress = pipe, steps, progress
        self.x_t: list[Tensor] = []
        self.x0_hat: list[Tensor] = []

    def __call__(self, i: int, x: Tensor, x0: Tensor) -> None:
        self.x_t.append(self.pipe.to_uint8(x[:1].float().cpu()))
        self.x0_hat.append(self.pipe.to_uint8(x0[:1].float().cpu()))
        self.progress((i + 1) / self.steps, f"step {i + 1}/{self.steps}")

    def trajectory(self, opts, label: int | None, nfe: int) -> Trajectory:
        """The recorded steps as a :class:`mnistdiff.visualize.Trajectory`."""
        kind = opts.grid or get_sampler(opts.sampler).default_grid
        ts = time_grid(self.pipe.denoiser.schedule, kind, opts.steps).tolist()
        k = len(self.x_t)
        return Trajectory(
            x_t=torch.cat(self.x_t),
            x0_hat=torch.cat(self.x0_hat),
            t_from=ts[:k],
            t_to=ts[1 : k + 1],
            label=label,
            nfe=nfe,
            options=dict(opts.__dict__),
        )


# --------------------------------------------------------------------------- Explain


@dataclass(frozen=True)
class Explained:
    """An Explain answer: the forward-process figure, the schedule curves, and a caption."""

    forward: np.ndarray
    curves: np.ndarray
    message: str


def explain(
    pipe: Pipeline,
    digit: Any,
    schedules: Sequence[str] | None,
    source: Any = "model",
    seed: Any = 0,
    *,
    data_dir: str | Path | None = None,
    progress: Progress = _no_progress,
) -> Explained:
    """One digit noised at a row of times under each chosen schedule, and their α, σ, log-SNR.

    Args:
        pipe: the demo's model (draws the digit when ``source`` is ``"model"``; its schedule
            is the default and its ``T`` is used for the discrete schedules).
        digit: the class to show.
        schedules: names from :data:`mnistdiff.schedules.SCHEDULE_NAMES` (empty: the model's).
        source: ``"model"`` (a sample of the model) or ``"test"`` (an MNIST test digit).
        seed: seed of the sample and of the forward-process noise.
        data_dir: MNIST folder for ``source="test"`` (None: ``$MNIST_DIR`` or the cache).
    """
    d = validate.digit("digit", digit, pipe.spec.num_classes)
    s = validate.seed(seed)
    names = list(schedules or [pipe.cfg.diffusion.schedule])
    bad = [n for n in names if n not in SCHEDULE_NAMES]
    if bad:
        raise DemoInputError(f"schedules {bad} unknown; allowed: {', '.join(SCHEDULE_NAMES)}")
    if source not in SOURCES:
        raise DemoInputError(f"source {source!r} unknown; allowed: {', '.join(SOURCES)}")
    progress(0.1, "getting the digit")
    if source == "test":
        image = load_digit(d, index=s % 100, data_dir=data_dir)
        where = f"MNIST test digit {d} (number {s % 100} of its class)"
    else:
        uint8 = pipe.sample([d] if pipe.conditional else None, num=1, seed=s)
        image = to_model_range(uint8)[0]
        where = f"a {d} drawn by the model (seed {s})" if pipe.conditional else "a model sample"
    progress(0.5, "drawing the figures")
    T = pipe.cfg.diffusion.num_timesteps
    fig = forward_figure(image, schedules=names, times=DEFAULT_TIMES, num_timesteps=T, seed=s)
    forward = pictures.figure_array(fig)
    curves = pictures.figure_array(schedules_figure(names, num_timesteps=T))
    message = (
        f"x_t = α_t x_0 + σ_t ε for {where}, same ε in every cell; the model was trained "
        f"with the {pipe.cfg.diffusion.schedule} schedule. λ = log(α²/σ²) under each cell."
    )
    return Explained(forward, curves, message)
