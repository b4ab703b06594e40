"""EXPANDED intraday option chains: 1- or 5-minute chains built from daily (EOD) snapshots by
Black–Scholes interpolation along the underlying's intraday path. MODEL QUOTES, NOT VENDOR QUOTES:
every output row's ``source`` starts with ``expanded:`` (``expanded(synthetic spot):`` when the
intraday path itself is synthetic), and the CLI says so in its summary.

    python data_factory/expand_options_intraday.py --input data/ivolatility/your_file.csv
    python data_factory/expand_options_intraday.py --input my_store --bars spy_1min.csv --minutes 5 \
        --dte-max 60 --strike-band 0.2 --store data/expanded/spy-5min

Method (``expand_daily_chains``), per session D and per bar of D (close-stamped, ``minutes`` apart
from the session open to its close, 13:00 on half days):

* **No look-ahead.** A bar is priced from the most recent snapshot taken AT OR BEFORE its close.
  With EOD data that is normally the PREVIOUS session's snapshot: D's 15:45 (Cboe calcs) or
  16:00 (OptionsDX) snapshot was not known at 10:00 on D, and using it there would leak D's
  close into D's morning. Bars closing at or after D's own snapshot time (15:45, 15:50, 15:55,
  16:00 after a 15:45 snapshot; 16:00 after a 16:00 one) use D's snapshot. A bar with no snapshot
  before it (the morning of the first session of the input) has no rows; those bars are counted
  (``ExpansionStats.bars_without_snapshot``). When the input skips a session, the next session's
  morning is priced from the older snapshot and the session is listed in
  ``ExpansionStats.stale_sessions``.
* **Sticky strike.** Each contract keeps its snapshot IV: the vendor's, or where the vendor has
  none, the IV solved (European BSM) from the snapshot mid at the snapshot's spot and time.
  Contracts with neither are dropped and counted (``contracts_without_iv``, per snapshot).
* **Price and Greeks** come from one vectorised BSM call per session
  (``analytics.black_scholes.bsm_greeks``) at the bar's spot, with T = minutes from the bar's close
  to the expiration's settlement (PM: the expiry session's close, 16:00 ET or 13:00 on half days;
  AM: its open) over 525,600, the rate of the bar's session and the dividend yield. Expirations
  settled at the bar (settlement at or before its close) are dropped.
* **Quotes.** bid/ask = model price ∓ the snapshot's half-spread of that contract, rounded to cents
  like a vendor quote, the bid floored at 0 and the ask at one cent (bid ≤ ask always; a
  vendor never quotes a zero ask, and a reader treats one as no quote). A contract the vendor quoted
  one-sided or not at all keeps NaN bid/ask (its IV and Greeks are still given). ``iv`` is the
  snapshot IV; ``underlying_price`` the bar's spot; ``quote_time`` the bar's close; ``last``,
  ``volume`` and ``open_interest`` are empty (nothing traded in a model).
* **Size.** A 5-minute session is 78 bars, so the output has ~78× the EOD rows (390× at 1
  minute): a month of SPY EOD chains with 0–45 DTE and ±25 % strikes (~6,000 contracts a day) is
  ~10 million 5-minute rows. ``dte_max`` (calendar days from the bar's session) and
  ``strike_band`` (|K / snapshot spot − 1| ≤ band; the band is fixed per snapshot so a contract
  never blinks in and out intraday) narrow it.

What this is not: a real intraday chain. The smile does not move intraday (sticky strike: the
vendor's own skew is frozen at the last snapshot), SPY's early-exercise premium is not modelled
when the price is rebuilt from a (possibly American-model) vendor IV, and spreads are the
snapshot's. Backtests on expanded chains test timing logic, not fills.

CLI: ``main`` (see ``--help``). The input is a chain store, or vendor files / a folder of them,
ingested into a temporary store first (``data_factory.chain_store.ingest``). The spot path is
``--bars`` (a stock-bar file, a folder, or a chain store holding bars of the underlying), else the
input store's own bars of the underlying, else SYNTHETIC intraday paths
(``data_factory.intraday.intraday_bars``) through daily bars — the embedded SPY daily bars where
they cover the sessions and agree with the chain's own spots, otherwise daily bars built from the
chain's snapshot spots. Sessions are expanded in chunks, one Parquet file per session in a
temporary folder next to the output store, and ingested into it in one staged ingest at the end:
memory stays bounded by a chunk, and a failure leaves no half-written store. Exit status 0 done,
2 bad input (one ``error:`` line).
"""
from __future__ import annotations

import sys
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python data_factory/expand_options_intraday.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from data_factory.canonical import CHAIN_SCHEMA, EXCHANGE_TZ  # noqa: E402
from data_factory.errors import DataError  # noqa: E402

EXPANDED_LABEL = "expanded"
SYNTHETIC_SPOT_LABEL = "expanded(synthetic spot)"
DEFAULT_SEED = 42
CHUNK_SESSIONS = 10                 # sessions read from the input store at a time (CLI)
MIN_ASK = 0.01                      # a quoted contract's ask is at least one tick, like a vendor's
SPOT_AGREEMENT = 0.02               # embedded daily closes used for a synthetic path only within 2 %
_NS_PER_DAY = 86_400 * 1_000_000_000
_NS_PER_MINUTE = 60 * 1_000_000_000


