"""The embedded default data set: daily bars, risk-free rate, dividend yield and a daily IV index.

Everything is read at run time from the datasets that ship inside the ``arch`` package (no data
file is copied into this repository):

* ``arch.data.sp500``  S&P 500 index daily OHLCV, 1999-01-04 … 2018-12-31 (a price index:
  ``Adj Close == Close``, so no dividends are in it).
* ``arch.data.nasdaq`` NASDAQ Composite daily OHLCV, same dates.
* ``arch.data.vix``    VIX closes, 2014-01-03 … 2019-01-03; its holiday rows are NaN.
* ``arch.data.frenchdata`` monthly Fama–French factors; ``RF`` is the one-month T-bill return in
  percent per month, 1926-07 … 2018-11.

Proxies and assumptions (all reported by ``describe_embedded_data``):

* ``SPY`` = S&P 500 / 10. The real ETF tracks this within about 0.5 % (accrued dividends, fees).
* ``QQQ`` = NASDAQ **Composite** / 40. The real QQQ tracks the NASDAQ-100, a different (larger-cap)
  index; the Composite is the only NASDAQ series shipped, and /40 puts it near QQQ's price level in
  2014–2018. Use it for relative SPY/QQQ signals, not as QQQ prices.
* ``SPX`` and ``IXIC`` are the raw index levels.
* Volume is the index's share volume as published with the index data, NOT the ETF's volume; it
  is returned as float64 (whole numbers) like every other column. Two NASDAQ days (2015-05-12,
  2018-01-09) have volume 0 in the source and are kept as 0.
* Dividend yield: the price index holds no dividends, so a constant continuous yield
  ``DEFAULT_DIVIDEND_YIELD`` (1.9 %/yr, the S&P 500's typical yield in 2014–2019) is assumed.
* Risk-free rate: ``r = 12·ln(1 + RF/100)`` (annual, continuously compounded) of the month holding
  the date, flat within the month. December 2018 and January 2019 are missing from the source;
  the November 2018 value is carried forward through ``RF_CARRY_FORWARD_THROUGH`` and later dates
  raise (a 2018 rate must not silently price 2020 options).
* IV index (VIX points): the real VIX from 2014-01-03 on; before that a GARCH(1,1) implied-vol
  proxy (``data_factory.garch_proxy``, no look-ahead) from 2001-01-02 (after a two-year warm-up).
  VIX rows on non-session days (holidays) are dropped and counted; a NaN VIX on a session day is
  forward-filled and labelled ``vix_ffill``.
"""
from __future__ import annotations

import copy
import importlib.resources
from dataclasses import dataclass
from functools import lru_cache

import arch
import numpy as np
import pandas as pd

from data_factory.errors import DataError
from data_factory.garch_proxy import (GarchProxyConfig, garch_iv_proxy, log_returns_pct,
                                      proxy_first_date)
from data_factory.market_calendar import EXCHANGE_TZ, trading_sessions

BAR_COLUMNS = ["open", "high", "low", "close", "volume"]
PRICE_COLUMNS = ["open", "high", "low", "close"]
DEFAULT_DIVIDEND_YIELD = 0.019      # continuous, per year; assumption for the S&P 500 proxy
RF_CARRY_FORWARD_THROUGH = pd.Period("2019-01", freq="M")
DEFAULT_GARCH_CONFIG = GarchProxyConfig()


@dataclass(frozen=True)
class EmbeddedSymbol:
    """How one symbol is made from an ``arch`` dataset: ``price = index level / divisor``."""

    dataset: str          # module name under arch.data
    divisor: float
    description: str


EMBEDDED_SYMBOLS: dict[str, EmbeddedSymbol] = {
    "SPY": EmbeddedSymbol("sp500", 10.0, "PROXY: S&P 500 index / 10 (stands in for the SPY ETF)"),
    "QQQ": EmbeddedSymbol("nasdaq", 40.0, "PROXY: NASDAQ Composite index / 40 (stands in for the "
                                          "NASDAQ-100 ETF QQQ; Composite, not NASDAQ-100)"),
    "SPX": EmbeddedSymbol("sp500", 1.0, "S&P 500 index level"),
    "IXIC": EmbeddedSymbol("nasdaq", 1.0, "NASDAQ Composite index level"),
}


