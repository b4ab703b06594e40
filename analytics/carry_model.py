"""Cost-of-carry model (seed §5): futures fair value F = S·e^{(r − q)τ}, the market basis
F_market − S, and the carry state it implies (contango above zero, backwardation below).

Pure functions; scalars or arrays (NumPy broadcasting), a scalar call returns a NumPy scalar
(``carry_state`` a ``str``). Rates and yields are annualised and continuously compounded,
τ in years. ES futures data is not available by default (DESIGN.md), so the fair value stands in
for the futures price where a model needs one.

Inputs that cannot describe a market raise ``ValueError``: a negative τ or a spot at or below 0.
NaN is not rejected; it flows through to NaN (and to the ``'unknown'`` carry state).
"""
from __future__ import annotations

import numpy as np

CONTANGO = "contango"
BACKWARDATION = "backwardation"
FLAT = "flat"
UNKNOWN = "unknown"  # NaN basis: no state to report


def _first_bad(values: np.ndarray, bad: np.ndarray) -> float:
    return float(np.ravel(values)[np.argmax(np.ravel(bad))])


def _positive_spot(spot) -> np.ndarray:
    spot = np.asarray(spot, dtype=np.float64)
    bad = spot <= 0.0
    if np.any(bad):
        raise ValueError(f"spot must be positive, got {_first_bad(spot, bad)!r}")
    return spot


def fair_value(spot, rate, dividend_yield, tau_years):
    """F = S·e^{(r − q)·τ}: the futures price at which carrying spot to expiry earns nothing
    (r = financing rate, q = dividend yield)."""
    spot = _positive_spot(spot)
    tau_years = np.asarray(tau_years, dtype=np.float64)
    bad = tau_years < 0.0
    if np.any(bad):
        raise ValueError(f"tau_years must not be negative, got {_first_bad(tau_years, bad)!r}")
    carry = np.asarray(rate, dtype=np.float64) - np.asarray(dividend_yield, dtype=np.float64)
    return (spot * np.exp(carry * tau_years))[()]


def basis(futures_price, spot):
    """Basis = F_market − S in dollars per share (positive in contango)."""
    spot = _positive_spot(spot)
    return (np.asarray(futures_price, dtype=np.float64) - spot)[()]


def carry_state(basis, tolerance: float = 0.0):
    """'contango' where basis > tolerance, 'backwardation' where basis < −tolerance, 'flat'
    in between (exactly 0 with the default tolerance), 'unknown' where basis is NaN.
    A scalar gives a ``str``, an array an array of strings."""
    tolerance = float(tolerance)
    if not (np.isfinite(tolerance) and tolerance >= 0.0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    values = np.asarray(basis, dtype=np.float64)
    state = np.select([values > tolerance, values < -tolerance, np.isnan(values)],
                      [CONTANGO, BACKWARDATION, UNKNOWN], default=FLAT)
    return str(state) if state.ndim == 0 else state
