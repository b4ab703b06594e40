"""Tests for analytics.indicators: each TA-Lib-backed indicator against an independent plain-loop
reference of its textbook recurrence and against hand-computed values; warm-up lengths, the NaN
restart policy, degenerate (flat) windows, zero volume and argument validation."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analytics.indicators import (
    adx,
    atr,
    bollinger,
    ema,
    iv_rank,
    parabolic_sar,
    psar_position,
    rsi,
    sma,
    sma_distance,
    stochastic,
    volume_ratio,
)

NAN = float("nan")


def ohlc(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random-walk bar series around 580 with highs/lows that contain the close."""
    rng = np.random.default_rng(seed)
    close = 580.0 + np.cumsum(rng.normal(0.0, 0.8, n))
    high = close + rng.uniform(0.05, 1.2, n)
    low = close - rng.uniform(0.05, 1.2, n)
    return high, low, close


def assert_same(actual: np.ndarray, expected: list[float] | np.ndarray, rtol: float = 1e-9):
    np.testing.assert_allclose(actual, np.asarray(expected, dtype=float), rtol=rtol, atol=1e-9,
                               equal_nan=True)


# --------------------------------------------------------------------------- references (loops)

def ref_sma(x, n):
    return [NAN] * (n - 1) + [sum(x[i - n + 1:i + 1]) / n for i in range(n - 1, len(x))]


def ref_ema(x, n):
    out = [NAN] * len(x)
    alpha = 2.0 / (n + 1)
    value = sum(x[:n]) / n
    out[n - 1] = value
    for i in range(n, len(x)):
        value = alpha * x[i] + (1 - alpha) * value
        out[i] = value
    return out


def ref_rsi(close, n):
    """Wilder: seed = simple mean of the first n gains/losses, then α = 1/n smoothing."""
    gains = [max(close[i] - close[i - 1], 0.0) for i in range(1, len(close))]
    losses = [max(close[i - 1] - close[i], 0.0) for i in range(1, len(close))]
    out = [NAN] * len(close)
    avg_gain, avg_loss = sum(gains[:n]) / n, sum(losses[:n]) / n
    out[n] = 100.0 * avg_gain / (avg_gain + avg_loss)
    for i in range(n, len(gains)):
        avg_gain += (gains[i] - avg_gain) / n
        avg_loss += (losses[i] - avg_loss) / n
        out[i + 1] = 100.0 * avg_gain / (avg_gain + avg_loss)
    return out


def true_range(high, low, close, i):
    return max(high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1]))


def ref_atr(high, low, close, n):
    tr = [true_range(high, low, close, i) for i in range(1, len(close))]
    out = [NAN] * len(close)
    value = sum(tr[:n]) / n
    out[n] = value
    for i in range(n, len(tr)):
        value = (value * (n - 1) + tr[i]) / n
        out[i + 1] = value
    return out


def ref_adx(high, low, close, n, textbook_seed=False):
    """Wilder ADX. Wilder sums the first n DM/TR values; TA-Lib sums the first n-1 and applies
    one Wilder step with the n-th (textbook_seed selects which)."""
    plus_dm, minus_dm, tr = [], [], []
    for i in range(1, len(close)):
        up, down = high[i] - high[i - 1], low[i - 1] - low[i]
        plus_dm.append(up if up > down and up > 0 else 0.0)
        minus_dm.append(down if down > up and down > 0 else 0.0)
        tr.append(true_range(high, low, close, i))
    dx = [NAN] * len(close)

    def record(i):  # DX of bar i+1 from the smoothed sums after DM/TR index i
        plus_di, minus_di = 100 * s_plus / s_tr, 100 * s_minus / s_tr
        dx[i + 1] = 100 * abs(plus_di - minus_di) / (plus_di + minus_di)

    if textbook_seed:
        s_plus, s_minus, s_tr = sum(plus_dm[:n]), sum(minus_dm[:n]), sum(tr[:n])
        record(n - 1)
        start = n
    else:
        s_plus, s_minus, s_tr = sum(plus_dm[:n - 1]), sum(minus_dm[:n - 1]), sum(tr[:n - 1])
        start = n - 1
    for i in range(start, len(tr)):
        s_plus += plus_dm[i] - s_plus / n
        s_minus += minus_dm[i] - s_minus / n
        s_tr += tr[i] - s_tr / n
        record(i)
    out = [NAN] * len(close)
    value = sum(dx[n:2 * n]) / n
    out[2 * n - 1] = value
    for i in range(2 * n, len(close)):
        value = (value * (n - 1) + dx[i]) / n
        out[i] = value
    return out


