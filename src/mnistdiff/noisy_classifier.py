"""A time-conditioned classifier of noised images, for classifier guidance.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", Sec. 4) steer a
diffusion model with the gradient of a classifier ``p_phi(y | x_t, t)`` trained on images noised
by the model's own forward process ``x_t = alpha_t x0 + sigma_t eps``. This module holds that
classifier, its seeded and time-bounded training on a run's schedule, and its saved form:
``NAME.safetensors`` with ``NAME.json`` beside it (architecture, the schedule it was trained
for, data, recipe, measured accuracies, SHA-256 of the weights, checked on load). The guidance
itself is a denoise-function wrapper, :func:`mnistdiff.guidance.classifier_guided`.

Any schedule works (discrete or flow): the network sees ``c_in(t) x_t`` with
``c_in = 1 / sqrt(alpha_t^2 sigma_data^2 + sigma_t^2)`` (unit-variance input, as in EDM's
preconditioning) and ``t`` through a sinusoidal embedding that modulates every block (FiLM).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import atomic_path, atomic_write_text
from .models.layers import TIME_SCALE, norm_groups, sinusoidal_embedding
from .schedules import Schedule, build_schedule, sample_training_times

FORMAT = "mnistdiff-noisy-classifier"
FORMAT_VERSION = 1
SIGMA_DATA = 0.62  # std of MNIST pixels in [-1, 1]
# 15 minutes (~12k steps on one core) took classifier guidance of the quick unconditional model
# from 93% to 98.7% class accuracy against 3 minutes (docs/results.md, "Classifier guidance")
DEFAULT_STEPS = 12000
DEFAULT_MINUTES = 15.0
DEFAULT_CHANNELS = (16, 32, 64)  # ~5.5 MMAC per image: cheap enough for minutes of CPU training


class ClassifierError(ValueError):
    """A classifier file is missing, corrupted, or does not fit the model it should guide."""


class _Block(nn.Module):
    """3x3 conv -> GroupNorm -> FiLM(time) -> SiLU."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(norm_groups(c_out), c_out, affine=False)
        self.film = nn.Linear(time_dim, 2 * c_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # [B, C, 1, 1] each
        return F.silu(self.norm(self.conv(x)) * (1.0 + scale) + shift)


class NoisyClassifier(nn.Module):
    """``logits = net(x_t, t)``: a small CNN whose blocks are modulated by the time ``t``.

    Args:
        schedule: the noise schedule the classifier is trained for (sets the input scaling).
        channels: widths of the three stages (full, 1/2 and 1/4 resolution).
        num_classes: number of classes.
        in_channels: image channels.
        image_size: image side (28, or 32 for padded data).
        time_dim: size of the time embedding.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        channels: tuple[int, int, int] = DEFAULT_CHANNELS,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be 3 positive ints, got {tuple(channels)}")
        c1, c2, c3 = channels
        self.schedule = schedule
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        self.blocks = nn.ModuleList(
            [
                _Block(in_channels, c1, time_dim),
                _Block(c1, c2, time_dim, stride=2),  # 28 -> 14
                _Block(c2, c2, time_dim),
                _Block(c2, c3, time_dim, stride=2),  # 14 -> 7
                _Block(c3, c3, time_dim),
            ]
        )
        self.head = nn.Linear(c3, num_classes)

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments other than the schedule (saved in the JSON)."""
        return {
            "channels": [b.conv.out_channels for b in self.blocks[0::2]],
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "time_dim": self.time_dim,
        }

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of noised images ``x_t [B, C, S, S]`` at times ``t [B]``."""
        alpha, sigma = self.schedule.alpha_sigma(t.detach().to(torch.float64))
        c_in = torch.rsqrt(alpha**2 * SIGMA_DATA**2 + sigma**2).to(x_t.dtype)
        h = x_t * c_in.view(-1, 1, 1, 1)
        freqs = sinusoidal_embedding(TIME_SCALE * t.float(), self.time_dim).to(x_t.dtype)
        emb = self.time_mlp(freqs)  # [B, time_dim]
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h.mean(dim=(2, 3)))


def schedule_key(schedule: Schedule) -> dict[str, Any]:
    """What identifies a schedule for a classifier: its name and (discrete only) its T."""
    steps = schedule.num_timesteps if schedule.is_discrete else None
    return {"name": schedule.name, "num_timesteps": steps}


def _describe(key: dict[str, Any]) -> str:
    t = key.get("num_timesteps")
    return key["name"] if t is None else f"{key['name']} (T={t})"


def check_compatible(
    classifier: NoisyClassifier,
    schedule: Schedule,
    image_shape: tuple[int, int, int],
    num_classes: int | None = None,
) -> None:
    """Raise :class:`ClassifierError` unless ``classifier`` fits a model with these properties.

    Args:
        classifier: the loaded classifier.
        schedule: the model's noise schedule; must be the one the classifier was trained for.
        image_shape: the model's ``(C, H, W)``.
        num_classes: the model's number of classes (None: not checked).
    """
    have, want = schedule_key(classifier.schedule), schedule_key(schedule)
    if have != want:
        raise ClassifierError(
            f"the classifier was trained for the {_describe(have)} schedule but the model uses "
            f"{_describe(want)}; train one for this model with "
            "`mnistdiff train-classifier --checkpoint RUN`"
        )
    shape = (classifier.in_channels, classifier.image_size, classifier.image_size)
    if tuple(image_shape) != shape:
        raise ClassifierError(
            f"the classifier takes images of shape {shape}, the model makes {tuple(image_shape)}"
        )
    if num_classes is not None and classifier.num_classes != num_classes:
        raise ClassifierError(
            f"the classifier has {classifier.num_classes} classes, the model {num_classes}"
        )


# --------------------------------------------------------------------------- saving and loading


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (same digest as the evaluator's)."""
    from .evaluator import sha256_file as digest

    return digest(path)


def _paths(path: str | Path) -> tuple[Path, Path]:
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ClassifierError(
            f"classifier path must end in .safetensors (its .json goes beside it), got {weights}"
        )
    return weights, weights.with_suffix(".json")


def save_classifier(net: NoisyClassifier, path: str | Path, info: dict[str, Any]) -> dict:
    """Write ``path`` (.safetensors) and its ``.json`` atomically; return the metadata."""
    weights, meta_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": net.architecture(),
        "schedule": schedule_key(net.schedule),
        **info,
        "sha256": sha256_file(weights),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta


def _read_meta(weights: Path, meta_path: Path) -> dict:
    for p in (weights, meta_path):
        if not p.is_file():
            raise ClassifierError(f"classifier file not found: {p}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClassifierError(f"unreadable classifier metadata {meta_path}: {e}") from None
    needed = {"format", "architecture", "schedule", "sha256"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not needed <= meta.keys():
        raise ClassifierError(f"{meta_path} is not a mnistdiff noisy-classifier description")
    return meta


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> NoisyClassifier:
    """Load a classifier written by :func:`train_classifier`, verifying its SHA-256.

    Returns:
        The network in eval mode with frozen parameters; ``.metadata`` holds the JSON and
        ``.checksum`` the weights' SHA-256.

    Raises:
        ClassifierError: a missing file, a checksum mismatch, or weights that do not fit.
    """
    weights, meta_path = _paths(path)
    meta = _read_meta(weights, meta_path)
    found = sha256_file(weights)
    if found != meta["sha256"]:
        raise ClassifierError(
            f"checksum mismatch for classifier {weights}: expected sha256 {meta['sha256']} "
            f"(from {meta_path.name}), found {found}; the file is corrupted or was replaced"
        )
    try:
        key = meta["schedule"]
        schedule = build_schedule(key["name"], key["num_timesteps"] or 1000)
        arch = {**meta["architecture"], "channels": tuple(meta["architecture"]["channels"])}
        net = NoisyClassifier(schedule, **arch)
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise ClassifierError(f"classifier {weights} does not fit its description: {e}") from e
    net.metadata, net.checksum = meta, found
    net.requires_grad_(False)
    return net.to(device).eval()


# --------------------------------------------------------------------------- training


def noised_batch(
    schedule: Schedule, x0: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(x_t, t)`` for clean ``x0 [B, C, S, S]``: uniform training times, Gaussian noise."""
    t = sample_training_times(schedule, x0.shape[0], generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    alpha, sigma = schedule.alpha_sigma(t)
    return alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps, t


@torch.no_grad()
def noised_accuracy(
    net: NoisyClassifier, x0: Tensor, labels: Tensor, *, seed: int = 0, bins: int = 5
) -> dict[str, Any]:
    """Accuracy on ``x0`` noised at uniform times (seeded), overall and per bin of ``t``."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    correct, times = [], []
    for xb, yb in zip(x0.split(500), labels.split(500), strict=True):
        x_t, t = noised_batch(net.schedule, xb, gen)
        correct.append(net(x_t, t).argmax(1) == yb)
        times.append(t)
    hit, t = torch.cat(correct).float(), torch.cat(times)
    edges = torch.linspace(0, 1, bins + 1).tolist()
    by_t = {}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (t > lo) & (t <= hi)
        by_t[f"{lo:.1f}-{hi:.1f}"] = round(hit[sel].mean().item(), 4) if sel.any() else None
    return {"accuracy": round(hit.mean().item(), 4), "accuracy_by_t": by_t, "images": len(hit)}


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _load_run(checkpoint: str | Path) -> tuple[Any, Any, Path]:
    """(Config, DataSpec, resolved path) of a run directory, checkpoint or export."""
    from .checkpoint import load_checkpoint, read_export, resolve
    from .config import from_dict
    from .data import DataSpec

    kind, resolved = resolve(checkpoint)
    blob = read_export(resolved) if kind == "export" else load_checkpoint(resolved)
    return from_dict(blob["config"]), DataSpec.from_dict(blob["data_spec"]), resolved


def default_output(checkpoint: str | Path) -> Path:
    """``RUN/classifier.safetensors`` for a directory, ``NAME_classifier.safetensors`` beside a
    checkpoint file."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / "classifier.safetensors"
    return p.with_name(f"{p.stem}_classifier.safetensors")


def train_classifier(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    steps: int = DEFAULT_STEPS,
    minutes: float = DEFAULT_MINUTES,
    batch_size: int = 128,
    lr: float = 2e-3,
    channels: tuple[int, int, int] = DEFAULT_CHANNELS,
    seed: int = 0,
    data_dir: str | Path | None = None,
    eval_images: int = 2000,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a :class:`NoisyClassifier` for the schedule, data and classes of a run.

    Each step draws a batch of training images, times ``t`` as the run's schedule is trained
    (uniform over its timesteps) and Gaussian noise, all from a generator seeded by
    ``(seed, step)``; cross-entropy on ``x_t``; AdamW with warmup and cosine decay. The run
    stops after ``steps`` or ``minutes`` of wall time, whichever comes first: after 20 steps the
    total is refitted every step from the average speed so far, so the cosine decay ends with
    the budget. On the same machine and thread count the result is bit-reproducible when the
    step budget binds. The accuracy on ``eval_images`` noised test images is measured and saved.

    Args:
        checkpoint: run directory, checkpoint file or export directory of the model to guide.
        out: output ``.safetensors`` path (default :func:`default_output`).
        steps: maximum optimizer steps (>= 1).
        minutes: wall-time budget (> 0).
        batch_size: images per step.
        lr: peak learning rate.
        channels: widths of the classifier's three stages.
        seed: seed of the weights, data order, times and noise.
        data_dir: MNIST folder (default: the run's ``data.data_dir``, else ``$MNIST_DIR``).
        eval_images: noised test images for the saved accuracy (0 skips the measurement).
        device: torch device.
        progress: show a progress bar.

    Returns:
        The metadata written beside the weights.
    """
    from .build import prepare_images
    from .data import load_dataset
    from .seeding import seed_for

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    if batch_size < 1 or eval_images < 0:
        raise ValueError(
            f"need batch_size >= 1 and eval_images >= 0, got {batch_size}, {eval_images}"
        )
    cfg, spec, resolved = _load_run(checkpoint)
    out = Path(out) if out is not None else default_output(checkpoint)
    _paths(out)  # fail on a bad name before training
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    arrays = load_dataset(
        cfg.data.dataset, data_dir or cfg.data.data_dir, download=cfg.data.download
    )
    train_x = prepare_images(arrays.train_images, cfg.data).to(device)
    train_y = arrays.train_labels.to(device)
    torch.manual_seed(seed)
    net = NoisyClassifier(
        schedule,
        channels=tuple(channels),
        num_classes=spec.num_classes,
        in_channels=spec.channels,
        image_size=spec.size,
    ).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup, total, start = min(100, steps // 10 + 1), steps, time.perf_counter()
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress, leave=False)
    net.train()
    done = 0
    for step in range(steps):
        elapsed = time.perf_counter() - start
        if elapsed > 60.0 * minutes:
            break
        if step >= 20:  # refit the total from the average speed so far
            total = max(step + 1, min(steps, int(step * 60.0 * minutes / elapsed)))
        gen = torch.Generator(device=device).manual_seed(seed_for(seed, step))
        idx = torch.randint(0, len(train_y), (batch_size,), generator=gen, device=device)
        x_t, t = noised_batch(schedule, train_x[idx], gen)
        loss = F.cross_entropy(net(x_t, t), train_y[idx])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = round(time.perf_counter() - start, 1)
    test = {}
    if eval_images:
        n = min(eval_images, len(arrays.test_labels))
        test_x = prepare_images(arrays.test_images[:n], cfg.data).to(device)
        test = noised_accuracy(net, test_x, arrays.test_labels[:n].to(device), seed=seed)
    info = {
        "source_checkpoint": str(resolved),
        "data": {"dataset": cfg.data.dataset, "pad_to_32": cfg.data.pad_to_32},
        "training": {
            "steps_done": done,
            "max_steps": steps,
            "minutes": minutes,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "optimizer": "AdamW(wd 1e-4), warmup + cosine",
            "train_seconds": seconds,
        },
        "noised_test": test,
        "torch_version": torch.__version__,
    }
    net.cpu()
    return save_classifier(net, out, info)
