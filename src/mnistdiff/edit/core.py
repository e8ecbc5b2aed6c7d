"""Shared machinery of the editing methods: inputs in model range, denoise functions, partial
time grids, forward noising and a step-by-step driver with a per-step hook.

Editing is sampling with a different start and a constraint (``docs/architecture.md``): every
method here runs the registry's samplers (:mod:`mnistdiff.samplers`) on a part of an ordinary
time grid, never a copy of a sampler. A partial grid ``ts`` starts at ``t_start`` and continues
with the points of the full grid below it, so ``strength * steps`` steps of the full grid run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..build import prepare_images
from ..guidance import classifier_free, thresholded, unconditional
from ..samplers import SampleResult, get_sampler
from ..schedules import Schedule, time_grid
from ..seeding import seed_for
from ..transforms import crop_to, from_model_range, original_size

if TYPE_CHECKING:
    from ..sample import Pipeline


Denoise = Callable[[Tensor, Tensor], Tensor]
StepHook = Callable[[int, Tensor, float], Tensor]

#: Deterministic samplers that can run backwards (inversion, interpolation of images).
ODE_SAMPLERS = ("ddim", "euler", "heun")


@dataclass(frozen=True)
class EditResult:
    """What an editing method returns.

    Attributes:
        images: uint8 ``[N, 28, 28]`` results (padding removed).
        labels: int64 ``[N]`` labels the results were generated with (-1 = none).
        nfe: network evaluations per image (guided batches count once, as in sampling).
        info: method-specific figures (e.g. PSNR per image), plain Python data.
    """

    images: Tensor
    labels: Tensor
    nfe: int
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings of one edit (the config's ``sample`` section + overrides).

    Attributes:
        sampler: registry name.
        steps: steps of the FULL grid; a partial start (strength < 1) runs the part below it.
        grid: time-grid kind, or None for the sampler's own.
        guidance: classifier-free scale ``w`` (1 = plain conditional).
        eta: DDIM stochasticity.
        threshold: x0_hat refinement (``none`` / ``clip`` / ``dynamic``).
    """

    sampler: str
    steps: int
    grid: str | None
    guidance: float
    eta: float
    threshold: str

    def grid_for(self, schedule: Schedule) -> Tensor:
        """The full descending grid (float64, ends at 0)."""
        return full_grid(schedule, self.sampler, self.steps, self.grid)


def sampling(
    pipe: Pipeline,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    threshold: str | None = None,
    ode: bool = False,
) -> Sampling:
    """Resolve sampling settings: explicit values win, else the checkpoint's config.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        sampler, steps, grid, guidance, eta, threshold: overrides (None = the config's).
        nfe: pick the steps giving this many network evaluations (instead of ``steps``).
        ode: the edit runs the sampler backwards; the config's sampler is replaced by ``ddim``
            when it cannot, and an explicit one that cannot is an error.
    """
    cfg = pipe.cfg.sample
    if sampler is None:
        sampler = cfg.sampler if (not ode or cfg.sampler in ODE_SAMPLERS) else "ddim"
    if ode:
        check_ode_sampler(sampler)
    info = get_sampler(sampler)
    if nfe is not None and steps is not None:
        raise ValueError("give steps or nfe, not both")
    if nfe is not None:
        steps = info.steps_for_nfe(_positive_int("nfe", nfe))
    steps = _positive_int("steps", cfg.steps if steps is None else steps)
    guidance = cfg.guidance if guidance is None else float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance!r}")
    eta = 0.0 if ode else (cfg.eta if eta is None else float(eta))
    return Sampling(sampler, steps, grid or cfg.grid, guidance, eta, threshold or cfg.threshold)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_images(images: Tensor) -> Tensor:
    """Validate uint8 images ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> uint8 ``[N, 28, 28]``."""
    images = torch.as_tensor(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dtype != torch.uint8 or images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty uint8 tensor [N, 28, 28], got {images.dtype} "
            f"{tuple(images.shape)} (mnistdiff.edit.load_inputs converts files)"
        )
    if tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"images must be 28x28, got {tuple(images.shape[1:])}")
    return images


def to_model(pipe: Pipeline, images: Tensor) -> Tensor:
    """uint8 ``[N, 28, 28]`` -> model-range float ``[N, 1, S, S]`` on the pipeline's device."""
    return prepare_images(check_images(images), pipe.cfg.data).to(pipe.device)


