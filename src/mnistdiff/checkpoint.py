"""Checkpoints and exports: tensors and plain data only, written atomically.

A training checkpoint (``*.pt``) is a dict of state dicts, numbers, strings, lists and dicts,
loadable with ``torch.load(weights_only=True)`` so a downloaded file cannot run code. An export
directory holds ``config.json`` and ``model.safetensors`` (EMA weights) for sampling only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "data_spec", "model", "step")
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, corrupt or incompatible."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled objects, ...
        raise CheckpointError(
            f"{path}: not a readable mnistdiff checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not an mnistdiff checkpoint (missing {missing})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} is not supported by this "
            f"version of mnistdiff (expects {FORMAT_VERSION})"
        )
    return state


def resolve(path: str | Path) -> tuple[str, Path]:
    """Classify ``path`` as ``("checkpoint", file)`` or ``("export", dir)``.

    A run directory resolves to its ``checkpoints/last.pt``.
    """
    path = Path(path)
    if path.is_file():
        return "checkpoint", path
    if (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file():
        return "export", path
    last = path / "checkpoints" / "last.pt"
    if last.is_file():
        return "checkpoint", last
    if path.is_dir():
        raise CheckpointError(
            f"{path}: no checkpoints/last.pt (run directory) nor {EXPORT_CONFIG} + "
            f"{EXPORT_WEIGHTS} (export directory) found"
        )
    raise CheckpointError(f"checkpoint, run directory or export not found: {path}")


def write_export(out_dir: str | Path, config: dict, data_spec: dict, weights: dict) -> Path:
    """Write an export directory: ``config.json`` (+ DataSpec) and ``model.safetensors``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mnistdiff", "version": "1"})
    meta = {"format_version": FORMAT_VERSION, "config": config, "data_spec": data_spec}
    atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_export(out_dir: str | Path) -> dict:
    """Read an export directory into ``{"config", "data_spec", "weights"}``."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / EXPORT_CONFIG).read_text())
        weights = load_file(str(out_dir / EXPORT_WEIGHTS))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{out_dir}: unreadable export ({exc})") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{out_dir}: corrupt {EXPORT_WEIGHTS} ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{out_dir}: unsupported export format {meta.get('format_version')}")
    return {"config": meta["config"], "data_spec": meta["data_spec"], "weights": weights}


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint (or run directory) for sampling: EMA weights when present."""
    kind, resolved = resolve(path)
    if kind == "export":
        raise CheckpointError(f"{path} is already an export directory")
    state = load_checkpoint(resolved)
    weights = state["ema"]["model"] if state.get("ema") is not None else state["model"]
    return write_export(out_dir, state["config"], state["data_spec"], weights)
