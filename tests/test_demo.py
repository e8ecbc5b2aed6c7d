"""The demo's handlers, checks and pictures without a browser (tiny untrained models)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from mnistdiff.demo import INSTALL_HINT, handlers, pictures, validate
from mnistdiff.demo.validate import DemoInputError
from mnistdiff.samplers import nfe_for

SMOKE = ROOT / "configs" / "smoke.yaml"


def tiny_pipe(*overrides: str):
    """A Pipeline around an untrained smoke-config model (CPU, fp32)."""
    from mnistdiff.build import build_denoiser
    from mnistdiff.config import load_config
    from mnistdiff.data import DataSpec
    from mnistdiff.device import select_precision
    from mnistdiff.sample import Pipeline

    torch.manual_seed(0)
    cfg = load_config(SMOKE, list(overrides))
    spec = DataSpec(channels=1, size=28, num_classes=10)
    den = build_denoiser(cfg, spec).eval()
    dev = torch.device("cpu")
    return Pipeline(cfg, spec, den, dev, select_precision("fp32", dev), SMOKE)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def stroke(dark_on_light: bool = True) -> np.ndarray:
    """An RGBA drawing of a vertical bar, as a sketchpad sends it."""
    img = np.zeros((120, 120, 4), np.uint8)
    ink = (0, 0, 0, 255) if dark_on_light else (255, 255, 255, 255)
    img[20:100, 55:68] = ink
    return img


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: validate.seed(-1), "seed must be in 0..2147483647, got -1"),
        (lambda: validate.seed(1.5), "seed: expected a whole number"),
        (lambda: validate.seed(None), "seed: expected a number"),
        (lambda: validate.guidance(11), "guidance must be in [0, 10], got 11"),
        (lambda: validate.guidance(float("nan")), "guidance: expected a finite number"),
        (lambda: validate.sampler("magic"), "sampler 'magic' is unknown; allowed: ddpm"),
        (lambda: validate.nfe_steps("ddim", 0), "NFE (ddim) must be in 1..100, got 0"),
        (lambda: validate.nfe_steps("ddim", 101), "NFE (ddim) must be in 1..100, got 101"),
        (lambda: validate.digits([]), "digits: pick at least one of 0..9"),
        (lambda: validate.digits(["3", "12"]), "digits must be in 0..9, got 12"),
        (lambda: validate.strength(0), "strength must be in (0, 1], got 0"),
        (lambda: validate.frames(40), "frames must be in 2..16, got 40"),
        (lambda: validate.region("middle"), "region 'middle' unknown; allowed: bottom"),
        (lambda: validate.region("box", ""), "region 'box' needs the box as x0,y0,x1,y1"),
        (lambda: validate.cap_count(0, 3), "samples per digit must be >= 1, got 0"),
    ],
)
def test_bad_fields_name_the_field_and_the_allowed_values(call, message):
    with pytest.raises(DemoInputError) as info:
        call()
    assert message in str(info.value)


def test_good_fields_are_converted():
    assert validate.digits(["7", 3, 7.0]) == [3, 7]
    assert validate.optional_digit("d", "none") is None
    assert validate.optional_digit("d", "4") == 4
    assert validate.region("box", "1, 2, 9, 10") == "box:1,2,9,10"
    # heun makes 2N - 1 calls: 9 NFE buy 5 steps
    assert validate.nfe_steps("heun", 9) == 5 and nfe_for("heun", 5) == 9


def test_huge_counts_are_capped_with_a_note():
    assert validate.cap_count(3, 10) == (3, "")
    count, note = validate.cap_count(1000, 10)
    assert count == validate.MAX_IMAGES // 10
    assert "asked for 1000 per digit (10000 images); capped at 10 per digit" in note


# --------------------------------------------------------------------------- pictures


@pytest.mark.parametrize(("n", "nrow"), [(1, 1), (10, 10), (12, 5), (4, 4)])
def test_split_grid_inverts_grid_exactly(n, nrow):
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    picture = pictures.grid(images, nrow)
    assert picture.shape == ((-(-n // nrow) * 30 + 2) * 4, (min(n, nrow) * 30 + 2) * 4)
    assert torch.equal(pictures.split_grid(picture, n, nrow), images)
    rgb = np.repeat(picture[..., None], 3, axis=2)  # what a browser hands back
    assert torch.equal(pictures.split_grid(rgb, n, nrow), images)
    with pytest.raises(ValueError, match="a grid of"):
        pictures.split_grid(picture[:-4], n, nrow)


# --------------------------------------------------------------------------- handlers


def test_generate_one_batch_with_trajectory_and_progress(pipe, tmp_path):
    seen = []
    out = handlers.generate(
        pipe, ["2", "5"], 3, "ddim", 4, 2.0, 11, work_dir=tmp_path,
        progress=lambda f, text: seen.append(f),
    )  # fmt: skip
    assert out.images.shape == (6, 28, 28) and out.images.dtype == torch.uint8
    assert out.labels.tolist() == [2, 2, 2, 5, 5, 5]  # one row per digit
    assert out.nrow == 3
    assert torch.equal(pictures.split_grid(out.grid, 6, 3), out.images)
    assert seen == [0.25, 0.5, 0.75, 1.0]  # one tick per sampler step
    assert out.strip.shape == ((2 * 30 + 2) * 2, (4 * 30 + 2) * 2)  # x_t over x0_hat, 4 steps
    with Image.open(out.gif) as gif:
        assert gif.n_frames >= 2
    assert "6 images (digits 2, 5; ddim, 4 steps, NFE 4 per image, guidance 2, seed 11)" in (
        out.message
    )
    again = handlers.generate(pipe, [2, 5], 3, "ddim", 4, 2.0, 11, work_dir=tmp_path)
    assert torch.equal(again.images, out.images)  # seeded
    # the trajectory's last x_t is the first image
    x_last = pictures.split_grid(out.strip, 8, 4, scale=2)[3]
    assert torch.equal(x_last, out.images[0])


def test_generate_caps_huge_requests(pipe, tmp_path):
    out = handlers.generate(pipe, list(range(10)), 10**6, "ddim", 1, 1.0, 0, work_dir=tmp_path)
    assert len(out.images) == validate.MAX_IMAGES
    assert "capped at 10 per digit" in out.message


def test_generate_unconditional_model_draws_one_row(tmp_path):
    pipe = tiny_pipe("model.conditional=false")
    out = handlers.generate(pipe, [], 4, "ddim", 2, 1.0, 0, work_dir=tmp_path)
    assert out.images.shape == (4, 28, 28) and out.labels.tolist() == [-1] * 4
    assert "unconditional" in out.message


def test_generate_refuses_bad_fields(pipe, tmp_path):
    with pytest.raises(DemoInputError, match="NFE"):
        handlers.generate(pipe, [1], 1, "heun", 0, 1.0, 0, work_dir=tmp_path)
    with pytest.raises(DemoInputError, match="digits"):
        handlers.generate(pipe, [], 1, "ddim", 4, 1.0, 0, work_dir=tmp_path)


def test_explain_draws_both_figures(pipe):
    out = handlers.explain(pipe, 3, ["cosine", "flow"], "model", 0)
    assert out.forward.ndim == 3 and out.forward.shape[2] == 3
    assert out.forward.shape[0] > 150  # two schedule rows
    assert out.curves.shape[1] > out.curves.shape[0]
    assert "cosine schedule" in out.message
    with pytest.raises(DemoInputError, match="schedules"):
        handlers.explain(pipe, 3, ["warp"])
    with pytest.raises(DemoInputError, match="source"):
        handlers.explain(pipe, 3, None, "web")


def test_read_drawing_inverts_dark_ink_and_refuses_empty(tmp_path):
    image, inverted = handlers.read_drawing({"composite": stroke(True)}, tmp_path)
    assert inverted and image.shape == (28, 28)
    assert image.float().mean() < 60 and image.max() > 200  # light ink on dark, MNIST-like
    same, flipped = handlers.read_drawing(stroke(False), tmp_path)
    assert not flipped and torch.equal(same, image)
    for empty in (None, {"composite": None}, np.zeros((50, 50, 4), np.uint8)):
        with pytest.raises(DemoInputError, match="the drawing is empty"):
            handlers.read_drawing(empty, tmp_path)


def test_draw_buttons(pipe, tmp_path):
    drawing = {"composite": stroke()}
    out = handlers.cleanup(pipe, drawing, "1", 0.5, 0, work_dir=tmp_path)
    assert out.images.shape == (1, 28, 28) and out.view.shape == out.result.shape == (224, 224)
    assert "SDEdit as a 1: noised to t = 0.5" in out.message
    done = handlers.complete(pipe, drawing, "bottom", "", "none", 0, work_dir=tmp_path)
    image, _ = handlers.read_drawing(drawing, tmp_path)
    assert torch.equal(done.images[0, :14], image[:14])  # pixels outside the region are kept
    styled = handlers.restyle(pipe, drawing, "8", "1", 0.8, work_dir=tmp_path)
    assert "regenerated as a 8" in styled.message
    inv = handlers.invert(pipe, drawing, "1", work_dir=tmp_path)
    assert inv.extra.shape == (224, 224) and "PSNR" in inv.message
    with pytest.raises(DemoInputError, match="strength"):
        handlers.cleanup(pipe, drawing, "1", 1.5, 0, work_dir=tmp_path)


def test_number_layout_cuts_each_glyph(pipe, tmp_path):
    out = handlers.number(pipe, "2026", 3, work_dir=tmp_path)
    comp = out.composition
    assert [g["char"] for g in out.layout] == list("2026")
    assert [tuple(g["box"]) for g in out.layout] == comp.boxes
    assert torch.equal(
        torch.from_numpy(out.picture[:: pictures.SCALE, :: pictures.SCALE]), comp.image
    )
    with pytest.raises(DemoInputError, match="cannot compose 'a' in '20a6'"):
        handlers.number(pipe, "20a6", 0, work_dir=tmp_path)
    with pytest.raises(DemoInputError, match="nothing to compose"):
        handlers.number(pipe, "", 0, work_dir=tmp_path)


def test_number_in_the_style_of_a_drawing(pipe, tmp_path):
    out = handlers.number(pipe, "31", 0, {"composite": stroke()}, "1", work_dir=tmp_path)
    assert out.composition.glyphs.shape == (2, 28, 28)
    assert "style of your reference digit" in out.message
    with pytest.raises(DemoInputError, match="style digit must be in 0..9"):
        handlers.number(pipe, "31", 0, {"composite": stroke()}, "12", work_dir=tmp_path)


def test_explain_with_a_test_digit(pipe, real_mnist):
    out = handlers.explain(pipe, 4, None, "test", 2)
    assert "MNIST test digit 4 (number 2 of its class)" in out.message


def test_interpolate_frames_and_gif(pipe, tmp_path):
    out = handlers.interpolate(pipe, 0, 1, 2, 2, 4, work_dir=tmp_path)
    assert out.images.shape == (4, 28, 28)
    with Image.open(out.extra) as gif:
        assert gif.n_frames >= 2
    with pytest.raises(DemoInputError, match="frames"):
        handlers.interpolate(pipe, 0, 1, 2, 2, 1, work_dir=tmp_path)


def test_threads_default_and_setting():
    old = torch.get_num_threads()
    try:
        assert handlers.configure_threads(2) == 2 and torch.get_num_threads() == 2
        assert 1 <= handlers.default_threads() <= 8
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            handlers.configure_threads(0)
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- install


def test_core_package_does_not_import_gradio():
    code = (
        "import sys, mnistdiff.cli, mnistdiff.demo.handlers; "
        "sys.exit(1 if 'gradio' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_demo_without_gradio_says_how_to_install(monkeypatch, capsys):
    from mnistdiff.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ModuleNotFoundError
    assert main(["demo", "--checkpoint", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "pip install 'mnistdiff[demo]'" in err
    assert "Traceback" not in err


def test_demo_flags_default_to_loopback():
    from mnistdiff.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.checkpoint) == ("127.0.0.1", 7860, False, None)


def test_ui_errors_turn_failures_into_page_messages(capsys):
    gr = pytest.importorskip("gradio")  # the `demo` extra; installed by make install and CI
    from mnistdiff.demo.app import build_app, ui_errors

    @ui_errors
    def bad_input():
        raise DemoInputError("seed must be in 0..2147483647, got -1")

    @ui_errors
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(gr.Error, match="seed must be in"):
        bad_input()
    with pytest.raises(gr.Error, match=r"the request failed \(RuntimeError: boom\)"):
        broken()
    assert "Traceback" in capsys.readouterr().err  # logged on the server, not shown
    app = build_app(tiny_pipe(), work_dir=".")
    names = {d["api_name"] for d in app.config["dependencies"] if d.get("api_name")}
    assert {"generate", "cleanup", "complete", "restyle", "invert", "number", "interpolate",
            "explain"} <= names  # fmt: skip
