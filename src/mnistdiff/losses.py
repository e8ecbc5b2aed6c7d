"""The training loss: per-example diffusion loss, with no randomness inside."""

from __future__ import annotations

import torch
from torch import Tensor

from .parameterization import Denoiser, min_snr_weight, prediction_target

LOSSES = ("mse", "l1")


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    labels: Tensor | None,
    t: Tensor,
    noise: Tensor,
    *,
    loss: str = "mse",
    min_snr_gamma: float = 0.0,
) -> Tensor:
    """Per-example loss ``[B]`` of ``denoiser`` on clean ``x0`` noised to time ``t``.

    The caller draws ``t`` and ``noise``; this function is deterministic given its inputs.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {list(LOSSES)}")
    alpha, sigma = denoiser.coefficients(t, x0)
    x_t = alpha * x0 + sigma * noise  # [B, C, H, W]
    pred = denoiser.predict(x_t, t, labels).float()
    target = prediction_target(denoiser.prediction, x0, noise, alpha, sigma)
    err = (pred - target).square() if loss == "mse" else (pred - target).abs()
    per_example = err.flatten(1).mean(dim=1)
    weight = min_snr_weight(denoiser.prediction, alpha, sigma, min_snr_gamma).flatten()
    return per_example * weight


def loss_by_time_bin(t: Tensor, losses: Tensor, num_bins: int = 10) -> tuple[Tensor, Tensor]:
    """Sum and count of ``losses`` in ``num_bins`` equal bins of ``t`` in [0, 1]."""
    bins = torch.clamp((t.detach().float() * num_bins).long(), 0, num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(
        0, bins.cpu(), losses.detach().double().cpu()
    )
    counts = torch.bincount(bins.cpu(), minlength=num_bins).double()
    return sums, counts
