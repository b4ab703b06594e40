"""The production data pipeline against local imitations of its two vendors: the IVolatility
downloader (data_factory/download_ivolatility_options.py) against tests/ivolatility_fake.py — rows,
the per-day nearest-the-money filter, inline and prepared-file answers, resuming, 429s, the 5xx
retry cap, keys and URL overrides — the merge's bar preparation, and scripts/run_production_pipeline.py
end to end against tests/alpaca_fake.py + tests/ivolatility_fake.py over sessions of 2018 (the
embedded rate era), producing a store VendorChainMarket.from_store loads, with a rerun that skips
every step."""
from __future__ import annotations

import csv
import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import requests

from data_factory import download_ivolatility_options as ivol
from data_factory import merge_intraday_with_greeks as merging
from data_factory.canonical import BAR_SCHEMA
from data_factory.errors import DataError
from tests.alpaca_fake import FakeAlpaca
from tests.ivolatility_fake import FakeIVolatility, Fault

KEY = "test-ivol-key"
NY = "America/New_York"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake():
    with FakeIVolatility(api_key=KEY) as server:
        yield server
        assert not server.server_errors, server.server_errors[0]


def download(server, out, start="2018-03-01", end="2018-03-09", **options):
    options.setdefault("request_interval", 0)
    options.setdefault("base_wait", 0)
    return ivol.download_options(KEY, "SPY", start, end, out, base_url=server.url, **options)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ============================================================================== the IVolatility downloader
def test_download_keeps_the_contracts_nearest_the_money_with_the_servers_values(fake, tmp_path):
    summary = download(fake, tmp_path, per_day=100, dte_max=60)
    path = tmp_path / "spy_options_ivol_2018-03.csv"
    assert summary["files"] == [str(path)] and summary["downloaded"] == 1 and summary["rows"] == 700
    with open(path) as handle:
        assert handle.readline().rstrip("\n").split(",") == list(ivol.OUTPUT_COLUMNS)
    rows = read_rows(path)
    by_day = pd.Series([r["date"] for r in rows]).value_counts()
    assert sorted(by_day.index) == ["03/01/2018", "03/02/2018", "03/05/2018", "03/06/2018", "03/07/2018",
                                    "03/08/2018", "03/09/2018"] and set(by_day) == {100}
    # One request for the month (from/to = its sessions), the key in the header, never in a URL.
    chain = fake.chain_requests()
    assert chain == [{"symbol": "SPY", "from": "2018-03-01", "to": "2018-03-09"}]
    assert all(header and not query for _, _, header, query in fake.requests)
    assert summary["requests"] == 1 + 2 + 1                  # request, two polls (PENDING, COMPLETE), download

    day = pd.Timestamp("2018-03-07").date()
    served = [r for r in fake.rows("SPY", [day]) if 0 <= (pd.Timestamp(r["expiration"]).date() - day).days <= 60]
    spot = fake.spot(day)
    kept = [r for r in rows if r["date"] == "03/07/2018"]
    kept_keys = {(r["expiration"], float(r["strike"]), r["call/put"]) for r in kept}
    distance = lambda strike: abs(strike - round(spot, 2))
    inside = [distance(r["strike"]) for r in served
              if (pd.Timestamp(r["expiration"]).strftime("%m/%d/%Y"), r["strike"], r["call/put"]) in kept_keys]
    outside = [distance(r["strike"]) for r in served
               if (pd.Timestamp(r["expiration"]).strftime("%m/%d/%Y"), r["strike"], r["call/put"]) not in kept_keys]
    assert len(inside) == 100 and max(inside) <= min(outside)
    # Ordered by expiration, strike, type (puts first), as the CSV loader expects.
    order = [(pd.Timestamp(r["expiration"]), float(r["strike"]), r["call/put"] == "C") for r in kept]
    assert order == sorted(order)

    row = next(r for r in kept if r["call/put"] == "P")
    model = fake.model_row("2018-03-07", pd.Timestamp(row["expiration"]).date(), float(row["strike"]), "P")
    assert float(row["bid"]) == model["bid"] and float(row["ask"]) == model["ask"]
    assert float(row["iv"]) == model["iv"] and float(row["delta"]) == model["delta"] < 0
    assert float(row["theta"]) == model["theta"] and float(row["vega"]) == model["vega"]
    assert float(row["stock price for iv"]) == model["stock_price_for_iv"] == round(spot, 2)
    assert float(row["adjusted close"]) == model["adjusted_close"] != model["stock_price_for_iv"]
    assert row["option symbol"] == model["option_symbol"] and row["symbol"] == "SPY"

    # The file is the vendor_formats 'ivolatility' layout: it loads without a bad row.
    from data_factory.vendor_formats import detect_format, load_file

    assert detect_format(path) == "ivolatility"
    table, report = load_file(path)
    assert table.num_rows == 700 and not any(report.counts.values())
    loaded = table.filter(pc.and_(pc.equal(table.column("strike"), float(row["strike"])),
                                  pc.equal(table.column("option_type"), "P"))).to_pylist()
    match = [r for r in loaded if r["quote_time"].date() == day and r["expiration"] == model_date(row)]
    assert len(match) == 1 and match[0]["underlying_price"] == round(spot, 2)
    assert match[0]["quote_time"].hour == 16 and match[0]["iv"] == model["iv"]


