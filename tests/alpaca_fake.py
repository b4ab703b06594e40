"""A local imitation of Alpaca's HTTP API (trading, stock bars, option data) for the test suite.

Owns ``FakeAlpaca``: one threaded HTTP server on 127.0.0.1 (a free port) that alpaca-py's own
``TradingClient``, ``StockHistoricalDataClient`` and ``OptionHistoricalDataClient`` talk to through
``url_override=fake.url``, and ``Fault``: failures injected into the next matching requests. The
shapes, status codes and quirks follow ``/work/shared/reference/alpaca-api.md`` (§2–§11); where
the reference marks a server behaviour unconfirmed ([IMIT]) this fake makes the same choice.

What the fake models
--------------------
- **Clock.** A fake ``now`` (America/New_York) that only moves when a test calls ``advance`` or
  ``set_time``. Sessions are NYSE regular hours from ``exchange_calendars`` (XNYS: holidays and
  13:00 early closes), plus the extra 13:00 closes named in ``half_days``.
- **SPY.** A seeded random walk, one step per 5-minute regular-session bar (about 15 % annual
  volatility) with a small overnight gap at each session's first bar: the MASTER path, from which
  quotes, fills, ``fake.spot`` and every other bar size derive. It is anchored so that the latest
  completed bar at the start time closes at ``spot``; ``history_days`` sessions (trading days) of
  bars precede the start day and bound every timeframe, and the path runs on to the end of the
  calendar. ``fake.spot`` is always the latest completed 5-minute close (or the value a test
  forced); a 1-minute bar of the forming 5-minute bar may already have moved away from it.
- **QQQ** (only with ``stocks=("SPY", "QQQ")``; the default fake serves SPY alone, so QQQ is
  absent like any other symbol: tests/test_alpaca_feed.py relies on that). Its own seeded
  stream: each 5-minute log return is 1.15 x SPY's (gaps and forced moves included) + independent
  noise of 0.1 % (correlation about 0.75), anchored so that the bar completed at the start closes
  at 0.85 x ``spot``. Bars only: no quotes, trades or options.
- **Stock bars** (``/v2/stocks/bars``), regular session only, completed bars only for intraday
  timeframes (start + width <= now):
  ``5Min`` the master path. ``1Min``: five bars per 5-minute bar, deterministic (seeded by symbol
  and session date, so any range gives the same bars): the first opens at the 5-minute open, the
  last closes at its close, the closes between follow a Brownian bridge (clipped to the 5-minute
  range), each minute opens at the previous close, every high/low lies inside the 5-minute
  high/low and the minute nearest the 5-minute high (low) reaches it, volumes sum to the 5-minute
  volume. ``10/15/20/30Min`` and ``1Hour``: the session's 5-minute bars in clock-aligned buckets
  (Alpaca aligns bars to the clock: the 1Hour bar stamped 09:00 holds 09:30-10:00). ``1Day``: one
  bar per session from its 5-minute bars (first open, extremes, last close, summed volume),
  stamped at the session date's New York midnight in UTC (``2026-12-04T05:00:00Z``) like Alpaca;
  sessions closed by now, plus - as Alpaca does - the session under way while it is open: its bar
  so far, from the completed 5-minute bars and the completed minutes of the forming one (no bar
  before its first minute is done). Trade counts are volume // 120 (summed when aggregated);
  ``vw`` is (h + l + c) / 3 (volume-weighted when aggregated). Short units (``1T``, ``1H``,
  ``1D``) are accepted; any other timeframe is a 422. ``symbols=SPY,QQQ`` answers
  ``{"bars": {"QQQ": [...], "SPY": [...]}, "next_page_token": ...}``: symbols in sorted order, each
  by time (``sort=desc``: newest first within a symbol), ``limit`` (<= 10000, default 1000) counting
  bars across symbols, and the token naming the symbol and start time the next page begins with.
  ``start``/``end`` are inclusive on the bar's stamp (default: today's midnight … now); ``feed``
  may be iex, sip or delayed_sip (no SIP 15-minute restriction); ``adjustment`` and ``asof`` are
  ignored. Bars are computed per request (numpy, vectorised) from the 5-minute arrays: a 900-day
  history adds a few milliseconds to the build (the contract listing, ~0.2 s for a new seed, is
  the bulk of it) and 40 sessions of minutes cost a few tens of milliseconds a page.
- **Options.** SPY contracts listed once at construction: every trading day for 60 calendar days,
  strikes every $1 from 0.8x to 1.2x spot. Quotes are Black–Scholes (r = 4 %, q = 1.3 %) with a
  smooth put skew, iv = 0.16 x (1 - 2m + 8m^2), m = ln(K/S); the spread is max($0.01, 4 % of the
  model price) around it, in cents, bid >= 0. Every strike divisible by 7 has no ``greeks`` and no
  ``impliedVolatility`` (reference §5: common in reality).
- **Orders.** Single-leg and ``mleg`` orders, validated as in reference §3/§4/§11, filled by the
  rule below at submit and at every ``advance``/``set_time`` while the market is open (at the
  destination time only). Day orders still working at the close of their session end as
  ``expired`` (Alpaca's status for a day order that ran out; change ``DAY_ORDER_END_STATUS`` to
  have them end ``canceled``); any order also ends ``expired`` at its contracts' expiry.
- **Positions and cash.** Per-leg signed quantities (short negative) with average entry prices;
  each fill moves cash by the traded premium. Contracts still held at their expiry close are
  settled in cash at intrinsic value (simplification: real SPY options settle in shares).

Fill rule (mleg and single-leg limit orders)
--------------------------------------------
Prices are per unit (one condor, or one contract) in the API's sign convention: debit positive,
credit negative. ``natural`` crosses the spread (buy legs at the ask, sell legs at the bid), ``mid``
uses mids. A limit ``P`` fills when ``P >= natural - fill_fraction * (natural - mid)``, i.e. a
credit order (P = -L) fills when L <= natural_credit + fill_fraction * (mid_credit - natural_credit)
and a debit order (P = +D) when D >= natural_debit - fill_fraction * (natural_debit - mid_debit).
It fills at the limit: the parent's ``filled_avg_price`` equals its ``limit_price`` (negative for a
net credit, the same "buy legs minus sell legs" sum as the reference's "1.28" example). Market
orders fill at the natural price. Each leg's price is its mid moved by the same amount, in the
direction that moves the net (buy legs up, sell legs down for a worse-than-mid net), so that
``sum(+-ratio x leg price) == net``; a leg that would go below zero is held at 0 and the rest is
spread over the other legs; after rounding to cents the leftover cent(s) go on the dearest leg.
``fill_mode = "never"`` leaves limit orders working. Partial fills happen only via
``Fault(kind="partial")``.

Endpoints: ``/v2/clock``, ``/v2/account``, ``/v2/account/activities/FILL``, ``/v2/positions[/{symbol}]``,
``/v2/orders`` (POST, GET, DELETE), ``/v2/orders:by_client_order_id``, ``/v2/orders/{id}`` (GET,
PATCH, DELETE), ``/v2/options/contracts[/{symbol_or_id}]``, ``/v1beta1/options/snapshots[/{underlying}]``,
``/v1beta1/options/quotes/latest``, ``/v2/stocks/bars``, ``/v2/stocks/{trades,quotes}/latest`` (SPY only).
Anything else answers 404 (405 for a known path with another method). Keys are checked on every
request (the ``APCA-API-*`` headers, or the data clients' ``use_basic_auth``).

Not modelled: buying power and margin (``buying_power`` = ``options_buying_power`` = cash; use
``Fault(kind="reject")`` for an insufficient-buying-power answer), market-data subscriptions (no
SIP 15-minute limit), extended-hours bars, split/dividend adjustment, ``pending_*`` statuses,
trade streams, exercise and assignment before expiry.

Thread safety: every request and every public method runs under one lock; an injected timeout
sleeps outside it, so other requests are served meanwhile.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import json
import math
import re
import socket
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import exchange_calendars
import numpy as np
import pandas as pd

__all__ = ["FakeAlpaca", "Fault", "FAULT_KINDS"]

NEW_YORK = "America/New_York"
UNDERLYING = "SPY"
PAIR_SYMBOL = "QQQ"
STOCK_SYMBOLS = (UNDERLYING, PAIR_SYMBOL)  # the only stocks the fake can serve bars of
BAR_MINUTES = 5                           # the master path's bar
SUB_BARS = BAR_MINUTES                    # 1-minute bars in each 5-minute bar
MINUTE_NS = 60 * 10**9
BAR_NS = BAR_MINUTES * MINUTE_NS
CONTRACT_MULTIPLIER = 100
LISTED_DAYS = 60            # expirations listed for this many calendar days after the start
CALENDAR_HORIZON_DAYS = 130  # the clock may run this far past the start (sessions and bars exist)
STRIKE_RANGE = (0.8, 1.2)   # listed strikes, as fractions of the start spot

ANNUAL_VOL = 0.15
STEP_VOL = ANNUAL_VOL / math.sqrt(252 * 78)  # one 5-minute step of a 78-bar session
GAP_VOL = 0.003                              # overnight gap at each session's first bar
QQQ_BETA = 1.15                              # QQQ's 5-minute log return = beta x SPY's + noise
QQQ_NOISE = 0.001                            # the independent part, per 5-minute bar
QQQ_PRICE_RATIO = 0.85                       # QQQ / SPY at the start time
QQQ_STEP_VOL = math.hypot(QQQ_BETA * STEP_VOL, QQQ_NOISE)
# Seeds of the random streams besides SPY's master path (np.random.default_rng([seed, tag, ...])).
_STREAM_TAGS = {"QQQ": 2, "sub:SPY": 3, "sub:QQQ": 4}
RATE, DIVIDEND_YIELD = 0.04, 0.013
BASE_IV = 0.16
YEAR_SECONDS = 365.0 * 86400.0

DAY_ORDER_END_STATUS = "expired"
OPEN_STATUSES = frozenset({"new", "partially_filled", "accepted", "pending_new", "held",
                           "accepted_for_bidding", "pending_cancel", "pending_replace"})
INTENT_SIDE = {"buy_to_open": "buy", "buy_to_close": "buy",
               "sell_to_open": "sell", "sell_to_close": "sell"}

FAULT_KINDS = ("429", "500", "502", "503", "504", "timeout", "accept_then_500",
               "accept_then_drop", "reject", "partial")
DEFAULT_TIMEOUT_DELAY = 5.0

# Fixed namespaces keep every generated id stable across runs (contracts, the account, SPY).
_ID_NAMESPACE = uuid.UUID("6f0c3c52-8d5f-4a53-9d7e-2f4f3f6b1a10")
SPY_ASSET_ID = str(uuid.uuid5(_ID_NAMESPACE, "asset:SPY"))
ACCOUNT_ID = str(uuid.uuid5(_ID_NAMESPACE, "account"))

_HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
             b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
             b"</body>\r\n</html>\r\n")
_HTML_504 = _HTML_502.replace(b"502 Bad Gateway", b"504 Gateway Time-out")


# ---------------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """A failure for the next ``times`` requests whose method equals ``method`` and whose path
    starts with ``path``. Kinds (``FAULT_KINDS``): an error status ("429", "500", "502" with an
    HTML body, "503", "504" with an HTML body); "timeout" (sleep ``delay`` seconds, default 5,
    then answer normally); "accept_then_500" / "accept_then_drop" (the request takes effect, then
    the answer is a 500 / the connection closes with no answer); "reject" (403 insufficient
    options buying power, nothing created); "partial" (the order is created and ``partial_qty``
    units fill at once; the rest stays working)."""

    method: str = "POST"
    path: str = "/v2/orders"
    kind: str = "500"
    times: int = 1
    delay: float = 0.0
    partial_qty: int | None = None

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.times < 1:
            raise ValueError("a fault needs times >= 1")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.kind == "partial":
            if self.method.upper() != "POST" or not "/v2/orders".startswith(self.path.rstrip("/")):
                raise ValueError("a 'partial' fault applies to POST /v2/orders only")
            if not isinstance(self.partial_qty, int) or self.partial_qty < 1:
                raise ValueError("a 'partial' fault needs partial_qty >= 1 (whole units)")

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method.upper() and path.startswith(self.path)


# ---------------------------------------------------------------------------------------------
# Small helpers: numbers and times as Alpaca writes them
# ---------------------------------------------------------------------------------------------

def _number_text(value: float, places: int = 2) -> str:
    """A number as Alpaca's decimal strings: rounded to ``places``, no trailing zeros."""
    text = f"{value:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _cents(value: float) -> float:
    # Half away from zero on the cent grid; the epsilon absorbs binary noise such as 1.005.
    return math.copysign(math.floor(abs(value) * 100.0 + 0.5 + 1e-9) / 100.0, value)


