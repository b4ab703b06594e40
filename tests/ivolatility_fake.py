"""A local imitation of IVolatility's REST API (the EOD option-chain endpoint) for the test suite.

``FakeIVolatility``: one threaded HTTP server on 127.0.0.1 (a free port), the same pattern as
``tests/alpaca_fake.py``. It serves what ``data_factory/download_ivolatility_options.py`` uses, with
the shapes its module docstring documents; where the sources say nothing ([U] there) the fake makes
a choice, marked [IMIT] here.

Endpoints
---------
``GET /equities/eod/options-rawiv?symbol=SPY&date=D`` or ``&from=D&to=D`` (``region`` accepted):
    the EOD chain of each NYSE session in the range.
    * Auth: the ``apiKey`` header, or an ``apiKey`` query parameter; anything else is a 401 JSON
      ``{"message": …}`` [IMIT: the real answer to a bad key is unknown].
    * No ``symbol``, or neither ``date`` nor ``from``/``to``, or an unreadable date: 400
      ``{"message": "Parameters are not valid…"}``.
    * No rows (a symbol without data, a range without a session, ``no_data_dates``): 204, no body.
    * Up to ``inline_limit`` rows (default 500, the documented threshold): 200 JSON ``{"status":
      {"code": "DONE", "recordsFound": n, "urlForDetails": null, "queriesLeftEOD": …}, "query":
      {"requestUUID": null}, "data": [rows]}`` with the OpenAPI schema's field names (underscores:
      ``option_symbol``, ``stock_price_for_iv``, ``open_interest``, ``adjusted_close``,
      ``mean_price``, ``call/put``, dates ``yyyy-mm-dd``).
    * More: 200 JSON ``{"status": {"code": "PENDING", "recordsFound": n, "urlForDetails": URL},
      "query": {"requestUUID": id}, "data": []}``; URL is absolute (``relative_details=True``:
      relative to the API).
``GET /data/info/{id}``: ``[{"meta": {"status": "PENDING"}, "data": []}]`` for the first
    ``pending_polls`` polls, then ``[{"meta": {"status": "COMPLETE"}, "data": [{"urlForDownload":
    URL, "fileSize": n}]}]`` (the package's protocol).
    With ``redirect_downloads=True`` the link is ``/data/link/{id}``, which answers 302 to
    ``http://localhost:PORT/data/download/{id}.csv.gz?token=…`` (another host name, as a storage
    link would be [IMIT]).
``GET /data/download/{id}.csv.gz``: authorised by the key or the link's ``token``; the rows as a
    gzip CSV whose header uses the EOD CSV's
    spelling with spaces (``option symbol``, ``stock price for iv`` …) and ``mm/dd/yyyy`` dates
    [IMIT: the prepared file's header is unknown; the other spelling exercises name matching].

The market
----------
Spot per session: ``spot_of`` (a dict or a callable date → price; e.g. FakeAlpaca's daily closes,
so chains and bars agree), else a seeded random walk from ``START_SPOT``. Each session's chain:
expirations every Mon/Wed/Fri session up to ``WEEKLY_DAYS`` calendar days ahead plus the monthly
third-Friday expirations up to ``MONTHLY_DAYS`` ahead (never the session itself), strikes every $1
within ±``STRIKE_BAND`` of the spot. Quotes and Greeks are Black–Scholes (``analytics.black_scholes``,
r = ``RATE``, q = ``DIVIDEND_YIELD``, T = calendar days / 365 from close to close) with a smile
iv = ``BASE_IV`` (1 − 1.5m + 6m²), m = ln(K/S); spread max($0.01, 6 % of the price) in cents. A
contract whose bid rounds to 0 has iv −1 and no Greeks (blank / null), like the vendor's "no IV".
``adjusted_close`` is the spot × ``ADJUSTMENT`` (an adjusted price that must NOT be used as the
underlying price). ``model_row(date, expiration, strike, type)`` gives the values the fake serves.

Faults (``inject(Fault(...))``): the next ``times`` requests whose path starts with ``path`` answer
``kind`` = "429" (with ``Retry-After: retry_after`` unless None), "500", "502" (HTML body), "503",
or "drop" (the connection closes without an answer). ``requests`` logs every request:
(path, query dict, whether the apiKey header was sent, whether an apiKey query parameter was).
"""
from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import math
import threading
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from tests.alpaca_fake import LocalHTTPServer, Reply, ReplyHandler, ServedFake

