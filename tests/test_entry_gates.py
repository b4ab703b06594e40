"""Stage-2 entry gates (strategies/entry_gates.py) on hand-built feature columns: each gate fires
just past its threshold and not at it, the first failing gate in ``GATE_REASONS`` order is the
one reported, NaN inputs give the warm-up code only for enabled gates, and the switches. Then the
chain-level adjustments (strategies/condor_adjustments.py): wing plans, breach probability,
liquidity, the skew reading, and ``choose_iron_condor`` with per-side wing ranges on a real
synthetic chain slice.
"""
from __future__ import annotations

import datetime as dt
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analytics.skew import chain_skew
from core.config import Config
from core.market_data import embedded_chain_provider
from strategies.condor_adjustments import (
    WingPlan,
    breach_probability,
    liquidity_problem,
    nearest_expiry_skew,
    plan_wings,
)
from strategies.entry_gates import GATE_CODE, GATE_REASONS, bar_gate_codes, gate_summary
from strategies.options_strategy import CondorChoice, Rejection, choose_iron_condor

NY = "America/New_York"
# Every gate on: the IV-rank floor (off at its default 0), the MTF band and the fuzzy floor.
ALL_GATES = Config().override({"filters.iv_rank_min": 30.0, "mtf.use_mtf": True, "fuzzy.use_fuzzy": True,
                               "fuzzy.min_confidence": 0.5})
# A bar every gate passes (defaults: VIX ≤ 25, move ≤ 2 %, gap ≤ 0.19 % in the first 60 min,
# ADX ≤ 25, RSI in [30, 60], %K in [30, 70], |PSAR position| < 1, band width ≤ 0.02,
# |SMA distance| ≤ 0.02, C in [0.40, 0.60], confidence ≥ 0.5).
QUIET_BAR = {
    "iv_index": 15.0, "iv_rank": 50.0, "recent_move": 0.005, "gap_pct": 0.0005, "minutes_since_open": 30.0,
    "adx": 15.0, "rsi": 45.0, "stoch_k": 50.0, "psar_position": 0.2, "bb_width": 0.01, "sma_distance": 0.001,
    "mtf_consensus": 0.5, "confidence": 0.8,
    # Columns no gate reads.
    "divergence_z": np.nan, "volume_ratio": np.nan,
}


def columns(*rows: dict) -> dict[str, np.ndarray]:
    """Feature columns, one bar per row: QUIET_BAR with the row's changes."""
    bars = [{**QUIET_BAR, **row} for row in rows]
    return {name: np.array([bar[name] for bar in bars], dtype=float) for name in QUIET_BAR}


def codes(config: Config, *rows: dict) -> list[int]:
    return bar_gate_codes(columns(*rows), config).tolist()


def above(x: float) -> float:
    return float(np.nextafter(x, np.inf))


def below(x: float) -> float:
    return float(np.nextafter(x, -np.inf))


# (reason, changes that sit exactly at the threshold and pass, changes just past it that fail)
THRESHOLDS = [
    ("vix_above_max", [{"iv_index": 25.0}], [{"iv_index": above(25.0)}, {"iv_index": 80.0}]),
    ("iv_rank_below_min", [{"iv_rank": 30.0}], [{"iv_rank": below(30.0)}, {"iv_rank": 0.0}]),
    ("recent_move_above_cap", [{"recent_move": 0.02}], [{"recent_move": above(0.02)}]),
    ("large_gap_open", [{"gap_pct": 0.0019}, {"gap_pct": 0.01, "minutes_since_open": 65.0}],
     [{"gap_pct": above(0.0019)}, {"gap_pct": 0.01, "minutes_since_open": 60.0},
      {"gap_pct": 0.01, "minutes_since_open": 5.0}]),
    ("adx_trending", [{"adx": 25.0}], [{"adx": above(25.0)}]),
    ("rsi_outside_neutral", [{"rsi": 30.0}, {"rsi": 60.0}], [{"rsi": below(30.0)}, {"rsi": above(60.0)}]),
    ("stoch_outside_neutral", [{"stoch_k": 30.0}, {"stoch_k": 70.0}],
     [{"stoch_k": below(30.0)}, {"stoch_k": above(70.0)}]),
    # |P| is clipped to 1, so the gate is |P| >= 1 (price `scale` ATRs or more beyond the SAR).
    ("psar_trend", [{"psar_position": below(1.0)}, {"psar_position": above(-1.0)}],
     [{"psar_position": 1.0}, {"psar_position": -1.0}]),
    ("bbands_expansion", [{"bb_width": 0.02}], [{"bb_width": above(0.02)}]),
    ("sma_distance_too_large", [{"sma_distance": 0.02}, {"sma_distance": -0.02}],
     [{"sma_distance": above(0.02)}, {"sma_distance": below(-0.02)}]),
    ("mtf_consensus_outside_band", [{"mtf_consensus": 0.4}, {"mtf_consensus": 0.6}],
     [{"mtf_consensus": below(0.4)}, {"mtf_consensus": above(0.6)}]),
    ("fuzzy_confidence_below_min", [{"confidence": 0.5}], [{"confidence": below(0.5)}]),
]
# One clearly failing change per gate (for the priority and switch tests).
FAILING = {reason: fails[-1] for reason, _, fails in THRESHOLDS}


