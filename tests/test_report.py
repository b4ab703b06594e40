"""The run folder (core/report.py): every file parses back to what was given, the folder appears
complete or not at all, bad output folders fail up front with the path named, and the terminal
summary shows the metrics and exit reasons."""
from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import math
import os
import re
import struct

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console

import core.report as report
from core.config import Config
from core.report import (ReportError, check_output_dir, default_run_dir, envelope, summary_table,
                         write_run)

NY = "America/New_York"


# ---------------------------------------------------------------------------------------------
# a small hand-made run
# ---------------------------------------------------------------------------------------------

def _trades() -> pd.DataFrame:
    # Three condors, one across the March 2016 DST change (offsets -05:00 and -04:00 both occur).
    # Columns deliberately out of order, with one non-standard column ("vix_at_entry") first.
    return pd.DataFrame({
        "vix_at_entry": [18.25, 16.5, 14.75],
        "assigned_legs": ["", "", "short_put"],
        "entry_time": pd.to_datetime(["2016-03-01 10:05", "2016-03-10 14:30", "2016-04-04 09:35"]).tz_localize(NY),
        "exit_time": pd.to_datetime(["2016-03-08 15:55", "2016-03-15 11:00", "2016-05-20 16:00"]).tz_localize(NY),
        "expiration": [dt.date(2016, 4, 15), dt.date(2016, 4, 22), dt.date(2016, 5, 20)],
        "long_put": [180.0, 182.0, 185.5],
        "short_put": [185.0, 187.0, 190.5],
        "short_call": [205.0, 206.0, 210.0],
        "long_call": [210.0, 211.0, 215.0],
        "contracts": np.array([1, 2, 3], dtype=np.int64),
        "credit": [1.0725, 0.9512, 1.2133],
        "exit_debit": [0.6435, 1.9024, 5.0],
        "fees": [5.2, 10.4, 7.8],
        "pnl": [37.70, -200.64, -1144.11],
        "exit_reason": ["profit_take", "stop_loss", "expiry"],
        "max_adverse_excursion": [12.5, 230.0, 1300.25],
        "days_held": np.array([7, 5, 46], dtype=np.int64),
        "position_id": np.array([1, 2, 3], dtype=np.int64),
        "early_assignment_risk": [False, False, True],
    })


def _equity() -> pd.DataFrame:
    times = pd.date_range("2016-03-01 09:35", periods=40, freq="5min", tz=NY)
    rng = np.random.default_rng(7)
    equity = 25_000 + np.cumsum(rng.normal(0, 40, len(times)))
    peak = np.maximum.accumulate(equity)
    return pd.DataFrame({
        "cash": equity - 150.0,
        "equity": equity,
        "equity_liquidation": equity - 35.0,
        "drawdown": equity - peak,
        "drawdown_pct": (equity - peak) / peak * 100.0,     # percent, as analytics.performance
        "open_positions": rng.integers(0, 3, len(times)),
        "hedge_shares": rng.integers(-20, 20, len(times)),
        "net_delta": rng.normal(0, 30, len(times)),
        "net_gamma": rng.normal(-5, 2, len(times)),
        "net_vega": rng.normal(-30, 10, len(times)),
        "net_theta": rng.normal(8, 2, len(times)),
        "underlying_price": 199.5 + np.cumsum(rng.normal(0, 0.2, len(times))),
    }, index=pd.DatetimeIndex(times, name="bar"))


def _metrics() -> dict:
    # Keys and units as analytics.performance.performance_metrics: *_pct in percent, win_rate a fraction.
    return {
        "net_profit": np.float64(-1306.05), "cagr_pct": -5.23, "max_drawdown": -1402.5,
        "max_drawdown_pct": -5.61, "sharpe": np.float64(-0.8731), "sortino": float("nan"),
        "win_rate": 1 / 3, "profit_factor": 0.0321, "win_loss_ratio": 0.47,
        "avg_days_held": 20.6, "trade_count": np.int64(3), "fitness": float("-inf"),
        "expectancy": -435.35, "final_equity": 23693.95,
        "extras": {"worst_trade": float("inf"), "values": [1.5, float("nan")]},
    }


