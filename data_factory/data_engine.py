"""The data engine over a chain store: which sessions a backtest can run on, and the run's bars as
a stream.

``coverage(store, underlying, start, end)`` answers "where do spot and options overlap?": the
sessions with chains, the sessions with the user's 5-minute bars (when the store holds any), the
overlap the run uses, and — said, never silent — the sessions left out on either side. A gap
INSIDE the chosen span (a session with no chain between two that have one) is an error naming the
session: a backtest that silently skipped a week would report a P&L for a period it never saw.

``stream(market)`` walks a market (the bar contract, ``core.market``) bar by bar and yields
``BarView`` records (time, spot, IV index, the chain slice for a DTE window, the alignment status):
what a user script or a notebook reads to look at the data the engine will trade, in the engine's
own order and with its own no-look-ahead rule (a bar's view is what was known at its close).
The drivers build their ``core.dto.MarketSnapshot`` from the same contract (``data_factory`` does not
import ``core``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import pandas as pd

from data_factory.errors import DataError
from data_factory.market_calendar import trading_sessions

BAR_MINUTES = 5


@dataclass
class Coverage:
    """The sessions a run on a store can use (naive dates), and why others are left out."""

    chain_sessions: pd.DatetimeIndex
    bar_sessions: pd.DatetimeIndex | None          # None: the store holds no bars of the underlying
    sessions: pd.DatetimeIndex                     # what the run uses
    chain_only: pd.DatetimeIndex = field(default_factory=lambda: pd.DatetimeIndex([]))
    bars_only: pd.DatetimeIndex = field(default_factory=lambda: pd.DatetimeIndex([]))
    requested: tuple[str, str] | None = None
    spot_bars: pd.Series | None = None             # the user's 5-minute closes (close-stamped), when any

    def lines(self) -> list[str]:
        first, last = self.sessions[0].date(), self.sessions[-1].date()
        out = [f"sessions used: {len(self.sessions)} ({first} … {last})"]
        if self.bar_sessions is None:
            out.append("spot: the vendor's underlying price at each snapshot (the store has no 5-minute bars)")
        else:
            out.append(f"spot: your 5-minute bars ({len(self.bar_sessions)} sessions in the store)")
        if len(self.chain_only):
            out.append(f"left out, chains without bars: {len(self.chain_only)} sessions "
                       f"({_dates(self.chain_only)})")
        if len(self.bars_only):
            out.append(f"left out, bars without chains: {len(self.bars_only)} sessions ({_dates(self.bars_only)})")
        return out

    def to_dict(self) -> dict:
        return {"sessions": len(self.sessions), "first": str(self.sessions[0].date()),
                "last": str(self.sessions[-1].date()), "requested": list(self.requested) if self.requested else None,
                "spot": "user bars" if self.bar_sessions is not None else "vendor underlying price",
                "chain_only_sessions": [str(d.date()) for d in self.chain_only],
                "bars_only_sessions": [str(d.date()) for d in self.bars_only]}


def _dates(index: pd.DatetimeIndex, most: int = 5) -> str:
    shown = ", ".join(str(d.date()) for d in index[:most])
    return shown + (f", … {index[-1].date()}" if len(index) > most else "")


def coverage(store, underlying: str = "SPY", start=None, end=None) -> Coverage:
    """The overlap of chains and bars in ``store`` between ``start`` and ``end`` (inclusive dates;
    None = unbounded). DataError when nothing overlaps or a session inside the span has no chain."""
    chains = store.dates()
    if not len(chains):
        raise DataError(f"{store.root}: the store holds no option chains")
    requested = (str(pd.Timestamp(start).date()) if start is not None else None,
                 str(pd.Timestamp(end).date()) if end is not None else None)
    low = pd.Timestamp(start) if start is not None else chains[0]
    high = pd.Timestamp(end) if end is not None else chains[-1]
    chains = chains[(chains >= low) & (chains <= high)]
    if not len(chains):
        raise DataError(f"{store.root}: no chains between {low.date()} and {high.date()} (the store covers "
                        f"{store.dates()[0].date()} … {store.dates()[-1].date()})")
    bar_sessions = spot = None
    used = chains
    chain_only = bars_only = pd.DatetimeIndex([])
    bars = store.read_bars(underlying, low, high)
    if bars is not None:
        import pyarrow.compute as pc
        five = bars.filter(pc.equal(bars.column("minutes"), BAR_MINUTES))
        if five.num_rows:
            times = pd.DatetimeIndex(five.column("time").to_pandas())
            spot = pd.Series(five.column("close").to_numpy(), index=times)
            bar_sessions = pd.DatetimeIndex(pd.unique(times.tz_convert("America/New_York").tz_localize(None).normalize()))
            both = chains[chains.isin(bar_sessions)]
            if not len(both):
                raise DataError(f"{store.root}: the {underlying} bars ({bar_sessions[0].date()} … "
                                f"{bar_sessions[-1].date()}) and the chains ({chains[0].date()} … {chains[-1].date()}) "
                                f"share no session")
            span = (both[0], both[-1])
            used = both
            chain_only = chains[~chains.isin(bar_sessions)]
            bars_only = bar_sessions[~bar_sessions.isin(chains)]
            inside = chain_only[(chain_only > span[0]) & (chain_only < span[1])]
            if len(inside):
                raise DataError(f"{store.root}: session {inside[0].date()} has chains but no {underlying} 5-minute bars, "
                                f"inside the span {span[0].date()} … {span[1].date()} ({len(inside)} such sessions)")
    expected = trading_sessions(used[0], used[-1])
    missing = expected[~expected.isin(used)]
    if len(missing):
        raise DataError(f"{store.root}: no option chain for session {missing[0].date()} ({len(missing)} of "
                        f"{len(expected)} sessions between {used[0].date()} and {used[-1].date()} missing)")
    return Coverage(chains, bar_sessions, used, chain_only, bars_only, requested, spot)


@dataclass(frozen=True)
class BarView:
    """One bar of a market as the engine sees it at the bar's close."""

    bar: int
    time: pd.Timestamp
    spot: float
    iv_index: float
    chain: object               # the ChainSlice of the DTE window (empty when the bar has none)
    status: str                 # the chain alignment's status for the bar (vendor markets), else "exact"


def stream(market, dte_min: int | None = None, dte_max: int | None = None, start: int = 0,
           stop: int | None = None) -> Iterator[BarView]:
    """Bars ``start … stop − 1`` of ``market`` in order, each with its chain for the DTE window."""
    times = market.bar_times
    spot = market.spot_bars().to_numpy()
    iv = market.iv_index_bars().to_numpy()
    alignment = getattr(market, "alignment", None)
    labels = alignment.status_labels() if alignment is not None else None
    for bar in range(start, len(times) if stop is None else min(stop, len(times))):
        yield BarView(bar, times[bar], float(spot[bar]), float(iv[bar]), market.slice_at(bar, dte_min, dte_max),
                      str(labels[bar]) if labels is not None else "exact")
