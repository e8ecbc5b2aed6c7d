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

from ..samplers import nfe_for
from ..schedules import SCHEDULE_NAMES
from ..transforms import to_model_range
from ..visualize import (
    DEFAULT_TIMES,
    TrajectoryRecorder,
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
EMPTY_DRAWING = "the drawing is empty: draw a digit (or upload a picture) first"


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
    """The demo's model: ``checkpoint`` (run dir, ``.pt`` or export dir), else the shipped one
    (:mod:`mnistdiff.pretrained`, checksum-verified by :meth:`Pipeline.load`)."""
    from ..sample import Pipeline

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
    overrides = {"sampler": name, "steps": steps, "guidance": w}
    opts = pipe.default_options(**overrides)
    recorder = TrajectoryRecorder(
        pipe, lambda i: progress((i + 1) / steps, f"step {i + 1}/{steps}")
    )
    start = time.perf_counter()
    out = pipe.generate(
        labels if pipe.conditional else None,
        len(labels),
        seed=s,
        batch_size=len(labels),
        callback=recorder,
        **overrides,
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


# --------------------------------------------------------------------------- Draw


@dataclass(frozen=True)
class Edited:
    """A Draw / Interpolate answer.

    Attributes:
        view: the model's view of the input (upscaled 28x28; None when there is no input).
        result: the edited images as an upscaled grid.
        images: uint8 ``[N, 28, 28]`` results.
        extra: a second picture (inversion latent, GIF path) or None.
        message: what was done.
    """

    view: np.ndarray | None
    result: np.ndarray
    images: Tensor
    extra: np.ndarray | Path | None
    message: str


def _blank(array: np.ndarray) -> bool:
    """True when a drawing has no ink: fully transparent, or one flat colour all over."""
    if array.ndim == 3 and array.shape[-1] == 4:
        opaque = array[..., 3] > 0
        if not opaque.any():
            return True
        if not opaque.all():  # strokes on a transparent canvas
            return False
        array = array[..., :3]
    flat = array.reshape(-1, array.shape[-1]) if array.ndim == 3 else array.reshape(-1)
    return bool((flat == flat[0]).all())


def _editor_image(value: Any) -> Any:
    """The picture inside an image-editor value (its ``composite``), or the value itself."""
    if isinstance(value, dict):
        return value.get("composite")
    return value


def read_drawing(value: Any, work_dir: str | Path) -> tuple[Tensor, bool]:
    """A sketch (array, image path or Gradio image-editor value) as the model sees it.

    The conversion is :func:`mnistdiff.edit.load_image`'s (MNIST's normalisation; a dark digit
    on a light background is inverted).

    Returns:
        ``(uint8 [28, 28], inverted)``.

    Raises:
        DemoInputError: nothing drawn or uploaded, or not a picture.
    """
    from PIL import Image

    from ..edit import load_image

    picture = _editor_image(value)
    if picture is None:
        raise DemoInputError(EMPTY_DRAWING)
    if isinstance(picture, (str, Path)):
        path = Path(picture)
    else:
        array = np.asarray(picture)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise DemoInputError(f"expected a picture, got an array {array.dtype} {array.shape}")
        if _blank(array):
            raise DemoInputError(EMPTY_DRAWING)
        path = Path(work_dir) / "drawing.png"
        Image.fromarray(array).save(path)
    try:
        image, inverted = load_image(path)
    except ValueError as exc:
        if "blank" in str(exc):
            raise DemoInputError(EMPTY_DRAWING) from None
        raise DemoInputError(f"could not read the drawing: {exc}") from None
    return image, inverted


def _view(image: Tensor) -> np.ndarray:
    return pictures.upscale(image, 8)


def _seen(inverted: bool) -> str:
    return "drawn dark on light, so inverted" if inverted else "light on dark, as MNIST"


def cleanup(
    pipe: Pipeline,
    drawing: Any,
    label: Any,
    strength: Any,
    seed: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Edited:
    """SDEdit (:func:`mnistdiff.edit.sdedit`): noise the sketch to t = strength and denoise."""
    from ..edit import sdedit

    image, inverted = read_drawing(drawing, work_dir)
    y = validate.optional_digit("digit", label, pipe.spec.num_classes)
    t0, s = validate.strength(strength), validate.seed(seed)
    progress(0.0, "cleaning up (SDEdit)")
    out = sdedit(pipe, image[None], t0, None if y is None else [y], seed=s, progress=True)
    what = "unconditional" if y is None else f"as a {y}"
    message = (
        f"SDEdit {what}: noised to t = {t0:g}, denoised in {out.info['steps_run']} steps of "
        f"{out.info['options']['sampler']} (NFE {out.nfe}); your sketch was {_seen(inverted)}"
    )
    return Edited(_view(image), _view(out.images[0]), out.images, None, message)


def complete(
    pipe: Pipeline,
    drawing: Any,
    region: Any,
    box: Any,
    label: Any,
    seed: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Edited:
    """Inpainting (:func:`mnistdiff.edit.inpaint`, RePaint): regenerate the marked region."""
    from ..edit import inpaint, make_mask

    image, inverted = read_drawing(drawing, work_dir)
    spec = validate.region(region, box)
    y = validate.optional_digit("digit", label, pipe.spec.num_classes)
    s = validate.seed(seed)
    mask = make_mask(spec)
    progress(0.0, "completing (RePaint)")
    out = inpaint(pipe, image[None], mask, None if y is None else [y], seed=s, progress=True)
    shown = image.clone()
    shown[mask] = shown[mask] // 3  # the region to regenerate, dimmed
    message = (
        f"RePaint inpainting of the {spec.replace('box:', 'box ')} region (dimmed in the view"
        f"{'' if y is None else f'; as a {y}'}), NFE {out.nfe}; pixels outside it are kept; "
        f"your sketch was {_seen(inverted)}"
    )
    return Edited(_view(shown), _view(out.images[0]), out.images, None, message)


def restyle(
    pipe: Pipeline,
    drawing: Any,
    to_label: Any,
    from_label: Any,
    strength: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Edited:
    """Handwriting transfer (:func:`mnistdiff.edit.restyle`): your style, another digit."""
    from ..edit import restyle as restyle_fn

    image, inverted = read_drawing(drawing, work_dir)
    target = validate.digit("restyle into", to_label, pipe.spec.num_classes)
    source = validate.optional_digit("your digit", from_label, pipe.spec.num_classes)
    t0 = validate.strength(strength)
    progress(0.0, "restyling (invert, then regenerate)")
    out = restyle_fn(pipe, image[None], target, source, strength=t0, progress=True)
    message = (
        f"inverted to t = {t0:g} ({'unconditionally' if source is None else f'as a {source}'}) "
        f"and regenerated as a {target}, NFE {out.nfe}; your sketch was {_seen(inverted)}"
    )
    return Edited(_view(image), _view(out.images[0]), out.images, None, message)


def invert(
    pipe: Pipeline,
    drawing: Any,
    label: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Edited:
    """Inversion (:func:`mnistdiff.edit.invert`) to the noise, then decoding it again."""
    from ..edit import decode, psnr
    from ..edit import invert as invert_fn

    image, inverted = read_drawing(drawing, work_dir)
    y = validate.optional_digit("digit", label, pipe.spec.num_classes)
    labels = None if y is None else [y]
    progress(0.0, "inverting")
    inv = invert_fn(pipe, image[None], labels, progress=True)
    progress(0.5, "reconstructing")
    x, nfe = decode(pipe, inv)
    recon = pipe.to_uint8(x)
    score = float(psnr(recon, image[None]).clamp(max=100.0)[0])
    noise = (inv.latents[0, 0].float().cpu().clamp(-3, 3) + 3) * (255 / 6)
    latent = pictures.upscale(noise.round().to(torch.uint8), 8)  # ε-like latent, ±3 shown
    message = (
        f"inverted to t = {inv.t:g} with {inv.sampling.sampler} ({inv.nfe} NFE"
        f"{'' if y is None else f', as a {y}'}) and decoded back ({nfe} NFE): reconstruction "
        f"PSNR {score:.1f} dB; your sketch was {_seen(inverted)}"
    )
    return Edited(_view(image), _view(recon[0]), recon, latent, message)


# --------------------------------------------------------------------------- Number


@dataclass(frozen=True)
class Composed:
    """A Number answer: the upscaled canvas, the library's composition and the layout."""

    picture: np.ndarray
    composition: Any  # mnistdiff.edit.Composition
    layout: list[dict[str, Any]]
    message: str


def number(
    pipe: Pipeline,
    text: Any,
    seed: Any,
    style: Any = None,
    style_label: Any = None,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Composed:
    """A handwritten number (:func:`mnistdiff.edit.compose`) in one style.

    ``style`` (optional picture) is a reference digit restyled into every digit;
    ``layout`` gives each character's ``box`` (ink columns) and ``offset`` (frame corner) on
    the 28-pixel-high canvas, as :class:`mnistdiff.edit.Composition` records them.
    """
    from ..edit import compose
    from ..edit.compose import check_text

    try:
        chars = check_text(str(text or ""))
    except ValueError as exc:
        raise DemoInputError(str(exc)) from None
    if len(chars) > 12:
        raise DemoInputError(f"at most 12 characters per number, got {len(chars)}")
    s = validate.seed(seed)
    ref = ref_label = None
    if _editor_image(style) is not None:
        ref, _ = read_drawing(style, work_dir)
        ref_label = validate.optional_digit("style digit", style_label, pipe.spec.num_classes)
    progress(0.0, f"writing {chars}")
    start = time.perf_counter()
    comp = compose(pipe, chars, seed=s, style=ref, style_label=ref_label)
    seconds = time.perf_counter() - start
    layout = [
        {"char": c, "box": list(b), "offset": list(o)}
        for c, b, o in zip(comp.text, comp.boxes, comp.offsets, strict=True)
    ]
    how = "the style of your reference digit" if ref is not None else f"style seed {s}"
    message = f"{comp.text} in {how}, NFE {comp.nfe} per digit, {seconds:.1f} s"
    return Composed(pictures.upscale(comp.image), comp, layout, message)


# --------------------------------------------------------------------------- Interpolate


def interpolate(
    pipe: Pipeline,
    seed_a: Any,
    seed_b: Any,
    digit_a: Any,
    digit_b: Any,
    frames: Any,
    *,
    work_dir: str | Path,
    progress: Progress = _no_progress,
) -> Edited:
    """Frames between two samples (:func:`mnistdiff.edit.interpolate`): slerp of the two seeds'
    noise and, for two digits, a mix of their class embeddings."""
    from ..edit import interpolate as interpolate_fn
    from ..images import save_gif

    a, b = validate.seed(seed_a), validate.seed(seed_b)
    n = validate.frames(frames)
    labels = None
    if pipe.conditional:
        labels = (
            validate.digit("digit A", digit_a, pipe.spec.num_classes),
            validate.digit("digit B", digit_b, pipe.spec.num_classes),
        )
    progress(0.0, f"{n} frames")
    out = interpolate_fn(pipe, n, seeds=(a, b), labels=labels)
    frames_up = [pictures.upscale(x, 4) for x in out.images]
    gif = save_gif(frames_up + frames_up[::-1], Path(work_dir) / "interpolation.gif", 120)
    what = "" if labels is None else f", digit {labels[0]} to {labels[1]}"
    message = f"{n} frames from seed {a} to seed {b}{what} (NFE {out.nfe} per frame)"
    return Edited(None, pictures.grid(out.images, n), out.images, gif, message)
