"""Stage 3 on the command line (``core.main.main`` in-process): the risk and hedge flags, a bad
risk value in a config file (bad flag values are in tests/test_cli_backtest.py), the seed flags of
capabilities not built yet, and short real runs whose risk_events.csv, hedges.csv, equity.csv Greeks and
metrics.json risk/hedge sections are checked against each other.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest

from core.config import Config
from cli_helpers import run_failing
from core.main import _build_parser, _load_config, _overrides, main

NY = "America/New_York"
PERIOD = ["--bt-start", "2016-01-04", "--bt-end", "2016-02-12"]
HEDGE_THRESHOLD = 0.05
SHARE_COST = 0.02
RUNS = {
    # The brief's hedge run, with a share cost other than the default.
    "hedge": [*PERIOD, "--enable-hedge", "--hedge-threshold", str(HEDGE_THRESHOLD),
              "--hedge-share-cost", str(SHARE_COST)],
    # The same with a tight kill switch that flattens (condors and hedge shares).
    "kill_switch": [*PERIOD, "--enable-hedge", "--hedge-threshold", str(HEDGE_THRESHOLD),
                    "--hedge-share-cost", str(SHARE_COST), "--daily-drawdown-limit", "0.002",
                    "--kill-switch-flatten"],
}
HEDGE_COLUMNS = ["timestamp", "shares", "price", "cost", "cash_flow", "reason", "delta_before", "delta_after",
                 "shares_held"]
RISK_EVENT_COLUMNS = ["timestamp", "event", "reason", "attempts", "last_timestamp", "detail", "equity",
                      "reference_equity"]
GREEK_COLUMNS = ["hedge_shares", "net_delta", "net_gamma", "net_vega", "net_theta"]


def normalized(text: str) -> str:
    """Terminal text with rich's line wrapping undone."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------
# bad values
# ------------------------------------------------------------------------------------------------

