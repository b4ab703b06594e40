"""The seed's scenario commands on the whole default period (slow: five years, the DeepMamba
forecasts included; run with `bash scripts/test.sh -m slow`).

Each of Production Backtest (--use-mtf --use-fuzzy --dynamic-sizing), MTF only (--use-mtf
--no-fuzzy), Fuzzy only (--use-fuzzy --dynamic-sizing --no-mtf-filter) and Baseline
(--no-mtf-filter --no-fuzzy) makes trades in every calendar half-year of 2014–2018 with the
default settings: the configurations are built from the seed's flags through the CLI's own
parser, and run with run_backtest as the CLI does (fast driver: the same trades as Backtrader).
"""
from __future__ import annotations

import pytest

from core.ablation import ScenarioRun, trades_by_half_year
from core.backtest_engine import run_backtest
from core.config import Config
from core.main import _build_parser, _load_config, _overrides
from core.market_data import load_market

pytestmark = pytest.mark.slow

SEED_COMMANDS = {
    "Production Backtest": ["--use-mtf", "--use-fuzzy", "--dynamic-sizing", "--bt-samples", "0"],
    "MTF only": ["--use-mtf", "--no-fuzzy"],
    "Fuzzy only": ["--use-fuzzy", "--dynamic-sizing", "--no-mtf-filter"],
    "Baseline": ["--no-mtf-filter", "--no-fuzzy"],
}
HALF_YEARS = [f"{year}H{half}" for year in range(2014, 2019) for half in (1, 2)]


def seed_config(flags: list[str]) -> Config:
    args = _build_parser(Config()).parse_args(["--mode", "backtest", *flags, "--engine", "fast"])
    return _load_config(args.config, _overrides(args))


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_each_seed_scenario_trades_in_every_half_year(name):
    config = seed_config(SEED_COMMANDS[name])
    assert (config.backtest.start.isoformat(), config.backtest.end.isoformat()) == ("2014-01-03", "2018-12-31")
    result = run_backtest(config, load_market(config))
    table = trades_by_half_year([ScenarioRun(name, config, result.trades, result.equity, result.metrics)],
                                config.backtest.start, config.backtest.end)
    assert list(table.index) == HALF_YEARS
    counts = table[name].to_dict()
    assert all(count > 0 for count in counts.values()), (name, counts)
    assert sum(counts.values()) == len(result.trades)
    assert "sizing_note" not in result.metrics
