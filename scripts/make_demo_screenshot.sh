#!/usr/bin/env bash
# The README's demo picture (docs/assets/demo.png): the browser test's Generate tab after the
# default request, shrunk to a small palette PNG. Needs /usr/bin/chromium and `make install`.
# Usage: scripts/make_demo_screenshot.sh [CHECKPOINT]   (default: the shipped pretrained model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=docs/assets/demo.png
if [ $# -gt 0 ]; then export MNISTDIFF_DEMO_CHECKPOINT="$1"; fi
MNISTDIFF_DEMO_SCREENSHOT="$out" "$PY" -m pytest tests/test_demo_browser.py -q \
  -k test_generate_default_and_sevens -p no:cacheprovider
"$PY" - "$out" <<'PYEOF'
import sys
from PIL import Image

path = sys.argv[1]
with Image.open(path) as im:
    im = im.convert("RGB")
    im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
im.quantize(colors=64).save(path, optimize=True)
print(f"wrote {path}")
PYEOF
