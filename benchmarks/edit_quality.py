"""Quality of the editing methods (mnistdiff.edit) on one model, as JSON.

Sections (each with its N and settings in the JSON):

1. ``inversion``: mean reconstruction PSNR (dB, uint8 images) of N test digits against the NFE
   each way (10/20/50/100), for DDIM and Heun, without and with the true label.
2. ``restyle``: N test digits, each turned into another class (target = source + k mod 10,
   k uniform in 1..9, seeded): the evaluator's class accuracy of the results, and the style
   distance -- the mean per-pixel RMS distance (in [0, 1] units) between result and source --
   beside the same distance for plain samples of the target classes (lower = closer to the
   writer's digit).
3. ``inpaint``: N test digits with the bottom half masked, completed by RePaint (R resampling
   jumps) and by plain replacement, with and without the true label: class accuracy of the
   completions against the true label, and whether every known pixel came back exactly.
4. ``sdedit``: class swaps as in 2 by SDEdit at strengths 0.2 .. 1.0: accuracy of the target
   class and the fraction still read as the source class.
5. ``compose``: random 4-digit numbers (shared noise per number): each digit cut from the canvas
   at its known position and read by the evaluator; the fraction read as requested.

Classes are read by the project's evaluator (``mnistdiff.evaluator``). Run on a trained model:
``python benchmarks/edit_quality.py --checkpoint runs/pretrained --out edit.json``.
``--tiny`` runs every section with a handful of images and two NFE values in seconds (the
plumbing test in tests/test_benchmarks.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from mnistdiff import edit
from mnistdiff.data import load_dataset
from mnistdiff.device import select_device
from mnistdiff.evaluator import load_evaluator
from mnistdiff.sample import Pipeline
from throughput import environment, log, write_result

FULL = {"n": 500, "nfe": [10, 20, 50, 100], "strengths": [0.2, 0.4, 0.6, 0.8, 1.0], "numbers": 100}
TINY = {"n": 4, "nfe": [2, 4], "strengths": [0.5, 1.0], "numbers": 2}


def read_classes(evaluator, images: torch.Tensor) -> torch.Tensor:
    """The evaluator's predicted class of uint8 images ``[N, 28, 28]``."""
    _, logits = evaluator.embed(images)
    return logits.argmax(1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((pred == labels).float().mean()), 4)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the per-pixel RMS difference, images scaled to [0, 1]."""
    d = (a.float() - b.float()) / 255.0
    return round(float(d.pow(2).flatten(1).mean(1).sqrt().mean()), 4)


def swap_targets(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Another class for every label: ``(y + k) mod 10`` with k uniform in 1..9."""
    g = torch.Generator().manual_seed(seed)
    return (labels + torch.randint(1, 10, labels.shape, generator=g)) % 10


