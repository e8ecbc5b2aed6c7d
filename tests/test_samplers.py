"""Samplers on data x0 ~ N(MU, S^2 I), where the ideal denoiser and the ODE flow are closed form."""

import math

import numpy as np
import pytest
import torch

from mnistdiff.samplers import (
    SAMPLERS,
    ddim,
    ddpm,
    euler,
    get_sampler,
    initial_sample,
    nfe_for,
    predictor_corrector,
    steps_for_nfe,
)
from mnistdiff.schedules import SCHEDULE_NAMES, build_schedule, time_grid

MU, S = 0.5, 0.3
F64 = torch.float64
SHAPE = (1, 2, 2)  # dim 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


def scalar_alpha_sigma(schedule, t):
    a, s = schedule.alpha_sigma(torch.as_tensor(t, dtype=F64))
    return float(a), float(s)


def gaussian_denoiser(schedule, calls=None):
    """E[x0 | x_t] = MU + a S^2 / (a^2 S^2 + s^2) (x_t - a MU); checks the t it receives."""

    def denoise(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and bool((t > 0).all())
        if calls is not None:
            calls.append(float(t[0]))
        a, s = schedule.alpha_sigma(t.to(F64))
        a, s = a.view(-1, 1, 1, 1).to(x.dtype), s.view(-1, 1, 1, 1).to(x.dtype)
        return MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)

    return denoise


def exact_flow(schedule, x, t_from, t_to):
    """The probability-flow ODE map between the Gaussian marginals (affine, increasing)."""
    a0, s0 = scalar_alpha_sigma(schedule, t_from)
    a1, s1 = scalar_alpha_sigma(schedule, t_to)
    return a1 * MU + math.hypot(a1 * S, s1) / math.hypot(a0 * S, s0) * (x - a0 * MU)


def run(name, schedule, ts, noise, seed=0, **options):
    x = initial_sample(schedule, ts, noise)
    gen = torch.Generator().manual_seed(seed)
    fn = predictor_corrector if "corrector_steps" in options else get_sampler(name).fn
    return fn(gaussian_denoiser(schedule), x, schedule, ts, generator=gen, **options)


