"""Market-regime classifier (seed Stage 2): ADX, VIX and SMA alignment -> one regime per bar.

Owns: the ``Regime`` codes, ``classify_regime`` (vectorised over every bar at once) and
``regime_names``. What a regime changes (wing widths, entry gates) belongs to ``strategies``.

Precedence, first match wins (the same order as ``core.config.RegimeConfig``):

1. CRASH_MODE      VIX >= crash_vix (35)
2. BULL_TREND      ADX >= trend_adx (25) and close > fast SMA > slow SMA
3. BEAR_TREND      ADX >= trend_adx and close < fast SMA < slow SMA
4. HIGH_VOL_RANGE  VIX >= high_vol_vix (20)
5. LOW_VOL_RANGE   everything else

Crash comes first because a VIX spike overrides any trend reading: a strong, orderly-looking
bull stack at VIX 40 still wants the crash wings. Ties in the SMA stack (close == fast SMA) are
not a trend.

Warm-up: a bar with any NaN input gets ``Regime.UNKNOWN`` (code -1) -- except that a known VIX
at or above crash_vix is CRASH_MODE whatever else is missing, since the crash rule reads VIX
alone and a warm-up gap must never hide a crash. Codes are int8 so a 100k-bar column is 100 kB.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

__all__ = ["Regime", "classify_regime", "regime_names"]


class Regime(IntEnum):
    """Regime codes as stored in the int8 arrays; UNKNOWN (-1) marks bars still warming up."""

    UNKNOWN = -1
    BULL_TREND = 0
    BEAR_TREND = 1
    HIGH_VOL_RANGE = 2
    LOW_VOL_RANGE = 3
    CRASH_MODE = 4


# Indexed by code + 1 (UNKNOWN = -1 sits at index 0).
_NAMES = np.array([regime.name for regime in sorted(Regime)], dtype=object)


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f"classify_regime: {name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"classify_regime: {name} must be >= 0, got {value!r}")


def classify_regime(
    adx: float | np.ndarray,
    vix: float | np.ndarray,
    close: float | np.ndarray,
    sma_fast: float | np.ndarray,
    sma_slow: float | np.ndarray,
    *,
    trend_adx: float = 25.0,
    crash_vix: float = 35.0,
    high_vol_vix: float = 20.0,
) -> np.ndarray:
    """Regime code (``Regime`` values, int8) per bar; see the module docstring for the rules.

    The five inputs broadcast together; the result has their broadcast shape (0-d for scalars).
    Raises ``ValueError`` naming the argument for a negative or non-finite threshold, for
    high_vol_vix >= crash_vix, or for input shapes that do not broadcast.
    """
    for name, value in (("trend_adx", trend_adx), ("crash_vix", crash_vix),
                        ("high_vol_vix", high_vol_vix)):
        _check_threshold(name, value)
    if not high_vol_vix < crash_vix:
        raise ValueError(
            f"classify_regime: high_vol_vix={high_vol_vix!r} must be less than crash_vix={crash_vix!r}"
        )
    names = ("adx", "vix", "close", "sma_fast", "sma_slow")
    try:
        arrays = [np.asarray(x, dtype=np.float64) for x in (adx, vix, close, sma_fast, sma_slow)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"classify_regime: inputs must be numbers ({', '.join(names)})") from exc
    try:
        adx_a, vix_a, close_a, fast_a, slow_a = np.broadcast_arrays(*arrays)
    except ValueError as exc:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays, strict=True))
        raise ValueError(f"classify_regime: input shapes do not broadcast ({shapes})") from exc

    trending = adx_a >= trend_adx
    # Built from the lowest precedence up, so each later assignment overrides the earlier ones.
    codes = np.full(adx_a.shape, Regime.LOW_VOL_RANGE, dtype=np.int8)
    codes[vix_a >= high_vol_vix] = Regime.HIGH_VOL_RANGE
    codes[trending & (close_a < fast_a) & (fast_a < slow_a)] = Regime.BEAR_TREND
    codes[trending & (close_a > fast_a) & (fast_a > slow_a)] = Regime.BULL_TREND
    any_nan = np.isnan(adx_a) | np.isnan(vix_a) | np.isnan(close_a) | np.isnan(fast_a) | np.isnan(slow_a)
    codes[any_nan] = Regime.UNKNOWN
    codes[vix_a >= crash_vix] = Regime.CRASH_MODE  # NaN VIX compares False: stays UNKNOWN
    return codes


def regime_names(codes: int | np.ndarray) -> np.ndarray:
    """Names ("BULL_TREND", ..., "UNKNOWN") for regime codes, as an object array of their shape.

    Raises ``ValueError`` for a code that is not a ``Regime`` value (NaN included).
    """
    values = np.asarray(codes)
    if values.dtype.kind == "f":
        if np.any(~np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError("regime_names: codes must be whole numbers (Regime values)")
        values = values.astype(np.int64)
    elif values.dtype.kind not in "iu":
        raise ValueError(f"regime_names: codes must be integers, got dtype {values.dtype}")
    values = values.astype(np.int64)
    low, high = min(Regime), max(Regime)
    bad = (values < low) | (values > high)
    if np.any(bad):
        first = values.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
        raise ValueError(f"regime_names: {first} is not a regime code ({int(low)}..{int(high)})")
    return _NAMES[values + 1]


_NAME_OF_CODE = {int(regime): regime.name for regime in Regime}


def regime_name(code: float) -> str:
    """The name of one regime code (a float from the feature table is fine): the per-bar form of
    ``regime_names``, a dictionary lookup. ValueError for a code that is not a ``Regime`` value."""
    try:
        return _NAME_OF_CODE[int(code)] if code == int(code) else _NAME_OF_CODE[None]
    except (KeyError, ValueError, OverflowError):
        raise ValueError(f"regime_name: {code!r} is not a regime code") from None
