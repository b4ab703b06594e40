"""data_factory/download_alpaca_matched.py (and ``train_mamba --save-only``) against the local
imitation of Alpaca (tests/alpaca_fake.py): month files whose rows are the bars alpaca-py itself
reads from the server, stamped at their start and restamped at their close by the ingest reader;
resuming (no request for a complete month, the month under way fetched again); interruptions (a
failed request, Ctrl-C, a killed process) that leave no partial month and a rerun that ends with
the same files as an uninterrupted download; rate limits waited out; the CLI's errors."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.requests import StockBarsRequest
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

from core.broker import Credentials, Endpoints
from data_factory import download_alpaca_matched as dl
from data_factory.errors import DataError
from data_factory.market_calendar import session_bounds, trading_sessions
from tests.alpaca_fake import FakeAlpaca, Fault

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_factory" / "download_alpaca_matched.py"
NY = "America/New_York"
NOW = "2026-11-30 17:00"                 # a Monday after the close; November is still under way
KEYS = Credentials("test-key", "test-secret")
START, END = "2026-09-15", "2026-11-30"
MONTHS = ("2026-09", "2026-10", "2026-11")
PAGE = 3000                              # small pages: a 1-minute month is three of them
NO_WAIT = dl.RetrySettings(retries=2, backoff=0.0)


def bar_requests(fake, since=0):
    return [r for r in fake.requests[since:] if r[1] == "/v2/stocks/bars"]


def session_minutes(first, last) -> int:
    """Regular-session minutes of the NYSE sessions first … last (early closes at 13:00)."""
    bounds = session_bounds(trading_sessions(first, last))
    return int(((bounds["close"] - bounds["open"]).dt.total_seconds() // 60).sum())


def read_month(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"symbol": str, "timestamp": str})


def sdk_bars(fake, symbol, start, end, minutes=1) -> pd.DataFrame:
    """The same bars as alpaca-py's own get_stock_bars (its paging) reads them from the fake."""
    client = StockHistoricalDataClient("test-key", "test-secret", url_override=fake.url, raw_data=True)
    request = StockBarsRequest(symbol_or_symbols=symbol, timeframe=TimeFrame(minutes, TimeFrameUnit.Minute),
                               start=pd.Timestamp(start, tz=NY).to_pydatetime(),
                               end=pd.Timestamp(end, tz=NY).to_pydatetime(), feed="iex", adjustment="split")
    rows = client.get_stock_bars(request)[symbol]
    return pd.DataFrame({"timestamp": [r["t"] for r in rows], "open": [r["o"] for r in rows],
                         "high": [r["h"] for r in rows], "low": [r["l"] for r in rows],
                         "close": [r["c"] for r in rows], "volume": [r["v"] for r in rows],
                         "trade_count": [r["n"] for r in rows], "vwap": [r["vw"] for r in rows]})


def download(fake, out, **kwargs):
    settings = dict(symbols=["SPY", "QQQ"], start=START, end=END, minutes=1, out_dir=out, now=fake.now,
                    page_limit=PAGE, retry=NO_WAIT)
    settings.update(kwargs)
    return dl.download_stock_bars(KEYS, Endpoints("http://unused.invalid", fake.url), **settings)


@pytest.fixture(scope="module")
def fake():
    with FakeAlpaca(now=NOW, spot=600.0, seed=3, history_days=70, stocks=("SPY", "QQQ")) as server:
        yield server


@pytest.fixture(scope="module")
def reference(fake, tmp_path_factory):
    """One uninterrupted download (SPY and QQQ, 2026-09-15 … 2026-11-30, 1-minute bars)."""
    out = tmp_path_factory.mktemp("reference")
    before = len(fake.requests)
    summary = download(fake, out)
    return {"out": out, "summary": summary, "requests": bar_requests(fake, before),
            "bytes": {p.name: p.read_bytes() for p in out.glob("*.csv")}}


# ----------------------------------------------------------------------------------------------
# Files

