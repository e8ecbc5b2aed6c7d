"""PF-ODE likelihood on Gaussian data (closed-form denoiser and density), dequantization, and the
bits/dim API on a tiny model."""

import math

import pytest
import torch

from mnistdiff.likelihood import (
    LEVEL,
    bits_per_dim,
    dequantize,
    gaussian_prior,
    likelihood_metrics,
    ode_bits_per_dim,
    ode_sigma_tilde_range,
    pf_ode_log_likelihood,
)
from mnistdiff.schedules import build_schedule

F64 = torch.float64
SHAPE = (1, 2, 2)  # D = 4
D = 4
MU = torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=F64)
_A = torch.tensor(
    [[0.3, 0.1, 0.0, 0.0], [0.2, 0.4, 0.0, 0.1], [0.0, -0.1, 0.2, 0.0], [0.1, 0.0, 0.3, 0.5]],
    dtype=F64,
)
COV = _A @ _A.T  # full covariance: the denoiser's Jacobian is not diagonal, so Hutchinson is noisy


def gaussian_denoiser(schedule):
    """E[x0 | x_t] for x0 ~ N(MU, COV): MU + a COV (a^2 COV + s^2 I)^-1 (x_t - a MU)."""

    def denoise(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and bool((t > 0).all())
        a, s = schedule.alpha_sigma(t[:1].to(F64))
        a, s = float(a), float(s)
        gain = a * COV @ torch.linalg.inv(a**2 * COV + s**2 * torch.eye(D, dtype=F64))
        r = x.flatten(1) - a * MU.to(x)
        return (MU.to(x) + r @ gain.T.to(x)).view_as(x)

    return denoise


def gaussian_logpdf(y, rho):
    """log N(y; MU, COV + rho^2 I): the exact marginal of y = x0 + rho * noise."""
    dist = torch.distributions.MultivariateNormal(MU, COV + rho**2 * torch.eye(D, dtype=F64))
    return dist.log_prob(y.flatten(1).double())


def points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = MU + torch.randn(n, D, generator=g, dtype=F64) @ _A.T
    return x.view(n, *SHAPE)


@pytest.mark.parametrize("name", ["flow", "cosine", "linear"])
def test_exact_trace_matches_gaussian_density(name):
    schedule = build_schedule(name, 1000)
    lo, hi = ode_sigma_tilde_range(schedule)
    x = points(64)
    expected = gaussian_logpdf(x, lo)

    def exact_prior(y, rho):
        return gaussian_logpdf(y, rho)

    got = pf_ode_log_likelihood(
        gaussian_denoiser(schedule), x, schedule, steps=80, probes=None, prior=exact_prior
    )
    assert got.shape == (64,) and got.dtype == F64
    assert (got - expected).abs().max().item() < 1e-3  # only the RK4 error is left
    # the default N(0, rho_max^2 I) prior is off by about y.MU / rho_max^2: zero-mean noise
    default = pf_ode_log_likelihood(gaussian_denoiser(schedule), x, schedule, steps=80, probes=None)
    assert (default - expected).abs().max().item() < 0.05
    assert abs((default - expected).mean().item()) < 0.005


def test_rk4_converges_at_fourth_order():
    schedule = build_schedule("flow")
    x = points(16, seed=1)
    expected = gaussian_logpdf(x, ode_sigma_tilde_range(schedule)[0])

    def err(steps):
        got = pf_ode_log_likelihood(
            gaussian_denoiser(schedule),
            x,
            schedule,
            steps=steps,
            probes=None,
            prior=gaussian_logpdf,
        )
        return (got - expected).abs().max().item()

    coarse, fine = err(20), err(40)
    assert fine < coarse / 10  # 2x steps -> 16x smaller error for RK4 (10 leaves margin)


def test_hutchinson_is_unbiased_and_noisy():
    schedule = build_schedule("cosine", 1000)
    n = 1000
    x = points(1, seed=2).expand(n, *SHAPE).contiguous()  # one point, n independent probes
    expected = gaussian_logpdf(x[:1], ode_sigma_tilde_range(schedule)[0]).item()
    gen = torch.Generator().manual_seed(3)
    est = pf_ode_log_likelihood(
        gaussian_denoiser(schedule), x, schedule, steps=40, probes=1, generator=gen
    )
    stderr = est.std().item() / math.sqrt(n)
    assert est.std().item() > 1e-3  # the estimator really is stochastic here
    assert abs(est.mean().item() - expected) < 4 * stderr + 0.02  # + prior approximation
    more = pf_ode_log_likelihood(
        gaussian_denoiser(schedule), x[:200], schedule, steps=40, probes=8, generator=gen
    )
    assert more.std().item() < est.std().item() / 2  # 8 probes: std / sqrt(8)


def test_gaussian_prior_is_normal_log_density():
    y = torch.randn(3, *SHAPE, dtype=F64)
    ref = torch.distributions.Normal(0.0, 2.5).log_prob(y).flatten(1).sum(1)
    assert torch.allclose(gaussian_prior(y, 2.5), ref)


def test_dequantize_stays_in_the_level_bin():
    k = torch.randint(0, 256, (8, 1, 5, 5), generator=torch.Generator().manual_seed(0))
    x = k.double() / 127.5 - 1
    dq = dequantize(x, torch.Generator().manual_seed(1))
    assert ((dq - x).abs() <= LEVEL / 2).all()
    assert torch.equal(torch.round((dq + 1) / LEVEL).long(), k)
    assert (dq - x).std().item() == pytest.approx(LEVEL / math.sqrt(12), rel=0.15)


def test_bad_arguments_are_named():
    schedule = build_schedule("flow")
    den, x = gaussian_denoiser(schedule), points(2)
    with pytest.raises(ValueError, match="steps"):
        pf_ode_log_likelihood(den, x, schedule, steps=0)
    with pytest.raises(ValueError, match="probes"):
        pf_ode_log_likelihood(den, x, schedule, probes=0)
    with pytest.raises(ValueError, match="sigma_tilde_range"):
        pf_ode_log_likelihood(den, x, schedule, sigma_tilde_range=(1.0, 0.5))


# --------------------------------------------------------------------------- tiny real model


def _pipeline(cfg):
    from mnistdiff.build import build_denoiser
    from mnistdiff.data import DataSpec
    from mnistdiff.device import select_precision
    from mnistdiff.sample import Pipeline

    torch.manual_seed(0)
    spec = DataSpec(channels=1, size=28, num_classes=10)
    den = build_denoiser(cfg, spec).eval()
    cpu = torch.device("cpu")
    return Pipeline(cfg, spec, den, cpu, select_precision("fp32", cpu), source=None)


def test_ode_bits_per_dim_on_tiny_model(smoke_cfg):
    pipe = _pipeline(smoke_cfg())  # cosine, T = 100, eps prediction, conditional
    out = ode_bits_per_dim(pipe, num_images=4, steps=3, probes=1, seed=0)
    assert math.isfinite(out["bits_per_dim_ode"]) and out["bits_per_dim_ode"] > 0
    assert math.isfinite(out["bits_per_dim_ode_stderr"]) and out["bits_per_dim_ode_stderr"] >= 0
    assert out["ode_num_images"] == 4 and out["ode_nfe"] == 12
    assert out == ode_bits_per_dim(pipe, num_images=4, steps=3, probes=1, seed=0)  # seeded
    assert "bits_per_dim_ode" not in likelihood_metrics(pipe, num_images=4)  # DDPM bound only


def test_flow_model_reports_ode_likelihood(smoke_cfg):
    pipe = _pipeline(smoke_cfg("diffusion.schedule=flow", "diffusion.prediction=velocity"))
    assert bits_per_dim(pipe, num_images=2)["bits_per_dim_ddpm_bound"] is None
    out = likelihood_metrics(pipe, num_images=2, ode_steps=4)
    assert out["bits_per_dim"] is None and math.isfinite(out["bits_per_dim_ode"])
    assert out["ode_steps"] == 4 and out["ode_sigma_tilde_range"] == [0.002, 80.0]
