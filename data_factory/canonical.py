"""The canonical schemas every vendor file is loaded into (``../shared/reference/data-formats.md`` §1).

Chains are LONG: one row per (quote_time, contract), calls and puts on separate rows. Bars are one
row per (symbol, bar), stamped at the bar's CLOSE (what the engine's bar contract means by a bar's
time: what was known then). Both are Arrow schemas because loaders build Arrow tables batch by
batch (``pyarrow.csv`` streaming, ``pyarrow.compute`` transforms) and the store writes them to
Parquet as they are; pandas sees them only at the end (``ChainSlice`` arrays).

Units (per share, like every quote in the project):

* ``bid``/``ask``/``last`` USD per share; NaN when absent (a vendor's 0 bid stays 0: a real quote).
* ``iv`` annualised decimal; NaN when the vendor has none (Cboe's 0, IVolatility's −1, blanks).
* ``delta``/``gamma`` per $1 of the underlying; ``theta`` USD per CALENDAR day; ``vega`` USD per
  vol POINT (Δiv = 0.01). A vendor on other scales is rescaled by its loader.
* ``volume``/``open_interest`` contracts, null when absent (OptionsDX has no OI).
* ``settlement`` "PM" (SPY, SPXW) or "AM" (the third-Friday SPX root).
* ``quote_time`` tz-aware America/New_York; EOD files keep their real snapshot time (15:45 for
  Cboe's calcs, 16:00 for OptionsDX's EOD).
"""
from __future__ import annotations

import pyarrow as pa

EXCHANGE_TZ = "America/New_York"

CHAIN_SCHEMA = pa.schema([
    pa.field("quote_time", pa.timestamp("ns", tz=EXCHANGE_TZ), nullable=False),
    pa.field("underlying", pa.string(), nullable=False),
    pa.field("underlying_price", pa.float64()),
    pa.field("expiration", pa.date32(), nullable=False),
    pa.field("settlement", pa.string(), nullable=False),
    pa.field("strike", pa.float64(), nullable=False),
    pa.field("option_type", pa.string(), nullable=False),
    pa.field("bid", pa.float64()),
    pa.field("ask", pa.float64()),
    pa.field("last", pa.float64()),
    pa.field("volume", pa.int64()),
    pa.field("open_interest", pa.int64()),
    pa.field("iv", pa.float64()),
    pa.field("delta", pa.float64()),
    pa.field("gamma", pa.float64()),
    pa.field("theta", pa.float64()),
    pa.field("vega", pa.float64()),
    pa.field("source", pa.string(), nullable=False),
])

BAR_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("ns", tz=EXCHANGE_TZ), nullable=False),   # the bar's CLOSE
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("minutes", pa.int32(), nullable=False),                        # bar width; 1440 = daily
    pa.field("open", pa.float64()),
    pa.field("high", pa.float64()),
    pa.field("low", pa.float64()),
    pa.field("close", pa.float64(), nullable=False),
    pa.field("volume", pa.float64()),
    pa.field("source", pa.string(), nullable=False),
])

CHAIN_COLUMNS = tuple(CHAIN_SCHEMA.names)
BAR_COLUMNS = tuple(BAR_SCHEMA.names)

# Bad-row kinds every loader reports by these names (counted per file, shown in the ingest
# summary; ``--on-bad-rows stop`` raises on the first with its file and line).
BAD_ROW_KINDS = (
    "unparseable_date",        # a date/time field that does not parse in the vendor's format
    "missing_value",           # a required field (strike, expiration, type, time) is empty
    "bad_option_type",         # not C/P/call/put
    "negative_quote",          # bid or ask below zero
    "crossed_quote",           # bid above ask
    "bad_strike",              # strike not a positive finite number
    "no_underlying_price",     # the row's underlying price is missing or not positive
    "expired_before_quote",    # expiration before the quote date
    "duplicate_row",           # a second row for the same (quote_time, expiration, strike, type)
)
