import math

import pytest
import torch

from mnistdiff.schedules import (
    COSINE_S,
    DISCRETE_GRID_KINDS,
    FLOW_SIGMA_TILDE_MAX,
    GRID_KINDS,
    KARRAS_SIGMA_MAX,
    SCHEDULE_NAMES,
    build_schedule,
    sample_training_times,
    time_grid,
)

VP = ("linear", "cosine", "sigmoid")
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", VP)
@pytest.mark.parametrize("T", [10, 1000])
def test_vp_unit_variance_and_table_at_grid_points(name, T):
    s = build_schedule(name, T)
    t = torch.rand(3, 50, dtype=F64)
    a, sg = s.alpha_sigma(t)
    assert torch.allclose(a**2 + sg**2, torch.ones_like(t), atol=1e-12)
    grid = torch.arange(1, T + 1, dtype=F64) / T
    a, _ = s.alpha_sigma(grid)
    assert torch.allclose(a**2, s.alphas_cumprod, rtol=1e-12, atol=0)
    assert s.is_discrete and s.alphas_cumprod.dtype == F64 and s.alphas_cumprod.shape == (T,)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_log_snr_strictly_decreasing_and_inverse(name):
    s = build_schedule(name, 1000)
    t = torch.linspace(0, 1, 20001, dtype=F64)
    lam = s.log_snr(t)
    assert lam[0] == math.inf
    assert bool((lam[1:] < lam[:-1]).all())
    inner = torch.rand(1000, dtype=F64) * 0.998 + 0.001
    assert torch.allclose(s.t_from_log_snr(s.log_snr(inner)), inner, atol=1e-9)
    assert float(s.t_from_log_snr(torch.tensor(math.inf))) == 0.0
    assert float(s.t_from_log_snr(torch.tensor(-math.inf))) == 1.0


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_endpoints(name):
    s = build_schedule(name, 1000)
    a, sg = s.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))
    assert a[0] == 1.0 and sg[0] == 0.0
    if name == "flow":
        assert a[1] == 0.0 and sg[1] == 1.0
    else:
        assert a[1] ** 2 == pytest.approx(float(s.alphas_cumprod[-1]), rel=1e-12)
        assert 0 < a[1] < 0.01 and sg[1] > 0.9999


def test_flow_exact():
    s = build_schedule("flow")
    t = torch.rand(7, 3, dtype=F64)
    a, sg = s.alpha_sigma(t)
    assert torch.equal(a, 1 - t) and torch.equal(sg, t)
    assert torch.allclose(s.log_snr(t), 2 * torch.log((1 - t) / t))
    assert not s.is_discrete
    with pytest.raises(ValueError, match="no alphas_cumprod"):
        _ = s.alphas_cumprod


def test_linear_betas_scaled():
    for T in (1000, 250):
        ab = build_schedule("linear", T).alphas_cumprod
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
        scale = 1000 / T
        assert betas[0].item() == pytest.approx(scale * 1e-4, rel=1e-9)
        assert betas[-1].item() == pytest.approx(scale * 0.02, rel=1e-9)


