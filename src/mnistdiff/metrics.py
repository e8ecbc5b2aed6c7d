"""Sample-quality metrics in the feature space of the evaluator network.

Pure statistics (float64) on feature/logit arrays — ``gaussian_stats``, ``frechet_distance``,
``kernel_inception_distance``, ``precision_recall``, ``classification_metrics`` — plus
``reference_stats`` (cached features of the MNIST test set), ``image_metrics`` (everything for a
batch of generated uint8 images) and ``real_data_floor`` (the same for real training images: the
best score a perfect generator could get at that sample size).

``fd_mnist`` is the Fréchet distance of FID, computed on the evaluator's 128-d features instead
of Inception features; it is not comparable with published FID numbers, and it depends on the
sample count, so compare runs at equal N and quote the real-data floor beside it.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mnistdiff.atomic import atomic_path
from mnistdiff.evaluator import Evaluator

ArrayLike = Tensor | np.ndarray


def _as_f64(x: ArrayLike, name: str, ndim: int = 2) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if t.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


# ----------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features [N, D]``, N >= 2."""
    f = _as_f64(features, "features")
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    mu = f.mean(0)
    c = f - mu
    sigma = c.T @ c / (len(f) - 1)
    return mu.numpy(), sigma.numpy()


def _psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues >= 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein²) distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)``. The trace term uses the symmetric
    form, computed with two eigendecompositions (no scipy; stable for singular covariances).
    """
    m1, m2 = _as_f64(mu1, "mu1", 1), _as_f64(mu2, "mu2", 1)
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    d = len(m1)
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(m1.shape)}, mu2 {tuple(m2.shape)}, "
            f"sigma1 {tuple(s1.shape)}, sigma2 {tuple(s2.shape)}; need [D], [D], [D,D], [D,D]"
        )
    r1 = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    value = (m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * cross
    return max(float(value), 0.0)


# ----------------------------------------------------------------------------- KID


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    m = len(x)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    return float((kxx.sum() - kxx.trace()) / off + (kyy.sum() - kyy.trace()) / off - 2 * kxy.mean())


class KID(NamedTuple):
    """KID estimate: mean MMD² over subsets, their std, and the standard error of the mean."""

    mean: float
    std: float
    stderr: float


def kernel_inception_distance(
    f1: ArrayLike,
    f2: ArrayLike,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KID:
    """Kernel Inception Distance (Bińkowski et al. 2018) between two feature sets.

    Unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)³``, averaged over
    ``num_subsets`` random subsets (without replacement) of ``subset_size`` vectors from each set;
    ``subset_size`` is capped at the smaller set size.

    Returns:
        ``KID(mean, std, stderr)``: the mean MMD² over subsets (can be slightly negative when the
        distributions match); the standard deviation of the subset estimates (the error bar
        torch-fidelity reports; it does not shrink with more subsets); and ``std /
        sqrt(num_subsets)``, the standard error of the mean over subsets. That stderr measures
        the subset-sampling noise given these two feature sets (the subsets overlap, so it is
        not the sampling error of drawing new images). Both are 0 when every subset is the
        whole set.
    """
    x, y = _as_f64(f1, "f1"), _as_f64(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2 or num_subsets < 1:
        raise ValueError(
            f"need subset_size >= 2 (capped at set sizes {len(x)}, {len(y)}) and num_subsets >= 1; "
            f"got {subset_size}, {num_subsets}"
        )
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(
        [
            _mmd2_unbiased(
                x[torch.randperm(len(x), generator=g)[:m]],
                y[torch.randperm(len(y), generator=g)[:m]],
            )
            for _ in range(num_subsets)
        ],
        dtype=torch.float64,
    )
    std = float(vals.std(unbiased=True)) if num_subsets > 1 else 0.0
    return KID(float(vals.mean()), std, std / math.sqrt(num_subsets))


# ----------------------------------------------------------------------------- precision / recall


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]``."""
    d = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T
    return d.clamp_min_(0)


