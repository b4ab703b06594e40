"""VIX-anchored implied-volatility surface (variance term structure + SSVI smile) and a bid/ask model.

Owns the pure maths behind the synthetic SPY chain (reference: shared/reference/vol-surface.md):

1. **Term structure.** Expected total variance of a variance swap under mean-reverting variance,
   ``W(T) = θ̄·T + (v0 − θ̄)·(1 − e^{−κT})/κ``, with ``v0`` chosen so that ``W(30/365)`` equals
   the 30-day variance ``(VIX/100)²·30/365`` exactly (``v0`` clamped to a small positive floor).
   κ is the slow *risk-neutral* speed (default 2/yr), not the fast historical one.
2. **Smile.** SSVI (Gatheral & Jacquier 2014): ``w(k) = θ/2·(1 + ρφk + √((φk+ρ)² + 1 − ρ²))`` with
   ``k = ln(K/F)``, ATM total variance θ and power-law ``φ(θ) = η/(θ^γ (1+θ)^{1−γ})``.
   Short-expiry skew floor: the skew of a power-law SSVI keeps steepening like T^{−½} as T → 0;
   it is observed to stop doing so at a few days, so for ``T < T_f`` (``skew_floor_days``, 5 days)
   φ is evaluated at the ATM variance *rate* times ``T_f`` instead of times T, i.e. at
   ``θ·s`` with ``s = T_f/T`` (capped at ``MAX_SKEW_FLOOR_RATIO``). Why this stays free of static
   arbitrage: for a fixed ``s`` the family ``θ ↦ (θ, φ(θ·s))`` satisfies the Gatheral–Jacquier
   calendar conditions because it is the power law reparametrised (``d(θφ)/dθ`` equals the power
   law's at ``θ·s``), and φ(θ·s) ≤ φ(θ) keeps the butterfly conditions. Across T inside the floor
   region ``θφ`` grows like θ as long as the ATM variance rate changes slowly with T, which the
   Heston-type ``W(T)`` guarantees at a few days; ``tests/test_vol_surface.py`` checks
   ``w(k, T)`` non-decreasing in T on a dense (k, T) grid across the floor.
3. **Solving θ_T.** Per expiry θ_T is set so that the slice's variance-swap value
   ``2∫ e^{−k}·OTM(k) dk`` (undiscounted, per unit forward) equals ``W(T)``. The variance swap of an
   SSVI slice depends only on (θ, s) and (ρ, η, γ), so the map is tabulated once per parameter set
   on a (ln θ, ln s) grid and inverted by table look-up: O(1) per (bar, expiry), no root finding
   in the hot path.
4. **Bid/ask.** ``half = max(min_half, a + b·mid)·(VIX/vix_ref)^c·(1 + DTE/365)·L(z)`` with a
   liquidity factor ``L(z) = 1 + liquidity_slope·max(0, |z| − liquidity_free_sd)`` in the
   standardised log-moneyness ``z = k/√θ_T``: quotes are tightest within one ATM standard deviation
   and widen for far-OTM wings and deep-ITM strikes. The bid is rounded down and the ask up to the
   $0.01 tick; bid ≥ 0; bid = 0 when the model price is below ``zero_bid_below``; ask − bid ≥ one
   tick. Parameters are practitioner ranges [T], not measurements.

Everything here is stateless. The ``@njit`` scalar helpers (``ssvi_total_variance_scalar``,
``atm_total_variance_scalar``, ``quote_bid_ask_scalar``, …) are what the chain kernel in
``data_factory.option_chain`` inlines; the NumPy-facing functions wrap them for analysis and tests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from numba import njit

from analytics.black_scholes import norm_cdf

MINUTES_PER_YEAR = 525_600.0
VIX_TENOR_YEARS = 30.0 / 365.0
MIN_INITIAL_VARIANCE = 1e-4          # v0 floor: a 1 % instantaneous vol
MAX_SKEW_FLOOR_RATIO = 1e4           # s = T_f/T is capped here (T below ~0.7 minutes for a 5-day floor)

# Variance-swap table grid: ln θ from 1e-10 (1 % vol for under a minute) to 16 (200 % vol for 4 years).
_TABLE_LN_THETA_MIN = math.log(1e-10)
_TABLE_LN_THETA_MAX = math.log(16.0)
_TABLE_LN_THETA_STEP = 0.1
_TABLE_LN_S_STEP = 0.1
# Quadrature in k = √θ·sinh(v): dense near the money, reaching ±120 ATM standard deviations.
_QUAD_V_MAX = 5.5
_QUAD_HALF_INTERVALS = 200


@dataclass(frozen=True)
class SurfaceParams:
    """Parameters of the VIX-anchored surface (defaults from the reference, tagged [T]/[S] there).

    long_run_variance: θ̄, the long-run variance (0.195², a long-run VIX of 19.5).
    mean_reversion: κ per year, risk-neutral (slow, 1–4).
    rho, eta, gamma: SSVI correlation and power-law curvature; the constructor enforces the
        sufficient no-butterfly-arbitrage condition 0 < γ ≤ ½ and η(1+|ρ|) ≤ 2.
    skew_floor_days: T used in φ is floored at this many days (skew stops steepening).
    """

    long_run_variance: float = 0.195 ** 2
    mean_reversion: float = 2.0
    rho: float = -0.7
    eta: float = 1.0
    gamma: float = 0.5
    skew_floor_days: float = 5.0

    def __post_init__(self) -> None:
        checks = [
            (self.long_run_variance > 0, "long_run_variance must be > 0"),
            (self.mean_reversion > 0, "mean_reversion must be > 0 (per year)"),
            (-1.0 < self.rho < 1.0, "rho must lie in (-1, 1)"),
            (self.eta > 0, "eta must be > 0"),
            (0.0 < self.gamma <= 0.5, "gamma must lie in (0, 0.5] (power-law no-arbitrage condition)"),
            (self.eta * (1.0 + abs(self.rho)) <= 2.0 + 1e-12,
             "eta*(1+|rho|) must be <= 2 (power-law no-butterfly-arbitrage condition)"),
            (self.skew_floor_days >= 0, "skew_floor_days must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SurfaceParams: {message} (got {asdict(self)})")

    @property
    def skew_floor_years(self) -> float:
        return self.skew_floor_days / 365.0


@dataclass(frozen=True)
class SpreadParams:
    """Half-spread model ``max(min_half, a + b·mid)·(VIX/vix_reference)^vix_exponent·(1+DTE/365)·L(z)``.

    Defaults are set against the reference's practitioner targets [T]: ATM ≤ 45 DTE $0.01–0.03,
    60–120 DTE ATM $0.03–0.10, LEAPS $0.10–0.50, ×2–4 when VIX > 30.
    """

    a: float = 0.001
    b: float = 0.0015
    # The mid itself grows about linearly with VIX, so c = ½ gives ATM spreads ≈ (VIX/15)^1.5 wider:
    # ×2.8 at VIX 30, inside the ×2–4 target.
    vix_exponent: float = 0.5
    vix_reference: float = 15.0
    min_half: float = 0.005
    liquidity_slope: float = 0.15
    liquidity_free_sd: float = 1.0
    zero_bid_below: float = 0.02
    tick: float = 0.01

    def __post_init__(self) -> None:
        for name in ("a", "b", "vix_exponent", "liquidity_slope", "liquidity_free_sd", "zero_bid_below"):
            if getattr(self, name) < 0:
                raise ValueError(f"SpreadParams: {name} must be >= 0 (got {getattr(self, name)})")
        for name in ("vix_reference", "min_half", "tick"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SpreadParams: {name} must be > 0 (got {getattr(self, name)})")


# ----------------------------------------------------------------------------------------------
# Term structure
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def initial_variance_scalar(iv_index: float, long_run_variance: float, mean_reversion: float) -> float:
    kt = mean_reversion * VIX_TENOR_YEARS
    target = (iv_index * 0.01) ** 2
    v0 = long_run_variance + (target - long_run_variance) * kt / (1.0 - math.exp(-kt))
    return max(v0, MIN_INITIAL_VARIANCE)


@njit(cache=True, inline="always")
def variance_swap_total_variance_scalar(t_years: float, v0: float, long_run_variance: float,
                                        mean_reversion: float) -> float:
    # -expm1 keeps (1 − e^{−κT})/κ accurate for minutes-long T.
    return long_run_variance * t_years + (v0 - long_run_variance) * (-math.expm1(-mean_reversion * t_years)) / mean_reversion


def initial_variance(iv_index, params: SurfaceParams = SurfaceParams()) -> np.ndarray:
    """v0 (annual variance) that makes W(30/365) equal the 30-day variance ``(VIX/100)²``."""
    vix = np.asarray(iv_index, dtype=float)
    kt = params.mean_reversion * VIX_TENOR_YEARS
    v0 = params.long_run_variance + ((vix / 100.0) ** 2 - params.long_run_variance) * kt / (-np.expm1(-kt))
    return np.maximum(v0, MIN_INITIAL_VARIANCE)


def variance_swap_term_structure(t_years, iv_index, params: SurfaceParams = SurfaceParams()) -> np.ndarray:
    """Total variance W(T) of a variance swap to T years, anchored on the 30-day IV index (broadcasts)."""
    t = np.asarray(t_years, dtype=float)
    v0 = initial_variance(iv_index, params)
    theta_bar, kappa = params.long_run_variance, params.mean_reversion
    return theta_bar * t + (v0 - theta_bar) * (-np.expm1(-kappa * t)) / kappa


# ----------------------------------------------------------------------------------------------
# SSVI smile
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def skew_floor_ratio_scalar(t_years: float, skew_floor_years: float) -> float:
    """s = T_f/T clipped to [1, MAX_SKEW_FLOOR_RATIO]: the factor applied to θ inside φ."""
    if t_years >= skew_floor_years:
        return 1.0
    return min(skew_floor_years / t_years, MAX_SKEW_FLOOR_RATIO)


@njit(cache=True, inline="always")
def power_law_phi_scalar(theta_for_phi: float, eta: float, gamma: float) -> float:
    return eta / (theta_for_phi ** gamma * (1.0 + theta_for_phi) ** (1.0 - gamma))


@njit(cache=True, inline="always")
def ssvi_total_variance_scalar(k: float, theta: float, phi: float, rho: float) -> float:
    pk = phi * k
    return 0.5 * theta * (1.0 + rho * pk + math.sqrt((pk + rho) ** 2 + 1.0 - rho * rho))


def power_law_phi(theta, params: SurfaceParams = SurfaceParams(), t_years=None) -> np.ndarray:
    """φ used by the surface; with ``t_years`` the short-expiry skew floor is applied."""
    theta = np.asarray(theta, dtype=float)
    if t_years is not None:
        t = np.asarray(t_years, dtype=float)
        floor = params.skew_floor_years
        ratio = np.where(t >= floor, 1.0, np.minimum(floor / np.maximum(t, 1e-300), MAX_SKEW_FLOOR_RATIO))
        theta = theta * ratio
    return params.eta / (theta ** params.gamma * (1.0 + theta) ** (1.0 - params.gamma))


def ssvi_total_variance(k, theta, phi, rho: float) -> np.ndarray:
    """SSVI total implied variance w(k) for log-moneyness k = ln(K/F) (broadcasts)."""
    pk = np.asarray(phi, dtype=float) * np.asarray(k, dtype=float)
    return 0.5 * np.asarray(theta, dtype=float) * (1.0 + rho * pk + np.sqrt((pk + rho) ** 2 + 1.0 - rho * rho))


# ----------------------------------------------------------------------------------------------
# Variance swap of an SSVI slice, tabulated and inverted
# ----------------------------------------------------------------------------------------------

@njit(cache=True)
def _ssvi_variance_swap_over_theta(theta: float, phi: float, rho: float) -> float:
    """Variance-swap total variance of one slice divided by θ: 2∫e^{−k}·OTM(k)dk / θ.

    OTM(k) is the undiscounted Black price per unit forward of the out-of-the-money option at
    k = ln(K/F). Composite Simpson in v with k = √θ·sinh(v) on each side of k = 0 (the integrand has
    a kink there, where puts hand over to calls).
    """
    scale = math.sqrt(theta)
    h = _QUAD_V_MAX / _QUAD_HALF_INTERVALS
    total = 0.0
    for side in (-1.0, 1.0):
        acc = 0.0
        for i in range(_QUAD_HALF_INTERVALS + 1):
            v = side * i * h
            k = scale * math.sinh(v)
            jac = scale * math.cosh(v)
            w = ssvi_total_variance_scalar(k, theta, phi, rho)
            sqrt_w = math.sqrt(w)
            d1 = -k / sqrt_w + 0.5 * sqrt_w
            d2 = d1 - sqrt_w
            if side < 0.0:   # puts, k ≤ 0: e^{−k}·P = N(−d2) − e^{−k}N(−d1)
                f = norm_cdf(-d2) - math.exp(-k) * norm_cdf(-d1)
            else:            # calls, k ≥ 0: e^{−k}·C = e^{−k}N(d1) − N(d2)
                f = math.exp(-k) * norm_cdf(d1) - norm_cdf(d2)
            weight = 1.0 if (i == 0 or i == _QUAD_HALF_INTERVALS) else (4.0 if i % 2 == 1 else 2.0)
            acc += weight * max(f, 0.0) * jac
        total += acc * h / 3.0
    return 2.0 * total / theta


def ssvi_variance_swap(theta: float, phi: float, rho: float) -> float:
    """Variance-swap total variance ``2∫e^{−k}·OTM(k)dk`` of one SSVI slice (θ, φ, ρ)."""
    return float(_ssvi_variance_swap_over_theta(float(theta), float(phi), float(rho))) * float(theta)


@njit(cache=True)
def _variance_swap_ratio_grid(ln_theta: np.ndarray, ln_s: np.ndarray, rho: float, eta: float,
                              gamma: float) -> np.ndarray:
    ratio = np.empty((ln_s.size, ln_theta.size))
    for iy in range(ln_s.size):
        s = math.exp(ln_s[iy])
        for ix in range(ln_theta.size):
            theta = math.exp(ln_theta[ix])
            phi = power_law_phi_scalar(theta * s, eta, gamma)
            ratio[iy, ix] = _ssvi_variance_swap_over_theta(theta, phi, rho)
    return ratio


@dataclass(frozen=True)
class VarianceSwapTable:
    """ln θ as a function of (ln W, ln s) on a uniform grid: the inverse of θ ↦ varswap(θ, s).

    ``ln_theta[iy, iz]`` is the ATM total variance whose slice (with skew-floor ratio
    s = e^{ln_s0 + iy·ln_s_step}) has variance-swap total variance e^{ln_w0 + iz·ln_w_step}.
    Outside the W range the look-up extrapolates with slope 1 (the ratio W/θ held at the edge).
    """

    ln_w0: float
    ln_w_step: float
    ln_s0: float
    ln_s_step: float
    ln_theta: np.ndarray


@lru_cache(maxsize=8)
def variance_swap_table(rho: float, eta: float, gamma: float) -> VarianceSwapTable:
    """Build (once per parameter set, about 1 s) the inverse variance-swap table for SSVI (ρ, η, γ)."""
    ln_theta_grid = np.arange(_TABLE_LN_THETA_MIN, _TABLE_LN_THETA_MAX + 1e-9, _TABLE_LN_THETA_STEP)
    n_s = int(math.ceil(math.log(MAX_SKEW_FLOOR_RATIO) / _TABLE_LN_S_STEP)) + 1
    ln_s_grid = np.arange(n_s) * _TABLE_LN_S_STEP
    ratio = _variance_swap_ratio_grid(ln_theta_grid, ln_s_grid, rho, eta, gamma)
    ln_w_rows = ln_theta_grid[None, :] + np.log(ratio)
    if not np.all(np.diff(ln_w_rows, axis=1) > 0):
        raise ValueError(f"variance swap not increasing in θ for rho={rho}, eta={eta}, gamma={gamma}: "
                         "the SSVI parameters admit calendar arbitrage")
    ln_w0 = float(ln_w_rows[:, 0].max())
    ln_w_end = float(ln_w_rows[:, -1].min())
    ln_w_grid = np.arange(ln_w0, ln_w_end, _TABLE_LN_THETA_STEP)
    inverse = np.empty((n_s, ln_w_grid.size))
    for iy in range(n_s):
        inverse[iy] = np.interp(ln_w_grid, ln_w_rows[iy], ln_theta_grid)
    inverse.setflags(write=False)
    return VarianceSwapTable(ln_w0, _TABLE_LN_THETA_STEP, 0.0, _TABLE_LN_S_STEP, inverse)


@njit(cache=True, inline="always")
def atm_total_variance_scalar(varswap_total: float, skew_ratio: float, ln_w0: float, ln_w_step: float,
                              ln_s0: float, ln_s_step: float, table: np.ndarray) -> float:
    """θ_T for a slice whose variance swap must equal ``varswap_total`` (bilinear table look-up)."""
    n_s, n_w = table.shape
    ln_w = math.log(varswap_total)
    fz = (ln_w - ln_w0) / ln_w_step
    fz_clamped = min(max(fz, 0.0), n_w - 1.000001)
    iz = int(fz_clamped)
    wz = fz_clamped - iz
    fy = min(max((math.log(skew_ratio) - ln_s0) / ln_s_step, 0.0), n_s - 1.000001)
    iy = int(fy)
    wy = fy - iy
    lower = table[iy, iz] * (1.0 - wz) + table[iy, iz + 1] * wz
    upper = table[iy + 1, iz] * (1.0 - wz) + table[iy + 1, iz + 1] * wz
    ln_theta = lower * (1.0 - wy) + upper * wy + (fz - fz_clamped) * ln_w_step
    return math.exp(ln_theta)


@njit(cache=True)
def _atm_total_variance_many(t_years, iv_index, long_run_variance, mean_reversion, skew_floor_years,
                             ln_w0, ln_w_step, ln_s0, ln_s_step, table):
    out = np.empty(t_years.size)
    for i in range(t_years.size):
        v0 = initial_variance_scalar(iv_index[i], long_run_variance, mean_reversion)
        w_t = variance_swap_total_variance_scalar(t_years[i], v0, long_run_variance, mean_reversion)
        s = skew_floor_ratio_scalar(t_years[i], skew_floor_years)
        out[i] = atm_total_variance_scalar(w_t, s, ln_w0, ln_w_step, ln_s0, ln_s_step, table)
    return out


def atm_total_variance(t_years, iv_index, params: SurfaceParams = SurfaceParams()) -> np.ndarray:
    """θ_T, the ATM total variance whose SSVI slice prices a variance swap at W(T) (broadcasts)."""
    t, vix = np.broadcast_arrays(np.asarray(t_years, dtype=float), np.asarray(iv_index, dtype=float))
    if np.any(~(t > 0)):
        raise ValueError("atm_total_variance: t_years must be > 0")
    if np.any(~(vix > 0)):
        raise ValueError("atm_total_variance: iv_index must be > 0 (VIX points)")
    tab = variance_swap_table(params.rho, params.eta, params.gamma)
    flat = _atm_total_variance_many(np.ascontiguousarray(t).ravel(), np.ascontiguousarray(vix).ravel(),
                                    params.long_run_variance, params.mean_reversion,
                                    params.skew_floor_years, tab.ln_w0, tab.ln_w_step, tab.ln_s0,
                                    tab.ln_s_step, tab.ln_theta)
    return flat.reshape(t.shape)


def implied_volatility_surface(log_moneyness, t_years, iv_index,
                               params: SurfaceParams = SurfaceParams()) -> np.ndarray:
    """σ(k, T) in decimals for k = ln(K/F_T), T in years, anchored on the IV index (broadcasts)."""
    k, t, vix = np.broadcast_arrays(np.asarray(log_moneyness, dtype=float),
                                    np.asarray(t_years, dtype=float), np.asarray(iv_index, dtype=float))
    theta = atm_total_variance(t, vix, params)
    phi = power_law_phi(theta, params, t_years=t)
    return np.sqrt(ssvi_total_variance(k, theta, phi, params.rho) / t)


# ----------------------------------------------------------------------------------------------
# Bid/ask
# ----------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def quote_half_spread_scale_scalar(iv_index: float, dte: float, vix_exponent: float,
                                   vix_reference: float) -> float:
    """The per-expiry factor ``(VIX/vix_ref)^c·(1 + DTE/365)`` of the half-spread."""
    return (iv_index / vix_reference) ** vix_exponent * (1.0 + dte / 365.0)


@njit(cache=True, inline="always")
def quote_half_spread_from_scale(mid: float, scale: float, standardized_moneyness: float, a: float,
                                 b: float, min_half: float, liquidity_slope: float,
                                 liquidity_free_sd: float) -> float:
    """The per-option half-spread given the per-expiry ``scale`` (split so kernels hoist the pow)."""
    liquidity = 1.0 + liquidity_slope * max(0.0, abs(standardized_moneyness) - liquidity_free_sd)
    return max(min_half, a + b * mid) * scale * liquidity


@njit(cache=True, inline="always")
def quote_half_spread_scalar(mid: float, iv_index: float, dte: float, standardized_moneyness: float,
                             a: float, b: float, vix_exponent: float, vix_reference: float,
                             min_half: float, liquidity_slope: float, liquidity_free_sd: float) -> float:
    scale = quote_half_spread_scale_scalar(iv_index, dte, vix_exponent, vix_reference)
    return quote_half_spread_from_scale(mid, scale, standardized_moneyness, a, b, min_half,
                                        liquidity_slope, liquidity_free_sd)


@njit(cache=True, inline="always")
def quote_bid_ask_scalar(theo: float, half: float, zero_bid_below: float, tick: float):
    """(bid, ask) on the tick grid: bid rounded down, ask up, bid ≥ 0, ask − bid ≥ one tick."""
    # Counting in ticks keeps 0.07 from becoming 0.06999… before floor/ceil; the 1e-9 tick slack
    # absorbs the representation error of values that sit exactly on a tick.
    bid_ticks = math.floor((theo - half) / tick + 1e-9)
    ask_ticks = math.ceil((theo + half) / tick - 1e-9)
    if bid_ticks < 0 or theo < zero_bid_below:
        bid_ticks = 0
    if ask_ticks < bid_ticks + 1:
        ask_ticks = bid_ticks + 1
    # Dividing by ticks-per-dollar (100.0, exact) gives the double nearest to the decimal price;
    # multiplying by 0.01 would not (7 * 0.01 = 0.07000000000000001).
    ticks_per_dollar = 1.0 / tick
    return bid_ticks / ticks_per_dollar, ask_ticks / ticks_per_dollar


def quote_half_spread(mid, iv_index, dte, standardized_moneyness,
                      params: SpreadParams = SpreadParams()) -> np.ndarray:
    """Model half-spread in dollars before tick rounding (broadcasts)."""
    mid = np.asarray(mid, dtype=float)
    liquidity = 1.0 + params.liquidity_slope * np.maximum(
        0.0, np.abs(np.asarray(standardized_moneyness, dtype=float)) - params.liquidity_free_sd)
    return (np.maximum(params.min_half, params.a + params.b * mid)
            * (np.asarray(iv_index, dtype=float) / params.vix_reference) ** params.vix_exponent
            * (1.0 + np.asarray(dte, dtype=float) / 365.0) * liquidity)


def quote_bid_ask(theo, half, params: SpreadParams = SpreadParams()) -> tuple[np.ndarray, np.ndarray]:
    """Tick-rounded (bid, ask) around model prices ``theo`` with half-spreads ``half`` (broadcasts)."""
    theo, half = np.broadcast_arrays(np.asarray(theo, dtype=float), np.asarray(half, dtype=float))
    bid_ticks = np.floor((theo - half) / params.tick + 1e-9)
    ask_ticks = np.ceil((theo + half) / params.tick - 1e-9)
    bid_ticks = np.where((bid_ticks < 0) | (theo < params.zero_bid_below), 0.0, bid_ticks)
    ask_ticks = np.maximum(ask_ticks, bid_ticks + 1)
    ticks_per_dollar = 1.0 / params.tick
    return bid_ticks / ticks_per_dollar, ask_ticks / ticks_per_dollar
