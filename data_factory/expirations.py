"""Listed SPY option expirations on any date (reference: shared/reference/vol-surface.md §6).

Owns the expiry calendar of the synthetic chain. Series and how each is listed on a date ``d``:

| series | expiry date | listed on ``d`` when |
|---|---|---|
| monthly | third Friday of the month | among the next ``MONTHLY_COUNT`` (12) monthly expiries |
| LEAPS | January monthly | its year is at most ``d.year + LEAPS_YEARS`` (2) |
| quarterly | last trading day of Mar/Jun/Sep/Dec | among the next ``QUARTERLY_COUNT`` (6) quarter-ends |
| Friday weekly | every Friday | expiry within ``WEEKLY_HORIZON_DAYS`` (42 days, six weeks) of ``d`` |
| Wednesday weekly | every Wednesday after 2016-09-01 | same horizon, and ``d ≥ 2016-09-01`` |
| Monday weekly | every Monday after 2018-02-16 | same horizon, and ``d ≥ 2018-02-16`` |

Holidays: Friday and Wednesday expiries move to the PREVIOUS session, Monday expiries to the NEXT
one (e.g. Good Friday 2014-04-18 → Thursday 2014-04-17; Wednesday 2018-12-05, the Bush day of
mourning, → 2018-12-04; Memorial Day 2018-05-28 → 2018-05-29). A date carrying several series (a
third Friday that is also a quarter-end) is one expiration. An expiration is listed from the day it
enters its horizon up to and including its expiry day; it is PM-settled at that session's close
(16:00 ET, 13:00 on early-close days), see ``settlement_times``.

Program start dates are the reference's [S] figures; the Friday-weekly start (2010-01-01) is an
assumption [U] that only matters before the embedded VIX begins (2014). Horizons and counts are
choices within the reference's ranges, not exchange rules. Tue/Thu SPY expiries (from 2022 [U]) are
not modelled.

Speed: the whole 1999–2030 calendar of candidate expiries is built once (cached); a listing is a few
``searchsorted`` calls on it, and ``listings_for_sessions`` answers many sessions at once in the CSR
form the chain provider precomputes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from data_factory.errors import DataError
from data_factory.market_calendar import (
    CALENDAR_END, CALENDAR_START, EXCHANGE_TZ, exchange_date, nyse_calendar, session_bounds,
)

MONTHLY_COUNT = 12
LEAPS_YEARS = 2
QUARTERLY_COUNT = 6
WEEKLY_HORIZON_DAYS = 42
FRIDAY_WEEKLIES_FROM = pd.Timestamp("2010-01-01")
WEDNESDAY_WEEKLIES_FROM = pd.Timestamp("2016-09-01")
MONDAY_WEEKLIES_FROM = pd.Timestamp("2018-02-16")
# Queries stop early enough that the longest listing (LEAPS) still ends inside the calendar.
LAST_LISTING_DATE = pd.Timestamp(CALENDAR_END) - pd.DateOffset(years=LEAPS_YEARS + 1)

_DAY = np.timedelta64(1, "D")


def _to_day_number(dates) -> np.ndarray:
    return np.asarray(pd.DatetimeIndex(dates).values.astype("datetime64[D]").astype(np.int64))


@lru_cache(maxsize=1)
def _session_days() -> np.ndarray:
    sessions = nyse_calendar().sessions
    sessions = sessions.tz_localize(None) if sessions.tz is not None else sessions
    return _to_day_number(sessions)


def _roll(nominal_days: np.ndarray, direction: str) -> np.ndarray:
    """Move non-session days to the previous (``'previous'``) or next (``'next'``) session."""
    sessions = _session_days()
    if direction == "previous":
        return sessions[np.searchsorted(sessions, nominal_days, side="right") - 1]
    return sessions[np.searchsorted(sessions, nominal_days, side="left")]


@lru_cache(maxsize=1)
def _candidate_series() -> dict[str, np.ndarray]:
    """Expiry day numbers (days since 1970-01-01, sorted) of every series, 1999 … 2030."""
    first, last = pd.Timestamp(CALENDAR_START), pd.Timestamp(CALENDAR_END)
    third_fridays = pd.date_range(first, last, freq="WOM-3FRI")
    monthly = _roll(_to_day_number(third_fridays), "previous")
    # Last trading day of a quarter: the session on or before the quarter's last calendar day.
    quarter_ends = pd.date_range(first, last, freq="QE-DEC")
    quarterly = _roll(_to_day_number(quarter_ends), "previous")
    january = monthly[third_fridays.month == 1]

    def weekdays(weekday: int, listed_from: pd.Timestamp, direction: str) -> np.ndarray:
        days = pd.date_range(max(first, listed_from + pd.Timedelta(days=1)), last,
                             freq=f"W-{['MON', 'TUE', 'WED', 'THU', 'FRI'][weekday]}")
        return _roll(_to_day_number(days), direction)

    return {
        "monthly": monthly,
        "leaps": january,
        "quarterly": quarterly,
        "weekly_fri": weekdays(4, FRIDAY_WEEKLIES_FROM, "previous"),
        "weekly_wed": weekdays(2, WEDNESDAY_WEEKLIES_FROM, "previous"),
        "weekly_mon": weekdays(0, MONDAY_WEEKLIES_FROM, "next"),
    }


_WEEKLY_STARTS = {
    "weekly_fri": FRIDAY_WEEKLIES_FROM,
    "weekly_wed": WEDNESDAY_WEEKLIES_FROM,
    "weekly_mon": MONDAY_WEEKLIES_FROM,
}


def _check_listing_date(on_date) -> pd.Timestamp:
    stamp = exchange_date(on_date, "on_date", check_range=False)
    if not (pd.Timestamp(CALENDAR_START) <= stamp <= LAST_LISTING_DATE):
        raise DataError(f"on_date: {stamp.date()} is outside the listing calendar "
                        f"({CALENDAR_START} … {LAST_LISTING_DATE.date()})")
    return stamp


def _listed_by_series(day: int, stamp: pd.Timestamp) -> dict[str, np.ndarray]:
    series = _candidate_series()
    listed: dict[str, np.ndarray] = {}
    monthly = series["monthly"]
    start = np.searchsorted(monthly, day, side="left")
    listed["monthly"] = monthly[start:start + MONTHLY_COUNT]
    leaps = series["leaps"]
    last_leaps_day = _to_day_number([pd.Timestamp(year=stamp.year + LEAPS_YEARS, month=12, day=31)])[0]
    listed["leaps"] = leaps[np.searchsorted(leaps, day, side="left"):
                            np.searchsorted(leaps, last_leaps_day, side="right")]
    quarterly = series["quarterly"]
    start = np.searchsorted(quarterly, day, side="left")
    listed["quarterly"] = quarterly[start:start + QUARTERLY_COUNT]
    for name, listed_from in _WEEKLY_STARTS.items():
        days = series[name]
        if stamp < listed_from:
            listed[name] = days[:0]
            continue
        listed[name] = days[np.searchsorted(days, day, side="left"):
                            np.searchsorted(days, day + WEEKLY_HORIZON_DAYS, side="right")]
    return listed


def listed_expiration_days(on_date) -> np.ndarray:
    """Listed expirations on ``on_date`` as sorted unique day numbers (days since 1970-01-01)."""
    stamp = _check_listing_date(on_date)
    day = int(_to_day_number([stamp])[0])
    return np.unique(np.concatenate(list(_listed_by_series(day, stamp).values())))


def listed_expirations(on_date) -> pd.DatetimeIndex:
    """Expiration dates listed on ``on_date`` (still trading that day included), sorted, tz-naive."""
    days = listed_expiration_days(on_date)
    return pd.DatetimeIndex(days.astype("datetime64[D]").astype("datetime64[ns]"), name="expiration")


def listed_expiration_table(on_date) -> pd.DataFrame:
    """One row per listed expiration: ``expiration``, ``series`` ('monthly|quarterly', …), ``settlement``."""
    stamp = _check_listing_date(on_date)
    day = int(_to_day_number([stamp])[0])
    by_series = _listed_by_series(day, stamp)
    days = np.unique(np.concatenate(list(by_series.values())))
    labels = ["|".join(name for name, listed in by_series.items() if np.isin(d, listed)) for d in days]
    expirations = pd.DatetimeIndex(days.astype("datetime64[D]").astype("datetime64[ns]"))
    return pd.DataFrame({"expiration": expirations, "series": labels,
                         "settlement": settlement_times(expirations)})


def listings_for_sessions(sessions) -> tuple[np.ndarray, np.ndarray]:
    """Listings of many dates at once, CSR form: ``(offsets, expiry_days)``.

    The expirations listed on ``sessions[i]`` are ``expiry_days[offsets[i]:offsets[i + 1]]``
    (sorted day numbers since 1970-01-01).
    """
    stamps = pd.DatetimeIndex(sessions)
    days_per_session = [listed_expiration_days(stamp) for stamp in stamps]
    offsets = np.zeros(len(days_per_session) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([d.size for d in days_per_session])
    flat = np.concatenate(days_per_session) if days_per_session else np.empty(0, dtype=np.int64)
    return offsets, flat.astype(np.int64)


def settlement_times(expirations) -> pd.DatetimeIndex:
    """PM settlement time of each expiration: its session's close (tz-aware America/New_York)."""
    expirations = pd.DatetimeIndex(expirations)
    if expirations.tz is not None:
        expirations = expirations.tz_convert(EXCHANGE_TZ).tz_localize(None)
    expirations = expirations.normalize()
    not_sessions = ~np.isin(_to_day_number(expirations), _session_days())
    if not_sessions.any():
        bad = expirations[not_sessions][0]
        raise DataError(f"expiration {bad.date()} is not an exchange session; no settlement time")
    return pd.DatetimeIndex(session_bounds(expirations)["close"].to_numpy(), name="settlement")
