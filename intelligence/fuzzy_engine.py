"""The fuzzy engine (seed §6): ten membership degrees -> fuzzy confidence F_t -> confidence C -> size.

Owns: the weighted blend F_t = sum_j w_j * mu_j (weights normalised over the keys given), the
neural blend C = w_neural * mu_Mamba + (1 - w_neural) * F_t, the dynamic size floor(C * max),
the seed's default weights and membership breakpoints, and ``score_bars``, which runs the whole
chain on raw feature arrays for every bar at once. The membership shapes themselves live in
``intelligence.fuzzifier``.

Weights (DESIGN.md, "Where the seed contradicts itself"): the worked example / Phase-6 values are
the defaults (mtf .18, iv .14, regime .11, rsi .10, adx .10, bbands .09, stoch .08, psar .07,
volume .07, sma .06; neural .20), not the §6 section headers. The worked example evaluates to
F_t = 0.698, not the 0.71 the seed prints.

NaN policy: a bar where any membership with weight > 0 is NaN (an indicator still warming up)
gets F_t = NaN, and so C = NaN and a size of 0 -- a half-informed confidence would look like a
real one. A membership whose weight is 0 is left out of the sum, so its NaN does not matter.

All functions are pure and vectorised: scalars give floats, arrays give arrays of their shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from intelligence.fuzzifier import (
    adx_membership,
    bollinger_membership,
    iv_rank_membership,
    mtf_membership,
    psar_membership,
    rsi_membership,
    sma_distance_membership,
    stochastic_membership,
    vix_membership,
    volume_membership,
)

__all__ = [
    "DEFAULT_NEURAL_WEIGHT",
    "DEFAULT_WEIGHTS",
    "FEATURE_KEYS",
    "NEUTRAL_NEURAL_MEMBERSHIP",
    "FuzzyScores",
    "MembershipBreakpoints",
    "blend_with_neural",
    "compute_fuzzy_confidence",
    "dynamic_contracts",
    "score_bars",
]

FloatOrArray = float | np.ndarray

# Phase-6 / worked-example weights, in core.config.FUZZY_FACTORS order (they sum to 1.00).
DEFAULT_WEIGHTS: MappingProxyType[str, float] = MappingProxyType({
    "mtf": 0.18, "iv": 0.14, "regime": 0.11, "rsi": 0.10, "adx": 0.10,
    "bbands": 0.09, "stoch": 0.08, "psar": 0.07, "volume": 0.07, "sma": 0.06,
})
DEFAULT_NEURAL_WEIGHT = 0.20
# Until a forecaster fills the neural slot it contributes "no opinion": with the default weight,
# C = 0.1 + 0.8 * F_t, so C stays within [0.1, 0.9] while the slot is empty.
NEUTRAL_NEURAL_MEMBERSHIP = 0.5

# Raw feature arrays score_bars reads (the analytics/feature pipeline's column names).
FEATURE_KEYS: tuple[str, ...] = (
    "mtf_consensus", "iv_rank", "vix", "rsi", "adx", "bb_position", "bb_width",
    "stoch_k", "psar_position", "volume_ratio", "sma_distance",
)

# floor(C * max) would turn 0.29 * 100 = 28.999999999999996 into 28; a confidence that differs
# from the next contract boundary by less than this is rounding noise, not information.
_FLOOR_TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------
# F_t and C


def _unwrap(values: np.ndarray) -> FloatOrArray:
    return float(values) if values.ndim == 0 else values


def _check_unit_interval(name: str, values: np.ndarray) -> None:
    # NaN compares False, so warm-up NaNs pass; only real numbers outside [0, 1] are refused.
    outside = (values < 0.0) | (values > 1.0)
    if np.any(outside):
        first = values.reshape(-1)[np.flatnonzero(outside.reshape(-1))[0]]
        raise ValueError(f"{name} must be in [0, 1], got {first!r}")


def _checked_weights(weights: Mapping[str, float]) -> dict[str, float]:
    for key, weight in weights.items():
        if not isinstance(weight, (int, float, np.integer, np.floating)) or not math.isfinite(weight):
            raise ValueError(f"weight {key!r} must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"weight {key!r} is negative ({weight!r}); fuzzy weights must be >= 0")
    total = math.fsum(float(w) for w in weights.values())
    if total <= 0:
        raise ValueError(
            f"the fuzzy weights sum to {total!r} (keys: {sorted(weights)}); at least one must be > 0"
        )
    return {key: float(weight) for key, weight in weights.items()}


def compute_fuzzy_confidence(
    memberships: Mapping[str, FloatOrArray], weights: Mapping[str, float]
) -> FloatOrArray:
    """F_t = sum_j w_j * mu_j, with the weights divided by their sum over the keys given.

    ``memberships`` and ``weights`` must have the same keys (any set of factors, usually the ten
    of ``DEFAULT_WEIGHTS``). Memberships are scalars or arrays; every array must have the same
    shape and scalars broadcast against it. Each must lie in [0, 1] or be NaN. A bar with a NaN
    membership of weight > 0 gets NaN (see the module's NaN policy). Raises ``ValueError`` when
    the keys differ, a weight is negative or not finite, the weights sum to 0, a membership is
    outside [0, 1], or the array shapes differ.
    """
    if set(memberships) != set(weights):
        missing = sorted(set(memberships) - set(weights))
        extra = sorted(set(weights) - set(memberships))
        parts = []
        if missing:
            parts.append(f"memberships without a weight: {missing}")
        if extra:
            parts.append(f"weights without a membership: {extra}")
        raise ValueError("membership and weight keys differ: " + "; ".join(parts))
    checked = _checked_weights(weights)

    arrays: dict[str, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    shape_key = ""
    for key, values in memberships.items():
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"membership {key!r}: expected numbers, got {values!r}") from exc
        _check_unit_interval(f"membership {key!r}", array)
        if array.ndim > 0:
            if shape is not None and array.shape != shape:
                raise ValueError(
                    f"membership {key!r} has shape {array.shape}, "
                    f"but {shape_key!r} has shape {shape}; all arrays must have the same shape"
                )
            shape, shape_key = array.shape, key
        arrays[key] = array

    # Normalising as sum(w * mu) / sum(w), both sums accumulated in the same order, makes equal
    # memberships give exactly that value (all ones -> 1.0, not 0.9999999999999999). Sorted keys
    # make F_t bit-identical whatever order the mappings come in.
    weighted = np.zeros(shape if shape is not None else ())
    weight_sum = 0.0
    for key in sorted(arrays):
        if checked[key] > 0:  # a weight-0 factor's NaN must not poison the sum (0 * NaN = NaN)
            weighted = weighted + checked[key] * arrays[key]
            weight_sum += checked[key]
    fuzzy = weighted / weight_sum
    return _unwrap(np.where(np.isnan(fuzzy), np.nan, np.clip(fuzzy, 0.0, 1.0)))


def blend_with_neural(
    fuzzy_confidence: FloatOrArray,
    neural_membership: FloatOrArray = NEUTRAL_NEURAL_MEMBERSHIP,
    neural_weight: float = DEFAULT_NEURAL_WEIGHT,
) -> FloatOrArray:
    """C = neural_weight * mu_Mamba + (1 - neural_weight) * F_t (seed §6; weight 0.20 per DESIGN.md).

    Inputs broadcast together; each must be in [0, 1] or NaN (NaN in either gives NaN).
    """
    if not isinstance(neural_weight, (int, float, np.integer, np.floating)) or not (
        0.0 <= neural_weight <= 1.0
    ):
        raise ValueError(f"neural_weight must be in [0, 1], got {neural_weight!r}")
    fuzzy = np.asarray(fuzzy_confidence, dtype=np.float64)
    neural = np.asarray(neural_membership, dtype=np.float64)
    _check_unit_interval("fuzzy_confidence", fuzzy)
    _check_unit_interval("neural_membership", neural)
    return _unwrap(np.asarray(neural_weight * neural + (1.0 - neural_weight) * fuzzy))


def dynamic_contracts(confidence: FloatOrArray, max_contracts: int) -> int | np.ndarray:
    """Contracts to trade: floor(C * max_contracts), within [0, max_contracts]; NaN C gives 0.

    A scalar confidence gives an int, an array an int64 array of its shape. A confidence within
    1e-9 below a contract boundary counts as on it (float products like 0.29 * 100 fall short).
    """
    if isinstance(max_contracts, bool) or not isinstance(max_contracts, (int, np.integer)):
        raise TypeError(f"max_contracts must be an integer, got {max_contracts!r}")
    if max_contracts < 0:
        raise ValueError(f"max_contracts must be >= 0, got {max_contracts!r}")
    c = np.asarray(confidence, dtype=np.float64)
    raw = np.floor(np.nan_to_num(c, nan=0.0) * max_contracts + _FLOOR_TOLERANCE)
    contracts = np.clip(raw, 0, max_contracts).astype(np.int64)
    return int(contracts) if contracts.ndim == 0 else contracts


# --------------------------------------------------------------------------------------------
# every bar at once


# MembershipBreakpoints field -> core.config.FuzzyConfig field holding the same number.
_CONFIG_FIELD_NAMES: dict[str, str] = {
    "ivr_full": "ivr_membership_full",
    "vix_calm": "vix_membership_calm",
    "vix_panic": "vix_membership_panic",
    "rsi_neutral_low": "rsi_membership_neutral_low",
    "rsi_neutral_high": "rsi_membership_neutral_high",
    "adx_low": "adx_membership_low",
    "adx_high": "adx_membership_high",
    "bb_position_share": "bb_position_share",
    "bb_width_zero": "bb_width_membership_zero",
    "stoch_neutral_low": "stoch_membership_neutral_low",
    "stoch_neutral_high": "stoch_membership_neutral_high",
    "volume_ratio_full": "volume_ratio_membership_full",
    "sma_distance_zero": "sma_distance_membership_zero",
}


@dataclass(frozen=True)
class MembershipBreakpoints:
    """The §6 membership breakpoints, seed defaults (the same numbers as core.config.FuzzyConfig).

    Values are checked when used: the membership functions raise ``ValueError`` naming the bad one.
    """

    ivr_full: float = 60.0
    vix_calm: float = 12.0
    vix_panic: float = 30.0
    rsi_neutral_low: float = 40.0
    rsi_neutral_high: float = 60.0
    adx_low: float = 25.0
    adx_high: float = 40.0
    bb_position_share: float = 0.7
    bb_width_zero: float = 0.04
    stoch_neutral_low: float = 30.0
    stoch_neutral_high: float = 70.0
    volume_ratio_full: float = 0.8
    sma_distance_zero: float = 0.02

    @classmethod
    def from_fuzzy_config(cls, fuzzy: Any) -> MembershipBreakpoints:
        """Read the breakpoints off a ``core.config.FuzzyConfig`` (duck-typed: no core import)."""
        return cls(**{name: float(getattr(fuzzy, source)) for name, source in _CONFIG_FIELD_NAMES.items()})


def _freeze(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class FuzzyScores:
    """Per-bar fuzzy results: the ten memberships (factor key -> array), F_t and C.

    The arrays are read-only, so scores computed once can be shared by drivers without copying.
    """

    memberships: Mapping[str, np.ndarray]
    fuzzy_confidence: np.ndarray
    confidence: np.ndarray


def score_bars(
    features: Mapping[str, FloatOrArray],
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    breakpoints: MembershipBreakpoints = MembershipBreakpoints(),  # frozen: safe as a default
    neural: FloatOrArray | None = None,
    neural_weight: float = DEFAULT_NEURAL_WEIGHT,
) -> FuzzyScores:
    """Memberships, F_t and C for every bar from raw feature arrays (keys: ``FEATURE_KEYS``).

    ``features`` may hold more keys (they are ignored); the eleven of ``FEATURE_KEYS`` must be
    present, as arrays of one shape (scalars broadcast). ``weights`` needs the ten factor keys.
    ``neural`` is mu_Mamba per bar (or a scalar); None means ``NEUTRAL_NEURAL_MEMBERSHIP``.
    """
    missing = [key for key in FEATURE_KEYS if key not in features]
    if missing:
        raise ValueError(f"score_bars: features lack {missing}")
    raw = {key: np.asarray(features[key], dtype=np.float64) for key in FEATURE_KEYS}
    shapes = {array.shape for array in raw.values() if array.ndim > 0}
    if len(shapes) > 1:
        detail = ", ".join(f"{key} {array.shape}" for key, array in raw.items())
        raise ValueError(f"score_bars: feature arrays differ in shape ({detail})")
    shape = shapes.pop() if shapes else ()

    b = breakpoints
    degrees = {
        "mtf": mtf_membership(raw["mtf_consensus"]),
        "iv": iv_rank_membership(raw["iv_rank"], full=b.ivr_full),
        "regime": vix_membership(raw["vix"], calm=b.vix_calm, panic=b.vix_panic),
        "rsi": rsi_membership(
            raw["rsi"], neutral_low=b.rsi_neutral_low, neutral_high=b.rsi_neutral_high
        ),
        "adx": adx_membership(raw["adx"], low=b.adx_low, high=b.adx_high),
        "bbands": bollinger_membership(
            raw["bb_position"], raw["bb_width"],
            position_share=b.bb_position_share, width_zero=b.bb_width_zero,
        ),
        "stoch": stochastic_membership(
            raw["stoch_k"], neutral_low=b.stoch_neutral_low, neutral_high=b.stoch_neutral_high
        ),
        "psar": psar_membership(raw["psar_position"]),
        "volume": volume_membership(raw["volume_ratio"], full=b.volume_ratio_full),
        "sma": sma_distance_membership(raw["sma_distance"], zero=b.sma_distance_zero),
    }
    memberships = {
        key: _freeze(np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy())
        for key, value in degrees.items()
    }
    fuzzy = np.broadcast_to(
        np.asarray(compute_fuzzy_confidence(memberships, weights), dtype=np.float64), shape
    ).copy()
    neural_degree = np.asarray(
        NEUTRAL_NEURAL_MEMBERSHIP if neural is None else neural, dtype=np.float64
    )
    if neural_degree.ndim > 0 and neural_degree.shape != shape:
        raise ValueError(
            f"score_bars: neural has shape {neural_degree.shape}, the features {shape}"
        )
    confidence = np.broadcast_to(
        np.asarray(blend_with_neural(fuzzy, neural_degree, neural_weight), dtype=np.float64), shape
    ).copy()
    return FuzzyScores(
        memberships=MappingProxyType(memberships),
        fuzzy_confidence=_freeze(fuzzy),
        confidence=_freeze(confidence),
    )