def test_bad_risk_value_in_a_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "risk.yaml"
    config_file.write_text("risk:\n  max_portfolio_gamma: 0\n")
    status, errors, text = run_failing(["--config", str(config_file)], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "risk.max_portfolio_gamma" in errors[0] and "risk.yaml" in errors[0], errors[0]
    assert "Traceback" not in text


def test_options_data_that_does_not_exist_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, errors, text = run_failing(["--options-data", "x.csv"], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "--options-data x.csv: no such file, folder or chain store" in errors[0]
    assert "unrecognized" not in text and "Traceback" not in text


# ------------------------------------------------------------------------------------------------
# flags set their settings
# ------------------------------------------------------------------------------------------------

def test_risk_and_hedge_flags_set_their_settings():
    default = Config()
    args = _build_parser(default).parse_args([
        "--enable-hedge", "--hedge-threshold", "0.2", "--kill-switch-flatten", "--no-risk-limits",
        "--max-account-risk", "0.05", "--max-portfolio-delta", "150", "--daily-drawdown-limit", "0.03",
        "--max-drawdown-limit", "0.1", "--hedge-share-cost", "0.02", "--max-portfolio-gamma", "40",
        "--max-portfolio-vega", "300", "--max-portfolio-theta", "120"])
    config = _load_config(None, _overrides(args))
    hedge, risk = config.hedge, config.risk
    assert (hedge.enable_hedge, hedge.hedge_threshold, hedge.share_cost) == (True, 0.2, 0.02)
    assert risk.kill_switch_flatten is True and risk.use_risk_limits is False
    assert risk.max_account_risk_per_trade == 0.05
    assert (risk.max_portfolio_delta, risk.max_portfolio_gamma, risk.max_portfolio_vega,
            risk.max_portfolio_theta) == (150.0, 40.0, 300.0, 120.0)
    assert (risk.daily_drawdown_limit, risk.max_drawdown_limit) == (0.03, 0.1)
    # The defaults differ from every value given, so each flag changed something.
    assert (default.hedge.enable_hedge, default.risk.kill_switch_flatten, default.risk.use_risk_limits) == (
        False, False, True)
    assert default.hedge.hedge_threshold != 0.2 and default.hedge.share_cost != 0.02
    assert default.risk.max_account_risk_per_trade != 0.05 and default.risk.max_portfolio_delta != 150.0
    assert default.risk.daily_drawdown_limit != 0.03 and default.risk.max_drawdown_limit is None
    # Nothing else moved.
    assert config.strategy == default.strategy and config.sizing == default.sizing
    assert risk.max_trade_delta == default.risk.max_trade_delta
    # Not given: the config's values stay.
    plain = _load_config(None, _overrides(_build_parser(default).parse_args([])))
    assert plain.hedge == default.hedge and plain.risk == default.risk


# ------------------------------------------------------------------------------------------------
# short real runs
# ------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, out, terminal):
        self.out = out
        self.terminal = terminal
        self.metrics = json.loads((out / "metrics.json").read_text())
        self.equity = pd.read_csv(out / "equity.csv")
        self.trades = pd.read_csv(out / "trades.csv", keep_default_na=False, na_values=[""])
        self.hedges = pd.read_csv(out / "hedges.csv")
        self.events = pd.read_csv(out / "risk_events.csv", keep_default_na=False, na_values=[""])
        for frame, columns in ((self.equity, ["timestamp"]), (self.trades, ["entry_time", "exit_time"]),
                               (self.hedges, ["timestamp"]), (self.events, ["timestamp", "last_timestamp"])):
            for column in columns:
                frame[column] = pd.to_datetime(frame[column], utc=True).dt.tz_convert(NY)
        self.bar = {stamp: i for i, stamp in enumerate(self.equity["timestamp"])}


def run_cli(out, args) -> Run:
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        status = main(["--mode", "backtest", "--engine", "fast", "--no-plot", *args, "--out", str(out)])
    assert status == 0, terminal.getvalue()
    return Run(out, terminal.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run of RUNS made once per module, on first use."""
    made: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in made:
            made[name] = run_cli(tmp_path_factory.mktemp(name) / "run", RUNS[name])
        return made[name]

    return get


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    return runs(request.param)


@pytest.fixture
def kill_run(runs):
    return runs("kill_switch")


def test_risk_files_next_to_trades(run):
    for name in ("trades.csv", "equity.csv", "metrics.json", "risk_events.csv", "hedges.csv"):
        assert (run.out / name).is_file(), name
    assert list(run.hedges.columns) == HEDGE_COLUMNS
    assert list(run.events.columns) == RISK_EVENT_COLUMNS
    for column in GREEK_COLUMNS:
        assert column in run.equity.columns, column
    assert run.equity[GREEK_COLUMNS].notna().all().all()
    # The runs traded and hedged, so the checks below have rows to check.
    assert len(run.trades) >= 2 and len(run.hedges) >= 5
    assert "risk_events.csv" in run.terminal and "hedges.csv" in run.terminal
    config = Config.from_yaml(run.out / "config.yaml")
    assert config.hedge.enable_hedge and config.hedge.hedge_threshold == HEDGE_THRESHOLD
    assert config.hedge.share_cost == SHARE_COST


def test_hedge_metrics_match_hedges_csv(run):
    hedge, hedges = run.metrics["hedge"], run.hedges
    assert hedge["trades"] == len(hedges)
    assert hedge["shares_traded"] == int(hedges["shares"].abs().sum())
    assert hedge["costs"] == pytest.approx(hedges["cost"].sum(), abs=1e-9)
    assert hedge["pnl"] == pytest.approx(hedges["cash_flow"].sum(), abs=1e-6)
    # Each fill: cost is the share cost rounded up to the cent, cash flow is the trade less it.
    expected_cost = np.ceil(hedges["shares"].abs() * SHARE_COST * 100.0 - 1e-6) / 100.0
    np.testing.assert_allclose(hedges["cost"], expected_cost, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hedges["cash_flow"], -hedges["shares"] * hedges["price"] - hedges["cost"],
                               rtol=0, atol=1e-6)
    assert (hedges["shares"] != 0).all() and (hedges["price"] > 0).all()
    np.testing.assert_array_equal(hedges["shares_held"], hedges["shares"].cumsum())
    np.testing.assert_allclose(hedges["delta_after"], hedges["delta_before"] + hedges["shares"], rtol=0, atol=1e-9)
    # The run ends without shares.
    assert hedges["shares_held"].iloc[-1] == 0 and run.equity["hedge_shares"].iloc[-1] == 0


def test_shares_held_in_equity_csv_follow_the_fills(run):
    equity, hedges = run.equity, run.hedges
    held = np.zeros(len(equity), dtype=np.int64)
    last_at_bar = hedges.groupby("timestamp")["shares_held"].last()
    for stamp, shares in last_at_bar.items():
        held[run.bar[stamp]:] = shares
    np.testing.assert_array_equal(equity["hedge_shares"].to_numpy(), held)


def test_same_bar_hedges_are_delta_neutral(run):
    """Same-bar fills hedge with the bar's own quotes: after a 'hedge' fill the bar's recorded net
    delta is the fill's delta_after, within half a share of neutral."""
    equity = run.equity
    hedged = run.hedges[run.hedges["reason"] == "hedge"]
    assert len(hedged) >= 5
    for _, fill in hedged.iterrows():
        row = equity.iloc[run.bar[fill["timestamp"]]]
        assert abs(row["net_delta"]) <= 0.5, (fill["timestamp"], row["net_delta"])
        assert row["net_delta"] == pytest.approx(fill["delta_after"], abs=1e-6), fill["timestamp"]
        # It traded because the delta was beyond the threshold (one contract per condor here).
        assert abs(fill["delta_before"]) > HEDGE_THRESHOLD * 100 * row["open_positions"]
        assert row["open_positions"] >= 1
    unwinds = run.hedges[run.hedges["reason"] != "hedge"]
    for _, fill in unwinds.iterrows():
        assert fill["shares_held"] == 0
        assert equity.iloc[run.bar[fill["timestamp"]]]["open_positions"] == 0


def test_no_bar_is_left_beyond_the_hedge_threshold(run):
    """Every recorded bar without a hedge fill is inside the threshold (or flat with no shares):
    the hedge acted wherever it had to, on stepped and skipped bars alike."""
    assert (run.trades["contracts"] == 1).all()
    equity = run.equity
    fill_bars = {run.bar[stamp] for stamp in run.hedges["timestamp"]}
    quiet = np.ones(len(equity), dtype=bool)
    quiet[list(fill_bars)] = False
    quiet[-1] = False                                   # the end-of-data close
    open_count = equity["open_positions"].to_numpy()
    delta = equity["net_delta"].to_numpy()
    bound = HEDGE_THRESHOLD * 100 * open_count
    with_condors = quiet & (open_count > 0)
    assert with_condors.sum() > 100
    worst = np.abs(delta[with_condors]) - bound[with_condors]
    assert worst.max() <= 1e-6, equity.loc[with_condors].iloc[int(worst.argmax())]
    assert (equity["hedge_shares"].to_numpy()[quiet & (open_count == 0)] == 0).all()


def test_risk_metrics_match_risk_events_csv(run):
    risk, events, trades = run.metrics["risk"], run.events, run.trades
    kinds = events["event"].value_counts()
    assert risk["kill_switch_halts"] == kinds.get("kill_switch_halt", 0)
    assert risk["max_drawdown_halts"] == kinds.get("max_drawdown_halt", 0)
    assert risk["flattens"] == kinds.get("flatten", 0)
    assert risk["positions_closed_by_kill_switch"] == int(trades["exit_reason"].isin(
        ["kill_switch", "max_drawdown"]).sum())
    rejections = events[events["event"] == "risk_rejection"].groupby("reason")["attempts"].sum()
    assert risk["risk_rejections"] == {reason: int(count) for reason, count in rejections.items()}
    assert run.metrics["entry_rejections"].get("risk_budget", 0) == risk["risk_rejections"].get("risk_budget", 0)
    for greek in ("delta", "gamma", "vega", "theta"):
        assert risk[f"max_abs_net_{greek}"] == pytest.approx(run.equity[f"net_{greek}"].abs().max(), abs=1e-9)
    # Events are in time order; every rejection row spans attempts within one session.
    assert events["timestamp"].is_monotonic_increasing
    rows = events[events["event"] == "risk_rejection"]
    assert (rows["attempts"] >= 1).all()
    assert (rows["last_timestamp"].dt.date == rows["timestamp"].dt.date).all()


def test_kill_switch_run_halts_flattens_and_blocks_the_session(kill_run):
    run = kill_run
    equity, events, trades = run.equity, run.events, run.trades
    halts = events[events["event"] == "kill_switch_halt"]
    assert len(halts) >= 1 and run.metrics["risk"]["flattens"] >= 1
    assert run.metrics["risk"]["positions_closed_by_kill_switch"] >= 1
    sessions = equity["timestamp"].dt.date
    fill_times = set(trades["entry_time"]) | set(trades["exit_time"]) | set(run.hedges["timestamp"])
    no_fill = ~equity["timestamp"].isin(fill_times)
    for _, halt in halts.iterrows():
        stamp, day = halt["timestamp"], halt["timestamp"].date()
        # The reference is the recorded equity at the previous session's last bar.
        previous = equity[sessions < day]
        reference = previous["equity"].iloc[-1] if len(previous) else 25_000.0
        assert halt["reference_equity"] == pytest.approx(reference, rel=1e-12)
        assert (halt["reference_equity"] - halt["equity"]) / halt["reference_equity"] > 0.002
        # It fired at the first bar beyond the limit: the session's earlier bars without a fill
        # (their recorded equity is the equity the kill switch saw) were inside it.
        before = equity[(sessions == day) & (equity["timestamp"] < stamp) & no_fill]
        assert ((reference - before["equity"]) <= 0.002 * reference + 1e-9).all()
        # No entry later in the halted session.
        same_session = trades[trades["entry_time"].dt.date == day]
        assert (same_session["entry_time"] <= stamp).all()
        # Flatten: nothing is left open after the halt bar, no condor and no share.
        row = equity.iloc[run.bar[stamp]]
        assert row["open_positions"] == 0 and row["hedge_shares"] == 0
    flattens = events[events["event"] == "flatten"]
    assert set(flattens["timestamp"]) <= set(halts["timestamp"])
    # The condors closed by the kill switch closed at a flatten bar.
    closed = trades[trades["exit_reason"] == "kill_switch"]
    assert len(closed) >= 1 and set(closed["exit_time"]) <= set(flattens["timestamp"])
    assert set(run.hedges.loc[run.hedges["timestamp"].isin(halts["timestamp"]), "reason"]) <= {"hedge_unwind"}


@pytest.mark.parametrize("settings, events", [
    ({"risk.daily_drawdown_limit": 0.003, "risk.kill_switch_flatten": True},
     {"kill_switch_halt", "flatten"}),
    ({"risk.daily_drawdown_limit": 0.005, "risk.max_drawdown_limit": 0.02},
     {"kill_switch_halt", "max_drawdown_halt"}),
    ({"risk.daily_drawdown_limit": 0.003, "risk.kill_switch_flatten": True, "backtest.fill_on_next_bar": True},
     {"kill_switch_halt", "flatten"}),
], ids=["flatten", "max-drawdown", "next-bar-fills"])
def test_fast_and_backtrader_drivers_agree_with_hedge_and_kill_switch(settings, events):
    """The fast driver skips bars using first_drawdown_breach and first_hedge_trigger; the per-bar
    Backtrader driver checks every bar. Same trades, equity, hedges and risk events."""
    from core.backtest_engine import run_backtest
    from core.market_data import load_market

    config = Config().override({
        "backtest.start": "2015-08-03", "backtest.end": "2015-09-30", "backtest.plot": False,
        "filters.use_entry_gates": False, "risk.max_account_risk_per_trade": 0.05,
        "hedge.enable_hedge": True, "hedge.hedge_threshold": HEDGE_THRESHOLD, **settings})
    market = load_market(config)
    fast = run_backtest(config.override({"backtest.engine": "fast"}), market)
    per_bar = run_backtest(config.override({"backtest.engine": "backtrader"}), market)
    assert len(fast.trades) >= 10 and len(fast.hedges) >= 20
    assert events <= set(fast.risk_events["event"]), fast.risk_events["event"].tolist()
    for name in ("trades", "equity", "hedges", "risk_events"):
        pd.testing.assert_frame_equal(getattr(fast, name), getattr(per_bar, name), obj=name)
    assert fast.rejections == per_bar.rejections
    assert fast.metrics == per_bar.metrics


# ------------------------------------------------------------------------------------------------
# sizing refuses every candidate
# ------------------------------------------------------------------------------------------------

SIZED_OUT = ["--bt-start", "2016-01-04", "--bt-end", "2016-01-15", "--max-account-risk", "0.001"]


@pytest.fixture(scope="module")
def sized_out(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("sized_out") / "run", SIZED_OUT)


def test_sizing_note_when_every_candidate_is_sized_out(sized_out):
    run = sized_out
    note = run.metrics.get("sizing_note")
    assert note and "risk_budget" in note and "--max-account-risk" in note, note
    assert "\n" not in note
    assert run.metrics["trade_count"] == 0 and len(run.trades) == 0
    # The note's counts are the rejection counts.
    count = run.metrics["risk"]["risk_rejections"]["risk_budget"]
    assert count >= 1 and f"{count:,} by risk_budget" in note
    assert run.events["attempts"].sum() == count and set(run.events["reason"]) == {"risk_budget"}
    # The terminal shows it (rich wraps long lines).
    assert normalized(note) in normalized(run.terminal)
    assert math.isclose(run.metrics["final_equity"], 25_000.0)


def test_sizing_note_is_printed_once(sized_out):
    note = sized_out.metrics["sizing_note"]
    assert normalized(sized_out.terminal).count(normalized(note)) == 1
