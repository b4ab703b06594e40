"""LIVE market data from Alpaca (alpaca-py 0.44.0) behind the bar contract (``core.market``).

Owns ``AlpacaFeed``, the market-data source of the live trading driver: the underlying's intraday
and daily bars from ``StockHistoricalDataClient`` and option-chain snapshots from
``OptionHistoricalDataClient`` (both built by the caller and passed in), turned into

* the bar contract: 5-minute trading bars stamped at their CLOSE (America/New_York), positions
  ``0 … len(bar_times) − 1`` growing as bars close, warm-up history and live bars alike;
* the inputs of the feature table (``feature_inputs()``: what ``intelligence.features.
  compute_bar_features`` takes, as ``core.market_data.embedded_feature_inputs`` builds them for the
  embedded data).

Bars
    Alpaca stamps a bar at its START; the feed keeps only completed regular-session bars
    (start + width ≤ now, inside the XNYS session) and stamps them at start + width. The trading
    bars are ``intelligence.mtf_consensus.resample_session_bars`` of the base bars, exactly as the
    feature table rebuilds them. A trading bar closes when the clock has passed its close and the
    base bar ending at it has arrived (or ``late_bar_grace_s`` has passed without it: the data
    vendor publishes a minute bar a moment after the minute). Once a trading bar is out it never
    changes: base bars older than the last trading bar are never requested again, so a late one
    cannot rewrite history. Gaps: a whole trading bar without a base bar (no trade on the feed),
    or a missing first minute of a session (the resampling anchors the session on it), is filled
    with a flat bar at the previous close and volume 0, counted in ``describe()``; a session with
    no bar at all is a ``DataError``.

Chains
    Recorded only for bars observed live: when ``refresh`` sees a trading bar close it takes ONE
    chain snapshot (``get_option_chain``; the SDK follows the pages) for expirations ``dte_min …
    dte_max`` days after the session and strikes within ``±strike_range`` of the bar's close, and
    files it under the newest closed bar. A bar without a snapshot (warm-up bars, bars that closed
    while the driver was away) answers every chain question with a ``DataError``. The snapshot is
    taken at refresh time, a moment after the bar's close: ``quote_age_s`` = bar close − quote
    time, negative when the quote was updated after the close.
    Rows: OCC symbols parsed defensively (malformed ones and foreign roots are skipped and
    counted); bid/ask from the latest quote, ``mid`` = (bid + ask)/2 (NaN unless 0 ≤ bid ≤ ask,
    ask > 0), ``theo`` = mid. IV and Greeks: the vendor's where present (``iv_conf`` 1.0);
    otherwise IV solved from the mid with the European Black–Scholes–Merton solver and Greeks from
    it (``iv_conf`` 0.5), or NaN when no IV solves (``iv_conf`` 0.0). SPY options are AMERICAN:
    the European solver reads the early-exercise premium of deep in-the-money puts as volatility.
    Vendor Greeks are taken in the project's units (vega per vol point, theta per calendar day).
    ``t_years`` = seconds from the bar's close to the settlement (16:00 ET, 13:00 on early closes)
    over 365 days, as the synthetic chain defines it.

IV index (VIX points)
    A bar with a snapshot: the 30-calendar-day at-the-money IV, interpolated linearly in total
    variance between the expirations on either side of 30 days (flat beyond them), each
    expiration's ATM IV being the put/call average at the strike nearest the spot. Any other bar
    (no snapshot, or no ATM IV in it): the previous session's daily IV close. The daily IV closes
    are a PROXY from the underlying's daily closes: ``data_factory.garch_proxy`` (GARCH(1,1),
    monthly refits, × ``vrp_multiplier``) where enough history exists, a 21-session realised-vol
    proxy (× the same multiplier) before that; each session with a recorded snapshot has its close
    replaced by the last chain-based reading of that session.

Daily inputs: Alpaca's 1Day bars of the underlying and the pair for completed sessions (a
session's 1Day bar is read an hour after its close at the earliest; until then, and for the session
under way, the underlying's row is aggregated from the base bars), or ``daily_source="intraday"``:
daily bars aggregated from intraday bars, for a source without 1Day bars.

Requests (rate limit 200/min): warm-up costs one or two minute-bar pages and one daily page; a
refresh costs nothing until a trading bar can have closed, then one bar request, the chain pages
(1000 contracts a page: ``dte_min … dte_max`` × ``±strike_range`` of a daily-expiring SPY chain is
many pages, so narrow the window to what the strategy reads) and, once a session, one daily
request. ``requests`` counts every HTTP call the two clients make (retries included).

Errors: an Alpaca error (HTTP status, network failure, a response that does not parse), an empty
bar response for a session that should have bars, or a chain with no contract in the DTE window
is a ``DataError`` with one sentence naming the request. A failed ``refresh`` changes nothing.
"""
from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from data_factory.chain_quotes import (COMPUTED_IV_CONF, NO_IV_CONF, VENDOR_IV_CONF,  # noqa: F401 (re-exported)
                                       atm_iv_index, complete_iv_and_greeks)
from data_factory.errors import DataError
from data_factory.expirations import settlement_times
from data_factory.garch_proxy import GarchProxyConfig, garch_iv_proxy, log_returns_pct
from data_factory.market_calendar import EXCHANGE_TZ, exchange_date, session_bounds, trading_sessions
from data_factory.option_chain import SECONDS_PER_YEAR, ChainSlice, ContractPath, StructureQuotes
from intelligence.mtf_consensus import resample_session_bars

TRADING_BAR_MINUTES = 5
IV_INDEX_DAYS = 30
REALISED_VOL_SESSIONS = 21
# A session's 1Day bar is read this long after its close at the earliest (the closing auction and
# late prints come in first); until then the session's daily row comes from the base bars.
DAILY_BAR_DELAY_NS = 3600 * 1_000_000_000
# Root (letters, digits for adjusted contracts), YYMMDD, C/P, strike × 1000 in 8 digits. The root
# is matched lazily so that the date is the LAST six digits before the right.
OCC_SYMBOL = re.compile(r"^([A-Z0-9]{1,6}?)(\d{6})([CP])(\d{8})$")
_NS_PER_MINUTE = 60 * 1_000_000_000
_NS_PER_DAY = 86_400 * 1_000_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_GREEK_NAMES = ("delta", "gamma", "theta", "vega", "rho")
_OHLCV = ["open", "high", "low", "close", "volume"]


@dataclass(frozen=True, slots=True, eq=False)
class LiveChainSlice(ChainSlice):
    """A ``ChainSlice`` of a live Alpaca snapshot: vendor quotes of AMERICAN contracts."""

    synthetic = False
    european = False


@dataclass
class _Update:
    """What one warm-up or refresh step adds, built completely before anything is committed."""

    base: pd.DataFrame          # the emitted base bars after the step (all of them)
    pending: pd.DataFrame       # fetched base bars of trading bars not yet closed
    ready_ns: list              # close times (UTC ns) of the trading bars the step adds
    filled: int                 # flat bars inserted