def _data_description() -> dict:
    return {
        "period": {"start": "2016-03-01", "end": "2016-05-31", "sessions": 65, "bars": 5070,
                   "bar_frequency": "5min"},
        "underlying": "SPY",
        "embedded": {
            "daily_bars": {"SPY": {"source": "arch.data.sp500", "proxy": True,
                                   "description": "PROXY: S&P 500 index / 10"}},
            "synthetic_or_proxy": ["SPY = S&P 500 / 10", "IV index before the VIX data = GARCH proxy"],
        },
        "intraday_bars": {"synthetic": True, "method": "seeded Brownian bridges through each real day"},
        "option_chains": {"synthetic": True, "model": "SSVI smile on a VIX-anchored term structure"},
        "dividend_yield": {"value": 0.019, "assumption": True, "why": "price index"},
    }


def _run_info() -> dict:
    return {"command": ["python", "core/main.py", "--mode", "backtest"], "engine": "fast",
            "seed": 42, "started": pd.Timestamp("2024-01-02 10:00:00", tz=NY),
            "finished": "2024-01-02T10:00:05-05:00", "versions": {"numpy": np.__version__}}


def _write(out_dir, **changes):
    arguments = dict(config_dict=Config().to_dict(), data_description=_data_description(),
                     trades=_trades(), equity=_equity(), metrics=_metrics(), run_info=_run_info())
    arguments.update(changes)
    return write_run(out_dir, **arguments)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("runs") / "run")


# ---------------------------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------------------------

def test_every_file_is_written_and_nothing_else(written):
    assert sorted(path.name for path in written.iterdir()) == sorted(report.FILE_NAMES)
    assert [path.name for path in written.parent.iterdir()] == [written.name]


def test_config_yaml_is_the_resolved_config(written):
    assert yaml.safe_load((written / "config.yaml").read_text()) == Config().to_dict()
    assert Config.from_yaml(written / "config.yaml") == Config()


def test_data_and_run_json_round_trip(written):
    assert json.loads((written / "data.json").read_text()) == _data_description()
    run = json.loads((written / "run.json").read_text())
    assert run["command"] == ["python", "core/main.py", "--mode", "backtest"]
    assert run["seed"] == 42 and run["engine"] == "fast"
    assert pd.Timestamp(run["started"]) == pd.Timestamp("2024-01-02 10:00:00", tz=NY)
    assert run["versions"] == {"numpy": np.__version__}


