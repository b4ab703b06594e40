"""Realized volatility and the volatility risk premium (seed §1): log returns, trailing
annualised realized volatility, VRP = IV_ATM − RV and the VRP entry gate.

Pure functions on float64 arrays (lists and pandas Series are converted); volatilities are
annualised decimals (0.20 = 20 %).

Annualisation. The seed writes RV² = (252/N)·Σ_{last N} r_t², which is right when r_t are
*daily* returns. ``realized_vol`` takes the number of return periods per year instead: pass
``periods_per_year=252`` for daily closes and ``252 × bars per session`` for intraday bars
(``252 × 78`` for 5-minute bars, ``TRADING_DAYS_PER_YEAR * BARS_PER_SESSION_5MIN``). Using 252
with 5-minute returns would understate RV by √78 (about 8.8×) and make every VRP look huge.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

TRADING_DAYS_PER_YEAR = 252
BARS_PER_SESSION_5MIN = 78  # 6.5 h regular session / 5 min
DEFAULT_VRP_THRESHOLD = 0.02


def _series(name: str, values) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def log_returns(close) -> np.ndarray:
    """r_t = ln(close_t / close_{t−1}), aligned with ``close`` (r_0 is NaN). NaN where either
    price is NaN or not positive (a log return of a non-positive price does not exist)."""
    close = _series("close", close)
    returns = np.full(len(close), np.nan)
    if len(close) > 1:
        previous, current = close[:-1], close[1:]
        valid = (previous > 0.0) & (current > 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            returns[1:] = np.where(valid, np.log(current / previous), np.nan)
    return returns


def realized_vol(close, window: int = 78,
                 periods_per_year: float = float(TRADING_DAYS_PER_YEAR)) -> np.ndarray:
    """Trailing realized volatility: RV_t = √((periods_per_year/N)·Σ_{i=t−N+1..t} r_i²) with
    N = ``window`` log returns (zero-mean estimator, as in the seed).

    Aligned with ``close``: the first value is at index N (N returns need N+1 prices), earlier
    values are NaN, and so is any value whose window holds a NaN return. See the module notes
    for ``periods_per_year`` (252 for daily closes, 252 × 78 for 5-minute bars).
    """
    close = _series("close", close)
    if isinstance(window, bool) or not isinstance(window, Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    periods_per_year = float(periods_per_year)
    if not (np.isfinite(periods_per_year) and periods_per_year > 0.0):
        raise ValueError(f"periods_per_year must be a positive number, got {periods_per_year!r}")
    rv = np.full(len(close), np.nan)
    squared = log_returns(close)[1:] ** 2
    if len(squared) < window:
        return rv
    # Each window summed on its own (not a running cumsum): no drift, and a NaN leaves the
    # result once it leaves the window. O(n·N), a few ms for a year of 5-minute bars.
    sums = sliding_window_view(squared, window).sum(axis=1)
    rv[window:] = np.sqrt(periods_per_year / window * sums)
    return rv


def vrp(iv_atm, rv):
    """Volatility risk premium VRP = IV_ATM − RV (decimals; scalars or arrays, broadcast)."""
    return np.subtract(np.asarray(iv_atm, dtype=np.float64), np.asarray(rv, dtype=np.float64))


def vrp_gate(vrp, threshold: float = DEFAULT_VRP_THRESHOLD):
    """Entry gate: True where VRP > ``threshold`` (strictly, as the seed); NaN gives False."""
    return np.greater(np.asarray(vrp, dtype=np.float64), float(threshold))
