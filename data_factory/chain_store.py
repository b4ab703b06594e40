"""The option-chain store: canonical chains (``data_factory.canonical``) as Parquet, partitioned by
session date, read back by date range and DTE window through pyarrow dataset filters.

Layout of a store directory::

    STORE/
      manifest.json                      written last: a store without it is not a store
      chains/date=YYYY-MM-DD/*.parquet   CHAIN_SCHEMA rows of that session (hive partitioning)
      bars/symbol=SPY/*.parquet          BAR_SCHEMA rows (the user's stock bars), optional

Why Parquet by date: a backtest asks for one session's chain at a time (or a range of them), and
partition pruning turns "the 30-45 DTE slice of 2021-06-14" into opening one directory's files;
the column statistics of the row groups prune the DTE filter further. Memory stays bounded by a
batch: ``ingest`` streams the vendor loader's batches straight into
``pyarrow.dataset.write_dataset`` (each batch written as it comes, nothing buffered across them).

Nothing half-written: an ingest writes into ``STORE/.staging-<pid>-<n>/`` and moves its partitions
into place only after every input was read and validated; the manifest is replaced last
(atomically, ``os.replace``). A failed ingest leaves the store exactly as it was, and a new store
whose first ingest failed does not exist.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from data_factory.canonical import BAR_SCHEMA, CHAIN_SCHEMA
from data_factory.errors import DataError

MANIFEST = "manifest.json"
STORE_VERSION = 1
_DATE_PARTITIONING = ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive")
_SYMBOL_PARTITIONING = ds.partitioning(pa.schema([("symbol", pa.string())]), flavor="hive")


@dataclass
class IngestSummary:
    """What one ``ingest`` call did, per input file and in total."""

    store: str
    files: list[dict] = field(default_factory=list)     # path, format, kind, rows_read, rows_kept, bad rows
    chain_rows: int = 0
    bar_rows: int = 0
    dates: list[str] = field(default_factory=list)       # the sessions added (chains)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"store": self.store, "files": self.files, "chain_rows": self.chain_rows, "bar_rows": self.bar_rows,
                "first_date": self.dates[0] if self.dates else None,
                "last_date": self.dates[-1] if self.dates else None, "sessions": len(self.dates),
                "seconds": round(self.seconds, 3)}


def _session_date_column(table: pa.Table) -> pa.Array:
    """The America/New_York calendar date of each row's quote_time (the partition key)."""
    return pc.cast(pc.local_timestamp(table.column("quote_time")), pa.date32())