def ref_bollinger(close, n, k):
    position, width = [NAN] * len(close), [NAN] * len(close)
    for i in range(n - 1, len(close)):
        window = close[i - n + 1:i + 1]
        mean = sum(window) / n
        sigma = math.sqrt(sum((v - mean) ** 2 for v in window) / n)  # population
        upper, lower = mean + k * sigma, mean - k * sigma
        position[i] = (close[i] - lower) / (upper - lower)
        width[i] = (upper - lower) / mean
    return position, width


def ref_stochastic(high, low, close, kn, dn):
    k = [NAN] * len(close)
    for i in range(kn - 1, len(close)):
        hh, ll = max(high[i - kn + 1:i + 1]), min(low[i - kn + 1:i + 1])
        k[i] = 100.0 * (close[i] - ll) / (hh - ll)
    d = [NAN] * len(close)
    for i in range(kn + dn - 2, len(close)):
        d[i] = sum(k[i - dn + 1:i + 1]) / dn
    return k, d


def ref_sar(high, low, step, cap):
    """Wilder's Parabolic SAR with the reversal rules, TA-Lib's start: short if bar 1 has a
    down directional move (low fell more than high rose), else long; the first SAR is the
    opposite extreme of bar 0 and the first EP the extreme of bar 1."""
    out = [NAN] * len(high)
    up_move, down_move = high[1] - high[0], low[0] - low[1]
    long = not (down_move > 0 and down_move > up_move)
    sar = low[0] if long else high[0]
    ep = high[1] if long else low[1]
    af = step
    for t in range(1, len(high)):
        prev_high, prev_low = high[t - 1], low[t - 1]
        if t == 1:  # nothing before bar 0 bounds the first step
            prev_high, prev_low = high[1], low[1]
        if long and low[t] <= sar:  # penetrated: reverse to short at the extreme point
            long, sar, af = False, max(ep, prev_high, high[t]), step
            out[t] = sar
            ep = low[t]
            sar = max(sar + af * (ep - sar), prev_high, high[t])
        elif not long and high[t] >= sar:  # penetrated: reverse to long
            long, sar, af = True, min(ep, prev_low, low[t]), step
            out[t] = sar
            ep = high[t]
            sar = min(sar + af * (ep - sar), prev_low, low[t])
        elif long:
            out[t] = sar
            if high[t] > ep:
                ep, af = high[t], min(af + step, cap)
            sar = min(sar + af * (ep - sar), prev_low, low[t])
        else:
            out[t] = sar
            if low[t] < ep:
                ep, af = low[t], min(af + step, cap)
            sar = max(sar + af * (ep - sar), prev_high, high[t])
    return out


# --------------------------------------------------------------------------- moving averages

def test_sma_and_ema_hand_values():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert_same(sma(x, 3), [NAN, NAN, 2.0, 3.0, 4.0, 5.0])
    # α = 0.5 seeded by mean(1, 2, 3) = 2: 2, (2+4)/2 = 3, (3+5)/2 = 4, (4+6)/2 = 5.
    assert_same(ema(x, 3), [NAN, NAN, 2.0, 3.0, 4.0, 5.0])
    assert_same(ema([1.0, 1.0, 1.0, 4.0], 3), [NAN, NAN, 1.0, 2.5])
    assert_same(sma(x, 1), x)


@pytest.mark.parametrize("period", [2, 5, 20])
def test_sma_ema_match_loop_reference(period):
    _, _, close = ohlc(200, seed=1)
    assert_same(sma(close, period), ref_sma(list(close), period))
    assert_same(ema(close, period), ref_ema(list(close), period))


# --------------------------------------------------------------------------- RSI

def test_rsi_hand_computed():
    # changes +1, -1, +2 with period 2: seed gain 0.5, loss 0.5 → 50; next gain (0.5+2)/2 = 1.25,
    # loss 0.25 → 100·1.25/1.5.
    assert_same(rsi([10.0, 11.0, 10.0, 12.0], period=2), [NAN, NAN, 50.0, 100 * 1.25 / 1.5])


@pytest.mark.parametrize("period", [2, 14, 30])
def test_rsi_matches_wilder_loop(period):
    _, _, close = ohlc(400, seed=2)
    result = rsi(close, period)
    assert np.isnan(result[:period]).all() and np.isfinite(result[period:]).all()
    assert_same(result, ref_rsi(list(close), period))


