"""Tests for analytics.divergence: the SPY/QQQ ratio, the trailing sample-std z-score (hand
values, loop reference, warm-up, constant and NaN windows) and the bias codes at ±2."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from analytics.divergence import (
    BEARISH_SPY,
    BULLISH_SPY,
    NEUTRAL,
    divergence_bias,
    price_ratio,
    rolling_zscore,
)

NAN = float("nan")


def test_codes():
    assert (BEARISH_SPY, NEUTRAL, BULLISH_SPY) == (-1, 0, 1)


def test_price_ratio():
    assert price_ratio(580.0, 480.0) == pytest.approx(580.0 / 480.0)
    np.testing.assert_allclose(price_ratio([580.0, 600.0, 1.0], [480.0, 500.0, 0.0]),
                               [580 / 480, 1.2, NAN], equal_nan=True)
    with pytest.raises(ValueError, match="qqq"):
        price_ratio(np.ones(3), np.ones(4))


def test_rolling_zscore_hand_values():
    # window [1, 2, 3]: mean 2, sample std 1 → z = 1; window [2, 3, 7]: mean 4, std √7.
    z = rolling_zscore([1.0, 2.0, 3.0, 7.0], lookback=3)
    np.testing.assert_allclose(z, [NAN, NAN, 1.0, 3.0 / math.sqrt(7.0)], rtol=1e-12,
                               equal_nan=True)


def test_rolling_zscore_matches_statistics_module():
    rng = np.random.default_rng(3)
    ratio = 1.2 + np.cumsum(rng.normal(0.0, 0.002, 300))
    lookback = 50
    z = rolling_zscore(ratio, lookback)
    expected = [NAN] * len(ratio)
    for t in range(lookback - 1, len(ratio)):
        window = list(ratio[t - lookback + 1:t + 1])
        expected[t] = (ratio[t] - statistics.fmean(window)) / statistics.stdev(window)
    np.testing.assert_allclose(z, expected, rtol=1e-9, equal_nan=True)
    assert np.isnan(z[:49]).all() and np.isfinite(z[49:]).all()


def test_rolling_zscore_constant_and_nan_windows():
    values = np.concatenate([np.full(5, 0.1), [0.2, NAN, 0.3, 0.4, 0.5]])
    z = rolling_zscore(values, lookback=3)
    assert np.isnan(z[:5]).all()  # warm-up, then constant windows of 0.1 (std 0)
    assert np.isfinite(z[5])  # [0.1, 0.1, 0.2]
    assert np.isnan(z[6:9]).all()  # windows holding the NaN
    assert z[9] == pytest.approx(1.0)  # [0.3, 0.4, 0.5]
    assert np.isnan(rolling_zscore([1.0, 2.0], 5)).all()


def test_bias_signs_at_and_beyond_two():
    z = np.array([2.5, 2.0, 2.0000001, -2.0, -2.0000001, -3.0, 0.0, NAN])
    bias = divergence_bias(z)
    assert bias.dtype == np.int8
    np.testing.assert_array_equal(bias, [BEARISH_SPY, NEUTRAL, BEARISH_SPY, NEUTRAL, BULLISH_SPY,
                                         BULLISH_SPY, NEUTRAL, NEUTRAL])
    assert divergence_bias(2.1) == BEARISH_SPY and divergence_bias(-1.0, threshold=0.5) == 1


def test_end_to_end_spy_outperformance_is_bearish():
    spy = np.full(60, 580.0)
    qqq = 480.0 + 0.01 * np.sin(np.arange(60))  # small noise so the window has dispersion
    spy[-1] = 590.0  # SPY jumps against QQQ
    z = rolling_zscore(price_ratio(spy, qqq), 50)
    assert z[-1] > 2.0 and divergence_bias(z)[-1] == BEARISH_SPY


def test_bad_arguments():
    with pytest.raises(ValueError, match="lookback"):
        rolling_zscore(np.ones(10), 1)
    with pytest.raises(ValueError, match="values"):
        rolling_zscore(np.ones((3, 3)), 2)
    with pytest.raises(ValueError, match="threshold"):
        divergence_bias(np.zeros(3), threshold=-1.0)