def test_metrics_json_is_strict_json_with_nan_and_inf_as_null(written):
    text = (written / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = json.loads(text)
    assert metrics["sortino"] is None and metrics["fitness"] is None
    assert metrics["extras"] == {"worst_trade": None, "values": [1.5, None]}
    for key, value in _metrics().items():
        if isinstance(value, (float, np.floating)) and math.isfinite(value):
            assert metrics[key] == float(value) and type(metrics[key]) is float
    assert metrics["trade_count"] == 3 and type(metrics["trade_count"]) is int


def _read_times(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, utc=True).dt.tz_convert(NY)


def test_trades_csv_round_trips_in_the_standard_column_order(written):
    given = _trades()
    back = pd.read_csv(written / "trades.csv", keep_default_na=False)
    standard = [column for column in report.TRADE_COLUMNS if column in given.columns]
    assert standard[:3] == ["position_id", "entry_time", "exit_time"]
    assert list(back.columns) == standard + ["vix_at_entry"]
    for column in ("entry_time", "exit_time"):
        assert (_read_times(back[column]) == given[column]).all()
        # ISO 8601 with the offset of the day: both sides of the DST change appear.
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", text) for text in back[column])
    assert {text[-6:] for text in back["entry_time"]} == {"-05:00", "-04:00"}
    assert [dt.date.fromisoformat(text) for text in back["expiration"]] == list(given["expiration"])
    for column in ("long_put", "short_put", "short_call", "long_call", "contracts", "credit",
                   "exit_debit", "fees", "pnl", "max_adverse_excursion", "days_held", "position_id",
                   "early_assignment_risk", "vix_at_entry"):
        assert back[column].tolist() == given[column].tolist(), column
    assert back["exit_reason"].tolist() == given["exit_reason"].tolist()
    assert back["assigned_legs"].tolist() == given["assigned_legs"].tolist()


def test_equity_csv_round_trips_with_the_bar_times_as_timestamp(written):
    given = _equity()
    back = pd.read_csv(written / "equity.csv")
    assert list(back.columns) == list(report.EQUITY_COLUMNS)
    assert (_read_times(back["timestamp"]).to_numpy() == given.index.to_numpy()).all()
    for column in given.columns:
        assert back[column].tolist() == given[column].tolist(), column


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_a_1400_by_800_image(written):
    assert _png_size((written / "equity.png").read_bytes()) == (1400, 800)


def test_html_is_self_contained_and_shows_metrics_trades_and_the_synthetic_notice(written):
    page = (written / "report.html").read_text()
    # No external asset of any kind: no scripts, stylesheets, links or remote URLs.
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    # The equity curve, the trade histograms and the Greeks (drawn here: no risk panel brought one).
    assert [base64.b64decode(source.split(",", 1)[1]) for source in sources] == \
        [(written / name).read_bytes() for name in ("equity.png", "trades.png", "greeks.png")]
    # Metrics as people read them ($, %, ratios to 2 decimals).
    metrics_table = page[page.index("<h2>Metrics"):page.index("<h2>P&amp;L per trade")]
    for text in ("-$1,306.05", "-5.23 %", "-$1,402.50", "-5.61 %", "-0.87", "33.33 %", "0.03",
                 "0.47", "20.6 days", "-∞", "-$435.35", "$23,693.95"):
        assert f">{text}<" in metrics_table, text
    # Every trade's exit reason, its P&L and its strikes.
    trades = _trades()
    body = page[page.index("<h2>Trades"):]
    for reason in trades["exit_reason"]:
        assert f"<td>{reason}</td>" in body
    assert "-$1,144.11" in body and "$37.70" in body and ">185.5<" in body and ">$1,300.25<" in body
    assert "2016-03-10 14:30" in body and "2016-04-22" in body
    # The data's synthetic parts, in a box that says so.
    assert "What was synthetic" in page
    for text in ("seeded Brownian bridges through each real day", "SSVI smile on a VIX-anchored term structure",
                 "SPY = S&amp;P 500 / 10", "price index"):
        assert text in page, text
    header = page[:page.index("What was synthetic")]
    # The bars replayed (40 five-minute bars of one session), then the configured period.
    assert "2016-03-01 09:35 … 2016-03-01 12:50 (1 sessions, 40 bars" in header
    assert f"{Config().backtest.start} … {Config().backtest.end}" in header
    for text in ("fast", "spread_fraction", "66 %", "ibkr", "$25,000.00"):
        assert text in header, text


def test_written_folder_has_ordinary_permissions(written):
    umask = os.umask(0)
    os.umask(umask)
    assert (written.stat().st_mode & 0o777) == (0o777 & ~umask)


# ---------------------------------------------------------------------------------------------
# the folder appears complete or not at all
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_no_folder(tmp_path, monkeypatch, failure):
    def broken_png(*args, **kwargs):
        raise failure

    monkeypatch.setattr(report, "render_equity_png", broken_png)
    out_dir = tmp_path / "run"
    with pytest.raises(type(failure)):
        _write(out_dir)
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "trades.csv").write_text("old run\n")
    calls = []
    monkeypatch.setattr(report, "render_equity_png", lambda *a, **k: calls.append(1) or b"")
    with pytest.raises(ReportError, match="not empty") as error:
        _write(out_dir)
    assert str(out_dir) in str(error.value) and "trades.csv" in str(error.value)
    assert error.value.path == out_dir and isinstance(error.value, ValueError)
    assert calls == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert (out_dir / "trades.csv").read_text() == "old run\n"


