"""Alpaca stock bars to local CSV files, one file per symbol and calendar month, resumable.

    python data_factory/download_alpaca_matched.py --symbols SPY,QQQ --start 2024-01-01 --end 2025-12-31
    python data_factory/download_alpaca_matched.py --symbols SPY --start 2025-06-01 --end 2025-06-30 \
        --minutes 5 --feed sip --out data/alpaca_bars --credentials ~/.config/condorbrain/alpaca.json

What is written (``download_stock_bars``)
    ``{out}/{SYMBOL}_{minutes}min_{YYYY-MM}.csv``: the bars whose START time falls in that month
    (New York time, so an evening session never straddles two files) and in ``--start … --end``,
    with the columns ``symbol, timestamp, open, high, low, close, volume, trade_count, vwap``;
    ``timestamp`` is the bar's START in RFC 3339 UTC (``2025-03-03T14:30:00Z``), as Alpaca stamps
    it. This is the ``stock_bars`` format of ``data_factory.vendor_formats`` (which restamps each bar
    at its close: start + width), so ``python core/main.py --mode ingest --input OUT`` loads it.
    **Every bar Alpaca returns is kept: pre-market (from 04:00 ET), the regular session and
    after-hours (to 20:00 ET).** Alpaca only has a bar for an interval with a trade on the chosen
    feed, so quiet minutes are missing (IEX, the free feed, carries a few percent of the volume and
    misses many extended-hours minutes); nothing is filled in. Prices are split-adjusted by default
    (``adjustment``; the live feed ``data_factory.alpaca_feed`` asks for the same).
    ``intelligence/train_mamba.py --save-only`` keeps the regular session only
    (``write_training_csv``).

Resuming
    Each month is fetched whole (every page) into memory, written to a hidden temporary file and
    renamed into place, and only then recorded in ``{out}/.manifest.json`` (symbol, month, the dates
    covered, rows, bytes, feed, minutes, adjustment; hidden so that the folder holds nothing but
    bar files and ``--mode ingest --input OUT`` reads it whole). A rerun skips every month the manifest records
    as complete, covering the requested dates, whose file is still there with the recorded size; an
    interrupted run therefore loses at most the month it was fetching, and leaves no partial file
    (a file renamed into place but not yet in the manifest is fetched again). The month under way
    (its last requested day is not over yet) is written but recorded as incomplete, so every run
    fetches it again. A folder holds ONE feed and adjustment: asking for another is refused with a
    message instead of mixing them (bar widths can share a folder: the width is in the file name).
    One download per folder at a time.

Requests (``/v2/stocks/bars`` through alpaca-py's ``StockHistoricalDataClient``, ``raw_data``)
    One symbol per request, pages of up to 10,000 bars followed here (a 1-minute month of SPY with
    extended hours is two or three pages), so a failed page is retried alone. alpaca-py's own
    retry (fixed 3 s, 429/504 only, rate-limit headers ignored) is switched off; instead a 429 waits
    for ``Retry-After`` (seconds or an HTTP date) or ``X-Ratelimit-Reset`` (epoch seconds), at most
    ``max_wait`` seconds, and a 5xx, a timeout or a dropped connection waits ``backoff``·2^k
    seconds; after ``retries`` retries of one page the download stops with a ``DataError`` naming the
    symbol and the month (the months already saved stay). Any other HTTP error stops at once: 401
    (keys) and 403 (plan) as a ``DownloadSettingsError``, others (422 bad request) as a DataError. Every request has ``request_timeout`` seconds.
    With ``feed="sip"`` the end is kept 15 minutes before now (the free plan refuses recent SIP data).

Exit status of the CLI: 0 done; 1 a download failed (rerun to resume); 2 bad arguments, no keys, a
malformed endpoint override, or a folder holding other settings; 130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python data_factory/download_alpaca_matched.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import email.utils  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data_factory.alpaca_access import (DATA_URL, DATA_URL_ENV, TRADING_URL_ENV, AccessSetupError,  # noqa: E402
                                        Credentials, Endpoints, describe_api_error, endpoints_from_env,
                                        load_credentials, timeout_session)
from data_factory.errors import DataError  # noqa: E402
from data_factory.market_calendar import EXCHANGE_TZ, session_bounds, trading_sessions  # noqa: E402

# Bar widths asked of Alpaca: whole divisors of an hour (bars stay clock-aligned) and the hour.
MINUTES = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)
# Widths that also divide the 09:30 open, so regular-session bars tile the session exactly.
SESSION_MINUTES = tuple(m for m in MINUTES if 30 % m == 0)
FEEDS = ("iex", "sip")
ADJUSTMENTS = ("raw", "split", "dividend", "all")
COLUMNS = ("symbol", "timestamp", "open", "high", "low", "close", "volume", "trade_count", "vwap")
# Hidden, like the temporary files: `core/main.py --mode ingest --input OUT` reads every visible
# file of a folder as a vendor file (data_factory.chain_store._input_files) and would stop at it.
MANIFEST = ".manifest.json"
MANIFEST_FORMAT = "condorbrain.alpaca_bars/1"
PAGE_LIMIT = 10_000                 # Alpaca's maximum page
SIP_DELAY = pd.Timedelta(minutes=15)
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class DownloadSettingsError(AccessSetupError):
    """The request cannot run as given (dates, widths, a folder holding other settings): exit 2."""


@dataclasses.dataclass(frozen=True)
class RetrySettings:
    retries: int = 5             # retries of one page after 429 / 5xx / timeouts (6 requests in all)
    backoff: float = 1.0         # seconds before the first retry of a 5xx / timeout, doubled each time
    max_wait: float = 60.0       # no single wait is longer (a later rate-limit reset is retried early)


@dataclasses.dataclass(frozen=True)
class _Month:
    symbol: str
    month: str                   # YYYY-MM
    first: dt.date               # requested days inside the month
    last: dt.date

    @property
    def label(self) -> str:
        return f"{self.symbol} {self.month}"


# ----------------------------------------------------------------------------------------------
# The download

def download_stock_bars(credentials: Credentials, endpoints: Endpoints, symbols: Iterable[str], start, end,
                        minutes: int, out_dir, feed: str = "iex", progress=None, request_timeout: float = 30.0,
                        *, adjustment: str = "split", retry: RetrySettings = RetrySettings(), now=None,
                        sleep: Callable[[float], None] = time.sleep, page_limit: int = PAGE_LIMIT) -> dict:
    """Download ``minutes``-minute bars of ``symbols`` for the days ``start … end`` (New York
    dates, inclusive) into ``out_dir``, one CSV per symbol and month (module docstring: format,
    extended hours, resuming, retries). Months already complete on disk are not fetched again.

    ``progress``: None (silent), True (a rich progress bar over the months on stderr), or a callable
    given one dict per event: ``{"event": "page", "symbol", "month", "rows"}`` after each page and
    ``{"event": "month", "symbol", "month", "rows", "status", "path"}`` after each month
    (status ``fetched``, ``in_progress`` or ``skipped``). ``now``: the current time (default the
    clock), which decides the month under way. ``sleep``: replaceable for tests.

    Returns a summary: ``files`` (every month file of the request, in symbol then month order),
    ``months``, ``fetched``, ``skipped``, ``in_progress``, ``rows`` (rows fetched by this run),
    ``rows_on_disk``, ``requests``, ``retries``, ``waited_s``, ``seconds``, ``rows_per_s``, and the
    settings. Raises DownloadSettingsError for bad arguments or a folder with other settings (before
    any request) and for a 401/403 answer; DataError when a request fails for good (naming the
    symbol and month)."""
    symbols = _checked_symbols(symbols)
    minutes = _checked_minutes(minutes)
    if feed not in FEEDS:
        raise DownloadSettingsError(f"feed {feed!r}: use one of {', '.join(FEEDS)}")
    if adjustment not in ADJUSTMENTS:
        raise DownloadSettingsError(f"adjustment {adjustment!r}: use one of {', '.join(ADJUSTMENTS)}")
    if not 1 <= int(page_limit) <= PAGE_LIMIT:
        raise DownloadSettingsError(f"page_limit {page_limit}: use 1 … {PAGE_LIMIT}")
    now = pd.Timestamp.now(tz="UTC") if now is None else _aware(now, "now").tz_convert("UTC")
    first_day, last_day = _checked_dates(start, end)
    today = now.tz_convert(EXCHANGE_TZ).date()
    if first_day > today:
        raise DownloadSettingsError(f"start {first_day} is after today ({today}, New York): no bars yet")
    last_day = min(last_day, today)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out, feed, adjustment)
    months = [m for symbol in symbols for m in _months(symbol, first_day, last_day)]

    client = _data_client(credentials, endpoints, request_timeout)
    stats = {"requests": 0, "retries": 0, "waited_s": 0.0}
    summary = {"out_dir": str(out), "symbols": list(symbols), "start": str(first_day), "end": str(last_day),
               "minutes": minutes, "feed": feed, "adjustment": adjustment, "months": len(months),
               "fetched": 0, "skipped": 0, "in_progress": 0, "rows": 0, "rows_on_disk": 0, "files": []}
    report, finish = _progress(progress, len(months))
    began = time.perf_counter()
    fetch_seconds = 0.0
    try:
        for month in months:
            name = f"{month.symbol}_{minutes}min_{month.month}.csv"
            path = out / name
            entry = manifest["files"].get(name)
            if _up_to_date(entry, path, month):
                summary["skipped"] += 1
                summary["rows_on_disk"] += int(entry["rows"])
                summary["files"].append(str(path))
                report({"event": "month", "symbol": month.symbol, "month": month.month, "rows": int(entry["rows"]),
                        "status": "skipped", "path": str(path)})
                continue
            # A wider earlier request of this month is never narrowed by a later one.
            try:
                if entry and entry.get("minutes") == minutes:
                    month = dataclasses.replace(month, first=min(month.first, dt.date.fromisoformat(entry["from"])),
                                                last=max(month.last, dt.date.fromisoformat(entry["to"])))
            except (KeyError, TypeError, ValueError):
                pass                            # an entry that does not read: fetch what was asked
            t0 = time.perf_counter()
            frame, complete = _fetch_month(client, month, minutes, feed, adjustment, now, retry, sleep, stats,
                                           report, int(page_limit))
            size = _write_csv_atomic(frame, path)
            fetch_seconds += time.perf_counter() - t0
            manifest["files"][name] = {
                "symbol": month.symbol, "month": month.month, "minutes": minutes, "feed": feed,
                "adjustment": adjustment, "from": str(month.first), "to": str(month.last), "rows": len(frame),
                "bytes": size, "complete": complete,
                "first_bar": frame["timestamp"].iloc[0] if len(frame) else None,
                "last_bar": frame["timestamp"].iloc[-1] if len(frame) else None,
                "fetched_at": now.strftime(STAMP_FORMAT)}
            _write_manifest(out, manifest)
            summary["fetched" if complete else "in_progress"] += 1
            summary["rows"] += len(frame)
            summary["rows_on_disk"] += len(frame)
            summary["files"].append(str(path))
            report({"event": "month", "symbol": month.symbol, "month": month.month, "rows": len(frame),
                    "status": "fetched" if complete else "in_progress", "path": str(path)})
    finally:
        finish()
    summary.update(stats)
    summary["seconds"] = time.perf_counter() - began
    summary["rows_per_s"] = summary["rows"] / fetch_seconds if fetch_seconds > 0 else 0.0
    return summary


def _fetch_month(client, month: _Month, minutes: int, feed: str, adjustment: str, now: pd.Timestamp,
                 retry: RetrySettings, sleep, stats: dict, report, page_limit: int) -> tuple[pd.DataFrame, bool]:
    """Every bar of ``month`` (all pages) as a frame of ``COLUMNS``, and whether the month is
    complete (its last requested day is over)."""
    from alpaca.data.enums import Adjustment, DataFeed
    from alpaca.data.requests import StockBarsRequest
    from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

    start = pd.Timestamp(month.first, tz=EXCHANGE_TZ).tz_convert("UTC")
    day_after = pd.Timestamp(month.last + dt.timedelta(days=1), tz=EXCHANGE_TZ).tz_convert("UTC")
    complete = day_after <= now
    latest = now - SIP_DELAY if feed == "sip" else now
    end = min(day_after - pd.Timedelta(seconds=1), latest)
    if end < start:                    # SIP: the month began less than 15 minutes ago
        return _rows_frame(month.symbol, []), complete
    timeframe = TimeFrame(1, TimeFrameUnit.Hour) if minutes == 60 else TimeFrame(minutes, TimeFrameUnit.Minute)
    request = StockBarsRequest(symbol_or_symbols=month.symbol, timeframe=timeframe, start=start.to_pydatetime(),
                               end=end.to_pydatetime(), feed=DataFeed(feed), adjustment=Adjustment(adjustment))
    params = request.to_request_fields()
    params.update(timeframe=str(timeframe), feed=feed, adjustment=adjustment)
    params["limit"] = page_limit
    what = f"{month.label} ({minutes}-minute bars, feed {feed})"
    items: list = []
    seen_tokens: set = set()
    token = None
    while True:
        params["page_token"] = token
        response = _get_page(client, params, what, retry, sleep, stats)
        if not isinstance(response, dict) or "bars" not in response:
            raise DataError(f"{what}: the response has no 'bars' ({_short(response)}); months already saved are "
                            f"kept, rerun to resume")
        page = (response.get("bars") or {}).get(month.symbol) or []
        items.extend(page)
        report({"event": "page", "symbol": month.symbol, "month": month.month, "rows": len(page)})
        token = response.get("next_page_token")
        if not token:
            break
        if token in seen_tokens:
            raise DataError(f"{what}: the server repeated page token {token!r}; stopped instead of looping")
        seen_tokens.add(token)
    frame = _rows_frame(month.symbol, items, what)
    if len(frame):
        stamps = pd.to_datetime(frame["timestamp"], utc=True, format=STAMP_FORMAT)
        outside = (stamps < start) | (stamps > end)
        if outside.any():
            raise DataError(f"{what}: the server sent a bar outside {start} … {end} "
                            f"({frame['timestamp'][outside.to_numpy()].iloc[0]})")
    return frame, complete


def _get_page(client, params: dict, what: str, retry: RetrySettings, sleep, stats: dict) -> dict:
    """One page of bars, retried after 429 / 5xx / timeouts / dropped connections (module docstring)."""
    import requests
    from alpaca.common.exceptions import APIError

    attempt = 0
    while True:
        stats["requests"] += 1
        error = None
        try:
            return client.get("/stocks/bars", dict(params))
        except APIError as exc:
            status, code, message = describe_api_error(exc)
            if status in (401, 403):           # the keys or the plan: no rerun will fix it
                hint = "check the API keys" if status == 401 else "the plan may not include this feed or period"
                raise DownloadSettingsError(f"{what}: HTTP {status}: {message} ({hint})") from None
            if not (status == 429 or (status is not None and status >= 500)):
                raise DataError(f"{what}: HTTP {status}: {message}") from None
            reason, error = f"HTTP {status}: {message}", exc
        except requests.Timeout:
            reason = "timed out"
        except requests.ConnectionError as exc:
            reason = f"connection failed ({_short(exc, 100)})"
        except ValueError as exc:              # a 200 whose body is not JSON
            reason = f"unreadable response ({_short(exc, 100)})"
        if attempt >= retry.retries:
            raise DataError(f"{what}: gave up after {attempt + 1} attempts ({reason}); months already saved are "
                            f"kept, rerun the same command to resume") from None
        wait = retry_wait(error, attempt, retry)
        stats["retries"] += 1
        stats["waited_s"] += wait
        sleep(wait)
        attempt += 1


def retry_wait(error, attempt: int, retry: RetrySettings = RetrySettings(), clock: Callable[[], float] = time.time
               ) -> float:
    """Seconds before retry ``attempt + 1``: a 429's ``Retry-After`` (seconds or an HTTP date) or
    ``X-Ratelimit-Reset`` (epoch seconds) when it has one, else ``backoff``·2^attempt; never more
    than ``max_wait``, never negative."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    status = getattr(response, "status_code", None)
    wait = None
    if status == 429:
        after = headers.get("Retry-After")
        reset = headers.get("X-Ratelimit-Reset")
        if after:
            try:
                wait = float(after)
            except ValueError:
                try:
                    wait = email.utils.parsedate_to_datetime(after).timestamp() - clock()
                except (TypeError, ValueError):
                    wait = None
        elif reset:
            try:
                wait = float(reset) - clock()
            except ValueError:
                wait = None
    if wait is None or not np.isfinite(wait):
        wait = retry.backoff * (2 ** attempt)
    return float(min(max(wait, 0.0), retry.max_wait))