CASES = [  # (sampler, options, steps)
    ("ddpm", {}, 250),
    ("ddim", {}, 100),
    ("ddim", {"eta": 0.5}, 150),
    ("euler", {}, 200),
    ("euler", {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 10.0}, 200),
    ("heun", {}, 50),
    ("heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 10.0}, 100),
    ("dpmpp_2m", {}, 50),
    ("dpmpp_3m", {}, 50),
    ("unipc", {}, 50),
    ("sde_pc", {}, 200),
    ("sde_pc", {"corrector_steps": 0}, 300),
    ("sde_pc", {"corrector_steps": 2, "snr": 0.1}, 150),
]


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize(("name", "options", "steps"), CASES)
def test_gaussian_moments(schedule_name, name, options, steps):
    schedule = build_schedule(schedule_name, 1000)
    ts = time_grid(schedule, get_sampler(name).default_grid, steps)
    noise = torch.randn(4000, *SHAPE, generator=torch.Generator().manual_seed(1))
    out = run(name, schedule, ts, noise, **options).x
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.02


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_deterministic_samplers_follow_the_exact_flow(schedule_name, name):
    schedule = build_schedule(schedule_name, 1000)
    ts = time_grid(schedule, "uniform" if name == "ddim" else get_sampler(name).default_grid, 100)
    noise = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_start = initial_sample(schedule, ts, noise)
    out = run(name, schedule, ts, noise).x
    again = run(name, schedule, ts, noise, seed=123).x
    assert torch.equal(out, again)  # the generator is irrelevant
    expected = exact_flow(schedule, x_start, float(ts[0]), 0.0)
    rms = (out - expected).pow(2).mean().sqrt().item()
    assert rms < (0.04 if name in ("ddim", "euler") else 0.006)


def lam_uniform_grid(schedule, steps):
    """steps intervals uniform in log-SNR from sigma_tilde = 10 to 0.05, then a final step to 0."""
    lam = torch.linspace(-2 * math.log(10.0), -2 * math.log(0.05), steps + 1, dtype=F64)
    return torch.cat([schedule.t_from_log_snr(lam), torch.zeros(1, dtype=F64)])


def recorder():
    """(states, callback) recording the state after every step."""
    states = {}

    def callback(i, x, x0_hat):
        states[i] = x

    return states, callback


def observed_order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# The final step to t = 0 returns x0_hat (not an ODE step), so the error is measured at the
# last nonzero grid time ts[-2], which is the same for every step count.
@pytest.mark.parametrize("schedule_name", ["cosine", "flow"])
@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [
        ("ddim", 0.8, 1.3),
        ("euler", 0.8, 1.3),
        ("heun", 1.6, 2.6),
        ("dpmpp_2m", 1.6, 2.6),
        ("dpmpp_3m", 2.6, 4.2),  # super-convergent on this problem; see the third-order test below
        ("unipc", 2.6, 3.4),  # UniP-2 + UniC is third order (measured 2.92)
    ],
)
def test_order_of_convergence(schedule_name, name, lo, hi):
    schedule = build_schedule(schedule_name, 1000)
    steps_list, errors = [16, 32, 64, 128], []
    for steps in steps_list:
        ts = lam_uniform_grid(schedule, steps)
        a0, s0 = scalar_alpha_sigma(schedule, float(ts[0]))
        z = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
        x = a0 * MU + math.hypot(a0 * S, s0) * z  # on the exact marginal at ts[0]
        states, callback = recorder()
        SAMPLERS[name].fn(
            gaussian_denoiser(schedule),
            x,
            schedule,
            ts,
            callback=callback,
        )
        reference = exact_flow(schedule, x, float(ts[0]), float(ts[-2]))
        errors.append((states[steps - 1] - reference).abs().max().item())
    assert lo < observed_order(errors, steps_list) < hi, errors


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc"])
def test_third_order_multistep(name):
    """x0_hat = P(l) independent of x: x_s = sigma_s (x_t / sigma_t + int e^l P(l) dl) exactly.

    P and its first two derivatives vanish at the start, so the lower-order warm-up steps do not
    limit the global order (a first-order first step would otherwise make it 2). For UniPC the
    predictor is irrelevant here (x0_hat ignores x), so this checks the corrector's weights.
    """
    schedule = build_schedule("flow")
    l_start = -1.0

    def poly(l):
        return (l - l_start) ** 3 * torch.exp(-0.3 * (l - l_start))

    def denoise(x, t):
        return poly(0.5 * schedule.log_snr(t.to(F64))).view(-1, 1, 1, 1).expand_as(x).to(x.dtype)

    steps_list, errors = [64, 128, 256, 512], []
    for steps in steps_list:
        lam = torch.linspace(2 * l_start, 3.0, steps + 1, dtype=F64)
        ts = torch.cat([schedule.t_from_log_snr(lam), torch.zeros(1, dtype=F64)])
        states, callback = recorder()
        x = torch.ones(1, 1, 1, 1, dtype=F64)
        SAMPLERS[name].fn(denoise, x, schedule, ts, callback=callback)
        l = torch.linspace(l_start, 1.5, 400001, dtype=F64)
        integral = torch.trapezoid(torch.exp(l) * poly(l), l).item()
        (_, s0), (_, s1) = (scalar_alpha_sigma(schedule, float(ts[k])) for k in (0, -2))
        errors.append(abs(states[steps - 1].item() - s1 * (1.0 / s0 + integral)))
    assert 2.6 < observed_order(errors, steps_list) < 3.4, errors


@pytest.mark.parametrize(
    ("schedule_name", "kind"), [("linear", "karras"), ("cosine", "logsnr"), ("flow", "uniform")]
)
def test_ddim_eta0_equals_euler(schedule_name, kind):
    schedule = build_schedule(schedule_name, 1000)
    ts = time_grid(schedule, kind, 20)
    noise = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64)
    a = run("ddim", schedule, ts, noise).x
    b = run("euler", schedule, ts, noise).x
    assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("schedule_name", ["linear", "flow"])
def test_ddim_eta1_equals_ddpm(schedule_name):
    schedule = build_schedule(schedule_name, 1000)
    ts = time_grid(schedule, "uniform", 25)
    noise = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    a = run("ddim", schedule, ts, noise, seed=7, eta=1.0).x
    b = run("ddpm", schedule, ts, noise, seed=7).x
    assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


