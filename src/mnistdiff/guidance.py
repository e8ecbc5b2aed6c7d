"""Guidance as denoise-function wrappers; samplers never change for guidance.

A conditional model is ``model(x [B,C,H,W], t [B], labels int64 [B]) -> x0_hat``; the null
(unconditional) label is the integer ``null_label`` (= number of classes).

Classifier-free guidance convention (Ho & Salimans 2022): ``guided = u + w * (c - u)`` with ``c``
the conditional and ``u`` the unconditional prediction, so ``w = 1`` is the plain conditional
model, ``w = 0`` the unconditional one and ``w > 1`` strengthens the condition. Guidance is applied
to x0_hat; this equals guiding eps_hat or v_hat because they are affine in x0_hat at fixed (x, t).

Classifier guidance (Dhariwal & Nichol 2021) shifts x0_hat along the gradient of a noisy
classifier's ``log p(y | x_t)``; see :func:`classifier_guided` for the formula. It works on any
denoise function, so it steers unconditional models and stacks on top of classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]
GuidanceInputModel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Denoise = Callable[[Tensor, Tensor], Tensor]
Classifier = Callable[[Tensor, Tensor], Tensor]  # (x_t [B,C,H,W], t [B]) -> logits [B, K]

THRESHOLD_MODES = ("none", "clip", "dynamic")


def _check_labels(labels: Tensor) -> None:
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be a 1-D int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}"
        )


def _check_batch(x: Tensor, labels: Tensor) -> None:
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"batch size of x ({x.shape[0]}) != number of labels ({labels.shape[0]})")


def unconditional(model: ConditionalModel, null_label: int) -> Denoise:
    """Denoise function that calls ``model`` with the null label for every example."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        null = torch.full((x.shape[0],), null_label, dtype=torch.int64, device=x.device)
        return model(x, t, null)

    return denoise


def conditional(model: ConditionalModel, labels: Tensor) -> Denoise:
    """Denoise function for the plain conditional model (``w = 1``)."""
    _check_labels(labels)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x, labels)
        return model(x, t, labels.to(x.device))

    return denoise


def _rescale(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """CFG-rescale (Lin et al. 2024): match the std of ``cond`` per example, mix by phi."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * (std_cond / std_guided) + (1.0 - phi) * guided


def classifier_free(
    model: ConditionalModel,
    labels: Tensor,
    scale: float,
    null_label: int,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
) -> Denoise:
    """Classifier-free guidance ``u + scale * (c - u)`` as a denoise function.

    Conditional and unconditional predictions come from ONE forward pass on a 2B batch when both
    are needed; ``scale == 1`` calls only the conditional model and ``scale == 0`` (without
    rescale) only the unconditional one.

    Args:
        model: conditional model ``model(x, t, labels) -> x0_hat``.
        labels: int64 [B] class labels.
        scale: guidance weight w (finite).
        null_label: the unconditional label index.
        rescale: CFG-rescale factor phi in [0, 1] (Lin et al. 2024): the guided x0_hat is scaled
            to the conditional prediction's per-example std, and mixed with the plain guided one
            by phi. 0 disables it.
        interval: ``(t_lo, t_hi)``: guide only where ``t_lo <= t <= t_hi``, elsewhere use the
            conditional prediction (Kynkaanniemi et al. 2024, "guidance in a limited interval").

    Returns:
        ``denoise(x, t) -> x0_hat``.
    """
    _check_labels(labels)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale!r}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale!r}")
    _check_interval(interval)

    def both(x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # [2B, ...]
        return out[: x.shape[0]], out[x.shape[0] :]

    def guide(x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, conditional) predictions, one forward of 2B."""
        cond, uncond = both(x, t, y)
        guided = uncond + scale * (cond - uncond)
        if rescale > 0.0:
            guided = _rescale(guided, cond, rescale)
        return guided, cond

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x, labels)
        y = labels.to(x.device)
        mask = interval_mask(t, interval)
        if scale == 1.0 or (mask is not None and not bool(mask.any())):
            return model(x, t, y)
        if mask is None or bool(mask.all()):
            if scale == 0.0 and rescale == 0.0:
                return model(x, t, torch.full_like(y, null_label))
            return guide(x, t, y)[0]
        guided, cond = guide(x, t, y)
        return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), guided, cond)

    return denoise


