"""Evaluation of checkpoints and sample files: sample quality, model-side metrics, sweeps.

Protocol (also in the README): N generated images (default 2000; class-conditional models get
N/10 of every class), compared in the shipped evaluator's feature space with the 10k MNIST test
images. Every result records N, NFE, seed, batch size and every sampling option needed to
reproduce it (:meth:`mnistdiff.SampleOptions.record`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import make_callable
from .atomic import atomic_path, atomic_write_text
from .config import ConfigError, SampleOptions, parse_flag
from .data import load_dataset
from .datasets import DATASETS
from .distributed import (
    DistContext,
    barrier,
    broadcast_object,
    current_context,
    setup,
    teardown,
)
from .evaluator import load_evaluator, require_evaluator
from .likelihood import (  # noqa: F401  (re-exported: model-side metrics moved there)
    bits_per_dim,
    likelihood_metrics,
    objective_mse_by_time,
    ode_bits_per_dim,
)
from .metrics import image_metrics, real_data_floor, reference_stats
from .sample import Pipeline, label_tensor, load_npz, sample_across_ranks, save_npz

# every scalar sampling option (each sampler's own included, e.g. eta) and nfe
SWEEPABLE = (
    *(f.name for f in dataclasses.fields(SampleOptions) if f.name != "guidance_interval"),
    "nfe",
)


# --------------------------------------------------------------------------- sample quality


def evaluate_images(
    images, labels=None, *, seed: int = 0, data_dir=None, evaluator=None, dataset: str = "mnist"
) -> dict[str, Any]:
    """Metrics of uint8 images (``labels`` optional) against ``dataset``'s test reference.

    Raises:
        EvaluatorError: if no shipped evaluator scores ``dataset`` (only mnist has one).
    """
    require_evaluator(dataset)
    evaluator = evaluator or load_evaluator()
    ref = reference_stats(evaluator, dataset=dataset, data_dir=data_dir)
    return image_metrics(evaluator, images, labels, ref, seed=seed)


def evaluate_pipeline(
    pipe: Pipeline,
    *,
    num_samples: int = 2000,
    seed: int = 0,
    batch_size: int | None = None,
    evaluator=None,
    progress: bool = False,
    inception: bool = False,
    ctx: DistContext | None = None,
    save_samples: str | Path | None = None,
    **options,
) -> dict[str, Any]:
    """Sample ``num_samples`` images (balanced classes when conditional) and score them
    (``inception``: also ImageNet-Inception FID on the same images).

    With several processes (``ctx``; default: the initialized process group, if any) each rank
    samples its share of the batches, rank 0 gathers and scores the images and every rank
    returns rank 0's result. The images depend on ``seed`` and ``batch_size``, not on the
    number of processes. ``save_samples``: also write them (and the labels) as ``.npz``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    require_evaluator(pipe.cfg.data.dataset)  # before any sampling
    ctx = ctx or current_context()
    opts = pipe.default_options(**options)
    batch_size = batch_size or pipe.cfg.sample.batch_size
    labels = None
    if pipe.conditional or opts.classifier is not None:
        per = -(-num_samples // pipe.spec.num_classes)
        labels = label_tensor(per_class=per, num_classes=pipe.spec.num_classes)[:num_samples]
    barrier(ctx)  # time all ranks from a common start
    t0 = time.perf_counter()
    images, nfe, passes = sample_across_ranks(
        pipe,
        labels,
        num_samples,
        ctx,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        **opts.record(),
    )
    seconds = time.perf_counter() - t0  # wall time, including the gather on rank 0
    if not ctx.is_main:
        return broadcast_object(None, ctx)
    data = pipe.cfg.data
    result = evaluate_images(
        images, labels, seed=seed, data_dir=data.data_dir, evaluator=evaluator, dataset=data.dataset
    )
    if save_samples is not None:
        no_labels = torch.full((num_samples,), -1)
        save_npz(save_samples, images, labels if labels is not None else no_labels)
        result["samples_file"] = str(save_samples)
    if inception:
        result.update(inception_fid(images, data_dir=data.data_dir, dataset=data.dataset))
    result.update(opts.record())
    result.update(
        nfe=nfe,
        passes_per_image=passes,
        guidance_distilled=pipe.denoiser.accepts_guidance,
        guidance=opts.guidance if pipe.conditional else None,
        seed=seed,
        batch_size=batch_size,
        world_size=ctx.world_size,
        sampling_seconds=seconds,
        sampling_images_per_sec=num_samples / seconds,
        checkpoint=str(pipe.source),
        step=pipe.info.get("step"),
        epoch=pipe.info.get("epoch"),
        ema=pipe.info.get("ema"),
    )
    return broadcast_object(result, ctx)


def evaluate(
    model: Pipeline | str | Path,
    *,
    num_samples: int = 2000,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Sample-quality metrics of a model (``mnistdiff.evaluate(...)`` calls this).

    Args:
        model: a loaded :class:`~mnistdiff.sample.Pipeline`, or a run directory, checkpoint
            or export directory to load (EMA weights) on ``device``.
        num_samples: images to generate (balanced over classes when conditional).
        seed: sampling seed; the images depend on it and on ``batch_size``.
        batch_size: images per sampling batch (default: the model config's).
        device: where to load ``model`` when it is a path.
        progress: show a progress bar.
        **options: sampling options overriding the model config's ``sample`` section
            (:class:`~mnistdiff.config.SampleOptions` fields, or ``nfe``).

    Returns:
        ``fd_mnist``, ``kid``, ``precision``, ``recall``, ``class_accuracy`` (conditional
        models), timings, and every option needed to reproduce the result.
    """
    pipe = model if isinstance(model, Pipeline) else Pipeline.load(model, device=device)
    return evaluate_pipeline(
        pipe,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        **options,
    )


def inception_fid(images: torch.Tensor, *, data_dir=None, dataset: str = "mnist") -> dict[str, Any]:
    """ImageNet-Inception FID against ``dataset``'s test set via torch-fidelity (optional extra).

    Clearly labelled ``inception_fid``; skipped with a message when torch-fidelity or its
    Inception weights are unavailable.
    """
    try:
        import torch_fidelity
    except ImportError:
        return {
            "inception_fid": None,
            "inception_fid_note": "skipped: pip install 'mnistdiff[fid]' (torch-fidelity)",
        }
    test = load_dataset(dataset, data_dir).test_images
    try:
        out = torch_fidelity.calculate_metrics(
            input1=_RGBImages(images), input2=_RGBImages(test), fid=True, verbose=False
        )
    except Exception as exc:  # weights download or extractor failures
        return {"inception_fid": None, "inception_fid_note": f"skipped: {exc}"}
    return {"inception_fid": float(out["frechet_inception_distance"])}


class _RGBImages(torch.utils.data.Dataset):
    """uint8 [N, H, W] grayscale as uint8 [3, H, W] items (what torch-fidelity expects)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].unsqueeze(0).expand(3, -1, -1).contiguous()


# --------------------------------------------------------------------------- sweeps


def parse_sweeps(specs: list[str]) -> dict[str, list]:
    """``["guidance=0,1,2", "sampler=ddim,heun"]`` -> ``{"guidance": [0.0, 1.0, 2.0], ...}``."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(
                f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME one of {list(SWEEPABLE)}"
            )
        name, values = spec.split("=", 1)
        if name not in SWEEPABLE:
            raise ValueError(f"--sweep {name!r}: not sweepable; allowed {list(SWEEPABLE)}")
        out[name] = [_sweep_value(name, v) for v in values.split(",") if v]
    if "steps" in out and "nfe" in out:
        raise ValueError("sweep steps or nfe, not both")
    return out


def _sweep_value(name: str, text: str) -> Any:
    if name == "nfe":
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--sweep nfe: expected whole numbers >= 1, got {text!r}")
        return int(text)
    try:
        return parse_flag(SampleOptions, name, text, flag=f"--sweep {name}")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def run_sweep(
    pipe: Pipeline,
    sweeps: dict[str, list],
    base: dict,
    *,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    log=print,
) -> list[dict]:
    """Evaluate every combination of the swept values (cartesian product)."""
    rows = []
    names = list(sweeps)
    combos = [
        {**base, **dict(zip(names, combo, strict=True))}
        for combo in itertools.product(*(sweeps[n] for n in names))
    ]
    for options in combos:  # every combination is valid before any is sampled
        pipe.default_options(**options)
    for options in combos:
        row = evaluate_pipeline(
            pipe, num_samples=num_samples, seed=seed, batch_size=batch_size, **options
        )
        log(_summary(row))
        rows.append(row)
    return rows


def sweep_checkpoints(
    run_dir: Path,
    base: dict,
    *,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    device: str,
    use_ema: bool,
    log=print,
) -> list[dict]:
    """Metrics for every ``step_*.pt`` of a run (metrics vs epoch)."""
    paths = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step_*.pt to sweep")
    rows = []
    for path in paths:
        pipe = Pipeline.load(path, device=device, use_ema=use_ema)
        row = evaluate_pipeline(
            pipe, num_samples=num_samples, seed=seed, batch_size=batch_size, **base
        )
        log(_summary(row))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting

TABLE_KEYS = (
    "step",
    "epoch",
    "sampler",
    "steps",
    "nfe",
    "passes_per_image",
    "guidance",
    "num_samples",
    "fd_mnist",
    "kid",
    "precision",
    "recall",
    "class_accuracy",
    "class_balance_tv",
    "sampling_seconds",
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(row: dict) -> str:
    keys = [k for k in TABLE_KEYS if row.get(k) is not None]
    return "  ".join(f"{k}={_fmt(row[k])}" for k in keys)


def markdown_table(rows: list[dict], keys=TABLE_KEYS) -> str:
    """A Markdown table of the rows over the keys that any row has."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], sweeps: dict[str, list], path: Path) -> Path | None:
    """FD vs NFE, FD vs class accuracy over guidance, or metrics vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if "checkpoints" in sweeps:
        x = [r.get("epoch") or r.get("step") for r in rows]
        ax.plot(x, [r["fd_mnist"] for r in rows], "o-", label="fd_mnist")
        ax.set_xlabel("epoch")
        ax.set_ylabel("fd_mnist")
        if rows[0].get("class_accuracy") is not None:
            ax2 = ax.twinx()
            ax2.plot(x, [r["class_accuracy"] for r in rows], "s--", color="C1")
            ax2.set_ylabel("class accuracy", color="C1")
    elif "guidance" in sweeps and rows[0].get("class_accuracy") is not None:
        for r in rows:
            ax.scatter(r["class_accuracy"], r["fd_mnist"], color="C0")
            ax.annotate(f"w={r['guidance']:g}", (r["class_accuracy"], r["fd_mnist"]))
        ax.set_xlabel("class accuracy")
        ax.set_ylabel("fd_mnist")
    else:
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r["fd_mnist"]) for r in rows if r["sampler"] == sampler)
            ax.plot(*zip(*pts, strict=True), "o-", label=sampler)
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel("fd_mnist")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"N = {rows[0]['num_samples']} samples vs MNIST test set")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


# --------------------------------------------------------------------------- CLI


def add_evaluate_args(p, add_sampling_args) -> None:
    """Arguments of ``mnistdiff evaluate`` (sampling flags shared with ``sample``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file, run dir or export dir")
    src.add_argument("--samples", help=".npz with images (uint8 [N,28,28]) and optional labels")
    src.add_argument(
        "--real-floor",
        action="store_true",
        help="score N real training images (the floor of every metric)",
    )
    add_sampling_args(p)
    from .cli import positive_int

    p.add_argument("--num-samples", type=positive_int, default=2000, help="images (N)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help=f"sweep one of {list(SWEEPABLE)}; repeat for a grid",
    )
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="evaluate every step_*.pt of the run (metrics vs epoch)",
    )
    p.add_argument(
        "--model-metrics",
        action="store_true",
        help="also test-set objective/eps MSE per t-bin and bits/dim",
    )
    p.add_argument(
        "--model-metric-images",
        type=positive_int,
        default=1000,
        help="test images for --model-metrics (bits/dim uses at most 100)",
    )
    p.add_argument(
        "--ode-likelihood",
        action="store_true",
        help="with --model-metrics: also probability-flow ODE bits/dim (always on for flow)",
    )
    p.add_argument(
        "--inception-fid",
        action="store_true",
        help="also ImageNet-Inception FID (needs the 'fid' extra: torch-fidelity)",
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files")
    p.add_argument(
        "--dataset",
        default="mnist",
        choices=[name for name, info in DATASETS.items() if info.evaluator],
        help="reference test set of --samples and --real-floor (a checkpoint names its own)",
    )
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--out-dir", help="where sweep tables and plots go (default: beside --json)")
    p.add_argument("--save-samples", metavar="FILE.npz", help="also write the evaluated images")


def run_evaluate_cli(args) -> int:
    """Dispatch ``mnistdiff evaluate``; print a table; write JSON/plots.

    Under torchrun (``WORLD_SIZE`` > 1) the sampling of a checkpoint evaluation, and of every
    configuration of ``--sweep`` / ``--all-checkpoints``, is split across the ranks; rank 0
    scores, prints and writes. ``--samples`` and ``--real-floor`` run on rank 0 alone.
    """
    sweeps = parse_sweeps(args.sweep)
    save = getattr(args, "save_samples", None)
    if save and (sweeps or args.all_checkpoints or not args.checkpoint):
        raise ValueError(
            "--save-samples writes the images of one checkpoint evaluation; "
            "it cannot be combined with --sweep, --all-checkpoints, --samples or --real-floor"
        )
    ctx = setup(args.device or "auto")
    try:
        if args.checkpoint:
            return _evaluate_checkpoint(args, sweeps, ctx)
        if not ctx.is_main:
            return 0
        if args.real_floor:
            result = real_data_floor(
                load_evaluator(),
                args.num_samples,
                seed=args.seed,
                data_dir=args.data_dir,
                dataset=args.dataset,
            )
            return _report([result], args, {})
        images, labels = load_npz(args.samples)
        result = evaluate_images(
            images, labels, seed=args.seed, data_dir=args.data_dir, dataset=args.dataset
        )
        result["source"] = str(args.samples)
        return _report([result], args, {})
    finally:
        teardown()


def _evaluate_checkpoint(args, sweeps: dict, ctx: DistContext) -> int:
    """``--checkpoint`` (one evaluation, a sweep or every checkpoint), split over ``ctx``."""
    from .cli import sampling_overrides

    base = sampling_overrides(args)
    device = str(ctx.device) if ctx.is_distributed else (args.device or "auto")
    log = print if ctx.is_main else _silent
    common = {"num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size}
    if args.all_checkpoints:
        rows = sweep_checkpoints(
            Path(args.checkpoint), base, device=device, use_ema=not args.no_ema, log=log, **common
        )
        return _report(rows, args, {"checkpoints": []}) if ctx.is_main else 0
    pipe = Pipeline.load(args.checkpoint, device=device, use_ema=not args.no_ema)
    _note_idle_ranks(args.num_samples, args.batch_size or pipe.cfg.sample.batch_size, ctx)
    if sweeps:
        rows = run_sweep(pipe, sweeps, base, log=log, **common)
        return _report(rows, args, sweeps) if ctx.is_main else 0
    result = evaluate_pipeline(
        pipe,
        progress=True,
        inception=args.inception_fid,
        ctx=ctx,
        save_samples=getattr(args, "save_samples", None),
        **common,
        **base,
    )
    if not ctx.is_main:
        return 0
    if args.inception_fid:
        print(result.get("inception_fid_note") or f"inception_fid: {result['inception_fid']:.3f}")
    if args.model_metrics:
        n = args.model_metric_images
        result["objective_mse_by_t"] = objective_mse_by_time(pipe, num_images=n, seed=args.seed)
        ode = True if args.ode_likelihood else None  # None: ODE bits/dim only for flow
        result.update(likelihood_metrics(pipe, num_images=min(n, 100), seed=args.seed, ode=ode))
    if result.get("samples_file"):
        print(f"wrote {result['samples_file']}")
    return _report([result], args, {})


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _note_idle_ranks(num_samples: int, batch_size: int, ctx: DistContext) -> None:
    batches = -(-num_samples // batch_size)
    if ctx.is_main and batches < ctx.world_size:
        print(
            f"note: {num_samples} samples make {batches} batch(es) of {batch_size} for "
            f"{ctx.world_size} processes, so {ctx.world_size - batches} stay idle; "
            f"--batch-size {-(-num_samples // ctx.world_size)} or less keeps all busy "
            "(the images depend on the batch size, not on the number of processes)"
        )


def _report(rows: list[dict], args, sweeps: dict) -> int:
    print(markdown_table(rows), end="")
    for row in rows:
        for key, what in (("bits_per_dim_ddpm_bound", "DDPM bound"), ("bits_per_dim_ode", "ODE")):
            if row.get(key) is not None:
                print(f"bits/dim ({what}): {row[key]:.3f} ± {row[key + '_stderr']:.3f}")
    out_dir = (
        Path(args.out_dir) if args.out_dir else (Path(args.json).parent if args.json else None)
    )
    if args.json:
        write_json(rows[0] if len(rows) == 1 and not sweeps else rows, args.json)
        print(f"wrote {args.json}")
    if sweeps and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "sweep_" + "_".join(sweeps) if sweeps else "sweep"
        atomic_write_text(out_dir / f"{name}.md", markdown_table(rows))
        plot = plot_rows(rows, sweeps, out_dir / f"{name}.png")
        print(f"wrote {out_dir / (name + '.md')} and {plot}")
    return 0


make_callable(__name__, evaluate)  # mnistdiff.evaluate(model) == mnistdiff.evaluate.evaluate(model)
