"""Classifier guidance beside classifier-free guidance, and the score-SDE sampler beside others.

1. Classifier guidance (Dhariwal & Nichol 2021) on an UNCONDITIONAL model: a noisy classifier
   (``--classifier FILE``, or trained here with ``mnistdiff.noisy_classifier.train_classifier``
   for ``--classifier-minutes``) steers N balanced-class samples at each ``--classifier-scales``
   value; class accuracy and fd_mnist per scale, next to the same model unguided (labels
   requested but not steered: class accuracy near chance) and next to a CONDITIONAL model with
   classifier-free guidance at ``--cfg-scale`` (same sampler and steps).
2. fd_mnist vs NFE of the reverse-SDE predictor-corrector sampler (``sde_pc``) beside other
   samplers, each on its own default time grid, at the NFE budgets of ``--nfe`` (steps from
   ``mnistdiff.samplers.steps_for_nfe``), on the conditional model at its config's guidance.

Models: ``--uncond RUN`` and ``--cond RUN`` (run dirs, checkpoints or exports; the lead trains
them, e.g. ``configs/quick.yaml`` with ``--set model.conditional=false`` for the first).
``--tiny`` builds untrained smoke models and a 10-step tiny classifier in a temporary folder and
runs in about a minute; its numbers mean nothing. JSON on stdout (and ``--out``); progress on
stderr. Example: ``python benchmarks/classifier_guidance.py --uncond runs/quick_uncond
--cond runs/quick --num-samples 1000 --out cg.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mnistdiff.evaluate import evaluate_pipeline
from mnistdiff.evaluator import load_evaluator
from mnistdiff.noisy_classifier import DEFAULT_MINUTES, train_classifier
from mnistdiff.sample import Pipeline
from mnistdiff.samplers import get_sampler, steps_for_nfe
from throughput import environment, log, write_result

KEEP = ("num_samples", "fd_mnist", "kid", "precision", "recall", "class_accuracy")
KEEP += ("sampler", "steps", "nfe", "passes_per_image", "grid", "guidance", "sampling_seconds")


def row_of(result: dict[str, Any], **extra) -> dict[str, Any]:
    """The reported fields of an ``evaluate_pipeline`` result."""
    return {**{k: result.get(k) for k in KEEP}, **extra}


def tiny_models(tmp: Path, overrides: list[str]) -> tuple[Path, Path]:
    """Untrained smoke-sized unconditional and conditional exports (plumbing only), with the
    given config overrides (e.g. the data they are scored against)."""
    from mnistdiff.build import build_denoiser
    from mnistdiff.checkpoint import write_export
    from mnistdiff.config import load_config, to_dict
    from mnistdiff.data import DataSpec

    root = Path(__file__).resolve().parents[1]
    spec = DataSpec(channels=1, size=28, num_classes=10)
    out = []
    for name, conditional in (("uncond", "false"), ("cond", "true")):
        cfg = load_config(
            root / "configs" / "smoke.yaml", [f"model.conditional={conditional}", *overrides]
        )
        torch.manual_seed(0)
        weights = build_denoiser(cfg, spec).backbone.state_dict()
        out.append(write_export(tmp / name, to_dict(cfg), spec.to_dict(), weights))
    return out[0], out[1]


def classifier_rows(args, uncond: Pipeline, cond: Pipeline, clf: Path, ev) -> dict[str, Any]:
    """Classifier guidance per scale, the unguided model, and classifier-free guidance."""
    common = {"num_samples": args.num_samples, "seed": args.seed, "evaluator": ev}
    sampling = {"sampler": args.sampler, "steps": args.steps}
    rows = []
    for s in args.classifier_scales:
        log(f"classifier guidance s={s:g}")
        r = evaluate_pipeline(uncond, classifier=str(clf), classifier_scale=s, **sampling, **common)
        rows.append(row_of(r, model="unconditional", classifier_scale=s))
    log("unguided unconditional (labels requested, not steered)")
    r = evaluate_pipeline(uncond, classifier=str(clf), classifier_scale=0.0, **sampling, **common)
    plain = row_of(r, model="unconditional", classifier_scale=0.0)
    log(f"classifier-free guidance w={args.cfg_scale:g}")
    r = evaluate_pipeline(cond, guidance=args.cfg_scale, **sampling, **common)
    return {
        "classifier_guidance": rows,
        "unguided_unconditional": plain,
        "classifier_free": row_of(r, model="conditional"),
    }


def sampler_rows(args, cond: Pipeline, ev) -> list[dict[str, Any]]:
    """fd_mnist vs NFE for each sampler on its default grid."""
    rows = []
    for name in args.samplers:
        grid = get_sampler(name).default_grid
        for budget in args.nfe:
            steps = steps_for_nfe(name, budget)
            log(f"{name}: NFE budget {budget} -> {steps} steps ({grid} grid)")
            r = evaluate_pipeline(
                cond,
                num_samples=args.num_samples,
                seed=args.seed,
                evaluator=ev,
                sampler=name,
                steps=steps,
                grid=grid,
            )
            rows.append(row_of(r, nfe_budget=budget))
    return rows


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--tiny`` fills in tiny defaults for unset ones)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uncond", help="unconditional model (run dir, checkpoint or export)")
    p.add_argument("--cond", help="conditional model, for CFG and the sampler comparison")
    p.add_argument("--classifier", help="noisy classifier .safetensors (default: train one)")
    p.add_argument("--classifier-minutes", type=float, default=DEFAULT_MINUTES,
                   help="training budget when no --classifier is given")  # fmt: skip
    p.add_argument("--classifier-scales", type=_floats, help="default 4,8,16")
    p.add_argument("--cfg-scale", type=float, help="CFG w for the comparison (default 1.4)")
    p.add_argument("--sampler", help="sampler for part 1 (default dpmpp_2m)")
    p.add_argument("--steps", type=int, help="steps for part 1 (default 20)")
    p.add_argument("--samplers", type=lambda s: s.split(","),
                   help="part 2 (default sde_pc,ddpm,ddim,dpmpp_2m)")  # fmt: skip
    p.add_argument("--nfe", type=_ints, help="part 2 NFE budgets (default 10,20,50,100)")
    p.add_argument("--num-samples", type=int, help="N images per row (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="untrained smoke models, seconds per row")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--tiny: config override of the smoke models, e.g. data.dataset=synthetic",
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    tiny = {"classifier_scales": [1.0, 4.0], "cfg_scale": 2.0, "sampler": "ddim", "steps": 3,
            "samplers": ["sde_pc", "ddim"], "nfe": [4], "num_samples": 20}  # fmt: skip
    full = {"classifier_scales": [4.0, 8.0, 16.0], "cfg_scale": 1.4, "sampler": "dpmpp_2m",
            "steps": 20, "samplers": ["sde_pc", "ddpm", "ddim", "dpmpp_2m"],
            "nfe": [10, 20, 50, 100], "num_samples": 1000}  # fmt: skip
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.tiny and not (args.uncond and args.cond):
        p.error("give --uncond RUN and --cond RUN (or --tiny)")
    if args.num_samples < 10:
        p.error(f"--num-samples must be >= 10, got {args.num_samples}")
    for name in args.samplers:
        try:
            get_sampler(name)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons; print the JSON."""
    args = parse_args(argv)
    ev = load_evaluator()
    with tempfile.TemporaryDirectory(prefix="mnistdiff-cg-") as tmp:
        uncond_path, cond_path = (args.uncond, args.cond)
        if args.tiny:
            uncond_path, cond_path = tiny_models(Path(tmp), args.set)
        clf = Path(args.classifier) if args.classifier else Path(tmp) / "classifier.safetensors"
        clf_info = None
        if not args.classifier:
            log(f"training a noisy classifier for {args.classifier_minutes:g} min")
            t0 = time.perf_counter()
            size = {"steps": 10, "batch_size": 16, "channels": (4, 8, 8), "eval_images": 100}
            meta = train_classifier(
                uncond_path, out=clf, minutes=args.classifier_minutes, seed=args.seed,
                progress=False, **(size if args.tiny else {"steps": 10**6}),
            )  # fmt: skip
            clf_info = {"trained_here": True, "seconds": time.perf_counter() - t0, **meta}
        else:
            import json

            clf_info = {"trained_here": False, **json.loads(clf.with_suffix(".json").read_text())}
        uncond, cond = Pipeline.load(uncond_path), Pipeline.load(cond_path)
        result = {
            **environment(uncond.device),
            "num_samples": args.num_samples,
            "seed": args.seed,
            "evaluator_sha256": ev.checksum,
            "classifier": clf_info,
            "classifier_scales": args.classifier_scales,
            "cfg_scale": args.cfg_scale,
            "samplers": args.samplers,
            "models": {"unconditional": str(uncond_path), "conditional": str(cond_path)},
        }
        result |= classifier_rows(args, uncond, cond, clf, ev)
        result["sampler_vs_nfe"] = sampler_rows(args, cond, ev)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
