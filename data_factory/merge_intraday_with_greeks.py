"""Option chains with Greeks + the underlying's intraday bars → ONE chain store, then (optionally)
the EXPANDED intraday chain store at 1, 5 or 15 minutes ("merges and resamples to M1/M5/M15").

    python data_factory/merge_intraday_with_greeks.py --options data/ivolatility --bars data/alpaca \
        --store data/stores/spy-eod
    python data_factory/merge_intraday_with_greeks.py --options data/ivolatility --bars data/alpaca \
        --store data/stores/spy-eod --minutes 5 --expanded data/stores/spy-5min --dte-max 60
    python data_factory/merge_intraday_with_greeks.py --store data/stores/spy-eod --minutes 15   # expand only

Step 1, the merged store (``merge``)
------------------------------------
* Options: IVolatility monthly CSVs (``download_ivolatility_options.py``), any vendor files
  ``data_factory.vendor_formats`` reads (detected per file, or ``--options-format``), folders of
  them (``.csv``/``.txt``/``.zip``/``.parquet`` files; manifests and hidden files are not inputs), or
  a chain store (its chain Parquet files). With ``start``/``end`` only those sessions are kept.
* Bars: the underlying's intraday bars (the Alpaca CSVs of ``download_alpaca_matched.py``, any
  ``stock_bars`` file, folders, or a chain store holding bars), one bar width (the finest given;
  usually 1 minute). Kept: regular-session bars only (close in (open, close] of an NYSE session,
  13:00 on half days; extended-hours bars would otherwise become decision bars downstream),
  ``start … end`` when given; exact duplicate stamps keep the last file's bar (counted).
* Gaps: a run of at most ``fill_gaps`` missing bars inside a session (IEX minute bars skip minutes
  without a trade) is filled with flat bars at the previous close (a leading run: at the first
  bar's open), volume 0, ``source`` ``stock_bars:filled`` — marked, counted, never silent. Longer
  runs stay missing (the expansion then names the session). ``fill_gaps=0`` fills nothing.
* Resampling: from the input width to every coarser width of 5 and 15 minutes it divides,
  close-stamped buckets on the session grid (a bar closing at 09:31 … 09:35 is in the 09:35 bar):
  open = first open, high = max, low = min, close = last close, volume = sum, ``source``
  ``stock_bars:resampled``. The store keeps every width (``minutes`` column): 1-minute bars for a
  1-minute expansion, 5-minute bars for the backtest's spot (``VendorChainMarket.from_store`` reads
  5-minute bars), 15-minute bars for a 15-minute expansion.
* All of it goes in through ``chain_store.ingest`` into a hidden folder next to ``store_dir`` that
  is renamed into place when complete: a failed merge leaves no store. The manifest gets a
  ``merge`` entry (inputs, widths, fills, sessions of chains only / bars only).

Step 2, the expanded store (``expand``)
---------------------------------------
``data_factory.expand_options_intraday`` (its ``run``: Black–Scholes sticky-strike interpolation
along the store's own bars, no look-ahead; every row's ``source`` starts with ``expanded:``; MODEL
quotes, not vendor quotes), then the merged store's bars are added, so the expanded store is
self-contained (chains + bars): what ``VendorChainMarket.from_store`` and ``--mode backtest`` load.

15 minutes: the expansion's CLI offers 1 and 5; its ``expand_daily_chains`` prices any width, and a
bar's quotes depend only on its close time, its spot and the last snapshot at or before it. So a
15-minute expansion is run directly on the 15-minute bars, and it equals taking every third bar of
the 5-minute expansion (the 15-minute bar's close is the close of its last 5-minute bar; the test
suite checks the values).

Exit status 0 done, 2 bad input (one ``error:`` line).
"""
from __future__ import annotations

import sys
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python data_factory/merge_intraday_with_greeks.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data_factory.canonical import BAR_SCHEMA, CHAIN_SCHEMA, EXCHANGE_TZ  # noqa: E402
from data_factory.errors import DataError  # noqa: E402