class AlpacaFeed:
    """The bar contract and the feature-table inputs from Alpaca market data (module docstring).

    ``stock_client``/``option_client``: alpaca-py ``StockHistoricalDataClient`` and
    ``OptionHistoricalDataClient`` built by the caller, ``raw_data`` either way (raw is faster and
    survives a malformed ``greeks`` object, which makes the SDK's models reject the whole chain).
    The feed wraps their (private) ``_session.request`` to count requests (``requests``) and to
    give every request ``request_timeout_s``: the SDK has no counter and no timeout of its own.

    ``underlying``/``pair``: the traded symbol and the divergence pair (None: no pair; daily
    bars only). ``stock_feed`` ('iex' on the free plan) and ``option_feed`` ('indicative').
    ``dte_min``/``dte_max``: the expirations each snapshot fetches (calendar days after the
    session), ``strike_range``: its strikes, ± this fraction of the bar's close.
    ``base_bar_minutes``: the base bars' size (divides 5). ``warmup_sessions``: completed sessions
    of base bars fetched by ``warm_up``. ``daily_history_days``: the span of the daily inputs of
    the feature table; ``proxy_history_days``: the span of 1Day bars fetched for the IV proxy
    (the GARCH fit wants ≈ 500 returns before its first value). ``daily_source``: 'daily'
    (Alpaca's 1Day bars) or 'intraday' (daily bars aggregated from base-timeframe bars over
    ``daily_history_days``, for a source without 1Day bars). ``rate``/``dividend_yield``:
    continuous, for IVs and Greeks the vendor did not give. ``late_bar_grace_s``: how long a
    trading bar waits for its last base bar after its close.
    """

    def __init__(self, stock_client, option_client, underlying: str = "SPY", pair: str | None = "QQQ",
                 stock_feed: str = "iex", option_feed: str = "indicative", dte_min: int = 0, dte_max: int = 60,
                 base_bar_minutes: int = 1, warmup_sessions: int = 40, daily_history_days: int = 400,
                 rate: float = 0.04, dividend_yield: float = 0.013, *, strike_range: float = 0.15,
                 proxy_history_days: int = 1200, daily_source: str = "daily",
                 garch_config: GarchProxyConfig = GarchProxyConfig(),
                 late_bar_grace_s: float = 30.0, request_timeout_s: float = 10.0):
        from alpaca.data.enums import DataFeed, OptionsFeed

        if base_bar_minutes < 1 or TRADING_BAR_MINUTES % base_bar_minutes:
            raise ValueError(f"base_bar_minutes {base_bar_minutes} must divide the {TRADING_BAR_MINUTES}-minute "
                             f"trading bar")
        if not 0 <= dte_min <= dte_max:
            raise ValueError(f"need 0 <= dte_min <= dte_max, got {dte_min} and {dte_max}")
        if warmup_sessions < 1 or daily_history_days < 1:
            raise ValueError("warmup_sessions and daily_history_days must be at least 1")
        if not 0.0 < strike_range < 1.0:
            raise ValueError(f"strike_range must lie in (0, 1), got {strike_range}")
        if daily_source not in ("daily", "intraday"):
            raise ValueError(f"daily_source must be 'daily' or 'intraday', got {daily_source!r}")
        if not (math.isfinite(rate) and math.isfinite(dividend_yield)):
            raise ValueError("rate and dividend_yield must be finite")
        self.stock_client = stock_client
        self.option_client = option_client
        self.underlying = underlying.upper()
        self.pair = None if pair is None else pair.upper()
        self.stock_feed = DataFeed(stock_feed)
        self.option_feed = OptionsFeed(option_feed)
        self.dte_min = int(dte_min)
        self.dte_max = int(dte_max)
        self.base_bar_minutes = int(base_bar_minutes)
        self.warmup_sessions = int(warmup_sessions)
        self.daily_history_days = int(daily_history_days)
        self.daily_source = daily_source
        # Calendar days of daily closes fetched: enough for the GARCH fit's warm-up from 1Day bars;
        # only the feature table's own span when daily bars are built from intraday bars.
        self.proxy_history_days = (max(int(proxy_history_days), self.daily_history_days) if daily_source == "daily"
                                   else self.daily_history_days)
        self.rate = float(rate)
        self.dividend_yield = float(dividend_yield)
        self.strike_range = float(strike_range)
        self.garch_config = garch_config
        self.late_bar_grace_ns = int(late_bar_grace_s * 1e9)
        self.request_timeout_s = float(request_timeout_s)
        self.requests = 0
        for client in {id(stock_client): stock_client, id(option_client): option_client}.values():
            self._instrument(client)

        self._width_ns = self.base_bar_minutes * _NS_PER_MINUTE
        self._now_ns: int | None = None
        empty = _empty_bars()
        self._base = empty                  # emitted base bars: close-time index (America/New_York)
        self._pending = empty               # fetched, but their trading bar has not closed yet
        self._close_ns = np.empty(0, dtype=np.int64)
        self._ohlcv = np.empty((0, 5))
        self._bar_iv = np.empty(0)
        self._bar_times = pd.DatetimeIndex([], tz=EXCHANGE_TZ)
        self._sessions = pd.DatetimeIndex([])
        self._next_close_ns: int | None = None
        self._daily = _empty_daily()          # 1Day bars of the underlying, completed sessions
        self._daily_pair = _empty_daily()
        self._proxy = pd.Series(dtype=float)
        self._proxy_source = pd.Series(dtype=object)
        self._chains: dict[int, LiveChainSlice] = {}
        self._chain_rows: dict[int, dict] = {}
        # Contracts held (track()): quoted each bar even outside the chain request's DTE window
        # and strike range, in a slice of their own so the entry chain and the IV index are the
        # chain request's alone.
        self._tracked: tuple[str, ...] = ()
        self._held: dict[int, LiveChainSlice] = {}
        self._held_rows: dict[int, dict] = {}
        self._chain_iv: dict[int, float] = {}
        self._daily_checked_through = None
        self._snapshot_lag_s: dict[int, float] = {}
        self._counts = {"malformed_symbols": 0, "foreign_roots": 0, "duplicate_contracts": 0,
                        "vendor_iv_rows": 0, "computed_iv_rows": 0, "no_iv_rows": 0, "no_quote_rows": 0,
                        "filled_bars": 0, "iv_index_fallbacks": 0}

    # ------------------------------------------------------------------------------------------
    # HTTP plumbing
    def _instrument(self, client) -> None:
        """Count every HTTP request of ``client`` and give it a timeout (its private requests
        session: the SDK has no hook, no counter and no timeout of its own)."""
        session = client._session
        send = session.request

        def request(method, url, **kwargs):
            self.requests += 1
            kwargs.setdefault("timeout", self.request_timeout_s)
            return send(method, url, **kwargs)

        session.request = request

    def _call(self, what: str, method, request):
        from alpaca.common.exceptions import APIError
        from pydantic import ValidationError
        from requests.exceptions import RequestException

        try:
            return method(request)
        except APIError as error:
            raise DataError(f"Alpaca {what} failed: {_api_error_text(error)}") from error
        except RequestException as error:
            raise DataError(f"Alpaca {what} failed: {type(error).__name__} ({_short(str(error))})") from error
        except ValidationError as error:
            raise DataError(f"Alpaca {what}: the response did not parse ({error.error_count()} validation "
                            f"errors, first: {_short(str(error.errors()[0]))}); build the data client with "
                            f"raw_data=True to read it leniently") from error

    def _fetch_bars(self, symbols: list[str], minutes: int | None, start_ns: int, end_ns: int,
                    label: str) -> dict[str, pd.DataFrame]:
        """Bars of ``symbols`` (``minutes`` per bar, None: daily) starting in [start, end], each a
        frame indexed by the bar's START time (UTC)."""
        from alpaca.data.enums import Adjustment
        from alpaca.data.requests import StockBarsRequest
        from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

        timeframe = TimeFrame.Day if minutes is None else TimeFrame(minutes, TimeFrameUnit.Minute)
        start, end = _utc(start_ns), _utc(end_ns)
        request = StockBarsRequest(symbol_or_symbols=symbols, timeframe=timeframe, start=start.to_pydatetime(),
                                   end=end.to_pydatetime(), feed=self.stock_feed, adjustment=Adjustment.SPLIT)
        what = (f"{label} bars request for {','.join(symbols)} ({_local(start_ns)} … {_local(end_ns)}, "
                f"feed {self.stock_feed.value})")
        response = self._call(what, self.stock_client.get_stock_bars, request)
        data = response if isinstance(response, dict) else response.data
        return {symbol: _bars_frame(data.get(symbol) or [], what) for symbol in symbols}

    # ------------------------------------------------------------------------------------------
    # the clock
    def _clock(self, now) -> int:
        stamp = pd.Timestamp(now)
        if stamp.tzinfo is None:
            raise ValueError(f"now must be tz-aware (the broker's clock), got {now!r}")
        now_ns = int(stamp.tz_convert("UTC").as_unit("ns").value)
        if self._now_ns is not None and now_ns < self._now_ns:
            raise ValueError(f"now {stamp} is before the feed's last time {_local(self._now_ns)}")
        return now_ns

    # ------------------------------------------------------------------------------------------
    # warm-up and refresh
    def warm_up(self, now) -> int:
        """History up to ``now``: base bars of the last ``warmup_sessions`` completed sessions (and
        of the session under way), daily bars of the underlying and the pair. Returns the number
        of trading bars. No chains: those exist only for bars observed by ``refresh``."""
        if self._now_ns is not None:
            raise RuntimeError("warm_up was already called; use refresh")
        now_ns = self._clock(now)
        today = _local_date(now_ns)
        calendar = _session_table(today - pd.Timedelta(days=2 * self.warmup_sessions + 20), today)
        completed = calendar.index[calendar["close_ns"].to_numpy() <= now_ns]
        if len(completed) < self.warmup_sessions:
            raise DataError(f"warm-up: the calendar has {len(completed)} completed sessions before {_local(now_ns)}, "
                            f"fewer than warmup_sessions = {self.warmup_sessions}")
        warm = completed[-self.warmup_sessions:]
        first_open = int(calendar.loc[warm[0], "open_ns"])
        fetched = self._fetch_bars([self.underlying], self.base_bar_minutes, first_open, now_ns,
                                   f"{self.base_bar_minutes}-minute")[self.underlying]
        fetched = self._regular_completed(fetched, now_ns)
        have = set(_bar_sessions(fetched.index))
        missing = [day for day in warm if day not in have]
        if missing:
            raise DataError(f"warm-up: Alpaca returned no {self.base_bar_minutes}-minute {self.underlying} bars for "
                            f"session {missing[0].date()} ({len(missing)} of {len(warm)} sessions empty; "
                            f"feed {self.stock_feed.value})")
        daily_start = int((pd.Timestamp(today) - pd.Timedelta(days=self.proxy_history_days))
                          .tz_localize(EXCHANGE_TZ).tz_convert("UTC").value)
        daily_through = self._last_completed_session(now_ns - DAILY_BAR_DELAY_NS)
        daily, pair = self._fetch_daily(daily_start, now_ns, daily_through)
        update = self._step(now_ns, fetched, first_session=warm[0])
        self._commit(now_ns, update, chain=None, daily=(daily, pair, daily_through))
        return len(self._close_ns)

    def track(self, symbols) -> None:
        """The OCC symbols of the contracts held now. Each bar's snapshot quotes those the chain
        request did not return (a condor whose DTE fell below ``dte_min``, or whose strikes the
        spot left behind the strike range) with one more request, so an open position is always
        marked and can be closed."""
        symbols = tuple(sorted(set(symbols)))
        for symbol in symbols:
            contract = parse_occ_symbol(symbol)
            if contract is None or contract[0] != self.underlying:
                raise ValueError(f"track: {symbol!r} is not an OCC symbol of a {self.underlying} option")
        self._tracked = symbols

    def refresh(self, now) -> int | None:
        """Fetch the base bars completed since the last call; when trading bars have closed, add
        them, take the chain snapshot for the newest and return its position, else None (and no
        request at all before a trading bar can have closed). Nothing changes when it raises."""
        if self._now_ns is None:
            raise RuntimeError("call warm_up before refresh")
        now_ns = self._clock(now)
        if self._next_close_ns is None or now_ns < self._next_close_ns:
            self._now_ns = now_ns
            return None
        daily = None
        daily_through = self._last_completed_session(now_ns - DAILY_BAR_DELAY_NS)
        if daily_through > self._daily_checked_through:
            # Once a session: the daily bars of the sessions completed since the last look.
            start = self._daily_checked_through + pd.Timedelta(days=1)
            start_ns = int(pd.Timestamp(start).tz_localize(EXCHANGE_TZ).tz_convert("UTC").value)
            daily = (*self._fetch_daily(start_ns, now_ns, daily_through), daily_through)
        start_ns = max(self._last_known_start_ns() + self._width_ns, int(self._close_ns[-1]))
        fetched = self._fetch_bars([self.underlying], self.base_bar_minutes, start_ns, now_ns,
                                   f"{self.base_bar_minutes}-minute")[self.underlying]
        update = self._step(now_ns, self._regular_completed(fetched, now_ns))
        chain = held = None
        if update.ready_ns:
            spot = float(update.base["close"].iloc[-1])
            chain = self._snapshot(update.ready_ns[-1], spot, now_ns)
            held = self._held_snapshot(update.ready_ns[-1], spot, chain[0])
        if not update.ready_ns:
            self._pending = update.pending
            self._now_ns = now_ns
            if daily is not None:
                self._merge_daily(*daily, now_ns)
            return None
        self._commit(now_ns, update, chain=chain, daily=daily)
        if held is not None:
            self._held[len(self._close_ns) - 1] = held
        return len(self._close_ns) - 1

    def probe_chain(self) -> LiveChainSlice:
        """A chain snapshot taken now for the newest warm-up bar (its close as the spot), recorded
        nowhere: the start-up check that the DTE window and the delta band hold contracts at all,
        before the first decision bar. Raises ``DataError`` as a bar's snapshot would."""
        if self._now_ns is None or not len(self._close_ns):
            raise RuntimeError("call warm_up before probe_chain")
        chain, _lag, _counts = self._snapshot(int(self._close_ns[-1]), float(self._ohlcv[-1, 3]), self._now_ns)
        return chain

    # ------------------------------------------------------------------------------------------
    def _regular_completed(self, bars: pd.DataFrame, now_ns: int) -> pd.DataFrame:
        """The bars that are complete at ``now`` and inside a regular session, re-indexed by their
        CLOSE time (America/New_York)."""
        if bars.empty:
            return _empty_bars()
        start = bars.index.asi8
        close = start + self._width_ns
        days = _bar_sessions(bars.index)
        table = _session_table(days.min(), days.max())
        is_session = days.isin(table.index)
        open_ns = table["open_ns"].reindex(days).fillna(0).to_numpy(np.int64)
        session_close = table["close_ns"].reindex(days).fillna(0).to_numpy(np.int64)
        keep = is_session & (close <= now_ns) & (start >= open_ns) & (close <= session_close)
        out = bars.loc[keep].copy()
        out.index = pd.DatetimeIndex(close[keep]).tz_localize("UTC").tz_convert(EXCHANGE_TZ)
        return out

    def _last_known_start_ns(self) -> int:
        frame = self._pending if len(self._pending) else self._base
        return int(frame.index[-1].value) - self._width_ns

    def _step(self, now_ns: int, fetched: pd.DataFrame, first_session=None) -> _Update:
        """The trading bars that have closed at ``now`` given what is known, the base bars that
        make them (gaps filled) and the rest kept pending."""
        known = pd.concat([self._pending, fetched]) if len(self._pending) else fetched
        known = known[~known.index.duplicated(keep="last")].sort_index()
        known_ns = known.index.asi8
        if len(self._close_ns):
            last_ns = int(self._close_ns[-1])
            first_day = _local_date(last_ns)
        else:
            last_ns = -1
            first_day = first_session
        grid = _trading_grid(_session_table(first_day, _local_date(now_ns)))
        grid = grid[(grid > last_ns) & (grid <= now_ns)]
        present = set(known_ns.tolist())
        ready = []
        for close_ns in grid.tolist():
            # Closed once the base bar ending at its close is in, or the vendor had its grace.
            if close_ns in present or now_ns >= close_ns + self.late_bar_grace_ns:
                ready.append(close_ns)
            else:
                break
        if not ready:
            return _Update(self._base, known, [], 0)
        cut = ready[-1]
        new = known.loc[known_ns <= cut]
        pending = known.loc[known_ns > cut]
        have_sessions = set(_bar_sessions(self._base.index)) | set(_bar_sessions(known.index))
        ready_days = _bar_sessions(pd.DatetimeIndex(ready).tz_localize("UTC"))
        for day in pd.unique(ready_days):
            if day not in have_sessions:
                raise DataError(f"Alpaca returned no {self.base_bar_minutes}-minute {self.underlying} bars for session "
                                f"{day.date()} up to {_local(now_ns)} (feed {self.stock_feed.value})")
        base = pd.concat([self._base, new]) if len(self._base) else new
        base, filled = self._fill_gaps(base, ready)
        return _Update(base, pending, ready, filled)

    def _fill_gaps(self, base: pd.DataFrame, ready: list) -> tuple[pd.DataFrame, int]:
        """Flat bars (previous close, volume 0) for the first minute of a session and for trading
        bars without any base bar: the resampling anchors a session on its first base bar, and
        every trading bar needs one."""
        stamps = base.index.asi8
        ready_ns = np.asarray(ready, dtype=np.int64)
        days = _bar_sessions(pd.DatetimeIndex(ready_ns).tz_localize("UTC"))
        table = _session_table(days.min(), days.max())
        first_minute = table["open_ns"].reindex(days).to_numpy().astype(np.int64) + self._width_ns
        span = TRADING_BAR_MINUTES * _NS_PER_MINUTE
        # Trading bar k covers (close − span, close]; the first of a session begins at the open.
        lower = np.maximum(ready_ns - span, first_minute - self._width_ns)
        count = np.searchsorted(stamps, ready_ns, side="right") - np.searchsorted(stamps, lower, side="right")
        wanted = set(ready_ns[count == 0].tolist())
        wanted |= set(first_minute.tolist())
        wanted -= set(stamps.tolist())
        if not wanted:
            return base, 0
        closes = base["close"].to_numpy(float)
        rows = []
        for stamp in sorted(wanted):
            before = int(np.searchsorted(stamps, stamp)) - 1
            # The previous close; for the first bar of the history, the next bar's open (a
            # completed past session, so nothing later than now).
            price = closes[before] if before >= 0 else float(base["open"].iloc[0])
            rows.append((stamp, price))
        fill = pd.DataFrame({"open": [p for _, p in rows], "high": [p for _, p in rows],
                             "low": [p for _, p in rows], "close": [p for _, p in rows],
                             "volume": 0.0},
                            index=pd.DatetimeIndex([s for s, _ in rows]).tz_localize("UTC").tz_convert(EXCHANGE_TZ))
        return pd.concat([base, fill]).sort_index(), len(rows)

    def _commit(self, now_ns: int, update: _Update, chain, daily=None) -> None:
        base = update.base
        trading = resample_session_bars(base, TRADING_BAR_MINUTES, self.base_bar_minutes,
                                        _session_close_ns(base.index))
        expected = np.r_[self._close_ns, np.asarray(update.ready_ns, dtype=np.int64)]
        if not np.array_equal(trading.close_ns, expected):
            raise DataError(f"Alpaca {self.base_bar_minutes}-minute {self.underlying} bars do not line up with the "
                            f"sessions' {TRADING_BAR_MINUTES}-minute grid ({len(trading.close_ns)} trading bars built, "
                            f"{len(expected)} expected): are they {self.base_bar_minutes}-minute bars?")
        old = len(self._close_ns)
        self._base = base
        self._pending = update.pending
        self._close_ns = trading.close_ns.astype(np.int64)
        self._ohlcv = np.column_stack([trading.open, trading.high, trading.low, trading.close, trading.volume])
        self._bar_times = pd.DatetimeIndex(self._close_ns).tz_localize("UTC").tz_convert(EXCHANGE_TZ)
        self._sessions = pd.DatetimeIndex(pd.unique(self._bar_times.tz_localize(None).normalize()))
        self._counts["filled_bars"] += update.filled
        if daily is not None:
            self._merge_daily(*daily, now_ns)
        self._bar_iv = np.r_[self._bar_iv, self._fallback_ivs(self._close_ns[old:])]
        if chain is not None:
            bar = len(self._close_ns) - 1
            chain_slice, lag_s, counts = chain
            for name, value in counts.items():
                self._counts[name] += value
            iv = atm_iv_index(chain_slice, IV_INDEX_DAYS)
            if math.isfinite(iv):
                self._chain_iv[bar] = iv
                self._bar_iv[bar] = iv
            else:
                self._counts["iv_index_fallbacks"] += 1
            self._chains[bar] = _with_iv_index(chain_slice, float(self._bar_iv[bar]))
            self._snapshot_lag_s[bar] = lag_s
        self._now_ns = now_ns
        self._next_close_ns = self._next_grid_close(int(self._close_ns[-1]) if len(self._close_ns) else now_ns)

    def _next_grid_close(self, after_ns: int) -> int | None:
        day = _local_date(after_ns)
        for span in (10, 40):
            grid = _trading_grid(_session_table(day, day + pd.Timedelta(days=span)))
            later = grid[grid > after_ns]
            if len(later):
                return int(later[0])
        return None

    @staticmethod
    def _last_completed_session(now_ns: int) -> pd.Timestamp:
        """The last session that closed at or before ``now``."""
        today = _local_date(now_ns)
        table = _session_table(today - pd.Timedelta(days=15), today)
        return table.index[table["close_ns"].to_numpy() <= now_ns][-1]

    # ------------------------------------------------------------------------------------------
    # daily bars and the IV proxy
    def _fetch_daily(self, start_ns: int, now_ns: int, last_completed) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Daily bars of the underlying and the pair for the completed sessions from ``start``:
        Alpaca's 1Day bars, or (``daily_source='intraday'``) the regular-session aggregate of
        base-timeframe bars, for a source that serves intraday bars only."""
        symbols = [self.underlying] + ([self.pair] if self.pair else [])
        if self.daily_source == "daily":
            frames = {symbol: _daily_frame(frame)
                      for symbol, frame in self._fetch_bars(symbols, None, start_ns, now_ns, "daily").items()}
        else:
            fetched = self._fetch_bars(symbols, self.base_bar_minutes, start_ns, now_ns,
                                       f"{self.base_bar_minutes}-minute (daily history)")
            frames = {}
            for symbol, frame in fetched.items():
                frame = self._regular_completed(frame, now_ns)
                frames[symbol] = _daily_from_base(frame) if len(frame) else _empty_daily()
        out = []
        for symbol in symbols:
            frame = frames[symbol]
            frame = frame.loc[frame.index <= last_completed]
            if frame.empty and (self._daily.empty if symbol == self.underlying else self._daily_pair.empty):
                raise DataError(f"Alpaca returned no daily {symbol} bars from {_local(start_ns).date()} to "
                                f"{last_completed.date()} (feed {self.stock_feed.value}, daily_source "
                                f"{self.daily_source})")
            out.append(frame)
        return out[0], out[1] if self.pair else _empty_daily()

    def _merge_daily(self, daily: pd.DataFrame, pair: pd.DataFrame, through: pd.Timestamp, now_ns: int) -> None:
        self._daily_checked_through = through
        self._daily = _append_rows(self._daily, daily)
        self._daily_pair = _append_rows(self._daily_pair, pair)
        self._proxy, self._proxy_source = daily_iv_proxy(self._daily_closes(now_ns), self.garch_config)

    def _daily_closes(self, now_ns: int) -> pd.Series:
        """Closes of the completed sessions: the vendor's daily bars, plus the completed sessions
        of the base bars that the daily response lacked."""
        closes = self._daily["close"].astype(float)
        if len(self._base):
            from_base = _daily_from_base(self._base)
            table = _session_table(from_base.index.min(), from_base.index.max())
            done = table.index[table["close_ns"].to_numpy() <= now_ns]
            extra = from_base.index.difference(closes.index).intersection(done)
            closes = pd.concat([closes, from_base.loc[extra, "close"]]).sort_index()
        return closes

    def _iv_closes(self) -> pd.Series:
        """The daily IV proxy with each session that has chain readings given its last one."""
        series = self._proxy.copy()
        if self._chain_iv:
            days = self._sessions_of_bars()
            readings = pd.Series({days[bar]: iv for bar, iv in sorted(self._chain_iv.items())})
            readings = readings.groupby(level=0).last()
            series = pd.concat([series.loc[series.index.difference(readings.index)], readings]).sort_index()
        series.name = "iv_index"
        return series

    def _daily_iv(self) -> pd.Series:
        """``_iv_closes`` plus the sessions of the bars it lacks (the session under way) with the
        last bar's IV index of that session (the rank reads only earlier sessions' closes)."""
        series = self._iv_closes()
        if len(self._close_ns):
            last_of_day = pd.Series(self._bar_iv, index=self._sessions_of_bars()).groupby(level=0).last()
            missing = last_of_day.index.difference(series.index)
            if len(missing):
                series = pd.concat([series, last_of_day.loc[missing]]).sort_index()
        series.name = "iv_index"
        return series

    def _fallback_ivs(self, close_ns: np.ndarray) -> np.ndarray:
        """The IV index of bars without a chain reading: the previous session's IV close."""
        series = self._iv_closes().dropna()
        if not len(close_ns):
            return np.empty(0)
        if not len(series):
            return np.full(len(close_ns), np.nan)
        days = _bar_sessions(pd.DatetimeIndex(close_ns).tz_localize("UTC")).as_unit("ns").asi8
        row = np.searchsorted(pd.DatetimeIndex(series.index).as_unit("ns").asi8, days, side="left") - 1
        values = series.to_numpy(float)
        return np.where(row >= 0, values[np.maximum(row, 0)], np.nan)

    def _sessions_of_bars(self) -> pd.DatetimeIndex:
        return self._bar_times.tz_localize(None).normalize()

    # ------------------------------------------------------------------------------------------
    # chains
    def _snapshot(self, close_ns: int, spot: float, now_ns: int) -> tuple[LiveChainSlice, float, dict]:
        """The chain snapshot for the bar closing at ``close_ns`` (taken now): the slice, the
        snapshot's lag behind the close (s) and the row counts for ``describe()``."""
        from alpaca.data.requests import OptionChainRequest

        session = _local_date(close_ns)
        first = (session + pd.Timedelta(days=self.dte_min)).date()
        last = (session + pd.Timedelta(days=self.dte_max)).date()
        low = math.floor(spot * (1.0 - self.strike_range))
        high = math.ceil(spot * (1.0 + self.strike_range))
        request = OptionChainRequest(underlying_symbol=self.underlying, feed=self.option_feed, strike_price_gte=low,
                                     strike_price_lte=high, expiration_date_gte=first, expiration_date_lte=last)
        what = (f"option chain request for {self.underlying} at {_local(close_ns)} (expirations {first} … {last}, "
                f"strikes {low} … {high}, feed {self.option_feed.value})")
        snapshots = self._call(what, self.option_client.get_option_chain, request)
        chain, counts = self._chain_slice(snapshots, close_ns, spot, session, what)
        return chain, (now_ns - close_ns) / 1e9, counts

    def _held_snapshot(self, close_ns: int, spot: float, chain: LiveChainSlice) -> LiveChainSlice | None:
        """Quotes of the tracked contracts the chain snapshot lacks (one request), or None."""
        from alpaca.data.requests import OptionSnapshotRequest

        if not self._tracked:
            return None
        present = set(_row_keys(chain))
        missing = []
        for symbol in self._tracked:
            _root, expiry_day, is_call, strike = parse_occ_symbol(symbol)
            if (expiry_day, round(strike * 1000), is_call) not in present:
                missing.append(symbol)
        if not missing:
            return None
        what = f"option snapshots of the {len(missing)} held contract(s) outside the chain request ({', '.join(missing)})"
        request = OptionSnapshotRequest(symbol_or_symbols=missing, feed=self.option_feed)
        snapshots = self._call(what, self.option_client.get_option_snapshot, request)
        held, _counts = self._chain_slice(snapshots, close_ns, spot, _local_date(close_ns), what, any_dte=True)
        return held

    def _chain_slice(self, snapshots: dict, close_ns: int, spot: float, session: pd.Timestamp,
                     what: str, any_dte: bool = False) -> tuple[LiveChainSlice | None, dict]:
        """The slice of a snapshot reply: contracts in the feed's DTE window (``any_dte``: every
        contract, None when none is live), DataError when none is."""
        session_day = int(session.value // _NS_PER_DAY)
        counts = dict.fromkeys(("malformed_symbols", "foreign_roots", "duplicate_contracts", "vendor_iv_rows",
                                "computed_iv_rows", "no_iv_rows", "no_quote_rows"), 0)
        parsed = []
        seen = set()
        for symbol, snapshot in snapshots.items():
            contract = parse_occ_symbol(symbol)
            if contract is None:
                counts["malformed_symbols"] += 1
                continue
            root, expiry_day, is_call, strike = contract
            if root != self.underlying:
                counts["foreign_roots"] += 1
                continue
            dte = expiry_day - session_day
            if not any_dte and not self.dte_min <= dte <= self.dte_max:
                continue
            key = (expiry_day, round(strike * 1000), is_call)
            if key in seen:
                counts["duplicate_contracts"] += 1
                continue
            seen.add(key)
            parsed.append((expiry_day, dte, strike, is_call, *_snapshot_fields(snapshot)))
        if parsed:
            days = np.unique(np.array([row[0] for row in parsed], dtype=np.int64))
            listed = trading_sessions(pd.Timestamp(int(days[0]), unit="D"), pd.Timestamp(int(days[-1]), unit="D"))
            sessions = days[np.isin(days, listed.as_unit("ns").asi8 // _NS_PER_DAY)]
            settle = settlement_times(pd.DatetimeIndex(sessions.astype("datetime64[D]").astype("datetime64[ns]")))
            settle_ns = dict(zip(sessions.tolist(), settle.tz_convert("UTC").as_unit("ns").asi8.tolist()))
            # An expiration that is not a session (a malformed symbol that parsed) has no settlement.
            counts["malformed_symbols"] += sum(1 for row in parsed if row[0] not in settle_ns)
            parsed = [row for row in parsed if settle_ns.get(row[0], close_ns) > close_ns]
        if not parsed and any_dte:
            return None, counts
        if not parsed:
            raise DataError(f"Alpaca {what} returned no contract in the DTE window {self.dte_min} … {self.dte_max} "
                            f"({len(snapshots)} snapshots)")
        columns = list(zip(*parsed))
        expiry = np.array(columns[0], dtype=np.int64)
        dte = np.array(columns[1], dtype=np.int64)
        strike = np.array(columns[2], dtype=float)
        is_call = np.array(columns[3], dtype=bool)
        bid = np.array(columns[4], dtype=float)
        ask = np.array(columns[5], dtype=float)
        quote_ns = np.array(columns[6], dtype=np.int64)
        vendor_iv = np.array(columns[7], dtype=float)
        vendor_greeks = np.array(columns[8], dtype=float).reshape(len(parsed), 5)
        t_years = (np.array([settle_ns[day] for day in expiry.tolist()]) - close_ns) / 1e9 / SECONDS_PER_YEAR

        quoted = np.isfinite(bid) & np.isfinite(ask) & (bid >= 0) & (ask > 0) & (bid <= ask)
        mid = np.where(quoted, 0.5 * (bid + ask), np.nan)
        has_quote_time = quote_ns != np.iinfo(np.int64).min
        quote_age = np.full(len(parsed), np.nan)
        quote_age[has_quote_time] = (close_ns - quote_ns[has_quote_time]) / 1e9

        iv, iv_conf, greeks, _solved, _incomplete = complete_iv_and_greeks(
            mid, spot, strike, t_years, self.rate, self.dividend_yield, is_call, vendor_iv, vendor_greeks)

        counts["vendor_iv_rows"] = int((iv_conf == VENDOR_IV_CONF).sum())
        counts["computed_iv_rows"] = int((iv_conf == COMPUTED_IV_CONF).sum())
        counts["no_iv_rows"] = int((iv_conf == NO_IV_CONF).sum())
        counts["no_quote_rows"] = int((~quoted).sum())

        order = np.lexsort((strike, ~is_call, expiry))
        arrays = {"expiration": expiry.astype("datetime64[D]"), "dte": dte, "t_years": t_years, "strike": strike,
                  "is_call": is_call, "bid": bid, "ask": ask, "mid": mid, "theo": mid.copy(), "iv": iv,
                  "delta": greeks[:, 0], "gamma": greeks[:, 1], "theta": greeks[:, 2], "vega": greeks[:, 3],
                  "rho": greeks[:, 4], "iv_conf": iv_conf, "quote_age_s": quote_age}
        for name, values in arrays.items():
            values = np.ascontiguousarray(values[order])
            values.flags.writeable = False
            arrays[name] = values
        chain = LiveChainSlice(quote_time_ns=int(close_ns), spot=float(spot), iv_index=math.nan, rate=self.rate,
                               dividend_yield=self.dividend_yield, **arrays)
        return chain, counts

    def _chain(self, bar: int) -> LiveChainSlice:
        self._check_bar(bar)
        chain = self._chains.get(bar)
        if chain is None:
            raise DataError(f"no option chain was recorded for bar {bar} ({self._bar_times[bar]}): chains exist only "
                            f"for bars observed live by refresh(), not for warm-up bars or bars that closed while "
                            f"the feed was not refreshed")
        return chain

    def _rows(self, bar: int) -> dict:
        rows = self._chain_rows.get(bar)
        if rows is None:
            rows = self._chain_rows[bar] = {key: row for row, key in enumerate(_row_keys(self._chains[bar]))}
        return rows

    def _quote_of(self, bar: int, key: tuple) -> tuple | None:
        """The quote row of contract ``key`` (expiry day, strike × 1000, is_call) at ``bar``: from
        the chain snapshot, else from the held contracts' snapshot; None when neither has it."""
        row = self._rows(bar).get(key)
        if row is not None:
            return _quote_row(self._chains[bar], row)
        held = self._held.get(bar)
        if held is None:
            return None
        rows = self._held_rows.get(bar)
        if rows is None:
            rows = self._held_rows[bar] = {k: r for r, k in enumerate(_row_keys(held))}
        row = rows.get(key)
        return None if row is None else _quote_row(held, row)

    def _check_bar(self, bar: int) -> None:
        if not 0 <= bar < len(self._close_ns):
            raise DataError(f"bar position {bar} is outside 0 … {len(self._close_ns) - 1}")

    # ------------------------------------------------------------------------------------------
    # the bar contract
    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self._bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self._sessions

    def spot_bars(self) -> pd.Series:
        return pd.Series(self._ohlcv[:, 3], index=self._bar_times, name="spot")

    def iv_index_bars(self) -> pd.Series:
        return pd.Series(self._bar_iv.copy(), index=self._bar_times, name="iv_index")

    def ohlcv_bars(self) -> pd.DataFrame | None:
        return pd.DataFrame(self._ohlcv, index=self._bar_times, columns=_OHLCV)

    def expirations_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None) -> np.ndarray:
        """The expirations in the bar's snapshot with ``dte_min … dte_max`` days to go (inside the
        feed's own window: nothing beyond it was fetched); DataError for a bar without one."""
        chain = self._chain(bar)
        keep = _dte_mask(chain.dte, dte_min, dte_max)
        return np.unique(chain.expiration[keep])

    def slice_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None,
                 expiry=None) -> LiveChainSlice:
        chain = self._chain(bar)
        if dte_min is not None and dte_max is not None and int(dte_min) > int(dte_max):
            raise ValueError(f"dte_min {dte_min} is greater than dte_max {dte_max}")
        keep = _dte_mask(chain.dte, dte_min, dte_max)
        if expiry is not None:
            keep &= chain.expiration == np.datetime64(_expiry_day(expiry), "D")
        return chain if keep.all() else chain.select(keep)

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes, is_call) -> ContractPath:
        """Quotes of the given contracts of one expiration at bars ``bar_start … bar_stop − 1``,
        each of which needs a snapshot; a contract missing from a snapshot (or settled) is NaN."""
        n_bars = len(self._close_ns)
        if not 0 <= bar_start <= bar_stop <= n_bars:
            raise DataError(f"bar range {bar_start} … {bar_stop} is outside 0 … {n_bars}")
        strikes = np.ascontiguousarray(strikes, dtype=float)
        is_call = np.ascontiguousarray(is_call, dtype=np.bool_)
        if strikes.shape != is_call.shape or strikes.ndim != 1:
            raise ValueError("strikes and is_call must be 1-d arrays of the same length")
        day = _expiry_day(expiration)
        out = np.full((7, bar_stop - bar_start, strikes.size), np.nan)
        keys = [(day, int(round(k * 1000)), bool(c)) for k, c in zip(strikes.tolist(), is_call.tolist())]
        for b, bar in enumerate(range(bar_start, bar_stop)):
            self._chain(bar)
            for leg, key in enumerate(keys):
                quote = self._quote_of(bar, key)
                if quote is not None:
                    out[:, b, leg] = quote
        return ContractPath(bar_start, self._close_ns[bar_start:bar_stop].copy(),
                            self._ohlcv[bar_start:bar_stop, 3].copy(), *out)

    def quote_structures(self, bar: int, expirations, strikes) -> StructureQuotes:
        """Quotes of k four-leg structures (long put, short put, short call, long call) at one bar
        with a snapshot: arrays (k, 4), NaN for contracts missing from it."""
        self._chain(bar)
        strikes = np.asarray(strikes, dtype=float)
        days = np.asarray(expirations, dtype="datetime64[D]").astype(np.int64)
        out = np.full((7, strikes.shape[0], 4), np.nan)
        for k, day in enumerate(days.tolist()):
            for leg in range(4):
                quote = self._quote_of(bar, (day, int(round(strikes[k, leg] * 1000)), leg >= 2))
                if quote is not None:
                    out[:, k, leg] = quote
        return StructureQuotes(*out)

    def settlement_time(self, expiration) -> pd.Timestamp:
        """16:00 America/New_York on the expiration date (13:00 on an XNYS early close)."""
        day = np.datetime64(_expiry_day(expiration), "D")
        return settlement_times(pd.DatetimeIndex([day.astype("datetime64[ns]")]))[0]

    def describe(self) -> dict:
        chain_bars = sorted(self._chains)
        daily_iv = self._daily_iv()
        return {
            "source": "Alpaca market data through alpaca-py 0.44.0 (live)",
            "synthetic": False,
            "european": False,
            "options": f"{self.underlying} options are American; where the vendor gave no IV/Greeks they are "
                       f"solved from the mid with European Black-Scholes-Merton (rate {self.rate}, dividend "
                       f"yield {self.dividend_yield}), iv_conf {COMPUTED_IV_CONF} (vendor {VENDOR_IV_CONF}, "
                       f"none {NO_IV_CONF})",
            "underlying": self.underlying, "pair": self.pair,
            "stock_feed": self.stock_feed.value, "option_feed": self.option_feed.value,
            "base_bar_minutes": self.base_bar_minutes, "trading_bar_minutes": TRADING_BAR_MINUTES,
            "bar_stamps": "close time (Alpaca's start time + width), regular session, completed bars only",
            "bars": int(len(self._close_ns)),
            "first_bar": str(self._bar_times[0]) if len(self._close_ns) else None,
            "last_bar": str(self._bar_times[-1]) if len(self._close_ns) else None,
            "chain_window": {"dte_min": self.dte_min, "dte_max": self.dte_max, "strike_range": self.strike_range},
            "chain_bars": len(chain_bars),
            "first_chain_bar": str(self._bar_times[chain_bars[0]]) if chain_bars else None,
            "max_snapshot_lag_s": max(self._snapshot_lag_s.values()) if self._snapshot_lag_s else None,
            "iv_index": {
                "chain_bars": f"{IV_INDEX_DAYS}-calendar-day ATM IV (put/call average at the strike nearest the "
                              f"spot, linear in total variance between the expirations around {IV_INDEX_DAYS} "
                              f"days) x 100",
                "other_bars": "PROXY: the previous session's daily IV close",
                "daily_closes": "PROXY from the underlying's daily closes (GARCH(1,1) where enough history, "
                                "realised vol before), x vrp_multiplier; sessions with snapshots use their last "
                                "chain-based reading",
                "vrp_multiplier": self.garch_config.vrp_multiplier,
                "proxy_sources": self._proxy_source.value_counts().to_dict(),
                "daily_sessions": int(len(daily_iv)),
            },
            "counts": dict(self._counts),
            "requests": self.requests,
            # What a report's data box lists (core.report.synthetic_items reads these flags).
            "proxies": [
                {"proxy": True, "description": "IV index of bars without a chain snapshot and the daily IV "
                                               "history: a GARCH / realised-vol proxy from the underlying's "
                                               "daily closes, not a VIX"},
                {"assumption": True, "description": "IV and Greeks solved with European Black-Scholes-Merton "
                                                    "where the vendor sent none",
                 "why": f"{self.underlying} options are American"},
            ],
        }

    # ------------------------------------------------------------------------------------------
    # the feature table's inputs
    def feature_inputs(self) -> dict:
        """What ``compute_bar_features`` takes (as ``core.market_data.embedded_feature_inputs``): base
        bars, their sessions' calendar closes, daily IV closes, daily bars of the underlying and
        the pair (from ``daily_history_days`` before the last bar) and the trading-bar closes
        (UTC ns). The per-bar IV index is ``iv_index_bars()``."""
        if not len(self._close_ns):
            raise DataError("feature_inputs: the feed has no bars yet (call warm_up)")
        base = self._base.copy()
        history_start = _local_date(int(self._close_ns[-1])) - pd.Timedelta(days=self.daily_history_days)
        from_base = _daily_from_base(base)
        extra = from_base.index.difference(self._daily.index)
        daily_spot = _append_rows(self._daily, from_base.loc[extra])
        daily_spot = daily_spot.loc[daily_spot.index >= history_start]
        daily_spot.attrs["symbol"] = self.underlying
        daily_pair = None
        if self.pair:
            daily_pair = self._daily_pair.loc[self._daily_pair.index >= history_start].copy()
            daily_pair.attrs["symbol"] = f"{self.pair} (Alpaca daily bars, feed {self.stock_feed.value})"
        daily_iv = self._daily_iv()
        daily_iv = daily_iv.loc[daily_iv.index >= history_start]
        return {
            "base": base,
            "session_close_ns": _session_close_ns(base.index),
            "daily_iv": daily_iv,
            "daily_spot": daily_spot,
            "daily_pair": daily_pair,
            "target": self._close_ns.copy(),
        }


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def parse_occ_symbol(symbol) -> tuple[str, int, bool, float] | None:
    """(root, expiration as days since 1970-01-01, is_call, strike) of an OCC option symbol such
    as ``SPY261207P00600000``; None when it is not one (malformed symbols occur in Alpaca chains)."""
    if not isinstance(symbol, str):
        return None
    match = OCC_SYMBOL.match(symbol.strip().upper())
    if match is None:
        return None
    root, yymmdd, right, strike = match.groups()
    try:
        expiry = dt.date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:]))
    except ValueError:
        return None
    value = int(strike) / 1000.0
    if value <= 0:
        return None
    return root, expiry.toordinal() - _EPOCH_ORDINAL, right == "C", value


