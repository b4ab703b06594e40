"""What the optimizer's trials share is computed once (the entry-candidate memo, the quote-path
memo, the re-blended feature table) and changes no result: a trial equals a standalone
``run_backtest`` of its configuration in a fresh state — trades, equity, rejections, risk events
and hedges — whatever ran before it in the process, with either driver."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

import core.optimizer as optimizer
from core.backtest_engine import run_backtest
from core.config import Config
from core.engine import CandidateMemo
from core.market import BarWindow, MarketMemo
from core.market_data import bar_features, load_market

BASE = Config().override({
    "backtest.start": dt.date(2015, 8, 3), "backtest.end": dt.date(2015, 10, 30), "backtest.engine": "fast",
    "mtf.use_mtf": True, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True, "mamba.use_neural": False,
    "backtest.cash": 100_000.0,
})
# Trials of different phases, run in this order in one process: exits/risk, structure, filters
# (gate-only and regime), momentum, PSAR (a rebuilt feature table), fuzzy weights, hedging and a
# kill switch that fires (Aug-Sep 2015).
TRIALS = [
    {},
    {"exits.profit_take_pct": 0.7, "exits.max_hold_days": 21},
    {"strategy.target_short_delta_low": 0.12, "strategy.min_credit_to_width": 0.15},
    {"filters.iv_rank_min": 20.0, "filters.vix_threshold": 40.0},
    {"filters.vix_threshold_low": 15.0},
    {"momentum.rsi_neutral_min": 40.0, "momentum.use_adx_filter": False},
    {"trend.psar_acceleration": 0.025},
    {"fuzzy.fuzzy_weight_mtf": 0.25, "fuzzy.fuzzy_weight_neural": 0.1},
    {"hedge.enable_hedge": True, "hedge.hedge_threshold": 0.05},
    {"risk.daily_drawdown_limit": 0.004, "risk.kill_switch_flatten": True},
    {"strategy.min_credit_to_width": 0.2},            # the first trial's candidates, another credit test
    {"risk.max_account_risk_per_trade": 0.002},       # sized to zero on every bar: nothing opens
    {"risk.max_account_risk_per_trade": 0.004, "exits.profit_take_pct": 0.6},   # some sized to zero
    {},
]


def _same_run(memo_run, fresh) -> None:
    pd.testing.assert_frame_equal(memo_run.trades, fresh.trades)
    pd.testing.assert_frame_equal(memo_run.equity, fresh.equity)
    pd.testing.assert_frame_equal(memo_run.risk_events, fresh.risk_events)
    pd.testing.assert_frame_equal(memo_run.hedges, fresh.hedges)
    assert memo_run.rejections == fresh.rejections
    assert memo_run.metrics["net_profit"] == fresh.metrics["net_profit"]


@pytest.fixture(scope="module")
def market():
    return load_market(BASE)


def test_trials_through_the_memos_equal_fresh_standalone_runs(market):
    memo_quotes = MarketMemo(market)
    runs = []
    for overrides in TRIALS:
        config = BASE.override(overrides)
        features = bar_features(config, market)
        memo = optimizer.candidate_memo(config, market, features)
        runs.append(run_backtest(config, memo_quotes, features=features, candidates=memo))
    assert memo_quotes.hits > 0, "the quote memo was never used: the test would prove nothing"
    assert any(len(m.by_time) for m in optimizer._memos.values())
    kinds = set()
    for overrides, memo_run in zip(TRIALS, runs):
        config = BASE.override(overrides)
        fresh = run_backtest(config, market, features=bar_features(config, market))   # no memo at all
        _same_run(memo_run, fresh)
        kinds.update(memo_run.risk_events["event"])
    assert len(runs[0].trades) > 5
    assert "kill_switch_halt" in kinds, "the kill-switch trial should fire in Aug-Sep 2015"
    assert len(runs[8].hedges) > 0


def test_the_per_bar_driver_through_the_memos_gives_the_same_trades(market):
    config = BASE.override({"backtest.engine": "backtrader", "exits.profit_take_pct": 0.6})
    features = bar_features(config, market)
    memo = optimizer.candidate_memo(config, market, features)
    warm = run_backtest(config.override({"backtest.engine": "fast"}), market, features=features, candidates=memo)
    assert len(memo.by_time) > 0
    through_memo = run_backtest(config, MarketMemo(market), features=features, candidates=memo)
    pd.testing.assert_frame_equal(through_memo.trades, warm.trades)
    assert through_memo.rejections == warm.rejections


def test_a_memo_known_rejection_is_skipped_and_still_counted(market):
    config = BASE.override({"strategy.min_credit_to_width": 0.2})     # many credit rejections
    features = bar_features(config, market)
    memo = CandidateMemo()
    first = run_backtest(config, market, features=features, candidates=memo)
    second = run_backtest(config, market, features=features, candidates=memo)
    assert first.rejections.get("credit_below_minimum", 0) > 10
    assert second.rejections == first.rejections
    assert second.bars == first.bars
    pd.testing.assert_frame_equal(second.trades, first.trades)


class _CountingSteps:
    def __init__(self, monkeypatch):
        import core.backtest_engine as backtest_engine

        self.count = 0
        step = backtest_engine.BacktestSession.step

        def counted(session, bar):
            self.count += 1
            return step(session, bar)

        monkeypatch.setattr(backtest_engine.BacktestSession, "step", counted)


@pytest.mark.parametrize("risk_per_trade", [0.002, 0.004])
def test_sizing_refusals_on_an_account_holding_nothing_are_skipped_still_counted_and_logged(
        market, monkeypatch, risk_per_trade):
    # 0.2 % of $100k is below one condor's max loss on every bar; 0.4 % is above it on some.
    config = BASE.override({"risk.max_account_risk_per_trade": risk_per_trade})
    features = bar_features(config, market)
    fresh = run_backtest(config, market, features=features)
    memo = CandidateMemo()
    run_backtest(config, market, features=features, candidates=memo)
    steps = _CountingSteps(monkeypatch)
    through_memo = run_backtest(config, market, features=features, candidates=memo)
    refused = fresh.rejections.get("risk_budget", 0)
    assert refused > 20, fresh.rejections
    _same_run(through_memo, fresh)
    assert (fresh.risk_events["reason"] == "risk_budget").any()
    if risk_per_trade == 0.002:
        assert len(fresh.trades) == 0
        # Only the first bar and the end were stepped: each refusal was known from the memo.
        assert steps.count < 5, steps.count
    else:
        assert len(fresh.trades) > 0


def test_memos_are_keyed_by_what_a_candidate_reads(market):
    features = bar_features(BASE, market)
    memo = optimizer.candidate_memo(BASE, market, features)
    gate_only = BASE.override({"filters.iv_rank_min": 30.0, "filters.vix_threshold": 30.0,
                               "exits.profit_take_pct": 0.9, "fuzzy.fuzzy_weight_rsi": 0.15})
    assert optimizer.candidate_memo(gate_only, market, bar_features(gate_only, market)) is memo
    psar = BASE.override({"trend.psar_max_acceleration": 0.25})
    rebuilt = bar_features(psar, market)
    assert rebuilt is not features                                    # another table, same candidate columns
    assert optimizer.candidate_memo(psar, market, rebuilt) is memo
    credit = BASE.override({"strategy.min_credit_to_width": 0.2})    # tested after the memo
    assert optimizer.candidate_memo(credit, market, bar_features(credit, market)) is memo
    for changes in ({"strategy.wing_width_min": 10.0}, {"filters.vrp_threshold": 0.05},
                    {"filters.vix_threshold_low": 15.0}, {"regime.wing_scale_low_vol": 0.8},
                    {"backtest.fill_model": "mid"}):
        other = BASE.override(changes)
        assert optimizer.candidate_memo(other, market, bar_features(other, market)) is not memo, changes


def test_quote_path_memo_slices_are_what_a_fresh_request_gives(market):
    memo = MarketMemo(market)
    bar = 2_000
    expiry = market.expirations_at(bar, 20, 45)[0]
    chain = market.slice_at(bar, 20, 45, expiry=expiry)
    strikes = np.sort(np.unique(chain.strike))[8:12].astype(float)
    is_call = np.array([False, False, True, True])
    requests = [(bar, bar + 100), (bar + 20, bar + 60), (bar - 30, bar + 10), (bar + 90, bar + 400),
                (bar + 600, bar + 700)]
    for start, stop in requests:
        got = memo.quote_contracts(start, stop, expiry.item(), strikes, is_call)
        want = market.quote_contracts(start, stop, expiry.item(), strikes, is_call)
        assert got.bar_start == start and len(got) == stop - start
        for name in ("bar_time_ns", "spot", "bid", "ask", "mid", "delta", "gamma", "vega", "theta"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{start}:{name}")
    assert memo.hits >= 1 and memo.misses >= 3


def test_a_window_of_the_memo_market_equals_a_window_of_the_market(market):
    n = len(market.bar_times)
    config = BASE.override({"exits.max_hold_days": 14})
    features = bar_features(config, market)
    window = (n // 3, n)
    plain = run_backtest(config, BarWindow(market, *window), features=features.window(*window))
    memo = run_backtest(config, BarWindow(MarketMemo(market), *window), features=features.window(*window),
                        candidates=optimizer.candidate_memo(config, market, features))
    _same_run(memo, plain)
    assert len(plain.trades) > 0
