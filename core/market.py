"""The bar contract: the one market-data interface the backtest session and every driver use.

Any data source implements it — the synthetic chain provider (``data_factory.option_chain.
SyntheticChainProvider``), a vendor chain store, a live Alpaca feed — and nothing else about the
source is visible to ``core.engine`` or ``core.backtest_engine``. It is a structural
``typing.Protocol``: a source satisfies it by having these members, without importing ``core``
(``data_factory`` must not import ``core``).

Bars are addressed by position ``0 … len(bar_times) − 1`` because drivers walk them in order; a
bar's data is what was known at its close (time stamp), never later.

Units: prices in dollars per share; the volatility index in points (VIX-like); Greeks per share
in ``analytics.black_scholes`` units (delta and gamma per $1 of the underlying, vega per vol
point, theta per calendar day). Leg order of a structure: long put, short put, short call,
long call.

Members
-------
``bar_times``
    ``pd.DatetimeIndex`` of bar close times, tz-aware (America/New_York), strictly increasing.
``sessions``
    ``pd.DatetimeIndex`` of the session dates (naive midnight) the bars belong to.
``spot_bars()`` / ``iv_index_bars()``
    ``pd.Series`` per bar: the underlying's price and the volatility index at the bar's close.
``ohlcv_bars()``
    open/high/low/close/volume per bar when the source has them (the Backtrader feed shows them),
    else None.
``expirations_at(bar, dte_min, dte_max)``
    The expirations listed and not settled at a bar with ``dte_min … dte_max`` calendar days to
    go, ascending (datetime64[D]); cheap (no quotes).
``slice_at(bar, dte_min, dte_max, expiry=None)``
    The chain at a bar for a DTE range (calendar days, inclusive), or for one ``expiry`` of it:
    a ``ChainSlice``-like object with arrays ``expiration`` (datetime64[D]), ``dte``, ``strike``,
    ``is_call``, ``bid``, ``ask``, ``mid``, ``iv``, ``delta``, ``gamma``, ``theta``, ``vega``,
    ``iv_conf``, ``quote_age_s`` and scalars ``spot``, ``iv_index``; ``len()`` is its row count.
``quote_contracts(bar_start, bar_stop, expiration, strikes, is_call)``
    Quotes (bid, ask, mid, delta, gamma, vega, theta; arrays (bars, legs)) of given contracts of
    one expiry over the bars ``bar_start … bar_stop − 1``; NaN rows at and after settlement.
``quote_structures(bar, expirations, strikes)``
    The same numbers for k four-leg structures at one bar (arrays (k, 4)); a source without a
    batched path can answer with ``structures_from_contracts``.
``settlement_time(expiration)``
    The settlement time (tz-aware) of a listed expiration.
``describe()``
    A JSON-ready dict saying what the data is and which parts are synthetic.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class MarketData(Protocol):
    """The bar contract (see the module docstring for every member's meaning and units)."""

    @property
    def bar_times(self) -> pd.DatetimeIndex: ...

    @property
    def sessions(self) -> pd.DatetimeIndex: ...

    def spot_bars(self) -> pd.Series: ...

    def iv_index_bars(self) -> pd.Series: ...

    def ohlcv_bars(self) -> pd.DataFrame | None: ...

    def expirations_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None) -> np.ndarray: ...

    def slice_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None, expiry=None) -> Any: ...

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes: np.ndarray,
                        is_call: np.ndarray) -> Any: ...

    def quote_structures(self, bar: int, expirations: np.ndarray, strikes: np.ndarray) -> Any: ...

    def settlement_time(self, expiration) -> pd.Timestamp: ...

    def describe(self) -> dict: ...


CONDOR_IS_CALL = np.array([False, False, True, True])


def structures_from_contracts(market: MarketData, bar: int, expirations: np.ndarray, strikes: np.ndarray):
    """``quote_structures`` answered one structure at a time through ``quote_contracts``: for
    sources without a batched path. Returns (bid, ask, mid, delta, gamma, vega, theta), each
    (k, 4)."""
    strikes = np.asarray(strikes, dtype=np.float64)
    out = np.full((7, strikes.shape[0], 4), np.nan)
    for row, expiration in enumerate(np.asarray(expirations, dtype="datetime64[D]")):
        path = market.quote_contracts(bar, bar + 1, expiration.item(), strikes[row], CONDOR_IS_CALL)
        for k, name in enumerate(("bid", "ask", "mid", "delta", "gamma", "vega", "theta")):
            out[k, row] = getattr(path, name)[0]
    return tuple(out)


