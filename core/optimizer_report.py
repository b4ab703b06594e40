"""The optimizer's run folder: every trial as CSV and Parquet, the best configuration as YAML that
``--config`` accepts, the phase choices, DSR / PBO / sensitivity tables, the plots (fitness by
phase, parameter heatmaps, in-sample vs out-of-sample equity, sensitivity, PBO logits) and a
self-contained HTML summary; plus the terminal summary.

Each file is written to a temporary name and renamed, so a file present is a complete one; the
folder's ``optimizer.json`` says whether the run finished (``status``).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.optimizer import OBJECTIVES, trials_frame
from core.report import FIGURE_DPI, to_json


def _atomic_bytes(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode("utf-8"))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    _figure().close(figure)
    return buffer.getvalue()


def phases_frame(results: dict) -> pd.DataFrame:
    rows = []
    for search in results["searches"]:
        window = "full period" if search.window is None else search.window.label
        for outcome in search.phases:
            rows.append({"window": window, "phase": outcome.phase.number, "title": outcome.phase.title,
                         "trials": len(outcome.trials), "resumed": outcome.reused,
                         "best_value": outcome.best_value, "best_fitness": outcome.best_fitness,
                         **{f"best.{k}": v for k, v in outcome.best_params.items()}})
    return pd.DataFrame(rows)


def walk_forward_frame(results: dict) -> pd.DataFrame:
    rows = [{k: v for k, v in row.items()
             if not k.endswith(("_returns", "_sessions", "_frame")) and k != "choice"}
            | {f"choice.{k}": v for k, v in row["choice"].items()} for row in results["walk_forward"]]
    return pd.DataFrame(rows)


def stitched_out_of_sample(results: dict, cash: float) -> pd.Series | None:
    """The out-of-sample windows' daily returns chained: what trading each window's choice on the
    window after its fit would have earned, compounded from the starting cash."""
    rows = results["walk_forward"]
    if not rows:
        return None
    returns = np.concatenate([row["oos_returns"] for row in rows])
    sessions = pd.DatetimeIndex(np.concatenate([row["oos_sessions"].to_numpy() for row in rows]))
    return pd.Series(cash * np.cumprod(1.0 + returns), index=sessions, name="equity")


def series_metrics(equity: pd.Series, cash: float) -> dict:
    values = equity.to_numpy(dtype=float)
    returns = values / np.r_[cash, values[:-1]] - 1.0
    peak = np.maximum.accumulate(np.r_[cash, values])[1:]
    drawdown = float((values - peak).min())
    std = float(np.std(returns, ddof=1)) if returns.size > 1 else 0.0
    return {"net_profit": float(values[-1] - cash), "max_drawdown": drawdown,
            "sharpe": float(np.mean(returns) / std * math.sqrt(252)) if std > 0 else None,
            "fitness_ratio": float((values[-1] - cash) / max(abs(drawdown), 0.01 * cash))}


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def fitness_by_phase_png(trials: pd.DataFrame, objective: str) -> bytes:
    plt = _figure()
    feasible = trials[trials["feasible"]]
    windows = list(dict.fromkeys(trials["window"]))
    figure, axis = plt.subplots(figsize=(9, 4.2))
    for offset, window in enumerate(windows):
        rows = feasible[feasible["window"] == window]
        jitter = (offset - (len(windows) - 1) / 2) * 0.8 / max(len(windows), 1)
        axis.scatter(rows["phase"] + jitter, rows["fitness"], s=8, alpha=0.45, label=window)
        best = rows.groupby("phase")["fitness"].max()
        axis.plot(best.index + jitter, best.to_numpy(), marker="D", linewidth=1)
    axis.set_xlabel("phase")
    axis.set_ylabel(f"fitness ({objective})")
    axis.set_title("Fitness of every feasible trial by phase (diamonds: the phase's best)")
    axis.set_xticks(sorted(trials["phase"].unique()))
    if len(windows) > 1:
        axis.legend(fontsize=7, ncol=min(len(windows), 6))
    axis.grid(alpha=0.3)
    return _png(figure)


def heatmaps_png(trials: pd.DataFrame, searches) -> bytes | None:
    """Per phase of the last search: mean fitness over the two parameters whose values move it
    most (the others averaged over)."""
    plt = _figure()
    last = searches[-1]
    panels = []
    for outcome in last.phases:
        rows = trials[(trials["window"] == (outcome.trials[0].window if outcome.trials else "")) &
                      (trials["phase"] == outcome.phase.number) & trials["feasible"]]
        columns = [f"param.{p.path}" for p in outcome.phase.parameters if f"param.{p.path}" in rows]
        if len(rows) < 4 or len(columns) < 2:
            continue
        spread = {c: rows.groupby(c)["fitness"].mean().agg(lambda s: s.max() - s.min()) for c in columns}
        first, second = sorted(spread, key=lambda c: -spread[c])[:2]
        table = rows.pivot_table(index=first, columns=second, values="fitness", aggfunc="mean")
        panels.append((outcome.phase, first, second, table))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    figure, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    for axis, (phase, first, second, table) in zip(axes.flat, panels):
        image = axis.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis", origin="lower")
        axis.set_xticks(range(len(table.columns)), [_short(v) for v in table.columns], fontsize=7)
        axis.set_yticks(range(len(table.index)), [_short(v) for v in table.index], fontsize=7)
        axis.set_xlabel(second.split(".")[-1], fontsize=8)
        axis.set_ylabel(first.split(".")[-1], fontsize=8)
        axis.set_title(f"phase {phase.number}: mean fitness", fontsize=9)
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    return _png(figure)


def _short(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def equity_png(results: dict, cash: float) -> bytes | None:
    plt = _figure()
    figure, axis = plt.subplots(figsize=(10, 4.2))
    if results["walk_forward"]:
        for row in results["walk_forward"]:
            curve = cash * np.cumprod(1.0 + row["is_returns"])
            axis.plot(row["is_sessions"], curve, linewidth=0.8, alpha=0.6,
                      label=f"in-sample {row['window']} (its choice, fitted here)")
        stitched = stitched_out_of_sample(results, cash)
        axis.plot(stitched.index, stitched.to_numpy(), color="black", linewidth=2,
                  label="out-of-sample, stitched (each window's choice on the next window)")
        axis.set_title("Walk-forward: in-sample fits vs stitched out-of-sample equity (synthetic chains)")
    elif results.get("best_equity") is not None:
        closes = results["best_equity"]["equity"]
        axis.plot(results["sessions"], closes, color="black", linewidth=1.5, label="best configuration (in-sample)")
        axis.set_title("Best configuration's equity over the whole period: in-sample only (use --walk-forward for "
                       "out-of-sample)")
    else:
        return None
    axis.axhline(cash, color="grey", linewidth=0.7, linestyle="--")
    axis.set_ylabel("equity ($)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left")
    return _png(figure)


def sensitivity_png(table: pd.DataFrame) -> bytes | None:
    if table is None or table.empty or table["change"].isna().all():
        return None
    plt = _figure()
    rows = table.dropna(subset=["change"]).copy()
    rows["label"] = [f"{p.split('.')[-1]} {s} → {_short(v)}" for p, s, v in zip(rows["parameter"], rows["step"],
                                                                               rows["value"])]
    rows = rows.sort_values("change")
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows))))
    colors = ["#c0392b" if c < 0 else "#27ae60" for c in rows["change"]]
    axis.barh(rows["label"], rows["change"], color=colors)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("fitness change from the optimum")
    axis.set_title("Sensitivity: one grid step from the optimum, one parameter at a time")
    axis.tick_params(axis="y", labelsize=7)
    return _png(figure)


def pbo_png(statistics: list[dict]) -> bytes | None:
    logits = [s.get("pbo_logits") for s in statistics if s.get("pbo_logits") is not None]
    if not logits:
        return None
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 3.4))
    values = np.concatenate(logits)
    axis.hist(values[np.isfinite(values)], bins=40, color="#34495e")
    axis.axvline(0, color="#c0392b", linewidth=1.2)
    axis.set_xlabel("logit of the in-sample best's out-of-sample rank (≤ 0: below the median, overfit)")
    axis.set_ylabel("CSCV combinations")
    axis.set_title("PBO: where the in-sample winner lands out of sample")
    return _png(figure)


# ----------------------------------------------------------------------------------------------
# the folder
# ----------------------------------------------------------------------------------------------


def statistics_frame(results: dict) -> pd.DataFrame:
    rows = []
    for search, stats in zip(results["searches"], results["statistics"]):
        row = {"window": "full period" if search.window is None else search.window.label}
        row.update({k: v for k, v in stats.items() if k != "pbo_logits"})
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(folder: Path, config, settings, results: dict) -> dict:
    """Every output file into ``folder`` (atomically, one by one). Returns {name: path}."""
    cash = config.backtest.cash
    written: dict[str, Path] = {}

    def put(name: str, data: bytes | str | None) -> None:
        if data is None:
            return
        path = folder / name
        (_atomic_text if isinstance(data, str) else _atomic_bytes)(path, data)
        written[name] = path

    trials = trials_frame(results["searches"])
    put("trials.csv", trials.to_csv(index=False))
    buffer = io.BytesIO()
    trials.astype({c: "string" for c in trials.columns if trials[c].dtype == object}).to_parquet(buffer, index=False)
    put("trials.parquet", buffer.getvalue())
    phases = phases_frame(results)
    put("phases.csv", phases.to_csv(index=False))
    best_config = config.override(results["best_overrides"], source="optimizer best")
    temp = folder / ".best_config.yaml.build"
    best_config.to_yaml(temp)
    os.replace(temp, folder / "best_config.yaml")
    written["best_config.yaml"] = folder / "best_config.yaml"
    stats = statistics_frame(results)
    put("statistics.csv", stats.to_csv(index=False))
    if results["sensitivity"] is not None:
        put("sensitivity.csv", results["sensitivity"].to_csv(index=False))
    walk = walk_forward_frame(results) if results["walk_forward"] else None
    stitched = stitched_out_of_sample(results, cash)
    summary = {"objective": settings.spec.objective, "best_overrides": results["best_overrides"],
               "trials": results["trial_count"], "new_trials": results["new_trials"],
               "seconds": results["seconds"], "trials_per_second": results["trials_per_second"],
               "executor": results["executor"], "statistics": stats.to_dict(orient="records")}
    # trades.csv: the trades of the optimizer's choice — out of sample, window by window, under
    # walk-forward (what trading the method would have done); else the best configuration's
    # trades over the period that chose it (in-sample).
    chosen_trades = None
    if walk is not None:
        frames = [row["oos_trades_frame"].assign(window=row["window"]) for row in results["walk_forward"]
                  if row.get("oos_trades_frame") is not None]
        chosen_trades = pd.concat(frames, ignore_index=True) if frames else None
    elif results.get("best_equity") is not None:
        chosen_trades = results["best_equity"].get("trades")
    if chosen_trades is not None:
        put("trades.csv", chosen_trades.to_csv(index=False))
    if walk is not None:
        put("walk_forward.csv", walk.to_csv(index=False))
        put("oos_equity.csv", stitched.rename_axis("session").reset_index().to_csv(index=False))
        summary["out_of_sample"] = series_metrics(stitched, cash)
        summary["out_of_sample"]["trades"] = int(sum(row["oos_trades"] or 0 for row in results["walk_forward"]))
    else:
        best = results["searches"][-1].best
        summary["in_sample"] = dict(best.metrics) if best is not None else {}
        summary["in_sample"]["fitness"] = best.fitness if best is not None else None
    baseline = results.get("baseline")
    if baseline is not None and not baseline.get("error"):
        summary["baseline"] = dict(baseline["metrics"])
        summary["baseline"]["fitness"] = _fitness_of(baseline["metrics"], settings.spec, cash)
    results["summary"] = summary
    put("results.json", to_json(summary))
    images = {
        "fitness_by_phase.png": fitness_by_phase_png(trials, settings.spec.objective) if len(trials) else None,
        "heatmaps.png": heatmaps_png(trials, results["searches"]) if len(trials) else None,
        "equity.png": equity_png(results, cash),
        "sensitivity.png": sensitivity_png(results["sensitivity"]),
        "pbo_logits.png": pbo_png(results["statistics"]),
    }
    for name, data in images.items():
        put(name, data)
    put("summary.html", summary_html(config, settings, results, phases, stats, walk, images))
    return written


def _fitness_of(metrics: dict, spec, cash: float):
    from core.optimizer import fitness

    return fitness(metrics, spec.objective, spec.min_trades, cash)


def _table_html(frame: pd.DataFrame | None, floats: str = "{:,.4g}") -> str:
    if frame is None or frame.empty:
        return "<p><em>none</em></p>"
    return frame.to_html(index=False, border=0, classes="grid", na_rep="—",
                         float_format=lambda v: floats.format(v))


def summary_html(config, settings, results: dict, phases: pd.DataFrame, stats: pd.DataFrame,
                 walk: pd.DataFrame | None, images: dict) -> str:
    spec = settings.spec
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>CondorBrain optimizer</title><style>",
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
        "table.grid{border-collapse:collapse;font-size:12px;margin:8px 0}"
        "table.grid td,table.grid th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "h2{margin-top:28px;border-bottom:1px solid #ddd}.note{color:#8a6d3b;background:#fcf8e3;padding:8px}"
        "img{max-width:100%}",
        "</style></head><body>",
        "<h1>CondorBrain optimizer</h1>",
        f"<p>Period {esc(str(config.backtest.start))} … {esc(str(config.backtest.end))}, objective "
        f"<b>{esc(spec.objective)}</b> ({esc(OBJECTIVES[spec.objective])}), minimum {spec.min_trades} trades, "
        f"sampler <b>{esc(spec.sampler)}</b>"
        + (f", {spec.samples} sampled points per phase" if spec.samples else "")
        + f"; {results['trial_count']:,} trials ({results['new_trials']:,} run now, "
          f"{results['trials_per_second']:.2f} trials/s on {esc(results['executor'])}).</p>",
        "<p class='note'>Option chains and intraday bars are SYNTHETIC (Black–Scholes on a VIX-anchored surface); "
        "fills are bid/ask-aware with fees. A winner chosen from many trials is biased upwards: read the deflated "
        "Sharpe ratio and PBO below before trusting it.</p>",
        "<h2>Configuration to trade next: the last window's choice</h2>" if results["walk_forward"]
        else "<h2>Best configuration</h2>",
        _table_html(pd.DataFrame([{"setting": k, "value": _short(v)} for k, v in results["best_overrides"].items()])),
        "<p>Saved as <code>best_config.yaml</code>: <code>python core/main.py --config best_config.yaml</code></p>",
    ]
    summary = results.get("summary", {})
    for note in infeasible_choices(results, spec.min_trades) + flat_phases(results):
        parts.append(f"<p class='note'>{esc(note)}</p>")
    if walk is not None:
        parts += ["<h2>Walk-forward: in-sample vs out-of-sample</h2>",
                  _table_html(walk[[c for c in walk.columns if not c.startswith("choice.")]]),
                  "<p>Stitched out-of-sample: " + esc(", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}"
                                                                 for k, v in summary.get("out_of_sample", {}).items()
                                                                 if v is not None)) + "</p>"]
        if results.get("walk_forward_note"):
            parts.append(f"<p class='note'>{esc(results['walk_forward_note'])}</p>")
    else:
        rows = [{"run": "best (in-sample)", **summary.get("in_sample", {})}]
        if "baseline" in summary:
            rows.append({"run": "base configuration", **summary["baseline"]})
        parts += ["<h2>In-sample metrics of the best configuration</h2>",
                  "<p class='note'>These are in-sample: the same history chose the settings. Use --walk-forward "
                  "for out-of-sample figures.</p>",
                  _table_html(pd.DataFrame(rows))]
    parts += ["<h2>Overfitting statistics</h2>",
              "<p>DSR: probability that the chosen configuration's true Sharpe ratio is above zero after allowing for "
              "the number of trials tried (Bailey &amp; López de Prado 2014). PBO: share of combinatorially symmetric "
              "cross-validation splits where the in-sample best ranks at or below the median out of sample (Bailey, "
              "Borwein, López de Prado &amp; Zhu 2017); 0.5 is what pure noise gives.</p>",
              _table_html(stats)]
    for name, title in (("equity.png", "Equity"), ("fitness_by_phase.png", "Fitness by phase"),
                        ("heatmaps.png", "Parameter heatmaps"), ("sensitivity.png", "Sensitivity"),
                        ("pbo_logits.png", "PBO logits")):
        if images.get(name):
            encoded = base64.b64encode(images[name]).decode("ascii")
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{encoded}'>")
    parts += ["<h2>Phases</h2>", _table_html(phases)]
    if results["sensitivity"] is not None:
        parts += ["<h2>Sensitivity table</h2>", _table_html(results["sensitivity"])]
    parts.append("<p>Every trial: <code>trials.csv</code> / <code>trials.parquet</code>; the study: "
                 "<code>study.db</code> (Optuna).</p></body></html>")
    return "\n".join(parts)


def flat_phases(results: dict) -> list[str]:
    """Phases whose trials all gave the same value: their settings did not act on this data (for
    example the fuzzy weights when the risk budget caps every trade at one condor)."""
    notes = []
    for search in results["searches"]:
        for outcome in search.phases:
            values = {round(t.value, 12) for t in outcome.trials}
            if len(outcome.trials) > 1 and len(values) == 1:
                where = "" if search.window is None else f"{search.window.label}: "
                notes.append(f"{where}phase {outcome.phase.number} ({outcome.phase.title}): all "
                             f"{len(outcome.trials)} trials gave the same result, so its settings did not act here "
                             f"(the earliest trial is kept)")
    return notes


def infeasible_choices(results: dict, min_trades: int) -> list[str]:
    """Searches where no configuration reached the minimum trade count: their choice is the one
    with the most trades, not a fitness winner."""
    notes = []
    for search in results["searches"]:
        best = search.best
        if best is not None and best.fitness is None:
            where = "" if search.window is None else f" in {search.window.label}"
            notes.append(f"no configuration{where} reached --min-trades {min_trades} (the most was "
                         f"{best.metrics.get('trade_count')}): the choice is the one with the most trades, not a "
                         f"fitness winner; give a longer period or a lower --min-trades")
    return notes


def print_summary(console, settings, results: dict, written: dict) -> None:
    from rich.table import Table

    table = Table(title="Optimizer: best configuration")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key, value in results["best_overrides"].items():
        table.add_row(key, _short(value))
    console.print(table)
    summary = results.get("summary", {})
    stats = results["statistics"][-1] if results["statistics"] else {}
    if "out_of_sample" in summary:
        oos = summary["out_of_sample"]
        console.print(f"walk-forward out-of-sample (stitched): net {oos['net_profit']:,.2f}, max drawdown "
                      f"{oos['max_drawdown']:,.2f}, trades {oos['trades']}, Sharpe "
                      f"{_fmt(oos.get('sharpe'))}")
    elif "in_sample" in summary:
        ins = summary["in_sample"]
        console.print(f"in-sample (the period that chose it): net {_fmt(ins.get('net_profit'))}, max drawdown "
                      f"{_fmt(ins.get('max_drawdown'))}, trades {ins.get('trade_count')}, fitness "
                      f"{_fmt(ins.get('fitness'))}")
    if "baseline" in summary:
        base = summary["baseline"]
        console.print(f"base configuration (before the search): net {_fmt(base.get('net_profit'))}, max drawdown "
                      f"{_fmt(base.get('max_drawdown'))}, trades {base.get('trade_count')}, fitness "
                      f"{_fmt(base.get('fitness'))}")
    for note in infeasible_choices(results, settings.spec.min_trades) + flat_phases(results):
        console.print(f"[bold yellow]{note}[/bold yellow]")
    console.print(f"DSR {_fmt(stats.get('dsr'))}, PBO {_fmt(stats.get('pbo'))} over {stats.get('n_trials', 0)} trials; "
                  f"{results['trial_count']:,} trials, {results['trials_per_second']:.2f} trials/s "
                  f"({results['executor']}); chains are SYNTHETIC")
    folder = next(iter(written.values())).parent if written else None
    console.print(f"run folder: [bold]{folder}[/bold] (summary.html, trials.csv, best_config.yaml)")


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.2f}"
    return str(value)
