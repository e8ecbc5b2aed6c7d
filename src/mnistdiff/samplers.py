"""Samplers: small pure functions of a denoise function and a time grid.

Every sampler has the signature
``fn(denoise, x, schedule, ts, *, generator=None, callback=None, **options) -> SampleResult``:

- ``denoise(x [B,C,H,W], t [B]) -> x0_hat``; it is called with ``t`` of ``x``'s dtype/device and is
  never evaluated at ``t = 0``. Samplers derive ``eps_hat = (x - alpha x0_hat) / sigma``, which is
  finite because ``sigma > 0`` for ``t > 0`` (also for flow at ``t = 1``, where ``alpha = 0``).
- ``x`` is the starting sample at ``ts[0]`` (see :func:`initial_sample`); ``ts`` is a descending
  float64 grid ending in 0.0, e.g. from :func:`mnistdiff.schedules.time_grid`. The last step
  (to ``t = 0``) returns the clean ``x0_hat``. Editing (``mnistdiff.edit``) also runs the
  samplers on parts of a grid: a descending grid may start at any ``t <= 1`` and end at any
  ``t >= 0`` (SDEdit, RePaint's step-by-step loop), and the deterministic samplers (``ddim``
  with ``eta = 0``, ``euler``, ``heun``) integrate the probability-flow ODE forward on a
  strictly ascending grid that starts above 0 (inversion).
- ``callback(i, x, x0_hat)`` is called once per step ``i`` with the state after the step (at
  ``ts[i + 1]``; the final call gets the result) and the step's (first) ``x0_hat``.
- Randomness comes only from ``generator`` (None means torch's default generator).
- ``SampleResult.nfe`` counts the denoise calls actually made.

Schedule coefficients are computed in float64 and applied as Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mnistdiff.schedules import Schedule

Denoise = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


@dataclass(frozen=True)
class SampleResult:
    """Output of a sampler: the final clean sample and the number of denoise calls made."""

    x: Tensor
    nfe: int


class _Counted:
    """Denoise function taking a float time; counts calls and builds the [B] time tensor."""

    def __init__(self, denoise: Denoise) -> None:
        self.denoise = denoise
        self.calls = 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        self.calls += 1
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        return self.denoise(x, t_batch)


class _Grid:
    """Validated grid with float64 times, alphas, sigmas and half log-SNRs as Python floats."""

    def __init__(self, schedule: Schedule, ts: Tensor) -> None:
        ts = torch.as_tensor(ts).detach().to("cpu", torch.float64)
        _check_grid(ts)
        alpha, sigma = schedule.alpha_sigma(ts)
        self.t, self.alpha, self.sigma = ts.tolist(), alpha.tolist(), sigma.tolist()
        self.half_lam = (0.5 * schedule.log_snr(ts)).tolist()
        self.steps = len(self.t) - 1


def _check_grid(ts: Tensor) -> None:
    """Strictly monotone times in [0, 1]; an ascending grid (inversion) must start above 0."""
    if ts.ndim != 1 or ts.numel() < 2:
        shape = tuple(ts.shape)
        raise ValueError(f"ts must be a 1-D grid with at least 2 entries, got shape {shape}")
    ascending = bool((ts[1:] > ts[:-1]).all())
    if not (ascending or bool((ts[1:] < ts[:-1]).all())):
        raise ValueError("ts must be strictly descending (sampling) or ascending (inversion)")
    if float(ts.min()) < 0.0 or float(ts.max()) > 1.0:
        raise ValueError(f"ts must lie in [0, 1], got {ts[0]:.6g} .. {ts[-1]:.6g}")
    if ascending and float(ts[0]) == 0.0:
        raise ValueError("an ascending grid must start above t = 0 (the model is not run at 0)")


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _emit(callback: Callback | None, i: int, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(i, x, x0)


def initial_sample(schedule: Schedule, ts: Tensor, noise: Tensor) -> Tensor:
    """Starting sample ``sigma(ts[0]) * noise`` for a grid ``ts`` (the signal part is dropped)."""
    _, sigma = schedule.alpha_sigma(torch.as_tensor(ts[0], dtype=torch.float64))
    return noise * float(sigma)


def _posterior_ratio(g: _Grid, i: int) -> float:
    """``r = alpha_t sigma_s / (alpha_s sigma_t) = exp(-(lam_s - lam_t) / 2)`` in [0, 1)."""
    return g.alpha[i] * g.sigma[i + 1] / (g.alpha[i + 1] * g.sigma[i])


def ddpm(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Ancestral sampling with the Gaussian posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2).

    For any pair of grid times s < t, with ``x_t = (alpha_t/alpha_s) x_s + sigma_{t|s} z``:
    mean ``= (alpha_t sigma_s^2 / (alpha_s sigma_t^2)) x_t + alpha_s (sigma_{t|s}^2 / sigma_t^2)
    x0_hat`` and variance ``sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (the "small" posterior variance).
    On the full ``trailing`` grid this is exact DDPM; it equals :func:`ddim` with ``eta = 1``.
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    for i in range(g.steps):
        x0 = f(x, g.t[i])
        if g.sigma[i + 1] == 0.0:
            x = x0
        else:
            r = _posterior_ratio(g, i)
            mean = (r * g.sigma[i + 1] / g.sigma[i]) * x + (g.alpha[i + 1] * (1.0 - r * r)) * x0
            x = mean + g.sigma[i + 1] * math.sqrt(1.0 - r * r) * _noise_like(x, generator)
        _emit(callback, i, x, x0)
    return SampleResult(x, f.calls)


def ddim(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> SampleResult:
    """DDIM (Song et al. 2021, eq. 12 with sigma from eq. 16), written for any (alpha, sigma).

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
    ``c = eta * sigma_s * sqrt(1 - r^2)``, ``r = alpha_t sigma_s / (alpha_s sigma_t)``.
    ``eta = 0`` is deterministic (and equals :func:`euler` in sigma_tilde space); ``eta = 1`` is the
    DDPM posterior (:func:`ddpm`).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    f, g = _Counted(denoise), _Grid(schedule, ts)
    if eta > 0.0 and g.t[1] > g.t[0]:
        raise ValueError("ddim with eta > 0 cannot run on an ascending grid; use eta = 0")
    for i in range(g.steps):
        x0 = f(x, g.t[i])
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        eps = (x - a_t * x0) / s_t
        c = 0.0 if eta == 0.0 else eta * s_s * math.sqrt(1.0 - _posterior_ratio(g, i) ** 2)
        x = a_s * x0 + math.sqrt(max(s_s * s_s - c * c, 0.0)) * eps
        if c > 0.0:
            x = x + c * _noise_like(x, generator)
        _emit(callback, i, x, x0)
    return SampleResult(x, f.calls)


