"""NYSE trading sessions (holidays, early closes) from ``exchange_calendars``.

One cached calendar covers 1999 … 2030, the span of the embedded data plus room for listed expiries.
Session dates are tz-naive midnight ``Timestamp``s; open/close times are tz-aware America/New_York.
"""
from __future__ import annotations

from functools import lru_cache

import exchange_calendars as xcals
import pandas as pd

from data_factory.errors import DataError

EXCHANGE_TZ = "America/New_York"
CALENDAR_START = "1999-01-01"
CALENDAR_END = "2030-12-31"


@lru_cache(maxsize=1)
def nyse_calendar() -> xcals.ExchangeCalendar:
    return xcals.get_calendar("XNYS", start=CALENDAR_START, end=CALENDAR_END)


def exchange_date(value, field: str, check_range: bool = True) -> pd.Timestamp:
    """``value`` as a tz-naive midnight date in exchange time; DataError naming ``field`` when it
    cannot be read or (with ``check_range``) lies outside the calendar."""
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{field}: cannot read {value!r} as a date ({exc})") from None
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert(EXCHANGE_TZ).tz_localize(None)
    stamp = stamp.normalize()
    if check_range and not (pd.Timestamp(CALENDAR_START) <= stamp <= pd.Timestamp(CALENDAR_END)):
        raise DataError(f"{field}: {stamp.date()} is outside the exchange calendar "
                        f"({CALENDAR_START} … {CALENDAR_END})")
    return stamp


def trading_sessions(start, end) -> pd.DatetimeIndex:
    """NYSE session dates from ``start`` to ``end`` inclusive (tz-naive, midnight)."""
    first, last = exchange_date(start, "start"), exchange_date(end, "end")
    if first > last:
        raise DataError(f"start {first.date()} is after end {last.date()}")
    calendar = nyse_calendar()
    # exchange_calendars refuses bounds before its first session (1999-01-04): clamp to it.
    first = max(first, calendar.first_session)
    last = min(last, calendar.last_session)
    if first > last:
        return pd.DatetimeIndex([], name="date", dtype="datetime64[ns]")
    sessions = calendar.sessions_in_range(first, last)
    return pd.DatetimeIndex(sessions.tz_localize(None) if sessions.tz is not None else sessions,
                            name="date").as_unit("ns")


def session_bounds(sessions: pd.DatetimeIndex) -> pd.DataFrame:
    """Open and close time (America/New_York) of each session; early closes included (13:00)."""
    schedule = nyse_calendar().schedule.loc[sessions]
    return pd.DataFrame({
        "open": schedule["open"].dt.tz_convert(EXCHANGE_TZ),
        "close": schedule["close"].dt.tz_convert(EXCHANGE_TZ),
    }, index=pd.DatetimeIndex(sessions, name="date"))


def is_session(day) -> bool:
    return bool(nyse_calendar().is_session(exchange_date(day, "date")))


def previous_session_on_or_before(day) -> pd.Timestamp:
    """The session on ``day`` if it trades, else the last one before it (Friday-holiday rule)."""
    return pd.Timestamp(nyse_calendar().date_to_session(exchange_date(day, "date"), direction="previous"))


def next_session_on_or_after(day) -> pd.Timestamp:
    """The session on ``day`` if it trades, else the first one after it (Monday-holiday rule)."""
    return pd.Timestamp(nyse_calendar().date_to_session(exchange_date(day, "date"), direction="next"))
