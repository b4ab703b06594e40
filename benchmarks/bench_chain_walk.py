"""Walk the synthetic SPY chain bar by bar and print throughput and memory against in-run anchors.

Default: the embedded period 2014-01-03 … 2018-12-31 on 5-minute bars (~98k bars), asking every
bar for the 30–45 DTE slice with the default strikes (±25 % of spot, $1 apart). Prints data-load
time, walk time, bars/s, options priced per second, total quotes, peak memory (ru_maxrss and the
tracemalloc peak of one slice), and two anchors measured in the same run:

* ``loop floor``: iterating the same bar timestamps in Python doing nothing else;
* ``pricing floor``: the same number of Black–Scholes–Merton evaluations (price + Greeks) in big
  batches through ``analytics.black_scholes.bsm_greeks`` (numba, one thread) — the arithmetic no
  chain can avoid (it excludes the surface, the spreads and the per-bar slicing);

and the ratio walk / (loop floor + pricing floor).

Run: ``.venv/bin/python benchmarks/bench_chain_walk.py`` (``--help`` for the period/DTE options).
One thread: the thread variables are set before NumPy/numba are imported.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from analytics.black_scholes import bsm_greeks  # noqa: E402
from data_factory.option_chain import SyntheticChainProvider  # noqa: E402

PRICING_BATCH = 1 << 20


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def walk(provider: SyntheticChainProvider, dte_min: int, dte_max: int) -> tuple[float, int]:
    quotes = 0
    started = time.perf_counter()
    for stamp in provider.bar_times:
        quotes += len(provider.slice(stamp, dte_min=dte_min, dte_max=dte_max))
    return time.perf_counter() - started, quotes


def loop_floor(provider: SyntheticChainProvider) -> float:
    started = time.perf_counter()
    for stamp in provider.bar_times:
        pass
    return time.perf_counter() - started


def pricing_floor(n_options: int, seed: int = 0) -> float:
    """Seconds to price ``n_options`` options with all Greeks in batches of ``PRICING_BATCH``."""
    rng = np.random.default_rng(seed)
    spot = 250.0
    strike = np.floor(rng.uniform(0.75, 1.25, PRICING_BATCH) * spot)
    t_years = rng.uniform(30, 45, PRICING_BATCH) / 365.0
    sigma = rng.uniform(0.08, 0.35, PRICING_BATCH)
    is_call = rng.random(PRICING_BATCH) < 0.5
    bsm_greeks(spot, strike[:10], t_years[:10], 0.01, 0.019, sigma[:10], is_call[:10])   # compile/load
    full, rest = divmod(n_options, PRICING_BATCH)
    started = time.perf_counter()
    for _ in range(full):
        bsm_greeks(spot, strike, t_years, 0.01, 0.019, sigma, is_call)
    if rest:
        bsm_greeks(spot, strike[:rest], t_years[:rest], 0.01, 0.019, sigma[:rest], is_call[:rest])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", default="2014-01-03")
    parser.add_argument("--end", default="2018-12-31")
    parser.add_argument("--freq", default="5min")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dte-min", type=int, default=30)
    parser.add_argument("--dte-max", type=int, default=45)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"numpy {np.__version__}; one thread")
    started = time.perf_counter()
    provider = SyntheticChainProvider.from_embedded(args.start, args.end, seed=args.seed, freq=args.freq)
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_mib()
    n_bars = len(provider.bar_times)
    print(f"data load (embedded daily + synthetic {args.freq} bars + provider precompute): {load_s:.2f} s, "
          f"{n_bars:,} bars, {provider.bar_times[0]} … {provider.bar_times[-1]}")

    started = time.perf_counter()
    provider.slice(provider.bar_times[0], dte_min=args.dte_min, dte_max=args.dte_max)   # numba load
    print(f"first slice (numba kernel load/compile): {time.perf_counter() - started:.2f} s")

    walk_s, quotes = walk(provider, args.dte_min, args.dte_max)
    rss_after_walk = peak_rss_mib()
    print(f"walk {args.dte_min}-{args.dte_max} DTE, default strikes: {walk_s:.2f} s, "
          f"{n_bars / walk_s:,.0f} bars/s, {quotes / walk_s / 1e6:.1f}M options/s, "
          f"{quotes:,} quotes ({quotes / n_bars:,.0f} per bar)")

    tracemalloc.start()
    middle = provider.bar_times[n_bars // 2]
    provider.slice(middle, dte_min=args.dte_min, dte_max=args.dte_max)
    slice_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak memory: ru_maxrss {rss_after_load:,.0f} MiB after load, {rss_after_walk:,.0f} MiB after "
          f"walk; one slice allocates {slice_peak / 1024:,.0f} KiB (tracemalloc peak)")

    loop_s = loop_floor(provider)
    price_s = pricing_floor(quotes)
    floor_s = loop_s + price_s
    print(f"anchor, loop floor (iterate the {n_bars:,} bar timestamps): {loop_s:.2f} s")
    print(f"anchor, pricing floor (bsm_greeks on {quotes:,} options in batches of {PRICING_BATCH:,}): "
          f"{price_s:.2f} s, {quotes / price_s / 1e6:.1f}M options/s")
    print(f"ratio walk / (loop + pricing floor): {walk_s / floor_s:.2f}")
    print(f"targets: walk < 20 s -> {'met' if walk_s < 20 else 'MISSED'}; peak memory < 1 GiB -> "
          f"{'met' if rss_after_walk < 1024 else 'MISSED'}")


if __name__ == "__main__":
    main()
