"""``mnistdiff demo``: a Gradio app on the library (Generate, Draw, Number, Interpolate, Explain).

Install with ``pip install 'mnistdiff[demo]'``. The package is split so that only ``app.py``
imports Gradio: :mod:`~mnistdiff.demo.handlers` (what each button does, as plain functions of a
loaded model), :mod:`~mnistdiff.demo.validate` (field checks) and
:mod:`~mnistdiff.demo.pictures` (grids) work, and are tested, without it.
"""

from __future__ import annotations

import argparse

INSTALL_HINT = (
    "the demo needs Gradio, which mnistdiff does not install by default: "
    "pip install 'mnistdiff[demo]' (in a checkout: pip install -e '.[demo]')"
)


class DemoUnavailable(RuntimeError):
    """Gradio (the optional ``demo`` extra) is not installed."""


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mnistdiff demo``."""
    p.add_argument(
        "--checkpoint", help="checkpoint, run or export dir (default: the shipped pretrained model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: half the usable cores, >= 1)"
    )


def run_demo_cli(args: argparse.Namespace) -> int:
    """``mnistdiff demo``: load the model, build the app and serve it until interrupted."""
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "gradio" and not str(exc.name).startswith("gradio"):
            raise
        raise DemoUnavailable(INSTALL_HINT) from None
    from .app import serve

    return serve(args)
