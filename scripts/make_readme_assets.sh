#!/usr/bin/env bash
# Regenerate the sample grids shown in the README from trained runs.
# Usage: scripts/make_readme_assets.sh RUN_DIR NAME   (writes docs/assets/NAME_samples.png)
set -euo pipefail
run="${1:?run directory}"
name="${2:?asset name}"
mnistdiff sample --checkpoint "$run" --per-class 8 --seed 0 --out "docs/assets/${name}_samples.png"
# docs/assets/quick_samples.png and dit_samples.png were written by benchmarks/quality_budget.py
# (--out-dir keeps the grid of the first 80 evaluated samples, 8 per class; the README gives each
# command); the command above makes the same kind of grid from any run.
