"""The optimizer's throughput: five-year backtests per second per phase of the seed's matrix and
over the whole matrix, with a 2-worker process pool and with 1 worker, against the anchor —
Backtrader's ``optstrategy`` running a trivial SMA cross over the same five-minute bars on 2
CPUs (``benchmarks/anchor_optstrategy.py``) — in the same run.

Each trial is a full ``run_backtest`` of the seed's optimization configuration (MTF, fuzzy,
dynamic sizing; 2014-01-03 … 2018-12-31, 97,650 five-minute bars) through the optimizer's own
path (Optuna grid sampler, SQLite study, the trial memos). The pool runs first, forked from a
parent whose memos are empty, then the 1-worker run in the parent, so neither starts warm from
the other. Both run the same trials: the whole matrix (1,557), or ``--samples N`` points of each
phase's grid (the grid sampler's seeded order, so the same points); ``--one-worker-samples N``
shortens only the 1-worker run (its ratio is then not like for like, and says so).

Usage: .venv/bin/python benchmarks/bench_optimizer.py [--samples N] [--one-worker-samples N]
       [--no-neural] [--skip-anchor]
Prints figures; asserts nothing about time.
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from core import optimizer  # noqa: E402
from core.config import Config  # noqa: E402


def run_matrix(spec: optimizer.SearchSpec, executor, cash: float, label: str) -> dict:
    """The phased search on ``executor`` in a fresh SQLite study; seconds and trials per phase."""
    folder = tempfile.mkdtemp(prefix="bench-opt-")
    storage = optimizer.open_storage(f"sqlite:///{folder}/study.db")
    study = optimizer.Study(storage, f"bench-{label}", spec, local=True, cash=cash)
    figures = {}
    marks = {}

    def on_phase(window, phase):
        marks[phase.number] = time.perf_counter()

    def on_trial(record, complete, target, window=None, phase=None):
        if record is not None and complete == target:
            figures[phase.number] = (complete, time.perf_counter() - marks[phase.number])

    started = time.perf_counter()
    try:
        outcome = optimizer.phased_search(study, None, executor, on_trial=on_trial, on_phase=on_phase)
    finally:
        study.close()
    return {"phases": figures, "seconds": time.perf_counter() - started, "trials": len(outcome.trials),
            "best": outcome.overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None,
                        help="grid points per phase for both worker counts (default: the whole matrix)")
    parser.add_argument("--one-worker-samples", type=int, default=None,
                        help="fewer points per phase for the 1-worker run only (default: the same trials)")
    parser.add_argument("--no-neural", action="store_true", help="leave the DeepMamba factor neutral")
    parser.add_argument("--skip-anchor", action="store_true")
    args = parser.parse_args()
    console = Console()

    config = Config().override({"backtest.engine": "fast", "mtf.use_mtf": True, "fuzzy.use_fuzzy": True,
                                "sizing.dynamic_sizing": True, "mamba.use_neural": not args.no_neural})
    started = time.perf_counter()
    context = optimizer.build_context(config, console)
    optimizer.install_context(context)
    setup = time.perf_counter() - started
    bars = len(context.market.bar_times)
    print(f"set-up once per study (data, μ_Mamba {'on' if context.neural else 'off'}, features): {setup:.1f} s; "
          f"{bars:,} five-minute bars, {config.backtest.start} … {config.backtest.end}")

    cash = config.backtest.cash
    pool_spec = optimizer.SearchSpec(samples=args.samples, min_trades=20, seed=config.backtest.seed)
    one_samples = args.one_worker_samples if args.one_worker_samples is not None else args.samples
    one_spec = optimizer.SearchSpec(samples=one_samples, min_trades=20, seed=config.backtest.seed)
    like_for_like = one_samples == args.samples
    pool = optimizer.ProcessExecutor(2)
    try:
        two = run_matrix(pool_spec, pool, cash, "two")
    finally:
        pool.close()
    one = run_matrix(one_spec, optimizer.InlineExecutor(), cash, "one")

    print(f"\n{'phase':<40} {'2 workers':>22} {'1 worker':>22} {'2 / 1':>7}")
    for phase in optimizer.SEED_PHASES:
        n2, s2 = two["phases"][phase.number]
        n1, s1 = one["phases"][phase.number]
        print(f"{phase.number} {phase.title:<38} {n2 / s2:6.2f}/s ({n2:4d} in {s2:6.1f} s) "
              f"{n1 / s1:6.2f}/s ({n1:4d} in {s1:6.1f} s) {(n2 / s2) / (n1 / s1):6.2f}x")
    rate2 = two["trials"] / two["seconds"]
    rate1 = one["trials"] / one["seconds"]
    print(f"{'whole matrix':<40} {rate2:6.2f}/s ({two['trials']:4d} in {two['seconds']:6.1f} s) "
          f"{rate1:6.2f}/s ({one['trials']:4d} in {one['seconds']:6.1f} s) {rate2 / rate1:6.2f}x")
    print(f"targets: >= 10 five-year backtests/s on 2 cores over the matrix (measured {rate2:.2f}); "
          f"2 workers >= 1.7x one (measured {rate2 / rate1:.2f}x"
          + ("" if like_for_like else "; NOT like for like: the 1-worker run had fewer trials per phase") + ")")
    print(f"seed matrix wall time with 2 workers: {two['seconds']:.0f} s search + {setup:.0f} s set-up")

    if not args.skip_anchor:
        from benchmarks.anchor_optstrategy import optstrategy_runs_per_second

        frame = context.market.ohlcv_bars()
        anchor = optstrategy_runs_per_second(frame, combos=8, maxcpus=2)
        print(f"\nanchor: backtrader optstrategy, SMA cross, 8 combinations, maxcpus=2, {anchor['bars']:,} bars: "
              f"{anchor['runs_per_second']:.3f} runs/s")
        print(f"ours / anchor: {rate2 / anchor['runs_per_second']:.1f}x (target >= 30x)")


if __name__ == "__main__":
    main()
