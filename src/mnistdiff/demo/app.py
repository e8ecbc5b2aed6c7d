"""The demo's layout and wiring (Gradio). Every computation is a handler call.

Requests are queued and run one at a time (the model and the CPU are shared); a failing
request shows its message in the page and the server keeps serving.
"""

from __future__ import annotations

import argparse
import functools
import json
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


def _digit_choices(d: handlers.Defaults, none: bool) -> list[str]:
    return ([validate.NO_LABEL] if none else []) + [str(i) for i in range(d.num_classes)]


def _draw_tab(pipe, d: handlers.Defaults, work_dir: Path) -> None:
    gr.Markdown(
        "Draw a digit (or upload a picture of one), then let the model clean it up (SDEdit), "
        "complete a region (RePaint), restyle it into another digit, or invert it to noise and "
        "back. The model sees 28x28 pixels, light on dark."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            pad = gr.Sketchpad(
                label="your digit",
                type="numpy",
                image_mode="RGBA",
                sources=("upload",),
                canvas_size=(280, 280),
                brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                format="png",
                elem_id="draw-pad",
            )
            label = gr.Dropdown(
                _digit_choices(d, True), value=validate.NO_LABEL, label="it should be (digit)"
            )
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="strength (t0)")
            seed = gr.Number(0, precision=0, label="seed")
        with gr.Column(scale=1, min_width=300):
            with gr.Row():
                clean = gr.Button("Clean up (SDEdit)", variant="primary", elem_id="draw-clean")
                fill = gr.Button("Complete region", elem_id="draw-complete")
            with gr.Row():
                region = gr.Dropdown(list(validate.REGIONS), value="bottom", label="region")
                box = gr.Textbox(label="box x0,y0,x1,y1 (28x28 pixels)", placeholder="8,14,20,28")
            with gr.Row():
                restyle = gr.Button("Restyle into", elem_id="draw-restyle")
                target = gr.Dropdown(_digit_choices(d, False), value="8", label="target digit")
            invert = gr.Button("Invert + reconstruct", elem_id="draw-invert")
            status = gr.Textbox(label="what was done", interactive=False, elem_id="draw-status")
            with gr.Row():
                view = gr.Image(
                    label="the model's view", format="png", interactive=False, elem_id="draw-view"
                )
                result = gr.Image(
                    label="result", format="png", interactive=False, elem_id="draw-result"
                )
                latent = gr.Image(label="inverted noise", format="png", interactive=False)

    def answer(out: handlers.Edited):
        return out.view, out.result, out.extra, out.message

    @ui_errors
    def run_clean(pad, label, strength, seed, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return answer(
            handlers.cleanup(
                pipe, pad, label, strength, seed, work_dir=work_dir,
                progress=_progress_fn(progress),
            )
        )  # fmt: skip

    @ui_errors
    def run_fill(pad, region, box, label, seed, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return answer(
            handlers.complete(
                pipe, pad, region, box, label, seed, work_dir=work_dir,
                progress=_progress_fn(progress),
            )
        )  # fmt: skip

    @ui_errors
    def run_restyle(pad, target, label, strength, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return answer(
            handlers.restyle(
                pipe, pad, target, label, strength, work_dir=work_dir,
                progress=_progress_fn(progress),
            )
        )  # fmt: skip

    @ui_errors
    def run_invert(pad, label, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return answer(
            handlers.invert(pipe, pad, label, work_dir=work_dir, progress=_progress_fn(progress))
        )

    outputs = [view, result, latent, status]
    clean.click(run_clean, [pad, label, strength, seed], outputs, api_name="cleanup")
    fill.click(run_fill, [pad, region, box, label, seed], outputs, api_name="complete")
    restyle.click(run_restyle, [pad, target, label, strength], outputs, api_name="restyle")
    invert.click(run_invert, [pad, label], outputs, api_name="invert")


def _number_tab(pipe, d: handlers.Defaults, work_dir: Path) -> None:
    gr.Markdown(
        "Type a number (digits, and + - = for a simple equation): every digit is written by "
        "the same hand, set by the style seed or by a reference digit you upload."
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            text = gr.Textbox("2026", label="number", max_lines=1, elem_id="num-text")
            seed = gr.Number(0, precision=0, label="style seed", elem_id="num-seed")
            style = gr.Image(
                label="style digit (optional)", type="numpy", image_mode="RGBA", format="png"
            )
            style_label = gr.Dropdown(
                _digit_choices(d, True), value=validate.NO_LABEL, label="the style digit is a"
            )
            button = gr.Button("Write it", variant="primary", elem_id="num-button")
        with gr.Column(scale=2):
            picture = gr.Image(
                label="the number", format="png", interactive=False, elem_id="num-image"
            )
            status = gr.Textbox(label="what was done", interactive=False, elem_id="num-status")
            layout = gr.Textbox(
                label="where each character sits (canvas pixels, before the 4x zoom)",
                interactive=False,
                elem_id="num-layout",
            )

    @ui_errors
    def run(text, seed, style, style_label, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        out = handlers.number(
            pipe, text, seed, style, style_label, work_dir=work_dir,
            progress=_progress_fn(progress),
        )  # fmt: skip
        return out.picture, out.message, json.dumps(out.layout)

    button.click(
        run, [text, seed, style, style_label], [picture, status, layout], api_name="number"
    )


def _interpolate_tab(pipe, d: handlers.Defaults, work_dir: Path) -> None:
    gr.Markdown(
        "Walk between two samples: the starting noise of seed A turns into seed B's "
        "(spherical interpolation) while the class embedding moves from digit A to digit B."
    )
    with gr.Row():
        seed_a = gr.Number(0, precision=0, label="seed A")
        seed_b = gr.Number(1, precision=0, label="seed B")
        digit_a = gr.Dropdown(_digit_choices(d, False), value="1", label="digit A")
        digit_b = gr.Dropdown(_digit_choices(d, False), value="7", label="digit B")
        frames = gr.Slider(2, validate.MAX_FRAMES, value=8, step=1, label="frames")
        button = gr.Button("Interpolate", variant="primary", elem_id="interp-button")
    status = gr.Textbox(label="what was done", interactive=False, elem_id="interp-status")
    strip = gr.Image(label="frames", format="png", interactive=False, elem_id="interp-strip")
    gif = gr.Image(label="animated", type="filepath", interactive=False)

    @ui_errors
    def run(seed_a, seed_b, digit_a, digit_b, frames, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        out = handlers.interpolate(
            pipe, seed_a, seed_b, digit_a, digit_b, frames, work_dir=work_dir,
            progress=_progress_fn(progress),
        )  # fmt: skip
        return out.result, str(out.extra), out.message

    button.click(
        run,
        [seed_a, seed_b, digit_a, digit_b, frames],
        [strip, gif, status],
        api_name="interpolate",
    )


# --------------------------------------------------------------------------- app


def build_app(
    pipe, *, work_dir: str | Path, data_dir: str | None = None, model_name: str | None = None
) -> gr.Blocks:
    """The demo's Blocks (not yet queued or launched) on a loaded model.

    Args:
        pipe: the loaded model.
        work_dir: folder for the GIFs and drawings of requests.
        data_dir: MNIST folder for the Explain tab's test digits (None: ``$MNIST_DIR``/cache).
        model_name: how the page names the model (default: its path).
    """
    d = handlers.defaults(pipe)
    work_dir = Path(work_dir)
    name = model_name or f"`{pipe.source}`"
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nA diffusion model trained on MNIST: {name} "
            f"({pipe.cfg.model.type}, {d.schedule} schedule). Requests run one at a time."
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(pipe, d, work_dir)
            with gr.Tab("Draw", id="draw"):
                _draw_tab(pipe, d, work_dir)
            with gr.Tab("Number", id="number"):
                _number_tab(pipe, d, work_dir)
            with gr.Tab("Interpolate", id="interpolate"):
                _interpolate_tab(pipe, d, work_dir)
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
        shipped = "the pretrained model shipped with mnistdiff" if args.checkpoint is None else None
        app = build_app(pipe, work_dir=work_dir, model_name=shipped)
        app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        try:
            app.launch(
                server_name=args.host,
                server_port=args.port,
                share=args.share,
                show_error=True,
                ssr_mode=False,
                footer_links=["api"],
            )
        except OSError as exc:  # port taken, address not on this machine
            raise ValueError(
                f"cannot serve on {args.host}:{args.port} ({exc}); choose another --port/--host"
            ) from None
    return 0