def model_date(row):
    return pd.Timestamp(row["expiration"]).date()


def test_inline_and_prepared_file_answers_give_the_same_file(tmp_path):
    """Inline JSON (underscore names, ISO dates), a prepared gzip CSV (names with spaces,
    mm/dd/yyyy) with an absolute or a relative urlForDetails, or behind a redirect to another
    host: byte-identical month files."""
    contents = {}
    for name, settings in {"inline": dict(inline_limit=10**7), "file": dict(inline_limit=0, pending_polls=2),
                           "relative": dict(inline_limit=0, relative_details=True),
                           "redirect": dict(inline_limit=0, redirect_downloads=True)}.items():
        with FakeIVolatility(api_key=KEY, **settings) as server:
            summary = download(server, tmp_path / name, start="2018-03-05", end="2018-03-06", per_day=0, dte_max=10)
            contents[name] = (tmp_path / name / "spy_options_ivol_2018-03.csv").read_bytes()
            expected = sum(1 for r in server.rows("SPY", [pd.Timestamp(d).date() for d in ("2018-03-05", "2018-03-06")])
                           if (pd.Timestamp(r["expiration"]) - pd.Timestamp(r["date"])).days <= 10)
            assert summary["rows"] == expected > 500
            paths = [p for p, *_ in server.requests]
            assert any(p.startswith("/data/info/") for p in paths) == (name != "inline")
            # The key goes to the API's host only, never to the host a download link redirects to.
            assert [key for p, _, key, _ in server.requests if p.startswith("/data/download/")] == \
                ([False] if name == "redirect" else [] if name == "inline" else [True])
    assert contents["inline"] == contents["file"] == contents["relative"] == contents["redirect"]


def test_resume_skips_complete_months_and_an_interrupted_month_is_fetched_again(fake, tmp_path, monkeypatch):
    first = download(fake, tmp_path, start="2018-02-26", end="2018-03-06")
    assert first["downloaded"] == 2 and len(fake.chain_requests()) == 2
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["spy_options_ivol_2018-02.csv",
                                                              "spy_options_ivol_2018-03.csv"]
    again = download(fake, tmp_path, start="2018-02-26", end="2018-03-06")
    assert again["skipped"] == 2 and again["downloaded"] == 0 and again["requests"] == 0
    assert again["rows"] == first["rows"] == 700 and sorted(again["files"]) == sorted(first["files"])
    narrower = download(fake, tmp_path, start="2018-03-01", end="2018-03-02")
    assert narrower["skipped"] == 1 and narrower["requests"] == 0 and narrower["rows"] == 400

    # A wider March: February stays, March is asked for again over the new range.
    wider = download(fake, tmp_path, start="2018-02-26", end="2018-03-09")
    assert wider["skipped"] == 1 and wider["downloaded"] == 1 and wider["rows"] == 1000
    assert fake.chain_requests()[-1] == {"symbol": "SPY", "from": "2018-03-01", "to": "2018-03-09"}
    march = (tmp_path / "spy_options_ivol_2018-03.csv").read_bytes()
    # Other settings are another download.
    other = download(fake, tmp_path, start="2018-02-26", end="2018-03-09", per_day=50)
    assert other["downloaded"] == 2 and other["rows"] == 50 * 10

    # Interrupted in March: February is saved and recorded, no partial file; a rerun asks for March only.
    original = ivol.IVolatilityClient.fetch_rows

    def fail_in_march(self, endpoint, params, on_status=None):
        if params["from"].startswith("2018-03"):
            raise ivol.IVolatilityDownloadError("simulated failure")
        return original(self, endpoint, params, on_status)

    resumed_dir = tmp_path / "resumed"
    monkeypatch.setattr(ivol.IVolatilityClient, "fetch_rows", fail_in_march)
    with pytest.raises(ivol.IVolatilityDownloadError, match="simulated"):
        download(fake, resumed_dir, start="2018-02-26", end="2018-03-09")
    monkeypatch.setattr(ivol.IVolatilityClient, "fetch_rows", original)
    assert sorted(p.name for p in resumed_dir.iterdir()) == ["ivolatility_manifest.json", "spy_options_ivol_2018-02.csv"]
    before = len(fake.chain_requests())
    resumed = download(fake, resumed_dir, start="2018-02-26", end="2018-03-09")
    assert resumed["skipped"] == 1 and resumed["downloaded"] == 1
    assert fake.chain_requests()[before:] == [{"symbol": "SPY", "from": "2018-03-01", "to": "2018-03-09"}]
    assert (resumed_dir / "spy_options_ivol_2018-03.csv").read_bytes() == march
    # A file changed behind the manifest's back is downloaded again.
    with open(resumed_dir / "spy_options_ivol_2018-03.csv", "a") as handle:
        handle.write("\n")
    again = download(fake, resumed_dir, start="2018-02-26", end="2018-03-09")
    assert again["downloaded"] == 1 and (resumed_dir / "spy_options_ivol_2018-03.csv").read_bytes() == march