__all__ = ["FakeIVolatility", "Fault", "FAULT_KINDS", "JSON_FIELDS", "FILE_FIELDS"]

START_SPOT = 270.0
RATE, DIVIDEND_YIELD = 0.015, 0.019
BASE_IV = 0.12
STRIKE_BAND = 0.10
WEEKLY_DAYS = 45
MONTHLY_DAYS = 200
ADJUSTMENT = 0.96
DEFAULT_INLINE_LIMIT = 500
FAULT_KINDS = ("429", "500", "502", "503", "drop")
_HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"

# Response field names: the OpenAPI schema's (JSON) and the EOD CSV's (prepared files), same order.
JSON_FIELDS = ("symbol", "exchange", "date", "adjusted_close", "option_symbol", "expiration", "strike", "call/put",
               "style", "ask", "bid", "mean_price", "iv", "volume", "open_interest", "stock_price_for_iv", "*",
               "delta", "vega", "gamma", "theta", "rho", "record_no")
FILE_FIELDS = ("symbol", "exchange", "date", "adjusted close", "option symbol", "expiration", "strike", "call/put",
               "style", "ask", "bid", "mean price", "iv", "volume", "open interest", "stock price for iv", "*",
               "delta", "vega", "gamma", "theta", "rho", "record_no")


@dataclass
class Fault:
    path: str = "/equities/eod/options-rawiv"
    kind: str = "500"
    times: int = 1
    retry_after: str | None = "0"

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.times < 1:
            raise ValueError("a fault needs times >= 1")


def _json(status: int, payload) -> Reply:
    return Reply(status, json.dumps(payload).encode())


def _sessions(first: dt.date, last: dt.date) -> list[dt.date]:
    from data_factory.market_calendar import trading_sessions

    if first > last:
        return []
    return [day.date() for day in trading_sessions(first, last)]


def _third_friday(year: int, month: int) -> dt.date:
    first = dt.date(year, month, 1)
    return first + dt.timedelta(days=(4 - first.weekday()) % 7 + 14)


class _Handler(ReplyHandler):
    fake: "FakeIVolatility"

    def do_GET(self):
        parts = urlsplit(self.path)
        self.send_reply(self.fake._handle(parts.path, parts.query, self.headers))   # None: "drop"


