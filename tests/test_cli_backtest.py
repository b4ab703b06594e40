"""`python core/main.py --mode backtest` end to end: the run folder's files, the metrics in
metrics.json recomputed independently from equity.csv and trades.csv (plain numpy/pandas here, no
import from analytics.performance), and the command-line errors (exit code 2, one message naming the
setting, no traceback, no run folder left behind).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import Config
from cli_helpers import run_failing
from core.main import main

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NY = "America/New_York"
CASH = 25_000.0
RUN_ARGS = ["--mode", "backtest", "--bt-start", "2016-01-04", "--bt-end", "2016-02-29", "--engine", "fast",
            "--no-plot"]
ISSUE_TRADE_COLUMNS = ["entry_time", "exit_time", "expiration", "long_put", "short_put", "short_call",
                       "long_call", "contracts", "credit", "exit_debit", "fees", "pnl", "exit_reason",
                       "max_adverse_excursion"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        status = main([*RUN_ARGS, "--out", str(out)])
    assert status == 0
    return out, terminal.getvalue()


@pytest.fixture(scope="module")
def equity(run_dir):
    frame = pd.read_csv(run_dir[0] / "equity.csv")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True).dt.tz_convert(NY)
    return frame


@pytest.fixture(scope="module")
def trades(run_dir):
    frame = pd.read_csv(run_dir[0] / "trades.csv",
                        keep_default_na=False, na_values=[""])
    for column in ("entry_time", "exit_time"):
        frame[column] = pd.to_datetime(frame[column], utc=True).dt.tz_convert(NY)
    return frame


@pytest.fixture(scope="module")
def metrics(run_dir):
    return json.loads((run_dir[0] / "metrics.json").read_text())


def close(actual, expected) -> bool:
    if expected is None or actual is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------------------------------------
# the run folder
# ------------------------------------------------------------------------------------------------

def test_run_folder_has_every_file(run_dir):
    out, terminal = run_dir
    for name in ("config.yaml", "data.json", "trades.csv", "equity.csv", "metrics.json", "run.json",
                 "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "equity.png").exists()                  # --no-plot
    assert not [p for p in out.parent.iterdir() if "partial" in p.name]
    # The terminal shows the summary and says what is synthetic.
    assert "Net profit" in terminal and "SYNTHETIC" in terminal


def test_config_yaml_is_the_resolved_configuration(run_dir):
    config = Config.from_yaml(run_dir[0] / "config.yaml")
    assert str(config.backtest.start) == "2016-01-04" and str(config.backtest.end) == "2016-02-29"
    assert config.backtest.engine == "fast" and config.backtest.plot is False
    assert config.backtest.cash == CASH
    # Everything not given on the command line is the default.
    assert config.strategy == Config().strategy and config.exits == Config().exits


def test_data_json_says_what_is_synthetic(run_dir):
    data = json.loads((run_dir[0] / "data.json").read_text())
    assert data["period"]["start"] == "2016-01-04" and data["period"]["end"] == "2016-02-29"
    assert data["option_chains"]["synthetic"] is True and data["option_chains"]["european"] is True
    assert data["intraday_bars"]["synthetic"] is True
    assert data["embedded"]["daily_bars"]["SPY"]["proxy"] is True
    assert any("SPY" in line for line in data["embedded"]["synthetic_or_proxy"])
    assert data["underlying"] == "SPY"


def test_trades_csv_has_one_row_per_condor(trades, equity):
    assert list(trades.columns[: len(ISSUE_TRADE_COLUMNS) + 1]) == ["position_id", *ISSUE_TRADE_COLUMNS]
    # Two months of the gated default (risk budget 2 % of $25k refuses the $10-wide condors).
    assert len(trades) >= 5
    # Every condor opened appears once (the run ends flat, so all of them are closed).
    assert sorted(trades["position_id"]) == list(range(1, len(trades) + 1))
    assert equity["open_positions"].iloc[-1] == 0
    # Each row is a whole condor: ordered strikes, positive credit, a known exit reason.
    assert (trades["long_put"] < trades["short_put"]).all()
    assert (trades["short_put"] <= trades["short_call"]).all()
    assert (trades["short_call"] < trades["long_call"]).all()
    assert (trades["credit"] > 0).all() and (trades["contracts"] >= 1).all()
    assert set(trades["exit_reason"]) <= {"profit_take", "stop_loss", "dte_exit", "max_hold", "expiry",
                                          "end_of_data", "kill_switch"}
    assert (trades["exit_time"] >= trades["entry_time"]).all()


# ------------------------------------------------------------------------------------------------
# metrics recomputed from the CSV files
# ------------------------------------------------------------------------------------------------

def running_peak(values: np.ndarray, start: float) -> np.ndarray:
    peak = np.empty_like(values)
    best = start
    for i, value in enumerate(values):
        best = max(best, value)
        peak[i] = best
    return peak


def test_drawdown_and_profit_from_equity_csv(equity, trades, metrics):
    values = equity["equity"].to_numpy()
    final = float(values[-1])
    assert close(metrics["final_equity"], final)
    assert close(metrics["net_profit"], final - CASH)
    # The run ends flat, so the net profit is also the sum of the trades' P&L.
    assert metrics["net_profit"] == pytest.approx(trades["pnl"].sum(), abs=1e-6)
    assert close(metrics["total_return_pct"], (final - CASH) / CASH * 100.0)

    peak = running_peak(values, CASH)
    drawdown = values - peak
    drawdown_pct = drawdown / peak * 100.0
    assert close(metrics["max_drawdown"], float(drawdown.min()))
    assert close(metrics["max_drawdown_pct"], float(drawdown_pct.min()))
    assert metrics["max_drawdown"] < 0
    # equity.csv's own drawdown columns agree.
    np.testing.assert_allclose(equity["drawdown"], drawdown, rtol=0, atol=1e-9)
    np.testing.assert_allclose(equity["drawdown_pct"], drawdown_pct, rtol=0, atol=1e-9)
    assert close(metrics["fitness"], (final - CASH) / abs(float(drawdown.min())))

    seconds = (equity["timestamp"].iloc[-1] - equity["timestamp"].iloc[0]).total_seconds()
    years = seconds / (365.25 * 86_400)
    assert close(metrics["years"], years)
    assert close(metrics["cagr_pct"], ((final / CASH) ** (1.0 / years) - 1.0) * 100.0)


def test_sharpe_and_sortino_from_session_closes(equity, metrics):
    # The last equity of each New York session; the first return is against the starting cash.
    sessions = equity["timestamp"].dt.date
    closes = []
    for _, day in equity.groupby(sessions, sort=True):
        closes.append(float(day["equity"].iloc[-1]))
    assert len(closes) == 39                                  # sessions 2016-01-04 … 2016-02-29
    previous = [CASH] + closes[:-1]
    returns = np.array([today / before - 1.0 for today, before in zip(closes, previous)])
    mean = returns.mean()
    std = math.sqrt(((returns - mean) ** 2).sum() / (len(returns) - 1))
    downside = math.sqrt((np.minimum(returns, 0.0) ** 2).mean())
    assert close(metrics["sharpe"], mean / std * math.sqrt(252))
    assert close(metrics["sortino"], mean / downside * math.sqrt(252))


def test_trade_statistics_from_trades_csv(trades, metrics):
    pnl = trades["pnl"].to_numpy()
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    assert metrics["trade_count"] == len(trades)
    assert close(metrics["win_rate"], len(wins) / len(pnl))
    assert close(metrics["gross_profit"], float(wins.sum()))
    assert close(metrics["gross_loss"], float(losses.sum()))
    assert close(metrics["profit_factor"], float(wins.sum()) / abs(float(losses.sum())))
    assert close(metrics["avg_win"], float(wins.mean()))
    assert close(metrics["avg_loss"], float(losses.mean()))
    assert close(metrics["win_loss_ratio"], float(wins.mean()) / abs(float(losses.mean())))
    assert close(metrics["expectancy"], float(pnl.mean()))
    # Days held: calendar days between the entry and exit sessions (New York dates).
    days = np.array([(exit_.date() - entry.date()).days
                     for entry, exit_ in zip(trades["entry_time"], trades["exit_time"])])
    np.testing.assert_array_equal(trades["days_held"].to_numpy(), days)
    assert close(metrics["avg_days_held"], float(days.mean()))
    # P&L of each row = (credit − exit debit) × 100 × contracts − fees.
    by_hand = (trades["credit"] - trades["exit_debit"]) * 100 * trades["contracts"] - trades["fees"]
    np.testing.assert_allclose(pnl, by_hand, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# command-line errors
# ------------------------------------------------------------------------------------------------

CLI_ERRORS = [
    pytest.param(["--bt-start", "2016-03-01", "--bt-end", "2016-02-01"], ("backtest.start", "backtest.end"),
                 id="start-after-end"),
    pytest.param(["--bt-start", "2030-01-02", "--bt-end", "2030-02-01"], ("2030-01-02", "outside the data"),
                 id="period-after-the-data"),
    pytest.param(["--bt-cash", "0"], ("backtest.cash", "> 0"), id="cash-zero"),
    pytest.param(["--bt-cash", "-5"], ("backtest.cash", "-5"), id="cash-negative"),
    pytest.param(["--delta-low", "0.3", "--delta-high", "0.2"],
                 ("target_short_delta_low", "target_short_delta_high"), id="deltas-crossed"),
    pytest.param(["--wing-min", "10", "--wing-max", "5"], ("wing_width_min", "wing_width_max"),
                 id="wings-crossed"),
    pytest.param(["--fill-model", "0.3"], ("fill_spread_fraction", "0.3"), id="fill-below-mid"),
    pytest.param(["--fill-model", "banana"], ("--fill-model", "banana"), id="fill-unknown"),
    # The risk manager's settings: caps > 0, kill-switch levels in (0, 1), hedge threshold > 0.
    pytest.param(["--max-portfolio-delta", "0"], ("risk.max_portfolio_delta", "> 0"), id="portfolio-delta-zero"),
    pytest.param(["--max-portfolio-vega", "-5"], ("risk.max_portfolio_vega", "-5"), id="portfolio-vega-negative"),
    pytest.param(["--daily-drawdown-limit", "0"], ("risk.daily_drawdown_limit", "> 0"), id="daily-dd-zero"),
    pytest.param(["--daily-drawdown-limit", "1.0"], ("risk.daily_drawdown_limit", "< 1"), id="daily-dd-one"),
    pytest.param(["--max-drawdown-limit", "1.5"], ("risk.max_drawdown_limit", "1.5"), id="max-dd-above-one"),
    pytest.param(["--hedge-threshold", "0"], ("hedge.hedge_threshold", "> 0"), id="hedge-threshold-zero"),
    pytest.param(["--hedge-threshold", "-0.1"], ("hedge.hedge_threshold", "-0.1"), id="hedge-threshold-negative"),
    pytest.param(["--max-account-risk", "0"], ("risk.max_account_risk_per_trade", "> 0"), id="account-risk-zero"),
]


@pytest.mark.parametrize("args, named", CLI_ERRORS)
def test_bad_values_give_one_clear_error(args, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, errors, text = run_failing(args, tmp_path, capsys)
    assert status == 2
    assert len(errors) == 1, text
    for word in named:
        assert word in errors[0], errors[0]
    assert "Traceback" not in text


def test_period_before_the_data_names_the_start(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, errors, text = run_failing(["--bt-start", "1990-01-01", "--bt-end", "1990-02-01"], tmp_path, capsys)
    assert status == 2 and len(errors) == 1 and "Traceback" not in text
    assert "start" in errors[0] and "end:" not in errors[0], errors[0]


def test_out_under_a_regular_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "run"
    status, errors, text = run_failing(RUN_ARGS[2:6], tmp_path, capsys, out=out)
    assert status == 2 and len(errors) == 1 and "Traceback" not in text
    assert str(out) in errors[0] and "not writable" in errors[0]
    assert blocker.read_text() == "not a folder\n"


def test_existing_non_empty_out_is_refused_and_left_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "earlier_run"
    existing.mkdir()
    (existing / "keep.txt").write_text("earlier results\n")
    status, errors, text = run_failing(RUN_ARGS[2:6], tmp_path, capsys, out=existing)
    assert status == 2 and len(errors) == 1 and "Traceback" not in text
    assert str(existing) in errors[0] and "not empty" in errors[0]
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "earlier results\n"


def test_a_badly_typed_value_exits_2_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["--mode", "backtest", "--bt-cash", "lots", "--out", str(tmp_path / "run")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert "--bt-cash" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_flag_exits_2_from_the_shell(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "core" / "main.py"), "--mode", "backtest", "--no-such-flag",
         "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--no-such-flag" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


def test_run_full_backtest_script_is_the_cli(tmp_path):
    # The wrapper passes its flags to core/main.py: a bad value gives the CLI's message and exit 2.
    result = subprocess.run([sys.executable, "scripts/run_full_backtest.py", "--bt-cash", "0",
                             "--out", str(tmp_path / "run")], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "backtest.cash = 0.0 is out of range" in result.stderr
    assert not (tmp_path / "run").exists()


def test_underlying_without_embedded_chains_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--underlying", "QQQ", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "option chains for SPY only" in err
    assert not (tmp_path / "run").exists()


def test_a_malformed_flag_value_is_one_line_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--bt-cash", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--bt-cash" in err and "usage:" not in err
