"""Vendor option-chain and bar files → the canonical Arrow tables (``data_factory.canonical``).

Spec: ``shared/reference/data-formats.md`` (§2 the formats, §3 the mapping, §4 the traps).

API: ``FORMATS``, ``detect_format(path)``, ``format_kind(fmt)``, ``BadRowReport``,
``iter_chain_batches(path, fmt, on_bad_rows, report, underlying, block_bytes, minutes)``,
``iter_bar_batches(path, fmt, on_bad_rows, report, symbol, block_bytes, minutes)`` and
``load_file(path, fmt, on_bad_rows, **those options)``. ``underlying``: OptionsDX's underlying (the
file names none); for the other chain formats a FILTER (Polygon flat files hold every underlying):
rows of others are counted in ``rows_filtered``, and none left is a DataError. ``symbol`` likewise
for bars (it names the bars of a file without a symbol column). ``minutes``: the bar width.

Streaming: ``pyarrow.csv.open_csv`` reads blocks of ``min(block_bytes, READ_BLOCK_MAX)`` with explicit
column types (single-threaded: the reader then numbers the malformed lines it skips) in its own
thread (``_Prefetched``), so parsing runs on one core while pyarrow.compute and numpy transform the
previous batch (up to ``MERGE_MAX`` bytes of CSV, ``_merged_blocks``) and the store writes it on
the other; each batch comes out as one canonical table.
String columns that repeat (dates, roots, option types, tickers) are read dictionary-encoded and
parsed once per distinct value, then spread to the rows with ``take``; no Python loop runs per row.
Memory does not grow with the file: pyarrow's I/O thread reads ~32 blocks ahead, so about 32 read
blocks plus one block's transforms (measured: ~300 MB peak RSS for a 225 MB file and the same for
a 460 MB one), plus the duplicate keys of one snapshot (~70 bytes a row of it, below).

Formats (``FORMATS``) and their mapping decisions
------------------------------------------------
``optionsdx``  OptionsDX SPY EOD/intraday ``.txt`` (wide, ``", "`` separated, headers `` [C_BID]``).
    quote_time = QUOTE_UNIXTIME (epoch s, already an instant); underlying_price = UNDERLYING_LAST;
    expiration = EXPIRE_DATE (``%Y-%m-%d``); one line → a C row and a P row from the C_/P_ columns.
    No open interest (null). Blank IV → NaN; blank volume → 0 (the vendor leaves it blank when no
    contract traded). ``*_SIZE``, ``*_RHO``, DTE and the STRIKE_DISTANCE columns are not read.
    underlying = ``underlying`` argument or "SPY"; settlement "PM".
``cboe``  Cboe DataShop Option EOD Summary (``UnderlyingOptionsEODCalcs_*.zip`` or the bare CSV).
    The 15:45 snapshot: quote_time = quote_date 15:45 ET (12:45 on NYSE early-close days: the
    ``_1545`` columns hold the snapshot 15 minutes before the close), bid/ask = ``bid_1545``/
    ``ask_1545``, underlying_price = ``active_underlying_price_1545`` (index bid/ask need a licence),
    iv = ``implied_volatility_1545`` (0 = not computable → NaN), Greeks ``*_1545`` as given (theta
    per day, vega per vol point). last = ``close`` (0 = no trade → NaN), volume = ``trade_volume``,
    open_interest = ``open_interest``. underlying = ``underlying_symbol`` without ``^``. Dates
    ``yyyy-mm-dd`` or ``1/4/2016 0:00:00`` (chosen once per file from its first value). The 12:45
    half-day stamp is applied to every early close; the reference dates that Cboe practice from
    2020-02-05 and does not say what earlier half days hold.
``ivolatility``  IVolatility EOD raw-IV CSV (lower-case headers with spaces).
    quote_time = ``date`` 16:00 ET (13:00 on early closes); underlying_price = ``stock price for
    iv`` (unadjusted; ``adjusted close`` is never used); iv −1 → NaN; no last (the ``mean price``
    is a mid, not a trade) → NaN. Dates ``mm/dd/yyyy`` or ``mm/dd/yy`` (once per file). Greek units
    are unverified in the reference and taken as canonical.
``orats``  ORATS strikes files, wide, long names (``tradeDate``, ``callBidPrice`` …) or the near-EOD
    short names (``stkPx``, ``cBidPx`` …, ``trade_date``). quote_time = ``updatedAt`` when present
    and on the trade date (a zone-less value is read as UTC, the API's convention), otherwise the
    trade date 16:00 ET (13:00 early close). underlying_price = ``stockPrice``/``stkPx``; for index
    tickers (``INDEX_TICKERS``) ``spotPrice`` when present (their ``stockPrice`` is the implied
    forward). iv = ``callMidIv``/``putMidIv``. The Greeks are the CALL's: put delta = delta − 1,
    gamma and vega shared, put theta NaN: parity would need the rate, the dividend yield and
    European exercise, and SPY options are American, so a "derived" put theta would be a guess.
``deltaneutral``  DeltaNeutral / HistoricalOptionData "Level 2" (and its lower-case variant).
    Theta is per YEAR and vega per 1.00 of vol: divided by 365 and 100. ``DataDate`` with a time is
    that ET wall time; without one, the session close.
``polygon_option_bars`` / ``alpaca_option_bars``  per-contract OHLCV bars (Polygon flat files
    ``ticker … window_start`` ns with ``O:`` OCC tickers; Alpaca CSV ``symbol, timestamp`` RFC 3339
    UTC). Told from stock bars of the same header by the first row's symbol being an OCC symbol. Into the chain schema: last = close, bid/ask/iv/Greeks NaN, open_interest null,
    underlying_price NULL (bars carry no underlying price: join a stock quote downstream),
    quote_time = bar START + width (the bar's close; daily bars: the session close). Contract
    fields from the OCC symbol (``alpaca_feed.parse_occ_symbol``, once per distinct ticker);
    underlying = the root with weekly suffixes folded (SPXW → SPX); settlement AM for the SPX root
    on a third Friday.
``stock_bars``  Alpaca or Polygon stock bars (``symbol|ticker?``, ``timestamp|t|window_start``,
    open, high, low, close, volume) → ``BAR_SCHEMA`` stamped at the bar close (start + width),
    ``minutes`` = width; daily bars (1440) at the session close (16:00 ET, 13:00 early close).
    A numeric time column's unit comes from its magnitude (s, ms, µs, ns), once per file.

Common decisions: option type ``C/CALL/P/PUT`` any case; iv ≤ 0 → NaN (never a real annualised
vol); last ≤ 0 → NaN (no trade); absent float fields NaN, absent counts null. ``source`` = the
format name. Settlement (Cboe, IVolatility, DeltaNeutral, ORATS, bars): "AM" when the root is
``SPX`` and the expiration is a third Friday (or the Thursday before a third-Friday holiday), else
"PM". SPX and SPXW rows of the same strike and expiry are different contracts, so the duplicate key
is (quote_time, underlying, expiration, settlement, strike, option_type).

Bar width (option and stock bars): the ``minutes`` argument, else inferred from the first MiB of
the file: all starts at midnight ET → daily (1440), else the smallest spacing between distinct
start times (sparse option bars still trade in consecutive intervals somewhere in a MiB).

Bad rows (``canonical.BAD_ROW_KINDS``)
--------------------------------------
Found with vector masks per block. ``on_bad_rows="stop"``: a ``DataError`` naming the file, the
1-based LINE (header = line 1), the field and its value, for the first bad row of the file.
``"skip"``: dropped and counted in the ``BadRowReport`` (counts per kind in canonical rows, so a
bad OptionsDX line that spoils both halves counts 2; examples: the first few per kind). One row
with several problems counts once, under the first of: missing_value, unparseable_date,
bad_option_type, bad_strike, no_underlying_price, expired_before_quote, negative_quote,
crossed_quote, duplicate_row. A line with the wrong number of fields counts as missing_value; a
number that does not parse counts under its field's kind (strike → bad_strike, the underlying's
price → no_underlying_price, any other → missing_value). A blank line is not a row.

Duplicates are caught across blocks with bounded memory: the keys kept from one block to the next
are those of the newest quote time (one snapshot: an EOD file's whole day, an intraday file's
current snapshot) and, for bar files, of the newest contract/symbol on that date. This ASSUMES
chain files are ordered by quote time (vendor files are: by date, then root, expiry, strike and
type) and bar files by contract then time, or by time (Polygon flat files, Alpaca exports); a
duplicate further apart than that is not seen. Within a block every duplicate is seen. A chain file
in the vendors' order needs no hash table at all (strictly increasing keys cannot repeat; see
``_Dedup``); the first block out of that order moves the file to a hash set of the snapshot's keys.

Line numbers are exact when no quoted field spans lines (none of these formats quotes at all).
"""
from __future__ import annotations

import bisect
import csv
import queue
import threading
import re
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_factory.canonical import BAD_ROW_KINDS, BAR_SCHEMA, CHAIN_SCHEMA, EXCHANGE_TZ
from data_factory.errors import DataError

FORMATS: tuple[str, ...] = ("optionsdx", "cboe", "ivolatility", "orats", "deltaneutral",
                            "polygon_option_bars", "alpaca_option_bars", "stock_bars")
_KINDS = {name: "chain" for name in FORMATS} | {"stock_bars": "bars"}

# Tickers whose ORATS ``stockPrice`` is an implied forward (use ``spotPrice``).
INDEX_TICKERS = frozenset({"SPX", "SPXW", "NDX", "NDXP", "RUT", "RUTW", "XSP", "VIX", "DJX", "OEX", "XEO"})
# Weekly/PM roots folded into their index for the ``underlying`` column (the root keeps the
# settlement: SPX third-Friday AM, SPXW PM).
WEEKLY_ROOTS = {"SPXW": "SPX", "SPXPM": "SPX", "NDXP": "NDX", "RUTW": "RUT", "VIXW": "VIX", "XSPW": "XSP"}
MAX_EXAMPLES_PER_KIND = 5
SAMPLE_BYTES = 1 << 20               # bar-width inference reads this much
# The reader's block is at most this (``block_bytes`` above it only bounds memory): pyarrow's
# conversion passes over a block once per column, so a cache-sized block is faster (measured: 4 MiB
# 1.5× faster than 64 MiB on OptionsDX), and its I/O thread reads ahead ~32 blocks, so memory
# follows the block size.
READ_BLOCK_MAX = 4 << 20
# Parsed blocks are joined up to this many bytes before the loader transforms them (_merged_blocks).
MERGE_MAX = 16 << 20

_TS = pa.timestamp("ns", tz=EXCHANGE_TZ)
_NS = 1_000_000_000
_NS_PER_MIN = 60 * _NS
_DICT = pa.dictionary(pa.int32(), pa.string())
_NULLS = list(pacsv.ConvertOptions().null_values) + [" ", "  "]
_NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_INT_RE = r"^[+-]?\d+$"
# Priority of kinds when one row has several problems (module docstring).
_PRIORITY = ("missing_value", "unparseable_date", "bad_option_type", "bad_strike", "no_underlying_price",
             "expired_before_quote", "negative_quote", "crossed_quote", "duplicate_row")
assert set(_PRIORITY) == set(BAD_ROW_KINDS)
_RANK = {kind: i for i, kind in enumerate(_PRIORITY)}


