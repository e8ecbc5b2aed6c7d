"""The README's library snippet runs verbatim (on the smoke config)."""

import re
import shutil

import numpy as np
from PIL import Image

from conftest import ROOT, smoke_yaml_on


def library_snippet() -> str:
    """The first ```python block under the README heading '## Library'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Library\n", 1)
    assert len(section) == 2, "README.md has no '## Library' section"
    body = section[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)\n```", body, re.DOTALL)
    assert match, "the '## Library' section has no ```python block"
    return match.group(1)


def test_library_snippet_runs(digits, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    smoke_yaml_on(digits, tmp_path / "configs" / "smoke.yaml")  # the snippet's config
    monkeypatch.chdir(tmp_path)
    code = library_snippet()
    exec(compile(code, "README.md#library", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs/library/checkpoints/last.pt").is_file()
    digits = np.asarray(Image.open(tmp_path / "digits.png"))
    heun = np.asarray(Image.open(tmp_path / "heun.png"))

    def size(n: int) -> int:  # n cells of 28 px with 2 px padding, scaled 2x
        return (n * 30 + 2) * 2

    assert digits.shape == (size(2), size(4)) and heun.shape == (size(1), size(10))
    assert digits.std() > 0 and heun.std() > 0


def test_public_api_names():
    import subprocess
    import sys

    import mnistdiff

    assert set(mnistdiff.__all__) == set(mnistdiff._EXPORTS) | {"__version__"}
    from mnistdiff import Pipeline, SampleOptions, evaluate, load, train

    assert load.__self__ is Pipeline and callable(train) and callable(evaluate)
    assert SampleOptions().sampler == "dpmpp_2m"
    import mnistdiff.train as train_module  # the module stays importable and patchable

    assert train_module is train and train_module.train.__doc__
    code = "import sys, mnistdiff; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # importing the package is cheap