def _utc_text(ts: pd.Timestamp, digits: int = 6) -> str:
    """RFC 3339 in UTC with a ``Z``: 6 fractional digits (trading API), 9 (market data quotes
    and trades, as Alpaca sends them) or 0 (bars)."""
    utc = ts.tz_convert("UTC")
    if digits == 0:
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    fraction = f"{utc.microsecond:06d}{utc.nanosecond:03d}"[:digits]
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + "." + fraction + "Z"


def _local_text(ts: pd.Timestamp) -> str:
    """RFC 3339 with the New York offset, as ``/v2/clock`` answers."""
    return ts.tz_convert(NEW_YORK).isoformat()


def _as_new_york(value) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize(NEW_YORK) if ts.tzinfo is None else ts.tz_convert(NEW_YORK)


def _occ_symbol(expiration: date, is_call: bool, strike: float) -> str:
    return f"{UNDERLYING}{expiration:%y%m%d}{'C' if is_call else 'P'}{round(strike * 1000):08d}"


def _seeded_int(text: str, seed: int, low: int, high: int) -> int:
    """A stable pseudo-random integer in [low, high] for a name (no shared RNG state consumed)."""
    return low + zlib.crc32(f"{seed}:{text}".encode()) % (high - low + 1)


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _black_scholes(spot: float, strike: float, t_years: float, sigma: float,
                   is_call: bool) -> tuple[float, dict[str, float]]:
    """BSM price and Greeks (delta, gamma per $1; theta per calendar day; vega and rho per
    point), the same units as ``analytics.black_scholes``."""
    sqrt_t = math.sqrt(t_years)
    sig_sqrt_t = sigma * sqrt_t
    disc_r, disc_q = math.exp(-RATE * t_years), math.exp(-DIVIDEND_YIELD * t_years)
    d1 = (math.log(spot / strike) + (RATE - DIVIDEND_YIELD + 0.5 * sigma * sigma) * t_years) / sig_sqrt_t
    d2 = d1 - sig_sqrt_t
    pdf_d1 = math.exp(-0.5 * d1 * d1) / math.sqrt(2.0 * math.pi)
    decay = -spot * disc_q * pdf_d1 * sigma / (2.0 * sqrt_t)
    if is_call:
        price = spot * disc_q * _norm_cdf(d1) - strike * disc_r * _norm_cdf(d2)
        delta = disc_q * _norm_cdf(d1)
        theta = decay - RATE * strike * disc_r * _norm_cdf(d2) + DIVIDEND_YIELD * spot * disc_q * _norm_cdf(d1)
        rho = strike * t_years * disc_r * _norm_cdf(d2) * 0.01
    else:
        price = strike * disc_r * _norm_cdf(-d2) - spot * disc_q * _norm_cdf(-d1)
        delta = -disc_q * _norm_cdf(-d1)
        theta = decay + RATE * strike * disc_r * _norm_cdf(-d2) - DIVIDEND_YIELD * spot * disc_q * _norm_cdf(-d1)
        rho = -strike * t_years * disc_r * _norm_cdf(-d2) * 0.01
    greeks = {"delta": delta, "gamma": disc_q * pdf_d1 / (spot * sig_sqrt_t), "rho": rho,
              "theta": theta / 365.0, "vega": spot * disc_q * pdf_d1 * sqrt_t * 0.01}
    return max(price, 0.0), greeks


def _smile_iv(spot: float, strike: float) -> float:
    moneyness = math.log(strike / spot)
    return BASE_IV * (1.0 - 2.0 * moneyness + 8.0 * moneyness * moneyness)  # > 0 for every m


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        kind, _, number = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "offset" and number.isdigit():
            return int(number)
    except (ValueError, UnicodeDecodeError):
        pass
    raise _ApiError(400, 40010000, "invalid page_token")


def _encode_bar_token(symbol: str, start_ns: int) -> str:
    """A stock-bars page token: the symbol and start time of the first bar of the next page."""
    return base64.urlsafe_b64encode(f"bar:{symbol}:{start_ns}".encode()).decode()


def _decode_bar_token(token: str | None) -> tuple[str, int] | None:
    if not token:
        return None
    try:
        kind, symbol, number = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if kind == "bar" and symbol and number.lstrip("-").isdigit():
            return symbol, int(number)
    except (ValueError, UnicodeDecodeError):
        pass
    raise _ApiError(400, 40010000, "invalid page_token")


def _cents_array(values: np.ndarray) -> np.ndarray:
    """``_cents`` of positive prices, element by element (the same float operations)."""
    return np.floor(values * 100.0 + 0.5 + 1e-9) / 100.0


_TIMEFRAME_TEXT = re.compile(r"([1-9][0-9]*)(Min|T|Hour|H|Day|D|Week|W|Month|M)")
SERVED_TIMEFRAMES = "1Min, 5Min, 10Min, 15Min, 20Min, 30Min, 1Hour, 1Day"


def _timeframe_minutes(text: str | None) -> int | None:
    """Minutes per bar of a ``timeframe`` the fake serves (None: 1Day); 422 for any other. The
    real API also takes the short units (``5T``, ``1H``, ``1D``); so does the fake."""
    match = _TIMEFRAME_TEXT.fullmatch(text or "")
    if match is not None:
        amount, unit = int(match.group(1)), match.group(2)
        if unit in ("Min", "T") and (amount == 1 or (amount % BAR_MINUTES == 0 and 60 % amount == 0)):
            return amount
        if unit in ("Hour", "H") and amount == 1:
            return 60
        if unit in ("Day", "D") and amount == 1:
            return None
    raise _ApiError(422, 42210000, f"the fake serves timeframe={SERVED_TIMEFRAMES} only, not {text!r}")


