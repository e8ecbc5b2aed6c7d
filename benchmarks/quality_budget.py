"""Quality per CPU-minute: train a recipe for a wall-clock budget, sample, evaluate.

1. The recipe trains with ``train.time_budget_minutes`` set to the budget: the training loop
   measures its own speed over its first steps, fixes the step count so the LR schedule
   (warm-up + cosine) spans the budget, and stops on time. Previews are switched off;
   validation and checkpoints stay as the recipe says and count against the budget.
2. N images (balanced classes) are sampled with the recipe's sampler, steps and guidance from
   the EMA weights, timed.
3. They are scored with ``mnistdiff.evaluate.evaluate_images`` (FD in the evaluator's feature
   space, KID, precision/recall, class accuracy) next to the real-data floor at the same N
   (``mnistdiff.metrics.real_data_floor``).
4. With ``--baseline diffusers`` the diffusers tutorial recipe (``diffusers_recipe.py``) trains
   for the same budget in the same process, is sampled and scored the same way, and the JSON
   gets the ratios recipe / baseline of every metric.

5. Distillation phase (``--distill METHOD[:STEPS]``, repeatable): each student is distilled
   from the recipe's model (or from an existing run given by ``--teacher RUN``, which is then
   sampled and scored instead of training a new one) under ``--distill-minutes`` of
   wall-clock (``mnistdiff.distill``), sampled with the settings recorded in its own config
   and scored the same way. Each row reports network passes per image (classifier-free
   guidance counts two per solver step unless the model is guidance-distilled) beside the
   solver's NFE, the sampling seconds for N images, and its FD over the teacher's.

JSON goes to stdout (and ``--out``, rewritten after each recipe so a finished result is never
lost); progress goes to stderr. ``--tiny`` runs in seconds.
Example: ``python benchmarks/quality_budget.py --config configs/quick.yaml --minutes 10
--baseline diffusers --out q10.json``; distillation of an existing teacher:
``python benchmarks/quality_budget.py --teacher runs/quick --distill progressive:4
--distill reflow:4 --distill-minutes 10 --out distill.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mnistdiff.atomic import atomic_write_text
from mnistdiff.build import load_train_data
from mnistdiff.checkpoint import load_checkpoint
from mnistdiff.config import Config, ConfigError
from mnistdiff.data import load_dataset
from mnistdiff.device import select_device
from mnistdiff.evaluate import evaluate_images
from mnistdiff.evaluator import EvaluatorError, load_evaluator
from mnistdiff.images import save_grid
from mnistdiff.metrics import real_data_floor
from mnistdiff.sample import Pipeline, label_tensor, save_npz
from mnistdiff.train import train
from throughput import (
    environment,
    load_recipe,
    log,
    with_train,
    write_result,
)

METRICS = ("fd_mnist", "kid", "precision", "recall", "class_accuracy")
RATIO_KEYS = (
    "fd_mnist",
    "fd_ratio_to_floor",
    "kid",
    "precision",
    "recall",
    "class_accuracy",
    "images_per_sec",
    "steps",
    "epochs",
    "sampling_seconds",
)
# Budget runs: no preview grids (sampling inside the budget), no progress bar.
BUDGET_TRAIN = {"preview_every_epochs": 0, "eval_every_epochs": 0, "progress": False}
TINY_OVERRIDES = ("train.val_every=0", "train.checkpoint_every=0")


# --------------------------------------------------------------------------- evaluator


def evaluator_or_none(allow_missing: bool):
    """``(evaluator, info)``; a missing evaluator is an error unless ``allow_missing``."""
    try:
        ev = load_evaluator()
    except EvaluatorError as exc:
        if not allow_missing:
            raise
        log(f"evaluator unavailable, metrics will be null: {exc}")
        return None, {"available": False, "error": str(exc)}
    return ev, {"available": True, "sha256": ev.checksum}


def score(images: torch.Tensor, labels: torch.Tensor, evaluator, seed: int, data) -> dict:
    """Sample-quality metrics against the test set of ``data`` (a DataConfig; null without
    an evaluator)."""
    if evaluator is None:
        return dict.fromkeys(METRICS)
    kw = {"data_dir": data.data_dir, "dataset": data.dataset, "evaluator": evaluator}
    m = evaluate_images(images, labels, seed=seed, **kw)
    return {**{k: m.get(k) for k in METRICS}, "kid_std": m["kid_std"]}


def floor_metrics(evaluator, n: int, seed: int, data) -> dict[str, Any] | None:
    """Real-data floor (N real training images of ``data`` vs its test reference)."""
    if evaluator is None:
        return None
    f = real_data_floor(evaluator, n, seed=seed, data_dir=data.data_dir, dataset=data.dataset)
    return {"num_samples": n, **{k: f.get(k) for k in METRICS}}


def with_floor(row: dict, floor: dict | None) -> dict:
    """Add ``fd_floor`` and ``fd_ratio_to_floor``."""
    fd_floor = floor["fd_mnist"] if floor else None
    fd = row.get("fd_mnist")
    ratio = fd / fd_floor if fd is not None and fd_floor else None
    return {**row, "fd_floor": fd_floor, "fd_ratio_to_floor": ratio}


# --------------------------------------------------------------------------- the recipe


def train_for_budget(cfg: Config, minutes: float, run_dir: Path) -> dict[str, Any]:
    """``train()`` under ``train.time_budget_minutes``: the loop measures its own speed, fits
    the LR schedule to the budget and stops on time (validation and checkpoints included)."""
    cap = cfg.train.steps or 10**8
    run_cfg = with_train(
        cfg, **BUDGET_TRAIN, time_budget_minutes=minutes, steps=cap, run_dir=str(run_dir)
    )
    t0 = time.perf_counter()
    train(run_cfg, log=log)
    seconds = time.perf_counter() - t0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    steps = state["step"]
    d = cfg.data
    train_size = len(load_dataset(d.dataset, d.data_dir, download=d.download).train_labels)
    train_size -= d.val_size  # the validation split is held out (cached load)
    losses = [r for r in state["history"] if "val_loss" in r]
    return {
        "minutes": seconds / 60,
        "budget_minutes": minutes,
        "train_loop_minutes": state["train_seconds"] / 60,
        "steps": steps,
        "epochs": steps * cfg.train.batch_size / train_size,
        "images_per_sec": steps * cfg.train.batch_size / state["train_seconds"],
        "final_val_loss": losses[-1]["val_loss"] if losses else None,
    }


def sample_recipe(run_dir: Path, num: int, seed: int, device: str):
    """Balanced labels, sampled with the recipe's own settings; ``(stats, uint8, labels)``."""
    pipe = Pipeline.load(run_dir, device=device)
    labels = None
    if pipe.conditional:
        labels = label_tensor(per_class=-(-num // pipe.spec.num_classes))[:num]
    t0 = time.perf_counter()
    out = pipe.generate(labels, num, seed=seed)
    seconds = time.perf_counter() - t0
    s = pipe.cfg.sample
    stats = {
        "num_samples": num,
        "sampler": s.sampler,
        "sampler_steps": s.steps,
        "nfe": out.nfe,
        "passes_per_image": out.passes_per_image,
        "guidance_distilled": pipe.denoiser.accepts_guidance,
        "guidance": s.guidance if pipe.conditional else None,
        "sample_precision": pipe.precision.name,
        "sampling_seconds": seconds,
        "sampling_images_per_sec": num / seconds,
        "parameters": sum(p.numel() for p in pipe.denoiser.backbone.parameters()),
    }
    return stats, pipe.to_uint8(out.x), labels


def run_recipe(cfg: Config, name: str, args, evaluator, floor, tmp: Path) -> dict[str, Any]:
    """Budget training, sampling and scoring of one package recipe."""
    keep = Path(args.out_dir) / name if args.out_dir else None
    run_dir = keep or tmp / f"{name}-run"
    log(f"[{name}] training for {args.minutes:g} min")
    row = {"name": name, "config": args.config, "train_precision": cfg.train.precision}
    row |= train_for_budget(cfg, args.minutes, run_dir)
    row["batch_size"] = cfg.train.batch_size
    row["threads"] = torch.get_num_threads()
    log(f"[{name}] sampling {args.num_samples} images")
    stats, images, labels = sample_recipe(run_dir, args.num_samples, args.seed, cfg.train.device)
    row |= stats
    row |= score(images, labels, evaluator, args.seed, cfg.data)
    save_samples(images, labels, args.out_dir, name)
    return with_floor(row, floor)


# --------------------------------------------------------------------------- distillation


def parse_distill_spec(spec: str) -> tuple[str, int | None]:
    """``"progressive:4"`` -> ``("progressive", 4)``; ``"guidance"`` -> ``("guidance", None)``."""
    from mnistdiff.config import DISTILL_METHODS

    method, _, steps = spec.partition(":")
    if method not in DISTILL_METHODS:
        raise ConfigError(f"--distill {spec!r}: method must be one of {list(DISTILL_METHODS)}")
    if steps and not (steps.isdigit() and int(steps) >= 1):
        raise ConfigError(f"--distill {spec!r}: steps must be a positive integer")
    return method, int(steps) if steps else None


def run_student(teacher_dir: Path, spec: str, args, evaluator, floor, tmp: Path) -> dict:
    """Distill one student from ``teacher_dir`` under the budget, sample and score it."""
    from mnistdiff.distill import distill_checkpoint

    method, steps = parse_distill_spec(spec)
    name = f"{method}-{steps}" if steps else method
    run_dir = (Path(args.out_dir) if args.out_dir else tmp) / f"student-{name}"
    log(f"[{name}] distilling from {teacher_dir} for {args.distill_minutes:g} min")
    t0 = time.perf_counter()
    distill_checkpoint(
        str(teacher_dir),
        method,
        run_dir=str(run_dir),
        steps=steps,
        time_budget_minutes=args.distill_minutes,
        overrides=[*args.distill_set, *(TINY_OVERRIDES if args.tiny else ())],
        log=log,
    )
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    row = {
        "name": name,
        "method": method,
        "teacher": str(teacher_dir),
        "distill_minutes": (time.perf_counter() - t0) / 60,
        "distill_loop_minutes": state["train_seconds"] / 60,
        "distill_steps": state["step"],
    }
    log(f"[{name}] sampling {args.num_samples} images")
    cfg = state["config"]
    stats, images, labels = sample_recipe(
        run_dir, args.num_samples, args.seed, cfg["train"]["device"]
    )
    row |= stats
    row |= score(images, labels, evaluator, args.seed, cfg["data"]["data_dir"])
    save_samples(images, labels, args.out_dir, f"student-{name}")
    return with_floor(row, floor)


def run_teacher(run_dir: Path, args, evaluator, floor, data_dir) -> dict:
    """Sample and score an existing run with its own settings (the teacher row)."""
    log(f"[teacher] sampling {args.num_samples} images from {run_dir}")
    stats, images, labels = sample_recipe(run_dir, args.num_samples, args.seed, "auto")
    row = {"name": "teacher", "run": str(run_dir), **stats}
    row |= score(images, labels, evaluator, args.seed, data_dir)
    save_samples(images, labels, args.out_dir, "teacher")
    return with_floor(row, floor)


def over_teacher(row: dict, teacher: dict) -> dict:
    """FD and sampling-time ratios of a student to its teacher."""
    out = {}
    for k in ("fd_mnist", "sampling_seconds", "passes_per_image"):
        a, b = row.get(k), teacher.get(k)
        out[f"{k}_over_teacher"] = a / b if a is not None and b else None
    return {**row, **out}


# --------------------------------------------------------------------------- the baseline


def run_diffusers(cfg: Config, args, evaluator, floor) -> dict[str, Any]:
    """The diffusers tutorial recipe on the same training split, budget and N."""
    from dataclasses import replace

    import diffusers_recipe as dr

    recipe = dr.DiffusersRecipe(precision=args.baseline_precision, seed=args.seed)
    if args.tiny:
        recipe = replace(recipe, **dr.TINY)
    data = load_train_data(cfg)
    log(f"[diffusers] training for {args.minutes:g} min")
    stats, images, labels = dr.run(
        recipe, args.minutes, args.num_samples, x=data.train_x, y=data.train_y, seed=args.seed
    )
    row = {"name": "diffusers", "config": "benchmarks/diffusers_recipe.py"}
    row |= {k: v for k, v in stats.items() if k != "recipe"}
    row |= {"train_precision": recipe.precision, "batch_size": recipe.batch_size}
    row |= score(images, labels, evaluator, args.seed, cfg.data)
    save_samples(images, labels, args.out_dir, "diffusers")
    return with_floor(row, floor)


# --------------------------------------------------------------------------- output


def save_samples(images: torch.Tensor, labels, out_dir: str | None, name: str) -> None:
    """``<out_dir>/<name>_samples.npz`` and a PNG grid (up to 8 per class)."""
    if not out_dir:
        return
    labels = labels if labels is not None else torch.full((len(images),), -1)
    save_npz(Path(out_dir) / f"{name}_samples.npz", images, labels)
    picks = [torch.nonzero(labels == c).flatten()[:8] for c in labels.unique().tolist()]
    save_grid(images[torch.cat(picks)], Path(out_dir) / f"{name}_samples.png", nrow=8, scale=2)


def check_out_dir(out_dir: str | None, name: str) -> None:
    """Refuse, before any training, an ``--out-dir`` whose run directory has checkpoints."""
    ckpts = Path(out_dir or "") / name / "checkpoints"
    if out_dir and ckpts.is_dir() and any(ckpts.glob("*.pt")):
        raise ConfigError(f"--out-dir: {ckpts.parent} already holds a run; choose another folder")


def ratios(a: dict, b: dict) -> dict[str, float | None]:
    """``a[k] / b[k]`` for the compared keys (None when either side is missing or zero)."""
    out = {}
    for k in RATIO_KEYS:
        x, y = a.get(k), b.get(k)
        numbers = isinstance(x, (int, float)) and isinstance(y, (int, float))
        out[k] = x / y if numbers and y else None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--tiny`` fills in tiny defaults for unset ones)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="recipe (default configs/quick.yaml; tiny: smoke.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the recipe (repeatable)")  # fmt: skip
    p.add_argument("--minutes", type=float, help="training budget per recipe (default 10)")
    p.add_argument("--num-samples", type=int, help="N images to sample and score (default 2000)")
    p.add_argument("--baseline", choices=("diffusers",), help="also run this baseline")
    p.add_argument("--baseline-precision", choices=("fp32", "bf16"), default="fp32",
                   help="diffusers baseline precision (the tutorial uses fp32)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling / scoring seed")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else $MNIST_DIR)")
    p.add_argument("--out-dir", help="keep the recipe's run dir and sample .npz/.png here")
    p.add_argument("--allow-missing-evaluator", action="store_true",
                   help="run without the evaluator asset (metrics become null)")  # fmt: skip
    p.add_argument("--teacher", help="an existing run: score it and distill from it (no training)")
    p.add_argument("--distill", action="append", default=[], metavar="METHOD[:STEPS]",
                   help="a student: guidance, progressive:K or reflow:K (repeatable)")  # fmt: skip
    p.add_argument("--distill-minutes", type=float, help="budget per student (default 10)")
    p.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of every student's config (repeatable)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="smoke-sized run of a few seconds")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    tiny = {
        "config": "configs/smoke.yaml",
        "minutes": 0.02,
        "num_samples": 40,
        "distill_minutes": 0.02,
    }
    full = {
        "config": "configs/quick.yaml",
        "minutes": 10.0,
        "num_samples": 2000,
        "distill_minutes": 10.0,
    }
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.minutes <= 0 or args.distill_minutes <= 0:
        p.error("--minutes and --distill-minutes must be > 0")
    if args.num_samples < 10:
        p.error(f"--num-samples must be >= 10 (metrics need a few images), got {args.num_samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the recipe (and baseline) under the budget; print the JSON."""
    args = parse_args(argv)
    overrides = [*(TINY_OVERRIDES if args.tiny else ()), *args.set]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    try:
        recipe = load_recipe(args.config, overrides)
        check_out_dir(args.out_dir, recipe.name)
        for spec in args.distill:  # bad specs fail before any training
            parse_distill_spec(spec)
        evaluator, ev_info = evaluator_or_none(args.allow_missing_evaluator)
        if args.baseline == "diffusers":
            import diffusers  # noqa: F401  (fail before training, not after)
    except (ConfigError, EvaluatorError, ImportError) as exc:
        hint = " (pip install diffusers)" if isinstance(exc, ImportError) else ""
        log(f"quality_budget.py: error: {exc}{hint}")
        return 2
    cfg = recipe.cfg
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    floor = floor_metrics(evaluator, args.num_samples, args.seed, cfg.data)
    result = {
        **environment(select_device(cfg.train.device)),
        "budget_minutes": args.minutes,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "evaluator": ev_info,
        "floor": floor,
        "recipes": {},
        "ratios": {},
    }
    with tempfile.TemporaryDirectory(prefix="mnistdiff-quality-") as tmp:
        if args.teacher:
            teacher_dir = Path(args.teacher)
            row = run_teacher(teacher_dir, args, evaluator, floor, cfg.data.data_dir)
            name = "teacher"
        else:
            row = run_recipe(cfg, recipe.name, args, evaluator, floor, Path(tmp))
            teacher_dir = Path(args.out_dir) / recipe.name if args.out_dir else None
            name = recipe.name
        result["recipes"][name] = row
        if args.distill:
            if teacher_dir is None:
                teacher_dir = Path(tmp) / f"{recipe.name}-run"
            result["students"] = {}
            for spec in args.distill:
                if args.out:  # keep what is finished if a student fails
                    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
                student = run_student(teacher_dir, spec, args, evaluator, floor, Path(tmp))
                result["students"][student["name"]] = over_teacher(student, row)
    if args.baseline:
        if args.out:  # keep the finished recipe's result if the baseline fails
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        base = run_diffusers(cfg, args, evaluator, floor)
        result["recipes"]["diffusers"] = base
        result["ratios"][f"{recipe.name}_over_diffusers"] = ratios(row, base)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