def test_one_file_per_symbol_and_month_with_every_bar_stamped_at_its_start(fake, reference):
    out, summary = reference["out"], reference["summary"]
    names = [f"{s}_1min_{m}.csv" for s in ("SPY", "QQQ") for m in MONTHS]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [".manifest.json"])
    assert [Path(f).name for f in summary["files"]] == names
    # Rows: one per regular-session minute of the requested days (the fake serves the regular
    # session only), 210 on the 13:00 close of 2026-11-27.
    expected = {"2026-09": session_minutes("2026-09-15", "2026-09-30"),
                "2026-10": session_minutes("2026-10-01", "2026-10-31"),
                "2026-11": session_minutes("2026-11-01", "2026-11-30")}
    assert expected["2026-11"] == 19 * 390 + 210
    for name in names:
        assert len(read_month(out / name)) == expected[name[-11:-4]]
    assert summary["rows"] == summary["rows_on_disk"] == 2 * sum(expected.values())
    assert (summary["months"], summary["fetched"], summary["in_progress"], summary["skipped"]) == (6, 4, 2, 0)
    # Pages of 3,000 bars (September's half month: 2, October and November: 3), no retries.
    pages = 2 * sum(math.ceil(rows / PAGE) for rows in expected.values())
    assert pages == 16 and summary["requests"] == len(reference["requests"]) == pages and summary["retries"] == 0

    spy = read_month(out / "SPY_1min_2026-10.csv")
    assert list(spy.columns) == list(dl.COLUMNS)
    assert set(spy["symbol"]) == {"SPY"}
    # Bar START in RFC 3339 UTC: 2026-10-01 09:30 New York (EDT) is 13:30Z; the last bar of the
    # month starts 15:59.
    assert spy["timestamp"].iloc[0] == "2026-10-01T13:30:00Z"
    assert spy["timestamp"].iloc[-1] == "2026-10-30T19:59:00Z"
    # Every value is what alpaca-py reads from the server for the same month.
    sdk = sdk_bars(fake, "SPY", "2026-10-01", "2026-10-31 23:59")
    pd.testing.assert_frame_equal(spy.drop(columns="symbol"), sdk, check_dtype=False)
    # Partial first month: nothing before the 15th; November ends with the 13:00 close of the 27th
    # and the full session of the 30th (New York after the DST change: 16:00 ET = 21:00Z).
    september = read_month(out / "SPY_1min_2026-09.csv")
    assert september["timestamp"].iloc[0] == "2026-09-15T13:30:00Z"
    november = read_month(out / "QQQ_1min_2026-11.csv")
    assert november["timestamp"].iloc[-1] == "2026-11-30T20:59:00Z"
    assert "2026-11-27T17:59:00Z" in set(november["timestamp"]) and "2026-11-27T18:00:00Z" not in set(november["timestamp"])
    qqq_sdk = sdk_bars(fake, "QQQ", "2026-11-01", "2026-11-30 23:59")
    pd.testing.assert_frame_equal(november.drop(columns="symbol"), qqq_sdk, check_dtype=False)

    manifest = json.loads((out / ".manifest.json").read_text())
    assert (manifest["feed"], manifest["adjustment"]) == ("iex", "split")
    entry = manifest["files"]["SPY_1min_2026-09.csv"]
    assert {k: entry[k] for k in ("symbol", "month", "minutes", "feed", "from", "to", "rows", "complete")} == {
        "symbol": "SPY", "month": "2026-09", "minutes": 1, "feed": "iex", "from": "2026-09-15", "to": "2026-09-30",
        "rows": expected["2026-09"], "complete": True}
    assert entry["bytes"] == (out / "SPY_1min_2026-09.csv").stat().st_size
    assert manifest["files"]["SPY_1min_2026-11.csv"]["complete"] is False      # under way at 2026-11-30 17:00