def test_gate_reasons_are_in_the_documented_priority_order():
    assert GATE_REASONS == (
        "", "features_warmup", "vix_above_max", "iv_rank_below_min", "recent_move_above_cap", "large_gap_open",
        "adx_trending", "rsi_outside_neutral", "stoch_outside_neutral", "psar_trend", "bbands_expansion",
        "sma_distance_too_large", "mtf_consensus_outside_band", "fuzzy_confidence_below_min")
    assert all(GATE_REASONS[GATE_CODE[reason]] == reason for reason in GATE_CODE)
    assert set(FAILING) == set(GATE_CODE) - {"features_warmup"}


def test_a_quiet_bar_passes_every_gate():
    assert codes(ALL_GATES, {}) == [0]


@pytest.mark.parametrize("reason, passing, failing", THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_each_gate_fires_past_its_threshold_and_not_at_it(reason, passing, failing):
    got = codes(ALL_GATES, {}, *passing, *failing)
    assert got == [0] * (1 + len(passing)) + [GATE_CODE[reason]] * len(failing)


@pytest.mark.parametrize("first, second", list(itertools.combinations(FAILING, 2)))
def test_the_first_failing_gate_in_priority_order_wins(first, second):
    assert GATE_CODE[first] < GATE_CODE[second]
    assert codes(ALL_GATES, {**FAILING[first], **FAILING[second]}, {**FAILING[second]}) == \
        [GATE_CODE[first], GATE_CODE[second]]


def test_every_gate_failing_reports_the_first():
    every = {key: value for change in FAILING.values() for key, value in change.items()}
    assert codes(ALL_GATES, every) == [GATE_CODE["vix_above_max"]]


# (gate, the switch that turns it off)
SWITCHES = [
    ("vix_above_max", {"filters.use_vix_gate": False}),
    ("iv_rank_below_min", {"filters.iv_rank_min": 0.0}),
    ("recent_move_above_cap", {"filters.use_volatility_cap": False}),
    ("large_gap_open", {"filters.use_gap_rule": False}),
    ("large_gap_open", {"filters.gap_rule_minutes": 0}),
    ("adx_trending", {"momentum.use_adx_filter": False}),
    ("rsi_outside_neutral", {"momentum.use_rsi_filter": False}),
    ("stoch_outside_neutral", {"momentum.use_stoch_filter": False}),
    ("psar_trend", {"trend.use_psar_filter": False}),
    ("bbands_expansion", {"trend.use_bbands_filter": False}),
    ("sma_distance_too_large", {"trend.use_sma_filter": False}),
    ("mtf_consensus_outside_band", {"mtf.use_mtf": False}),
    ("fuzzy_confidence_below_min", {"fuzzy.use_fuzzy": False}),
    ("fuzzy_confidence_below_min", {"fuzzy.min_confidence": 0.0}),
]
# The column each gate's warm-up reads.
GATE_INPUT = {"vix_above_max": "iv_index", "iv_rank_below_min": "iv_rank", "recent_move_above_cap": "recent_move",
              "large_gap_open": "gap_pct", "adx_trending": "adx", "rsi_outside_neutral": "rsi",
              "stoch_outside_neutral": "stoch_k", "psar_trend": "psar_position", "bbands_expansion": "bb_width",
              "sma_distance_too_large": "sma_distance", "mtf_consensus_outside_band": "mtf_consensus",
              "fuzzy_confidence_below_min": "confidence"}


@pytest.mark.parametrize("reason, switch", SWITCHES, ids=[f"{r}-{next(iter(s))}" for r, s in SWITCHES])
def test_each_switch_turns_its_gate_and_its_warm_up_off(reason, switch):
    config = ALL_GATES.override(switch)
    nan_input = {GATE_INPUT[reason]: np.nan}
    # On: fails, and a NaN input is warm-up. Off: both pass.
    assert codes(ALL_GATES, FAILING[reason], nan_input) == [GATE_CODE[reason], GATE_CODE["features_warmup"]]
    assert codes(config, FAILING[reason], nan_input) == [0, 0]


def test_nan_in_a_column_no_enabled_gate_reads_is_no_warm_up():
    assert codes(ALL_GATES, {"divergence_z": np.nan, "volume_ratio": np.nan}) == [0]
    # The default IV-rank floor is 0 (off): a NaN rank (the first year of data) blocks nothing.
    default = Config()
    assert default.filters.iv_rank_min == 0.0
    assert codes(default, {"iv_rank": np.nan}) == [0]


def test_warm_up_outranks_every_failing_gate():
    assert codes(ALL_GATES, {**FAILING["vix_above_max"], "adx": np.nan},
                 {**FAILING["fuzzy_confidence_below_min"], "mtf_consensus": np.nan}) == \
        [GATE_CODE["features_warmup"]] * 2


def test_no_entry_gates_keeps_only_the_mtf_band_and_the_fuzzy_floor():
    mechanical = ALL_GATES.override({"filters.use_entry_gates": False})
    filters_only = {key: value for reason, change in FAILING.items()
                    if reason not in ("mtf_consensus_outside_band", "fuzzy_confidence_below_min")
                    for key, value in change.items()}
    nan_filters = {name: np.nan for name in ("iv_index", "iv_rank", "adx", "rsi", "stoch_k", "bb_width")}
    assert codes(mechanical, filters_only, nan_filters) == [0, 0]
    assert codes(mechanical, {**filters_only, **FAILING["mtf_consensus_outside_band"]},
                 {**filters_only, **FAILING["fuzzy_confidence_below_min"]},
                 {"mtf_consensus": np.nan}, {"confidence": np.nan}) == \
        [GATE_CODE["mtf_consensus_outside_band"], GATE_CODE["fuzzy_confidence_below_min"],
         GATE_CODE["features_warmup"], GATE_CODE["features_warmup"]]
    # With the scenario switches off as well, nothing gates at all.
    bare = mechanical.override({"mtf.use_mtf": False, "fuzzy.use_fuzzy": False})
    assert codes(bare, {**filters_only, **FAILING["mtf_consensus_outside_band"],
                        **FAILING["fuzzy_confidence_below_min"]}, {"mtf_consensus": np.nan}) == [0, 0]


def test_mtf_band_follows_the_configured_limits():
    narrow = ALL_GATES.override({"mtf.consensus_min": 0.45, "mtf.consensus_max": 0.55})
    assert codes(narrow, {"mtf_consensus": 0.45}, {"mtf_consensus": 0.44}, {"mtf_consensus": 0.56}) == \
        [0, GATE_CODE["mtf_consensus_outside_band"], GATE_CODE["mtf_consensus_outside_band"]]


def test_gate_summary_counts_the_first_failing_gate_per_bar():
    got = codes(ALL_GATES, {}, FAILING["vix_above_max"], FAILING["vix_above_max"], {"adx": np.nan},
                {**FAILING["adx_trending"], **FAILING["fuzzy_confidence_below_min"]})
    assert gate_summary(np.array(got)) == {"vix_above_max": 2, "features_warmup": 1, "adx_trending": 1}


# ------------------------------------------------------------------------------------------------
# wing plans
# ------------------------------------------------------------------------------------------------

BASE = Config()          # wings 5 … 10, crash x2, low-vol x0.6, skew +5, divergence +5
SEED = BASE.override({"filters.skew_rule": "seed"})          # skew +5 above the absolute 0.15
REGIMES = ("CRASH_MODE", "LOW_VOL_RANGE", "BULL_TREND", "BEAR_TREND", "HIGH_VOL_RANGE", "UNKNOWN")


def test_plan_wings_scales_by_regime_within_the_bounds():
    # 5 … 10 x2 = 10 … 20, clamped to the user's maximum.
    assert plan_wings(BASE, "CRASH_MODE", math.nan, 0) == WingPlan((10.0, 10.0), (10.0, 10.0),
                                                                    ("CRASH_MODE wings x2 -> 10-10",))
    # 5 … 10 x0.6 = 3 … 6, clamped to the user's minimum.
    low_vol = plan_wings(BASE, "LOW_VOL_RANGE", math.nan, 0)
    assert low_vol == WingPlan((5.0, 6.0), (5.0, 6.0), ("LOW_VOL_RANGE wings x0.6 -> 5-6",))
    for regime in ("BULL_TREND", "BEAR_TREND", "HIGH_VOL_RANGE", "UNKNOWN"):
        assert plan_wings(BASE, regime, math.nan, 0) == WingPlan((5.0, 10.0), (5.0, 10.0))
    off = BASE.override({"regime.use_regime_wings": False})
    assert plan_wings(off, "CRASH_MODE", math.nan, 0) == WingPlan((5.0, 10.0), (5.0, 10.0))
    # Inside wide bounds the scaling applies in full.
    wide = BASE.override({"strategy.wing_width_min": 2.0, "strategy.wing_width_max": 30.0})
    assert plan_wings(wide, "CRASH_MODE", math.nan, 0).put_range == (4.0, 30.0)
    assert plan_wings(wide, "LOW_VOL_RANGE", math.nan, 0).call_range == (2.0, 18.0)   # 1.2 … 18


def test_a_scaling_that_clamping_undoes_leaves_no_note():
    fixed = BASE.override({"strategy.wing_width_min": 5.0, "strategy.wing_width_max": 5.0})
    for regime in REGIMES:
        assert plan_wings(fixed, regime, 0.9, -1, 0.5) == WingPlan((5.0, 5.0), (5.0, 5.0), ())
    unit = BASE.override({"regime.wing_scale_low_vol": 1.0})
    assert plan_wings(unit, "LOW_VOL_RANGE", math.nan, 0) == WingPlan((5.0, 10.0), (5.0, 10.0))


def test_a_steep_put_skew_widens_the_put_wing_only_within_the_bounds():
    # Percentile rule: above the reference passed in; 5 … 10 + 5 = 10 … 15 → 10 … 10.
    steep = plan_wings(BASE, "HIGH_VOL_RANGE", 0.75, 0, 0.74)
    assert steep.put_range == (10.0, 10.0) and steep.call_range == (5.0, 10.0)
    assert steep.adjustments == ("steep put skew 0.750 > 0.740 put wing +5 -> 10-10",)
    # At the reference (strictly greater is steep), a NaN skew or reference, a 4-argument call
    # (no reference), and with the penalty off: unchanged.
    for skew, reference, config in ((0.74, 0.74, BASE), (math.nan, 0.74, BASE), (0.75, math.nan, BASE),
                                    (0.5, 0.1, BASE.override({"strategy.use_skew_penalty": False}))):
        assert plan_wings(config, "HIGH_VOL_RANGE", skew, 0, reference) == WingPlan((5.0, 10.0), (5.0, 10.0))
    assert plan_wings(BASE, "HIGH_VOL_RANGE", 0.9, 0) == WingPlan((5.0, 10.0), (5.0, 10.0))
    smaller = BASE.override({"strategy.skew_put_wing_increment": 2.0})
    assert plan_wings(smaller, "HIGH_VOL_RANGE", 0.12, 0, 0.1).put_range == (7.0, 10.0)


def test_the_seed_rule_uses_the_absolute_threshold_and_ignores_the_reference():
    for reference in (math.nan, 0.9, 0.0):
        steep = plan_wings(SEED, "HIGH_VOL_RANGE", 0.2, 0, reference)
        assert steep.put_range == (10.0, 10.0) and steep.call_range == (5.0, 10.0)
        assert steep.adjustments == ("steep put skew 0.200 > 0.150 put wing +5 -> 10-10",)
        assert plan_wings(SEED, "HIGH_VOL_RANGE", 0.15, 0, reference) == WingPlan((5.0, 10.0), (5.0, 10.0))
    # The positional 4-argument call keeps working.
    assert plan_wings(SEED, "HIGH_VOL_RANGE", 0.2, 0).put_range == (10.0, 10.0)
    bigger = SEED.override({"strategy.skew_put_wing_increment": 2.0, "filters.skew_threshold": 0.1})
    assert plan_wings(bigger, "HIGH_VOL_RANGE", 0.12, 0).put_range == (7.0, 10.0)


def test_divergence_widens_the_threatened_side_within_the_bounds():
    bearish = plan_wings(BASE, "HIGH_VOL_RANGE", 0.0, -1)         # SPY rich vs QQQ: downside
    assert bearish == WingPlan((10.0, 10.0), (5.0, 10.0), ("divergence bearish put wing +5 -> 10-10",))
    bullish = plan_wings(BASE, "HIGH_VOL_RANGE", 0.0, 1)
    assert bullish == WingPlan((5.0, 10.0), (10.0, 10.0), ("divergence bullish call wing +5 -> 10-10",))
    off = BASE.override({"filters.use_divergence_bias": False})
    assert plan_wings(off, "HIGH_VOL_RANGE", 0.0, -1) == WingPlan((5.0, 10.0), (5.0, 10.0))
    step = BASE.override({"filters.divergence_wing_increment": 3.0})
    assert plan_wings(step, "HIGH_VOL_RANGE", 0.0, 1).call_range == (8.0, 10.0)


def test_adjustments_stack_regime_first_and_clamp_at_each_step():
    # CRASH: 10 … 10 on both sides; the skew and divergence +5 change nothing, so no notes.
    assert plan_wings(BASE, "CRASH_MODE", 0.8, -1, 0.7) == WingPlan((10.0, 10.0), (10.0, 10.0),
                                                                     ("CRASH_MODE wings x2 -> 10-10",))
    # LOW_VOL: 5 … 6; skew +5 → 10 … 11 → 10 … 10 (put); divergence bullish +5 → 10 … 10 (call).
    plan = plan_wings(BASE, "LOW_VOL_RANGE", 0.8, 1, 0.7)
    assert plan == WingPlan((10.0, 10.0), (10.0, 10.0),
                            ("LOW_VOL_RANGE wings x0.6 -> 5-6", "steep put skew 0.800 > 0.700 put wing +5 -> 10-10",
                             "divergence bullish call wing +5 -> 10-10"))
    # Skew then a bearish divergence on the same side: the second is a no-op at the maximum.
    plan = plan_wings(BASE, "HIGH_VOL_RANGE", 0.8, -1, 0.7)
    assert plan.put_range == (10.0, 10.0) and len(plan.adjustments) == 1
    wide = BASE.override({"strategy.wing_width_min": 2.0, "strategy.wing_width_max": 30.0})
    plan = plan_wings(wide, "CRASH_MODE", 0.8, -1, 0.7)          # (4, 30) + 5 + 5 = (14, 30)
    assert plan.put_range == (14.0, 30.0) and plan.call_range == (4.0, 30.0) and len(plan.adjustments) == 3


BOUNDS = [(5.0, 10.0), (1.0, 1.5), (2.0, 30.0), (5.0, 5.0), (0.5, 100.0), (40.0, 60.0)]
SCALES = [(2.0, 0.6), (0.1, 10.0), (1.0, 1.0)]


@pytest.mark.parametrize("bounds", BOUNDS, ids=[f"{lo:g}-{hi:g}" for lo, hi in BOUNDS])
@pytest.mark.parametrize("scales", SCALES, ids=[f"x{c:g}-x{v:g}" for c, v in SCALES])
def test_every_plan_stays_within_the_users_bounds(bounds, scales):
    low, high = bounds
    for rule, gates in itertools.product(("percentile", "seed"), (True, False)):
        config = BASE.override({"strategy.wing_width_min": low, "strategy.wing_width_max": high,
                                "regime.wing_scale_crash": scales[0], "regime.wing_scale_low_vol": scales[1],
                                "filters.skew_rule": rule, "filters.use_entry_gates": gates})
        for regime, skew, reference, bias in itertools.product(
                REGIMES, (math.nan, 0.0, 0.2, 0.72, 0.9), (math.nan, 0.1, 0.72), (-1, 0, 1)):
            plan = plan_wings(config, regime, skew, bias, reference)
            for side in (plan.put_range, plan.call_range):
                assert low <= side[0] <= side[1] <= high, (config.filters.skew_rule, regime, skew, bias, plan)
            # A note for each adjustment that changed a range, none otherwise.
            changed = plan.put_range != bounds or plan.call_range != bounds
            assert bool(plan.adjustments) == changed, plan
            if not gates:
                assert plan == WingPlan(bounds, bounds, ())


def test_the_mechanical_condor_gets_the_base_ranges():
    mechanical = BASE.override({"filters.use_entry_gates": False})
    for regime, skew, bias in (("CRASH_MODE", 0.5, -1), ("LOW_VOL_RANGE", 0.3, 1)):
        assert plan_wings(mechanical, regime, skew, bias, 0.1) == WingPlan((5.0, 10.0), (5.0, 10.0), ())


# ------------------------------------------------------------------------------------------------
# breach probability and liquidity
# ------------------------------------------------------------------------------------------------

def condor_choice(bid, ask, put_delta=-0.12, call_delta=0.10) -> CondorChoice:
    return CondorChoice(expiration=np.datetime64("2016-02-19"), dte=30,
                        strikes=np.array([190.0, 195.0, 215.0, 220.0]), bid=np.asarray(bid, dtype=float),
                        ask=np.asarray(ask, dtype=float), short_put_delta=put_delta, short_call_delta=call_delta)


# Exact binary fractions: mids 0.3125, 1.0625, 0.5625, 0.3125 → mid credit 1.0; spread 4 × 0.125.
LIQUID_BID = [0.25, 1.0, 0.5, 0.25]
LIQUID_ASK = [0.375, 1.125, 0.625, 0.375]


@pytest.mark.parametrize("put_delta, call_delta, expected", [
    (-0.12, 0.10, 0.24), (-0.10, 0.20, 0.40), (-0.30, 0.05, 0.60), (-0.50, 0.10, 1.0), (-0.70, 0.90, 1.0),
])
def test_breach_probability_is_twice_the_larger_short_delta_capped(put_delta, call_delta, expected):
    choice = condor_choice(LIQUID_BID, LIQUID_ASK, put_delta, call_delta)
    assert breach_probability(choice) == pytest.approx(expected, abs=1e-15)


def test_liquidity_problem_cases():
    assert liquidity_problem(condor_choice(LIQUID_BID, LIQUID_ASK), 0.5) is None      # 0.5 ≤ 0.5 × 1.0
    assert liquidity_problem(condor_choice(LIQUID_BID, LIQUID_ASK), 0.49) == "illiquid_wide_spread"
    # Short legs need a bid; every leg needs an ask; a long leg may have no bid.
    assert liquidity_problem(condor_choice([0.25, 0.0, 0.5, 0.25], LIQUID_ASK), 10.0) == "illiquid_no_bid"
    assert liquidity_problem(condor_choice([0.25, 1.0, 0.0, 0.25], LIQUID_ASK), 10.0) == "illiquid_no_bid"
    assert liquidity_problem(condor_choice(LIQUID_BID, [0.0, 1.125, 0.625, 0.375]), 10.0) == "illiquid_no_bid"
    assert liquidity_problem(condor_choice([0.0, 1.0, 0.5, 0.0], [0.125, 1.125, 0.625, 0.125]), 10.0) is None
    # No credit at mid is never liquid enough.
    assert liquidity_problem(condor_choice([1.0, 0.25, 0.25, 1.0], [1.125, 0.375, 0.375, 1.125]), 10.0) == \
        "illiquid_wide_spread"


# ------------------------------------------------------------------------------------------------
# wings on a real chain slice
# ------------------------------------------------------------------------------------------------

CHAIN_DAY = dt.date(2016, 1, 12)
CHAIN_CONFIG = Config().override({"backtest.start": CHAIN_DAY, "backtest.end": dt.date(2016, 1, 13)})


@pytest.fixture(scope="module")
def chain():
    provider = embedded_chain_provider(CHAIN_CONFIG, start=CHAIN_DAY, end=CHAIN_DAY)
    bar = provider.bar_index(pd.Timestamp(f"{CHAIN_DAY} 10:30", tz=NY))
    strategy = CHAIN_CONFIG.strategy
    return provider.slice_at(bar, dte_min=strategy.dte_min, dte_max=strategy.dte_max)


def listed(chain, expiration, is_call: bool) -> set[float]:
    rows = (chain.expiration == expiration) & (chain.is_call == is_call)
    return set(chain.strike[rows].tolist())


def test_choose_iron_condor_picks_per_side_widths_in_the_plans_ranges(chain):
    plain = choose_iron_condor(chain, CHAIN_CONFIG)
    assert isinstance(plain, CondorChoice)
    assert (plain.put_width, plain.call_width) == (5.0, 5.0)        # narrowest of 5 … 10 on a $1 grid
    for plan, widths in ((WingPlan((8.0, 12.0), (3.0, 4.0)), (8.0, 3.0)),
                         (WingPlan((2.5, 4.0), (6.5, 9.0)), (3.0, 7.0)),
                         (plan_wings(CHAIN_CONFIG, "HIGH_VOL_RANGE", 0.75, 0, 0.7), (10.0, 5.0)),
                         (plan_wings(CHAIN_CONFIG, "CRASH_MODE", math.nan, 1), (10.0, 10.0)),
                         (plan_wings(CHAIN_CONFIG, "LOW_VOL_RANGE", math.nan, 0), (5.0, 5.0))):
        choice = choose_iron_condor(chain, CHAIN_CONFIG, plan)
        assert isinstance(choice, CondorChoice), plan
        assert (choice.put_width, choice.call_width) == widths, plan
        assert choice.width == max(widths)
        # The wings move; the short strikes and the expiry do not.
        assert choice.strikes[1] == plain.strikes[1] and choice.strikes[2] == plain.strikes[2]
        assert choice.expiration == plain.expiration
        assert choice.strikes[0] in listed(chain, choice.expiration, False)
        assert choice.strikes[3] in listed(chain, choice.expiration, True)
        # The quotes carried are those of the four chosen contracts.
        for leg, (strike, is_call) in enumerate(zip(choice.strikes, (False, False, True, True))):
            row = np.flatnonzero((chain.expiration == choice.expiration) & (chain.strike == strike)
                                 & (chain.is_call == is_call))
            assert (choice.bid[leg], choice.ask[leg]) == (chain.bid[row[0]], chain.ask[row[0]])


def test_a_wing_range_without_a_listed_strike_is_rejected(chain):
    # No whole dollar in 2.5 … 2.7: only 2.5 is tried, and the $1 grid lists no such strike.
    assert choose_iron_condor(chain, CHAIN_CONFIG, WingPlan((2.5, 2.7), (5.0, 10.0))) == \
        Rejection("no_put_wing_listed")
    assert choose_iron_condor(chain, CHAIN_CONFIG, WingPlan((5.0, 10.0), (2.5, 2.7))) == \
        Rejection("no_call_wing_listed")


def test_nearest_expiry_skew_reads_the_nearest_expiry(chain):
    expiration, reading = nearest_expiry_skew(chain)
    assert expiration == chain.expiration.min()
    rows = chain.expiration == expiration
    expected = chain_skew(chain.strike[rows], chain.is_call[rows], chain.delta[rows], chain.iv[rows], chain.spot)
    assert reading == expected and reading.is_valid
    # A put skew: the 15-delta put is priced richer than the 15-delta call.
    assert reading.skew > 0.0 and reading.iv_atm > 0.0
    empty = chain.select(np.zeros(len(chain), dtype=bool))
    assert nearest_expiry_skew(empty) == (None, None)