def _snapshot_fields(snapshot) -> tuple:
    """(bid, ask, quote time ns, vendor IV, vendor Greeks (delta, gamma, theta, vega, rho)) of a
    raw snapshot dict or an ``OptionsSnapshot``; NaN (int64 min for the time) where absent."""
    nan = math.nan
    if isinstance(snapshot, dict):
        quote = snapshot.get("latestQuote") or {}
        bid, ask, stamp = quote.get("bp"), quote.get("ap"), quote.get("t")
        iv = snapshot.get("impliedVolatility")
        greeks = snapshot.get("greeks")
        values = [greeks.get(name) for name in _GREEK_NAMES] if isinstance(greeks, dict) else [None] * 5
    else:
        quote = snapshot.latest_quote
        bid, ask, stamp = ((quote.bid_price, quote.ask_price, quote.timestamp) if quote is not None
                           else (None, None, None))
        iv = snapshot.implied_volatility
        greeks = snapshot.greeks
        values = [getattr(greeks, name, None) for name in _GREEK_NAMES] if greeks is not None else [None] * 5
    return (_number(bid), _number(ask), _stamp_ns(stamp), _number(iv), tuple(_number(v) for v in values))


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _stamp_ns(value) -> int:
    if value is None:
        return np.iinfo(np.int64).min
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        return np.iinfo(np.int64).min
    if stamp is pd.NaT:
        return np.iinfo(np.int64).min
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.tz_convert("UTC").as_unit("ns").value)


