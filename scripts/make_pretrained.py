"""Rebuild the shipped pretrained model (src/mnistdiff/assets/pretrained) from a training run.

The shipped asset was made on a 2-core AMD EPYC (AVX-512 BF16, bf16 autocast, 1 thread) with:

    mnistdiff train --config configs/quick.yaml --run-dir runs/pretrained \\
        --set train.time_budget_minutes=40 --set train.num_threads=1
    mnistdiff evaluate --checkpoint runs/pretrained --num-samples 2000 --sweep guidance=1.3,1.4
    python scripts/make_pretrained.py runs/pretrained --guidance 1.3 \
        --metrics eval_row.json --summary "..." --command "..." --machine "..."

Pass the measured numbers of the evaluation with --metrics (a JSON file of the chosen row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnistdiff.pretrained import PRETRAINED_DIR, build_asset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--guidance", type=float, required=True, help="sample.guidance of the asset")
    p.add_argument("--metrics", help="JSON with the measured metrics of that setting")
    p.add_argument("--summary", required=True, help="one line for the CLI")
    p.add_argument("--command", required=True, help="the training command, recorded")
    p.add_argument("--machine", required=True, help="the CPU it was trained on, recorded")
    args = p.parse_args()
    info = {
        "summary": args.summary,
        "command": args.command,
        "machine": args.machine,
        "metrics": json.loads(Path(args.metrics).read_text()) if args.metrics else None,
    }
    out = build_asset(args.run, PRETRAINED_DIR, info, {"guidance": args.guidance})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