def test_the_ingest_reader_restamps_a_month_file_at_the_bar_close(reference):
    vendor_formats = pytest.importorskip("data_factory.vendor_formats")
    path = reference["out"] / "SPY_1min_2026-10.csv"
    table, report = vendor_formats.load_file(path, "stock_bars")
    frame = table.to_pandas()
    month = read_month(path)
    assert len(frame) == len(month) and report.rows_kept == len(month)
    assert set(frame["minutes"]) == {1} and set(frame["symbol"]) == {"SPY"}
    starts = pd.to_datetime(month["timestamp"], utc=True)
    assert (pd.DatetimeIndex(frame["time"]).tz_convert("UTC") == pd.DatetimeIndex(starts) + pd.Timedelta(minutes=1)).all()
    assert str(frame["time"].iloc[0]) == "2026-10-01 09:31:00-04:00"
    assert frame["close"].tolist() == month["close"].tolist()
    assert frame["volume"].tolist() == month["volume"].astype(float).tolist()


def test_ingest_loads_the_whole_folder_into_a_store(reference, tmp_path):
    chain_store = pytest.importorskip("data_factory.chain_store")
    summary = chain_store.ingest([reference["out"]], tmp_path / "store")
    assert summary.bar_rows == reference["summary"]["rows_on_disk"] and summary.chain_rows == 0
    assert sorted(Path(f["path"]).name for f in summary.files) == sorted(reference["bytes"])     # no manifest
    assert {f["format"] for f in summary.files} == {"stock_bars"}


def test_write_training_csv_keeps_regular_session_bars_stamped_at_their_close(tmp_path):
    md = pytest.importorskip("intelligence.mamba_data")
    # 15-minute bars: pre-market, the first and last regular bars, after-hours on a full day
    # (2026-11-25, EST); on the 13:00 early close of 2026-11-27 the 12:45 bar is the last one.
    starts = ["2026-11-25T13:00:00Z", "2026-11-25T14:30:00Z", "2026-11-25T20:45:00Z", "2026-11-25T21:00:00Z",
              "2026-11-27T17:45:00Z", "2026-11-27T18:00:00Z", "2026-11-28T15:00:00Z"]
    month = pd.DataFrame({"symbol": "SPY", "timestamp": starts, "open": [10.0, 11, 12, 13, 14, 15, 16],
                          "high": [10.5, 11.5, 12.5, 13.5, 14.5, 15.5, 16.5], "low": [9.5, 10.5, 11.5, 12.5, 13.5, 14.5, 15.5],
                          "close": [10.2, 11.2, 12.2, 13.2, 14.2, 15.2, 16.2], "volume": [1, 2, 3, 4, 5, 6, 7],
                          "trade_count": 1, "vwap": 10.0})
    path = tmp_path / "SPY_15min_2026-11.csv"
    month.to_csv(path, index=False)
    result = dl.write_training_csv([path], 15, tmp_path / "train.csv")
    assert (result["rows"], result["dropped"], result["sessions"]) == (3, 4, 2)
    bars, iv, description = md.load_local_bars(tmp_path / "train.csv")
    assert iv is None
    assert [str(t) for t in bars.index] == ["2026-11-25 09:45:00-05:00", "2026-11-25 16:00:00-05:00",
                                            "2026-11-27 13:00:00-05:00"]
    assert bars["open"].tolist() == [11.0, 12.0, 14.0] and bars["volume"].tolist() == [2.0, 3.0, 5.0]
    # Only the sessions asked for (a cached month file may hold more days).
    result = dl.write_training_csv([path], 15, tmp_path / "late.csv", first_day="2026-11-26")
    assert (result["rows"], result["first"]) == (1, "2026-11-27T18:00:00+00:00")


# ----------------------------------------------------------------------------------------------
# Resuming

