"""Implied-volatility skew (seed §3): Skew = (IV_put − IV_call) / IV_ATM with wing IVs taken at a
target delta (15-delta by default), the steep-skew test (Skew > 0.15: crash risk priced, widen
the put wing or size down), and ``chain_skew`` that reads the three IVs off one expiry of a chain.

Pure functions. ``skew_metric`` / ``is_steep_skew`` take scalars or arrays (NumPy
broadcasting). ``chain_skew`` runs at every entry attempt on one expiry (~1k rows), so it is
plain NumPy masks and argmin, no pandas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_WING_DELTA = 0.15
STEEP_SKEW_THRESHOLD = 0.15


@dataclass(frozen=True)
class SkewReading:
    """The skew of one expiry: wing and ATM IVs (decimals) and the skew metric. Every field is
    NaN when the chain lacks what the reading needs (see ``chain_skew``)."""

    iv_put: float
    iv_call: float
    iv_atm: float
    skew: float

    @property
    def is_valid(self) -> bool:
        return not math.isnan(self.skew)


MISSING_READING = SkewReading(math.nan, math.nan, math.nan, math.nan)


def skew_metric(iv_put, iv_call, iv_atm):
    """(iv_put − iv_call) / iv_atm; NaN where iv_atm is NaN or not positive."""
    iv_put = np.asarray(iv_put, dtype=np.float64)
    iv_call = np.asarray(iv_call, dtype=np.float64)
    iv_atm = np.asarray(iv_atm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(iv_atm > 0.0, (iv_put - iv_call) / iv_atm, np.nan)[()]


def is_steep_skew(skew, threshold: float = STEEP_SKEW_THRESHOLD):
    """True where skew > ``threshold`` (strictly, as the seed); NaN gives False."""
    return np.greater(np.asarray(skew, dtype=np.float64), float(threshold))


def _call_flags(is_call, length: int) -> np.ndarray:
    flags = np.asarray(is_call)
    if flags.shape != (length,):
        raise ValueError(f"is_call must have the shape of strike ({flags.shape} != ({length},))")
    if flags.dtype == np.bool_:
        return flags
    if flags.dtype.kind in "iu" and np.isin(flags, (0, 1)).all():
        return flags.astype(bool)
    if flags.dtype.kind in "USO":
        rights = np.char.upper(flags.astype(str))
        calls = (rights == "C") | (rights == "CALL")
        puts = (rights == "P") | (rights == "PUT")
        if (calls | puts).all():
            return calls
    raise ValueError("is_call must be booleans (True for calls) or option rights 'C'/'P'")


def _closest(distance: np.ndarray, tie_key: np.ndarray) -> int:
    """Index of the smallest ``distance``; among exact ties, the smallest ``tie_key``, so the
    choice does not depend on the chain's row order."""
    best = distance.min()
    candidates = np.flatnonzero(distance == best)
    if len(candidates) == 1:
        return int(candidates[0])
    return int(candidates[np.argmin(tie_key[candidates])])


def chain_skew(strike, is_call, delta, iv, spot: float,
               wing_delta: float = DEFAULT_WING_DELTA) -> SkewReading:
    """Skew of ONE expiry's chain (arrays of equal length, one row per contract).

    * iv_put: IV of the put whose |delta| is closest to ``wing_delta``;
    * iv_call: IV of the call whose |delta| is closest to ``wing_delta``;
    * iv_atm: at the strike closest to ``spot``, the mean of the call IV and the put IV there
      (whichever exists if only one does).
    Exact ties go to the further out-of-the-money wing (smaller |delta|) and the lower strike.
    Rows whose IV is NaN or not positive (unsolved quotes), or whose delta is NaN, are ignored.
    With no usable put or no usable call the reading is all NaN (``MISSING_READING``).
    """
    strike = np.asarray(strike, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    iv = np.asarray(iv, dtype=np.float64)
    if strike.ndim != 1:
        raise ValueError(f"strike must be one-dimensional, got shape {strike.shape}")
    for name, values in (("delta", delta), ("iv", iv)):
        if values.shape != strike.shape:
            raise ValueError(f"{name} must have the shape of strike "
                             f"({values.shape} != {strike.shape})")
    calls = _call_flags(is_call, len(strike))
    spot = float(spot)
    if not (math.isfinite(spot) and spot > 0.0):
        raise ValueError(f"spot must be a positive number, got {spot!r}")
    wing_delta = float(wing_delta)
    if not 0.0 < wing_delta < 1.0:
        raise ValueError(f"wing_delta must lie in (0, 1), got {wing_delta!r}")

    quoted = (iv > 0.0) & np.isfinite(iv) & np.isfinite(strike)  # NaN compares False
    abs_delta = np.abs(delta)
    with_delta = quoted & np.isfinite(delta)
    put_rows = np.flatnonzero(with_delta & ~calls)
    call_rows = np.flatnonzero(with_delta & calls)
    if len(put_rows) == 0 or len(call_rows) == 0:
        return MISSING_READING

    put = put_rows[_closest(np.abs(abs_delta[put_rows] - wing_delta), abs_delta[put_rows])]
    call = call_rows[_closest(np.abs(abs_delta[call_rows] - wing_delta), abs_delta[call_rows])]

    quoted_rows = np.flatnonzero(quoted)
    atm_strike = strike[quoted_rows[_closest(np.abs(strike[quoted_rows] - spot),
                                             strike[quoted_rows])]]
    at_strike = quoted & (strike == atm_strike)
    side_ivs = [iv[at_strike & side].mean() for side in (calls, ~calls)
                if (at_strike & side).any()]
    iv_atm = float(sum(side_ivs) / len(side_ivs))

    iv_put, iv_call = float(iv[put]), float(iv[call])
    return SkewReading(iv_put, iv_call, iv_atm, float(skew_metric(iv_put, iv_call, iv_atm)))