class ChainStore:
    """A store directory (see the module docstring). ``ChainStore.open(path)`` for an existing one."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._chains: ds.Dataset | None = None

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path) -> "ChainStore":
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"{root}: no such store directory")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            raise DataError(f"{root}: not a chain store (no {MANIFEST}; an ingest into it never finished)") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{root / MANIFEST}: unreadable manifest ({error})") from None
        if manifest.get("version") != STORE_VERSION:
            raise DataError(f"{root / MANIFEST}: store version {manifest.get('version')!r}, this program reads "
                            f"{STORE_VERSION}")
        return cls(root, manifest)

    @staticmethod
    def is_store(path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    # ------------------------------------------------------------------------------ reading
    def dates(self) -> pd.DatetimeIndex:
        """The sessions with chains, ascending (naive midnight)."""
        return pd.DatetimeIndex(sorted(self.manifest.get("chain_dates", [])))

    def bar_symbols(self) -> list[str]:
        return sorted(self.manifest.get("bar_symbols", {}))

    def _chain_dataset(self) -> ds.Dataset:
        if self._chains is None:
            self._chains = ds.dataset(self.root / "chains", format="parquet", partitioning=_DATE_PARTITIONING,
                                      schema=CHAIN_SCHEMA.append(pa.field("date", pa.date32())))
        return self._chains

    def read_chains(self, start=None, end=None, dte_min: int | None = None, dte_max: int | None = None,
                    columns: Iterable[str] | None = None, underlying: str | None = None) -> pa.Table:
        """Chain rows of sessions ``start … end`` (inclusive dates; None = the store's first/last),
        expirations ``dte_min … dte_max`` calendar days after each row's session (inclusive; None
        = unbounded), optionally of one underlying. A CHAIN_SCHEMA table (plus ``date``) sorted by
        quote_time, expiration, option type, strike."""
        dataset = self._chain_dataset()
        condition = None

        def both(expression):
            nonlocal condition
            condition = expression if condition is None else condition & expression

        if start is not None:
            both(ds.field("date") >= pa.scalar(pd.Timestamp(start).date(), pa.date32()))
        if end is not None:
            both(ds.field("date") <= pa.scalar(pd.Timestamp(end).date(), pa.date32()))
        if underlying is not None:
            both(ds.field("underlying") == underlying)
        wanted = list(columns) if columns is not None else None
        if wanted is not None:
            for name in ("date", "expiration", "quote_time", "option_type", "strike"):
                if name not in wanted:
                    wanted.append(name)
        table = dataset.to_table(filter=condition, columns=wanted)
        if dte_min is not None or dte_max is not None:
            # Days from the session date to the expiration: both date32, so an int32 difference.
            days = pc.subtract(pc.cast(table.column("expiration"), pa.int32()), pc.cast(table.column("date"), pa.int32()))
            keep = None
            if dte_min is not None:
                keep = pc.greater_equal(days, int(dte_min))
            if dte_max is not None:
                upper = pc.less_equal(days, int(dte_max))
                keep = upper if keep is None else pc.and_(keep, upper)
            table = table.filter(keep)
        return table.sort_by([("quote_time", "ascending"), ("expiration", "ascending"),
                              ("option_type", "ascending"), ("strike", "ascending")])

    def read_bars(self, symbol: str, start=None, end=None) -> pa.Table | None:
        """The user's bars of ``symbol`` between the dates (inclusive), sorted by time, or None
        when the store has none for it."""
        if symbol not in self.manifest.get("bar_symbols", {}):
            return None
        dataset = ds.dataset(self.root / "bars", format="parquet", partitioning=_SYMBOL_PARTITIONING,
                             schema=BAR_SCHEMA)
        condition = ds.field("symbol") == symbol
        if start is not None:
            condition &= ds.field("time") >= pa.scalar(pd.Timestamp(start).tz_localize("America/New_York"),
                                                       BAR_SCHEMA.field("time").type)
        if end is not None:
            stop = pd.Timestamp(end).tz_localize("America/New_York") + pd.Timedelta(days=1)
            condition &= ds.field("time") < pa.scalar(stop, BAR_SCHEMA.field("time").type)
        return dataset.to_table(filter=condition).sort_by([("minutes", "ascending"), ("time", "ascending")])

    def describe(self) -> dict:
        dates = self.dates()
        return {"store": str(self.root), "sessions": len(dates),
                "first_date": str(dates[0].date()) if len(dates) else None,
                "last_date": str(dates[-1].date()) if len(dates) else None,
                "chain_rows": self.manifest.get("chain_rows", 0), "sources": self.manifest.get("sources", []),
                "bar_symbols": self.manifest.get("bar_symbols", {})}


# ----------------------------------------------------------------------------------------------
# ingest
# ----------------------------------------------------------------------------------------------

def _input_files(inputs) -> list[Path]:
    """The files named (a folder means every file in it, sorted, hidden files left out)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: the folder holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def ingest(inputs, store_dir, fmt: str | None = None, on_bad_rows: str = "stop",
           progress: Callable[[str, int], None] | None = None, underlying: str | None = None) -> IngestSummary:
    """Load vendor files (``data_factory.vendor_formats``) into the store at ``store_dir``
    (created if absent). ``fmt`` overrides format detection for every file; ``on_bad_rows`` is
    ``stop`` (the first bad row is a DataError naming file and line) or ``skip`` (counted in the
    summary). Sessions already in the store are refused (one clear message) rather than mixed.
    ``progress(file_name, rows_so_far)`` is called after every batch."""
    if on_bad_rows not in ("stop", "skip"):
        raise DataError(f"--on-bad-rows {on_bad_rows!r}: use stop or skip")
    started = time.perf_counter()
    root = Path(store_dir)
    existing = ChainStore.open(root) if ChainStore.is_store(root) else None
    if root.exists() and existing is None and any(root.iterdir()):
        raise DataError(f"{root}: exists, is not empty and is not a chain store; give a new folder")
    files = _input_files(inputs)
    known_dates = set(existing.manifest.get("chain_dates", [])) if existing else set()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{os.getpid()}-{time.time_ns()}"
    summary = IngestSummary(store=str(root))
    created_root = existing is None
    try:
        chain_dates: set[str] = set()
        bar_symbols: dict[str, dict] = {}
        sources = []
        for number, path in enumerate(files):
            kind_fmt, kind, batches, report = _open_input(path, fmt, on_bad_rows, underlying)
            rows = 0
            if kind == "chain":

                def with_dates(batches=batches, path=path):
                    nonlocal rows
                    for batch in batches:
                        batch = batch.select(list(CHAIN_SCHEMA.names)).cast(CHAIN_SCHEMA)
                        dates = _session_date_column(batch)
                        for day in pc.unique(dates).to_pylist():
                            text = day.isoformat()
                            if text in known_dates:
                                raise DataError(f"{path}: the store {root} already holds chains for {text}; "
                                                f"ingest into a new store (nothing was added)")
                            chain_dates.add(text)
                        rows += batch.num_rows
                        if progress is not None:
                            progress(path.name, rows)
                        yield from batch.append_column("date", dates).to_batches()

                # No min_rows_per_group: a writer then buffers nothing across batches, so memory is
                # bounded by the loader's block whatever the file (buffering to a row-group minimum
                # held up to max_open_files × 64k rows: gigabytes for intraday snapshots). A file
                # per loader block and date; at most 64 open (older ones are closed, not held).
                # use_threads=False: the loader's parsing thread already has the second core.
                ds.write_dataset(with_dates(), staging / "chains", format="parquet", file_options=_write_options(),
                                 use_threads=False,
                                 schema=CHAIN_SCHEMA.append(pa.field("date", pa.date32())),
                                 partitioning=_DATE_PARTITIONING, basename_template=f"part-{number}-{{i}}.parquet",
                                 existing_data_behavior="overwrite_or_ignore", max_rows_per_group=256_000,
                                 max_open_files=64)
                summary.chain_rows += rows
            else:
                def checked(batches=batches, path=path):
                    nonlocal rows
                    for batch in batches:
                        batch = batch.select(list(BAR_SCHEMA.names)).cast(BAR_SCHEMA)
                        for symbol in pc.unique(batch.column("symbol")).to_pylist():
                            if symbol in (existing.manifest.get("bar_symbols", {}) if existing else {}):
                                raise DataError(f"{path}: the store {root} already holds {symbol} bars; ingest into "
                                                f"a new store (nothing was added)")
                            entry = bar_symbols.setdefault(symbol, {"rows": 0, "minutes": set()})
                            mask = pc.equal(batch.column("symbol"), symbol)
                            entry["rows"] += int(pc.sum(mask).as_py() or 0)
                            entry["minutes"].update(pc.unique(batch.filter(mask).column("minutes")).to_pylist())
                        rows += batch.num_rows
                        if progress is not None:
                            progress(path.name, rows)
                        yield from batch.to_batches()

                ds.write_dataset(checked(), staging / "bars", format="parquet", schema=BAR_SCHEMA,
                                 file_options=_write_options(),
                                 partitioning=_SYMBOL_PARTITIONING, basename_template=f"part-{number}-{{i}}.parquet",
                                 existing_data_behavior="overwrite_or_ignore")
                summary.bar_rows += rows
            entry = {"path": str(path), "format": kind_fmt, "kind": kind, "rows": rows}
            if report is not None:
                entry["bad_rows"] = report.to_dict()
            summary.files.append(entry)
            sources.append({"path": str(path.resolve()), "format": kind_fmt, "rows": rows})
        if not summary.chain_rows and not summary.bar_rows:
            raise DataError(f"nothing to ingest: {', '.join(str(f) for f in files)} held no rows")
        _commit_staging(root, staging, existing, chain_dates, bar_symbols, sources, summary)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not ChainStore.is_store(root):
            shutil.rmtree(root, ignore_errors=True)
        raise
    summary.dates = sorted(chain_dates)
    summary.seconds = time.perf_counter() - started
    return summary