def test_force_downloads_complete_months_again(fake, tmp_path):
    download(fake, tmp_path, start="2018-03-05", end="2018-03-06")
    forced = download(fake, tmp_path, start="2018-03-05", end="2018-03-06", force=True)
    assert forced["downloaded"] == 1 and len(fake.chain_requests()) == 2


def test_429_waits_retry_after_and_5xx_backs_off(fake, tmp_path):
    fake.inject(Fault(kind="429", times=1, retry_after="1"))
    started = time.monotonic()
    summary = download(fake, tmp_path / "a", start="2018-03-05", end="2018-03-05")
    assert time.monotonic() - started >= 1.0
    assert summary["rate_limited"] == 1 and summary["retries"] == 1 and summary["rows"] == 100
    assert len(fake.chain_requests()) == 2

    # 429 without Retry-After, a 502 HTML page, a dropped connection, a 500 on the file status:
    # each retried (backoff), then the download completes with the same file.
    for kind, path in (("429", "/equities"), ("502", "/equities"), ("drop", "/equities"), ("500", "/data/info")):
        fake.inject(Fault(path=path, kind=kind, times=1, retry_after=None))
    summary = download(fake, tmp_path / "b", start="2018-03-05", end="2018-03-05", base_wait=0.01)
    assert summary["retries"] == 4 and summary["rows"] == 100
    assert (tmp_path / "a" / "spy_options_ivol_2018-03.csv").read_bytes() == \
        (tmp_path / "b" / "spy_options_ivol_2018-03.csv").read_bytes()


def test_5xx_stops_after_the_retry_cap_and_a_long_retry_after_is_not_waited(fake, tmp_path):
    fake.inject(Fault(kind="503", times=50))
    with pytest.raises(ivol.IVolatilityDownloadError) as raised:
        download(fake, tmp_path, start="2018-03-05", end="2018-03-05", attempts=3)
    assert "HTTP 503" in str(raised.value) and "3 attempts" in str(raised.value) and "resume" in str(raised.value)
    assert len(fake.chain_requests()) == 3
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob(".*part"))
    fake.clear_faults()
    fake.inject(Fault(kind="429", times=1, retry_after="3600"))
    with pytest.raises(ivol.IVolatilityDownloadError, match="wait 3600 s"):
        download(fake, tmp_path, start="2018-03-05", end="2018-03-05")


def test_a_response_without_a_needed_field_names_it(tmp_path):
    with FakeIVolatility(api_key=KEY, drop_fields={"delta"}) as server:
        with pytest.raises(DataError, match="no 'delta' field"):
            download(server, tmp_path, start="2018-03-05", end="2018-03-05")
    with FakeIVolatility(api_key=KEY, drop_fields={"stock_price_for_iv"}, inline_limit=10**7) as server:
        with pytest.raises(DataError, match="no 'stock price for iv' field"):
            download(server, tmp_path, start="2018-03-05", end="2018-03-05")
    assert not list(tmp_path.glob("*.csv"))


