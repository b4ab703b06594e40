"""The optimizer with real backtests (the fast driver on short periods of the embedded data):
a walk-forward fit never sees data after its window (BarWindow, feature rows), a trial equals a
standalone ``run_backtest`` of its configuration through the process pool, and the Ray executor
gives the same numbers as a trial run in this process.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

import core.market_data as market_data
from core import optimizer
from core.backtest_engine import run_backtest
from core.config import Config
from core.market import BarWindow, require_market_data
from core.market_data import bar_features, feature_key, load_market
from core.optimizer import (
    SEED_PHASES,
    InlineExecutor,
    Parameter,
    Phase,
    ProcessExecutor,
    SearchSpec,
    Study,
    WalkForwardSpec,
    WorkerContext,
    evaluate,
    install_context,
    open_storage,
    phased_search,
    walk_forward_windows,
)

START, END, LONG_END = "2016-01-04", "2016-03-03", "2016-03-31"
COMPARED = ("net_profit", "max_drawdown", "trade_count", "sharpe")
# A small phase 1: four combinations that trade differently on two months.
SMALL_PHASE = Phase(1, "exits_risk", "Exits & Risk", (Parameter("exits.max_hold_days", (10, 21)),
                                                      Parameter("exits.profit_take_pct", (0.5, 0.9))))


@pytest.fixture(scope="module")
def config() -> Config:
    return Config().override({"backtest.start": START, "backtest.end": END, "backtest.engine": "fast"})


@pytest.fixture(scope="module")
def market(config):
    market = load_market(config)
    bar_features(config, market)
    return market


@pytest.fixture
def installed(monkeypatch):
    """install_context for one test; the module's context is put back afterwards."""
    monkeypatch.setattr(optimizer, "_CONTEXT", None)

    def install(config, market):
        context = WorkerContext(config, market)
        install_context(context)
        return context

    return install


def same(a, b) -> bool:
    """Equal numbers, None and NaN counted as the same (the study keeps non-finite values as None)."""
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == b


def daily_returns(equity: pd.DataFrame, cash: float) -> np.ndarray:
    """Each session's last equity over the previous session's (the first over the cash)."""
    days = equity["equity"].groupby(equity.index.tz_convert("America/New_York").date).last()
    closes = days.to_numpy(dtype=float)
    return closes / np.r_[cash, closes[:-1]] - 1.0


def run_search(storage_url: str, window, phase=SMALL_PHASE, executor=None, samples=None):
    spec = SearchSpec(phases=(phase,), samples=samples, min_trades=1, seed=42)
    study = Study(open_storage(storage_url), "leak", spec, local=True, cash=25_000.0)
    executor = executor or InlineExecutor()
    try:
        return phased_search(study, window, executor)
    finally:
        study.close()


def by_params(search) -> dict:
    return {tuple(sorted(t.params.items())): t for t in search.trials}


# ------------------------------------------------------------------------------------------------
# BarWindow
# ------------------------------------------------------------------------------------------------

