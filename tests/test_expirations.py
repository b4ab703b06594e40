"""Listed SPY expirations: third Fridays, quarter-ends, weekly programs and holiday rolls."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_factory.errors import DataError
from data_factory.expirations import (
    MONDAY_WEEKLIES_FROM, WEDNESDAY_WEEKLIES_FROM, WEEKLY_HORIZON_DAYS, listed_expiration_table,
    listed_expirations, listings_for_sessions, settlement_times,
)
from data_factory.market_calendar import is_session


def _third_friday(year: int, month: int) -> pd.Timestamp:
    # Independent of the module: the first Friday is day 1..7, the third is 14 days later.
    first = pd.Timestamp(year=year, month=month, day=1)
    return first + pd.Timedelta(days=(4 - first.weekday()) % 7 + 14)


def _series_of(on_date, expiration) -> str:
    table = listed_expiration_table(on_date)
    return table.loc[table["expiration"] == pd.Timestamp(expiration), "series"].item()


def test_third_friday_rule_for_every_month_of_2014_2018():
    for year in range(2014, 2019):
        for month in range(1, 13):
            listed = listed_expirations(pd.Timestamp(year=year, month=month, day=1))
            expected = _third_friday(year, month)
            if not is_session(expected):          # Good Friday 2014-04-18 is a third Friday
                expected -= pd.Timedelta(days=1)
            assert expected in listed, (year, month)
            assert "monthly" in _series_of(pd.Timestamp(year=year, month=month, day=1), expected)


def test_good_friday_expiry_moves_to_thursday():
    # 2015-04-03: Good Friday, a Friday weekly -> Thursday 2015-04-02.
    listed = listed_expirations("2015-03-27")
    assert pd.Timestamp("2015-04-02") in listed
    assert pd.Timestamp("2015-04-03") not in listed
    # 2014-04-18: Good Friday AND the April monthly -> Thursday 2014-04-17.
    assert "monthly" in _series_of("2014-04-01", "2014-04-17")
    assert pd.Timestamp("2014-04-18") not in listed_expirations("2014-04-01")


def test_monday_holiday_weekly_moves_to_tuesday():
    # Monday weeklies were listed by 2018-05 (program from 2018-02-16).
    assert pd.Timestamp("2018-05-29") in listed_expirations("2018-05-21")
    assert _series_of("2018-05-21", "2018-05-29") == "weekly_mon"
    assert pd.Timestamp("2018-05-28") not in listed_expirations("2018-05-21")
    assert _series_of("2018-08-27", "2018-09-04") == "weekly_mon"     # Labor Day 2018-09-03


def test_closed_wednesday_weekly_moves_to_previous_day():
    # 2018-12-05: market closed (national day of mourning) -> Tuesday 2018-12-04.
    listed = listed_expirations("2018-11-28")
    assert pd.Timestamp("2018-12-04") in listed
    assert pd.Timestamp("2018-12-05") not in listed
    assert _series_of("2018-11-28", "2018-12-04") == "weekly_wed"


def test_quarterly_is_last_trading_day_of_quarter():
    # 2018-03-30 was Good Friday, so the Q1 2018 quarterly is Thursday 2018-03-29.
    assert "quarterly" in _series_of("2018-03-01", "2018-03-29")
    for quarter_end in ["2014-03-31", "2014-06-30", "2015-09-30", "2016-12-30", "2017-06-30", "2018-12-31"]:
        day = pd.Timestamp(quarter_end)
        assert is_session(day)
        assert "quarterly" in _series_of(day - pd.Timedelta(days=20), day), quarter_end


def test_no_wednesday_weeklies_before_september_2016_and_some_after():
    def wednesday_weeklies(on_date):
        table = listed_expiration_table(on_date)
        return table[table["series"].str.contains("weekly_wed")]

    for on_date in pd.date_range("2014-01-02", "2016-08-31", freq="19D"):
        table = listed_expiration_table(on_date)
        assert not table["series"].str.contains("weekly_wed").any()
        wednesdays = table[table["expiration"].dt.day_of_week == 2]
        # Only quarter-ends may fall on a Wednesday before the program starts.
        assert wednesdays["series"].str.contains("quarterly").all(), on_date
    assert len(wednesday_weeklies("2016-09-01")) >= 5
    assert wednesday_weeklies("2016-09-01")["expiration"].min() > WEDNESDAY_WEEKLIES_FROM


def test_no_monday_weeklies_before_program_start():
    before = listed_expiration_table(MONDAY_WEEKLIES_FROM - pd.Timedelta(days=1))
    assert not before["series"].str.contains("weekly_mon").any()
    after = listed_expiration_table(MONDAY_WEEKLIES_FROM)
    assert after["series"].str.contains("weekly_mon").any()


def test_weekly_horizon_and_listing_through_expiry_day():
    on_date = pd.Timestamp("2017-05-10")
    table = listed_expiration_table(on_date)
    weekly = table[table["series"].str.fullmatch(r"weekly_(fri|wed)")]
    assert (weekly["expiration"] - on_date).dt.days.max() <= WEEKLY_HORIZON_DAYS
    # An expiry is still listed on its own day (it trades until the close), not the day after.
    assert on_date in listed_expirations(on_date)
    assert on_date not in listed_expirations(on_date + pd.Timedelta(days=1))


def test_monthlies_and_leaps_horizon():
    listed = listed_expirations("2016-06-01")
    assert _third_friday(2017, 5) in listed                  # 12th monthly from 2016-06
    assert _third_friday(2017, 7) not in listed              # beyond the 12-month window
    assert _third_friday(2018, 1) in listed                  # January LEAPS two years out
    assert _third_friday(2019, 1) not in listed


def test_settlement_is_session_close_including_early_close():
    settle = settlement_times(["2018-11-23", "2018-11-30"])
    assert settle[0] == pd.Timestamp("2018-11-23 13:00", tz="America/New_York")
    assert settle[1] == pd.Timestamp("2018-11-30 16:00", tz="America/New_York")
    with pytest.raises(DataError, match="2018-12-05"):
        settlement_times(["2018-12-05"])


def test_all_listed_expiries_are_sessions_sorted_unique():
    for on_date in pd.date_range("2014-01-02", "2018-12-31", freq="23D"):
        listed = listed_expirations(on_date)
        assert listed.is_monotonic_increasing and not listed.has_duplicates
        assert all(is_session(day) for day in listed[:8])
        assert listed[0] >= on_date


def test_listings_for_sessions_matches_single_date_queries():
    sessions = pd.DatetimeIndex(["2016-08-31", "2016-09-01", "2018-12-03"])
    offsets, days = listings_for_sessions(sessions)
    for i, session in enumerate(sessions):
        expected = listed_expirations(session).values.astype("datetime64[D]").astype(np.int64)
        np.testing.assert_array_equal(days[offsets[i]:offsets[i + 1]], expected)


def test_bad_dates_raise():
    with pytest.raises(DataError, match="outside the listing calendar"):
        listed_expirations("1990-01-01")
    with pytest.raises(DataError, match="cannot read"):
        listed_expirations("not a date")