def test_rsi_degenerate_series():
    assert_same(rsi(np.full(20, 580.0), 14)[14:], np.full(6, 50.0))  # no movement → neutral
    assert_same(rsi(np.arange(20.0, 0.0, -1.0), 5)[5:], np.zeros(15))  # only losses → a true 0
    assert_same(rsi(np.arange(1.0, 21.0), 5)[5:], np.full(15, 100.0))


# --------------------------------------------------------------------------- ATR / ADX

def test_atr_hand_computed():
    high, low, close = [10.0, 12.0, 11.0, 13.0], [9.0, 10.0, 9.0, 11.0], [9.5, 11.0, 10.0, 12.0]
    # TR: bar1 max(2, 2.5, 0.5) = 2.5, bar2 max(2, 0, 2) = 2, bar3 max(2, 3, 1) = 3.
    assert_same(atr(high, low, close, 2), [NAN, NAN, 2.25, (2.25 + 3.0) / 2])


@pytest.mark.parametrize("period", [1, 5, 14])
def test_atr_matches_wilder_loop(period):
    high, low, close = ohlc(300, seed=3)
    result = atr(high, low, close, period)
    assert np.isnan(result[:period]).all() and np.isfinite(result[period:]).all()
    assert_same(result, ref_atr(list(high), list(low), list(close), period))


@pytest.mark.parametrize("period", [3, 14])
def test_adx_matches_wilder_loop(period):
    high, low, close = ohlc(300, seed=4)
    result = adx(high, low, close, period)
    first = 2 * period - 1
    assert np.isnan(result[:first]).all() and np.isfinite(result[first:]).all()
    assert_same(result, ref_adx(list(high), list(low), list(close), period))
    # TA-Lib's seed differs from Wilder's only at the start; the difference must die out.
    textbook = np.asarray(ref_adx(list(high), list(low), list(close), period, textbook_seed=True))
    assert abs(result[first] - textbook[first]) > 1e-6
    np.testing.assert_allclose(result[-20:], textbook[-20:], atol=1e-6)


def test_adx_trend_and_flat():
    n = 60
    rising = np.arange(n, dtype=float)
    assert_same(adx(rising + 1.0, rising - 1.0, rising, 14)[27:], np.full(n - 27, 100.0))
    flat = np.full(n, 580.0)
    assert_same(adx(flat, flat, flat, 14)[27:], np.zeros(n - 27))


# --------------------------------------------------------------------------- Bollinger

def test_bollinger_hand_computed_population_std():
    # window [1, 2, 3]: mean 2, population σ = √(2/3); bands 2 ± 2σ.
    position, width = bollinger([1.0, 2.0, 3.0], period=3, num_std=2.0)
    sigma = math.sqrt(2.0 / 3.0)
    assert_same(position, [NAN, NAN, (3.0 - (2 - 2 * sigma)) / (4 * sigma)])
    assert_same(width, [NAN, NAN, 4 * sigma / 2.0])
    assert position[2] != pytest.approx(0.75)  # what the sample std (σ = 1) would give


def test_bollinger_matches_loop_reference():
    _, _, close = ohlc(200, seed=5)
    position, width = bollinger(close, 20, 2.0)
    ref_position, ref_width = ref_bollinger(list(close), 20, 2.0)
    assert_same(position, ref_position, rtol=1e-6)  # TA-Lib's one-pass variance
    assert_same(width, ref_width, rtol=1e-6)
    assert np.isnan(position[:19]).all() and np.isfinite(position[19:]).all()


def test_bollinger_flat_window():
    close = np.concatenate([np.linspace(570.0, 580.0, 20), np.full(25, 580.37)])
    position, width = bollinger(close, 20)
    assert_same(position[39:], np.full(6, 0.5))
    assert_same(width[39:], np.zeros(6))
    assert width[38] > 0.0 and np.isfinite(position[38])  # last window that still moves


# --------------------------------------------------------------------------- stochastic