@dataclass
class ExpansionStats:
    """What an expansion did (filled in by ``expand_daily_chains`` as it goes)."""

    sessions: int = 0                   # sessions that produced rows
    bars: int = 0                       # bars that produced rows
    rows: int = 0
    snapshots_used: int = 0
    contracts_without_iv: int = 0       # dropped: no vendor IV and no two-sided quote to solve one from
    solved_iv: int = 0                  # contracts whose IV was solved from the snapshot mid
    bars_without_snapshot: int = 0      # bars with no snapshot at or before them (no rows)
    stale_sessions: list = field(default_factory=list)   # mornings priced from an older snapshot than D−1's
    partial_sessions: list = field(default_factory=list)  # sessions with bars_without_snapshot

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _stamp(ns: int) -> str:
    return f"{pd.Timestamp(int(ns), tz='UTC').tz_convert(EXCHANGE_TZ):%Y-%m-%d %H:%M %Z}"


def _local_day(ns: np.ndarray) -> np.ndarray:
    """Day number (days since 1970-01-01) of each UTC-ns time's America/New_York calendar date."""
    local = pd.DatetimeIndex(pd.to_datetime(np.asarray(ns, dtype=np.int64), utc=True)).tz_convert(EXCHANGE_TZ)
    return local.tz_localize(None).normalize().as_unit("ns").asi8 // _NS_PER_DAY


def _days_index(days) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[ns]"))


def session_grid(sessions: pd.DatetimeIndex, minutes: int) -> list[np.ndarray]:
    """Bar close times (UTC ns) of each session: open + minutes, …, close (half days end 13:00)."""
    from data_factory.market_calendar import session_bounds

    if not len(sessions):
        return []
    bounds = session_bounds(pd.DatetimeIndex(sessions))
    opens = pd.DatetimeIndex(bounds["open"]).tz_convert("UTC").as_unit("ns").asi8
    closes = pd.DatetimeIndex(bounds["close"]).tz_convert("UTC").as_unit("ns").asi8
    step = int(minutes) * _NS_PER_MINUTE
    return [np.arange(o + step, c + 1, step, dtype=np.int64) for o, c in zip(opens, closes)]


