"""SPY/QQQ relative-strength divergence (seed §2): the price ratio S_t = SPY/QQQ, its trailing
z-score and the wing bias it implies.

Pure functions on float64 arrays. QQQ is proxied from the NASDAQ data when no QQQ series is given
(DESIGN.md); nothing here cares which. A z-score above +threshold means SPY is rich against QQQ
(bearish SPY: widen the put wing); below −threshold SPY is cheap (bullish SPY: widen the call
wing); |z| ≤ threshold, or no z-score yet, is neutral.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BEARISH_SPY = -1  # z > +threshold: SPY over-extended against QQQ
NEUTRAL = 0
BULLISH_SPY = 1  # z < −threshold: SPY lagging QQQ
DEFAULT_LOOKBACK = 50
DEFAULT_Z_THRESHOLD = 2.0


def price_ratio(spy, qqq):
    """S_t = SPY_t / QQQ_t (scalars or arrays of one length). NaN where QQQ is not positive."""
    spy = np.asarray(spy, dtype=np.float64)
    qqq = np.asarray(qqq, dtype=np.float64)
    if spy.ndim and qqq.ndim and spy.shape != qqq.shape:
        raise ValueError(f"qqq must have the same shape as spy ({qqq.shape} != {spy.shape})")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(qqq > 0.0, spy / qqq, np.nan)[()]


def rolling_zscore(values, lookback: int = DEFAULT_LOOKBACK) -> np.ndarray:
    """z_t = (S_t − mean)/std over the trailing ``lookback`` values including S_t, std the
    sample standard deviation (N − 1). NaN until ``lookback`` values exist, while the window holds
    a NaN, and where the window is constant (std 0: no dispersion to measure against)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {values.shape}")
    if isinstance(lookback, bool) or not isinstance(lookback, Integral) or lookback < 2:
        raise ValueError(f"lookback must be an integer >= 2 (a sample std needs two values), "
                         f"got {lookback!r}")
    z = np.full(len(values), np.nan)
    if len(values) < lookback:
        return z
    windows = sliding_window_view(values, lookback)
    mean = windows.mean(axis=1)
    std = windows.std(axis=1, ddof=1)
    # A constant window is detected exactly (max == min): its computed std can be a rounding
    # residue like 1e-17 instead of 0, which would turn noise into a huge z.
    constant = windows.max(axis=1) == windows.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z[lookback - 1:] = np.where(constant, np.nan, (values[lookback - 1:] - mean) / std)
    return z


def divergence_bias(z, threshold: float = DEFAULT_Z_THRESHOLD):
    """Wing bias codes (int8): BEARISH_SPY (−1) where z > +threshold, BULLISH_SPY (+1) where
    z < −threshold, NEUTRAL (0) otherwise, including |z| == threshold and NaN."""
    threshold = float(threshold)
    if not (np.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    z = np.asarray(z, dtype=np.float64)
    bias = np.zeros(z.shape, dtype=np.int8)
    bias[z > threshold] = BEARISH_SPY
    bias[z < -threshold] = BULLISH_SPY
    return bias[()]
