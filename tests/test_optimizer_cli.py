"""The optimizer on the command line: bad optimizer input exits 2 with one line and no run folder;
``--use-optimizer`` runs it from the backtest mode; a run killed with SIGKILL mid-phase resumes
with the same command without repeating its finished trials.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from cli_helpers import run_failing
from core.config import Config
from core.main import main

ROOT = Path(__file__).resolve().parent.parent
PERIOD = ["--bt-start", "2016-01-04", "--bt-end", "2016-02-26"]


# ------------------------------------------------------------------------------------------------
# 8. bad input: exit 2, one line naming the problem, no run folder
# ------------------------------------------------------------------------------------------------

def write_grid(tmp_path, text: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return str(path)


BAD_INPUT = {
    "phase 7": (["--mode", "optimize", "--phases", "7"], ("--phases", "'7'", "unknown phase")),
    "samples 0": (["--mode", "optimize", "--samples", "0"], ("--samples 0", "at least 1")),
    "samples -3": (["--mode", "optimize", "--samples", "-3"], ("--samples -3", "at least 1")),
    "empty grid list": (["--mode", "optimize", "--grid", "{grid}"], ("exits.profit_take_pct", "empty")),
    "grid unknown phase": (["--mode", "optimize", "--grid", "{grid}"], ("unknown phase", "'9'")),
    "grid unknown setting": (["--mode", "optimize", "--grid", "{grid}"], ("no_such_setting",)),
    "walk-forward test months": (["--mode", "optimize", "--walk-forward", "--wf-test-months", "1"],
                                 ("--wf-test-months 1", "30 days")),
    "unreachable ray": (["--mode", "optimize", "--executor", "ray", "--ray-address", "127.0.0.1:1"],
                        ("--ray-address 127.0.0.1:1", "nothing answers")),
    "unreachable storage": (["--mode", "optimize", "--storage", "postgresql+psycopg://nobody@127.0.0.1:1/x"],
                            ("--storage postgresql+psycopg://nobody@127.0.0.1:1/x", "cannot open")),
    "optimizer flag in backtest mode": (["--samples", "3"], ("--samples", "optimizer flag", "--mode optimize")),
    "period outside the data": (["--mode", "optimize", "--bt-start", "2019-06-03", "--bt-end", "2019-07-01"],
                                ("2019-06-03", "outside the data")),
    "missing explicit checkpoint": (["--mode", "optimize", "--use-fuzzy", "--mamba-model", "/no/such/model.pt",
                                     "--bt-start", "2016-01-04", "--bt-end", "2016-01-29"],
                                    ("mamba.weights_path", "/no/such/model.pt")),
}
GRIDS = {
    "empty grid list": "1:\n  profit_take_pct: []\n",
    "grid unknown phase": "9:\n  profit_take_pct: [0.5, 0.6]\n",
    "grid unknown setting": "exits_risk:\n  no_such_setting: [1, 2]\n",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_optimizer_input_exits_2_with_one_line_and_no_run_folder(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, words = BAD_INPUT[case]
    if case in GRIDS:
        grid = write_grid(tmp_path, GRIDS[case])
        args = [grid if a == "{grid}" else a for a in args]
    started = time.perf_counter()
    status, errors, text = run_failing(args, tmp_path, capsys)
    assert status == 2, text
    assert len(errors) == 1, text
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in text
    assert time.perf_counter() - started < 30       # refused up front, not after loading data


# The period of tests/test_optimizer_backtests.py: the market is cached between them.
SHORT = ["--bt-start", "2016-01-04", "--bt-end", "2016-03-03"]
TINY = ["--phases", "1", "--samples", "2", "--min-trades", "1", "--workers", "1", "--no-sensitivity"]


def test_use_optimizer_in_backtest_mode_runs_the_optimizer(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    status = main(["--mode", "backtest", "--use-optimizer", *SHORT, *TINY, "--out", str(out)])
    text = capsys.readouterr()
    assert status == 0, text.err
    assert (out / "summary.html").is_file() and (out / "best_config.yaml").is_file()
    manifest = json.loads((out / "optimizer.json").read_text())
    assert manifest["status"] == "complete" and manifest["trials"] == 2 and manifest["resumed"] is False
    assert manifest["search"]["samples"] == 2 and [p["number"] for p in manifest["search"]["phases"]] == [1]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and set(trials["phase"]) == {1}
    best = Config.from_yaml(out / "best_config.yaml")
    chosen = trials.sort_values(["value", "trial"], ascending=[False, True]).iloc[0]
    for column in trials.columns:
        if column.startswith("param."):
            assert best.get(column[len("param."):]) == pytest.approx(chosen[column])
    # Other settings are the command's: the period given, the fast engine.
    assert str(best.backtest.start) == "2016-01-04" and str(best.backtest.end) == "2016-03-03"
    assert best.backtest.engine == "fast"
    assert not (tmp_path / "runs").exists()

    # Resuming the finished folder with another period (or other search settings) is refused
    # before anything in it changes: its trials are of the old period.
    kept = {name: (out / name).read_bytes() for name in ("optimizer.json", "base_config.yaml", "results.json")}
    for changed in (["--bt-end", "2016-02-26"], ["--samples", "3"], ["--profit-pct", "0.6"]):
        args = [*SHORT, *TINY, *changed]
        status = main(["--mode", "optimize", *args, "--out", str(out)])
        text = capsys.readouterr()
        errors = [line for line in (text.out + text.err).splitlines() if "error:" in line]
        assert status == 2 and len(errors) == 1, text
        assert f"--out {out}" in errors[0] and "started with other" in errors[0], errors[0]
        assert {name: (out / name).read_bytes() for name in kept} == kept
    # The same search and configuration resumes (other workers are fine) and runs nothing new.
    status = main(["--mode", "optimize", *SHORT, *TINY, "--workers", "2", "--out", str(out)])
    capsys.readouterr()
    assert status == 0
    manifest = json.loads((out / "optimizer.json").read_text())
    assert manifest["resumed"] is True and manifest["trials"] == 2
    assert json.loads((out / "results.json").read_text())["new_trials"] == 0


# ------------------------------------------------------------------------------------------------
# 2b. kill -9 mid-phase, then the same command again
# ------------------------------------------------------------------------------------------------

RESUME_ARGS = ["--mode", "optimize", "--phases", "1", "--samples", "8", "--workers", "1", "--min-trades", "1",
               *PERIOD, "--no-sensitivity"]
STUDY = "condorbrain-full-p1"
# The first run is core/main.py with each trial slowed to 0.5 s (so the kill lands mid-phase
# whatever the machine); the resumed run is the plain command.
SLOW_TRIALS = """
import runpy, sys, time
sys.path.insert(0, ".")
import core.optimizer as optimizer
evaluate = optimizer.evaluate
def slow(*args, **kwargs):
    time.sleep(0.5)
    return evaluate(*args, **kwargs)