# ============================================================================== the report
@dataclass
class BadRowReport:
    """What one file's load read, kept and dropped. Row counts are CANONICAL rows (a wide
    OptionsDX/ORATS line is two); ``rows_read = rows_kept + sum(counts) + rows_filtered``."""

    file: str = ""
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    rows_filtered: int = 0          # other underlyings/symbols than the one asked for (not bad)
    lines_read: int = 0             # data lines of the file (header and blank lines excluded)
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, int, str, str]] = field(default_factory=list)   # (file, line, kind, detail)

    @property
    def bad_rows(self) -> int:
        return sum(self.counts.values())

    def _add(self, kind: str, n: int, examples: list[tuple[int, str]]) -> None:
        if n <= 0:
            return
        have = sum(1 for e in self.examples if e[2] == kind)
        self.counts[kind] = self.counts.get(kind, 0) + n
        for line, detail in examples[:max(0, MAX_EXAMPLES_PER_KIND - have)]:
            self.examples.append((self.file, int(line), kind, detail))

    def to_dict(self) -> dict:
        return {"file": self.file, "format": self.format, "rows_read": self.rows_read,
                "rows_kept": self.rows_kept, "rows_filtered": self.rows_filtered, "lines_read": self.lines_read,
                "bad_rows": self.bad_rows, "counts": dict(self.counts),
                "examples": [list(e) for e in self.examples]}


# ============================================================================== calendar helpers
@lru_cache(maxsize=1)
def _calendar_days() -> tuple[pa.Array, np.ndarray, int, int]:
    """(early-close session days as date32, all session days as int days, first, last day)."""
    from data_factory.market_calendar import nyse_calendar

    schedule = nyse_calendar().schedule
    sessions = np.asarray(schedule.index.values.astype("datetime64[D]").astype(np.int64))
    close = schedule["close"].dt.tz_convert(EXCHANGE_TZ)
    early = sessions[np.asarray((close.dt.hour * 60 + close.dt.minute) < 16 * 60)]
    return (pa.array(early.astype(np.int32), pa.int32()).cast(pa.date32()), sessions,
            int(sessions[0]), int(sessions[-1]))


def _local_stamp(days: pa.Array, regular_min: int, early_min: int | None = None) -> pa.Array:
    """``days`` (date32) at ``regular_min`` minutes after local midnight ET (``early_min`` on
    NYSE early-close days), tz-aware. Called on DISTINCT dates only (dictionary level)."""
    minutes = pa.scalar(regular_min, pa.int64())
    if early_min is not None:
        early = pc.is_in(days, value_set=_calendar_days()[0])
        minutes = pc.if_else(early, pa.scalar(early_min, pa.int64()), minutes)
    offset = pc.cast(pc.multiply(minutes, _NS_PER_MIN), pa.duration("ns"))
    naive = pc.add(pc.cast(days, pa.timestamp("ns")), offset)
    return pc.assume_timezone(naive, timezone=EXCHANGE_TZ, ambiguous="earliest", nonexistent="earliest")


def _day_end_ns(days: pa.Array) -> pa.Array:
    """UTC ns of the local (ET) midnight that ends each date: a quote at or after it is dated later."""
    next_day = pc.cast(pc.add(pc.cast(days, pa.int32()), pa.scalar(1, pa.int32())), pa.date32())
    return pc.cast(_local_stamp(next_day, 0), pa.int64())


def _am_days(days: np.ndarray) -> np.ndarray:
    """Expiration days (int days since epoch) on which the SPX root is AM-settled: the third Friday,
    or the Thursday before it when that Friday is an exchange holiday (Good Friday)."""
    days = np.asarray(days, dtype=np.int64)
    as_date = days.astype("datetime64[D]")
    dom = (as_date - as_date.astype("datetime64[M]")).astype(np.int64) + 1
    weekday = (days + 3) % 7                       # 1970-01-01 was a Thursday; Monday = 0
    third_friday = (weekday == 4) & (dom >= 15) & (dom <= 21)
    _, sessions, first, last = _calendar_days()
    friday = days + 1
    holiday = (friday >= first) & (friday <= last) & ~np.isin(friday, sessions)
    return third_friday | ((weekday == 3) & (dom >= 14) & (dom <= 20) & holiday)


# ============================================================================== the file
class _Source:
    """A vendor file: plain, gzip, or a zip whose FIRST member is the CSV."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = str(path)
        self.member = None
        self.gzip = False
        if not self.path.exists():
            raise DataError(f"{self.name}: no such file")
        if not self.path.is_file():
            raise DataError(f"{self.name}: not a file")
        with open(self.path, "rb") as handle:
            magic = handle.read(4)
        if magic[:2] == b"PK" and zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as archive:
                members = [info.filename for info in archive.infolist() if not info.is_dir()]
            if not members:
                raise DataError(f"{self.name}: a zip file with no member")
            self.member = members[0]
            self.name = f"{self.path} [{self.member}]"
        elif magic[:2] == b"\x1f\x8b":
            self.gzip = True

    def open(self):
        if self.member is not None:
            archive = zipfile.ZipFile(self.path)
            return pa.PythonFile(archive.open(self.member), mode="r")
        return pa.input_stream(str(self.path), compression="gzip" if self.gzip else None)

    def head(self) -> tuple[str, str | None]:
        """(header line, first non-blank data line or None). DataError when the file is empty."""
        stream = self.open()
        try:
            data = b""
            while True:
                chunk = stream.read(1 << 16)
                data += chunk
                text = data.decode("utf-8-sig", errors="replace")
                lines = text.split("\n")
                header = lines[0].strip("\r")
                if not chunk or (len(lines) > 2 and any(line.strip() for line in lines[1:-1])):
                    break
                if len(data) > (64 << 20):
                    break
        finally:
            stream.close()
        if not header.strip():
            raise DataError(f"{self.name}: empty file" if not data.strip() else
                            f"{self.name}: the first line is blank (no header)")
        complete = lines[1:] if not chunk else lines[1:-1]
        first = next((line.strip("\r") for line in complete if line.strip()), None)
        self.header_line, self.first_line = header.encode(), (first or "").encode()
        return header, first


def _split(line: str) -> list[str]:
    return next(csv.reader([line], skipinitialspace=True), [])


def _clean(name: str) -> str:
    """``" [C_BID]"`` → ``C_BID`` (OptionsDX brackets and padding), quotes and BOM removed."""
    return name.strip().strip("\ufeff").strip('"').strip().strip("[]").strip()


# ============================================================================== format specs
@dataclass(frozen=True)
class _Spec:
    name: str
    variants: tuple[tuple[str, ...], ...]          # required columns (lower-case) per header variant
    prepare: Callable                              # (ctx) -> {lower name: role}; role f/i/d/s
    transform: Callable                            # (batch) -> list[_Part]
    rows_per_line: int = 1
    retain: str = "snapshot"                       # dedup keys kept between blocks: "snapshot" or "run" (_Dedup)

    @property
    def kind(self) -> str:
        return _KINDS[self.name]


@dataclass
class _Check:
    kind: str
    mask: np.ndarray
    field: str
    raw: pa.Array | None
    detail: Callable[[int], str] | str


@dataclass
class _Part:
    columns: dict
    checks: list
    keep: np.ndarray | None = None                  # False: another underlying/symbol (filtered)


class _Ctx:
    """Per-file state: header, column roles, per-file formats, malformed lines, label."""

    def __init__(self, src: _Source, spec: _Spec, names: list[str], first_row: dict, label: str | None,
                 minutes: int | None, quoted: bool):
        self.src, self.spec, self.name = src, spec, src.name
        self.names = names
        self.lower = {n.lower(): n for n in names}
        self.first_row = first_row
        self.label = label.strip().upper() if label else None
        self.minutes = minutes
        self.quoted = quoted
        self.roles: dict[str, str] = {}
        self.date_formats: dict[str, str | None] = {}
        self.epoch_unit: dict[str, int] = {}
        self.extra: dict = {}
        self.malformed: dict[int, tuple[str, int, int]] = {}
        self.malformed_lines: list[int] = []
        self.accounted = 0                           # malformed_lines[:accounted] are reported
        self.codes: dict[str, int] = {}              # underlying/symbol → small int (dedup keys)
        self.others: set[str] = set()                # underlyings seen and filtered out

    def has(self, lower: str) -> bool:
        return lower in self.lower

    def actual(self, lower: str) -> str:
        return self.lower[lower]

    def on_invalid_row(self, row) -> str:
        # A line with the wrong number of fields: skipped by the reader, reported by the loader
        # (its number keeps the following rows' line numbers exact).
        if row.number is not None and row.number not in self.malformed:
            self.malformed[row.number] = (row.text, row.expected_columns, row.actual_columns)
            bisect.insort(self.malformed_lines, row.number)
        return "skip"

    def line_numbers(self, delivered: int, n: int) -> np.ndarray:
        """File line of each of ``n`` rows after ``delivered`` rows (header = line 1; lines the
        reader skipped as malformed are counted in)."""
        base = 2 + delivered + np.arange(n, dtype=np.int64)
        if not self.malformed_lines:
            return base
        skipped = np.asarray(self.malformed_lines, dtype=np.int64)
        shift = np.searchsorted(skipped, base, side="right")
        while True:
            again = np.searchsorted(skipped, base + shift, side="right")
            if np.array_equal(again, shift):
                return base + shift
            shift = again

    def convert_options(self, tolerant: bool) -> pacsv.ConvertOptions:
        types = {}
        for lower, role in self.roles.items():
            if role == "f":
                types[self.actual(lower)] = pa.string() if tolerant else pa.float64()
            elif role == "i":
                types[self.actual(lower)] = pa.string() if tolerant else pa.int64()
            elif role == "d":
                types[self.actual(lower)] = _DICT
            else:
                types[self.actual(lower)] = pa.string()
        return pacsv.ConvertOptions(column_types=types, include_columns=list(types), null_values=_NULLS,
                                    strings_can_be_null=True, quoted_strings_can_be_null=True)

    def code_of(self, values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            out[i] = self.codes.setdefault(value, len(self.codes))
        return out


class _Batch:
    """One block of the file plus the column helpers the format transforms use."""

    def __init__(self, rb: pa.RecordBatch, ctx: _Ctx, tolerant: bool):
        self.rb, self.ctx, self.tolerant, self.n = rb, ctx, tolerant, rb.num_rows
        self.common: list[_Check] = []               # checks that apply to every part
        self._columns = dict(zip(rb.schema.names, rb.columns))

    def raw(self, lower: str) -> pa.Array | None:
        return self._columns.get(self.ctx.lower.get(lower))

    def missing(self, lower: str) -> pa.Array:
        """Rows where the column is blank (not: present but unreadable, a separate kind)."""
        column = self.raw(lower)
        if column is None:
            return pa.repeat(True, self.n)
        if pa.types.is_string(column.type):
            return pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), ""))
        return pc.is_null(column)

    def check(self, kind: str, mask, lower: str | None, detail, raw=None, into: list | None = None) -> None:
        """Add a check; ``mask`` a boolean pa.Array/np.ndarray (nulls = not bad)."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            if not pc.any(mask).as_py():          # the usual case: no bad row, no conversion
                return
            mask = mask.fill_null(False).to_numpy(zero_copy_only=False)
        elif not mask.any():
            return
        name = self.ctx.actual(lower) if lower and self.ctx.has(lower) else (lower or "")
        if raw is None and lower is not None:
            raw = self.raw(lower)
        (self.common if into is None else into).append(_Check(kind, mask, name, raw, detail))

    # ---------------------------------------------------------------- numbers
    def num(self, lower: str, bad_kind: str = "missing_value", into: list | None = None) -> pa.Array:
        """A float64 column (null where blank); absent optional columns are all null. In
        tolerant mode (after a conversion error) the text is parsed here and a value that is not
        a number makes the row bad under ``bad_kind``."""
        column = self.raw(lower)
        if column is None:
            return pa.nulls(self.n, pa.float64())
        if not self.tolerant:
            return column
        return self._parse_text_number(column, lower, _NUM_RE, pa.float64(), bad_kind, into)

    def integer(self, lower: str, bad_kind: str = "missing_value", into: list | None = None) -> pa.Array:
        column = self.raw(lower)
        if column is None:
            return pa.nulls(self.n, pa.int64())
        if not self.tolerant:
            return column
        return self._parse_text_number(column, lower, _INT_RE, pa.int64(), bad_kind, into)

    def _parse_text_number(self, column, lower, pattern, to_type, bad_kind, into) -> pa.Array:
        text = pc.utf8_trim_whitespace(column)
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        valid = pc.match_substring_regex(text, pattern)
        self.check(bad_kind, pc.invert(valid), lower, "not a number", raw=column, into=into)
        return pc.cast(pc.if_else(valid, text, pa.scalar(None, pa.string())), to_type)

    # ---------------------------------------------------------------- dictionary text
    def dict_parts(self, lower: str) -> tuple[pa.Array, pa.Array] | None:
        """(distinct values, trimmed; row indices into them, null where blank)."""
        column = self.raw(lower)
        if column is None:
            return None
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        values = pc.utf8_trim_whitespace(column.dictionary)
        return values, column.indices

    def required_text(self, lower: str, into=None) -> tuple[pa.Array, pa.Array]:
        values, indices = self.dict_parts(lower)
        blank = pc.equal(values, "")
        if pc.any(blank).as_py():
            indices = pc.if_else(pc.take(blank, indices).fill_null(True), pa.scalar(None, indices.type), indices)
        self.check("missing_value", pc.is_null(indices), lower, "empty", into=into)
        return values, indices

    def dates(self, lower: str, candidates: tuple[tuple[str, str], ...], into=None
              ) -> tuple[pa.Array, pa.Array, bool]:
        """Parse a date(-time) column once per distinct value with ONE format per file (chosen
        from the first value that matches a candidate ``(regex, strptime format)``); returns
        (naive timestamps per distinct value, row indices, whether the format has a time)."""
        values, indices = self.required_text(lower, into=into)
        fmt = self.ctx.date_formats.get(lower)
        if fmt is None:
            for value in values.to_pylist():
                for pattern, candidate in candidates:
                    if value and re.match(pattern, value):
                        fmt = candidate
                        break
                if fmt:
                    break
            if fmt is not None:
                self.ctx.date_formats[lower] = fmt
        if fmt is None:
            parsed = pa.nulls(len(values), pa.timestamp("s"))
        else:
            pattern = next(p for p, f in candidates if f == fmt)
            shaped = pc.match_substring_regex(values, pattern)
            parsed = pc.strptime(values, format=fmt, unit="s", error_is_null=True)
            parsed = pc.if_else(shaped, parsed, pa.scalar(None, parsed.type))
        bad = pc.and_(pc.is_null(parsed), pc.invert(pc.equal(values, "")))
        if pc.any(bad).as_py():
            self.check("unparseable_date", pc.take(bad, indices),
                       lower, f"not a date in the file's format {fmt or '(none recognised)'}", into=into)
        has_time = fmt is not None and "%H" in fmt
        return parsed, indices, has_time

    def option_types(self, lower: str, into=None) -> pa.Array:
        values, indices = self.required_text(lower, into=into)
        normal = pc.utf8_upper(values)
        mapped = pc.if_else(pc.is_in(normal, value_set=pa.array(["C", "CALL"])), "C",
                            pc.if_else(pc.is_in(normal, value_set=pa.array(["P", "PUT"])), "P",
                                       pa.scalar(None, pa.string())))
        bad = pc.and_(pc.is_null(mapped), pc.invert(pc.equal(values, "")))
        if pc.any(bad).as_py():
            self.check("bad_option_type", pc.take(bad, indices), lower, "not C, P, call or put", into=into)
        return pc.take(mapped, indices)

    def all_blank(self) -> np.ndarray | None:
        """Rows whose every read column is null: blank lines (not rows)."""
        if any(column.null_count == 0 for column in self.rb.columns):
            return None
        mask = None
        for column in self.rb.columns:
            nulls = pc.is_null(column)
            mask = nulls if mask is None else pc.and_(mask, nulls)
        mask = mask.to_numpy(zero_copy_only=False)
        return mask if mask.any() else None