CANONICAL_PARQUET = "canonical_parquet"


# Columns whose values repeat within a file (Parquet dictionary pages pay off there). The
# writer's default dictionary-encodes every column, and trying it on the quotes and Greeks,
# which hardly repeat, cost ~40 % of an ingest's write time for a 10 % smaller file (measured on
# the 270 MB Cboe bench file: 0.96 s → 0.57 s to write 1.3 M rows).
_DICTIONARY_COLUMNS = ("quote_time", "underlying", "underlying_price", "expiration", "settlement", "strike",
                       "option_type", "source", "symbol", "minutes")


def _write_options():
    # LZ4 writes about 1.4x faster than the default Snappy here at the same size (an ingest is
    # bound by parsing and writing), and pyarrow and DuckDB both read it.
    return ds.ParquetFileFormat().make_write_options(compression="lz4", use_dictionary=list(_DICTIONARY_COLUMNS))


def _open_input(path: Path, fmt: str | None, on_bad_rows: str, underlying: str | None):
    """(format, kind, batches, bad-row report or None) of one input: a vendor file through
    ``data_factory.vendor_formats``, or a Parquet file already in a canonical schema (what
    ``write_chain_table`` and the intraday expansion produce), read batch by batch."""
    import pyarrow.parquet as pq

    if fmt == CANONICAL_PARQUET or (fmt is None and path.suffix.lower() == ".parquet"):
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as error:
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        names = set(parquet.schema_arrow.names)
        for kind, schema in (("chain", CHAIN_SCHEMA), ("bars", BAR_SCHEMA)):
            if set(schema.names) <= names:
                return CANONICAL_PARQUET, kind, (pa.Table.from_batches([b]) for b in parquet.iter_batches(
                    batch_size=256_000, columns=list(schema.names))), None
        missing = sorted(set(CHAIN_SCHEMA.names) - names)
        raise DataError(f"{path}: a Parquet file without the canonical chain columns (missing: {', '.join(missing)}) "
                        f"or bar columns")
    from data_factory import vendor_formats

    fmt = fmt or vendor_formats.detect_format(path)
    kind = vendor_formats.format_kind(fmt)
    report = vendor_formats.BadRowReport()
    if kind == "chain":
        batches = vendor_formats.iter_chain_batches(path, fmt, on_bad_rows=on_bad_rows, report=report,
                                                    underlying=underlying)
    else:
        batches = vendor_formats.iter_bar_batches(path, fmt, on_bad_rows=on_bad_rows, report=report)
    return fmt, kind, batches, report