def _spot_arrays(spot: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(UTC ns sorted, closes) of a close-stamped spot series; DataError for naive or duplicate times."""
    if not isinstance(spot, pd.Series):
        raise DataError("spot: a pandas Series of intraday closes indexed by bar close times")
    index = pd.DatetimeIndex(spot.index)
    if index.tz is None:
        raise DataError("spot: the bar times must be tz-aware (bar close times)")
    ns = index.tz_convert("UTC").as_unit("ns").asi8
    values = np.asarray(spot.to_numpy(), dtype=float)
    order = np.argsort(ns, kind="stable")
    ns, values = ns[order], values[order]
    duplicate = np.flatnonzero(np.diff(ns) == 0)
    if duplicate.size:
        raise DataError(f"spot: two bars stamped {_stamp(ns[duplicate[0]])}")
    return ns, values


def spot_on_grid(spot_ns: np.ndarray, spot_values: np.ndarray, session: pd.Timestamp, grid: np.ndarray,
                 minutes: int) -> np.ndarray:
    """The spot at each grid close of ``session``; DataError naming the session when a bar is missing
    or has no positive close."""
    position = np.searchsorted(spot_ns, grid)
    inside = position < spot_ns.size
    found = np.zeros(grid.size, dtype=bool)
    found[inside] = spot_ns[position[inside]] == grid[inside]
    if not found.all():
        missing = np.flatnonzero(~found)
        raise DataError(f"the bars do not cover session {session.date()}: {missing.size} of {grid.size} "
                        f"{minutes}-minute bars missing (first {_stamp(grid[missing[0]])}); the spot bars must have "
                        f"a close at every {minutes}-minute bar of every session expanded")
    values = spot_values[position]
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise DataError(f"spot bar {_stamp(grid[np.flatnonzero(bad)[0]])} has no positive close")
    return values


def _settlement_ns(expiry_days: np.ndarray, am: np.ndarray) -> np.ndarray:
    """Settlement (UTC ns) of each expiration day: the session's close (PM) or open (AM)."""
    from data_factory.expirations import settlement_times
    from data_factory.market_calendar import session_bounds

    days, inverse = np.unique(expiry_days, return_inverse=True)
    index = _days_index(days)
    close = settlement_times(index).tz_convert("UTC").as_unit("ns").asi8     # DataError for a non-session
    out = close[inverse]
    if am.any():
        opens = pd.DatetimeIndex(session_bounds(index)["open"]).tz_convert("UTC").as_unit("ns").asi8
        out = np.where(am, opens[inverse], out)
    return out


def _rates(rate_of, dividend_yield, days: pd.DatetimeIndex) -> tuple[np.ndarray, np.ndarray]:
    if rate_of is None:
        from data_factory import embedded

        try:
            rate = embedded.risk_free_rate(days).to_numpy(dtype=float)
        except DataError as error:
            raise DataError(f"{error} (CLI: --rate R)") from None
    else:
        rate = np.asarray(rate_of(days), dtype=float)
    if dividend_yield is None:
        from data_factory import embedded

        div = np.full(len(days), float(embedded.dividend_yield()))
    elif callable(dividend_yield):
        div = np.asarray(dividend_yield(days), dtype=float)
    else:
        div = np.full(len(days), float(dividend_yield))
    rate, div = np.broadcast_to(rate, len(days)).astype(float), np.broadcast_to(div, len(days)).astype(float)
    if not (np.isfinite(rate).all() and np.isfinite(div).all()):
        bad = days[~(np.isfinite(rate) & np.isfinite(div))][0]
        raise DataError(f"no finite risk-free rate / dividend yield for {bad.date()}")
    return rate, div


@dataclass
class _Snapshot:
    """The contracts of one snapshot, usable ones only, sorted by expiration, type (C, P), strike."""

    ns: int
    day: int
    spot: float
    expiry_day: np.ndarray
    settle_ns: np.ndarray
    strike: np.ndarray
    is_call: np.ndarray
    settlement: np.ndarray       # index into _Prepared.settlements
    source: np.ndarray           # index into _Prepared.sources
    iv: np.ndarray
    half: np.ndarray             # NaN where the vendor had no two-sided quote


# ----------------------------------------------------------------------------------------------
# the expansion
# ----------------------------------------------------------------------------------------------

def expand_daily_chains(chains: pa.Table, spot: pd.Series, minutes: int = 5, rate_of=None, dividend_yield=None,
                        dte_max: int | None = None, strike_band: float | None = None, *, sessions=None,
                        label: str = EXPANDED_LABEL, stats: ExpansionStats | None = None) -> Iterator[pa.Table]:
    """Expand daily snapshots into ``minutes``-minute chains: one CHAIN_SCHEMA table per session
    (sessions without any row are skipped), in session order. See the module docstring for the
    method; every row's ``source`` is ``f"{label}:{original source}"``.

    ``chains``: CHAIN_SCHEMA rows of ONE underlying with at most one snapshot time per session (EOD
    data; DataError otherwise). ``spot``: the underlying's closes indexed by tz-aware bar close
    times, with a bar at every ``minutes``-minute close of every session expanded (DataError
    naming the first missing one). ``rate_of(days) -> array`` (annual, continuous) per session,
    default the embedded Fama–French rate; ``dividend_yield`` a number or ``f(days) -> array``,
    default the embedded constant. ``dte_max``: calendar days from the bar's session to the
    expiration. ``strike_band``: keep |strike / snapshot spot − 1| ≤ band. ``sessions``: the
    sessions to expand (default every session with a snapshot); earlier snapshots in ``chains``
    are used for their mornings. ``stats`` (an ``ExpansionStats``) is updated as sessions are
    yielded.

    Output size: ~78× the EOD rows at 5 minutes and 390× at 1 minute — narrow with
    ``dte_max`` / ``strike_band`` and consume the tables one at a time.

    A generator: bad input raises DataError when the first table is asked for.
    """
    from analytics.black_scholes import bsm_greeks
    from analytics.implied_vol import implied_volatility
    from data_factory.market_calendar import trading_sessions
    from data_factory.option_chain import SECONDS_PER_YEAR

    stats = stats if stats is not None else ExpansionStats()
    minutes = int(minutes)
    if minutes < 1 or minutes > 390:
        raise DataError(f"minutes {minutes}: use a bar width between 1 and 390 minutes (1 or 5 for the CLI)")
    if dte_max is not None and int(dte_max) < 0:
        raise DataError(f"dte_max {dte_max}: must not be negative")
    if strike_band is not None and not (float(strike_band) > 0):
        raise DataError(f"strike_band {strike_band}: must be a positive fraction of the spot (0.2 = ±20 %)")
    missing_columns = [name for name in CHAIN_SCHEMA.names if name not in chains.column_names]
    if missing_columns:
        raise DataError(f"chains: not a CHAIN_SCHEMA table (missing {', '.join(missing_columns)})")
    if chains.num_rows == 0:
        raise DataError("no usable snapshot: the chains hold no rows")
    underlyings = pc.unique(chains.column("underlying")).to_pylist()
    if len(underlyings) != 1:
        raise DataError(f"chains of {len(underlyings)} underlyings ({', '.join(sorted(map(str, underlyings)))}): "
                        f"expand one underlying at a time")
    underlying = str(underlyings[0])

    # ---- snapshots: one per session (EOD data)
    quote_ns = pc.cast(chains.column("quote_time"), pa.int64()).to_numpy()
    snapshot_ns = np.unique(quote_ns)
    snapshot_day = _local_day(snapshot_ns)
    days, counts = np.unique(snapshot_day, return_counts=True)
    if (counts > 1).any():
        first = int(np.flatnonzero(counts > 1)[0])
        day, count = int(days[first]), int(counts[first])
        times = [f"{pd.Timestamp(int(ns), tz='UTC').tz_convert(EXCHANGE_TZ):%H:%M}"
                 for ns in snapshot_ns[snapshot_day == day][:4]]
        raise DataError(f"the chains hold {count} snapshot times on {_days_index([day])[0].date()} "
                        f"({', '.join(times)}{', …' if count > len(times) else ''}; "
                        f"{int((counts > 1).sum())} sessions with several): the expansion is for EOD data (one "
                        f"snapshot per session); an intraday chain needs no expansion")
    if sessions is None:
        expand = _days_index(snapshot_day)
    else:
        expand = pd.DatetimeIndex(sessions).normalize()
        if expand.tz is not None:
            expand = expand.tz_localize(None)
        expand = pd.DatetimeIndex(sorted(set(expand)))
    if not len(expand):
        return
    listed = trading_sessions(min(expand.min(), _days_index(snapshot_day[:1])[0]), expand.max())
    off = expand[~expand.isin(listed)]
    if len(off):
        raise DataError(f"{off[0].date()} is not an NYSE session")
    spot_ns, spot_values = _spot_arrays(spot)

    # ---- per-row columns, grouped by snapshot
    order = np.argsort(quote_ns, kind="stable")
    edges = np.searchsorted(quote_ns[order], np.r_[snapshot_ns, snapshot_ns[-1] + 1])
    column = lambda name: chains.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    expiry_all = pc.cast(chains.column("expiration"), pa.int32()).to_numpy().astype(np.int64)
    is_call_all = pc.equal(chains.column("option_type"), "C").to_numpy(zero_copy_only=False).astype(bool)
    strike_all = column("strike").astype(float)
    bid_all = column("bid").astype(float)
    ask_all = column("ask").astype(float)
    iv_all = column("iv").astype(float)
    price_all = column("underlying_price").astype(float)
    settlement_text = chains.column("settlement").combine_chunks().dictionary_encode()
    settlements = settlement_text.dictionary.to_pylist()
    settlement_all = settlement_text.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    source_text = chains.column("source").combine_chunks().dictionary_encode()
    sources = pa.array([f"{label}:{text}" for text in source_text.dictionary.to_pylist()], pa.string())
    source_all = source_text.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    am_code = settlements.index("AM") if "AM" in settlements else -1
    settlement_type = pa.array(settlements, pa.string())

    carry_days = pd.DatetimeIndex(sorted(set(expand) | set(_days_index(snapshot_day))))
    carry_rate, carry_div = _rates(rate_of, dividend_yield, carry_days)
    carry_ns = carry_days.as_unit("ns").asi8

    def carry(day_ns: int) -> tuple[float, float]:
        k = int(np.searchsorted(carry_ns, day_ns))
        return float(carry_rate[k]), float(carry_div[k])

    prepared: dict[int, _Snapshot] = {}

    def prepare(k: int) -> _Snapshot:
        if k in prepared:
            return prepared[k]
        rows = order[edges[k]:edges[k + 1]]
        ns = int(snapshot_ns[k])
        prices = price_all[rows]
        prices = prices[np.isfinite(prices) & (prices > 0)]
        snap_spot = float(np.median(prices)) if prices.size else math.nan
        strike = strike_all[rows]
        keep = np.isfinite(strike) & (strike > 0)
        rows, strike = rows[keep], strike[keep]
        expiry = expiry_all[rows]
        settle = _settlement_ns(expiry, settlement_all[rows] == am_code) if rows.size else np.empty(0, np.int64)
        live = settle > ns
        rows, strike, expiry, settle = rows[live], strike[live], expiry[live], settle[live]
        is_call = is_call_all[rows]
        bid, ask = bid_all[rows], ask_all[rows]
        quoted = np.isfinite(bid) & np.isfinite(ask) & (bid >= 0) & (ask > 0) & (bid <= ask)
        half = np.where(quoted, 0.5 * (ask - bid), np.nan)
        iv = iv_all[rows]
        iv = np.where(np.isfinite(iv) & (iv > 0), iv, np.nan)
        solve = ~np.isfinite(iv) & quoted & np.isfinite(snap_spot)
        if solve.any():
            rate, div = carry(int(snapshot_day[k]) * _NS_PER_DAY)
            mid = 0.5 * (bid[solve] + ask[solve])
            t_years = (settle[solve] - ns) / 1e9 / SECONDS_PER_YEAR
            solved = implied_volatility(mid, snap_spot, strike[solve], t_years, rate, div, is_call[solve]).iv
            iv[solve] = solved
            stats.solved_iv += int(np.isfinite(solved).sum())
        usable = np.isfinite(iv)
        stats.contracts_without_iv += int((~usable).sum())
        rows, strike, expiry, settle, is_call, half, iv = (a[usable] for a in (rows, strike, expiry, settle, is_call,
                                                                               half, iv))
        # Expiration, then calls before puts, then strike (the store's order); the settlement
        # style is part of the contract (SPX AM and SPXW PM rows of one strike and expiry).
        settlement = settlement_all[rows]
        sort = np.lexsort((strike, ~is_call, settlement, expiry))
        rows, strike, expiry, settle, is_call, half, iv, settlement = (
            a[sort] for a in (rows, strike, expiry, settle, is_call, half, iv, settlement))
        same = ((np.diff(expiry) == 0) & (np.diff(settlement) == 0) & (np.diff(is_call.astype(np.int8)) == 0)
                & (np.diff(strike) == 0))
        if same.any():
            j = int(np.flatnonzero(same)[0]) + 1
            raise DataError(f"two rows for {'call' if is_call[j] else 'put'} {strike[j]:g} expiring "
                            f"{_days_index([expiry[j]])[0].date()} at {_stamp(ns)}")
        snapshot = _Snapshot(ns=ns, day=int(snapshot_day[k]), spot=snap_spot, expiry_day=expiry, settle_ns=settle,
                             strike=strike, is_call=is_call, settlement=settlement,
                             source=source_all[rows], iv=iv, half=half)
        prepared[k] = snapshot
        stats.snapshots_used += 1
        return snapshot

    grids = session_grid(expand, minutes)
    previous_sessions = trading_sessions(expand.min() - pd.Timedelta(days=10), expand.max())
    for session, grid in zip(expand, grids):
        day = int(session.value // _NS_PER_DAY)
        bar_spot = spot_on_grid(spot_ns, spot_values, session, grid, minutes)
        which = np.searchsorted(snapshot_ns, grid, side="right") - 1
        without = int((which < 0).sum())
        if without:
            stats.bars_without_snapshot += without
            stats.partial_sessions.append(str(session.date()))
        before = previous_sessions[previous_sessions < session]
        if which[0] >= 0 and len(before) and snapshot_day[which[0]] < before[-1].value // _NS_PER_DAY:
            stats.stale_sessions.append(str(session.date()))
        rate, div = carry(day * _NS_PER_DAY)
        for k in [k for k in prepared if k < which[0]]:
            del prepared[k]          # snapshots no later session uses (sessions come in order)

        parts = []          # (bar positions, contract positions, snapshot)
        for k in np.unique(which[which >= 0]):
            snapshot = prepare(int(k))
            bars = np.flatnonzero(which == k)
            contracts = np.arange(snapshot.strike.size)
            if dte_max is not None:
                contracts = contracts[snapshot.expiry_day[contracts] - day <= int(dte_max)]
            if strike_band is not None:
                centre = snapshot.spot if np.isfinite(snapshot.spot) else bar_spot[bars[0]]
                contracts = contracts[np.abs(snapshot.strike[contracts] / centre - 1.0) <= float(strike_band)]
            contracts = contracts[snapshot.settle_ns[contracts] > grid[bars[0]]]
            if not contracts.size:
                continue
            bar_of = np.repeat(bars, contracts.size)
            contract_of = np.tile(contracts, bars.size)
            alive = snapshot.settle_ns[contract_of] > grid[bar_of]
            parts.append((bar_of[alive], contract_of[alive], snapshot))
        if not parts:
            continue
        bar_of = np.concatenate([p[0] for p in parts])
        pick = lambda name: np.concatenate([getattr(p[2], name)[p[1]] for p in parts])  # noqa: E731
        strike, is_call, iv, half = pick("strike"), pick("is_call"), pick("iv"), pick("half")
        settle, expiry = pick("settle_ns"), pick("expiry_day")
        bar_ns = grid[bar_of]
        s = bar_spot[bar_of]
        t_years = (settle - bar_ns) / 1e9 / SECONDS_PER_YEAR
        model = bsm_greeks(s, strike, t_years, rate, div, iv, is_call)
        bid = np.maximum(np.round(model.price - half, 2), 0.0)
        ask = np.maximum(np.round(model.price + half, 2), np.maximum(bid, MIN_ASK))
        n = bar_ns.size
        nan = np.full(n, np.nan)
        table = pa.Table.from_arrays([
            pa.array(bar_ns, CHAIN_SCHEMA.field("quote_time").type),
            pa.repeat(pa.scalar(underlying, pa.string()), n),
            pa.array(s, pa.float64()),
            pa.array(expiry.astype(np.int32), pa.date32()),
            pc.take(settlement_type, pa.array(pick("settlement"))),
            pa.array(strike, pa.float64()),
            pc.take(pa.array(["P", "C"], pa.string()), pa.array(is_call.astype(np.int8))),
            pa.array(bid, pa.float64()),
            pa.array(ask, pa.float64()),
            pa.array(nan, pa.float64()),
            pa.nulls(n, pa.int64()),
            pa.nulls(n, pa.int64()),
            pa.array(iv, pa.float64()),
            pa.array(model.delta, pa.float64()),
            pa.array(model.gamma, pa.float64()),
            pa.array(model.theta, pa.float64()),
            pa.array(model.vega, pa.float64()),
            pc.take(sources, pa.array(pick("source"))),
        ], schema=CHAIN_SCHEMA)
        stats.sessions += 1
        stats.bars += int(np.unique(bar_of).size)
        stats.rows += n
        yield table


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data_factory/expand_options_intraday.py",
        description="1- or 5-minute option chains from daily (EOD) snapshots by Black-Scholes interpolation along "
                    "the underlying's intraday spot, sticky strike, priced from the last snapshot at or before each "
                    "bar (no look-ahead). The output is EXPANDED (model quotes, not vendor quotes) and labelled so "
                    "in every row's source.")
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="a chain store, or vendor option files / a folder of them (ingested into a temporary "
                             "store first); repeat for several files")
    parser.add_argument("--format", default=None, metavar="F", help="vendor format of the input files (default: "
                                                                    "detected per file)")
    parser.add_argument("--bars", default=None, metavar="PATH",
                        help="the underlying's intraday bars: a stock-bar file, a folder, or a chain store holding "
                             "them (default: the input store's own bars, else SYNTHETIC paths through daily bars)")
    parser.add_argument("--minutes", type=int, choices=[1, 5], default=5, help="bar width of the output (default 5)")
    parser.add_argument("--store", default=None, metavar="OUT_DIR",
                        help="the output chain store (default data/expanded/<input name>-<minutes>min)")
    parser.add_argument("--dte-max", type=int, default=None, metavar="N",
                        help="keep expirations up to N calendar days after each bar's session")
    parser.add_argument("--strike-band", type=float, default=None, metavar="F",
                        help="keep strikes within F of the snapshot spot (0.2 = ±20 %%)")
    parser.add_argument("--start", default=None, metavar="D", help="first session to expand (default: the input's)")
    parser.add_argument("--end", default=None, metavar="D", help="last session to expand (default: the input's)")
    parser.add_argument("--underlying", default="SPY", metavar="SYM", help="the underlying to expand (default SPY)")
    parser.add_argument("--rate", type=float, default=None, metavar="R",
                        help="risk-free rate, annual, continuously compounded (default: the embedded Fama-French "
                             "monthly rate, which ends 2019-01)")
    parser.add_argument("--dividend-yield", type=float, default=None, metavar="Q",
                        help="continuous dividend yield (default: the embedded 0.019)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic spot paths")
    return parser