# ---------------------------------------------------------------- shared validation pieces
def _nan(array: pa.Array) -> pa.Array:
    """Float column with null → NaN (canonical float fields are NaN when absent)."""
    return array if array.null_count == 0 else array.fill_null(np.nan)


def _positive_or_nan(array: pa.Array) -> pa.Array:
    """IV / last: 0 or negative (Cboe 0, IVolatility −1, 'no trade' 0) → NaN."""
    return pc.if_else(pc.greater(array, 0.0).fill_null(False), array, pa.scalar(np.nan, pa.float64()))


def _counts(array: pa.Array) -> pa.Array:
    """Contracts as int64 (vendors write 12 or 12.0); NaN/blank → null."""
    if pa.types.is_integer(array.type):
        return array.cast(pa.int64())
    array = pc.if_else(pc.is_nan(array), pa.scalar(None, pa.float64()), array)
    return pc.cast(pc.round(array), pa.int64())


def _check_strike(b: _Batch, strike: pa.Array, lower: str) -> None:
    b.check("missing_value", b.missing(lower), lower, "empty")
    bad = pc.invert(pc.and_(pc.greater(strike, 0.0), pc.is_finite(strike)))
    b.check("bad_strike", bad, lower, "not a positive finite number")


def _check_underlying_price(b: _Batch, price: pa.Array, lower: str) -> None:
    bad = pc.invert(pc.and_(pc.greater(price, 0.0), pc.is_finite(price)).fill_null(False))
    b.check("no_underlying_price", bad, lower, "missing or not positive")


def _check_quotes(b: _Batch, bid: pa.Array, ask: pa.Array, bid_col: str, ask_col: str, into: list) -> None:
    b.check("negative_quote", pc.less(bid, 0.0), bid_col, "below zero", into=into)
    b.check("negative_quote", pc.less(ask, 0.0), ask_col, "below zero", into=into)
    b.check("crossed_quote", pc.greater(bid, ask), bid_col,
            lambda i: f"bid {bid[i].as_py()} above ask {ask[i].as_py()} ({b.ctx.actual(ask_col)})", into=into)


def _check_expiry(b: _Batch, quote_ns: pa.Array, exp_end_ns: pa.Array, expiration: pa.Array, lower: str) -> None:
    """Expired before quote: the quote instant is at or after the end (ET midnight) of the expiry day."""
    bad = pc.greater_equal(quote_ns, exp_end_ns)
    b.check("expired_before_quote", bad, lower, lambda i: f"expiration {expiration[i].as_py()} before the quote date")


def _settlement(b: _Batch, root: pa.Array | None, root_indices: pa.Array | None,
                exp_days: pa.Array, exp_indices: pa.Array) -> pa.Array:
    """"AM" for the SPX root on AM days (``_am_days``), else "PM"; computed on distinct values."""
    if root is None or not pc.any(pc.equal(root, "SPX")).as_py():
        return pa.repeat("PM", b.n)
    root_is_spx = pc.take(pc.equal(root, "SPX"), root_indices)
    exp_np = pc.cast(exp_days, pa.int32()).to_numpy(zero_copy_only=False)
    am_exp = pa.array(_am_days(np.nan_to_num(exp_np.astype(np.float64), nan=0).astype(np.int64)))
    am_exp = pc.and_(am_exp, pc.is_valid(exp_days))
    am = pc.and_(root_is_spx, pc.take(am_exp, exp_indices)).fill_null(False)
    return pc.if_else(am, "AM", "PM")


def _exp_columns(b: _Batch, lower: str, candidates) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """(expiration date32 per row, expiry-day end ns per row, distinct days, row indices)."""
    parsed, indices, _ = b.dates(lower, candidates)
    days = pc.cast(pc.cast(parsed, pa.timestamp("s")), pa.date32(), safe=False)
    return pc.take(days, indices), pc.take(_day_end_ns(days), indices), days, indices


def _chain(n: int, source: str, **columns) -> dict:
    out = {}
    for name in CHAIN_SCHEMA.names:
        value = columns.get(name)
        kind = CHAIN_SCHEMA.field(name).type
        if name == "source":
            value = pa.repeat(source, n)
        elif value is None:
            # Absent: NaN for quotes/IV/Greeks, null for counts and the underlying's price.
            floating = pa.types.is_floating(kind) and name != "underlying_price"
            value = pa.repeat(pa.scalar(np.nan), n) if floating else pa.nulls(n, kind)
        elif isinstance(value, str):
            value = pa.repeat(value, n)
        elif pa.types.is_floating(kind) and name != "underlying_price":
            value = _nan(value)
        out[name] = value
    return out