def test_a_rerun_fetches_only_the_month_under_way_then_nothing_once_it_is_over(fake, reference, tmp_path):
    out = tmp_path / "bars"
    download(fake, out)
    complete = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*_2026-1[0]*.csv")}
    before = len(fake.requests)
    summary = download(fake, out)
    requests = bar_requests(fake, before)
    # Only November (under way), 3 pages for each symbol, and only November's days asked for.
    assert len(requests) == summary["requests"] == 6
    assert {(r[2]["symbols"], r[2]["start"][:7]) for r in requests} == {("SPY", "2026-11"), ("QQQ", "2026-11")}
    assert (summary["fetched"], summary["in_progress"], summary["skipped"]) == (0, 2, 4)
    assert summary["rows_on_disk"] == reference["summary"]["rows"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*_2026-1[0]*.csv")} == complete

    # A damaged complete file (size differs from the manifest) is fetched again; once the
    # downloader's clock is past November, the rerun completes it, and the next run asks nothing.
    (out / "SPY_1min_2026-09.csv").write_text("symbol,timestamp\n")
    later = pd.Timestamp("2026-12-01 09:00", tz=NY)
    before = len(fake.requests)
    summary = download(fake, out, now=later)
    assert (summary["fetched"], summary["in_progress"], summary["skipped"]) == (3, 0, 3)
    assert {(r[2]["symbols"], r[2]["start"][:7]) for r in bar_requests(fake, before)} == {
        ("SPY", "2026-09"), ("SPY", "2026-11"), ("QQQ", "2026-11")}
    manifest = json.loads((out / ".manifest.json").read_text())
    assert all(entry["complete"] for entry in manifest["files"].values())
    before = len(fake.requests)
    summary = download(fake, out, now=later)
    assert fake.requests[before:] == [] and summary["requests"] == 0 and summary["skipped"] == 6
    assert {p.name: p.read_bytes() for p in out.glob("*.csv")} == reference["bytes"]


def test_refused_keys_stop_at_once_as_a_setup_error(fake, tmp_path):
    before = len(fake.requests)
    with pytest.raises(dl.DownloadSettingsError, match=r"^SPY 2026-10 .*: HTTP 401: request is not authorized "
                                                       r"\(check the API keys\)$"):
        dl.download_stock_bars(Credentials("test-key", "wrong"), Endpoints("http://unused.invalid", fake.url),
                               ["SPY"], "2026-10-01", "2026-10-31", 5, tmp_path, now=fake.now, retry=NO_WAIT)
    assert [r[4] for r in bar_requests(fake, before)] == [401]            # not retried
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_with_other_settings_is_refused_before_any_request(fake, reference):
    before = len(fake.requests)
    with pytest.raises(dl.DownloadSettingsError, match=r"holds bars downloaded with feed 'iex', this run asks for 'sip'"):
        download(fake, reference["out"], feed="sip")
    with pytest.raises(dl.DownloadSettingsError, match=r"adjustment 'split'.*'raw'"):
        download(fake, reference["out"], adjustment="raw")
    assert fake.requests[before:] == []


# ----------------------------------------------------------------------------------------------
# Interruptions

@pytest.mark.parametrize("how", ["server_error", "ctrl_c"])
def test_an_interruption_after_the_first_month_leaves_no_partial_month_and_the_rerun_completes(fake, reference,
                                                                                               tmp_path, how):
    out = tmp_path / "bars"
    pages = []

    def interrupt_in_second_month(event):
        if event["event"] == "page" and event["month"] == "2026-10":
            pages.append(event)
            if len(pages) == 1:      # after the first page of the second month
                if how == "ctrl_c":
                    raise KeyboardInterrupt
                fake.inject(Fault("GET", "/v2/stocks/bars", "500", times=1 + NO_WAIT.retries))

    before = len(fake.requests)
    if how == "ctrl_c":
        with pytest.raises(KeyboardInterrupt):
            download(fake, out, progress=interrupt_in_second_month)
    else:
        with pytest.raises(DataError, match=r"^SPY 2026-10 \(1-minute bars, feed iex\): gave up after 3 attempts "
                                            r"\(HTTP 500: internal server error occurred\)"):
            download(fake, out, progress=interrupt_in_second_month)
    assert fake.pending_faults == []
    # September is saved; no October file, no temporary file; the manifest knows September only.
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", "SPY_1min_2026-09.csv"]
    assert json.loads((out / ".manifest.json").read_text())["files"].keys() == {"SPY_1min_2026-09.csv"}
    failed = bar_requests(fake, before)
    # September's two pages, October's first, then (server error) three answers of 500.
    assert [r[4] for r in failed] == [200, 200, 200] + ([500] * 3 if how == "server_error" else [])
    assert [r[2]["start"][:7] for r in failed] == ["2026-09"] * 2 + ["2026-10"] * (len(failed) - 2)

    before = len(fake.requests)
    summary = download(fake, out)
    assert (summary["skipped"], summary["fetched"], summary["in_progress"]) == (1, 3, 2)
    assert ("SPY", "2026-09") not in {(r[2]["symbols"], r[2]["start"][:7]) for r in bar_requests(fake, before)}
    # The same files, byte for byte, as the uninterrupted download.
    assert {p.name: p.read_bytes() for p in out.glob("*.csv")} == reference["bytes"]


def test_a_killed_download_process_resumes_where_it_stopped(fake, reference, tmp_path):
    """SIGKILL of the CLI while October's request hangs on the server: September (written by the
    run before) stays, October leaves nothing behind, the rerun completes the same files."""
    out = tmp_path / "bars"
    env = {**os.environ, "APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret",
           "APCA_API_DATA_URL": fake.url}
    args = [sys.executable, str(SCRIPT), "--symbols", "SPY", "--start", "2026-09-15", "--out", str(out),
            "--no-progress", "--timeout", "20"]
    first = subprocess.run([*args, "--end", "2026-09-30"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert "1 month files" in first.stdout and "bars/s" in first.stdout
    before = len(fake.requests)
    fake.inject(Fault("GET", "/v2/stocks/bars", "timeout", delay=3.0))
    process = subprocess.Popen([*args, "--end", "2026-10-31"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not fake.pending_faults == []:            # October's request is being held
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", "SPY_1min_2026-09.csv"]
    again = subprocess.run([*args, "--end", "2026-10-31"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    # Against the CLI's clock (this machine's, not the fake's) both months are over.
    assert "(1 fetched, 0 in progress, 1 already complete)" in again.stdout
    deadline = time.monotonic() + 10
    while len(bar_requests(fake, before)) < 2:       # the held request is logged when its delay ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r[2]["start"][:7] for r in bar_requests(fake, before)] == ["2026-10", "2026-10"]
    for name in ("SPY_1min_2026-09.csv", "SPY_1min_2026-10.csv"):
        # Same bars as the reference (one page of 10,000 here instead of three of 3,000).
        assert (out / name).read_bytes() == reference["bytes"][name]


# ----------------------------------------------------------------------------------------------
# Rate limits, server errors, timeouts

class RetryAfterFake(FakeAlpaca):
    """The fake, with its 429 answers carrying ``Retry-After: 0.2`` instead of a reset time."""

    def _fault_reply(self, fault):
        reply = super()._fault_reply(fault)
        if fault.kind == "429":
            reply.headers = {"Retry-After": "0.2"}
        return reply


def test_a_429_waits_for_retry_after_then_goes_on(tmp_path):
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        time.sleep(seconds)

    with RetryAfterFake(now=NOW, spot=600.0, seed=3, history_days=70) as server:
        server.inject(Fault("GET", "/v2/stocks/bars", "429", times=2))
        began = time.monotonic()
        summary = download(server, tmp_path, symbols=["SPY"], start="2026-10-01", end="2026-10-31", minutes=5,
                           sleep=sleep, retry=dl.RetrySettings(retries=3, backoff=5.0))
        elapsed = time.monotonic() - began
        statuses = [r[4] for r in bar_requests(server)]
    assert waits == [0.2, 0.2]                         # the header, not the 5 s backoff
    assert 0.4 <= elapsed < 3.0
    assert statuses == [429, 429, 200]
    assert (summary["retries"], summary["requests"], summary["fetched"]) == (2, 3, 1)
    assert summary["waited_s"] == pytest.approx(0.4)
    assert summary["rows"] == len(read_month(tmp_path / "SPY_5min_2026-10.csv")) == session_minutes(
        "2026-10-01", "2026-10-31") // 5


def test_a_429_with_a_reset_time_and_a_timeout_are_retried(fake, tmp_path):
    waits = []
    fake.inject(Fault("GET", "/v2/stocks/bars", "429"))          # X-Ratelimit-Reset: now + ≤ 1 s
    fake.inject(Fault("GET", "/v2/stocks/bars", "timeout", delay=1.5))
    before = len(fake.requests)
    summary = download(fake, tmp_path, symbols=["SPY"], start="2026-10-01", end="2026-10-31", minutes=15,
                       sleep=waits.append, request_timeout=0.3, retry=dl.RetrySettings(retries=2, backoff=0.01))
    assert fake.pending_faults == []
    assert len(waits) == 2 and 0.0 <= waits[0] <= 1.0 and waits[1] == pytest.approx(0.02)
    assert summary["retries"] == 2 and summary["fetched"] == 1
    assert summary["rows"] == session_minutes("2026-10-01", "2026-10-31") // 15
    deadline = time.monotonic() + 10
    while len(bar_requests(fake, before)) < 3:       # the held request is logged when its delay ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r[4] for r in bar_requests(fake, before)] == [429, 200, 200]


def test_retry_wait_reads_the_headers_and_caps_the_wait():
    class Response:
        def __init__(self, status, headers):
            self.status_code, self.headers = status, headers

    class Error:
        def __init__(self, status, headers):
            self.response = Response(status, headers)

    settings = dl.RetrySettings(backoff=0.5, max_wait=10.0)
    assert dl.retry_wait(Error(429, {"Retry-After": "3"}), 0, settings) == 3.0
    assert dl.retry_wait(Error(429, {"Retry-After": "Sun, 06 Dec 2026 10:00:05 GMT"}), 0, settings,
                         clock=lambda: pd.Timestamp("2026-12-06 10:00:00", tz="UTC").timestamp()) == 5.0
    assert dl.retry_wait(Error(429, {"X-Ratelimit-Reset": "1000"}), 0, settings, clock=lambda: 996.5) == 3.5
    assert dl.retry_wait(Error(429, {"X-Ratelimit-Reset": "5000"}), 0, settings, clock=lambda: 1000.0) == 10.0
    assert dl.retry_wait(Error(429, {"X-Ratelimit-Reset": "900"}), 0, settings, clock=lambda: 1000.0) == 0.0
    assert dl.retry_wait(Error(429, {}), 2, settings) == 2.0                 # no header: backoff
    assert dl.retry_wait(Error(503, {"Retry-After": "7"}), 1, settings) == 1.0   # 5xx: backoff
    assert dl.retry_wait(None, 6, settings) == 10.0                          # timeout, capped


# ----------------------------------------------------------------------------------------------
# The command line

def run_cli(argv, env_overrides, tmp_path, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("APCA_")}
    env.update(HOME=str(tmp_path / "home"), **env_overrides)
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_persistent_server_error_exits_1_naming_the_symbol_and_month(fake, tmp_path):
    fake.inject(Fault("GET", "/v2/stocks/bars", "500", times=3))
    before = len(fake.requests)
    result = run_cli(["--symbols", "SPY", "--start", "2026-10-01", "--end", "2026-10-31", "--out",
                      str(tmp_path / "bars"), "--retries", "2", "--backoff", "0.01", "--no-progress"],
                     {"APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret",
                      "APCA_API_DATA_URL": fake.url}, tmp_path)
    assert fake.pending_faults == []
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["download_alpaca_matched: error: SPY 2026-10 (1-minute bars, feed iex): gave up after 3 "
                     "attempts (HTTP 500: internal server error occurred); months already saved are kept, rerun "
                     "the same command to resume"]
    assert [r[4] for r in bar_requests(fake, before)] == [500, 500, 500]
    assert sorted(p.name for p in (tmp_path / "bars").iterdir()) == []


def test_without_keys_the_cli_says_so_in_one_line_and_exits_2(tmp_path):
    result = run_cli(["--symbols", "SPY", "--start", "2026-10-01", "--end", "2026-10-31", "--out",
                      str(tmp_path / "bars")], {}, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download_alpaca_matched: error: no Alpaca keys: set "
                                                   "APCA_API_KEY_ID and APCA_API_SECRET_KEY")
    assert not (tmp_path / "bars").exists()


@pytest.mark.parametrize("argv, env, message", [
    (["--start", "2026-10-31", "--end", "2026-10-01"], {}, "--start 2026-10-31 is after --end 2026-10-01"),
    (["--minutes", "7"], {}, "--minutes 7: use one of 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60"),
    (["--start", "2026-13-01"], {}, "--start '2026-13-01': expected a date YYYY-MM-DD"),
    ([], {"APCA_API_DATA_URL": "http://127.0.0.1:9/v2"}, "APCA_API_DATA_URL='http://127.0.0.1:9/v2': give the origin only"),
    ([], {"APCA_API_DATA_URL": ""}, "APCA_API_DATA_URL is set but empty"),
])
def test_bad_arguments_and_endpoints_are_one_line_exit_2(monkeypatch, capsys, tmp_path, argv, env, message):
    monkeypatch.setenv("APCA_API_KEY_ID", "test-key")
    monkeypatch.setenv("APCA_API_SECRET_KEY", "test-secret")
    monkeypatch.delenv("APCA_API_DATA_URL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    defaults = {"--symbols": "SPY", "--start": "2026-10-01", "--end": "2026-10-31", "--out": str(tmp_path / "b")}
    for i in range(0, len(argv), 2):
        defaults[argv[i]] = argv[i + 1]
    assert dl.main([x for pair in defaults.items() for x in pair] + ["--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------
# train_mamba --save-only

def test_save_only_writes_a_file_the_trainer_reads_and_exits_without_training(tmp_path, monkeypatch, capsys):
    tm = pytest.importorskip("intelligence.train_mamba")
    from intelligence import mamba_data as md

    with FakeAlpaca(now="2026-11-25 18:00", spot=600.0, seed=7, history_days=80) as server:
        for key, value in {"APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret",
                           "APCA_API_DATA_URL": server.url, "HOME": str(tmp_path)}.items():
            monkeypatch.setenv(key, value)
        save = tmp_path / "data" / "spy_training_data.csv"
        argv = ["--save-only", "--years", "0.25", "--end-date", "2026-11-25", "--save-path", str(save),
                "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(tmp_path / "model.pth"),
                "--minutes", "15"]
        assert tm.main(argv) == 0
        requests = len(bar_requests(server))
        sdk = sdk_bars(server, "SPY", "2026-08-26", "2026-11-25 23:59", minutes=15)
    captured = capsys.readouterr()
    assert f"saved {save}:" in captured.out
    # 15-minute bars are saved (the seed's width) but the trainer says it will not take them.
    assert "the forecaster trains on 5-minute bars only and refuses these 15-minute ones" in captured.out
    assert "train on it" not in captured.out
    assert not (tmp_path / "model.pth").exists()                     # nothing trained
    assert requests == 4                                             # 2026-08 … 2026-11, one page each
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.csv")) == [
        f"SPY_15min_2026-{m:02d}.csv" for m in (8, 9, 10, 11)]

    bars, iv, description = md.load_local_bars(save)
    # 91 days back from 2026-11-25: sessions 2026-08-26 … 2026-11-25, 26 bars each, stamped at
    # the close (the 09:30 bar closes 09:45), with the server's values.
    sessions = trading_sessions("2026-08-26", "2026-11-25")
    assert len(bars) == 26 * len(sessions) == len(sdk)
    assert str(bars.index[0]) == "2026-08-26 09:45:00-04:00" and str(bars.index[-1]) == "2026-11-25 16:00:00-05:00"
    starts = pd.DatetimeIndex(pd.to_datetime(sdk["timestamp"], utc=True))
    assert (bars.index.tz_convert("UTC") == starts + pd.Timedelta(minutes=15)).all()
    assert bars["close"].tolist() == sdk["close"].tolist() and bars["high"].tolist() == sdk["high"].tolist()
    assert description["median_bar_minutes"] == 15.0


def test_save_only_without_keys_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    tm = pytest.importorskip("intelligence.train_mamba")
    for key in ("APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "APCA_API_DATA_URL", "APCA_API_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tm.main(["--save-only", "--save-path", str(tmp_path / "x.csv"), "--cache-dir", str(tmp_path / "c")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_mamba: error: no Alpaca keys") and captured.out == ""
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "c").exists()