# ---------------------------------------------------------------------------------------------
# validation shared with the intraday synthesis
# ---------------------------------------------------------------------------------------------

def _first_bad(frame: pd.DataFrame, mask: pd.Series) -> str:
    count = int(mask.sum())
    first = pd.Timestamp(frame.index[np.flatnonzero(mask.to_numpy())[0]]).date()
    more = f" (and {count - 1} more rows)" if count > 1 else ""
    return f"{first}{more}"


def validate_daily_bars(frame: pd.DataFrame, source: str) -> None:
    """Raise DataError naming source, date and field for the first problem in a daily OHLCV frame.

    Checks: the five columns exist; no NaN; prices positive; volume not negative;
    ``low <= open, close <= high``.
    """
    missing = [column for column in BAR_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing} (need {BAR_COLUMNS})")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError(f"{source}: index must be a DatetimeIndex of session dates, "
                        f"got {type(frame.index).__name__}")
    for column in BAR_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            raise DataError(f"{source} {_first_bad(frame, values.isna())}: {column} is missing or not a number")
    for column in PRICE_COLUMNS:
        bad = frame[column] <= 0
        if bad.any():
            raise DataError(f"{source} {_first_bad(frame, bad)}: {column} must be positive")
    bad_volume = frame["volume"] < 0
    if bad_volume.any():
        raise DataError(f"{source} {_first_bad(frame, bad_volume)}: volume must not be negative")
    for column in ("open", "close"):
        above = frame[column] > frame["high"]
        if above.any():
            raise DataError(f"{source} {_first_bad(frame, above)}: {column} is above high "
                            "(need low <= open, close <= high)")
        below = frame[column] < frame["low"]
        if below.any():
            raise DataError(f"{source} {_first_bad(frame, below)}: {column} is below low "
                            "(need low <= open, close <= high)")


# ---------------------------------------------------------------------------------------------
# loading (cached: arch parses CSV files)
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _arch_frame(dataset: str) -> pd.DataFrame:
    module = getattr(__import__("arch.data", fromlist=[dataset]), dataset)
    return module.load()


@lru_cache(maxsize=None)
def _symbol_frame(symbol: str) -> pd.DataFrame:
    spec = EMBEDDED_SYMBOLS[symbol]
    raw = _arch_frame(spec.dataset)
    frame = pd.DataFrame({
        "open": raw["Open"] / spec.divisor,
        "high": raw["High"] / spec.divisor,
        "low": raw["Low"] / spec.divisor,
        "close": raw["Close"] / spec.divisor,
        "volume": raw["Volume"].astype("float64"),
    }).astype("float64")
    frame.index = pd.DatetimeIndex(raw.index, name="date").as_unit("ns")
    validate_daily_bars(frame, f"embedded {symbol} (arch.data.{spec.dataset})")
    return frame  # cached: every public function hands out copies