_ISO = (r"^\d{4}-\d{1,2}-\d{1,2}$", "%Y-%m-%d")
_US4 = (r"^\d{1,2}/\d{1,2}/\d{4}$", "%m/%d/%Y")
_US2 = (r"^\d{1,2}/\d{1,2}/\d{2}$", "%m/%d/%y")
_US4_T = (r"^\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}:\d{2}$", "%m/%d/%Y %H:%M:%S")
_US4_HM = (r"^\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}$", "%m/%d/%Y %H:%M")
_ISO_T = (r"^\d{4}-\d{1,2}-\d{1,2} \d{1,2}:\d{2}:\d{2}$", "%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- OptionsDX
def _optionsdx_prepare(ctx: _Ctx) -> dict:
    roles = {"quote_unixtime": "i", "underlying_last": "f", "expire_date": "d", "strike": "f"}
    for side in "cp":
        for name in ("bid", "ask", "last", "volume", "iv", "delta", "gamma", "theta", "vega"):
            if ctx.has(f"{side}_{name}"):
                roles[f"{side}_{name}"] = "f"
    return roles


def _optionsdx(b: _Batch) -> list[_Part]:
    ctx = b.ctx
    epoch = b.integer("quote_unixtime", "unparseable_date")
    b.check("missing_value", b.missing("quote_unixtime"), "quote_unixtime", "empty")
    quote_ns = pc.multiply(epoch, _NS)                      # epoch SECONDS → ns (an instant)
    quote_time = pc.cast(quote_ns, _TS)
    underlying_price = b.num("underlying_last", "no_underlying_price")
    _check_underlying_price(b, underlying_price, "underlying_last")
    expiration, exp_end, _, _ = _exp_columns(b, "expire_date", (_ISO,))
    strike = b.num("strike", "bad_strike")
    _check_strike(b, strike, "strike")
    _check_expiry(b, quote_ns, exp_end, expiration, "expire_date")
    underlying = ctx.label or "SPY"
    parts = []
    for side, letter in (("c", "C"), ("p", "P")):
        checks: list[_Check] = []
        bid = b.num(f"{side}_bid", into=checks)
        ask = b.num(f"{side}_ask", into=checks)
        _check_quotes(b, bid, ask, f"{side}_bid", f"{side}_ask", checks)
        volume = _counts(b.num(f"{side}_volume", into=checks)).fill_null(0)   # blank = none traded
        parts.append(_Part(_chain(
            b.n, "optionsdx", quote_time=quote_time, underlying=underlying, underlying_price=underlying_price,
            expiration=expiration, settlement="PM", strike=strike, option_type=letter, bid=bid, ask=ask,
            last=_positive_or_nan(b.num(f"{side}_last", into=checks)), volume=volume,
            iv=_positive_or_nan(b.num(f"{side}_iv", into=checks)),
            delta=b.num(f"{side}_delta", into=checks), gamma=b.num(f"{side}_gamma", into=checks),
            theta=b.num(f"{side}_theta", into=checks), vega=b.num(f"{side}_vega", into=checks)), checks))
    return parts


# ---------------------------------------------------------------- Cboe
_CBOE_FLOATS = ("strike", "close", "trade_volume", "open_interest", "bid_1545", "ask_1545",
                "active_underlying_price_1545", "implied_volatility_1545", "delta_1545", "gamma_1545",
                "theta_1545", "vega_1545")


def _cboe_prepare(ctx: _Ctx) -> dict:
    roles = {name: "d" for name in ("underlying_symbol", "quote_date", "root", "expiration", "option_type")}
    roles.update({name: "f" for name in _CBOE_FLOATS if ctx.has(name)})
    # Contract counts are integers in Cboe files: parsed as such (faster); a "12.0" would send
    # the file down the text path, still correct.
    roles.update({name: "i" for name in ("trade_volume", "open_interest") if ctx.has(name)})
    return roles


_CBOE_DATES = (_ISO, _US4_T, _US4, _ISO_T)


def _cboe(b: _Batch) -> list[_Part]:
    values, indices = b.required_text("underlying_symbol")
    underlying_values = pc.utf8_ltrim(values, characters="^")            # ^SPX → SPX
    underlying = pc.take(underlying_values, indices)
    keep = _label_keep(b, underlying_values, indices)
    parsed, q_indices, _ = b.dates("quote_date", _CBOE_DATES)
    q_days = pc.cast(parsed, pa.date32(), safe=False)
    # The _1545 columns are the 15:45 snapshot, 12:45 on early-close days (close − 15 min).
    quote_time = pc.take(_local_stamp(q_days, 15 * 60 + 45, 12 * 60 + 45), q_indices)
    quote_ns = pc.cast(quote_time, pa.int64())
    expiration, exp_end, exp_days, exp_indices = _exp_columns(b, "expiration", _CBOE_DATES)
    root_values, root_indices = b.dict_parts("root")
    settlement = _settlement(b, pc.utf8_upper(root_values), root_indices, exp_days, exp_indices)
    strike = b.num("strike", "bad_strike")
    _check_strike(b, strike, "strike")
    option_type = b.option_types("option_type")
    underlying_price = b.num("active_underlying_price_1545", "no_underlying_price")
    _check_underlying_price(b, underlying_price, "active_underlying_price_1545")
    _check_expiry(b, quote_ns, exp_end, expiration, "expiration")
    checks: list[_Check] = []
    bid, ask = b.num("bid_1545", into=checks), b.num("ask_1545", into=checks)
    _check_quotes(b, bid, ask, "bid_1545", "ask_1545", checks)
    return [_Part(_chain(
        b.n, "cboe", quote_time=quote_time, underlying=underlying, underlying_price=underlying_price,
        expiration=expiration, settlement=settlement, strike=strike, option_type=option_type, bid=bid, ask=ask,
        last=_positive_or_nan(b.num("close", into=checks)), volume=_counts(b.num("trade_volume", into=checks)),
        open_interest=_counts(b.num("open_interest", into=checks)),
        iv=_positive_or_nan(b.num("implied_volatility_1545", into=checks)),
        delta=b.num("delta_1545", into=checks), gamma=b.num("gamma_1545", into=checks),
        theta=b.num("theta_1545", into=checks), vega=b.num("vega_1545", into=checks)), checks, keep)]


def _label_keep(b: _Batch, values: pa.Array, indices: pa.Array) -> np.ndarray | None:
    """Rows of the ``underlying`` asked for (None: no filter). Unknown (blank) stays, to be reported."""
    label = b.ctx.label
    if label is None:
        return None
    other = pc.and_(pc.not_equal(pc.utf8_upper(values), label), pc.not_equal(values, ""))
    if not pc.any(other).as_py():
        return None
    b.ctx.others.update(v for v in values.filter(other).to_pylist()[:20])
    return ~pc.take(other, indices).fill_null(False).to_numpy(zero_copy_only=False)


def _root_of(symbols: pa.Array) -> pa.Array:
    """Leading letters of an option symbol (``SPXW  240621C…`` → SPXW), upper-case."""
    return pc.utf8_upper(pc.struct_field(pc.extract_regex(symbols, r"^\s*(?P<root>[A-Za-z]+)"), [0]))


# ---------------------------------------------------------------- IVolatility
def _ivol_prepare(ctx: _Ctx) -> dict:
    roles = {"symbol": "d", "date": "d", "expiration": "d", "call/put": "d"}
    if ctx.has("option symbol"):
        roles["option symbol"] = "d"
    for name in ("strike", "bid", "ask", "iv", "volume", "open interest", "stock price for iv",
                 "delta", "gamma", "theta", "vega"):
        if ctx.has(name):
            roles[name] = "f"
    return roles


def _ivolatility(b: _Batch) -> list[_Part]:
    values, indices = b.required_text("symbol")
    values = pc.utf8_upper(values)
    underlying = pc.take(values, indices)
    keep = _label_keep(b, values, indices)
    parsed, q_indices, _ = b.dates("date", (_US4, _US2, _ISO))
    q_days = pc.cast(parsed, pa.date32(), safe=False)
    quote_time = pc.take(_local_stamp(q_days, 16 * 60, 13 * 60), q_indices)     # EOD: the session close
    quote_ns = pc.cast(quote_time, pa.int64())
    expiration, exp_end, exp_days, exp_indices = _exp_columns(b, "expiration", (_US4, _US2, _ISO))
    option_symbols = b.dict_parts("option symbol")
    if option_symbols is not None:
        root_values, root_indices = _root_of(option_symbols[0]), option_symbols[1]
    else:
        root_values, root_indices = values, indices
    settlement = _settlement(b, root_values, root_indices, exp_days, exp_indices)
    strike = b.num("strike", "bad_strike")
    _check_strike(b, strike, "strike")
    option_type = b.option_types("call/put")
    # ``stock price for iv`` is the unadjusted price the vendor's IV used; ``adjusted close`` is
    # split/dividend adjusted and would shift every moneyness: never read.
    underlying_price = b.num("stock price for iv", "no_underlying_price")
    _check_underlying_price(b, underlying_price, "stock price for iv")
    _check_expiry(b, quote_ns, exp_end, expiration, "expiration")
    checks: list[_Check] = []
    bid, ask = b.num("bid", into=checks), b.num("ask", into=checks)
    _check_quotes(b, bid, ask, "bid", "ask", checks)
    return [_Part(_chain(
        b.n, "ivolatility", quote_time=quote_time, underlying=underlying, underlying_price=underlying_price,
        expiration=expiration, settlement=settlement, strike=strike, option_type=option_type, bid=bid, ask=ask,
        volume=_counts(b.num("volume", into=checks)), open_interest=_counts(b.num("open interest", into=checks)),
        iv=_positive_or_nan(b.num("iv", into=checks)),                      # −1 = missing
        delta=b.num("delta", into=checks), gamma=b.num("gamma", into=checks),
        theta=b.num("theta", into=checks), vega=b.num("vega", into=checks)), checks, keep)]


# ---------------------------------------------------------------- ORATS
_ORATS_LONG = {"date": "tradedate", "price": "stockprice", "cbid": "callbidprice", "cask": "callaskprice",
               "pbid": "putbidprice", "pask": "putaskprice", "cvol": "callvolume", "pvol": "putvolume",
               "coi": "callopeninterest", "poi": "putopeninterest", "civ": "callmidiv", "piv": "putmidiv"}
_ORATS_SHORT = {"date": "trade_date", "price": "stkpx", "cbid": "cbidpx", "cask": "caskpx",
                "pbid": "pbidpx", "pask": "paskpx", "cvol": "cvolu", "pvol": "pvolu",
                "coi": "coi", "poi": "poi", "civ": "cmidiv", "piv": "pmidiv"}
_ORATS_DATES = (_ISO, _US4, _ISO_T)
_ORATS_UPDATED = ((r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})$", "%Y-%m-%dT%H:%M:%S%z"),
                  (r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?$", "%Y-%m-%dT%H:%M:%S"))


def _orats_prepare(ctx: _Ctx) -> dict:
    names = _ORATS_LONG if ctx.has("callbidprice") else _ORATS_SHORT
    ctx.extra["orats"] = names
    roles = {"ticker": "d", names["date"]: "d", "expirdate": "d", "strike": "f"}
    for key in ("price", "cbid", "cask", "pbid", "pask", "cvol", "pvol", "coi", "poi", "civ", "piv"):
        if ctx.has(names[key]):
            roles[names[key]] = "f"
    for name in ("delta", "gamma", "theta", "vega", "spotprice"):
        if ctx.has(name):
            roles[name] = "f"
    if ctx.has("updatedat"):
        roles["updatedat"] = "d"
    return roles


def _orats(b: _Batch) -> list[_Part]:
    names = b.ctx.extra["orats"]
    values, indices = b.required_text("ticker")
    values = pc.utf8_upper(values)
    underlying = pc.take(values, indices)
    keep = _label_keep(b, values, indices)
    parsed, q_indices, _ = b.dates(names["date"], _ORATS_DATES)
    q_days = pc.cast(parsed, pa.date32(), safe=False)
    close_stamp = _local_stamp(q_days, 16 * 60, 13 * 60)
    quote_time = pc.take(close_stamp, q_indices)
    if b.raw("updatedat") is not None:
        # updatedAt gives the snapshot instant (UTC when zone-less); used only when it falls on the
        # trade date (ET), otherwise (a later re-publication) the trade date's close stands.
        u_values, u_indices = b.dict_parts("updatedat")
        fixed = pc.replace_substring_regex(pc.replace_substring(u_values, " ", "T"), r"\.\d+", "")
        fmt = None
        for value in fixed.to_pylist():
            fmt = next((f for p, f in _ORATS_UPDATED if value and re.match(p, value)), None)
            if fmt:
                break
        if fmt is not None:
            stamp = pc.strptime(fixed, format=fmt, unit="s", error_is_null=True)
            if "%z" not in fmt:
                stamp = pc.assume_timezone(stamp, timezone="UTC")
            stamp = pc.cast(pc.cast(stamp, pa.timestamp("s", tz="UTC")), _TS)
            stamp_rows = pc.take(stamp, u_indices)
            same_day = pc.equal(pc.cast(pc.local_timestamp(stamp_rows), pa.date32(), safe=False),
                                pc.take(q_days, q_indices)).fill_null(False)
            quote_time = pc.if_else(same_day, stamp_rows, quote_time)
    quote_ns = pc.cast(quote_time, pa.int64())
    expiration, exp_end, exp_days, exp_indices = _exp_columns(b, "expirdate", _ORATS_DATES)
    settlement = _settlement(b, values, indices, exp_days, exp_indices)
    strike = b.num("strike", "bad_strike")
    _check_strike(b, strike, "strike")
    price = b.num(names["price"], "no_underlying_price")
    price_field = names["price"]
    spot = b.raw("spotprice")
    if spot is not None:
        # Index tickers: stockPrice is ORATS's implied forward per expiry; spotPrice is the index.
        spot = b.num("spotprice", "no_underlying_price")
        is_index = pc.take(pc.is_in(values, value_set=pa.array(sorted(INDEX_TICKERS))), indices).fill_null(False)
        price = pc.if_else(pc.and_(is_index, pc.greater(spot, 0.0).fill_null(False)), spot, price)
    _check_underlying_price(b, price, price_field)
    _check_expiry(b, quote_ns, exp_end, expiration, "expirdate")
    delta, gamma, vega = b.num("delta"), b.num("gamma"), b.num("vega")
    theta = b.num("theta")
    parts = []
    for letter, bid_key, ask_key, vol_key, oi_key, iv_key in (("C", "cbid", "cask", "cvol", "coi", "civ"),
                                                                ("P", "pbid", "pask", "pvol", "poi", "piv")):
        checks: list[_Check] = []
        bid, ask = b.num(names[bid_key], into=checks), b.num(names[ask_key], into=checks)
        _check_quotes(b, bid, ask, names[bid_key], names[ask_key], checks)
        call = letter == "C"
        parts.append(_Part(_chain(
            b.n, "orats", quote_time=quote_time, underlying=underlying, underlying_price=price,
            expiration=expiration, settlement=settlement, strike=strike, option_type=letter, bid=bid, ask=ask,
            volume=_counts(b.num(names[vol_key], into=checks)), open_interest=_counts(b.num(names[oi_key], into=checks)),
            iv=_positive_or_nan(b.num(names[iv_key], into=checks)),
            # ORATS Greeks are the call's: put delta = call delta − 1 (parity, no dividends in
            # the delta of an equity option to first order), gamma/vega identical, put theta
            # unknown (module docstring) → NaN.
            delta=delta if call else pc.subtract(delta, 1.0), gamma=gamma, vega=vega,
            theta=theta if call else None), checks, keep))
    return parts


# ---------------------------------------------------------------- DeltaNeutral
_DN_L2 = {"underlying": "underlyingsymbol", "price": "underlyingprice", "symbol": "optionsymbol", "type": "type",
          "exp": "expiration", "date": "datadate", "strike": "strike", "last": "last", "bid": "bid", "ask": "ask",
          "volume": "volume", "oi": "openinterest", "iv": "iv"}
_DN_LOWER = {"underlying": "underlying", "price": "underlying_last", "symbol": "optionroot", "type": "type",
             "exp": "expiration", "date": "quotedate", "strike": "strike", "last": "last", "bid": "bid", "ask": "ask",
             "volume": "volume", "oi": "openinterest", "iv": "impliedvol"}
_DN_DATES = (_US4_HM, _US4, _ISO, _ISO_T, (r"^\d{4}-\d{1,2}-\d{1,2} \d{1,2}:\d{2}$", "%Y-%m-%d %H:%M"))


def _dn_prepare(ctx: _Ctx) -> dict:
    names = _DN_L2 if ctx.has("underlyingsymbol") else _DN_LOWER
    ctx.extra["dn"] = names
    roles = {names[k]: "d" for k in ("underlying", "symbol", "type", "exp", "date") if ctx.has(names[k])}
    for key in ("price", "strike", "last", "bid", "ask", "volume", "oi", "iv"):
        if ctx.has(names[key]):
            roles[names[key]] = "f"
    for name in ("delta", "gamma", "theta", "vega"):
        if ctx.has(name):
            roles[name] = "f"
    return roles


def _deltaneutral(b: _Batch) -> list[_Part]:
    names = b.ctx.extra["dn"]
    values, indices = b.required_text(names["underlying"])
    values = pc.utf8_upper(values)
    underlying = pc.take(values, indices)
    keep = _label_keep(b, values, indices)
    parsed, q_indices, has_time = b.dates(names["date"], _DN_DATES)
    if has_time:
        stamps = pc.assume_timezone(pc.cast(parsed, pa.timestamp("ns")), timezone=EXCHANGE_TZ,
                                    ambiguous="earliest", nonexistent="earliest")
    else:
        stamps = _local_stamp(pc.cast(parsed, pa.date32(), safe=False), 16 * 60, 13 * 60)
    quote_time = pc.take(stamps, q_indices)
    quote_ns = pc.cast(quote_time, pa.int64())
    expiration, exp_end, exp_days, exp_indices = _exp_columns(b, names["exp"], _DN_DATES)
    symbols = b.dict_parts(names["symbol"])
    root_values, root_indices = (_root_of(symbols[0]), symbols[1]) if symbols is not None else (values, indices)
    settlement = _settlement(b, root_values, root_indices, exp_days, exp_indices)
    strike = b.num(names["strike"], "bad_strike")
    _check_strike(b, strike, names["strike"])
    option_type = b.option_types(names["type"])
    price = b.num(names["price"], "no_underlying_price")
    _check_underlying_price(b, price, names["price"])
    _check_expiry(b, quote_ns, exp_end, expiration, names["exp"])
    checks: list[_Check] = []
    bid, ask = b.num(names["bid"], into=checks), b.num(names["ask"], into=checks)
    _check_quotes(b, bid, ask, names["bid"], names["ask"], checks)
    return [_Part(_chain(
        b.n, "deltaneutral", quote_time=quote_time, underlying=underlying, underlying_price=price,
        expiration=expiration, settlement=settlement, strike=strike, option_type=option_type, bid=bid, ask=ask,
        last=_positive_or_nan(b.num(names["last"], into=checks)), volume=_counts(b.num(names["volume"], into=checks)),
        open_interest=_counts(b.num(names["oi"], into=checks)), iv=_positive_or_nan(b.num(names["iv"], into=checks)),
        delta=b.num("delta", into=checks), gamma=b.num("gamma", into=checks),
        # DeltaNeutral theta is per YEAR and vega per 1.00 of vol (reference §2.4): → per calendar
        # day and per vol point.
        theta=pc.divide(b.num("theta", into=checks), 365.0), vega=pc.divide(b.num("vega", into=checks), 100.0)),
        checks, keep)]


# ---------------------------------------------------------------- bars (option and stock)
_RFC3339 = ((r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:?\d{2})$", "%Y-%m-%dT%H:%M:%S%z"),
            (r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:?\d{2})$", "%Y-%m-%d %H:%M:%S%z"),
            (r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$", "%Y-%m-%dT%H:%M:%S"),
            (r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$", "%Y-%m-%d %H:%M:%S"),
            (r"^\d{4}-\d{2}-\d{2}$", "%Y-%m-%d"))
_TIME_COLUMNS = ("window_start", "timestamp", "t", "time")
_SYMBOL_COLUMNS = ("symbol", "ticker")
_OHLCV = {"open": ("open", "o"), "high": ("high", "h"), "low": ("low", "l"), "close": ("close", "c"),
          "volume": ("volume", "v")}


def _epoch_unit(value: str | None) -> int:
    """ns per unit of a numeric bar time, from its magnitude (s, ms, µs or ns since the epoch)."""
    magnitude = abs(int(value)) if value and re.match(_INT_RE, value.strip()) else 0
    return 1 if magnitude >= 10**17 else 1_000 if magnitude >= 10**14 else 1_000_000 if magnitude >= 10**11 else _NS


def _bar_prepare(ctx: _Ctx) -> dict:
    time_col = next((c for c in _TIME_COLUMNS if ctx.has(c)), None)
    symbol_col = next((c for c in _SYMBOL_COLUMNS if ctx.has(c)), None)
    numeric = bool(re.match(_INT_RE, (ctx.first_row.get(time_col) or "").strip()))
    ctx.extra["bars"] = {"time": time_col, "symbol": symbol_col, "numeric": numeric,
                         "ohlcv": {k: next((a for a in names if ctx.has(a)), None) for k, names in _OHLCV.items()}}
    if numeric:
        ctx.epoch_unit[time_col] = _epoch_unit(ctx.first_row.get(time_col))
    roles = {time_col: "i" if numeric else "d"}
    if symbol_col:
        roles[symbol_col] = "d"
    roles.update({col: "f" for col in ctx.extra["bars"]["ohlcv"].values() if col})
    return roles


def _bar_starts(b: _Batch) -> tuple[pa.Array, pa.Array]:
    """(bar start instants as UTC ns int64, per row; the raw time column for messages)."""
    info = b.ctx.extra["bars"]
    col = info["time"]
    if info["numeric"]:
        raw = b.integer(col, "unparseable_date")
        b.check("missing_value", b.missing(col), col, "empty")
        return pc.multiply(raw, b.ctx.epoch_unit[col]), raw
    parsed, indices, _ = b.dates(col, _RFC3339)
    fmt = b.ctx.date_formats.get(col) or ""
    if "%z" not in fmt:
        # A zone-less time: ET wall time (a date alone: that day's midnight ET, a daily bar).
        parsed = pc.assume_timezone(pc.cast(parsed, pa.timestamp("ns")), timezone=EXCHANGE_TZ,
                                    ambiguous="earliest", nonexistent="earliest")
    return pc.take(pc.cast(pc.cast(parsed, pa.timestamp("ns", tz="UTC")), pa.int64()), indices), b.raw(col)


def _bar_closes(b: _Batch, starts_ns: pa.Array) -> pa.Array:
    """Bar close instants (UTC ns): start + width; daily bars: the session close of the start's date."""
    minutes = b.ctx.minutes
    if minutes != 1440:
        return pc.add(starts_ns, minutes * _NS_PER_MIN)
    days = pc.cast(pc.local_timestamp(pc.cast(starts_ns, _TS)), pa.date32(), safe=False)
    distinct = pc.unique(days)
    return pc.take(pc.cast(_local_stamp(distinct, 16 * 60, 13 * 60), pa.int64()), pc.index_in(days, value_set=distinct))


def _infer_minutes(ctx: _Ctx) -> int:
    """Bar width from the first MiB: daily when every start is midnight ET, else the smallest
    spacing between distinct starts (module docstring)."""
    stream = ctx.src.open()
    try:
        reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=SAMPLE_BYTES, skip_rows=1,
                                                                       column_names=ctx.names, use_threads=False),
                                parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip",
                                                                 quote_char='"' if ctx.quoted else False),
                                convert_options=ctx.convert_options(tolerant=True))
        rb = reader.read_next_batch()
    except (pa.ArrowInvalid, StopIteration) as error:
        raise DataError(f"{ctx.name}: cannot read the first bars to infer their width ({error}); pass minutes") from None
    finally:
        stream.close()
    sample = _Batch(rb, ctx, tolerant=True)
    starts, _ = _bar_starts(sample)
    starts = starts.drop_null().to_numpy()
    if len(starts) == 0:
        raise DataError(f"{ctx.name}: no readable bar time in the first rows; pass minutes")
    local = pc.local_timestamp(pc.cast(pa.array(starts), _TS))
    if pc.all(pc.and_(pc.equal(pc.hour(local), 0), pc.equal(pc.minute(local), 0))).as_py():
        return 1440
    distinct = np.unique(starts)
    if len(distinct) < 2:
        raise DataError(f"{ctx.name}: one bar time in the first rows ({pa.array(starts[:1]).cast(_TS)[0]}): "
                        f"cannot infer the bar width; pass minutes")
    step = int(np.diff(distinct).min())
    if step % _NS_PER_MIN:
        raise DataError(f"{ctx.name}: bar starts {step / _NS:g} s apart are not whole minutes; pass minutes")
    return step // _NS_PER_MIN


def _option_bars(b: _Batch) -> list[_Part]:
    from data_factory.alpaca_feed import parse_occ_symbol   # heavy module: imported only when needed

    info = b.ctx.extra["bars"]
    symbol_col = info["symbol"]
    values, indices = b.required_text(symbol_col)
    parsed = [parse_occ_symbol(v[2:] if v.upper().startswith("O:") else v) for v in values.to_pylist()]
    ok = pa.array([p is not None for p in parsed])
    roots = [p[0] if p else None for p in parsed]
    under_values = pa.array([WEEKLY_ROOTS.get(r, r) if r else None for r in roots], pa.string())
    root_values = pa.array(roots, pa.string())
    exp_values = pa.array([p[1] if p else None for p in parsed], pa.int32()).cast(pa.date32())
    b.check("missing_value", pc.take(pc.and_(pc.invert(ok), pc.not_equal(values, "")), indices), symbol_col,
            "not an OCC option symbol (root, YYMMDD, C/P, strike × 1000)")
    underlying = pc.take(under_values, indices)
    keep = _label_keep(b, pc.fill_null(under_values, ""), indices)
    starts, raw_time = _bar_starts(b)
    close_ns = _bar_closes(b, starts)
    quote_time = pc.cast(close_ns, _TS)
    expiration = pc.take(exp_values, indices)
    _check_expiry(b, close_ns, pc.take(_day_end_ns(exp_values), indices), expiration, symbol_col)
    settlement = _settlement(b, root_values, indices, exp_values, indices)
    ohlcv = info["ohlcv"]
    close = b.num(ohlcv["close"]) if ohlcv["close"] else pa.nulls(b.n, pa.float64())
    b.check("missing_value", pc.is_null(close), ohlcv["close"] or "close", "empty")
    b.check("negative_quote", pc.less(close, 0.0), ohlcv["close"] or "close", "below zero")
    volume = _counts(b.num(ohlcv["volume"])) if ohlcv["volume"] else None
    return [_Part(_chain(
        b.n, b.ctx.spec.name, quote_time=quote_time, underlying=underlying, underlying_price=None,
        expiration=expiration, settlement=settlement, strike=pc.take(pa.array([p[3] if p else None for p in parsed],
                                                                              pa.float64()), indices),
        option_type=pc.take(pa.array([("C" if p[2] else "P") if p else None for p in parsed], pa.string()), indices),
        last=close, volume=volume), [], keep)]


def _stock_bars(b: _Batch) -> list[_Part]:
    info = b.ctx.extra["bars"]
    keep = None
    if info["symbol"]:
        values, indices = b.required_text(info["symbol"])
        values = pc.utf8_upper(values)
        symbol = pc.take(values, indices)
        keep = _label_keep(b, values, indices)
    else:
        symbol = pa.repeat(b.ctx.label, b.n)
    starts, _ = _bar_starts(b)
    time = pc.cast(_bar_closes(b, starts), _TS)
    ohlcv = info["ohlcv"]
    columns = {}
    for name in ("open", "high", "low", "close"):
        columns[name] = b.num(ohlcv[name]) if ohlcv[name] else pa.nulls(b.n, pa.float64())
        if name == "close":
            b.check("missing_value", pc.is_null(columns[name]), ohlcv[name] or name, "empty")
        b.check("negative_quote", pc.less(columns[name], 0.0), ohlcv[name] or name, "below zero")
        columns[name] = _nan(columns[name]) if name != "close" else columns[name]
    volume = b.num(ohlcv["volume"]) if ohlcv["volume"] else pa.repeat(pa.scalar(np.nan), b.n)
    out = {"time": time, "symbol": symbol, "minutes": pa.repeat(pa.scalar(b.ctx.minutes, pa.int32()), b.n),
           **columns, "volume": _nan(volume), "source": pa.repeat("stock_bars", b.n)}
    return [_Part(out, [], keep)]


_SPECS = {spec.name: spec for spec in (
    _Spec("optionsdx", (("quote_unixtime", "underlying_last", "expire_date", "strike", "c_bid", "c_ask",
                         "p_bid", "p_ask"),), _optionsdx_prepare, _optionsdx, rows_per_line=2),
    _Spec("cboe", (("underlying_symbol", "quote_date", "root", "expiration", "strike", "option_type", "bid_1545",
                    "ask_1545", "active_underlying_price_1545"),), _cboe_prepare, _cboe),
    _Spec("ivolatility", (("symbol", "date", "expiration", "strike", "call/put", "bid", "ask", "iv",
                           "stock price for iv"),), _ivol_prepare, _ivolatility),
    _Spec("orats", (("ticker", "tradedate", "expirdate", "strike", "stockprice", "callbidprice", "callaskprice",
                     "putbidprice", "putaskprice"),
                    ("ticker", "stkpx", "expirdate", "strike", "cbidpx", "caskpx", "pbidpx", "paskpx", "trade_date")),
          _orats_prepare, _orats, rows_per_line=2),
    _Spec("deltaneutral", (("underlyingsymbol", "underlyingprice", "optionsymbol", "type", "expiration", "datadate",
                            "strike", "bid", "ask"),
                           ("underlying", "underlying_last", "optionroot", "type", "expiration", "quotedate", "strike",
                            "bid", "ask")), _dn_prepare, _deltaneutral),
    _Spec("polygon_option_bars", (("ticker", "window_start", "open", "high", "low", "close", "volume"),),
          _bar_prepare, _option_bars, retain="run"),
    _Spec("alpaca_option_bars", (("symbol", "timestamp", "open", "high", "low", "close", "volume"),),
          _bar_prepare, _option_bars, retain="run"),
    _Spec("stock_bars", tuple((t, *ohlc) for t in _TIME_COLUMNS for ohlc in (("open", "high", "low", "close"),
                                                                           ("o", "h", "l", "c"))),
          _bar_prepare, _stock_bars, retain="run"),
)}


# ============================================================================== public API
def format_kind(fmt: str) -> str:
    """"chain" (CHAIN_SCHEMA tables) or "bars" (BAR_SCHEMA tables)."""
    if fmt not in _KINDS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return _KINDS[fmt]


def _missing(spec: _Spec, lower: set[str]) -> list[str]:
    return min(([c for c in variant if c not in lower] for variant in spec.variants), key=len)


def _is_occ(value: str | None) -> bool:
    text = (value or "").strip().upper()
    text = text[2:] if text.startswith("O:") else text
    return bool(re.match(r"^[A-Z0-9]{1,6}\s*\d{6}[CP]\d{8}$", text))


def _detect(names: list[str], first: dict) -> str | None:
    lower = {n.lower() for n in names}
    for fmt in ("optionsdx", "cboe", "ivolatility", "orats", "deltaneutral"):
        if not _missing(_SPECS[fmt], lower):
            return fmt
    if not _missing(_SPECS["polygon_option_bars"], lower):
        return "polygon_option_bars" if _is_occ(first.get("ticker")) else "stock_bars"
    if not _missing(_SPECS["alpaca_option_bars"], lower):
        return "alpaca_option_bars" if _is_occ(first.get("symbol")) else "stock_bars"
    if not _missing(_SPECS["stock_bars"], lower):
        return "stock_bars"
    return None


def _open(path, fmt: str | None, kind: str | None = None):
    src = _Source(path)
    header, first_line = src.head()
    names = [_clean(n) for n in _split(header)]
    if first_line is None:
        raise DataError(f"{src.name}: only a header, no data rows")
    first_values = [v.strip() for v in _split(first_line)]
    first = {n.lower(): v for n, v in zip(names, first_values)}
    detected = _detect(names, first)
    if fmt is None:
        if detected is None:
            raise DataError(f"{src.name}: unknown file format; its header is {header[:300]!r} "
                            f"(known formats: {', '.join(FORMATS)})")
        fmt = detected
    else:
        format_kind(fmt)
        missing = _missing(_SPECS[fmt], {n.lower() for n in names})
        if missing:
            raise DataError(f"{src.name}: --format {fmt} does not match its header (missing columns: "
                            f"{', '.join(missing)})")
    if kind is not None and _KINDS[fmt] != kind:
        raise DataError(f"{src.name}: {fmt} files hold {_KINDS[fmt]}, not {kind}")
    quoted = '"' in header or '"' in first_line
    return src, _SPECS[fmt], names, first, quoted


def detect_format(path) -> str:
    """The format of ``path`` from its header (a zip: its first member's); DataError naming the
    file and its header when no format matches."""
    return _open(path, None)[1].name


def iter_chain_batches(path, fmt: str | None = None, on_bad_rows: str = "stop", report: BadRowReport | None = None,
                       underlying: str | None = None, block_bytes: int = 64 << 20,
                       minutes: int | None = None) -> Iterator[pa.Table]:
    """CHAIN_SCHEMA tables, one per read block (``min(block_bytes, READ_BLOCK_MAX)``; the header
    is read, and the format checked, before this returns). ``underlying``: OptionsDX's underlying
    (default SPY); for formats that name theirs, keep only that one (the rest counted in
    ``rows_filtered``; none left is a DataError). ``minutes``: option-bar width (default inferred).
    ``report`` (optional) is filled as the blocks go by."""
    return _iter(path, fmt, "chain", on_bad_rows, report, underlying, block_bytes, minutes)


def iter_bar_batches(path, fmt: str | None = None, on_bad_rows: str = "stop", report: BadRowReport | None = None,
                     symbol: str | None = None, block_bytes: int = 64 << 20,
                     minutes: int | None = None) -> Iterator[pa.Table]:
    """BAR_SCHEMA tables. ``symbol`` names the bars of a file without a symbol column, or keeps only
    that symbol's bars. ``minutes``: bar width (default inferred; 1440 = daily)."""
    return _iter(path, fmt, "bars", on_bad_rows, report, symbol, block_bytes, minutes)


def load_file(path, fmt: str | None = None, on_bad_rows: str = "stop", **options) -> tuple[pa.Table, BadRowReport]:
    """The whole file as one canonical table (small files and tests) and its report."""
    report = BadRowReport()
    if fmt is None:
        fmt = detect_format(path)
    schema = CHAIN_SCHEMA if format_kind(fmt) == "chain" else BAR_SCHEMA
    iterate = iter_chain_batches if schema is CHAIN_SCHEMA else iter_bar_batches
    tables = list(iterate(path, fmt, on_bad_rows=on_bad_rows, report=report, **options))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.combine_chunks(), report


# ============================================================================== the engine
def _iter(path, fmt, kind, on_bad_rows, report, label, block_bytes, minutes) -> Iterator[pa.Table]:
    if on_bad_rows not in ("stop", "skip"):
        raise DataError(f"on_bad_rows {on_bad_rows!r}: use stop or skip")
    if minutes is not None and (int(minutes) != minutes or minutes <= 0):
        raise DataError(f"minutes {minutes!r}: give a positive whole number of minutes")
    src, spec, names, first, quoted = _open(path, fmt, kind)
    return _run(src, spec, names, first, quoted, on_bad_rows, report if report is not None else BadRowReport(),
                label, int(block_bytes), minutes)


def _run(src, spec, names, first, quoted, on_bad_rows, report, label, block_bytes, minutes):
    ctx = _Ctx(src, spec, names, first, label, minutes, quoted)
    # pyarrow needs the header, and every line, inside one block: never below twice the longest
    # of the first two lines.
    block_bytes = max(block_bytes, 2 * max(len(src.header_line), len(src.first_line)) + 2)
    ctx.roles = spec.prepare(ctx)
    if spec.name in ("polygon_option_bars", "alpaca_option_bars", "stock_bars"):
        if spec.name == "stock_bars" and ctx.extra["bars"]["symbol"] is None and not ctx.label:
            raise DataError(f"{ctx.name}: no symbol column; name the bars' symbol")
        if ctx.minutes is None:
            ctx.minutes = _infer_minutes(ctx)
    report.file, report.format = ctx.name, spec.name
    dedup = _Dedup(spec)
    for rb, delivered, tolerant in _read(ctx, block_bytes):
        lines = ctx.line_numbers(delivered, rb.num_rows)
        table = _process(ctx, rb, lines, tolerant, dedup, report, on_bad_rows)
        if table is not None and table.num_rows:
            yield table
    _account_malformed(ctx, None, report, on_bad_rows)
    if ctx.label and report.rows_kept == 0 and report.rows_filtered:
        others = ", ".join(sorted(ctx.others)[:10])
        raise DataError(f"{ctx.name}: no rows for {ctx.label} (it holds {others})")


def _read(ctx: _Ctx, block_bytes: int):
    """(record batch, rows delivered before it, tolerant). Starts with typed numeric columns (the
    fast path); a number that does not convert makes the reader fail, and the file is read again
    with text columns parsed by the loader (``_Batch.num``), the rows already delivered skipped,
    so the bad value becomes a reported row instead of a failed file. (pyarrow can only skip rows
    inside its first block, hence the re-read rather than a resume; it happens once per file.)"""
    tolerant = False
    delivered = 0
    while True:
        stream = ctx.src.open()
        skip = delivered
        blocks = None
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=min(block_bytes, READ_BLOCK_MAX), skip_rows=1,
                                               column_names=ctx.names,
                                               use_threads=False),   # row numbers of malformed lines need it
                parse_options=pacsv.ParseOptions(quote_char='"' if ctx.quoted else False, ignore_empty_lines=False,
                                                 invalid_row_handler=ctx.on_invalid_row),
                convert_options=ctx.convert_options(tolerant))
            blocks = _Prefetched(_merged_blocks(reader, block_bytes))
            for rb in blocks:
                if skip:
                    dropped = min(skip, rb.num_rows)
                    rb, skip = rb.slice(dropped), skip - dropped
                if rb.num_rows == 0:
                    continue
                yield rb, delivered, tolerant
                delivered += rb.num_rows
            return
        except pa.ArrowInvalid as error:
            text = str(error)
            if tolerant or "conversion error" not in text:
                last_line = int(ctx.line_numbers(delivered - 1, 1)[0]) if delivered else 1
                hint = " (a line longer than block_bytes?)" if "straddling" in text else ""
                raise DataError(f"{ctx.name}: cannot read as a {ctx.spec.name} CSV after line {last_line}: "
                                f"{text}{hint}") from None
            tolerant = True
        finally:
            if blocks is not None:
                blocks.close()                       # the parsing thread stops before its stream closes
            stream.close()