def test_bar_window_reaches_nothing_after_its_end(market):
    sessions = market.bar_times.tz_localize(None).normalize()
    starts = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]])
    start, stop = int(starts[5]), int(starts[20])
    window = BarWindow(market, start, stop)
    size = stop - start
    require_market_data(window)
    assert window.bar_times.equals(market.bar_times[start:stop])
    assert len(window.sessions) == 15
    assert np.array_equal(window.spot_bars().to_numpy(), market.spot_bars().to_numpy()[start:stop])
    assert np.array_equal(window.iv_index_bars().to_numpy(), market.iv_index_bars().to_numpy()[start:stop])

    # Bar numbers are the window's own: bar 0 is the source's bar `start`.
    chain = window.slice_at(0, 20, 60)
    source = market.slice_at(start, 20, 60)
    assert len(chain) == len(source) > 0 and np.array_equal(chain.bid, source.bid)
    # No bar at or after the end, nor before the start.
    for bar in (size, size + 100, -1):
        with pytest.raises(IndexError):
            window.slice_at(bar, 20, 60)
        with pytest.raises(IndexError):
            window.expirations_at(bar, 20, 60)
    expiration = window.expirations_at(size - 1, 20, 60)[0]
    last = market.slice_at(stop - 1, 20, 60, expiry=expiration)
    strikes = np.sort(np.unique(last.strike))
    middle = int(np.searchsorted(strikes, last.spot))
    legs = np.array([strikes[middle - 6], strikes[middle - 2], strikes[middle + 2], strikes[middle + 6]])
    is_call = np.array([False, False, True, True])
    with pytest.raises(IndexError):
        window.quote_structures(size, np.array([expiration], dtype="datetime64[D]"), legs[None, :])

    # A quote range past the end is clipped at the window's last bar.
    path = window.quote_contracts(size - 5, size + 200, expiration.item(), legs, is_call)
    direct = market.quote_contracts(stop - 5, stop, expiration.item(), legs, is_call)
    assert len(path) == 5
    for name in ("spot", "bid", "ask", "mid", "delta"):
        assert np.array_equal(getattr(path, name), getattr(direct, name), equal_nan=True)
    with pytest.raises(IndexError):
        window.quote_contracts(size, size + 10, expiration.item(), legs, is_call)

    for bad in ((0, len(market.bar_times) + 1), (10, 10), (-1, 5)):
        with pytest.raises(ValueError):
            BarWindow(market, *bad)


def test_a_bar_window_over_the_whole_range_is_the_market(config, market):
    features = bar_features(config, market)
    whole = BarWindow(market, 0, len(market.bar_times))
    direct = run_backtest(config, market, features=features)
    windowed = run_backtest(config, whole, features=features.window(0, len(market.bar_times)))
    assert direct.metrics["trade_count"] > 0
    pd.testing.assert_frame_equal(windowed.trades, direct.trades)
    pd.testing.assert_frame_equal(windowed.equity, direct.equity)
    assert set(windowed.metrics) == set(direct.metrics)
    for key, value in direct.metrics.items():
        if isinstance(value, float):
            assert same(windowed.metrics[key], value), key
        else:
            assert windowed.metrics[key] == value, key


# ------------------------------------------------------------------------------------------------
# 3. walk-forward: out-of-sample data never reaches the fit
# ------------------------------------------------------------------------------------------------

SPOT_SHOCK, QUOTE_SHOCK = 1.2, 3.0


class FutureShock:
    """The bar contract of ``market`` with every bar from ``stop`` on changed: spot up 20 %, option
    quotes tripled, the IV index up 50 %. Counts the calls that reach a changed bar."""

    def __init__(self, market, stop: int):
        self.market = market
        self.stop = stop
        self.late_calls = 0

    def _seen(self, bar: int) -> bool:
        late = bar >= self.stop
        self.late_calls += late
        return late

    @property
    def bar_times(self):
        return self.market.bar_times

    @property
    def sessions(self):
        return self.market.sessions

    def spot_bars(self):
        values = self.market.spot_bars().copy()
        values.iloc[self.stop:] *= SPOT_SHOCK
        return values

    def iv_index_bars(self):
        values = self.market.iv_index_bars().copy()
        values.iloc[self.stop:] *= 1.5
        return values

    def ohlcv_bars(self):
        bars = self.market.ohlcv_bars()
        if bars is None:
            return None
        bars = bars.copy()
        for column in ("open", "high", "low", "close"):
            if column in bars:
                bars.iloc[self.stop:, bars.columns.get_loc(column)] *= SPOT_SHOCK
        return bars

    def expirations_at(self, bar, dte_min=None, dte_max=None):
        self._seen(bar)
        return self.market.expirations_at(bar, dte_min, dte_max)

    def slice_at(self, bar, dte_min=None, dte_max=None, expiry=None):
        chain = self.market.slice_at(bar, dte_min, dte_max, expiry)
        if not self._seen(bar):
            return chain
        return dataclasses.replace(chain, spot=chain.spot * SPOT_SHOCK, bid=chain.bid * QUOTE_SHOCK,
                                   ask=chain.ask * QUOTE_SHOCK, mid=chain.mid * QUOTE_SHOCK)

    def quote_contracts(self, bar_start, bar_stop, expiration, strikes, is_call):
        path = self.market.quote_contracts(bar_start, bar_stop, expiration, strikes, is_call)
        if not self._seen(bar_stop - 1):
            return path
        first = max(0, self.stop - bar_start)
        changed = {}
        for name, factor in (("spot", SPOT_SHOCK), ("bid", QUOTE_SHOCK), ("ask", QUOTE_SHOCK), ("mid", QUOTE_SHOCK)):
            values = np.array(getattr(path, name), dtype=float)
            values[first:] *= factor
            changed[name] = values
        return dataclasses.replace(path, **changed)

    def quote_structures(self, bar, expirations, strikes):
        quotes = self.market.quote_structures(bar, expirations, strikes)
        if not self._seen(bar):
            return quotes
        return quotes._replace(bid=quotes.bid * QUOTE_SHOCK, ask=quotes.ask * QUOTE_SHOCK,
                               mid=quotes.mid * QUOTE_SHOCK)

    def settlement_time(self, expiration):
        return self.market.settlement_time(expiration)

    def describe(self):
        return self.market.describe()