def _karras(
    f: _Counted,
    x: Tensor,
    schedule: Schedule,
    g: _Grid,
    generator: torch.Generator | None,
    callback: Callback | None,
    churn: tuple[float, float, float, float],
    second_order: bool,
) -> Tensor:
    """Karras et al. 2022 Alg. 2 in ``x_tilde = x / alpha``, ``sigma_tilde = sigma / alpha``."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    st_max = float(schedule.sigma_tilde(torch.tensor(schedule.t_max, dtype=torch.float64)))
    for i in range(g.steps):
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if a_t == 0.0:  # sigma_tilde = inf (flow at t = 1): Euler step in x0/eps form, no churn
            x0 = f(x, g.t[i])
            x = a_s * x0 + s_s * (x / s_t)
            _emit(callback, i, x, x0)
            continue
        st, xt, t_hat, a_hat = s_t / a_t, x / a_t, g.t[i], a_t
        gamma = min(s_churn / g.steps, math.sqrt(2.0) - 1.0) if s_tmin <= st <= s_tmax else 0.0
        st_hat = min(st * (1.0 + gamma), st_max)  # never noisier than the schedule's t_max
        if st_hat > st:
            xt = xt + math.sqrt(st_hat**2 - st**2) * s_noise * _noise_like(x, generator)
            t_hat = float(schedule.t_from_sigma_tilde(torch.tensor(st_hat, dtype=torch.float64)))
            a_hat = float(schedule.alpha_sigma(torch.tensor(t_hat, dtype=torch.float64))[0])
        else:
            st_hat = st
        x0 = f(xt * a_hat, t_hat)
        if s_s == 0.0:  # last step to t = 0: the Euler step lands exactly on x0_hat
            x = x0
        elif a_s == 0.0:  # ascending to alpha = 0 (flow at t = 1): Euler step in eps form
            x = s_s * (xt - x0) / st_hat
        else:
            d = (xt - x0) / st_hat
            st_next = s_s / a_s
            xt_next = xt + (st_next - st_hat) * d
            if second_order:
                d2 = (xt_next - f(xt_next * a_s, g.t[i + 1])) / st_next
                xt_next = xt + (st_next - st_hat) * 0.5 * (d + d2)
            x = xt_next * a_s
        _emit(callback, i, x, x0)
    return x


def euler(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> SampleResult:
    """Euler in sigma_tilde space (Karras et al. 2022 Alg. 1 with Alg. 2's optional churn).

    ``x_tilde' = x_tilde + (sigma_tilde_s - sigma_tilde_hat) (x_tilde - x0_hat) / sigma_tilde_hat``.
    With ``s_churn > 0`` noise is first added to raise sigma_tilde by ``gamma = min(s_churn / N,
    sqrt(2) - 1)`` when ``s_tmin <= sigma_tilde <= s_tmax`` (never above the schedule's t = 1).
    A step from ``alpha = 0`` (flow at t = 1, sigma_tilde = inf) is taken in x0/eps form.
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    churn = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    x = _karras(f, x, schedule, g, generator, callback, churn, second_order=False)
    return SampleResult(x, f.calls)


def heun(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> SampleResult:
    """Heun's 2nd-order method in sigma_tilde space (Karras et al. 2022 Alg. 1/2, EDM sampler).

    Each step is an Euler step corrected by the trapezoid rule, except the last step to t = 0,
    which is an Euler step, so NFE = 2N - 1. Churn options as in :func:`euler`. A step starting
    at ``alpha = 0`` (flow at t = 1) has infinite length in sigma_tilde, so it is a single Euler
    step in x0/eps form (saving one NFE); ``karras``/``logsnr`` flow grids start below t = 1.
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    churn = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    x = _karras(f, x, schedule, g, generator, callback, churn, second_order=True)
    return SampleResult(x, f.calls)


def _check_churn(
    s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> tuple[float, float, float, float]:
    if s_churn < 0 or s_noise < 0 or s_tmin < 0 or s_tmax < s_tmin:
        raise ValueError(
            "need s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax; got "
            f"s_churn={s_churn}, s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}"
        )
    return float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)


def _phi(h: float) -> tuple[float, float, float]:
    """phi_1 = expm1(-h), phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 (series for small h)."""
    if math.isinf(h):
        return -1.0, 1.0, -0.5
    if abs(h) < 1e-4:
        return math.expm1(-h), h / 2 - h * h / 6 + h**3 / 24, -h / 6 + h * h / 24 - h**3 / 120
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    return phi1, phi2, phi2 / h - 0.5


def _dpmpp_multistep(
    f: _Counted, x: Tensor, g: _Grid, callback: Callback | None, order: int
) -> Tensor:
    """Data-prediction multistep exponential integrator in half log-SNR ``l = log(alpha/sigma)``.

    ``x_s = (sigma_s/sigma_t) x_t + alpha_s e^{-h} int_0^h e^u x0(l_t + u) du``, ``h = l_s - l_t``,
    with x0 interpolated through the last ``order`` predictions. History is only kept at finite
    ``l`` (flow at t = 1 has ``l = -inf``), so the first step after it is first order.
    """
    hist: list[tuple[float, Tensor]] = []  # (l, x0_hat), newest first
    for i in range(g.steps):
        x0 = f(x, g.t[i])
        l_t, a_s, s_s = g.half_lam[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_s == 0.0:  # final step to t = 0 is first order: x0_hat ("lower_order_final")
            x = x0
        else:
            h = g.half_lam[i + 1] - l_t
            phi1, phi2, phi3 = _phi(h)
            x = (s_s / g.sigma[i]) * x - (a_s * phi1) * x0
            if order == 2 and hist:  # Lu et al. 2022, Alg. 2: D = (1 + 1/2r) m0 - (1/2r) m1
                r = (l_t - hist[0][0]) / h
                x = x - (a_s * phi1 / (2.0 * r)) * (x0 - hist[0][1])
            elif order == 3 and hist:
                x = x + _third_order_terms(x0, l_t, hist, h, a_s, phi2, phi3)
        if math.isfinite(l_t):
            hist = [(l_t, x0), *hist][: order - 1]
        _emit(callback, i, x, x0)
    return x


def _third_order_terms(
    x0: Tensor,
    l_t: float,
    hist: list[tuple[float, Tensor]],
    h: float,
    a_s: float,
    phi2: float,
    phi3: float,
) -> Tensor:
    """Taylor terms ``alpha_s (h phi_2 x0' - h^2 phi_3 x0'')`` from divided differences."""
    h0 = l_t - hist[0][0]
    f01 = (x0 - hist[0][1]) / h0
    if len(hist) == 1:  # second-order warm-up step
        return (a_s * h * phi2) * f01
    h1 = hist[0][0] - hist[1][0]
    f012 = (f01 - (hist[0][1] - hist[1][1]) / h1) / (h0 + h1)  # ~ x0'' / 2
    return (a_s * h * phi2) * (f01 + h0 * f012) - (2.0 * a_s * h * h * phi3) * f012


def dpmpp_2m(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): 2nd-order data-prediction multistep in lambda.

    The first step is first order (no history) and so is the final step to t = 0, which returns
    x0_hat ("lower_order_final"). NFE = N. ``generator`` is unused (deterministic).
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    return SampleResult(_dpmpp_multistep(f, x, g, callback, order=2), f.calls)


def dpmpp_3m(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """DPM-Solver++(3M): 3rd-order data-prediction multistep (Lu et al. 2022, multistep variant).

    Chosen over DPM-Solver++(2S) because it needs one NFE per step. x0_hat is expanded to second
    order in lambda around the current time (Newton divided differences over the last three
    predictions, non-uniform steps allowed) and the exponential integral is taken exactly:
    ``x_s = (sigma_s/sigma_t) x_t - alpha_s (phi_1 x0 - h phi_2 x0' + h^2 phi_3 x0'')``.
    Derived here and verified to be third order by ``tests/test_samplers.py``. Warm-up: first
    step first order, second step second order; the final step to t = 0 returns x0_hat.
    NFE = N. Deterministic.
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    return SampleResult(_dpmpp_multistep(f, x, g, callback, order=3), f.calls)


def _unipc_weights(rs: list[float], phi: tuple[float, float, float]) -> list[float]:
    """UniPC weights ``w_m = B(h) a_m`` of the terms ``alpha_s w_m D_m / r_m``.

    With one difference ``a_1 = 1/2`` (the ``h -> 0`` limit of its order condition), so
    ``w_1 = B(h) / 2 = -phi1 / 2`` with "bh2" ``B(h) = 1 - e^{-h}``. With two, the order
    conditions ``sum_m w_m r_m^(k-1) = k! h phi_k+1(-h)`` for k = 1, 2 are solved exactly.
    """
    phi1, phi2, phi3 = phi
    if len(rs) == 1:
        return [-0.5 * phi1]
    (r1, r2), g1, g2 = rs, phi2, -2.0 * phi3  # g_k = k! h phi_k+1(-h) in _phi's terms
    w2 = (g2 - r1 * g1) / (r2 - r1)
    return [g1 - w2, w2]


def _unipc_step(
    base: Tensor,
    a_s: float,
    diffs: list[tuple[float, Tensor]],
    phi: tuple[float, float, float],
) -> Tensor:
    """``base + alpha_s sum_m w_m D_m / r_m`` for differences ``(r_m, D_m)``."""
    weights = _unipc_weights([r for r, _ in diffs], phi) if diffs else []
    for w, (r, d) in zip(weights, diffs, strict=True):
        base = base + (a_s * w / r) * d
    return base


def unipc(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """UniPC, "bh2" (Zhao et al. 2023, arXiv 2302.04867): UniP-2 predictor + UniC-2 corrector.

    Data-prediction multistep solver in half log-SNR ``l = log(alpha/sigma)``. A step from t to s
    (``h = l_s - l_t``) is ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) x0_t +
    alpha_s B(h) sum_m a_m D_m / r_m`` with ``B(h) = 1 - e^{-h}``, ``D_m = x0(l_m) - x0_t`` and
    ``r_m = (l_m - l_t) / h``. Matching the Taylor expansion of the exact solution
    ``x_s = (sigma_s/sigma_t) x_t + alpha_s int_0^h e^{u-h} x0(l_t + u) du`` gives the paper's
    order conditions ``sum_m a_m r_m^(k-1) = k! h phi_k+1(-h) / B(h)``, where ``phi_j`` are the
    exponential-integrator functions (``phi_1(z) = (e^z - 1)/z``,
    ``phi_j+1(z) = (phi_j(z) - 1/j!)/z``).

    - UniP-2 (predictor): one difference, to the previous grid point (``r_1 < 0``), with
      ``a_1 = 1/2`` (then the predictor coincides with DPM-Solver++(2M)).
    - UniC-2 (corrector): the model is evaluated at the predicted ``x_s`` -- an evaluation the
      next step needs anyway -- and the step is redone from ``x_t`` with the extra difference
      ``D = x0_s - x0_t`` (``r = 1``), solving the 2x2 order conditions exactly (``a = 1/2``
      alone in the first step). The corrected ``x_s`` is kept; ``x0_s`` (taken at the predicted
      point) is reused as the next step's model output, so NFE = N. This raises the order to 3
      (``tests/test_samplers.py`` measures 2.9).

    The first step is a first-order predictor (no history) plus a corrector; history is only
    kept at finite ``l``, so a step from ``alpha = 0`` (flow at t = 1) is a plain first-order
    step without corrector. The final step to t = 0 returns x0_hat ("lower_order_final") with no
    corrector. ``callback(i, ...)`` gets the corrected state after step ``i``, called once the
    corrector has run. Deterministic; ``generator`` is unused.
    """
    f, g = _Counted(denoise), _Grid(schedule, ts)
    x0 = f(x, g.t[0])
    hist: list[tuple[float, Tensor]] = []  # (l, x0_hat) at the previous grid point
    for i in range(g.steps):
        a_s, s_s, l_t = g.alpha[i + 1], g.sigma[i + 1], g.half_lam[i]
        if s_s == 0.0:  # final step to t = 0: x0_hat, no corrector
            _emit(callback, i, x0, x0)
            return SampleResult(x0, f.calls)
        h = g.half_lam[i + 1] - l_t
        phi = _phi(h)
        base = (s_s / g.sigma[i]) * x - (a_s * phi[0]) * x0
        prev = [((l_m - l_t) / h, x0_m - x0) for l_m, x0_m in hist]
        x_pred = _unipc_step(base, a_s, prev, phi)
        x0_next = f(x_pred, g.t[i + 1])
        if math.isfinite(l_t):
            x = _unipc_step(base, a_s, [*prev, (1.0, x0_next - x0)], phi)
            hist = [(l_t, x0)]
        else:  # from l = -inf the corrector's differences are undefined
            x = x_pred
        _emit(callback, i, x, x0)
        x0 = x0_next
    return SampleResult(x, f.calls)


def _langevin(
    f: _Counted, x: Tensor, g: _Grid, i: int, snr: float, generator: torch.Generator | None
) -> Tensor:
    """One Langevin corrector step at ``t = ts[i]`` (Song et al. 2021, Alg. 5).

    ``x <- x + e * score + sqrt(2 e) z`` with ``score = (alpha x0_hat - x) / sigma^2`` and the
    step ``e = 2 (snr * |z| / |score|)^2``, the norms averaged over the batch.
    """
    a_t, s_t = g.alpha[i], g.sigma[i]
    score = (a_t * f(x, g.t[i]) - x) / (s_t * s_t)
    z = _noise_like(x, generator)
    score_norm = score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = 2.0 * (snr * z.flatten(1).norm(dim=1).mean() / score_norm) ** 2
    return x + step * score + torch.sqrt(2.0 * step) * z


def _euler_maruyama(
    x: Tensor, x0: Tensor, g: _Grid, i: int, generator: torch.Generator | None
) -> Tensor:
    """One Euler-Maruyama step of the reverse SDE from ``ts[i]`` to ``ts[i + 1]``.

    In ``x_tilde = x / alpha`` with time ``u = sigma_tilde^2`` every schedule's forward SDE is
    ``d x_tilde = dw_u``, so the reverse SDE is ``d x_tilde = -grad log p_u du + dw_u`` with
    ``grad log p_u = (x0_hat - x_tilde) / u``. With ``rho = (sigma_tilde_s / sigma_tilde_t)^2``:
    ``x_tilde_s = rho x_tilde_t + (1 - rho) x0_hat + sigma_tilde_t sqrt(1 - rho) z``.
    """
    a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
    if s_s == 0.0:  # final step to t = 0: the noise-free x0_hat (Song et al.'s "denoise")
        return x0
    z = _noise_like(x, generator)
    if a_t == 0.0:  # sigma_tilde = inf: the SDE's noise integrates to infinity; posterior step
        return a_s * x0 + s_s * z
    rho = (s_s * a_t / (a_s * s_t)) ** 2
    return (
        (a_s * rho / a_t) * x
        + (a_s * (1.0 - rho)) * x0
        + (a_s * s_t / a_t) * (math.sqrt(1.0 - rho) * z)
    )


def predictor_corrector(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> SampleResult:
    """Reverse-SDE predictor-corrector sampler (Song et al. 2021, "Score-Based Generative
    Modeling through Stochastic Differential Equations", Alg. 1 "PC sampling").

    The score is ``grad log p_t(x) = (alpha_t x0_hat - x) / sigma_t^2`` (Tweedie). Every step
    ``i`` first runs ``corrector_steps`` Langevin MCMC steps at ``ts[i]`` (Alg. 5: step size
    ``e = 2 (snr |z| / |score|)^2`` with the norms averaged over the batch, as in the reference
    code: a step size set per example from its own norms depends on the state and biases the
    chain, badly in low dimension; a batch of images shares one step per level), then one
    Euler-Maruyama predictor step to ``ts[i + 1]`` on the reverse SDE (order as in the
    reference implementation: corrector, then predictor, so no corrector runs at t = 0).

    The predictor works in ``x_tilde = x / alpha`` with time ``sigma_tilde^2``, where every
    schedule (variance-preserving or flow) is the variance-exploding SDE ``d x_tilde = dw``
    (Karras et al. 2022, eq. 4): ``x_tilde_s = rho x_tilde_t + (1 - rho) x0_hat +
    sigma_tilde_t sqrt(1 - rho) z`` with ``rho = (sigma_tilde_s / sigma_tilde_t)^2``. Its mean
    is the DDPM posterior mean; its noise is ``1 / sqrt(rho)`` times the posterior's, the
    first-order error of Euler-Maruyama, which vanishes as the steps shrink. Large ratios of
    ``sigma_tilde`` between grid points therefore hurt, hence the bounded ``karras`` default
    grid. The final step to t = 0 returns x0_hat. A step from ``alpha = 0`` (flow at t = 1,
    where ``sigma_tilde`` is infinite) is the posterior step ``alpha_s x0_hat + sigma_s z``.

    NFE = ``steps * (1 + corrector_steps)``: every corrector step and every predictor step
    calls the model once. ``callback`` gets the state after the predictor and its x0_hat.

    Args:
        snr: Langevin signal-to-noise ratio ``r`` (> 0; the reference code's default 0.16).
        corrector_steps: Langevin steps per noise level (>= 0; 0 is plain Euler-Maruyama).
    """
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int):
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    f, g = _Counted(denoise), _Grid(schedule, ts)
    for i in range(g.steps):
        for _ in range(corrector_steps):
            x = _langevin(f, x, g, i, float(snr), generator)
        x0 = f(x, g.t[i])
        x = _euler_maruyama(x, x0, g, i, generator)
        _emit(callback, i, x, x0)
    return SampleResult(x, f.calls)


SamplerFn = Callable[..., SampleResult]


@dataclass(frozen=True)
class SamplerOption:
    """A keyword option of a sampler function, declared once in the registry.

    Config keys (``sample.<name>``), CLI flags (``--<name>``), :class:`mnistdiff.SampleOptions`
    fields and evaluation records are all derived from these declarations.

    Attributes:
        name: the sampler function's keyword argument.
        default: its default value; None means "not set" (the keyword is not passed, so the
            function's own default applies, e.g. an unbounded ``s_tmax``).
        lo: smallest allowed value (inclusive).
        hi: largest allowed value (inclusive).
        help: one line for ``--help`` and the config docs.
        adds_noise: a value above 0 makes the sampler draw noise (``eta``, ``s_churn``); 0 keeps
            it deterministic, as inversion needs (:mod:`mnistdiff.edit`).
    """

    name: str
    default: float | None
    lo: float
    hi: float
    help: str
    adds_noise: bool = False


@dataclass(frozen=True)
class SamplerInfo:
    """Registry entry.

    Attributes:
        fn: the sampler function.
        default_grid: ``time_grid`` kind to use when the caller does not choose one.
        stochastic: whether the sampler draws noise with its default options.
        nfe: steps -> denoise calls (for grids that start with alpha > 0).
        steps_for_nfe: budget -> the largest steps whose NFE fits.
        options: the keyword options ``fn`` takes beyond the common signature; any other
            sampler option given with this sampler is an error.
    """

    fn: SamplerFn
    default_grid: str
    stochastic: bool
    nfe: Callable[[int], int]
    steps_for_nfe: Callable[[int], int]
    options: tuple[SamplerOption, ...] = ()


def _identity(n: int) -> int:
    return n


def _heun_nfe(steps: int) -> int:
    return 2 * steps - 1


def sde_pc(
    denoise: Denoise,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    snr: float = 0.16,
) -> SampleResult:
    """The registered score-SDE sampler: :func:`predictor_corrector` with one Langevin
    corrector step per noise level (the paper's usual setting), so NFE = 2 * steps."""
    return predictor_corrector(
        denoise, x, schedule, ts, generator=generator, callback=callback, snr=snr
    )


def _heun_steps(nfe: int) -> int:
    return (nfe + 1) // 2


ETA = SamplerOption(
    "eta", 0.0, 0.0, 1.0, "DDIM stochasticity: 0 deterministic, 1 = DDPM", adds_noise=True
)
CHURN = (
    SamplerOption(
        "s_churn", 0.0, 0.0, 1000.0, "Karras churn: noise added per step (0 = ODE)", adds_noise=True
    ),
    SamplerOption("s_tmin", 0.0, 0.0, 1e6, "churn only where sigma_tilde >= s_tmin"),
    SamplerOption("s_tmax", None, 0.0, 1e6, "churn only where sigma_tilde <= s_tmax; null: any"),
    SamplerOption("s_noise", 1.0, 0.0, 10.0, "scale of the churn noise"),
)
SNR = SamplerOption("snr", 0.16, 1e-6, 100.0, "Langevin corrector signal-to-noise ratio")


def _two_per_step(steps: int) -> int:
    return 2 * steps


def _half(nfe: int) -> int:
    return nfe // 2


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(ddpm, "uniform", True, _identity, _identity),
    "ddim": SamplerInfo(ddim, "uniform", False, _identity, _identity, (ETA,)),
    "euler": SamplerInfo(euler, "karras", False, _identity, _identity, CHURN),
    "heun": SamplerInfo(heun, "karras", False, _heun_nfe, _heun_steps, CHURN),
    "dpmpp_2m": SamplerInfo(dpmpp_2m, "logsnr", False, _identity, _identity),
    "dpmpp_3m": SamplerInfo(dpmpp_3m, "logsnr", False, _identity, _identity),
    "unipc": SamplerInfo(unipc, "logsnr", False, _identity, _identity),
    "sde_pc": SamplerInfo(sde_pc, "karras", True, _two_per_step, _half, (SNR,)),
}


def sampler_options() -> dict[str, SamplerOption]:
    """Every option any registered sampler takes, by name (one declaration per name).

    Raises:
        ValueError: two samplers declare the same option name differently.
    """
    out: dict[str, SamplerOption] = {}
    for name, info in SAMPLERS.items():
        for opt in info.options:
            if out.setdefault(opt.name, opt) != opt:
                raise ValueError(
                    f"sampler {name!r} declares option {opt.name!r} unlike another sampler; "
                    "an option name must mean the same everywhere"
                )
    return out


def samplers_taking(option: str) -> list[str]:
    """Names of the registered samplers that take ``option``."""
    return [n for n, info in SAMPLERS.items() if any(o.name == option for o in info.options)]


def get_sampler(name: str) -> SamplerInfo:
    """Registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def nfe_for(name: str, steps: int) -> int:
    """Denoise calls sampler ``name`` makes with ``steps`` steps (grid starting at alpha > 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return get_sampler(name).nfe(steps)


def steps_for_nfe(name: str, nfe: int) -> int:
    """Largest number of steps whose NFE is <= ``nfe``; ValueError if even one step does not fit."""
    info = get_sampler(name)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < info.nfe(1):
        raise ValueError(f"sampler {name!r} needs an NFE budget >= {info.nfe(1)}, got {nfe!r}")
    return info.steps_for_nfe(nfe)
