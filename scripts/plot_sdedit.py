"""Plot SDEdit's class-swap curve from `benchmarks/edit_quality.py` JSON (the README figure).

    python benchmarks/edit_quality.py --checkpoint src/mnistdiff/assets/pretrained --n 500 \\
        --sections sdedit --out edit.json
    python scripts/plot_sdedit.py edit.json docs/assets/sdedit_strength.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    data = json.loads(Path(src).read_text())
    rows = data["sdedit"]
    strength = [r["strength"] for r in rows]
    fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=100)
    ax.plot(strength, [r["target_accuracy"] for r in rows], "o-", label="reads as the target")
    ax.plot(strength, [r["still_source"] for r in rows], "s--", label="still reads as the source")
    ax.set_xlabel("SDEdit strength (noised to t)")
    ax.set_ylabel(f"share of {data.get('n_test_digits', '?')} test digits")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
