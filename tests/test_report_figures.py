"""The report a trader reads first (issue #13): the buy-and-hold benchmark, the monthly and yearly
returns, the replayed period, the renamed win/loss ratio, money to the cent in trades.csv and a
trade table that scrolls. The figures are recomputed here from a real small run's equity.csv and
trades.csv with plain pandas/numpy (no import from analytics.performance for the recomputation).
"""
from __future__ import annotations

import contextlib
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.main import main

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NY = "America/New_York"
CASH = 25_000.0
# Four months across a year end: two years in the heat map, a month boundary in each.
PERIOD = ["--bt-start", "2015-11-02", "--bt-end", "2016-02-29", "--engine", "fast"]
SHORT_SAMPLES = 300         # about four sessions of five-minute bars


def _run(out: Path, *extra: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--mode", "backtest", *PERIOD, *extra, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("figures") / "run")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("short") / "run", "--bt-samples", str(SHORT_SAMPLES), "--no-plot")


def _equity(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "equity.csv")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True).dt.tz_convert(NY)
    return frame


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _session_closes(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame.groupby(frame["timestamp"].dt.date, sort=True)[column].last()


def close(actual, expected, tol=1e-9) -> bool:
    return math.isclose(actual, expected, rel_tol=tol, abs_tol=tol)


# ------------------------------------------------------------------------------------------------
# the benchmark, recomputed from equity.csv
# ------------------------------------------------------------------------------------------------

def test_buy_and_hold_recomputed_from_equity_csv(run):
    equity, metrics = _equity(run), _metrics(run)
    price = equity["underlying_price"]
    assert (price > 0).all() and price.nunique() > 100          # a real price path, one per bar
    held = CASH * price / price.iloc[0]
    equity["held"] = held
    assert close(metrics["benchmark_final_equity"], float(held.iloc[-1]))
    assert close(metrics["benchmark_total_return_pct"], (float(held.iloc[-1]) / CASH - 1) * 100)
    peak = np.maximum.accumulate(np.maximum(held.to_numpy(), CASH))
    assert close(metrics["benchmark_max_drawdown_pct"], float(((held - peak) / peak * 100).min()))

    # Daily returns of both: last value of each session over the previous one's (first: the cash).
    strategy_closes = _session_closes(equity, "equity").to_numpy()
    held_closes = _session_closes(equity, "held").to_numpy()
    strategy = strategy_closes / np.r_[CASH, strategy_closes[:-1]] - 1
    benchmark = held_closes / np.r_[CASH, held_closes[:-1]] - 1
    assert close(metrics["benchmark_sharpe"], benchmark.mean() / benchmark.std(ddof=1) * math.sqrt(252))
    beta = np.cov(strategy, benchmark, ddof=1)[0, 1] / np.var(benchmark, ddof=1)
    assert close(metrics["beta"], beta, 1e-7)
    assert close(metrics["correlation"], np.corrcoef(strategy, benchmark)[0, 1], 1e-7)
    intercept = strategy.mean() - beta * benchmark.mean()
    assert close(metrics["alpha_pct"], ((1 + intercept) ** 252 - 1) * 100, 1e-6)


def test_the_equity_chart_and_the_metrics_table_show_buy_and_hold(run):
    page = (run / "report.html").read_text()
    metrics = _metrics(run)
    table = page[page.index("<h2>Metrics"):page.index("<h2>Monthly")]
    assert "buy and hold SPY</th>" in table
    assert f">{metrics['benchmark_total_return_pct']:,.2f} %<" in table
    assert f">{metrics['benchmark_max_drawdown_pct']:,.2f} %<" in table
    assert f">{metrics['beta']:,.2f}<" in table and f">{metrics['correlation']:,.2f}<" in table
    assert 'alt="equity and drawdown against buy and hold"' in page


# ------------------------------------------------------------------------------------------------
# monthly and yearly returns, recomputed from equity.csv
# ------------------------------------------------------------------------------------------------

def test_monthly_and_yearly_returns_recomputed_from_equity_csv(run):
    equity, metrics = _equity(run), _metrics(run)
    local = equity["timestamp"].dt.tz_localize(None)
    for period, key, width in (("M", "monthly_returns_pct", 7), ("Y", "yearly_returns_pct", 4)):
        last = equity.groupby(local.dt.to_period(period), sort=True)["equity"].last()
        previous = np.r_[CASH, last.to_numpy()[:-1]]
        expected = {str(label)[:width]: value for label, value in zip(last.index, (last / previous - 1) * 100)}
        assert list(metrics[key]) == list(expected)
        for label, value in expected.items():
            assert close(metrics[key][label], value), (key, label)
    assert list(metrics["monthly_returns_pct"]) == ["2015-11", "2015-12", "2016-01", "2016-02"]
    # The year column compounds its months.
    months = metrics["monthly_returns_pct"]
    assert close(metrics["yearly_returns_pct"]["2016"],
                 ((1 + months["2016-01"] / 100) * (1 + months["2016-02"] / 100) - 1) * 100)


def test_the_heat_map_colours_every_month_by_its_sign(run):
    page = (run / "report.html").read_text()
    heat = page[page.index("<h2>Monthly"):]
    heat = heat[:heat.index("</table>")]
    rows = {match.group(1): match.group(2) for match in re.finditer(r"<tr><th>(\d{4})</th>(.*?)</tr>", heat)}
    assert sorted(rows) == ["2015", "2016"]
    cells = {year: re.findall(r"<td([^>]*)>([^<]*)</td>", row) for year, row in rows.items()}
    for year, row in cells.items():
        assert len(row) == 12 + 2                                      # months, year, buy and hold
    for label, value in _metrics(run)["monthly_returns_pct"].items():
        attributes, text = cells[label[:4]][int(label[5:]) - 1]
        assert text == f"{value:.2f}"
        colour = "22,163,74" if value > 0 else "220,38,38"
        assert f"background:rgba({colour}," in attributes, (label, attributes)
    assert cells["2015"][0] == ("", "")                                # January 2015 not replayed


# ------------------------------------------------------------------------------------------------
# the period actually replayed
# ------------------------------------------------------------------------------------------------

def test_a_samples_run_names_the_replayed_period_and_annualises_nothing(short_run):
    equity, metrics = _equity(short_run), _metrics(short_run)
    assert len(equity) == SHORT_SAMPLES
    first, last = equity["timestamp"].iloc[0], equity["timestamp"].iloc[-1]
    sessions = equity["timestamp"].dt.date.nunique()
    assert sessions < 20 and metrics["sessions"] == sessions and metrics["annualised"] is False
    assert pd.Timestamp(metrics["first_bar"]) == first and pd.Timestamp(metrics["last_bar"]) == last
    for key in ("cagr_pct", "sharpe", "sortino", "alpha_pct", "benchmark_cagr_pct", "benchmark_sharpe",
                "benchmark_sortino"):
        assert metrics[key] is None, key
    # Figures over the period itself are still there.
    assert metrics["total_return_pct"] is not None and metrics["benchmark_total_return_pct"] is not None

    page = html.unescape((short_run / "report.html").read_text())
    title = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert f"{first.date()} … {last.date()}" in title and "2016-02-29" not in title
    replayed = re.search(r"<th>Period replayed</th><td>(.*?)</td>", page).group(1)
    assert replayed.startswith(f"{first:%Y-%m-%d %H:%M} … {last:%Y-%m-%d %H:%M} ({sessions} sessions, "
                               f"{SHORT_SAMPLES} bars")
    requested = re.search(r"<th>Requested</th><td>(.*?)</td>", page).group(1)
    assert "2015-11-02 … 2016-02-29" in requested and f"--bt-samples {SHORT_SAMPLES}" in requested
    table = page[page.index("<h2>Metrics"):page.index("<h2>Monthly")]
    for label in ("CAGR", "Sharpe", "Sortino", "Alpha (annualised)"):
        row = re.search(rf">{re.escape(label)}</td>(.*?)</tr>", table).group(1)
        assert "n/a (period too short)" in row and not re.search(r"\d", row), (label, row)


def test_a_full_run_reports_its_annualised_figures(run):
    metrics = _metrics(run)
    assert metrics["annualised"] is True and metrics["sessions"] >= 20
    assert all(metrics[key] is not None for key in ("cagr_pct", "sharpe", "benchmark_cagr_pct", "benchmark_sharpe"))
    page = (run / "report.html").read_text()
    assert "Requested</th>" not in page and "period too short" not in page


# ------------------------------------------------------------------------------------------------
# names and definitions
# ------------------------------------------------------------------------------------------------

def test_win_loss_ratio_replaces_expectancy_ratio_everywhere(run):
    metrics = _metrics(run)
    trades = pd.read_csv(run / "trades.csv")
    pnl = trades["pnl"].to_numpy()
    assert "expectancy_ratio" not in metrics
    assert close(metrics["win_loss_ratio"], pnl[pnl > 0].mean() / abs(pnl[pnl < 0].mean()), 1e-6)
    page = (run / "report.html").read_text()
    assert "Expectancy ratio" not in page and ">Win/loss ratio<" in page
    assert re.search(r">Expectancy per trade</td><td class=\"num\">-?\$[\d,]+\.\d\d<", page)
    # No code, test or document of the project still uses the old key.
    this_file = Path(__file__).resolve()
    users = [str(path.relative_to(PROJECT_ROOT)) for folder in ("analytics", "core", "tests", "scripts")
             for path in (PROJECT_ROOT / folder).rglob("*.py")
             if path.resolve() != this_file and "expectancy_ratio" in path.read_text(encoding="utf-8")]
    assert users == []


def test_every_metric_has_its_definition_on_hover(run):
    page = (run / "report.html").read_text()
    tables = page[page.index("<h2>Metrics"):page.index("<h2>Monthly")]
    labels = re.findall(r"<tr><td([^>]*)>([^<]+)</td><td", tables)
    assert len(labels) >= 20
    for attributes, label in labels:
        title = re.search(r'title="([^"]+)"', attributes)
        assert title and len(title.group(1)) > 25 and " " in title.group(1), label
    assert "<summary>How each figure is computed</summary>" in page


# ------------------------------------------------------------------------------------------------
# trades.csv to the cent, the trade table scrolls, the trade breakdowns add up
# ------------------------------------------------------------------------------------------------

def test_money_in_trades_csv_is_kept_to_the_cent(run):
    text = pd.read_csv(run / "trades.csv", dtype=str, keep_default_na=False)
    assert len(text) > 5
    for column in ("pnl", "fees", "max_adverse_excursion", "max_loss"):
        assert all(re.fullmatch(r"-?\d+(\.\d{1,2})?", value) for value in text[column]), column
    for column in ("credit", "exit_debit"):
        assert all(re.fullmatch(r"-?\d+(\.\d{1,4})?", value) for value in text[column]), column


def test_float_noise_is_rounded_away_at_write_time(tmp_path):
    from core.config import Config
    from core.report import write_run

    times = pd.date_range("2016-03-01 09:35", periods=3, freq="5min", tz=NY)
    trades = pd.DataFrame({"entry_time": times[:1], "exit_time": times[2:], "credit": [0.8300000000000001],
                           "exit_debit": [0.41999999999999993], "fees": [5.640000000000001],
                           "pnl": [36.35999999999999], "max_adverse_excursion": [171.99999999999997],
                           "max_loss": [417.0000000000001], "contracts": [1]})
    equity = pd.DataFrame({"equity": [CASH, CASH + 10, CASH + 36.36]}, index=times)
    out = write_run(tmp_path / "run", config_dict=Config().to_dict(), data_description={}, trades=trades,
                    equity=equity, metrics={}, run_info={}, plot=False)
    row = (out / "trades.csv").read_text().splitlines()[1]
    for text in ("0.83", "0.42", "5.64", "36.36", "172.0", "417.0"):
        assert f",{text}," in f",{row},", (text, row)
    assert "9999" not in row and "0000000" not in row


def test_the_trade_table_scrolls_both_ways(run):
    page = (run / "report.html").read_text()
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1).replace("\n", "")
    rules = dict(re.findall(r"([^{}]+)\{([^}]*)\}", css))
    assert "overflow:auto" in rules[".scroll"] and "max-width:100%" in rules[".scroll"]
    assert re.search(r"max-height:\d+px", rules[".scroll.trades"])
    assert "position:sticky" in rules["table.data th"]                 # the header stays in view
    trades = page[page.index("<h2>Trades ("):]
    assert re.search(r'<div class="scroll trades"><table class="data"><tr><th>#</th>', trades)
    assert trades.index("</table></div>") < trades.index("<h2>Run")
    assert "max-width:1440px" not in rules.get("table.data", "")