def nearest_expiry_slice(market: MarketData, bar: int, dte_min: int | None, dte_max: int | None):
    """The chain at ``bar`` of the nearest expiry in the DTE range only (what the condor and the
    skew read: an entry attempt the sizing refuses is repeated bar after bar), or the range's
    whole (empty) slice when none is listed."""
    expirations = market.expirations_at(bar, dte_min, dte_max)
    if len(expirations) == 0:
        return market.slice_at(bar, dte_min=dte_min, dte_max=dte_max)
    return market.slice_at(bar, dte_min=dte_min, dte_max=dte_max, expiry=expirations[0])


def condor_leg_quotes(market: MarketData, bar: int, condor):
    """This bar's quotes and Greeks of a condor's four legs (``core.dto.LegQuotes``)."""
    from core.dto import LegQuotes

    path = market.quote_contracts(bar, bar + 1, condor.expiration, condor.strikes, condor.is_call)
    return LegQuotes(path.bid[0], path.ask[0], path.mid[0], path.delta[0], path.gamma[0], path.vega[0],
                     path.theta[0])


def require_market_data(market: Any) -> MarketData:
    """``market`` if it implements the bar contract, else a TypeError naming what is missing."""
    if not isinstance(market, MarketData):
        missing = [name for name in ("bar_times", "sessions", "spot_bars", "iv_index_bars", "ohlcv_bars",
                                     "expirations_at", "slice_at", "quote_contracts", "quote_structures", "settlement_time",
                                     "describe") if not hasattr(market, name)]
        raise TypeError(f"{type(market).__name__} does not implement the bar contract (core.market.MarketData); "
                        f"missing: {', '.join(missing)}")
    return market


class BarWindow:
    """Bars ``start … stop − 1`` of another source as a source of its own (the bar contract,
    bars renumbered from 0): what a walk-forward window backtests on. Nothing after ``stop − 1``
    is reachable through it — a quote range is clipped at the window's end — so a run on the
    window cannot see later data even by accident."""

    def __init__(self, market: MarketData, start: int, stop: int):
        total = len(market.bar_times)
        if not 0 <= start < stop <= total:
            raise ValueError(f"BarWindow: bars {start} … {stop - 1} are not inside the source's 0 … {total - 1}")
        self.market = market
        self.start = int(start)
        self.stop = int(stop)
        self._bar_times = market.bar_times[start:stop]
        self._sessions = pd.DatetimeIndex(pd.unique(self._bar_times.tz_localize(None).normalize()))

    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self._bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self._sessions

    def spot_bars(self) -> pd.Series:
        return self.market.spot_bars().iloc[self.start:self.stop]

    def iv_index_bars(self) -> pd.Series:
        return self.market.iv_index_bars().iloc[self.start:self.stop]

    def ohlcv_bars(self) -> pd.DataFrame | None:
        bars = self.market.ohlcv_bars()
        return None if bars is None else bars.iloc[self.start:self.stop]

    def _bar(self, bar: int) -> int:
        if not 0 <= bar < self.stop - self.start:
            raise IndexError(f"bar {bar} is outside the window's 0 … {self.stop - self.start - 1}")
        return self.start + bar

    def expirations_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None) -> np.ndarray:
        return self.market.expirations_at(self._bar(bar), dte_min, dte_max)

    def slice_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None, expiry=None) -> Any:
        return self.market.slice_at(self._bar(bar), dte_min, dte_max, expiry)

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes: np.ndarray,
                        is_call: np.ndarray) -> Any:
        bar_stop = min(bar_stop, self.stop - self.start)
        return self.market.quote_contracts(self._bar(bar_start), self.start + bar_stop, expiration, strikes, is_call)

    def quote_structures(self, bar: int, expirations: np.ndarray, strikes: np.ndarray) -> Any:
        return self.market.quote_structures(self._bar(bar), expirations, strikes)

    def settlement_time(self, expiration) -> pd.Timestamp:
        return self.market.settlement_time(expiration)

    def describe(self) -> dict:
        return {**self.market.describe(),
                "window": {"first_bar": str(self._bar_times[0]), "last_bar": str(self._bar_times[-1]),
                           "bars": self.stop - self.start}}


