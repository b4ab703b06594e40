"""The stress test runner (`python core/main.py --mode stress`, the seed's
`scripts/backtest/run_stress_test.py`): how the configured iron-condor strategy fares under
parameter shocks, market shocks and the embedded data's historical crises.

Three kinds of scenario, each one ``run_backtest`` of the baseline configuration (fast driver
unless --engine is given), run in parallel on the optimizer's process pool:

* parameter shocks: every parameter of the seed's phase tables (``core.optimizer.SEED_PHASES``)
  moved one grid step down and up from the baseline value, the others held; return, drawdown and
  fitness (net profit / |max drawdown|, the optimizer's ``ratio``) beside the baseline's, ranked
  by |Δ return|, and a tornado chart of the Δ return and Δ max drawdown (a step that made no
  trade is shown as such, with the reason, never as a change);
* market shocks (``data_factory.shocks``) on the baseline period: IV × factor, overnight gaps,
  a vol-of-vol spike, at the --shock-dates sessions or at --shock-count sessions drawn with the
  run's seed;
* historical windows of the embedded data (2000–2002, 2008, Aug 2015, Feb 2018, Q4 2018 or
  any YYYY / START:END inside it): the strategy's worst day, worst week, max drawdown and time to
  recover beside SPY's (the S&P 500 proxy) over the same sessions.

Risk figures are measured on session closes (the strategy's equity at each session's last bar,
SPY's close), starting from the cash / the close before the window, so the two columns compare
like with like. Output: ``stress.csv`` (one table), ``stress.html``, ``tornado.png``,
``market_shocks.png``, ``windows.png``, ``config.yaml``, ``stress.json`` in one run folder that
appears complete or not at all.
"""
from __future__ import annotations

import base64
import html
import math
import os
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.config import Config, ConfigError
from core.optimizer import SEED_PHASES, ProcessExecutor, fitness, nearest_index
from data_factory.shocks import DEFAULT_SHOCKS, ShockSpec, parse_shock

# ----------------------------------------------------------------------------------------------
# Historical windows
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoricalWindow:
    name: str
    start: str            # the first date loaded (what the data allows)
    end: str
    note: str = ""


# The embedded IV index starts 2001-01-02: before it the GARCH(1,1) proxy has no fit (it needs 500
# returns, ≈ 1999–2000, before the first one; data_factory/garch_proxy.py), so no option chain can
# be synthesised for 2000. The named window keeps its name and says what it loads.
WINDOWS: dict[str, HistoricalWindow] = {
    "2000-2002": HistoricalWindow("2000-2002", "2001-01-02", "2002-12-31",
                                  "dot-com bust; loads 2001-01-02 … 2002-12-31 only: the GARCH IV proxy needs "
                                  "1999–2000 as its warm-up, so 2000 has no IV index; IV = GARCH(1,1) proxy (MODEL)"),
    "2008": HistoricalWindow("2008", "2008-01-02", "2008-12-31",
                             "financial crisis; IV = GARCH(1,1) proxy (MODEL), not the real VIX"),
    "aug2015": HistoricalWindow("aug2015", "2015-08-03", "2015-10-30",
                                "August 2015 flash crash (Aug 24) and its recovery; real VIX"),
    "feb2018": HistoricalWindow("feb2018", "2018-01-22", "2018-04-30",
                                "February 2018 'Volmageddon' (Feb 5) and its aftermath; real VIX"),
    "q4-2018": HistoricalWindow("q4-2018", "2018-10-01", "2018-12-31",
                                "Q4 2018 sell-off to the Dec 24 low; real VIX; the data ends 2018-12-31"),
}
DEFAULT_WINDOWS = tuple(WINDOWS)
REAL_VIX_FROM = pd.Timestamp("2014-01-03")