def shocked_features(features, stop: int):
    """The feature table with every row from ``stop`` on replaced (numbers scrambled)."""
    from intelligence.features import BarFeatures

    rng = np.random.default_rng(0)
    columns = {}
    for name, values in features.columns.items():
        values = np.array(values, copy=True)
        if values.dtype.kind == "f":
            values[stop:] = rng.permutation(values[stop:]) * 1.37 + 0.11
        elif values.dtype.kind in "iub":
            values[stop:] = rng.permutation(values[stop:])
        columns[name] = values
    return BarFeatures(columns, features.close_ns, dict(features.description))


def test_walk_forward_fit_never_sees_out_of_sample_data(config, market, installed, monkeypatch, tmp_path):
    long_config = config.override({"backtest.end": LONG_END})
    long_market = load_market(long_config)
    pairs, note = walk_forward_windows(long_market.bar_times, WalkForwardSpec(train_months=2, test_months=1),
                                       min_days=21)
    assert note is None and len(pairs) == 1
    fit_window, test_window = pairs[0]
    assert (fit_window.first_session, fit_window.last_session) == (START, END)
    assert (test_window.first_session, test_window.last_session) == ("2016-03-04", LONG_END)
    # The in-sample window is exactly the bars of the short market (a period that ends there).
    assert (fit_window.start, fit_window.stop) == (0, len(market.bar_times))
    assert long_market.bar_times[:fit_window.stop].equals(market.bar_times)
    # Phase 1's settings leave the feature table alone, so one table serves every trial below.
    assert len({feature_key(long_config.override(g)) for g in SMALL_PHASE.grid()}) == 1

    # (a) The fit on the long market's in-sample window.
    installed(long_config, long_market)
    fitted = run_search(f"sqlite:///{tmp_path}/a.db", fit_window)

    # (b) The same with every bar after the window changed: quotes, spot, IV index, feature rows.
    shocked = FutureShock(long_market, fit_window.stop)
    real_features = bar_features(long_config, long_market)
    shocked_table = shocked_features(real_features, fit_window.stop)
    original = market_data.bar_features

    def features_of(config, market, *args, **kwargs):
        if market is shocked:
            return shocked_table
        return original(config, market, *args, **kwargs)

    monkeypatch.setattr(market_data, "bar_features", features_of)
    installed(long_config, shocked)
    refitted = run_search(f"sqlite:///{tmp_path}/b.db", fit_window)
    assert shocked.late_calls == 0, "a trial of the in-sample window read a bar after it"

    # The shock matters to any run that reads past the window (so (a) == (b) is not luck).
    best = fitted.overrides
    over_all = evaluate(best)
    assert shocked.late_calls > 0
    # The fit once more in this process, its memos (quote paths, entry candidates) now holding
    # the shocked bars the whole-period run priced.
    warm = run_search(f"sqlite:///{tmp_path}/d.db", fit_window)
    installed(long_config, long_market)
    assert not np.array_equal(over_all["returns"], evaluate(best)["returns"])
    assert over_all["metrics"]["net_profit"] != evaluate(best)["metrics"]["net_profit"]
    monkeypatch.setattr(market_data, "bar_features", original)

    # (c) A market that ends where the window ends: nothing after it exists at all.
    installed(config, market)
    alone = run_search(f"sqlite:///{tmp_path}/c.db", None)

    assert len(fitted.trials) == 4
    assert len({t.metrics["trade_count"] for t in fitted.trials}) > 1 or \
        len({t.metrics["net_profit"] for t in fitted.trials}) > 1
    for other in (refitted, warm, alone):
        assert other.overrides == fitted.overrides
        mine, theirs = by_params(fitted), by_params(other)
        assert set(mine) == set(theirs)
        for key, trial in mine.items():
            assert theirs[key].metrics == trial.metrics, key
            assert np.array_equal(theirs[key].returns, trial.returns), key
            assert theirs[key].value == trial.value
    # One return per in-sample session.
    assert all(t.returns.size == len(market.sessions) for t in fitted.trials)


