"""Tests for analytics.realized_vol: log returns, the seed's RV² = (P/N)·Σ r² over a trailing
window (hand values, a loop reference, warm-up, NaN windows, annualisation of 5-minute bars),
VRP and its gate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analytics.realized_vol import (
    BARS_PER_SESSION_5MIN,
    TRADING_DAYS_PER_YEAR,
    log_returns,
    realized_vol,
    vrp,
    vrp_gate,
)

NAN = float("nan")


def test_log_returns_hand_values():
    result = log_returns([100.0, 110.0, 99.0, 0.0, 50.0, NAN, 60.0])
    expected = [NAN, math.log(1.1), math.log(0.9), NAN, NAN, NAN, NAN]
    np.testing.assert_allclose(result, expected, rtol=1e-12, equal_nan=True)
    assert log_returns([5.0]).shape == (1,) and np.isnan(log_returns([5.0])[0])


def test_realized_vol_hand_values():
    close = [100.0, 101.0, 100.0, 102.0]
    r = [math.log(1.01), math.log(100 / 101), math.log(1.02)]
    result = realized_vol(close, window=2, periods_per_year=252.0)
    expected = [NAN, NAN, math.sqrt(252 / 2 * (r[0] ** 2 + r[1] ** 2)),
                math.sqrt(252 / 2 * (r[1] ** 2 + r[2] ** 2))]
    np.testing.assert_allclose(result, expected, rtol=1e-12, equal_nan=True)


def test_realized_vol_matches_loop_and_warm_up():
    rng = np.random.default_rng(1)
    close = 580.0 * np.exp(np.cumsum(rng.normal(0.0, 0.001, 400)))
    window, per_year = 78, 252.0 * 78
    result = realized_vol(close, window, per_year)
    expected = [NAN] * len(close)
    for t in range(window, len(close)):
        total = sum(math.log(close[i] / close[i - 1]) ** 2 for i in range(t - window + 1, t + 1))
        expected[t] = math.sqrt(per_year / window * total)
    np.testing.assert_allclose(result, expected, rtol=1e-10, equal_nan=True)
    assert np.isnan(result[:window]).all() and np.isfinite(result[window:]).all()


def test_five_minute_annualisation_recovers_the_true_vol():
    # 5-minute returns with a 20 % annual vol: σ per bar = 0.20 / √(252·78).
    rng = np.random.default_rng(2)
    per_year = TRADING_DAYS_PER_YEAR * BARS_PER_SESSION_5MIN
    bar_sigma = 0.20 / math.sqrt(per_year)
    close = 580.0 * np.exp(np.cumsum(rng.normal(0.0, bar_sigma, 20_001)))
    rv = realized_vol(close, window=20_000, periods_per_year=per_year)[-1]
    assert rv == pytest.approx(0.20, rel=0.02)
    # The seed's 252 with 5-minute returns understates by exactly √78.
    daily_factor = realized_vol(close, window=20_000, periods_per_year=252.0)[-1]
    assert rv / daily_factor == pytest.approx(math.sqrt(78), rel=1e-12)


def test_nan_in_window_and_flat_prices():
    close = np.full(12, 100.0)
    close[5] = NAN
    result = realized_vol(close, window=3)
    # warm-up 0..2; returns 5 and 6 are NaN, so the windows ending at 5..8 hold one of them
    assert np.isnan(result[:3]).all() and np.isnan(result[5:9]).all()
    np.testing.assert_array_equal(result[3:5], [0.0, 0.0])
    np.testing.assert_array_equal(result[9:], [0.0, 0.0, 0.0])
    assert np.isnan(realized_vol([100.0, 101.0], window=2)).all()


def test_vrp_and_gate():
    assert vrp(0.22, 0.15) == pytest.approx(0.07)
    np.testing.assert_allclose(vrp(np.array([0.20, 0.18]), np.array([0.15, 0.17])), [0.05, 0.01])
    gate = vrp_gate(np.array([0.05, 0.02, 0.0200001, 0.01, -0.03, NAN]))
    assert gate.dtype == bool
    np.testing.assert_array_equal(gate, [True, False, True, False, False, False])
    assert bool(vrp_gate(0.03, threshold=0.04)) is False
    assert bool(vrp_gate(vrp(0.25, 0.20))) is True


@pytest.mark.parametrize("kwargs, name", [
    ({"window": 0}, "window"),
    ({"window": 2.0}, "window"),
    ({"periods_per_year": 0.0}, "periods_per_year"),
    ({"periods_per_year": NAN}, "periods_per_year"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        realized_vol(np.ones(10), **kwargs)
    with pytest.raises(ValueError, match="close"):
        log_returns(np.ones((2, 2)))
