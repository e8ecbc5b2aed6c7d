"""Sampling: rebuild a model from a checkpoint or export and generate images.

``Pipeline.load(path)`` accepts a run directory, a ``.pt`` checkpoint or an export directory and
never asks for architecture flags: everything comes from the saved config. ``generate`` is the
engine shared by the CLI, the training previews and the evaluator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .build import build_denoiser
from .checkpoint import checkpoint_config, load_checkpoint, load_weights, read_export, resolve
from .config import Config, SampleOptions
from .data import DataSpec
from .device import Precision, select_device, select_precision
from .distributed import DistContext, batch_shares, gather_rows, share_rows
from .guidance import (
    classifier_free,
    classifier_guided,
    guidance_input,
    thresholded,
    unconditional,
)
from .parameterization import Denoiser
from .samplers import get_sampler, initial_sample, steps_for_nfe
from .schedules import time_grid
from .seeding import seed_for
from .transforms import crop_to, from_model_range, original_size


@dataclass(frozen=True)
class Samples:
    """Generated images in model range ``[N, 1, S, S]``, their labels (-1 = none), the solver's
    NFE (denoise calls per image) and the network passes per image that cost (classifier-free
    guidance runs two per call, a guidance-distilled model one)."""

    x: Tensor
    labels: Tensor
    nfe: int
    passes_per_image: float = 0.0


class _PassCounter:
    """Counts the rows the network sees: rows / images = network passes per image."""

    def __init__(self) -> None:
        self.rows = 0


def denoise_fn(
    denoiser: Denoiser,
    labels: Tensor | None,
    opts: SampleOptions,
    conditional: bool,
    precision: Precision,
    classifier=None,
    counter: _PassCounter | None = None,
) -> Callable:
    """The denoise function sampling and editing run: guidance(s), then thresholding.

    Args:
        denoiser: the model (``denoiser(x, t, y) -> x0_hat``), run under ``precision``.
        labels: int64 ``[B]`` on the model's device, or None (null label).
        opts: ``guidance`` (``u + w (c - u)``), ``guidance_rescale``, ``guidance_interval``
            and ``threshold`` apply.
        conditional: whether the model takes labels (else labels are ignored).
        precision: the autocast policy.
        classifier: a noisy classifier for classifier guidance (``opts.classifier_scale``),
            loaded by :func:`guidance_classifier`, or None.
        counter: counts the rows the network sees (network passes per image).

    Returns:
        ``denoise(x, t) -> x0_hat``.
    """
    counter = counter or _PassCounter()

    def model(x: Tensor, t: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        counter.rows += x.shape[0]
        with precision.autocast(x.device):
            return denoiser(x, t, y, w)

    if labels is None or not conditional:
        fn = unconditional(model, denoiser.null_label)
    elif denoiser.accepts_guidance:  # guidance-distilled: one pass with w as an input
        if opts.guidance_rescale:
            raise ValueError(
                "guidance rescale needs classifier-free guidance's two passes; this "
                "guidance-distilled model takes the scale as an input (drop it)"
            )
        fn = guidance_input(model, labels, opts.guidance, interval=opts.guidance_interval)
    else:
        fn = classifier_free(
            model,
            labels,
            opts.guidance,
            denoiser.null_label,
            rescale=opts.guidance_rescale,
            interval=opts.guidance_interval,
        )
    if classifier is not None:
        fn = classifier_guided(fn, classifier, labels, opts.classifier_scale, denoiser.schedule)
    return thresholded(fn, opts.threshold)


def guidance_classifier(denoiser: Denoiser, opts: SampleOptions, labels: Tensor | None):
    """The checked classifier of ``opts.classifier`` on the model's device, or None (sampling
    and editing both load it here).

    Raises:
        ValueError: a classifier without labels to steer to.
        mnistdiff.noisy_classifier.ClassifierError: a classifier of another schedule or shape.
    """
    if opts.classifier is None:
        return None
    from .noisy_classifier import check_compatible

    if labels is None:
        raise ValueError("classifier guidance needs labels: give the digits to steer to")
    device = next(denoiser.parameters()).device
    stat = Path(opts.classifier).stat() if Path(opts.classifier).exists() else None
    stamp = None if stat is None else (stat.st_mtime_ns, stat.st_size)
    classifier = _loaded_classifier(str(opts.classifier), stamp, str(device))
    check_compatible(classifier, denoiser.schedule, denoiser.image_shape, denoiser.num_classes)
    return classifier


@functools.lru_cache(maxsize=4)
def _loaded_classifier(path: str, stamp, device: str) -> torch.nn.Module:
    """``load_classifier(path, device)`` once per file version (``stamp``: mtime and size):
    streaming calls :func:`generate` per batch, and the classifier (frozen, eval mode) is
    shared read-only. A rewritten file has a new stamp, so it is loaded and verified again."""
    from .noisy_classifier import load_classifier

    del stamp  # only part of the cache key
    return load_classifier(path, device)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    labels: Tensor | None,
    num: int,
    opts: SampleOptions,
    *,
    seed: int = 0,
    batch_size: int = 500,
    conditional: bool = True,
    precision: Precision | None = None,
    progress: bool = False,
    callback: Callable | None = None,
    batches: range | None = None,
) -> Samples:
    """Generate ``num`` images (labels ``[num]`` or None for unconditional).

    Batch ``b`` (images ``[b * batch_size, (b + 1) * batch_size)``) uses a generator seeded from
    ``(seed, b)``: the same seed and batch size give the same images, whichever batches are
    generated together. ``batches`` picks a contiguous run of these batch indices (default all;
    a rank of a distributed job passes its share); the result then holds only their rows.
    ``callback(i, x_t, x0_hat)`` sees every step of batch 0 (when it is generated).
    """
    batches = _check_batches(num, batch_size, batches)
    device = next(denoiser.parameters()).device
    precision = precision or select_precision("fp32", device)
    info = get_sampler(opts.sampler)
    ts = time_grid(denoiser.schedule, opts.grid or info.default_grid, opts.steps)
    spec_shape = denoiser.image_shape
    classifier = guidance_classifier(denoiser, opts, labels)
    outs, nfe, counter, images = [], 0, _PassCounter(), 0
    for b in tqdm(batches, desc="sampling", disable=not progress, leave=False):
        start = b * batch_size
        n = min(batch_size, num - start)
        gen = torch.Generator(device=device).manual_seed(seed_for(seed, b))
        noise = torch.randn((n, *spec_shape), generator=gen, device=device)
        y = None if labels is None else labels[start : start + n].to(device)
        fn = denoise_fn(denoiser, y, opts, conditional, precision, classifier, counter)
        images += n
        x = initial_sample(denoiser.schedule, ts, noise)
        result = info.fn(
            fn,
            x,
            denoiser.schedule,
            ts,
            generator=gen,
            callback=callback if b == 0 else None,
            **opts.sampler_kwargs(),
        )
        outs.append(result.x.float().cpu())
        nfe = result.nfe  # per batch; identical for every batch
    x = torch.cat(outs) if outs else torch.empty((0, *spec_shape))
    rows = share_rows(batches, num, batch_size)
    out_labels = labels[rows.start : rows.stop].cpu() if labels is not None else None
    if out_labels is None:
        out_labels = torch.full((len(rows),), -1)
    passes = counter.rows / images if images else 0.0
    return Samples(x=x, labels=out_labels.long(), nfe=nfe, passes_per_image=passes)


def _check_batches(num: int, batch_size: int, batches: range | None) -> range:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    total = -(-num // batch_size)
    if batches is None:
        return range(total)
    if batches.step != 1 or not 0 <= batches.start <= batches.stop <= total:
        raise ValueError(
            f"batches {batches}: expected a contiguous run within range({total}) "
            f"({num} images in batches of {batch_size})"
        )
    return batches


def sample_across_ranks(
    pipe: Pipeline,
    labels: Tensor | None,
    num: int,
    ctx: DistContext,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    callback: Callable | None = None,
    **options,
) -> tuple[Tensor | None, int, float]:
    """uint8 images ``[num, H, W]`` generated by all ranks of ``ctx``, gathered on rank 0.

    Every rank samples its contiguous share of the global batches
    (:func:`mnistdiff.distributed.batch_shares`); the images equal those of one process with
    the same seed and batch size (default ``sample.batch_size`` of the config). Only rank 0
    shows progress; ``callback`` sees batch 0, which rank 0 samples.

    Returns:
        ``(images on rank 0 / None on the others, solver NFE per image, network passes per
        image)``: classifier-free guidance makes two passes per denoise call, a
        guidance-distilled model one.
    """
    size = batch_size or pipe.cfg.sample.batch_size
    shares = batch_shares(num, size, ctx.world_size)
    out = pipe.generate(
        labels,
        num,
        seed=seed,
        batch_size=size,
        progress=progress and ctx.is_main,
        callback=callback,
        batches=shares[ctx.rank],
        **options,
    )
    counts = [len(share_rows(s, num, size)) for s in shares]
    return gather_rows(pipe.to_uint8(out.x), counts, ctx), out.nfe, out.passes_per_image


def label_tensor(
    digits: Sequence[int] | None = None,
    per_class: int | None = None,
    num: int | None = None,
    num_classes: int = 10,
) -> Tensor:
    """Labels for a request: ``per_class`` rows of every class, or ``num`` cycling ``digits``."""
    if per_class is not None:
        return torch.arange(num_classes).repeat_interleave(per_class)
    digits = list(range(num_classes)) if not digits else list(digits)
    bad = [d for d in digits if not 0 <= d < num_classes]
    if bad:
        raise ValueError(f"digits {bad} out of range; allowed 0..{num_classes - 1}")
    num = num if num is not None else 8 * len(digits)
    # digit-major order so a grid with len(digits) rows shows one class per row
    reps = -(-num // len(digits))
    return torch.tensor(digits).repeat_interleave(reps)[:num]


class Pipeline:
    """A loaded model ready to sample; ``mnistdiff.load(path)`` returns one.

    Example::

        pipe = mnistdiff.load("runs/quick")
        images = pipe.sample([7] * 16, sampler="euler", steps=20, guidance=1.5)  # uint8 [16,28,28]

    Attributes:
        cfg: the config saved with the weights (its ``sample`` section gives the defaults).
        spec: the data shape the model was trained on.
        denoiser: the :class:`~mnistdiff.parameterization.Denoiser` (EMA weights by default).
        device: where the model runs.
        precision: the autocast policy used while sampling.
        source: the resolved checkpoint or export path.
        info: ``step``, ``epoch`` and whether the EMA weights were loaded.
    """

    def __init__(
        self,
        cfg: Config,
        spec: DataSpec,
        denoiser: Denoiser,
        device: torch.device,
        precision: Precision,
        source: Path,
        info: dict | None = None,
    ):
        self.cfg, self.spec, self.denoiser = cfg, spec, denoiser
        self.device, self.precision, self.source = device, precision, source
        self.info = info or {}

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str = "auto",
        use_ema: bool = True,
        precision: str | None = None,
    ) -> Pipeline:
        """Rebuild from a run directory, a checkpoint file or an export directory.

        ``path=None`` loads the pretrained model shipped with the package
        (:mod:`mnistdiff.pretrained`, SHA-256 checked).
        """
        if path is None:
            from .pretrained import verified_dir

            path = verified_dir()
        kind, resolved = resolve(path)
        if kind == "export":
            blob = read_export(resolved)
            weights, info = blob["weights"], {"step": None, "ema": True}
        else:
            blob = load_checkpoint(resolved)
            has_ema = blob.get("ema") is not None
            weights = blob["ema"]["model"] if use_ema and has_ema else blob["model"]
            info = {"step": blob["step"], "epoch": blob.get("epoch"), "ema": use_ema and has_ema}
        cfg = checkpoint_config(blob, resolved)
        spec = DataSpec.from_dict(blob["data_spec"])
        dev = select_device(device)
        denoiser = build_denoiser(cfg, spec)
        load_weights(denoiser.backbone, weights, resolved)
        denoiser.to(dev).eval()
        prec = select_precision(precision or _default_precision(cfg, dev), dev)
        return cls(cfg, spec, denoiser, dev, prec, resolved, info)

    @property
    def conditional(self) -> bool:
        return self.cfg.model.conditional

    def default_options(self, **overrides) -> SampleOptions:
        """The config's sample section, with keyword overrides (None = keep).

        ``nfe=K`` picks the steps that give K network evaluations for the chosen sampler.
        See :meth:`SampleOptions.from_config` for how a changed sampler treats the
        section's sampler-specific options.
        """
        nfe = overrides.pop("nfe", None)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        if nfe is not None:
            chosen["steps"] = steps_for_nfe(chosen.get("sampler", self.cfg.sample.sampler), nfe)
        return SampleOptions.from_config(self.cfg.sample, **chosen)

    def generate(
        self,
        labels: Tensor | Sequence[int] | None = None,
        num: int | None = None,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        callback: Callable | None = None,
        batches: range | None = None,
        **options,
    ) -> Samples:
        """Images in model range (see :func:`generate`); ``options`` override SampleOptions."""
        opts = self.default_options(**options)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            num = len(labels)
            if not self.conditional and opts.classifier is None:
                raise ValueError(
                    "this model is unconditional: sample without labels, or steer it with a "
                    "noisy classifier (classifier=FILE, `mnistdiff train-classifier`)"
                )
            if ((labels < 0) | (labels >= self.spec.num_classes)).any():
                raise ValueError(f"labels must be in 0..{self.spec.num_classes - 1}")
        if num is None:
            raise ValueError("give labels or num")
        return generate(
            self.denoiser,
            labels,
            num,
            opts,
            seed=seed,
            batch_size=batch_size or self.cfg.sample.batch_size,
            conditional=self.conditional,
            precision=self.precision,
            progress=progress,
            callback=callback,
            batches=batches,
        )

    def sample(
        self, labels: Tensor | Sequence[int] | None = None, num: int | None = None, **kwargs
    ) -> Tensor:
        """uint8 images ``[N, 28, 28]`` (padding removed)."""
        out = self.generate(labels, num, **kwargs)
        return self.to_uint8(out.x)

    def to_uint8(self, x: Tensor) -> Tensor:
        """Model-range images -> uint8 ``[N, H, W]`` at the dataset's original size."""
        return from_model_range(crop_to(x, original_size(self.spec, self.cfg.data)))