optimizer.evaluate = slow
sys.argv = ["core/main.py", *sys.argv[1:]]
runpy.run_path("core/main.py", run_name="__main__")
"""


def count_complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute(
                "SELECT COUNT(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
                "WHERE studies.study_name = ? AND trials.state = 'COMPLETE'", (STUDY,)).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:          # tables not made yet, or locked for a moment
        return 0


def trials_of(db: Path) -> list:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}").get_trials(deepcopy=True)


def test_a_killed_optimizer_resumes_without_repeating_finished_trials(tmp_path):
    out = tmp_path / "run"
    db = out / "study.db"
    args = [*RESUME_ARGS, "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", SLOW_TRIALS, *args], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while count_complete(db) < 3:
                assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no 3 finished trials in 180 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    killed = trials_of(db)
    before = {t.number: (t.params, t.value, t.user_attrs["metrics"], t.user_attrs["returns"])
              for t in killed if t.state == TrialState.COMPLETE}
    assert 3 <= len(before) < 8
    assert not (out / "summary.html").exists() and not (out / "trials.csv").exists()
    manifest = json.loads((out / "optimizer.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["resume_with"].endswith(f"--out {out}")

    done = subprocess.run([sys.executable, "core/main.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    trials = trials_of(db)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 8
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    after = {t.number: (t.params, t.value, t.user_attrs["metrics"], t.user_attrs["returns"]) for t in complete}
    for number, kept in before.items():
        assert after[number] == kept, number
    # The run folder's grid study writes a trial only when it has finished: the kill leaves no
    # trial running or failed, and the points that were running are run on resume, once each.
    assert not [t for t in killed if t.state != TrialState.COMPLETE]
    assert not [t for t in trials if t.state != TrialState.COMPLETE]
    assert len({t.system_attrs["grid_id"] for t in complete}) == 8

    for name in ("summary.html", "trials.csv", "best_config.yaml", "phases.csv", "results.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "optimizer.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] is True and manifest["trials"] == 8
    table = pd.read_csv(out / "trials.csv")
    assert sorted(table["trial"]) == sorted(after)
    phases = pd.read_csv(out / "phases.csv")
    assert phases["resumed"].tolist() == [len(before)]
    best = Config.from_yaml(out / "best_config.yaml")
    top = max(complete, key=lambda t: (t.value, -t.number))
    for path, value in top.params.items():
        assert best.get(path) == value
