"""MTF backtest (seed "MTF Backtest"): `python scripts/run_backtest_mtf.py [flags]`.

A thin wrapper: `core/main.py --mode backtest --use-mtf --mtf-timeframes 1,5,15` plus the given
flags (any backtest flag of core/main.py works here). The consensus is built from 1-minute bars
(synthetic, same seed as the 5-minute trading bars); a timeframe's bar counts once it has closed.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "core" / "main.py"

if __name__ == "__main__":
    sys.argv = [str(MAIN), "--mode", "backtest", "--use-mtf", "--mtf-timeframes", "1,5,15", *sys.argv[1:]]
    runpy.run_path(str(MAIN), run_name="__main__")
