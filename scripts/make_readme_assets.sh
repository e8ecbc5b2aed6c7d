#!/usr/bin/env bash
# Regenerate the figures shown in the README.
# Usage: scripts/make_readme_assets.sh RUN_DIR NAME   (writes docs/assets/NAME_samples.png)
#        scripts/make_readme_assets.sh --learn [CHECKPOINT]
#          (the two figures of the "Learn" section, drawn by `mnistdiff visualize` as in the
#          notebook; CHECKPOINT defaults to the pretrained model shipped in the package)
set -euo pipefail
if [ "${1:-}" = "--learn" ]; then
  ckpt="${2:-$(python -c 'from mnistdiff.pretrained import PRETRAINED_DIR; print(PRETRAINED_DIR)')}"
  mnistdiff visualize forward --schedules linear,cosine,flow --times 0,0.2,0.4,0.6,0.8,1 \
    --digit 7 --out docs/assets/learn_forward.png
  mnistdiff visualize trajectory --checkpoint "$ckpt" --digit 7 --seed 1 --sampler ddim \
    --steps 10 --out docs/assets/learn_trajectory.png --gif "${TMPDIR:-/tmp}/learn_trajectory.gif"
  exit 0
fi
run="${1:?run directory}"
name="${2:?asset name}"
mnistdiff sample --checkpoint "$run" --per-class 8 --seed 0 --out "docs/assets/${name}_samples.png"
# docs/assets/quick24_samples.png (the README's first picture): this command on the AVX2 seed-0
# 10-minute run of docs/results.md "Batch 64" (configs/quick.yaml as shipped, name quick24).
# docs/assets/quick_samples.png and dit_samples.png were written by benchmarks/quality_budget.py
# (--out-dir keeps the grid of the first 80 evaluated samples, 8 per class; the README gives each
# command); the command above makes the same kind of grid from any run.
