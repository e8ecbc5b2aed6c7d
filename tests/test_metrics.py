"""Tests for mnistdiff.metrics: analytic cases for each statistic, caching, real-data floor."""

from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from mnistdiff.metrics import (
    classification_metrics,
    frechet_distance,
    gaussian_stats,
    image_metrics,
    kernel_inception_distance,
    precision_recall,
    real_data_floor,
    reference_stats,
)

MNIST_DIR = os.environ.get("MNIST_DIR")
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason="set MNIST_DIR to the MNIST IDX files")


def _rand_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(300, 5))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_frechet_of_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(400, 16)) * np.linspace(0.1, 3, 16)
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_singular_covariance_self_distance_zero():
    x = np.random.default_rng(2).normal(size=(5, 12))  # rank-deficient covariance (rank 4)
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_2x2_non_diagonal_closed_form():
    # For 2x2 M = S1 S2 with eigenvalues l1, l2 >= 0: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_matches_eigvals_route_and_is_symmetric():
    rng = np.random.default_rng(4)
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _rand_spd(rng, d), _rand_spd(rng, d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * tr_sqrt
    d12 = frechet_distance(mu1, s1, mu2, s2)
    assert d12 == pytest.approx(expected, rel=1e-8)
    assert d12 == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_shape_mismatch_is_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- KID


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_whole_set_matches_naive_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 3)), rng.normal(1.0, 1.0, size=(12, 3))
    mean, std, stderr = kernel_inception_distance(x, y, num_subsets=3, subset_size=10**6)
    assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole (permuted) set
    assert stderr == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    same, same_std, _ = kernel_inception_distance(x, y, num_subsets=30, subset_size=300)
    shifted, shifted_std, _ = kernel_inception_distance(x, y + 0.5, num_subsets=30, subset_size=300)
    assert abs(same) < 3 * same_std
    assert shifted > 5 * shifted_std
    assert shifted > 20 * abs(same)


def test_kid_stderr_is_std_over_sqrt_subsets_and_shrinks():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(400, 8)), rng.normal(0.2, 1.0, size=(400, 8))
    few = kernel_inception_distance(x, y, num_subsets=10, subset_size=50)
    many = kernel_inception_distance(x, y, num_subsets=160, subset_size=50)
    for kid, n in ((few, 10), (many, 160)):
        assert kid.stderr == pytest.approx(kid.std / math.sqrt(n), rel=1e-12)
        assert kid.std > 0
    assert many.std == pytest.approx(few.std, rel=0.6)  # std of one subset estimate: stable
    assert many.stderr < few.stderr / 2  # 16x subsets: ~4x smaller standard error
    one = kernel_inception_distance(x, y, num_subsets=1, subset_size=50)
    assert one.std == 0.0 and one.stderr == 0.0


def test_kid_is_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    a = kernel_inception_distance(x, y, num_subsets=5, subset_size=50, seed=1)
    assert a == kernel_inception_distance(x, y, num_subsets=5, subset_size=50, seed=1)
    assert a != kernel_inception_distance(x, y, num_subsets=5, subset_size=50, seed=2)


# ----------------------------------------------------------------------------- precision/recall


