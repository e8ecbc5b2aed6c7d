"""Training speed of backbone variants side by side: fp32 and bf16, each also channels-last.

One process, one variant after another, the same batch and step (forward, MSE, backward,
AdamW), with the fp32 and bf16 matmul peaks measured first. This is the table behind the
choices in ``configs/quick.yaml`` (README, "Quick recipe"). Prints JSON.

    python benchmarks/architecture_ablation.py [--batch-size 128] [--seconds 3] [--tiny]
        [--modes fp32 fp32_channels_last bf16 bf16_channels_last] [--only NAME_SUBSTRING ...]

On CPUs without native bf16 (no AVX-512 BF16 / AMX) bf16 matmul is emulated and hundreds of
times slower; leave the ``bf16`` modes out of ``--modes`` there (its matmul peak is still
measured, at the 256² probe size, see ``throughput.matmul_peak``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mnistdiff.config import load_config
from mnistdiff.data import DataSpec
from mnistdiff.models import build_backbone, count_parameters
from mnistdiff.models.flops import train_flops
from throughput import matmul_peak

U = "model.unet."


def unet(channels: int, mults: str, blocks: int, attention: str, patch: int = 1) -> list[str]:
    """Overrides for a UNet variant (``mults``/``attention`` in YAML list syntax)."""
    return [
        f"{U}patch_size={patch}",
        f"{U}channels={channels}",
        f"{U}channel_mults={mults}",
        f"{U}num_res_blocks={blocks}",
        f"{U}attention_levels={attention}",
    ]


def dit(size: str, patch: int) -> list[str]:
    return ["model.type=dit", f"model.dit.size={size}", f"model.dit.patch_size={patch}"]


VARIANTS = {
    "unet c48 (1,2,2) 1 block": unet(48, "[1,2,2]", 1, "[2]"),
    "unet c64 (1,2,2) 2 blocks (configs/unet.yaml)": [],
    "unet patch2 c128 (1,1) 1 block": unet(128, "[1,1]", 1, "[1]", patch=2),
    "unet patch2 c96 (1,2) 1 block": unet(96, "[1,2]", 1, "[1]", patch=2),
    "unet patch2 c96 (1,1) 2 blocks": unet(96, "[1,1]", 2, "[1]", patch=2),
    "unet patch2 c64 (1,2) 1 block": unet(64, "[1,2]", 1, "[1]", patch=2),
    "unet patch2 c64 (1,1) 1 block": unet(64, "[1,1]", 1, "[1]", patch=2),
    "dit tiny patch4": dit("tiny", 4),
    "dit tiny patch2": dit("tiny", 2),
    "dit small patch4": dit("small", 4),
}  # fmt: skip
MODES = ("fp32", "fp32_channels_last", "bf16", "bf16_channels_last")
TINY = {
    "tiny unet": [
        f"{U}channels=16",
        f"{U}channel_mults=[1,2]",
        f"{U}num_res_blocks=1",
        f"{U}attention_levels=[1]",
        f"{U}num_heads=2",
    ]
}


def peak_flops(dtype: torch.dtype, size: int) -> float:
    """Best FLOP/s of a ``size``² matmul on the CPU (``throughput.matmul_peak``, best of 5)."""
    return matmul_peak(dtype, size, 5, torch.device("cpu"))["flops_per_sec"]


def images_per_sec(model, x, t, y, mode: str, seconds: float) -> float:
    """Training images/s of one forward + MSE + backward + AdamW step, after two warm-ups."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    if mode.endswith("_channels_last"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            out = model(x, t, y)
        loss = (out.float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--tiny", action="store_true", help="one tiny model, a fraction of a second")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="what to time per variant (default: all)",
    )
    p.add_argument(
        "--only", nargs="+", metavar="TEXT", help="only variants whose name contains one of these"
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    variants, batch = (TINY, 4) if args.tiny else (VARIANTS, args.batch_size)
    if args.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
        if not variants:
            p.error(f"--only {args.only} matches no variant; names: {list(VARIANTS)}")
    size = 256 if args.tiny else 2048
    spec = DataSpec()
    result = {
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "modes": args.modes,
        "matmul_peak_fp32": peak_flops(torch.float32, size),
        "matmul_peak_bf16": peak_flops(torch.bfloat16, size),
        "variants": [],
    }
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 1, 28, 28, generator=g), torch.rand(batch, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    for name, overrides in variants.items():
        cfg = load_config(None, [*overrides, f"{U}dropout=0"])
        row = {"name": name, "overrides": overrides}
        for mode in args.modes:
            torch.manual_seed(0)
            model = build_backbone(cfg.model, spec)
            row[f"{mode}_images_per_sec"] = images_per_sec(
                model, x, t, y, mode, 0.1 if args.tiny else args.seconds
            )
        row["parameters"] = count_parameters(model)
        row["train_flops_per_image"] = train_flops(model, spec)
        best = max(row[f"{m}_images_per_sec"] for m in args.modes)
        row["best_flops_per_sec"] = best * row["train_flops_per_image"]
        row["utilisation_of_fp32_peak"] = row["best_flops_per_sec"] / result["matmul_peak_fp32"]
        result["variants"].append(row)
        print(json.dumps(row), flush=True, file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from mnistdiff.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
