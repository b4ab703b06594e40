"""Tests for analytics.black_scholes: prices and Greeks against identities, finite differences,
textbook values and an independent scipy.stats.norm implementation; the NaN/reason policy; strict
mode; broadcasting and option-right parsing."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from analytics.black_scholes import (
    Greeks,
    PricingReason,
    bsm_greeks,
    bsm_price,
    bsm_scalar,
    check_pricing_inputs,
    describe_reason,
    pricing_input_reasons,
)

EPS = np.finfo(float).eps


def broad_grid(n: int, seed: int) -> dict[str, np.ndarray]:
    """Moneyness 0.5–2, T from one day to three years, sigma 0.05–1.5, r −1%..8%, q 0..5%."""
    rng = np.random.default_rng(seed)
    spot = rng.uniform(20.0, 500.0, n)
    return {
        "spot": spot,
        "strike": spot / rng.uniform(0.5, 2.0, n),
        "t_years": np.exp(rng.uniform(math.log(1.0 / 365.0), math.log(3.0), n)),
        "rate": rng.uniform(-0.01, 0.08, n),
        "div_yield": rng.uniform(0.0, 0.05, n),
        "sigma": rng.uniform(0.05, 1.5, n),
    }


def scipy_bsm(spot, strike, t_years, rate, div_yield, sigma, is_call):
    """Independent textbook BSM with scipy.stats.norm (Hull's formulas), in our units."""
    sqrt_t = math.sqrt(t_years)
    d1 = (math.log(spot / strike) + (rate - div_yield + sigma ** 2 / 2) * t_years) / (sigma * sqrt_t)
    d2 = d1 - sigma * sqrt_t
    fwd_spot = spot * math.exp(-div_yield * t_years)
    pv_strike = strike * math.exp(-rate * t_years)
    if is_call:
        price = fwd_spot * norm.cdf(d1) - pv_strike * norm.cdf(d2)
        delta = math.exp(-div_yield * t_years) * norm.cdf(d1)
        theta_year = (-fwd_spot * norm.pdf(d1) * sigma / (2 * sqrt_t)
                      - rate * pv_strike * norm.cdf(d2) + div_yield * fwd_spot * norm.cdf(d1))
        rho = strike * t_years * math.exp(-rate * t_years) * norm.cdf(d2)
    else:
        price = pv_strike * norm.cdf(-d2) - fwd_spot * norm.cdf(-d1)
        delta = -math.exp(-div_yield * t_years) * norm.cdf(-d1)
        theta_year = (-fwd_spot * norm.pdf(d1) * sigma / (2 * sqrt_t)
                      + rate * pv_strike * norm.cdf(-d2) - div_yield * fwd_spot * norm.cdf(-d1))
        rho = -strike * t_years * math.exp(-rate * t_years) * norm.cdf(-d2)
    gamma = math.exp(-div_yield * t_years) * norm.pdf(d1) / (spot * sigma * sqrt_t)
    vega = fwd_spot * norm.pdf(d1) * sqrt_t
    return price, delta, gamma, vega / 100, theta_year / 365, rho / 100


# ----------------------------------------------------------------------------- identities

def test_put_call_parity_on_broad_random_grid():
    grid = broad_grid(50_000, seed=1)
    call = bsm_price(**grid, is_call=True)
    put = bsm_price(**grid, is_call=False)
    parity = (grid["spot"] * np.exp(-grid["div_yield"] * grid["t_years"])
              - grid["strike"] * np.exp(-grid["rate"] * grid["t_years"]))
    # C − P cancels, so "relative" means relative to the size of the terms being cancelled: an
    # absolute error of 1e-10 · max(C, P, |S e^-qT − K e^-rT|).
    scale = np.maximum.reduce([call, put, np.abs(parity)])
    assert np.all(np.isfinite(call)) and np.all(np.isfinite(put))
    assert np.max(np.abs(call - put - parity) / scale) < 1e-10


def test_call_minus_put_delta_is_dividend_discount_and_gamma_vega_match():
    grid = broad_grid(20_000, seed=2)
    call = bsm_greeks(**grid, is_call=True)
    put = bsm_greeks(**grid, is_call=False)
    np.testing.assert_allclose(call.delta - put.delta,
                               np.exp(-grid["div_yield"] * grid["t_years"]), rtol=0, atol=1e-14)
    np.testing.assert_allclose(call.gamma, put.gamma, rtol=1e-14, atol=0)
    np.testing.assert_allclose(call.vega, put.vega, rtol=1e-14, atol=0)
    # Parity also fixes the theta and rho differences (per day, per rate point).
    t, r, q = grid["t_years"], grid["rate"], grid["div_yield"]
    fwd_spot = grid["spot"] * np.exp(-q * t)
    pv_strike = grid["strike"] * np.exp(-r * t)
    np.testing.assert_allclose(call.rho - put.rho, pv_strike * t * 0.01, rtol=1e-12)
    theta_gap = (q * fwd_spot - r * pv_strike) / 365
    # Absolute floor: the thetas themselves are O(S/365) and cancel in the difference.
    assert np.all(np.abs(call.theta - put.theta - theta_gap)
                  <= 1e-10 * np.abs(theta_gap) + 1e-14 * grid["spot"])


def test_prices_within_no_arbitrage_bounds():
    grid = broad_grid(20_000, seed=3)
    fwd_spot = grid["spot"] * np.exp(-grid["div_yield"] * grid["t_years"])
    pv_strike = grid["strike"] * np.exp(-grid["rate"] * grid["t_years"])
    call = bsm_price(**grid, is_call=True)
    put = bsm_price(**grid, is_call=False)
    slack = 4 * EPS * (fwd_spot + pv_strike)
    assert np.all(call >= np.maximum(fwd_spot - pv_strike, 0) - slack)
    assert np.all(call <= fwd_spot + slack)
    assert np.all(put >= np.maximum(pv_strike - fwd_spot, 0) - slack)
    assert np.all(put <= pv_strike + slack)


# ----------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("is_call", [True, False])
def test_every_greek_matches_central_differences_of_the_price(is_call):
    """Central differences of ``bsm_price`` against each analytic Greek.

    Error of a central difference = truncation O(h² f''') + rounding (ulps of the price / step).
    Each step is a small fraction of its input's natural scale (spot: the one-sd move
    S·sigma·sqrt(T); sigma and T: themselves; rate: sigma/sqrt(T)), divided by 1 + |d1| + |d2|
    because higher derivatives grow with d in the wings. That keeps truncation below ~1e-8
    relative (1e-5 for the second difference of gamma), so the tolerance is rtol·|Greek| plus the
    rounding term, 64 ulps of (S + K) over the difference quotient's denominator.
    """
    grid = broad_grid(5_000, seed=4)
    greeks = bsm_greeks(**grid, is_call=is_call)
    s, k, t, r, q, v = (grid[f] for f in ("spot", "strike", "t_years", "rate", "div_yield",
                                           "sigma"))
    d1 = (np.log(s / k) + (r - q + v * v / 2) * t) / (v * np.sqrt(t))
    wing = 1.0 + np.abs(d1) + np.abs(d1 - v * np.sqrt(t))

    def price(**shifted):
        return bsm_price(**{**grid, **shifted}, is_call=is_call)

    def check(name, analytic, numeric, denominator, rtol):
        rounding = 64 * EPS * (s + k) / denominator
        excess = np.abs(numeric - analytic) / (rtol * np.abs(analytic) + rounding)
        assert excess.max() <= 1.0, (name, float(excess.max()), int(excess.argmax()))

    h = 1e-4 * s * v * np.sqrt(t) / wing
    check("delta", greeks.delta, (price(spot=s + h) - price(spot=s - h)) / (2 * h), 2 * h, 1e-6)
    h = 1e-2 * s * v * np.sqrt(t) / wing
    gamma_fd = (price(spot=s + h) - 2 * greeks.price + price(spot=s - h)) / h ** 2
    check("gamma", greeks.gamma, gamma_fd, h ** 2 / 4, 1e-4)
    h = 1e-4 * v / wing
    vega_fd = (price(sigma=v + h) - price(sigma=v - h)) / (2 * h) * 0.01
    check("vega", greeks.vega, vega_fd, 2 * h / 0.01, 1e-6)
    h = 1e-4 * t / wing
    theta_fd = -(price(t_years=t + h) - price(t_years=t - h)) / (2 * h) / 365
    check("theta", greeks.theta, theta_fd, 2 * h * 365, 1e-6)
    h = 1e-4 * v / np.sqrt(t) / wing
    rho_fd = (price(rate=r + h) - price(rate=r - h)) / (2 * h) * 0.01
    check("rho", greeks.rho, rho_fd, 2 * h / 0.01, 1e-6)


# ------------------------------------------------------------------- independent references

def test_hull_textbook_prices_and_greeks():
    # Hull, Options, Futures and Other Derivatives: S=42, K=40, r=10%, sigma=20%, T=0.5
    # gives c = 4.76, p = 0.81 (quoted to the cent).
    assert float(bsm_price(42, 40, 0.5, 0.10, 0.0, 0.20, True)) == pytest.approx(4.76, abs=0.005)
    assert float(bsm_price(42, 40, 0.5, 0.10, 0.0, 0.20, False)) == pytest.approx(0.81, abs=0.005)
    # Hull's Greek letters example: S=49, K=50, r=5%, sigma=20%, T=20 weeks (0.3846 years):
    # delta 0.522, gamma 0.066, vega 12.1 per unit sigma, theta -4.31 per year, rho 8.91 per unit r.
    g = bsm_greeks(49.0, 50.0, 0.3846, 0.05, 0.0, 0.20, "C")
    assert float(g.delta) == pytest.approx(0.522, abs=5e-4)
    assert float(g.gamma) == pytest.approx(0.066, abs=5e-4)
    assert float(g.vega) * 100 == pytest.approx(12.1, abs=0.05)
    assert float(g.theta) * 365 == pytest.approx(-4.31, abs=0.005)
    assert float(g.rho) * 100 == pytest.approx(8.91, abs=0.005)


def test_matches_independent_scipy_stats_implementation():
    grid = broad_grid(300, seed=5)
    rights = np.random.default_rng(6).random(300) < 0.5
    ours = bsm_greeks(**grid, is_call=rights)
    for i in range(300):
        args = [grid[k][i] for k in ("spot", "strike", "t_years", "rate", "div_yield", "sigma")]
        expected = scipy_bsm(*args, bool(rights[i]))
        scale = (args[0], 1.0, 1.0 / args[0], args[0] / 100, args[0] / 365, args[1] / 100)
        for name, want, unit in zip(("price", "delta", "gamma", "vega", "theta", "rho"),
                                    expected, scale):
            got = getattr(ours, name)[i]
            # Relative to the value, with a floor at 1e-12 of the Greek's natural unit, where
            # the textbook formula's own cancellation (deep ITM/OTM) dominates.
            assert abs(got - want) <= 1e-10 * abs(want) + 1e-12 * unit, (name, i, got, want)


def test_scalar_kernel_unchanged_contract():
    result = bsm_scalar(100.0, 95.0, 0.25, 0.03, 0.01, 0.22, True)
    assert isinstance(result, tuple) and len(result) == 6
    expected = scipy_bsm(100.0, 95.0, 0.25, 0.03, 0.01, 0.22, True)
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_price_only_path_is_bitwise_the_greeks_price():
    grid = broad_grid(10_000, seed=7)
    rights = np.random.default_rng(8).random(10_000) < 0.5
    np.testing.assert_array_equal(bsm_price(**grid, is_call=rights),
                                  bsm_greeks(**grid, is_call=rights).price)


def test_deep_in_the_money_price_is_intrinsic_plus_the_out_of_the_money_option():
    # The ITM price is built from the OTM one through parity, so the two agree to the last ulp
    # of the ITM price (the old S e^-qT N(d1) - K e^-rT N(d2) form lost 2-3 ulps there).
    spot, strike, t, r, q, sigma = 100.0, 55.0, 0.1, 0.03, 0.01, 0.25
    call = float(bsm_price(spot, strike, t, r, q, sigma, True))
    put = float(bsm_price(spot, strike, t, r, q, sigma, False))
    intrinsic = spot * math.exp(-q * t) - strike * math.exp(-r * t)
    assert abs(call - (intrinsic + put)) <= math.ulp(call)


# ------------------------------------------------------------------------ NaN / reason codes

BAD_CASES = [
    # (field, value, expected code)
    ("spot", 0.0, PricingReason.NON_POSITIVE_SPOT),
    ("spot", -5.0, PricingReason.NON_POSITIVE_SPOT),
    ("strike", 0.0, PricingReason.NON_POSITIVE_STRIKE),
    ("t_years", 0.0, PricingReason.NON_POSITIVE_T),
    ("t_years", -0.1, PricingReason.NON_POSITIVE_T),
    ("sigma", 0.0, PricingReason.NON_POSITIVE_SIGMA),
    ("sigma", -0.2, PricingReason.NON_POSITIVE_SIGMA),
    ("spot", np.nan, PricingReason.NAN_INPUT),
    ("rate", np.inf, PricingReason.NAN_INPUT),
    ("div_yield", -np.inf, PricingReason.NAN_INPUT),
    ("sigma", np.nan, PricingReason.NAN_INPUT),
]
VALID = {"spot": 100.0, "strike": 100.0, "t_years": 0.5, "rate": 0.03, "div_yield": 0.01,
         "sigma": 0.2}


@pytest.mark.parametrize("field,value,code", BAD_CASES)
def test_invalid_inputs_give_nan_and_reason(field, value, code):
    column = np.full(4, VALID[field])
    column[2] = value
    inputs = {**VALID, field: column}
    greeks = bsm_greeks(**inputs, is_call=[True, False, True, False])
    for name in ("price", "delta", "gamma", "vega", "theta", "rho"):
        values = getattr(greeks, name)
        assert np.isnan(values[2]), name
        assert np.all(np.isfinite(np.delete(values, 2))), name
    np.testing.assert_array_equal(greeks.reason, [0, 0, int(code), 0])
    np.testing.assert_array_equal(pricing_input_reasons(**inputs), [0, 0, int(code), 0])
    prices = bsm_price(**inputs, is_call=True)
    assert np.isnan(prices[2]) and np.all(np.isfinite(np.delete(prices, 2)))


def test_nan_takes_precedence_over_sign_checks():
    assert int(pricing_input_reasons(-1.0, 100.0, 0.5, 0.0, 0.0, np.nan)) == PricingReason.NAN_INPUT


def test_underflowing_total_volatility_is_flagged_not_raised():
    # sigma*sqrt(T) underflows to 0: a division by zero inside the kernel, reported as code 6.
    greeks = bsm_greeks(1.0, 1.0, 1e-300, 0.0, 0.0, 1e-200, True)
    assert int(greeks.reason) == PricingReason.NON_FINITE_RESULT
    assert np.isnan(greeks.price) and np.isnan(greeks.gamma)


def test_describe_reason_covers_every_code_and_rejects_unknown():
    for reason in PricingReason:
        assert describe_reason(int(reason)).startswith(reason.name)
    assert "sigma" in describe_reason(4)
    with pytest.raises(ValueError, match="unknown pricing reason code 42"):
        describe_reason(42)


# ------------------------------------------------------------------------------ strict mode

def test_strict_mode_names_index_field_and_value():
    sigma = np.array([0.2, 0.3, -0.25, np.nan])
    with pytest.raises(ValueError, match=r"element 2 has sigma=-0\.25: NON_POSITIVE_SIGMA"):
        bsm_price(100.0, 100.0, 0.5, 0.03, 0.0, sigma, True, strict=True)
    with pytest.raises(ValueError, match=r"element 2 has sigma=-0\.25"):
        bsm_greeks(100.0, 100.0, 0.5, 0.03, 0.0, sigma, True, strict=True)
    # Broadcast 2-D input: the index is the broadcast position, the NaN field is named.
    t_years = np.array([[0.5], [np.nan]])
    with pytest.raises(ValueError, match=r"element \(1, 0\) has t_years=nan: NAN_INPUT"):
        check_pricing_inputs(100.0, [90.0, 100.0, 110.0], t_years, 0.03, 0.0, 0.2)
    with pytest.raises(ValueError, match=r"\(scalar\) has strike=0\.0: NON_POSITIVE_STRIKE"):
        bsm_price(100.0, 0.0, 0.5, 0.03, 0.0, 0.2, "P", strict=True)
    # Valid inputs pass strict mode untouched.
    assert float(bsm_price(100.0, 100.0, 0.5, 0.03, 0.0, 0.2, "C", strict=True)) > 0
    check_pricing_inputs(100.0, 100.0, 0.5, 0.03, 0.0, 0.2)


# --------------------------------------------------------------- broadcasting and arguments

def test_broadcasting_matches_elementwise_scalar_kernel():
    strikes = np.array([80.0, 100.0, 120.0])[None, :]
    t_years = np.array([0.1, 1.0])[:, None]
    greeks = bsm_greeks(100.0, strikes, t_years, 0.02, 0.01, 0.3, [[True, False, True]])
    assert isinstance(greeks, Greeks)
    assert greeks.price.shape == (2, 3) and greeks.reason.shape == (2, 3)
    rights = [True, False, True]
    for i in range(2):
        for j in range(3):
            expected = bsm_scalar(100.0, strikes[0, j], t_years[i, 0], 0.02, 0.01, 0.3, rights[j])
            got = [getattr(greeks, n)[i, j]
                   for n in ("price", "delta", "gamma", "vega", "theta", "rho")]
            np.testing.assert_allclose(got, expected, rtol=0, atol=0)
    scalar = bsm_price(100.0, 100.0, 0.5, 0.0, 0.0, 0.2, True)
    assert scalar.shape == ()


def test_option_rights_as_strings_match_booleans():
    strikes = np.array([90.0, 95.0, 100.0, 105.0, 110.0, 115.0])
    from_strings = bsm_price(100.0, strikes, 0.3, 0.02, 0.0, 0.25,
                             np.array(["C", "p", "call", " PUT ", "c", "P"]))
    from_bools = bsm_price(100.0, strikes, 0.3, 0.02, 0.0, 0.25,
                           np.array([True, False, True, False, True, False]))
    np.testing.assert_array_equal(from_strings, from_bools)
    np.testing.assert_array_equal(bsm_price(100.0, strikes, 0.3, 0.02, 0.0, 0.25, [1, 0, 1, 0, 1, 0]),
                                  from_bools)


def test_malformed_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"is_call: element 1 is .*'X'"):
        bsm_price(100.0, [90.0, 100.0], 0.5, 0.0, 0.0, 0.2, ["C", "X"])
    with pytest.raises(ValueError, match="is_call: expected booleans"):
        bsm_price(100.0, 100.0, 0.5, 0.0, 0.0, 0.2, 0.5)
    with pytest.raises(ValueError, match="is_call: element 0 is 2;"):
        bsm_price(100.0, 100.0, 0.5, 0.0, 0.0, 0.2, [2])
    with pytest.raises(ValueError, match="do not broadcast.*strike \\(3,\\).*sigma \\(2,\\)"):
        bsm_price(100.0, [1.0, 2.0, 3.0], 0.5, 0.0, 0.0, [0.2, 0.3], True)
    with pytest.raises(ValueError, match="spot: cannot be read as numbers"):
        bsm_price("abc", 100.0, 0.5, 0.0, 0.0, 0.2, True)


def test_parallel_variant_matches_serial():
    grid = broad_grid(20_000, seed=9)
    rights = np.random.default_rng(10).random(20_000) < 0.5
    grid["sigma"][::97] = np.nan
    serial = bsm_greeks(**grid, is_call=rights)
    parallel = bsm_greeks(**grid, is_call=rights, parallel=True)
    for name in ("price", "delta", "gamma", "vega", "theta", "rho", "reason"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name))
    np.testing.assert_array_equal(bsm_price(**grid, is_call=rights, parallel=True), serial.price)
