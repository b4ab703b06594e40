"""The ten fuzzy membership functions of the seed's §6 (6.1-6.10): raw feature -> degree in [0, 1].

Owns: one function per technical factor, each the seed's formula with its breakpoints as keyword
arguments whose defaults are the seed's numbers, and ``MEMBERSHIP_FUNCTIONS`` (factor key ->
description, in ``core.config.FUZZY_FACTORS`` order). Combining the degrees into a confidence is
``intelligence.fuzzy_engine``'s job; computing the raw indicators is ``analytics``'.

Every function is pure and vectorised: it takes a float scalar or array, returns an array of the
same shape (a Python float for a scalar input), every value clipped to [0, 1]. NaN in -> NaN out
(indicator warm-up stays visible instead of turning into a confident 0 or 1); +-inf is treated as
a very large number. A bad breakpoint raises ``ValueError`` naming the function and argument.

The trapezoids (RSI, Stochastic, VIX, ADX) are ``skfuzzy.trapmf``. That primitive needs care:
it only takes 1-d arrays, asserts (so ``python -O`` skips) its ordering, and returns 1.0 for NaN
(NaN fails every comparison and its output starts as ones) -- hence ``_trapezoid`` below. The
remaining shapes are one-line numpy expressions written as in the seed.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import skfuzzy

__all__ = [
    "MEMBERSHIP_FUNCTIONS",
    "adx_membership",
    "bollinger_membership",
    "iv_rank_membership",
    "mtf_membership",
    "psar_membership",
    "rsi_membership",
    "sma_distance_membership",
    "stochastic_membership",
    "vix_membership",
    "volume_membership",
]

FloatOrArray = float | np.ndarray

# Factor key (core.config.FUZZY_FACTORS, the keys of the fuzzy weights) -> what its degree means.
# "regime" is the VIX-regime membership (DESIGN.md: one factor, the seed's §6.3).
MEMBERSHIP_FUNCTIONS: MappingProxyType[str, str] = MappingProxyType({
    "mtf": "mtf_membership: 1 - |C - 0.5| * 2 of the 1/5/15-minute consensus C (1 = neutral)",
    "iv": "iv_rank_membership: min(1, IVR / 60) (1 = rich premium to sell)",
    "regime": "vix_membership: 1 at VIX <= 12, linear to 0 at VIX >= 30 (1 = calm market)",
    "rsi": "rsi_membership: 1 inside RSI 40-60, RSI/40 below, (100 - RSI)/40 above",
    "adx": "adx_membership: 1 at ADX <= 25, linear to 0 at ADX >= 40 (1 = no trend)",
    "bbands": "bollinger_membership: 0.7 * centredness in the bands + 0.3 * narrowness (width < 0.04)",
    "stoch": "stochastic_membership: 1 inside %K 30-70, %K/30 below, (100 - %K)/30 above",
    "psar": "psar_membership: 1 - |P| of the PSAR position P in [-1, 1] (1 = at a crossover)",
    "volume": "volume_membership: min(1, volume / SMA20(volume) / 0.8) (1 = adequate liquidity)",
    "sma": "sma_distance_membership: max(0, 1 - |D| / 0.02) of the distance D from the 20-bar SMA",
})


# --------------------------------------------------------------------------------------------
# helpers


def _as_float_array(values: FloatOrArray, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {values!r}") from exc


def _finish(degree: np.ndarray, nan_mask: np.ndarray) -> FloatOrArray:
    """Clip to [0, 1], restore NaN where the input was NaN, and unwrap 0-d results to float."""
    degree = np.where(nan_mask, np.nan, np.clip(degree, 0.0, 1.0))
    return float(degree) if degree.ndim == 0 else degree


def _require_finite(function: str, **arguments: float) -> None:
    for name, value in arguments.items():
        if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise ValueError(f"{function}: {name} must be a finite number, got {value!r}")


def _require_positive(function: str, **arguments: float) -> None:
    _require_finite(function, **arguments)
    for name, value in arguments.items():
        if value <= 0:
            raise ValueError(f"{function}: {name} must be > 0, got {value!r}")


def _require_ordered(function: str, low_name: str, low: float, high_name: str, high: float) -> None:
    _require_finite(function, **{low_name: low, high_name: high})
    if not low < high:
        raise ValueError(f"{function}: {low_name}={low!r} must be less than {high_name}={high!r}")


def _trapezoid(values: np.ndarray, a: float, b: float, c: float, d: float) -> np.ndarray:
    """skfuzzy.trapmf on any shape; NaN handling is left to the caller (trapmf maps NaN to 1)."""
    flat = values.reshape(-1)
    return skfuzzy.trapmf(flat, [a, b, c, d]).reshape(values.shape)


def _neutral_band(
    function: str, values: FloatOrArray, neutral_low: float, neutral_high: float
) -> FloatOrArray:
    """An oscillator on 0-100 with a neutral band: 1 inside, x/low below, (100 - x)/(100 - high) above.

    trapmf(0, low, high, 100) is exactly that: its left edge is (x - 0)/(low - 0), its right edge
    (100 - x)/(100 - high), and it is 0 outside 0-100 (where the seed's lines would go negative).
    """
    _require_ordered(function, "neutral_low", neutral_low, "neutral_high", neutral_high)
    if not 0 < neutral_low or not neutral_high < 100:
        raise ValueError(
            f"{function}: need 0 < neutral_low < neutral_high < 100, "
            f"got neutral_low={neutral_low!r}, neutral_high={neutral_high!r}"
        )
    x = _as_float_array(values, function)
    return _finish(_trapezoid(x, 0.0, neutral_low, neutral_high, 100.0), np.isnan(x))


def _falling_shoulder(
    function: str, values: FloatOrArray, low_name: str, low: float, high_name: str, high: float
) -> FloatOrArray:
    """1 at x <= low, 1 - (x - low)/(high - low) between, 0 at x >= high (VIX, ADX)."""
    _require_ordered(function, low_name, low, high_name, high)
    x = _as_float_array(values, function)
    # An open left shoulder: a = b = -inf makes every x <= low a full member; trapmf never divides
    # by b - a when a == b, so the infinities never reach arithmetic.
    return _finish(_trapezoid(x, -np.inf, -np.inf, low, high), np.isnan(x))


# --------------------------------------------------------------------------------------------
# §6.1 - §6.10


def mtf_membership(consensus: FloatOrArray) -> FloatOrArray:
    """§6.1: mu = 1 - |C - 0.5| * 2 for the weighted 1/5/15-minute consensus C in [0, 1].

    C = 0.5 (no agreement on a direction) -> 1; C = 0 or 1 (all timeframes trend together) -> 0.
    """
    x = _as_float_array(consensus, "mtf_membership")
    return _finish(1.0 - np.abs(x - 0.5) * 2.0, np.isnan(x))


def iv_rank_membership(ivr: FloatOrArray, *, full: float = 60.0) -> FloatOrArray:
    """§6.2: mu = min(1, IVR / full) for IV rank on 0-100 (full = 60); a negative rank gives 0."""
    _require_positive("iv_rank_membership", full=full)
    x = _as_float_array(ivr, "iv_rank_membership")
    return _finish(x / full, np.isnan(x))


def vix_membership(vix: FloatOrArray, *, calm: float = 12.0, panic: float = 30.0) -> FloatOrArray:
    """§6.3 (the "regime" factor): 1 at VIX <= calm, 1 - (VIX - calm)/(panic - calm), 0 at >= panic."""
    return _falling_shoulder("vix_membership", vix, "calm", calm, "panic", panic)


def rsi_membership(
    rsi: FloatOrArray, *, neutral_low: float = 40.0, neutral_high: float = 60.0
) -> FloatOrArray:
    """§6.4: 1 inside [neutral_low, neutral_high], RSI/neutral_low below, (100 - RSI)/(100 - neutral_high) above.

    With the seed's 40/60 both edges are the seed's RSI/40 and (100 - RSI)/40.
    """
    return _neutral_band("rsi_membership", rsi, neutral_low, neutral_high)


def adx_membership(adx: FloatOrArray, *, low: float = 25.0, high: float = 40.0) -> FloatOrArray:
    """§6.5: 1 at ADX <= low (no trend), 1 - (ADX - low)/(high - low) between, 0 at ADX >= high."""
    return _falling_shoulder("adx_membership", adx, "low", low, "high", high)


def bollinger_membership(
    position: FloatOrArray,
    width: FloatOrArray,
    *,
    position_share: float = 0.7,
    width_zero: float = 0.04,
) -> FloatOrArray:
    """§6.6: 0.7 * max(0, 1 - |pos - 0.5| * 2) + 0.3 * max(0, 1 - width / 0.04).

    ``position`` = (price - lower) / (upper - lower) (0.5 = middle band), ``width`` =
    (upper - lower) / SMA20. The seed writes the position term without a floor, but price outside
    the bands (position < 0 or > 1) would make it negative and the seed also says every membership
    is in [0, 1]: the term is floored at 0, so outside the bands only narrowness can score. The
    width term is capped at 1 (a negative width, impossible from real bands, cannot push mu above 1).
    ``position_share`` (0.7) weights the position term, 1 - position_share the width term.
    NaN in either input gives NaN; the two inputs broadcast together.
    """
    _require_positive("bollinger_membership", width_zero=width_zero)
    _require_finite("bollinger_membership", position_share=position_share)
    if not 0.0 <= position_share <= 1.0:
        raise ValueError(
            f"bollinger_membership: position_share must be in [0, 1], got {position_share!r}"
        )
    pos = _as_float_array(position, "bollinger_membership")
    wid = _as_float_array(width, "bollinger_membership")
    try:
        pos, wid = np.broadcast_arrays(pos, wid)
    except ValueError as exc:
        raise ValueError(
            f"bollinger_membership: position shape {pos.shape} and width shape {wid.shape} "
            "do not broadcast"
        ) from exc
    centred = np.clip(1.0 - np.abs(pos - 0.5) * 2.0, 0.0, 1.0)
    narrow = np.clip(1.0 - wid / width_zero, 0.0, 1.0)
    degree = position_share * centred + (1.0 - position_share) * narrow
    return _finish(degree, np.isnan(pos) | np.isnan(wid))


def stochastic_membership(
    k: FloatOrArray, *, neutral_low: float = 30.0, neutral_high: float = 70.0
) -> FloatOrArray:
    """§6.7: 1 inside [neutral_low, neutral_high], %K/neutral_low below, (100 - %K)/(100 - neutral_high) above.

    With the seed's 30/70 the edges are %K/30 and (100 - %K)/30.
    """
    return _neutral_band("stochastic_membership", k, neutral_low, neutral_high)


def psar_membership(position: FloatOrArray) -> FloatOrArray:
    """§6.8: mu = 1 - |P| for the PSAR position P in [-1, 1] (0 = at a crossover, +-1 = strong trend)."""
    x = _as_float_array(position, "psar_membership")
    return _finish(1.0 - np.abs(x), np.isnan(x))


def volume_membership(ratio: FloatOrArray, *, full: float = 0.8) -> FloatOrArray:
    """§6.9: mu = min(1, V_ratio / full) for V_ratio = volume / SMA20(volume) (full = 0.8)."""
    _require_positive("volume_membership", full=full)
    x = _as_float_array(ratio, "volume_membership")
    return _finish(x / full, np.isnan(x))


def sma_distance_membership(distance: FloatOrArray, *, zero: float = 0.02) -> FloatOrArray:
    """§6.10: mu = max(0, 1 - |D| / zero) for D = (price - SMA20) / SMA20 (zero = 0.02, i.e. 2 %)."""
    _require_positive("sma_distance_membership", zero=zero)
    x = _as_float_array(distance, "sma_distance_membership")
    return _finish(1.0 - np.abs(x) / zero, np.isnan(x))

