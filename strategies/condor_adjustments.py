"""Stage-2 strategy depth on the chosen condor: regime-adaptive and skew/divergence-aware wings,
and the chain-level entry checks (VRP against the ATM IV, breach probability, liquidity).

Rules decided here where the seed gives only the idea:
- Wings stay within the user's bounds. Every adjustment below is applied to the current search
  range and then clamped into ``[strategy.wing_width_min, strategy.wing_width_max]``, one after
  the other in this order:
  1. regime: both ends scaled by ``regime.wing_scale_crash`` in CRASH_MODE and
     ``regime.wing_scale_low_vol`` in LOW_VOL_RANGE (both sides);
  2. skew: a steep put skew widens the put wing by ``strategy.skew_put_wing_increment``
     (seed §3: W_put = W_base + ΔW);
  3. divergence: a SPY/QQQ divergence (|z| > ``filters.divergence_z``) widens the threatened
     side's wing by ``filters.divergence_wing_increment``: the put wing when SPY looks rich
     (z > +2, bearish bias), the call wing when it looks cheap.
  With the defaults (5 … 10, ×0.6, ×2, +5, +5): LOW_VOL ×0.6 on 5 … 10 → 3 … 6 → 5 … 6; skew +5
  on 5 … 10 → 10 … 15 → 10 … 10; CRASH ×2 → 10 … 20 → 10 … 10, after which a skew or divergence
  +5 on that side changes nothing. So the adjustments tilt each side towards the narrow or the
  wide end of the user's range and never leave it. An adjustment's note in
  ``WingPlan.adjustments`` names the range it produced; an adjustment that clamping turned
  into a no-op (or a ×1 / +0 setting) leaves no note.
- Steep put skew: the 15-delta skew (IV_put15Δ − IV_call15Δ)/IV_ATM of the nearest expiry in the
  DTE range strictly above a reference. ``filters.skew_rule = "percentile"`` (default): the
  reference is passed in by the caller: the ``filters.skew_percentile``-th percentile of the
  session-close readings of the previous ``filters.skew_lookback_sessions`` sessions
  (``analytics.skew.trailing_skew_reference``, built per bar by ``intelligence.skew_reference``
  / ``core.skew_history``); NaN (too little history, or a caller that passes none) never fires.
  ``"seed"``: the seed's absolute ``filters.skew_threshold`` (0.15); the metric reads about
  0.67-0.77 on the embedded chains and ~0.5-0.8 on real SPX, so that rule fires on every entry.
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
from analytics.skew import SkewMethod, SkewReading, chain_skew


@dataclass(frozen=True)
class WingPlan:
    """Per-side wing-width search ranges in dollars and why they differ from the config."""

    put_range: tuple[float, float]
    call_range: tuple[float, float]
    adjustments: tuple[str, ...] = ()


def skew_reference_for(config, skew_reference: float = math.nan) -> float:
    """The reference the entry skew must exceed under ``filters.skew_rule``: the seed's threshold,
    or ``skew_reference`` (the trailing percentile; NaN = the rule does not fire)."""
    filters = config.filters
    if filters.skew_rule == "seed":
        return float(filters.skew_threshold)
    return float(skew_reference)


def _clamp(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    floor, ceiling = bounds
    return min(max(low, floor), ceiling), min(max(high, floor), ceiling)


def _show_range(pair: tuple[float, float]) -> str:
    return f"{pair[0]:g}-{pair[1]:g}"


def plan_wings(config, regime_name: str, skew: float, divergence_bias: int,
               skew_reference: float = math.nan) -> WingPlan:
    """The wing ranges for this entry (see the module docstring for the rules). ``skew`` is the
    entry bar's 15-delta skew, ``skew_reference`` the percentile rule's reference for this bar
    (ignored under ``skew_rule = "seed"``). Both ranges always lie within
    ``[wing_width_min, wing_width_max]``."""
    strategy, filters, regime = config.strategy, config.filters, config.regime
    bounds = (strategy.wing_width_min, strategy.wing_width_max)
    if not filters.use_entry_gates:
        # The mechanical condor: no Stage-2 adjustment at all.
        return WingPlan(bounds, bounds)
    notes = []
    put = call = bounds
    if regime.use_regime_wings:
        scale = {"CRASH_MODE": regime.wing_scale_crash, "LOW_VOL_RANGE": regime.wing_scale_low_vol}.get(regime_name)
        if scale is not None:
            scaled = _clamp(bounds[0] * scale, bounds[1] * scale, bounds)
            if scaled != bounds:
                put = call = scaled
                notes.append(f"{regime_name} wings x{scale:g} -> {_show_range(scaled)}")
    reference = skew_reference_for(config, skew_reference)
    if strategy.use_skew_penalty and not math.isnan(skew) and not math.isnan(reference) and skew > reference:
        step = strategy.skew_put_wing_increment
        widened = _clamp(put[0] + step, put[1] + step, bounds)
        if widened != put:
            put = widened
            notes.append(f"steep put skew {skew:.3f} > {reference:.3f} put wing +{step:g} -> {_show_range(put)}")
    if filters.use_divergence_bias and divergence_bias in (BEARISH_SPY, BULLISH_SPY):
        step = filters.divergence_wing_increment
        if divergence_bias == BEARISH_SPY:
            widened = _clamp(put[0] + step, put[1] + step, bounds)
            if widened != put:
                put = widened
                notes.append(f"divergence bearish put wing +{step:g} -> {_show_range(put)}")
        else:
            widened = _clamp(call[0] + step, call[1] + step, bounds)
            if widened != call:
                call = widened
                notes.append(f"divergence bullish call wing +{step:g} -> {_show_range(call)}")
    return WingPlan(put, call, tuple(notes))


def nearest_expiry_skew(chain, wing_delta: float = 0.15, method: SkewMethod = "interpolated",
                        ) -> tuple[np.datetime64 | None, SkewReading | None]:
    """The nearest expiry of a chain slice and its skew reading (None, None for an empty slice);
    ``method``: ``analytics.skew.chain_skew``'s reading (IVs interpolated to the exact targets by
    default, ``"nearest"`` for the nearest listed rows)."""
    if len(chain) == 0:
        return None, None
    expiration = chain.expiration.min()
    rows = chain.expiration == expiration
    reading = chain_skew(chain.strike[rows], chain.is_call[rows], chain.delta[rows], chain.iv[rows], chain.spot,
                         wing_delta=wing_delta, method=method)
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