def test_existing_empty_folder_becomes_the_run(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    _write(out_dir, plot=False)
    assert (out_dir / "metrics.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_plot_false_writes_no_png_and_no_image(tmp_path):
    out_dir = _write(tmp_path / "run", plot=False)
    assert not (out_dir / "equity.png").exists()
    page = (out_dir / "report.html").read_text()
    assert "<img" not in page and "data:image" not in page
    assert not (out_dir / "trades.png").exists() and not (out_dir / "greeks.png").exists()
    assert "What was synthetic" in page and "stop_loss" in page


def test_parents_are_created(tmp_path):
    out_dir = _write(tmp_path / "a" / "b" / "run", plot=False)
    assert (out_dir / "trades.csv").is_file()


# ---------------------------------------------------------------------------------------------
# check_output_dir: fail fast, name the path and the reason
# ---------------------------------------------------------------------------------------------

def test_check_output_dir_accepts_a_new_folder_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "runs" / "first"
    assert check_output_dir(target) == target
    assert not target.exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_folder_under_a_regular_file_is_not_writable(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "sub" / "run"
    with pytest.raises(ReportError, match="not writable") as error:
        check_output_dir(target)
    assert str(target) in str(error.value) and str(blocker) in str(error.value)
    with pytest.raises(ReportError, match="not writable"):
        _write(target)
    assert blocker.read_text() == "x"


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "run"
    target.write_text("x")
    with pytest.raises(ReportError, match="is a file") as error:
        check_output_dir(target)
    assert str(target) in str(error.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_parent_is_not_writable(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ReportError, match="not writable"):
            check_output_dir(parent / "run")
    finally:
        parent.chmod(0o700)


def test_naive_times_are_refused_before_anything_is_written(tmp_path):
    trades = _trades()
    trades["entry_time"] = trades["entry_time"].dt.tz_localize(None)
    with pytest.raises(ValueError, match="entry_time"):
        _write(tmp_path / "run", trades=trades)
    assert list(tmp_path.iterdir()) == []


def test_default_run_dir_is_a_timestamp_with_a_suffix_when_taken(tmp_path):
    first = default_run_dir(tmp_path)
    assert first.parent == tmp_path and re.fullmatch(r"\d{8}-\d{6}", first.name)
    stamp = dt.datetime.strptime(first.name, "%Y%m%d-%H%M%S")
    assert abs((dt.datetime.now() - stamp).total_seconds()) < 120
    first.mkdir()
    second = default_run_dir(tmp_path)
    if second.name.startswith(first.name):     # same second: the suffix must make it unique
        assert second.name == f"{first.name}-2"
    assert not second.exists()


# ---------------------------------------------------------------------------------------------
# no trades, many trades
# ---------------------------------------------------------------------------------------------

def test_a_run_without_trades(tmp_path):
    out_dir = _write(tmp_path / "run", trades=pd.DataFrame(), plot=False)
    back = pd.read_csv(out_dir / "trades.csv")
    assert list(back.columns) == list(report.TRADE_COLUMNS) and len(back) == 0
    assert "No trades." in (out_dir / "report.html").read_text()


def test_more_than_2000_trades_show_the_first_and_last_1000(tmp_path):
    count = 2_345
    base = _trades().iloc[[0]]
    trades = pd.concat([base] * count, ignore_index=True)
    trades["exit_reason"] = [f"reason_{number:05d}" for number in range(count)]
    out_dir = _write(tmp_path / "run", trades=trades, plot=False)
    page = (out_dir / "report.html").read_text()
    shown = set(re.findall(r"<td>(reason_\d{5})</td>", page[page.index("<h2>Trades"):]))
    expected = {f"reason_{number:05d}" for number in [*range(1000), *range(count - 1000, count)]}
    assert shown == expected
    assert "first and last 1,000" in page and f"{count - 2000:,} trades not shown" in page
    assert len(pd.read_csv(out_dir / "trades.csv")) == count


# ---------------------------------------------------------------------------------------------
# terminal summary
# ---------------------------------------------------------------------------------------------

def test_summary_table_shows_metrics_and_exit_reason_counts():
    trades = _trades()
    trades = pd.concat([trades, trades.iloc[[0, 0]]], ignore_index=True)   # profit_take × 3
    console = Console(record=True, width=120)
    console.print(summary_table(_metrics(), trades))
    text = console.export_text()
    for label, value in (("Net profit", "-$1,306.05"), ("CAGR", "-5.23 %"), ("Max drawdown $", "-$1,402.50"),
                         ("Max drawdown %", "-5.61 %"), ("Sharpe", "-0.87"), ("Sortino", "n/a"),
                         ("Win rate", "33.33 %"), ("Profit factor", "0.03"), ("Win/loss ratio", "0.47"),
                         ("Expectancy per trade", "-$435.35"),
                         ("Avg days held", "20.6 days"), ("Trades", "3"), ("Fitness", "-∞")):
        line = next(line for line in text.splitlines() if f" {label} " in line or f" {label}" in line)
        assert value in line, (label, line)
    counts = collections.Counter(trades["exit_reason"])
    for reason, count in counts.items():
        line = next(line for line in text.splitlines() if f" {reason} " in line)
        assert f"{count} ({count / len(trades):.0%})" in line
    # Most frequent first, ties by name: profit_take (3), then expiry and stop_loss (1 each).
    positions = [text.index(f" {reason} ") for reason in ("profit_take", "expiry", "stop_loss")]
    assert positions == sorted(positions)


def test_summary_table_without_trades():
    console = Console(record=True, width=120)
    console.print(summary_table({}, pd.DataFrame()))
    text = console.export_text()
    assert "no trades" in text and "Net profit" in text and "n/a" in text


# ---------------------------------------------------------------------------------------------
# helpers with their own rules
# ---------------------------------------------------------------------------------------------

def test_iso_times_match_timestamp_isoformat_including_nat():
    times = pd.Series(pd.date_range("2016-03-12 23:00", periods=40, freq="37min", tz=NY))
    times.iloc[3] = pd.NaT
    text = report.csv_ready(pd.DataFrame({"t": times}))["t"].tolist()
    assert text == ["" if pd.isna(stamp) else stamp.isoformat() for stamp in times]
    fractional = pd.Series([pd.Timestamp("2016-01-04 09:35:00.25", tz=NY)])
    assert report.csv_ready(pd.DataFrame({"t": fractional}))["t"].tolist() == ["2016-01-04T09:35:00.250000-05:00"]


def test_envelope_keeps_every_buckets_extremes_and_the_last_point():
    rng = np.random.default_rng(3)
    count, buckets = 50_000, 100
    values = np.cumsum(rng.normal(size=count))
    times = np.arange(count).astype("datetime64[m]")
    kept_times, kept_values = envelope(times, values, buckets=buckets)
    assert len(kept_values) <= 2 * buckets + 1
    assert np.all(np.diff(kept_times.astype(np.int64)) > 0)
    assert kept_values[-1] == values[-1]
    by_bucket = values.reshape(buckets, count // buckets)     # count divides evenly: equal buckets
    kept = set(kept_values.tolist())
    assert set(by_bucket.min(axis=1).tolist()) <= kept and set(by_bucket.max(axis=1).tolist()) <= kept
    short_times, short_values = envelope(times[:100], values[:100], buckets=buckets)
    assert np.array_equal(short_values, values[:100])


def test_metrics_from_analytics_performance_are_shown_in_their_units(tmp_path):
    # The real producer of metrics.json: its *_pct keys are percent, win_rate a fraction.
    from analytics.performance import performance_metrics

    equity = _equity()
    metrics = performance_metrics(equity["equity"], _trades(), starting_cash=25_000.0)
    out_dir = _write(tmp_path / "run", metrics=metrics, plot=False)
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    page = (out_dir / "report.html").read_text()
    table = page[page.index("<h2>Metrics"):page.index("<h2>Monthly")]
    assert f">{metrics['max_drawdown_pct']:,.2f} %<" in table
    assert f">{metrics['win_rate'] * 100:,.2f} %<" in table
    assert f">{metrics['trade_count']:,}<" in table
