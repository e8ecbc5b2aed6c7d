"""Figures of every moving part: forward process, schedules, sampling trajectory, guidance, NFE.

Each ``*_figure`` function returns a matplotlib ``Figure`` (Agg backend) built from library
calls only, so the CLI (``mnistdiff visualize KIND``), the notebook and a demo draw the same
pictures; :func:`save_figure` writes one as a PNG atomically. The data behind the figures is
available separately (:func:`noised_images`, :func:`schedule_curves`, :func:`trajectory`,
:func:`guidance_samples`, :func:`nfe_samples`). The maths is in ``docs/theory.md``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path
from .images import make_grid, save_gif
from .schedules import SCHEDULE_NAMES, Schedule, build_schedule, time_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .sample import Pipeline

KINDS = ("forward", "schedules", "trajectory", "guidance", "nfe")
#: Kinds drawn from a config (or the defaults) and kinds that need a trained checkpoint.
CONFIG_KINDS, CHECKPOINT_KINDS = ("forward", "schedules"), ("trajectory", "guidance", "nfe")
DEFAULT_TIMES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_SCALES = (0.0, 1.0, 2.0, 4.0)
DEFAULT_NFES = (1, 2, 4, 8, 16)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (atomically) and close it.

    Args:
        fig: a figure from one of the ``*_figure`` functions.
        path: destination ``.png`` file.
        dpi: resolution.

    Returns:
        ``path`` as a Path.
    """
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


def _check_schedule_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in SCHEDULE_NAMES]
    if not names or bad:
        raise ValueError(
            f"unknown schedule(s) {bad or names}; allowed: {', '.join(SCHEDULE_NAMES)}"
        )
    return names


def _check_times(times: Sequence[float]) -> list[float]:
    times = [float(t) for t in times]
    if not times or not all(0.0 <= t <= 1.0 for t in times):
        raise ValueError(f"times must be a non-empty list of values in [0, 1], got {times}")
    return times


def _fmt_lambda(lam: float) -> str:
    if math.isinf(lam):
        return "λ=+∞" if lam > 0 else "λ=−∞"
    text = f"{lam:.1f}"
    return "λ=" + ("0.0" if text == "-0.0" else text.replace("-", "−"))


# --------------------------------------------------------------------------- forward process


def load_digit(
    digit: int | None = None,
    *,
    index: int = 0,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
) -> Tensor:
    """One test image in model range, float ``[1, 28, 28]`` in [-1, 1].

    Args:
        digit: take the ``index``-th test image of this class; None: the ``index``-th test image.
        index: which image (>= 0).
        dataset: dataset name (see :func:`mnistdiff.data.load_dataset`).
        data_dir: data folder (None: ``$MNIST_DIR`` or the cache).
    """
    from .data import load_dataset
    from .transforms import to_model_range

    data = load_dataset(dataset, data_dir)
    rows = torch.arange(len(data.test_labels))
    if digit is not None:
        if not 0 <= digit < data.spec.num_classes:
            raise ValueError(f"digit must be in 0..{data.spec.num_classes - 1}, got {digit}")
        rows = rows[data.test_labels == digit]
    if not 0 <= index < len(rows):
        raise ValueError(f"index must be in 0..{len(rows) - 1}, got {index}")
    return to_model_range(data.test_images[int(rows[index])].unsqueeze(0))[0]


