"""The intelligence layer from the command line (core/main.py, core/ablation.py): the new flags and
their errors (exit 2, one line naming what is wrong, nothing left behind), ``--compare`` (the five
scenarios side by side, each scenario's trades, the report's Ablation section), the entry context in
trades.csv and the report's Intelligence panel, and the seed's scenario rows, each of which must
give the same trades as its ablation scenario on the same data.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core.backtest_engine import ENTRY_CONTEXT_COLUMNS
from core.config import Config
from core.main import _build_parser, _load_config, _overrides, main
from intelligence.features import MEMBERSHIP_COLUMNS

PERIOD = ["--bt-start", "2016-01-04", "--bt-end", "2016-02-26"]
SCENARIO_SLUGS = {"Mechanical": "mechanical", "Baseline": "baseline", "MTF only": "mtf_only",
                  "Fuzzy only": "fuzzy_only", "Full": "full"}


def run_cli(args: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


def read_trades(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


# ------------------------------------------------------------------------------------------------
# flags and their errors
# ------------------------------------------------------------------------------------------------

def run_failing(args, tmp_path, capsys):
    """Run the CLI in-process in ``tmp_path``; return (status, the 'error:' lines, all output)."""
    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    status = main(["--mode", "backtest", "--engine", "fast", "--no-plot", *PERIOD, *args, "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    errors = [line for line in text.splitlines() if "error:" in line]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was left behind"
    return status, errors, text


def write_yaml(folder: Path, data: dict) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("first, second", [("--use-mtf", "--no-mtf-filter"), ("--use-fuzzy", "--no-fuzzy")])
def test_contradicting_switches_exit_2_naming_both(first, second, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, errors, text = run_failing([first, second], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert first in errors[0] and second in errors[0]
    assert "Traceback" not in text


def test_timeframes_finer_than_the_configured_base_bar_exit_2(tmp_path, tmp_path_factory, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = write_yaml(tmp_path_factory.mktemp("cfg"),
                             {"mtf": {"base_bar_minutes": 5, "timeframes": [5, 15]}})
    assert Config.from_yaml(config_file).mtf.base_bar_minutes == 5          # the file alone is fine
    status, errors, text = run_failing(["--config", str(config_file), "--mtf-timeframes", "1,5,15"], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "mtf.timeframes" in errors[0] and "base bar" in errors[0] and "base_bar_minutes = 5" in errors[0]


@pytest.mark.parametrize("args, named", [
    pytest.param(["--mtf-timeframes", "15,5"], ("mtf.timeframes", "strictly increasing"), id="timeframes-descending"),
    pytest.param(["--mtf-timeframes", "5,5"], ("mtf.timeframes", "strictly increasing"), id="timeframes-repeated"),
    pytest.param(["--mtf-timeframes", "0,5"], ("mtf.timeframes", ">= 1"), id="timeframe-zero"),
    pytest.param(["--mtf-consensus-min", "0.7", "--mtf-consensus-max", "0.6"],
                 ("mtf.consensus_min", "mtf.consensus_max"), id="band-crossed"),
    pytest.param(["--mtf-consensus-max", "1.5"], ("mtf.consensus_max", "1.5"), id="band-above-one"),
    pytest.param(["--position-size-pct", "0"], ("sizing.position_size_pct", "> 0"), id="size-zero"),
    pytest.param(["--ivr-min", "120"], ("filters.iv_rank_min", "120"), id="ivr-above-100"),
    pytest.param(["--vix-max", "-1"], ("filters.vix_threshold", "-1"), id="vix-negative"),
])
def test_bad_intelligence_flags_exit_2_with_one_line(args, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, errors, text = run_failing(args, tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    for word in named:
        assert word in errors[0], errors[0]
    assert "Traceback" not in text


@pytest.mark.parametrize("data, named", [
    pytest.param({"fuzzy": {f"fuzzy_weight_{factor}": 0.0 for factor in
                            ("mtf", "iv", "regime", "rsi", "adx", "bbands", "stoch", "psar", "volume", "sma")}},
                 ("fuzzy_weight_mtf", "all 0"), id="fuzzy-weights-all-zero"),
    pytest.param({"mtf": {"timeframe_weights": [0, 0, 0]}}, ("mtf.timeframe_weights", "sums to 0"),
                 id="mtf-weights-zero-sum"),
    pytest.param({"mtf": {"timeframe_weights": [1, 1]}}, ("mtf.timeframe_weights", "3 timeframes"),
                 id="mtf-weights-too-few"),
    pytest.param({"mtf": {"timeframe_weights": [1, -1, 1]}}, ("mtf.timeframe_weights", ">= 0"),
                 id="mtf-weight-negative"),
    pytest.param({"fuzzy": {"min_confidence": 1.5}}, ("fuzzy.min_confidence", "1.5"), id="min-confidence"),
    pytest.param({"regime": {"crash_vix": 18}}, ("filters.vix_threshold_low", "regime.crash_vix"),
                 id="regime-order"),
])
def test_bad_weights_in_a_config_file_exit_2(data, named, tmp_path, tmp_path_factory, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = write_yaml(tmp_path_factory.mktemp("cfg"), data)
    status, errors, text = run_failing(["--config", str(config_file)], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert str(config_file) in errors[0]
    for word in named:
        assert word in errors[0], errors[0]
    assert "Traceback" not in text


def test_the_new_flags_set_their_settings():
    args = _build_parser(Config()).parse_args([
        "--use-mtf", "--use-fuzzy", "--dynamic-sizing", "--no-liquidity-gate", "--mtf-timeframes", "5,15,60",
        "--mtf-consensus-min", "0.45", "--mtf-consensus-max", "0.55", "--ivr-min", "20", "--vix-max", "30",
        "--position-size-pct", "0.2"])
    config = _load_config(None, _overrides(args))
    assert (config.mtf.use_mtf, config.fuzzy.use_fuzzy, config.sizing.dynamic_sizing) == (True, True, True)
    assert config.filters.use_liquidity_gate is False and config.filters.use_entry_gates is True
    assert config.mtf.timeframes == (5, 15, 60)
    assert (config.mtf.consensus_min, config.mtf.consensus_max) == (0.45, 0.55)
    assert (config.filters.iv_rank_min, config.filters.vix_threshold) == (20.0, 30.0)
    assert config.sizing.position_size_pct == 0.2
    off = _load_config(None, _overrides(_build_parser(Config()).parse_args(
        ["--no-mtf-filter", "--no-fuzzy", "--no-gates"])))
    assert (off.mtf.use_mtf, off.fuzzy.use_fuzzy, off.filters.use_entry_gates) == (False, False, False)
    # Switches not given leave a config file's values alone.
    assert _overrides(_build_parser(Config()).parse_args([])) == {}


# ------------------------------------------------------------------------------------------------
# --compare and the run folder
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    assert run_cli(["--mode", "backtest", *PERIOD, "--no-plot", "--compare", "--out", str(out)]) == 0
    return out


def test_compare_writes_the_five_scenarios(compare_run):
    table = pd.read_csv(compare_run / "comparison.csv", keep_default_na=False, na_values=[""])
    assert list(table["scenario"]) == list(SCENARIO_SLUGS)
    for row in table.itertuples():
        folder = compare_run / "scenarios" / SCENARIO_SLUGS[row.scenario]
        assert (folder / "metrics.json").is_file()
        trades = read_trades(folder / "trades.csv")
        assert row.trades == len(trades), row.scenario
    assert sorted(p.name for p in (compare_run / "scenarios").iterdir()) == sorted(SCENARIO_SLUGS.values())
    counts = dict(zip(table["scenario"], table["trades"]))
    assert counts["Mechanical"] > 0 and counts["Baseline"] > 0 and counts["MTF only"] > 0
    # Fuzzy sizing at the default 5 % of equity pays for less than one condor: the table says so.
    fuzzy = table.set_index("scenario").loc["Fuzzy only"]
    if fuzzy["trades"] == 0:
        assert "--position-size-pct" in fuzzy["what"]
    assert (compare_run / "comparison_equity.csv").is_file()
    assert not (compare_run / "comparison.png").exists()                 # --no-plot
    report = (compare_run / "report.html").read_text()
    assert "Ablation" in report
    for name in SCENARIO_SLUGS:
        assert name in report


def test_the_ablation_scenarios_differ_by_their_switches(compare_run):
    scenarios = {slug: read_trades(compare_run / "scenarios" / slug / "trades.csv") for slug in SCENARIO_SLUGS.values()}
    mtf_only = scenarios["mtf_only"]
    assert mtf_only["mtf_consensus"].between(0.40, 0.60).all()
    assert not scenarios["baseline"]["mtf_consensus"].between(0.40, 0.60).all()
    mechanical = scenarios["mechanical"]
    assert (mechanical["wing_adjustments"].isna() | (mechanical["wing_adjustments"] == "")).all()
    assert mechanical["vrp"].isna().all() and scenarios["baseline"]["vrp"].notna().all()
    for slug in ("mechanical", "baseline", "mtf_only"):
        assert (scenarios[slug]["contracts"] == 1).all(), slug        # fixed quantity


def test_a_runs_trades_carry_the_entry_context_and_the_report_explains_them(compare_run):
    trades = read_trades(compare_run / "trades.csv")
    assert len(trades) > 0
    for column in ("regime", "confidence", "fuzzy_ft", *MEMBERSHIP_COLUMNS.values(), "mu_neural"):
        assert column in trades.columns, column
        assert trades[column].notna().all(), column
    assert list(trades.columns[-len(ENTRY_CONTEXT_COLUMNS):]) == list(ENTRY_CONTEXT_COLUMNS)
    assert set(trades["regime"]) <= {"BULL_TREND", "BEAR_TREND", "HIGH_VOL_RANGE", "LOW_VOL_RANGE", "CRASH_MODE",
                                     "UNKNOWN"}
    assert trades["confidence"].between(0.0, 1.0).all()
    report = (compare_run / "report.html").read_text()
    assert "Intelligence" in report and "By regime at entry" in report
    # The user's configuration is the Baseline scenario: the main run (Backtrader driver) and the
    # ablation's Baseline (fast driver) made the same trades.
    pd.testing.assert_frame_equal(trades, read_trades(compare_run / "scenarios" / "baseline" / "trades.csv"))


# The seed's scenario rows (and --no-gates), with the ablation scenario each one is.
SEED_ROWS = [
    pytest.param(["--no-mtf-filter", "--no-fuzzy"], "baseline",
                 {"mtf.use_mtf": False, "fuzzy.use_fuzzy": False, "sizing.dynamic_sizing": False}, id="baseline"),
    pytest.param(["--use-mtf", "--no-fuzzy"], "mtf_only",
                 {"mtf.use_mtf": True, "fuzzy.use_fuzzy": False, "sizing.dynamic_sizing": False}, id="mtf-only"),
    pytest.param(["--use-fuzzy", "--dynamic-sizing", "--no-mtf-filter"], "fuzzy_only",
                 {"mtf.use_mtf": False, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True}, id="fuzzy-only"),
    pytest.param(["--use-mtf", "--use-fuzzy", "--dynamic-sizing", "--bt-samples", "0"], "full",
                 {"mtf.use_mtf": True, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True, "backtest.samples": 0},
                 id="full"),
    pytest.param(["--no-gates"], "mechanical", {"filters.use_entry_gates": False}, id="no-gates"),
]


@pytest.mark.parametrize("flags, scenario, settings", SEED_ROWS)
def test_seed_scenario_rows_run_and_match_their_ablation_scenario(flags, scenario, settings, compare_run,
                                                                  tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--mode", "backtest", *PERIOD, "--engine", "fast", "--no-plot", *flags, "--out", str(out)]) == 0
    resolved = Config.from_yaml(out / "config.yaml")
    for key, value in settings.items():
        assert resolved.get(key) == value, key
    trades = read_trades(out / "trades.csv")
    assert {"regime", "confidence"} <= set(trades.columns)
    assert "Intelligence" in (out / "report.html").read_text()
    pd.testing.assert_frame_equal(trades, read_trades(compare_run / "scenarios" / scenario / "trades.csv"))
