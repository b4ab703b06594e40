"""Running the CLI in-process in tests: shared by the CLI test files."""
from __future__ import annotations

from core.main import main


def run_failing(args, tmp_path, capsys, out=None):
    """Run the CLI in-process in ``tmp_path``; return (status, the 'error:' lines, all output),
    after checking that nothing new is in the folder: no run folder, no partial one, no default
    runs/ folder."""
    out = tmp_path / "run" if out is None else out
    before = sorted(p.name for p in tmp_path.iterdir())
    status = main(["--mode", "backtest", "--engine", "fast", "--no-plot", *args, "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    errors = [line for line in text.splitlines() if "error:" in line]
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"
    return status, errors, text