def data_span() -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last session a window can load: the first day of the embedded IV index (the
    GARCH proxy's first value) and the last daily bar."""
    from data_factory import embedded

    first = embedded.daily_iv_index().index[0]
    last = embedded.daily_bars("SPY").index[-1]
    return pd.Timestamp(first), pd.Timestamp(last)


def parse_windows(text: str | None) -> list[HistoricalWindow]:
    """``--windows``: names of ``WINDOWS``, a year (``2011``) or ``START:END`` dates, comma
    separated; ConfigError for an unknown name or a window outside the data."""
    if text is None:
        return [WINDOWS[name] for name in DEFAULT_WINDOWS]
    first, last = data_span()
    chosen = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.lower() in WINDOWS:
            chosen.append(WINDOWS[item.lower()])
            continue
        if item.isdigit() and len(item) == 4:
            start, end = pd.Timestamp(f"{item}-01-01"), pd.Timestamp(f"{item}-12-31")
        elif ":" in item:
            try:
                start, end = (pd.Timestamp(part) for part in item.split(":", 1))
            except ValueError:
                raise ConfigError(f"--windows {item!r}: cannot read START:END as dates (YYYY-MM-DD:YYYY-MM-DD)") from None
        else:
            raise ConfigError(f"--windows {item!r}: unknown window; use {', '.join(WINDOWS)}, a year (e.g. 2011) "
                              f"or START:END dates")
        if start > end:
            raise ConfigError(f"--windows {item!r}: the start {start.date()} is after the end {end.date()}")
        if start < first or end > last:
            raise ConfigError(f"--windows {item!r}: {start.date()} … {end.date()} is outside the data, "
                              f"{first.date()} … {last.date()} (the IV index, GARCH proxy before 2014, starts "
                              f"{first.date()}; the daily bars end {last.date()})")
        from data_factory.market_calendar import trading_sessions
        sessions = trading_sessions(start, end)
        if len(sessions) < 2:
            raise ConfigError(f"--windows {item!r}: fewer than two sessions between {start.date()} and {end.date()}")
        proxy = "IV = GARCH(1,1) proxy (MODEL) before 2014-01-03" if start < REAL_VIX_FROM else "real VIX"
        chosen.append(HistoricalWindow(item, str(sessions[0].date()), str(sessions[-1].date()), proxy))
    if not chosen:
        raise ConfigError("--windows: no window given")
    return chosen


def parse_shocks(text: str | None) -> list[ShockSpec]:
    names = DEFAULT_SHOCKS if text is None else [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise ConfigError("--shocks: no shock given")
    specs = [parse_shock(name) for name in names]
    seen = set()
    return [spec for spec in specs if not (spec in seen or seen.add(spec))]


def parse_shock_dates(text: str | None, start, end) -> list[pd.Timestamp] | None:
    """``--shock-dates`` as sessions inside the baseline period, or None (draw them)."""
    if text is None:
        return None
    from data_factory.market_calendar import is_session

    days = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            day = pd.Timestamp(item).normalize()
        except ValueError:
            raise ConfigError(f"--shock-dates {item!r}: cannot read it as a date (YYYY-MM-DD)") from None
        if not pd.Timestamp(start) <= day <= pd.Timestamp(end):
            raise ConfigError(f"--shock-dates {item}: outside the backtest period {start} … {end}")
        if not is_session(day):
            raise ConfigError(f"--shock-dates {item}: not an NYSE session (the market was closed)")
        days.append(day)
    if not days:
        raise ConfigError("--shock-dates: no date given")
    return sorted(set(days))


def draw_shock_sessions(sessions: pd.DatetimeIndex, count: int, seed: int, tail: int) -> list[pd.Timestamp]:
    """``count`` sessions drawn with ``seed``, none in the first 10 (indicator warm-up) nor the
    last ``tail`` (so the shock has sessions to act on)."""
    pool = sessions[10:max(10, len(sessions) - tail)]
    if len(pool) < count:
        raise ConfigError(f"--shock-count {count}: the period has only {len(pool)} sessions to shock "
                          f"(10 skipped at the start, {tail} at the end)")
    rng = np.random.default_rng(seed)
    return sorted(pool[np.sort(rng.choice(len(pool), size=count, replace=False))])


# ----------------------------------------------------------------------------------------------
# Risk on a path of session closes
# ----------------------------------------------------------------------------------------------


def path_risk(closes: Sequence[float], start_value: float) -> dict:
    """Worst day, worst week (5 sessions), max drawdown (all in percent, ≤ 0) and the sessions
    from the drawdown's trough back to its peak (None: not recovered by the last close) of a
    path of session closes starting from ``start_value``. Written here rather than taken from
    ``analytics.performance`` because that works on per-bar equity frames, and SPY's closes need
    the same numbers."""
    values = np.concatenate([[float(start_value)], np.asarray(closes, dtype=float)])
    if len(values) < 2 or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError("path_risk: need at least one finite positive close and a positive start value")
    daily = values[1:] / values[:-1] - 1.0
    span = min(5, len(values) - 1)
    weekly = values[span:] / values[:-span] - 1.0
    peak = np.maximum.accumulate(values)
    drawdown = values / peak - 1.0
    trough = int(np.argmin(drawdown))
    if drawdown[trough] >= 0:
        recovery, peak_at = 0, trough
    else:
        before = values[:trough + 1]
        peak_at = int(np.flatnonzero(before == before.max())[-1])     # the last time the peak was set
        back = np.flatnonzero(values[trough:] >= values[peak_at])
        recovery = int(back[0]) if len(back) else None
    return {"worst_day_pct": 100.0 * float(daily.min()), "worst_week_pct": 100.0 * float(weekly.min()),
            "max_drawdown_pct": 100.0 * float(drawdown[trough]), "drawdown_sessions": trough - peak_at,
            "recovery_sessions": recovery, "return_pct": 100.0 * (values[-1] / values[0] - 1.0)}


# ----------------------------------------------------------------------------------------------
# Jobs (run in the optimizer's worker processes)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StressJob:
    group: str                          # baseline | parameter | market | window
    name: str
    overrides: dict = field(default_factory=dict)
    shock: ShockSpec | None = None
    window: HistoricalWindow | None = None
    detail: str = ""


@dataclass
class StressContext:
    config: Config
    market: Any
    shock_sessions: list
    shock_length: int


_STRESS: StressContext | None = None


def install(context: StressContext) -> None:
    """This process's stress context, and the optimizer's trial context for the parameter runs
    (set in the parent before the pool forks, so the workers inherit the market and features)."""
    global _STRESS
    from core.optimizer import WorkerContext, install_context

    _STRESS = context
    install_context(WorkerContext(context.config, context.market))


def run_job(job: StressJob) -> dict:
    """One scenario's figures (see ``StressJob``)."""
    started = time.perf_counter()
    context = _STRESS
    if context is None:
        raise RuntimeError("stress worker has no context (install was not called)")
    cash = float(context.config.backtest.cash)
    if job.group in ("baseline", "parameter"):
        from core.optimizer import evaluate

        outcome = evaluate(job.overrides, None, True)
        if outcome["error"]:
            return {"error": outcome["error"], "seconds": time.perf_counter() - started}
        metrics = outcome["metrics"]
        if not metrics.get("trade_count"):
            metrics = {**metrics, **outcome.get("refusals", {})}
        return _row_figures(metrics, outcome["equity"], cash, started)
    from analytics.performance import session_closes
    from core.backtest_engine import run_backtest

    if job.group == "market":
        from data_factory.shocks import shocked_market

        market = shocked_market(context.market, job.shock, context.shock_sessions, context.shock_length,
                                seed=context.config.backtest.seed)
        config = context.config
        features = shocked_bar_features(config, market)
        result = run_backtest(config, market, features=features)
        closes = session_closes(result.equity["equity"])
        out = _row_figures(result.metrics, closes.to_numpy(), cash, started)
        out["spot_change_pct"] = 100.0 * (float(market.spot_scale[-1]) - 1.0)
        return out
    from core.market_data import bar_features, load_market

    window = job.window
    config = context.config.override({"backtest.start": window.start, "backtest.end": window.end},
                                     source=f"stress window {window.name}")
    market = load_market(config)
    result = run_backtest(config, market, features=bar_features(config, market))
    closes = session_closes(result.equity["equity"])
    out = _row_figures(result.metrics, closes.to_numpy(), cash, started)
    spy = spy_closes(config.backtest.underlying, market.sessions)
    out.update({f"spy_{key}": value for key, value in path_risk(spy["close"].iloc[1:], spy["close"].iloc[0]).items()})
    out["first_session"] = str(market.sessions[0].date())
    out["last_session"] = str(market.sessions[-1].date())
    strategy = pd.Series(np.concatenate([[cash], closes.to_numpy()]) / cash,
                         index=spy.index[:len(closes) + 1])
    out["curve"] = pd.DataFrame({"strategy": strategy, "spy": spy["close"] / spy["close"].iloc[0]})
    return out


def no_trade_reason(metrics: dict) -> tuple[str, str]:
    """Why a run made no trade: a short key (the sizing rule that cut every candidate to zero
    contracts, else the most frequent entry refusal; "" when the run does not say) and the
    sentence behind it."""
    from risk.risk_manager import SIZING_REASONS

    refusals = metrics.get("entry_rejections") or {}
    note = metrics.get("sizing_note")
    sized = {reason: count for reason, count in refusals.items() if reason in SIZING_REASONS and count}
    if note and sized:
        return max(sized.items(), key=lambda item: item[1])[0], note
    if refusals:
        reason, count = max(refusals.items(), key=lambda item: item[1])
        return reason, f"no trade; the most frequent entry refusal: {reason} ({count:,} bars)"
    return "", "no trade"


def _row_figures(metrics: dict, closes: np.ndarray, cash: float, started: float) -> dict:
    risk = path_risk(closes, cash) if len(closes) else {}
    trades = int(metrics.get("trade_count") or 0)
    out = {"error": None, "trades": trades, "sessions": len(closes),
           "fitness": fitness(metrics, "ratio", 1, cash), "net_profit": metrics.get("net_profit"),
           **risk, "seconds": time.perf_counter() - started}
    if not trades:
        out["no_trade_reason"], out["note"] = no_trade_reason(metrics)
    return out


def spy_closes(symbol: str, sessions: pd.DatetimeIndex) -> pd.DataFrame:
    """The underlying's daily closes over ``sessions`` with the close before the first one
    prepended (the embedded daily bars: S&P 500 / 10 for SPY)."""
    from data_factory import embedded

    daily = embedded.daily_bars(symbol, sessions[0] - pd.Timedelta(days=10), sessions[-1])
    before = daily.index[daily.index < sessions[0]]
    return daily.loc[before[-1:].append(sessions), ["close"]]


def shocked_bar_features(config: Config, market):
    """The feature table of a run on a ``ShockedMarket``: the embedded inputs
    (``core.market_data.embedded_feature_inputs``) with the shock applied where the strategy reads
    prices — the 1-minute base bars and the daily SPY and QQQ closes moved by each session's
    spot multiplier (a gap is market-wide, so the SPY/QQQ ratio does not see it as a divergence),
    the daily IV closes by the multiplier at each session's last bar — and the shocked per-bar IV
    index. Causal as the unshocked table is: the multipliers of a session apply from its open."""
    from core.market_data import load_configured_forecaster, neural_from_inputs, shocked_feature_inputs, uses_neural
    from core.skew_history import embedded_skew_reference
    from intelligence.features import BarFeatures, compute_bar_features

    inputs = shocked_feature_inputs(config, market)
    neural = None
    if uses_neural(config):
        forecaster = load_configured_forecaster(config, explicit=False)
        if forecaster is not None:
            neural, _ = neural_from_inputs(config, inputs, forecaster)
    features = compute_bar_features(config, inputs["base"], inputs["target"], market.iv_index_bars().to_numpy(),
                                    inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"], neural=neural,
                                    session_close_ns=inputs["session_close_ns"])
    reference = np.ascontiguousarray(embedded_skew_reference(config, market), dtype=float)
    return BarFeatures({**features.columns, "skew_reference": reference}, features.close_ns,
                       {**features.description, "shock": market.label})


def parameter_jobs(config: Config) -> list[StressJob]:
    """Each seed-phase parameter one grid step down and up from the baseline value (the
    optimizer's sensitivity rule: from the nearest grid value when the baseline is off the grid)."""
    jobs = []
    for phase in SEED_PHASES:
        for parameter in phase.parameters:
            section, name = parameter.path.split(".")
            current = getattr(getattr(config, section), name)
            values = list(parameter.values)
            at = nearest_index(values, current)
            for step in (-1, 1):
                k = at + step
                if 0 <= k < len(values) and values[k] != current:
                    jobs.append(StressJob("parameter", f"{parameter.path} {'down' if step < 0 else 'up'}",
                                          {parameter.path: values[k]},
                                          detail=f"{value_text(current)} → {value_text(values[k])}"))
    return jobs


def value_text(value) -> str:
    """A parameter value as a trader reads it: on/off for switches, 25 rather than 25.0."""
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def run_jobs(jobs: list[StressJob], workers: int, on_done=None) -> list[dict]:
    """Every job's figures, in the order given; ``on_done(job)`` after each. At most one job per
    worker is in flight, so a long job never holds a queue of short ones behind it."""
    results: list[dict | None] = [None] * len(jobs)
    if workers == 1:
        for i, job in enumerate(jobs):
            results[i] = run_job(job)
            if on_done:
                on_done(job)
        return results
    executor = ProcessExecutor(workers)
    try:
        pending = list(enumerate(jobs))
        in_flight: dict = {}
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                i, job = pending.pop(0)
                in_flight[executor.submit_call(run_job, job)] = i
            done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            for future in done:
                i = in_flight.pop(future)
                results[i] = future.result()
                if on_done:
                    on_done(jobs[i])
    finally:
        executor.close()
    return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

STRESS_DESTS = ("shocks", "windows", "no_param_shocks", "shock_dates", "shock_count", "shock_sessions")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("stress mode (--mode stress; --workers N sets the processes, default every core)")
    group.add_argument("--shocks", default=None, metavar="LIST",
                       help=f"market shocks: iv<factor>, gap<percent>, volvol[<factor>], or none "
                            f"(default: {','.join(DEFAULT_SHOCKS)})")
    group.add_argument("--windows", default=None, metavar="LIST",
                       help=f"historical windows: {', '.join(WINDOWS)}, a year or START:END, or none "
                            f"(default: all named)")
    group.add_argument("--no-param-shocks", action="store_true",
                       help="skip the one-grid-step parameter shocks")
    group.add_argument("--shock-dates", default=None, metavar="DATES",
                       help="sessions the market shocks hit, e.g. 2015-08-24,2018-02-05 (default: --shock-count "
                            "sessions drawn with --seed)")
    group.add_argument("--shock-count", type=int, default=None, metavar="N",
                       help="sessions drawn when --shock-dates is not given (default: 3)")
    group.add_argument("--shock-sessions", type=int, default=None, metavar="N",
                       help="how many sessions an iv or volvol shock lasts from each shock date (default: 5)")


def check_flags(parser, args) -> None:
    """Stress flags outside --mode stress, or flags stress mode would ignore, are refused."""
    given = [name for name in STRESS_DESTS if getattr(args, name) != parser.get_default(name)]
    if args.mode != "stress":
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a stress-mode flag: add --mode stress")
        return
    if args.use_optimizer:
        raise ConfigError("--use-optimizer runs the optimizer: drop it from --mode stress")
    if args.compare:
        raise ConfigError("--compare is a backtest-mode ablation; the stress runner does not run it (drop --compare)")


@dataclass
class StressPlan:
    jobs: list[StressJob]
    shocks: list[ShockSpec]
    windows: list[HistoricalWindow]
    shock_dates: list[pd.Timestamp] | None
    shock_count: int
    shock_length: int
    workers: int


def plan_from_args(args, config: Config) -> StressPlan:
    """Everything validated before any work (and before a folder exists)."""
    if config.backtest.options_data:
        raise ConfigError(f"--options-data {config.backtest.options_data}: the stress runner shocks the embedded "
                          f"synthetic chains and loads the embedded history; drop --options-data")
    none = lambda text: text is not None and text.strip().lower() == "none"  # noqa: E731
    shocks = [] if none(args.shocks) else parse_shocks(args.shocks)
    windows = [] if none(args.windows) else parse_windows(args.windows)
    count = 3 if args.shock_count is None else args.shock_count
    if count < 1:
        raise ConfigError(f"--shock-count {count}: must be at least 1")
    length = 5 if args.shock_sessions is None else args.shock_sessions
    if length < 1:
        raise ConfigError(f"--shock-sessions {length}: must be at least 1")
    dates = parse_shock_dates(args.shock_dates, config.backtest.start, config.backtest.end)
    if dates is not None and args.shock_count is not None:
        raise ConfigError("--shock-count draws sessions; with --shock-dates the dates are given: drop one")
    workers = args.workers if args.workers is not None else (len(os.sched_getaffinity(0))
                                                             if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    jobs = [StressJob("baseline", "baseline", detail="the configuration as given")]
    # Longest first, so the pool is not left waiting on one long job at the end.
    jobs += [StressJob("window", f"window {w.name}", window=w, detail=w.note)
             for w in sorted(windows, key=lambda w: pd.Timestamp(w.start) - pd.Timestamp(w.end))]
    jobs += [StressJob("market", spec.name, shock=spec, detail=spec.describe()) for spec in shocks]
    if not args.no_param_shocks:
        jobs += parameter_jobs(config)
    if len(jobs) == 1:
        raise ConfigError("nothing to stress: --shocks none, --windows none and --no-param-shocks leave only the baseline")
    return StressPlan(jobs, shocks, windows, dates, count, length, workers)


def run(args, config: Config, argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from core.market_data import bar_features, load_market
    from core.report import check_output_dir, default_run_dir

    if args.engine is None:
        config = config.override({"backtest.engine": "fast"}, source="stress mode (the fast driver)")
    plan = plan_from_args(args, config)
    out_dir = check_output_dir(args.out) if args.out else default_run_dir()
    console = Console()
    started = time.perf_counter()
    backtest = config.backtest
    with console.status(f"loading {backtest.start} … {backtest.end} and its features (shared by every worker)…"):
        market = load_market(config)
        bar_features(config, market)
        if plan.shocks:
            _warm_shock_kernel(market)
    shock_dates = plan.shock_dates
    if shock_dates is None:
        shock_dates = draw_shock_sessions(market.sessions, plan.shock_count, backtest.seed, tail=plan.shock_length)
    install(StressContext(config, market, list(shock_dates), plan.shock_length))
    labels = {"baseline": "baseline", "window": "historical windows", "market": "market shocks",
              "parameter": "parameter shocks"}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        tasks = {}
        for job in plan.jobs:
            if job.group not in tasks:
                tasks[job.group] = progress.add_task(labels[job.group],
                                                     total=sum(j.group == job.group for j in plan.jobs))
        results = run_jobs(plan.jobs, plan.workers, on_done=lambda job: progress.advance(tasks[job.group]))
    wall = time.perf_counter() - started
    table = stress_table(plan.jobs, results, shock_dates)
    info = {"command": "python core/main.py " + " ".join(argv), "workers": plan.workers,
            "wall_seconds": round(wall, 2), "runs": len(plan.jobs),
            "run_seconds": round(sum(r.get("seconds") or 0.0 for r in results), 2),
            "engine": config.backtest.engine, "period": [str(backtest.start), str(backtest.end)],
            "seed": backtest.seed, "shock_dates": [str(d.date()) for d in shock_dates],
            "shock_sessions": plan.shock_length,
            "synthetic": "option chains and intraday bars are SYNTHETIC (embedded daily data); IV before 2014-01-03 "
                         "is a GARCH(1,1) proxy (MODEL); market shocks are SYNTHETIC transformations"}
    curves = {job.window.name: result["curve"] for job, result in zip(plan.jobs, results)
              if job.group == "window" and not result.get("error")}
    with console.status("writing the run folder…"):
        written = write_stress_folder(out_dir, config, table, curves, info)
    for shown in rich_tables(table):
        console.print(shown)
    console.print(f"{len(plan.jobs)} runs in {wall:.1f} s on {plan.workers} worker(s) "
                  f"({info['run_seconds']:.1f} s of runs); option chains are SYNTHETIC")
    console.print(f"run folder: [bold]{written}[/bold]  (stress.html, stress.csv, tornado.png, market_shocks.png, "
                  f"windows.png)")
    return 0


def _warm_shock_kernel(market) -> None:
    # Compile the shock kernel once in the parent: forked workers inherit it instead of each
    # spending a second compiling.
    from data_factory.shocks import ShockedMarket

    shocked = ShockedMarket(market, np.full(len(market.bar_times), 0.99), np.ones(len(market.bar_times)))
    shocked.slice_at(len(market.bar_times) // 2, 20, 50)


# ----------------------------------------------------------------------------------------------
# The table and the outputs
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("group", "scenario", "detail", "first_session", "last_session", "sessions", "trades", "fitness",
                 "fitness_change", "return_pct", "return_change_pct", "max_drawdown_pct", "max_drawdown_change_pct",
                 "worst_day_pct", "worst_week_pct", "recovery_sessions", "spy_return_pct", "spy_max_drawdown_pct",
                 "spy_worst_day_pct", "spy_worst_week_pct", "spy_recovery_sessions", "no_trade_reason", "note",
                 "seconds", "error")


def stress_table(jobs: list[StressJob], results: list[dict], shock_dates) -> pd.DataFrame:
    """Every run, one row, raw numbers (stress.csv). The changes vs the baseline
    (``*_change*``) are blank for a run that made no trade: its flat equity (return 0 %) is not
    a result to compare, ``no_trade_reason`` and ``note`` say why it did not trade."""
    baseline = next((r for j, r in zip(jobs, results) if j.group == "baseline"), {})
    rows = []
    for job, result in zip(jobs, results):
        row = {"group": job.group, "scenario": job.name, "detail": job.detail}
        if job.group == "market":
            row["detail"] = f"{job.detail} at {', '.join(str(d.date()) for d in shock_dates)}"
        row.update({key: value for key, value in result.items() if key in TABLE_COLUMNS})
        if job.group in ("parameter", "market") and not result.get("error") and result.get("trades"):
            for key, change in (("fitness", "fitness_change"), ("return_pct", "return_change_pct"),
                                ("max_drawdown_pct", "max_drawdown_change_pct")):
                if result.get(key) is not None and baseline.get(key) is not None:
                    row[change] = result[key] - baseline[key]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# ----------------------------------------------------------------------------------------------
# Display (rounding for the eye only; stress.csv keeps the raw numbers)
# ----------------------------------------------------------------------------------------------

# What each displayed column means (the HTML headers' hover titles and the page's glossary).
DEFINITIONS = {
    "window": "the historical window of the embedded data (its name, or the year / START:END given)",
    "period": "first and last NYSE session loaded",
    "sessions": "NYSE sessions in the run (session closes measured)",
    "scenario": "the run: the baseline configuration, or the baseline under one market shock",
    "shock": "what the shock does to the synthetic market",
    "parameter": "the parameter moved one step of the optimizer's seed grid, the others held at the baseline",
    "step": "baseline value → the value run",
    "trades": "iron condors opened (and closed) in the run",
    "return": "account return over the run: last session close vs the starting cash",
    "Δ return": "return minus the baseline's return, in percentage points (pp); + = better than the baseline",
    "max DD": "max drawdown: the deepest fall of the account below its running peak, on session closes",
    "Δ max DD": "max drawdown minus the baseline's, in percentage points; + = a shallower drawdown",
    "worst day": "worst one-session return (session close to session close)",
    "worst week": "worst 5-session return (close to the close 5 sessions later)",
    "recovery": "sessions from the max drawdown's trough back to the prior peak; 'not recovered' = still below "
                "it at the window's last session; 0 = no drawdown",
    "fitness": "net profit / |max drawdown| (the optimizer's ratio objective); blank for a run without trades",
    "Δ fitness": "fitness minus the baseline's fitness",
    "SPY": "SPY proxy = S&P 500 / 10 (the embedded daily closes) over the same sessions, from the close before "
           "the first",
}

NO_TRADES = "no trades"


def _num(value) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _fmt(value, kind: str = "pct") -> str:
    """``pct``: +1.23% · ``pp``: +1.23 pp (a change of a percentage) · ``num``: +0.983 ·
    ``int``: 351 · anything else: as text; blank for a missing value."""
    number = _num(value)
    if kind not in ("pct", "pp", "num", "int"):
        return _text(value)
    if number is None:
        return ""
    if kind == "int":
        return f"{int(round(number))}"
    digits = 3 if kind == "num" else 2
    if round(number, digits) == 0:               # no "-0.00": a sign only where a digit shows
        return f"{0:.{digits}f}" + {"pct": "%", "pp": " pp", "num": ""}[kind]
    if kind == "pct":
        return f"{number:+.2f}%"
    if kind == "pp":
        return f"{number:+.2f} pp"
    if kind == "num":
        return f"{number:+.3f}"
    return f"{int(round(number))}"


def _recovery(row, prefix: str = "", short: bool = False) -> str:
    drawdown = _num(row.get(f"{prefix}max_drawdown_pct"))
    if drawdown is None:
        return ""
    value = _num(row.get(f"{prefix}recovery_sessions"))
    if value is None:
        return "not rec." if short else "not recovered"
    return f"{int(value)}" if short else f"{int(value)} sessions"


def _error(row) -> str | None:
    error = row.get("error")
    return error if isinstance(error, str) and error else None


def _traded(row) -> bool:
    return bool(_num(row.get("trades")))


def parameter_label(row) -> str:
    """``momentum.adx_threshold_low down`` with detail ``25 → 20`` → ``adx_threshold_low 25→20``."""
    name = str(row["scenario"]).rsplit(" ", 1)[0].split(".")[-1]
    step = _text(row.get("detail")).replace(" → ", "→")
    return f"{name} {step}".strip()


def reason_text(row) -> str:
    """A no-trade row's reason in a few words (the full sentence is the row's ``note``)."""
    from risk.risk_manager import SIZING_REASONS

    reason = _text(row.get("no_trade_reason"))
    if not reason:
        return NO_TRADES
    if reason == "risk_budget":
        return "no trades: one condor's max loss exceeds the per-trade risk budget"
    if reason in SIZING_REASONS:
        return f"no trades: every candidate sized to 0 contracts ({reason})"
    return f"no trades: entries refused, mostly {reason}"


def ranked_parameters(table: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """The parameter rows that traded, largest |Δ return| first (then |Δ max DD|), and those
    that made no trade or failed."""
    rows = [row for row in table.to_dict("records") if row["group"] == "parameter"]
    traded = [row for row in rows if not _error(row) and _traded(row)]
    traded.sort(key=lambda row: (-abs(_num(row.get("return_change_pct")) or 0.0),
                                 -abs(_num(row.get("max_drawdown_change_pct")) or 0.0)))
    return traded, [row for row in rows if _error(row) or not _traded(row)]


def _windows_in_time_order(records: list[dict]) -> list[dict]:
    # The runs go longest first (for the pool); a reader wants them in time order.
    windows = [row for row in records if row["group"] == "window"]
    return sorted(windows, key=lambda row: _text(row.get("first_session")) or "9999")


TERMINAL_PARAMETERS = 10


def rich_tables(table: pd.DataFrame, top: int = TERMINAL_PARAMETERS) -> list:
    """What the terminal shows, each table fitting 80 columns untruncated: the historical windows
    beside SPY, the market shocks beside the baseline, and the ``top`` parameter steps by
    |Δ return| (plus the steps that made no trade); the rest is in stress.csv / stress.html."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def new_table(title: str, columns: Sequence[str]) -> Table:
        shown = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, title_justify="left",
                      title_style="bold", collapse_padding=True)
        for i, column in enumerate(columns):
            shown.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
        return shown

    records = table.to_dict("records")
    out = []
    windows = _windows_in_time_order(records)
    if windows:
        shown = new_table("Historical windows: strategy vs SPY (session closes)",
                          ("window", "sessions", "return", "max DD", "worst\nday", "SPY\nreturn", "SPY\nmax DD",
                           "SPY\nworst day"))
        for row in windows:
            name = str(row["scenario"]).removeprefix("window ")
            if _error(row):
                shown.add_row(name, "error", *[""] * 6)
                continue
            shown.add_row(name, _fmt(row.get("sessions"), "int"), _fmt(row["return_pct"]),
                          _fmt(row["max_drawdown_pct"]), _fmt(row["worst_day_pct"]), _fmt(row["spy_return_pct"]),
                          _fmt(row["spy_max_drawdown_pct"]), _fmt(row["spy_worst_day_pct"]))
        out += [shown, Text("worst week and recovery: stress.csv / stress.html")]
    market = [row for row in records if row["group"] in ("baseline", "market")]
    if len(market) > 1:
        dates = next((_text(row["detail"]).split(" at ", 1)[-1] for row in market if row["group"] == "market"), "")
        shown = new_table("Market shocks on the baseline period", ("scenario", "trades", "return", "Δ return",
                                                                    "max DD", "worst day"))
        for row in market:
            if _error(row):
                shown.add_row(row["scenario"], "error", *[""] * 4)
                continue
            change = _fmt(row["return_change_pct"], "pp") if _traded(row) or row["group"] == "baseline" else NO_TRADES
            shown.add_row(row["scenario"], _fmt(row["trades"], "int"), _fmt(row["return_pct"]), change,
                          _fmt(row["max_drawdown_pct"]), _fmt(row["worst_day_pct"]),
                          end_section=row["group"] == "baseline")
        out += [shown, Text(f"shocks hit {dates}; Δ return: percentage points (pp) vs the baseline")]
    traded, others = ranked_parameters(table)
    if traded or others:
        shown_rows = traded[:top]
        shown = new_table(f"Parameter shocks: the {len(shown_rows)} largest |Δ return| of {len(traded) + len(others)} "
                          f"one-grid-step moves", ("parameter step", "trades", "return", "Δ return", "Δ max DD"))
        for row in shown_rows:
            shown.add_row(parameter_label(row), _fmt(row["trades"], "int"), _fmt(row["return_pct"]),
                          _fmt(row["return_change_pct"], "pp"), _fmt(row["max_drawdown_change_pct"], "pp"),
                          end_section=row is shown_rows[-1] and bool(others))
        reasons: dict[str, list[str]] = {}
        for row in others:
            label = parameter_label(row)
            if _error(row):
                shown.add_row(label, "", "", "error", "", style="red")
                reasons.setdefault(f"error: {_error(row)}", []).append(label)
            else:
                shown.add_row(label, _fmt(row["trades"], "int"), _fmt(row["return_pct"]), NO_TRADES, "",
                              style="yellow")
                reasons.setdefault(reason_text(row), []).append(label)
        out.append(shown)
        for reason, labels in reasons.items():
            head, _, why = reason.partition(": ")
            out.append(Text(f"{head} ({', '.join(labels)})" + (f": {why}" if why else ""), style="yellow"))
        rest = len(traded) - len(shown_rows)
        if rest > 0:
            out.append(Text(f"… {rest} more in stress.csv / stress.html"))
    return out


def tornado_data(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """What the tornado plots: the parameter steps that traded (columns ``parameter`` (the full
    path), ``step`` (down / up) and ``value`` (the value run) added), the parameters that moved
    return or drawdown by 0.005 pp or more, smallest swing first (matplotlib draws the first at
    the bottom), the parameters that changed neither (none of whose steps lost every trade), and
    the labels of the steps without trades."""
    parameters = table[table["group"] == "parameter"]
    traded = parameters["trades"].fillna(0).astype(float).gt(0) & parameters["return_change_pct"].notna()
    rows = parameters[traded]
    parts = rows["scenario"].astype(str).str.rsplit(" ", n=1)
    rows = rows.assign(parameter=parts.str[0], step=parts.str[1],
                       value=rows["detail"].astype(str).str.split(" → ").str[-1])
    size = rows.assign(ret=rows["return_change_pct"].abs(), dd=rows["max_drawdown_change_pct"].abs().fillna(0.0)) \
        .groupby("parameter")[["ret", "dd"]].max()
    moved = size[(size["ret"] >= 0.005) | (size["dd"] >= 0.005)].sort_values(["ret", "dd"])
    blank = [row for row in parameters.to_dict("records") if not _error(row) and not _traded(row)]
    silent = [parameter_label(row) for row in blank]
    still = sorted(set(size.index) - set(moved.index) - {str(row["scenario"]).rsplit(" ", 1)[0] for row in blank})
    return rows, list(moved.index), still, silent


def render_tornado_png(table: pd.DataFrame) -> bytes | None:
    """The parameter steps' Δ return (pp vs the baseline) and Δ max drawdown, one bar per step
    either way, largest |Δ return| swing on top.

    Δ return, not Δ fitness, sets the bars: fitness (net profit / |max drawdown|) saturates at −1
    when the equity only falls (net profit ≈ max drawdown), so a losing baseline's steps all
    read ≈ −0.98 and the fitness tornado is flat. The second panel is Δ max drawdown rather
    than Δ fitness: it is in the same unit (pp, + = better) and says whether a step's return
    comes with a deeper or a shallower drawdown, which is what fitness would have summarised;
    Δ fitness stays in the tables. Steps without trades are left out (their 0 % return is no
    result) and named under the chart, as are the parameters that changed nothing."""
    rows, moved, still, silent = tornado_data(table)
    if not moved:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    still = [path.split(".")[-1] for path in still]
    import textwrap

    notes = ([textwrap.fill("no trades, not shown: " + ", ".join(silent), 150)] if silent else []) + \
            ([textwrap.fill("no effect on return or drawdown either way: " + ", ".join(still), 150)] if still else [])
    note_lines = sum(note.count("\n") + 1 for note in notes)
    height = 0.42 * max(len(moved), 3) + 2.0 + 0.17 * note_lines
    figure, panels = plt.subplots(1, 2, figsize=(12, height), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    colors = {"down": "#c0392b", "up": "#2471a3"}
    for axes, column, label in ((panels[0], "return_change_pct", "Δ return vs baseline (pp; + = better)"),
                                (panels[1], "max_drawdown_change_pct", "Δ max drawdown (pp; + = shallower)")):
        values = []
        for y, parameter in enumerate(moved):
            steps = rows[rows["parameter"] == parameter]
            both = len(steps) > 1
            for _, step in steps.iterrows():
                value = float(step[column]) if pd.notna(step[column]) else 0.0
                offset = (-0.2 if step["step"] == "down" else 0.2) if both else 0.0
                axes.barh(y + offset, value, height=0.38 if both else 0.6, color=colors.get(step["step"], "#7f8c8d"),
                          alpha=0.85, label=f"one grid step {step['step']}")
                values.append(value)
                if column == "return_change_pct":
                    axes.annotate(f"→{step['value']}", (value, y + offset), xytext=(3 if value >= 0 else -3, 0),
                                  textcoords="offset points", ha="left" if value >= 0 else "right", va="center",
                                  fontsize=7, color="#333333")
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_xlabel(label, fontsize=9)
        axes.grid(axis="x", color="#dddddd", linewidth=0.6)
        axes.tick_params(labelsize=8)
        span = max([abs(v) for v in values] + [0.01])
        axes.set_xlim(-1.3 * span, 1.3 * span)
    baseline = table[table["group"] == "baseline"]
    base = (f"baseline return {_fmt(baseline['return_pct'].iloc[0])}, "
            f"max DD {_fmt(baseline['max_drawdown_pct'].iloc[0])}") if len(baseline) else ""
    panels[0].set_yticks(range(len(moved)), [path.split(".")[-1] for path in moved])
    panels[0].set_ylim(-0.7, len(moved) - 0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))
        panels[0].legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    figure.suptitle(f"Parameter shocks: one grid step either way, largest swing on top ({base}; SYNTHETIC chains)",
                    fontsize=10)
    if notes:
        figure.text(0.01, 0.01, "\n".join(notes), fontsize=7.5, va="bottom", ha="left", color="#555555")
    figure.tight_layout(rect=(0, (0.17 * note_lines + 0.1) / height if notes else 0, 1, 1))
    return _png(figure, layout=False)


def render_shocks_png(table: pd.DataFrame) -> bytes | None:
    """Each market shock's Δ return, Δ max drawdown and Δ worst day vs the baseline (pp; + =
    better): the absolute figures sit within a point or two of the baseline's, so bars of them
    would all look alike, and a gap shows in the worst day more than in the return. A shock run
    without trades is named under the chart instead."""
    market = table[table["group"] == "market"]
    rows = market[market["return_change_pct"].notna()]
    if rows.empty:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = table[table["group"] == "baseline"]
    base_day = float(baseline["worst_day_pct"].iloc[0]) if len(baseline) else np.nan
    rows = rows.iloc[::-1].assign(worst_day_change=lambda r: r["worst_day_pct"].astype(float) - base_day)
    figure, axes = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.8))
    y = np.arange(len(rows))
    labels = [f"{row['scenario']}  ({_text(row['detail']).split(' at ', 1)[0]})" for _, row in rows.iterrows()]
    bars = (("return_change_pct", 0.27, "#2471a3", "Δ return"),
            ("max_drawdown_change_pct", 0.0, "#c0392b", "Δ max drawdown (+ = shallower)"),
            ("worst_day_change", -0.27, "#7d3c98", "Δ worst day (+ = milder)"))
    for column, offset, color, label in bars:
        values = rows[column].astype(float)
        axes.barh(y + offset, values.fillna(0.0), height=0.26, color=color, label=label)
        for yy, value in zip(y, values):
            if pd.notna(value):
                axes.annotate(f"{value:+.2f}", (value, yy + offset), xytext=(3 if value >= 0 else -3, 0),
                              textcoords="offset points", ha="left" if value >= 0 else "right", va="center",
                              fontsize=7)
    span = np.nanmax(np.abs(rows[[column for column, *_ in bars]].to_numpy(dtype=float)))
    span = max(float(span) if np.isfinite(span) else 0.0, 0.05)
    axes.set_xlim(-1.35 * span, 1.35 * span)
    axes.set_yticks(y, labels, fontsize=8)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.grid(axis="x", color="#dddddd", linewidth=0.6)
    axes.set_xlabel("change vs the baseline (percentage points; + = better)", fontsize=9)
    base = (f"\nbaseline: return {_fmt(baseline['return_pct'].iloc[0])}, max DD "
            f"{_fmt(baseline['max_drawdown_pct'].iloc[0])}, worst day {_fmt(base_day)}") if len(baseline) else ""
    axes.set_title(f"Market shocks: change vs the baseline (SYNTHETIC){base}", fontsize=10)
    axes.legend(fontsize=8, loc="best")
    silent = [str(name) for name in market.loc[market["trades"].fillna(0).astype(float).eq(0), "scenario"]]
    if silent:
        figure.text(0.01, 0.01, "no trades, not shown: " + ", ".join(silent), fontsize=7.5, color="#555555")
        figure.tight_layout(rect=(0, 0.06, 1, 1))
        return _png(figure, layout=False)
    return _png(figure)


def render_windows_png(curves: dict) -> bytes | None:
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = dict(sorted(curves.items(), key=lambda item: item[1].index[0]))     # in time order
    figure, grid = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.2), squeeze=False)
    for axes, (name, curve) in zip(grid[0], curves.items()):
        axes.plot(curve.index, curve["strategy"], label="strategy", color="#2471a3")
        axes.plot(curve.index, curve["spy"], label="SPY", color="#7f8c8d")
        axes.set_title(name, fontsize=9)
        axes.tick_params(labelsize=7)
        for label in axes.get_xticklabels():
            label.set_rotation(30)
    grid[0][0].legend(fontsize=7)
    figure.suptitle("Historical windows: equity / SPY, 1 = start (session closes)", fontsize=10)
    return _png(figure)


def _png(figure, layout: bool = True) -> bytes:
    import io

    import matplotlib.pyplot as plt

    if layout:
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _th(label: str, span: int = 1, title: str | None = None, css: str = "", rows: int = 1) -> str:
    title = DEFINITIONS.get(label) if title is None else title
    attributes = (f" colspan='{span}'" if span > 1 else "") + (f" rowspan='{rows}'" if rows > 1 else "") \
        + (f" class='{css}'" if css else "") \
        + (f" title='{html.escape(title, quote=True)}'" if title else "")
    return f"<th{attributes}>{html.escape(label)}</th>"


def _td(text: str, css: str = "", title: str | None = None, span: int = 1, raw: bool = False) -> str:
    attributes = (f" colspan='{span}'" if span > 1 else "") + (f" class='{css}'" if css else "") \
        + (f" title='{html.escape(title, quote=True)}'" if title else "")
    return f"<td{attributes}>{text if raw else html.escape(text)}</td>"


def _change_td(value, kind: str = "pp") -> str:
    number = _num(value)
    css = "num" + ("" if number is None or abs(number) < 0.005 else " up" if number > 0 else " down")
    return _td(_fmt(value, kind), css)


def _table(head: str, body: list[str], css: str = "") -> str:
    return (f"<div class='scroll'><table class='{css}'><thead>{head}</thead><tbody>{''.join(body)}</tbody>"
            f"</table></div>")


def _windows_html(rows: list[dict]) -> str:
    head = ("<tr>" + _th("window", css="left", rows=2) + _th("period", css="left", rows=2)
            + _th("sessions", rows=2) + _th("trades", rows=2)
            + _th("strategy", 5, "the configured iron-condor strategy on the window (SYNTHETIC chains)", "group")
            + _th("SPY", 5, DEFINITIONS["SPY"], "group spy") + "</tr><tr>"
            + "".join(_th(label, title=DEFINITIONS[label]) for label in
                      ("return", "max DD", "worst day", "worst week", "recovery"))
            + "".join(_th(label, title="SPY: " + DEFINITIONS[label], css="spy" if i == 0 else "")
                      for i, label in enumerate(("return", "max DD", "worst day", "worst week", "recovery")))
            + "</tr>")
    notes: list[str] = []
    body = []
    for row in rows:
        note = _text(row.get("detail"))
        mark = ""
        if note:
            if note not in notes:
                notes.append(note)
            mark = f"<sup>{notes.index(note) + 1}</sup>"
        name = html.escape(str(row["scenario"]).removeprefix("window ")) + mark
        cells = [_td(name, "left", note or None, raw=True)]
        if _error(row):
            body.append("<tr>" + "".join(cells) + _td(f"error: {_error(row)}", "left error", span=13) + "</tr>")
            continue
        period = f"{_text(row.get('first_session'))} → {_text(row.get('last_session'))}"
        cells += [_td(period, "left"), _td(_fmt(row.get("sessions"), "int"), "num"),
                  _td(_fmt(row.get("trades"), "int") if _traded(row) else "0 (no trades)", "num",
                      None if _traded(row) else _text(row.get("note")))]
        for prefix in ("", "spy_"):
            cells += [_td(_fmt(row.get(f"{prefix}{key}")), "num" + (" spy" if prefix and i == 0 else ""))
                      for i, key in enumerate(("return_pct", "max_drawdown_pct", "worst_day_pct", "worst_week_pct"))]
            cells.append(_td(_recovery(row, prefix), "num"))
        body.append("<tr>" + "".join(cells) + "</tr>")
    footnotes = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (_table(head, body) + (f"<ol class='notes'>{footnotes}</ol>" if footnotes else ""))


def _market_html(rows: list[dict]) -> str:
    labels = ("scenario", "shock", "trades", "return", "Δ return", "max DD", "Δ max DD", "worst day",
              "worst week", "fitness")
    head = "<tr>" + "".join(_th(label, css="left" if i < 2 else "") for i, label in enumerate(labels)) + "</tr>"
    body = []
    for row in rows:
        baseline = row["group"] == "baseline"
        shock = "—" if baseline else _text(row.get("detail")).split(" at ", 1)[0]
        cells = [_td(str(row["scenario"]), "left"), _td(shock, "left")]
        if _error(row):
            cells.append(_td(f"error: {_error(row)}", "left error", span=len(labels) - 2))
        elif not _traded(row) and not baseline:
            cells += [_td("0", "num"), _td(reason_text(row), "left notrade", _text(row.get("note")),
                                           span=len(labels) - 3)]
        else:
            cells += [_td(_fmt(row.get("trades"), "int"), "num"), _td(_fmt(row.get("return_pct")), "num"),
                      _td("", "num") if baseline else _change_td(row.get("return_change_pct")),
                      _td(_fmt(row.get("max_drawdown_pct")), "num"),
                      _td("", "num") if baseline else _change_td(row.get("max_drawdown_change_pct")),
                      _td(_fmt(row.get("worst_day_pct")), "num"), _td(_fmt(row.get("worst_week_pct")), "num"),
                      _td(_fmt(row.get("fitness"), "num"), "num")]
        body.append(f"<tr{' class=baseline' if baseline else ''}>" + "".join(cells) + "</tr>")
    return _table(head, body)


def _parameters_html(table: pd.DataFrame) -> str:
    labels = ("parameter", "step", "trades", "return", "Δ return", "max DD", "Δ max DD", "worst day", "fitness",
              "Δ fitness")
    head = ("<tr>" + _th("#", title="rank by |Δ return| (— : the step made no trade)")
            + "".join(_th(label, css="left" if i < 2 else "") for i, label in enumerate(labels)) + "</tr>")
    traded, others = ranked_parameters(table)
    body = []
    for row in others:
        path = str(row["scenario"]).rsplit(" ", 1)[0]
        cells = [_td("—"), _td(path, "left"), _td(_text(row.get("detail")), "left")]
        if _error(row):
            cells.append(_td(f"error: {_error(row)}", "left error", span=len(labels) - 2))
        else:
            cells += [_td("0", "num"), _td(reason_text(row), "left notrade", _text(row.get("note")),
                                           span=len(labels) - 3)]
        body.append("<tr class='notrade'>" + "".join(cells) + "</tr>")
    for rank, row in enumerate(traded, 1):
        path = str(row["scenario"]).rsplit(" ", 1)[0]
        flat = all(abs(_num(row.get(key)) or 0.0) < 0.005 for key in ("return_change_pct", "max_drawdown_change_pct"))
        cells = [_td(str(rank), "num"), _td(path, "left"), _td(_text(row.get("detail")), "left"),
                 _td(_fmt(row.get("trades"), "int"), "num"), _td(_fmt(row.get("return_pct")), "num"),
                 _change_td(row.get("return_change_pct")), _td(_fmt(row.get("max_drawdown_pct")), "num"),
                 _change_td(row.get("max_drawdown_change_pct")), _td(_fmt(row.get("worst_day_pct")), "num"),
                 _td(_fmt(row.get("fitness"), "num"), "num"), _change_td(row.get("fitness_change"), "num")]
        body.append(f"<tr{' class=flat' if flat else ''}>" + "".join(cells) + "</tr>")
    return _table(head, body)


STRESS_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:20px 28px;color:#222;max-width:1500px}"
    "h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;"
    "padding-bottom:3px}p{margin:6px 0;font-size:13px;line-height:1.45}.meta{color:#555}"
    ".warn{background:#fff6e0;border-left:4px solid #e0a800;padding:6px 10px}"
    ".scroll{overflow-x:auto;max-width:100%;margin:6px 0}"
    "table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}"
    "td,th{border:1px solid #d5d5d5;padding:3px 8px;white-space:nowrap;text-align:right}"
    "th{background:#f1f3f5;font-weight:600}th[title]{cursor:help;text-decoration:underline dotted #999}"
    "th.group{text-align:center;background:#e3ecf6}th.group.spy{background:#ececec}"
    ".left{text-align:left}td.spy,th.spy{border-left:2px solid #999}"
    "td.up{color:#1e7b34}td.down{color:#b03a2e}tr.baseline td{font-weight:600;background:#f6f8fa}"
    "tr.notrade td{background:#fff6e0}td.notrade{color:#8a5a00;font-weight:600;cursor:help}"
    "tr.flat td{color:#999}td.error{color:#b03a2e}"
    "ol.notes{font-size:12px;color:#555;margin:4px 0 0 18px;padding:0}"
    "dl{font-size:12.5px;display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}"
    "dd{margin:0}img{max-width:100%;display:block;margin:6px 0 18px}"
)


def stress_html(table: pd.DataFrame, pngs: dict, info: dict) -> str:
    """stress.html: the historical windows beside SPY, the market shocks, the parameter
    sensitivity ranked by |Δ return|, then the charts and a glossary; every header says what
    it measures on hover. Display rounding only (stress.csv has the raw numbers)."""
    records = table.to_dict("records")
    baseline = next((row for row in records if row["group"] == "baseline"), None)
    windows = _windows_in_time_order(records)
    market = [row for row in records if row["group"] in ("baseline", "market")]
    parameters = [row for row in records if row["group"] == "parameter"]
    parts = ["<h1>Stress test — SPY iron condor</h1>",
             f"<p class='meta'>{html.escape(info['command'])}<br>{info['runs']} runs in {info['wall_seconds']} s on "
             f"{info['workers']} worker(s), {html.escape(str(info['engine']))} driver · baseline period "
             f"{html.escape(' → '.join(info['period']))} · seed {html.escape(str(info.get('seed')))}</p>",
             f"<p class='warn'>{html.escape(info['synthetic'])}.</p>"]
    if baseline is not None and not _error(baseline):
        parts.append(
            f"<p><b>Baseline</b> ({html.escape(' → '.join(info['period']))}): {_fmt(baseline.get('trades'), 'int')} "
            f"trades, return {_fmt(baseline.get('return_pct'))}, "
            f"max drawdown {_fmt(baseline.get('max_drawdown_pct'))}, "
            f"worst day {_fmt(baseline.get('worst_day_pct'))}, worst week {_fmt(baseline.get('worst_week_pct'))}, "
            f"fitness {_fmt(baseline.get('fitness'), 'num')}. Every Δ below is against these figures, in percentage "
            f"points (pp); + is better (a higher return, a shallower drawdown).</p>")
    if windows:
        parts += ["<h2>Historical windows vs SPY</h2>",
                  "<p>The strategy run on each window of the embedded history, beside SPY (S&amp;P 500 / 10) over the "
                  "same sessions; both measured on session closes from the starting cash / the close before the "
                  "window.</p>", _windows_html(windows)]
    if len(market) > 1:
        dates = ", ".join(info.get("shock_dates") or [])
        parts += ["<h2>Market shocks</h2>",
                  f"<p>The baseline period with the synthetic market shocked at {html.escape(dates)}: iv and volvol "
                  f"shocks last {info.get('shock_sessions')} sessions from each date; gaps are overnight and "
                  f"permanent (the chain is repriced from the moved spot).</p>", _market_html(market)]
    if parameters:
        traded, others = ranked_parameters(table)
        parts += ["<h2>Parameter sensitivity</h2>",
                  f"<p>Each parameter of the optimizer's seed grid moved one grid step down and up from the baseline, "
                  f"the others held: {len(parameters)} runs, ranked by |Δ return|"
                  + (f"; the {len(others)} step(s) that made no trade first (hover for why)" if others else "")
                  + ". Grey rows changed neither return nor drawdown.</p>", _parameters_html(table)]
    charts = [(title, png) for title, png in pngs.items() if png]
    if charts:
        parts.append("<h2>Charts</h2>")
        parts += [f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title, quote=True)}' "
                  f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>" for title, png in charts]
    glossary = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>"
                       for name, text in DEFINITIONS.items())
    parts += ["<h2>Definitions</h2>", f"<dl>{glossary}</dl>",
              "<p class='meta'>stress.csv holds every run with the raw numbers (no rounding).</p>"]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>CondorBrain stress test</title>"
            f"<style>{STRESS_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_stress_folder(out_dir, config: Config, table: pd.DataFrame, curves: dict, info: dict):
    """The run folder, staged beside it and renamed into place (complete or not at all)."""
    from pathlib import Path

    import yaml

    from core.report import check_output_dir, csv_ready, staged_folder, to_json, to_plain

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    pngs = {}
    if config.backtest.plot:
        pngs = {"Parameter sensitivity: Δ return and Δ max drawdown (tornado.png)": render_tornado_png(table),
                "Market shocks: change vs the baseline (market_shocks.png)": render_shocks_png(table),
                "Historical windows: equity vs SPY (windows.png)": render_windows_png(curves)}
    files = dict(zip(("tornado.png", "market_shocks.png", "windows.png"), pngs.values()))
    with staged_folder(out_dir) as staging:
        csv_ready(table).to_csv(staging / "stress.csv", index=False, lineterminator="\n")
        (staging / "stress.json").write_text(to_json(info), encoding="utf-8")
        (staging / "config.yaml").write_text(
            "# CondorBrain resolved configuration (the stress baseline)\n"
            + yaml.safe_dump(to_plain(config.to_dict()), sort_keys=False, allow_unicode=True), encoding="utf-8")
        for name, png in files.items():
            if png:
                (staging / name).write_bytes(png)
        (staging / "stress.html").write_text(stress_html(table, pngs, info), encoding="utf-8")
    return out_dir
