"""Bars per second of both backtest drivers on the default period, against an empty
``bt.Strategy`` over the same feed and Cerebro in the same run; peak memory.

Usage: .venv/bin/python benchmarks/bench_backtest.py [--start 2014-01-03] [--end 2018-12-31]
Prints figures; asserts nothing about time.
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from functools import partial  # noqa: E402

from core.backtest_engine import run_backtrader as _run_backtrader  # noqa: E402
from core.backtest_engine import run_fast as _run_fast  # noqa: E402
from core.config import Config  # noqa: E402
from core.market_data import embedded_bar_features, embedded_chain_provider  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="2014-01-03")
    parser.add_argument("--end", default="2018-12-31")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each driver")
    args = parser.parse_args()

    # The mechanical condor (no Stage-2 gates), as measured for the backtest issue, with the risk
    # manager's caps, budget and kill switch off: with them on this strategy's losses exhaust the
    # 2 % risk budget and it retries an entry every bar from 2016 on, which measures the strategy,
    # not the drivers (benchmarks/bench_risk.py measures the risk manager);
    # benchmarks/bench_intelligence.py measures the gated strategy and the feature table.
    config = Config().override({"backtest.start": args.start, "backtest.end": args.end,
                                "filters.use_entry_gates": False, "risk.use_risk_limits": False})
    started = time.perf_counter()
    provider = embedded_chain_provider(config)
    features = embedded_bar_features(config, provider)
    load_seconds = time.perf_counter() - started
    run_fast = partial(_run_fast, features=features)
    run_backtrader = partial(_run_backtrader, features=features)
    bars = len(provider.bar_times)
    print(f"data load: {load_seconds:.2f} s, {bars:,} five-minute bars {args.start} … {args.end}; "
          f"peak RSS {peak_rss_mib():.0f} MiB")

    # Warm up: numba kernels and Backtrader's first-run imports/caches.
    warm = config.override({"backtest.samples": 2_000})
    run_fast(warm, provider)
    run_backtrader(warm, provider)
    run_backtrader(warm, provider, empty_strategy=True)

    timings = {}
    results = {}
    for name, runner in (
            ("empty bt.Strategy (anchor)", lambda: run_backtrader(config, provider, empty_strategy=True)),
            ("empty + the 3 analyzers", lambda: run_backtrader(config, provider, empty_strategy=True,
                                                                analyzers_on_empty=True)),
            ("Backtrader driver", lambda: run_backtrader(config, provider)),
            ("  same, analyzers off", lambda: run_backtrader(config, provider, analyzers=False)),
            ("fast driver", lambda: run_fast(config, provider))):
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = runner()
            elapsed = time.perf_counter() - t0
            best = elapsed if best is None else min(best, elapsed)
        timings[name] = best
        results[name] = result
        print(f"{name:28s} {best:7.2f} s  {bars / best:10,.0f} bars/s  peak RSS so far {peak_rss_mib():.0f} MiB")

    anchor = timings["empty bt.Strategy (anchor)"]
    bt_time = timings["Backtrader driver"]
    fast_time = timings["fast driver"]
    trades_bt = len(results["Backtrader driver"].positions)
    trades_fast = len(results["fast driver"].positions)
    print(f"trades: Backtrader {trades_bt}, fast {trades_fast}")
    print(f"ratio Backtrader driver / empty loop: {bt_time / anchor:.2f}x (target <= 2x)")
    print(f"  of which Backtrader's Sharpe/DrawDown/Returns analyzers: "
          f"{(timings['empty + the 3 analyzers'] - anchor) / bars * 1e6:.1f} us/bar; the engine step: "
          f"{(timings['  same, analyzers off'] - anchor) / bars * 1e6:.1f} us/bar; "
          f"driver / (empty + analyzers) {bt_time / timings['empty + the 3 analyzers']:.2f}x, "
          f"driver without analyzers / empty {timings['  same, analyzers off'] / anchor:.2f}x")
    print(f"ratio fast driver / empty loop: {fast_time / anchor:.2f}x; fast speed-up over Backtrader "
          f"driver {bt_time / fast_time:.1f}x")
    print(f"fast driver: {bars / fast_time:,.0f} bars/s (target >= 100,000); peak RSS {peak_rss_mib():.0f} MiB "
          f"(target < 1024)")


if __name__ == "__main__":
    main()
