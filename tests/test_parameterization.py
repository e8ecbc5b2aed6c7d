import pytest
import torch

from mnistdiff.parameterization import (
    PREDICTIONS,
    eps_from_x0,
    min_snr_weight,
    prediction_target,
    x0_error_scale,
    x0_from_prediction,
)


def _vp(t):
    alpha = torch.cos(t * torch.pi / 2)
    return alpha, torch.sin(t * torch.pi / 2)


def _flow(t):
    return 1 - t, t


# flow velocity is defined for rectified flow only
PAIRS = [(p, c) for c in (_vp, _flow) for p in PREDICTIONS if not (p == "velocity" and c is _vp)]


@pytest.mark.parametrize("prediction, coef", PAIRS)
def test_round_trip(prediction, coef):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 5, generator=g, dtype=torch.float64)
    t = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = coef(t)
    x_t = alpha * x0 + sigma * eps
    target = prediction_target(prediction, x0, eps, alpha, sigma)
    x0_hat = x0_from_prediction(prediction, target, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_from_x0(x0_hat, x_t, alpha, sigma), eps)
    # the error scale maps a prediction error to the x0 error exactly
    delta = torch.randn(64, 5, generator=g, dtype=torch.float64) * 1e-3
    x0_pert = x0_from_prediction(prediction, target + delta, x_t, alpha, sigma)
    c = x0_error_scale(prediction, alpha, sigma)
    torch.testing.assert_close(x0_pert - x0, c * delta)


def test_v_and_velocity_definitions():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    a, s = torch.tensor([0.6]), torch.tensor([0.8])
    assert prediction_target("v", x0, eps, a, s).item() == pytest.approx(0.6 * -1 - 0.8 * 2)
    assert prediction_target("velocity", x0, eps, a, s).item() == pytest.approx(-3.0)


def test_min_snr_weights_match_formula():
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    alpha, sigma = _vp(t)
    snr = (alpha / sigma) ** 2
    g = 5.0
    torch.testing.assert_close(
        min_snr_weight("eps", alpha, sigma, g), torch.minimum(snr, torch.tensor(g)) / snr
    )
    torch.testing.assert_close(
        min_snr_weight("x0", alpha, sigma, g), torch.minimum(snr, torch.tensor(g))
    )
    torch.testing.assert_close(
        min_snr_weight("v", alpha, sigma, g), torch.minimum(snr, torch.tensor(g)) / (snr + 1)
    )
    fa, fs = _flow(t)
    fsnr = (fa / fs) ** 2
    torch.testing.assert_close(
        min_snr_weight("velocity", fa, fs, g), torch.minimum(fsnr, torch.tensor(g)) * fs**2
    )
    assert torch.equal(min_snr_weight("eps", alpha, sigma, 0.0), torch.ones_like(alpha))


def test_min_snr_makes_objectives_equivalent():
    """Weighted losses of every objective equal the same min-SNR x0-space loss."""
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = _vp(t)
    x0 = torch.randn(32, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(32, 3, generator=g, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.1 * torch.randn(32, 3, generator=g, dtype=torch.float64)
    ref = torch.minimum((alpha / sigma) ** 2, torch.tensor(5.0)) * (x0_hat - x0) ** 2
    for p in ("eps", "x0", "v"):
        eps_hat = eps_from_x0(x0_hat, x_t, alpha, sigma)
        pred = prediction_target(p, x0_hat, eps_hat, alpha, sigma)
        target = prediction_target(p, x0, eps, alpha, sigma)
        loss = min_snr_weight(p, alpha, sigma, 5.0) * (pred - target) ** 2
        torch.testing.assert_close(loss, ref)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="allowed"):
        prediction_target("noise", torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_edm_form_every_prediction(prediction):
    """x0_hat = c_skip x_t + c_out pred, and the target is the pred that recovers x0 exactly."""
    from mnistdiff.parameterization import coefficients

    g = torch.Generator().manual_seed(2)
    t = torch.rand(16, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = _flow(t) if prediction == "velocity" else _vp(t)
    x0, eps, pred = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = alpha * x0 + sigma * eps
    c_skip, c_out = coefficients(prediction, alpha, sigma)
    torch.testing.assert_close(
        x0_from_prediction(prediction, pred, x_t, alpha, sigma), c_skip * x_t + c_out * pred
    )
    target = prediction_target(prediction, x0, eps, alpha, sigma)
    torch.testing.assert_close(c_skip * x_t + c_out * target, x0)
    torch.testing.assert_close(x0_error_scale(prediction, alpha, sigma), c_out)


def test_a_new_prediction_is_one_table_row(monkeypatch):
    """Registering a row makes a prediction selectable, trainable and samplable."""
    from mnistdiff.config import load_config
    from mnistdiff.losses import diffusion_loss
    from mnistdiff.parameterization import PARAMETERIZATIONS, Denoiser, Prediction
    from mnistdiff.schedules import build_schedule

    row = Prediction(lambda a, s: (1 / a, s / a), lambda x0, eps, a, s: -eps)  # minus the noise
    monkeypatch.setitem(PARAMETERIZATIONS, "neg_eps", row)
    assert load_config(None, ["diffusion.prediction=neg_eps"]).diffusion.prediction == "neg_eps"

    class Oracle(torch.nn.Module):  # returns the exact target for a fixed (x0, eps)
        def forward(self, x, t, labels=None):
            return -eps

    x0 = torch.randn(4, 1, 28, 28)
    eps = torch.randn(4, 1, 28, 28)
    t = torch.full((4,), 0.5)
    den = Denoiser(Oracle(), build_schedule("cosine", 100), "neg_eps")
    alpha, sigma = den.coefficients(t, x0)
    assert diffusion_loss(den, x0, None, t, eps).abs().max() == 0.0
    torch.testing.assert_close(den(alpha * x0 + sigma * eps, t), x0, atol=1e-5, rtol=1e-5)