def test_precision_recall_identical_sets():
    x = np.random.default_rng(8).normal(size=(200, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_fake_set():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_collapsed_fake():
    real = np.random.default_rng(10).normal(size=(300, 8))
    fake = np.repeat(real[17:18], 300, axis=0)
    precision, recall = precision_recall(real, fake, k=3, chunk_size=64)
    assert precision == 1.0
    assert recall <= 1 / 300


def test_precision_recall_hand_computed_1d():
    real = np.arange(10.0)[:, None]  # k=1 radius of every real point is 1
    fake = np.array([-20.0, 0.5, 1.0, 4.0, 4.6])[:, None]
    # fake -20 is outside every real ball -> precision 4/5; fake balls (k=1 radii 20.5, 0.5, 0.5,
    # 0.6, 0.6) cover real 0, 1, 4, 5 -> recall 4/10.
    assert precision_recall(real, fake, k=1, chunk_size=3) == pytest.approx((0.8, 0.4))


def test_precision_recall_bad_k():
    with pytest.raises(
        ValueError, match=r"need 1 <= k < min\(len\(real\), len\(fake\)\); got k=3, 3, 3"
    ):
        precision_recall(np.zeros((3, 2)), np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match=r"got k=0, 3, 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((4, 2)), k=0)


# ----------------------------------------------------------------------------- classification


def test_classification_metrics_confident_uniform_predictions():
    logits = 100.0 * torch.eye(10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, -1])  # one wrong, one unconditional
    out = classification_metrics(logits, labels)
    assert out["inception_score"] == pytest.approx(10.0, rel=1e-12)
    assert out["confidence"] == pytest.approx(1.0, abs=1e-12)
    assert out["class_histogram"] == [0.1] * 10
    assert out["class_balance_tv"] == pytest.approx(0.0, abs=1e-12)
    assert out["class_accuracy"] == pytest.approx(8 / 9)
    assert out["per_class_accuracy"] == [1.0] * 8 + [None, 0.0]


def test_classification_metrics_flat_logits():
    out = classification_metrics(torch.zeros(4, 10))
    assert out["inception_score"] == pytest.approx(1.0)
    assert out["confidence"] == pytest.approx(0.1)
    assert out["class_histogram"] == [1.0] + [0.0] * 9  # argmax ties -> class 0
    assert out["class_balance_tv"] == pytest.approx(0.9)
    assert "class_accuracy" not in out


def test_classification_metrics_two_class_soft():
    logits = np.log([[0.75, 0.25], [0.25, 0.75]])
    out = classification_metrics(logits, labels=np.array([-1, -1]))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out["inception_score"] == pytest.approx(math.exp(kl), rel=1e-12)
    assert out["confidence"] == pytest.approx(0.75)
    assert out["class_balance_tv"] == pytest.approx(0.0)
    assert "class_accuracy" not in out  # all labels unconditional


def test_classification_metrics_bad_labels():
    with pytest.raises(ValueError, match="labels must be < 10"):
        classification_metrics(torch.zeros(2, 10), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(torch.zeros(2, 10), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- reference cache


class _StubEvaluator:
    """Embeds images as their mean intensity per row (28-d features); counts calls."""

    def __init__(self, checksum: str):
        self.checksum = checksum
        self.calls = 0

    def embed(self, images, batch_size=500):
        self.calls += 1
        f = torch.as_tensor(images).double().mean(-1)  # [N, 28]
        return f, torch.zeros(len(f), 10)


@pytest.fixture
def fake_data(monkeypatch):
    g = torch.Generator().manual_seed(0)
    arrays = types.SimpleNamespace(
        train_images=torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g),
        train_labels=torch.randint(0, 10, (64,), generator=g),
        test_images=torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=g),
        test_labels=torch.randint(0, 10, (50,), generator=g),
    )
    module = types.ModuleType("mnistdiff.data")
    module.load_dataset = lambda dataset="mnist", data_dir=None: arrays
    monkeypatch.setitem(sys.modules, "mnistdiff.data", module)
    return arrays


def test_reference_stats_cached_by_checksum(fake_data, tmp_path):
    ev = _StubEvaluator("a" * 64)
    first = reference_stats(ev, cache_dir=tmp_path)
    second = reference_stats(ev, cache_dir=tmp_path)
    assert ev.calls == 1
    np.testing.assert_array_equal(first["sigma"], second["sigma"])
    assert first["features"].shape == (50, 28)
    # Same file name (first 16 hex digits) but a different full checksum -> recomputed.
    other = _StubEvaluator("a" * 16 + "b" * 48)
    reference_stats(other, cache_dir=tmp_path)
    assert other.calls == 1
    assert len(list(tmp_path.iterdir())) == 1  # replaced atomically, no temp files left


# ----------------------------------------------------------------------------- real evaluator


@pytest.fixture(scope="module")
def evaluator():
    from mnistdiff.evaluator import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="module")
def reference(evaluator, tmp_path_factory):
    return reference_stats(evaluator, data_dir=MNIST_DIR, cache_dir=tmp_path_factory.mktemp("ref"))


@needs_mnist
def test_real_data_floor_far_below_noise(evaluator, reference):
    floor = real_data_floor(evaluator, 500, data_dir=MNIST_DIR, reference=reference, kid_subsets=20)
    noise = torch.randint(0, 256, (500, 28, 28), dtype=torch.uint8, generator=torch.Generator())
    bad = image_metrics(evaluator, noise, reference=reference, kid_subsets=20)
    assert floor["num_samples"] == 500 and floor["class_accuracy"] > 0.98
    assert floor["fd_mnist"] < 0.05 * bad["fd_mnist"]
    assert floor["kid"] < 0.05 * bad["kid"]
    assert bad["kid_stderr"] == pytest.approx(bad["kid_std"] / math.sqrt(20))
    assert floor["precision"] > 0.5 and bad["precision"] < 0.05
    assert floor["class_balance_tv"] < 0.1