@dataclass
class _BarTable:
    """Bars as columns: start time (UTC ns), prices (floats on the cent grid), volume, trade
    count and an unrounded vwap (rounded to 4 places when written, as Python's ``round``)."""

    t: np.ndarray
    o: np.ndarray
    h: np.ndarray
    l: np.ndarray  # noqa: E741 - Alpaca's own field name
    c: np.ndarray
    v: np.ndarray
    n: np.ndarray
    vw: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def take(self, index) -> "_BarTable":
        return _BarTable(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(tables: list["_BarTable"]) -> "_BarTable":
        return _BarTable(*(np.concatenate([getattr(t, f.name) for t in tables])
                           for f in dataclasses.fields(_BarTable)))

    def aggregate(self, keys: np.ndarray, stamps: np.ndarray) -> "_BarTable":
        """One bar per run of equal ``keys`` (the rows are in time order): first open, extreme
        high and low, last close, summed volume and trade count, volume-weighted vwap; stamped
        with ``stamps`` of the run's first row."""
        if not len(self):
            return self
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        last = np.r_[first[1:], len(keys)] - 1
        volume = np.add.reduceat(self.v, first)
        return _BarTable(stamps[first], self.o[first], np.maximum.reduceat(self.h, first),
                         np.minimum.reduceat(self.l, first), self.c[last], volume,
                         np.add.reduceat(self.n, first),
                         np.add.reduceat(self.vw * self.v, first) / np.maximum(volume, 1))

    def json_rows(self) -> list[dict]:
        stamps = np.datetime_as_string(self.t.astype("datetime64[ns]").astype("datetime64[s]"), unit="s")
        return [{"t": f"{t}Z", "o": o, "h": h, "l": low, "c": c, "v": v, "n": n, "vw": round(vw, 4)}
                for t, o, h, low, c, v, n, vw in zip(stamps.tolist(), self.o.tolist(), self.h.tolist(),
                                                     self.l.tolist(), self.c.tolist(), self.v.tolist(),
                                                     self.n.tolist(), self.vw.tolist())]


def _empty_bar_table() -> _BarTable:
    ints, floats = np.empty(0, dtype=np.int64), np.empty(0)
    return _BarTable(ints, floats, floats, floats, floats, ints, ints, floats)


@dataclass
class _Path:
    """One stock's 5-minute path: log closes, the log move open -> close of each bar (the rest
    of a bar's log return is the gap from the previous close), wicks and volumes."""

    log_close: np.ndarray
    step: np.ndarray
    wick_up: np.ndarray
    wick_down: np.ndarray
    volume: np.ndarray
    step_vol: float


# ---------------------------------------------------------------------------------------------
# Internal records
# ---------------------------------------------------------------------------------------------

class _ApiError(Exception):
    """An error answer: HTTP status plus Alpaca's ``{"code", "message"}`` body."""

    def __init__(self, status: int, code: int, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers or {})


def _error_reply(status: int, code: int, message: str, headers=None, **extra) -> Reply:
    return _json_reply(status, {"code": code, "message": message, **extra}, headers)


@dataclass(frozen=True)
class _Contract:
    symbol: str
    id: str
    expiration: date
    is_call: bool
    strike: float
    expiry_close: pd.Timestamp   # the moment it stops trading (its session's close)
    open_interest: int

    @property
    def type(self) -> str:
        return "call" if self.is_call else "put"

    @property
    def has_greeks(self) -> bool:
        # Deterministic gaps in the data: every 7th strike (reference §5).
        return round(self.strike) % 7 != 0


@functools.lru_cache(maxsize=16)
def _listed_contracts(expirations: tuple, strikes: tuple[int, int], seed: int) -> list[_Contract]:
    """The contract list (sorted by symbol) for ((day, expiry close), ...) and a strike range.

    Cached: the records are immutable and many fakes in a test run list the same ones.
    """
    contracts = []
    for day, close in expirations:
        for strike in range(strikes[0], strikes[1] + 1):
            for is_call in (True, False):
                symbol = _occ_symbol(day, is_call, strike)
                contracts.append(_Contract(
                    symbol=symbol, id=str(uuid.uuid5(_ID_NAMESPACE, symbol)), expiration=day,
                    is_call=is_call, strike=float(strike), expiry_close=close,
                    open_interest=_seeded_int(symbol, seed, 0, 25_000)))
    contracts.sort(key=lambda c: c.symbol)
    return contracts


@dataclass
class _Order:
    """A server-side order: ``body`` is exactly what the API returns; the rest is bookkeeping."""

    body: dict
    sequence: int
    submitted: pd.Timestamp
    expires_at: pd.Timestamp | None  # None for gtc

    @property
    def is_open(self) -> bool:
        return self.body["status"] in OPEN_STATUSES

    @property
    def qty(self) -> int:
        return int(self.body["qty"])

    @property
    def filled_qty(self) -> int:
        return int(self.body["filled_qty"])

    def legs(self) -> list[tuple[dict, str, str, int]]:
        """(leg order or the order itself, symbol, side, ratio) per leg."""
        if self.body["order_class"] == "mleg":
            return [(leg, leg["symbol"], leg["side"], int(leg["ratio_qty"])) for leg in self.body["legs"]]
        return [(self.body, self.body["symbol"], self.body["side"], 1)]

    def net_limit(self) -> float | None:
        """The limit per unit in debit-positive terms (a single-leg sell limit is a credit)."""
        if self.body["limit_price"] is None:
            return None
        limit = float(self.body["limit_price"])
        if self.body["order_class"] != "mleg" and self.body["side"] == "sell":
            return -limit
        return limit


@dataclass
class _Position:
    qty: int
    avg_entry_price: float


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any                      # parsed JSON with Decimal numbers, or None
    groups: tuple[str, ...] = ()
    fault: Fault | None = None


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------

class _Sessions:
    """NYSE regular sessions (XNYS) in a date range, plus the extra 13:00 closes of a test."""

    def __init__(self, first_day: date, last_day: date, half_days: Iterable):
        # Whole calendar years, so exchange_calendars' own cache serves most fakes.
        calendar = exchange_calendars.get_calendar(
            "XNYS", start=f"{first_day.year}-01-01", end=f"{last_day.year}-12-31")
        schedule = calendar.schedule.loc[str(first_day):str(last_day)]
        self.days: list[date] = [ts.date() for ts in schedule.index]
        self.opens = [ts.tz_convert(NEW_YORK) for ts in schedule["open"]]
        self.closes = [ts.tz_convert(NEW_YORK) for ts in schedule["close"]]
        index_of = {day: i for i, day in enumerate(self.days)}
        for value in half_days:
            day = pd.Timestamp(value).date()
            if day not in index_of:
                raise ValueError(f"half day {day} is not an NYSE session")
            i = index_of[day]
            self.closes[i] = min(self.closes[i], pd.Timestamp(f"{day} 13:00", tz=NEW_YORK))
        self.close_by_day = dict(zip(self.days, self.closes))
        self.open_ns = self._open_ns = np.array([ts.value for ts in self.opens], dtype=np.int64)
        self.close_ns = self._close_ns = np.array([ts.value for ts in self.closes], dtype=np.int64)

    def index_of_open_session(self, ts: pd.Timestamp) -> int | None:
        i = int(np.searchsorted(self._close_ns, ts.value, side="right"))  # first close > ts
        if i < len(self.days) and self._open_ns[i] <= ts.value:
            return i
        return None

    def is_open(self, ts: pd.Timestamp) -> bool:
        return self.index_of_open_session(ts) is not None

    def next_open(self, ts: pd.Timestamp) -> pd.Timestamp:
        return self.opens[self._checked(int(np.searchsorted(self._open_ns, ts.value, side="right")))]

    def next_close(self, ts: pd.Timestamp) -> pd.Timestamp:
        return self.closes[self._checked(int(np.searchsorted(self._close_ns, ts.value, side="right")))]

    def closes_between(self, after: pd.Timestamp, until: pd.Timestamp) -> list[int]:
        """Indices of the sessions whose close lies in (after, until]."""
        lo = int(np.searchsorted(self._close_ns, after.value, side="right"))
        hi = int(np.searchsorted(self._close_ns, until.value, side="right"))
        return list(range(lo, hi))

    def _checked(self, i: int) -> int:
        if i >= len(self.days):
            raise ValueError(f"the fake's calendar ends on {self.days[-1]}")
        return i


# ---------------------------------------------------------------------------------------------
# The HTTP layer
# ---------------------------------------------------------------------------------------------

class LocalHTTPServer(ThreadingHTTPServer):
    """A threaded server on 127.0.0.1 that can drop its kept-alive connections (also used by
    tests/ivolatility_fake.py)."""

    daemon_threads = True
    block_on_close = False  # never wait at stop() for a handler sleeping in an injected timeout

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def get_request(self):
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End kept-alive connections too: a stopped fake must not answer on them."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ReplyHandler(BaseHTTPRequestHandler):
    """What an imitation server's request handler shares (FakeAlpaca's and FakeIVolatility's):
    keep-alive HTTP/1.1, buffered writes, no request log, and ``send_reply``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects
    timeout = 60                   # idle keep-alive connections end on their own
    # Buffered writes: the status line, headers and body leave in one send. Unbuffered, the body
    # is a second small segment, and Nagle plus delayed ACK hold it ~40 ms on every request.
    wbufsize = 1 << 16

    def send_reply(self, reply: "Reply | None") -> None:
        """Answer with ``reply``; None closes the socket without a byte of answer (a dropped
        connection). A 204 carries no body and no entity headers (RFC 9110 §15.3.5)."""
        if reply is None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            self.send_response(reply.status)
            if reply.status != 204:
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.body and reply.status != 204:
                self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:  # the client gave up (e.g. its own timeout) before the answer
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Handler(ReplyHandler):
    fake: "FakeAlpaca"             # set on the per-server subclass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PUT(self):
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        # None: accept_then_drop, the socket closes without an answer
        self.send_reply(self.fake._handle(method, parts.path, parts.query, raw_body, self.headers))


# ---------------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------------

class ServedFake:
    """start / stop / ``with`` / ``url`` of an imitation server on 127.0.0.1: a subclass sets
    ``_handler_class`` (a BaseHTTPRequestHandler subclass reading ``self.fake``) and starts with
    ``self._server = self._thread = None`` (shared by FakeAlpaca and tests/ivolatility_fake.py)."""

    _handler_class: type

    def start(self):
        if self._server is None:
            name = type(self).__name__
            handler = type(f"{name}Handler", (self._handler_class,), {"fake": self})
            self._server = LocalHTTPServer(("127.0.0.1", 0), handler)
            self._thread = threading.Thread(target=self._server.serve_forever, name=name,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"


class FakeAlpaca(ServedFake):
    """Alpaca's REST API on a local port; see the module docstring for what it models."""

    _handler_class = _Handler

    def __init__(self, now="2026-12-07 09:30", spot: float = 600.0, seed: int = 0,
                 options_level: int = 3, cash: float = 100_000.0, key_id: str = "test-key",
                 secret_key: str = "test-secret", half_days: Iterable = (), history_days: int = 30,
                 stocks: Iterable[str] = (UNDERLYING,)):
        if spot <= 0:
            raise ValueError("spot must be positive")
        if history_days < 0:
            raise ValueError("history_days must be >= 0")
        stocks = tuple(dict.fromkeys(s.upper() for s in ([stocks] if isinstance(stocks, str) else stocks)))
        if UNDERLYING not in stocks or not set(stocks) <= set(STOCK_SYMBOLS):
            raise ValueError(f"stocks must include {UNDERLYING} and name only {STOCK_SYMBOLS}, got {stocks}")
        self.stocks = stocks
        self._lock = threading.RLock()
        self._now = _as_new_york(now)
        self._start = self._now
        self._seed = seed
        self.options_level = options_level
        self.key_id, self.secret_key = key_id, secret_key
        self._cash = float(cash)
        self._last_equity = float(cash)
        self._fill_mode = "auto"
        self._fill_fraction = 0.5
        # Minutes the clock moves after each answered GET /v2/clock (None: only advance() moves
        # it): paces a driver running in another process, one clock read per poll.
        self.clock_step: float | None = None

        start_day = self._now.date()
        # ~252 sessions a year: 1.46 calendar days a session leaves room for holidays.
        history_span = timedelta(days=int(history_days * 1.46) + 20)
        self._sessions = _Sessions(start_day - history_span,
                                   start_day + timedelta(days=CALENDAR_HORIZON_DAYS), half_days)
        self._build_price_path(spot, history_days)
        self._contracts = self._list_contracts()
        self._contract_by_symbol = {c.symbol: c for c in self._contracts}
        self._contract_by_id = {c.id: c for c in self._contracts}

        self._orders: list[_Order] = []
        self._order_by_id: dict[str, _Order] = {}
        self._parent_of_leg: dict[str, _Order] = {}
        self._used_client_ids: set[str] = set()
        self._positions: dict[str, _Position] = {}
        self._activities: list[dict] = []
        self._faults: list[list] = []  # [Fault, remaining] in injection order
        self._requests: list[tuple] = []
        self.server_errors: list[str] = []  # tracebacks of unexpected exceptions while serving

        self._server: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._routes = self._route_table()

    # ----- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeAlpaca":
        self._stopping.clear()
        return super().start()

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in an injected timeout
        super().stop()

    # ----- the clock and the market ------------------------------------------------------------

    @property
    def now(self) -> pd.Timestamp:
        return self._now

    def advance(self, minutes: float = 5) -> None:
        if minutes < 0:
            raise ValueError("the clock only moves forward")
        self.set_time(self._now + pd.Timedelta(minutes=minutes))

    def set_time(self, ts) -> None:
        """Jump forward to ``ts``: day orders past their session close end, contracts past their
        expiry close settle, then (market open) working orders are checked at the new quotes."""
        target = _as_new_york(ts)
        with self._lock:
            if target < self._now:
                raise ValueError(f"the clock only moves forward ({target} < {self._now})")
            if target > self._sessions.closes[-1]:
                raise ValueError(f"the fake's calendar ends at {self._sessions.closes[-1]}")
            previous, self._now = self._now, target
            for order in self._orders:
                if not order.is_open:
                    continue
                # A day order ends at its session's close; any order ends when a leg's contract expires.
                contract_end = min(self._contract_by_symbol[symbol].expiry_close for _, symbol, _, _ in order.legs())
                if order.expires_at is not None and order.expires_at <= min(target, contract_end):
                    self._end_order(order, DAY_ORDER_END_STATUS, order.expires_at)
                elif contract_end <= target:
                    self._end_order(order, "expired", contract_end)
            crossed = self._sessions.closes_between(previous, target)
            for i in crossed:
                self._settle_expiring(self._sessions.days[i], self._sessions.closes[i])
            if crossed:
                self._last_equity = self._equity()
            if self._sessions.is_open(target):
                for order in list(self._orders):
                    if order.is_open:
                        self._try_fill(order)

    def is_market_open(self) -> bool:
        return self._sessions.is_open(self._now)

    @property
    def spot(self) -> float:
        with self._lock:
            return self._spot_at(self._now)

    @spot.setter
    def spot(self, value: float) -> None:
        """Force the current SPY price: quotes use it at once, and the path continues from it
        (bars not yet completed are shifted, the forming 5-minute bar's minutes already served
        too; completed 5-minute bars stay as served; QQQ follows x 1.15). Working orders are
        re-checked at the next ``advance``/``set_time``."""
        if value <= 0:
            raise ValueError("spot must be positive")
        with self._lock:
            completed = self._completed_bars(self._now)
            self._log_close[completed:] += math.log(value) - math.log(self._spot_at(self._now))
            self._spot_pin = (completed, float(value))
            self._qqq_log_close = None  # QQQ follows SPY's forced move (x beta)

    def quote(self, occ_symbol: str) -> tuple[float, float]:
        """(bid, ask) of a listed contract now; KeyError for an unknown symbol."""
        with self._lock:
            bid, ask, _, _, _ = self._quote(self._contract_by_symbol[occ_symbol])
            return bid, ask

    # ----- test controls and views -------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append([fault, fault.times])

    @property
    def pending_faults(self) -> list[tuple[Fault, int]]:
        """Injected faults not yet used up, with the number of requests each still applies to."""
        with self._lock:
            return [(fault, remaining) for fault, remaining in self._faults]

    @property
    def fill_mode(self) -> str:
        return self._fill_mode

    @fill_mode.setter
    def fill_mode(self, mode: str) -> None:
        if mode not in ("auto", "never"):
            raise ValueError("fill_mode is 'auto' or 'never'")
        self._fill_mode = mode

    @property
    def fill_fraction(self) -> float:
        return self._fill_fraction

    @fill_fraction.setter
    def fill_fraction(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError("fill_fraction is between 0 (natural) and 1 (mid)")
        self._fill_fraction = float(value)

    @property
    def orders(self) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(order.body) for order in self._orders]

    @property
    def positions(self) -> dict[str, int]:
        with self._lock:
            return {symbol: pos.qty for symbol, pos in self._positions.items()}

    @property
    def requests(self) -> list[tuple]:
        with self._lock:
            return list(self._requests)

    @property
    def cash(self) -> float:
        with self._lock:
            return round(self._cash, 2)

    @property
    def contract_symbols(self) -> list[str]:
        """Every listed OCC symbol, sorted."""
        return [c.symbol for c in self._contracts]

    # ----- the price path ----------------------------------------------------------------------

    def _build_price_path(self, spot: float, history_days: int) -> None:
        sessions = self._sessions
        first = next(i for i, day in enumerate(sessions.days) if day >= self._start.date())
        first = max(0, first - history_days)
        open_ns = sessions.open_ns[first:]
        counts = (sessions.close_ns[first:] - open_ns) // BAR_NS
        # The path's sessions (index 0 = the first history session) and where each one's bars begin.
        self._path_days = sessions.days[first:]
        self._session_first_bar = np.r_[0, np.cumsum(counts)]
        self._bar_session = np.repeat(np.arange(len(counts)), counts)
        within = np.arange(self._session_first_bar[-1]) - self._session_first_bar[self._bar_session]
        self._bar_start_ns = open_ns[self._bar_session] + within * BAR_NS
        self._bar_end_ns = self._bar_start_ns + BAR_NS
        midnight = pd.DatetimeIndex(pd.to_datetime(self._path_days)).tz_localize(NEW_YORK)
        self._session_midnight_ns = midnight.as_unit("ns").asi8  # Alpaca's stamp of a daily bar
        is_first = within == 0
        is_first[0] = False  # nothing before the first bar to gap from
        count = len(self._bar_start_ns)

        rng = np.random.default_rng(self._seed)
        self._step = rng.standard_normal(count) * STEP_VOL
        gap = rng.standard_normal(count) * GAP_VOL * is_first
        self._wick_up = np.abs(rng.standard_normal(count)) * STEP_VOL * 0.6
        self._wick_down = np.abs(rng.standard_normal(count)) * STEP_VOL * 0.6
        self._volume = rng.integers(150_000, 900_000, count)
        # Anchor: the latest bar completed at the start closes at `spot` (with no bar yet, `spot`
        # is the close of an imaginary bar before the first one).
        cumulative = np.cumsum(self._step + gap)
        self._anchor_index = self._completed_bars(self._start)
        anchor = cumulative[self._anchor_index - 1] if self._anchor_index else 0.0
        self._log_close = math.log(spot) + cumulative - anchor
        self._spot_before_first_bar = float(spot)
        self._spot_pin: tuple[int, float] | None = None
        self._qqq_draws: tuple[np.ndarray, ...] | None = None  # drawn at the first QQQ request
        self._qqq_log_close: np.ndarray | None = None          # dropped when SPY's path is forced

    def _completed_bars(self, ts: pd.Timestamp) -> int:
        return int(np.searchsorted(self._bar_end_ns, ts.value, side="right"))

    def _spot_at(self, ts: pd.Timestamp) -> float:
        completed = self._completed_bars(ts)
        if self._spot_pin is not None and self._spot_pin[0] == completed:
            return self._spot_pin[1]
        if completed == 0:
            return self._spot_before_first_bar
        return _cents(math.exp(self._log_close[completed - 1]))

    def _path(self, symbol: str) -> _Path:
        """SPY's master path, or QQQ's: its own seeded stream on top of SPY's current path."""
        if symbol == UNDERLYING:
            return _Path(self._log_close, self._step, self._wick_up, self._wick_down, self._volume, STEP_VOL)
        count = len(self._bar_start_ns)
        if self._qqq_draws is None:
            rng = np.random.default_rng([self._seed, _STREAM_TAGS["QQQ"]])
            self._qqq_draws = (rng.standard_normal(count) * QQQ_NOISE,
                               np.abs(rng.standard_normal(count)) * QQQ_STEP_VOL * 0.6,
                               np.abs(rng.standard_normal(count)) * QQQ_STEP_VOL * 0.6,
                               rng.integers(100_000, 700_000, count))
        noise, wick_up, wick_down, volume = self._qqq_draws
        if self._qqq_log_close is None:
            # beta x SPY's 5-minute log returns (gaps and forced moves included) + noise, anchored
            # at the start like SPY: the bar completed at the start closes at 0.85 x spot.
            spy_return = np.diff(self._log_close, prepend=self._log_close[0] - self._step[0])
            cumulative = np.cumsum(QQQ_BETA * spy_return + noise)
            anchor = cumulative[self._anchor_index - 1] if self._anchor_index else 0.0
            self._qqq_log_close = math.log(QQQ_PRICE_RATIO * self._spot_before_first_bar) + cumulative - anchor
        return _Path(self._qqq_log_close, QQQ_BETA * self._step + noise, wick_up, wick_down, volume, QQQ_STEP_VOL)

    def _five_minute_bars(self, symbol: str, lo: int, hi: int) -> _BarTable:
        """The master path's bars ``lo … hi − 1`` of ``symbol``: open = previous close x the
        overnight gap, wicks beyond the body, prices on the cent grid."""
        path = self._path(symbol)
        close = np.exp(path.log_close[lo:hi])
        open_ = close / np.exp(path.step[lo:hi])
        o, c = _cents_array(open_), _cents_array(close)
        h = np.maximum(_cents_array(np.maximum(open_, close) * np.exp(path.wick_up[lo:hi])), np.maximum(o, c))
        low = np.minimum(_cents_array(np.minimum(open_, close) * np.exp(-path.wick_down[lo:hi])), np.minimum(o, c))
        volume = path.volume[lo:hi].astype(np.int64)
        return _BarTable(self._bar_start_ns[lo:hi], o, h, low, c, volume, volume // 120, (h + low + c) / 3.0)

    def _sub_bar_draws(self, symbol: str, lo: int, hi: int) -> np.ndarray:
        """Random draws (5 normals, 15 uniforms) for each 5-minute bar ``lo … hi − 1``, seeded by
        the symbol and the session date: the same whatever range a request asks for."""
        tag = _STREAM_TAGS[f"sub:{symbol}"]
        parts = []
        for session in range(int(self._bar_session[lo]), int(self._bar_session[hi - 1]) + 1):
            rng = np.random.default_rng([self._seed, tag, self._path_days[session].toordinal()])
            bars = int(self._session_first_bar[session + 1] - self._session_first_bar[session])
            parts.append(np.column_stack([rng.standard_normal((bars, SUB_BARS)), rng.random((bars, 3 * SUB_BARS))]))
        offset = lo - int(self._session_first_bar[self._bar_session[lo]])
        return np.concatenate(parts)[offset:offset + hi - lo]

    def _one_minute_bars(self, symbol: str, lo: int, hi: int) -> _BarTable:
        """Five 1-minute bars inside each 5-minute bar ``lo … hi − 1`` (module docstring)."""
        if hi <= lo:
            return _empty_bar_table()
        five = self._five_minute_bars(symbol, lo, hi)
        draws = self._sub_bar_draws(symbol, lo, hi)
        count, rows = hi - lo, np.arange(hi - lo)
        o5, h5, l5, c5 = (np.rint(x * 100.0).astype(np.int64)[:, None] for x in (five.o, five.h, five.l, five.c))
        # Closes: a Brownian bridge from the open to the close (a minute's volatility), in cents.
        sigma = five.o[:, None] * 100.0 * self._path(symbol).step_vol / math.sqrt(SUB_BARS)
        walk = np.cumsum(draws[:, :SUB_BARS] * sigma, axis=1)
        share = np.arange(1, SUB_BARS + 1) / SUB_BARS
        close = np.rint(o5 + (c5 - o5) * share + walk - share * walk[:, -1:]).astype(np.int64)
        close = np.clip(close, l5, h5)
        close[:, -1] = c5[:, 0]
        open_ = np.concatenate([o5, close[:, :-1]], axis=1)
        top, bottom = np.maximum(open_, close), np.minimum(open_, close)
        # Wicks: part of the room up to the 5-minute high / down to its low; the minute nearest
        # the 5-minute high (low) reaches it.
        high = top + np.floor(draws[:, SUB_BARS:2 * SUB_BARS] * (h5 - top) * 0.5).astype(np.int64)
        low = bottom - np.floor(draws[:, 2 * SUB_BARS:3 * SUB_BARS] * (bottom - l5) * 0.5).astype(np.int64)
        high[rows, np.argmax(top, axis=1)] = h5[:, 0]
        low[rows, np.argmin(bottom, axis=1)] = l5[:, 0]
        weights = 0.5 + draws[:, 3 * SUB_BARS:]
        volume = np.floor(five.v[:, None] * weights / weights.sum(axis=1, keepdims=True)).astype(np.int64)
        volume[rows, np.argmax(volume, axis=1)] += five.v - volume.sum(axis=1)
        stamps = five.t[:, None] + np.arange(SUB_BARS, dtype=np.int64) * MINUTE_NS
        o, h, low, c = (x.reshape(count * SUB_BARS) / 100.0 for x in (open_, high, low, close))
        volume = volume.reshape(count * SUB_BARS)
        return _BarTable(stamps.reshape(count * SUB_BARS), o, h, low, c, volume, volume // 120, (h + low + c) / 3.0)

    # ----- contracts and quotes ----------------------------------------------------------------

    def _list_contracts(self) -> list[_Contract]:
        spot = self._spot_at(self._start)
        last_day = self._start.date() + timedelta(days=LISTED_DAYS)
        expirations = tuple((day, close) for day, close in zip(self._sessions.days, self._sessions.closes)
                            if close > self._start and day <= last_day)
        strikes = (math.ceil(STRIKE_RANGE[0] * spot), math.floor(STRIKE_RANGE[1] * spot))
        return _listed_contracts(expirations, strikes, self._seed)

    def _contract_json(self, contract: _Contract) -> dict:
        active = self._now < contract.expiry_close
        return {
            "id": contract.id, "symbol": contract.symbol,
            "name": f"{UNDERLYING} {contract.expiration:%b %d %Y} {contract.strike:g} "
                    f"{'Call' if contract.is_call else 'Put'}",
            "status": "active" if active else "inactive", "tradable": active,
            "expiration_date": contract.expiration.isoformat(), "root_symbol": UNDERLYING,
            "underlying_symbol": UNDERLYING, "underlying_asset_id": SPY_ASSET_ID,
            "type": contract.type, "style": "american", "strike_price": _number_text(contract.strike),
            "multiplier": str(CONTRACT_MULTIPLIER), "size": str(CONTRACT_MULTIPLIER),
            "open_interest": str(contract.open_interest),
            "open_interest_date": self._start.date().isoformat(),
            "close_price": None, "close_price_date": None,
        }

    def _quote(self, contract: _Contract):
        """(bid, ask, model price, greeks or None, iv or None) at the fake's now."""
        spot = self._spot_at(self._now)
        t_years = (contract.expiry_close - self._now).total_seconds() / YEAR_SECONDS
        if t_years <= 0:
            intrinsic = max(0.0, (spot - contract.strike) if contract.is_call else (contract.strike - spot))
            price, greeks, iv = intrinsic, None, None
        else:
            iv = _smile_iv(spot, contract.strike)
            price, greeks = _black_scholes(spot, contract.strike, max(t_years, 60.0 / YEAR_SECONDS),
                                           iv, contract.is_call)
        half_spread = max(0.01, 0.04 * price) / 2.0
        bid = max(0.0, _cents(price - half_spread))
        ask = max(_cents(price + half_spread), bid + 0.01)
        return bid, round(ask, 2), price, greeks, iv

    def _snapshot_json(self, contract: _Contract) -> dict:
        bid, ask, price, greeks, iv = self._quote(contract)
        seed_name = f"{contract.symbol}:{self._now.value}"
        trade_time = self._now - pd.Timedelta(seconds=_seeded_int(seed_name, self._seed, 1, 900))
        def size(tag: str, high: int) -> int:
            return _seeded_int(tag + seed_name, self._seed, 1, high)

        snapshot = {
            "latestQuote": {"t": _utc_text(self._now, 9), "bp": bid, "bs": size("b", 250), "bx": "C",
                            "ap": ask, "as": size("a", 250), "ax": "C", "c": "A"},
            "latestTrade": {"t": _utc_text(trade_time, 9), "p": max(0.01, _cents(price)),
                            "s": size("s", 20), "x": "C", "c": "I", "i": size("i", 2**31 - 1)},
        }
        if contract.has_greeks and greeks is not None:
            snapshot["greeks"] = {name: round(value, 4) for name, value in greeks.items()}
            snapshot["impliedVolatility"] = round(iv, 4)
        return snapshot

    def _leg_quotes(self, symbol: str) -> tuple[float, float, float]:
        bid, ask, _, _, _ = self._quote(self._contract_by_symbol[symbol])
        return bid, ask, (bid + ask) / 2.0

    # ----- account -----------------------------------------------------------------------------

    def _mark(self, symbol: str) -> float:
        return self._leg_quotes(symbol)[2]

    def _equity(self) -> float:
        return self._cash + sum(pos.qty * self._mark(symbol) * CONTRACT_MULTIPLIER
                                for symbol, pos in self._positions.items())

    def _held_for_orders(self, symbol: str, exclude: _Order | None = None) -> int:
        """Contracts of ``symbol`` that open closing orders would still trade."""
        held = 0
        for order in self._orders:
            if order is exclude or not order.is_open:
                continue
            for leg, leg_symbol, _, ratio in order.legs():
                if leg_symbol == symbol and str(leg.get("position_intent") or "").endswith("_to_close"):
                    held += (order.qty - order.filled_qty) * ratio
        return held

    # ----- request handling --------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, re.Pattern, Callable[[_Request], Reply]]]:
        table = [
            ("GET", r"/v2/clock", self._get_clock),
            ("GET", r"/v2/account", self._get_account),
            ("GET", r"/v2/account/activities/FILL", self._get_fill_activities),
            ("GET", r"/v2/positions", self._get_positions),
            ("GET", r"/v2/positions/([^/]+)", self._get_position),
            ("POST", r"/v2/orders", self._post_order),
            ("GET", r"/v2/orders", self._get_orders),
            ("DELETE", r"/v2/orders", self._delete_orders),
            ("GET", r"/v2/orders:by_client_order_id", self._get_order_by_client_id),
            ("GET", r"/v2/orders/([^/]+)", self._get_order),
            ("PATCH", r"/v2/orders/([^/]+)", self._patch_order),
            ("DELETE", r"/v2/orders/([^/]+)", self._delete_order),
            ("GET", r"/v2/options/contracts", self._get_contracts),
            ("GET", r"/v2/options/contracts/([^/]+)", self._get_contract),
            ("GET", r"/v1beta1/options/snapshots/([^/]+)", self._get_chain),
            ("GET", r"/v1beta1/options/snapshots", self._get_snapshots),
            ("GET", r"/v1beta1/options/quotes/latest", self._get_option_latest_quotes),
            ("GET", r"/v2/stocks/bars", self._get_stock_bars),
            ("GET", r"/v2/stocks/trades/latest", self._get_stock_latest_trades),
            ("GET", r"/v2/stocks/quotes/latest", self._get_stock_latest_quotes),
        ]
        return [(method, re.compile(pattern), handler) for method, pattern, handler in table]

    def _handle(self, method: str, path: str, query_text: str, raw_body: bytes, headers) -> Reply | None:
        """Serve one request; None means "close the connection without answering"."""
        # A '+' of an unencoded offset would read as a space; the SDK encodes it, a raw test may not.
        query = {key: values[-1].replace(" ", "+") if key in ("after", "until", "start", "end") else values[-1]
                 for key, values in parse_qs(query_text, keep_blank_values=True).items()}
        logged_body = None
        body = None
        reply: Reply | None = None
        if raw_body:
            try:
                logged_body = json.loads(raw_body)
                # Decimals keep what the client sent: -0.30000000000000004 must stay sub-penny.
                body = json.loads(raw_body, parse_float=Decimal)
            except ValueError:
                reply = _error_reply(400, 40010000, "request body format is invalid")
        if reply is None and not self._authorized(headers):
            reply = _error_reply(401, 40110000, "request is not authorized")
        fault = None
        if reply is None:
            fault = self._take_fault(method, path)
            reply = self._fault_reply(fault) if fault else None
        if reply is None:
            if fault is not None and fault.kind == "timeout":
                self._stopping.wait(fault.delay or DEFAULT_TIMEOUT_DELAY)
            reply = self._route(_Request(method, path, query, body, fault=fault))
            if fault is not None and fault.kind == "accept_then_500":
                reply = _error_reply(500, 50010000, "internal server error occurred")
            elif fault is not None and fault.kind == "accept_then_drop":
                reply = None
        with self._lock:
            self._requests.append((method, path, dict(query), logged_body,
                                   None if reply is None else reply.status))
        if self.clock_step and method == "GET" and path == "/v2/clock" and reply is not None and reply.status == 200:
            self.advance(minutes=self.clock_step)
        return reply

    def _authorized(self, headers) -> bool:
        if headers.get("APCA-API-KEY-ID") is not None:
            return (headers.get("APCA-API-KEY-ID") == self.key_id
                    and headers.get("APCA-API-SECRET-KEY") == self.secret_key)
        authorization = headers.get("Authorization") or ""
        if authorization.startswith("Basic "):  # the data clients' use_basic_auth=True
            expected = base64.b64encode(f"{self.key_id}:{self.secret_key}".encode()).decode()
            return authorization[len("Basic "):] == expected
        return False

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for entry in self._faults:
                fault, remaining = entry
                if fault.matches(method, path):
                    if remaining <= 1:
                        self._faults.remove(entry)
                    else:
                        entry[1] = remaining - 1
                    return fault
        return None

    def _fault_reply(self, fault: Fault) -> Reply | None:
        """The answer of a fault that replaces the normal handling (None: handle normally)."""
        if fault.kind == "429":
            # Wall-clock epoch seconds, not the fake clock: a client compares it with time.time().
            return _error_reply(429, 42910000, "rate limit exceeded", headers={
                "X-Ratelimit-Limit": "200", "X-Ratelimit-Remaining": "0",
                "X-Ratelimit-Reset": str(int(time.time()) + 1)})
        if fault.kind == "500":
            return _error_reply(500, 50010000, "internal server error occurred")
        if fault.kind == "502":
            return Reply(502, _HTML_502, content_type="text/html")
        if fault.kind == "503":
            return _error_reply(503, 50310000, "service unavailable")
        if fault.kind == "504":
            return Reply(504, _HTML_504, content_type="text/html")
        if fault.kind == "reject":
            with self._lock:
                available = self._cash
            required = available + 1000.0
            return _error_reply(403, 40310000, "insufficient options buying power "
                                f"(required: {required:.2f}, available: {available:.2f})")
        return None

    def _route(self, request: _Request) -> Reply:
        path_known = False
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            path_known = True
            if method != request.method:
                continue
            request.groups = match.groups()
            try:
                with self._lock:
                    return handler(request)
            except _ApiError as error:
                return _error_reply(error.status, error.code, error.message, **error.extra)
            except Exception:  # a bug in the fake: answer 500 and keep the traceback for the test
                self.server_errors.append(traceback.format_exc())
                return _error_reply(500, 50010000, "fake server error (see FakeAlpaca.server_errors)")
        if path_known:
            return _error_reply(405, 40510000, "method not allowed")
        return _error_reply(404, 40410000, f"endpoint not found in the fake: {request.path}")

    # ----- trading: clock, account, positions --------------------------------------------------

    def _get_clock(self, request: _Request) -> Reply:
        now = self._now
        return _json_reply(200, {"timestamp": _local_text(now), "is_open": self._sessions.is_open(now),
                                 "next_open": _local_text(self._sessions.next_open(now)),
                                 "next_close": _local_text(self._sessions.next_close(now))})

    def _get_account(self, request: _Request) -> Reply:
        long_value = short_value = 0.0
        for symbol, pos in self._positions.items():
            value = pos.qty * self._mark(symbol) * CONTRACT_MULTIPLIER
            if pos.qty > 0:
                long_value += value
            else:
                short_value += value
        equity = self._cash + long_value + short_value
        money = _number_text
        return _json_reply(200, {
            "id": ACCOUNT_ID, "account_number": "PA3FAKE00001", "status": "ACTIVE",
            "crypto_status": "ACTIVE", "currency": "USD",
            "buying_power": money(self._cash), "regt_buying_power": money(self._cash),
            "non_marginable_buying_power": money(self._cash),
            "options_buying_power": money(self._cash), "cash": money(self._cash),
            "accrued_fees": "0", "pending_transfer_in": "0", "pending_transfer_out": "0",
            "portfolio_value": money(equity), "equity": money(equity),
            "last_equity": money(self._last_equity), "long_market_value": money(long_value),
            "short_market_value": money(short_value), "initial_margin": "0",
            "maintenance_margin": "0", "last_maintenance_margin": "0", "sma": "0",
            "multiplier": "1", "shorting_enabled": False, "trading_blocked": False,
            "transfers_blocked": False, "account_blocked": False, "trade_suspended_by_user": False,
            "created_at": "2024-01-02T14:30:00.000000Z", "balance_asof": self._now.date().isoformat(),
            "options_approved_level": self.options_level, "options_trading_level": self.options_level,
        })

    def _position_json(self, symbol: str, pos: _Position) -> dict:
        price = self._mark(symbol)
        market_value = pos.qty * price * CONTRACT_MULTIPLIER
        cost_basis = pos.qty * pos.avg_entry_price * CONTRACT_MULTIPLIER
        unrealized = market_value - cost_basis
        held = self._held_for_orders(symbol)
        available = pos.qty - held if pos.qty > 0 else pos.qty + held
        return {
            "asset_id": self._contract_by_symbol[symbol].id, "symbol": symbol, "exchange": "",
            "asset_class": "us_option", "asset_marginable": False, "qty": str(pos.qty),
            "side": "long" if pos.qty > 0 else "short",
            "avg_entry_price": _number_text(pos.avg_entry_price, 4),
            "market_value": _number_text(market_value), "cost_basis": _number_text(cost_basis),
            "unrealized_pl": _number_text(unrealized),
            "unrealized_plpc": _number_text(unrealized / abs(cost_basis), 6) if cost_basis else "0",
            "current_price": _number_text(price, 4), "qty_available": str(available),
        }

    def _get_positions(self, request: _Request) -> Reply:
        return _json_reply(200, [self._position_json(symbol, pos)
                                 for symbol, pos in sorted(self._positions.items())])

    def _get_position(self, request: _Request) -> Reply:
        key = request.groups[0]
        contract = self._contract_by_symbol.get(key) or self._contract_by_id.get(key)
        if contract is None or contract.symbol not in self._positions:
            raise _ApiError(404, 40410000, "position does not exist")
        return _json_reply(200, self._position_json(contract.symbol, self._positions[contract.symbol]))

    def _get_fill_activities(self, request: _Request) -> Reply:
        rows = list(self._activities)
        if "after" in request.query:
            after = self._parse_time(request.query["after"], "after")
            rows = [row for row in rows if pd.Timestamp(row["transaction_time"]) > after]
        if "until" in request.query:
            until = self._parse_time(request.query["until"], "until")
            rows = [row for row in rows if pd.Timestamp(row["transaction_time"]) <= until]
        if request.query.get("direction", "desc") == "desc":
            rows.reverse()
        if request.query.get("page_token"):
            ids = [row["id"] for row in rows]
            if request.query["page_token"] not in ids:
                raise _ApiError(400, 40010000, "invalid page_token")
            rows = rows[ids.index(request.query["page_token"]) + 1:]
        page_size = self._int_param(request.query, "page_size", 100, 1, 100)
        return _json_reply(200, rows[:page_size])

    # ----- trading: orders ---------------------------------------------------------------------

    def _post_order(self, request: _Request) -> Reply:
        partial = request.fault is not None and request.fault.kind == "partial"
        if partial and isinstance(request.body, dict):
            qty = self._whole_number(request.body.get("qty"), "qty")
            if qty <= request.fault.partial_qty:  # say so before anything is created
                raise _ApiError(500, 50010000, "Fault(kind='partial') needs an order qty above partial_qty")
        order = self._create_order(request.body, replaces=None)
        if partial:
            self._fill(order, request.fault.partial_qty, self._limit_fill_prices(order))
        else:
            self._try_fill(order)
        return _json_reply(200, order.body)

    def _create_order(self, body: Any, replaces: _Order | None) -> _Order:
        """Validate a POST /v2/orders body (or a replace, already merged) and store the order."""
        if not isinstance(body, dict):
            raise _ApiError(400, 40010000, "request body format is invalid")
        order_class = body.get("order_class") or ("mleg" if body.get("legs") else "simple")
        if order_class not in ("simple", "mleg"):
            raise _ApiError(422, 42210000, f"order_class {order_class} is not supported for options")
        qty = self._whole_number(body.get("qty"), "qty")
        if qty < 1:
            raise _ApiError(422, 40010001, "qty must be > 0")
        order_type = body.get("type") or body.get("order_type")
        if order_type not in ("market", "limit"):
            raise _ApiError(422, 42210000, "invalid order type for options: only market and limit are allowed")
        time_in_force = body.get("time_in_force")
        if time_in_force not in ("day", "gtc"):
            raise _ApiError(422, 42210000, "invalid time in force")
        limit_price = self._limit_price(body, order_type)
        client_order_id = body.get("client_order_id")
        if client_order_id is not None:
            client_order_id = str(client_order_id)
            if len(client_order_id) > 128:
                raise _ApiError(422, 40010001, "client_order_id must be no more than 128 characters")
            if client_order_id in self._used_client_ids:
                raise _ApiError(422, 40010001, "client_order_id must be unique")

        if order_class == "mleg":
            legs = self._validated_legs(body.get("legs"))
            if self.options_level < 3:
                raise _ApiError(403, 40310000, "account not eligible to trade spreads or uncovered contracts")
        else:
            legs = [self._validated_single(body)]
        if order_type == "market" and not self._sessions.is_open(self._now):
            raise _ApiError(422, 42210000, "options market orders are only allowed during market hours")
        for contract, side, intent, ratio in legs:
            if intent.endswith("_to_open") and self._now.date() == contract.expiration \
                    and self._now >= contract.expiry_close - pd.Timedelta(minutes=30):
                raise _ApiError(422, 42210000, f"contract {contract.symbol} expires soon, unable to open new positions")
            if intent.endswith("_to_close"):
                self._check_close_qty(contract.symbol, side, qty * ratio, replaces)

        now = self._now
        expires_at = self._sessions.next_close(now) if time_in_force == "day" else None
        stamp = _utc_text(now)
        order_id = str(uuid.uuid4())
        client_order_id = client_order_id or str(uuid.uuid4())
        shared = {"created_at": stamp, "updated_at": stamp, "submitted_at": stamp, "filled_at": None,
                  "expired_at": None, "expires_at": _utc_text(expires_at) if expires_at is not None else None,
                  "canceled_at": None, "failed_at": None, "replaced_at": None, "replaced_by": None,
                  "replaces": None, "notional": None, "filled_qty": "0", "filled_avg_price": None,
                  "time_in_force": time_in_force, "stop_price": None, "status": "new",
                  "extended_hours": False, "trail_percent": None, "trail_price": None, "hwm": None,
                  "subtag": None, "source": None}
        order_json = {"id": order_id, "client_order_id": client_order_id, **shared,
                      "qty": str(qty), "order_class": order_class, "order_type": order_type,
                      "type": order_type,
                      "limit_price": _number_text(float(limit_price)) if limit_price is not None else None}
        if order_class == "mleg":
            # The API sends the top-level asset fields of a multi-leg order as "" (reference §3).
            order_json.update({"asset_id": "", "symbol": "", "asset_class": "", "side": "", "legs": [
                {"id": str(uuid.uuid4()), "client_order_id": str(uuid.uuid4()), **shared,
                 "asset_id": contract.id, "symbol": contract.symbol, "asset_class": "us_option",
                 "qty": str(qty * ratio), "order_class": "mleg", "order_type": None, "type": None,
                 "side": side, "position_intent": intent, "ratio_qty": str(ratio),
                 "limit_price": None, "legs": None}
                for contract, side, intent, ratio in legs]})
        else:
            contract, side, intent, _ = legs[0]
            order_json.update({"asset_id": contract.id, "symbol": contract.symbol,
                               "asset_class": "us_option", "side": side, "position_intent": intent,
                               "legs": None})
        if replaces is not None:
            order_json["replaces"] = replaces.body["id"]

        order = _Order(order_json, sequence=len(self._orders), submitted=now, expires_at=expires_at)
        self._orders.append(order)
        self._order_by_id[order_id] = order
        for leg in order_json["legs"] or []:
            self._parent_of_leg[leg["id"]] = order
        self._used_client_ids.add(client_order_id)
        return order

    def _limit_price(self, body: dict, order_type: str) -> Decimal | None:
        raw = body.get("limit_price")
        if order_type == "market":
            if raw is not None:
                raise _ApiError(422, 42210000, "market orders must not have a limit price")
            return None
        if raw is None:
            raise _ApiError(422, 42210000, "limit_price is required for limit orders")
        try:
            price = Decimal(str(raw))
        except InvalidOperation:
            raise _ApiError(422, 42210000, "invalid limit price") from None
        # Two decimals at most: the SDK does no rounding, so float noise arrives here (§3, §11.11).
        if not price.is_finite() or price != price.quantize(Decimal("0.01")):
            raise _ApiError(422, 42210000, "invalid limit price")
        if (body.get("order_class") or "simple") != "mleg" and not body.get("legs") and price <= 0:
            raise _ApiError(422, 42210000, "invalid limit price")
        return price

    @staticmethod
    def _whole_number(value, name: str) -> int:
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            number = None
        if value is None or number is None or not number.is_finite() or number != number.to_integral_value():
            raise _ApiError(422, 40010001, f"{name} must be a whole number for options")
        return int(number)

    def _contract_for_order(self, symbol, where: str) -> _Contract:
        contract = self._contract_by_symbol.get(str(symbol))
        if contract is None:
            raise _ApiError(422, 40010001, f"{where}: asset {symbol} not found")
        if self._now >= contract.expiry_close:
            raise _ApiError(422, 42210000, f"{where}: asset {symbol} is not active")
        return contract

    def _validated_legs(self, legs) -> list[tuple[_Contract, str, str, int]]:
        if not isinstance(legs, list) or not 2 <= len(legs) <= 4:
            raise _ApiError(422, 40010001, "mleg orders need 2 to 4 legs")
        validated, symbols = [], set()
        for i, leg in enumerate(legs):
            if not isinstance(leg, dict):
                raise _ApiError(422, 40010001, f"leg.{i} is not an object")
            intent = leg.get("position_intent")
            if not intent:
                raise _ApiError(422, 42210000, f"leg.{i} position intent is required")
            if intent not in INTENT_SIDE:
                raise _ApiError(422, 42210000, f"leg.{i} invalid position intent")
            side = leg.get("side") or INTENT_SIDE[intent]
            if side != INTENT_SIDE[intent]:
                raise _ApiError(422, 42210000, f"leg.{i} side does not match position intent")
            contract = self._contract_for_order(leg.get("symbol"), f"leg.{i}")
            if contract.symbol in symbols:
                raise _ApiError(422, 42210000, "legs must have distinct symbols")
            symbols.add(contract.symbol)
            ratio = self._whole_number(leg.get("ratio_qty", 1), f"leg.{i} ratio_qty")
            if ratio < 1:
                raise _ApiError(422, 42210000, f"leg.{i} ratio_qty must be > 0")
            validated.append((contract, side, intent, ratio))
        if math.gcd(*(ratio for *_, ratio in validated)) != 1:
            raise _ApiError(422, 42210000, "leg ratios must be in their lowest terms")
        return validated

    def _validated_single(self, body: dict) -> tuple[_Contract, str, str, int]:
        side = body.get("side")
        intent = body.get("position_intent")
        if intent is not None and intent not in INTENT_SIDE:
            raise _ApiError(422, 42210000, "invalid position intent")
        side = side or (INTENT_SIDE[intent] if intent else None)
        if side not in ("buy", "sell"):
            raise _ApiError(422, 40010001, "side is required")
        if intent is not None and INTENT_SIDE[intent] != side:
            raise _ApiError(422, 42210000, "side does not match position intent")
        contract = self._contract_for_order(body.get("symbol"), "order")
        if intent is None:  # infer it the way the broker would: against the current position
            held = self._positions.get(contract.symbol)
            closing = held is not None and (held.qty < 0) == (side == "buy")
            intent = f"{side}_to_{'close' if closing else 'open'}"
        needed = 3 if intent == "sell_to_open" else 2  # uncovered short vs. a long option
        if self.options_level < needed:
            raise _ApiError(403, 40310000, "account not eligible to trade uncovered option contracts"
                            if intent == "sell_to_open" else "account not eligible to trade options")
        return contract, side, intent, 1

    def _check_close_qty(self, symbol: str, side: str, requested: int, replaces: _Order | None) -> None:
        held = self._positions.get(symbol)
        # A closing buy needs a short position and a closing sell a long one.
        owned = 0 if held is None or (held.qty < 0) != (side == "buy") else abs(held.qty)
        available = owned - self._held_for_orders(symbol, exclude=replaces)
        if requested > available:
            related = [order.body["id"] for order in self._orders if order.is_open and order is not replaces
                       and any(s == symbol for _, s, _, _ in order.legs())]
            raise _ApiError(403, 40310000, f"insufficient qty available for order "
                            f"(requested: {requested}, available: {max(available, 0)})",
                            held_for_orders=str(max(owned - max(available, 0), 0)), related_orders=related)

    def _get_orders(self, request: _Request) -> Reply:
        query = request.query
        status = query.get("status", "open")
        if status not in ("open", "closed", "all"):
            raise _ApiError(422, 40010001, "invalid status")
        limit = self._int_param(query, "limit", 50, 1, 500)
        direction = query.get("direction", "desc")
        if direction not in ("asc", "desc"):
            raise _ApiError(422, 40010001, "invalid direction")
        after = self._parse_time(query["after"], "after") if "after" in query else None
        until = self._parse_time(query["until"], "until") if "until" in query else None
        symbols = set(filter(None, query.get("symbols", "").split(","))) or None
        selected = []
        for order in self._orders:
            if status != "all" and order.is_open != (status == "open"):
                continue
            if after is not None and not order.submitted > after:
                continue
            if until is not None and not order.submitted < until:
                continue
            if query.get("side") and order.body["side"] != query["side"]:
                continue
            if symbols is not None and not symbols & {symbol for _, symbol, _, _ in order.legs()}:
                continue
            selected.append(order)
        # mleg legs are always nested, whatever `nested` says (reference §10).
        selected.sort(key=lambda order: (order.submitted, order.sequence), reverse=direction == "desc")
        return _json_reply(200, [order.body for order in selected[:limit]])

    def _order_or_404(self, order_id: str) -> tuple[_Order | None, dict]:
        """(parent order or None, the order or leg JSON) for an id."""
        if order_id in self._order_by_id:
            order = self._order_by_id[order_id]
            return order, order.body
        if order_id in self._parent_of_leg:
            parent = self._parent_of_leg[order_id]
            return None, next(leg for leg in parent.body["legs"] if leg["id"] == order_id)
        raise _ApiError(404, 40410000, "order not found")

    def _get_order(self, request: _Request) -> Reply:
        _, body = self._order_or_404(request.groups[0])
        return _json_reply(200, body)

    def _get_order_by_client_id(self, request: _Request) -> Reply:
        client_order_id = request.query.get("client_order_id", "")
        for order in self._orders:
            if order.body["client_order_id"] == client_order_id:
                return _json_reply(200, order.body)
        raise _ApiError(404, 40410000, "order not found")

    def _delete_order(self, request: _Request) -> Reply:
        order, _ = self._order_or_404(request.groups[0])
        if order is None:
            raise _ApiError(422, 42210000, "cannot cancel individual legs of a mleg order")
        if not order.is_open:
            raise _ApiError(422, 42210000, "The order status is not cancelable")
        self._end_order(order, "canceled", self._now)
        return Reply(204)

    def _delete_orders(self, request: _Request) -> Reply:
        results = []
        for order in self._orders:
            if order.is_open:
                self._end_order(order, "canceled", self._now)
                results.append({"id": order.body["id"], "status": 200, "body": None})
        return _json_reply(207, results)

    def _patch_order(self, request: _Request) -> Reply:
        old, _ = self._order_or_404(request.groups[0])
        if old is None:
            raise _ApiError(422, 42210000, "cannot replace individual legs of a mleg order")
        if not old.is_open:
            raise _ApiError(422, 42210000, "The order status is not replaceable")
        changes = request.body if isinstance(request.body, dict) else {}
        unknown = set(changes) - {"qty", "time_in_force", "limit_price", "stop_price", "trail", "client_order_id"}
        if unknown:
            raise _ApiError(422, 40010001, f"unexpected fields: {', '.join(sorted(unknown))}")
        if "stop_price" in changes or "trail" in changes:
            raise _ApiError(422, 42210000, "options orders take no stop price or trail")
        merged = {
            "order_class": old.body["order_class"], "type": old.body["type"],
            "qty": changes.get("qty", old.qty - old.filled_qty),
            "time_in_force": changes.get("time_in_force", old.body["time_in_force"]),
            "limit_price": changes.get("limit_price", old.body["limit_price"]),
            "client_order_id": changes.get("client_order_id"),
        }
        if old.body["order_class"] == "mleg":
            merged["legs"] = [{"symbol": leg["symbol"], "side": leg["side"], "ratio_qty": leg["ratio_qty"],
                               "position_intent": leg["position_intent"]} for leg in old.body["legs"]]
        else:
            merged.update({"symbol": old.body["symbol"], "side": old.body["side"],
                           "position_intent": old.body["position_intent"]})
        new = self._create_order(merged, replaces=old)
        stamp = _utc_text(self._now)
        old.body.update({"status": "replaced", "replaced_by": new.body["id"], "replaced_at": stamp,
                         "updated_at": stamp})
        for leg in old.body["legs"] or []:
            leg.update({"status": "replaced", "replaced_at": stamp, "updated_at": stamp})
        self._try_fill(new)
        return _json_reply(200, new.body)

    def _end_order(self, order: _Order, status: str, when: pd.Timestamp) -> None:
        stamp = _utc_text(when)
        field = {"canceled": "canceled_at", "expired": "expired_at"}[status]
        for part in [order.body, *(order.body["legs"] or [])]:
            part.update({"status": status, field: stamp, "updated_at": stamp})

    # ----- fills -------------------------------------------------------------------------------

    def _try_fill(self, order: _Order) -> None:
        """Fill the rest of a working order if the fill rule (module docstring) allows it now."""
        if not order.is_open or not self._sessions.is_open(self._now):
            return
        remaining = order.qty - order.filled_qty
        signs = [(1 if side == "buy" else -1, ratio) for _, _, side, ratio in order.legs()]
        quotes = [self._leg_quotes(symbol) for _, symbol, _, _ in order.legs()]
        if order.body["type"] == "market":
            # Market orders cross the spread leg by leg.
            self._fill(order, remaining, [ask if sign > 0 else bid for (sign, _), (bid, ask, _) in zip(signs, quotes)])
            return
        if self._fill_mode == "never":
            return
        natural = sum(sign * ratio * (ask if sign > 0 else bid) for (sign, ratio), (bid, ask, _) in zip(signs, quotes))
        mid = sum(sign * ratio * middle for (sign, ratio), (_, _, middle) in zip(signs, quotes))
        threshold = natural - self._fill_fraction * (natural - mid)
        if order.net_limit() >= threshold - 1e-9:
            self._fill(order, remaining, self._limit_fill_prices(order))

    def _limit_fill_prices(self, order: _Order) -> list[float]:
        """Leg prices around the mids that add up to the limit (see the module docstring)."""
        signs = [(1 if side == "buy" else -1, ratio) for _, _, side, ratio in order.legs()]
        prices = [self._leg_quotes(symbol)[2] for _, symbol, _, _ in order.legs()]
        net = order.net_limit()
        if len(prices) == 1:
            return [abs(net)]
        free = list(range(len(prices)))
        for _ in range(len(prices)):
            residual = net - sum(sign * ratio * p for (sign, ratio), p in zip(signs, prices))
            weight = sum(signs[i][1] for i in free)
            for i in free:
                # The same move on every free leg, in the direction that moves the net by residual.
                prices[i] += signs[i][0] * residual / weight
            negative = [i for i in free if prices[i] < 0]
            if not negative:
                break
            for i in negative:
                prices[i] = 0.0
                free.remove(i)
            if not free:
                break
        prices = [_cents(p) for p in prices]
        leftover_cents = round((net - sum(sign * ratio * p for (sign, ratio), p in zip(signs, prices))) * 100)
        if leftover_cents:
            # The dearest leg with ratio 1 takes the rounding leftover (it can absorb any cent).
            candidates = [i for i in range(len(prices)) if signs[i][1] == 1
                          and prices[i] + signs[i][0] * leftover_cents / 100 >= 0] or [0]
            i = max(candidates, key=lambda j: prices[j])
            prices[i] = _cents(prices[i] + signs[i][0] * leftover_cents / 100)
        return prices

    def _fill(self, order: _Order, units: int, leg_prices: list[float]) -> None:
        stamp = _utc_text(self._now)
        done = order.filled_qty + units
        net = 0.0
        for (leg, symbol, side, ratio), price in zip(order.legs(), leg_prices):
            sign = 1 if side == "buy" else -1
            net += sign * ratio * price
            contracts = units * ratio
            leg_filled = int(leg["filled_qty"]) if leg is not order.body else order.filled_qty
            if leg is not order.body:
                previous = float(leg["filled_avg_price"] or 0.0)
                leg["filled_avg_price"] = _number_text((previous * leg_filled + price * contracts)
                                                       / (leg_filled + contracts), 4)
                leg["filled_qty"] = str(leg_filled + contracts)
                leg["status"] = "filled" if done == order.qty else "partially_filled"
                leg["updated_at"] = stamp
                if done == order.qty:
                    leg["filled_at"] = stamp
            self._apply_to_position(symbol, sign * contracts, price)
            self._activities.append({
                "id": f"{self._now:%Y%m%d%H%M%S%f}::{uuid.uuid4()}", "activity_type": "FILL",
                "transaction_time": stamp, "type": "fill" if done == order.qty else "partial_fill",
                "price": _number_text(price), "qty": str(contracts), "side": side, "symbol": symbol,
                "leaves_qty": str((order.qty - done) * ratio), "order_id": leg["id"],
                "cum_qty": str(leg_filled + contracts),
                "order_status": "filled" if done == order.qty else "partially_filled",
            })
        previous_net = float(order.body["filled_avg_price"] or 0.0)
        if order.body["order_class"] != "mleg":
            net = abs(net)  # a single-leg fill price is the (positive) contract price
        order.body["filled_avg_price"] = _number_text((previous_net * order.filled_qty + net * units) / done, 4)
        order.body["filled_qty"] = str(done)
        order.body["status"] = "filled" if done == order.qty else "partially_filled"
        order.body["updated_at"] = stamp
        if done == order.qty:
            order.body["filled_at"] = stamp

    def _apply_to_position(self, symbol: str, signed_qty: int, price: float) -> None:
        self._cash -= signed_qty * price * CONTRACT_MULTIPLIER
        pos = self._positions.get(symbol)
        if pos is None:
            self._positions[symbol] = _Position(signed_qty, price)
            return
        new_qty = pos.qty + signed_qty
        if (pos.qty > 0) == (signed_qty > 0):  # adding to the position: average the entry
            pos.avg_entry_price = (abs(pos.qty) * pos.avg_entry_price + abs(signed_qty) * price) / abs(new_qty)
        elif new_qty != 0 and (new_qty > 0) != (pos.qty > 0):  # flipped through zero
            pos.avg_entry_price = price
        if new_qty == 0:
            del self._positions[symbol]
        else:
            pos.qty = new_qty

    def _settle_expiring(self, day: date, close: pd.Timestamp) -> None:
        """Contracts of ``day`` still held at its close leave the book at intrinsic value."""
        spot = self._spot_at(close)
        for symbol in [s for s in self._positions if self._contract_by_symbol[s].expiration == day]:
            contract = self._contract_by_symbol[symbol]
            intrinsic = max(0.0, spot - contract.strike if contract.is_call else contract.strike - spot)
            self._cash += self._positions.pop(symbol).qty * intrinsic * CONTRACT_MULTIPLIER

    # ----- option data -------------------------------------------------------------------------

    def _get_contracts(self, request: _Request) -> Reply:
        query = request.query
        underlyings = set(filter(None, query.get("underlying_symbols", "").split(",")))
        if underlyings and UNDERLYING not in underlyings:
            return _json_reply(200, {"option_contracts": [], "next_page_token": None})
        status = query.get("status")
        if status not in (None, "active", "inactive"):
            raise _ApiError(422, 40010001, "invalid status")
        selected = self._filter_contracts(query, self._contracts, default_to_weekend=True)
        if status is not None:
            selected = [c for c in selected if (self._now < c.expiry_close) == (status == "active")]
        if query.get("root_symbol") not in (None, UNDERLYING):
            selected = []
        if query.get("style") not in (None, "american"):
            selected = []
        limit = self._int_param(query, "limit", 100, 1, 10_000)
        offset = _decode_page_token(query.get("page_token"))
        page = selected[offset:offset + limit]
        token = _encode_page_token(offset + limit) if offset + limit < len(selected) else None
        return _json_reply(200, {"option_contracts": [self._contract_json(c) for c in page],
                                 "next_page_token": token})

    def _get_contract(self, request: _Request) -> Reply:
        key = request.groups[0]
        contract = self._contract_by_symbol.get(key) or self._contract_by_id.get(key)
        if contract is None:
            raise _ApiError(404, 40410000, f"contract not found: {key}")
        return _json_reply(200, self._contract_json(contract))

    def _filter_contracts(self, query: dict, contracts: list[_Contract], default_to_weekend: bool) -> list[_Contract]:
        exact = self._date_param(query, "expiration_date")
        lowest = self._date_param(query, "expiration_date_gte")
        highest = self._date_param(query, "expiration_date_lte")
        if default_to_weekend and exact is None and lowest is None and highest is None:
            # Real quirk (reference §11.6): no expiration filter means "up to the coming weekend".
            today = self._now.date()
            highest = today + timedelta(days=6 - today.weekday())  # this week's Sunday
        kind = query.get("type")
        if kind not in (None, "call", "put"):
            raise _ApiError(422, 40010001, "invalid type")
        strike_low = self._float_param(query, "strike_price_gte")
        strike_high = self._float_param(query, "strike_price_lte")
        return [c for c in contracts
                if (exact is None or c.expiration == exact)
                and (lowest is None or c.expiration >= lowest)
                and (highest is None or c.expiration <= highest)
                and (kind is None or c.type == kind)
                and (strike_low is None or c.strike >= strike_low)
                and (strike_high is None or c.strike <= strike_high)]

    def _check_feed(self, query: dict) -> None:
        if query.get("feed") not in (None, "indicative", "opra"):
            raise _ApiError(400, 40010000, f"invalid feed: {query['feed']}")

    def _snapshot_page(self, query: dict, contracts: list[_Contract]) -> Reply:
        limit = self._int_param(query, "limit", 100, 1, 1000)
        offset = _decode_page_token(query.get("page_token"))
        page = contracts[offset:offset + limit]
        token = _encode_page_token(offset + limit) if offset + limit < len(contracts) else None
        return _json_reply(200, {"snapshots": {c.symbol: self._snapshot_json(c) for c in page},
                                 "next_page_token": token})

    def _get_chain(self, request: _Request) -> Reply:
        self._check_feed(request.query)
        if request.groups[0] != UNDERLYING or request.query.get("root_symbol") not in (None, UNDERLYING):
            return _json_reply(200, {"snapshots": {}, "next_page_token": None})
        active = [c for c in self._contracts if self._now < c.expiry_close]
        return self._snapshot_page(request.query, self._filter_contracts(request.query, active, False))

    def _symbols_param(self, query: dict) -> list[_Contract]:
        symbols = [s for s in query.get("symbols", "").split(",") if s]
        if not symbols:
            raise _ApiError(400, 40010000, "symbols is required")
        return [self._contract_by_symbol[s] for s in symbols if s in self._contract_by_symbol]

    def _get_snapshots(self, request: _Request) -> Reply:
        self._check_feed(request.query)
        return self._snapshot_page(request.query, self._symbols_param(request.query))

    def _get_option_latest_quotes(self, request: _Request) -> Reply:
        self._check_feed(request.query)
        return _json_reply(200, {"quotes": {c.symbol: self._snapshot_json(c)["latestQuote"]
                                            for c in self._symbols_param(request.query)}})

    # ----- stock data --------------------------------------------------------------------------

    def _get_stock_bars(self, request: _Request) -> Reply:
        query = request.query
        minutes = _timeframe_minutes(query.get("timeframe"))
        if query.get("feed") not in (None, "iex", "sip", "delayed_sip"):
            raise _ApiError(400, 40010000, f"invalid feed: {query['feed']}")
        sort = query.get("sort", "asc")
        if sort not in ("asc", "desc"):
            raise _ApiError(400, 40010000, "invalid sort")
        symbols = [s for s in query.get("symbols", "").split(",") if s]
        if not symbols:
            raise _ApiError(400, 40010000, "symbols is required")
        # Defaults as documented: start at the beginning of the current day, end now.
        start = self._parse_time(query["start"], "start") if "start" in query else self._now.normalize()
        end = self._parse_time(query["end"], "end") if "end" in query else self._now
        limit = self._int_param(query, "limit", 1000, 1, 10_000)
        token = _decode_bar_token(query.get("page_token"))
        # Symbols in sorted order, each by time; `limit` counts bars across symbols, and the token
        # names the symbol and start time of the first bar the next page begins with.
        bars: dict[str, list] = {}
        taken, next_token = 0, None
        for symbol in sorted(set(symbols) & set(self.stocks)):
            if token is not None and symbol < token[0]:
                continue
            table = self._bars(symbol, minutes, start.value, end.value)
            order = np.arange(len(table)) if sort == "asc" else np.arange(len(table))[::-1]
            if token is not None and symbol == token[0]:
                stamps = table.t[order]
                order = order[stamps >= token[1]] if sort == "asc" else order[stamps <= token[1]]
            if not len(order):
                continue
            if taken == limit:
                next_token = _encode_bar_token(symbol, int(table.t[order[0]]))
                break
            page = order[:limit - taken]
            bars[symbol] = table.take(page).json_rows()
            taken += len(page)
            if len(page) < len(order):
                next_token = _encode_bar_token(symbol, int(table.t[order[len(page)]]))
                break
        return _json_reply(200, {"bars": bars, "next_page_token": next_token})

    def _bars(self, symbol: str, minutes: int | None, start_ns: int, end_ns: int) -> _BarTable:
        """Every bar of ``symbol`` that Alpaca would answer now for a timeframe (``minutes``, None:
        1Day) and a start/end (inclusive, on the bar's stamp), in time order."""
        now_ns = self._now.value
        starts = self._bar_start_ns
        completed = self._completed_bars(self._now)
        if minutes == BAR_MINUTES:
            lo = int(np.searchsorted(starts, start_ns, side="left"))
            hi = min(int(np.searchsorted(starts, end_ns, side="right")), completed)
            return self._five_minute_bars(symbol, lo, max(lo, hi))
        if minutes == 1:
            # The 5-minute bars holding a minute in range, the one forming now included.
            lo = int(np.searchsorted(starts, start_ns - (SUB_BARS - 1) * MINUTE_NS, side="left"))
            hi = min(int(np.searchsorted(starts, end_ns, side="right")), completed + 1, len(starts))
            table = self._one_minute_bars(symbol, lo, hi)
            keep = (table.t >= start_ns) & (table.t <= end_ns) & (table.t + MINUTE_NS <= now_ns)
            return table.take(keep)
        if minutes is not None:
            # Clock-aligned buckets of the session's 5-minute bars, as Alpaca aligns its bars:
            # the 1Hour bar stamped 09:00 holds 09:30-10:00. Only buckets that have ended.
            width = minutes * MINUTE_NS
            lo = int(np.searchsorted(starts, start_ns - start_ns % width, side="left"))
            hi = min(int(np.searchsorted(starts, end_ns - end_ns % width + width, side="left")), completed)
            five = self._five_minute_bars(symbol, lo, max(lo, hi))
            bucket = five.t - five.t % width
            table = five.aggregate(bucket, bucket)
            keep = (table.t >= start_ns) & (table.t <= end_ns) & (table.t + width <= now_ns)
            return table.take(keep)
        # 1Day: the sessions stamped (New York midnight) in range; a session under way is its bar
        # so far (completed 5-minute bars and the completed minutes of the forming one).
        first = int(np.searchsorted(self._session_midnight_ns, start_ns, side="left"))
        last = int(np.searchsorted(self._session_midnight_ns, end_ns, side="right"))
        if last <= first:
            return _empty_bar_table()
        lo = int(self._session_first_bar[first])
        hi = min(int(self._session_first_bar[last]), completed)
        tables = [self._five_minute_bars(symbol, lo, max(lo, hi))]
        if lo <= completed < self._session_first_bar[last]:
            forming = self._one_minute_bars(symbol, completed, completed + 1)
            tables.append(forming.take(forming.t + MINUTE_NS <= now_ns))
        table = _BarTable.concat(tables)
        session = self._bar_session[np.searchsorted(starts, table.t, side="right") - 1]
        return table.aggregate(session, self._session_midnight_ns[session])

    def _spy_symbols(self, query: dict) -> bool:
        symbols = [s for s in query.get("symbols", "").split(",") if s]
        if not symbols:
            raise _ApiError(400, 40010000, "symbols is required")
        return UNDERLYING in symbols

    def _get_stock_latest_trades(self, request: _Request) -> Reply:
        if not self._spy_symbols(request.query):
            return _json_reply(200, {"trades": {}})
        return _json_reply(200, {"trades": {UNDERLYING: {
            "t": _utc_text(self._now, 9), "p": self._spot_at(self._now), "s": 100, "x": "V",
            "c": ["@"], "i": _seeded_int(str(self._now.value), self._seed, 1, 2**31 - 1), "z": "B"}}})

    def _get_stock_latest_quotes(self, request: _Request) -> Reply:
        if not self._spy_symbols(request.query):
            return _json_reply(200, {"quotes": {}})
        spot = self._spot_at(self._now)
        return _json_reply(200, {"quotes": {UNDERLYING: {
            "t": _utc_text(self._now, 9), "bp": round(spot - 0.01, 2), "bs": 3, "bx": "V",
            "ap": round(spot + 0.01, 2), "as": 4, "ax": "V", "c": ["R"], "z": "B"}}})

    # ----- query parameters --------------------------------------------------------------------

    @staticmethod
    def _int_param(query: dict, name: str, default: int, low: int, high: int) -> int:
        if name not in query or query[name] == "":
            return default
        try:
            value = int(query[name])
        except ValueError:
            raise _ApiError(422, 40010001, f"invalid {name}") from None
        if not low <= value <= high:
            raise _ApiError(422, 40010001, f"invalid {name}: must be between {low} and {high}")
        return value

    @staticmethod
    def _float_param(query: dict, name: str) -> float | None:
        if not query.get(name):
            return None
        try:
            return float(query[name])
        except ValueError:
            raise _ApiError(422, 40010001, f"invalid {name}") from None

    @staticmethod
    def _date_param(query: dict, name: str) -> date | None:
        if not query.get(name):
            return None
        try:
            return date.fromisoformat(query[name])
        except ValueError:
            raise _ApiError(422, 40010001, f"invalid {name}: expected YYYY-MM-DD") from None

    @staticmethod
    def _parse_time(text: str, name: str) -> pd.Timestamp:
        try:
            ts = pd.Timestamp(text)
        except ValueError:
            raise _ApiError(422, 40010001, f"invalid {name}: expected RFC 3339") from None
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts
