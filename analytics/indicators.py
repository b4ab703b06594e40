"""Technical indicators behind the fuzzy factors (seed §6): RSI, ATR, ADX, EMA/SMA, Bollinger
position/width, fast stochastic, Parabolic SAR and its position, SMA distance, volume ratio and
IV rank.

Pure functions on 1-D float64 arrays (lists and pandas Series are accepted and converted); every
result is a float64 array of the input's length. TA-Lib computes everything it has (RSI, ATR, ADX,
EMA, SMA, BBANDS, STOCHF, SAR, MAX/MIN); only what it lacks is written here, each with the reason.

Conventions
* Warm-up: the first values are NaN until the indicator is defined, as TA-Lib does it
  (``sma``: period-1 NaNs, ``ema``: period-1, ``rsi``/``atr``: period, ``adx``: 2·period-1,
  Bollinger: period-1, stochastic %K: k-1 and %D: k+d-2, SAR: 1, IV rank: window-1).
* NaN/inf inputs: a bar where any input is not finite gets NaN, and the indicator starts again
  after it, warm-up included: each run of finite bars is computed as its own series. TA-Lib's
  running sums and recursions would otherwise carry one missing bar into every later value.
  (For the windowed indicators this is the same as "NaN while the window holds a bad bar".)
* TA-Lib's global "unstable period" settings are assumed to be left at their default (0).
* Degenerate windows, decided here because TA-Lib's choice reads as an extreme:
  flat closes give RSI 50 (TA-Lib writes 0, i.e. "oversold"); a window with highest high equal
  to lowest low gives stochastic %K 50 (TA-Lib writes 0); a flat Bollinger window gives
  position 0.5 and width 0. ADX of a flat series stays TA-Lib's 0 (no trend is the right reading).
* Bad arguments (arrays of different lengths, a period below the minimum, a non-integer period)
  raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
import talib
from numpy.lib.stride_tricks import sliding_window_view

FloatArray = np.ndarray

# Neutral readings written where an oscillator is undefined (no movement in its window).
RSI_NEUTRAL = 50.0
STOCHASTIC_NEUTRAL = 50.0
BOLLINGER_NEUTRAL_POSITION = 0.5
IV_RANK_FLAT = 50.0


# --------------------------------------------------------------------------- validation helpers

def _series(name: str, values) -> FloatArray:
    array = np.ascontiguousarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _same_length(**arrays: FloatArray) -> int:
    names = list(arrays)
    first = names[0]
    length = len(arrays[first])
    for name in names[1:]:
        if len(arrays[name]) != length:
            raise ValueError(f"{name} must have the same length as {first} "
                             f"({len(arrays[name])} != {length})")
    return length


def _period(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _by_finite_runs(compute: Callable[..., tuple[FloatArray, ...]], *inputs: FloatArray,
                    n_outputs: int) -> tuple[FloatArray, ...]:
    """Apply ``compute`` to each run of bars where every input is finite; NaN elsewhere.

    Hand-written because TA-Lib has no gap handling: it skips leading NaNs only, and a NaN later
    on poisons its running sums for the rest of the series.
    """
    length = len(inputs[0])
    finite = np.logical_and.reduce([np.isfinite(x) for x in inputs])
    if finite.all():
        return compute(*inputs)
    outputs = tuple(np.full(length, np.nan) for _ in range(n_outputs))
    edges = np.diff(np.concatenate(([0], finite.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    for start, stop in zip(starts, stops, strict=True):
        pieces = compute(*(x[start:stop] for x in inputs))
        for output, piece in zip(outputs, pieces, strict=True):
            output[start:stop] = piece
    return outputs


# --------------------------------------------------------------------------- moving averages

def sma(values, period: int) -> FloatArray:
    """Simple moving average over the trailing ``period`` values (TA-Lib SMA)."""
    values = _series("values", values)
    period = _period("period", period)
    if period == 1:  # TA-Lib's SMA needs period >= 2; the 1-bar average is the value itself.
        return np.where(np.isfinite(values), values, np.nan)
    (result,) = _by_finite_runs(lambda x: (talib.SMA(x, period),), values, n_outputs=1)
    return result


def ema(values, period: int) -> FloatArray:
    """Exponential moving average, α = 2/(period+1), seeded by the SMA of the first ``period``
    values (TA-Lib EMA, default compatibility)."""
    values = _series("values", values)
    period = _period("period", period)
    (result,) = _by_finite_runs(lambda x: (talib.EMA(x, period),), values, n_outputs=1)
    return result


# --------------------------------------------------------------------------- momentum and trend

def rsi(close, period: int = 14) -> FloatArray:
    """Wilder RSI (TA-Lib RSI): average gain and loss smoothed with α = 1/period, seeded by the
    simple average of the first ``period`` changes; RSI = 100·G/(G+L). First value at index
    ``period``. Where the closes have not moved at all, RSI is 50 (see module notes)."""
    close = _series("close", close)
    period = _period("period", period, minimum=2)

    def compute(c: FloatArray) -> tuple[FloatArray]:
        out = talib.RSI(c, period)
        # TA-Lib writes 0 when G+L is (near) zero. A true 0 needs losses and no gain ever, so
        # any other 0 is the no-movement case, which we read as neutral.
        change = np.diff(c, prepend=c[:1])
        any_gain = np.cumsum(change > 0) > 0
        any_loss = np.cumsum(change < 0) > 0
        undefined = (out == 0.0) & ~(any_loss & ~any_gain)
        out[undefined] = RSI_NEUTRAL
        return (out,)

    (result,) = _by_finite_runs(compute, close, n_outputs=1)
    return result


def atr(high, low, close, period: int = 14) -> FloatArray:
    """Wilder average true range (TA-Lib ATR): the first value, at index ``period``, is the mean
    of the true ranges of bars 1..period; then ATR_t = ((period-1)·ATR_{t-1} + TR_t)/period."""
    high, low, close = _series("high", high), _series("low", low), _series("close", close)
    _same_length(high=high, low=low, close=close)
    period = _period("period", period)
    (result,) = _by_finite_runs(lambda h, lo, c: (talib.ATR(h, lo, c, period),),
                                high, low, close, n_outputs=1)
    return result


def adx(high, low, close, period: int = 14) -> FloatArray:
    """Wilder ADX (TA-Lib ADX). +DM/−DM/TR are Wilder-smoothed sums, DX = 100·|+DI − −DI| /
    (+DI + −DI), the first ADX (index 2·period−1) is the mean of the first ``period`` DX values,
    then ADX_t = ((period−1)·ADX_{t−1} + DX_t)/period.

    TA-Lib seeds the smoothed sums with the first period−1 values followed by one Wilder step
    (textbook Wilder sums the first ``period``); the difference decays as ((period−1)/period)^t.
    """
    high, low, close = _series("high", high), _series("low", low), _series("close", close)
    _same_length(high=high, low=low, close=close)
    period = _period("period", period, minimum=2)
    (result,) = _by_finite_runs(lambda h, lo, c: (talib.ADX(h, lo, c, period),),
                                high, low, close, n_outputs=1)
    return result


def bollinger(close, period: int = 20, num_std: float = 2.0) -> tuple[FloatArray, FloatArray]:
    """Bollinger position and width (TA-Lib BBANDS, SMA middle band).

    position = (close − lower)/(upper − lower): 0 on the lower band, 1 on the upper band.
    width = (upper − lower)/middle. The bands are middle ± num_std·σ where σ is TA-Lib's
    *population* standard deviation of the window (divides by N, not N−1). A window of equal
    closes has no bands: position 0.5 and width 0.
    """
    close = _series("close", close)
    period = _period("period", period, minimum=2)
    num_std = _positive("num_std", num_std)

    def compute(c: FloatArray) -> tuple[FloatArray, FloatArray]:
        upper, middle, lower = talib.BBANDS(c, period, num_std, num_std, 0)
        band = upper - lower
        # Flatness is taken from MAX == MIN (exact) as well as band <= 0: TA-Lib's one-pass
        # variance can leave rounding noise where the true σ is zero, and it rounds variances
        # below 1e-14 down to 0 where the closes differ by less than that.
        flat = (talib.MAX(c, period) == talib.MIN(c, period)) | (band <= 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            position = np.where(flat, BOLLINGER_NEUTRAL_POSITION, (c - lower) / band)
            width = np.where(flat, 0.0, band / middle)
        return position, width

    return _by_finite_runs(compute, close, n_outputs=2)


def stochastic(high, low, close, k_period: int = 14,
               d_period: int = 3) -> tuple[FloatArray, FloatArray]:
    """Fast stochastic (TA-Lib STOCHF): %K = 100·(close − LL)/(HH − LL) over the last
    ``k_period`` bars, %D = SMA_{d_period}(%K).

    Where HH == LL (no range in the window) %K is 50, the neutral reading, and %D averages
    those 50s (TA-Lib writes 0 there, which would read as "oversold"). %K starts at index
    k_period−1 and %D at k_period+d_period−2 (TA-Lib starts both at the latter).
    """
    high, low, close = _series("high", high), _series("low", low), _series("close", close)
    _same_length(high=high, low=low, close=close)
    k_period = _period("k_period", k_period)
    d_period = _period("d_period", d_period)

    def compute(h: FloatArray, lo: FloatArray, c: FloatArray) -> tuple[FloatArray, FloatArray]:
        # %D is recomputed from the corrected %K, so STOCHF is asked for %K alone (fast D of 1).
        k, _ = talib.STOCHF(h, lo, c, k_period, 1, 0)
        no_range = talib.MAX(h, k_period) == talib.MIN(lo, k_period)
        k[no_range] = STOCHASTIC_NEUTRAL
        d = talib.SMA(k, d_period) if d_period > 1 else k.copy()
        return k, d

    return _by_finite_runs(compute, high, low, close, n_outputs=2)


def parabolic_sar(high, low, acceleration: float = 0.02, maximum: float = 0.20) -> FloatArray:
    """Wilder Parabolic SAR (TA-Lib SAR): SAR_{t+1} = SAR_t + AF·(EP − SAR_t), AF rising by
    ``acceleration`` at each new extreme up to ``maximum``; the SAR never enters the last two
    bars' range and flips to the extreme point when price penetrates it. The first value is at
    index 1; TA-Lib starts short when bar 1 has a down directional move, long otherwise."""
    high, low = _series("high", high), _series("low", low)
    _same_length(high=high, low=low)
    acceleration = _positive("acceleration", acceleration)
    maximum = _positive("maximum", maximum)
    if acceleration > maximum:
        raise ValueError(f"acceleration ({acceleration}) must not exceed maximum ({maximum})")
    (result,) = _by_finite_runs(lambda h, lo: (talib.SAR(h, lo, acceleration, maximum),),
                                high, low, n_outputs=1)
    return result


def psar_position(close, sar, atr, scale: float = 3.0) -> FloatArray:
    """Price position against the SAR in ATR units: clip((close − SAR)/(scale·ATR), −1, 1).

    Seed §6.8 asks for P ∈ [−1, 1] with 0 at a crossover and ±1 in a strong trend without
    defining it; this is the definition used. 0 means price sits on the SAR (a reversal is at
    hand), +1 price is at least ``scale`` ATRs above it (strong up-trend), −1 as far below.
    NaN where any input is NaN or ATR is not positive (no volatility scale). Typical use:
    ``psar_position(close, parabolic_sar(high, low), atr(high, low, close))``.
    (Hand-written: TA-Lib has no such transform.)
    """
    close, sar = _series("close", close), _series("sar", sar)
    atr = _series("atr", atr)
    _same_length(close=close, sar=sar, atr=atr)
    scale = _positive("scale", scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        position = np.clip((close - sar) / (scale * atr), -1.0, 1.0)
    position[~(atr > 0.0)] = np.nan
    return position


# --------------------------------------------------------------------------- ratios

def sma_distance(close, period: int = 20) -> FloatArray:
    """Relative distance from the moving average: (close − SMA)/SMA; NaN where SMA is 0.
    (Hand-written ratio over TA-Lib SMA.)"""
    close = _series("close", close)
    average = sma(close, _period("period", period))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(average != 0.0, (close - average) / average, np.nan)


def volume_ratio(volume, period: int = 20) -> FloatArray:
    """Volume against its average: volume / SMA_period(volume) (the average includes the current
    bar). NaN where the average is 0 (no traded volume in the window: no liquidity reference).
    (Hand-written ratio over TA-Lib SMA.)"""
    volume = _series("volume", volume)
    average = sma(volume, _period("period", period))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(average > 0.0, volume / average, np.nan)


def iv_rank(iv, window: int = 252) -> FloatArray:
    """IV rank in percent: 100·(iv − min)/(max − min) over the trailing ``window`` values
    including the current one; NaN until ``window`` values exist and while the window holds a
    NaN. Where max == min (no range) the rank is 50.0, the middle of the scale.
    (Hand-written: TA-Lib has no IV rank; NumPy windows give the NaN-in-window rule directly.)
    """
    iv = _series("iv", iv)
    window = _period("window", window)
    rank = np.full(len(iv), np.nan)
    if len(iv) < window:
        return rank
    windows = sliding_window_view(iv, window)
    lowest = windows.min(axis=1)  # NaN anywhere in the window makes min/max NaN
    highest = windows.max(axis=1)
    spread = highest - lowest
    current = iv[window - 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ranked = np.where(spread > 0.0, 100.0 * (current - lowest) / spread, IV_RANK_FLAT)
    ranked[np.isnan(spread)] = np.nan
    rank[window - 1:] = ranked
    return rank
