"""Typed, frozen, validated configuration.

A config is a tree of frozen dataclasses (``Config`` with sections ``data``, ``model``,
``diffusion``, ``train``, ``sample``). YAML files and dotted ``key=value`` overrides are merged
as plain dicts, then converted by :func:`from_dict`, which rejects unknown keys (suggesting the
nearest valid one), wrong types and out-of-range values with a message naming the key.
``from_dict(to_dict(cfg)) == cfg`` holds exactly.

Choice lists are read from the registries they name (samplers, backbones, schedules, ...), so
registering a new entry makes it selectable. The ``sample`` section is :class:`SampleOptions`
(plus ``batch_size``): its sampler-specific fields (``eta``, ``s_churn``, ...) are generated from
the options each sampler declares in :data:`mnistdiff.samplers.SAMPLERS`, and the CLI flags of
``sample``/``evaluate`` are generated from its fields (:func:`parse_flag` validates them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text
from .guidance import THRESHOLD_MODES
from .losses import LOSSES
from .parameterization import PARAMETERIZATIONS
from .samplers import SAMPLERS, sampler_options, samplers_taking
from .schedules import GRID_KINDS, SCHEDULE_NAMES, TIME_SAMPLINGS


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and what is allowed."""


Choices = tuple | Callable[[], Iterable]


def _opt(
    default: Any,
    *,
    choices: Choices | None = None,
    lo: float | None = None,
    hi: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    help: str = "",  # noqa: A002
) -> Any:
    """A dataclass field carrying validation metadata.

    Args:
        default: the default value (immutable).
        choices: the allowed values, or a function returning them (a registry read when a
            value is checked, so later registrations count).
        lo: smallest allowed value (inclusive); also applies to the items of a tuple.
        hi: largest allowed value (inclusive).
        check: a rule on the whole (converted) value: returns what is wrong, or None.
        help: one line for docs and ``--help``.
    """
    meta = {"choices": choices, "lo": lo, "hi": hi, "check": check, "help": help}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not allowed; use tuples")
    return field(default=default, metadata=meta)


def _interval_opt(help: str) -> Any:  # noqa: A002
    """An optional ``[t_lo, t_hi]`` time interval in [0, 1] (default None: every t)."""
    return _opt(
        None,
        lo=0.0,
        hi=1.0,
        check=lambda v: (
            None if len(v) == 2 and v[0] <= v[1] else "expected [t_lo, t_hi], t_lo <= t_hi"
        ),
        help=help,
    )


def _registry(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """Choices read from ``module.name`` when checked (for registries that import this module)."""

    def names() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), name))

    return names


def choices_of(meta: Any) -> tuple | None:
    """The allowed values of a field's metadata (None: any value of the right type)."""
    choices = meta.get("choices") if meta else None
    return tuple(choices()) if callable(choices) else choices


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("mnist", choices=_registry("mnistdiff.datasets", "DATASETS"))
    data_dir: str | None = _opt(None, help="IDX folder; else $MNIST_DIR (or $<NAME>_DIR), cache")
    download: bool = _opt(True, help="download missing files from the public mirrors")
    val_size: int = _opt(5000, lo=0, hi=59000, help="held-out training images for validation")
    pad_to_32: bool = _opt(False, help="zero-pad 28x28 images to 32x32")


@dataclass(frozen=True)
class UNetConfig:
    channels: int = _opt(64, lo=8, hi=1024)
    patch_size: int = _opt(1, choices=(1, 2, 4), help="pixel-unshuffle factor before level 0")
    channel_mults: tuple[int, ...] = _opt((1, 2, 2), help="one entry per resolution level")
    num_res_blocks: int = _opt(2, lo=1, hi=8)
    attention_levels: tuple[int, ...] = _opt((2,), help="level indices with self-attention")
    num_heads: int = _opt(4, lo=1, hi=64)
    dropout: float = _opt(0.1, lo=0.0, hi=0.9)


