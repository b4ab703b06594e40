"""Standard backtest without the MTF filter (seed "Standard Backtest"):
`python scripts/run_backtest_standard.py [flags]`.

A thin wrapper: `core/main.py --mode backtest --no-mtf-filter` plus the given flags (any backtest
flag of core/main.py works here).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "core" / "main.py"

if __name__ == "__main__":
    sys.argv = [str(MAIN), "--mode", "backtest", "--no-mtf-filter", *sys.argv[1:]]
    runpy.run_path(str(MAIN), run_name="__main__")
