"""The TDA features (intelligence/tda.py) wired into the bar feature table (``regime.tda_features``,
intelligence/features.py) and the DeepMamba inputs (``build_features(..., tda=...)``,
intelligence/mamba_data.py): columns present only when asked for, lagged one session (later closes
change nothing on earlier sessions), broadcast per session, causal, and one clear error (exit 2
on the command line) when the window is longer than the data.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mamba_test_bars import make_bars

from core.config import Config
from core.market_data import calendar_session_closes
from data_factory import embedded
from data_factory.intraday import intraday_bars
from intelligence import mamba_data as md
from intelligence.features import TRADING_BAR_MINUTES, compute_bar_features
from intelligence.mtf_consensus import resample_session_bars
from intelligence.tda import TDA_COLUMNS, TDAInputError, lagged_close_tda, rolling_tda_features

NY = "America/New_York"
ROOT = Path(__file__).resolve().parent.parent
START, END = pd.Timestamp("2016-01-04"), pd.Timestamp("2016-01-29")
ON = Config().override({"regime.tda_features": True})


# ------------------------------------------------------------------------------------------------
# bar feature table
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs():
    """``compute_bar_features`` inputs shaped as ``core.market_data.embedded_feature_inputs`` makes
    them (real daily SPY/QQQ bars from 400 days before the start, 1-minute synthetic base bars from
    10 sessions before it), with a flat IV history instead of the GARCH proxy (several seconds)."""
    spot = embedded.daily_bars("SPY", START - pd.Timedelta(days=400), END)
    pair = embedded.daily_bars("QQQ", START - pd.Timedelta(days=400), END)
    first = int(np.searchsorted(spot.index, START))
    base = intraday_bars(spot.iloc[first - 10:], freq="1min", seed=42)
    session_close_ns = calendar_session_closes(base.index)
    trading = resample_session_bars(base, TRADING_BAR_MINUTES, 1, session_close_ns)
    local = pd.DatetimeIndex(pd.to_datetime(trading.close_ns, unit="ns", utc=True)).tz_convert(NY)
    target = trading.close_ns[local.tz_localize(None).normalize() >= START]
    return {"base": base, "target": target, "bar_iv": np.full(len(target), 16.0),
            "daily_iv": pd.Series(15.0, index=spot.index), "spot": spot, "pair": pair,
            "session_close_ns": session_close_ns}


def build(inputs, config, spot=None):
    return compute_bar_features(config, inputs["base"], inputs["target"], inputs["bar_iv"], inputs["daily_iv"],
                                inputs["spot"] if spot is None else spot, inputs["pair"],
                                session_close_ns=inputs["session_close_ns"])


def sessions_of(table) -> pd.DatetimeIndex:
    stamps = pd.DatetimeIndex(pd.to_datetime(table.close_ns, unit="ns", utc=True)).tz_convert(NY)
    return stamps.tz_localize(None).normalize()


@pytest.fixture(scope="module")
def tables(inputs):
    return build(inputs, Config()), build(inputs, ON)


def test_columns_absent_when_off_present_when_on_and_nothing_else_changes(tables):
    off, on = tables
    assert not [name for name in off.columns if name.startswith("tda")]
    assert "tda" not in off.description
    assert set(on.columns) - set(off.columns) == set(TDA_COLUMNS)
    for name, values in off.columns.items():          # every other column byte for byte
        np.testing.assert_array_equal(values, on.columns[name], err_msg=name)
    assert {k: v for k, v in on.description.items() if k != "tda"} == off.description
    assert on.description["tda"] == {"window": 60, "dim": 3, "tau": 1, "lagged": "one session",
                                     "bars_without_value": 0}
    assert on.row(0)["tda_h0_total"] == on.columns["tda_h0_total"][0]


def test_default_window_is_defined_from_the_first_bar_and_constant_per_session(tables):
    on = tables[1]
    sessions = sessions_of(on)
    for name in TDA_COLUMNS:
        values = on.columns[name]
        assert np.isfinite(values).all(), name
        per_session = pd.Series(values).groupby(sessions).nunique()
        assert (per_session == 1).all(), name
    assert pd.Series(on.columns["tda_h0_total"]).groupby(sessions).first().nunique() > 1


def test_a_session_sees_the_window_ending_at_the_previous_close(inputs, tables):
    on, spot = tables[1], inputs["spot"]
    rolling = rolling_tda_features(np.diff(np.log(spot["close"].to_numpy(float)))).to_numpy()
    sessions = sessions_of(on)
    for bar in (0, len(on) - 1):
        row = int(spot.index.get_loc(sessions[bar]))          # the bar's session in the daily bars
        # returns row k ends at close k + 1: the previous close (row - 1) is returns row row - 2
        expected = rolling[row - 2]
        np.testing.assert_allclose([on.columns[name][bar] for name in TDA_COLUMNS], expected, rtol=1e-12)
        assert not np.allclose(expected, rolling[row - 1])   # the session's own close would differ


def test_later_daily_closes_change_no_tda_value_of_an_earlier_session(inputs, tables):
    on = tables[1]
    day = pd.Timestamp("2016-01-20")
    spot = inputs["spot"].copy()
    later = spot.index >= day
    noise = np.exp(np.random.default_rng(7).normal(0.0, 0.02, int(later.sum())))
    spot.loc[later, ["open", "high", "low", "close"]] = spot.loc[later, ["open", "high", "low", "close"]].mul(
        noise * 1.07, axis=0)
    changed = build(inputs, ON, spot)
    sessions = sessions_of(on)
    upto = int((sessions <= day).sum())
    assert 0 < upto < len(on)
    for name in TDA_COLUMNS:
        np.testing.assert_array_equal(changed.columns[name][:upto], on.columns[name][:upto], err_msg=name)
    # ... while the next session, which sees the close of `day`, does change (the test can fail).
    after = slice(upto, upto + 78)
    assert not np.array_equal(changed.columns["tda_h0_total"][after], on.columns["tda_h0_total"][after])


def test_warm_up_bars_are_nan_and_later_ones_defined(inputs):
    spot = inputs["spot"]
    before_first = int((spot.index < START).sum())
    window = before_first + 1                 # sessions at rows before_first, before_first + 1 lack one
    table = build(inputs, ON.override({"regime.tda_window": window}))
    sessions = sessions_of(table)
    nan_sessions = sessions[np.isnan(table.columns["tda_h1_total"])].unique()
    assert list(nan_sessions) == list(spot.index[before_first:before_first + 2])
    assert np.isfinite(table.columns["tda_h1_total"][sessions > nan_sessions[-1]]).all()
    assert table.description["tda"]["bars_without_value"] == int((sessions <= nan_sessions[-1]).sum())


def test_a_window_longer_than_the_data_is_one_error(inputs):
    spot = inputs["spot"]
    last = sessions_of(build(inputs, Config()))[-1]
    held = int((spot.index < last).sum())
    with pytest.raises(TDAInputError) as error:
        build(inputs, ON.override({"regime.tda_window": 5000}))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert message.startswith("regime.tda_window = 5,000 sessions")
    assert f"holds {held:,} sessions before" in message and "--tda-window" in message
    assert "\n" not in message


def test_a_window_too_short_for_the_embedding_names_the_settings(inputs):
    with pytest.raises(TDAInputError, match=r"regime\.tda_window = 8, regime\.tda_dim = 3"):
        build(inputs, ON.override({"regime.tda_window": 8}))


def test_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "core" / "main.py"), "--mode", "backtest", "--tda-features",
         "--tda-window", "5000", "--no-plot", "--bt-start", "2016-01-04", "--bt-end", "2016-01-08",
         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: regime.tda_window = 5,000 sessions but the daily data holds ")
    assert "lower --tda-window" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# DeepMamba inputs
# ------------------------------------------------------------------------------------------------

TDA = {"window": 12, "dim": 3, "tau": 1}       # needs 14 sessions: the 12 returns of 13 closes, then one


@pytest.fixture(scope="module")
def mamba_bars():
    return make_bars(20, seed=5)


@pytest.fixture(scope="module")
def mamba_features(mamba_bars):
    return md.build_features(*mamba_bars, tda=TDA)


def test_feature_names_with_and_without_tda(mamba_bars, mamba_features):
    assert md.TDA_FEATURE_NAMES == TDA_COLUMNS
    assert md.feature_names(None) == md.FEATURE_NAMES
    assert md.feature_names(TDA) == md.FEATURE_NAMES + TDA_COLUMNS
    assert tuple(mamba_features.columns) == md.feature_names(TDA)
    plain = md.build_features(*mamba_bars)
    assert tuple(plain.columns) == md.FEATURE_NAMES
    pd.testing.assert_frame_equal(mamba_features[list(md.FEATURE_NAMES)], plain)


def test_tda_inputs_are_per_session_lagged_one_session(mamba_bars, mamba_features):
    bars, _ = mamba_bars
    session = bars.index.tz_convert(NY).tz_localize(None).normalize()
    closes = bars["close"].groupby(session).last().to_numpy()
    # Session k's bars: the window of session returns ending at close k - 1 (returns row k - 2).
    rolling = rolling_tda_features(np.diff(np.log(closes)), **TDA).to_numpy()
    per_session = mamba_features[list(TDA_COLUMNS)].groupby(session)
    assert (per_session.nunique(dropna=False) == 1).all().all()        # one value per session
    values = per_session.first().to_numpy()
    assert np.isnan(values[:13]).all() and np.isfinite(values[13:]).all()
    np.testing.assert_allclose(values[13:], rolling[11:-1], rtol=1e-12)
    np.testing.assert_allclose(values, lagged_close_tda(closes, **TDA), rtol=1e-12)
    assert md.warmup_rows(mamba_features.to_numpy()) == 13 * 78


@pytest.mark.parametrize("cut", [14 * 78 - 1, 14 * 78, 15 * 78 + 40, 20 * 78 - 2])
def test_build_features_with_tda_is_causal(mamba_bars, mamba_features, cut):
    bars, iv = mamba_bars
    truncated = md.build_features(bars.iloc[:cut + 1], iv[:cut + 1], tda=TDA).to_numpy()
    np.testing.assert_array_equal(mamba_features.to_numpy()[:cut + 1], truncated)   # NaN == NaN here
    assert np.isfinite(truncated[-1]).all()


def test_later_bars_change_no_earlier_tda_input(mamba_bars, mamba_features):
    bars, iv = mamba_bars
    changed = bars.copy()
    cut = 16 * 78 + 10                               # inside session 16: its later bars and beyond
    changed.iloc[cut:, :4] *= np.exp(np.random.default_rng(1).normal(0, 0.01, len(bars) - cut))[:, None]
    changed["high"] = changed[["open", "high", "low", "close"]].max(axis=1)
    changed["low"] = changed[["open", "high", "low", "close"]].min(axis=1)
    again = md.build_features(changed, iv, tda=TDA)[list(TDA_COLUMNS)].to_numpy()
    before = mamba_features[list(TDA_COLUMNS)].to_numpy()
    np.testing.assert_array_equal(again[:17 * 78], before[:17 * 78])     # sessions 0..16 unchanged
    assert not np.array_equal(again[17 * 78:], before[17 * 78:])       # session 17 sees close 16


def test_too_few_sessions_for_the_window_is_one_error(mamba_bars):
    bars, iv = mamba_bars
    with pytest.raises(TDAInputError) as error:
        md.build_features(bars, iv, tda={"window": 60, "dim": 3, "tau": 1})
    message = str(error.value)
    assert "window = 60 sessions" in message and "hold 20 sessions" in message and "\n" not in message
    with pytest.raises(TDAInputError, match="hold 13 sessions"):
        md.build_features(bars.iloc[:13 * 78], iv[:13 * 78], tda=TDA)     # one session short
    with pytest.raises(TDAInputError, match="unknown key 'windw'"):
        md.build_features(bars, iv, tda={"windw": 12})


def test_the_engine_names_the_same_tda_columns_as_the_tda_module():
    from core.engine import TDA_COLUMNS as ENGINE_TDA_COLUMNS
    from intelligence.tda import TDA_COLUMNS as MODULE_TDA_COLUMNS

    assert ENGINE_TDA_COLUMNS == MODULE_TDA_COLUMNS


def test_trades_carry_the_tda_columns_at_entry_only_when_they_are_on():
    import datetime as dt

    from core.backtest_engine import run_backtest
    from core.config import Config
    from core.market_data import bar_features, load_market

    config = Config().override({"backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 2, 26),
                                "backtest.engine": "fast"})
    market = load_market(config)
    plain = run_backtest(config, market)
    on = config.override({"regime.tda_features": True})
    features = bar_features(on, market)
    with_tda = run_backtest(on, market, features=features)
    assert len(plain.trades) > 0
    assert not set(TDA_COLUMNS) & set(plain.trades.columns)
    assert list(with_tda.trades.columns[-len(TDA_COLUMNS):]) == list(TDA_COLUMNS)
    pd.testing.assert_frame_equal(with_tda.trades[plain.trades.columns], plain.trades)   # context only
    rows = np.searchsorted(features.close_ns, with_tda.trades["entry_time"].dt.tz_convert("UTC").astype("int64"))
    for name in TDA_COLUMNS:
        np.testing.assert_allclose(with_tda.trades[name].to_numpy(float), features.columns[name][rows])
