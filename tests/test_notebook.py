"""The teaching notebook: stored with its outputs, small, and executable end to end.

The end-to-end test needs the ``notebook`` extra (``pip install -e ".[notebook]"``; ``make test``
and CI install it). Without it the test fails, it does not skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "diffusion_on_mnist.ipynb"
MAX_BYTES = 3 * 1024 * 1024
SECTIONS = ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## 8.")
LINKS = ("../docs/theory.md#", "../src/mnistdiff/schedules.py", "../src/mnistdiff/samplers.py")


def _stored() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _text(outputs: list[dict]) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append("".join(out["text"]))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append("".join(out["data"]["text/plain"]))
    return "".join(parts)


def _images(nb: dict) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb["cells"]
        if cell["cell_type"] == "code"
        for out in cell["outputs"]
    )


def test_stored_notebook_has_outputs_for_every_code_cell_and_is_small():
    assert NOTEBOOK.stat().st_size < MAX_BYTES, f"{NOTEBOOK} is over 3 MB"
    nb = _stored()
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    missing = [i for i, c in enumerate(code) if not c["outputs"] or c["execution_count"] is None]
    assert not missing, f"code cells {missing} have no stored outputs; run scripts/make_notebook.py"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "stored outputs come from one run, in order"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"stored outputs hold an error: {errors[0].get('ename')}"
    assert _images(nb) >= 10, "each section shows its figures"
    assert "notebook executed in" in _text(code[-1]["outputs"])


def test_notebook_sections_link_code_and_theory():
    nb = _stored()
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    for heading in SECTIONS:
        assert heading in text, f"missing section {heading}"
    for link in LINKS:
        assert link in text
    root = NOTEBOOK.parent
    for target in {part.split(")")[0].split("#")[0] for part in text.split("](../")[1:]}:
        assert (root / ".." / target).resolve().exists(), f"broken link ../{target}"


def test_notebook_executes_end_to_end(tmp_path, monkeypatch):
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as exc:  # CI installs the extra: a missing one is a failure
        pytest.fail(f'the notebook extra is missing ({exc}); pip install -e ".[notebook]"')
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)  # the stored outputs are not touched
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebook's scratch run goes
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # it finds configs/ from here
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    nbformat.write(nb, str(copy))
    executed = json.loads(copy.read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in code)
    assert _images(executed) >= 10
    assert "notebook executed in" in _text(code[-1]["outputs"])
    text = "".join(_text(c["outputs"]) for c in code)
    assert "training took" in text and "finished" in text  # section 3 trained its own model
    assert not list(tmp_path.glob("mnistdiff-notebook-*")), "the scratch run is removed at the end"
