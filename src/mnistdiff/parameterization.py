"""Model parameterizations: eps / x0 / v / flow velocity, and the Denoiser wrapper.

With ``x_t = alpha * x0 + sigma * eps`` a network can predict

* ``eps``: the noise;
* ``x0``: the clean image;
* ``v``: ``alpha * eps - sigma * x0`` (Salimans & Ho 2022);
* ``velocity``: ``d x_t / dt = eps - x0`` for rectified flow (alpha = 1 - t, sigma = t).

This module is the only place that knows these conversions: one row of
:data:`PARAMETERIZATIONS` per prediction, in EDM's ``(c_skip, c_out)`` form, from which x0_hat,
the loss's x0 error scale (min-SNR weights) and the likelihood's x0_hat all follow. Formulas are
written for general (alpha, sigma), so they hold for variance-preserving schedules and for
rectified flow alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Prediction(NamedTuple):
    """One parameterization in EDM's form (Karras et al. 2022, eq. 7).

    ``coefficients(alpha, sigma) -> (c_skip, c_out)`` with ``x0_hat = c_skip x_t + c_out pred``
    (so ``c_out`` maps a prediction error to the x0 error); ``target(x0, eps, alpha, sigma)`` is
    the pred giving ``x0_hat = x0``, in closed form (exact where ``(x0 - c_skip x_t) / c_out``
    would cancel; a test checks the identity for every row).
    """

    coefficients: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _vp_norm(alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha**2 + sigma**2


PARAMETERIZATIONS: dict[str, Prediction] = {
    "eps": Prediction(lambda a, s: (1 / a, -s / a), lambda x0, eps, a, s: eps),
    "x0": Prediction(
        lambda a, s: (torch.zeros_like(a), torch.ones_like(a)), lambda x0, eps, a, s: x0
    ),
    "v": Prediction(
        lambda a, s: (a / _vp_norm(a, s), -s / _vp_norm(a, s)),
        lambda x0, eps, a, s: a * eps - s * x0,
    ),
    # rectified flow (alpha = 1 - t, sigma = t): d/dt [(1 - t) x0 + t eps] = eps - x0
    "velocity": Prediction(lambda a, s: (torch.ones_like(a), -s), lambda x0, eps, a, s: eps - x0),
}
PREDICTIONS = tuple(PARAMETERIZATIONS)


def _get(prediction: str) -> Prediction:
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {list(PREDICTIONS)}")
    return PARAMETERIZATIONS[prediction]


def coefficients(prediction: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` with ``x0_hat = c_skip * x_t + c_out * pred``."""
    return _get(prediction).coefficients(alpha, sigma)


def prediction_target(
    prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """The regression target of ``prediction`` for clean ``x0`` and noise ``eps``."""
    return _get(prediction).target(x0, eps, alpha, sigma)


def x0_from_prediction(
    prediction: str, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """Invert :func:`prediction_target`: the clean-image estimate implied by ``pred``."""
    c_skip, c_out = coefficients(prediction, alpha, sigma)
    return c_skip * x_t + c_out * pred


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise implied by a clean-image estimate."""
    return (x_t - alpha * x0) / sigma


def target_from_x0(
    prediction: str, x0_hat: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """The ``prediction`` whose clean-image estimate at ``(x_t, alpha, sigma)`` is ``x0_hat``.

    Inverse of :func:`x0_from_prediction` (needs ``sigma > 0``): distillation turns a teacher's
    x0_hat into a regression target in the student's own prediction space.
    """
    return prediction_target(
        prediction, x0_hat, eps_from_x0(x0_hat, x_t, alpha, sigma), alpha, sigma
    )


def x0_error_scale(prediction: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``c`` with ``x0_hat - x0 = c * (pred - target)``: ``c_out`` of :func:`coefficients`."""
    return coefficients(prediction, alpha, sigma)[1]


def min_snr_weight(prediction: str, alpha: Tensor, sigma: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss on ``prediction``.

    The paper weights the x0-space error by ``min(SNR, gamma)``. A loss on another target
    equals the x0-space loss divided by ``c**2`` (see :func:`x0_error_scale`), so its weight is
    ``min(SNR, gamma) * c**2``: for eps ``min(SNR, gamma) / SNR``, for VP-v
    ``min(SNR, gamma) / (SNR + 1)``. ``gamma = 0`` disables weighting (all ones).
    """
    if gamma <= 0:
        return torch.ones_like(alpha)
    snr = (alpha / sigma) ** 2
    c = x0_error_scale(prediction, alpha, sigma)
    if prediction == "eps":  # c**2 = 1 / snr; write it without dividing inf by inf
        return torch.clamp(gamma / snr, max=1.0)
    return torch.clamp(snr, max=gamma) * c**2


class Denoiser(nn.Module):
    """Wrap a backbone so that it maps ``(x_t, t, labels)`` to the clean-image estimate.

    Args:
        backbone: ``backbone(x, noise_cond, labels) -> Tensor``; knows nothing about diffusion.
        schedule: provides ``alpha_sigma(t)``.
        prediction: what the backbone output means (one of :data:`PREDICTIONS`).
        num_classes: number of classes; label ``num_classes`` is the null (unconditional) label.
        image_shape: ``(C, H, W)`` of one image, for samplers that draw starting noise.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule,
        prediction: str,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (1, 28, 28),
    ):
        super().__init__()
        _get(prediction)
        self.backbone = backbone
        self.schedule = schedule
        self.prediction = prediction
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def with_backbone(self, backbone: nn.Module) -> Denoiser:
        """The same parameterization around another backbone (EMA copy, DDP or compiled)."""
        shape = self.image_shape
        return Denoiser(backbone, self.schedule, self.prediction, self.num_classes, shape)

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` as float32 tensors broadcastable against ``like`` ([B,1,1,1])."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(torch.float64))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha.float().view(shape), sigma.float().view(shape)

    @property
    def accepts_guidance(self) -> bool:
        """True when the backbone takes the guidance scale as an input (guidance-distilled)."""
        return bool(getattr(self.backbone, "accepts_guidance", False))

    def predict(
        self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None
    ) -> Tensor:
        """Raw backbone output (in whatever precision autocast chose).

        ``guidance`` (``[B]`` scale w, only for backbones with ``accepts_guidance``) is passed
        through as one more conditioning input.
        """
        if guidance is None:
            return self.backbone(x_t, t.to(x_t.dtype), labels)
        return self.backbone(x_t, t.to(x_t.dtype), labels, guidance.to(x_t.dtype))

    def forward(
        self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None
    ) -> Tensor:
        """Clean-image estimate ``x0_hat`` (float32)."""
        alpha, sigma = self.coefficients(t, x_t)
        pred = self.predict(x_t, t, labels, guidance).float()
        return x0_from_prediction(self.prediction, pred, x_t.float(), alpha, sigma)
