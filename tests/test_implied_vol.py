"""Tests for analytics.implied_vol: round trips, no-arbitrage bounds, extreme options, the reason
codes and strict mode, and agreement with an independent per-option brentq solver.

"vega" below is the raw derivative dPrice/dSigma (100 × the per-vol-point vega of bsm_greeks):
the accuracy target "1e-8 in sigma wherever vega > 1e-6" is read with that raw vega.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from analytics.black_scholes import PricingReason, bsm_greeks, bsm_price
from analytics.implied_vol import (
    IVReason,
    IVResult,
    describe_iv_reason,
    implied_vol_scalar,
    implied_volatility,
)

EPS = np.finfo(float).eps


def round_trip_grid(n: int, seed: int) -> dict[str, np.ndarray]:
    """Spot 100, moneyness 0.5–2, T from one day to three years, sigma 0.05–1.5."""
    rng = np.random.default_rng(seed)
    return {
        "spot": np.full(n, 100.0),
        "strike": 100.0 / rng.uniform(0.5, 2.0, n),
        "t_years": np.exp(rng.uniform(math.log(1.0 / 365.0), math.log(3.0), n)),
        "rate": rng.uniform(-0.01, 0.08, n),
        "div_yield": rng.uniform(0.0, 0.05, n),
        "sigma": rng.uniform(0.05, 1.5, n),
        "is_call": rng.random(n) < 0.5,
    }


def solve(grid, price, **options) -> IVResult:
    return implied_volatility(price, grid["spot"], grid["strike"], grid["t_years"], grid["rate"],
                              grid["div_yield"], grid["is_call"], **options)


def bounds(grid):
    fwd_spot = grid["spot"] * np.exp(-grid["div_yield"] * grid["t_years"])
    pv_strike = grid["strike"] * np.exp(-grid["rate"] * grid["t_years"])
    call = grid["is_call"]
    lower = np.where(call, np.maximum(fwd_spot - pv_strike, 0), np.maximum(pv_strike - fwd_spot, 0))
    upper = np.where(call, fwd_spot, pv_strike)
    return lower, upper


# -------------------------------------------------------------------------------- round trip

def test_round_trip_recovers_sigma_to_1e8_wherever_raw_vega_exceeds_1e6():
    grid = round_trip_grid(200_000, seed=11)
    greeks = bsm_greeks(**grid)
    result = solve(grid, greeks.price)
    raw_vega = greeks.vega * 100.0
    conditioned = raw_vega > 1e-6
    assert conditioned.mean() > 0.8          # the condition keeps most of the grid
    solved = result.reason == IVReason.OK
    assert solved[conditioned].mean() == 1.0
    error = np.abs(result.iv - grid["sigma"])
    assert error[conditioned].max() < 1e-8
    # Well-conditioned options come back to near machine precision.
    assert error[raw_vega > 1e-2].max() < 1e-11


def test_every_answer_reprices_the_input_or_says_why_not():
    """No garbage anywhere on the grid: each option is solved to its price's rounding floor
    (|sigma error| <= a few ulps of the price / vega), or NaN with a bound/range reason."""
    grid = round_trip_grid(100_000, seed=12)
    greeks = bsm_greeks(**grid)
    result = solve(grid, greeks.price)
    solved = result.reason == IVReason.OK
    assert np.all(np.isfinite(result.iv) == solved)
    raw_vega = greeks.vega * 100.0
    with np.errstate(divide="ignore"):      # vega underflows to 0 far in the wings
        floor = 4 * np.spacing(greeks.price) / raw_vega
    error = np.abs(result.iv - grid["sigma"])
    assert np.all(error[solved] <= np.maximum(1e-8, floor[solved]))
    # The unsolved are options whose price is (numerically) pure intrinsic value.
    lower, _ = bounds(grid)
    unsolved = ~solved
    assert set(np.unique(result.reason[unsolved])) <= {IVReason.PRICE_BELOW_LOWER_BOUND,
                                                       IVReason.IV_BELOW_RANGE,
                                                       IVReason.NON_FINITE_RESULT}
    assert np.all(greeks.price[unsolved] - lower[unsolved] <= 1e-12 * grid["spot"][unsolved])


@pytest.mark.parametrize("strike", [40.0, 55.0, 70.0, 100.0, 140.0, 190.0, 250.0])
@pytest.mark.parametrize("t_years", [1.0 / (365 * 24), 1.0 / 365, 7.0 / 365, 2.0])
@pytest.mark.parametrize("is_call", [True, False])
def test_deep_in_out_of_the_money_and_very_short_expiries(strike, t_years, is_call):
    sigma = np.array([0.01, 0.05, 0.15, 0.4, 1.0, 3.0])
    price = bsm_price(100.0, strike, t_years, 0.04, 0.01, sigma, is_call)
    raw_vega = bsm_greeks(100.0, strike, t_years, 0.04, 0.01, sigma, is_call).vega * 100
    result = implied_volatility(price, 100.0, strike, t_years, 0.04, 0.01, is_call)
    for i in range(sigma.size):
        if result.reason[i] == IVReason.OK:
            floor = 4 * math.ulp(price[i]) / raw_vega[i]
            assert abs(result.iv[i] - sigma[i]) <= max(1e-8, floor), (i, result.iv[i], sigma[i])
        else:
            assert np.isnan(result.iv[i])
            # Only a price indistinguishable from intrinsic value may be refused.
            assert result.reason[i] in (IVReason.PRICE_BELOW_LOWER_BOUND,
                                        IVReason.IV_BELOW_RANGE,
                                        IVReason.NON_FINITE_RESULT), describe_iv_reason(
                                            result.reason[i])
            assert raw_vega[i] < 1e-6


# ----------------------------------------------------------------- bounds and reason codes

@pytest.mark.parametrize("is_call", [True, False])
def test_prices_outside_no_arbitrage_bounds_are_nan_with_reason(is_call):
    spot, strike, t, r, q = 100.0, np.array([80.0, 100.0, 125.0]), 0.5, 0.05, 0.02
    fwd_spot = spot * math.exp(-q * t)
    pv_strike = strike * math.exp(-r * t)
    intrinsic = np.maximum(fwd_spot - pv_strike, 0) if is_call else np.maximum(pv_strike - fwd_spot, 0)
    upper = np.full(3, fwd_spot) if is_call else pv_strike

    def reasons(price):
        result = implied_volatility(price, spot, strike, t, r, q, is_call)
        assert np.all(np.isnan(result.iv))
        return result.reason

    below = int(IVReason.PRICE_BELOW_LOWER_BOUND)
    above = int(IVReason.PRICE_ABOVE_UPPER_BOUND)
    np.testing.assert_array_equal(reasons(intrinsic - 0.01), [below] * 3)
    np.testing.assert_array_equal(reasons(intrinsic), [below] * 3)          # zero vol
    np.testing.assert_array_equal(reasons(np.full(3, -1.0)), [below] * 3)
    np.testing.assert_array_equal(reasons(upper), [above] * 3)
    np.testing.assert_array_equal(reasons(upper + 0.5), [above] * 3)
    # Just inside both bounds it solves.
    inside = implied_volatility(intrinsic + 0.5 * (upper - intrinsic), spot, strike, t, r, q,
                                is_call)
    assert np.all(inside.reason == 0) and np.all(inside.iv > 0)


def test_implied_vol_outside_search_range_is_reported():
    price_low = bsm_price(100.0, 100.0, 0.1, 0.0, 0.0, 5e-5, True)       # sigma below 1e-4
    price_high = bsm_price(100.0, 100.0, 0.1, 0.0, 0.0, 12.0, True)      # sigma above 10
    result = implied_volatility([price_low, price_high], 100.0, 100.0, 0.1, 0.0, 0.0, True)
    np.testing.assert_array_equal(result.reason, [IVReason.IV_BELOW_RANGE, IVReason.IV_ABOVE_RANGE])
    assert np.all(np.isnan(result.iv))
    # A wider range solves both.
    wide = implied_volatility([price_low, price_high], 100.0, 100.0, 0.1, 0.0, 0.0, True,
                              sigma_min=1e-6, sigma_max=20.0)
    np.testing.assert_allclose(wide.iv, [5e-5, 12.0], rtol=1e-9)
    with pytest.raises(ValueError, match="sigma_min"):
        implied_volatility(1.0, 100.0, 100.0, 1.0, 0.0, 0.0, True, sigma_min=0.5, sigma_max=0.1)


@pytest.mark.parametrize("field,value,code", [
    ("spot", 0.0, IVReason.NON_POSITIVE_SPOT),
    ("strike", -100.0, IVReason.NON_POSITIVE_STRIKE),
    ("t_years", 0.0, IVReason.NON_POSITIVE_T),
    ("price", np.nan, IVReason.NAN_INPUT),
    ("rate", np.inf, IVReason.NAN_INPUT),
    ("div_yield", np.nan, IVReason.NAN_INPUT),
])
def test_invalid_inputs_give_nan_and_the_pricing_codes(field, value, code):
    inputs = {"price": 5.0, "spot": 100.0, "strike": 100.0, "t_years": 0.5, "rate": 0.03,
              "div_yield": 0.01}
    column = np.full(3, inputs[field])
    column[1] = value
    inputs[field] = column
    result = implied_volatility(**inputs, is_call=True)
    np.testing.assert_array_equal(result.reason, [0, int(code), 0])
    assert np.isnan(result.iv[1]) and np.all(np.isfinite(result.iv[[0, 2]]))


def test_reason_codes_are_shared_with_pricing_and_described():
    for name in ("NON_POSITIVE_SPOT", "NON_POSITIVE_STRIKE", "NON_POSITIVE_T", "NAN_INPUT",
                 "NON_FINITE_RESULT"):
        assert int(IVReason[name]) == int(PricingReason[name])
    for reason in IVReason:
        assert describe_iv_reason(int(reason)).startswith(reason.name)
    assert "lower bound" in describe_iv_reason(10)
    with pytest.raises(ValueError, match="unknown implied-vol reason code 4"):
        describe_iv_reason(4)


def test_strict_mode_names_the_first_unsolved_element():
    prices = np.array([10.0, 10.0, 0.001])    # the last is below a call's intrinsic value
    with pytest.raises(ValueError, match=r"element 2 .*price=0\.001.*PRICE_BELOW_LOWER_BOUND"):
        implied_volatility(prices, 100.0, np.array([95.0, 100.0, 50.0]), 0.5, 0.03, 0.0, "C",
                           strict=True)
    with pytest.raises(ValueError, match=r"element 1 has spot=-1\.0: NON_POSITIVE_SPOT"):
        implied_volatility(10.0, [100.0, -1.0], 100.0, 0.5, 0.03, 0.0, "C", strict=True)
    with pytest.raises(ValueError, match=r"element 0 has price=nan: NAN_INPUT"):
        implied_volatility([np.nan], 100.0, 100.0, 0.5, 0.03, 0.0, "P", strict=True)
    ok = implied_volatility(10.0, 100.0, 100.0, 0.5, 0.03, 0.0, "C", strict=True)
    assert ok.iv.shape == () and ok.reason == 0


# ------------------------------------------------------------------ independent reference

def scipy_stats_price(spot, strike, t_years, rate, div_yield, sigma, is_call):
    sqrt_t = math.sqrt(t_years)
    d1 = (math.log(spot / strike) + (rate - div_yield + sigma ** 2 / 2) * t_years) / (sigma * sqrt_t)
    d2 = d1 - sigma * sqrt_t
    fwd_spot = spot * math.exp(-div_yield * t_years)
    pv_strike = strike * math.exp(-rate * t_years)
    if is_call:
        return fwd_spot * norm.cdf(d1) - pv_strike * norm.cdf(d2)
    return pv_strike * norm.cdf(-d2) - fwd_spot * norm.cdf(-d1)


def test_agrees_with_brentq_on_scipy_stats_prices():
    """Prices from an independent scipy.stats.norm BSM; our solver vs brentq on that same model.

    Sample restricted to raw vega > 1e-3·S, where both solvers' rounding floors (~1e-14/vega)
    sit far below the 1e-9 tolerance.
    """
    grid = round_trip_grid(2_000, seed=13)
    raw_vega = bsm_greeks(**grid).vega * 100
    sample = np.flatnonzero(raw_vega > 0.1)[:120]
    assert sample.size == 120
    fields = ("spot", "strike", "t_years", "rate", "div_yield")
    for i in sample:
        args = [float(grid[f][i]) for f in fields]
        right = bool(grid["is_call"][i])
        price = scipy_stats_price(*args, float(grid["sigma"][i]), right)
        reference = brentq(lambda v: scipy_stats_price(*args, v, right) - price, 1e-4, 10.0,
                           xtol=1e-15, rtol=4 * EPS, maxiter=200)
        ours = implied_volatility(price, *args, right)
        assert int(ours.reason) == 0
        assert abs(float(ours.iv) - reference) < 1e-9, (i, float(ours.iv), reference)
        assert abs(float(ours.iv) - grid["sigma"][i]) < 1e-9


def test_scalar_kernel_and_string_rights():
    price = float(bsm_price(100.0, 110.0, 0.25, 0.02, 0.0, 0.3, False))
    iv, reason, evaluations = implied_vol_scalar(price, 100.0, 110.0, 0.25, 0.02, 0.0, False,
                                                 1e-4, 10.0)
    assert reason == 0 and abs(iv - 0.3) < 1e-12 and 1 <= evaluations <= 10
    strikes = np.array([90.0, 110.0])
    prices = bsm_price(100.0, strikes, 0.25, 0.02, 0.0, 0.3, ["P", "C"])
    result = implied_volatility(prices[:, None], 100.0, strikes[:, None], 0.25, 0.02, 0.0,
                                [["put"], ["CALL"]])
    assert result.iv.shape == (2, 1)
    np.testing.assert_allclose(result.iv, 0.3, rtol=1e-12)


def test_parallel_variant_matches_serial():
    grid = round_trip_grid(20_000, seed=14)
    price = bsm_price(**grid)
    serial = solve(grid, price)
    parallel = solve(grid, price, parallel=True)
    np.testing.assert_array_equal(parallel.iv, serial.iv)
    np.testing.assert_array_equal(parallel.reason, serial.reason)
