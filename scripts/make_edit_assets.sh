#!/usr/bin/env bash
# Regenerate the README's editing figures from the shipped pretrained model (seeded, so the
# same torch version and CPU give the same images). Needs MNIST test digits (MNIST_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
P=src/mnistdiff/assets/pretrained
mnistdiff edit restyle --checkpoint $P --from-test 0-5 --to-label 0,1,2,3,4,5,6,7,8,9 --out docs/assets/restyle.png
mnistdiff edit inpaint --checkpoint $P --from-test 0-7 --mask bottom --label true --variations 3 --out docs/assets/inpaint.png
mnistdiff compose "2026" --checkpoint $P --out docs/assets/compose.png
mnistdiff compose "3+4=7" --checkpoint $P --seed 1 --out docs/assets/equation.png