def test_ddpm_on_full_trailing_grid_is_exact_ddpm():
    """One step t = (i+1)/T -> i/T equals Ho et al. Alg. 2 with the posterior variance."""
    schedule = build_schedule("linear", 20)
    ts = time_grid(schedule, "trailing", 20)
    ab = schedule.alphas_cumprod
    noise = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=F64)
    x = initial_sample(schedule, ts, noise)
    den = gaussian_denoiser(schedule)
    z = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=F64)
    i = 19  # from t = 1 to t = 19/20
    beta, ab_t, ab_s = 1 - ab[i] / ab[i - 1], ab[i], ab[i - 1]
    eps = (x - ab_t.sqrt() * den(x, torch.ones(8, dtype=F64))) / (1 - ab_t).sqrt()
    mean = (x - beta / (1 - ab_t).sqrt() * eps) / (1 - beta).sqrt()
    var = beta * (1 - ab_s) / (1 - ab_t)
    expected = mean + var.sqrt() * z
    states, callback = recorder()
    ddpm(
        den,
        x,
        schedule,
        ts,
        generator=torch.Generator().manual_seed(8),
        callback=callback,
    )
    assert torch.allclose(states[0], expected, atol=1e-12)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_nfe_counted(name, steps):
    for schedule_name in ("linear", "flow"):
        schedule = build_schedule(schedule_name, 1000)
        ts = time_grid(schedule, get_sampler(name).default_grid, steps)
        calls = []
        states, callback = recorder()
        x = initial_sample(schedule, ts, torch.randn(4, *SHAPE))
        res = SAMPLERS[name].fn(
            gaussian_denoiser(schedule, calls),
            x,
            schedule,
            ts,
            generator=torch.Generator().manual_seed(0),
            callback=callback,
        )
        assert res.nfe == len(calls) == nfe_for(name, steps)
        assert list(states) == list(range(steps))
        assert torch.equal(states[steps - 1], res.x)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_multistep_from_alpha_zero(name):
    """A flow grid starting at t = 1 (l = -inf): finite, NFE = steps, close to the exact flow."""
    schedule = build_schedule("flow")
    ts = time_grid(schedule, "uniform", 40)
    noise = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(10), dtype=F64)
    calls = []
    x = initial_sample(schedule, ts, noise)
    res = SAMPLERS[name].fn(gaussian_denoiser(schedule, calls), x, schedule, ts)
    assert res.nfe == len(calls) == 40 and torch.isfinite(res.x).all()
    rms = (res.x - exact_flow(schedule, x, 1.0, 0.0)).pow(2).mean().sqrt().item()
    assert rms < 0.006, rms  # ddim (first order) gives 0.014 here


