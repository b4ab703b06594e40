"""The bar contract (``core.market``) over the trader's own option chains: canonical chain rows
(``data_factory.canonical``) from a ``ChainStore`` or a table, as a market the backtest drivers run
on unchanged.

Decisions, and why:

* **Decision bars.** Each vendor snapshot time is mapped to the first 5-minute bar closing at or
  after it (the engine's trading grid), and every such bar is a decision bar: an EOD file gives one
  decision bar per session (15:45 for Cboe's calcs snapshot, 16:00 for OptionsDX's EOD), an
  intraday file one per snapshot. Bars and snapshots are then matched by
  ``data_factory.chain_alignment`` (``mode`` = exact / prior / stale / none; no bar ever sees a
  snapshot taken after its close); a bar whose snapshot is too old for the mode has no chain and
  the engine records it as a bar without a chain rather than trading stale quotes.
* **Spot.** The vendor's underlying price at the snapshot (the median of its rows, which agree in
  every vendor format we read). A snapshot with no underlying price is refused (DataError naming
  its time): there is no honest spot to put next to its quotes.
* **Missing IV and Greeks** are solved from the mid with European Black-Scholes-Merton on the
  session's risk-free rate and dividend yield; ``iv_conf`` says which (vendor 1.0, solved 0.5,
  none 0) times the alignment's decay ``0.5 ** (lag / 300 s)``; ``quote_age_s`` is the lag.
* **Rows kept.** Expirations from the quote session to ``dte_cap`` calendar days after it (the
  strategy's window and everything a held condor passes through on the way to expiry) and strikes
  within ``strike_band`` of the spot; settled expirations are dropped. Rows of another underlying
  are dropped and counted in ``describe()``.
* **IV index per bar.** The 30-calendar-day ATM IV × 100 of the bar's chain (put/call average at
  the strike nearest the spot, interpolated in total variance), carried forward from the previous
  bar when a chain has no usable IV.
* **Features** (``feature_inputs``) need intraday base bars for the multi-timeframe indicators. A
  vendor chain has none, so the base bars are SYNTHETIC intraday paths (``data_factory.intraday``)
  through real daily bars: the embedded SPY daily bars where they cover the period, else daily
  bars built from the vendor's snapshot spots. ``describe()`` says which.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_factory.chain_quotes import COMPUTED_IV_CONF, atm_iv_index, complete_iv_and_greeks
from data_factory.errors import DataError
from data_factory.expirations import settlement_times
from data_factory.market_calendar import EXCHANGE_TZ, session_bounds, trading_sessions
from data_factory.option_chain import SECONDS_PER_YEAR, ChainSlice, ContractPath, StructureQuotes

TRADING_BAR_NS = 5 * 60 * 1_000_000_000
_NS_PER_DAY = 86_400 * 1_000_000_000
IV_INDEX_DAYS = 30
SOLVED_IV_CONF = COMPUTED_IV_CONF
DEFAULT_STRIKE_BAND = 0.50          # generous: a held condor must never drop out of its own quotes
CARRY_SNAPSHOTS = 5              # how far back a missing held contract's last quote is looked for
_STRIKE_KEY_SCALE = 1000          # strikes keyed in thousandths of a dollar (OCC precision)


class VendorChainSlice(ChainSlice):
    """A ``ChainSlice`` of vendor quotes (real, AMERICAN contracts for SPY)."""

    synthetic = False
    european = False


def _contract_keys(expiry_day: np.ndarray, is_call: np.ndarray, strike: np.ndarray) -> np.ndarray:
    """One sortable int64 per contract: expiry day, then puts before calls, then strike."""
    return ((expiry_day.astype(np.int64) * 2 + is_call.astype(np.int64)) << 32) \
        + np.round(strike * _STRIKE_KEY_SCALE).astype(np.int64)


def _grid_close_ns(times_ns: np.ndarray) -> np.ndarray:
    """The first 5-minute bar close at or after each time (UTC ns; the grid is anchored on the
    session open, which is on a 5-minute boundary of the UTC clock too)."""
    return -((-times_ns) // TRADING_BAR_NS) * TRADING_BAR_NS


class VendorChainMarket:
    """The bar contract over canonical chain rows. Build with ``from_store`` or from a table."""

    synthetic = False
    coverage = None              # data_factory.data_engine.Coverage when built from a store
    store = None                 # the ChainStore it was built from

    def __init__(self, chains: pa.Table, underlying: str = "SPY", dte_cap: int = 60,
                 strike_band: float = DEFAULT_STRIKE_BAND, alignment: dict | None = None,
                 source: str = "table", rate_of=None, dividend_yield_of=None, spot_bars: pd.Series | None = None):
        from data_factory.chain_alignment import align_snapshots

        self.underlying = underlying
        self.source = source
        self.dte_cap = int(dte_cap)
        self.strike_band = float(strike_band)
        self.alignment_settings = dict(alignment or {"mode": "prior"})
        total = chains.num_rows
        chains = chains.filter(pc.equal(chains.column("underlying"), underlying))
        self.other_underlying_rows = total - chains.num_rows
        if chains.num_rows == 0:
            raise DataError(f"{source}: no {underlying} option rows ({total} rows of other underlyings)")

        quote_ns = pc.cast(chains.column("quote_time"), pa.int64()).to_numpy()
        price = chains.column("underlying_price").to_numpy(zero_copy_only=False).astype(float)
        # Snapshots and their spots.
        snapshot_ns = np.unique(quote_ns)
        which = np.searchsorted(snapshot_ns, quote_ns)
        valid = np.isfinite(price) & (price > 0)
        spot = (pd.Series(np.where(valid, price, np.nan)).groupby(which).median()
                .reindex(np.arange(snapshot_ns.size)).to_numpy(dtype=float))
        if spot_bars is not None and not np.isfinite(spot).all():
            # A chain without its own underlying price takes the user's last bar close at or
            # before the snapshot (never a later one).
            index = pd.DatetimeIndex(spot_bars.index)
            if index.tz is not None:
                bar_ns = index.tz_convert("UTC").as_unit("ns").asi8
                order = np.argsort(bar_ns, kind="stable")
                at = np.searchsorted(bar_ns[order], snapshot_ns, side="right") - 1
                closes = np.asarray(spot_bars.to_numpy(), dtype=float)[order]
                filler = np.where(at >= 0, closes[np.maximum(at, 0)], np.nan)
                spot = np.where(np.isfinite(spot), spot, filler)
        if not np.isfinite(spot).all():
            bad = int(np.flatnonzero(~np.isfinite(spot))[0])
            raise DataError(f"{source}: the chain at {_stamp(snapshot_ns[bad])} has no underlying price "
                            f"({int((~np.isfinite(spot)).sum())} snapshots without one): no spot to trade it against")

        # Decision bars: the trading-grid close at or after each snapshot, inside its session.
        grid = _grid_close_ns(snapshot_ns)
        sessions = pd.DatetimeIndex(pd.to_datetime(snapshot_ns, utc=True).tz_convert(EXCHANGE_TZ)
                                    .tz_localize(None).normalize())
        listed = trading_sessions(sessions.min(), sessions.max())
        off = ~sessions.isin(listed)
        if off.any():
            raise DataError(f"{source}: a chain quoted at {_stamp(snapshot_ns[np.flatnonzero(off)[0]])}, which is not "
                            f"in an NYSE session")
        bounds_table = session_bounds(pd.DatetimeIndex(pd.unique(sessions)))
        open_ns = pd.DatetimeIndex(bounds_table["open"]).tz_convert("UTC").as_unit("ns").asi8
        close_ns = pd.DatetimeIndex(bounds_table["close"]).tz_convert("UTC").as_unit("ns").asi8
        day_of = np.searchsorted(pd.DatetimeIndex(pd.unique(sessions)).as_unit("ns").asi8,
                                 sessions.as_unit("ns").asi8)
        outside = (snapshot_ns <= open_ns[day_of]) | (grid > close_ns[day_of])
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise DataError(f"{source}: a chain quoted at {_stamp(snapshot_ns[first])} is outside the regular "
                            f"session ({int(outside.sum())} snapshots): its first decision bar would be in another "
                            f"session")
        self.spot_source = "the vendor's underlying price at each snapshot"
        if spot_bars is None:
            bar_ns = np.unique(grid)
        else:
            bar_ns, bar_spot = self._user_bars(spot_bars, pd.DatetimeIndex(pd.unique(sessions)), snapshot_ns)
        self.alignment = align_snapshots(bar_ns, snapshot_ns, symbol=underlying, **self.alignment_settings)
        bar_snapshot = np.asarray(self.alignment.snapshot, dtype=np.int64)
        self._bar_ns = bar_ns
        self._bar_times = pd.DatetimeIndex(bar_ns).tz_localize("UTC").tz_convert(EXCHANGE_TZ)
        self._sessions = pd.DatetimeIndex(pd.unique(self._bar_times.tz_localize(None).normalize()))
        self._bar_session_ns = self._bar_times.tz_localize(None).normalize().as_unit("ns").asi8
        if spot_bars is None:
            self._spot = np.where(bar_snapshot >= 0, spot[np.maximum(bar_snapshot, 0)], np.nan)
        else:
            self._spot = bar_spot
        for k in range(1, bar_ns.size):       # a bar without a chain keeps the last known spot
            if not np.isfinite(self._spot[k]):
                self._spot[k] = self._spot[k - 1]
        if not np.isfinite(self._spot[0]):
            raise DataError(f"{source}: the first decision bar {self._bar_times[0]} has no usable snapshot")

        self._snapshot_spot = spot
        self.carried_quotes = 0
        self._base_bars: dict = {}
        # Rates per session of the snapshots (embedded risk-free series; the carry model's yield).
        if rate_of is None or dividend_yield_of is None:
            from data_factory import embedded
            rate_of = rate_of or (lambda days: embedded.risk_free_rate(days).to_numpy(dtype=float))
            dividend_yield_of = dividend_yield_of or (lambda days: np.full(len(days), float(embedded.dividend_yield())))
        self._carry_sessions = pd.DatetimeIndex(pd.unique(sessions))
        # A rate that cannot be had (the user's data runs past the embedded series) matters only
        # where IV or Greeks must be solved: the error is kept and raised there.
        self._rate_error = None
        try:
            self._rate = np.asarray(rate_of(self._carry_sessions), dtype=float)
        except ValueError as error:          # DataError and ConfigError are ValueErrors
            self._rate_error = error
            self._rate = np.full(len(self._carry_sessions), np.nan)
        self._dividend = np.asarray(dividend_yield_of(self._carry_sessions), dtype=float)

        self._build_rows(chains, quote_ns, snapshot_ns, bar_snapshot)
        self._iv_index = self._build_iv_index()

    def _user_bars(self, spot_bars: pd.Series, sessions: pd.DatetimeIndex, snapshot_ns: np.ndarray):
        """Decision bars from the user's 5-minute spot bars (close-stamped): those of the sessions
        with chains, from the first snapshot on; their closes are the spot."""
        index = pd.DatetimeIndex(spot_bars.index)
        if index.tz is None:
            raise DataError(f"{self.source}: the spot bars' times must be tz-aware (bar close times)")
        bar_ns = index.tz_convert("UTC").as_unit("ns").asi8
        values = np.asarray(spot_bars.to_numpy(), dtype=float)
        days = index.tz_convert(EXCHANGE_TZ).tz_localize(None).normalize()
        keep = days.isin(sessions) & (bar_ns >= snapshot_ns[0])
        off_grid = keep & (bar_ns % TRADING_BAR_NS != 0)
        if off_grid.any():
            raise DataError(f"{self.source}: spot bar {index[np.flatnonzero(off_grid)[0]]} is not on the 5-minute grid "
                            f"(bars must be 5-minute bars stamped at their close)")
        bad = keep & ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise DataError(f"{self.source}: spot bar {index[np.flatnonzero(bad)[0]]} has no positive close")
        order = np.argsort(bar_ns[keep], kind="stable")
        bar_ns, values = bar_ns[keep][order], values[keep][order]
        if not bar_ns.size:
            raise DataError(f"{self.source}: the spot bars have no bar in the sessions the chains cover")
        if np.any(np.diff(bar_ns) == 0):
            raise DataError(f"{self.source}: duplicate spot bar at {_stamp(bar_ns[np.flatnonzero(np.diff(bar_ns) == 0)[0]])}")
        self.spot_source = f"the user's 5-minute bars ({bar_ns.size:,} bars)"
        return bar_ns, values

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_store(cls, store, start=None, end=None, underlying: str = "SPY", dte_cap: int = 60,
                   strike_band: float = DEFAULT_STRIKE_BAND, alignment: dict | None = None, rate_of=None,
                   dividend_yield_of=None) -> "VendorChainMarket":
        """The store's chains of sessions ``start … end`` (inclusive; None = all), narrowed by
        ``data_factory.data_engine.coverage`` to where chains and the user's bars (if the store
        has any) overlap; DataError for a session inside that span without a chain (a gap is
        never skipped silently). ``coverage`` on the result says what was left out."""
        from data_factory.data_engine import coverage as store_coverage

        covered = store_coverage(store, underlying, start, end)
        first, last = covered.sessions[0], covered.sessions[-1]
        table = store.read_chains(first, last, dte_min=0, dte_max=dte_cap, underlying=underlying)
        market = cls(table, underlying=underlying, dte_cap=dte_cap, strike_band=strike_band,
                     alignment=alignment, source=str(store.root), spot_bars=covered.spot_bars, rate_of=rate_of,
                     dividend_yield_of=dividend_yield_of)
        market.coverage = covered
        market.store = store
        return market

    def _build_rows(self, chains: pa.Table, quote_ns, snapshot_ns, bar_snapshot) -> None:
        """The rows of every snapshot a bar uses, kept (see the module docstring), sorted by
        contract key, with IV and Greeks completed at the snapshot's own time and spot (a quote's
        IV belongs to the moment it was quoted); stored CSR-style per snapshot
        (``_row_start[k] … _row_start[k+1]`` for the k-th used snapshot). A bar reads its
        snapshot's rows, with the time to expiry and DTE of the bar."""
        column = lambda name: chains.column(name).to_numpy(zero_copy_only=False)
        expiry_day = pc.cast(chains.column("expiration"), pa.int32()).to_numpy().astype(np.int64)
        is_call = pc.equal(chains.column("option_type"), "C").to_numpy(zero_copy_only=False).astype(bool)
        strike = column("strike").astype(float)
        settlement = column("settlement").astype(str)
        if (settlement == "AM").any():
            raise DataError(f"{self.source}: AM-settled expirations (the SPX third-Friday root) are not traded by this "
                            f"backtest; filter them out or use the PM root")
        snapshot_of_row = np.searchsorted(snapshot_ns, quote_ns)
        session_day_of_row = ((pd.to_datetime(quote_ns, utc=True).tz_convert(EXCHANGE_TZ).tz_localize(None)
                               .normalize().as_unit("ns").asi8) // _NS_PER_DAY)
        dte = expiry_day - session_day_of_row
        keep = (dte >= 0) & (dte <= self.dte_cap) & np.isfinite(strike) & (strike > 0)
        self.rows_outside_window = int((~keep).sum())

        # Settlement (UTC ns) of every listed expiration day.
        days = np.unique(expiry_day[keep])
        listed = trading_sessions(pd.Timestamp(int(days.min()), unit="D"), pd.Timestamp(int(days.max()), unit="D")) \
            if days.size else pd.DatetimeIndex([])
        not_session = ~np.isin(days, listed.as_unit("ns").asi8 // _NS_PER_DAY)
        if not_session.any():
            bad = pd.Timestamp(int(days[not_session][0]), unit="D").date()
            raise DataError(f"{self.source}: expiration {bad} is not an NYSE session")
        settle = settlement_times(pd.DatetimeIndex(days.astype("datetime64[D]").astype("datetime64[ns]")))
        self._settle_days = days
        self._settle_ns = settle.tz_convert("UTC").as_unit("ns").asi8

        used = np.unique(bar_snapshot[bar_snapshot >= 0])
        self._bar_slot = np.where(bar_snapshot >= 0, np.searchsorted(used, np.maximum(bar_snapshot, 0)), -1)
        self._mark_slot = np.maximum.accumulate(self._bar_slot) if self._bar_slot.size else self._bar_slot
        self._slot_ns = snapshot_ns[used]
        slot_spot = self._snapshot_spot[used]
        by_snapshot = np.argsort(snapshot_of_row, kind="stable")
        edges = np.searchsorted(snapshot_of_row[by_snapshot], np.r_[used, used + 1])
        slot_rows = []
        for k, snap in enumerate(used.tolist()):
            rows = by_snapshot[edges[k]:edges[k + used.size]]
            rows = rows[keep[rows] & (np.abs(strike[rows] / slot_spot[k] - 1.0) <= self.strike_band)]
            settle_of = self._settle_ns[np.searchsorted(self._settle_days, expiry_day[rows])]
            rows = rows[settle_of > snapshot_ns[snap]]
            keys = _contract_keys(expiry_day[rows], is_call[rows], strike[rows])
            order = np.argsort(keys, kind="stable")
            rows, keys = rows[order], keys[order]
            duplicate = np.flatnonzero(keys[1:] == keys[:-1])
            if duplicate.size:
                row = rows[duplicate[0] + 1]
                raise DataError(f"{self.source}: two rows for {'call' if is_call[row] else 'put'} {strike[row]:g} "
                                f"expiring {pd.Timestamp(int(expiry_day[row]), unit='D').date()} at "
                                f"{_stamp(snapshot_ns[snap])}")
            slot_rows.append(rows)
        counts = np.array([r.size for r in slot_rows], dtype=np.int64)
        self._row_start = np.r_[0, np.cumsum(counts)]
        rows = np.concatenate(slot_rows) if slot_rows else np.empty(0, dtype=np.int64)
        slot_of = np.repeat(np.arange(len(slot_rows)), counts)

        self._expiry_day = expiry_day[rows]
        self._is_call = is_call[rows]
        self._strike = strike[rows]
        self._key = _contract_keys(self._expiry_day, self._is_call, self._strike)
        self._settle_of_row = self._settle_ns[np.searchsorted(self._settle_days, self._expiry_day)]
        bid = column("bid").astype(float)[rows]
        ask = column("ask").astype(float)[rows]
        quoted = np.isfinite(bid) & np.isfinite(ask) & (bid >= 0) & (ask > 0) & (bid <= ask)
        self._bid = np.where(quoted, bid, np.nan)
        self._ask = np.where(quoted, ask, np.nan)
        self._mid = np.where(quoted, 0.5 * (bid + ask), np.nan)
        self.unquoted_rows = int((~quoted).sum())
        if rows.size and not quoted.any():
            raise DataError(f"{self.source}: none of the {rows.size:,} chain rows has a bid and an ask (option bars "
                            f"carry trade prices, not quotes): a backtest fills at quotes; give quote data (an EOD "
                            f"file with bid/ask, or snapshots)")

        # IV and Greeks at the snapshot: its time to expiry, its spot, its session's carry.
        spot = slot_spot[slot_of]
        t_years = (self._settle_of_row - self._slot_ns[slot_of]) / 1e9 / SECONDS_PER_YEAR
        slot_session = (pd.to_datetime(self._slot_ns, utc=True).tz_convert(EXCHANGE_TZ).tz_localize(None)
                        .normalize().as_unit("ns").asi8)
        session_ns = self._carry_sessions.as_unit("ns").asi8
        carry_at = np.clip(np.searchsorted(session_ns, slot_session, side="right") - 1, 0, len(session_ns) - 1)
        rate = self._rate[carry_at][slot_of]
        dividend = self._dividend[carry_at][slot_of]
        vendor_greeks = np.column_stack([column(name).astype(float)[rows] for name in ("delta", "gamma", "theta", "vega")])
        quotes = complete_iv_and_greeks(self._mid, spot, self._strike, t_years, rate, dividend, self._is_call,
                                        column("iv").astype(float)[rows], vendor_greeks)
        if self._rate_error is not None and (quotes.solved.any() or quotes.incomplete.any()):
            raise self._rate_error
        iv, source_conf, greeks = quotes.iv, quotes.iv_conf, quotes.greeks
        self.solved_iv_rows = int((source_conf == SOLVED_IV_CONF).sum())
        self.computed_greek_rows = int((quotes.incomplete & np.isfinite(iv)).sum())
        rho = greeks[:, 4]
        self._iv = iv
        self._source_conf = source_conf
        self._delta, self._gamma, self._theta, self._vega = (np.ascontiguousarray(greeks[:, i]) for i in range(4))
        self._rho = rho
        bar_carry = np.clip(np.searchsorted(session_ns, self._bar_session_ns, side="right") - 1, 0, len(session_ns) - 1)
        self._bar_rate = self._rate[bar_carry]
        self._bar_dividend = self._dividend[bar_carry]

    def _build_iv_index(self) -> np.ndarray:
        values = np.full(self._bar_ns.size, np.nan)
        by_slot: dict[int, float] = {}
        for bar in range(self._bar_ns.size):
            rows = self._rows_at(bar)
            if rows.size:
                slot = int(self._bar_slot[bar])
                if slot not in by_slot:          # the snapshot's reading, once per snapshot
                    by_slot[slot] = atm_iv_index(self._slice(bar, rows, math.nan), IV_INDEX_DAYS)
                values[bar] = by_slot[slot]
        self.iv_index_carried = int((~np.isfinite(values)).sum())
        known = np.flatnonzero(np.isfinite(values))
        if not known.size:
            raise DataError(f"{self.source}: no chain has a usable implied volatility (no quotes to solve it from)")
        filled = values.copy()
        filled[: known[0]] = values[known[0]]
        for bar in range(known[0] + 1, filled.size):
            if not np.isfinite(filled[bar]):
                filled[bar] = filled[bar - 1]
        return filled

    # ------------------------------------------------------------------------------ the bar contract
    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self._bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self._sessions

    def spot_bars(self) -> pd.Series:
        return pd.Series(self._spot, index=self._bar_times, name="spot")

    def iv_index_bars(self) -> pd.Series:
        return pd.Series(self._iv_index, index=self._bar_times, name="iv_index")

    def ohlcv_bars(self) -> pd.DataFrame | None:
        return None

    def _check_bar(self, bar: int) -> None:
        if not 0 <= bar < self._bar_ns.size:
            raise DataError(f"bar position {bar} is outside 0 … {self._bar_ns.size - 1}")

    def _slot_rows(self, bar: int) -> np.ndarray:
        """The rows of the bar's snapshot not yet settled at the bar (empty without a snapshot)."""
        slot = int(self._bar_slot[bar])
        if slot < 0:
            return np.empty(0, dtype=np.int64)
        rows = np.arange(self._row_start[slot], self._row_start[slot + 1])
        return rows[self._settle_of_row[rows] > self._bar_ns[bar]]

    def _dte_at(self, bar: int, rows: np.ndarray) -> np.ndarray:
        return self._expiry_day[rows] - self._bar_session_ns[bar] // _NS_PER_DAY

    def _rows_at(self, bar: int, dte_min=None, dte_max=None, expiry=None) -> np.ndarray:
        rows = self._slot_rows(bar)
        if dte_min is not None and dte_max is not None and int(dte_min) > int(dte_max):
            raise ValueError(f"dte_min {dte_min} is greater than dte_max {dte_max}")
        keep = np.ones(rows.size, dtype=bool)
        dte = self._dte_at(bar, rows)
        if dte_min is not None:
            keep &= dte >= int(dte_min)
        if dte_max is not None:
            keep &= dte <= int(dte_max)
        if expiry is not None:
            keep &= self._expiry_day[rows] == _expiry_day(expiry)
        return rows[keep]

    def expirations_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None) -> np.ndarray:
        self._check_bar(bar)
        return np.unique(self._expiry_day[self._rows_at(bar, dte_min, dte_max)]).astype("datetime64[D]")

    def slice_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None,
                 expiry=None) -> VendorChainSlice:
        self._check_bar(bar)
        return self._slice(bar, self._rows_at(bar, dte_min, dte_max, expiry), float(self._iv_index[bar])
                           if hasattr(self, "_iv_index") else math.nan)

    def _slice(self, bar: int, rows: np.ndarray, iv_index: float) -> VendorChainSlice:
        # Rows are in contract-key order: expiration, puts before calls, strike. ChainSlice's order
        # is expiration, calls before puts, strike: reorder.
        order = np.lexsort((self._strike[rows], ~self._is_call[rows], self._expiry_day[rows]))
        rows = rows[order]
        lag = float(self.alignment.lag_s[bar])
        n = rows.size
        arrays = {"expiration": self._expiry_day[rows].astype("datetime64[D]"), "dte": self._dte_at(bar, rows),
                  "t_years": (self._settle_of_row[rows] - self._bar_ns[bar]) / 1e9 / SECONDS_PER_YEAR,
                  "strike": self._strike[rows], "is_call": self._is_call[rows],
                  "bid": self._bid[rows], "ask": self._ask[rows], "mid": self._mid[rows], "theo": self._mid[rows],
                  "iv": self._iv[rows], "delta": self._delta[rows], "gamma": self._gamma[rows],
                  "theta": self._theta[rows], "vega": self._vega[rows], "rho": self._rho[rows],
                  "iv_conf": self._source_conf[rows] * float(self.alignment.iv_conf[bar]),
                  "quote_age_s": np.full(n, lag)}
        for name, values in arrays.items():
            values = np.ascontiguousarray(values)
            values.flags.writeable = False
            arrays[name] = values
        return VendorChainSlice(quote_time_ns=int(self._bar_ns[bar]), spot=float(self._spot[bar]),
                                iv_index=iv_index, rate=float(self._bar_rate[bar]),
                                dividend_yield=float(self._bar_dividend[bar]), **arrays)

    def _find_in_slot(self, slot: int, bar: int, keys: np.ndarray) -> np.ndarray:
        start, stop = self._row_start[slot], self._row_start[slot + 1]
        if stop <= start:
            return np.full(keys.size, -1, dtype=np.int64)
        at = np.searchsorted(self._key[start:stop], keys) + start
        at_c = np.minimum(at, stop - 1)
        found = (at < stop) & (self._key[at_c] == keys) & (self._settle_of_row[at_c] > self._bar_ns[bar])
        return np.where(found, at, -1)

    def _find(self, bar: int, keys: np.ndarray) -> np.ndarray:
        """Row of each contract key at ``bar``, −1 where no quote is known (or it is settled).

        A contract the bar's snapshot lacks (a vendor gap: a strike missing for a day) takes its
        row from the latest of the ``CARRY_SNAPSHOTS`` earlier snapshots that has it: a held
        condor keeps a mark instead of a hole, never a later quote. Carried quotes are counted in
        ``describe()``."""
        slot = int(self._bar_slot[bar])
        if slot < 0:
            # A bar without a chain of its own (too old for the alignment mode) still marks what
            # is held at the latest snapshot an earlier bar used.
            slot = int(self._mark_slot[bar])
            if slot < 0:
                return np.full(keys.size, -1, dtype=np.int64)
            rows = self._find_in_slot(slot, bar, keys)
            self.carried_quotes += int((rows >= 0).sum())
        else:
            rows = self._find_in_slot(slot, bar, keys)
        missing = rows < 0
        back = slot - 1
        while missing.any() and back >= max(0, slot - CARRY_SNAPSHOTS):
            older = self._find_in_slot(back, bar, keys[missing])
            hit = older >= 0
            if hit.any():
                fill = np.flatnonzero(missing)[hit]
                rows[fill] = older[hit]
                self.carried_quotes += int(hit.sum())
                missing[fill] = False
            back -= 1
        return rows

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes, is_call) -> ContractPath:
        """Quotes of contracts of one expiry over bars ``bar_start … bar_stop − 1``; NaN where a
        bar's chain lacks a contract (a vendor gap, or at and after settlement)."""
        if not 0 <= bar_start <= bar_stop <= self._bar_ns.size:
            raise DataError(f"bar range {bar_start} … {bar_stop} is outside 0 … {self._bar_ns.size}")
        strikes = np.ascontiguousarray(strikes, dtype=float)
        is_call = np.ascontiguousarray(is_call, dtype=np.bool_)
        keys = _contract_keys(np.full(strikes.size, _expiry_day(expiration)), is_call, strikes)
        out = np.full((7, bar_stop - bar_start, strikes.size), np.nan)
        for b, bar in enumerate(range(bar_start, bar_stop)):
            rows = self._find(bar, keys)
            hit = rows >= 0
            if hit.any():
                r = rows[hit]
                for i, values in enumerate((self._bid, self._ask, self._mid, self._delta, self._gamma, self._vega,
                                            self._theta)):
                    out[i, b, hit] = values[r]
        return ContractPath(bar_start, self._bar_ns[bar_start:bar_stop].copy(), self._spot[bar_start:bar_stop].copy(),
                            *out)

    def quote_structures(self, bar: int, expirations, strikes) -> StructureQuotes:
        self._check_bar(bar)
        strikes = np.asarray(strikes, dtype=float)
        days = np.asarray(expirations, dtype="datetime64[D]").astype(np.int64)
        is_call = np.broadcast_to(np.array([False, False, True, True]), strikes.shape)
        keys = _contract_keys(np.repeat(days[:, None], 4, axis=1), is_call, strikes).ravel()
        rows = self._find(bar, keys).reshape(strikes.shape)
        out = []
        for values in (self._bid, self._ask, self._mid, self._delta, self._gamma, self._vega, self._theta):
            out.append(np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan) if values.size
                       else np.full(strikes.shape, np.nan))
        return StructureQuotes(*out)

    def settlement_time(self, expiration) -> pd.Timestamp:
        day = np.datetime64(_expiry_day(expiration), "D")
        return settlement_times(pd.DatetimeIndex([day.astype("datetime64[ns]")]))[0]

    def describe(self) -> dict:
        return {
            "source": f"user option chains: {self.source}",
            "synthetic": False,
            "european": False,
            "underlying": self.underlying,
            "spot": self.spot_source,
            "bars": int(self._bar_ns.size),
            "first_bar": str(self._bar_times[0]),
            "last_bar": str(self._bar_times[-1]),
            "sessions": len(self._sessions),
            "rows": int(self._key.size),
            "snapshots_used": int(self._slot_ns.size),
            "options": f"{self.underlying} options are American; vendor IV and Greeks are used where given, else "
                       f"solved from the mid with European Black-Scholes-Merton ({self.solved_iv_rows} rows solved, "
                       f"{self.computed_greek_rows} rows of Greeks computed)",
            "alignment": self.alignment.diagnostics(),
            "dropped": {"other_underlying_rows": int(self.other_underlying_rows),
                        "rows_outside_dte_window": int(self.rows_outside_window),
                        "unquoted_rows": int(self.unquoted_rows)},
            "carried_quotes": f"{self.carried_quotes} contract-bars quoted from an earlier snapshot (the vendor's "
                              f"snapshot lacked the contract; up to {CARRY_SNAPSHOTS} snapshots back)",
            "iv_index": f"{IV_INDEX_DAYS}-day ATM IV of each bar's chain ({self.iv_index_carried} bars carried forward)",
            "coverage": self.coverage.to_dict() if self.coverage is not None else None,
        }

    # ------------------------------------------------------------------------------ features
    def user_base_bars(self, minutes: int) -> tuple[pd.DataFrame | None, str]:
        """The user's own ``minutes``-minute bars of the underlying from the store, regular
        session only, as the features' base bars (close-stamped OHLCV), when they are complete:
        every bar of every session the market trades. (None, why not) otherwise — the features
        then run on synthetic paths and the description says why."""
        cached = self._base_bars.get(int(minutes))
        if cached is None:
            cached = self._base_bars[int(minutes)] = self._read_base_bars(int(minutes))
        return cached

    def _read_base_bars(self, minutes: int) -> tuple[pd.DataFrame | None, str]:
        if self.store is None:
            return None, "the market was not built from a store"
        sessions = self._sessions
        bars = self.store.read_bars(self.underlying, sessions[0], sessions[-1])
        if bars is None:
            return None, f"the store holds no {self.underlying} bars"
        bars = bars.filter(pc.equal(bars.column("minutes"), int(minutes)))
        if not bars.num_rows:
            return None, f"the store holds no {minutes}-minute {self.underlying} bars (mtf.base_bar_minutes = {minutes})"
        close_ns = pc.cast(bars.column("time"), pa.int64()).to_numpy()
        table = session_bounds(sessions)
        open_ns = pd.DatetimeIndex(table["open"]).tz_convert("UTC").as_unit("ns").asi8
        end_ns = pd.DatetimeIndex(table["close"]).tz_convert("UTC").as_unit("ns").asi8
        day = np.searchsorted(open_ns, close_ns, side="left") - 1
        inside = (day >= 0) & (close_ns > open_ns[np.maximum(day, 0)]) & (close_ns <= end_ns[np.maximum(day, 0)])
        width = int(minutes) * 60 * 1_000_000_000
        expected = (end_ns - open_ns) // width
        have = np.bincount(day[inside], minlength=sessions.size)
        short = np.flatnonzero(have < expected)
        if short.size:
            k = int(short[0])
            return None, (f"your {minutes}-minute {self.underlying} bars are incomplete on {sessions[k].date()} "
                          f"({int(have[k])} of {int(expected[k])} regular-session bars; {short.size} such sessions)")
        keep = np.flatnonzero(inside)
        frame = pd.DataFrame({name: bars.column(name).to_numpy(zero_copy_only=False)[keep].astype(float)
                              for name in ("open", "high", "low", "close", "volume")},
                             index=pd.DatetimeIndex(close_ns[keep]).tz_localize("UTC").tz_convert(EXCHANGE_TZ))
        frame = frame[~frame.index.duplicated(keep="first")].sort_index()
        frame.index.name = "timestamp"
        return frame, f"your {minutes}-minute {self.underlying} bars ({len(frame):,} regular-session bars)"

    def daily_bars(self) -> tuple[pd.DataFrame, str]:
        """Daily OHLCV of the underlying over the market's sessions and what they are: the
        embedded daily bars where they cover every session, else bars built from the snapshot spots
        (open = the previous close, high/low the larger/smaller of the two, volume 1)."""
        from data_factory import embedded

        sessions = self._sessions
        if self.underlying == "SPY":
            try:
                bars = embedded.daily_bars("SPY", sessions[0], sessions[-1])
                if sessions.isin(bars.index).all():
                    return bars, "embedded SPY daily bars (S&P 500 / 10 proxy)"
            except DataError:
                pass
        spot = self.spot_bars()
        close = spot.groupby(spot.index.tz_localize(None).normalize()).last()
        opening = close.shift(1).fillna(close)
        bars = pd.DataFrame({"open": opening, "high": np.maximum(opening, close), "low": np.minimum(opening, close),
                             "close": close, "volume": 1.0})
        bars.index.name = "date"
        return bars, "daily bars built from the vendor's snapshot spots (no range, no volume)"


def _expiry_day(expiration) -> int:
    return int(np.datetime64(pd.Timestamp(expiration).date(), "D").astype(np.int64))


def _stamp(ns: int) -> str:
    return f"{pd.Timestamp(int(ns), tz='UTC').tz_convert(EXCHANGE_TZ):%Y-%m-%d %H:%M %Z}"
