"""User option data: ingest throughput and memory, a day's slice from a five-year store, and a
backtest's bars/s on a store against the synthetic provider. Prints figures; asserts nothing.

1. **Ingest.** Writes a vendor-format file of ``--gigabytes`` (Cboe DataShop EOD Summary, long;
   and OptionsDX, wide, half the size) with numpy + pyarrow, then runs ``--mode ingest`` on it in
   a child process and reads the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``).
   Targets: ≥ 1,000,000 canonical rows/s, < 2 GiB peak whatever the file size.
2. **Slice latency.** A five-year store (EOD chains, 2014-2018, every listed contract) built from
   generated canonical rows; then the 30-45 DTE slice of 50 random sessions through
   ``ChainStore.read_chains`` (median and worst, warm), and the first query of a fresh process'
   store (cold open included).
3. **Backtest bars/s.** The fast driver over one month of 5-minute chains served from a store
   (``VendorChainMarket``) against the same month on the synthetic provider it was cut from.

Usage: .venv/bin/python benchmarks/bench_user_data.py [--gigabytes 2] [--keep DIR]
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_factory.market_calendar import trading_sessions  # noqa: E402

CBOE_COLUMNS = ("underlying_symbol", "quote_date", "root", "expiration", "strike", "option_type", "open", "high",
                "low", "close", "trade_volume", "bid_size_1545", "bid_1545", "ask_size_1545", "ask_1545",
                "underlying_bid_1545", "underlying_ask_1545", "implied_underlying_price_1545",
                "active_underlying_price_1545", "implied_volatility_1545", "delta_1545", "gamma_1545", "theta_1545",
                "vega_1545", "rho_1545", "bid_size_eod", "bid_eod", "ask_size_eod", "ask_eod", "underlying_bid_eod",
                "underlying_ask_eod", "vwap", "open_interest", "delivery_code")
OPTIONSDX_COLUMNS = ("QUOTE_UNIXTIME", "QUOTE_READTIME", "QUOTE_DATE", "QUOTE_TIME_HOURS", "UNDERLYING_LAST",
                     "EXPIRE_DATE", "EXPIRE_UNIX", "DTE", "C_DELTA", "C_GAMMA", "C_VEGA", "C_THETA", "C_RHO", "C_IV",
                     "C_VOLUME", "C_LAST", "C_SIZE", "C_BID", "C_ASK", "STRIKE", "P_BID", "P_ASK", "P_SIZE", "P_LAST",
                     "P_DELTA", "P_GAMMA", "P_VEGA", "P_THETA", "P_RHO", "P_IV", "P_VOLUME", "STRIKE_DISTANCE",
                     "STRIKE_DISTANCE_PCT")


def _day_grid(sessions: pd.DatetimeIndex, day: int, strikes_per_expiry: int, expirations: int):
    """(expiration dates, strikes) of one quote day: the next ``expirations`` sessions a week
    apart, strikes a dollar apart around 250."""
    expiry = sessions[np.minimum(day + 5 * np.arange(1, expirations + 1), len(sessions) - 1)]
    strikes = 250.0 - strikes_per_expiry // 2 + np.arange(strikes_per_expiry, dtype=float)
    return np.repeat(expiry.strftime("%Y-%m-%d").to_numpy(), strikes_per_expiry), np.tile(strikes, expirations)


def write_cboe(path: Path, gigabytes: float) -> int:
    """A Cboe EOD Summary CSV of about ``gigabytes``; returns its rows."""
    sessions = trading_sessions("2010-01-04", "2025-12-31")
    per_day_expiry, strikes = 12, 200
    rows_per_day = 2 * per_day_expiry * strikes
    target = int(gigabytes * 2**30)
    written = rows = day = 0
    rng = np.random.default_rng(7)
    with pacsv.CSVWriter(path, pa.schema([(name, pa.string()) for name in CBOE_COLUMNS])) as writer:
        while written < target and day < len(sessions) - 70:
            expiry, strike = _day_grid(sessions, day, strikes, per_day_expiry)
            n = rows_per_day
            expiry = np.concatenate([expiry, expiry])
            strike = np.concatenate([strike, strike])
            kind = np.repeat(np.array(["C", "P"]), n // 2)
            mid = np.round(np.abs(rng.normal(3.0, 2.0, n)) + 0.05, 2)
            bid = np.round(mid - 0.02, 2)
            ask = np.round(mid + 0.03, 2)
            columns = {name: np.full(n, "0") for name in CBOE_COLUMNS}
            columns.update({
                "underlying_symbol": np.full(n, "SPY"), "quote_date": np.full(n, sessions[day].strftime("%Y-%m-%d")),
                "root": np.full(n, "SPY"), "expiration": expiry, "strike": strike.astype(str), "option_type": kind,
                "bid_1545": bid.astype(str), "ask_1545": ask.astype(str), "bid_eod": bid.astype(str),
                "ask_eod": ask.astype(str), "active_underlying_price_1545": np.full(n, "250.12"),
                "implied_volatility_1545": np.round(rng.uniform(0.1, 0.4, n), 4).astype(str),
                "delta_1545": np.round(rng.uniform(-1, 1, n), 4).astype(str),
                "gamma_1545": np.round(rng.uniform(0, 0.1, n), 4).astype(str),
                "theta_1545": np.round(-rng.uniform(0, 0.2, n), 4).astype(str),
                "vega_1545": np.round(rng.uniform(0, 0.5, n), 4).astype(str),
                "open_interest": rng.integers(0, 5000, n).astype(str), "delivery_code": np.full(n, "")})
            table = pa.table({name: pa.array(columns[name]) for name in CBOE_COLUMNS})
            writer.write_table(table)
            rows += n
            day += 1
            written = path.stat().st_size if day % 20 == 0 else written + n * 190
    return rows


def write_optionsdx(path: Path, gigabytes: float) -> int:
    """An OptionsDX EOD text file of about ``gigabytes`` (wide: one line per strike, C and P);
    returns its CANONICAL rows (two per line)."""
    sessions = trading_sessions("2010-01-04", "2025-12-31")
    per_day_expiry, strikes = 12, 200
    target = int(gigabytes * 2**30)
    lines = day = 0
    rng = np.random.default_rng(8)
    with open(path, "w") as out:
        out.write(", ".join(f"[{name}]" for name in OPTIONSDX_COLUMNS) + "\n")
        while out.tell() < target and day < len(sessions) - 70:
            expiry, strike = _day_grid(sessions, day, strikes, per_day_expiry)
            n = strike.size
            stamp = sessions[day] + pd.Timedelta(hours=16)
            unix = int(stamp.tz_localize("America/New_York").timestamp())
            quote = stamp.strftime("%Y-%m-%d")
            cmid = np.round(np.abs(rng.normal(3.0, 2.0, n)) + 0.05, 2)
            pmid = np.round(np.abs(rng.normal(3.0, 2.0, n)) + 0.05, 2)
            frame = pd.DataFrame({
                "QUOTE_UNIXTIME": unix, "QUOTE_READTIME": f"{quote} 16:00", "QUOTE_DATE": quote,
                "QUOTE_TIME_HOURS": "16.000000", "UNDERLYING_LAST": "250.12", "EXPIRE_DATE": expiry,
                "EXPIRE_UNIX": unix + 86400 * 7, "DTE": "7.0",
                "C_DELTA": np.round(rng.uniform(0, 1, n), 5), "C_GAMMA": np.round(rng.uniform(0, 0.1, n), 5),
                "C_VEGA": np.round(rng.uniform(0, 0.5, n), 5), "C_THETA": np.round(-rng.uniform(0, 0.2, n), 5),
                "C_RHO": "0.01", "C_IV": np.round(rng.uniform(0.1, 0.4, n), 5), "C_VOLUME": "10", "C_LAST": cmid,
                "C_SIZE": "10 x 12", "C_BID": np.round(cmid - 0.02, 2), "C_ASK": np.round(cmid + 0.03, 2),
                "STRIKE": strike, "P_BID": np.round(pmid - 0.02, 2), "P_ASK": np.round(pmid + 0.03, 2),
                "P_SIZE": "8 x 9", "P_LAST": pmid, "P_DELTA": np.round(-rng.uniform(0, 1, n), 5),
                "P_GAMMA": np.round(rng.uniform(0, 0.1, n), 5), "P_VEGA": np.round(rng.uniform(0, 0.5, n), 5),
                "P_THETA": np.round(-rng.uniform(0, 0.2, n), 5), "P_RHO": "-0.01",
                "P_IV": np.round(rng.uniform(0.1, 0.4, n), 5), "P_VOLUME": "", "STRIKE_DISTANCE": "1.0",
                "STRIKE_DISTANCE_PCT": "0.004"})
            out.write(frame.to_csv(header=False, index=False, sep="\t").replace("\t", ", "))
            lines += n
            day += 1
    return 2 * lines


def ingest_in_child(file: Path, store: Path, fmt: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``--mode ingest`` in a child process."""
    shutil.rmtree(store, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "core" / "main.py"), "--mode", "ingest", "--input", str(file),
                    "--format", fmt, "--store", str(store)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (peak RSS of this child not above an earlier child's; figure is a lower bound)")
    return seconds, peak * 1024


def parse_only_in_child(file: Path) -> float:
    """Seconds for pyarrow's streaming CSV reader to parse ``file`` (types inferred, every column,
    batches dropped) in a fresh process: the floor any pyarrow-based loader stands on."""
    code = ("import sys, time\nimport pyarrow.csv as c\nt = time.perf_counter()\n"
            "options = c.ParseOptions(delimiter=',')\n"
            "n = sum(b.num_rows for b in c.open_csv(sys.argv[1], parse_options=options))\n"
            "print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code, str(file)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def bench_ingest(folder: Path, gigabytes: float) -> None:
    print(f"\n1. ingest (one child process each; targets ≥ 1,000,000 rows/s, < 2 GiB peak RSS)")
    for name, writer, fmt, size in (("cboe", write_cboe, "cboe", gigabytes),
                                    ("optionsdx", write_optionsdx, "optionsdx", gigabytes / 2)):
        file = folder / f"{name}.csv"
        started = time.perf_counter()
        rows = writer(file, size)
        made = time.perf_counter() - started
        seconds, peak = ingest_in_child(file, folder / f"store-{name}", fmt)
        anchor = parse_only_in_child(file)
        lines = rows // 2 if name == "optionsdx" else rows
        print(f"  {name:10s} file {file.stat().st_size / 2**30:5.2f} GiB ({made:5.1f} s to write), {rows:,} canonical "
              f"rows: ingest {seconds:6.1f} s = {rows / seconds:,.0f} rows/s (process start included); "
              f"peak RSS {peak / 2**30:4.2f} GiB")
        print(f"  {'':10s} anchor: pyarrow.csv streaming parse of the same file, no transform, no write: "
              f"{anchor:6.1f} s = {lines / anchor:,.0f} lines/s; ingest / anchor time {seconds / anchor:4.2f}x")
        file.unlink()
        shutil.rmtree(folder / f"store-{name}", ignore_errors=True)


def five_year_store(folder: Path) -> Path:
    """A 2014-2018 EOD store: every session, 16 expirations × 2 × 120 strikes (3,840 rows a day)."""
    from data_factory.canonical import CHAIN_SCHEMA
    from data_factory.chain_store import ingest
    import pyarrow.parquet as pq

    sessions = trading_sessions("2014-01-02", "2018-12-31")
    parts = folder / "five-year-parts"
    parts.mkdir()
    rng = np.random.default_rng(3)
    for year in range(2014, 2019):
        days = sessions[sessions.year == year]
        tables = []
        for day_index, day in enumerate(days):
            position = int(sessions.get_loc(day))
            expiry = sessions[np.minimum(position + 4 * np.arange(1, 17), len(sessions) - 1)]
            strikes = 180.0 + np.arange(120, dtype=float)
            n = 16 * 2 * 120
            quote = pd.Timestamp(day).tz_localize("America/New_York") + pd.Timedelta(hours=15, minutes=45)
            mid = np.abs(rng.normal(3, 2, n)) + 0.05
            tables.append(pa.table({
                "quote_time": pa.array(np.full(n, quote.value), pa.int64()).cast(pa.timestamp("ns")).cast(
                    pa.timestamp("ns", tz="UTC")).cast(CHAIN_SCHEMA.field("quote_time").type),
                "underlying": pa.array(np.full(n, "SPY")), "underlying_price": np.full(n, 240.0),
                "expiration": pa.array(np.repeat(expiry.to_numpy().astype("datetime64[D]"), 240), pa.date32()),
                "settlement": pa.array(np.full(n, "PM")), "strike": np.tile(np.tile(strikes, 2), 16),
                "option_type": pa.array(np.tile(np.repeat(np.array(["C", "P"]), 120), 16)),
                "bid": mid - 0.02, "ask": mid + 0.03, "last": np.full(n, np.nan),
                "volume": pa.array(np.zeros(n, dtype=np.int64)), "open_interest": pa.array(np.zeros(n, dtype=np.int64)),
                "iv": rng.uniform(0.1, 0.3, n), "delta": rng.uniform(-1, 1, n), "gamma": rng.uniform(0, 0.1, n),
                "theta": -rng.uniform(0, 0.1, n), "vega": rng.uniform(0, 0.5, n),
                "source": pa.array(np.full(n, "bench"))}, schema=CHAIN_SCHEMA))
        pq.write_table(pa.concat_tables(tables), parts / f"{year}.parquet")
    store = folder / "five-year-store"
    ingest([parts], store)
    shutil.rmtree(parts)
    return store


def bench_slices(folder: Path) -> None:
    from data_factory.chain_store import ChainStore

    started = time.perf_counter()
    store_dir = five_year_store(folder)
    built = time.perf_counter() - started
    store = ChainStore.open(store_dir)
    days = store.dates()
    print(f"\n2. one day's 30-45 DTE slice from a five-year store ({len(days):,} sessions, "
          f"{store.manifest['chain_rows']:,} rows; built in {built:.1f} s)")
    cold = subprocess.run([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); t = time.perf_counter()\n"
        "from data_factory.chain_store import ChainStore\n"
        "s = ChainStore.open(%r); n = s.read_chains('2016-06-15', '2016-06-15', dte_min=30, dte_max=45).num_rows\n"
        "print(time.perf_counter() - t, n)") % (str(ROOT), str(store_dir))], capture_output=True, text=True, check=True)
    cold_s, cold_rows = cold.stdout.split()
    rng = np.random.default_rng(11)
    picks = days[rng.choice(len(days), 50, replace=False)]
    times, rows = [], []
    for day in picks:
        t = time.perf_counter()
        table = store.read_chains(day, day, dte_min=30, dte_max=45)
        times.append(time.perf_counter() - t)
        rows.append(table.num_rows)
    print(f"  cold (fresh process: imports + open + first query): {float(cold_s) * 1000:7.1f} ms ({cold_rows} rows)")
    print(f"  warm, 50 random sessions: median {statistics.median(times) * 1000:6.1f} ms, worst "
          f"{max(times) * 1000:6.1f} ms, {statistics.median(rows):.0f} rows each")
    shutil.rmtree(store_dir)