def test_heun_from_alpha_zero_saves_one_call():
    schedule = build_schedule("flow")
    ts = time_grid(schedule, "uniform", 6)  # starts at t = 1 where sigma_tilde = inf
    calls = []
    x = initial_sample(schedule, ts, torch.randn(4, *SHAPE))
    res = SAMPLERS["heun"].fn(gaussian_denoiser(schedule, calls), x, schedule, ts)
    assert res.nfe == len(calls) == nfe_for("heun", 6) - 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_steps_for_nfe_round_trip(name):
    for budget in range(nfe_for(name, 1), 30):
        steps = steps_for_nfe(name, budget)
        assert nfe_for(name, steps) <= budget < nfe_for(name, steps + 1)
    for steps in range(1, 30):
        assert steps_for_nfe(name, nfe_for(name, steps)) == steps
    with pytest.raises(ValueError, match=f"NFE budget >= {nfe_for(name, 1)}"):
        steps_for_nfe(name, nfe_for(name, 1) - 1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ddpm", {}),
        ("ddim", {"eta": 0.5}),
        ("euler", {"s_churn": 5.0}),
        ("heun", {"s_churn": 5.0, "s_noise": 1.003}),
        ("sde_pc", {}),
    ],
)
def test_stochastic_seeds(name, options):
    schedule = build_schedule("linear", 1000)
    ts = time_grid(schedule, "uniform", 10)
    noise = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(9))
    a = run(name, schedule, ts, noise, seed=1, **options).x
    b = run(name, schedule, ts, noise, seed=1, **options).x
    c = run(name, schedule, ts, noise, seed=2, **options).x
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_registry_and_errors():
    assert get_sampler("heun").nfe(10) == 19 and get_sampler("ddpm").stochastic
    with pytest.raises(ValueError, match="allowed: ddpm, ddim, euler, heun"):
        get_sampler("plms")
    schedule = build_schedule("linear", 1000)
    den, x = gaussian_denoiser(schedule), torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="lie in"):
        ddim(den, x, schedule, torch.tensor([1.5, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="strictly descending"):
        ddim(den, x, schedule, torch.tensor([0.5, 1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="start above t = 0"):
        ddim(den, x, schedule, torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="ascending grid"):
        ddim(den, x, schedule, torch.tensor([0.1, 0.5, 1.0], dtype=F64), eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        ddim(den, x, schedule, time_grid(schedule, "uniform", 3), eta=1.5)
    with pytest.raises(ValueError, match="s_churn >= 0"):
        euler(den, x, schedule, time_grid(schedule, "uniform", 3), s_churn=-1.0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        nfe_for("ddim", 0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_declared_options_are_the_functions_keywords(name):
    """The registry is the one declaration of sampler options: it must match each function."""
    import inspect

    info = SAMPLERS[name]
    params = inspect.signature(info.fn).parameters
    keywords = {
        p
        for p, v in params.items()
        if v.kind is v.KEYWORD_ONLY and p not in ("generator", "callback")
    }
    assert keywords == {o.name for o in info.options}
    for opt in info.options:
        default = params[opt.name].default
        assert opt.default == default or (opt.default is None and default == math.inf), opt.name
        assert opt.lo <= (opt.default if opt.default is not None else opt.lo) <= opt.hi


def test_sampler_options_are_declared_once():
    from mnistdiff.samplers import sampler_options, samplers_taking

    opts = sampler_options()
    assert set(opts) == {"eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "snr"}
    assert samplers_taking("eta") == ["ddim"] and samplers_taking("s_churn") == ["euler", "heun"]


@pytest.mark.parametrize("corrector_steps", [0, 1, 3])
def test_sde_pc_counts_corrector_calls(corrector_steps):
    """NFE = steps * (1 + corrector_steps): every Langevin step calls the model."""
    for schedule_name in ("cosine", "flow"):
        schedule = build_schedule(schedule_name, 1000)
        for kind in ("karras", "uniform"):  # uniform on flow starts at alpha = 0
            ts = time_grid(schedule, kind, 7)
            calls = []
            x = initial_sample(schedule, ts, torch.randn(4, *SHAPE))
            res = predictor_corrector(
                gaussian_denoiser(schedule, calls), x, schedule, ts, corrector_steps=corrector_steps
            )
            assert res.nfe == len(calls) == 7 * (1 + corrector_steps)
            assert torch.isfinite(res.x).all()
    assert nfe_for("sde_pc", 7) == 14  # the registered form: one corrector step per level


def test_sde_pc_corrector_repairs_a_wrong_start():
    """Langevin steps pull a start with the wrong spread back toward the true marginals."""
    schedule = build_schedule("cosine", 1000)
    ts = time_grid(schedule, "karras", 30)
    noise = 2.0 * torch.randn(4000, *SHAPE, generator=torch.Generator().manual_seed(3))
    errs = [
        abs(run("sde_pc", schedule, ts, noise, corrector_steps=m, snr=0.3).x.std().item() - S)
        for m in (0, 4)
    ]
    assert errs[1] < 0.5 * errs[0], errs


def test_sde_pc_bad_options():
    schedule = build_schedule("linear", 1000)
    den, x, ts = (
        gaussian_denoiser(schedule),
        torch.zeros(2, *SHAPE),
        time_grid(schedule, "uniform", 3),
    )
    with pytest.raises(ValueError, match="snr must be a finite number > 0"):
        get_sampler("sde_pc").fn(den, x, schedule, ts, snr=0.0)
    fn = predictor_corrector
    with pytest.raises(ValueError, match="corrector_steps must be an integer >= 0"):
        fn(den, x, schedule, ts, corrector_steps=-1)
    with pytest.raises(ValueError, match="corrector_steps must be an integer >= 0"):
        fn(den, x, schedule, ts, corrector_steps=1.5)