def _default_precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision == "fp16" and device.type == "cpu":
        return "bf16"
    return cfg.train.precision


load = Pipeline.load


def save_npz(path: str | Path, images: Tensor, labels: Tensor) -> Path:
    """Write ``images`` (uint8 [N, H, W]) and ``labels`` (int64 [N], -1 = none) atomically."""
    import numpy as np

    from .atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images.numpy().astype(np.uint8), labels=labels.numpy().astype(np.int64))
    return Path(path)


SAMPLES_FORM = (
    "an .npz (numpy.savez, as written by `sample --save-npz`) holding 'images': uint8 "
    "[N, 28, 28] or [N, 1, 28, 28] and optionally 'labels': integer [N] (class ids, -1 = none)"
)


def load_npz(path: str | Path, size: int = 28) -> tuple[Tensor, Tensor | None]:
    """Read an ``.npz`` of samples; labels are None when absent or all -1.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an ``.npz`` or its arrays are not of :data:`SAMPLES_FORM`.
    """
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file; expected {SAMPLES_FORM}")
    try:
        with np.load(path) as f:
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path}: unreadable samples file ({exc}); expected {SAMPLES_FORM}"
        ) from None
    images = _check_sample_images(path, images, size)
    lab = None if labels is None else _check_sample_labels(path, labels, len(images))
    if lab is not None and (lab < 0).all():
        lab = None
    return torch.from_numpy(images), lab


def _check_sample_images(path: Path, images, size: int):
    import numpy as np

    shape_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[1] == 1)
    if images.dtype != np.uint8 or not shape_ok or images.shape[-2:] != (size, size):
        raise ValueError(
            f"{path}: 'images' is {images.dtype} {list(images.shape)}; "
            f"'images' must be uint8 [N, {size}, {size}] or [N, 1, {size}, {size}]"
        )
    if len(images) == 0:
        raise ValueError(f"{path}: 'images' holds no images (N = 0)")
    return images[:, 0] if images.ndim == 4 else images


def _check_sample_labels(path: Path, labels, n: int) -> Tensor:
    import numpy as np

    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise ValueError(
            f"{path}: 'labels' is {labels.dtype} {list(labels.shape)}; 'labels' must be "
            f"integer [{n}] (class ids, -1 = none), one per image"
        )
    lab = torch.from_numpy(labels.astype(np.int64))
    if (lab < -1).any():
        raise ValueError(f"{path}: 'labels' has values below -1 ({int(lab.min())})")
    return lab
