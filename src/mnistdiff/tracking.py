"""Run logging: ``metrics.jsonl`` (the record), TensorBoard (optional view), loss curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_text

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Append metric records to ``metrics.jsonl`` and mirror scalars to TensorBoard.

    Disabled loggers (non-zero ranks) accept every call and write nothing.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when used

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def reset(self, history: list[dict]) -> None:
        """Rewrite ``metrics.jsonl`` from ``history`` (drops lines past a resumed checkpoint)."""
        if self.enabled:
            text = "".join(json.dumps(r) + "\n" for r in history)
            atomic_write_text(self.run_dir / METRICS_FILE, text)

    def log(self, record: dict) -> None:
        """Append one record (must contain ``step``) and send its numbers to TensorBoard."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """A uint8 ``[H, W]`` image to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, grid[None], step, dataformats="CHW")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl`` (empty if none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(history: list[dict], path: Path) -> Path:
    """Training loss (raw and smoothed) and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, v = map(np.asarray, zip(*train, strict=True))
        ax.plot(s, v, alpha=0.3, color="C0", label="train")
        k = max(1, len(v) // 20)
        if len(v) > k:
            smooth = np.convolve(v, np.ones(k) / k, mode="valid")
            ax.plot(s[k - 1 :], smooth, color="C0", label=f"train (mean of {k})")
    if val:
        s, v = map(np.asarray, zip(*val, strict=True))
        ax.plot(s, v, "o-", color="C1", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
