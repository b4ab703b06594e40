"""How often the steep-put-skew rule fires on the embedded data, and what its reference costs.

For the period (default 2014-01-03 … 2018-12-31, default config), for both readings of
``analytics.skew.chain_skew`` (``interpolated``: the IVs interpolated to exactly 15Δ and to the
spot, the engine's; ``nearest``: the listed rows nearest them): the session-close 15-delta skew
(IV_put15Δ − IV_call15Δ)/IV_ATM of the nearest expiry in the DTE range, its spread, lag-1
autocorrelation and correlation with the VIX; the share of sessions
whose close reading exceeds the percentile rule's reference (``filters.skew_percentile`` of the
previous ``filters.skew_lookback_sessions`` closes, a year of history before the start) and the
seed rule's ``filters.skew_threshold``; the same at each session's first entry-window bar; the
shares by year and by VIX level; and the seconds ``core.skew_history.embedded_skew_reference``
takes (history provider + one slice per session, after the chain and skew kernels' first compile).

Usage: .venv/bin/python benchmarks/bench_skew_rule.py [--start 2014-01-03] [--end 2018-12-31]
       [--percentile 80] [--lookback 252]
Prints figures; asserts nothing.
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from analytics.skew import SKEW_METHODS, trailing_skew_reference  # noqa: E402
from core.config import Config  # noqa: E402
from core.market_data import embedded_chain_provider  # noqa: E402
from core.skew_history import embedded_skew_history, embedded_skew_reference  # noqa: E402
from intelligence.skew_reference import session_close_skews, session_last_bars  # noqa: E402
from strategies.condor_adjustments import nearest_expiry_skew  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", default="2014-01-03")
    parser.add_argument("--end", default="2018-12-31")
    parser.add_argument("--percentile", type=float, default=None)
    parser.add_argument("--lookback", type=int, default=None)
    args = parser.parse_args()
    changes = {"backtest.start": dt.date.fromisoformat(args.start), "backtest.end": dt.date.fromisoformat(args.end)}
    if args.percentile is not None:
        changes["filters.skew_percentile"] = args.percentile
    if args.lookback is not None:
        changes["filters.skew_lookback_sessions"] = args.lookback
    config = Config().override(changes)
    filters, strategy = config.filters, config.strategy
    provider = embedded_chain_provider(config)
    chain_at = lambda bar: provider.slice_at(bar, strategy.dte_min, strategy.dte_max)  # noqa: E731
    first_chain = chain_at(0)                         # compile the chain kernel outside the timing
    for method in SKEW_METHODS:                       # and load / compile the skew kernels
        nearest_expiry_skew(first_chain, method=method)

    started = time.perf_counter()
    per_bar = embedded_skew_reference(config, provider)
    seconds = time.perf_counter() - started

    last = session_last_bars(provider.bar_times)
    times = provider.bar_times
    # First bar of each session inside the entry window (where a one-entry-a-day run tries first).
    minutes = times.hour * 60 + times.minute
    start_min = int(strategy.entry_window_start[:2]) * 60 + int(strategy.entry_window_start[3:])
    firsts = []
    previous = -1
    for close_bar in last:
        window = np.flatnonzero(minutes[previous + 1:close_bar + 1] >= start_min)
        firsts.append(previous + 1 + int(window[0]) if len(window) else int(close_bar))
        previous = int(close_bar)
    firsts = np.array(firsts)
    years = times[last].year
    vix = provider.iv_index_bars().to_numpy()[last]

    n = len(last)
    print(f"period {args.start} … {args.end}: {n} sessions, {len(times)} bars")
    print(f"embedded_skew_reference (engine path, interpolated): {seconds:.2f} s")
    print(f"percentile rule: p{filters.skew_percentile:g} of the previous {filters.skew_lookback_sessions} "
          f"session closes (min {filters.skew_min_sessions}); seed rule: > {filters.skew_threshold:g}")
    for method in ("interpolated", "nearest"):
        closes = session_close_skews(chain_at, last, method=method)
        history = embedded_skew_history(config, provider.bar_times[0], method=method)
        reference = trailing_skew_reference(np.concatenate([history, closes]), filters.skew_lookback_sessions,
                                            filters.skew_percentile, filters.skew_min_sessions)[len(history):]
        if method == "interpolated":                  # the engine's reference is this one
            np.testing.assert_array_equal(per_bar[last], reference)
        opening = session_close_skews(chain_at, firsts, method=method)
        print(f"\n[{method}] history {len(history)} sessions")
        pct = np.nanpercentile(closes, [0, 5, 25, 50, 75, 95, 100])
        print("  session-close skew: min {:.3f}  p5 {:.3f}  p25 {:.3f}  median {:.3f}  p75 {:.3f}  p95 {:.3f}  "
              "max {:.3f}  std {:.4f}  (NaN {})".format(*pct, np.nanstd(closes), int(np.isnan(closes).sum())))
        ok = ~np.isnan(closes)
        print(f"  lag-1 autocorrelation {np.corrcoef(closes[ok][:-1], closes[ok][1:])[0, 1]:.2f}; "
              f"day-to-day change std {np.std(np.diff(closes[ok])):.4f}; "
              f"correlation with the VIX {np.corrcoef(closes[ok], vix[ok])[0, 1]:.2f}")
        valid = ~np.isnan(reference)
        print(f"  reference on {valid.sum()}/{n} sessions, "
              f"range {np.nanmin(reference):.3f} … {np.nanmax(reference):.3f}")
        for label, readings in (("session close", closes), (f"first bar >= {strategy.entry_window_start}", opening)):
            fires = readings[valid] > reference[valid]
            seed = readings > filters.skew_threshold
            print(f"  {label:>20}: percentile rule fires on {fires.sum()}/{n} sessions ({fires.sum() / n:.1%}); "
                  f"seed rule on {seed.sum()}/{n} ({seed.sum() / n:.1%})")
        fires = valid & (closes > reference)
        by_year = {int(y): (int(fires[years == y].sum()), int((valid & (years == y)).sum())) for y in np.unique(years)}
        print("  session-close share by year: "
              + ", ".join(f"{y} {k / m:.1%} ({k}/{m})" for y, (k, m) in by_year.items()))
        buckets = []
        for low, high in ((0, 15), (15, 20), (20, 30), (30, np.inf)):
            rows = valid & (vix >= low) & (vix < high)
            share = f"{fires[rows].sum() / rows.sum():.1%}" if rows.any() else "-"
            buckets.append(f"VIX {low:g}-{high:g} {share} ({fires[rows].sum()}/{rows.sum()})")
        print("  session-close share by VIX at the close: " + ", ".join(buckets))

if __name__ == "__main__":
    main()