def test_stochastic_hand_computed():
    high = [10.0, 11.0, 12.0, 11.0]
    low = [8.0, 9.0, 10.0, 9.0]
    close = [9.0, 10.0, 11.5, 9.5]
    k, d = stochastic(high, low, close, k_period=3, d_period=2)
    # bar 2: HH 12, LL 8 → 100·3.5/4 = 87.5; bar 3: HH 12, LL 9 → 100·0.5/3.
    assert_same(k, [NAN, NAN, 87.5, 50.0 / 3.0])
    assert_same(d, [NAN, NAN, NAN, (87.5 + 50.0 / 3.0) / 2])
    k1, d1 = stochastic(high, low, close, k_period=3, d_period=1)  # %D of one bar is %K
    assert_same(k1, k)
    assert_same(d1, k)


def test_stochastic_matches_loop_reference():
    high, low, close = ohlc(200, seed=6)
    k, d = stochastic(high, low, close, 14, 3)
    ref_k, ref_d = ref_stochastic(list(high), list(low), list(close), 14, 3)
    assert_same(k, ref_k)
    assert_same(d, ref_d)
    assert np.isnan(k[:13]).all() and np.isfinite(k[13:]).all()
    assert np.isnan(d[:15]).all() and np.isfinite(d[15:]).all()


def test_stochastic_no_range_is_neutral():
    flat = np.full(10, 580.0)
    k, d = stochastic(flat, flat, flat, 3, 3)
    assert_same(k[2:], np.full(8, 50.0))
    assert_same(d[4:], np.full(6, 50.0))


# --------------------------------------------------------------------------- Parabolic SAR

def test_sar_hand_computed_uptrend():
    high = [10.0, 11.0, 12.0, 13.0]
    low = [9.0, 10.0, 11.0, 12.0]
    # Long from bar 1: SAR1 = low0 = 9, EP = 11. SAR2 = 9 + 0.02·2 = 9.04 (≤ lows 10, 11);
    # bar 2 makes EP 12, AF 0.04: SAR3 = 9.04 + 0.04·2.96 = 9.1584.
    assert_same(parabolic_sar(high, low), [NAN, 9.0, 9.04, 9.1584])


def test_sar_matches_loop_reference_with_reversals():
    high, low, _ = ohlc(500, seed=7)
    result = parabolic_sar(high, low, 0.02, 0.2)
    reference = ref_sar(list(high), list(low), 0.02, 0.2)
    assert_same(result, reference)
    above = result[1:] > (high[1:] + low[1:]) / 2
    assert above.any() and (~above).any()  # the series really reverses (both sides visited)


def test_sar_short_start():
    high = [12.0, 11.0, 10.0]
    low = [11.0, 9.0, 8.0]
    # Bar 1 falls: short, SAR1 = high0 = 12, EP = 9; SAR2 = 12 + 0.02·(9 − 12) = 11.94.
    assert_same(parabolic_sar(high, low), [NAN, 12.0, 11.94])


def test_psar_position():
    close = np.array([100.0, 100.0, 103.0, 90.0, 100.0, 100.0, NAN])
    sar = np.array([100.0, 99.0, 100.0, 100.0, 100.0, 99.0, 99.0])
    atr_values = np.array([1.0, 1.0, 1.0, 1.0, NAN, 0.0, 1.0])
    result = psar_position(close, sar, atr_values, scale=3.0)
    assert_same(result, [0.0, 1.0 / 3.0, 1.0, -1.0, NAN, NAN, NAN])


# --------------------------------------------------------------------------- ratios

def test_sma_distance_and_volume_ratio():
    close = [10.0, 10.0, 13.0]
    assert_same(sma_distance(close, 3), [NAN, NAN, (13.0 - 11.0) / 11.0])
    volume = [100.0, 300.0, 200.0, 0.0, 0.0, 0.0, 50.0]
    # averages of 2: –, 200, 250, 100, 0, 0, 25
    assert_same(volume_ratio(volume, 2), [NAN, 1.5, 0.8, 0.0, NAN, NAN, 2.0])


def test_iv_rank_hand_computed():
    iv = [0.20, 0.10, 0.30, 0.25, 0.25, 0.25, 0.25]
    # windows of 3: [.2 .1 .3]→100, [.1 .3 .25]→75, [.3 .25 .25]→0, [.25 .25 .25]→flat 50
    assert_same(iv_rank(iv, 3), [NAN, NAN, 100.0, 75.0, 0.0, 50.0, 50.0])
    assert_same(iv_rank([0.2, 0.3], 1), [50.0, 50.0])
    assert np.isnan(iv_rank([0.2, 0.3], 5)).all()


