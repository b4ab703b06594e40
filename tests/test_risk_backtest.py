"""The risk manager inside backtests (2016 Q1 of the embedded data): both drivers give identical
trades, equity, rejections, risk events and hedges under every rule — Greek caps and the risk
budget, the kill switch with and without flatten, the total drawdown limit, the delta hedge, and
next-bar fills with all of them — and each configuration really exercises its rule. The kill switch
halts a session's entries from the bar it fires and lifts at the next session.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from core.backtest_engine import run_backtest
from core.config import Config
from core.market_data import bar_features, load_market

NY = "America/New_York"
BASE = Config().override({"backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 3, 31),
                          "filters.use_entry_gates": False})
CASES = {
    "caps": {"risk.max_portfolio_delta": 30.0, "risk.max_trade_vega": 20.0, "strategy.quantity": 3,
             "risk.max_account_risk_per_trade": 0.1},
    "kill_switch": {"risk.daily_drawdown_limit": 0.002, "strategy.max_entries_per_day": 3},
    "kill_switch_flatten": {"risk.daily_drawdown_limit": 0.002, "risk.kill_switch_flatten": True},
    "max_drawdown": {"risk.max_drawdown_limit": 0.01, "risk.kill_switch_flatten": True},
    "hedge": {"hedge.enable_hedge": True, "hedge.hedge_threshold": 0.05},
    "everything_next_bar": {"hedge.enable_hedge": True, "hedge.hedge_threshold": 0.05,
                            "risk.daily_drawdown_limit": 0.003, "risk.kill_switch_flatten": True,
                            "risk.max_portfolio_gamma": 8.0, "backtest.fill_on_next_bar": True},
    "dynamic_fuzzy": {"sizing.dynamic_sizing": True, "fuzzy.use_fuzzy": True, "sizing.position_size_pct": 0.2,
                      "risk.max_account_risk_per_trade": 0.1},
}


@pytest.fixture(scope="module")
def market():
    return load_market(BASE)


@pytest.fixture(scope="module")
def runs(market):
    out = {}
    for name, changes in CASES.items():
        config = BASE.override(changes)
        features = bar_features(config, market)
        out[name] = tuple(run_backtest(config.override({"backtest.engine": engine}), market, features=features)
                          for engine in ("fast", "backtrader"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_both_drivers_agree_under_the_risk_rules(runs, name):
    fast, slow = runs[name]
    pd.testing.assert_frame_equal(fast.trades, slow.trades, check_exact=True)
    pd.testing.assert_frame_equal(fast.equity, slow.equity, check_exact=True)
    pd.testing.assert_frame_equal(fast.risk_events, slow.risk_events, check_exact=True)
    pd.testing.assert_frame_equal(fast.hedges, slow.hedges, check_exact=True)
    assert fast.rejections == slow.rejections
    assert len(fast.trades) >= 5


def test_each_case_exercises_its_rule(runs):
    caps = runs["caps"][0]
    assert {"portfolio_delta_cap", "trade_vega_limit"} & set(caps.rejections)
    assert (caps.trades["contracts"] < 3).any()                       # cut below the base of 3
    assert runs["kill_switch"][0].metrics["risk"]["kill_switch_halts"] >= 3
    flattened = runs["kill_switch_flatten"][0]
    assert (flattened.trades["exit_reason"] == "kill_switch").sum() >= 3
    assert (runs["max_drawdown"][0].trades["exit_reason"] == "max_drawdown").sum() >= 1
    assert runs["max_drawdown"][0].metrics["risk"]["max_drawdown_halts"] == 1
    assert len(runs["hedge"][0].hedges) >= 20
    both = runs["everything_next_bar"][0]
    assert len(both.hedges) and both.metrics["risk"]["kill_switch_halts"] and "portfolio_gamma_cap" in both.rejections
    assert runs["dynamic_fuzzy"][0].trades["contracts"].nunique() > 1


def test_the_kill_switch_halts_the_session_and_lifts_at_the_next(runs):
    result = runs["kill_switch"][0]
    halts = result.risk_events[result.risk_events["event"] == "kill_switch_halt"]
    entries = pd.DatetimeIndex(result.trades["entry_time"]).tz_convert(NY)
    entry_days = entries.normalize()
    lifted = 0
    for stamp in pd.DatetimeIndex(halts["timestamp"]).tz_convert(NY):
        day = stamp.normalize()
        # Nothing entered in that session after (or at) the halt bar ...
        assert not ((entry_days == day) & (entries >= stamp)).any(), stamp
        # ... and entries resume in a later session.
        later_days = entry_days[entry_days > day]
        lifted += bool(len(later_days))
        # The reference is the equity at the previous session's last bar.
        equity = result.equity["equity"]
        before = equity[equity.index.tz_convert(NY).normalize() < day]
        row = halts[pd.DatetimeIndex(halts["timestamp"]).tz_convert(NY) == stamp].iloc[0]
        assert row["reference_equity"] == before.iloc[-1]
        assert row["reference_equity"] - row["equity"] > 0.002 * row["reference_equity"]
    assert lifted >= 2


def test_flatten_closes_every_condor_and_the_hedge_at_the_halt_bar(runs):
    result = runs["everything_next_bar"][0]
    flattens = result.risk_events[result.risk_events["event"] == "flatten"]
    assert len(flattens)
    for stamp in flattens["timestamp"]:
        # Next-bar fills: the closes decided at the halt bar fill one bar later; after that bar
        # nothing is open and no hedge is held.
        position = result.equity.index.get_loc(stamp)
        after = result.equity.iloc[position + 1]
        assert after["open_positions"] == 0 and after["hedge_shares"] == 0, stamp


def test_hedged_bars_stay_within_the_threshold_between_hedges(runs):
    result = runs["hedge"][0]
    equity = result.equity
    open_contracts = equity["open_positions"].to_numpy()       # 1 contract per condor here
    limit = 0.05 * 100.0 * open_contracts
    beyond = np.abs(equity["net_delta"].to_numpy()) > limit + 1e-9
    hedge_bars = set(equity.index.get_indexer(pd.DatetimeIndex(result.hedges["timestamp"])))
    # Same-bar fills: at every bar the engine hedges whatever is beyond the threshold and the
    # record is taken after the fill, so no recorded bar may be left beyond it, and a hedged bar
    # is back within half a share of neutral.
    assert not [bar for bar in np.flatnonzero(beyond) if bar not in hedge_bars]
    for bar in hedge_bars:
        if open_contracts[bar]:
            assert abs(equity["net_delta"].iloc[bar]) <= 0.5 + 1e-9
