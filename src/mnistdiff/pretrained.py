"""The pretrained default model that ships inside the package.

``assets/pretrained/`` is an ordinary export directory (``config.json`` + ``model.safetensors``,
weights stored in fp16 to halve the size) plus ``pretrained.json``: the SHA-256 of both export
files, the command that trained it, the machine and its measured quality. Every load checks
both checksums, like the evaluator asset, so a damaged or replaced file is an error, never a
silently different model. ``scripts/make_pretrained.sh`` rebuilds the asset from a run.

``mnistdiff.load()``, ``mnistdiff sample``, ``mnistdiff edit`` and ``mnistdiff compose`` use it
when no checkpoint is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text
from .checkpoint import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    export_checkpoint,
    read_export,
    write_export,
)
from .evaluator import sha256_file

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "pretrained"
METADATA = "pretrained.json"
_FIX_HINT = (
    "Reinstall mnistdiff to restore the packaged model, or pass --checkpoint RUN_DIR "
    "(train one with `make demo`)."
)


class PretrainedError(RuntimeError):
    """The shipped model is missing, damaged or does not match its recorded checksum."""


def metadata(directory: str | Path = PRETRAINED_DIR) -> dict[str, Any]:
    """The asset's ``pretrained.json`` (checksums, training command, measured quality)."""
    path = Path(directory) / METADATA
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"pretrained model metadata not found: {path}. {_FIX_HINT}") from None
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"unreadable {path}: {exc}. {_FIX_HINT}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise PretrainedError(f"{path} lacks the 'sha256' table. {_FIX_HINT}")
    return meta


def verified_dir(directory: str | Path = PRETRAINED_DIR) -> Path:
    """The export directory of the shipped model after checking both files' SHA-256.

    Raises:
        PretrainedError: a file is missing or its digest differs from ``pretrained.json``.
    """
    directory = Path(directory)
    expected = metadata(directory)["sha256"]
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        path = directory / name
        if not path.is_file():
            raise PretrainedError(f"pretrained model file not found: {path}. {_FIX_HINT}")
        found = sha256_file(path)
        if found != expected.get(name):
            raise PretrainedError(
                f"checksum mismatch for {path}: expected sha256 {expected.get(name)} (from "
                f"{METADATA}), found {found}. The file is damaged or was replaced. {_FIX_HINT}"
            )
    return directory


def describe(directory: str | Path = PRETRAINED_DIR) -> str:
    """One line saying which model is used, for the CLI."""
    meta = metadata(directory)
    return (
        f"no --checkpoint given: using the pretrained model shipped with mnistdiff "
        f"({meta.get('summary', 'see pretrained.json')})"
    )


def build_asset(
    checkpoint: str | Path,
    out_dir: str | Path,
    info: dict[str, Any],
    sample_overrides: dict[str, Any] | None = None,
) -> Path:
    """Export ``checkpoint`` in fp16 into ``out_dir`` and write ``pretrained.json``.

    Args:
        checkpoint: run directory or ``.pt`` checkpoint (EMA weights are exported).
        out_dir: the asset directory to (re)write.
        info: recorded facts (``summary``, ``command``, ``machine``, measured ``metrics``).
        sample_overrides: changes to the config's ``sample`` section (the measured best
            sampling settings of this model), validated like any config.
    """
    from .config import from_dict, to_dict

    out_dir = Path(out_dir)
    exported = read_export(export_checkpoint(checkpoint, out_dir))
    config = exported["config"]
    config["sample"] = {**config["sample"], **(sample_overrides or {})}
    config = to_dict(from_dict(config))  # validated
    half = {k: v.half() if v.is_floating_point() else v for k, v in exported["weights"].items()}
    write_export(out_dir, config, exported["data_spec"], half)
    sums = {name: sha256_file(out_dir / name) for name in (EXPORT_CONFIG, EXPORT_WEIGHTS)}
    meta = {**info, "sha256": sums, "torch_version": torch.__version__}
    atomic_write_text(out_dir / METADATA, json.dumps(meta, indent=2) + "\n")
    return out_dir