@dataclass(frozen=True)
class DiTConfig:
    size: str = _opt(
        "small", choices=_registry("mnistdiff.models.dit", "DIT_SIZES"), help="named size preset"
    )
    patch_size: int = _opt(4, choices=(2, 4, 7, 8), help="must divide the image size")
    width: int | None = _opt(None, lo=16, hi=4096, help="overrides the preset")
    depth: int | None = _opt(None, lo=1, hi=64, help="overrides the preset")
    heads: int | None = _opt(None, lo=1, hi=64, help="overrides the preset")
    mlp_ratio: float = _opt(4.0, lo=0.5, hi=16.0)
    pos_embed: str = _opt("sincos", choices=("sincos", "learned"))
    dropout: float = _opt(0.0, lo=0.0, hi=0.9)


@dataclass(frozen=True)
class ModelConfig:
    type: str = _opt("unet", choices=_registry("mnistdiff.models", "BACKBONES"))
    conditional: bool = _opt(True, help="class-conditional (with a null label for guidance)")
    guidance_embed: bool = _opt(
        False, help="also take the guidance scale w as an input (guidance-distilled students)"
    )
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = _opt("cosine", choices=SCHEDULE_NAMES)
    prediction: str = _opt("eps", choices=lambda: PARAMETERIZATIONS)
    num_timesteps: int = _opt(1000, lo=10, hi=100000)
    loss: str = _opt("mse", choices=LOSSES)
    min_snr_gamma: float = _opt(0.0, lo=0.0, hi=1000.0, help="0 disables min-SNR weighting")
    time_sampling: str = _opt("uniform", choices=TIME_SAMPLINGS, help="training-time distribution")
    logit_mean: float = _opt(
        0.0, lo=-10.0, hi=10.0, help="logit_normal: mean of logit(t); > 0 = noisier"
    )
    logit_std: float = _opt(1.0, lo=0.01, hi=10.0, help="logit_normal: std of logit(t)")
    label_dropout: float = _opt(0.1, lo=0.0, hi=1.0, help="p(uncond) for classifier-free guidance")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str | None = _opt(None, help="default: runs/<config name>")
    seed: int = _opt(0, lo=0, hi=2**31 - 1)
    epochs: int = _opt(10, lo=1, hi=100000)
    steps: int | None = _opt(None, lo=1, hi=10**9, help="total optimizer steps; beats epochs")
    time_budget_minutes: float | None = _opt(
        None, lo=0.01, hi=1e6, help="wall-clock budget; the LR schedule is fitted to it"
    )
    batch_size: int = _opt(128, lo=1, hi=65536, help="global batch size")
    grad_accum: int = _opt(1, lo=1, hi=1024)
    lr: float = _opt(2e-4, lo=0.0, hi=1.0)
    min_lr: float = _opt(0.0, lo=0.0, hi=1.0)
    lr_schedule: str = _opt("cosine", choices=("cosine", "constant"))
    warmup_steps: int = _opt(200, lo=0, hi=10**7)
    weight_decay: float = _opt(0.0, lo=0.0, hi=10.0)
    adam_beta1: float = _opt(0.9, lo=0.0, hi=1.0)
    adam_beta2: float = _opt(0.999, lo=0.0, hi=1.0)
    grad_clip: float = _opt(1.0, lo=0.0, hi=1e6, help="0 disables clipping")
    ema: bool = _opt(True)
    ema_decay: float = _opt(0.999, lo=0.0, hi=1.0)
    ema_half_life: float | None = _opt(None, lo=0.0, hi=1e9, help="steps; overrides ema_decay")
    ema_start_step: int = _opt(0, lo=0, hi=10**9)
    precision: str = _opt(
        "auto", choices=("auto", "fp32", "bf16", "fp16"), help="auto: bf16 where it is faster"
    )
    device: str = _opt("auto", help="auto | cpu | cuda[:N] | mps")
    num_threads: int | None = _opt(None, lo=1, hi=1024)
    compile: bool = _opt(False, help="torch.compile the backbone")
    nonfinite: str = _opt("stop", choices=("stop", "skip"))
    max_skipped_steps: int = _opt(10, lo=0, hi=10**6)
    log_every: int = _opt(50, lo=1, hi=10**7, help="steps between metrics.jsonl lines")
    val_every: int = _opt(0, lo=0, hi=10**9, help="steps; 0 = at the end of each epoch")
    val_batches: int = _opt(20, lo=0, hi=10**6, help="0 = the whole validation split")
    preview_every_epochs: int = _opt(1, lo=0, hi=10**6, help="0 disables preview grids")
    preview_per_class: int = _opt(8, lo=1, hi=64)
    checkpoint_every: int = _opt(0, lo=0, hi=10**9, help="steps; 0 = at the end of each epoch")
    keep_last: int = _opt(3, lo=1, hi=1000)
    eval_every_epochs: int = _opt(0, lo=0, hi=10**6, help="in-training FD; 0 disables")
    eval_num_samples: int = _opt(1000, lo=10, hi=10**6)
    best_by: str = _opt("val_loss", choices=("val_loss", "fd_mnist"))
    tensorboard: bool = _opt(True)
    progress: bool = _opt(True)