INPUT_SUFFIXES = (".csv", ".txt", ".zip", ".parquet")
RESAMPLE_WIDTHS = (5, 15)
EXPAND_WIDTHS = (1, 5, 15)
DEFAULT_FILL_GAPS = 5
FILLED_SOURCE = "stock_bars:filled"
RESAMPLED_SOURCE = "stock_bars:resampled"
_NS_PER_MIN = 60 * 1_000_000_000


# ============================================================================== inputs
def _is_store(path: Path) -> bool:
    from data_factory.chain_store import ChainStore

    return ChainStore.is_store(path)


def input_files(paths, what: str) -> list[Path]:
    """The data files ``paths`` name: files as given; folders → their ``INPUT_SUFFIXES`` files
    (recursively, sorted, hidden ones and manifests left out). A chain store is returned as itself."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir() and _is_store(path):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: the folder holds no {what} files ({', '.join(INPUT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file, folder or chain store ({what})")
    if not files:
        raise DataError(f"no {what} input given")
    return files


def _session_range(start, end):
    from data_factory.market_calendar import exchange_date

    first = exchange_date(start, "--start").date() if start is not None else None
    last = exchange_date(end, "--end").date() if end is not None else None
    if first and last and first > last:
        raise DataError(f"--start {first} is after --end {last}")
    return first, last


def _chain_parts(files: list[Path], fmt: str | None, on_bad_rows: str, symbol: str, first, last,
                 scratch: Path) -> tuple[list[Path], list[dict]]:
    """Canonical chain Parquet files of the option inputs (the sessions ``first … last`` only),
    and a report per input."""
    from data_factory import vendor_formats

    out, reports = [], []
    for number, path in enumerate(files):
        if path.is_dir():                        # a chain store: its partitions' Parquet files
            parts = sorted(path.glob("chains/date=*/*.parquet"))
            batches = (pa.Table.from_batches([b]) for part in parts
                       for b in pq.ParquetFile(part).iter_batches(batch_size=256_000, columns=list(CHAIN_SCHEMA.names)))
            report = None
            fmt_name = "chain store"
        elif path.suffix.lower() == ".parquet":
            batches = (pa.Table.from_batches([b]) for b in
                       pq.ParquetFile(path).iter_batches(batch_size=256_000, columns=list(CHAIN_SCHEMA.names)))
            report, fmt_name = None, "canonical_parquet"
        else:
            report = vendor_formats.BadRowReport()
            fmt_name = fmt or vendor_formats.detect_format(path)
            if vendor_formats.format_kind(fmt_name) != "chain":
                raise DataError(f"{path}: a {fmt_name} file holds bars, not option chains (give it with --bars)")
            batches = vendor_formats.iter_chain_batches(path, fmt_name, on_bad_rows=on_bad_rows, report=report,
                                                        underlying=symbol)
        target = scratch / f"chains-{number:04d}.parquet"
        writer, rows, kept_rows = None, 0, 0
        try:
            for batch in batches:
                batch = batch.select(list(CHAIN_SCHEMA.names)).cast(CHAIN_SCHEMA)
                rows += batch.num_rows
                batch = batch.filter(pc.equal(batch.column("underlying"), symbol))
                if first is not None or last is not None:
                    days = pc.cast(pc.local_timestamp(batch.column("quote_time")), pa.date32())
                    mask = pa.array(np.ones(batch.num_rows, dtype=bool))
                    if first is not None:
                        mask = pc.and_(mask, pc.greater_equal(days, pa.scalar(first, pa.date32())))
                    if last is not None:
                        mask = pc.and_(mask, pc.less_equal(days, pa.scalar(last, pa.date32())))
                    batch = batch.filter(mask)
                if not batch.num_rows:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(target, CHAIN_SCHEMA)
                writer.write_table(batch)
                kept_rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        entry = {"path": str(path), "format": fmt_name, "rows": rows, "kept": kept_rows}
        if report is not None:
            entry["bad_rows"] = {k: v for k, v in report.counts.items() if v}
        reports.append(entry)
        if writer is not None:
            out.append(target)
    if not out:
        span = f" between {first or '…'} and {last or '…'}" if (first or last) else ""
        raise DataError(f"no {symbol} option rows{span} in {', '.join(str(f) for f in files[:3])}"
                        f"{' …' if len(files) > 3 else ''}")
    return out, reports


def load_bars(paths, symbol: str, on_bad_rows: str = "stop") -> tuple[pa.Table, list[dict]]:
    """The ``symbol`` bars of ``paths`` (files, folders, chain stores) as one BAR_SCHEMA table
    sorted by time, and a report per input."""
    from data_factory import vendor_formats
    from data_factory.chain_store import ChainStore

    tables, reports = [], []
    for path in input_files(paths, "bar"):
        if path.is_dir():
            table = ChainStore.open(path).read_bars(symbol)
            if table is None or not table.num_rows:
                raise DataError(f"{path}: the store holds no {symbol} bars")
            table = table.select(list(BAR_SCHEMA.names)).cast(BAR_SCHEMA)
            reports.append({"path": str(path), "format": "chain store", "rows": table.num_rows})
        elif path.suffix.lower() == ".parquet":
            table = pq.read_table(path).select(list(BAR_SCHEMA.names)).cast(BAR_SCHEMA)
            reports.append({"path": str(path), "format": "canonical_parquet", "rows": table.num_rows})
        else:
            fmt = vendor_formats.detect_format(path)
            if vendor_formats.format_kind(fmt) != "bars":
                raise DataError(f"{path}: a {fmt} file holds option chains, not bars (give it with --options)")
            table, report = vendor_formats.load_file(path, fmt, on_bad_rows=on_bad_rows, symbol=symbol)
            reports.append({"path": str(path), "format": fmt, "rows": table.num_rows,
                            "bad_rows": {k: v for k, v in report.counts.items() if v}})
        table = table.filter(pc.equal(table.column("symbol"), symbol))
        if table.num_rows:
            tables.append(table)
    if not tables:
        raise DataError(f"no {symbol} bars in {', '.join(str(p) for p in paths)}")
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, [("time", "ascending")])), reports


# ============================================================================== bars
def _frame(table: pa.Table) -> pd.DataFrame:
    frame = pd.DataFrame({name: table.column(name).to_numpy(zero_copy_only=False)
                          for name in ("open", "high", "low", "close", "volume", "minutes")})
    frame["ns"] = pc.cast(table.column("time"), pa.int64()).to_numpy()
    frame["source"] = table.column("source").to_numpy(zero_copy_only=False)
    return frame


def _table(frame: pd.DataFrame, symbol: str) -> pa.Table:
    return pa.table({
        "time": pa.array(frame["ns"].to_numpy(dtype=np.int64), pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
                  .cast(pa.timestamp("ns", tz=EXCHANGE_TZ)),
        "symbol": pa.array(np.full(len(frame), symbol, dtype=object), pa.string()),
        "minutes": pa.array(frame["minutes"].to_numpy(dtype=np.int32), pa.int32()),
        **{name: pa.array(frame[name].to_numpy(dtype=float), pa.float64()) for name in ("open", "high", "low", "close")},
        "volume": pa.array(frame["volume"].to_numpy(dtype=float), pa.float64()),
        "source": pa.array(frame["source"].astype(str).to_numpy(dtype=object), pa.string()),
    }).cast(BAR_SCHEMA)


def prepare_bars(table: pa.Table, symbol: str, first=None, last=None, fill_gaps: int = DEFAULT_FILL_GAPS
                 ) -> tuple[dict[int, pa.Table], dict]:
    """Bars of one width → {width: BAR_SCHEMA table} for that width and every resampled width,
    regular sessions ``first … last`` only, short gaps filled (module docstring); and a report."""
    from data_factory.expand_options_intraday import session_grid
    from data_factory.market_calendar import session_bounds, trading_sessions

    widths = sorted(int(w) for w in pc.unique(table.column("minutes")).to_pylist())
    width = widths[0]
    if width >= 1440:
        raise DataError(f"the {symbol} bars are daily bars: intraday bars are needed (1-minute from Alpaca)")
    frame = _frame(table)
    frame = frame[frame["minutes"] == width]
    dropped_widths = [w for w in widths if w != width]
    report = {"input_minutes": width, "input_bars": int(len(frame)), "other_widths_ignored": dropped_widths}
    frame = frame.drop_duplicates("ns", keep="last")
    report["duplicates"] = int(report["input_bars"] - len(frame))
    local = pd.DatetimeIndex(pd.to_datetime(frame["ns"].to_numpy(), utc=True)).tz_convert(EXCHANGE_TZ)
    days = local.tz_localize(None).normalize()
    if first is not None or last is not None:
        keep = np.ones(len(frame), dtype=bool)
        if first is not None:
            keep &= days >= pd.Timestamp(first)
        if last is not None:
            keep &= days <= pd.Timestamp(last)
        frame, days = frame[keep], days[keep]
    if not len(frame):
        raise DataError(f"no {symbol} bars between {first or '…'} and {last or '…'}")
    sessions = trading_sessions(days.min(), days.max())
    bounds = session_bounds(sessions)
    open_ns = pd.DatetimeIndex(bounds["open"]).tz_convert("UTC").as_unit("ns").asi8
    close_ns = pd.DatetimeIndex(bounds["close"]).tz_convert("UTC").as_unit("ns").asi8
    at = np.searchsorted(sessions.as_unit("ns").asi8, days.as_unit("ns").asi8)
    at_clipped = np.minimum(at, len(sessions) - 1)
    in_session = (at < len(sessions)) & (sessions.as_unit("ns").asi8[at_clipped] == days.as_unit("ns").asi8)
    ns = frame["ns"].to_numpy()
    regular = in_session & (ns > open_ns[at_clipped]) & (ns <= close_ns[at_clipped])
    report["outside_regular_hours"] = int((~regular).sum())
    frame = frame[regular].sort_values("ns").reset_index(drop=True)
    if not len(frame):
        raise DataError(f"no {symbol} bars inside the regular sessions between {first or '…'} and {last or '…'}")
    present = pd.DatetimeIndex(pd.unique(pd.DatetimeIndex(pd.to_datetime(frame["ns"].to_numpy(), utc=True))
                                         .tz_convert(EXCHANGE_TZ).tz_localize(None).normalize()))

    # ---- gaps
    filled_rows, long_gaps, filled = [], [], 0
    step = width * _NS_PER_MIN
    ns = frame["ns"].to_numpy()
    for session, grid in zip(present, session_grid(present, width)):
        lo, hi = np.searchsorted(ns, grid[0]), np.searchsorted(ns, grid[-1], side="right")
        have = ns[lo:hi]
        missing = np.setdiff1d(grid, have, assume_unique=True)
        if not missing.size:
            continue
        runs = np.split(missing, np.flatnonzero(np.diff(missing) != step) + 1)
        for run in runs:
            if fill_gaps <= 0 or run.size > fill_gaps:
                long_gaps.append((str(session.date()), int(run.size)))
                continue
            before = np.searchsorted(ns, run[0]) - 1
            if before >= lo:
                price = float(frame["close"].iat[before])
            else:
                price = float(frame["open"].iat[lo]) if np.isfinite(frame["open"].iat[lo]) \
                    else float(frame["close"].iat[lo])
            for stamp in run:
                filled_rows.append((int(stamp), price))
            filled += int(run.size)
    if filled_rows:
        extra = pd.DataFrame({"ns": [r[0] for r in filled_rows], "open": [r[1] for r in filled_rows],
                              "high": [r[1] for r in filled_rows], "low": [r[1] for r in filled_rows],
                              "close": [r[1] for r in filled_rows], "volume": 0.0, "minutes": width,
                              "source": FILLED_SOURCE})
        frame = pd.concat([frame, extra], ignore_index=True).sort_values("ns").reset_index(drop=True)
    report.update({"filled_bars": filled, "unfilled_gaps": long_gaps[:20], "unfilled_gap_count": len(long_gaps),
                   "sessions": len(present), "first_session": str(present[0].date()),
                   "last_session": str(present[-1].date())})

    out = {width: _table(frame, symbol)}
    for target in RESAMPLE_WIDTHS:
        if target <= width or target % width:
            continue
        tstep = target * _NS_PER_MIN
        bucket = -((-frame["ns"].to_numpy()) // tstep) * tstep
        grouped = frame.assign(bucket=bucket).groupby("bucket", sort=True)
        resampled = pd.DataFrame({"ns": grouped["ns"].max().index.to_numpy(), "open": grouped["open"].first().to_numpy(),
                                  "high": grouped["high"].max().to_numpy(), "low": grouped["low"].min().to_numpy(),
                                  "close": grouped["close"].last().to_numpy(),
                                  "volume": grouped["volume"].sum(min_count=1).to_numpy()})
        resampled["minutes"] = target
        resampled["source"] = RESAMPLED_SOURCE
        out[target] = _table(resampled, symbol)
    report["widths"] = {str(w): t.num_rows for w, t in sorted(out.items())}
    return out, report


# ============================================================================== the store steps
@contextlib.contextmanager
def _building_store(target: Path, tag: str):
    """(staging, scratch) for building a store that replaces ``target``: ``staging`` is a free path
    beside it (not created: ``ingest`` creates the store there, and an empty folder is not a store
    yet), ``scratch`` a temporary folder for intermediate files. When the block ends, the store
    takes ``target``'s place in one rename; when it raises, ``target`` is as it was. Either way the
    scratch folder goes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    staging.rmdir()                                  # the name is ours; the folder is ingest's to make
    scratch = Path(tempfile.mkdtemp(prefix=f"{tag}-scratch-"))
    try:
        yield staging, scratch
        _put_in_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_target(target: Path, replace: bool) -> None:
    if target.exists():
        if replace and (_is_store(target) or not any(target.iterdir())):
            return
        if _is_store(target):
            raise DataError(f"{target}: a chain store already exists there; give a new folder (or remove it)")
        if any(target.iterdir()):
            raise DataError(f"{target}: exists, is not empty and is not a chain store; give a new folder")