def _open_or_ingest(paths: list[str], fmt: str | None, scratch: Path, what: str):
    """A ChainStore of ``paths``: the store itself when one store is named, else a temporary one
    the files are ingested into."""
    from data_factory.chain_store import ChainStore, ingest

    if len(paths) == 1 and ChainStore.is_store(paths[0]):
        return ChainStore.open(paths[0]), None
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file, folder or chain store ({what})")
    folder = scratch / what
    summary = ingest(paths, folder, fmt=fmt)
    return ChainStore.open(folder), summary


def _bars_spot(store, underlying: str, sessions: pd.DatetimeIndex, minutes: int,
               name: str) -> tuple[pd.Series, str] | None:
    """The store's bars of ``underlying`` over ``sessions`` as a close series on the ``minutes``
    grid (bars of that width, else the widest finer width that divides it, read at the grid
    closes), or None when the store has none."""
    bars = store.read_bars(underlying, sessions[0], sessions[-1])
    if bars is None or bars.num_rows == 0:
        return None
    widths = sorted(int(w) for w in pc.unique(bars.column("minutes")).to_pylist())
    usable = [w for w in widths if w <= minutes and minutes % w == 0]
    if not usable:
        raise DataError(f"{name}: the {underlying} bars are {', '.join(map(str, widths))}-minute bars; a "
                        f"{minutes}-minute expansion needs {minutes}-minute bars or finer ones that divide it")
    width = usable[-1]
    chosen = bars.filter(pc.equal(bars.column("minutes"), width))
    times = pd.DatetimeIndex(chosen.column("time").to_pandas()).tz_convert(EXCHANGE_TZ)
    series = pd.Series(chosen.column("close").to_numpy(), index=times)
    series = series[~series.index.duplicated(keep="last")]
    return series, f"{underlying} {width}-minute bars from {name}"


