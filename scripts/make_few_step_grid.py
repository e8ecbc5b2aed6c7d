"""Side-by-side sample grids of several models from the same starting noise (README figure).

Each model is sampled as its own config records (a distilled student with its sampler and step
count, the teacher with its guidance); every panel starts from the same seed, so the columns
show what fewer steps change. The README's few-step figure was made with:

    python scripts/make_few_step_grid.py --out docs/assets/few_step.png --per-class 3 \\
        "1 step=runs/p1" "2 steps=runs/p2" "4 steps=runs/p4" "teacher (40 passes)=runs/pretrained"

The panel order is the argument order; the titles go to stdout (the PNG has no text).
"""

from __future__ import annotations

import argparse

import numpy as np

from mnistdiff.atomic import atomic_path
from mnistdiff.images import make_grid
from mnistdiff.sample import Pipeline, label_tensor

GAP = 6  # gray columns between panels


def panel(run: str, per_class: int, seed: int) -> tuple[np.ndarray, str]:
    """One grid (rows: classes) of ``run``'s samples and a line saying how they were drawn."""
    pipe = Pipeline.load(run, device="cpu")
    labels = label_tensor(per_class=per_class, num_classes=pipe.spec.num_classes)
    out = pipe.generate(labels, seed=seed)
    opts = pipe.default_options()
    how = f"{opts.sampler} {opts.steps} steps, {out.passes_per_image:g} passes/image"
    return make_grid(pipe.to_uint8(out.x), nrow=per_class), how


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="TITLE=RUN", help="panel title and run")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--per-class", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling")
    args = p.parse_args()
    panels = []
    for spec in args.models:
        title, sep, run = spec.partition("=")
        if not sep:
            p.error(f"{spec!r}: expected TITLE=RUN")
        grid, how = panel(run, args.per_class, args.seed)
        print(f"{title}: {run} ({how})")
        panels.append(grid)
    height = max(g.shape[0] for g in panels)
    gap = np.full((height, GAP), 128, np.uint8)
    row = np.concatenate([x for g in panels for x in (g, gap)][:-1], axis=1)
    row = row.repeat(args.scale, 0).repeat(args.scale, 1)
    from PIL import Image

    with atomic_path(args.out) as tmp:
        Image.fromarray(row).save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
