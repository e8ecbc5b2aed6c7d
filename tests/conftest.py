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
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not available (set MNIST_DIR)")
    monkeypatch.setenv("MNIST_DIR", path)
    return path


@pytest.fixture
def smoke_cfg(real_mnist, tmp_path):
    """A factory: the smoke config with overrides, writing into tmp_path/<name>."""
    from mnistdiff.config import load_config

    def make(*overrides, name="run"):
        cfg = load_config(
            ROOT / "configs" / "smoke.yaml",
            [f"train.run_dir={tmp_path / name}", f"data.data_dir={real_mnist}", *overrides],
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
