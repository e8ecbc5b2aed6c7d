"""`mnistdiff demo` in a real browser: a server subprocess driven by headless Chromium.

Runs in the default suite whenever Debian's Chromium (/usr/bin/chromium) and the Playwright
package are installed (`.ci/run` installs both, and the `demo` extra); skipped only when one of
them is missing. The server starts on a free loopback port with the shipped pretrained model
(``MNISTDIFF_DEMO_CHECKPOINT`` names another checkpoint) and is stopped at the end whatever
happens. Each test saves a screenshot of its tab in its tmp_path; with
``MNISTDIFF_DEMO_SCREENSHOT=PATH`` the Generate tab's screenshot is also written there
(``scripts/make_demo_screenshot.sh`` makes the README's picture this way).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the skip below reports it
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
START_TIMEOUT = 240  # seconds for the server to load the model and listen (loaded 2-core CI)
REQUEST_TIMEOUT = 240_000  # ms for one request to answer in the page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed"),
]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("mnistdiff")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "mnistdiff"]
    cmd = [*base, "demo", "--host", "127.0.0.1", "--port", str(port)]
    if os.environ.get("MNISTDIFF_DEMO_CHECKPOINT"):
        cmd += ["--checkpoint", os.environ["MNISTDIFF_DEMO_CHECKPOINT"]]
    return cmd


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mnistdiff demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"mnistdiff demo did not answer at {url} in {START_TIMEOUT} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (the server closes and removes its temp folder), then harder."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            demo_command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
    try:
        wait_until_up(proc, url, log)
        yield Server(url, proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("#gen-button")
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def evaluator():
    from mnistdiff.evaluator import load_evaluator

    return load_evaluator()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def picture(page, elem_id: str) -> np.ndarray:
    """The image a gr.Image shows, fetched as the browser does (uint8 [H, W], first channel)."""
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(timeout=REQUEST_TIMEOUT)
    src = img.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"GET {src}: {response.status}"
    with Image.open(io.BytesIO(response.body())) as im:
        return np.asarray(im.convert("RGB"))[..., 0].copy()


def text_of(page, elem_id: str) -> str:
    box = page.locator(f"#{elem_id} textarea").first
    page.wait_for_function(
        "id => { const t = document.querySelector(`#${id} textarea`); return t && t.value; }",
        arg=elem_id,
        timeout=REQUEST_TIMEOUT,
    )
    return box.input_value()


def read_digits(evaluator, images: torch.Tensor) -> list[int]:
    _, logits = evaluator.embed(images)
    return logits.argmax(1).tolist()


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------- tabs


def test_generate_default_and_sevens(page, evaluator, tmp_path):
    from mnistdiff.demo.pictures import split_grid

    page.click("#gen-button")  # the default request: one of each digit
    grid = picture(page, "gen-grid")
    assert split_grid(grid, 10, 10).shape == (10, 28, 28)
    status = text_of(page, "gen-status")
    assert re.search(r"10 images .* in [\d.]+ s", status), status
    screenshot(page, tmp_path / "generate.png")
    if os.environ.get("MNISTDIFF_DEMO_SCREENSHOT"):
        shutil.copyfile(tmp_path / "generate.png", os.environ["MNISTDIFF_DEMO_SCREENSHOT"])

    for d in range(10):  # keep only 7
        if d != 7:
            page.locator("#gen-digits label").filter(has_text=re.compile(rf"^\s*{d}\s*$")).click()
    page.fill("#gen-count input", "4")
    page.click("#gen-button")
    page.wait_for_function(
        "() => document.querySelector('#gen-status textarea').value.startsWith('4 images')",
        timeout=REQUEST_TIMEOUT,
    )
    sevens = split_grid(picture(page, "gen-grid"), 4, 4)
    assert read_digits(evaluator, sevens) == [7, 7, 7, 7]
    screenshot(page, tmp_path / "generate_sevens.png")


def test_draw_stroke_and_clean_up(page, tmp_path):
    open_tab(page, "Draw")
    page.locator('#draw-pad button[aria-label="Brush"]').click()
    canvas = page.locator("#draw-pad canvas").first
    box = canvas.bounding_box()
    x, top, height = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2, box["height"]
    page.mouse.move(x, top)
    page.mouse.down()
    for k in range(1, 21):  # a vertical stroke: a "1"
        page.mouse.move(x + k * 0.5, top + k * height * 0.03)
    page.mouse.up()
    page.click("#draw-clean")
    result = picture(page, "draw-result")
    view = picture(page, "draw-view")
    assert result.shape == view.shape == (28 * 8, 28 * 8)
    assert result.std() > 20, "the SDEdit result is blank"
    assert (view > 128).mean() > 0.02, "the model's view of the stroke has no ink"
    assert "inverted" in text_of(page, "draw-status")  # black ink on white was inverted
    screenshot(page, tmp_path / "draw.png")


def test_number_bad_input_shows_a_message(page, server, tmp_path):
    open_tab(page, "Number")
    page.fill("#num-text input", "20a6")
    page.click("#num-button")
    toast = page.locator('[data-testid="toast-text"]', has_text="cannot compose")
    toast.first.wait_for(timeout=REQUEST_TIMEOUT)
    assert "'a'" in toast.first.inner_text()
    assert "Traceback" not in page.content()
    screenshot(page, tmp_path / "number_error.png")
    assert server.proc.poll() is None, "the server went down on a bad request"


def test_number_2026_reads_back(page, evaluator, tmp_path):
    from mnistdiff.demo.pictures import SCALE
    from mnistdiff.edit import Composition

    open_tab(page, "Number")
    page.fill("#num-text input", "2026")
    page.click("#num-button")
    canvas = picture(page, "num-image")[::SCALE, ::SCALE]
    layout = json.loads(text_of(page, "num-layout"))
    comp = Composition(
        image=torch.from_numpy(np.ascontiguousarray(canvas)),
        glyphs=torch.empty(0, 28, 28, dtype=torch.uint8),
        boxes=[tuple(g["box"]) for g in layout],
        offsets=[tuple(g["offset"]) for g in layout],
        text="".join(g["char"] for g in layout),
        nfe=0,
    )
    assert comp.text == "2026"
    cuts = torch.stack([comp.cut(i) for i in range(4)])
    assert read_digits(evaluator, cuts) == [2, 0, 2, 6]
    screenshot(page, tmp_path / "number.png")


def test_interpolate_and_explain_tabs(page, tmp_path):
    from mnistdiff.demo.pictures import split_grid

    open_tab(page, "Interpolate")
    page.click("#interp-button")
    frames = split_grid(picture(page, "interp-strip"), 8, 8)
    assert not torch.equal(frames[0], frames[-1])
    screenshot(page, tmp_path / "interpolate.png")

    open_tab(page, "Explain")
    page.click("#ex-button")
    figure = picture(page, "ex-forward")
    assert figure.shape[0] > 100 and figure.std() > 20
    assert "α_t" in text_of(page, "ex-status")
    screenshot(page, tmp_path / "explain.png")
