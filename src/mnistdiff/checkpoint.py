"""Checkpoints and exports: tensors and plain data only, written atomically, checksummed.

A training checkpoint (``*.pt``) is a dict of state dicts, numbers, strings, lists and dicts,
loadable with ``torch.load(weights_only=True)`` so a downloaded file cannot run code. An export
directory holds ``config.json`` and ``model.safetensors`` (EMA weights) for sampling only.

Integrity: every checkpoint stores ``checksum``, a SHA-256 over its whole content (every
tensor's dtype, shape and bytes and every plain value, keys in sorted order; see
:func:`content_sha256`), and every export's ``config.json`` stores ``weights_sha256`` over its
weights. Loading recomputes them and raises :class:`CheckpointError` naming the file when they
differ, so flipped bytes cannot load silently. Files written before checksums existed (no
``checksum`` / ``weights_sha256`` key) still load, unverified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .config import Config, from_dict

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "data_spec", "model", "step")
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
CHECKSUM_KEY = "checksum"  # in a .pt: {"algorithm": "sha256", "value": hex digest}
EXPORT_CHECKSUM_KEY = "weights_sha256"  # in an export's config.json


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, corrupt or incompatible."""


class DiskFullError(CheckpointError):
    """The disk filled up while writing a checkpoint (the target file was not replaced)."""


# --------------------------------------------------------------------------- checksums


def content_sha256(obj: Any) -> str:
    """SHA-256 (hex) of a nest of dicts, lists, tuples, tensors and plain values.

    The order is canonical: dict keys sorted by ``repr``, each leaf hashed with its key path,
    tensors as dtype, shape and raw bytes (on the CPU, contiguous), other values by ``repr``.
    So the digest depends on the content only, not on the device or the dict insertion order.
    """
    h = hashlib.sha256()
    _hash_into(h, obj, "")
    return h.hexdigest()


def _hash_into(h, obj: Any, path: str) -> None:
    if isinstance(obj, dict):
        h.update(f"{path}:dict{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _hash_into(h, obj[key], f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}:{type(obj).__name__}{len(obj)};".encode())
        for i, item in enumerate(obj):
            _hash_into(h, item, f"{path}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{path}:tensor:{obj.dtype}:{tuple(obj.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data)
    else:
        h.update(f"{path}:{type(obj).__name__}:{obj!r};".encode())


def _verify(stored: str, computed: str, path: Path) -> None:
    if stored != computed:
        raise CheckpointError(
            f"{path}: checksum mismatch, the file is corrupt (stored sha256 {stored[:16]}…, "
            f"content hashes to {computed[:16]}…); use another checkpoint (e.g. an earlier "
            "step_*.pt) or export again"
        )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + ``os.replace``), with a checksum.

    Raises:
        DiskFullError: the disk filled up; ``path`` keeps its previous content.
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    state.pop(CHECKSUM_KEY, None)
    state[CHECKSUM_KEY] = {"algorithm": "sha256", "value": content_sha256(state)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with _disk_full_message(path):
        atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``), check its format and checksum.

    A checkpoint without a ``checksum`` entry (written by an older mnistdiff) loads unverified.

    Raises:
        CheckpointError: the file is missing, unreadable, not an mnistdiff checkpoint, of
            another format version, or its content does not match its checksum.
    """
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
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None:
        if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
            raise CheckpointError(f"{path}: unknown checksum entry {stored!r}")
        _verify(str(stored.get("value")), content_sha256(state), path)
    return state


def checkpoint_config(blob: dict, source: str | Path) -> Config:
    """The validated :class:`Config` saved in a checkpoint or export read from ``source``.

    Raises:
        CheckpointError: naming ``source`` when the saved config is not a valid config.
    """
    try:
        return from_dict(blob["config"])
    except Exception as exc:  # ConfigError, or a config of the wrong shape altogether
        raise CheckpointError(f"{source}: saved config is invalid ({exc})") from None


def load_weights(module: nn.Module, weights: dict, source: str | Path) -> None:
    """Load ``weights`` into ``module`` (strict), naming ``source`` when they do not fit.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{name} ({len(items)}): {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
        for name, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape in file vs config", shapes),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not fit the model its saved config describes "
            f"({'; '.join(problems)}); the file was edited or mixed from different runs"
        )
    module.load_state_dict(weights)


# --------------------------------------------------------------------------- exports


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
    """Write an export directory: ``config.json`` (+ DataSpec, weights checksum) and
    ``model.safetensors``.

    Raises:
        DiskFullError: the disk filled up (files already there keep their content).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    weights_path = out_dir / EXPORT_WEIGHTS
    with _disk_full_message(weights_path), atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mnistdiff", "version": "1"})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "data_spec": data_spec,
        EXPORT_CHECKSUM_KEY: content_sha256(tensors),
    }
    with _disk_full_message(out_dir / EXPORT_CONFIG):
        atomic_write_text(out_dir / EXPORT_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_export(out_dir: str | Path) -> dict:
    """Read an export directory into ``{"config", "data_spec", "weights"}``.

    The weights are checked against ``weights_sha256`` in ``config.json``; an export written
    before checksums existed (no such key) loads unverified.

    Raises:
        CheckpointError: unreadable or corrupt files, another format, a checksum mismatch.
    """
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / EXPORT_CONFIG).read_text())
        weights = load_file(str(out_dir / EXPORT_WEIGHTS))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{out_dir}: unreadable export ({exc})") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{out_dir}: corrupt {EXPORT_WEIGHTS} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{out_dir}: unsupported export format {version}")
    stored = meta.get(EXPORT_CHECKSUM_KEY)
    if stored is not None:
        _verify(str(stored), content_sha256(weights), out_dir / EXPORT_WEIGHTS)
    return {"config": meta["config"], "data_spec": meta["data_spec"], "weights": weights}


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint (or run directory) for sampling: EMA weights when present."""
    kind, resolved = resolve(path)
    if kind == "export":
        raise CheckpointError(f"{path} is already an export directory")
    state = load_checkpoint(resolved)
    weights = state["ema"]["model"] if state.get("ema") is not None else state["model"]
    return write_export(out_dir, state["config"], state["data_spec"], weights)


@contextlib.contextmanager
def _disk_full_message(path: Path) -> Iterator[None]:
    """Turn ``OSError(ENOSPC)`` raised while writing ``path`` into :class:`DiskFullError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {path}") from exc
        raise