def _knn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row."""
    return torch.cat([_sq_dists(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _in_manifold(query: Tensor, support: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each query lies inside any ball (support_j, radius_j)."""
    return torch.cat([(_sq_dists(c, support) <= radii).any(1) for c in query.split(chunk)])


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, *, chunk_size: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of fake samples inside the real manifold (union of balls around each
    real sample with radius = distance to its k-th nearest real neighbour). Recall: fraction of
    real samples inside the fake manifold. Distances are computed ``chunk_size`` rows at a time.
    Both values depend on the set sizes: compare at equal N.
    """
    r, f = _as_f64(real, "real"), _as_f64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(len(r), len(f)):
        raise ValueError(f"need 1 <= k < min(len(real), len(fake)); got k={k}, {len(r)}, {len(f)}")
    precision = _in_manifold(f, r, _knn_radii(r, k, chunk_size), chunk_size).double().mean()
    recall = _in_manifold(r, f, _knn_radii(f, k, chunk_size), chunk_size).double().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- classification


def classification_metrics(logits: ArrayLike, labels: ArrayLike | None = None) -> dict[str, Any]:
    """Class statistics of the evaluator's predictions.

    Args:
        logits: ``[N, C]`` evaluator logits.
        labels: optional ``[N]`` intended classes; entries < 0 (unconditional) are ignored.

    Returns:
        ``class_histogram`` (fraction predicted per class), ``class_balance_tv`` (total-variation
        distance of that histogram from uniform), ``inception_score`` (exp E_x KL(p(y|x) || p(y))
        on the evaluator's softmax), ``confidence`` (mean max probability); with labels
        (at least one >= 0) also ``class_accuracy`` and ``per_class_accuracy`` (``None`` for
        classes without labelled samples).
    """
    lg = _as_f64(logits, "logits")
    n, c = lg.shape
    if n == 0:
        raise ValueError("logits is empty")
    logp = torch.log_softmax(lg, dim=1)
    p = logp.exp()
    pred = p.argmax(1)
    hist = torch.bincount(pred, minlength=c).double() / n
    log_py = p.mean(0).clamp_min(1e-300).log()
    kl = (p * (logp - log_py)).sum(1)
    out: dict[str, Any] = {
        "class_histogram": hist.tolist(),
        "class_balance_tv": float(0.5 * (hist - 1.0 / c).abs().sum()),
        "inception_score": float(kl.mean().exp()),
        "confidence": float(p.max(1).values.mean()),
    }
    if labels is not None:
        out.update(_accuracy_metrics(pred, torch.as_tensor(np.asarray(labels)).long(), n, c))
    return out


def _accuracy_metrics(pred: Tensor, labels: Tensor, n: int, c: int) -> dict[str, Any]:
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.numel() and labels.max() >= c:
        raise ValueError(f"labels must be < {c} (or < 0 for unconditional), got {labels.max()}")
    mask = labels >= 0
    if not mask.any():
        return {}
    hit, y = (pred[mask] == labels[mask]).double(), labels[mask]
    per_class = [float(hit[y == i].mean()) if (y == i).any() else None for i in range(c)]
    return {"class_accuracy": float(hit.mean()), "per_class_accuracy": per_class}


# ----------------------------------------------------------------------------- reference + images


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mnistdiff/reference`` (default ``~/.cache/mnistdiff/reference``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistdiff" / "reference"


def _load_cached(path: Path, key: str) -> dict | None:
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in z.files} | {"key": key}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # truncated, corrupt
        return None


def reference_stats(
    evaluator: Evaluator,
    *,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluator features and Gaussian statistics of the dataset's TEST split (10k for MNIST).

    Computed once and cached as ``{dataset}-test-{checksum[:16]}.npz`` in ``cache_dir``
    (default ``default_cache_dir()``), keyed by the evaluator checksum and dataset; a cache file
    with another key, or an unreadable one, is recomputed and replaced atomically.

    Returns:
        ``{"key", "features" [N, D] float64, "mu" [D], "sigma" [D, D], "labels" [N]}``.
    """
    key = f"{dataset}-test-{evaluator.checksum}"
    path = Path(cache_dir or default_cache_dir()) / f"{dataset}-test-{evaluator.checksum[:16]}.npz"
    if path.is_file() and (cached := _load_cached(path, key)) is not None:
        return cached
    from mnistdiff.data import load_dataset

    data = load_dataset(dataset=dataset, data_dir=data_dir)
    features, _ = evaluator.embed(data.test_images)
    mu, sigma = gaussian_stats(features)
    ref = {
        "features": features.numpy(),
        "mu": mu,
        "sigma": sigma,
        "labels": data.test_labels.numpy(),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, key=np.array(key), **ref)
    return ref | {"key": key}


def _subsample(x: Tensor, n: int, g: torch.Generator) -> Tensor:
    return x if n >= len(x) else x[torch.randperm(len(x), generator=g)[:n]]


def image_metrics(
    evaluator: Evaluator,
    images_uint8: ArrayLike,
    labels: ArrayLike | None = None,
    reference: dict[str, Any] | None = None,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """All sample-quality metrics of uint8 images against the MNIST test-set reference.

    Args:
        evaluator: loaded evaluator.
        images_uint8: uint8 ``[N, 28, 28]`` or ``[N, 1, 28, 28]`` (32×32 center-cropped).
        labels: optional intended class per image; < 0 means unconditional.
        reference: output of ``reference_stats`` (``None``: computed/cached with ``data_dir``,
            ``cache_dir``).
        k: neighbourhood size for precision/recall.
        kid_subsets: number of KID subsets; ``kid_subset_size`` their size (capped at N).
        seed: seed for KID subsets and for the precision/recall subsampling.

    Returns:
        ``num_samples``, ``fd_mnist``, ``kid``, ``kid_stderr`` (standard error of the mean over
        KID subsets), ``kid_std`` (std of the subset estimates), ``precision``, ``recall``,
        ``pr_num_samples``, ``evaluator_sha256`` and the ``classification_metrics`` keys.
        Precision/recall compare N fakes with N reference features (both subsampled, seeded,
        to min(N, reference size)) so values at equal N are comparable.
    """
    if reference is None:
        reference = reference_stats(evaluator, data_dir=data_dir, cache_dir=cache_dir)
    feats, logits = evaluator.embed(images_uint8)
    n = len(feats)
    if n <= k:
        raise ValueError(f"need more than k={k} images, got {n}")
    ref_feats = torch.as_tensor(reference["features"], dtype=torch.float64)
    mu, sigma = gaussian_stats(feats)
    kid = kernel_inception_distance(
        feats, ref_feats, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    g = torch.Generator().manual_seed(seed)
    m = min(n, len(ref_feats))
    precision, recall = precision_recall(_subsample(ref_feats, m, g), _subsample(feats, m, g), k=k)
    return {
        "num_samples": n,
        "fd_mnist": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "kid": kid.mean,
        "kid_stderr": kid.stderr,
        "kid_std": kid.std,
        "precision": precision,
        "recall": recall,
        "pr_num_samples": m,
        "evaluator_sha256": evaluator.checksum,
        **classification_metrics(logits, labels),
    }


def real_data_floor(
    evaluator: Evaluator,
    n: int,
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    reference: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    dataset: str = "mnist",
) -> dict[str, Any]:
    """``image_metrics`` of ``n`` random real TRAINING images (with labels) of ``dataset``
    against its test reference: the score of a perfect generator at sample size ``n``."""
    from mnistdiff.data import load_dataset

    data = load_dataset(dataset=dataset, data_dir=data_dir)
    if not 1 <= n <= len(data.train_labels):
        raise ValueError(f"n must be in [1, {len(data.train_labels)}], got {n}")
    idx = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(seed))[:n]
    if reference is None:
        reference = reference_stats(
            evaluator, dataset=dataset, data_dir=data_dir, cache_dir=cache_dir
        )
    return image_metrics(
        evaluator,
        data.train_images[idx],
        data.train_labels[idx],
        reference,
        k=k,
        kid_subsets=kid_subsets,
        seed=seed,
    )
