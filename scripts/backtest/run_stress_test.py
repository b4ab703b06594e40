"""Risk stress test (seed "Risk Stress Test"): `python scripts/backtest/run_stress_test.py [flags]`.

A thin wrapper: `core/main.py --mode stress` plus the given flags (parameter shocks, market shocks
and historical windows; see `python core/main.py --help`, "stress mode").
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent.parent / "core" / "main.py"

if __name__ == "__main__":
    sys.argv = [str(MAIN), "--mode", "stress", *sys.argv[1:]]
    runpy.run_path(str(MAIN), run_name="__main__")
