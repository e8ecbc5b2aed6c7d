"""Throughput of each recipe on this machine: training and sampling speed, fp32 vs bf16.

For every recipe (a config file) and precision, side by side in one process:

- training images/s through the real training loop (``mnistdiff.train.train``: Denoiser,
  diffusion_loss, AdamW, EMA, data path), one metrics record per step, warm-up steps dropped;
- sampling images/s through the real sampling engine (``Pipeline.generate``) with the recipe's
  sampler, steps and guidance, also per network evaluation (image-NFEs/s);
- model FLOPs per training image (forward + backward, ``mnistdiff.models.flops.train_flops``) and
  per sampled image, achieved FLOP/s and model FLOP utilisation (MFU) against square-matmul
  peaks (fp32 and bf16) measured in the same run, before and after the recipes (the faster);
- peak memory (CPU: peak RSS, reset before each measurement where Linux allows; CUDA:
  ``torch.cuda.max_memory_allocated``);
- a ``torch.profiler`` breakdown of training steps (top ops by self CPU time).

JSON goes to stdout (and ``--out``); progress goes to stderr. ``--tiny`` runs in seconds.
Example: ``python benchmarks/throughput.py --configs configs/quick.yaml --out tp.json``;
``--batch-size 32 64`` measures each recipe at both batch sizes in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mnistdiff.atomic import atomic_write_text
from mnistdiff.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from mnistdiff.device import select_device
from mnistdiff.models.flops import forward_flops, train_flops
from mnistdiff.sample import Pipeline, label_tensor
from mnistdiff.tracking import read_metrics
from mnistdiff.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("configs/quick.yaml", "configs/dit.yaml")
PRECISIONS = ("fp32", "bf16")
# The measurement runs must not spend time on anything but steps: no validation, previews,
# periodic checkpoints or TensorBoard; one metrics record per step gives per-step timings.
MEASURE_TRAIN = {
    "steps": 10**9,
    "log_every": 1,
    "val_every": 10**9,
    "checkpoint_every": 10**9,
    "preview_every_epochs": 0,
    "eval_every_epochs": 0,
    "tensorboard": False,
    "progress": False,
}


def log(message: str) -> None:
    """Progress line on stderr (stdout is reserved for the JSON result)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """A named, resolved config to benchmark."""

    name: str
    source: str
    cfg: Config


def with_train(cfg: Config, **train_keys: Any) -> Config:
    """``cfg`` with ``train.<key>`` values replaced (validated like any override)."""
    overrides = {f"train.{k}": v for k, v in train_keys.items()}
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def load_recipe(path: str, overrides: list[str], name: str | None = None) -> Recipe:
    """Resolve a config file (relative paths also tried from the repository root)."""
    p = Path(path)
    if not p.is_file() and (ROOT / p).is_file():
        p = ROOT / p
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    return Recipe(name or p.stem, str(path), load_config(p, overrides))


def tiny_recipes(overrides: list[str]) -> list[Recipe]:
    """``configs/smoke.yaml`` (tiny UNet): a few seconds of work in total."""
    return [load_recipe("configs/smoke.yaml", overrides, "smoke")]


# --------------------------------------------------------------------------- memory, peaks


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CPU: Linux ``clear_refs``; elsewhere a no-op)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS that getrusage reports
    except OSError:
        pass  # not Linux: the peak is the process high-water mark


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, else KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_SIZE = 256
EMULATED_FLOPS = 5e9  # FLOP/s; far below any native fp32/bf16 matmul