def _check_label_range(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = sorted({int(v) for v in labels.tolist() if not 0 <= v < num_classes})
        raise ValueError(
            f"labels {bad} out of range: the classifier knows classes 0..{num_classes - 1}"
        )


def classifier_log_prob_grad(
    classifier: Classifier, x: Tensor, t: Tensor, labels: Tensor
) -> Tensor:
    """``grad_x log p(y | x_t = x, t)`` per example, shaped like ``x``.

    Computed with autograd even when called under ``torch.no_grad``, in float32 (float64 if
    ``x`` is float64); no parameter gradients are kept.

    Raises:
        ValueError: a label outside the classifier's classes.
    """
    _check_labels(labels)
    _check_batch(x, labels)
    with torch.enable_grad():
        xg = x.detach().to(torch.promote_types(x.dtype, torch.float32)).requires_grad_(True)
        logits = classifier(xg, t)  # [B, K]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        _check_label_range(labels, logits.shape[1])
        log_p = torch.log_softmax(logits, dim=1).gather(1, labels.to(x.device)[:, None])
        (grad,) = torch.autograd.grad(log_p.sum(), xg)
    return grad


def classifier_guided(
    denoise: Denoise, classifier: Classifier, labels: Tensor, scale: float, schedule
) -> Denoise:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) as a denoise-function wrapper.

    With ``x_t = alpha_t x0 + sigma_t eps``, Tweedie's formula gives
    ``E[x0 | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / alpha_t``. Replacing the score by the
    guided one, ``grad log p_t(x_t) + s grad log p_phi(y | x_t)``, gives::

        x0_hat' = x0_hat + s * (sigma_t^2 / alpha_t) * grad_x log p_phi(y | x_t)

    which equals Dhariwal & Nichol's ``eps_hat' = eps_hat - s sigma_t grad log p_phi`` (their
    ``sqrt(1 - alpha_bar)`` is ``sigma_t``), since ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``.
    ``s = 1`` is the Bayes-rule conditional score; ``s > 1`` sharpens it; ``s = 0`` returns
    ``denoise`` itself. Where ``alpha_t = 0`` (flow at t = 1) ``x_t`` is pure noise, independent
    of ``y``, so the exact shift is 0 and none is applied. Each call adds one classifier forward
    and backward pass (not counted as model NFE).

    Args:
        denoise: ``denoise(x, t) -> x0_hat`` (conditional, unconditional or already CFG-guided).
        classifier: ``classifier(x_t, t) -> logits`` trained on ``schedule``'s noised images
            (e.g. :class:`mnistdiff.noisy_classifier.NoisyClassifier`).
        labels: int64 [B] target classes.
        scale: guidance scale ``s`` (finite, >= 0).
        schedule: the model's schedule (provides ``alpha_t``, ``sigma_t``).

    Returns:
        The guided ``denoise(x, t) -> x0_hat``.
    """
    _check_labels(labels)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"classifier guidance scale must be finite and >= 0, got {scale!r}")
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None:
        _check_label_range(labels, num_classes)
    if scale == 0.0:
        return denoise

    def guided(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoise(x, t)
        grad = classifier_log_prob_grad(classifier, x, t, labels)
        alpha, sigma = schedule.alpha_sigma(t.detach().to(torch.float64))
        coef = torch.where(alpha > 0, scale * sigma**2 / alpha.clamp_min(1e-300), 0.0)
        return x0 + (coef.view(-1, *([1] * (x.ndim - 1))) * grad).to(x0.dtype)

    return guided


def guidance_input(
    model: GuidanceInputModel,
    labels: Tensor,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> Denoise:
    """Guidance of a guidance-distilled model: ONE pass with the scale ``w`` as an input.

    The model (Meng et al. 2023, "On distillation of guided diffusion models") was trained so
    that ``model(x, t, labels, w)`` matches its teacher's ``u + w * (c - u)``; sampling it at
    ``w`` costs one network pass per step instead of two.

    Args:
        model: ``model(x, t, labels, w) -> x0_hat`` with ``w`` a float ``[B]``.
        labels: int64 [B] class labels.
        scale: guidance weight w (finite).
        interval: ``(t_lo, t_hi)``: ``w = scale`` only there, ``w = 1`` (the conditional
            prediction) elsewhere, as :func:`classifier_free` does.

    Returns:
        ``denoise(x, t) -> x0_hat``.
    """
    _check_labels(labels)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale!r}")
    _check_interval(interval)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x, labels)
        w = torch.full((x.shape[0],), float(scale), dtype=x.dtype, device=x.device)
        return model(x, t, labels.to(x.device), scale_in_interval(w, t, interval))

    return denoise


def interval_mask(t: Tensor, interval: tuple[float, float] | None) -> Tensor | None:
    """``t_lo <= t <= t_hi`` per example (bool ``[B]``), or None without an interval."""
    return None if interval is None else (t >= interval[0]) & (t <= interval[1])


def scale_in_interval(w: Tensor, t: Tensor, interval: tuple[float, float] | None) -> Tensor:
    """Per-example scales ``w [B]`` where ``t`` is inside ``interval``, 1 (no guidance) outside."""
    mask = interval_mask(t, interval)
    return w if mask is None else torch.where(mask.to(w.device), w, torch.ones_like(w))


def _check_interval(interval: tuple[float, float] | None) -> None:
    if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(
            f"interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {interval}"
        )


def thresholded(denoise: Denoise, mode: str, *, percentile: float = 0.995) -> Denoise:
    """Wrap a denoise function with x0_hat thresholding.

    Args:
        denoise: the denoise function.
        mode: ``none`` (unchanged), ``clip`` (clamp x0_hat to [-1, 1]) or ``dynamic`` (Imagen
            dynamic thresholding, Saharia et al. 2022: per example ``s = max(1, quantile(|x0_hat|,
            percentile))``, then ``clamp(x0_hat, -s, s) / s``).
        percentile: quantile for ``dynamic``, in (0, 1].

    Returns:
        The wrapped denoise function (``denoise`` itself for ``none``).
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; allowed: {', '.join(THRESHOLD_MODES)}")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
    if mode == "none":
        return denoise

    def clipped(x: Tensor, t: Tensor) -> Tensor:
        return denoise(x, t).clamp(-1.0, 1.0)

    def dynamic(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoise(x, t)
        s = torch.quantile(x0.detach().flatten(1).abs().float(), percentile, dim=1)
        s = s.clamp_min(1.0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # [B,1,1,1]
        return torch.maximum(torch.minimum(x0, s), -s) / s

    return clipped if mode == "clip" else dynamic