@dataclass(frozen=True)
class _SampleOptionsBase:
    """The sampling options every sampler takes; see :class:`SampleOptions`."""

    sampler: str = _opt("dpmpp_2m", choices=lambda: SAMPLERS, help="a registered sampler")
    steps: int = _opt(10, lo=1, hi=100000, help="dpmpp_2m at 10 NFE: best FD in the README sweep")
    guidance: float = _opt(2.0, lo=0.0, hi=100.0, help="u + w(c - u); 1 = plain conditional")
    guidance_rescale: float = _opt(0.0, lo=0.0, hi=1.0, help="CFG-rescale phi; 0 disables")
    guidance_interval: tuple[float, ...] | None = _interval_opt(
        "[t_lo, t_hi]: guide only there; null: at every t"
    )
    grid: str | None = _opt(None, choices=GRID_KINDS, help="time grid; null: the sampler's own")
    threshold: str = _opt("clip", choices=THRESHOLD_MODES, help="x0 refinement while sampling")
    classifier: str | None = _opt(
        None, help="noisy classifier FILE.safetensors for classifier guidance (train-classifier)"
    )
    classifier_scale: float = _opt(1.0, lo=0.0, hi=1000.0, help="classifier-guidance scale s")

    def __post_init__(self) -> None:
        """Validate (and normalise, e.g. lists to tuples) when constructed directly, too."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _convert(getattr(self, f.name), hints[f.name], f.name, f.metadata)
            object.__setattr__(self, f.name, value)
        _check_consistency(self)

    def sampler_kwargs(self) -> dict[str, float]:
        """Keyword options for the chosen sampler function (those set, i.e. not None)."""
        info = SAMPLERS[self.sampler]
        values = {o.name: getattr(self, o.name) for o in info.options}
        return {k: v for k, v in values.items() if v is not None}

    def record(self) -> dict[str, Any]:
        """Every option needed to reproduce a result: the common ones and the chosen sampler's.

        ``SampleOptions(**opts.record()) == opts``; values are plain (tuples become lists).
        """
        common = [f.name for f in dataclasses.fields(_SampleOptionsBase)]
        names = common + [o.name for o in SAMPLERS[self.sampler].options]
        out = {n: getattr(self, n) for n in names}
        if out["guidance_interval"] is not None:
            out["guidance_interval"] = list(out["guidance_interval"])
        return out

    @classmethod
    def from_config(cls, cfg: _SampleOptionsBase, **overrides: Any) -> SampleOptions:
        """The options a config's ``sample`` section describes; keyword overrides win.

        Changing the sampler resets the section's sampler options the new sampler does not
        take; an override of an option the chosen sampler does not take is an error.

        Raises:
            ConfigError: an invalid value, or an option that does not apply to the sampler.
        """
        names = [f.name for f in dataclasses.fields(SampleOptions)]
        base = {n: getattr(cfg, n) for n in names}
        sampler = overrides.get("sampler", base["sampler"])
        if sampler in SAMPLERS:
            takes = {o.name for o in SAMPLERS[sampler].options}
            for name, opt in sampler_options().items():
                if name in overrides and name not in takes:
                    raise ConfigError(_not_applicable(name, overrides[name], sampler))
                if name not in takes:
                    base[name] = opt.default
        return from_dict({**base, **overrides}, SampleOptions, "sample.")


def _not_applicable(name: str, value: Any, sampler: str) -> str:
    takes = samplers_taking(name)
    return (
        f"sample.{name} ({value!r}) does not apply to sampler {sampler!r}; it is an option of "
        f"{', '.join(takes) if takes else 'no registered sampler'}"
    )


def _sampler_option_fields() -> list[tuple[str, Any, Any]]:
    """One dataclass field per option declared in the sampler registry."""
    out = []
    for opt in sampler_options().values():
        hint = float if opt.default is not None else float | None
        takes = ", ".join(samplers_taking(opt.name))
        meta = _opt(opt.default, lo=opt.lo, hi=opt.hi, help=f"{opt.help} ({takes} only)")
        out.append((opt.name, hint, meta))
    return out


SampleOptions = dataclasses.make_dataclass(
    "SampleOptions",
    _sampler_option_fields(),
    bases=(_SampleOptionsBase,),
    frozen=True,
)
SampleOptions.__module__ = __name__
SampleOptions.__doc__ = """How to sample: lives at the sample/evaluate boundary, never in the model.

    The common fields (``sampler``, ``steps``, ``guidance``, ``guidance_rescale``,
    ``guidance_interval``, ``grid``, ``threshold``, ``classifier``, ``classifier_scale``) are
    declared in this module; one more field
    per option a registered sampler declares (:class:`mnistdiff.samplers.SamplerOption`: ``eta``
    for ddim; ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` for euler and heun) follows from
    :data:`mnistdiff.samplers.SAMPLERS`. An option the chosen sampler does not take must keep
    its default. Construction validates every value (finite, in range, allowed).
    """


@dataclass(frozen=True)
class SampleConfig(SampleOptions):
    """The config's ``sample`` section: :class:`SampleOptions` plus the batch size."""

    batch_size: int = _opt(500, lo=1, hi=100000, help="images per sampling batch")


DISTILL_METHODS = ("guidance", "progressive", "reflow")


@dataclass(frozen=True)
class DistillConfig:
    """How a student was (is being) distilled from a teacher; ``method: null`` = not a student.

    The optimizer, budget, batch, EMA, logging and checkpoints come from the ``train``
    section and the null-label rate from ``diffusion.label_dropout``: distillation is training
    with another loss and a teacher.
    """

    method: str | None = _opt(None, choices=(None, *DISTILL_METHODS), help="null: no teacher")
    teacher: str | None = _opt(None, help="teacher checkpoint or run directory it started from")
    steps: int = _opt(4, lo=1, hi=10000, help="student sampler steps (progressive, reflow)")
    guidance: float = _opt(
        1.4, lo=0.0, hi=100.0, help="the teacher's w, baked into a student without a w input"
    )
    guidance_interval: tuple[float, ...] | None = _interval_opt(
        "[t_lo, t_hi] where the baked-in w applies (1 elsewhere); null: at every t"
    )
    guidance_min: float = _opt(1.0, lo=0.0, hi=100.0, help="w range drawn for a w-input student")
    guidance_max: float = _opt(3.0, lo=0.0, hi=100.0)
    pair_sampler: str = _opt("dpmpp_2m", help="reflow: the teacher's sampler for the pairs")
    pair_steps: int = _opt(6, lo=1, hi=10000, help="reflow: the teacher's steps for the pairs")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections replaced."""
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- conversion


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists), suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(data: dict | None, cls: type = Config, prefix: str = "") -> Any:
    """Build a validated dataclass from a nested dict; missing keys take their defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), list(fields), prefix))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _convert(data[name], hints[name], prefix + name, f.metadata)
    cfg = cls(**kwargs)
    _check_consistency(cfg)
    return cfg


def _unknown_key_message(key: str, valid: list[str], prefix: str) -> str:
    leaf = key[len(prefix) :]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    allowed = ", ".join(prefix + v for v in valid)
    return f"unknown config key '{key}'.{hint} Allowed keys: {allowed}"


def _convert(value: Any, hint: Any, key: str, meta: Any) -> Any:
    """Check ``value`` against the type ``hint`` and the field's metadata; return it converted."""
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, meta)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {args[0].__name__}, got {value!r}")
        item_meta = {**meta, "check": None}
        value = tuple(_convert(v, args[0], f"{key}[{i}]", item_meta) for i, v in enumerate(value))
    else:
        value = _check_scalar(value, hint, key, meta)
    problem = meta["check"](value) if meta and meta.get("check") else None
    if problem:
        raise ConfigError(
            f"{key}: {problem}, got {list(value) if isinstance(value, tuple) else value!r}"
        )
    return value


def _check_scalar(value: Any, hint: type, key: str, meta: Any) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not allowed; expected a finite number")
    choices = choices_of(meta)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(choices)}")
    lo = meta.get("lo") if meta else None
    hi = meta.get("hi") if meta else None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}: {value!r} is out of range; allowed [{lo}, {hi}]")
    return value


def _check_consistency(cfg: Any) -> None:
    """Cross-field rules that a single field's metadata cannot express."""
    is_diffusion = isinstance(cfg, DiffusionConfig)
    if is_diffusion and cfg.prediction == "velocity" and cfg.schedule != "flow":
        raise ConfigError(
            "diffusion.prediction: 'velocity' requires diffusion.schedule 'flow' "
            "(for variance-preserving schedules use 'eps', 'x0' or 'v')"
        )
    if isinstance(cfg, UNetConfig):
        if not cfg.channel_mults:
            raise ConfigError("model.unet.channel_mults: needs at least one level")
        bad = [i for i in cfg.attention_levels if not 0 <= i < len(cfg.channel_mults)]
        if bad:
            raise ConfigError(
                f"model.unet.attention_levels: {bad} out of range; levels are "
                f"0..{len(cfg.channel_mults) - 1} (one per channel_mults entry)"
            )
    if isinstance(cfg, _SampleOptionsBase):
        _check_sample_options(cfg)
    if isinstance(cfg, DistillConfig) and cfg.guidance_min > cfg.guidance_max:
        raise ConfigError(
            f"distill.guidance_min {cfg.guidance_min} must be <= distill.guidance_max "
            f"{cfg.guidance_max}"
        )
    if isinstance(cfg, TrainConfig) and cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} must be divisible by train.grad_accum "
            f"{cfg.grad_accum}"
        )


def _check_sample_options(opts: Any) -> None:
    takes = {o.name for o in SAMPLERS[opts.sampler].options}
    for name, opt in sampler_options().items():
        value = getattr(opts, name)
        if name not in takes and value != opt.default:
            raise ConfigError(_not_applicable(name, value, opts.sampler))


def parse_flag(cls: type, name: str, text: str, flag: str | None = None) -> Any:
    """Parse a command-line value for field ``name`` of ``cls`` and validate it like the config.

    The text is read as YAML (as ``--set`` values are); a tuple field takes comma-separated
    items. Errors name ``flag`` (default ``--<name>``).

    Raises:
        ConfigError: the value has the wrong type or is not allowed.
    """
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    flag = flag or "--" + name.replace("_", "-")
    is_tuple = "tuple" in str(hint) and _yaml_value(text) is not None  # "null": no tuple
    value = [_yaml_value(v) for v in text.split(",")] if is_tuple else _yaml_value(text)
    return _convert(value, hint, flag, meta)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------- files, overrides


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; clear errors for missing files and bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}': empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of ``data`` with dotted overrides applied (validation comes later)."""
    import copy

    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for parts, value in items:
        parts = parts.split(".") if isinstance(parts, str) else parts
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(parts)}: '{p}' must be a section (a mapping of keys), "
                    f"got {child!r}"
                )
            node = child
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, dump_yaml(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """List ``(key, a_value, b_value)`` for every leaf that differs between two configs."""
    out = []
    da, db = (to_dict(x) if dataclasses.is_dataclass(x) else x for x in (a, b))
    for key in sorted(set(da) | set(db)):
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((prefix + key, va, vb))
    return out