class FakeIVolatility(ServedFake):
    """IVolatility's EOD option-chain API on a local port; see the module docstring (start, stop,
    ``with`` and ``url`` come from tests.alpaca_fake.ServedFake)."""

    _handler_class = _Handler

    def __init__(self, api_key: str = "test-ivol-key", spot_of: dict | Callable | None = None, seed: int = 0,
                 inline_limit: int = DEFAULT_INLINE_LIMIT, pending_polls: int = 1, relative_details: bool = False,
                 symbols=("SPY",), no_data_dates=(), drop_fields=(), queries_left: int = 10_000,
                 redirect_downloads: bool = False):
        self.api_key = api_key
        self._spot_of = spot_of
        self._seed = seed
        self.inline_limit = int(inline_limit)
        self.pending_polls = int(pending_polls)
        self.relative_details = relative_details
        self.symbols = tuple(s.upper() for s in symbols)
        self.no_data_dates = {dt.date.fromisoformat(str(d)) for d in no_data_dates}
        self.drop_fields = set(drop_fields)
        self.queries_left = int(queries_left)
        self.redirect_downloads = redirect_downloads
        self._lock = threading.RLock()
        self._faults: list[list] = []
        self._requests: list[tuple] = []
        self._jobs: dict[str, dict] = {}
        self._chains: dict[dt.date, dict] = {}
        self._walk: dict[dt.date, float] = {}
        self.server_errors: list[str] = []
        self._server: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- test controls ---------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append([fault, fault.times])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[tuple]:
        with self._lock:
            return list(self._requests)

    def chain_requests(self) -> list[dict]:
        """The query dicts of the option-chain requests, in order."""
        return [query for path, query, _, _ in self.requests if path == "/equities/eod/options-rawiv"]

    # ----- the market ------------------------------------------------------------------------
    def spot(self, day: dt.date) -> float:
        if self._spot_of is not None:
            value = self._spot_of(day) if callable(self._spot_of) else self._spot_of[day]
            return float(value)
        with self._lock:
            if day not in self._walk:
                anchor = dt.date(2018, 1, 2)
                days = _sessions(min(anchor, day), max(anchor, day))
                rng = np.random.default_rng([self._seed, 7])
                steps = rng.normal(0.0, 0.008, size=len(days))
                path = START_SPOT * np.exp(np.cumsum(steps) - steps[0])
                self._walk.update(dict(zip(days, path)))
            return float(self._walk[day])

    def expirations(self, day: dt.date) -> list[dt.date]:
        listed = set()
        for session in _sessions(day + dt.timedelta(days=1), day + dt.timedelta(days=WEEKLY_DAYS)):
            if session.weekday() in (0, 2, 4):
                listed.add(session)
        year, month = day.year, day.month
        while True:
            friday = _third_friday(year, month)
            if friday > day + dt.timedelta(days=MONTHLY_DAYS):
                break
            expiry = friday if _sessions(friday, friday) else friday - dt.timedelta(days=1)
            if expiry > day:
                listed.add(expiry)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return sorted(listed)

    def _chain(self, day: dt.date) -> dict:
        """Column arrays of ``day``'s chain (cached)."""
        from analytics.black_scholes import bsm_greeks

        with self._lock:
            if day in self._chains:
                return self._chains[day]
        spot = self.spot(day)
        strikes = np.arange(math.ceil(spot * (1 - STRIKE_BAND)), math.floor(spot * (1 + STRIKE_BAND)) + 1, 1.0)
        expiries = self.expirations(day)
        exp_grid, strike_grid, call_grid = np.meshgrid(np.arange(len(expiries)), strikes, [False, True], indexing="ij")
        exp_index, strike, is_call = exp_grid.ravel(), strike_grid.ravel(), call_grid.ravel()
        days_left = np.array([(e - day).days for e in expiries], dtype=float)[exp_index]
        t_years = days_left / 365.0
        m = np.log(strike / spot)
        sigma = BASE_IV * (1 - 1.5 * m + 6 * m * m) * (1 + 0.1 / np.sqrt(1 + days_left))
        greeks = bsm_greeks(spot, strike, t_years, RATE, DIVIDEND_YIELD, sigma, is_call)
        price = greeks.price
        half = np.maximum(0.01, 0.06 * price) / 2
        bid = np.maximum(0.0, np.round(price - half, 2))
        ask = np.maximum(np.round(price + half, 2), bid + 0.01)
        quoted = bid > 0
        seed = zlib.crc32(f"{self._seed}:{day}".encode())
        rng = np.random.default_rng(seed)
        chain = {
            "expiration": [expiries[i] for i in exp_index], "strike": strike, "is_call": is_call,
            "bid": bid, "ask": np.round(ask, 2), "iv": np.where(quoted, np.round(sigma, 6), -1.0),
            "delta": np.where(quoted, np.round(greeks.delta, 6), np.nan),
            "gamma": np.where(quoted, np.round(greeks.gamma, 6), np.nan),
            "vega": np.where(quoted, np.round(greeks.vega, 6), np.nan),
            "theta": np.where(quoted, np.round(greeks.theta, 6), np.nan),
            "rho": np.where(quoted, np.round(greeks.rho, 6), np.nan),
            "volume": rng.integers(0, 5000, size=strike.size), "open_interest": rng.integers(0, 90000, size=strike.size),
            "spot": round(spot, 2),
        }
        with self._lock:
            self._chains[day] = chain
        return chain

    def rows(self, symbol: str, days: list[dt.date]) -> list[dict]:
        """The rows served for ``symbol`` over ``days`` (JSON field names, yyyy-mm-dd dates)."""
        out = []
        if symbol not in self.symbols:
            return out
        for day in days:
            if day in self.no_data_dates:
                continue
            chain = self._chain(day)
            for i in range(chain["strike"].size):
                expiry = chain["expiration"][i]
                kind = "C" if chain["is_call"][i] else "P"
                strike = float(chain["strike"][i])

                def value(name):
                    number = float(chain[name][i])
                    return None if math.isnan(number) else number

                row = {"symbol": symbol, "exchange": "CBOE", "date": day.isoformat(),
                       "adjusted_close": round(chain["spot"] * ADJUSTMENT, 2),
                       "option_symbol": f"{symbol:<6}{expiry:%y%m%d}{kind}{int(round(strike * 1000)):08d}",
                       "expiration": expiry.isoformat(), "strike": strike, "call/put": kind, "style": "A",
                       "ask": float(chain["ask"][i]), "bid": float(chain["bid"][i]),
                       "mean_price": round((float(chain["ask"][i]) + float(chain["bid"][i])) / 2, 4),
                       "iv": float(chain["iv"][i]), "volume": int(chain["volume"][i]),
                       "open_interest": int(chain["open_interest"][i]), "stock_price_for_iv": chain["spot"], "*": "",
                       "delta": value("delta"), "vega": value("vega"), "gamma": value("gamma"),
                       "theta": value("theta"), "rho": value("rho"), "record_no": len(out) + 1}
                for name in self.drop_fields:
                    row.pop(name, None)
                out.append(row)
        return out

    def model_row(self, day, expiration, strike: float, kind: str) -> dict:
        """The row the fake serves for one contract (JSON names), or KeyError."""
        day = dt.date.fromisoformat(str(day))
        expiration = dt.date.fromisoformat(str(expiration))
        for row in self.rows(self.symbols[0], [day]):
            if row["expiration"] == expiration.isoformat() and row["strike"] == float(strike) and row["call/put"] == kind:
                return row
        raise KeyError((day, expiration, strike, kind))

    # ----- serving ---------------------------------------------------------------------------
    def _authorized(self, query: dict, headers) -> bool:
        return headers.get("apiKey") == self.api_key or query.get("apiKey") == self.api_key

    def _handle(self, path: str, query_text: str, headers) -> Reply | None:
        query = {k: v[-1] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
        with self._lock:
            self._requests.append((path, dict(query), headers.get("apiKey") is not None, "apiKey" in query))
            for entry in self._faults:
                fault, remaining = entry
                if remaining > 0 and path.startswith(fault.path):
                    entry[1] -= 1
                    self._faults = [e for e in self._faults if e[1] > 0]
                    return self._fault_reply(fault)
        try:
            if path.startswith("/data/download/") and query.get("token"):
                job = path.rsplit("/", 1)[-1].split(".")[0]
                with self._lock:
                    valid = job in self._jobs and self._jobs[job]["token"] == query["token"]
                return self._download(job) if valid else _json(403, {"message": "bad token"})
            if not self._authorized(query, headers):
                return _json(401, {"message": "Unauthorized: missing or invalid apiKey"})
            if path.startswith("/data/link/"):
                job = path.rsplit("/", 1)[-1]
                with self._lock:
                    token = self._jobs[job]["token"]
                port = self._server.server_address[1]
                return Reply(302, b"", "text/plain",
                              {"Location": f"http://localhost:{port}/data/download/{job}.csv.gz?token={token}"})
            if path == "/equities/eod/options-rawiv":
                return self._options_rawiv(query)
            if path.startswith("/data/info/"):
                return self._info(path.rsplit("/", 1)[-1])
            if path.startswith("/data/download/"):
                return self._download(path.rsplit("/", 1)[-1].split(".")[0])
            return _json(404, {"message": f"no endpoint {path}"})
        except Exception as error:  # noqa: BLE001 - a fake must answer, and the test must see why
            import traceback

            self.server_errors.append(traceback.format_exc())
            return _json(500, {"message": f"fake error: {error}"})

    @staticmethod
    def _fault_reply(fault: Fault) -> Reply | None:
        if fault.kind == "drop":
            return None
        if fault.kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return Reply(429, json.dumps({"message": "Too many requests"}).encode(), headers=headers)
        if fault.kind == "502":
            return Reply(502, _HTML_502, "text/html")
        return _json(int(fault.kind), {"message": "Internal server error"})

    def _options_rawiv(self, query: dict) -> Reply:
        symbol = query.get("symbol", "").strip().upper()
        try:
            if "date" in query:
                first = last = dt.date.fromisoformat(query["date"])
            elif "from" in query and "to" in query:
                first, last = dt.date.fromisoformat(query["from"]), dt.date.fromisoformat(query["to"])
            else:
                raise ValueError("date or from/to")
        except ValueError:
            return _json(400, {"message": "Parameters are not valid: give symbol and date, or from and to (yyyy-mm-dd)"})
        if not symbol:
            return _json(400, {"message": "Parameters are not valid: symbol is required"})
        rows = self.rows(symbol, _sessions(first, last))
        with self._lock:
            self.queries_left = max(0, self.queries_left - 1)
            left = self.queries_left
        if not rows:
            return Reply(204)
        if len(rows) <= self.inline_limit:
            return _json(200, {"status": {"executionTime": 12, "recordsFound": len(rows), "code": "DONE",
                                          "urlForDetails": None, "queriesLeftEOD": left},
                               "query": {"requestUUID": None}, "data": rows})
        job = str(uuid.uuid4())
        with self._lock:
            self._jobs[job] = {"rows": rows, "polls": 0, "token": uuid.uuid4().hex}
        details = f"/data/info/{job}" if self.relative_details else f"{self.url}/data/info/{job}"
        return _json(200, {"status": {"executionTime": 40, "recordsFound": len(rows), "code": "PENDING",
                                      "urlForDetails": details, "queriesLeftEOD": left},
                           "query": {"requestUUID": job}, "data": []})

    def _info(self, job: str) -> Reply:
        with self._lock:
            entry = self._jobs.get(job)
            if entry is None:
                return _json(404, {"message": "no such request"})
            entry["polls"] += 1
            ready = entry["polls"] > self.pending_polls
        if not ready:
            return _json(200, [{"meta": {"status": "PENDING", "requestUUID": job}, "data": []}])
        link = f"{self.url}/data/link/{job}" if self.redirect_downloads else f"{self.url}/data/download/{job}.csv.gz"
        return _json(200, [{"meta": {"status": "COMPLETE", "requestUUID": job},
                            "data": [{"urlForDownload": link,
                                      "fileSize": len(entry["rows"]) * 120}]}])

    def _download(self, job: str) -> Reply:
        with self._lock:
            entry = self._jobs.get(job)
        if entry is None:
            return _json(404, {"message": "no such file"})
        buffer = io.StringIO()
        names = [f for f, j in zip(FILE_FIELDS, JSON_FIELDS) if j not in self.drop_fields]
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        for row in entry["rows"]:
            values = []
            for name, json_name in zip(FILE_FIELDS, JSON_FIELDS):
                if json_name in self.drop_fields:
                    continue
                value = row[json_name]
                if json_name in ("date", "expiration"):
                    value = dt.date.fromisoformat(value).strftime("%m/%d/%Y")
                values.append("" if value is None else value)
            writer.writerow(values)
        return Reply(200, gzip.compress(buffer.getvalue().encode()), "application/octet-stream")