def test_cosine_and_sigmoid_match_closed_forms():
    T = 1000
    t = torch.arange(1, T + 1, dtype=F64) / T

    def f(u):
        return torch.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

    cos_ab = f(t) / f(torch.zeros(1, dtype=F64))
    table = build_schedule("cosine", T).alphas_cumprod
    assert torch.allclose(table[:-1], cos_ab[:-1], atol=1e-9)  # last beta clipped at 0.999
    sig = torch.sigmoid
    sig_ab = (sig(torch.tensor(3.0)) - sig(6 * t - 3)) / (
        sig(torch.tensor(3.0)) - sig(torch.tensor(-3.0))
    )
    table = build_schedule("sigmoid", T).alphas_cumprod
    assert torch.allclose(table[:-1], sig_ab[:-1].to(F64), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_preserved(dtype):
    s = build_schedule("cosine")
    t = torch.rand(2, 3, 4, dtype=dtype)
    a, sg = s.alpha_sigma(t)
    assert a.shape == t.shape and a.dtype == dtype and sg.dtype == dtype
    assert s.alpha_sigma(torch.tensor(0.5))[0].shape == ()
    assert s.log_snr(t).dtype == dtype


def test_bad_names():
    with pytest.raises(ValueError, match="allowed: linear, cosine, sigmoid, flow"):
        build_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        build_schedule("linear", 0)


def test_training_times():
    s = build_schedule("linear", 50)
    g = torch.Generator().manual_seed(0)
    t = sample_training_times(s, 4096, g, "cpu")
    assert t.dtype == torch.float32 and t.shape == (4096,)
    idx = torch.round(t.double() * 50)
    assert torch.allclose(idx, t.double() * 50, atol=1e-4)
    assert int(idx.min()) == 1 and int(idx.max()) == 50
    again = sample_training_times(s, 4096, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(t, again)
    f = sample_training_times(build_schedule("flow"), 4096, g, "cpu")
    assert bool((f > 0).all() and (f <= 1).all()) and f.std() > 0.25


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_grids(name, kind, steps):
    s = build_schedule(name, 100)
    if name == "flow" and kind in DISCRETE_GRID_KINDS:
        with pytest.raises(ValueError, match="discrete schedule"):
            time_grid(s, kind, steps)
        return
    ts = time_grid(s, kind, steps)
    assert ts.dtype == F64 and ts.shape == (steps + 1,)
    assert bool((ts[1:] < ts[:-1]).all()) and ts[-1] == 0.0
    if kind == "karras":  # every schedule's sigma_tilde(1) exceeds the default bound of 80
        assert float(s.sigma_tilde(torch.tensor(1.0, dtype=F64))) > KARRAS_SIGMA_MAX
        assert float(s.sigma_tilde(ts[0])) == pytest.approx(KARRAS_SIGMA_MAX, rel=1e-9)
    elif name == "flow" and kind == "logsnr":  # starts below t = 1 (sigma_tilde = 80)
        expected_first = FLOW_SIGMA_TILDE_MAX / (1 + FLOW_SIGMA_TILDE_MAX)
        assert float(ts[0]) == pytest.approx(expected_first, rel=1e-9)
    elif kind == "leading" or (kind == "linspace" and steps == 1):
        assert float(ts[0]) < 1.0  # the flaw Lin et al. (2024) point out
    else:
        assert ts[0] == 1.0
    if kind in DISCRETE_GRID_KINDS:  # integer timesteps
        assert torch.allclose(ts * 100, torch.round(ts * 100), atol=1e-9)


def test_ddpm_spacings_match_lin_et_al_table2():
    s = build_schedule("linear", 1000)

    def idx(kind):  # 0-based timestep indices, as in diffusers
        return (time_grid(s, kind, 10)[:-1] * 1000 - 1).round().long().tolist()

    assert idx("leading") == list(range(900, -1, -100))
    assert idx("trailing") == list(range(999, 0, -100))
    assert idx("linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    full = time_grid(s, "trailing", 1000)
    assert torch.allclose(full[:-1], torch.arange(1000, 0, -1, dtype=F64) / 1000, atol=1e-15)


def test_continuous_grid_spacing():
    s = build_schedule("linear", 1000)
    lam = s.log_snr(time_grid(s, "logsnr", 12)[:-1])
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(11), rtol=1e-6)
    st = s.sigma_tilde(time_grid(s, "karras", 12, rho=5.0)[:-1]) ** (1 / 5)
    assert torch.allclose(st.diff(), st.diff()[:1].expand(11), rtol=1e-6)
    assert st[-1] ** 5 == pytest.approx(float(s.sigma_tilde(torch.tensor(1e-3, dtype=F64))))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("sigma_max", [2.0, 80.0, 1e3, math.inf])
def test_karras_sigma_max(name, sigma_max):
    s = build_schedule(name, 1000)
    full = time_grid(s, "karras", 12, sigma_max=math.inf)  # the schedule's whole range
    ts = time_grid(s, "karras", 12, rho=5.0, sigma_max=sigma_max)
    assert bool((ts[1:] < ts[:-1]).all()) and ts[-1] == 0.0 and ts.shape == (13,)
    st = s.sigma_tilde(ts[:-1])
    st_full = s.sigma_tilde(full[:-1])
    assert float(st[0]) == pytest.approx(min(float(st_full[0]), sigma_max), rel=1e-9)
    assert float(st[-1]) == pytest.approx(float(st_full[-1]), rel=1e-9)  # same cleanest point
    root = st ** (1 / 5)
    assert torch.allclose(root.diff(), root.diff()[:1].expand(11), rtol=1e-6)
    if sigma_max == math.inf and name != "flow":
        assert ts[0] == 1.0


def test_grid_errors():
    s = build_schedule("linear", 100)
    with pytest.raises(ValueError, match="allowed: uniform, logsnr, karras"):
        time_grid(s, "quadratic", 10)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        time_grid(s, "uniform", 0)
    with pytest.raises(ValueError, match="steps <= num_timesteps=100"):
        time_grid(s, "trailing", 101)
    with pytest.raises(ValueError, match="rho"):
        time_grid(s, "karras", 10, rho=0.0)
    for bad in (0.0, -1.0, math.nan, True, "80"):
        with pytest.raises(ValueError, match="sigma_max must be a number > 0"):
            time_grid(s, "karras", 10, sigma_max=bad)
    with pytest.raises(ValueError, match="sigma_max must be > the karras grid's smallest"):
        time_grid(s, "karras", 10, sigma_max=1e-3)
    with pytest.raises(ValueError, match="sigma_max applies only to the 'karras' grid"):
        time_grid(s, "logsnr", 10, sigma_max=80.0)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_training_times(mean, std):
    g = torch.Generator().manual_seed(0)
    f = sample_training_times(
        build_schedule("flow"), 20000, g, kind="logit_normal", logit_mean=mean, logit_std=std
    )
    logit = torch.logit(f.double())
    assert abs(logit.mean().item() - mean) < 0.03 and abs(logit.std().item() - std) < 0.03
    s = build_schedule("cosine", 50)
    d = sample_training_times(s, 20000, g, kind="logit_normal", logit_mean=mean, logit_std=std)
    idx = d.double() * 50
    assert torch.allclose(idx, torch.round(idx), atol=1e-4)
    assert int(torch.round(idx).min()) >= 1 and int(torch.round(idx).max()) <= 50
    # the discrete draw is the continuous one rounded up to the grid: same median
    assert abs(d.median().item() - torch.sigmoid(torch.tensor(mean)).item()) < 0.03


def test_training_times_bad_kind():
    with pytest.raises(ValueError, match="allowed: uniform, logit_normal"):
        sample_training_times(build_schedule("flow"), 4, None, kind="beta")