def _commit_staging(root: Path, staging: Path, existing: ChainStore | None, chain_dates: set[str],
                    bar_symbols: dict, sources: list, summary: IngestSummary) -> None:
    """Move the staged partitions into the store, then replace the manifest (the commit point)."""
    for part in ("chains", "bars"):
        staged = staging / part
        if not staged.is_dir():
            continue
        (root / part).mkdir(exist_ok=True)
        for partition in sorted(staged.iterdir()):
            target = root / part / partition.name
            if target.exists():
                # A bar symbol or date already present was refused while reading, so this is a
                # leftover of an ingest that died before its manifest: replace it.
                shutil.rmtree(target)
            os.replace(partition, target)
    shutil.rmtree(staging, ignore_errors=True)
    manifest = dict(existing.manifest) if existing else {"version": STORE_VERSION, "created": _now()}
    manifest["chain_dates"] = sorted(set(manifest.get("chain_dates", [])) | chain_dates)
    manifest["chain_rows"] = int(manifest.get("chain_rows", 0)) + summary.chain_rows
    symbols = dict(manifest.get("bar_symbols", {}))
    for symbol, entry in bar_symbols.items():
        symbols[symbol] = {"rows": entry["rows"], "minutes": sorted(int(m) for m in entry["minutes"])}
    manifest["bar_symbols"] = symbols
    manifest["sources"] = [*manifest.get("sources", []), *sources]
    manifest["updated"] = _now()
    temporary = root / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, root / MANIFEST)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_chain_table(table: pa.Table, store_dir, source: str = "table") -> IngestSummary:
    """A canonical chain table (already loaded) into a new store: what tests and the intraday
    expansion use to make a store without a vendor file."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chain.parquet"
        import pyarrow.parquet as pq
        pq.write_table(table.select(list(CHAIN_SCHEMA.names)).cast(CHAIN_SCHEMA), path)
        return ingest([path], store_dir, fmt=CANONICAL_PARQUET)