def _row_keys(chain: ChainSlice):
    """(expiry day, strike × 1000, is_call) of each row: a contract's key across slices."""
    strike_milli = np.round(chain.strike * 1000).astype(np.int64)
    return zip(chain.expiration.astype(np.int64).tolist(), strike_milli.tolist(), chain.is_call.tolist())


def _quote_row(chain: ChainSlice, row: int) -> tuple:
    return (chain.bid[row], chain.ask[row], chain.mid[row], chain.delta[row], chain.gamma[row], chain.vega[row],
            chain.theta[row])


def _with_iv_index(chain: LiveChainSlice, iv_index: float) -> LiveChainSlice:
    values = {f.name: getattr(chain, f.name) for f in fields(chain)}
    values["iv_index"] = iv_index
    return LiveChainSlice(**values)


def daily_iv_proxy(closes: pd.Series, garch_config: GarchProxyConfig = GarchProxyConfig()
                   ) -> tuple[pd.Series, pd.Series]:
    """Daily IV closes (VIX points) from daily closes: the GARCH proxy (``data_factory.
    garch_proxy``) from its first fitted month on when there are enough returns, and before that
    ``vrp_multiplier`` × the annualised realised vol of the last 21 sessions. The value of session
    d uses closes up to d only. Returns (values, source per session: 'garch' / 'realised_vol')."""
    closes = closes.dropna()
    closes = closes.loc[closes > 0]
    if len(closes) < 3:
        return pd.Series(dtype=float, name="iv_index"), pd.Series(dtype=object)
    returns = log_returns_pct(closes)
    realised = np.sqrt(returns.pow(2).rolling(REALISED_VOL_SESSIONS, min_periods=2).mean() * 252.0)
    values = garch_config.vrp_multiplier * realised
    source = pd.Series("realised_vol", index=values.index, dtype=object)
    if len(returns) > garch_config.warmup_returns:
        try:
            garch = garch_iv_proxy(returns, garch_config)["iv_proxy"]
        except DataError:
            garch = None
        if garch is not None:
            values.loc[garch.index] = garch
            source.loc[garch.index] = "garch"
    values.name = "iv_index"
    return values, source


