"""The risk manager's cost and the one run function's set-up savings, measured in the same run.

1. Fast-driver bars/s with the RiskManager on (default caps, risk budget, kill switch) against
   off (``risk.use_risk_limits: false``), for the default gated strategy and the mechanical
   condor, best of N each. When the risk budget refuses entries the strategy tries again on the
   next bar, so "on" can run more entry attempts than "off": the attempts are printed, and the
   cost per bar is split into the attempts and the rest.
2. ``run_backtest`` called 20 times in one process on the default period: the first call loads
   the embedded data and builds the feature table (both cached per process), the next 19 change
   only exit and risk settings and reuse them. Prints the time of the first call and the median
   of the others.

Usage: .venv/bin/python benchmarks/bench_risk.py [--start 2014-01-03] [--end 2018-12-31] [--repeats 3]
Prints figures; asserts nothing about time.
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.backtest_engine import run_backtest  # noqa: E402
from core.config import Config  # noqa: E402
from core.market_data import bar_features, load_market  # noqa: E402
from strategies.entry_gates import GATE_CODE  # noqa: E402


def attempts(result) -> int:
    """Entry attempts that read the chain: past the window, the daily limit, the risk blocks and
    the bar gates (bars refused by a gate cost a table lookup, not an attempt)."""
    return sum(count for reason, count in result.rejections.items() if reason not in GATE_CODE) + len(result.trades)


def compare_on_off(name: str, config: Config, market, repeats: int) -> None:
    best = {}
    results = {}
    for label, risk_on in (("risk manager on ", True), ("risk manager off", False)):
        run_config = config.override({"backtest.engine": "fast", "risk.use_risk_limits": risk_on})
        features = bar_features(run_config, market)
        times = []
        for _ in range(repeats):
            result = run_backtest(run_config, market, features=features)
            times.append(result.seconds)
        best[label] = min(times)
        results[label] = result
    bars = results["risk manager on "].bars
    print(f"\n{name}: {bars:,} bars")
    for label, seconds in best.items():
        result = results[label]
        print(f"  {label}  {seconds:6.2f} s  {bars / seconds:9,.0f} bars/s  trades {len(result.trades):4d}  "
              f"entry attempts {attempts(result):6,d}  kill-switch halts {result.metrics['risk']['kill_switch_halts']:3d}")
    on, off = best["risk manager on "], best["risk manager off"]
    print(f"  on / off: {on / off:.2f}x time ({(on / off - 1) * 100:+.0f} %; target < +20 %)")
    extra = attempts(results["risk manager on "]) - attempts(results["risk manager off"])
    if extra > 0:
        per_attempt = (on - off) / extra * 1e6 if on > off else float("nan")
        print(f"  'on' made {extra:,} more entry attempts (refused by sizing, tried again next bar); "
              f"that is {per_attempt:.0f} us per extra attempt if they explain all of the difference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="2014-01-03")
    parser.add_argument("--end", default="2018-12-31")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each on/off timing")
    parser.add_argument("--calls", type=int, default=20, help="run_backtest calls for the set-up figure")
    args = parser.parse_args()

    config = Config().override({"backtest.start": args.start, "backtest.end": args.end,
                                "backtest.engine": "fast"})

    # 2. First: the cold call pays for the data and the features.
    started = time.perf_counter()
    market = load_market(config)
    first = run_backtest(config, market)
    first_seconds = time.perf_counter() - started
    later = []
    for call in range(1, args.calls):
        # Only exit and risk settings change: the cached market and feature table are reused.
        variant = config.override({"exits.profit_take_pct": 0.4 + 0.02 * (call % 10),
                                   "risk.max_account_risk_per_trade": 0.02 + 0.001 * (call % 5)})
        t0 = time.perf_counter()
        result = run_backtest(variant, load_market(variant))
        later.append(time.perf_counter() - t0)
    print(f"run_backtest x {args.calls} on {args.start} … {args.end} (fast driver, default gated strategy):")
    print(f"  first call (loads data, builds features, compiles kernels): {first_seconds:6.2f} s, "
          f"{len(first.trades)} trades")
    print(f"  calls 2..{args.calls} (exit/risk settings changed; data and features reused): median "
          f"{statistics.median(later):.2f} s, min {min(later):.2f} s, max {max(later):.2f} s; last had "
          f"{len(result.trades)} trades")
    print(f"  set-up saved by the second call: {first_seconds - statistics.median(later):.2f} s "
          f"({first_seconds / statistics.median(later):.1f}x faster)")

    # 1. The risk manager on vs off (warm: kernels compiled, data and features cached).
    compare_on_off("default gated strategy", config, market, args.repeats)
    compare_on_off("mechanical condor (--no-gates)", config.override({"filters.use_entry_gates": False}), market,
                   args.repeats)
    # Same trades both ways: caps and budget loose enough never to bind, so the difference is the
    # risk manager's own per-bar work (Greeks, kill-switch equity, range scans).
    loose = {"risk.max_account_risk_per_trade": 0.25, "risk.daily_drawdown_limit": 0.99,
             **{f"risk.max_{scope}_{greek}": 1e6 for scope in ("trade", "portfolio")
                for greek in ("delta", "gamma", "vega", "theta")}}
    compare_on_off("mechanical condor, caps that never bind (same trades: the manager's own overhead)",
                   config.override({"filters.use_entry_gates": False, **loose}), market, args.repeats)


if __name__ == "__main__":
    main()