# ------------------------------------------------------------------------------------------------
# 4. a sampled trial equals a standalone run (through the fork process pool)
# ------------------------------------------------------------------------------------------------

def test_sampled_trials_equal_standalone_backtests(config, market, installed, tmp_path):
    installed(config, market)
    executor = ProcessExecutor(2)
    try:
        search = run_search(f"sqlite:///{tmp_path}/s.db", None, phase=SEED_PHASES[0], executor=executor, samples=4)
    finally:
        executor.close()
    trials = search.trials
    assert len(trials) == 4 and len({tuple(sorted(t.params.items())) for t in trials}) == 4
    assert all(t.error is None for t in trials)
    assert any(t.metrics["trade_count"] for t in trials)
    for trial in sorted(trials, key=lambda t: -t.value)[:3]:
        standalone_config = config.override(trial.params)
        result = run_backtest(standalone_config, load_market(standalone_config))
        for name in COMPARED:
            assert same(trial.metrics[name], result.metrics[name]), (trial.params, name)
        assert np.array_equal(trial.returns, daily_returns(result.equity, config.backtest.cash))
        assert trial.returns.size == len(market.sessions)


# ------------------------------------------------------------------------------------------------
# 5. the Ray path runs locally and gives the same numbers
# ------------------------------------------------------------------------------------------------

def test_ray_executor_runs_locally_with_the_same_numbers(config, market, installed, tmp_path):
    pytest.importorskip("ray")
    context = installed(config, market)
    phase = Phase(1, "exits_risk", "Exits & Risk", (Parameter("exits.max_hold_days", (10, 14, 21)),))
    executor = optimizer.RayExecutor(None, context, workers=2)
    try:
        assert executor.workers == 2 and executor.name.startswith("Ray")
        search = run_search(f"sqlite:///{tmp_path}/r.db", None, phase=phase, executor=executor)
        windowed = executor.submit({"exits.max_hold_days": 21}, (0, 1500)).result()
    finally:
        executor.close()
    assert len(search.trials) == 3
    for trial in search.trials:
        inline = evaluate(trial.params)
        for name in optimizer.METRIC_COLUMNS:
            assert same(trial.metrics[name], inline["metrics"][name]), name
        assert np.array_equal(trial.returns, inline["returns"])
    inline_window = evaluate({"exits.max_hold_days": 21}, (0, 1500))
    assert windowed["metrics"] == inline_window["metrics"]
    assert np.array_equal(windowed["returns"], inline_window["returns"])