def bench_backtest(folder: Path) -> None:
    from core.backtest_engine import run_backtest
    from core.config import Config
    from core.market_data import bar_features
    from data_factory.chain_store import ChainStore, write_chain_table
    from data_factory.option_chain import SyntheticChainProvider
    from data_factory.vendor_market import VendorChainMarket
    from tests.chain_fixtures import canonical_from_slices

    start, end = "2018-03-01", "2018-03-29"
    provider = SyntheticChainProvider.from_embedded(start=start, end=end, seed=42)
    slices = [provider.slice_at(bar, dte_min=0, dte_max=60) for bar in range(len(provider.bar_times))]
    table = canonical_from_slices(slices)
    write_chain_table(table, folder / "month-store")
    store = ChainStore.open(folder / "month-store")
    t = time.perf_counter()
    market = VendorChainMarket.from_store(store, dte_cap=60)
    built = time.perf_counter() - t
    config = Config().override({"backtest.start": start, "backtest.end": end, "backtest.engine": "fast",
                                "backtest.options_data": str(folder / "month-store")})
    synthetic_config = config.override({"backtest.options_data": None})
    print(f"\n3. fast-driver backtest, one month of 5-minute chains ({len(market.bar_times):,} bars, "
          f"{table.num_rows:,} rows in the store; market built from the store in {built:.1f} s)")
    for label, run_config, source in (("store (VendorChainMarket)", config, market),
                                      ("synthetic provider       ", synthetic_config, provider)):
        features = bar_features(run_config, source)
        best = min(run_backtest(run_config, source, features=features).seconds for _ in range(3))
        result = run_backtest(run_config, source, features=features)
        print(f"  {label} {result.bars / best:9,.0f} bars/s  ({best:.2f} s, {len(result.trades)} trades)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the generated Cboe file")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-user-data-"))
    try:
        if not args.skip_ingest:
            bench_ingest(folder, args.gigabytes)
        bench_slices(folder)
        bench_backtest(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