# ----------------------------------------------------------------------------------------------
# Files and the manifest

def _rows_frame(symbol: str, items: list, what: str = "") -> pd.DataFrame:
    """Raw bars {t, o, h, l, c, v, n, vw} as ``COLUMNS``, sorted by time, duplicates dropped."""
    if not items:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("symbol", "timestamp") else float) for c in COLUMNS})
    try:
        stamps = pd.to_datetime([item["t"] for item in items], utc=True, format="ISO8601")
        values = np.array([[item["o"], item["h"], item["l"], item["c"], item["v"]] for item in items], dtype=float)
        extra = [(item.get("n"), item.get("vw")) for item in items]
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{what}: a bar could not be read ({_short(error, 120)})") from None
    frame = pd.DataFrame({"stamp": stamps, "open": values[:, 0], "high": values[:, 1], "low": values[:, 2],
                          "close": values[:, 3], "volume": values[:, 4],
                          "trade_count": pd.array([n for n, _ in extra], dtype="Int64"),
                          "vwap": pd.array([v for _, v in extra], dtype="Float64")})
    frame = frame.drop_duplicates("stamp", keep="last").sort_values("stamp", kind="stable").reset_index(drop=True)
    if np.all(frame["volume"].to_numpy() == np.round(frame["volume"].to_numpy())):
        frame["volume"] = frame["volume"].astype("int64")
    frame.insert(0, "timestamp", frame.pop("stamp").dt.strftime(STAMP_FORMAT))
    frame.insert(0, "symbol", symbol)
    return frame[list(COLUMNS)]


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> int:
    """``frame`` to ``path`` through a hidden temporary file renamed into place; its size."""
    temporary = path.with_name(f".{path.name}.part")
    try:
        with open(temporary, "w", newline="") as handle:
            frame.to_csv(handle, index=False, lineterminator="\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path.stat().st_size


def _read_manifest(out: Path, feed: str, adjustment: str) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "feed": feed, "adjustment": adjustment, "columns": list(COLUMNS),
                "files": {}}
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(manifest.get("format"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DownloadSettingsError(f"{path}: not a manifest this downloader wrote ({type(error).__name__}); "
                                    f"use another folder, or delete the folder to start over") from None
    for setting, wanted in (("feed", feed), ("adjustment", adjustment)):
        if manifest.get(setting) != wanted:
            raise DownloadSettingsError(
                f"{out} holds bars downloaded with {setting} {manifest.get(setting)!r}, this run asks for "
                f"{wanted!r}; refusing to mix them: use another --out folder (or the same --{setting})")
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    temporary = path.with_name(f".{MANIFEST}.part")
    try:
        temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _up_to_date(entry: dict | None, path: Path, month: _Month) -> bool:
    """The manifest says the month is complete for (at least) the requested days, and the file is
    there with the recorded size."""
    if not entry or not entry.get("complete"):
        return False
    try:
        covered = dt.date.fromisoformat(entry["from"]) <= month.first and month.last <= dt.date.fromisoformat(entry["to"])
        return covered and path.is_file() and path.stat().st_size == int(entry["bytes"])
    except (KeyError, TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# The training file (intelligence/train_mamba.py --save-only)

def write_training_csv(files: Iterable, minutes: int, save_path, first_day=None, last_day=None) -> dict:
    """One ``--local-data`` CSV (``intelligence.mamba_data.load_local_bars``) from month files of
    ONE symbol: regular-session bars only (start ≥ the session's open, start + width ≤ its close,
    13:00 on early closes) of the sessions ``first_day … last_day`` (default: all), ``timestamp`` =
    the bar's CLOSE, tz-aware, written in UTC (``2025-03-03T14:45:00+00:00``), then open, high,
    low, close, volume. Written through a temporary file. Returns rows, first, last, sessions,
    dropped (extended-hours bars left out)."""
    minutes = _checked_minutes(minutes)
    frames = [pd.read_csv(path, dtype={"symbol": str, "timestamp": str}) for path in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise DataError("no bars were downloaded for the training file (is the period a trading period?)")
    bars = pd.concat(frames, ignore_index=True)
    symbols = sorted(set(bars["symbol"]))
    if len(symbols) != 1:
        raise DataError(f"the training file takes one symbol, got {', '.join(symbols)}")
    starts = pd.DatetimeIndex(pd.to_datetime(bars["timestamp"], utc=True, format="ISO8601")).tz_convert(EXCHANGE_TZ)
    days = starts.tz_localize(None).normalize()
    bounds = session_bounds(trading_sessions(days.min(), days.max()))
    opens = bounds["open"].reindex(days)
    closes = bounds["close"].reindex(days)
    width = pd.Timedelta(minutes=minutes)
    keep = (opens.notna().to_numpy() & (starts >= pd.DatetimeIndex(opens))
            & (starts + width <= pd.DatetimeIndex(closes)))
    dropped = int((~keep).sum())
    if first_day is not None:
        keep &= days >= pd.Timestamp(_date(first_day, "first_day"))
    if last_day is not None:
        keep &= days <= pd.Timestamp(_date(last_day, "last_day"))
    regular = bars.loc[keep].copy()
    if regular.empty:
        raise DataError("none of the downloaded bars lies inside a regular session")
    close_time = (starts[keep] + width)
    out = pd.DataFrame({"timestamp": close_time, "open": regular["open"].to_numpy(float),
                        "high": regular["high"].to_numpy(float), "low": regular["low"].to_numpy(float),
                        "close": regular["close"].to_numpy(float), "volume": regular["volume"].to_numpy(float)})
    out = out.drop_duplicates("timestamp", keep="last").sort_values("timestamp").reset_index(drop=True)
    if np.all(out["volume"].to_numpy() == np.round(out["volume"].to_numpy())):
        out["volume"] = out["volume"].astype("int64")
    # In UTC ("…+00:00"): one offset for the whole file (load_local_bars converts to New York time;
    # pandas refuses a column whose offsets change at a DST switch).
    out["timestamp"] = pd.DatetimeIndex(out["timestamp"]).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S+00:00")
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = _write_csv_atomic(out, path)
    return {"path": str(path), "symbol": symbols[0], "rows": len(out), "bytes": size,
            "first": out["timestamp"].iloc[0], "last": out["timestamp"].iloc[-1],
            "sessions": int(pd.Index(days[keep]).nunique()), "dropped": dropped}


def save_training_data(credentials: Credentials, endpoints: Endpoints, symbol: str = "SPY", years: float = 2.0,
                       minutes: int = 15, save_path="data/spy_training_data.csv", cache_dir=None, feed: str = "iex",
                       end=None, progress=None, now=None, **download_options) -> dict:
    """The last ``years`` years (to ``end``, default today) of ``symbol``'s bars downloaded to
    ``cache_dir`` (default ``data/alpaca_bars/<feed>``; resumable like any download), then ONE
    training CSV at ``save_path`` (``write_training_csv``). Returns the training file's summary
    with the download's under ``download``."""
    minutes = int(minutes)
    if minutes not in SESSION_MINUTES:
        raise DownloadSettingsError(f"--minutes {minutes}: the training file needs bars that tile the session "
                                    f"from its 09:30 open: one of {', '.join(map(str, SESSION_MINUTES))}")
    if not (np.isfinite(years) and years > 0):
        raise DownloadSettingsError(f"--years {years}: give a positive number of years")
    clock = pd.Timestamp.now(tz="UTC") if now is None else _aware(now, "now")
    last = (_date(end, "--end-date") if end is not None else clock.tz_convert(EXCHANGE_TZ).date())
    first = (pd.Timestamp(last) - pd.DateOffset(days=round(365.25 * float(years)))).date()
    cache = Path(cache_dir) if cache_dir is not None else Path("data/alpaca_bars") / feed
    download = download_stock_bars(credentials, endpoints, [symbol], first, last, minutes, cache, feed=feed,
                                   progress=progress, now=now, **download_options)
    result = write_training_csv(download["files"], minutes, save_path, first, last)
    result["download"] = download
    return result


# ----------------------------------------------------------------------------------------------
# Helpers

def data_endpoints(environ: Mapping[str, str] = os.environ) -> Endpoints:
    """The market-data origin (``APCA_API_DATA_URL`` when set, validated like every override).
    The trading URL is not used by a download, so ``APCA_API_BASE_URL`` is not looked at (a
    live-money trading URL is not a reason to refuse one)."""
    return endpoints_from_env({k: v for k, v in environ.items() if k != TRADING_URL_ENV})


def _data_client(credentials: Credentials, endpoints: Endpoints, request_timeout: float):
    from alpaca.data.historical.stock import StockHistoricalDataClient

    # Never an empty override (reference §11.1): None for Alpaca's own data URL.
    override = None if endpoints.data_url == DATA_URL else endpoints.data_url
    if override is not None and not override.strip():
        raise DownloadSettingsError(f"{DATA_URL_ENV} is empty")
    client = StockHistoricalDataClient(credentials.key_id, credentials.secret_key, url_override=override,
                                       raw_data=True)
    # alpaca-py has no timeout and a fixed-wait retry that ignores the rate-limit headers (§8):
    # a session with a timeout, and its own retry off (``_get_page`` retries).
    client._session = timeout_session(float(request_timeout))
    client._retry = 0
    return client


def _months(symbol: str, first: dt.date, last: dt.date) -> list[_Month]:
    out = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        month_first = dt.date(year, month, 1)
        next_first = dt.date(year + (month == 12), month % 12 + 1, 1)
        out.append(_Month(symbol, f"{year:04d}-{month:02d}", max(first, month_first),
                          min(last, next_first - dt.timedelta(days=1))))
        year, month = next_first.year, next_first.month
    return out


def _checked_symbols(symbols) -> list[str]:
    if isinstance(symbols, str):
        symbols = symbols.split(",")
    out = list(dict.fromkeys(s.strip().upper() for s in symbols if s and s.strip()))
    if not out:
        raise DownloadSettingsError("no symbols: give e.g. --symbols SPY,QQQ")
    for symbol in out:
        if not symbol.replace(".", "").replace("/", "").isalnum() or len(symbol) > 10:
            raise DownloadSettingsError(f"symbol {symbol!r}: expected a ticker such as SPY")
    return out


def _checked_minutes(minutes) -> int:
    try:
        value = int(minutes)
    except (TypeError, ValueError):
        value = None
    if value is None or value != minutes or value not in MINUTES:
        raise DownloadSettingsError(f"--minutes {minutes}: use one of {', '.join(map(str, MINUTES))}")
    return value


def _checked_dates(start, end) -> tuple[dt.date, dt.date]:
    first, last = _date(start, "--start"), _date(end, "--end")
    if first > last:
        raise DownloadSettingsError(f"--start {first} is after --end {last}")
    return first, last


def _date(value, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise DownloadSettingsError(f"{name} {value!r}: expected a date YYYY-MM-DD") from None


def _aware(value, name: str) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        raise ValueError(f"{name} must be tz-aware, got {value!r}")
    return stamp


def _short(value, limit: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _progress(progress, total: int):
    """(report(event), finish()) for ``progress`` (None, True or a callable)."""
    if progress is None or progress is False:
        return (lambda event: None), (lambda: None)
    if callable(progress):
        return progress, (lambda: None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rows]:>10,} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True))
    task = bar.add_task("months", total=total, rows=0)
    bar.start()
    rows = [0]

    def report(event: dict) -> None:
        if event["event"] == "page":
            rows[0] += event["rows"]
            bar.update(task, description=f"{event['symbol']} {event['month']}", rows=rows[0])
        else:
            if event["status"] == "skipped":
                rows[0] += event["rows"]
            bar.update(task, advance=1, description=f"{event['symbol']} {event['month']}", rows=rows[0])

    return report, bar.stop


# ----------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="download_alpaca_matched",
        description="Download Alpaca stock bars into one CSV per symbol and month (resumable; extended "
                    "hours included). Keys: APCA_API_KEY_ID / APCA_API_SECRET_KEY or --credentials.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--symbols", required=True, help="comma-separated tickers, e.g. SPY,QQQ")
    p.add_argument("--start", required=True, help="first day, YYYY-MM-DD (New York)")
    p.add_argument("--end", required=True, help="last day, YYYY-MM-DD (inclusive; clipped to today)")
    p.add_argument("--minutes", type=int, default=1, help=f"bar width: one of {', '.join(map(str, MINUTES))}")
    p.add_argument("--feed", choices=FEEDS, default="iex", help="iex (free) or sip (paid plan)")
    p.add_argument("--adjustment", choices=ADJUSTMENTS, default="split")
    p.add_argument("--out", default="data/alpaca_bars", help="folder of the month files and manifest.json")
    p.add_argument("--credentials", metavar="FILE", default=None,
                   help='JSON {"key_id": …, "secret_key": …} outside the repository (default '
                        '~/.config/condorbrain/alpaca.json; the environment variables come first)')
    p.add_argument("--retries", type=int, default=RetrySettings.retries,
                   help="retries of one page after a 429, 5xx or timeout before giving up")
    p.add_argument("--backoff", type=float, default=RetrySettings.backoff,
                   help="seconds before the first retry after a 5xx or timeout (doubled each time)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.retries < 0 or not (args.backoff >= 0) or not (args.timeout > 0):
            raise DownloadSettingsError("--retries and --backoff must be >= 0 and --timeout > 0")
        endpoints = data_endpoints()
        credentials = load_credentials(path=args.credentials)
        summary = download_stock_bars(
            credentials, endpoints, args.symbols, args.start, args.end, args.minutes, args.out, feed=args.feed,
            progress=not args.no_progress, request_timeout=args.timeout, adjustment=args.adjustment,
            retry=RetrySettings(retries=args.retries, backoff=args.backoff))
    except AccessSetupError as error:
        print(f"download_alpaca_matched: error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"download_alpaca_matched: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download_alpaca_matched: interrupted; the months written so far are kept, rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    print(describe_summary(summary))
    return 0


def describe_summary(summary: dict) -> str:
    return (f"{','.join(summary['symbols'])} {summary['minutes']}-minute bars ({summary['feed']}, "
            f"{summary['adjustment']}-adjusted) {summary['start']} … {summary['end']}: {summary['months']} month "
            f"files in {summary['out_dir']} ({summary['fetched']} fetched, {summary['in_progress']} in progress, "
            f"{summary['skipped']} already complete); {summary['rows']:,} bars fetched in {summary['requests']} "
            f"requests ({summary['retries']} retries, {summary['waited_s']:.1f} s waited), "
            f"{summary['rows_per_s']:,.0f} bars/s; {summary['rows_on_disk']:,} bars on disk")


if __name__ == "__main__":
    sys.exit(main())
