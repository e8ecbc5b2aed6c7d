"""The demo's layout and wiring (Gradio). Every computation is a handler call.

Requests are queued and run one at a time (the model and the CPU are shared); a failing
request shows its message in the page and the server keeps serving.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ..samplers import SAMPLERS  # noqa: E402
from ..schedules import SCHEDULE_NAMES  # noqa: E402
from . import handlers, validate  # noqa: E402

TITLE = "mnistdiff demo"
QUEUE_SIZE = 16


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..checkpoint import CheckpointError
    from ..idx import DataError
    from ..pretrained import PretrainedError

    return (ValueError, FileNotFoundError, DataError, CheckpointError, PretrainedError)


def ui_errors(fn: Callable) -> Callable:
    """Wrap a handler so every failure reaches the page as a message (``gr.Error``).

    Input errors keep their own message; anything unexpected is logged with its traceback on
    the server's stderr and reported in one line, and the server keeps running.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except _user_errors() as exc:
            raise gr.Error(str(exc), title="Invalid input") from None
        except Exception as exc:  # the page gets a message, the log gets the traceback
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(
                f"the request failed ({type(exc).__name__}: {exc}); the server is still running",
                title="Request failed",
            ) from None

    return wrapper


def _progress_fn(progress: gr.Progress) -> handlers.Progress:
    return lambda fraction, text: progress(fraction, desc=text)


# --------------------------------------------------------------------------- tabs


def _generate_tab(pipe, d: handlers.Defaults, work_dir: Path) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            digits = gr.CheckboxGroup(
                [str(i) for i in range(d.num_classes)],
                value=[str(i) for i in range(d.num_classes)],
                label="digits",
                interactive=d.conditional,
                elem_id="gen-digits",
            )
            per_digit = gr.Number(1, precision=0, label="samples per digit", elem_id="gen-count")
            sampler = gr.Dropdown(list(SAMPLERS), value=d.sampler, label="sampler")
            nfe = gr.Slider(1, validate.MAX_NFE, value=d.nfe, step=1, label="NFE")
            guidance = gr.Slider(
                *validate.GUIDANCE_RANGE, value=d.guidance, step=0.05, label="guidance w"
            )
            seed = gr.Number(0, precision=0, label="seed", elem_id="gen-seed")
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="samples", format="png", interactive=False, elem_id="gen-grid")
            status = gr.Textbox(label="what was done", interactive=False, elem_id="gen-status")
            strip = gr.Image(
                label="trajectory of the first image: x_t (top) and the model's x̂₀ (bottom)",
                format="png",
                interactive=False,
                elem_id="gen-strip",
            )
            gif = gr.Image(label="the same, animated", type="filepath", interactive=False)

    @ui_errors
    def run(digits, per_digit, sampler, nfe, guidance, seed, progress=gr.Progress()):  # noqa: B008
        out = handlers.generate(
            pipe, digits, per_digit, sampler, nfe, guidance, seed,
            work_dir=work_dir, progress=_progress_fn(progress),
        )  # fmt: skip
        return out.grid, out.message, out.strip, str(out.gif)

    button.click(
        run,
        [digits, per_digit, sampler, nfe, guidance, seed],
        [grid, status, strip, gif],
        api_name="generate",
    )


def _explain_tab(pipe, d: handlers.Defaults, data_dir: str | None) -> None:
    gr.Markdown(
        "The forward process adds noise: x_t = α_t x_0 + σ_t ε. Training teaches the model to "
        "undo it; sampling runs it backwards. Pick a digit and the schedules to compare."
    )
    with gr.Row():
        digit = gr.Dropdown(
            [str(i) for i in range(d.num_classes)], value="7", label="digit", elem_id="ex-digit"
        )
        schedules = gr.CheckboxGroup(list(SCHEDULE_NAMES), value=[d.schedule], label="schedules")
        source = gr.Radio(
            [("drawn by the model", "model"), ("MNIST test set", "test")],
            value="model",
            label="digit from",
        )
        seed = gr.Number(0, precision=0, label="seed")
        button = gr.Button("Explain", variant="primary", elem_id="ex-button")
    status = gr.Textbox(label="what you see", interactive=False, elem_id="ex-status")
    forward = gr.Image(
        label="forward process", format="png", interactive=False, elem_id="ex-forward"
    )
    curves = gr.Image(label="α_t, σ_t and log-SNR", format="png", interactive=False)

    @ui_errors
    def run(digit, schedules, source, seed, progress=gr.Progress()):  # noqa: B008
        out = handlers.explain(
            pipe, digit, schedules, source, seed, data_dir=data_dir,
            progress=_progress_fn(progress),
        )  # fmt: skip
        return out.forward, out.curves, out.message

    button.click(
        run, [digit, schedules, source, seed], [forward, curves, status], api_name="explain"
    )


# --------------------------------------------------------------------------- app


def build_app(pipe, *, work_dir: str | Path, data_dir: str | None = None) -> gr.Blocks:
    """The demo's Blocks (not yet queued or launched) on a loaded model."""
    d = handlers.defaults(pipe)
    work_dir = Path(work_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nA diffusion model trained on MNIST: `{pipe.source}` "
            f"({pipe.cfg.model.type}, {d.schedule} schedule). Requests run one at a time."
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(pipe, d, work_dir)
            with gr.Tab("Explain", id="explain"):
                _explain_tab(pipe, d, data_dir)
    return app


def serve(args: argparse.Namespace) -> int:
    """Load the model, then serve the app on ``args.host:args.port`` until interrupted."""
    threads = handlers.configure_threads(args.threads)
    if args.checkpoint is None:
        from ..pretrained import describe

        print(describe(), flush=True)
    pipe = handlers.load_model(args.checkpoint, device=args.device)
    print(f"model: {pipe.source} on {pipe.device} ({pipe.precision.name}, {threads} threads)")
    with tempfile.TemporaryDirectory(prefix="mnistdiff-demo-") as work_dir:
        app = build_app(pipe, work_dir=work_dir)
        app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            show_error=True,
            ssr_mode=False,
            footer_links=["api"],
        )
    return 0