def _put_in_place(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _annotate(store_dir: Path, key: str, note: dict) -> None:
    from data_factory.chain_store import MANIFEST

    path = store_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest[key] = note
    temporary = store_dir / f".{MANIFEST}.{key}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, path)


def merge(options, bars, store_dir, symbol: str = "SPY", start=None, end=None, options_format: str | None = None,
          on_bad_rows: str = "stop", fill_gaps: int = DEFAULT_FILL_GAPS, replace: bool = False) -> dict:
    """Step 1 (module docstring): ONE chain store at ``store_dir`` with the option chains and the
    bars (input width + resampled widths). ``replace``: an existing store there is replaced (only
    once the new one is complete). Returns a summary dict; DataError for bad input."""
    from data_factory.chain_store import ChainStore, ingest

    if on_bad_rows not in ("stop", "skip"):
        raise DataError(f"--on-bad-rows {on_bad_rows!r}: use stop or skip")
    if fill_gaps < 0:
        raise DataError(f"--fill-gaps {fill_gaps}: give 0 (fill nothing) or a number of bars")
    started = time.perf_counter()
    symbol = symbol.upper()
    store_dir = Path(store_dir)
    _check_target(store_dir, replace)
    first, last = _session_range(start, end)
    option_files = input_files(options, "option")
    bar_table, bar_reports = load_bars(bars, symbol, on_bad_rows)
    by_width, bar_report = prepare_bars(bar_table, symbol, first, last, fill_gaps)
    with _building_store(store_dir, "merge") as (staging, scratch):
        chain_parts, option_reports = _chain_parts(option_files, options_format, on_bad_rows, symbol, first, last,
                                                   scratch)
        bar_parts = []
        for width, table in sorted(by_width.items()):
            path = scratch / f"bars-{width}min.parquet"
            pq.write_table(table, path)
            bar_parts.append(path)
        summary = ingest([*chain_parts, *bar_parts], staging)
        store = ChainStore.open(staging)
        chain_days = store.dates()
        bar_days = pd.DatetimeIndex(pd.to_datetime([bar_report["first_session"], bar_report["last_session"]]))
        bars_sessions = pd.DatetimeIndex(pd.unique(pd.DatetimeIndex(
            by_width[min(by_width)].column("time").to_pandas()).tz_localize(None).normalize()))
        chain_only = [str(d.date()) for d in chain_days if d not in bars_sessions]
        bars_only = [str(d.date()) for d in bars_sessions if d not in chain_days]
        both = [d for d in chain_days if d in bars_sessions]
        if not both:
            raise DataError(f"the {symbol} option chains ({chain_days[0].date()} … {chain_days[-1].date()}) and bars "
                            f"({bar_days[0].date()} … {bar_days[-1].date()}) share no session")
        note = {"symbol": symbol, "options": [str(p) for p in options], "bars": [str(p) for p in bars],
                "start": str(first) if first else None, "end": str(last) if last else None,
                "option_inputs": option_reports, "bar_inputs": bar_reports, "bars_prepared": bar_report,
                "chain_sessions": len(chain_days), "sessions_with_both": len(both),
                "chain_only_sessions": chain_only, "bar_only_sessions": bars_only,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        _annotate(staging, "merge", note)
    return {"store": str(store_dir), "chain_rows": summary.chain_rows, "bar_rows": summary.bar_rows,
            "chain_sessions": len(chain_days), "first_session": str(chain_days[0].date()),
            "last_session": str(chain_days[-1].date()), "sessions_with_both": len(both),
            "chain_only_sessions": chain_only, "bar_only_sessions": bars_only,
            "bar_widths": bar_report["widths"], "filled_bars": bar_report["filled_bars"],
            "unfilled_gaps": bar_report["unfilled_gap_count"], "outside_regular_hours": bar_report["outside_regular_hours"],
            "bad_rows": {r["path"]: r["bad_rows"] for r in option_reports + bar_reports if r.get("bad_rows")},
            "seconds": round(time.perf_counter() - started, 2)}


def expand(store_dir, expanded_dir, minutes: int, symbol: str = "SPY", start=None, end=None,
           dte_max: int | None = None, strike_band: float | None = None, rate: float | None = None,
           dividend_yield: float | None = None, replace: bool = False, console=None) -> dict:
    """Step 2 (module docstring): the ``minutes``-minute expanded store of the merged store
    ``store_dir`` at ``expanded_dir``, with the merged store's bars added. Returns the expansion's
    summary dict (plus ``bar_rows``); DataError for bad input."""
    from rich.console import Console

    from data_factory import expand_options_intraday as expansion
    from data_factory.chain_store import ChainStore, ingest

    if int(minutes) not in EXPAND_WIDTHS:
        raise DataError(f"--minutes {minutes}: choose 1, 5 or 15")
    store_dir, expanded_dir = Path(store_dir), Path(expanded_dir)
    if not _is_store(store_dir):
        raise DataError(f"{store_dir}: not a chain store (merge first)")
    if expanded_dir.resolve() == store_dir.resolve():
        raise DataError(f"{expanded_dir}: that is the merged store; give another folder for the expanded store")
    _check_target(expanded_dir, replace)
    source = ChainStore.open(store_dir)
    bars = source.read_bars(symbol.upper())
    if bars is None or not bars.num_rows:
        raise DataError(f"{store_dir}: the store holds no {symbol.upper()} bars to expand along")
    with _building_store(expanded_dir, "expand") as (staging, scratch):
        args = argparse.Namespace(input=[str(store_dir)], format=None, bars=None, minutes=int(minutes),
                                  store=str(staging), dte_max=dte_max, strike_band=strike_band, start=start, end=end,
                                  underlying=symbol.upper(), rate=rate, dividend_yield=dividend_yield,
                                  seed=expansion.DEFAULT_SEED)
        result = expansion.run(args, console or Console(stderr=True))
        bar_file = scratch / "bars.parquet"
        pq.write_table(bars.select(list(BAR_SCHEMA.names)).cast(BAR_SCHEMA), bar_file)
        added = ingest([bar_file], staging)
        result["bar_rows"] = added.bar_rows
        result["store"] = str(expanded_dir)
        _annotate(staging, "merge", {"expanded_from": str(store_dir), "minutes": int(minutes),
                                     "bars_added": added.bar_rows,
                                     "note": "15-minute chains are the expansion at 15-minute closes (the same "
                                             "quotes as every third bar of a 5-minute expansion)"
                                     if int(minutes) == 15 else None})
    return result


# ============================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data_factory/merge_intraday_with_greeks.py",
        description="Merge option chains (IVolatility or any vendor files, or a chain store) and the underlying's "
                    "intraday bars (resampled to 5 and 15 minutes) into one chain store; with --minutes, also "
                    "build the expanded 1/5/15-minute chain store (model quotes) with the bars in it.")
    parser.add_argument("--options", action="append", default=[], metavar="PATH",
                        help="option files, a folder of them, or a chain store (repeatable)")
    parser.add_argument("--bars", action="append", default=[], metavar="PATH",
                        help="the underlying's intraday bar files, a folder, or a store holding bars (repeatable)")
    parser.add_argument("--store", required=True, metavar="DIR",
                        help="the merged chain store to write (or, without --options/--bars, an existing one to expand)")
    parser.add_argument("--symbol", default="SPY", help="underlying (default SPY)")
    parser.add_argument("--options-format", default=None, metavar="F", help="vendor format of the option files "
                                                                           "(default: detected per file)")
    parser.add_argument("--start", default=None, metavar="D", help="first session kept (default: all)")
    parser.add_argument("--end", default=None, metavar="D", help="last session kept (default: all)")
    parser.add_argument("--on-bad-rows", choices=("stop", "skip"), default="stop",
                        help="stop at the first bad row (default) or skip and count them")
    parser.add_argument("--fill-gaps", type=int, default=DEFAULT_FILL_GAPS, metavar="N",
                        help=f"fill runs of at most N missing bars in a session with flat bars at the last close, "
                             f"marked (default {DEFAULT_FILL_GAPS}; 0 = none)")
    parser.add_argument("--minutes", type=int, choices=EXPAND_WIDTHS, default=None,
                        help="also build the expanded chain store at this bar width")
    parser.add_argument("--expanded", default=None, metavar="DIR",
                        help="the expanded store (default: <store>-<minutes>min)")
    parser.add_argument("--dte-max", type=int, default=None, metavar="N", help="expansion: keep expirations up to N "
                                                                              "calendar days")
    parser.add_argument("--strike-band", type=float, default=None, metavar="F",
                        help="expansion: keep strikes within F of the snapshot spot (0.2 = ±20 %%)")
    parser.add_argument("--rate", type=float, default=None, metavar="R",
                        help="expansion: risk-free rate (default: the embedded series, which ends 2019-01)")
    parser.add_argument("--dividend-yield", type=float, default=None, metavar="Q",
                        help="expansion: continuous dividend yield (default: the embedded one)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = Path(args.store)
        if args.options or args.bars:
            if not (args.options and args.bars):
                raise DataError("give both --options and --bars (or neither, to expand an existing --store)")
            merged = merge(args.options, args.bars, store, args.symbol, args.start, args.end, args.options_format,
                           args.on_bad_rows, args.fill_gaps)
            print(f"merged store {merged['store']}: {merged['chain_rows']:,} chain rows over "
                  f"{merged['chain_sessions']} sessions ({merged['first_session']} … {merged['last_session']}), "
                  f"{merged['bar_rows']:,} bar rows (widths: "
                  f"{', '.join(f'{w} min {n:,}' for w, n in merged['bar_widths'].items())}); "
                  f"{merged['filled_bars']} bars filled, {merged['unfilled_gaps']} longer gaps left")
            if merged["chain_only_sessions"] or merged["bar_only_sessions"]:
                print(f"note: chains without bars: {len(merged['chain_only_sessions'])} sessions; bars without chains: "
                      f"{len(merged['bar_only_sessions'])} sessions")
        elif args.minutes is None:
            raise DataError("nothing to do: give --options and --bars, and/or --minutes")
        if args.minutes is not None:
            target = Path(args.expanded) if args.expanded else store.with_name(f"{store.name}-{args.minutes}min")
            result = expand(store, target, args.minutes, args.symbol, args.start, args.end, args.dte_max,
                            args.strike_band, args.rate, args.dividend_yield)
            print(f"expanded store {result['store']}: {result['rows']:,} {args.minutes}-minute chain rows over "
                  f"{result['sessions']} sessions ({result['first_session']} … {result['last_session']}), "
                  f"{result['bar_rows']:,} bar rows; EXPANDED model quotes (source '{result['label']}:…')")
    except (ValueError, OSError) as error:            # DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