def bench_inversion(pipe, images, labels, nfes: list[int], batch: int) -> list[dict]:
    rows = []
    for sampler in ("ddim", "heun"):
        for nfe in nfes:
            if sampler == "heun" and nfe < 3:
                continue
            for use_label in (False, True):
                if use_label and not pipe.conditional:
                    continue
                t0 = time.perf_counter()
                out = edit.reconstruct(
                    pipe, images, labels if use_label else None, sampler=sampler, nfe=nfe,
                    batch_size=batch,
                )  # fmt: skip
                psnr = torch.tensor(out.info["psnr"]).clamp(max=100)
                rows.append(
                    {
                        "sampler": sampler,
                        "label": use_label,
                        "nfe_invert": out.info["nfe_invert"],
                        "nfe_decode": out.info["nfe_decode"],
                        "steps": out.info["options"]["steps"],
                        "mean_psnr": round(float(psnr.mean()), 3),
                        "min_psnr": round(float(psnr.min()), 3),
                        "frac_psnr_ge_25": round(float((psnr >= 25).float().mean()), 4),
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                log(f"inversion {rows[-1]}")
    return rows


def bench_restyle(pipe, evaluator, images, labels, seed, batch, strengths) -> dict:
    targets = swap_targets(labels, seed)
    plain = pipe.sample(labels=targets, seed=seed, batch_size=batch)
    result: dict[str, Any] = {
        "n": len(images),
        "plain_samples_style_distance": rms_distance(plain, images),
        "plain_samples_accuracy": accuracy(read_classes(evaluator, plain), targets),
        "by_strength": [],
    }
    for strength in strengths:
        out = edit.restyle(pipe, images, targets, labels, strength=strength, batch_size=batch)
        pred = read_classes(evaluator, out.images)
        row = {
            "strength": strength,
            "accuracy": accuracy(pred, targets),
            "style_distance": rms_distance(out.images, images),
            "nfe": out.nfe,
        }
        result["by_strength"].append(row)
        log(f"restyle {row}")
    return result


def bench_inpaint(pipe, evaluator, images, labels, resample, batch, seed) -> list[dict]:
    mask = edit.make_mask("bottom")
    rows = []
    for method in ("repaint", "replace"):
        for use_label in (False, True):
            if use_label and not pipe.conditional:
                continue
            out = edit.inpaint(
                pipe, images, mask, labels if use_label else None, method=method,
                resample=resample, seed=seed, batch_size=batch,
            )  # fmt: skip
            row = {
                "method": method,
                "label": use_label,
                "resample": out.info["resample"],
                "accuracy": accuracy(read_classes(evaluator, out.images), labels),
                "known_pixels_exact": bool(torch.equal(out.images[:, ~mask], images[:, ~mask])),
                "nfe": out.nfe,
            }
            rows.append(row)
            log(f"inpaint {row}")
    return rows


def bench_sdedit(pipe, evaluator, images, labels, strengths, seed, batch) -> list[dict]:
    targets = swap_targets(labels, seed)
    rows = []
    for strength in strengths:
        out = edit.sdedit(pipe, images, strength, targets, seed=seed, batch_size=batch)
        pred = read_classes(evaluator, out.images)
        row = {
            "strength": strength,
            "target_accuracy": accuracy(pred, targets),
            "still_source": accuracy(pred, labels),
            "nfe": out.nfe,
        }
        rows.append(row)
        log(f"sdedit {row}")
    return rows


def bench_compose(pipe, evaluator, numbers: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    requested, read, widths = [], [], []
    for i in range(numbers):
        text = "".join(str(int(d)) for d in torch.randint(0, 10, (4,), generator=g))
        out = edit.compose(pipe, text, seed=seed + i)
        cuts = torch.stack([out.cut(k) for k in range(len(text))])
        requested += [int(c) for c in text]
        read += read_classes(evaluator, cuts).tolist()
        widths.append(out.image.shape[1])
    req, got = torch.tensor(requested), torch.tensor(read)
    numbers_ok = (req == got).view(-1, 4).all(1)
    return {
        "numbers": numbers,
        "digits": len(requested),
        "digit_accuracy": accuracy(got, req),
        "number_accuracy": round(float(numbers_ok.float().mean()), 4),
        "mean_width_px": round(sum(widths) / len(widths), 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint or export")
    p.add_argument("--tiny", action="store_true", help="a few images per section (plumbing)")
    p.add_argument("--n", type=int, help="test digits per section (default 500)")
    p.add_argument("--nfe", type=int, nargs="+", help="inversion NFE each way (10 20 50 100)")
    p.add_argument("--strengths", type=float, nargs="+", help="SDEdit strengths")
    p.add_argument("--restyle-strengths", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--numbers", type=int, help="random 4-digit numbers to compose (100)")
    p.add_argument("--resample", type=int, default=5, help="RePaint's R")
    p.add_argument(
        "--sections", nargs="+", default=["inversion", "restyle", "inpaint", "sdedit", "compose"]
    )
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="MNIST folder (else $MNIST_DIR or cache)")
    p.add_argument("--out", help="also write the JSON here (atomically)")
    args = p.parse_args(argv)
    base = TINY if args.tiny else FULL
    args.n = args.n or base["n"]
    args.nfe = args.nfe or base["nfe"]
    args.strengths = args.strengths or base["strengths"]
    args.numbers = args.numbers or base["numbers"]
    if args.tiny:
        args.restyle_strengths = [1.0]
        args.resample = 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    pipe = Pipeline.load(args.checkpoint, device=str(device))
    evaluator = load_evaluator(device=str(device))
    data = pipe.cfg.data  # the model's own dataset and its test split
    arrays = load_dataset(data.dataset, args.data_dir or data.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(arrays.test_labels), generator=g)[: args.n]
    images, labels = arrays.test_images[idx].clone(), arrays.test_labels[idx].clone()
    result: dict[str, Any] = {
        "checkpoint": str(pipe.source),
        "step": pipe.info.get("step"),
        "config_sample": {
            "sampler": pipe.cfg.sample.sampler,
            "steps": pipe.cfg.sample.steps,
            "grid": pipe.cfg.sample.grid,
            "guidance": pipe.cfg.sample.guidance,
        },
        "schedule": pipe.cfg.diffusion.schedule,
        "prediction": pipe.cfg.diffusion.prediction,
        "conditional": pipe.conditional,
        "n_test_digits": args.n,
        "seed": args.seed,
        "tiny": args.tiny,
        "environment": environment(device),
    }
    sections = set(args.sections)
    t0 = time.perf_counter()
    if "inversion" in sections:
        result["inversion"] = bench_inversion(pipe, images, labels, args.nfe, args.batch_size)
    if "inpaint" in sections:
        result["inpaint"] = bench_inpaint(
            pipe, evaluator, images, labels, args.resample, args.batch_size, args.seed
        )
    if pipe.conditional and "restyle" in sections:
        result["restyle"] = bench_restyle(
            pipe, evaluator, images, labels, args.seed, args.batch_size, args.restyle_strengths
        )
    if pipe.conditional and "sdedit" in sections:
        result["sdedit"] = bench_sdedit(
            pipe, evaluator, images, labels, args.strengths, args.seed, args.batch_size
        )
    if pipe.conditional and "compose" in sections:
        result["compose"] = bench_compose(pipe, evaluator, args.numbers, args.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
