"""Time of the intelligence layer on the default period: every feature, membership and regime
for all bars (target < 2 s), and the fast driver's bars/s with the full layer on vs off, in the
same run.

Usage: .venv/bin/python benchmarks/bench_intelligence.py [--start 2014-01-03] [--end 2018-12-31]
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

from core.backtest_engine import run_backtest  # noqa: E402
from core.config import Config  # noqa: E402
from core.market_data import embedded_bar_features, embedded_chain_provider  # noqa: E402
from data_factory import embedded  # noqa: E402
from data_factory.intraday import intraday_bars  # noqa: E402
from strategies.entry_gates import bar_gate_codes  # noqa: E402

# The risk manager's caps, budget and kill switch off in all three, so the rows differ by the
# intelligence layer only (with them on, the mechanical condor's losses exhaust the risk budget
# and it retries an entry every bar; benchmarks/bench_risk.py measures that).
SCENARIOS = {
    "off: mechanical (no gates, MTF, fuzzy)": {"filters.use_entry_gates": False, "risk.use_risk_limits": False},
    "gates only (default config)": {"risk.use_risk_limits": False},
    "full: gates + MTF band + fuzzy dynamic sizing": {"mtf.use_mtf": True, "fuzzy.use_fuzzy": True,
                                                      "sizing.dynamic_sizing": True,
                                                      "sizing.position_size_pct": 0.2,
                                                      "risk.use_risk_limits": False},
}


def best_of(repeats: int, work):
    best, value = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        value = work()
        best = min(best, time.perf_counter() - started)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", default="2014-01-03")
    parser.add_argument("--end", default="2018-12-31")
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    args = parser.parse_args()

    config = Config().override({"backtest.start": args.start, "backtest.end": args.end})
    provider = embedded_chain_provider(config)
    bars = len(provider.bar_times)
    print(f"{bars:,} five-minute bars {args.start} … {args.end}")

    embedded_bar_features(config, provider)          # warm-up: imports, TA-Lib, caches
    seconds, features = best_of(args.repeats, lambda: embedded_bar_features(config, provider))
    # The part that is synthesis of the 1-minute bars (data, not features), for the split.
    daily = embedded.daily_bars("SPY", provider.sessions[0] - (provider.sessions[1] - provider.sessions[0]) * 20,
                                provider.sessions[-1])
    synth_seconds, minute_bars = best_of(args.repeats, lambda: intraday_bars(daily, freq="1min", seed=42))
    gate_seconds, _ = best_of(args.repeats, lambda: bar_gate_codes(features.columns, config))
    print(f"\nfeature table ({len(features.columns)} columns x {len(features):,} bars: indicators, MTF 1/5/15, "
          f"regime, 10 memberships, F_t, C)")
    print(f"  total                         {seconds:6.2f} s   (target < 2 s)")
    print(f"    of which 1-minute bar synthesis  ~{synth_seconds:.2f} s ({len(minute_bars):,} bars incl. warm-up)")
    print(f"    features on those bars           ~{seconds - synth_seconds:.2f} s")
    print(f"  entry-gate codes              {gate_seconds * 1e3:6.1f} ms")

    print(f"\nrun_backtest, fast driver, same provider and feature table, best of {args.repeats}:")
    reference = None
    for name, switches in SCENARIOS.items():
        scenario = config.override({**switches, "backtest.engine": "fast"})
        run_backtest(scenario.override({"backtest.samples": 2_000}), provider, features=features)   # warm-up
        seconds, result = best_of(args.repeats, lambda scenario=scenario: run_backtest(scenario, provider,
                                                                                        features=features))
        rate = bars / seconds
        reference = reference or rate
        trades = len(result.trades)
        print(f"  {name:48s} {seconds:6.2f} s  {rate / 1e3:7.1f} k bars/s  (x{rate / reference:.2f} of off)  "
              f"{trades} trades")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
