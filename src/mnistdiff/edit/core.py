"""Shared machinery of the editing methods: inputs in model range, denoise functions, partial
time grids, forward noising and a step-by-step driver with a per-step hook.

Editing is sampling with a different start and a constraint (``docs/architecture.md``): every
method here runs the registry's samplers (:mod:`mnistdiff.samplers`) on a part of an ordinary
time grid, never a copy of a sampler. A partial grid ``ts`` starts at ``t_start`` and continues
with the points of the full grid below it, so ``strength * steps`` steps of the full grid run.

Options are sampling's own :class:`~mnistdiff.config.SampleOptions` (:func:`sampling`): every
option ``sample`` takes (guidance rescale and interval, each sampler's ``eta`` / churn, ...) acts
in edits the same way, through the same denoise function (:func:`mnistdiff.sample.denoise_fn`)
and ``SampleOptions.sampler_kwargs()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..build import prepare_images
from ..config import SampleOptions
from ..samplers import SampleResult, get_sampler, steps_for_nfe
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


def sampling(
    pipe: Pipeline,
    base: SampleOptions | None = None,
    *,
    deterministic: bool = False,
    ode: bool = False,
    **overrides: Any,
) -> SampleOptions:
    """The :class:`~mnistdiff.config.SampleOptions` of one edit: overrides win, else ``base``.

    The options are the ones ``sample`` takes (``sampler``, ``steps``, ``guidance``,
    ``guidance_rescale``, ``guidance_interval``, ``grid``, ``threshold`` and the chosen sampler's
    own, e.g. ``eta`` or ``s_churn``), resolved as :meth:`mnistdiff.sample.Pipeline.default_options`
    resolves them; an option the chosen sampler does not take is an error.

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        base: the options to start from (default: the checkpoint config's ``sample`` section).
        deterministic: the edit needs the sampler to draw no noise (interpolation): a stochastic
            sampler or an explicit noise option above 0 (``eta``, ``s_churn``) is an error,
            and ones that come from ``base`` are set to 0.
        ode: the edit runs the sampler backwards (inversion); implies ``deterministic``.
            ``base``'s sampler is replaced by ``ddim`` when it cannot run backwards; an explicit
            one that cannot is an error.
        **overrides: option values (None = keep); ``nfe`` picks the steps giving that many
            network evaluations.

    Raises:
        ValueError: (:class:`~mnistdiff.config.ConfigError` for option values) a bad or
            inapplicable option, steps and nfe together, noise where the edit cannot take it.
    """
    section = pipe.cfg.sample if base is None else base
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if ode and "sampler" not in chosen and section.sampler not in ODE_SAMPLERS:
        chosen["sampler"] = "ddim"
    sampler = chosen.get("sampler", section.sampler)
    if ode:
        check_ode_sampler(sampler)
    nfe = chosen.pop("nfe", None)
    if nfe is not None:
        if "steps" in chosen:
            raise ValueError("give steps or nfe, not both")
        chosen["steps"] = steps_for_nfe(sampler, nfe)
    opts = SampleOptions.from_config(section, **chosen)
    return _without_noise(opts, chosen) if (deterministic or ode) else opts


def noise_options(opts: SampleOptions) -> dict[str, float]:
    """The chosen sampler's options that make it draw noise with their current values."""
    declared = get_sampler(opts.sampler).options
    values = {o.name: getattr(opts, o.name) for o in declared if o.adds_noise}
    return {k: v for k, v in values.items() if v is not None and v > 0}


def _without_noise(opts: SampleOptions, given: dict[str, Any]) -> SampleOptions:
    """``opts`` with the noise options not in ``given`` set to 0; given ones are an error."""
    if get_sampler(opts.sampler).stochastic:
        raise ValueError(
            f"this edit needs a deterministic sampler; {opts.sampler!r} draws noise at every "
            f"step (deterministic: {', '.join(ODE_SAMPLERS)}, dpmpp_2m, ...)"
        )
    noisy = noise_options(opts)
    asked = {k: v for k, v in noisy.items() if k in given}
    if asked:
        name, value = next(iter(asked.items()))
        raise ValueError(
            f"this edit runs the sampler as a deterministic ODE (inversion, interpolation), "
            f"but {name}={value} makes {opts.sampler} draw noise; use {name}=0"
        )
    return dataclasses.replace(opts, **dict.fromkeys(noisy, 0.0)) if noisy else opts


def grid_for(opts: SampleOptions, schedule: Schedule) -> Tensor:
    """The full descending grid of ``opts`` (float64, ends at 0)."""
    return full_grid(schedule, opts.sampler, opts.steps, opts.grid)


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
    pipe: Pipeline,
    labels: Sequence[int] | Tensor | int | None,
    n: int,
    opts: SampleOptions | None = None,
) -> Tensor | None:
    """Labels ``[n]`` (an int is repeated) checked against the model's classes, or None.

    An unconditional model takes labels only where the edit steers with a noisy classifier
    (``opts.classifier``, classifier guidance): pass the edit's ``opts`` there.

    Raises:
        ValueError: labels on an unconditional model without a classifier, a wrong count or a
            label out of range.
    """
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    if not pipe.conditional and (opts is None or opts.classifier is None):
        steer = "" if opts is None else ", or steer it with a noisy classifier (--classifier)"
        raise ValueError(
            "this model is unconditional: it cannot take a label here (train with "
            f"model.conditional=true{steer})"
        )
    k = pipe.spec.num_classes
    if bool(((labels < 0) | (labels >= k)).any()):
        bad = sorted({int(v) for v in labels if not 0 <= v < k})
        raise ValueError(f"labels {bad} are outside the model's classes 0..{k - 1}")
    return labels


