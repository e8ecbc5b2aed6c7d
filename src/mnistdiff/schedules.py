"""Noise schedules as functions of continuous time, their DDPM tables, and sampling time grids.

Convention: ``x_t = alpha_t * x0 + sigma_t * eps`` for ``t`` in ``[0, 1]``; ``t = 0`` is clean data
and ``t = 1`` is (nearly) pure noise. The log-SNR ``lambda(t) = 2 log(alpha_t / sigma_t)`` is
strictly decreasing. Samplers also use ``sigma_tilde = sigma / alpha`` (Karras et al. 2022), which
is ``exp(-lambda / 2)``.

Discrete variance-preserving schedules (``linear``, ``cosine``, ``sigmoid``) own a DDPM table
``alphas_cumprod[i]`` for integer timesteps ``i = 0..T-1``, which sits at ``t = (i + 1) / T``.
Their continuous form interpolates ``log(alphas_cumprod)`` linearly in ``t`` between those grid
points (with ``alpha(0) = 1``), so it equals the table exactly at the grid points and is monotone.
``flow`` is rectified flow, ``alpha = 1 - t``, ``sigma = t`` (not variance preserving).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SCHEDULE_NAMES = ("linear", "cosine", "sigmoid", "flow")
GRID_KINDS = ("uniform", "logsnr", "karras", "leading", "trailing", "linspace")
DISCRETE_GRID_KINDS = ("leading", "trailing", "linspace")

#: Largest beta of any DDPM table (improved-DDPM clips the cosine betas here; we clip every table).
MAX_BETA = 0.999
#: Linear schedule betas for T = 1000 (Ho et al. 2020); scaled by 1000 / T otherwise.
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02
#: Cosine schedule offset s (Nichol & Dhariwal 2021).
COSINE_S = 0.008
#: Sigmoid schedule constants (Chen 2023, "On the importance of noise scheduling", Alg. 1; as in
#: Jabri et al. 2023): alpha_bar(t) = (v(end) - v(t (end - start) + start)) / (v(end) - v(start)),
#: v(z) = sigmoid(z / tau).
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0
#: sigma_tilde range of ``logsnr``/``karras`` grids for flow, whose sigma_tilde is infinite at t = 1
#: (EDM defaults, Karras et al. 2022).
FLOW_SIGMA_TILDE_MAX, FLOW_SIGMA_TILDE_MIN = 80.0, 0.002
#: Default upper sigma_tilde of ``karras`` grids (EDM's sigma_max, Karras et al. 2022, Table 1).
KARRAS_SIGMA_MAX = 80.0


def _to_float64(t: Tensor | float) -> tuple[Tensor, torch.dtype]:
    """Return ``t`` as float64 and the dtype results should be cast back to."""
    t = torch.as_tensor(t)
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    return t.to(torch.float64), out_dtype


class Schedule:
    """A noise schedule ``(alpha_t, sigma_t)`` of continuous time ``t`` in ``[0, 1]``.

    Attributes:
        name: schedule name (one of ``SCHEDULE_NAMES``).
        num_timesteps: number T of discrete training timesteps (flow keeps it for reference).
        is_discrete: True if the schedule owns a DDPM table ``alphas_cumprod``.
        t_max: largest time, 1.0.
    """

    t_max: float = 1.0

    def __init__(self, name: str, num_timesteps: int, is_discrete: bool) -> None:
        self.name = name
        self.num_timesteps = num_timesteps
        self.is_discrete = is_discrete

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_timesteps={self.num_timesteps})"

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Signal and noise scales at ``t`` (any shape/device; computed in float64, cast back)."""
        t64, dtype = _to_float64(t)
        alpha, sigma = self._alpha_sigma64(t64)
        return alpha.to(dtype), sigma.to(dtype)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``lambda(t) = 2 log(alpha / sigma)``; ``+inf`` at ``t = 0``."""
        t64, dtype = _to_float64(t)
        return self._log_snr64(t64).to(dtype)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr`; values outside the schedule's range clamp to ``[0, 1]``."""
        lam64, dtype = _to_float64(lam)
        return self._t_from_log_snr64(lam64).to(dtype)

    def sigma_tilde(self, t: Tensor | float) -> Tensor:
        """``sigma / alpha`` (Karras et al. 2022 noise level); ``inf`` where ``alpha = 0``."""
        t64, dtype = _to_float64(t)
        return torch.exp(-0.5 * self._log_snr64(t64)).to(dtype)

    def t_from_sigma_tilde(self, sigma_tilde: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_tilde`."""
        s64, dtype = _to_float64(sigma_tilde)
        return self._t_from_log_snr64(-2.0 * torch.log(s64)).to(dtype)

    @property
    def alphas_cumprod(self) -> Tensor:
        """DDPM table ``alpha_bar`` (float64 [T]); only for discrete schedules."""
        raise ValueError(f"schedule {self.name!r} is continuous and has no alphas_cumprod table")

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _log_snr64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _t_from_log_snr64(self, lam: Tensor) -> Tensor:
        raise NotImplementedError


class DiscreteSchedule(Schedule):
    """Variance-preserving schedule defined by a DDPM ``alphas_cumprod`` table.

    ``log(alpha_bar)`` is linear in ``t`` between the knots ``t = k / T`` (``k = 0..T``), with
    ``alpha_bar(0) = 1`` and ``alpha_bar((i + 1) / T) = alphas_cumprod[i]``.
    """

    def __init__(self, name: str, alphas_cumprod: Tensor) -> None:
        super().__init__(name, int(alphas_cumprod.numel()), is_discrete=True)
        self._table = alphas_cumprod.to(torch.float64).clone()
        zero = torch.zeros(1, dtype=torch.float64)
        self._knots = torch.cat([zero, torch.log(self._table)])  # [T+1], strictly decreasing
        self._knots_by_device: dict[torch.device, Tensor] = {}

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._table.clone()

    def _knots_on(self, device: torch.device) -> Tensor:
        if device not in self._knots_by_device:
            self._knots_by_device[device] = self._knots.to(device)
        return self._knots_by_device[device]

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        knots, n = self._knots_on(t.device), self.num_timesteps
        u = t.clamp(0.0, 1.0) * n
        k = u.floor().clamp(0, n - 1)
        lo, hi = knots[k.long()], knots[k.long() + 1]
        return lo + (u - k) * (hi - lo)

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab = self._log_alpha_bar(t)
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))

    def _log_snr64(self, t: Tensor) -> Tensor:
        log_ab = self._log_alpha_bar(t)
        return log_ab - torch.log(-torch.expm1(log_ab))

    def _t_from_log_snr64(self, lam: Tensor) -> Tensor:
        knots, n = self._knots_on(lam.device), self.num_timesteps
        log_ab = (-F.softplus(-lam)).clamp(float(knots[-1]), 0.0)  # log sigmoid(lam)
        k = torch.searchsorted(-knots, (-log_ab).contiguous(), right=True) - 1
        k = k.clamp(0, n - 1)
        lo, hi = knots[k], knots[k + 1]
        frac = ((log_ab - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (k.to(torch.float64) + frac) / n


class FlowSchedule(Schedule):
    """Rectified flow / linear interpolation: ``alpha = 1 - t``, ``sigma = t`` (Liu et al. 2022)."""

    def __init__(self, num_timesteps: int) -> None:
        super().__init__("flow", num_timesteps, is_discrete=False)

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - t, t.clone()

    def _log_snr64(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def _t_from_log_snr64(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * lam)


def _table_from_betas(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas.clamp(max=MAX_BETA), dim=0)


def _table_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int) -> Tensor:
    """Betas ``1 - ab(t_{i+1}) / ab(t_i)`` clipped at ``MAX_BETA`` (improved-DDPM construction)."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar(t)
    return _table_from_betas(1.0 - ab[1:] / ab[:-1])


def _linear_table(num_timesteps: int) -> Tensor:
    scale = 1000.0 / num_timesteps  # improved-DDPM scaling for T != 1000
    betas = torch.linspace(
        scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=torch.float64
    )
    return _table_from_betas(betas)


def _cosine_alpha_bar(t: Tensor) -> Tensor:
    f = torch.cos((t + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2)) ** 2
    return f / f[0]


def _sigmoid_alpha_bar(t: Tensor) -> Tensor:
    v_start = 1.0 / (1.0 + math.exp(-SIGMOID_START / SIGMOID_TAU))
    v_end = 1.0 / (1.0 + math.exp(-SIGMOID_END / SIGMOID_TAU))
    v_t = torch.sigmoid((t * (SIGMOID_END - SIGMOID_START) + SIGMOID_START) / SIGMOID_TAU)
    return ((v_end - v_t) / (v_end - v_start)).clamp(0.0, 1.0)


def build_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
    """Build a schedule by name.

    Args:
        name: one of ``linear`` (Ho et al. 2020), ``cosine`` (Nichol & Dhariwal 2021),
            ``sigmoid`` (Chen 2023), ``flow`` (rectified flow).
        num_timesteps: number T of discrete timesteps (>= 1).

    Returns:
        The schedule.

    Raises:
        ValueError: on an unknown name or a bad ``num_timesteps``.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if name == "linear":
        return DiscreteSchedule(name, _linear_table(num_timesteps))
    if name == "cosine":
        return DiscreteSchedule(name, _table_from_alpha_bar(_cosine_alpha_bar, num_timesteps))
    if name == "sigmoid":
        return DiscreteSchedule(name, _table_from_alpha_bar(_sigmoid_alpha_bar, num_timesteps))
    if name == "flow":
        return FlowSchedule(num_timesteps)
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")


TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_training_times(
    schedule: Schedule,
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    *,
    kind: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw training times (float32 [B]) using only ``generator``; t = 1 is pure noise.

    ``uniform``: discrete schedules draw ``t = (i + 1) / T`` with ``i`` uniform in ``{0..T-1}``;
    flow draws ``1 - U[0, 1)`` in ``(0, 1]``. ``logit_normal``: ``logit(t) ~ N(logit_mean,
    logit_std^2)``, concentrating training on intermediate noise levels (Esser et al. 2024, SD3,
    Sec. 3.1; a positive mean favours noisier times); discrete schedules round ``t`` up to the
    grid ``{1/T, .., 1}``. The model never sees t = 0.
    """
    if kind not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {kind!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    shape, f64, steps = (batch_size,), torch.float64, schedule.num_timesteps
    if kind == "uniform" and schedule.is_discrete:
        i = torch.randint(0, steps, shape, generator=generator, device=gen_device).to(f64)
        return ((i + 1.0) / steps).to(device=device, dtype=torch.float32)
    if kind == "uniform":
        t = 1.0 - torch.rand(shape, generator=generator, device=gen_device, dtype=f64)
    else:
        n = torch.randn(shape, generator=generator, device=gen_device, dtype=f64)
        t = torch.sigmoid(logit_mean + logit_std * n).clamp(min=1e-6)
    if schedule.is_discrete:
        t = torch.ceil(t * steps).clamp(1, steps) / steps
    return t.to(device=device, dtype=torch.float32)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _continuous_range(schedule: Schedule) -> tuple[float, float]:
    """(t_hi, t_lo): the noisiest and cleanest model times used by ``logsnr``/``karras`` grids."""
    if schedule.is_discrete:
        return 1.0, 1.0 / schedule.num_timesteps
    st = torch.tensor([FLOW_SIGMA_TILDE_MAX, FLOW_SIGMA_TILDE_MIN], dtype=torch.float64)
    t_hi, t_lo = schedule.t_from_sigma_tilde(st).tolist()
    return t_hi, t_lo


def _spaced_times(
    schedule: Schedule, kind: str, steps: int, rho: float, sigma_max: float
) -> Tensor:
    """``steps`` descending times from t_hi to t_lo, uniform in log-SNR or Karras-spaced.

    The ``karras`` grid starts at ``sigma_tilde = min(sigma_tilde(t_hi), sigma_max)``.
    """
    t_hi, t_lo = _continuous_range(schedule)
    lam_hi_noise, lam_lo_noise = schedule.log_snr(torch.tensor([t_hi, t_lo], dtype=torch.float64))
    frac = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if kind == "logsnr":
        lam = lam_hi_noise + frac * (lam_lo_noise - lam_hi_noise)
    else:  # karras: sigma_tilde^(1/rho) uniform
        s_max, s_min = torch.exp(-0.5 * lam_hi_noise), torch.exp(-0.5 * lam_lo_noise)
        if sigma_max < s_max:
            if not sigma_max > s_min:
                raise ValueError(
                    f"sigma_max must be > the karras grid's smallest sigma_tilde "
                    f"{float(s_min):.6g}, got {sigma_max!r}"
                )
            s_max = torch.tensor(sigma_max, dtype=torch.float64)
            t_hi = float(schedule.t_from_sigma_tilde(s_max))
        a, b = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
        lam = -2.0 * rho * torch.log(a + frac * (b - a))
    t = schedule.t_from_log_snr(lam)
    t[0] = t_hi
    if steps > 1:
        t[-1] = t_lo
    return t


def _discrete_times(schedule: Schedule, kind: str, steps: int) -> Tensor:
    """DDPM-style spacings of 1-based timesteps (Lin et al. 2024, Table 2) as t = k / T."""
    n = schedule.num_timesteps
    if not schedule.is_discrete:
        raise ValueError(f"grid kind {kind!r} needs a discrete schedule, got {schedule.name!r}")
    if steps > n:
        raise ValueError(f"grid kind {kind!r} allows steps <= num_timesteps={n}, got {steps}")
    k = torch.arange(steps, dtype=torch.float64)
    if kind == "leading":  # 1, 1 + T//S, ...
        idx = (k * (n // steps) + 1.0).flip(0)
    elif kind == "trailing":  # T, T - T/S, ... (rounded)
        idx = torch.floor(n - k * (n / steps) + 0.5)
    else:  # linspace: round(linspace(1, T, S))
        idx = torch.floor(torch.linspace(1.0, n, steps, dtype=torch.float64) + 0.5).flip(0)
    return idx / n


def time_grid(
    schedule: Schedule,
    kind: str,
    steps: int,
    *,
    rho: float = 7.0,
    sigma_max: float | None = None,
) -> Tensor:
    """Descending sampling times (float64 [steps + 1]) ending with 0.0 ("return x0_hat").

    Kinds:
        ``uniform``: uniform in t from 1 to 0.
        ``logsnr``: uniform in log-SNR from t_hi to t_lo, then 0.
        ``karras``: ``sigma_tilde^(1/rho)`` uniform from ``min(sigma_tilde(t_hi), sigma_max)``
            down to ``sigma_tilde(t_lo)`` (Karras et al. 2022, eq. 5), then 0.
        ``leading``/``trailing``/``linspace``: DDPM timestep spacings of Lin et al. 2024 (Table 2),
            discrete schedules only; ``trailing`` with ``steps == T`` visits every timestep.

    t_hi = 1 and t_lo = 1 / T for discrete schedules. For flow (infinite ``sigma_tilde`` at t = 1)
    ``logsnr`` and ``karras`` run over ``sigma_tilde`` in ``[0.002, 80]`` (EDM), so they start just
    below t = 1. ``leading`` (and ``linspace`` with one step) do not start at t = 1 either: that is
    the flaw Lin et al. point out, kept for comparison. ``uniform``, ``trailing``, ``linspace``
    (steps > 1) and ``logsnr`` on discrete schedules start at exactly 1.0.

    Why ``karras`` is bounded by default: a discrete schedule's ``sigma_tilde(1)`` is 157
    (linear), 1.8e3 (sigmoid) or 2e4 (cosine) for T = 1000, and with ``rho = 7`` most of the grid
    is then spent at noise levels where x0_hat barely changes. On a 10-minute cosine/eps model
    (guidance 2, 100 samples) bounding at 80 raised Heun's class accuracy at 9 NFE from 11% to
    99% and Euler's at 10 NFE from 82% to 95%. 80 is EDM's sigma_max: there
    ``alpha = 1/sqrt(1 + 80^2) ~ 0.0125``, so the signal ``alpha x0`` that
    :func:`mnistdiff.samplers.initial_sample` drops (it starts from ``sigma * noise``) is at most
    1.25% of the unit noise for data in [-1, 1], and the Gaussian sampler tests still hit their
    target moments.

    Args:
        schedule: the noise schedule.
        kind: one of ``GRID_KINDS``.
        steps: number of steps (>= 1); the grid has ``steps + 1`` entries.
        rho: ``karras`` spacing exponent (> 0; EDM uses 7).
        sigma_max: ``karras`` only: upper bound on the first point's ``sigma_tilde`` (> the grid's
            smallest ``sigma_tilde``). None means ``KARRAS_SIGMA_MAX`` (80); ``math.inf`` keeps the
            schedule's full range (t_hi). It never raises the start above t_hi.

    Raises:
        ValueError: unknown kind, ``steps < 1``, ``rho <= 0``, ``sigma_max`` out of range or given
            for a kind other than ``karras``, a discrete kind on flow, or ``steps > T`` for a
            discrete kind.
    """
    _check_steps(steps)
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; allowed: {', '.join(GRID_KINDS)}")
    if sigma_max is not None and kind != "karras":
        raise ValueError(f"sigma_max applies only to the 'karras' grid, got kind {kind!r}")
    if kind == "uniform":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if kind in DISCRETE_GRID_KINDS:
        t = _discrete_times(schedule, kind, steps)
    else:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        bound = KARRAS_SIGMA_MAX if sigma_max is None else sigma_max
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"sigma_max must be a number > 0 (or None), got {sigma_max!r}")
        t = _spaced_times(schedule, kind, steps, rho, float(bound))
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])