def test_trade_breakdowns_add_up_to_trades_csv(run):
    trades = pd.read_csv(run / "trades.csv", keep_default_na=False, na_values=[""])
    page = html.unescape((run / "report.html").read_text())
    section = page[page.index("<h3>By exit reason"):]
    section = section[:section.index("</table>")]
    for reason, group in trades.groupby("exit_reason"):
        row = re.search(rf"<tr><td>{reason}</td>(.*?)</tr>", section).group(1)
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
        assert int(cells[0]) == len(group)
        total = float(group["pnl"].sum())
        assert cells[3] == (f"-${abs(total):,.2f}" if total < 0 else f"${total:,.2f}")
    # Days to expiry at entry, bucketed: the counts cover every trade.
    dte = (pd.to_datetime(trades["expiration"])
           - pd.to_datetime(trades["entry_time"], utc=True).dt.tz_convert(NY).dt.tz_localize(None).dt.normalize()).dt.days
    section = page[page.index("<h3>By days to expiry at entry"):]
    section = section[:section.index("</table>")]
    counts = [int(value) for value in re.findall(r"<tr><td>[^<]+</td><td class='num'>([\d,]+)</td>", section)]
    assert sum(counts) == len(trades) == len(dte)
    assert "<h3>By IV index (VIX) at entry" in page and "<h3>By credit / wing width" in page


def test_every_report_shows_the_greeks_and_the_trade_histograms_once(run):
    page = (run / "report.html").read_text()
    assert page.count('alt="portfolio Greeks"') == 1
    assert page.count('alt="per-trade P&amp;L distribution and credit-to-width distribution"') == 1
    assert (run / "greeks.png").is_file() and (run / "trades.png").is_file()
