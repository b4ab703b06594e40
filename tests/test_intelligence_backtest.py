"""The intelligence layer inside the backtest (core/engine.py, core/backtest_engine.py) on three
months of embedded data: the Backtrader and fast drivers agree bitwise (trades, equity and the
rejection counts, including the gated bars the fast driver counts in bulk) with the full layer on
and with the default gated strategy; trades carry their entry context and never open on a gated
bar; dynamic sizing is floor(C x floor(position_size_pct x equity / risk)) within max_alloc; the
engine checks entries in the documented order; the mechanical condor ignores the features.
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from core.backtest_engine import (
    ENTRY_CONTEXT_COLUMNS,
    BacktestSession,
    run_backtrader,
    run_fast,
    trades_frame,
)
from core.config import Config
from core.dto import CONTRACT_MULTIPLIER, Action
from core.engine import TradingEngine, clock_minutes
from core.execution import FillModel
from core.main import _build_parser, _overrides
from core.market_data import embedded_bar_features, embedded_chain_provider
from core.portfolio import Portfolio
from intelligence.features import MEMBERSHIP_COLUMNS, BarFeatures
from intelligence.regime_filter import regime_names
from strategies.condor_adjustments import plan_wings
from strategies.entry_gates import GATE_CODE, bar_gate_codes, gate_summary
from strategies.options_strategy import CondorChoice

NY = "America/New_York"
START, END = dt.date(2016, 1, 4), dt.date(2016, 3, 31)
GATED = Config().override({"backtest.start": START, "backtest.end": END})
FULL = GATED.override({"mtf.use_mtf": True, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True,
                       "sizing.position_size_pct": 0.3})
# Next-bar fills, two entries a day, the fuzzy floor as a gate: the fast driver's bulk counting
# meets pending fills, a daily limit above one and a later gate.
EDGES = GATED.override({"backtest.fill_on_next_bar": True, "strategy.max_entries_per_day": 2,
                        "strategy.max_positions": 2, "mtf.use_mtf": True, "fuzzy.use_fuzzy": True,
                        "fuzzy.min_confidence": 0.74})
# No daily limit and room for every position max_alloc allows: every window bar tries an entry.
NO_LIMITS = GATED.override({"strategy.max_entries_per_day": 0, "strategy.max_positions": 100, "mtf.use_mtf": True})
MECHANICAL = GATED.override({"filters.use_entry_gates": False})
DRIVER_CONFIGS = {"gated": GATED, "full": FULL, "edges": EDGES, "no_limits": NO_LIMITS}
STAGE2_REASONS = {"vrp_below_threshold", "breach_probability_above_max", "illiquid_no_bid", "illiquid_wide_spread"}


@pytest.fixture(scope="module")
def provider():
    return embedded_chain_provider(GATED)


@pytest.fixture(scope="module")
def features(provider):
    return embedded_bar_features(GATED, provider)


@pytest.fixture(scope="module")
def runs(provider, features):
    """Both drivers on every configuration of DRIVER_CONFIGS, on one shared feature table."""
    return {name: (run_fast(config, provider, features=features), run_backtrader(config, provider, features=features))
            for name, config in DRIVER_CONFIGS.items()}


def bar_of(provider, stamps) -> np.ndarray:
    return provider.bar_times.get_indexer(pd.DatetimeIndex(stamps))


def window_bars(provider, config: Config) -> np.ndarray:
    local = provider.bar_times.tz_convert(NY)
    minute = local.hour * 60 + local.minute
    low, high = (clock_minutes(config.strategy.entry_window_start), clock_minutes(config.strategy.entry_window_end))
    return np.flatnonzero((minute >= low) & (minute <= high))


# ------------------------------------------------------------------------------------------------
# driver parity
# ------------------------------------------------------------------------------------------------

def test_the_shared_feature_table_is_the_one_each_scenario_would_build(provider, features):
    own = embedded_bar_features(FULL, provider)
    assert set(own.columns) == set(features.columns)
    for name, values in own.columns.items():
        np.testing.assert_array_equal(values, features.columns[name], err_msg=name)


@pytest.mark.parametrize("name", list(DRIVER_CONFIGS))
def test_backtrader_and_fast_drivers_agree_with_the_intelligence_layer(runs, name):
    fast, slow = runs[name]
    trades_fast, trades_slow = trades_frame(fast.positions), trades_frame(slow.positions)
    pd.testing.assert_frame_equal(trades_fast, trades_slow, check_exact=True)
    pd.testing.assert_frame_equal(fast.equity, slow.equity, check_exact=True)
    assert fast.rejections == slow.rejections
    assert fast.bars == slow.bars == len(fast.equity)
    assert len(trades_fast) >= 5, name
    # Bar gates rejected entries, and something after them too.
    assert set(fast.rejections) & set(GATE_CODE), fast.rejections
    assert set(fast.rejections) - set(GATE_CODE), fast.rejections


def test_the_scenario_gates_show_up_in_the_rejections(runs):
    assert "mtf_consensus_outside_band" not in runs["gated"][0].rejections
    assert runs["full"][0].rejections.get("mtf_consensus_outside_band", 0) > 0
    assert runs["edges"][0].rejections.get("fuzzy_confidence_below_min", 0) > 0
    assert "fuzzy_confidence_below_min" not in runs["full"][0].rejections      # min_confidence 0: sizing only


def test_every_window_bar_is_one_rejection_or_one_entry(provider, features, runs):
    window = window_bars(provider, NO_LIMITS)
    codes = bar_gate_codes(features.columns, NO_LIMITS)
    for result in runs["no_limits"]:
        assert sum(result.rejections.values()) + len(result.positions) == len(window)
        gated = {reason: count for reason, count in result.rejections.items() if reason in GATE_CODE}
        assert gated == gate_summary(codes[window])


# ------------------------------------------------------------------------------------------------
# what a trade carries
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, config", [("gated", GATED), ("full", FULL)])
def test_trades_carry_their_entry_context(provider, features, runs, name, config):
    trades = trades_frame(runs[name][0].positions)
    assert list(trades.columns[-len(ENTRY_CONTEXT_COLUMNS):]) == list(ENTRY_CONTEXT_COLUMNS)
    numeric = ["confidence", "fuzzy_ft", "mu_neural", *MEMBERSHIP_COLUMNS.values(), "mtf_consensus", "iv_rank",
               "skew", "iv_atm", "vrp", "breach_probability", "realized_vol"]
    assert trades[numeric].notna().all().all(), trades[numeric].isna().sum()
    bars = bar_of(provider, trades["entry_time"])
    assert (bars >= 0).all()
    columns = features.columns
    # Same-bar fills: the context is the features of the entry bar, which passed every gate.
    assert (bar_gate_codes(columns, config)[bars] == 0).all()
    np.testing.assert_array_equal(trades["confidence"].to_numpy(float), columns["confidence"][bars])
    np.testing.assert_array_equal(trades["mu_mtf"].to_numpy(float), columns["mu_mtf"][bars])
    assert list(trades["regime"]) == list(regime_names(columns["regime"][bars]))
    assert (trades["vrp"] > config.filters.vrp_threshold).all()
    np.testing.assert_allclose(trades["vrp"], trades["iv_atm"] - trades["realized_vol"], rtol=1e-12)
    assert (trades["breach_probability"] <= config.filters.max_breach_probability).all()
    if config.mtf.use_mtf:
        assert trades["mtf_consensus"].between(config.mtf.consensus_min, config.mtf.consensus_max).all()


def test_gated_wings_follow_the_plan_of_the_entry_bar(provider, features, runs):
    trades = trades_frame(runs["gated"][0].positions)
    bars = bar_of(provider, trades["entry_time"])
    adjusted = 0
    for trade, bar in zip(trades.itertuples(), bars):
        plan = plan_wings(GATED, trade.regime, trade.skew, int(features.columns["divergence_bias"][bar]))
        assert trade.wing_adjustments == "; ".join(plan.adjustments)
        put_width = trade.short_put - trade.long_put
        call_width = trade.long_call - trade.short_call
        # The narrowest listed width in each side's range: on the $1 grid its first whole dollar.
        assert put_width == math.ceil(plan.put_range[0] - 1e-9), (trade, plan)
        assert call_width == math.ceil(plan.call_range[0] - 1e-9), (trade, plan)
        adjusted += bool(plan.adjustments)
    assert adjusted >= 1                    # some trade had its wings changed


# ------------------------------------------------------------------------------------------------
# dynamic sizing
# ------------------------------------------------------------------------------------------------

def expected_contracts(config: Config, equity: float, cash: float, committed: float, width: float, credit: float,
                       confidence: float) -> int:
    risk = (width - credit) * CONTRACT_MULTIPLIER
    allowed = math.floor(config.sizing.position_size_pct * equity / risk)
    wanted = math.floor(confidence * allowed + 1e-9)
    return min(wanted, math.floor((min(config.strategy.max_alloc * equity, cash) - committed) / risk))


@pytest.mark.parametrize("cap", [0.15, 1.0])
def test_dynamic_sizing_on_trades_entered_flat(provider, features, runs, cap):
    """Trades decided while nothing was open: the equity at the decision is the cash after the
    previous bar, so the size can be worked out from equity.csv and trades.csv alone."""
    config = FULL.override({"strategy.max_alloc": cap})
    result = runs["full"][0] if cap == 0.15 else run_fast(config, provider, features=features)
    trades = trades_frame(result.positions)
    equity = result.equity
    bars = bar_of(provider, trades["entry_time"])
    checked = bound_by_confidence = 0
    for trade, bar in zip(trades.itertuples(), bars):
        assert trade.contracts >= 1
        cash = config.backtest.cash if bar == 0 else float(equity["cash"].iloc[bar - 1])
        flat = bar == 0 or equity["open_positions"].iloc[bar - 1] == 0
        width = max(trade.short_put - trade.long_put, trade.long_call - trade.short_call)
        risk = (width - trade.credit) * CONTRACT_MULTIPLIER
        if not flat:
            continue
        expected = expected_contracts(config, cash, cash, 0.0, width, trade.credit, trade.confidence)
        assert trade.contracts == expected, (trade, cash)
        checked += 1
        cap_contracts = math.floor(min(cap * cash, cash) / risk)
        bound_by_confidence += expected < cap_contracts
    assert checked >= 3
    if cap == 1.0:
        assert bound_by_confidence == checked      # the fuzzy size, not max_alloc, decided
        assert trades["contracts"].nunique() > 1
    # Every trade: never more than position_size_pct of the account pays for at C = 1 (the account
    # before a fill is at most 1 % above the highest equity recorded after fills in this run).
    peak = 1.01 * float(equity["equity"].max())
    for trade in trades.itertuples():
        width = max(trade.short_put - trade.long_put, trade.long_call - trade.short_call)
        assert 1 <= trade.contracts <= math.floor(0.3 * peak / ((width - trade.credit) * CONTRACT_MULTIPLIER))


def sizing_engine(config: Config, cash: float = 100_000.0) -> TradingEngine:
    return TradingEngine(config, Portfolio(cash), FillModel.from_config(config.backtest))


def fake_choice(width: float = 5.0) -> CondorChoice:
    return CondorChoice(expiration=np.datetime64("2016-02-19"), dte=30,
                        strikes=np.array([195.0 - width, 195.0, 215.0, 215.0 + width]),
                        bid=np.array([0.4, 1.1, 0.95, 0.3]), ask=np.array([0.5, 1.2, 1.05, 0.4]),
                        short_put_delta=-0.12, short_call_delta=0.10)


def test_size_units():
    dynamic = Config().override({"sizing.dynamic_sizing": True, "sizing.position_size_pct": 0.3,
                                 "fuzzy.use_fuzzy": True, "strategy.max_alloc": 1.0})
    engine = sizing_engine(dynamic)
    # Risk (5 − 1) × 100 = 400 per condor; 0.3 × 100,000 / 400 = 75 condors; C = 0.6 → 45.
    assert engine._size(fake_choice(), 1.0, 100_000.0, 0.0, 0.6) == (45, "max_alloc")
    # C = 0.29: 0.29 × 100 is 28.999999999999996 in floats; it is still 29 condors.
    assert 0.29 * 100 < 29
    one_hundred = dynamic.override({"sizing.position_size_pct": 0.4})      # 40,000 / 400 = 100
    assert sizing_engine(one_hundred)._size(fake_choice(), 1.0, 100_000.0, 0.0, 0.29)[0] == 29
    # max_alloc 0.15: 15,000 / 400 = 37 condors at most.
    capped = sizing_engine(dynamic.override({"strategy.max_alloc": 0.15}))
    assert capped._size(fake_choice(), 1.0, 100_000.0, 0.0, 0.6) == (37, "max_alloc")
    # Committed risk of open condors comes off the budget: (15,000 − 10,000) / 400 = 12.
    assert capped._size(fake_choice(), 1.0, 100_000.0, 10_000.0, 0.6)[0] == 12
    # The cash is the buying power: 8,000 cash / 400 = 20 even though equity is higher.
    assert sizing_engine(dynamic, cash=8_000.0)._size(fake_choice(), 1.0, 100_000.0, 0.0, 0.6)[0] == 20
    # No budget left: 0 contracts, reason max_alloc.
    assert capped._size(fake_choice(), 1.0, 100_000.0, 15_000.0, 0.6) == (0, "max_alloc")


def test_size_units_zero_and_fixed():
    dynamic = Config().override({"sizing.dynamic_sizing": True, "sizing.position_size_pct": 0.3,
                                 "fuzzy.use_fuzzy": True, "strategy.max_alloc": 1.0})
    engine = sizing_engine(dynamic)
    # 0.3 × 2,000 / 400 = 1 condor; C = 0.9 → floor(0.9) = 0.
    assert engine._size(fake_choice(), 1.0, 2_000.0, 0.0, 0.9) == (0, "fuzzy_size_zero")
    assert engine._size(fake_choice(), 1.0, 100_000.0, 0.0, math.nan) == (0, "fuzzy_size_zero")
    # Without fuzzy the scale is 1: floor(0.3 × 100,000 / 400) = 75; too small an account gives 0.
    no_fuzzy = sizing_engine(dynamic.override({"fuzzy.use_fuzzy": False}))
    assert no_fuzzy._size(fake_choice(), 1.0, 100_000.0, 0.0, math.nan)[0] == 75
    assert no_fuzzy._size(fake_choice(), 1.0, 1_000.0, 0.0, 0.9) == (0, "position_size_pct_below_one")
    # Fixed sizing: the configured quantity, cut by max_alloc: 0.15 × 10,000 / 400 = 3.
    fixed = Config().override({"strategy.quantity": 5})
    assert sizing_engine(fixed)._size(fake_choice(), 1.0, 100_000.0, 0.0, 0.1)[0] == 5
    assert sizing_engine(fixed, cash=10_000.0)._size(fake_choice(), 1.0, 10_000.0, 0.0, 0.1)[0] == 3
    # Wider wing: the condor's width is the wider side (10 − 1) × 100 = 900; 30,000 / 900 = 33; × 0.5 = 16.
    wide = fake_choice(10.0)
    assert engine._size(wide, 1.0, 100_000.0, 0.0, 0.5)[0] == 16


# ------------------------------------------------------------------------------------------------
# the order of the entry checks
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def entry_bar(provider, runs):
    """The first bar where the gated strategy opened a condor (every check passed there)."""
    trades = trades_frame(runs["gated"][0].positions)
    return int(bar_of(provider, trades["entry_time"].iloc[:1])[0])


def decide(config: Config, provider, features, bar: int, gate: str | None = None):
    session = BacktestSession(config, provider, features=features)
    if gate is not None:
        session.feature_columns["gate_code"][bar] = GATE_CODE[gate]
    decision = session.engine.entry_decision(session.snapshot(bar), config.backtest.cash, 0, 0.0)
    return decision, session.engine.rejections


IMPOSSIBLE = {"filters.vrp_threshold": 1.0, "filters.max_breach_probability": 0.01,
              "filters.liquidity_max_spread_to_credit": 0.001, "strategy.min_credit_to_width": 0.99,
              "sizing.dynamic_sizing": True, "fuzzy.use_fuzzy": True, "sizing.position_size_pct": 0.001}
# Each check fails while every later one would fail too: the first in the order is reported.
ORDER = [
    ("adx_trending", {}, "adx_trending"),
    # Wings of $100 lie beyond the listed strikes (about ±25 % of spot).
    ("no_put_wing_listed", {"strategy.wing_width_min": 100.0, "strategy.wing_width_max": 100.0}, None),
    ("vrp_below_threshold", {}, None),
    ("breach_probability_above_max", {"filters.vrp_threshold": -1.0}, None),
    ("illiquid_wide_spread", {"filters.vrp_threshold": -1.0, "filters.max_breach_probability": 1.0}, None),
    ("credit_below_minimum", {"filters.vrp_threshold": -1.0, "filters.max_breach_probability": 1.0,
                              "filters.liquidity_max_spread_to_credit": 10.0}, None),
    ("fuzzy_size_zero", {"filters.vrp_threshold": -1.0, "filters.max_breach_probability": 1.0,
                         "filters.liquidity_max_spread_to_credit": 10.0, "strategy.min_credit_to_width": 0.0}, None),
]


@pytest.mark.parametrize("reason, relaxed, gate", ORDER, ids=[o[0] for o in ORDER])
def test_entry_checks_run_in_order(provider, features, entry_bar, reason, relaxed, gate):
    config = GATED.override({**IMPOSSIBLE, **relaxed})
    decision, rejections = decide(config, provider, features, entry_bar, gate)
    assert decision is None
    assert rejections == {reason: 1}


def test_the_entry_bar_opens_with_its_context(provider, features, entry_bar):
    decision, rejections = decide(GATED, provider, features, entry_bar)
    assert rejections == {}
    assert decision.action is Action.OPEN
    context = decision.context
    for key in ("skew", "iv_atm", "vrp", "breach_probability", "wing_adjustments", "regime", "confidence",
                *MEMBERSHIP_COLUMNS.values()):
        assert key in context, key
    assert context["confidence"] == features.columns["confidence"][entry_bar]
    # The mechanical condor skips every Stage-2 check: the impossible VRP/breach/liquidity settings
    # do not stop it.
    mechanical = MECHANICAL.override({k: v for k, v in IMPOSSIBLE.items() if k.startswith("filters.")})
    decision, rejections = decide(mechanical, provider, features, entry_bar)
    assert decision is not None and decision.action is Action.OPEN and rejections == {}
    assert "vrp" not in decision.context and "skew" not in decision.context


# ------------------------------------------------------------------------------------------------
# the mechanical condor
# ------------------------------------------------------------------------------------------------

def test_no_gates_flag_is_the_mechanical_config():
    args = _build_parser(Config()).parse_args(["--no-gates"])
    assert _overrides(args) == {"filters.use_entry_gates": False}
    assert GATED.override(_overrides(args)) == MECHANICAL


def test_mechanical_trades_do_not_depend_on_the_features(provider, features):
    rng = np.random.default_rng(5)
    shuffled = BarFeatures({name: rng.permutation(values) for name, values in features.columns.items()},
                           features.close_ns, features.description)
    real = run_fast(MECHANICAL, provider, features=features)
    other = run_fast(MECHANICAL, provider, features=shuffled)
    trades_real, trades_other = trades_frame(real.positions), trades_frame(other.positions)
    mechanics = [c for c in trades_real.columns if c not in ENTRY_CONTEXT_COLUMNS]
    assert len(trades_real) >= 10
    pd.testing.assert_frame_equal(trades_real[mechanics], trades_other[mechanics], check_exact=True)
    pd.testing.assert_frame_equal(real.equity, other.equity, check_exact=True)
    assert real.rejections == other.rejections
    assert not trades_real["confidence"].equals(trades_other["confidence"])      # the context did move
    # No gate, no Stage-2 check, no wing adjustment: base wings (narrowest of 5 … 10) on both sides.
    assert not set(real.rejections) & (set(GATE_CODE) | STAGE2_REASONS), real.rejections
    assert ((trades_real["short_put"] - trades_real["long_put"]) == 5.0).all()
    assert ((trades_real["long_call"] - trades_real["short_call"]) == 5.0).all()
    assert (trades_real["wing_adjustments"] == "").all()
    assert trades_real[["vrp", "skew", "breach_probability"]].isna().all().all()
    # The gated strategy trades less than the mechanical one on the same bars.
    assert len(trades_frame(run_fast(GATED, provider, features=features).positions)) < len(trades_real)