def denoise_fn(pipe: Pipeline, labels: Tensor | None, opts: SampleOptions) -> Denoise:
    """The pipeline's denoise function as sampling builds it (:func:`mnistdiff.sample.denoise_fn`).

    Args:
        pipe: a :class:`mnistdiff.sample.Pipeline`.
        labels: int64 ``[B]`` or None (null label).
        opts: guidance (``u + w (c - u)``, rescale, interval), classifier guidance
            (``classifier``, ``classifier_scale``) and threshold apply.
    """
    from ..sample import denoise_fn as sampling_denoise_fn
    from ..sample import guidance_classifier

    y = None if labels is None else labels.to(pipe.device)
    classifier = guidance_classifier(pipe.denoiser, opts, y)
    return sampling_denoise_fn(pipe.denoiser, y, opts, pipe.conditional, pipe.precision, classifier)


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


def run_sampler(
    sampler: str,
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    gen: torch.Generator | None = None,
    sampler_kwargs: Mapping[str, float] | None = None,
) -> SampleResult:
    """Run registry sampler ``sampler`` from ``x`` at ``ts[0]`` along ``ts`` (no copy of it).

    ``sampler_kwargs`` are its own options (``SampleOptions.sampler_kwargs()``).
    """
    info = get_sampler(sampler)
    return info.fn(denoise, x, schedule, ts, generator=gen, **(sampler_kwargs or {}))


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
    sampler_kwargs: Mapping[str, float] | None = None,
    progress: bool = False,
    desc: str = "editing",
) -> SampleResult:
    """Run the sampler one grid interval at a time with a per-step hook and resampling jumps.

    After each interval ``[ts[i], ts[i + 1]]`` the state becomes ``hook(i, x, ts[i + 1])``
    (how constraints enter, e.g. RePaint's known pixels). With ``resample = R > 1`` every
    interval except the last is redone R times, jumping back by the forward transition
    ``q(x_(ts[i]) | x_(ts[i + 1]))`` in between (RePaint, Lugmayr et al. 2022, Alg. 1).

    For the one-step samplers (ddpm, ddim, euler, heun), ``hook = None`` and ``R = 1`` give
    exactly one run over the whole grid, sampler options included (Karras churn is set per
    grid, ``gamma = s_churn / N``, so each interval gets ``s_churn / N``); a multistep sampler
    restarts its history at every interval (first order), since the hook changes the state
    between steps.

    Returns:
        The final state and the NFE per image.
    """
    from tqdm import tqdm

    _positive_int("resample", resample)
    kwargs = _per_interval(dict(sampler_kwargs or {}), len(ts) - 1)
    nfe = 0
    for i in tqdm(range(len(ts) - 1), desc=desc, disable=not progress, leave=False):
        t_now, t_next = float(ts[i]), float(ts[i + 1])
        for u in range(resample if t_next > 0.0 else 1):
            if u > 0:  # jump back up to t_now and redo the step
                noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
                x = renoise(schedule, x, t_next, t_now, noise)
            out = run_sampler(
                sampler, denoise, x, schedule, ts[i : i + 2], gen=gen, sampler_kwargs=kwargs
            )
            x, nfe = out.x, nfe + out.nfe
            if hook is not None:
                x = hook(i, x, t_next)
    return SampleResult(x, nfe)


def _per_interval(kwargs: dict[str, float], steps: int) -> dict[str, float]:
    """Options for one interval of a ``steps``-step grid (churn is given for the whole grid)."""
    if "s_churn" in kwargs:
        kwargs["s_churn"] = kwargs["s_churn"] / steps
    return kwargs


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
    opts: SampleOptions,
    *,
    gen: torch.Generator | None = None,
) -> SampleResult:
    """Start the configured sampler (with its options) at ``(x, ts[0])`` and run it along ``ts``."""
    fn = denoise_fn(pipe, labels, opts)
    schedule = pipe.denoiser.schedule
    kwargs = opts.sampler_kwargs()
    return run_sampler(opts.sampler, fn, x, schedule, ts, gen=gen, sampler_kwargs=kwargs)


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
