"""Synthetic intraday bars: exact daily OHLCV, session times, determinism, seasonality, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_factory.embedded import daily_bars
from data_factory.errors import DataError
from data_factory.intraday import describe_intraday, intraday_bars
from data_factory.market_calendar import session_bounds

SPAN = ("2014-06-02", "2014-12-31")          # holds the 2014-07-03, 11-28 and 12-24 early closes
EARLY_CLOSES = ["2014-07-03", "2014-11-28", "2014-12-24"]


@pytest.fixture(scope="module")
def daily() -> pd.DataFrame:
    return daily_bars("SPY", *SPAN)


@pytest.fixture(scope="module")
def minute_bars(daily) -> pd.DataFrame:
    return intraday_bars(daily, "1min", seed=7)


def _session_dates(bars: pd.DataFrame) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(bars.index.tz_localize(None).normalize(), name="date")


def _daily_from_bars(bars: pd.DataFrame) -> pd.DataFrame:
    grouped = bars.groupby(_session_dates(bars))
    return pd.DataFrame({"open": grouped["open"].first(), "high": grouped["high"].max(),
                         "low": grouped["low"].min(), "close": grouped["close"].last(),
                         "volume": grouped["volume"].sum()})


def _hand_made_days() -> pd.DataFrame:
    """Days whose anchors coincide: open==low & close==high, open==high & close==low, open==high==close,
    a flat day, close==low with open inside, and an early-close day with open==low."""
    rows = {
        "2016-03-01": (100.0, 102.0, 100.0, 102.0),
        "2016-03-02": (102.0, 102.0, 99.5, 99.5),
        "2016-03-03": (101.0, 101.0, 99.0, 101.0),
        "2016-03-04": (100.0, 100.0, 100.0, 100.0),
        "2016-03-07": (100.3, 101.2, 99.1, 99.1),
        "2016-11-25": (220.0, 221.5, 220.0, 221.0),
    }
    frame = pd.DataFrame(rows.values(), index=pd.DatetimeIndex(list(rows), name="date"),
                         columns=["open", "high", "low", "close"])
    frame["volume"] = [1_000_003.0, 7.0, 0.0, 123_456_789.0, 390.0, 55_555.0]
    return frame


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("freq", ["1min", "5min", "15min"])
def test_bars_reproduce_every_daily_bar_exactly(daily, freq):
    bars = intraday_bars(daily, freq, seed=7)
    rebuilt = _daily_from_bars(bars)
    assert rebuilt.index.equals(daily.index)
    for column in daily.columns:
        np.testing.assert_array_equal(rebuilt[column].to_numpy(), daily[column].to_numpy(), err_msg=column)
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()


def test_coinciding_anchors_and_flat_days_are_exact():
    days = _hand_made_days()
    bars = intraday_bars(days, "1min", seed=3)
    rebuilt = _daily_from_bars(bars)
    for column in days.columns:
        np.testing.assert_array_equal(rebuilt[column].to_numpy(), days[column].to_numpy(), err_msg=column)
    flat = bars.loc["2016-03-04"]
    assert (flat[["open", "high", "low", "close"]] == 100.0).all().all()
    # open == low: no bar goes below the open; close == high: nothing above the close.
    first = bars.loc["2016-03-01"]
    assert first["low"].min() == 100.0 and first["high"].max() == 102.0
    assert first["open"].iloc[0] == 100.0 and first["close"].iloc[-1] == 102.0
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()


def test_minute_bars_chain_open_to_previous_close(minute_bars):
    same_day = _session_dates(minute_bars)[1:] == _session_dates(minute_bars)[:-1]
    np.testing.assert_array_equal(minute_bars["open"].to_numpy()[1:][same_day],
                                  minute_bars["close"].to_numpy()[:-1][same_day])


def test_five_minute_bars_are_aggregates_of_the_minute_bars(daily, minute_bars):
    five = intraday_bars(daily, "5min", seed=7)
    # Independent aggregation: pandas resampling, right-closed and right-labelled (close stamps).
    resampled = minute_bars.resample("5min", closed="right", label="right").agg(
        {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}).dropna()
    pd.testing.assert_frame_equal(five, resampled, check_freq=False, check_names=False)


def test_volumes_are_whole_shares_summing_to_the_day(minute_bars, daily):
    volume = minute_bars["volume"].to_numpy()
    assert (volume == np.floor(volume)).all() and (volume >= 0).all()
    totals = minute_bars["volume"].groupby(_session_dates(minute_bars)).sum()
    np.testing.assert_array_equal(totals.to_numpy(), daily["volume"].to_numpy())


# ------------------------------------------------------------------------------ timestamps

def test_minute_stamps_are_bar_close_times_inside_each_session(minute_bars, daily):
    assert str(minute_bars.index.tz) == "America/New_York" and minute_bars.index.name == "timestamp"
    assert minute_bars.index.is_monotonic_increasing and not minute_bars.index.has_duplicates
    counts = minute_bars.groupby(_session_dates(minute_bars)).size()
    bounds = session_bounds(daily.index)
    for day, (session_open, session_close) in bounds.iterrows():
        stamps = minute_bars.loc[day.strftime("%Y-%m-%d")].index
        assert stamps[0] == session_open + pd.Timedelta(minutes=1)
        assert stamps[-1] == session_close
    full_days = [d for d in daily.index if d.strftime("%Y-%m-%d") not in EARLY_CLOSES]
    assert (counts.loc[full_days] == 390).all()
    assert (counts.loc[pd.DatetimeIndex(EARLY_CLOSES)] == 210).all()
    first = minute_bars.loc["2014-06-02"].index
    assert first[0].strftime("%H:%M") == "09:31" and first[-1].strftime("%H:%M") == "16:00"
    assert minute_bars.loc["2014-11-28"].index[-1].strftime("%H:%M") == "13:00"


def test_five_minute_session_counts(daily):
    five = intraday_bars(daily, "5min", seed=7)
    counts = five.groupby(_session_dates(five)).size()
    assert (counts.drop(pd.DatetimeIndex(EARLY_CLOSES)) == 78).all()
    assert (counts.loc[pd.DatetimeIndex(EARLY_CLOSES)] == 42).all()
    day = five.loc["2014-06-02"].index
    assert day[0].strftime("%H:%M") == "09:35" and day[-1].strftime("%H:%M") == "16:00"


def test_full_default_period_at_five_minutes():
    daily = daily_bars("SPY", "2014-01-03", "2018-12-31")
    five = intraday_bars(daily, "5min", seed=42)
    bounds = session_bounds(daily.index)
    expected_bars = int(((bounds["close"] - bounds["open"]) / pd.Timedelta(minutes=5)).sum())
    assert len(five) == expected_bars == 97_650
    rebuilt = _daily_from_bars(five)
    for column in daily.columns:
        np.testing.assert_array_equal(rebuilt[column].to_numpy(), daily[column].to_numpy(), err_msg=column)


# ------------------------------------------------------------------------------ randomness

def test_same_seed_same_bars_other_seed_other_bars(daily):
    sample = daily.iloc[:10]
    first, again = intraday_bars(sample, "1min", seed=11), intraday_bars(sample, "1min", seed=11)
    pd.testing.assert_frame_equal(first, again)
    other = intraday_bars(sample, "1min", seed=12)
    assert first.index.equals(other.index)
    assert (first["close"] != other["close"]).mean() > 0.9
    assert (first["volume"] != other["volume"]).mean() > 0.5


def test_a_day_does_not_depend_on_the_requested_range(minute_bars, daily):
    for day in ["2014-06-02", "2014-09-17", "2014-11-28", "2014-12-31"]:
        alone = intraday_bars(daily.loc[[pd.Timestamp(day)]], "1min", seed=7)
        pd.testing.assert_frame_equal(alone, minute_bars.loc[day], check_freq=False)
    middle = intraday_bars(daily.loc["2014-09-01":"2014-10-15"], "1min", seed=7)
    pd.testing.assert_frame_equal(middle, minute_bars.loc["2014-09-01":"2014-10-15"], check_freq=False)


# ------------------------------------------------------------------------------ realism

def test_intraday_volatility_and_volume_are_u_shaped(minute_bars):
    log_close = np.log(minute_bars["close"])
    same_day = pd.Series(_session_dates(minute_bars), index=minute_bars.index).diff() == pd.Timedelta(0)
    abs_return = log_close.diff().abs()[same_day]
    clock = abs_return.index.strftime("%H:%M")
    first_half_hour = abs_return[(clock > "09:31") & (clock <= "10:00")].mean()
    last_half_hour = abs_return[(clock > "15:30") & (clock <= "16:00")].mean()
    midday = abs_return[(clock > "12:00") & (clock <= "13:30")].mean()
    assert first_half_hour > 1.2 * midday and last_half_hour > 1.1 * midday
    minute_clock = minute_bars.index.strftime("%H:%M")
    volume = minute_bars["volume"]
    assert volume[minute_clock <= "10:00"].mean() > 1.5 * volume[(minute_clock > "12:00") & (minute_clock <= "13:30")].mean()


def test_synthetic_labels(daily):
    bars = intraday_bars(daily.iloc[:2], "5min", seed=5)
    assert bars.attrs["synthetic"] is True and bars.attrs["source"] == "brownian_bridge(seed=5)"
    description = describe_intraday(5, "5min")
    assert description["synthetic"] is True and description["source"] == "brownian_bridge(seed=5)"
    assert "close time" in description["timestamps"]


# ------------------------------------------------------------------------------ bad input

def _good_days() -> pd.DataFrame:
    return _hand_made_days().iloc[:2].copy()


@pytest.mark.parametrize("change, words", [
    (lambda f: f.drop(columns="volume"), ["missing columns", "volume"]),
    (lambda f: f.assign(close=[np.nan, 99.5]), ["2016-03-01", "close", "missing"]),
    (lambda f: f.assign(low=[100.0, -1.0]), ["2016-03-02", "low", "positive"]),
    (lambda f: f.assign(high=[101.0, 102.0]), ["2016-03-01", "close", "above high"]),
    (lambda f: f.set_axis(pd.DatetimeIndex(["2016-03-01", "2016-03-05"], name="date")),
     ["2016-03-05", "not an NYSE session"]),
    (lambda f: f.set_axis(pd.DatetimeIndex(["2016-03-01", "2016-03-01"], name="date")),
     ["2016-03-01", "duplicate"]),
    (lambda f: f.assign(volume=[10.5, 7.0]), ["2016-03-01", "volume", "whole number"]),
    (lambda f: f.set_axis(pd.DatetimeIndex(["2016-03-01 10:00", "2016-03-02"], name="date")),
     ["2016-03-01 10:00", "time of day"]),
])
def test_bad_daily_input_is_named(change, words):
    with pytest.raises(DataError) as error:
        intraday_bars(change(_good_days()), "1min")
    for word in words:
        assert word in str(error.value)


def test_bad_freq_and_seed():
    with pytest.raises(DataError, match="freq"):
        intraday_bars(_good_days(), "2min")
    with pytest.raises(DataError, match="seed"):
        intraday_bars(_good_days(), "1min", seed=-1)
    with pytest.raises(DataError, match="no rows"):
        intraday_bars(_good_days().iloc[:0], "1min")