class MarketMemo:
    """Another source with its chain slices and ``quote_contracts`` answers kept, for many runs
    over one market (an optimizer's trials slice the same chains and open the same condors at
    the same bars again and again). A chain slice asked for again is the same object; a quote
    request for contracts inside a range already priced is a slice of it, and one overlapping it
    extends it. Every bar's quotes are priced independently of the range asked for, so a slice
    is bitwise what a fresh request gives. Least recently used entries go beyond ``max_bytes``
    (paths) and ``max_slice_bytes`` (chain slices)."""

    def __init__(self, market: MarketData, max_bytes: int = 256 * 2**20, max_slice_bytes: int = 256 * 2**20):
        self.market = market
        self.max_bytes = int(max_bytes)
        self.max_slice_bytes = int(max_slice_bytes)
        self._paths: dict = {}
        self._bytes = 0
        self._slices: dict = {}
        self._slice_bytes = 0
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str):
        # Everything but quote_contracts goes straight to the source.
        return getattr(self.market, name)

    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self.market.bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self.market.sessions

    def spot_bars(self) -> pd.Series:
        return self.market.spot_bars()

    def iv_index_bars(self) -> pd.Series:
        return self.market.iv_index_bars()

    def ohlcv_bars(self) -> pd.DataFrame | None:
        return self.market.ohlcv_bars()

    def expirations_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None) -> np.ndarray:
        return self.market.expirations_at(bar, dte_min, dte_max)

    def slice_at(self, bar: int, dte_min: int | None = None, dte_max: int | None = None, expiry=None) -> Any:
        key = (bar, dte_min, dte_max, None if expiry is None else str(expiry))
        chain = self._slices.pop(key, None)
        if chain is not None:
            self._slices[key] = chain
            return chain
        chain = self.market.slice_at(bar, dte_min, dte_max, expiry)
        size = _nbytes(chain)
        self._slices[key] = chain
        self._slice_bytes += size
        while self._slice_bytes > self.max_slice_bytes and len(self._slices) > 1:
            self._slice_bytes -= _nbytes(self._slices.pop(next(iter(self._slices))))
        return chain

    def quote_structures(self, bar: int, expirations: np.ndarray, strikes: np.ndarray) -> Any:
        return self.market.quote_structures(bar, expirations, strikes)

    def settlement_time(self, expiration) -> pd.Timestamp:
        return self.market.settlement_time(expiration)

    def describe(self) -> dict:
        return self.market.describe()

    _FIELDS = ("bar_time_ns", "spot", "bid", "ask", "mid", "delta", "gamma", "vega", "theta")

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes: np.ndarray,
                        is_call: np.ndarray) -> Any:
        key = (str(expiration), np.asarray(strikes, dtype=np.float64).tobytes(),
               np.asarray(is_call, dtype=np.bool_).tobytes())
        cached = self._paths.pop(key, None)
        first, last = bar_start, bar_stop            # what was asked for
        if cached is not None:
            start, stop, path, size = cached
            if start <= bar_start and bar_stop <= stop:
                self._paths[key] = cached
                self.hits += 1
                return self._slice(path, start, bar_start, bar_stop)
            self._bytes -= size
            if bar_start <= stop and bar_stop >= start:       # overlapping or adjacent: extend
                bar_start, bar_stop = min(bar_start, start), max(bar_stop, stop)
        self.misses += 1
        path = self.market.quote_contracts(bar_start, bar_stop, expiration, strikes, is_call)
        for name in self._FIELDS:
            getattr(path, name).flags.writeable = False       # shared by every later request
        size = sum(getattr(path, name).nbytes for name in self._FIELDS)
        self._paths[key] = (bar_start, bar_stop, path, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._paths) > 1:
            _, _, _, dropped = self._paths.pop(next(iter(self._paths)))
            self._bytes -= dropped
        return self._slice(path, bar_start, first, last)

    @classmethod
    def _slice(cls, path, start: int, bar_start: int, bar_stop: int):
        lo, hi = bar_start - start, bar_stop - start
        if lo == 0 and hi == len(path.spot):
            return path
        return type(path)(bar_start, *(getattr(path, name)[lo:hi] for name in cls._FIELDS))


def _nbytes(value) -> int:
    """Bytes of the arrays a (dataclass) value holds."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        items = vars(value).values() if hasattr(value, "__dict__") else ()
    return sum(item.nbytes for item in items if isinstance(item, np.ndarray))