def _api_error_text(error) -> str:
    """'HTTP 500: message' of an alpaca-py APIError; its ``code``/``message`` parse the body as
    JSON on every access and raise on an HTML body (a proxy's 502 page)."""
    status = getattr(error, "status_code", None)
    try:
        code, message = error.code, error.message
        text = f"{message} (code {code})" if code is not None else str(message)
    except Exception:
        text = str(error)
    return f"HTTP {status}: {_short(text)}" if status is not None else _short(text)


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"<[^>]+>", " ", str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _utc(ns: int) -> pd.Timestamp:
    return pd.Timestamp(int(ns), tz="UTC")


def _local(ns: int) -> pd.Timestamp:
    return _utc(ns).tz_convert(EXCHANGE_TZ)


def _local_date(ns: int) -> pd.Timestamp:
    return _local(ns).tz_localize(None).normalize()


def _empty_bars() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=float) for name in _OHLCV},
                        index=pd.DatetimeIndex([], tz=EXCHANGE_TZ).as_unit("ns"))


def _bars_frame(items, what: str) -> pd.DataFrame:
    """Bars (raw dicts {t, o, h, l, c, v, ...} or alpaca-py ``Bar`` models) as a frame indexed by
    the start time (UTC, ns), sorted, duplicates dropped."""
    if not items:
        return pd.DataFrame({name: pd.Series(dtype=float) for name in _OHLCV},
                            index=pd.DatetimeIndex([], tz="UTC").as_unit("ns"))
    if isinstance(items[0], dict):
        try:
            stamps = pd.to_datetime([item["t"] for item in items], utc=True, format="ISO8601")
            values = [[item["o"], item["h"], item["l"], item["c"], item.get("v", 0.0)] for item in items]
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"Alpaca {what}: a bar could not be read ({_short(str(error))})") from error
    else:
        stamps = pd.DatetimeIndex([pd.Timestamp(item.timestamp) for item in items])
        stamps = stamps.tz_localize("UTC") if stamps.tz is None else stamps.tz_convert("UTC")
        values = [[item.open, item.high, item.low, item.close, item.volume] for item in items]
    frame = pd.DataFrame(np.asarray(values, dtype=float), columns=_OHLCV,
                         index=pd.DatetimeIndex(stamps).as_unit("ns"))
    frame = frame[~frame.index.duplicated(keep="last")].sort_index()
    return frame