def to_uint8(pipe: Pipeline, x: Tensor) -> Tensor:
    """Model-range ``[N, 1, S, S]`` -> uint8 ``[N, 28, 28]`` on the CPU."""
    return from_model_range(crop_to(x.float().cpu(), original_size(pipe.spec, pipe.cfg.data)))


def check_labels(
    pipe: Pipeline, labels: Sequence[int] | Tensor | int | None, n: int
) -> Tensor | None:
    """Labels ``[n]`` (an int is repeated) checked against the model's classes, or None.

    Raises:
        ValueError: labels on an unconditional model, a wrong count or a label out of range.
    """
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    if not pipe.conditional:
        raise ValueError(
            "this model is unconditional: it cannot take a label (train with "
            "model.conditional=true, or steer it with a noisy classifier)"
        )
    k = pipe.spec.num_classes
    if bool(((labels < 0) | (labels >= k)).any()):
        bad = sorted({int(v) for v in labels if not 0 <= v < k})
        raise ValueError(f"labels {bad} are outside the model's classes 0..{k - 1}")
    return labels


def denoise_fn(
    pipe: Pipeline, labels: Tensor | None, opts: Sampling, model: Callable | None = None
) -> Denoise:
    """The pipeline's denoise function with classifier-free guidance and thresholding.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        labels: int64 ``[B]`` or None (null label).
        opts: sampling settings (guidance scale ``w`` in ``u + w (c - u)``, threshold).
        model: ``model(x, t, y) -> x0_hat`` to use instead of the pipeline's denoiser.
    """
    denoiser = pipe.denoiser

    def plain(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with pipe.precision.autocast(x.device):
            return denoiser(x, t, y)

    model = model or plain
    if labels is None or not pipe.conditional:
        fn = unconditional(model, denoiser.null_label)
    else:
        fn = classifier_free(model, labels.to(pipe.device), opts.guidance, denoiser.null_label)
    return thresholded(fn, opts.threshold)


def full_grid(schedule: Schedule, sampler: str, steps: int, grid: str | None = None) -> Tensor:
    """The descending grid ``sampler`` would use for ``steps`` steps (float64, ends at 0)."""
    return time_grid(schedule, grid or get_sampler(sampler).default_grid, steps)


def truncate_grid(ts: Tensor, t_start: float) -> Tensor:
    """``[t_start, points of ts below t_start]``: start a descending grid at ``t_start``.

    Raises:
        ValueError: ``t_start`` outside (0, 1].
    """
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"start time must be in (0, 1], got {t_start!r}")
    below = ts[ts < t_start - 1e-12]
    return torch.cat([torch.tensor([t_start], dtype=torch.float64), below])


def check_strength(strength: float) -> float:
    """SDEdit/restyle depth: the start time, in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1] (the start time t), got {strength!r}")
    return float(strength)


def alpha_sigma(schedule: Schedule, t: float) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` as Python floats."""
    a, s = schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return float(a), float(s)


def noise_to(schedule: Schedule, x0: Tensor, t: float, noise: Tensor) -> Tensor:
    """Forward process ``x_t = alpha_t x0 + sigma_t noise`` (Ho et al. 2020, eq. 4)."""
    a, s = alpha_sigma(schedule, t)
    return a * x0 + s * noise


def renoise(schedule: Schedule, x_s: Tensor, s: float, t: float, noise: Tensor) -> Tensor:
    """Forward transition ``q(x_t | x_s)`` for ``s < t``: ``(a_t/a_s) x_s + sigma_{t|s} noise``.

    ``sigma_{t|s}^2 = sigma_t^2 - (a_t/a_s)^2 sigma_s^2`` (Kingma et al. 2021, eq. 2-3); used by
    RePaint's resampling jumps.
    """
    a_s, s_s = alpha_sigma(schedule, s)
    a_t, s_t = alpha_sigma(schedule, t)
    ratio = a_t / a_s
    return ratio * x_s + math.sqrt(max(s_t * s_t - (ratio * s_s) ** 2, 0.0)) * noise


def generator(pipe: Pipeline, seed: int, stream: int = 0) -> torch.Generator:
    """A generator on the pipeline's device seeded from ``(seed, stream)``."""
    return torch.Generator(device=pipe.device).manual_seed(seed_for(seed, stream))


