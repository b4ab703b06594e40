"""Backtest the whole embedded period: `python scripts/run_full_backtest.py [flags]`.

A thin wrapper: it runs `core/main.py --mode backtest --bt-samples 0` with the given flags
(any backtest flag of core/main.py works here), so the CLI stays the one place with the logic.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "core" / "main.py"

if __name__ == "__main__":
    sys.argv = [str(MAIN), "--mode", "backtest", "--bt-samples", "0", *sys.argv[1:]]
    runpy.run_path(str(MAIN), run_name="__main__")
