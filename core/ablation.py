"""The ablation (`--compare`): the seed's Baseline / MTF only / Fuzzy only / Full scenarios, plus
the mechanical condor without Stage-2 gates, on the same data and features in one command.

Every scenario is the user's configuration with only its switches changed, replayed by
``run_backtest`` with the fast driver (identical trades to the Backtrader driver, held by the
driver-parity tests) on the same market and cached feature tables, so the rows differ only by the
piece each scenario adds.
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass

import pandas as pd

from core.config import Config
from strategies.entry_gates import GATE_CODE

# (name, switches it sets). The remaining settings are the user's.
SCENARIOS: tuple[tuple[str, dict], ...] = (
    ("Mechanical", {"filters.use_entry_gates": False, "mtf.use_mtf": False, "fuzzy.use_fuzzy": False,
                    "sizing.dynamic_sizing": False}),
    ("Baseline", {"mtf.use_mtf": False, "fuzzy.use_fuzzy": False, "sizing.dynamic_sizing": False}),
    ("MTF only", {"mtf.use_mtf": True, "fuzzy.use_fuzzy": False, "sizing.dynamic_sizing": False}),
    ("Fuzzy only", {"mtf.use_mtf": False, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True}),
    ("Full", {"mtf.use_mtf": True, "fuzzy.use_fuzzy": True, "sizing.dynamic_sizing": True}),
)
SCENARIO_NOTES = {
    "Mechanical": "no Stage-2 gates, filters or wing adjustments; fixed quantity",
    "Baseline": "Stage-2 gates and wings; no MTF filter, no fuzzy; fixed quantity (seed: --no-mtf-filter --no-fuzzy)",
    "MTF only": "Baseline + MTF consensus band (seed: --use-mtf --no-fuzzy)",
    "Fuzzy only": "Baseline + fuzzy dynamic sizing (seed: --use-fuzzy --dynamic-sizing --no-mtf-filter)",
    "Full": "Baseline + MTF band + fuzzy dynamic sizing (seed: --use-mtf --use-fuzzy --dynamic-sizing)",
}


@dataclass
class ScenarioRun:
    name: str
    config: Config
    trades: pd.DataFrame
    equity: pd.DataFrame
    metrics: dict


def run_ablation(config: Config, market, progress=None) -> list[ScenarioRun]:
    """Every scenario of ``SCENARIOS`` on the same market with ``core.backtest_engine.
    run_backtest`` (fast driver). Feature tables come from the per-process cache, so scenarios
    share one table; the ones that use the fuzzy confidence get the table with the DeepMamba
    neural factor, as a standalone run of that scenario would. ``progress(scenario_name,
    bars_done)`` is called as they run."""
    from core.backtest_engine import run_backtest

    runs = []
    for name, switches in SCENARIOS:
        scenario = config.override({**switches, "backtest.engine": "fast"}, source=f"ablation scenario {name}")
        callback = None if progress is None else (lambda done, name=name: progress(name, done))
        result = run_backtest(scenario, market, progress=callback)
        runs.append(ScenarioRun(name, scenario, result.trades, result.equity, result.metrics))
    return runs


def comparison_table(runs: list[ScenarioRun]) -> pd.DataFrame:
    """One row per scenario: the figures a trader compares first."""
    rows = []
    for run in runs:
        metrics, trades = run.metrics, run.trades
        rejections = metrics.get("entry_rejections") or {}
        # The bar gates reject most bars in every gated scenario; what differs between scenarios
        # is what stopped entries after them (MTF band, sizing, VRP, ...), so that is shown first.
        later = {reason: count for reason, count in rejections.items() if reason not in GATE_CODE
                 or reason in ("mtf_consensus_outside_band", "fuzzy_confidence_below_min")}
        pool = later or rejections
        top_reason = max(pool.items(), key=lambda item: item[1])[0] if pool else ""
        note = metrics.get("sizing_note") or ""
        rows.append({
            "scenario": run.name,
            "trades": int(metrics.get("trade_count") or 0),
            "net_profit": metrics.get("net_profit"),
            "total_return_pct": metrics.get("total_return_pct"),
            "cagr_pct": metrics.get("cagr_pct"),
            "sharpe": metrics.get("sharpe"),
            "sortino": metrics.get("sortino"),
            "max_drawdown_pct": metrics.get("max_drawdown_pct"),
            "win_rate": metrics.get("win_rate"),
            "profit_factor": metrics.get("profit_factor"),
            "mean_contracts": float(trades["contracts"].mean()) if len(trades) else None,
            "mean_confidence": float(trades["confidence"].astype(float).mean()) if len(trades) else None,
            "top_rejection": top_reason,
            "what": SCENARIO_NOTES[run.name] + (f". NOTE: {note}" if note else ""),
        })
    return pd.DataFrame(rows)


def half_year(stamp) -> str:
    """'2014H1' for January … June 2014, '2014H2' for July … December."""
    return f"{stamp.year}H{1 if stamp.month <= 6 else 2}"


def trades_by_half_year(runs: list[ScenarioRun], start, end) -> pd.DataFrame:
    """Trades entered per calendar half-year of the period (rows '2014H1' … , a column per
    scenario): whether each scenario keeps trading through every part of the history, or only
    in some regimes."""
    first, last = pd.Timestamp(start), pd.Timestamp(end)
    labels = [half_year(stamp) for stamp in pd.date_range(first.replace(day=1), last, freq="MS")
              if stamp.month in (1, 7) or stamp == first.replace(day=1)]
    columns = {}
    for run in runs:
        entries = pd.DatetimeIndex(run.trades["entry_time"]) if len(run.trades) else pd.DatetimeIndex([])
        counts = pd.Series([half_year(stamp) for stamp in entries], dtype=object).value_counts()
        columns[run.name] = [int(counts.get(label, 0)) for label in labels]
    return pd.DataFrame(columns, index=pd.Index(labels, name="half_year"))


def daily_equity(runs: list[ScenarioRun]) -> pd.DataFrame:
    """Each scenario's equity at the last bar of every session (the comparison curves)."""
    columns = {}
    for run in runs:
        equity = run.equity["equity"]
        sessions = equity.index.tz_convert("America/New_York").normalize().tz_localize(None)
        columns[run.name] = equity.groupby(sessions).last()
    frame = pd.DataFrame(columns)
    # Session dates, not times: written as YYYY-MM-DD.
    frame.index = pd.Index([stamp.date().isoformat() for stamp in frame.index], name="session")
    return frame


