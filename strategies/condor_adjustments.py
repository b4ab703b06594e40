"""Stage-2 strategy depth on the chosen condor: regime-adaptive and skew/divergence-aware wings,
and the chain-level entry checks (VRP against the ATM IV, breach probability, liquidity).

Rules decided here where the seed gives only the idea:
- Wings: the wing-width search range (``wing_width_min … wing_width_max``) is scaled by
  ``regime.wing_scale_crash`` in CRASH_MODE and ``regime.wing_scale_low_vol`` in LOW_VOL_RANGE.
  A steep put skew (seed §3: (IV_put15Δ − IV_call15Δ)/IV_ATM > ``filters.skew_threshold``)
  widens the put wing by ``strategy.skew_put_wing_increment`` (W_put = W_base + ΔW). A SPY/QQQ
  divergence (|z| > ``filters.divergence_z``) widens the threatened side's wing by
  ``filters.divergence_wing_increment``: the put wing when SPY looks rich (z > +2, bearish
  bias), the call wing when it looks cheap.
- Breach probability of a short leg ≈ 2|Δ| (probability of touching the strike before expiry by
  the reflection principle, from the chain's delta); reject when either exceeds
  ``filters.max_breach_probability``.
- Liquidity: the short legs need a bid, and the condor's summed bid/ask spread must be at most
  ``filters.liquidity_max_spread_to_credit`` of its mid credit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analytics.divergence import BEARISH_SPY, BULLISH_SPY
from analytics.skew import SkewReading, chain_skew


@dataclass(frozen=True)
class WingPlan:
    """Per-side wing-width search ranges in dollars and why they differ from the config."""

    put_range: tuple[float, float]
    call_range: tuple[float, float]
    adjustments: tuple[str, ...] = ()


def plan_wings(config, regime_name: str, skew: float, divergence_bias: int) -> WingPlan:
    """The wing ranges for this entry (see the module docstring for the rules)."""
    strategy, filters, regime = config.strategy, config.filters, config.regime
    low, high = strategy.wing_width_min, strategy.wing_width_max
    notes = []
    if not filters.use_entry_gates:
        # The mechanical condor: no Stage-2 adjustment at all.
        return WingPlan((low, high), (low, high))
    if regime.use_regime_wings:
        scale = {"CRASH_MODE": regime.wing_scale_crash, "LOW_VOL_RANGE": regime.wing_scale_low_vol}.get(regime_name)
        if scale is not None and scale != 1.0:
            # Keep at least a $1 wing: the strike grid's step.
            low, high = max(1.0, low * scale), max(1.0, high * scale)
            notes.append(f"{regime_name} wings x{scale:g}")
    put_low, put_high, call_low, call_high = low, high, low, high
    if strategy.use_skew_penalty and not math.isnan(skew) and skew > filters.skew_threshold:
        put_low += strategy.skew_put_wing_increment
        put_high += strategy.skew_put_wing_increment
        notes.append(f"steep put skew {skew:.3f} put wing +{strategy.skew_put_wing_increment:g}")
    if filters.use_divergence_bias and divergence_bias:
        step = filters.divergence_wing_increment
        if divergence_bias == BEARISH_SPY:
            put_low, put_high = put_low + step, put_high + step
            notes.append(f"divergence bearish put wing +{step:g}")
        elif divergence_bias == BULLISH_SPY:
            call_low, call_high = call_low + step, call_high + step
            notes.append(f"divergence bullish call wing +{step:g}")
    return WingPlan((put_low, put_high), (call_low, call_high), tuple(notes))


def nearest_expiry_skew(chain, wing_delta: float = 0.15) -> tuple[np.datetime64 | None, SkewReading | None]:
    """The nearest expiry of a chain slice and its skew reading (None, None for an empty slice)."""
    if len(chain) == 0:
        return None, None
    expiration = chain.expiration.min()
    rows = chain.expiration == expiration
    reading = chain_skew(chain.strike[rows], chain.is_call[rows], chain.delta[rows], chain.iv[rows], chain.spot,
                         wing_delta=wing_delta)
    return expiration, reading


def breach_probability(choice) -> float:
    """The larger short leg's touch probability, 2|Δ| capped at 1."""
    return min(1.0, 2.0 * max(abs(choice.short_put_delta), abs(choice.short_call_delta)))


def liquidity_problem(choice, max_spread_to_credit: float) -> str | None:
    """None when the condor is liquid enough, else the rejection reason."""
    bid, ask = choice.bid, choice.ask
    if not (bid[1] > 0.0 and bid[2] > 0.0) or not (ask > 0.0).all():
        return "illiquid_no_bid"
    # Legs: long put, short put, short call, long call; credit at mid = shorts − longs.
    mid = 0.5 * (bid + ask)
    mid_credit = mid[1] + mid[2] - mid[0] - mid[3]
    spread = float((ask - bid).sum())
    if mid_credit <= 0.0 or spread > max_spread_to_credit * mid_credit:
        return "illiquid_wide_spread"
    return None