def _daily_frame(bars: pd.DataFrame) -> pd.DataFrame:
    """Daily bars indexed by session date (naive midnight). Alpaca stamps a daily bar at the
    session date's midnight in New York (04:00/05:00 UTC); shifting by 6 h before taking the New
    York date also reads a midnight-UTC or an open-time stamp as the right day."""
    if bars.empty:
        return _empty_daily()
    local = (bars.index + pd.Timedelta(hours=6)).tz_convert(EXCHANGE_TZ)
    days = pd.DatetimeIndex(local.tz_localize(None).normalize(), name="date").as_unit("ns")
    frame = pd.DataFrame(bars.to_numpy(float), columns=_OHLCV, index=days)
    frame = frame[~frame.index.duplicated(keep="last")].sort_index()
    sessions = trading_sessions(frame.index[0], frame.index[-1])
    return frame.loc[frame.index.isin(sessions)]


def _empty_daily() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=float) for name in _OHLCV}, index=pd.DatetimeIndex([], name="date"))


def _daily_from_base(base: pd.DataFrame) -> pd.DataFrame:
    """Daily OHLCV per session of the base bars (a session under way: so far)."""
    days = pd.DatetimeIndex(base.index.tz_localize(None).normalize(), name="date")
    grouped = base.groupby(days)
    return pd.DataFrame({"open": grouped["open"].first(), "high": grouped["high"].max(),
                         "low": grouped["low"].min(), "close": grouped["close"].last(),
                         "volume": grouped["volume"].sum()})