def _snapshot_spots(store, sessions: pd.DatetimeIndex, underlying: str) -> pd.Series:
    table = store.read_chains(sessions[0], sessions[-1], columns=["underlying_price"], underlying=underlying)
    frame = pd.DataFrame({"date": table.column("date").to_pandas(),
                          "price": table.column("underlying_price").to_numpy(zero_copy_only=False)})
    frame = frame[np.isfinite(frame["price"]) & (frame["price"] > 0)]
    spots = frame.groupby("date")["price"].median()
    spots.index = pd.DatetimeIndex(spots.index)
    return spots


def _synthetic_spot(store, underlying: str, sessions: pd.DatetimeIndex, minutes: int,
                    seed: int) -> tuple[pd.Series, str]:
    """SYNTHETIC intraday closes through daily bars: the embedded SPY daily bars when they cover
    the sessions and agree with the chain's snapshot spots (median gap ≤ 2 %), else daily bars
    built from the snapshot spots (open = previous spot, no range)."""
    from data_factory import embedded
    from data_factory.intraday import intraday_bars

    spots = _snapshot_spots(store, sessions, underlying)
    missing = sessions.difference(spots.index)
    daily, what = None, ""
    if underlying == "SPY":
        try:
            bars = embedded.daily_bars("SPY", sessions[0], sessions[-1])
            if sessions.isin(bars.index).all():
                common = spots.index.intersection(sessions)
                gap = float(np.median(np.abs(np.log(spots.loc[common] / bars["close"].reindex(common))))) \
                    if len(common) else math.inf
                if gap <= SPOT_AGREEMENT:
                    daily = bars.loc[sessions]
                    what = (f"embedded SPY daily bars (S&P 500 / 10 proxy; median gap to the chain's spots "
                            f"{gap:.2%})")
                else:
                    what = f"(embedded SPY daily closes are {gap:.1%} from the chain's spots: not used) "
        except DataError:
            pass
    if daily is None:
        if len(missing):
            raise DataError(f"no underlying price in the chain for session {missing[0].date()}: no spot to build a "
                            f"synthetic path through; give --bars")
        close = spots.loc[sessions]
        opening = close.shift(1).fillna(close)
        daily = pd.DataFrame({"open": opening, "high": np.maximum(opening, close), "low": np.minimum(opening, close),
                              "close": close, "volume": 1.0})
        what += "daily bars built from the chain's own snapshot spots (no intraday range)"
    daily.index = pd.DatetimeIndex(daily.index, name="date")
    paths = intraday_bars(daily, freq=f"{minutes}min", seed=seed)
    return paths["close"], f"SYNTHETIC {minutes}-minute paths (seed {seed}) through {what}"