def test_sessions_without_rows_are_reported_not_filled(tmp_path):
    with FakeIVolatility(api_key=KEY, no_data_dates={"2018-03-06"}) as server:
        summary = download(server, tmp_path, start="2018-03-05", end="2018-03-07")
        assert summary["missing_sessions"] == ["2018-03-06"] and summary["rows"] == 200
        manifest = json.loads((tmp_path / ivol.MANIFEST).read_text())
        assert manifest["months"]["SPY:2018-03"]["missing_sessions"] == ["2018-03-06"]
        empty = download(server, tmp_path / "empty", start="2018-03-06", end="2018-03-06")
        assert empty["files"] == [] and empty["rows"] == 0 and server.requests[-1][0] == "/equities/eod/options-rawiv"


def test_a_recent_session_without_rows_is_asked_for_again(fake, tmp_path):
    from data_factory.market_calendar import previous_session_on_or_before

    recent = previous_session_on_or_before(pd.Timestamp.now(tz=NY).tz_localize(None).normalize()).date()
    earlier = previous_session_on_or_before(pd.Timestamp(recent) - pd.Timedelta(days=1)).date()
    fake.no_data_dates = {recent}
    first = download(fake, tmp_path, start=earlier, end=recent + pd.Timedelta(days=30))   # the end is clipped to today
    assert first["missing_sessions"] == [str(recent)] and fake.chain_requests()[-1]["to"] == str(recent)
    again = download(fake, tmp_path, start=earlier, end=recent)
    assert again["downloaded"] >= 1 and len(fake.chain_requests()) == 2 * first["downloaded"]