def render_comparison_png(curves: pd.DataFrame, starting_cash: float, title: str) -> bytes:
    """The scenarios' equity curves on one chart (1400 x 700 pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axis = plt.subplots(figsize=(14.0, 7.0), dpi=100)
    try:
        colours = ("#6b7280", "#1d4ed8", "#059669", "#d97706", "#dc2626")
        dates = pd.to_datetime(curves.index)
        for (name, series), colour in zip(curves.items(), colours):
            axis.plot(dates, series.to_numpy(float), label=name, color=colour, linewidth=1.5)
        axis.axhline(starting_cash, color="#9ca3af", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=14, loc="left")
        axis.set_ylabel("equity at mid ($)")
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"${value:,.0f}"))
        axis.grid(True, color="#e5e7eb")
        axis.legend(loc="best", fontsize=11, framealpha=0.9)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


# How core.report.format_value shows each column.
COLUMN_KINDS = {"net_profit": "usd", "total_return_pct": "pct", "cagr_pct": "pct", "max_drawdown_pct": "pct",
                "win_rate": "fraction", "sharpe": "ratio", "sortino": "ratio", "profit_factor": "ratio",
                "mean_contracts": "ratio", "mean_confidence": "ratio"}


def comparison_html(table: pd.DataFrame, png_base64: str | None, periods: pd.DataFrame | None = None) -> str:
    """The report section: the side-by-side table, the trades per half-year and the equity curves."""
    from core.report import format_value

    headers = ["scenario", "trades", *COLUMN_KINDS, "top_rejection"]
    parts = ["<h2>Ablation: the same data, one piece at a time</h2>", '<table class="data"><tr>']
    parts.extend(f"<th>{html.escape(h.replace('_', ' '))}</th>" for h in headers)
    parts.append("</tr>")
    for row in table.to_dict("records"):
        cells = [f"<td>{html.escape(row['scenario'])}</td>", f"<td class='num'>{row['trades']:,}</td>"]
        cells.extend(f"<td class='num'>{html.escape(format_value(row[c], kind))}</td>"
                     for c, kind in COLUMN_KINDS.items())
        cells.append(f"<td>{html.escape(str(row['top_rejection']))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table><ul>")
    parts.extend(f"<li><strong>{html.escape(row['scenario'])}</strong>: {html.escape(row['what'])}</li>"
                 for row in table.to_dict("records"))
    parts.append("</ul><p>Top rejection: the most frequent reason an entry was refused after the "
                 "bar gates (MTF band, VRP, sizing, liquidity …); all counts are in "
                 "scenarios/&lt;name&gt;/metrics.json.</p>")
    if periods is not None and len(periods):
        parts.append("<h3>Trades entered per half-year</h3><table class=\"data\"><tr><th>half-year</th>"
                     + "".join(f"<th>{html.escape(str(name))}</th>" for name in periods.columns) + "</tr>")
        for label, row in periods.iterrows():
            parts.append(f"<tr><td>{html.escape(str(label))}</td>"
                         + "".join(f"<td class='num{' neg' if count == 0 else ''}'>{int(count):,}</td>" for count in row)
                         + "</tr>")
        parts.append("</table>")
    if png_base64:
        parts.append(f'<img alt="scenario equity curves" width="1400" height="700" '
                     f'src="data:image/png;base64,{png_base64}">')
    return "\n".join(parts)
