"""Baseline: the Hugging Face diffusers tutorial recipe for class-conditional MNIST.

What the usual tutorial does (written here from its description, not copied):
``diffusers.UNet2DModel`` at 28×28 with block widths (32, 64, 64), two layers per block, blocks
DownBlock2D / AttnDownBlock2D / AttnDownBlock2D and mirrored AttnUpBlock2D / AttnUpBlock2D /
UpBlock2D; the class enters as a learned 4-d embedding (``nn.Embedding(10, 4)``) broadcast to 4
extra input channels (so ``in_channels = 1 + 4``); ``DDPMScheduler`` with 1000 steps and the
cosine (``squaredcos_cap_v2``) schedule; MSE on the noise ε; Adam at lr 1e-3, constant; batch 128;
fp32; no EMA, no label dropout (so no guidance); sampling with ``DDIMScheduler``, 50 steps.
Data in [-1, 1] as in the package.

diffusers is an optional extra of the benchmarks (``pip install diffusers``); the package never
imports it. Library use: ``train_for_budget`` then ``sample``. As a script it trains for a
wall-clock budget and writes JSON (and optionally an ``.npz`` of samples for
``mnistdiff evaluate --samples``)::

    python benchmarks/diffusers_recipe.py --minutes 10 --num-samples 2000 --save-npz dd.npz
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from mnistdiff.atomic import atomic_write_text
from mnistdiff.build import load_train_data
from mnistdiff.config import load_config
from mnistdiff.sample import label_tensor, save_npz
from mnistdiff.transforms import from_model_range


@dataclass(frozen=True)
class DiffusersRecipe:
    """Hyper-parameters of the tutorial recipe (defaults = the tutorial)."""

    batch_size: int = 128
    lr: float = 1e-3
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sample_steps: int = 50
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    class_emb_size: int = 4
    norm_num_groups: int = 32
    num_classes: int = 10
    sample_size: int = 28
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 1 or self.sample_steps < 1:
            raise ValueError(
                f"batch_size and sample_steps must be >= 1, got {self.batch_size}, "
                f"{self.sample_steps}"
            )


# --tiny: a toy-sized network of the same layout, for tests (seconds, not a baseline).
TINY = {
    "batch_size": 16,
    "sample_steps": 3,
    "block_out_channels": (8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


class ClassConditionedUNet(nn.Module):
    """``UNet2DModel`` whose class label is a learned embedding fed as extra input channels.

    ``forward(x [B,1,H,W], t [B] (0..T-1), labels int64 [B]) -> predicted noise [B,1,H,W]``.
    """

    def __init__(self, recipe: DiffusersRecipe):
        super().__init__()
        self.class_emb = nn.Embedding(recipe.num_classes, recipe.class_emb_size)
        self.unet = UNet2DModel(
            sample_size=recipe.sample_size,
            in_channels=1 + recipe.class_emb_size,
            out_channels=1,
            layers_per_block=recipe.layers_per_block,
            norm_num_groups=recipe.norm_num_groups,
            block_out_channels=recipe.block_out_channels,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        b, _, h, w = x.shape
        cond = self.class_emb(labels)[:, :, None, None].expand(b, -1, h, w)  # [B, E, H, W]
        return self.unet(torch.cat([x, cond], dim=1), t).sample


def noise_scheduler(recipe: DiffusersRecipe) -> DDPMScheduler:
    """The training scheduler (cosine DDPM)."""
    return DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps, beta_schedule=recipe.beta_schedule
    )


def build(recipe: DiffusersRecipe) -> ClassConditionedUNet:
    """The network with seeded initial weights."""
    torch.manual_seed(recipe.seed)
    return ClassConditionedUNet(recipe)


def _autocast(recipe: DiffusersRecipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16")


def train_step(
    model: ClassConditionedUNet,
    opt: torch.optim.Optimizer,
    sched: DDPMScheduler,
    x0: Tensor,
    labels: Tensor,
    recipe: DiffusersRecipe,
    gen: torch.Generator,
) -> float:
    """One optimizer step of ε-prediction MSE; returns the loss."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, recipe.num_train_timesteps, (len(x0),), generator=gen)
    with _autocast(recipe):
        pred = model(sched.add_noise(x0, noise, t), t, labels)
    loss = nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train_for_budget(
    recipe: DiffusersRecipe,
    x: Tensor,
    y: Tensor,
    seconds: float,
    *,
    max_steps: int | None = None,
    log=None,
) -> tuple[ClassConditionedUNet, dict[str, Any]]:
    """Train on ``x`` (float [N,1,28,28] in [-1,1]) / ``y`` until ``seconds`` of wall clock.

    Batches are drawn without replacement from a fresh seeded permutation each epoch (the last
    partial batch is dropped). Stops at the first step that ends past the budget, or at
    ``max_steps``.
    """
    model = build(recipe).train()
    sched = noise_scheduler(recipe)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    per_epoch = len(y) // recipe.batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {recipe.batch_size} exceeds the {len(y)} training images")
    step, loss, t0 = 0, math.nan, time.perf_counter()
    while time.perf_counter() - t0 < seconds and (max_steps is None or step < max_steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(y), generator=gen)
        idx = order[(step % per_epoch) * recipe.batch_size :][: recipe.batch_size]
        loss = train_step(model, opt, sched, x[idx], y[idx], recipe, gen)
        step += 1
        if log and step % 100 == 0:
            log(f"diffusers step {step}: loss {loss:.4f}")
    elapsed = time.perf_counter() - t0
    stats = {
        "steps": step,
        "epochs": step * recipe.batch_size / len(y),
        "train_seconds": elapsed,
        "images_per_sec": step * recipe.batch_size / elapsed,
        "final_loss": loss,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, stats


@torch.no_grad()
def sample(
    model: ClassConditionedUNet,
    labels: Tensor,
    recipe: DiffusersRecipe,
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """DDIM (η = 0) samples for ``labels``; uint8 ``[N, 28, 28]``."""
    model.eval()
    ddim = DDIMScheduler.from_config(noise_scheduler(recipe).config)
    ddim.set_timesteps(recipe.sample_steps)
    gen = torch.Generator().manual_seed(seed)
    size = recipe.sample_size
    out = []
    for y in labels.split(batch_size):
        x = torch.randn((len(y), 1, size, size), generator=gen)
        for t in ddim.timesteps:
            with _autocast(recipe):
                eps = model(x, t.expand(len(y)), y)
            x = ddim.step(eps.float(), t, x).prev_sample
        out.append(from_model_range(x))
    return torch.cat(out)


def balanced_labels(num: int, num_classes: int = 10) -> Tensor:
    """``num`` labels, ``ceil(num / classes)`` of each class in order, truncated."""
    return label_tensor(per_class=-(-num // num_classes), num_classes=num_classes)[:num]


def run(
    recipe: DiffusersRecipe,
    minutes: float,
    num_samples: int,
    *,
    x: Tensor,
    y: Tensor,
    seed: int = 0,
    log=None,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Train for ``minutes``, sample ``num_samples`` balanced images.

    Returns:
        ``(stats, images uint8 [N, 28, 28], labels [N])``.
    """
    model, stats = train_for_budget(recipe, x, y, minutes * 60, log=log)
    labels = balanced_labels(num_samples, recipe.num_classes)
    t0 = time.perf_counter()
    images = sample(model, labels, recipe, seed=seed)
    secs = time.perf_counter() - t0
    stats.update(
        recipe=asdict(recipe),
        minutes=stats["train_seconds"] / 60,
        budget_minutes=minutes,
        threads=torch.get_num_threads(),
        num_samples=num_samples,
        sampler="ddim (diffusers DDIMScheduler, eta 0)",
        sampler_steps=recipe.sample_steps,
        nfe=recipe.sample_steps,
        guidance=1.0,
        sampling_seconds=secs,
        sampling_images_per_sec=num_samples / secs,
    )
    return stats, images, labels


def training_data(data_dir: str | None = None, sets: tuple[str, ...] = ()) -> tuple[Tensor, Tensor]:
    """Training images in [-1, 1] and labels, as the package splits them (default config, with
    ``data.*`` overrides ``sets``)."""
    overrides = [*sets] + ([f"data.data_dir={data_dir}"] if data_dir else [])
    data = load_train_data(load_config(None, overrides))
    return data.train_x, data.train_y


def main(argv: list[str] | None = None) -> int:
    """Train the tutorial recipe for a budget; print JSON stats (and save samples)."""
    p = argparse.ArgumentParser(description="diffusers tutorial recipe for a wall-clock budget")
    p.add_argument("--minutes", type=float, help="training budget (default 10; tiny 0.02)")
    p.add_argument("--num-samples", type=int, help="images to sample (default 2000; tiny 40)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else $MNIST_DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="data.* override of the split, e.g. data.dataset=synthetic")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="toy network, 3 DDIM steps: seconds")
    p.add_argument("--save-npz", help="write images and labels (for mnistdiff evaluate)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (0.02 if args.tiny else 10.0)
    num = args.num_samples or (40 if args.tiny else 2000)
    if minutes <= 0 or num < 1:
        p.error(f"--minutes must be > 0 and --num-samples >= 1, got {minutes}, {num}")
    recipe = DiffusersRecipe(precision=args.precision, seed=args.seed)
    if args.tiny:
        recipe = replace(recipe, **TINY)
    x, y = training_data(args.data_dir, tuple(args.set))
    stats, images, labels = run(
        recipe, minutes, num, x=x, y=y, seed=args.seed, log=lambda m: print(m, file=sys.stderr)
    )
    if args.save_npz:
        save_npz(args.save_npz, images, labels)
        stats["samples_npz"] = str(Path(args.save_npz))
    text = json.dumps(stats, indent=2) + "\n"
    sys.stdout.write(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