def _append_rows(frame: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    if rows is None or rows.empty:
        return frame.copy()
    if frame.empty:
        return rows.copy()
    out = pd.concat([frame, rows])
    return out[~out.index.duplicated(keep="first")].sort_index()


def _bar_sessions(index: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """The New York date of each time (naive midnight)."""
    if len(index) == 0:
        return pd.DatetimeIndex([])
    return pd.DatetimeIndex(index.tz_convert(EXCHANGE_TZ).tz_localize(None).normalize())


_TABLES: dict = {}


def _session_table(first, last) -> pd.DataFrame:
    """XNYS sessions from ``first`` to ``last`` (dates) with open/close in UTC ns."""
    first, last = pd.Timestamp(first).normalize(), pd.Timestamp(last).normalize()
    key = (first, last)
    table = _TABLES.get(key)
    if table is None:
        sessions = trading_sessions(first, last)
        bounds = session_bounds(sessions)
        table = pd.DataFrame({
            "open_ns": pd.DatetimeIndex(bounds["open"]).tz_convert("UTC").as_unit("ns").asi8,
            "close_ns": pd.DatetimeIndex(bounds["close"]).tz_convert("UTC").as_unit("ns").asi8,
        }, index=sessions)
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = table
    return table


def _trading_grid(table: pd.DataFrame) -> np.ndarray:
    """Close times (UTC ns) of every trading bar of the sessions: open + k × 5 min, the last one
    clipped to the close (early closes)."""
    span = TRADING_BAR_MINUTES * _NS_PER_MINUTE
    out = []
    for open_ns, close_ns in zip(table["open_ns"].tolist(), table["close_ns"].tolist()):
        closes = np.arange(open_ns + span, close_ns + span, span, dtype=np.int64)
        out.append(np.minimum(closes, close_ns))
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _session_close_ns(index: pd.DatetimeIndex) -> np.ndarray:
    """The calendar close (UTC ns) of each bar's session (``resample_session_bars`` needs it to
    stamp a session's last bar when the data ends mid-session)."""
    if len(index) == 0:
        return np.empty(0, dtype=np.int64)
    days = _bar_sessions(index)
    table = _session_table(days.min(), days.max())
    return table["close_ns"].reindex(days).to_numpy().astype(np.int64)


def _dte_mask(dte: np.ndarray, dte_min, dte_max) -> np.ndarray:
    keep = np.ones(dte.shape, dtype=bool)
    if dte_min is not None:
        keep &= dte >= int(dte_min)
    if dte_max is not None:
        keep &= dte <= int(dte_max)
    return keep


def _expiry_day(expiry) -> int:
    """An expiration (date, datetime64, Timestamp, text) as days since 1970-01-01."""
    if type(expiry) is dt.date:
        return expiry.toordinal() - _EPOCH_ORDINAL
    if isinstance(expiry, np.datetime64):
        return int(expiry.astype("datetime64[D]").astype(np.int64))
    stamp = exchange_date(expiry, "expiration", check_range=False)
    return int(stamp.as_unit("ns").value // _NS_PER_DAY)