def randn(pipe: Pipeline, n: int, gen: torch.Generator) -> Tensor:
    """Standard normal noise ``[n, C, S, S]`` in the model's image shape."""
    return torch.randn((n, *pipe.denoiser.image_shape), generator=gen, device=pipe.device)


def sampler_options(sampler: str, eta: float) -> dict:
    """Keyword options the sampler takes (only DDIM has ``eta``)."""
    return {"eta": eta} if sampler == "ddim" else {}


def run_sampler(
    sampler: str,
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    gen: torch.Generator | None = None,
    eta: float = 0.0,
) -> SampleResult:
    """Run registry sampler ``sampler`` from ``x`` at ``ts[0]`` along ``ts`` (no copy of it)."""
    info = get_sampler(sampler)
    return info.fn(denoise, x, schedule, ts, generator=gen, **sampler_options(sampler, eta))


def run_steps(
    sampler: str,
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    hook: StepHook | None = None,
    resample: int = 1,
    gen: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
    desc: str = "editing",
) -> SampleResult:
    """Run the sampler one grid interval at a time with a per-step hook and resampling jumps.

    After each interval ``[ts[i], ts[i + 1]]`` the state becomes ``hook(i, x, ts[i + 1])``
    (how constraints enter, e.g. RePaint's known pixels). With ``resample = R > 1`` every
    interval except the last is redone R times, jumping back by the forward transition
    ``q(x_(ts[i]) | x_(ts[i + 1]))`` in between (RePaint, Lugmayr et al. 2022, Alg. 1).

    For the one-step samplers (ddpm, ddim, euler, heun), ``hook = None`` and ``R = 1`` give
    exactly one run over the whole grid; a multistep sampler restarts its history at every
    interval (first order), since the hook changes the state between steps.

    Returns:
        The final state and the NFE per image.
    """
    from tqdm import tqdm

    _positive_int("resample", resample)
    nfe = 0
    for i in tqdm(range(len(ts) - 1), desc=desc, disable=not progress, leave=False):
        t_now, t_next = float(ts[i]), float(ts[i + 1])
        for u in range(resample if t_next > 0.0 else 1):
            if u > 0:  # jump back up to t_now and redo the step
                noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
                x = renoise(schedule, x, t_next, t_now, noise)
            out = run_sampler(sampler, denoise, x, schedule, ts[i : i + 2], gen=gen, eta=eta)
            x, nfe = out.x, nfe + out.nfe
            if hook is not None:
                x = hook(i, x, t_next)
    return SampleResult(x, nfe)


def check_ode_sampler(sampler: str) -> None:
    """Inversion needs a deterministic one-step ODE sampler."""
    get_sampler(sampler)
    if sampler not in ODE_SAMPLERS:
        raise ValueError(
            f"sampler {sampler!r} cannot run backwards; allowed for inversion: "
            f"{', '.join(ODE_SAMPLERS)}"
        )


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image of uint8 images (dB; inf when identical)."""
    diff = a.double().flatten(1) - b.double().flatten(1)
    mse = diff.pow(2).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def sample_from(
    pipe: Pipeline,
    x: Tensor,
    ts: Tensor,
    labels: Tensor | None,
    opts: Sampling,
    *,
    gen: torch.Generator | None = None,
    model: Callable | None = None,
) -> SampleResult:
    """Start the configured sampler at ``(x, ts[0])`` and run it along ``ts``."""
    fn = denoise_fn(pipe, labels, opts, model)
    return run_sampler(opts.sampler, fn, x, pipe.denoiser.schedule, ts, gen=gen, eta=opts.eta)


def batches(n: int, batch_size: int | None, pipe) -> list[slice]:
    """Contiguous slices of ``n`` rows, ``batch_size`` (default: the config's) at a time."""
    size = batch_size or pipe.cfg.sample.batch_size
    _positive_int("batch_size", size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rows(labels: Tensor | None, sl: slice) -> Tensor | None:
    """``labels[sl]`` or None."""
    return None if labels is None else labels[sl]


def label_or_none(labels: Tensor | None, n: int) -> Tensor:
    """Labels for a result: the given ones, or -1 for every row."""
    return torch.full((n,), -1, dtype=torch.long) if labels is None else labels.cpu().long()