def test_iv_rank_matches_loop_and_nan_window():
    rng = np.random.default_rng(8)
    iv = rng.uniform(0.1, 0.4, 600)
    iv[300] = NAN
    window = 252
    expected = [NAN] * len(iv)
    for i in range(window - 1, len(iv)):
        values = iv[i - window + 1:i + 1]
        if np.isnan(values).any():
            continue
        expected[i] = 100 * (iv[i] - values.min()) / (values.max() - values.min())
    result = iv_rank(iv, window)
    assert_same(result, expected)
    assert np.isnan(result[300:300 + window]).all() and np.isfinite(result[300 + window:]).all()


# --------------------------------------------------------------------------- NaN policy, shapes

def test_nan_restarts_the_indicator():
    high, low, close = ohlc(120, seed=9)
    close_gap = close.copy()
    close_gap[50] = NAN
    for function in (lambda c: rsi(c, 14), lambda c: ema(c, 10), lambda c: sma(c, 10),
                     lambda c: bollinger(c, 20)[0]):
        with_gap = function(close_gap)
        assert_same(with_gap[:50], function(close[:50]))
        assert np.isnan(with_gap[50])
        assert_same(with_gap[51:], function(close[51:]))  # a fresh start after the gap
        assert np.isfinite(with_gap[-1])
    high_gap = high.copy()
    high_gap[50] = np.inf
    result = atr(high_gap, low, close, 14)
    assert np.isnan(result[50:65]).all()
    assert_same(result[65:], atr(high[51:], low[51:], close[51:], 14)[14:])
    k, _ = stochastic(high_gap, low, close)
    assert np.isnan(k[50:64]).all() and np.isfinite(k[64:]).all()
    assert np.isfinite(adx(high_gap, low, close)[-1])
    assert np.isfinite(parabolic_sar(high_gap, low)[-1])


def test_all_nan_and_empty_inputs_do_not_crash():
    nan = np.full(30, NAN)
    for result in (rsi(nan), atr(nan, nan, nan), adx(nan, nan, nan), ema(nan, 5), sma(nan, 5),
                   *bollinger(nan), *stochastic(nan, nan, nan), parabolic_sar(nan, nan),
                   sma_distance(nan), volume_ratio(nan), iv_rank(nan, 5)):
        assert result.shape == (30,) and np.isnan(result).all()
    empty = np.array([])
    for result in (rsi(empty), atr(empty, empty, empty), adx(empty, empty, empty), ema(empty, 5),
                   *bollinger(empty), *stochastic(empty, empty, empty),
                   parabolic_sar(empty, empty), iv_rank(empty)):
        assert result.shape == (0,)


def test_short_series_are_all_warm_up():
    _, _, close = ohlc(10, seed=10)
    assert np.isnan(rsi(close, 14)).all()
    result = adx(close + 1, close - 1, close, 5)  # first value at 2·5 − 1 = 9, the last bar
    assert np.isnan(result[:9]).all() and np.isfinite(result[9:]).all()


def test_accepts_lists_and_series_and_returns_float64():
    _, _, close = ohlc(50, seed=11)
    from_series = rsi(pd.Series(close), 14)
    assert from_series.dtype == np.float64 and isinstance(from_series, np.ndarray)
    assert_same(from_series, rsi(list(close), 14))
    assert sma(np.arange(10), 3).dtype == np.float64  # integer input is converted


@pytest.mark.parametrize("call, name", [
    (lambda: rsi(np.ones(5), 1), "period"),
    (lambda: sma(np.ones(5), 0), "period"),
    (lambda: ema(np.ones(5), 2.5), "period"),
    (lambda: atr(np.ones(5), np.ones(4), np.ones(5)), "low"),
    (lambda: adx(np.ones(5), np.ones(5), np.ones(6)), "close"),
    (lambda: stochastic(np.ones(5), np.ones(5), np.ones(5), k_period=0), "k_period"),
    (lambda: stochastic(np.ones(5), np.ones(5), np.ones(5), d_period=0), "d_period"),
    (lambda: bollinger(np.ones(5), 20, num_std=0.0), "num_std"),
    (lambda: parabolic_sar(np.ones(5), np.ones(5), 0.3, 0.2), "acceleration"),
    (lambda: psar_position(np.ones(5), np.ones(5), np.ones(4)), "atr"),
    (lambda: psar_position(np.ones(5), np.ones(5), np.ones(5), scale=0.0), "scale"),
    (lambda: iv_rank(np.ones(5), 0), "window"),
    (lambda: volume_ratio(np.ones((2, 2))), "volume"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