def _merged_blocks(reader, block_bytes: int):
    """The reader's blocks joined into record batches of about ``min(block_bytes, MERGE_MAX)``
    bytes of CSV: the loader's per-batch work (keys, checks, one canonical table) costs nearly the
    same for 20k rows as for 80k, so fewer, larger batches are ~2× cheaper to transform (measured
    0.36 s → 0.17 s for 1.3 M Cboe rows), while the reader itself parses fastest in 4 MiB blocks."""
    per_batch = max(1, min(block_bytes, MERGE_MAX) // min(block_bytes, READ_BLOCK_MAX))
    pending = []
    for rb in reader:
        pending.append(rb)
        if len(pending) >= per_batch:
            yield _joined(pending)
            pending = []
    if pending:
        yield _joined(pending)


def _joined(batches: list) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).unify_dictionaries().combine_chunks().to_batches()[0]


class _Prefetched:
    """Runs a batch iterator in a thread, at most ``depth`` batches ahead, so that parsing (pyarrow
    releases the GIL while it parses) overlaps the loader's transform and the store's writing on
    the second core. Exceptions raised by the iterator are raised by the consumer at the same point
    of the sequence. ``close()`` stops the thread (call it before closing the stream it reads).
    Written here because the standard library has no bounded, closeable prefetching iterator."""

    _DONE = object()

    def __init__(self, iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="csv-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
        except BaseException as error:        # handed to the consumer, raised there
            self._put((None, error))
            return
        self._put((self._DONE, None))

    def __iter__(self):
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._DONE:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


class _KeySet:
    """The kept keys: an open-addressing hash table (uint64 key hash → stored row) probed with numpy
    a whole block at a time, so adding a block costs O(block), never a re-hash of everything kept.
    Load factor ≤ 1/2; hash 0 marks an empty slot (a key hashing to 0 is stored as 1)."""

    def __init__(self, capacity: int = 1 << 12):
        self.slots = np.zeros(capacity, np.uint64)
        self.rows = np.zeros(capacity, np.int32)
        self.count = 0
        self.hashes = np.empty(capacity // 2, np.uint64)
        self.exact = np.empty((capacity // 2, 3), np.int64)
        self.lines = np.empty(capacity // 2, np.int64)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """Stored row of each hash, −1 when absent."""
        out = np.full(len(h), -1, np.int64)
        if not self.count:
            return out
        mask = np.uint64(len(self.slots) - 1)
        idx = np.arange(len(h))
        pos = (h & mask).astype(np.int64)
        while len(idx):
            found = self.slots[pos]
            hit = found == h[idx]
            out[idx[hit]] = self.rows[pos[hit]]
            go_on = ~hit & (found != 0)
            idx, pos = idx[go_on], (pos[go_on] + 1) & int(mask)
        return out

    def add(self, h: np.ndarray, exact: np.ndarray, lines: np.ndarray) -> None:
        """Store keys whose hashes are distinct and not yet stored."""
        n = len(h)
        if not n:
            return
        if 2 * (self.count + n) > len(self.slots):      # load ≤ 1/2; after a resize ≤ 1/4
            self._resize(1 << int(np.ceil(np.log2(4 * (self.count + n)))))
        start, self.count = self.count, self.count + n
        self.hashes[start:self.count], self.exact[start:self.count], self.lines[start:self.count] = h, exact, lines
        self._place(h, np.arange(start, self.count, dtype=np.int32))

    def _place(self, h: np.ndarray, rows: np.ndarray) -> None:
        mask = len(self.slots) - 1
        pos = (h & np.uint64(mask)).astype(np.int64)
        idx = np.arange(len(h))
        while len(idx):
            free = np.nonzero(self.slots[pos] == 0)[0]
            # Several keys may want one free slot: all write, one of them stays (the hashes are
            # distinct, so reading back tells which); the others probe on.
            self.slots[pos[free]] = h[idx[free]]
            won = free[self.slots[pos[free]] == h[idx[free]]]
            self.rows[pos[won]] = rows[idx[won]]
            placed = np.zeros(len(idx), bool)
            placed[won] = True
            idx, pos = idx[~placed], (pos[~placed] + 1) & mask

    def _resize(self, capacity: int) -> None:
        keep = self.count
        hashes, exact, lines = self.hashes[:keep], self.exact[:keep], self.lines[:keep]
        self.__init__(capacity)
        self.hashes[:keep], self.exact[:keep], self.lines[:keep] = hashes, exact, lines
        self.count = keep
        self._place(hashes, np.arange(keep, dtype=np.int32))

    def keep_only(self, keep: np.ndarray) -> None:
        """Forget the keys not in ``keep`` (a new snapshot); the table keeps its size unless it is
        far too large for what is left."""
        kept = int(keep.sum())
        hashes, exact, lines = self.hashes[:self.count][keep], self.exact[:self.count][keep], self.lines[:self.count][keep]
        if len(self.slots) > max(1 << 16, 16 * kept):
            self.__init__(1 << max(12, int(np.ceil(np.log2(4 * max(kept, 1))))))
        else:
            self.slots.fill(0)
        self.count = 0
        self.add(hashes, exact, lines)


class _Dedup:
    """Duplicate (quote_time, underlying, expiration, settlement, strike, type) / (symbol, time) keys
    across blocks, keeping only the newest snapshot's (and, for bars, run's) keys (module docstring).
    A key is three int64 (time ns; settlement|expiration|strike×1000|type packed; underlying code).

    Sorted chain files (the vendors' own order: quote time, underlying, root, expiry, strike, type)
    take a fast path: keys strictly increasing along the file within each part (the C and P rows
    of a wide line are separate lanes with disjoint keys) cannot repeat, so only that order is
    checked and the snapshot's keys are merely remembered. The first block out of order switches
    the file to the hash path: the remembered keys go into a ``_KeySet`` (hashed to one uint64,
    hash matches then compared exactly: a collision is no duplicate)."""

    def __init__(self, spec: _Spec):
        self.retain = spec.retain
        self.anchor = None                       # key of the newest kept row
        self._day = (0, 0)
        self.kept = _KeySet()
        self.hashed = spec.retain != "snapshot"  # bar files: the hash path from the start
        self.lane_last: dict[int, tuple] = {}    # fast path: last key of each lane
        self.snapshot = None                     # fast path: quote time of the remembered keys
        self.remembered: list[tuple] = []        # fast path: (keys (k, 3), lines) of that snapshot

    @staticmethod
    def keys(ctx: _Ctx, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time ns, packed contract, underlying/symbol code) per row."""
        if "quote_time" in table.column_names:
            when = table.column("quote_time").cast(pa.int64()).to_numpy()
            exp = table.column("expiration").cast(pa.int32()).to_numpy().astype(np.int64)
            strike = np.round(table.column("strike").to_numpy() * 1000).astype(np.int64)
            # (PM, expiration, strike, put) packed in 63 bits, in the order vendor files sort rows
            # (root SPX before SPXW, then expiry, strike, C before P): see _Dedup._ordered.
            contract = (1 - _flag(table.column("settlement"), "AM")) << 62
            contract |= (np.clip(exp, 0, (1 << 17) - 1) << 45) | (np.clip(strike, 0, (1 << 44) - 1) << 1)
            contract |= _flag(table.column("option_type"), "P")
            names = table.column("underlying")
        else:
            when = table.column("time").cast(pa.int64()).to_numpy()
            contract = np.zeros(len(when), np.int64)
            names = table.column("symbol")
        codes = []
        for chunk in names.chunks:
            distinct = pc.unique(chunk)
            mapped = ctx.code_of(distinct.to_pylist())
            codes.append(np.full(len(chunk), mapped[0]) if len(distinct) == 1 else
                         mapped[pc.index_in(chunk, value_set=distinct).to_numpy(zero_copy_only=False)])
        code = np.concatenate(codes) if codes else np.empty(0, np.int64)
        return when, contract, code

    @staticmethod
    def _hash(when: np.ndarray, contract: np.ndarray, code: np.ndarray) -> np.ndarray:
        """splitmix64 of a combination of the three parts (well mixed low bits: linear probing)."""
        with np.errstate(over="ignore"):
            h = when.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            h ^= contract.view(np.uint64) + np.uint64(0x632BE59BD9B4E019)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= code.view(np.uint64) * np.uint64(0x165667B19E3779F9)
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        h[h == 0] = 1                            # 0 marks an empty slot of _KeySet
        return h

    def find(self, keys: tuple, lines: np.ndarray, lanes: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(duplicate mask over the new rows, line of the row each duplicates); updates the state.
        ``lanes``: the part (C/P half of a wide line) of each row, non-decreasing."""
        n = len(lines)
        if n == 0:
            return np.zeros(0, bool), np.zeros(0, np.int64)
        if not self.hashed:
            if self._ordered(keys, lanes):
                self._remember(keys, lines)
                return np.zeros(n, bool), np.full(n, -1, np.int64)
            self._to_hashed()
        return self._find_hashed(keys, lines)

    def _ordered(self, keys: tuple, lanes: np.ndarray | None) -> bool:
        """Keys strictly increasing in (time, code, contract) along each lane, from the lane's last
        key of the previous block on. Commits the lanes' last keys only when every lane passes."""
        when, contract, code = keys
        bounds = [0, len(when)] if lanes is None else \
            [0, *np.nonzero(np.diff(lanes))[0] + 1, len(when)]
        lane_ids = [0] if lanes is None else [int(lanes[b]) for b in bounds[:-1]]
        if lanes is not None and len(set(lane_ids)) != len(lane_ids):
            return False
        last = {}
        for lane, start, end in zip(lane_ids, bounds[:-1], bounds[1:]):
            w, c, k = when[start:end], code[start:end], contract[start:end]
            if lane in self.lane_last:
                pw, pc_, pk = self.lane_last[lane]
                w, c, k = np.r_[pw, w], np.r_[pc_, c], np.r_[pk, k]
            dw, dc, dk = np.diff(w), np.diff(c), np.diff(k)
            if not ((dw > 0) | ((dw == 0) & ((dc > 0) | ((dc == 0) & (dk > 0))))).all():
                return False
            last[lane] = (w[-1], c[-1], k[-1])
        self.lane_last.update(last)
        return True

    def _remember(self, keys: tuple, lines: np.ndarray) -> None:
        """Keep the keys of the newest snapshot (in case a later block falls out of order)."""
        when = keys[0]
        newest = int(when.max())
        if newest != self.snapshot:
            self.snapshot, self.remembered = newest, []
        rows = when == newest
        self.remembered.append((np.stack([k[rows] for k in keys], axis=1), lines[rows]))

    def _to_hashed(self) -> None:
        import pandas as pd

        self.hashed = True
        if not self.remembered:
            return
        exact = np.concatenate([e for e, _ in self.remembered])
        lines = np.concatenate([ln for _, ln in self.remembered])
        h = self._hash(exact[:, 0], exact[:, 1], exact[:, 2])
        first = ~np.array(pd.Series(h, copy=False).duplicated(keep="first"), dtype=bool)
        self.kept.add(h[first], exact[first], lines[first])
        self.anchor = (int(exact[-1, 0]),)
        self.remembered = []

    def _find_hashed(self, keys: tuple, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import pandas as pd

        n = len(lines)
        h_new = self._hash(*keys)
        exact_new = np.stack(keys, axis=1)
        dup = np.zeros(n, bool)
        original = np.full(n, -1, np.int64)
        stored = self.kept.lookup(h_new)
        hit = np.nonzero(stored >= 0)[0]
        if len(hit):
            same = (exact_new[hit] == self.kept.exact[stored[hit]]).all(axis=1)
            dup[hit[same]] = True
            original[hit[same]] = self.kept.lines[stored[hit[same]]]
        # Repeats inside the block: pandas' hash table (khash) in one vectorised pass.
        repeat = np.array(pd.Series(h_new, copy=False).duplicated(keep="first"), dtype=bool)
        if repeat.any():
            gid, _ = pd.factorize(h_new)
            first_pos = np.empty(int(gid.max()) + 1, np.int64)
            first_pos[gid[~repeat]] = np.nonzero(~repeat)[0]
            candidates = np.nonzero(repeat)[0]
            origin = first_pos[gid[candidates]]
            same = (exact_new[candidates] == exact_new[origin]).all(axis=1)
            dup[candidates[same]] = True
            original[candidates[same]] = np.where(original[origin[same]] >= 0, original[origin[same]],
                                                  lines[origin[same]])
        # Stored: kept rows that are the first of their hash (a colliding different key is not).
        self._retain(h_new, exact_new, lines, ~dup & ~repeat & (stored < 0))
        return dup, original

    def _retain(self, h_new, exact_new, lines, new_keys) -> None:
        """Keep, for the next blocks, the keys of the newest quote time and (bar files) of the
        newest contract/symbol on its date: the rows a later duplicate can only repeat in an
        ordered file (module docstring)."""
        if not new_keys.any():
            return
        anchor = tuple(int(v) for v in exact_new[np.nonzero(new_keys)[0][-1]])
        if self.retain != "run":
            anchor = anchor[:1]                  # a snapshot is its quote time
        elif not self._day[0] <= anchor[0] < self._day[1]:
            self._day = _day_bounds_ns(anchor[0])

        def mask(exact: np.ndarray) -> np.ndarray:
            keep = exact[:, 0] == anchor[0]
            if self.retain == "run":
                keep |= ((exact[:, 1] == anchor[1]) & (exact[:, 2] == anchor[2]) & (exact[:, 0] >= self._day[0])
                         & (exact[:, 0] < self._day[1]))
            return keep

        if anchor != self.anchor:
            # A new snapshot/run: drop the kept keys it cannot repeat (once per change).
            if self.kept.count:
                self.kept.keep_only(mask(self.kept.exact[:self.kept.count]))
            self.anchor = anchor
        new = new_keys & mask(exact_new)
        self.kept.add(h_new[new], exact_new[new], lines[new])


def _flag(column: pa.ChunkedArray, value: str) -> np.ndarray:
    return pc.equal(column, value).to_numpy(zero_copy_only=False).astype(np.int64)


def _day_bounds_ns(instant_ns: int) -> tuple[int, int]:
    """UTC ns bounds of the ET calendar day holding ``instant_ns``."""
    day = pc.cast(pc.local_timestamp(pa.array([instant_ns], pa.int64()).cast(_TS)), pa.date32(), safe=False)
    start = pc.cast(_local_stamp(day, 0), pa.int64())[0].as_py()
    return start, _day_end_ns(day)[0].as_py()


def _value_text(check: _Check, i: int):
    if check.raw is None:
        return None
    value = check.raw[i].as_py()
    return value.strip() if isinstance(value, str) else value


def _describe(check: _Check, i: int) -> str:
    detail = check.detail(i) if callable(check.detail) else check.detail
    return f"{check.field} = {_value_text(check, i)!r}: {detail}"


def _process(ctx: _Ctx, rb: pa.RecordBatch, lines: np.ndarray, tolerant: bool, dedup: _Dedup,
             report: BadRowReport, on_bad_rows: str) -> pa.Table | None:
    b = _Batch(rb, ctx, tolerant)
    blank = b.all_blank()
    parts = ctx.spec.transform(b)
    schema = CHAIN_SCHEMA if ctx.spec.kind == "chain" else BAR_SCHEMA
    n = b.n
    checks: list[_Check] = []
    codes, keeps, tables, part_lines = [], [], [], []
    for part in parts:
        part_checks = sorted(b.common + part.checks, key=lambda c: _RANK[c.kind])
        code = np.zeros(n, np.int32)
        for j in range(len(part_checks) - 1, -1, -1):        # highest priority written last
            code[part_checks[j].mask] = len(checks) + j + 1
        checks.extend(part_checks)
        keep = np.ones(n, bool) if part.keep is None else part.keep.copy()
        if blank is not None:
            keep &= ~blank
        codes.append(code)
        keeps.append(keep)
        tables.append(pa.Table.from_arrays([part.columns[name] for name in schema.names], schema=schema))
        part_lines.append(lines)
    code = np.concatenate(codes)
    keep = np.concatenate(keeps)
    all_lines = np.concatenate(part_lines)
    # Each check's mask indexes a part's rows; remember which part each check came from.
    offsets = np.repeat(np.arange(len(parts)) * n, [len(b.common) + len(p.checks) for p in parts])
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    blank_rows = 0 if blank is None else int(blank.sum()) * len(parts)
    report.lines_read += n - (0 if blank is None else int(blank.sum()))
    report.rows_read += len(code) - blank_rows
    report.rows_filtered += int((~keep).sum()) - blank_rows
    bad = (code > 0) & keep
    valid = keep & ~bad
    selected = table if valid.all() else table.filter(pa.array(valid))
    lanes = np.repeat(np.arange(len(parts)), n)[valid] if len(parts) > 1 else None
    dup_valid, original = dedup.find(dedup.keys(ctx, selected), all_lines[valid], lanes)
    dup = np.zeros(len(code), bool)
    dup[np.nonzero(valid)[0][dup_valid]] = True
    original_full = np.full(len(code), -1, np.int64)
    original_full[np.nonzero(valid)[0]] = original

    def row_problem(k: int) -> tuple[str, str]:
        """(kind, description) of bad row k of the combined table."""
        if dup[k]:
            row = table.slice(k, 1).to_pylist()[0]
            key = (f"quote_time {row['quote_time']}, {row['underlying']} {row['expiration']} {row['settlement']} "
                   f"{row['strike']:g} {row['option_type']}" if "quote_time" in row else
                   f"{row['symbol']} at {row['time']}")
            return "duplicate_row", f"{key}: same key as line {original_full[k]}"
        check = checks[code[k] - 1]
        return check.kind, _describe(check, k - int(offsets[code[k] - 1]))

    malformed = _account_malformed(ctx, int(lines[-1]), report, on_bad_rows, dry=True)
    if on_bad_rows == "stop":
        if bad.any() or dup.any() or malformed:
            rows = np.nonzero(bad | dup)[0]
            k = rows[np.argmin(all_lines[rows])] if len(rows) else None
            if k is None or (malformed and malformed[0] < all_lines[k]):
                _account_malformed(ctx, int(lines[-1]), report, on_bad_rows)
            kind, text = row_problem(k)
            raise DataError(f"{ctx.name}: line {all_lines[k]}: {kind}: {text}")
        out = selected
    else:
        _account_malformed(ctx, int(lines[-1]), report, on_bad_rows)
        bad_rows = np.nonzero(bad)[0]
        if len(bad_rows):
            ranks = np.array([_RANK[checks[c - 1].kind] for c in code[bad_rows]])
            for rank in np.unique(ranks):
                found = bad_rows[ranks == rank]
                first = found[np.argsort(all_lines[found], kind="stable")][:MAX_EXAMPLES_PER_KIND]
                report._add(_PRIORITY[rank], len(found), [(all_lines[k], row_problem(k)[1]) for k in first])
        dup_rows = np.nonzero(dup)[0]
        if len(dup_rows):
            first = dup_rows[np.argsort(all_lines[dup_rows], kind="stable")][:MAX_EXAMPLES_PER_KIND]
            report._add("duplicate_row", len(dup_rows), [(all_lines[k], row_problem(k)[1]) for k in first])
        out = selected if not dup_valid.any() else selected.filter(pa.array(~dup_valid))
    report.rows_kept += out.num_rows
    return out


def _account_malformed(ctx: _Ctx, up_to: int | None, report: BadRowReport, on_bad_rows: str,
                       dry: bool = False) -> list[int]:
    """Report the malformed lines (wrong number of fields) up to line ``up_to`` (None: all).
    ``dry``: only list them. Under "stop" the first one raises."""
    end = len(ctx.malformed_lines) if up_to is None else bisect.bisect_right(ctx.malformed_lines, up_to)
    pending = ctx.malformed_lines[ctx.accounted:end]
    if dry or not pending:
        return pending
    line = pending[0]

    def describe(number: int) -> str:
        text, expected, actual = ctx.malformed[number]
        return f"expected {expected} fields, found {actual}: {text[:80]!r}"

    if on_bad_rows == "stop":
        raise DataError(f"{ctx.name}: line {line}: missing_value: {describe(line)}")
    rows = len(pending) * ctx.spec.rows_per_line
    report.rows_read += rows
    report.lines_read += len(pending)
    report._add("missing_value", rows, [(ln, describe(ln)) for ln in pending[:MAX_EXAMPLES_PER_KIND]])
    ctx.accounted = end
    return pending
