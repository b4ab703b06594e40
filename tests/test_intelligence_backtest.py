"""The intelligence layer inside the backtest (core/engine.py, core/backtest_engine.py) on three
months of embedded data: the Backtrader and fast drivers agree bitwise (trades, equity and the
rejection counts, including the gated bars the fast driver counts in bulk) with the full layer on
and with the default gated strategy; trades carry their entry context and never open on a gated
bar; dynamic sizing is max(1, floor(C x floor(position_size_pct x equity / risk))) within the risk
budget, max_alloc and the Greek caps; the
engine checks entries in the documented order; the mechanical condor ignores the features.
(The risk manager's sizing chain itself is tested in tests/test_risk_manager.py.)
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
from core.engine import clock_minutes
from core.main import _build_parser, _overrides
from core.market_data import embedded_bar_features, embedded_chain_provider
from intelligence.features import MEMBERSHIP_COLUMNS, BarFeatures
from intelligence.regime_filter import regime_names
from risk.risk_manager import Book, max_within_cap
from strategies.condor_adjustments import plan_wings
from strategies.entry_gates import GATE_CODE, bar_gate_codes, gate_summary

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
# No daily limit, room for every position max_alloc allows and no kill switch (its halts are not
# entry attempts): every window bar tries an entry.
NO_LIMITS = GATED.override({"strategy.max_entries_per_day": 0, "strategy.max_positions": 100, "mtf.use_mtf": True,
                            "risk.use_risk_limits": False})
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

def expected_contracts(config: Config, trade, equity: float, cash: float) -> tuple[int, int]:
    """(contracts, the fuzzy size before any cap) of a trade decided with nothing open, by hand:
    the budget position_size_pct pays for, scaled by C (never below one condor), then the risk
    budget, max_alloc, the cash and the Greek caps (the trade's Greeks per condor are in
    trades.csv)."""
    width = max(trade.short_put - trade.long_put, trade.long_call - trade.short_call)
    risk = (width - trade.credit) * CONTRACT_MULTIPLIER
    budget = math.floor(config.sizing.position_size_pct * equity / risk + 1e-9)
    fuzzy = max(1, math.floor(trade.confidence * budget + 1e-9))
    allowed = [fuzzy, math.floor(config.risk.max_account_risk_per_trade * equity / risk + 1e-9),
               math.floor(config.strategy.max_alloc * equity / risk + 1e-9), math.floor(cash / risk + 1e-9)]
    for greek in ("delta", "gamma", "vega", "theta"):
        per_condor = getattr(trade, f"condor_{greek}")
        allowed.append(math.floor(getattr(config.risk, f"max_trade_{greek}") / abs(per_condor) + 1e-9))
        allowed.append(max_within_cap(0.0, per_condor, getattr(config.risk, f"max_portfolio_{greek}")))
    return min(allowed), fuzzy


@pytest.mark.parametrize("cap", [0.15, 1.0])
def test_dynamic_sizing_on_trades_entered_flat(provider, features, runs, cap):
    """Trades decided while nothing was open: the equity at the decision is the cash after the
    previous bar, so the size can be worked out from equity.csv and trades.csv alone."""
    # cap 1.0: no allocation cap, a large risk budget and loose Greek caps, so C decides.
    loose = {"strategy.max_alloc": cap, "risk.max_account_risk_per_trade": 0.25,
             **{f"risk.max_{scope}_{greek}": 1e5 for scope in ("trade", "portfolio")
                for greek in ("delta", "gamma", "vega", "theta")}}
    config = FULL.override(loose) if cap == 1.0 else FULL
    result = runs["full"][0] if cap == 0.15 else run_fast(config, provider, features=features)
    trades = trades_frame(result.positions)
    equity = result.equity
    bars = bar_of(provider, trades["entry_time"])
    checked = bound_by_confidence = 0
    for trade, bar in zip(trades.itertuples(), bars):
        assert trade.contracts >= 1
        cash = config.backtest.cash if bar == 0 else float(equity["cash"].iloc[bar - 1])
        flat = bar == 0 or equity["open_positions"].iloc[bar - 1] == 0
        if not flat:
            continue
        expected, fuzzy = expected_contracts(config, trade, cash, cash)
        assert trade.contracts == expected, (trade, cash)
        checked += 1
        bound_by_confidence += expected == fuzzy
    assert checked >= 3
    if cap == 1.0:
        assert bound_by_confidence == checked
        assert trades["contracts"].nunique() > 1
    # Every trade: never more than position_size_pct of the account pays for at C = 1 (the account
    # before a fill is at most 1 % above the highest equity recorded after fills in this run).
    peak = 1.01 * float(equity["equity"].max())
    for trade in trades.itertuples():
        width = max(trade.short_put - trade.long_put, trade.long_call - trade.short_call)
        assert 1 <= trade.contracts <= math.floor(0.3 * peak / ((width - trade.credit) * CONTRACT_MULTIPLIER))


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
        session.engine.gate_codes[bar] = GATE_CODE[gate]
    cash = config.backtest.cash
    decision = session.engine.entry_decision(session.snapshot(bar), Book(cash, cash))
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
    ("position_size_pct_below_one", {"filters.vrp_threshold": -1.0, "filters.max_breach_probability": 1.0,
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