def _default_store(inputs: list[str], minutes: int) -> Path:
    first = Path(inputs[0])
    name = first.name if first.is_dir() else first.stem
    return Path("data") / "expanded" / f"{name or 'chains'}-{minutes}min"


def _annotate_manifest(store_dir: Path, note: dict, staging: Path) -> None:
    """Record the expansion in the output store's manifest: the per-session files of the
    temporary folder (gone now) listed as one source, and an ``expansions`` entry (atomically;
    the store is valid either way)."""
    from data_factory.chain_store import MANIFEST

    path = store_dir / MANIFEST
    manifest = json.loads(path.read_text())
    staged = str(staging.resolve())
    sources = [entry for entry in manifest.get("sources", []) if not str(entry.get("path", "")).startswith(staged)]
    manifest["sources"] = [*sources, {"path": ", ".join(note["input"]), "format": f"expanded ({note['label']})",
                                      "rows": note["rows"]}]
    manifest.setdefault("expansions", []).append(note)
    temporary = store_dir / f".{MANIFEST}.expand.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, path)


def run(args, console) -> dict:
    """The CLI's work; returns the summary dict. DataError for bad input."""
    import pyarrow.parquet as pq
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from data_factory.chain_store import ChainStore, ingest
    from data_factory.market_calendar import exchange_date

    started = time.perf_counter()
    if args.dte_max is not None and args.dte_max < 0:
        raise DataError(f"--dte-max {args.dte_max}: must not be negative")
    if args.strike_band is not None and not args.strike_band > 0:
        raise DataError(f"--strike-band {args.strike_band}: must be positive (0.2 = ±20 %)")
    out_dir = Path(args.store) if args.store else _default_store(args.input, args.minutes)
    scratch = Path(tempfile.mkdtemp(prefix="expand-inputs-"))
    created: list[Path] = []
    staging: Path | None = None
    try:
        store, ingested = _open_or_ingest(args.input, args.format, scratch, "chains")
        dates = store.dates()
        if not len(dates):
            raise DataError(f"no usable snapshot: {', '.join(args.input)} holds no option chains")
        first = exchange_date(args.start, "--start") if args.start else dates[0]
        last = exchange_date(args.end, "--end") if args.end else dates[-1]
        sessions = dates[(dates >= first) & (dates <= last)]
        if not len(sessions):
            raise DataError(f"no usable snapshot between {first.date()} and {last.date()} (the input covers "
                            f"{dates[0].date()} … {dates[-1].date()})")
        probe = store.read_chains(sessions[0], sessions[0], columns=["underlying"])
        if not pc.any(pc.equal(probe.column("underlying"), args.underlying)).as_py():
            found = sorted(set(probe.column("underlying").to_pylist()))
            raise DataError(f"no usable snapshot: no {args.underlying} rows on {sessions[0].date()} (underlyings: "
                            f"{', '.join(found) or 'none'}); choose one with --underlying")
        if out_dir.resolve() == Path(store.root).resolve():
            raise DataError(f"--store {out_dir}: that is the input store; give a new folder")
        if ChainStore.is_store(out_dir):
            have = set(ChainStore.open(out_dir).dates())
            clash = [day for day in sessions if day in have]
            if clash:
                raise DataError(f"{out_dir}: the store already holds chains for {clash[0].date()} ({len(clash)} of the "
                                f"{len(sessions)} sessions); give a new --store")
        elif out_dir.exists() and any(out_dir.iterdir()):
            raise DataError(f"{out_dir}: exists, is not empty and is not a chain store; give a new --store")

        # ---- the spot path
        if args.bars is not None:
            bar_store, _ = _open_or_ingest([args.bars], None, scratch, "bars")
            found = _bars_spot(bar_store, args.underlying, sessions, args.minutes, args.bars)
            if found is None:
                raise DataError(f"{args.bars}: no {args.underlying} bars")
            spot, spot_text = found
            label = EXPANDED_LABEL
        else:
            found = _bars_spot(store, args.underlying, sessions, args.minutes, f"the input store {store.root}")
            if found is not None:
                spot, spot_text = found
                label = EXPANDED_LABEL
            else:
                spot, spot_text = _synthetic_spot(store, args.underlying, sessions, args.minutes, args.seed)
                label = SYNTHETIC_SPOT_LABEL
                console.print(f"[yellow]spot: {spot_text}; the output's source says "
                              f"'{SYNTHETIC_SPOT_LABEL}:'. Give --bars for the real intraday path.[/yellow]")
        spot_ns, spot_values = _spot_arrays(spot)
        for session, grid in zip(sessions, session_grid(sessions, args.minutes)):   # fail before the work
            spot_on_grid(spot_ns, spot_values, session, grid, args.minutes)

        rate_of = None if args.rate is None else (lambda days: np.full(len(days), float(args.rate)))
        stats = ExpansionStats()
        for parent in reversed(out_dir.resolve().parents):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        staging = Path(tempfile.mkdtemp(prefix=f".expand-{out_dir.name}-", dir=out_dir.resolve().parent))
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed:,}/{task.total:,} sessions"), TextColumn("{task.fields[rows]}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task(f"expanding to {args.minutes}-minute chains", total=len(sessions), rows="")
            for start in range(0, len(sessions), CHUNK_SESSIONS):
                chunk = sessions[start:start + CHUNK_SESSIONS]
                earlier = dates[dates < chunk[0]]
                table = store.read_chains(earlier[-1] if len(earlier) else chunk[0], chunk[-1], dte_max=args.dte_max,
                                          underlying=args.underlying)
                table = table.select(list(CHAIN_SCHEMA.names))
                for expanded in expand_daily_chains(table, spot, args.minutes, rate_of=rate_of,
                                                    dividend_yield=args.dividend_yield, dte_max=args.dte_max,
                                                    strike_band=args.strike_band, sessions=chunk, label=label,
                                                    stats=stats):
                    day = pd.Timestamp(expanded.column("quote_time")[0].as_py()).date()
                    pq.write_table(expanded, staging / f"{day}.parquet", row_group_size=256_000)
                    progress.update(task, advance=1, rows=f"{stats.rows:,} rows")
                del table
                progress.update(task, completed=min(start + CHUNK_SESSIONS, len(sessions)))
        if stats.rows == 0:
            raise DataError(f"no usable snapshot: no rows to write ({stats.contracts_without_iv} contracts without an "
                            f"IV or a two-sided quote; {stats.bars_without_snapshot} bars without an earlier snapshot)")
        expanding_seconds = time.perf_counter() - started
        summary = ingest([staging], out_dir)
        seconds = time.perf_counter() - started
        result = {
            "store": str(out_dir), "sessions": stats.sessions, "first_session": summary.dates[0],
            "last_session": summary.dates[-1], "rows": stats.rows, "minutes": args.minutes,
            "seconds": round(seconds, 2), "rows_per_second": round(stats.rows / max(expanding_seconds, 1e-9)),
            "spot": spot_text, "label": label, "input": [str(p) for p in args.input],
            "input_ingested": ingested is not None, **{k: v for k, v in stats.to_dict().items()
                                                     if k not in ("sessions", "rows")},
            "note": "EXPANDED chains: Black-Scholes model quotes (sticky strike from the last EOD snapshot at or "
                    "before each bar), NOT vendor quotes",
        }
        _annotate_manifest(out_dir, {k: result[k] for k in ("input", "minutes", "spot", "label", "note", "sessions",
                                                              "rows", "first_session", "last_session")},
                           staging)
        created.clear()
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):        # folders made for a store that was never written
            try:
                folder.rmdir()
            except OSError:
                pass


