"""Re-execute the teaching notebook and store its outputs in place.

Usage (needs the ``notebook`` extra: ``pip install -e ".[notebook]"``)::

    MNIST_DIR=/path/to/mnist nice python scripts/make_notebook.py [NOTEBOOK]

The notebook runs with its own folder as the working directory (it finds ``configs/`` from
there) and is rewritten atomically only after every cell succeeded, so a failed run never
leaves a half-executed file. Prints the execution time and the stored size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "notebooks" / "diffusion_on_mnist.ipynb"
MAX_BYTES = 3 * 1024 * 1024


def execute(path: Path, timeout: int) -> tuple[object, float]:
    """Run every cell of the notebook at ``path``; return the executed notebook and seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no per-cell timestamps: re-runs diff only where outputs change
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    args = p.parse_args(argv)
    try:
        import nbformat
    except ImportError:
        sys.exit('the notebook extra is missing: pip install -e ".[notebook]"')
    from mnistdiff.atomic import atomic_path

    path = args.notebook.resolve()
    nb, seconds = execute(path, args.timeout)
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))
    size = path.stat().st_size
    print(f"executed {path} in {seconds / 60:.1f} min; stored {size / 1e6:.2f} MB")
    if size > MAX_BYTES:
        print(f"warning: over {MAX_BYTES / 1e6:.1f} MB; shrink the figures", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
