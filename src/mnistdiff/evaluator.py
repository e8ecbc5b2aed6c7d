"""The evaluation feature network: a small MNIST classifier whose penultimate layer is the
feature space for sample-quality metrics (the MNIST analogue of Inception features in FID).

The trained weights ship with the package (``assets/evaluator.safetensors``) together with a
metadata file (``assets/evaluator.json``) holding the architecture, the training recipe, the
measured test accuracy and the SHA-256 of the weights. Metrics are only comparable between runs
that use the same weights, so ``load_evaluator`` verifies the checksum before loading, and every
metric report should carry ``Evaluator.checksum``.

Input convention: ``FeatureNet`` takes float images in [0, 1] shaped ``[N, 1, 28, 28]`` and
standardises them internally; ``Evaluator.embed`` takes raw ``uint8`` images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mnistdiff.atomic import atomic_path, atomic_write_text

ASSET_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_NAME = "evaluator.safetensors"
FORMAT_VERSION = 1
DEFAULT_EPOCHS = 5  # recipe of the shipped weights
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set in [0, 1]


class EvaluatorError(RuntimeError):
    """The evaluator weights are missing, corrupted or incompatible with ``FeatureNet``, or no
    shipped evaluator scores the requested dataset."""


def require_evaluator(dataset: str) -> str:
    """Name of the shipped evaluator that scores samples of ``dataset``.

    Only MNIST has one (the synthetic test digits are scored with it for pipeline tests). The
    MNIST digit classifier would score Fashion-MNIST or KMNIST images against MNIST test digits,
    which measures nothing, so those are refused rather than scored.

    Raises:
        EvaluatorError: when no shipped evaluator fits ``dataset`` (the message says which do).
        ValueError: for a dataset name not in the table.
    """
    from mnistdiff.datasets import DATASETS, get_dataset_info

    info = get_dataset_info(dataset)
    if info.evaluator is None:
        ok = ", ".join(name for name, entry in DATASETS.items() if entry.evaluator)
        raise EvaluatorError(
            f"cannot evaluate samples of dataset {info.name!r}: only mnist has a shipped "
            f"evaluator (the MNIST digit classifier would score {info.name} images against MNIST "
            f"test digits, which measures nothing); datasets that can be evaluated: {ok}. "
            f"Sample it with `mnistdiff sample` instead; in training set "
            f"train.eval_every_epochs=0 and train.best_by=val_loss"
        )
    return info.evaluator


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class FeatureNet(nn.Module):
    """Small CNN classifier: conv-conv-pool ×2, one more pool, a feature layer, a 10-way head.

    Args:
        widths: channels of the four 3×3 conv layers (two at 28×28, two at 14×14).
        feature_dim: size of the penultimate (feature) layer.
        dropout: dropout rate between the feature layer and the head (training only).
        num_classes: number of output classes.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 32, 64, 64),
        feature_dim: int = 128,
        dropout: float = 0.3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive ints, got {tuple(widths)}")
        c1, c2, c3, c4 = widths
        self.trunk = nn.Sequential(
            *_conv_bn(1, c1),
            *_conv_bn(c1, c2),
            nn.MaxPool2d(2),  # 28 -> 14
            *_conv_bn(c2, c3),
            *_conv_bn(c3, c4),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.MaxPool2d(2),  # 7 -> 3
            nn.Flatten(),
        )
        self.feature = nn.Sequential(
            nn.Linear(c4 * 3 * 3, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU()
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Feature vectors ``[N, feature_dim]`` of images ``x [N, 1, 28, 28]`` in [0, 1]."""
        x = (x - MNIST_MEAN) / MNIST_STD
        return self.feature(self.trunk(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(features [N, D], logits [N, num_classes])`` for images in [0, 1]."""
        f = self.features(x)
        return f, self.head(self.dropout(f))


def _check_images(images: Tensor | np.ndarray) -> Tensor:
    """Validate uint8 images ``[N,28,28]``/``[N,1,28,28]`` (or 32×32, center-cropped) -> uint8
    ``[N,1,28,28]``."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255], got dtype {x.dtype}; convert floats in [-1, 1] "
            "with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
        )
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) not in ((28, 28), (32, 32)):
        raise ValueError(
            f"images must have shape [N, 28, 28] or [N, 1, 28, 28] (or 32×32), got {tuple(x.shape)}"
        )
    if x.shape[1] == 32:
        x = x[:, 2:30, 2:30]  # center-crop zero-padded 32×32 images
    return x.unsqueeze(1)


class Evaluator:
    """A loaded, checksum-verified ``FeatureNet`` in eval mode.

    Attributes:
        net: the network (eval mode, on ``device``).
        checksum: SHA-256 hex digest of the weights file; key metric caches and reports by it.
        metadata: contents of the accompanying ``evaluator.json``.
        device: device the network runs on.
    """

    def __init__(self, net: FeatureNet, checksum: str, metadata: dict, device: str = "cpu"):
        self.net = net.to(device).eval()
        self.checksum = checksum
        self.metadata = metadata
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        """Dimension of the feature vectors returned by ``embed``."""
        return self.net.head.in_features

    @torch.no_grad()
    def embed(self, images: Tensor | np.ndarray, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Features and logits of uint8 images.

        Args:
            images: uint8 ``[N, 28, 28]`` or ``[N, 1, 28, 28]``; 32×32 images are center-cropped.
            batch_size: images per forward pass.

        Returns:
            ``(features float64 [N, D], logits float32 [N, 10])`` on the CPU.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = _check_images(images)
        feats, logits = [], []
        for chunk in x.split(batch_size):
            f, lg = self.net(chunk.to(self.device).float() / 255.0)
            feats.append(f.double().cpu())
            logits.append(lg.float().cpu())
        if not feats:
            return torch.zeros(0, self.feature_dim, dtype=torch.float64), torch.zeros(0, 10)
        return torch.cat(feats), torch.cat(logits)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_paths(path: str | Path | None) -> tuple[Path, Path]:
    """(weights, metadata) paths from ``None`` (packaged asset), a directory, or a weights file."""
    p = ASSET_DIR if path is None else Path(path)
    weights = p / WEIGHTS_NAME if p.is_dir() else p
    return weights, weights.with_suffix(".json")


_FIX_HINT = (
    "Reinstall mnistdiff to restore the packaged evaluator, or train a new one with "
    "`mnistdiff train-evaluator --out DIR` and pass DIR as the evaluator path."
)


def _read_metadata(weights: Path, meta_path: Path) -> dict:
    for p in (weights, meta_path):
        if not p.is_file():
            raise EvaluatorError(f"evaluator file not found: {p}. {_FIX_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluatorError(f"unreadable evaluator metadata {meta_path}: {e}. {_FIX_HINT}") from e
    if not isinstance(meta, dict) or not {"sha256", "architecture"} <= meta.keys():
        raise EvaluatorError(
            f"evaluator metadata {meta_path} lacks 'sha256' or 'architecture'. {_FIX_HINT}"
        )
    return meta


def load_evaluator(path: str | Path | None = None, device: str = "cpu") -> Evaluator:
    """Load and verify the evaluator network.

    Args:
        path: ``None`` for the packaged asset, a directory holding ``evaluator.safetensors`` and
            ``evaluator.json`` (as written by ``train_evaluator``), or a ``.safetensors`` file with
            its ``.json`` beside it.
        device: torch device to run on.

    Raises:
        EvaluatorError: a file is missing, the weights' SHA-256 differs from the one recorded in
            the metadata, or the tensors do not fit the recorded architecture.
    """
    weights, meta_path = _resolve_paths(path)
    meta = _read_metadata(weights, meta_path)
    found = sha256_file(weights)
    if found != meta["sha256"]:
        raise EvaluatorError(
            f"checksum mismatch for evaluator weights {weights}: expected sha256 {meta['sha256']} "
            f"(from {meta_path.name}), found {found}. The file is corrupted or was replaced. "
            f"{_FIX_HINT}"
        )
    try:
        net = FeatureNet(**meta["architecture"])
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()
        }
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise EvaluatorError(
            f"evaluator weights {weights} do not fit architecture {meta['architecture']}: {e}. "
            f"{_FIX_HINT}"
        ) from e
    return Evaluator(net, found, meta, device)


# ----------------------------------------------------------------------------- training


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image of ``x [B, 1, H, W]`` by independent integer offsets in
    ``[-max_shift, max_shift]`` (zero fill)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x[:, 0], (m, m, m, m))  # [B, H+2m, W+2m]
    dy = torch.randint(0, 2 * m + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (dx + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], rows, cols].unsqueeze(1)


@contextlib.contextmanager
def _deterministic(num_threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration; then restore."""
    old_det, old_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


@torch.no_grad()
def _accuracy(net: FeatureNet, images: Tensor, labels: Tensor) -> float:
    net.eval()
    correct = 0
    for x, y in zip(images.split(1000), labels.split(1000), strict=True):
        correct += (net(x.unsqueeze(1).float() / 255.0)[1].argmax(1) == y).sum().item()
    return correct / len(labels)


def _train_epoch(net, opt, sched, data, batch_size, max_shift, seed, epoch) -> float:
    """One pass in a seeded order; returns the mean training loss."""
    images, labels = data.train_images, data.train_labels
    net.train()
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # data order from (seed, epoch)
    order = torch.randperm(len(labels), generator=g)
    total = 0.0
    for idx in order.split(batch_size):
        x = random_shift(images[idx].unsqueeze(1).float() / 255.0, max_shift, g)
        loss = F.cross_entropy(net(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(labels)


def _save(net: FeatureNet, out_dir: Path, meta: dict) -> dict:
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "mnistdiff-evaluator"})
    meta = {**meta, "sha256": sha256_file(weights), "weights_bytes": weights.stat().st_size}
    atomic_write_text(weights.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return meta


def train_evaluator(
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    max_shift: int = 2,
    seed: int = 0,
    num_threads: int | None = 1,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Train the evaluator ``FeatureNet`` on MNIST and write it to ``out_dir``.

    Deterministic for a given seed and thread count: weights, dropout and the data order come
    from ``seed``. AdamW with a one-cycle learning-rate schedule, random shifts of up to
    ``max_shift`` pixels. Writes ``evaluator.safetensors`` and ``evaluator.json`` atomically.

    Args:
        out_dir: output directory (created if needed).
        data_dir: directory with the MNIST IDX files (``None``: the data module's default).
        epochs: passes over the 60k training images (``None``: ``DEFAULT_EPOCHS`` = 5).
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        max_shift: maximum random translation in pixels (0 disables augmentation).
        seed: seed for initialisation, dropout and data order.
        num_threads: torch CPU threads during training (``None``: leave unchanged). The shipped
            weights were trained with 1; bitwise reproduction needs the same count.
        log: called with one progress line per epoch (``None``: silent).

    Returns:
        The metadata written to ``evaluator.json`` (includes ``test_accuracy`` and ``sha256``).
    """
    from mnistdiff.data import load_dataset

    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1 or batch_size < 1 or max_shift < 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, max_shift >= 0; got {epochs}, {batch_size}, "
            f"{max_shift}"
        )
    data = load_dataset(dataset="mnist", data_dir=data_dir)
    arch = {"widths": [32, 32, 64, 64], "feature_dim": 128, "dropout": 0.3, "num_classes": 10}
    config = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "max_shift": max_shift,
        "seed": seed,
        "num_threads": num_threads,
        "optimizer": "AdamW + OneCycleLR",
    }
    start = time.time()
    with _deterministic(num_threads):
        torch.manual_seed(seed)
        net = FeatureNet(**arch)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(len(data.train_labels) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for epoch in range(epochs):
            loss = _train_epoch(net, opt, sched, data, batch_size, max_shift, seed, epoch)
            acc = _accuracy(net, data.test_images, data.test_labels)
            if log:
                elapsed = time.time() - start
                log(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} test_acc {acc:.4f} {elapsed:.0f}s")
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "input": "uint8 images -> float in [0,1], standardised inside FeatureNet.features",
        "feature_layer": "Linear -> BatchNorm1d -> ReLU (penultimate, before dropout)",
        "training": config,
        "test_accuracy": acc,
        "train_seconds": round(time.time() - start, 1),
        "torch_version": torch.__version__,
    }
    return _save(net, Path(out_dir), meta)
