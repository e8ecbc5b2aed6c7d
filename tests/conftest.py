import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist"


def mnist_dir() -> str | None:
    """The real MNIST folder for tests: $MNIST_DIR, else the shared copy beside the repo."""
    path = os.environ.get("MNIST_DIR")
    if path:
        return path
    return str(SHARED) if SHARED.is_dir() else None


@pytest.fixture
def real_mnist(monkeypatch):
    """The real MNIST folder. Only tests of the real data itself use it (they skip without it);
    everything that tests the pipeline runs on ``synthetic_data``."""
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not available (set MNIST_DIR)")
    monkeypatch.setenv("MNIST_DIR", path)
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    """A folder with the synthetic digits (``data.dataset=synthetic``): the four gzipped IDX
    files (600 train / 100 test, 28x28, labels 0-9), generated here and then loaded through
    the same verification as downloaded files (magic numbers, counts, sizes, pinned MD5s)."""
    from mnistdiff.data import load_dataset
    from mnistdiff.synthetic import write_synthetic

    root = write_synthetic(tmp_path_factory.mktemp("synthetic"))
    load_dataset("synthetic", root, download=False)  # raises DataError unless verified
    return str(root)


SYNTHETIC = ("data.dataset=synthetic",)


def smoke_yaml_on(digits: tuple[str, str], dest: Path) -> Path:
    """Write ``configs/smoke.yaml`` to ``dest`` with its data section on ``digits``."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["data"].update(dataset=digits[0], data_dir=digits[1])
    dest.write_text(yaml.safe_dump(cfg))
    return dest


def digits_source(synthetic_data: str) -> tuple[str, str]:
    """``(dataset, folder)`` for tests that read digits: real MNIST when present, else the
    synthetic digits, so these tests run everywhere instead of skipping."""
    path = mnist_dir()
    return ("synthetic", synthetic_data) if path is None else ("mnist", path)


@pytest.fixture
def digits(synthetic_data) -> tuple[str, str]:
    """:func:`digits_source` as a fixture."""
    return digits_source(synthetic_data)


@pytest.fixture
def smoke_cfg(synthetic_data, tmp_path):
    """A factory: the smoke config on the synthetic digits with overrides, writing into
    tmp_path/<name>."""
    from mnistdiff.config import load_config

    def make(*overrides, name="run"):
        cfg = load_config(
            ROOT / "configs" / "smoke.yaml",
            [
                f"train.run_dir={tmp_path / name}",
                *SYNTHETIC,
                f"data.data_dir={synthetic_data}",
                *overrides,
            ],
        )
        return cfg

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test tensors gain nothing from threads, and a busy 2-core machine makes OpenMP
    spin-waiting across processes very slow; one thread keeps the suite fast and steady."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
