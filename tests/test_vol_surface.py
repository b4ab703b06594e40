"""VIX-anchored surface: term structure, SSVI smile, θ_T solve, no-arbitrage, bid/ask model.

Independent checks: variance swaps are re-integrated with scipy.integrate.quad, and the reference's
computed tables (shared/reference/vol-surface.md §3, §4) are reproduced.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import norm

from analytics.vol_surface import (
    SpreadParams, SurfaceParams, atm_total_variance, implied_volatility_surface, initial_variance,
    power_law_phi, quote_bid_ask, quote_half_spread, ssvi_total_variance, ssvi_variance_swap,
    variance_swap_term_structure,
)

PARAMS = SurfaceParams()
T30 = 30 / 365


def _quad_variance_swap(theta: float, phi: float, rho: float) -> float:
    """2∫e^{−k}·OTM(k)dk by adaptive quadrature (independent of the module's Simpson rule)."""
    def integrand(k: float) -> float:
        w = float(ssvi_total_variance(k, theta, phi, rho))
        sw = math.sqrt(w)
        d1 = -k / sw + 0.5 * sw
        d2 = d1 - sw
        if k < 0:
            return 2.0 * (norm.cdf(-d2) - math.exp(-k + norm.logcdf(-d1)))
        return 2.0 * (math.exp(-k) * norm.cdf(d1) - norm.cdf(d2))

    left = quad(integrand, -np.inf, 0.0, limit=400, epsabs=0.0, epsrel=1e-10)[0]
    right = quad(integrand, 0.0, np.inf, limit=400, epsabs=0.0, epsrel=1e-10)[0]
    return left + right


def _vix_from_atm(atm_vol: float, params: SurfaceParams = PARAMS) -> float:
    theta = atm_vol ** 2 * T30
    phi = float(power_law_phi(theta, params))
    return 100.0 * math.sqrt(_quad_variance_swap(theta, phi, params.rho) / T30)


def _vol_at_call_delta(target_delta: float, atm_vol: float, params: SurfaceParams = PARAMS) -> float:
    """Smile vol at the strike where the forward call delta N(d1) equals ``target_delta``."""
    theta = atm_vol ** 2 * T30
    phi = float(power_law_phi(theta, params))

    def vol(k):
        return math.sqrt(float(ssvi_total_variance(k, theta, phi, params.rho)) / T30)

    def excess(k):
        sw = vol(k) * math.sqrt(T30)
        return norm.cdf(-k / sw + 0.5 * sw) - target_delta

    return vol(brentq(excess, -2.0, 2.0, xtol=1e-12))


# ---------------------------------------------------------------------------------------- term

@pytest.mark.parametrize("vix", [9.0, 12.0, 20.0, 35.0, 80.0])
def test_term_structure_matches_vix_at_30_days(vix):
    w30 = float(variance_swap_term_structure(T30, vix))
    assert w30 == pytest.approx((vix / 100) ** 2 * T30, rel=1e-12)


@pytest.mark.parametrize("vix, expected", [
    (12, {7: 11.4, 30: 12.0, 90: 13.3, 365: 16.4}),
    (20, {7: 20.0, 30: 20.0, 90: 19.9, 365: 19.7}),
    (35, {7: 35.8, 30: 35.0, 90: 33.2, 365: 27.9}),
])
def test_variance_swap_vols_match_reference_table(vix, expected):
    for days, vol in expected.items():
        t = days / 365
        assert 100 * math.sqrt(float(variance_swap_term_structure(t, vix)) / t) == pytest.approx(vol, abs=0.06)


def test_term_shape_contango_when_calm_inverted_when_stressed():
    for vix, sign in [(12.0, 1), (35.0, -1)]:
        t = np.array([30, 90]) / 365
        atm = np.sqrt(atm_total_variance(t, vix) / t)
        swap = np.sqrt(variance_swap_term_structure(t, vix) / t)
        assert sign * (atm[1] - atm[0]) > 0.003, vix
        assert sign * (swap[1] - swap[0]) > 0.003, vix


def test_initial_variance_is_clamped_positive():
    assert float(initial_variance(1.0)) > 0          # an absurdly low index would give v0 < 0
    assert float(variance_swap_term_structure(1 / 365, 1.0)) > 0


# ---------------------------------------------------------------------------------------- smile

@pytest.mark.parametrize("atm, vix, put25, call25", [
    (10, 11.8, 12.8, 8.2), (16, 19.0, 20.4, 13.1), (25, 29.8, 31.7, 20.4), (40, 48.1, 50.1, 32.5),
])
def test_30_day_smile_reproduces_reference_table(atm, vix, put25, call25):
    assert _vix_from_atm(atm / 100) == pytest.approx(vix, abs=0.1)
    assert 100 * _vol_at_call_delta(0.75, atm / 100) == pytest.approx(put25, abs=0.15)   # 25Δ put
    assert 100 * _vol_at_call_delta(0.25, atm / 100) == pytest.approx(call25, abs=0.15)


def test_skew_sign_and_risk_reversal_widens_with_vix():
    rr = []
    for vix in [12.0, 20.0, 35.0]:
        theta = float(atm_total_variance(T30, vix))
        atm = math.sqrt(theta / T30)
        put = _vol_at_call_delta(0.75, atm)
        call = _vol_at_call_delta(0.25, atm)
        assert put > atm > call
        rr.append(call - put)
    assert rr[0] > rr[1] > rr[2]


@pytest.mark.parametrize("t_days", [5 / 1440, 1.0, 3.0, 4.9, 5.1, 30.0, 365.0, 1000.0])
@pytest.mark.parametrize("vix", [10.0, 18.0, 40.0])
def test_solved_theta_prices_variance_swap_at_term_structure(t_days, vix):
    t = t_days / 365
    theta = float(atm_total_variance(t, vix))
    phi = float(power_law_phi(theta, PARAMS, t_years=t))
    target = float(variance_swap_term_structure(t, vix))
    assert _quad_variance_swap(theta, phi, PARAMS.rho) == pytest.approx(target, rel=3e-4)
    # The module's own quadrature agrees with adaptive quadrature far more tightly.
    assert ssvi_variance_swap(theta, phi, PARAMS.rho) == pytest.approx(_quad_variance_swap(theta, phi, PARAMS.rho),
                                                                        rel=1e-6)


@pytest.mark.parametrize("vix", [9.0, 12.0, 20.0, 35.0, 60.0])
def test_calendar_total_variance_non_decreasing_in_t_at_fixed_k(vix):
    # Dense T from one minute to three years, across the 5-day skew floor.
    t = np.exp(np.linspace(math.log(1 / 525_600), math.log(3.0), 1500))
    k = np.linspace(-1.2, 0.6, 181)
    theta = atm_total_variance(t, vix)
    phi = power_law_phi(theta, PARAMS, t_years=t)
    w = ssvi_total_variance(k[:, None], theta[None, :], phi[None, :], PARAMS.rho)
    assert np.all(np.diff(theta) > 0)
    assert np.all(np.diff(w, axis=1) >= -1e-15)


@pytest.mark.parametrize("t_days", [0.01, 2.0, 30.0, 730.0])
@pytest.mark.parametrize("vix", [10.0, 40.0])
def test_no_butterfly_arbitrage_durrleman(t_days, vix):
    t = t_days / 365
    theta = float(atm_total_variance(t, vix))
    phi = float(power_law_phi(theta, PARAMS, t_years=t))
    k = np.linspace(-3.0, 2.0, 20001)
    h = 1e-4
    w = ssvi_total_variance(k, theta, phi, PARAMS.rho)
    w1 = (ssvi_total_variance(k + h, theta, phi, PARAMS.rho) - ssvi_total_variance(k - h, theta, phi, PARAMS.rho)) / (2 * h)
    w2 = (ssvi_total_variance(k + h, theta, phi, PARAMS.rho) - 2 * w
          + ssvi_total_variance(k - h, theta, phi, PARAMS.rho)) / h ** 2
    g = (1 - k * w1 / (2 * w)) ** 2 - w1 ** 2 / 4 * (1 / w + 0.25) + w2 / 2
    assert g.min() > -1e-6


def test_short_expiry_skew_stops_steepening_below_floor():
    def atm_skew(t_days):
        t = t_days / 365
        k = np.array([-1e-4, 1e-4]) * math.sqrt(float(atm_total_variance(t, 16.0)))
        vols = implied_volatility_surface(k, t, 16.0)
        return (vols[1] - vols[0]) / (k[1] - k[0])

    # Above the 5-day floor the skew steepens roughly like T^(-1/2) ...
    assert atm_skew(10) / atm_skew(40) == pytest.approx(2.0, rel=0.15)
    # ... below it the skew is (nearly) frozen.
    assert atm_skew(0.5) / atm_skew(4.5) == pytest.approx(1.0, abs=0.1)
    assert atm_skew(1) < 0


def test_surface_params_enforce_no_arbitrage_conditions():
    with pytest.raises(ValueError, match="gamma"):
        SurfaceParams(gamma=0.6)
    with pytest.raises(ValueError, match=r"eta\*\(1\+\|rho\|\)"):
        SurfaceParams(eta=1.5, rho=-0.7)
    with pytest.raises(ValueError, match="rho"):
        SurfaceParams(rho=-1.0)


def test_atm_total_variance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="t_years"):
        atm_total_variance(0.0, 15.0)
    with pytest.raises(ValueError, match="iv_index"):
        atm_total_variance(0.1, np.nan)


