"""The breach probability's source (filters.pop_source): "delta" (2·max|Δ| of the short legs, as
before) or "diffusion" (DeepMamba's sampled forward paths, core.market_data.path_forecast_per_bar):
the probability filter reads max(touch put, touch call) from the path forecast, a bar without a
forecast is refused as "no_path_forecast", the trades carry the touches, delta runs are
unchanged, the sessions to expiry are counted as documented, and the settings that cannot work
(no checkpoint, no diffusion head, expiries past the paths, live mode) exit 2 with one message.

A fake path forecast with fixed numbers stands in for the model in the engine tests; one short
run goes through a real (untrained) diffusion head built from the shipped checkpoint.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import torch

from cli_helpers import run_failing
from core.backtest_engine import ENTRY_CONTEXT_COLUMNS, run_backtest
from core.config import Config, ConfigError
from core.engine import sessions_to_expiry
from core.market_data import nyse_busdays
from core.main import main
from core.market import BarWindow
from core.market_data import PathWindow, bar_features, load_market, path_forecast_per_bar
from core.optimizer import candidate_settings
from data_factory.market_calendar import trading_sessions

NY = "America/New_York"
CONFIG = Config().override({"backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 2, 26),
                            "backtest.engine": "fast"})
DIFFUSION = CONFIG.override({"filters.pop_source": "diffusion"})
SHIPPED = "models/mamba_active.pth"          # the shipped model (it has a diffusion head)


class FakePaths:
    """A path forecast with fixed answers; records every question (bar, spot, put, call, sessions)."""

    def __init__(self, touch_put=0.1, touch_call=0.2, pop=0.7, missing=(), none_at=()):
        self.answer = {"touch_put": touch_put, "touch_call": touch_call, "pop": pop, "inside_at_expiry": 0.8,
                       "expected_max_up": 0.02, "expected_max_down": 0.03}
        self.missing, self.none_at = set(missing), set(none_at)
        self.calls: list[tuple] = []
        self.description = "fake paths"
        self.busdays = nyse_busdays()              # as path_forecast_per_bar's forecasts carry

    def available(self, bar):
        return bar not in self.missing

    def probabilities(self, bar, spot, put_strike, call_strike, sessions_to_expiry):
        self.calls.append((bar, spot, put_strike, call_strike, sessions_to_expiry))
        if bar in self.missing or bar in self.none_at:
            return None
        return dict(self.answer)


@pytest.fixture(scope="module")
def market():
    return load_market(CONFIG)


@pytest.fixture(scope="module")
def features(market):
    return bar_features(CONFIG, market)


@pytest.fixture(scope="module")
def delta_run(market, features):
    return run_backtest(CONFIG, market, features=features)


def diffusion_run(market, features, paths, **overrides):
    return run_backtest(DIFFUSION.override(overrides) if overrides else DIFFUSION, market, features=features,
                        paths=paths)


# ------------------------------------------------------------------------------------------------
# the filter
# ------------------------------------------------------------------------------------------------

def test_the_filter_rejects_when_the_larger_touch_is_above_the_maximum(market, features, delta_run):
    assert delta_run.metrics["trade_count"] > 0
    paths = FakePaths(touch_put=0.10, touch_call=0.45)          # max 0.45 > 0.40
    result = diffusion_run(market, features, paths)
    assert result.metrics["trade_count"] == 0
    assert paths.calls
    # Every question asked was answered with 0.45 and refused by the filter for it.
    assert result.rejections["breach_probability_above_max"] == len(paths.calls)
    # The same numbers pass a looser maximum.
    looser = diffusion_run(market, features, FakePaths(touch_put=0.10, touch_call=0.45),
                           **{"filters.max_breach_probability": 0.46})
    assert looser.metrics["trade_count"] > 0 and "breach_probability_above_max" not in looser.rejections


def test_below_the_maximum_entries_open_and_carry_the_touches(market, features):
    paths = FakePaths(touch_put=0.31, touch_call=0.12, pop=0.6)
    result = diffusion_run(market, features, paths)
    trades = result.trades
    assert len(trades) > 0 and "breach_probability_above_max" not in result.rejections
    assert list(trades.columns[-len(ENTRY_CONTEXT_COLUMNS):]) == list(ENTRY_CONTEXT_COLUMNS)
    assert {"touch_put", "touch_call", "pop_paths"} <= set(ENTRY_CONTEXT_COLUMNS)
    np.testing.assert_array_equal(trades["breach_probability"], 0.31)       # the value the filter used
    np.testing.assert_array_equal(trades["touch_put"], 0.31)
    np.testing.assert_array_equal(trades["touch_call"], 0.12)
    np.testing.assert_array_equal(trades["pop_paths"], 0.6)
    assert result.features_description["pop_source"]["source"] == "diffusion"
    assert result.features_description["pop_source"]["model"] == "fake paths"


def test_a_bar_without_a_forecast_is_refused_as_no_path_forecast(market, features):
    every = range(len(market.bar_times))
    unavailable = diffusion_run(market, features, FakePaths(missing=every))
    assert unavailable.metrics["trade_count"] == 0
    assert unavailable.rejections["no_path_forecast"] > 0
    answered_none = FakePaths(none_at=every)
    result = diffusion_run(market, features, answered_none)
    assert result.metrics["trade_count"] == 0
    assert result.rejections["no_path_forecast"] == len(answered_none.calls) > 0
    # A forecast from some bar on: nothing opens before it.
    open_ = FakePaths()
    first = diffusion_run(market, features, open_).trades["entry_time"].min()
    cut = int(market.bar_times.get_loc(first)) + 1
    later = diffusion_run(market, features, FakePaths(missing=range(cut)))
    assert later.rejections["no_path_forecast"] > 0
    assert later.trades["entry_time"].min() > first


def test_the_questions_are_the_trades_strikes_spot_and_sessions_to_expiry(market, features):
    paths = FakePaths()
    result = diffusion_run(market, features, paths)
    asked = {call[0]: call for call in paths.calls}
    spot = market.spot_bars().to_numpy()
    assert len(result.trades) > 0
    for trade in result.trades.itertuples():
        bar = int(market.bar_times.get_loc(trade.entry_time))      # same-bar fills: the decision bar
        _, spot_asked, put, call, sessions = asked[bar]
        assert (put, call) == (trade.short_put, trade.short_call)
        assert spot_asked == spot[bar] and put < spot_asked < call
        # Independently: the NYSE sessions after the entry day up to the expiry day, plus the
        # share of the entry day's 390 minutes still to run.
        stamp = pd.Timestamp(trade.entry_time).tz_convert(NY)
        day = stamp.tz_localize(None).normalize()
        after = trading_sessions(day + pd.Timedelta(days=1), pd.Timestamp(trade.expiration))
        left = (16 * 60 - (stamp.hour * 60 + stamp.minute)) / 390
        assert sessions == pytest.approx(len(after) + left, abs=1e-12)


def test_sessions_to_expiry_arithmetic():
    def day(text):
        return int(np.datetime64(text, "D").astype(np.int64))

    nyse = nyse_busdays()
    # Monday 10:00 to that Friday's close: Tue, Wed, Thu, Fri and 360 of Monday's 390 minutes.
    assert sessions_to_expiry(day("2016-01-04"), np.datetime64("2016-01-08"), 10 * 60, nyse) == \
        pytest.approx(4 + 360 / 390)
    # The first bar (09:35) leaves 77 of 78 bars; the 16:00 bar none.
    assert sessions_to_expiry(day("2016-01-08"), np.datetime64("2016-01-08"), 9 * 60 + 35, nyse) == \
        pytest.approx(77 / 78)
    assert sessions_to_expiry(day("2016-01-04"), np.datetime64("2016-01-08"), 16 * 60, nyse) == 4.0
    # Over a weekend and Martin Luther King Day (Monday 2016-01-18, no session).
    assert sessions_to_expiry(day("2016-01-14"), np.datetime64("2016-01-22"), 16 * 60, nyse) == 5.0
    # Without the holiday calendar (a forecast that carries none) it counts that Monday.
    assert sessions_to_expiry(day("2016-01-14"), np.datetime64("2016-01-22"), 16 * 60) == 6.0
    # Forty-five days out (the default dte_max) stays within 32 sessions on the NYSE calendar.
    assert sessions_to_expiry(day("2016-11-21"), np.datetime64("2017-01-05"), 9 * 60 + 35, nyse) < 32


def test_a_walk_forward_window_asks_its_markets_bars(market, features):
    start, stop = len(market.bar_times) // 2, len(market.bar_times)
    whole = FakePaths()
    window = PathWindow(whole, start, stop)
    assert len(window) == stop - start and window.description == "fake paths"
    result = run_backtest(DIFFUSION, BarWindow(market, start, stop), features=features.window(start, stop),
                          paths=window)
    assert len(result.trades) > 0
    asked = {call[0] for call in whole.calls}
    assert min(asked) >= start
    for entry in result.trades["entry_time"]:
        assert int(market.bar_times.get_loc(entry)) in asked


# ------------------------------------------------------------------------------------------------
# delta runs are as before
# ------------------------------------------------------------------------------------------------

class Refusing:
    def available(self, bar):
        raise AssertionError("a delta run asked the path forecast")

    probabilities = available


def test_delta_runs_do_not_read_paths_and_are_unchanged(market, features, delta_run):
    assert path_forecast_per_bar(CONFIG, market) is None
    # Paths handed to a delta run (and a path count set) change nothing.
    again = run_backtest(CONFIG.override({"filters.diffusion_paths": 256}), market, features=features,
                         paths=Refusing())
    pd.testing.assert_frame_equal(again.trades, delta_run.trades, check_exact=True)
    pd.testing.assert_frame_equal(again.equity, delta_run.equity, check_exact=True)
    assert again.rejections == delta_run.rejections
    trades = delta_run.trades
    assert len(trades) > 0 and trades["breach_probability"].notna().all()
    assert trades[["touch_put", "touch_call", "pop_paths"]].isna().all().all()
    assert delta_run.features_description["pop_source"]["source"] == "delta"


def test_a_forecast_that_never_refuses_opens_the_delta_runs_trades_without_the_filter(market, features):
    # With touches of 0 the diffusion filter never refuses: the same trades as a delta run whose
    # filter never refuses either. Nothing else in the run depends on the source.
    open_delta = run_backtest(CONFIG.override({"filters.max_breach_probability": 1.0}), market, features=features)
    zero = diffusion_run(market, features, FakePaths(touch_put=0.0, touch_call=0.0, pop=1.0))
    source = ("breach_probability", "touch_put", "touch_call", "pop_paths")
    columns = [c for c in zero.trades.columns if c not in source]
    pd.testing.assert_frame_equal(zero.trades[columns], open_delta.trades[columns], check_exact=True)
    pd.testing.assert_frame_equal(zero.equity, open_delta.equity, check_exact=True)
    assert len(zero.trades) > 0


def test_the_optimizers_candidate_memo_key_holds_the_pop_settings():
    # Trials that differ in the source or the path count must not share entry candidates.
    assert candidate_settings(CONFIG) != candidate_settings(DIFFUSION)
    assert candidate_settings(DIFFUSION) != candidate_settings(DIFFUSION.override({"filters.diffusion_paths": 128}))


# ------------------------------------------------------------------------------------------------
# a real diffusion head (untrained) through path_forecast_per_bar
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """The shipped model with an untrained diffusion head of the default path rules."""
    from intelligence.mamba_diffusion import DiffusionHead, PathRules

    source = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    metadata = dict(source["metadata"])
    torch.manual_seed(0)
    head = DiffusionHead(cond_dim=int(metadata["model_config"]["d_model"]))
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    metadata["diffusion"] = {"config": head.config(), "path_rules": PathRules().as_dict()}
    path = tmp_path_factory.mktemp("model") / "with_head.pth"
    torch.save({"model_state": source["model_state"], "metadata": metadata,
                "diffusion_state": head.state_dict()}, path)
    return path


def test_a_diffusion_run_reads_the_checkpoints_paths(head_checkpoint):
    config = DIFFUSION.override({"backtest.end": dt.date(2016, 1, 29), "mamba.weights_path": str(head_checkpoint),
                                 "filters.diffusion_paths": 16, "filters.max_breach_probability": 1.0})
    market = load_market(config)
    paths = path_forecast_per_bar(config, market)
    assert path_forecast_per_bar(config, market) is paths                   # kept per process
    assert len(paths) == len(market.bar_times) and paths.n_paths == 16
    threads = torch.get_num_threads()
    result = run_backtest(config, market)
    assert torch.get_num_threads() == threads                               # restored after the run
    trades = result.trades
    assert len(trades) > 0
    touches = trades[["touch_put", "touch_call", "pop_paths"]].to_numpy()
    assert np.isfinite(touches).all() and ((touches >= 0) & (touches <= 1)).all()
    np.testing.assert_allclose(trades["breach_probability"], trades[["touch_put", "touch_call"]].max(axis=1))
    described = result.features_description["pop_source"]
    assert described["source"] == "diffusion" and str(head_checkpoint) in described["model"]


# ------------------------------------------------------------------------------------------------
# what cannot work: one message, exit 2
# ------------------------------------------------------------------------------------------------

PERIOD = ["--bt-start", "2016-01-04", "--bt-end", "2016-01-29"]


def test_a_checkpoint_without_a_head_exits_2_saying_how_to_make_one(tmp_path, capsys):
    source = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    source["metadata"].pop("diffusion", None)
    source.pop("diffusion_state", None)
    headless = tmp_path / "no_head.pth"
    torch.save(source, headless)
    status, errors, text = run_failing([*PERIOD, "--mamba-model", str(headless), "--pop-source", "diffusion"],
                                       tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "--pop-source diffusion" in errors[0] and "--diffusion-head" in errors[0]
    assert "no_head.pth" in errors[0] and "train_mamba" in errors[0]


def test_a_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    status, errors, text = run_failing([*PERIOD, "--mamba-model", str(missing), "--pop-source", "diffusion"],
                                       tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert str(missing) in errors[0] and "no such model file" in errors[0]
    assert "pop_source" in errors[0]


def test_expiries_past_the_paths_exit_2_naming_the_settings(tmp_path, capsys, head_checkpoint):
    status, errors, text = run_failing([*PERIOD, "--mamba-model", str(head_checkpoint), "--pop-source", "diffusion",
                                        "--dte-max", "60"], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "filters.pop_source" in errors[0] and "strategy.dte_max = 60" in errors[0]
    assert "path horizon" in errors[0] and "32 sessions" in errors[0]
    # 46 days (≈ 31.8 sessions) fit: the same check passes.
    from core.market_data import path_forecaster
    assert path_forecaster(DIFFUSION.override({"mamba.weights_path": str(head_checkpoint),
                                               "strategy.dte_max": 46})).diffusion is not None
    with pytest.raises(ConfigError, match="strategy.dte_max = 47"):
        path_forecaster(DIFFUSION.override({"mamba.weights_path": str(head_checkpoint), "strategy.dte_max": 47}))


def test_live_mode_refuses_the_diffusion_pop(tmp_path, capsys, head_checkpoint):
    status = main(["--mode", "live", "--dry-run", "--pop-source", "diffusion", "--mamba-model", str(head_checkpoint)])
    captured = capsys.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1, captured
    assert "--pop-source diffusion" in errors[0] and "live" in errors[0] and "state" in errors[0]


def test_the_engine_refuses_a_diffusion_run_without_paths(market, features):
    from core.backtest_engine import BacktestSession
    from core.engine import TradingEngine

    session = BacktestSession(CONFIG, market, features=features)
    with pytest.raises(ConfigError, match="no path forecast"):
        TradingEngine(DIFFUSION, session.portfolio, session.fill_model, session.clock, features)


def test_the_report_header_says_the_breach_probability_came_from_sampled_paths():
    from core.report import run_facts

    described = {"source": "diffusion", "what": "max(touch put, touch call) over sampled paths",
                 "model": "models/x.pth: diffusion head, 64 paths per bar"}
    facts = dict(run_facts({"backtest": {"underlying": "SPY"}}, {"features": {"pop_source": described}}, {}))
    assert facts["Breach probability"] == ("max(touch put, touch call) over sampled paths "
                                           "(models/x.pth: diffusion head, 64 paths per bar)")
    delta = dict(run_facts({"backtest": {"underlying": "SPY"}}, {"features": {"pop_source": {"source": "delta"}}}, {}))
    assert "Breach probability" not in delta
