"""The optimizer benchmark's anchor: Backtrader's own ``cerebro.optstrategy`` running a trivial
SMA-cross strategy over the project's five-minute SPY bars, ``combos`` parameter combinations on
``maxcpus`` worker processes; prints strategy runs per second.

Stock Backtrader usage: ``stdstats=False``, ``preload=True``, ``optreturn=True`` (and the default
``optdatas=True``: the feed is preloaded once in the parent, then Cerebro pickles it to the pool
for each combination). One tiny warm-up run (2,000 bars) goes before the timed one, since the
first ``cerebro.run`` in a process is about 40 % slower; the pool's workers fork from the warmed
parent. The pool's start-up is part of the timed run, as it is part of what ``optstrategy`` costs.

Usage: .venv/bin/python benchmarks/anchor_optstrategy.py [--bars 97650] [--combos 8] [--maxcpus 2]
Prints figures; asserts nothing about time.
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import backtrader as bt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config  # noqa: E402
from core.market_data import load_market  # noqa: E402

DAY_NS = 86_400 * 1_000_000_000
# Backtrader's date2num: days since 0001-01-01 (proleptic ordinal 1) as a float; 1970-01-01 is 719163.
EPOCH_DATE_NUMBER = 719163.0
WARMUP_BARS = 2_000
SLOW_PERIOD = 30
FIRST_FAST_PERIOD = 5


class ArrayFeed(bt.feed.DataBase):
    """A Backtrader feed over preloaded NumPy arrays (the approach of ``core.backtest_engine.
    _array_feed``, which is private and builds its class inside a function over a backtest
    session; ``optstrategy`` with ``maxcpus > 1`` pickles the feed, so this class lives at module
    level and carries its arrays as a parameter)."""

    params = (("arrays", None),)  # (date numbers, open, high, low, close, volume), equal lengths

    def start(self):
        super().start()
        self._row = 0

    def _load(self):
        row = self._row
        date_numbers, opens, highs, lows, close, volumes = self.p.arrays
        if row >= len(close):
            return False
        self.lines.datetime[0] = date_numbers[row]
        self.lines.open[0] = opens[row]
        self.lines.high[0] = highs[row]
        self.lines.low[0] = lows[row]
        self.lines.close[0] = close[row]
        self.lines.volume[0] = volumes[row]
        self.lines.openinterest[0] = 0.0
        self._row = row + 1
        return True


class SmaCross(bt.Strategy):
    """Long one share when the fast SMA crosses above the slow one, flat when it crosses below."""

    params = (("fast", 10), ("slow", SLOW_PERIOD))

    def __init__(self):
        self.crossover = bt.indicators.CrossOver(bt.indicators.SMA(self.data.close, period=self.p.fast),
                                                 bt.indicators.SMA(self.data.close, period=self.p.slow))

    def next(self):
        if not self.position:
            if self.crossover[0] > 0:
                self.buy()
        elif self.crossover[0] < 0:
            self.close()


def feed_arrays(close_frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """(date numbers, open, high, low, close, volume) for ``ArrayFeed`` from a frame with a
    DatetimeIndex and a ``close`` column (``open``/``high``/``low`` default to the close,
    ``volume`` to 0). Tz-aware times are read in New York time, naive (as Backtrader wants)."""
    index = pd.DatetimeIndex(close_frame.index)
    if index.tz is not None:
        index = index.tz_convert("America/New_York").tz_localize(None)
    date_numbers = index.as_unit("ns").asi8 / DAY_NS + EPOCH_DATE_NUMBER
    close = close_frame["close"].to_numpy(dtype=float)

    def column(name, default):
        return close_frame[name].to_numpy(dtype=float) if name in close_frame else default

    return (date_numbers, column("open", close), column("high", close), column("low", close), close,
            column("volume", np.zeros_like(close)))


def _optimize(arrays, combos: int, maxcpus: int) -> tuple[int, float]:
    cerebro = bt.Cerebro(stdstats=False, preload=True, optreturn=True, maxcpus=maxcpus)
    cerebro.adddata(ArrayFeed(arrays=arrays, name="SPY"))
    cerebro.optstrategy(SmaCross, fast=list(range(FIRST_FAST_PERIOD, FIRST_FAST_PERIOD + combos)),
                        slow=SLOW_PERIOD)
    started = time.perf_counter()
    results = cerebro.run()
    seconds = time.perf_counter() - started
    return sum(len(r) for r in results), seconds


def optstrategy_runs_per_second(close_frame: pd.DataFrame, combos: int = 8, maxcpus: int = 2) -> dict:
    """Time ``cerebro.optstrategy`` of ``SmaCross`` with ``combos`` fast periods (5, 6, …; slow
    30) over the bars of ``close_frame`` on ``maxcpus`` processes, after a tiny warm-up run.
    Returns {'runs', 'seconds', 'runs_per_second', 'bars'}."""
    if combos < 1 or maxcpus < 1:
        raise ValueError("combos and maxcpus must be at least 1")
    arrays = feed_arrays(close_frame)
    bars = len(arrays[4])
    if bars <= SLOW_PERIOD + 1:
        raise ValueError(f"need more than {SLOW_PERIOD + 1} bars, got {bars}")
    # Warm-up in this process (the workers fork from it): Backtrader's first run pays for imports
    # and caches.
    _optimize(tuple(a[:WARMUP_BARS] for a in arrays), combos=1, maxcpus=1)
    runs, seconds = _optimize(arrays, combos=combos, maxcpus=maxcpus)
    return {"runs": runs, "seconds": seconds, "runs_per_second": runs / seconds, "bars": bars}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=None,
                        help="the first N five-minute bars of the default period 2014-01-03 … 2018-12-31 "
                             "(default: all of them, 97,650)")
    parser.add_argument("--combos", type=int, default=8, help="parameter combinations (strategy runs)")
    parser.add_argument("--maxcpus", type=int, default=2, help="optstrategy worker processes")
    args = parser.parse_args()

    config = Config()
    started = time.perf_counter()
    market = load_market(config)
    frame = market.ohlcv_bars()
    if frame is None:
        frame = market.spot_bars().rename("close").to_frame()
    load_seconds = time.perf_counter() - started
    available = len(frame)
    if args.bars is not None:
        if not 0 < args.bars <= available:
            parser.error(f"--bars must be between 1 and {available:,} (the default period's five-minute bars)")
        frame = frame.iloc[: args.bars]
    print(f"data load: {load_seconds:.2f} s, {len(frame):,} five-minute bars {frame.index[0]} … {frame.index[-1]}")

    figures = optstrategy_runs_per_second(frame, combos=args.combos, maxcpus=args.maxcpus)
    print(f"backtrader optstrategy, SMA cross, {args.combos} combinations, maxcpus={args.maxcpus}: "
          f"{figures['runs']} runs over {figures['bars']:,} bars in {figures['seconds']:.2f} s = "
          f"{figures['runs_per_second']:.3f} runs/s "
          f"({figures['runs'] * figures['bars'] / figures['seconds']:,.0f} bar-runs/s)")


if __name__ == "__main__":
    main()
