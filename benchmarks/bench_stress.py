"""The whole default stress suite's wall time, and its scaling from 1 to N workers.

`python benchmarks/bench_stress.py [--workers 1,2] [extra core/main.py flags]`: runs
`core/main.py --mode stress` (every parameter shock, market shock and historical window, the fast
driver, 2014-2018) once per worker count, each in a fresh process so no cache carries over, and
prints the wall time, the summed run time and the speed-up. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2", help="worker counts to time (default: 1,2)")
    args, extra = parser.parse_known_args()
    counts = [int(n) for n in args.workers.split(",")]
    walls = {}
    with tempfile.TemporaryDirectory() as folder:
        for workers in counts:
            out = Path(folder) / f"w{workers}"
            command = [sys.executable, str(ROOT / "core" / "main.py"), "--mode", "stress", "--workers", str(workers),
                       "--out", str(out), *extra]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            walls[workers] = time.perf_counter() - started
            info = json.loads((out / "stress.json").read_text())
            print(f"{workers} worker(s): {walls[workers]:6.1f} s wall (process, data and features included), "
                  f"{info['wall_seconds']:6.1f} s from load to table, {info['run_seconds']:6.1f} s of runs, "
                  f"{info['runs']} runs")
    first = counts[0]
    for workers in counts[1:]:
        print(f"speed-up {first} -> {workers} workers: {walls[first] / walls[workers]:.2f}x")


if __name__ == "__main__":
    main()