def noised_images(x0: Tensor, schedule: Schedule, times: Sequence[float], noise: Tensor) -> Tensor:
    """Samples of ``q(x_t | x_0)``: ``alpha_t x0 + sigma_t noise`` at each time (one noise).

    Args:
        x0: clean image ``[C, H, W]``.
        schedule: the noise schedule.
        times: times in [0, 1].
        noise: ``[C, H, W]`` standard normal noise, shared by all times.

    Returns:
        float ``[len(times), C, H, W]``.
    """
    t = torch.tensor(_check_times(times), dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * x0.dim()
    return alpha.float().view(shape) * x0 + sigma.float().view(shape) * noise


def forward_figure(
    image: Tensor,
    *,
    schedules: Sequence[str] = SCHEDULE_NAMES,
    times: Sequence[float] = DEFAULT_TIMES,
    num_timesteps: int = 1000,
    seed: int = 0,
) -> Figure:
    """One digit at a row of noise levels for each schedule (rows) and time (columns).

    Every schedule uses the same noise (drawn from ``seed``), so rows differ only by
    ``(alpha_t, sigma_t)``. Pixels are shown clipped to [-1, 1]; each cell names its log-SNR.

    Args:
        image: clean image ``[1, H, W]`` in model range (e.g. :func:`load_digit`).
        schedules: names from :data:`mnistdiff.schedules.SCHEDULE_NAMES`.
        times: the columns, in [0, 1].
        num_timesteps: T of the discrete schedules.
        seed: seed of the noise.
    """
    names, times = _check_schedule_names(schedules), _check_times(times)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(names),
        len(times),
        figsize=(1.1 * len(times) + 0.8, 1.35 * len(names) + 0.5),
        squeeze=False,
    )
    for r, name in enumerate(names):
        sched = build_schedule(name, num_timesteps)
        xs = noised_images(image.float(), sched, times, noise)
        lams = sched.log_snr(torch.tensor(times, dtype=torch.float64)).tolist()
        for c, (x, lam) in enumerate(zip(xs, lams, strict=True)):
            ax = axes[r, c]
            ax.imshow(x[0].numpy(), cmap="gray", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(_fmt_lambda(lam), fontsize=7)
            if r == 0:
                ax.set_title(f"t={times[c]:g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(r"forward process $x_t = \alpha_t x_0 + \sigma_t \epsilon$ (same $\epsilon$)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- schedules


def schedule_curves(schedule: Schedule, points: int = 201) -> dict[str, np.ndarray]:
    """``t``, ``alpha``, ``sigma`` and ``log_snr`` (non-finite values as NaN) on a uniform grid."""
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    lam = schedule.log_snr(t).numpy()
    lam = np.where(np.isfinite(lam), lam, np.nan)
    return {"t": t.numpy(), "alpha": alpha.numpy(), "sigma": sigma.numpy(), "log_snr": lam}


def schedules_figure(
    schedules: Sequence[str] = SCHEDULE_NAMES, *, num_timesteps: int = 1000, points: int = 201
) -> Figure:
    """``alpha_t``, ``sigma_t`` and the log-SNR ``lambda(t)`` against t, one line per schedule."""
    names = _check_schedule_names(schedules)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = (r"$\alpha_t$", r"$\sigma_t$", r"$\lambda(t) = \log(\alpha_t^2/\sigma_t^2)$")
    for name in names:
        curves = schedule_curves(build_schedule(name, num_timesteps), points)
        for ax, key in zip(axes, ("alpha", "sigma", "log_snr"), strict=True):
            ax.plot(curves["t"], curves[key], label=name)
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel("t")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"noise schedules (T = {num_timesteps} for the discrete ones)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- trajectory


@dataclass(frozen=True)
class Trajectory:
    """One sampling run, step by step.

    Attributes:
        x_t: uint8 ``[steps, H, W]``: the state after step ``i`` (at ``t_to[i]``).
        x0_hat: uint8 ``[steps, H, W]``: the model's clean-image estimate at step ``i``
            (made at ``t_from[i]``).
        t_from: time each step starts at (``[steps]``).
        t_to: time each step ends at (``[steps]``; the last is 0).
        label: the class sampled (None: unconditional).
        nfe: denoise calls made.
        options: the sampling options used (``SampleOptions.record()``).
    """

    x_t: Tensor
    x0_hat: Tensor
    t_from: list[float]
    t_to: list[float]
    label: int | None
    nfe: int
    options: dict[str, Any]


class TrajectoryRecorder:
    """A samplers' ``callback(i, x, x0_hat)`` keeping image 0's ``x_t`` and ``x0_hat`` per step.

    Args:
        pipe: the model being sampled (for the uint8 conversion and its schedule).
        on_step: optional ``on_step(i)`` after each step (e.g. a progress bar).
    """

    def __init__(self, pipe: Pipeline, on_step: Callable[[int], None] | None = None):
        self.pipe, self.on_step = pipe, on_step
        self.x_t: list[Tensor] = []
        self.x0_hat: list[Tensor] = []

    def __call__(self, i: int, x: Tensor, x0: Tensor) -> None:
        self.x_t.append(self.pipe.to_uint8(x[:1].float().cpu()))
        self.x0_hat.append(self.pipe.to_uint8(x0[:1].float().cpu()))
        if self.on_step is not None:
            self.on_step(i)

    def trajectory(self, opts: Any, label: int | None, nfe: int) -> Trajectory:
        """The recorded steps of a run with options ``opts`` as a :class:`Trajectory`."""
        from .samplers import get_sampler

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
            options=opts.record(),
        )


def trajectory(
    pipe: Pipeline, digit: int | None = 7, *, seed: int = 0, **options: Any
) -> Trajectory:
    """Sample one image and record ``x_t`` and ``x0_hat`` at every step (samplers' callback).

    Args:
        pipe: a loaded model (:meth:`mnistdiff.sample.Pipeline.load`).
        digit: class to sample; None samples with the null label (unconditionally).
            Ignored by an unconditional model.
        seed: sampling seed.
        **options: sampling options (``sampler``, ``steps``, ``nfe``, ``guidance``, ...).
    """
    opts = pipe.default_options(**options)
    label = digit if pipe.conditional else None
    recorder = TrajectoryRecorder(pipe)
    labels = None if label is None else [label]
    out = pipe.generate(labels, num=1, seed=seed, callback=recorder, **opts.record())
    return recorder.trajectory(opts, label, out.nfe)


def _pick_columns(steps: int, max_columns: int) -> list[int]:
    if steps <= max_columns:
        return list(range(steps))
    picks = np.linspace(0, steps - 1, max_columns).round().astype(int)
    return sorted(set(picks.tolist()))


def trajectory_figure(traj: Trajectory, *, max_columns: int = 10) -> Figure:
    """A two-row strip: ``x_t`` after each step (top) and the model's ``x0_hat`` (bottom).

    With more steps than ``max_columns`` an evenly spaced subset (always the last) is shown.
    """
    if max_columns < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    cols = _pick_columns(len(traj.x_t), max_columns)
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(cols), figsize=(1.2 * len(cols) + 0.8, 3.2), squeeze=False)
    for c, i in enumerate(cols):
        for r, (row, when) in enumerate(((traj.x_t, traj.t_to), (traj.x0_hat, traj.t_from))):
            ax = axes[r, c]
            ax.imshow(row[i].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"t={when[i]:.2f}", fontsize=7)
        axes[0, c].set_title(f"step {i + 1}", fontsize=8)
    axes[0, 0].set_ylabel(r"$x_t$")
    axes[1, 0].set_ylabel(r"$\hat x_0$")
    o = traj.options
    what = "unconditional" if traj.label is None else f"digit {traj.label}, w={o['guidance']:g}"
    fig.suptitle(f"{o['sampler']}, {len(traj.x_t)} steps, NFE {traj.nfe}, {what}")
    fig.tight_layout()
    return fig