def matmul_peak(
    dtype: torch.dtype, size: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Best FLOP/s of ``size x size`` matmuls in ``dtype`` (``2 n^3`` FLOPs each).

    Where one ``PROBE_SIZE`` matmul runs below ``EMULATED_FLOPS`` (bf16 on CPUs without bf16
    instructions) the probe size is measured instead, so the result takes seconds, not minutes;
    ``size`` in the result is the size measured.
    """
    if size > PROBE_SIZE and matmul_peak(dtype, PROBE_SIZE, 1, device)["flops_per_sec"] < (
        EMULATED_FLOPS
    ):
        size = PROBE_SIZE
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    for _ in range(3):  # warm-up (library init, thread pool, clocks)
        torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"size": size, "flops_per_sec": 2 * size**3 / best, "seconds": best}


def matmul_peaks(
    sizes: list[int], device: torch.device, repeats: int = 5
) -> dict[str, dict[str, Any]]:
    """Per precision, the best :func:`matmul_peak` over ``sizes`` (with every size's result)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        runs = [matmul_peak(dtype, n, repeats, device) for n in sizes]
        best = max(runs, key=lambda r: r["flops_per_sec"])
        out[name] = {**best, "by_size": runs}
    return out


def best_peaks(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """Per precision and size, the faster of two :func:`matmul_peaks` passes.

    The peaks are measured before and after the recipes: this machine's speed drifts, and a
    slow pass would inflate every MFU (one pass read fp32 102 GFLOP/s where the others of
    the same hour read 184-201).
    """
    out = {}
    for name in before:
        runs = [
            max(b, a, key=lambda r: r["flops_per_sec"])
            for b, a in zip(before[name]["by_size"], after[name]["by_size"], strict=True)
        ]
        best = max(runs, key=lambda r: r["flops_per_sec"])
        passes = [before[name]["flops_per_sec"], after[name]["flops_per_sec"]]
        out[name] = {**best, "by_size": runs, "passes_flops_per_sec": passes}
    return out


def add_rates(recipe_result: dict, peaks: dict) -> None:
    """Add achieved FLOP/s and MFU to every precision of one measured recipe."""
    for precision, res in recipe_result["precisions"].items():
        res.update(_rates(res, recipe_result, peaks, precision))


# --------------------------------------------------------------------------- training speed


def _step_seconds(run_dir: Path, batch_size: int, skip: int) -> list[float]:
    """Per-step seconds from the run's per-step metrics records, after ``skip`` steps."""
    records = [r for r in read_metrics(run_dir) if "images_per_sec" in r and r["step"] > skip]
    return [batch_size / r["images_per_sec"] for r in records]


def timed_train_steps(
    cfg: Config, precision: str, steps: int, warmup: int, run_dir: Path
) -> list[float]:
    """Run ``warmup + steps`` steps of the real training loop; seconds of the last ``steps``."""
    run_cfg = with_train(cfg, **MEASURE_TRAIN, precision=precision, run_dir=str(run_dir))
    train(run_cfg, stop_after_steps=warmup + steps, log=lambda *a, **k: None)
    return _step_seconds(run_dir, cfg.train.batch_size, warmup)


def measure_training(
    cfg: Config, precision: str, seconds: float, warmup: int, workdir: Path
) -> dict[str, Any]:
    """Training images/s of ``cfg`` at ``precision`` for about ``seconds`` of steps.

    A short calibration run (``warmup`` + 3 steps) sizes the measured run; each run is a fresh
    ``train()`` call. The returned ``run_dir`` holds the last run's checkpoint.
    """
    device = select_device(cfg.train.device)
    run_dir = workdir / f"{precision}-calibrate"
    reset_peak_memory(device)
    times = timed_train_steps(cfg, precision, 3, warmup, run_dir)
    wanted = math.ceil(seconds / statistics.median(times))
    if wanted > len(times):
        run_dir = workdir / f"{precision}-measure"
        reset_peak_memory(device)
        times = timed_train_steps(cfg, precision, wanted, warmup, run_dir)
    total = sum(times)
    return {
        "train_images_per_sec": len(times) * cfg.train.batch_size / total,
        "train_step_seconds_median": statistics.median(times),
        "train_steps_measured": len(times),
        "train_seconds_measured": total,
        "train_peak_memory_mb": peak_memory_mb(device),
        "run_dir": run_dir,
    }


# --------------------------------------------------------------------------- sampling speed


def measure_sampling(pipe: Pipeline, num: int, seconds: float) -> dict[str, Any]:
    """Sampling images/s with the recipe's sampler settings, one batch of ``num`` per call."""
    labels = None
    if pipe.conditional:
        labels = label_tensor(per_class=-(-num // pipe.spec.num_classes))[:num]
    pipe.generate(labels, num, batch_size=num, steps=min(2, pipe.cfg.sample.steps))  # warm-up
    reset_peak_memory(pipe.device)
    images, elapsed, calls = 0, 0.0, 0
    while calls == 0 or elapsed < seconds:
        t0 = time.perf_counter()
        out = pipe.generate(labels, num, seed=calls, batch_size=num)
        _sync(pipe.device)
        elapsed += time.perf_counter() - t0
        images += num
        calls += 1
    return {
        "sample_images_per_sec": images / elapsed,
        "sample_image_nfes_per_sec": images * out.nfe / elapsed,
        "sample_batch": num,
        "sample_seconds_measured": elapsed,
        "sample_peak_memory_mb": peak_memory_mb(pipe.device),
        "nfe": out.nfe,
        "passes_per_image": out.passes_per_image,
    }


# --------------------------------------------------------------------------- profile


OPTIMIZER_RANGE = "Optimizer.step#"  # the profiler range PyTorch records around optimizer.step()


def _step_window(events: list, warmup: int, steps: int) -> tuple[float, float]:
    """(start, end) in µs: from the end of optimizer step ``warmup`` to the end of step
    ``warmup + steps``. Each window holds whole step cycles (EMA, batch, forward, backward,
    optimizer), and nothing of the set-up before or the checkpoint after."""
    opt = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.name.startswith(OPTIMIZER_RANGE)
    )
    if len(opt) < warmup + steps:
        raise RuntimeError(
            f"profile: found {len(opt)} optimizer steps, expected {warmup + steps}; "
            "did training stop early?"
        )
    return opt[warmup - 1][1], opt[warmup + steps - 1][1]


# The named ranges of one training step (``record_function`` in ``mnistdiff.train``).
PHASES = ("train/data", "train/forward", "train/backward", "train/optimizer", "train/ema",
          "train/logging")  # fmt: skip


def _phase_ms(events: list, lo: float, hi: float, steps: int) -> dict[str, float]:
    """Wall time per step (ms, inclusive of the ops inside) of each phase in [lo, hi)."""
    total = dict.fromkeys(PHASES, 0.0)
    for e in events:
        if e.name in total and lo <= e.time_range.start < hi:
            total[e.name] += e.time_range.end - e.time_range.start
    return {name: us / steps / 1e3 for name, us in total.items()}


def profile_training(
    cfg: Config, precision: str, steps: int, warmup: int, workdir: Path, top: int = 10
) -> dict[str, Any]:
    """Time per training step by phase (data, forward, backward, optimizer, EMA, logging) and
    the top ops by self CPU time, under ``torch.profiler``.

    One profiled ``train()`` call of ``warmup + steps`` steps (``warmup`` >= 1); only the ops
    that start inside the last ``steps`` step cycles are counted (:func:`_step_window`).
    """
    from torch.profiler import ProfilerActivity, profile

    warmup = max(warmup, 1)
    acts = [ProfilerActivity.CPU]
    if select_device(cfg.train.device).type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        timed_train_steps(cfg, precision, steps, warmup, workdir / f"profile-{precision}")
    events = prof.events()
    lo, hi = _step_window(events, warmup, steps)
    totals: dict[str, list[float]] = {}
    for e in events:
        if lo <= e.time_range.start < hi:
            entry = totals.setdefault(e.name, [0.0, 0])
            entry[0] += e.self_cpu_time_total
            entry[1] += 1
    step_us = (hi - lo) / steps
    phases = _phase_ms(events, lo, hi, steps)
    for name in PHASES:
        totals.pop(name, None)  # user ranges, not ops: their self time is Python glue
    ops = sorted(((us / steps, n / steps, name) for name, (us, n) in totals.items()), reverse=True)
    tracked_us = sum(us for us, _, _ in ops)
    return {
        "precision": precision,
        "steps": steps,
        "step_ms_under_profiler": step_us / 1e3,
        "ops_self_cpu_ms_per_step": tracked_us / 1e3,
        "untracked_ms_per_step": max(step_us - tracked_us, 0.0) / 1e3,
        "phases": {
            name.removeprefix("train/"): {"ms_per_step": ms, "share_of_step": ms * 1e3 / step_us}
            for name, ms in phases.items()
        },
        "top_ops": [
            {
                "op": name,
                "self_cpu_ms_per_step": us / 1e3,
                "share_of_step": us / step_us,
                "calls_per_step": count,
            }
            for us, count, name in ops[:top]
        ],
    }


# --------------------------------------------------------------------------- one recipe


def model_flops(pipe: Pipeline) -> dict[str, int]:
    """Parameters, and per-image FLOPs of a training step and of one full sample."""
    backbone, cfg = pipe.denoiser.backbone, pipe.cfg
    cond = cfg.model.conditional
    fwd = forward_flops(backbone, pipe.spec, batch_size=2, conditional=cond)
    trn = train_flops(backbone, pipe.spec, batch_size=2, conditional=cond)
    return {
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "forward_flops_per_image": fwd,
        "train_flops_per_image": trn,
    }


def _rates(res: dict, flops: dict, peaks: dict, precision: str) -> dict[str, float]:
    """Achieved FLOP/s and MFU (vs the same precision's peak and vs the bf16 peak)."""
    train_fs = res["train_images_per_sec"] * flops["train_flops_per_image"]
    per_image = flops["forward_flops_per_image"] * flops["passes_per_image"]
    sample_fs = res["sample_images_per_sec"] * per_image
    own, bf16 = peaks[precision]["flops_per_sec"], peaks["bf16"]["flops_per_sec"]
    return {
        "train_flops_per_sec": train_fs,
        "train_mfu": train_fs / own,
        "train_mfu_vs_bf16_peak": train_fs / bf16,
        "sample_flops_per_image": per_image,
        "sample_flops_per_sec": sample_fs,
        "sample_mfu": sample_fs / own,
    }


def _speedups(per_precision: dict) -> dict[str, float]:
    if not {"fp32", "bf16"} <= per_precision.keys():
        return {}
    fp32, bf16 = per_precision["fp32"], per_precision["bf16"]
    return {
        "bf16_speedup_train": bf16["train_images_per_sec"] / fp32["train_images_per_sec"],
        "bf16_speedup_sample": bf16["sample_images_per_sec"] / fp32["sample_images_per_sec"],
    }


def bench_recipe(recipe: Recipe, args, workdir: Path) -> dict[str, Any]:
    """Every measurement of one recipe, each precision side by side."""
    cfg = recipe.cfg
    s = cfg.sample
    workdir = workdir / f"{recipe.name}-b{cfg.train.batch_size}"
    out: dict[str, Any] = {
        "name": recipe.name,
        "config": recipe.source,
        "model": cfg.model.type,
        "batch_size": cfg.train.batch_size,
        "recipe_precision": cfg.train.precision,
        "sampler": s.sampler,
        "sampler_steps": s.steps,
        "guidance": s.guidance if cfg.model.conditional else None,
    }
    per_precision = {}
    for precision in args.precisions:
        log(f"[{recipe.name}] {precision}: training")
        res = measure_training(cfg, precision, args.seconds, args.warmup, workdir)
        pipe = Pipeline.load(res.pop("run_dir"), device=cfg.train.device, precision=precision)
        if "train_flops_per_image" not in out:
            out.update(model_flops(pipe))
        log(f"[{recipe.name}] {precision}: sampling")
        num = args.sample_batch or min(s.batch_size, 256)
        res.update(measure_sampling(pipe, num, args.seconds))
        out["nfe"], out["passes_per_image"] = res.pop("nfe"), res.pop("passes_per_image")
        per_precision[precision] = res
    out["precisions"] = per_precision
    out.update(_speedups(per_precision), threads=torch.get_num_threads())
    if args.profile_steps:
        log(f"[{recipe.name}] profiling {args.profile_steps} steps ({cfg.train.precision})")
        out["profile"] = profile_training(
            cfg, cfg.train.precision, args.profile_steps, args.warmup, workdir
        )
    return out


# --------------------------------------------------------------------------- diffusers baseline


def _timed_loop(fn, seconds: float, min_calls: int = 1) -> tuple[int, float]:
    """Call ``fn`` until ``seconds`` have passed (at least ``min_calls`` times)."""
    calls, elapsed = 0, 0.0
    while calls < min_calls or elapsed < seconds:
        t0 = time.perf_counter()
        fn()
        elapsed += time.perf_counter() - t0
        calls += 1
    return calls, elapsed


def _diffusers_precision(dr, recipe, x, y, args, num: int) -> dict[str, Any]:
    """Training and sampling speed of the tutorial recipe at one precision (CPU)."""
    model = dr.build(recipe).train()
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched, gen = dr.noise_scheduler(recipe), torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(y), (recipe.batch_size,), generator=gen)
        dr.train_step(model, opt, sched, x[idx], y[idx], recipe, gen)

    device = torch.device("cpu")
    reset_peak_memory(device)
    for _ in range(args.warmup):
        step()
    steps, secs = _timed_loop(step, args.seconds, 2)
    res = {
        "train_images_per_sec": steps * recipe.batch_size / secs,
        "train_step_seconds_median": secs / steps,
        "train_steps_measured": steps,
        "train_seconds_measured": secs,
        "train_peak_memory_mb": peak_memory_mb(device),
    }
    labels = dr.balanced_labels(num)
    dr.sample(model, labels, replace(recipe, sample_steps=1), batch_size=num)  # warm-up
    reset_peak_memory(device)
    calls, secs = _timed_loop(
        lambda: dr.sample(model, labels, recipe, batch_size=num), args.seconds
    )
    return res | {
        "sample_images_per_sec": calls * num / secs,
        "sample_image_nfes_per_sec": calls * num * recipe.sample_steps / secs,
        "sample_batch": num,
        "sample_seconds_measured": secs,
        "sample_peak_memory_mb": peak_memory_mb(device),
    }


def bench_diffusers(args, cfg: Config) -> dict[str, Any]:
    """The diffusers tutorial recipe (``diffusers_recipe.py``), measured like the recipes."""
    import diffusers_recipe as dr
    from mnistdiff.build import load_train_data
    from mnistdiff.data import DataSpec

    recipe = replace(dr.DiffusersRecipe(), **dr.TINY) if args.tiny else dr.DiffusersRecipe()
    if args.batch_sizes:
        recipe = replace(recipe, batch_size=args.batch_sizes[0])
    data = load_train_data(cfg)
    model, spec = dr.build(recipe), DataSpec(channels=1, size=28, num_classes=10)
    out: dict[str, Any] = {
        "name": "diffusers",
        "config": "benchmarks/diffusers_recipe.py",
        "model": "diffusers.UNet2DModel",
        "batch_size": recipe.batch_size,
        "recipe_precision": recipe.precision,
        "sampler": "ddim",
        "sampler_steps": recipe.sample_steps,
        "guidance": None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_image": forward_flops(model, spec, batch_size=2),
        "train_flops_per_image": train_flops(model, spec, batch_size=2),
        "passes_per_image": recipe.sample_steps,
        "nfe": recipe.sample_steps,
    }
    per_precision = {}
    num = args.sample_batch or 256
    for precision in args.precisions:
        log(f"[diffusers] {precision}: training and sampling")
        prec_recipe = replace(recipe, precision=precision)
        per_precision[precision] = _diffusers_precision(
            dr, prec_recipe, data.train_x, data.train_y, args, num
        )
    out["precisions"] = per_precision
    out.update(_speedups(per_precision))
    return out


# --------------------------------------------------------------------------- main


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_result(result: dict, out: str | None) -> None:
    """JSON on stdout, and atomically to ``out`` when given."""
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    if out:
        atomic_write_text(out, text)
        log(f"wrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--tiny`` fills in tiny defaults for unset ones)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", help=f"recipes (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every recipe (repeatable)")  # fmt: skip
    p.add_argument("--batch-size", "--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                   help="training batch size(s): each recipe is measured at each, in one run "
                   "(default: the recipe's; the diffusers baseline takes the first)")  # fmt: skip
    p.add_argument("--sample-batch", type=int, help="images per sampling call (default ≤ 256)")
    p.add_argument("--seconds", type=float, help="timed seconds per measurement (default 10)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per run (default 5)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--matmul-sizes", type=int, nargs="+", help="square matmul sizes (1024 2048)")
    p.add_argument("--profile-steps", type=int, help="profiled training steps; 0 = skip (5)")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: the recipe's)")
    p.add_argument("--baseline", choices=("diffusers",), help="also measure this baseline (CPU)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else $MNIST_DIR)")
    p.add_argument("--tiny", action="store_true", help="smoke-sized run of a few seconds")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    tiny = {"seconds": 0.1, "warmup": 1, "matmul_sizes": [128, 256], "profile_steps": 1}
    tiny["sample_batch"] = 8
    full = {"seconds": 10.0, "warmup": 5, "matmul_sizes": [1024, 2048], "profile_steps": 5}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and args.configs:
        p.error("--tiny uses configs/smoke.yaml; do not combine it with --configs")
    if args.seconds <= 0 or args.warmup < 0 or args.profile_steps < 0:
        p.error("--seconds must be > 0; --warmup and --profile-steps >= 0")
    if min(args.matmul_sizes) < 1:
        p.error(f"--matmul-sizes must be >= 1, got {args.matmul_sizes}")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_sizes}")
    return args


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line flags (but the batch sizes) as config overrides."""
    out = list(args.set)
    if args.device:
        out.append(f"train.device={args.device}")
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    return out


def load_recipes(args: argparse.Namespace, overrides: list[str]) -> list[Recipe]:
    """Every recipe at every ``--batch-size`` (at its own batch size when none is given)."""
    recipes: list[Recipe] = []
    for batch in [[f"train.batch_size={b}"] for b in args.batch_sizes or ()] or [[]]:
        if args.tiny:
            recipes += tiny_recipes(overrides + batch)
        else:
            recipes += [load_recipe(c, overrides + batch) for c in args.configs or DEFAULT_CONFIGS]
    return recipes


def main(argv: list[str] | None = None) -> int:
    """Benchmark every recipe; print the JSON."""
    args = parse_args(argv)
    overrides = recipe_overrides(args)
    try:
        recipes = load_recipes(args, overrides)
        if args.baseline == "diffusers":
            import diffusers  # noqa: F401  (fail before measuring, not after)
    except (ConfigError, ImportError) as exc:
        hint = " (pip install diffusers)" if isinstance(exc, ImportError) else ""
        log(f"throughput.py: error: {exc}{hint}")
        return 2
    device = select_device(recipes[0].cfg.train.device)
    if recipes[0].cfg.train.num_threads:
        torch.set_num_threads(recipes[0].cfg.train.num_threads)
    log(f"matmul peaks (sizes {args.matmul_sizes})")
    before = matmul_peaks(args.matmul_sizes, device)
    result = {**environment(device), "recipes": []}
    with tempfile.TemporaryDirectory(prefix="mnistdiff-throughput-") as tmp:
        for recipe in recipes:
            result["recipes"].append(bench_recipe(recipe, args, Path(tmp)))
    if args.baseline == "diffusers":
        result["recipes"].append(bench_diffusers(args, recipes[0].cfg))
    log("matmul peaks again")
    result["matmul_peak"] = best_peaks(before, matmul_peaks(args.matmul_sizes, device))
    for r in result["recipes"]:
        add_rates(r, result["matmul_peak"])
    result["threads"] = torch.get_num_threads()
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
