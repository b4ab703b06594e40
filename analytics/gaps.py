"""Overnight gap analysis (seed §4): gap size G = |open − previous close| / previous close, the
small-gap test (G ≤ 0.19 %: likely to fill, legged entry allowed) and the gap direction
(up beyond +0.01 %, down beyond −0.01 %, otherwise none).

Pure functions; every argument may be a scalar or an array (NumPy broadcasting), and a scalar
call returns a NumPy scalar. A previous close that is NaN or not positive has no gap: G is NaN,
the gap is not small and the direction is 0.

Boundaries are compared with ``BOUNDARY_TOLERANCE`` (1e-12 in relative-gap units, a billionth of
a cent on SPY) so that a gap of exactly 0.19 % computed from cent prices, e.g. 581.102 over 580,
is classified by the rule and not by the last bit of its floating-point rounding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

SMALL_GAP_THRESHOLD = 0.0019  # 0.19 %
DIRECTION_TOLERANCE = 0.0001  # 0.01 %
BOUNDARY_TOLERANCE = 1e-12
GAP_UP = 1
NO_GAP = 0
GAP_DOWN = -1


def _relative_move(open_price, prev_close) -> np.ndarray:
    open_price = np.asarray(open_price, dtype=np.float64)
    prev_close = np.asarray(prev_close, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(prev_close > 0.0, (open_price - prev_close) / prev_close, np.nan)


def gap_pct(open_price, prev_close):
    """G = |open − prev_close| / prev_close as a fraction (0.0019 = 0.19 %)."""
    return np.abs(_relative_move(open_price, prev_close))[()]


def is_small_gap(open_price, prev_close, threshold: float = SMALL_GAP_THRESHOLD):
    """True where G ≤ ``threshold`` (the boundary counts as small, as in the seed)."""
    return (gap_pct(open_price, prev_close) <= float(threshold) + BOUNDARY_TOLERANCE)


def gap_direction(open_price, prev_close, tolerance: float = DIRECTION_TOLERANCE):
    """int8 codes: GAP_UP (+1) if open > prev·(1 + tol), GAP_DOWN (−1) if open < prev·(1 − tol),
    NO_GAP (0) otherwise (a move of exactly ``tolerance`` is no gap, as the seed's strict
    inequalities say)."""
    move = _relative_move(open_price, prev_close)
    limit = float(tolerance) + BOUNDARY_TOLERANCE
    direction = np.zeros(move.shape, dtype=np.int8)
    direction[move > limit] = GAP_UP
    direction[move < -limit] = GAP_DOWN
    return direction[()]


def session_gaps(session_open, previous_session_close,
                 threshold: float = SMALL_GAP_THRESHOLD,
                 tolerance: float = DIRECTION_TOLERANCE) -> pd.DataFrame:
    """All three readings for a run of sessions, one row each: columns ``gap_pct``,
    ``is_small_gap``, ``gap_direction``. ``previous_session_close`` is aligned with
    ``session_open`` (the first session, with no previous close, passes NaN). The index is
    ``session_open``'s when it is a pandas Series, else a RangeIndex."""
    index = session_open.index if isinstance(session_open, pd.Series) else None
    opens = np.asarray(session_open, dtype=np.float64)
    closes = np.asarray(previous_session_close, dtype=np.float64)
    if opens.ndim != 1 or opens.shape != closes.shape:
        raise ValueError(f"previous_session_close must be one-dimensional with the shape of "
                         f"session_open ({closes.shape} vs {opens.shape})")
    return pd.DataFrame({
        "gap_pct": np.atleast_1d(gap_pct(opens, closes)),
        "is_small_gap": np.atleast_1d(is_small_gap(opens, closes, threshold)),
        "gap_direction": np.atleast_1d(gap_direction(opens, closes, tolerance)),
    }, index=index)