def trajectory_frames(traj: Trajectory) -> list[np.ndarray]:
    """GIF frames: ``[x_t | x0_hat]`` side by side for every step (uint8 ``[H, W]`` each)."""
    return [
        make_grid(torch.stack([x, x0]), nrow=2) for x, x0 in zip(traj.x_t, traj.x0_hat, strict=True)
    ]


def save_trajectory_gif(
    traj: Trajectory, path: str | Path, *, scale: int = 4, duration_ms: int = 150
) -> Path:
    """Write the trajectory as an animated GIF (``x_t`` left, ``x0_hat`` right), atomically."""
    frames = trajectory_frames(traj)
    frames += [frames[-1]] * 5  # linger on the result
    return save_gif(frames, path, duration_ms=duration_ms, scale=scale)


# --------------------------------------------------------------------------- guidance and NFE


def _labels(pipe: Pipeline, digits: Sequence[int] | None) -> list[int] | None:
    if not pipe.conditional:
        return None
    return list(range(pipe.spec.num_classes)) if digits is None else [int(d) for d in digits]


def _rows_figure(
    rows: list[np.ndarray],
    names: list[str],
    title: str,
    columns: Sequence[str] | None = None,
    padding: int = 2,
) -> Figure:
    """Stacked image strips (uint8 grids of one row, ``padding`` pixels apart), one labelled
    row each; ``columns`` labels the cells under the last strip."""
    plt = _pyplot()
    h, w = rows[0].shape
    width = min(12.0, 0.04 * w + 1.5)
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, len(rows) * width * h / w + 0.7))
    axes = np.atleast_1d(axes)
    for ax, grid, name in zip(axes, rows, names, strict=True):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if columns:
        cell = (w - padding) / len(columns)
        axes[-1].set_xticks([padding + (i + 0.5) * cell - padding / 2 for i in range(len(columns))])
        axes[-1].set_xticklabels(columns, fontsize=8)
        axes[-1].tick_params(length=0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def guidance_samples(
    pipe: Pipeline,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    digits: Sequence[int] | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[float, Tensor]:
    """uint8 ``[len(digits), H, W]`` samples per guidance scale, from the same seed (noise).

    Raises:
        ValueError: for an unconditional model or an empty ``scales``.
    """
    if not pipe.conditional:
        raise ValueError("guidance needs a class-conditional model; this one is unconditional")
    if not scales:
        raise ValueError("give at least one guidance scale")
    if "guidance" in options:
        raise ValueError("guidance_samples sets the guidance from scales; do not pass guidance")
    labels = _labels(pipe, digits)
    return {float(w): pipe.sample(labels, seed=seed, guidance=float(w), **options) for w in scales}


def guidance_figure(
    pipe: Pipeline,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    digits: Sequence[int] | None = None,
    seed: int = 0,
    **options: Any,
) -> Figure:
    """The same seeds at several classifier-free guidance scales ``w`` (rows; ``u + w(c - u)``)."""
    samples = guidance_samples(pipe, scales, digits=digits, seed=seed, **options)
    rows = [make_grid(x, nrow=len(x)) for x in samples.values()]
    names = [f"w = {w:g}" for w in samples]
    opts = pipe.default_options(**options)
    title = f"classifier-free guidance ({opts.sampler}, {opts.steps} steps, seed {seed})"
    return _rows_figure(rows, names, title, [str(d) for d in _labels(pipe, digits)])


def nfe_samples(
    pipe: Pipeline,
    nfes: Sequence[int] = DEFAULT_NFES,
    *,
    digits: Sequence[int] | None = None,
    seed: int = 0,
    accuracy_per_class: int = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Samples at each NFE budget (same seed), optionally with the evaluator's class accuracy.

    Args:
        pipe: a loaded model.
        nfes: network-evaluation budgets; each picks the largest step count that fits.
        digits: classes to show (default all; ignored for unconditional models).
        seed: sampling seed.
        accuracy_per_class: if > 0 (conditional models), also sample this many images of every
            class and score them with the shipped evaluator.
        **options: other sampling options (``sampler``, ``guidance``, ...).

    Returns:
        One record per budget: ``nfe`` (calls actually made), ``steps``, ``images`` (uint8
        ``[N, H, W]``) and ``class_accuracy`` (None when not measured).
    """
    if not nfes:
        raise ValueError("give at least one NFE budget")
    if accuracy_per_class < 0:
        raise ValueError(f"accuracy_per_class must be >= 0, got {accuracy_per_class}")
    if "steps" in options:
        raise ValueError("nfe_samples picks the steps from each NFE budget; do not pass steps")
    labels = _labels(pipe, digits)
    num = None if labels is not None else 8
    evaluator = None
    if accuracy_per_class and pipe.conditional:
        from .evaluator import load_evaluator

        evaluator = load_evaluator()
    records = []
    for k in nfes:
        opts = pipe.default_options(nfe=int(k), **options)
        out = pipe.generate(labels, num, seed=seed, **opts.record())
        acc = None
        if evaluator is not None:
            acc = _class_accuracy(pipe, evaluator, accuracy_per_class, seed, opts)
        images = pipe.to_uint8(out.x)
        record = {"nfe": out.nfe, "steps": opts.steps, "images": images}
        records.append({**record, "class_accuracy": acc})
    return records


def _class_accuracy(pipe: Pipeline, evaluator, per_class: int, seed: int, opts) -> float:
    from .metrics import classification_metrics
    from .sample import label_tensor

    labels = label_tensor(per_class=per_class, num_classes=pipe.spec.num_classes)
    images = pipe.sample(labels, seed=seed + 1, **opts.record())
    _, logits = evaluator.embed(images)
    return float(classification_metrics(logits, labels)["class_accuracy"])


def nfe_figure(
    pipe: Pipeline,
    nfes: Sequence[int] = DEFAULT_NFES,
    *,
    digits: Sequence[int] | None = None,
    seed: int = 0,
    accuracy_per_class: int = 0,
    **options: Any,
) -> Figure:
    """Samples at several NFE budgets (rows), same seed; class accuracy per row if measured."""
    records = nfe_samples(
        pipe, nfes, digits=digits, seed=seed, accuracy_per_class=accuracy_per_class, **options
    )
    rows = [make_grid(r["images"], nrow=len(r["images"])) for r in records]
    names = []
    for r in records:
        acc = "" if r["class_accuracy"] is None else f"\nacc {100 * r['class_accuracy']:.0f}%"
        names.append(f"NFE {r['nfe']}{acc}")
    opts = pipe.default_options(**options)
    labels = _labels(pipe, digits)
    columns = None if labels is None else [str(d) for d in labels]
    title = f"quality against NFE ({opts.sampler}, seed {seed})"
    if records[0]["class_accuracy"] is not None:
        title += f"; evaluator class accuracy on {accuracy_per_class} per class"
    return _rows_figure(rows, names, title, columns)


# --------------------------------------------------------------------------- CLI


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_visualize_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mnistdiff visualize``."""
    p.add_argument("kind", choices=KINDS, help="which figure")
    p.add_argument("--out", help="PNG path (default <kind>.png)")
    p.add_argument("--config", help="forward/schedules: YAML config (data, T, its schedule)")
    p.add_argument("--checkpoint", help="trajectory/guidance/nfe: checkpoint, run or export dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    p.add_argument("--schedules", type=_name_list, help="comma-separated schedule names")
    p.add_argument("--times", type=_float_list, help="forward: comma-separated t values")
    p.add_argument("--digit", type=int, help="forward: test digit class; trajectory: class")
    p.add_argument("--digits", type=_int_list, help="guidance/nfe: classes (default all)")
    p.add_argument("--sampler", help="ddpm | ddim | euler | heun | dpmpp_2m | dpmpp_3m | unipc")
    p.add_argument("--steps", type=int, help="trajectory/guidance: sampler steps")
    p.add_argument("--guidance", type=float, help="trajectory/nfe: CFG scale w")
    p.add_argument("--scales", type=_float_list, help="guidance: comma-separated scales w")
    p.add_argument("--nfes", type=_int_list, help="nfe: comma-separated NFE budgets")
    p.add_argument(
        "--accuracy", type=int, default=0, metavar="N", help="nfe: class accuracy on N per class"
    )
    p.add_argument("--gif", help="trajectory: GIF path (default: --out with .gif)")


def _check_sources(args: argparse.Namespace) -> None:
    if args.kind in CHECKPOINT_KINDS:
        if not args.checkpoint:
            raise ValueError(
                f"visualize {args.kind} needs --checkpoint (a checkpoint, run or export dir)"
            )
        if args.config:
            raise ValueError(
                f"visualize {args.kind} reads its config from --checkpoint; --config applies "
                f"only to {', '.join(CONFIG_KINDS)}"
            )
    elif args.checkpoint:
        raise ValueError(
            f"visualize {args.kind} takes --config (or nothing), not --checkpoint; "
            f"--checkpoint applies to {', '.join(CHECKPOINT_KINDS)}"
        )


def _sampling(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("sampler", *keys) if getattr(args, k) is not None}


def build_figure(args: argparse.Namespace) -> tuple[Figure, Trajectory | None]:
    """The figure ``args.kind`` describes, and for ``trajectory`` the trajectory (for the GIF).

    Raises:
        ValueError: unknown kind, a missing/misplaced ``--checkpoint``/``--config``, bad values.
    """
    if args.kind not in KINDS:
        raise ValueError(f"unknown figure kind {args.kind!r}; allowed: {', '.join(KINDS)}")
    _check_sources(args)
    if args.kind in CONFIG_KINDS:
        from .config import load_config

        cfg = load_config(args.config)
        names = args.schedules or (
            [cfg.diffusion.schedule] if args.config and args.kind == "schedules" else SCHEDULE_NAMES
        )
        T = cfg.diffusion.num_timesteps
        if args.kind == "schedules":
            return schedules_figure(names, num_timesteps=T), None
        image = load_digit(args.digit, dataset=cfg.data.dataset, data_dir=cfg.data.data_dir)
        fig = forward_figure(
            image, schedules=names, times=args.times or DEFAULT_TIMES, num_timesteps=T,
            seed=args.seed,
        )  # fmt: skip
        return fig, None
    from .sample import Pipeline

    pipe = Pipeline.load(args.checkpoint, device=args.device)
    if args.kind == "trajectory":
        opts = _sampling(args, "steps", "guidance")
        traj = trajectory(pipe, 7 if args.digit is None else args.digit, seed=args.seed, **opts)
        return trajectory_figure(traj), traj
    if args.kind == "guidance":
        scales = args.scales or DEFAULT_SCALES
        fig = guidance_figure(
            pipe, scales, digits=args.digits, seed=args.seed, **_sampling(args, "steps")
        )
        return fig, None
    fig = nfe_figure(
        pipe, args.nfes or DEFAULT_NFES, digits=args.digits, seed=args.seed,
        accuracy_per_class=args.accuracy, **_sampling(args, "guidance"),
    )  # fmt: skip
    return fig, None


def run_visualize_cli(args: argparse.Namespace) -> int:
    """``mnistdiff visualize KIND``: write the figure (and the trajectory GIF); print the paths."""
    out = Path(args.out or f"{args.kind}.png")
    fig, traj = build_figure(args)
    print(f"wrote {save_figure(fig, out)}")
    if traj is not None:
        gif = save_trajectory_gif(traj, args.gif or out.with_suffix(".gif"))
        print(f"wrote {gif} ({len(traj.x_t)} steps)")
    return 0