def _parse_date(value, field: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{field}: cannot read {value!r} as a date ({exc})") from None
    if stamp is pd.NaT:
        raise DataError(f"{field}: {value!r} is not a date")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert(EXCHANGE_TZ).tz_localize(None)
    return stamp.normalize()


def _input_index(dates) -> pd.DatetimeIndex:
    """Dates or timestamps (scalar or sequence, naive or tz-aware) as given, as a DatetimeIndex."""
    values = [dates] if np.ndim(dates) == 0 else dates
    try:
        index = pd.DatetimeIndex(pd.to_datetime(values))
    except (ValueError, TypeError) as exc:
        raise DataError(f"dates: cannot read {dates!r} as dates ({exc})") from None
    if index.hasnans:
        raise DataError(f"dates: missing date at position {int(np.flatnonzero(index.isna())[0])}")
    return index


def _as_date_index(dates) -> pd.DatetimeIndex:
    """Exchange-local (America/New_York) calendar dates of the inputs, tz-naive midnight."""
    index = _input_index(dates)
    if index.tz is not None:
        index = index.tz_convert(EXCHANGE_TZ).tz_localize(None)
    return index.normalize().rename("date")


def _slice_dates(frame: pd.DataFrame, start, end, what: str) -> pd.DataFrame:
    first, last = frame.index[0], frame.index[-1]
    available = f"{what} is available from {first.date()} to {last.date()}"
    lo = first if start is None else _parse_date(start, "start")
    hi = last if end is None else _parse_date(end, "end")
    if lo > hi:
        raise DataError(f"start {lo.date()} is after end {hi.date()}")
    if lo < first or lo > last:
        raise DataError(f"start {lo.date()} is outside the data: {available}")
    if hi < first or hi > last:
        raise DataError(f"end {hi.date()} is outside the data: {available}")
    chosen = frame.loc[lo:hi]
    if chosen.empty:
        raise DataError(f"no sessions between {lo.date()} and {hi.date()}; {available}")
    return chosen.copy()


def daily_bars(symbol: str, start=None, end=None) -> pd.DataFrame:
    """Daily ``open high low close volume`` (float64) of an embedded symbol, index ``date``.

    ``start``/``end`` are inclusive dates; None means the first/last day of the data. The frame is
    a copy; ``attrs`` carry ``symbol``, ``source`` and ``proxy`` (True for SPY/QQQ).
    """
    key = str(symbol).upper()
    if key not in EMBEDDED_SYMBOLS:
        raise DataError(f"unknown embedded symbol {symbol!r}; known symbols: {sorted(EMBEDDED_SYMBOLS)}")
    bars = _slice_dates(_symbol_frame(key), start, end, f"embedded {key}")
    spec = EMBEDDED_SYMBOLS[key]
    bars.attrs.update(symbol=key, source=f"arch.data.{spec.dataset}", description=spec.description,
                      proxy=spec.divisor != 1.0)
    return bars


# ---------------------------------------------------------------------------------------------
# rates and dividends
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _monthly_rf() -> pd.DataFrame:
    # The raw file, because arch's loader turns YYYYMM into 1970 nanosecond timestamps.
    resource = importlib.resources.files("arch.data.frenchdata") / "frenchdata.csv.gz"
    with importlib.resources.as_file(resource) as path:
        raw = pd.read_csv(path, dtype={"Date": str})
    months = pd.PeriodIndex(pd.to_datetime(raw["Date"], format="%Y%m"), freq="M", name="month")
    rf_pct = pd.Series(raw["RF"].to_numpy(dtype=float), index=months)
    if rf_pct.isna().any() or months.has_duplicates or not months.is_monotonic_increasing:
        raise DataError("arch.data.frenchdata: RF column has gaps, duplicates or unsorted months")
    frame = pd.DataFrame({"rf_pct_per_month": rf_pct,
                          "rate_cc_annual": 12.0 * np.log1p(rf_pct / 100.0)})
    frame["carried_forward"] = False
    extra = pd.period_range(months[-1] + 1, RF_CARRY_FORWARD_THROUGH, freq="M", name="month")
    if len(extra):
        carried = pd.DataFrame({"rf_pct_per_month": rf_pct.iloc[-1],
                                "rate_cc_annual": frame["rate_cc_annual"].iloc[-1],
                                "carried_forward": True}, index=extra)
        frame = pd.concat([frame, carried])
    return frame


def monthly_risk_free() -> pd.DataFrame:
    """Monthly RF (% per month), its annual continuously compounded rate, and carry-forward flags."""
    return _monthly_rf().copy()


def risk_free_rate(dates) -> pd.Series:
    """Annual continuously compounded risk-free rate for each date (flat within a month).

    ``dates``: a date or timestamp, or a sequence/index of them (tz-aware ones are read in New
    York time). Returns a Series indexed by the inputs as given. Months after 2018-11 up to ``RF_CARRY_FORWARD_THROUGH`` reuse the 2018-11 rate; dates before
    1926-07 or after the carry-forward month raise DataError.
    """
    index = _as_date_index(dates)
    table = _monthly_rf()
    months = index.to_period("M")
    first, last = table.index[0], table.index[-1]
    early = months < first
    if early.any():
        raise DataError(f"risk-free rate: {index[early][0].date()} is before the data "
                        f"(Fama–French RF starts {first}; last month {last}, the source's 2018-11 "
                        f"value carried forward)")
    late = months > last
    if late.any():
        raise DataError(f"risk-free rate: {index[late][0].date()} is after {last}, the end of the "
                        f"embedded RF (2018-11, carried forward to {last}); supply a rate series")
    return pd.Series(table["rate_cc_annual"].reindex(months).to_numpy(), index=_input_index(dates),
                     name="risk_free_rate")


def dividend_yield(dates=None) -> float | pd.Series:
    """The assumed continuous dividend yield of the S&P 500 proxy: a constant (see module docstring)."""
    if dates is None:
        return DEFAULT_DIVIDEND_YIELD
    return pd.Series(DEFAULT_DIVIDEND_YIELD, index=_input_index(dates), name="dividend_yield")


# ---------------------------------------------------------------------------------------------
# implied-volatility index: VIX, and the GARCH proxy before it
# ---------------------------------------------------------------------------------------------

def align_vix_to_sessions(vix: pd.Series) -> tuple[pd.DataFrame, dict]:
    """Put a daily VIX close series on NYSE sessions, explicitly.

    Rows on non-session days are dropped (they are holidays or weekends, not missing data); a
    session with no value (NaN or no row) between the first and last valid value gets the previous
    value with ``iv_source = 'vix_ffill'``. Returns ``(frame[iv_index, iv_source], counts)``.
    """
    series = pd.Series(pd.to_numeric(vix, errors="coerce").to_numpy(dtype=float),
                       index=_as_date_index(vix.index).as_unit("ns"))
    if series.index.has_duplicates:
        raise DataError(f"VIX: duplicate date {series.index[series.index.duplicated()][0].date()}")
    series = series.sort_index()
    valid = series.dropna()
    if valid.empty:
        raise DataError("VIX: no values")
    if (valid <= 0).any():
        raise DataError(f"VIX {valid.index[valid <= 0][0].date()}: vix must be positive")
    sessions = trading_sessions(valid.index[0], series.index[-1])
    off_session = series[~series.index.isin(sessions)]
    on_sessions = series.reindex(sessions)
    # A trailing run of NaN sessions is outside the data, not a gap to fill.
    on_sessions = on_sessions.loc[:on_sessions.last_valid_index()]
    gaps = on_sessions.isna()
    frame = pd.DataFrame({"iv_index": on_sessions.ffill(),
                          "iv_source": np.where(gaps, "vix_ffill", "vix")}, index=on_sessions.index)
    frame.index.name = "date"
    counts = {
        "non_session_rows_dropped": int(len(off_session)),
        "non_session_rows_dropped_nan": int(off_session.isna().sum()),
        "non_session_dates_dropped": [str(d.date()) for d in off_session.index],
        "session_days_forward_filled": int(gaps.sum()),
        "session_dates_forward_filled": [str(d.date()) for d in on_sessions.index[gaps]],
        "leading_rows_without_value": int(series.index.get_loc(valid.index[0])),
    }
    return frame, counts


@lru_cache(maxsize=1)
def _embedded_vix() -> tuple[pd.DataFrame, dict]:
    return align_vix_to_sessions(_arch_frame("vix")["vix"])


@lru_cache(maxsize=4)
def _embedded_garch_proxy(config: GarchProxyConfig) -> pd.DataFrame:
    returns = log_returns_pct(_symbol_frame("SPX")["close"])
    return garch_iv_proxy(returns, config)


def garch_proxy(start=None, end=None, config: GarchProxyConfig = DEFAULT_GARCH_CONFIG) -> pd.DataFrame:
    """The GARCH IV proxy of the embedded S&P 500 (all years, incl. 2014–2018 for comparison).

    Columns as in ``data_factory.garch_proxy.garch_iv_proxy``; computed once per config (seconds).
    """
    return _slice_dates(_embedded_garch_proxy(config), start, end, "the GARCH IV proxy")


@lru_cache(maxsize=4)
def _iv_index(garch_config: GarchProxyConfig) -> pd.DataFrame:
    vix, _ = _embedded_vix()
    proxy = _embedded_garch_proxy(garch_config)
    before = proxy.loc[proxy.index < vix.index[0], ["iv_proxy"]].rename(columns={"iv_proxy": "iv_index"})
    before["iv_source"] = "garch_proxy"
    return pd.concat([before, vix])


def daily_iv_index(start=None, end=None,
                   garch_config: GarchProxyConfig = DEFAULT_GARCH_CONFIG) -> pd.DataFrame:
    """Daily IV index in VIX points on sessions: ``iv_index`` and ``iv_source``.

    ``iv_source`` is 'vix' (real close), 'vix_ffill' (session with no VIX value, previous close
    reused) or 'garch_proxy' (before the VIX data starts). Available from the proxy's first day
    (2001-01-02) to the last VIX day (2019-01-03); other dates raise DataError.
    """
    frame = _slice_dates(_iv_index(garch_config), start, end, "the daily IV index (GARCH proxy, then VIX)")
    frame.attrs["synthetic_source"] = "garch_proxy"
    return frame


# ---------------------------------------------------------------------------------------------
# description for run reports
# ---------------------------------------------------------------------------------------------

def describe_embedded_data() -> dict:
    """Sources, periods, proxies, assumptions and counts of dropped rows, for a run report."""
    symbols = {}
    for symbol, spec in EMBEDDED_SYMBOLS.items():
        frame = _symbol_frame(symbol)
        symbols[symbol] = {
            "source": f"arch.data.{spec.dataset} (arch {arch.__version__})",
            "description": spec.description,
            "divisor": spec.divisor,
            "proxy": spec.divisor != 1.0,
            "first": str(frame.index[0].date()), "last": str(frame.index[-1].date()),
            "sessions": int(len(frame)),
            "zero_volume_days": [str(d.date()) for d in frame.index[frame["volume"].to_numpy() == 0]],
            "volume": "index share volume from the source (not ETF volume), float64",
        }
    vix, vix_counts = _embedded_vix()
    vix_counts = copy.deepcopy(vix_counts)
    returns_dates = _symbol_frame("SPX").index[1:]
    rf = _monthly_rf()
    source_rf = rf[~rf["carried_forward"]]
    return {
        "daily_bars": symbols,
        "iv_index": {
            "unit": "VIX points",
            "vix": {"source": "arch.data.vix (closes only)", "first": str(vix.index[0].date()),
                    "last": str(vix.index[-1].date()), "sessions": int(len(vix)), **vix_counts},
            "garch_proxy": {
                "synthetic": True,
                "used_before": str(vix.index[0].date()),
                "first": str(proxy_first_date(returns_dates, DEFAULT_GARCH_CONFIG).date()),
                "last": str(returns_dates[-1].date()),
                "method": "GARCH(1,1) constant mean, normal errors (arch), refitted each month start on "
                          "all S&P 500 log returns up to the previous session; 30-day average variance "
                          "forecast, annualised x252, times vrp_multiplier",
                "vrp_multiplier_is_assumption": True,
                **DEFAULT_GARCH_CONFIG.as_dict(),
            },
        },
        "risk_free_rate": {
            "source": "arch.data.frenchdata RF (one-month T-bill, % per month)",
            "conversion": "r = 12*ln(1 + RF/100), flat within the month",
            "first_month": str(source_rf.index[0]), "last_month": str(source_rf.index[-1]),
            "carried_forward_months": [str(m) for m in rf.index[rf["carried_forward"]]],
        },
        "dividend_yield": {"value": DEFAULT_DIVIDEND_YIELD, "assumption": True,
                           "why": "the S&P 500 data is a price index (Adj Close == Close)"},
        "synthetic_or_proxy": ["SPY = S&P 500 / 10", "QQQ = NASDAQ Composite / 40",
                               "IV index before the VIX data = GARCH proxy",
                               f"dividend yield = constant {DEFAULT_DIVIDEND_YIELD}",
                               "risk-free rate after 2018-11 = 2018-11 carried forward"],
    }