def _print_summary(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title="intraday expansion", show_header=False)
    sessions = f"{result['sessions']:,} ({result['first_session']} … {result['last_session']})"
    for key, value in [("store", result["store"]), ("sessions", sessions),
                       ("rows", f"{result['rows']:,} {result['minutes']}-minute chain rows"),
                       ("seconds", f"{result['seconds']:.1f} ({result['rows_per_second']:,} rows/s expanding)"),
                       ("spot", result["spot"]),
                       ("IV", f"vendor IV where given; {result['solved_iv']:,} solved from the snapshot mid; "
                              f"{result['contracts_without_iv']:,} contracts dropped (neither)")]:
        table.add_row(key, str(value))
    if result["partial_sessions"]:
        table.add_row("partial", f"{result['bars_without_snapshot']:,} bars without an earlier snapshot (no rows): "
                                 f"{', '.join(result['partial_sessions'][:5])}")
    if result["stale_sessions"]:
        table.add_row("stale", f"{len(result['stale_sessions'])} sessions whose morning was priced from a snapshot "
                               f"older than the previous session: {', '.join(result['stale_sessions'][:5])}")
    console.print(table)
    console.print(f"[bold yellow]These chains are EXPANDED: model quotes (Black-Scholes, sticky strike), not vendor "
                  f"quotes. Every row's source starts with '{result['label']}:'.[/bold yellow]")


def main(argv=None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    console = Console()
    try:
        result = run(args, console)
    except (ValueError, OSError) as e:           # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