def run_cli(monkeypatch, capsys, argv, env):
    for name in (ivol.API_KEY_ENV, ivol.API_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status = ivol.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_missing_or_refused_key_and_bad_url_exit_2(fake, tmp_path, monkeypatch, capsys):
    argv = ["--start", "2018-03-05", "--end", "2018-03-05", "--out", str(tmp_path / "out"), "--no-progress",
            "--request-interval", "0"]
    cases = [({ivol.API_URL_ENV: fake.url}, "no IVolatility API key: set IVOLATILITY_API_KEY"),
             ({ivol.API_URL_ENV: fake.url, ivol.API_KEY_ENV: "  "}, "IVOLATILITY_API_KEY is set but empty"),
             ({ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: ""}, "IVOLATILITY_API_URL is set but empty"),
             ({ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: "ftp://127.0.0.1:1"}, "expected http(s)://host[:port]"),
             ({ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: fake.url + "/v1"}, "give the origin only"),
             ({ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: "http://127.0.0.1:99999"}, "the port is not a number")]
    for env, message in cases:
        status, out, err = run_cli(monkeypatch, capsys, argv, env)
        assert status == 2 and err.strip().startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert fake.requests == [] and not (tmp_path / "out").exists()

    secret = "wrong-key-123"
    status, out, err = run_cli(monkeypatch, capsys, argv, {ivol.API_KEY_ENV: secret, ivol.API_URL_ENV: fake.url})
    assert status == 2 and "refused the API key (HTTP 401" in err and secret not in err + out
    assert len(fake.requests) == 1 and not list((tmp_path / "out").glob("*.csv"))

    port = closed_port()
    started = time.monotonic()
    status, out, err = run_cli(monkeypatch, capsys, argv, {ivol.API_KEY_ENV: KEY,
                                                           ivol.API_URL_ENV: f"http://127.0.0.1:{port}"})
    assert status == 2 and f"cannot reach http://127.0.0.1:{port} (connection refused)" in err
    assert time.monotonic() - started < 5

    status, out, err = run_cli(monkeypatch, capsys, argv, {ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: fake.url})
    assert status == 0 and "100 rows in 1 file(s)" in out and KEY not in out + err


def test_key_file(tmp_path):
    key_file = tmp_path / "ivol.key"
    key_file.write_text(f"  {KEY}\n")
    assert ivol.load_api_key({}, key_file=key_file) == KEY
    key_file.write_text(json.dumps({"api_key": KEY}))
    assert ivol.load_api_key({ivol.API_KEY_ENV: "other"}, key_file=key_file) == KEY
    with pytest.raises(ivol.IVolatilitySetupError, match="inside the repository"):
        ivol.load_api_key({}, key_file=key_file, repository=tmp_path)
    with pytest.raises(ivol.IVolatilitySetupError, match="no such file"):
        ivol.load_api_key({}, key_file=tmp_path / "missing")
    assert ivol.load_api_key({ivol.API_KEY_ENV: KEY}) == KEY
    assert "test-ivol" not in repr(ivol.IVolatilityClient(KEY, "http://127.0.0.1:1"))


# ============================================================================== the merge's bars
def minute_bars(session: str, closes: list[float], start_minute: int = 1) -> pa.Table:
    open_time = pd.Timestamp(f"{session} 09:30", tz=NY)
    times = [open_time + pd.Timedelta(minutes=start_minute + i) for i in range(len(closes))]
    closes = np.asarray(closes, dtype=float)
    return pa.table({"time": pa.array(pd.DatetimeIndex(times).as_unit("ns")), "symbol": ["SPY"] * len(closes),
                     "minutes": pa.array(np.ones(len(closes), dtype=np.int32)), "open": closes - 0.01,
                     "high": closes + 0.05, "low": closes - 0.05, "close": closes,
                     "volume": np.arange(1.0, len(closes) + 1), "source": ["stock_bars"] * len(closes)}).cast(BAR_SCHEMA)


def test_bars_resampled_gaps_filled_and_extended_hours_left_out():
    closes = list(270 + np.arange(390) * 0.01)
    table = minute_bars("2018-03-07", closes)
    keep = np.ones(390, dtype=bool)
    keep[[10, 11]] = False                          # 09:41 and 09:42 missing: filled
    keep[100:110] = False                           # 11:11 … 11:20: ten bars, too long a gap
    table = table.filter(pa.array(keep))
    premarket = minute_bars("2018-03-07", [269.0, 269.5], start_minute=-30)   # 09:01, 09:02
    table = pa.concat_tables([premarket, table])
    by_width, report = merging.prepare_bars(table, "SPY", fill_gaps=5)
    assert report["outside_regular_hours"] == 2 and report["filled_bars"] == 2
    assert report["unfilled_gaps"] == [("2018-03-07", 10)]
    one = by_width[1].to_pandas().set_index("time")
    filled = one[one["source"] == merging.FILLED_SOURCE]
    assert list(filled.index.strftime("%H:%M")) == ["09:41", "09:42"]
    assert set(filled["close"]) == {closes[9]} and set(filled["volume"]) == {0.0}
    assert len(one) == 390 - 10 and one.index.min().strftime("%H:%M") == "09:31"
    five = by_width[5].to_pandas().set_index("time")
    assert len(five) == 78 - 2                       # 11:15 and 11:20 have no minute at all
    bar = five.loc[pd.Timestamp("2018-03-07 09:35", tz=NY)]
    assert bar["open"] == pytest.approx(closes[0] - 0.01) and bar["close"] == pytest.approx(closes[4])
    assert bar["high"] == pytest.approx(closes[4] + 0.05) and bar["low"] == pytest.approx(closes[0] - 0.05)
    assert bar["volume"] == 1 + 2 + 3 + 4 + 5 and bar["source"] == merging.RESAMPLED_SOURCE
    fifteen = by_width[15].to_pandas().set_index("time")
    assert len(fifteen) == 26 and fifteen.index[-1].strftime("%H:%M") == "16:00"
    assert fifteen.loc[pd.Timestamp("2018-03-07 16:00", tz=NY), "close"] == pytest.approx(closes[-1])
    with pytest.raises(DataError, match="no SPY bars between"):
        merging.prepare_bars(table, "SPY", first=pd.Timestamp("2018-04-01").date())


def write_bar_csv(rows: list[dict], path: Path) -> Path:
    """Alpaca bars as the Alpaca downloader writes them (stock_bars: start-stamped RFC 3339)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["symbol", "timestamp", "open", "high", "low", "close", "volume"])
        for bar in rows:
            writer.writerow(["SPY", bar["t"], bar["o"], bar["h"], bar["l"], bar["c"], bar["v"]])
    return path


def test_merge_cli_builds_the_store_then_expands_it(vendors, tmp_path, capsys):
    alpaca, options = vendors
    minutes = alpaca_bars(alpaca, "1Min", "2018-04-10T00:00:00Z", "2018-04-12T00:00:00Z")
    bars = write_bar_csv(minutes, tmp_path / "bars" / "SPY_1min_2018-04.csv")
    download(options, tmp_path / "ivol", start="2018-04-09", end="2018-04-11")
    store = tmp_path / "stores" / "spy"
    argv = ["--options", str(tmp_path / "ivol"), "--bars", str(bars.parent), "--store", str(store)]
    assert merging.main(argv) == 0
    text = capsys.readouterr().out
    assert "300 chain rows over 3 sessions" in text and "1 min 780, 5 min 156, 15 min 52" in text
    assert "chains without bars: 1 sessions" in text                  # 2018-04-09: its EOD prices the 10th's morning
    assert merging.main(argv) == 2                                    # the store is there: refused
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err and len(err.strip().splitlines()) == 1
    assert merging.main(["--options", str(tmp_path / "ivol"), "--store", str(tmp_path / "other")]) == 2
    assert "give both --options and --bars" in capsys.readouterr().err
    assert merging.main(["--store", str(store), "--minutes", "1", "--start", "2018-04-10", "--dte-max", "30",
                         "--rate", "0.015"]) == 0
    text = capsys.readouterr().out
    assert f"expanded store {store.parent / 'spy-1min'}" in text and "over 2 sessions" in text
    from data_factory.chain_store import ChainStore

    expanded = ChainStore.open(store.parent / "spy-1min")
    chains = expanded.read_chains("2018-04-11", "2018-04-11").to_pandas()
    assert chains["quote_time"].nunique() == 390 and (chains["source"] == "expanded:ivolatility").all()
    assert expanded.manifest["bar_symbols"]["SPY"]["minutes"] == [1, 5, 15]
    close = {pd.Timestamp(b["t"]) + pd.Timedelta(minutes=1): b["c"] for b in minutes}
    at = pd.Timestamp("2018-04-11 10:17", tz=NY)
    assert set(chains.loc[chains["quote_time"] == at, "underlying_price"]) == {close[at.tz_convert("UTC")]}


def test_a_failed_replacing_merge_leaves_the_store_and_its_folder_as_they_were(vendors, tmp_path):
    alpaca, options = vendors
    download(options, tmp_path / "ivol", start="2018-04-09", end="2018-04-11")
    april_10 = write_bar_csv(alpaca_bars(alpaca, "1Min", "2018-04-10T00:00:00Z", "2018-04-11T00:00:00Z"),
                             tmp_path / "bars10" / "SPY.csv")
    april_13 = write_bar_csv(alpaca_bars(alpaca, "1Min", "2018-04-13T00:00:00Z", "2018-04-14T00:00:00Z"),
                             tmp_path / "bars13" / "SPY.csv")
    store = tmp_path / "stores" / "spy"
    merging.merge([tmp_path / "ivol"], [april_10], store)
    manifest = (store / "manifest.json").read_text()
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(DataError, match="share no session"):
        merging.merge([tmp_path / "ivol"], [april_13], store, replace=True)
    assert (store / "manifest.json").read_text() == manifest
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    assert [p.name for p in store.parent.iterdir()] == ["spy"]          # no staging folder left beside it


# ============================================================================== the pipeline end to end
PIPELINE = ROOT / "scripts" / "run_production_pipeline.py"
START, END = "2018-04-09", "2018-04-13"                 # no DST change within the listed expirations


def alpaca_bars(fake, timeframe, start, end) -> list[dict]:
    headers = {"APCA-API-KEY-ID": "test-key", "APCA-API-SECRET-KEY": "test-secret"}
    out, token = [], None
    while True:
        params = {"symbols": "SPY", "timeframe": timeframe, "start": start, "end": end, "limit": 10000, "feed": "iex"}
        if token:
            params["page_token"] = token
        response = requests.get(fake.url + "/v2/stocks/bars", params=params, headers=headers, timeout=10)
        response.raise_for_status()
        payload = response.json()
        out += payload["bars"].get("SPY", [])
        token = payload.get("next_page_token")
        if not token:
            return out


@pytest.fixture(scope="module")
def vendors():
    alpaca = FakeAlpaca(now="2018-04-16 09:30", spot=265.0, history_days=12).start()
    daily = alpaca_bars(alpaca, "1Day", "2018-04-02T00:00:00Z", "2018-04-14T00:00:00Z")
    closes = {pd.Timestamp(b["t"]).tz_convert(NY).date(): b["c"] for b in daily}
    options = FakeIVolatility(api_key=KEY, spot_of=closes).start()
    yield alpaca, options
    options.stop()
    alpaca.stop()


@pytest.fixture
def vendor_env(vendors, monkeypatch, tmp_path):
    alpaca, options = vendors
    env = {"APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret", "APCA_API_BASE_URL": alpaca.url,
           "APCA_API_DATA_URL": alpaca.url, ivol.API_KEY_ENV: KEY, ivol.API_URL_ENV: options.url,
           "HOME": str(tmp_path / "home")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def pipeline(argv, capsys):
    from scripts.run_production_pipeline import main

    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def requests_of(vendors):
    alpaca, options = vendors
    return (len([r for r in alpaca.requests if r[1] == "/v2/stocks/bars"]), len(options.requests))


def test_pipeline_end_to_end_then_a_rerun_skips_every_step(vendors, vendor_env, tmp_path, capsys):
    from data_factory.chain_store import ChainStore
    from data_factory.vendor_market import VendorChainMarket

    alpaca, options = vendors
    out = tmp_path / "pipeline"
    argv = ["--start", START, "--end", END, "--out", str(out), "--minutes", "5", "--request-interval", "0",
            "--rate", "0.015", "--no-progress"]
    asked = len(options.chain_requests())
    status, text, err = pipeline(argv, capsys)
    assert status == 0, err
    for step in ("[1/4] bars:", "[2/4] options:", "[3/4] merge:", "[4/4] expand:"):
        assert step in text
    assert options.chain_requests()[asked:] == [{"symbol": "SPY", "from": "2018-04-06", "to": "2018-04-13"}]
    final = out / "SPY-5min"
    assert f"--options-data {final}" in text

    store = ChainStore.open(final)
    assert [str(d.date()) for d in store.dates()] == ["2018-04-09", "2018-04-10", "2018-04-11", "2018-04-12",
                                                      "2018-04-13"]
    assert store.manifest["bar_symbols"]["SPY"]["minutes"] == [1, 5, 15]
    market = VendorChainMarket.from_store(store)
    assert len(market.coverage.sessions) == 5 and market.coverage.bar_sessions is not None
    assert len(market.bar_times) == 5 * 78 and "5-minute bars" in market.spot_source

    # Spot: the store's 5-minute bars are Alpaca's 1-minute bars resampled; the market trades them.
    minutes = alpaca_bars(alpaca, "1Min", "2018-04-09T00:00:00Z", "2018-04-14T00:00:00Z")
    minute_close = {pd.Timestamp(b["t"]) + pd.Timedelta(minutes=1): b["c"] for b in minutes}
    bar_time = pd.Timestamp("2018-04-11 11:00", tz=NY)
    spot = market.spot_bars()
    assert spot.loc[bar_time] == minute_close[bar_time.tz_convert("UTC")]
    bars = store.read_bars("SPY", "2018-04-11", "2018-04-11").to_pandas()
    five = bars[bars["minutes"] == 5].set_index("time")
    window = [minute_close[(bar_time - pd.Timedelta(minutes=k)).tz_convert("UTC")] for k in range(5)]
    assert five.loc[bar_time, "close"] == window[0]
    assert len(bars[bars["minutes"] == 1]) == 390 and len(five) == 78

    # The expanded quote at 16:00 of a session is the vendor's own snapshot repriced at the same spot,
    # IV, rate (--rate 0.015 = the fake's) and time: the vendor's numbers come back.
    close_time = pd.Timestamp("2018-04-12 16:00", tz=NY)
    chains = store.read_chains("2018-04-12", "2018-04-12").to_pandas()
    at_close = chains[chains["quote_time"] == close_time]
    assert len(at_close) == 100 and at_close["source"].str.startswith("expanded:").all()
    row = at_close.sort_values(["expiration", "strike"]).iloc[len(at_close) // 2]
    vendor = options.model_row("2018-04-12", row["expiration"], row["strike"], row["option_type"])
    assert row["underlying_price"] == vendor["stock_price_for_iv"] == spot.loc[close_time]
    assert row["iv"] == pytest.approx(vendor["iv"], abs=1e-9)
    assert row["delta"] == pytest.approx(vendor["delta"], abs=2e-5)
    assert row["bid"] == pytest.approx(vendor["bid"], abs=0.011) and row["ask"] == pytest.approx(vendor["ask"], abs=0.011)

    # The same command again: every step skipped, nothing asked of either vendor, the store untouched.
    before = requests_of(vendors)
    manifest = (final / "manifest.json").read_text()
    status, text, err = pipeline(argv, capsys)
    assert status == 0, err
    assert text.count("complete (") == 4 and "skipped" in text
    assert requests_of(vendors) == before and (final / "manifest.json").read_text() == manifest

    # --force merge: merge and expand again from the downloaded files, still no request.
    status, text, err = pipeline(argv + ["--force", "merge"], capsys)
    assert status == 0, err
    assert "[1/4] bars: complete" in text and "[2/4] options: complete" in text
    assert "[3/4] merge: 1 option file(s) + 1 bar file(s)" in text and "[4/4] expand: 5-minute" in text
    assert requests_of(vendors) == before
    rebuilt = ChainStore.open(final).read_chains("2018-04-12", "2018-04-12").to_pandas()
    assert len(rebuilt) == len(chains) and np.allclose(rebuilt["bid"], chains["bid"], equal_nan=True)

    # --force bars: the month file is fetched again (one request), the options are not.
    status, text, err = pipeline(argv + ["--force", "bars"], capsys)
    assert status == 0, err
    assert "[1/4] bars: SPY 1-minute bars" in text and "[2/4] options: complete" in text
    assert requests_of(vendors) == (before[0] + 1, before[1])

    # 15 minutes: the expansion at 15-minute closes = every third bar of the 5-minute one.
    merging.expand(out / "SPY-eod", tmp_path / "x15", 15, "SPY", START, END, rate=0.015, dte_max=60)
    fifteen = ChainStore.open(tmp_path / "x15").read_chains().to_pandas()
    five_chains = store.read_chains().to_pandas()
    assert set(fifteen["quote_time"].dt.minute % 15) == {0} and fifteen["quote_time"].nunique() == 5 * 26
    key = ["quote_time", "expiration", "strike", "option_type"]
    joined = fifteen.merge(five_chains, on=key, suffixes=("_15", "_5"))
    assert len(joined) == len(fifteen)
    for column in ("bid", "ask", "iv", "delta", "underlying_price"):
        assert np.allclose(joined[f"{column}_15"], joined[f"{column}_5"], equal_nan=True)


def test_pipeline_checks_keys_and_servers_before_any_step(vendors, vendor_env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pipeline"
    argv = ["--start", START, "--end", END, "--out", str(out), "--request-interval", "0", "--no-progress"]
    before = requests_of(vendors)
    port = closed_port()
    cases = [
        (lambda: monkeypatch.delenv(ivol.API_KEY_ENV), "error: no IVolatility API key"),
        (lambda: monkeypatch.delenv("APCA_API_SECRET_KEY"), "error: APCA_API_SECRET_KEY is not set"),
        (lambda: (monkeypatch.delenv("APCA_API_KEY_ID"), monkeypatch.delenv("APCA_API_SECRET_KEY")),
         "error: no Alpaca keys"),
        (lambda: monkeypatch.setenv(ivol.API_URL_ENV, ""), "error: IVOLATILITY_API_URL is set but empty"),
        (lambda: monkeypatch.setenv("APCA_API_DATA_URL", ""), "error: APCA_API_DATA_URL is set but empty"),
        (lambda: monkeypatch.setenv(ivol.API_URL_ENV, f"http://127.0.0.1:{port}"),
         f"error: cannot reach IVolatility's API at http://127.0.0.1:{port} (connection refused)"),
        (lambda: monkeypatch.setenv("APCA_API_DATA_URL", f"http://127.0.0.1:{port}"),
         f"error: cannot reach Alpaca's market-data API at http://127.0.0.1:{port} (connection refused)"),
    ]
    for change, message in cases:
        with monkeypatch.context() as patch:
            monkeypatch = patch
            change()
            status, text, err = pipeline(argv, capsys)
        assert status == 2 and err.strip() == err.strip().splitlines()[0] and err.startswith(message), (message, err)
        assert KEY not in err + text and "test-secret" not in err + text
    assert requests_of(vendors) == before and not out.exists()

    # Your own bars (--bars): no Alpaca step, so no Alpaca keys needed.
    alpaca, _ = vendors
    own = write_bar_csv(alpaca_bars(alpaca, "1Min", "2018-04-09T00:00:00Z", "2018-04-14T00:00:00Z"),
                        tmp_path / "own" / "spy.csv")
    monkeypatch.delenv("APCA_API_KEY_ID")
    monkeypatch.delenv("APCA_API_SECRET_KEY")
    before = requests_of(vendors)
    status, text, err = pipeline(argv + ["--bars", str(own.parent)], capsys)
    assert status == 0, err
    assert f"[1/4] bars: using your bars in {own.parent} (1 file(s)); no download" in text
    assert requests_of(vendors)[0] == before[0] and (out / "SPY-5min" / "manifest.json").is_file()
