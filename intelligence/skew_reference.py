"""The percentile skew rule's reference per bar (``filters.skew_rule = "percentile"``).

The 15-delta skew (IV_put15Δ − IV_call15Δ)/IV_ATM is read at the close of every session (its
last bar) on the nearest expiry within the strategy's DTE range, exactly as the engine reads it
at an entry bar (``strategies.condor_adjustments.nearest_expiry_skew``). Session i's reference is
the ``filters.skew_percentile``-th percentile of the readings of the previous
``filters.skew_lookback_sessions`` sessions (``analytics.skew.trailing_skew_reference``), so it
uses nothing from session i or later; every bar of session i carries it. The put wing is widened
at an entry bar whose own skew reading exceeds its bar's reference.

Any chain source works: ``chain_at(bar)`` returns a chain slice (``ChainSlice`` or anything with
``expiration``, ``strike``, ``is_call``, ``delta``, ``iv``, ``spot``, ``dte`` and ``select``).
History from before a run's first session comes in as ``history_skews`` (readings of the
sessions just before it, oldest first): ``core.skew_history`` builds it from the embedded data.

Cost: one slice per session (~1 ms each once the chain kernel is compiled; about 1.3 s for the
1,257 sessions of 2014-2018 including a year of history).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from analytics.skew import DEFAULT_WING_DELTA, SkewMethod, trailing_skew_reference
from strategies.condor_adjustments import nearest_expiry_skew

__all__ = [
    "session_close_skews",
    "session_last_bars",
    "skew_reference_per_bar",
    "skew_reference_for_bars",
]


def session_last_bars(bar_times: pd.DatetimeIndex) -> np.ndarray:
    """Position of each session's last bar in a sorted, tz-aware bar index (sessions are the
    exchange-time calendar days, America/New_York)."""
    times = pd.DatetimeIndex(bar_times)
    if times.tz is None:
        raise ValueError("bar_times must be tz-aware (exchange time America/New_York)")
    if len(times) == 0:
        return np.zeros(0, dtype=np.int64)
    days = times.tz_convert("America/New_York").tz_localize(None).normalize().asi8
    if (np.diff(times.asi8) <= 0).any():
        raise ValueError("bar_times must be strictly increasing")
    return np.append(np.flatnonzero(days[1:] != days[:-1]), len(days) - 1).astype(np.int64)


def session_close_skews(chain_at: Callable[[int], object], last_bars, dte_min: int | None = None,
                        dte_max: int | None = None, wing_delta: float = DEFAULT_WING_DELTA,
                        method: SkewMethod = "interpolated") -> np.ndarray:
    """The 15-delta skew of the nearest expiry at each session's last bar (``method``: the
    reading of ``analytics.skew.chain_skew``, interpolated to exactly ``wing_delta`` by default).

    ``chain_at(bar)``: the chain slice at a bar; ``last_bars``: the bar of each session's close,
    in time order. ``dte_min``/``dte_max`` (inclusive calendar days): keep only those rows of the
    slice first (pass the strategy's range; a no-op when ``chain_at`` already slices it). NaN
    for a session whose slice is empty or lacks a usable put/call."""
    bars = np.asarray(last_bars, dtype=np.int64)
    skews = np.full(len(bars), np.nan)
    for i, bar in enumerate(bars):
        chain = chain_at(int(bar))
        if dte_min is not None or dte_max is not None:
            dte = np.asarray(chain.dte)
            keep = np.ones(len(dte), dtype=bool)
            if dte_min is not None:
                keep &= dte >= dte_min
            if dte_max is not None:
                keep &= dte <= dte_max
            if not keep.all():
                chain = chain.select(keep)
        _, reading = nearest_expiry_skew(chain, wing_delta=wing_delta, method=method)
        if reading is not None:
            skews[i] = reading.skew
    return skews


def skew_reference_per_bar(session_reference, last_bars, n_bars: int | None = None) -> np.ndarray:
    """Per-session values spread onto bars: every bar of session i (the bars after session
    i − 1's last bar up to session i's last bar) gets ``session_reference[i]``. ``n_bars``
    defaults to the bar after the last session's close; bars past it are NaN."""
    reference = np.asarray(session_reference, dtype=np.float64)
    bars = np.asarray(last_bars, dtype=np.int64)
    if reference.shape != bars.shape:
        raise ValueError(f"session_reference and last_bars must have the same length "
                         f"({reference.shape} != {bars.shape})")
    if len(bars) and ((np.diff(bars) <= 0).any() or bars[0] < 0):
        raise ValueError("last_bars must be increasing, non-negative bar positions")
    if n_bars is None:
        n_bars = int(bars[-1]) + 1 if len(bars) else 0
    session = np.searchsorted(bars, np.arange(n_bars), side="left")
    out = np.full(n_bars, np.nan)
    inside = session < len(bars)
    out[inside] = reference[session[inside]]
    return out


def skew_reference_for_bars(chain_at: Callable[[int], object], bar_times: pd.DatetimeIndex, filters,
                            dte_min: int, dte_max: int, history_skews=None,
                            wing_delta: float = DEFAULT_WING_DELTA) -> np.ndarray:
    """The percentile rule's reference at every bar of ``bar_times`` (float64, NaN where fewer
    than ``filters.skew_min_sessions`` readings precede the bar's session).

    ``filters``: the ``filters`` config section (``skew_percentile``, ``skew_lookback_sessions``,
    ``skew_min_sessions``). ``history_skews``: session-close readings of the sessions right
    before the first bar's session, oldest first (None: no history)."""
    last_bars = session_last_bars(bar_times)
    skews = session_close_skews(chain_at, last_bars, dte_min, dte_max, wing_delta)
    history = np.zeros(0) if history_skews is None else np.asarray(history_skews, dtype=np.float64)
    reference = trailing_skew_reference(np.concatenate([history, skews]), filters.skew_lookback_sessions,
                                        filters.skew_percentile, filters.skew_min_sessions)[len(history):]
    return skew_reference_per_bar(reference, last_bars, len(bar_times))