# ---------------------------------------------------------------------------------------- spreads

def test_half_spread_formula_and_monotonicity():
    p = SpreadParams()
    half = quote_half_spread(3.0, 15.0, 30, 0.5, p)
    assert float(half) == pytest.approx(max(0.005, p.a + p.b * 3.0) * (1 + 30 / 365))
    assert float(quote_half_spread(0.01, 15.0, 0, 0.0, p)) == pytest.approx(0.005)   # floor
    assert quote_half_spread(3.0, 30.0, 30, 0.5) > half                     # VIX
    assert quote_half_spread(3.0, 15.0, 90, 0.5) > half                     # DTE
    z = np.array([0.0, 1.0, 2.0, 4.0])
    by_z = quote_half_spread(3.0, 15.0, 30, z)
    assert by_z[0] == by_z[1] < by_z[2] < by_z[3]                          # liquidity: wings wider
    np.testing.assert_array_equal(quote_half_spread(3.0, 15.0, 30, -z), by_z)


def test_bid_ask_rounding_rules():
    rng = np.random.default_rng(7)
    theo = np.concatenate([rng.uniform(0, 0.05, 2000), rng.uniform(0, 60, 20000), [0.0, 0.07, 1.005]])
    half = quote_half_spread(theo, rng.uniform(9, 45, theo.size), rng.integers(0, 800, theo.size),
                             rng.normal(0, 2, theo.size))
    bid, ask = quote_bid_ask(theo, half)
    cents_bid, cents_ask = bid * 100, ask * 100
    assert np.abs(cents_bid - np.round(cents_bid)).max() < 1e-9
    assert np.abs(cents_ask - np.round(cents_ask)).max() < 1e-9
    assert np.all(bid >= 0) and np.all(bid <= theo + 1e-12) and np.all(ask >= theo - 1e-12)
    assert np.all(ask - bid >= 0.01 - 1e-12)
    assert np.all(bid[theo < 0.02] == 0)
    # Rounding outward never gives less than the model half-spread on either side (bid > 0).
    quoted = bid > 0
    assert np.all(theo[quoted] - bid[quoted] >= half[quoted] - 1e-9)
    assert np.all(ask - theo >= half - 1e-9)
    # Bid exactly one half-spread below a tick stays on that tick (no representation slip).
    b, a = quote_bid_ask(np.array([0.075]), np.array([0.005]))
    assert b[0] == pytest.approx(0.07) and a[0] == pytest.approx(0.08)
