"""The command line's data mode and the config → market-data wiring."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from analytics.vol_surface import SpreadParams, SurfaceParams
from core.config import Config
from core.main import USAGE_ERROR, main
from core.market_data import embedded_chain_provider, garch_config, spread_params, surface_params
from data_factory.garch_proxy import GarchProxyConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_config_defaults_are_the_synthetic_models_defaults():
    # One set of defaults: the config's synthetic section must build exactly the models' defaults.
    config = Config()
    assert surface_params(config) == SurfaceParams()
    built = spread_params(config)
    assert {f.name: getattr(built, f.name) for f in fields(built)} == \
        {f.name: getattr(SpreadParams(), f.name) for f in fields(SpreadParams)}
    assert garch_config(config) == GarchProxyConfig()


def test_config_changes_reach_the_chain():
    day = "2016-03-15"
    base = embedded_chain_provider(Config(), start=day, end=day)
    steeper = embedded_chain_provider(Config().override({"synthetic.surface_rho": -0.9,
                                                         "synthetic.surface_eta": 1.0}),
                                      start=day, end=day)
    stamp = base.bar_times[20]
    a, b = base.slice(stamp, dte_min=30, dte_max=45), steeper.slice(stamp, dte_min=30, dte_max=45)
    assert np.array_equal(a.strike, b.strike)
    otm_puts = (~a.is_call) & (a.strike < 0.9 * a.spot)
    # A more negative rho lifts far-OTM put vols.
    assert np.all(b.iv[otm_puts] > a.iv[otm_puts])


def test_data_mode_prints_sources_and_chain(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells at the default 80 columns
    assert main(["--mode", "data", "--date", "2018-02-05", "--time", "15:30", "--strikes", "3"]) == 0
    out = capsys.readouterr().out
    for words in ("SYNTHETIC", "garch_proxy", "holiday rows dropped", "2018-02-05 15:30", "DTE"):
        assert words in out
    # 7 strikes around the money, each a row with a put and a call.
    assert out.count("│") > 7 * 8


@pytest.mark.parametrize("argv, words", [
    (["--date", "2018-12-05"], "2018-12-05 is not an NYSE session"),
    (["--date", "2030-01-02"], "outside the data"),
    (["--date", "2016-03-15", "--time", "10:02"], "not a bar"),
    (["--date", "yesterday-ish"], "--date: cannot read"),
    (["--seed", "-4"], "backtest.seed = -4"),
    (["--date", "2016-03-15", "--dte-min", "50", "--dte-max", "40"], "strategy.dte_min = 50"),
])
def test_data_mode_bad_input_is_one_message_and_exit_2(argv, words, capsys):
    assert main(["--mode", "data", *argv]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert words in err
    assert err.count("error:") == 1
    assert "Traceback" not in err


def test_bad_config_file_names_file_and_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("strategy:\n  dte_min: -3\n")
    assert main(["--mode", "data", "--config", str(path)]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "strategy.dte_min = -3" in err


def test_unknown_flag_exits_2_from_a_real_process():
    result = subprocess.run([sys.executable, "core/main.py", "--no-such-flag"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
