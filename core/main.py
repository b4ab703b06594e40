"""CondorBrain command line: `python core/main.py --mode MODE [options]`.

Modes:
  backtest  replay the iron-condor strategy over the embedded (or configured) data and write a run
            folder (config, data description, trades, equity, metrics, plot, HTML report).
  optimize  the seed's 6-phase serial optimizer (core/optimizer.py): Optuna grid or TPE search,
            resumable study, process pool or Ray, walk-forward, deflated Sharpe, PBO, sensitivity.
            `--mode backtest --use-optimizer` runs it too (the seed's command).
  data      what the embedded data is (sources, periods, what is synthetic) and the synthetic
            option chain a strategy would see at one bar.
  stress    the stress test (core/stress.py): parameter shocks, IV/gap/vol-of-vol market shocks and
            the embedded data's historical crises, side by side with SPY, in one run folder.
  live      paper-trade the strategy on Alpaca (core/live.py): the same engine and risk manager,
            each condor one multi-leg order, a journal that makes restarts safe (`--alpaca` is the
            seed's spelling; `--dry-run` decides and journals without sending).

Errors in flags, configuration or data print one message and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python core/main.py` puts core/ on sys.path, not the project root; make the packages importable
# without requiring an installed copy.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(_PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(_PROJECT_ROOT))

USAGE_ERROR = 2


SIZING_HELP = """\
How a trade is sized (the risk manager, risk/risk_manager.py): contracts = the smallest of
  base        --quantity; with --dynamic-sizing Q_budget = floor(--position-size-pct x equity / max loss
              per condor), and with --use-fuzzy Q_fuzzy = max(1, floor(C x Q_budget))
  risk budget Q_risk = floor(--max-account-risk x equity / max loss per condor)
  allocation  open condors' max loss + this one's within --max-alloc x equity, and within the cash
  Greeks      the trade's and the portfolio's net delta (shares), gamma (shares per $1), vega ($ per
              vol point), theta ($ per day) within risk.max_trade_* and --max-portfolio-*
  0 contracts = no trade, counted by rule. Example: $25,000, a $5-wide condor for $0.80 (max loss
  $420): Q_budget 2, C 0.78 -> Q_fuzzy 1, Q_risk floor(500/420) = 1 -> 1 condor.
Kill switch: equity more than --daily-drawdown-limit below the previous session close halts entries
for the session (--kill-switch-flatten also closes everything); --max-drawdown-limit from the peak
halts them for the run. Hedge: --enable-hedge trades shares back to neutral beyond --hedge-threshold
x 100 x condors open (share-equivalent delta).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong flag or value prints one line (not the whole usage block)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {message} (see python core/main.py --help)\n")


def _build_parser(config_defaults) -> argparse.ArgumentParser:
    from core.config import CLI_FLAGS, cli_flag_help

    parser = _Parser(
        prog="python core/main.py",
        description="CondorBrain (Quantor-MTFuzz): backtest, optimize and paper-trade SPY iron condors. "
                    "Defaults come from core/config.py (or --config FILE); a flag given overrides them.",
        epilog=SIZING_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=["backtest", "optimize", "data", "live", "ingest", "stress"],
                        default="backtest",
                        help="backtest: run the strategy and write a run folder; optimize: the 6-phase "
                             "optimizer; data: describe the embedded data and show a synthetic chain at one "
                             "bar; live: paper-trade on Alpaca; ingest: load vendor option files into a chain "
                             "store; stress: parameter shocks, market shocks and historical crises "
                             "(core/stress.py) (default: backtest)")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (partial files allowed)")
    run = parser.add_argument_group("backtest")
    for entry in CLI_FLAGS:
        text = cli_flag_help(entry, config_defaults.get(entry.field))
        if entry.sets is not None:
            run.add_argument(entry.flag, action="store_true", help=text)
        else:
            run.add_argument(entry.flag, type=entry.kind, default=None, choices=entry.choices,
                             metavar=None if entry.choices else entry.metavar or entry.kind.__name__.upper(), help=text)
    run.add_argument("--use-optimizer", action="store_true",
                     help="the seed's spelling of --mode optimize: run the 6-phase optimizer with these settings "
                          "as the base configuration")
    run.add_argument("--compare", action="store_true",
                     help="ablation: run Mechanical, Baseline, MTF only, Fuzzy only and Full on the same data "
                          "(fast driver) and write a side-by-side table and equity plot into the run folder")
    backtest = config_defaults.backtest
    run.add_argument("--fill-model", default=None, metavar="MODEL",
                     help="mid | natural | a fraction 0.5-1.0 of the spread from our side "
                          f"(default: {backtest.fill_model} {backtest.fill_spread_fraction})")
    run.add_argument("--out", metavar="DIR", default=None,
                     help="run folder to create (default: runs/<timestamp>)")
    from core.optimizer import add_arguments as add_optimizer_arguments
    add_optimizer_arguments(parser)
    from core.stress import add_arguments as add_stress_arguments
    add_stress_arguments(parser)
    live = parser.add_argument_group("live mode (keys from APCA_API_KEY_ID / APCA_API_SECRET_KEY or --credentials; "
                                      "endpoints from APCA_API_BASE_URL / APCA_API_DATA_URL)")
    live.add_argument("--alpaca", action="store_true", help="the broker: Alpaca (the seed's spelling of --mode live)")
    live.add_argument("--dry-run", action="store_true",
                      help="decide and journal the orders it would send, send none")
    live.add_argument("--max-bars", type=int, default=None, metavar="N", help="stop after N decision bars")
    live.add_argument("--poll-seconds", type=float, default=None, metavar="S",
                      help=f"how often the broker's clock is read (default: {config_defaults.live.poll_seconds})")
    live.add_argument("--live-money", action="store_true",
                      help="trade the live-money account (asks for a typed confirmation); paper otherwise")
    live.add_argument("--credentials", metavar="FILE", default=None,
                      help="JSON file with key_id and secret_key, outside the repository "
                           "(default: ~/.config/condorbrain/alpaca.json when the variables are unset)")
    ingest = parser.add_argument_group("ingest mode (vendor option data into a Parquet chain store)")
    ingest.add_argument("--input", action="append", default=None, metavar="PATH",
                        help="a vendor file or a folder of them (repeatable)")
    ingest.add_argument("--format", default=None, metavar="F",
                        help="override format detection (optionsdx, cboe, ivolatility, orats, polygon_option_bars, "
                             "alpaca_option_bars, stock_bars, canonical_parquet)")
    ingest.add_argument("--store", default=None, metavar="DIR", help="the chain store to create or add to")
    ingest.add_argument("--on-bad-rows", choices=["stop", "skip"], default="stop",
                        help="stop at the first bad row (naming file and line) or skip bad rows and count them "
                             "(default: stop)")
    group = parser.add_argument_group("data mode")
    group.add_argument("--date", default="2015-08-24",
                       help="session to show the chain for (YYYY-MM-DD, 2001-01-02 … 2018-12-31)")
    group.add_argument("--time", default="10:00",
                       help="bar close time (HH:MM, America/New_York; 5-minute bars 09:35 … 16:00)")
    group.add_argument("--strikes", type=int, default=12,
                       help="strikes shown per side of the money for the nearest expiry in range")
    return parser


def _overrides(args) -> dict:
    """Config overrides from the flags actually given (``core.config.CLI_FLAGS``)."""
    from core.config import CLI_FLAGS, CLI_SWITCH_PAIRS, ConfigError

    for first, second in CLI_SWITCH_PAIRS:
        if getattr(args, _dest(first)) and getattr(args, _dest(second)):
            raise ConfigError(f"{first} and {second} contradict each other: give one of them")
    overrides = {}
    for entry in CLI_FLAGS:
        value = getattr(args, _dest(entry.flag))
        if entry.sets is None and value is not None:
            overrides[entry.field] = value
        elif entry.sets is not None and value:
            overrides[entry.field] = entry.sets
    if args.fill_model is not None:
        if args.fill_model in ("mid", "natural"):
            overrides["backtest.fill_model"] = args.fill_model
        else:
            try:
                fraction = float(args.fill_model)
            except ValueError:
                fraction = None
            if fraction is None:
                raise ConfigError(f"--fill-model {args.fill_model!r}: use mid, natural or a fraction "
                                  f"between 0.5 and 1.0")
            overrides["backtest.fill_model"] = "spread_fraction"
            overrides["backtest.fill_spread_fraction"] = fraction
    return overrides


OPTIMIZER_DESTS = ("samples", "phases", "grid", "sampler", "trials", "objective", "min_trades", "workers", "executor",
                   "ray_address", "storage", "study_name", "walk_forward", "wf_train_months", "wf_test_months",
                   "wf_mode", "no_sensitivity")


LIVE_DESTS = ("alpaca", "dry_run", "max_bars", "poll_seconds", "live_money", "credentials")
INGEST_DESTS = ("input", "format", "store", "on_bad_rows")


def _check_mode_flags(parser, args, optimize: bool) -> None:
    """An optimizer flag outside the optimize mode, a live flag outside the live mode, or a
    backtest-only flag inside either, would be silently ignored: refuse it instead."""
    from core.config import ConfigError

    if args.alpaca and args.mode == "backtest" and not optimize:
        args.mode = "live"                   # the seed's `--alpaca` alone
    ingest_given = [name for name in INGEST_DESTS if getattr(args, name) != parser.get_default(name)]
    if args.mode != "ingest" and ingest_given:
        raise ConfigError(f"--{ingest_given[0].replace('_', '-')} is an ingest-mode flag: add --mode ingest")
    if args.mode == "ingest":
        if optimize:
            raise ConfigError("--use-optimizer runs the optimizer: drop it from --mode ingest")
        if not args.input or not args.store:
            raise ConfigError("--mode ingest needs --input PATH (a vendor file or folder) and --store DIR")
    live_given = [name for name in LIVE_DESTS if getattr(args, name) != parser.get_default(name)]
    if args.mode != "live" and live_given:
        raise ConfigError(f"--{live_given[0].replace('_', '-')} is a live-mode flag: add --mode live")
    if args.mode == "live":
        if optimize:
            raise ConfigError("--use-optimizer runs the optimizer, not the live driver: drop it (or use --mode optimize)")
        if args.compare:
            raise ConfigError("--compare is a backtest-mode ablation; the live driver does not run it (drop --compare)")
        # Flags that shape a backtest's replay, not a live run (the broker fills, charges its fees
        # and sets the cash; the period is today): refused rather than ignored.
        replay = {"engine": "--engine", "fill_model": "--fill-model", "fill_next_bar": "--fill-next-bar",
                  "fees": "--fees", "seed": "--seed", "bt_start": "--bt-start", "bt_end": "--bt-end",
                  "bt_cash": "--bt-cash", "bt_samples": "--bt-samples"}
        for dest, flag in replay.items():
            if getattr(args, dest, None) not in (None, False):
                raise ConfigError(f"{flag} shapes a backtest's replay; a live run uses the broker's fills, fees and "
                                  f"cash and today's bars: drop {flag}")
        if args.max_bars is not None and args.max_bars < 1:
            raise ConfigError(f"--max-bars {args.max_bars}: give at least 1")
        if args.poll_seconds is not None and not args.poll_seconds > 0:
            raise ConfigError(f"--poll-seconds {args.poll_seconds}: give a positive number of seconds")
    if args.mode == "data" and args.use_optimizer:
        raise ConfigError("--use-optimizer runs the optimizer: use it with --mode backtest (or --mode optimize)")
    if optimize:
        if args.compare:
            raise ConfigError("--compare is a backtest-mode ablation; the optimizer does not run it (drop --compare)")
        return
    given = [name for name in OPTIMIZER_DESTS if getattr(args, name) != parser.get_default(name)
             and not (args.mode == "stress" and name == "workers")]      # stress runs on the optimizer's pool
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{flag} is an optimizer flag: add --mode optimize (or --use-optimizer)")


def _check_options_data_mode(config, args, optimize: bool) -> None:
    """User option data (``backtest.options_data``, from --options-data or a config file) is read by
    the backtest mode only: refused where it would be silently ignored."""
    from core.config import ConfigError

    path = config.backtest.options_data
    if not path or (args.mode == "backtest" and not optimize) or args.mode in ("ingest", "stress"):
        return                                  # the stress runner refuses it with its own reason
    uses = ("the optimizer runs its trials on the embedded synthetic chains" if optimize else
            "a live run trades Alpaca's own chains" if args.mode == "live" else
            "--mode data shows the embedded synthetic chain")
    raise ConfigError(f"--options-data {path}: your option data is read by backtests only ({uses}); "
                      f"drop --options-data (or backtest.options_data in the config)")


def _check_pop_source(config, args, optimize: bool) -> None:
    """``filters.pop_source`` diffusion is read by backtests (and the optimizer's and stress
    test's, which run them): refused in a live run, which would need DeepMamba's state carried
    bar to bar live, and with --compare, whose Mechanical scenario turns off the gates the
    diffusion POP feeds. Elsewhere the checkpoint is checked before any data loads (a head, paths
    that reach strategy.dte_max)."""
    from core.config import ConfigError

    if config.filters.pop_source != "diffusion" or args.mode in ("data", "ingest"):
        return
    if args.mode == "live":
        raise ConfigError("--pop-source diffusion (filters.pop_source) works in backtests only: a live run would need "
                          "DeepMamba's recurrent state carried bar to bar as the bars arrive, which the live driver "
                          "does not do yet; use --pop-source delta for --mode live")
    if args.compare and not optimize:
        raise ConfigError("--compare with --pop-source diffusion: the ablation's Mechanical scenario turns the entry "
                          "gates off, and with them the probability filter the diffusion POP feeds; run --compare "
                          "with --pop-source delta, or the diffusion backtest without --compare")
    from core.market_data import path_forecaster
    path_forecaster(config)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _load_config(path: str | None, overrides: dict):
    from core.config import Config

    config = Config.from_yaml(path) if path else Config()
    return config.override(overrides, source="command line") if overrides else config


def _run_ingest_mode(args) -> int:
    """``--mode ingest``: vendor files into a chain store, with a progress line and a summary."""
    from rich.console import Console
    from rich.table import Table

    from data_factory.chain_store import ingest

    console = Console()
    with console.status("ingesting…") as status:
        summary = ingest(args.input, args.store, fmt=args.format, on_bad_rows=args.on_bad_rows,
                         progress=lambda name, rows: status.update(f"ingesting {name}: {rows:,} rows"))
    table = Table(title=f"Ingested into {summary.store}")
    for column in ("file", "format", "rows kept", "bad rows skipped"):
        table.add_column(column)
    for entry in summary.files:
        bad = entry.get("bad_rows") or {}
        counts = bad.get("counts") or {}
        skipped = ", ".join(f"{kind} {n:,}" for kind, n in counts.items() if n) or "0"
        table.add_row(entry["path"], entry["format"], f"{entry['rows']:,}", skipped)
    console.print(table)
    info = summary.to_dict()
    rate = (summary.chain_rows + summary.bar_rows) / summary.seconds if summary.seconds else 0.0
    console.print(f"{info['chain_rows']:,} chain rows over {info['sessions']} sessions "
                  f"({info['first_date']} … {info['last_date']}), {info['bar_rows']:,} bar rows in "
                  f"{summary.seconds:.1f} s ({rate:,.0f} rows/s); backtest it with --options-data {summary.store}")
    return 0


def _run_data_mode(args, config) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from core.market_data import describe_run_data, embedded_chain_provider
    from data_factory.errors import DataError
    from data_factory.market_calendar import (
        is_session,
        next_session_on_or_after,
        previous_session_on_or_before,
    )

    console = Console()
    try:
        day = pd.Timestamp(args.date)
    except ValueError:
        raise DataError(f"--date: cannot read {args.date!r} as a date (YYYY-MM-DD)") from None
    if not is_session(day):
        raise DataError(f"--date: {day.date()} is not an NYSE session (market closed); the sessions "
                        f"around it are {previous_session_on_or_before(day).date()} and "
                        f"{next_session_on_or_after(day).date()}")
    try:
        stamp = pd.Timestamp(f"{day.date()} {args.time}").tz_localize("America/New_York")
    except ValueError:
        raise DataError(f"--time: cannot read {args.time!r} as a time of day (HH:MM)") from None
    with console.status("loading the embedded data and synthesising the day's bars…"):
        provider = embedded_chain_provider(config, start=day, end=day)
    info = describe_run_data(config, provider)

    sources = Table(title="Embedded data", show_lines=False)
    for column in ("series", "source", "period", "real or synthetic"):
        sources.add_column(column)
    embedded = info["embedded"]
    for symbol in ("SPY", "QQQ"):
        bars = embedded["daily_bars"][symbol]
        sources.add_row(f"{symbol} daily", bars["source"], f"{bars['first']} … {bars['last']}",
                        bars["description"])
    vix = embedded["iv_index"]["vix"]
    sources.add_row("VIX", vix["source"], f"{vix['first']} … {vix['last']}",
                    f"real; {vix['non_session_rows_dropped']} holiday rows dropped")
    proxy = embedded["iv_index"]["garch_proxy"]
    sources.add_row("IV index before VIX", "GARCH(1,1) on S&P 500", f"{proxy['first']} … {proxy['used_before']}",
                    f"MODEL (garch_proxy, vrp × {proxy['vrp_multiplier']})")
    rf = embedded["risk_free_rate"]
    sources.add_row("risk-free rate", rf["source"], f"{rf['first_month']} … {rf['last_month']}",
                    "real, monthly; carried forward after")
    sources.add_row("intraday bars", info["intraday_bars"]["source"], "every session", "SYNTHETIC")
    sources.add_row("option chains", "SSVI on VIX term structure, BSM", "every bar", "SYNTHETIC, European")
    console.print(sources)

    dte_min, dte_max = config.strategy.dte_min, config.strategy.dte_max
    chain = provider.slice(stamp, dte_min=dte_min, dte_max=dte_max)
    iv_index = float(provider.iv_index_bars().iloc[provider.bar_index(stamp)])
    console.print(f"\n[bold]{config.backtest.underlying}[/bold] {stamp:%Y-%m-%d %H:%M %Z}: spot "
                  f"{chain.spot:.2f}, IV index {iv_index:.2f}, {len(chain)} quotes in {dte_min}–{dte_max} DTE "
                  f"(SYNTHETIC, European)")
    if len(chain) == 0:
        console.print("no listed expiry in that DTE range")
        return 0
    frame = chain.to_frame()
    nearest = frame["expiration"].min()
    rows = frame[frame["expiration"] == nearest]
    atm = rows["strike"].iloc[(rows["strike"] - chain.spot).abs().argmin()]
    rows = rows[(rows["strike"] - atm).abs() <= args.strikes]
    table = Table(title=f"expiry {pd.Timestamp(nearest).date()} ({int(rows['dte'].iloc[0])} DTE)")
    for column in ("strike", "put bid", "put ask", "put Δ", "IV", "call bid", "call ask", "call Δ"):
        table.add_column(column, justify="right")
    for strike, pair in rows.groupby("strike"):
        put = pair[pair["right"] == "P"].iloc[0]
        call = pair[pair["right"] == "C"].iloc[0]
        table.add_row(f"{strike:.0f}", f"{put.bid:.2f}", f"{put.ask:.2f}", f"{put.delta:+.3f}",
                      f"{put.iv:.1%}", f"{call.bid:.2f}", f"{call.ask:.2f}", f"{call.delta:+.3f}")
    console.print(table)
    return 0


def _run_backtest_mode(args, config, argv) -> int:
    import base64
    import platform
    import time

    import backtrader
    import numpy
    import pandas
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from core.ablation import (
        SCENARIOS,
        comparison_html,
        comparison_table,
        daily_equity,
        render_comparison_png,
        run_ablation,
        trades_by_half_year,
    )
    from core.backtest_engine import run_backtest
    from core.market_data import (
        bar_features,
        describe_run_data,
        is_vendor_market,
        load_configured_forecaster,
        load_market,
        uses_neural,
        vendor_entry_window_end,
    )
    from core.report import (
        ablation_table,
        check_output_dir,
        default_run_dir,
        periods_table,
        render_greeks_png,
        risk_panel,
        summary_table,
        to_json,
        write_run,
    )

    console = Console()
    out_dir = check_output_dir(args.out) if args.out else default_run_dir()
    backtest = config.backtest
    started = time.time()
    loading = (f"loading your option chains from {backtest.options_data} (first use of vendor files ingests them "
               f"into a cache store)…" if backtest.options_data else
               f"loading {backtest.start} … {backtest.end}: embedded daily data, synthetic 5-minute bars, chain surface…")
    with console.status(loading):
        market = load_market(config)
    vendor = is_vendor_market(market)
    requested = (str(backtest.start), str(backtest.end))
    if vendor:
        # The run's period is the sessions the data covers (titles, metrics, data.json), not the
        # configured one it was narrowed from.
        config = config.override({"backtest.start": str(market.sessions[0].date()),
                                  "backtest.end": str(market.sessions[-1].date())}, source="the option data's sessions")
        backtest = config.backtest
        window_end = vendor_entry_window_end(config, market)
        if window_end != config.strategy.entry_window_end:
            console.print(f"end-of-day chains: entries at the vendor's snapshot, {window_end} (the default entry "
                          f"window ends {config.strategy.entry_window_end}; set strategy.entry_window_end in a "
                          f"--config file to choose)")
            config = config.override({"strategy.entry_window_end": window_end}, source="the option data's snapshots")
        chains = market.describe()
        console.print(f"option chains: {chains['source']}, {chains['sessions']} sessions "
                      f"{market.sessions[0].date()} … {market.sessions[-1].date()}, {chains['bars']:,} decision bars")
        for line in (market.coverage.lines() if market.coverage is not None else []):
            console.print(f"  {line}")
        for line in market.alignment.summary_lines():
            console.print(f"  [dim]{line}[/dim]")
    # The forecaster matters only where C is used: fuzzy sizing/gating, or the ablation's fuzzy rows.
    fuzzy_config = config.override({"fuzzy.use_fuzzy": True}) if args.compare else config
    forecaster = None
    if uses_neural(fuzzy_config):
        forecaster = load_configured_forecaster(
            config, explicit=args.mamba_model is not None,
            check_size=tuple(field for field, flag in (("d_model", args.mamba_d_model),
                                                       ("n_layers", args.mamba_layers)) if flag is not None))
    # Feature tables are built (and cached) before the runs: the neutral one (mu_Mamba 0.5) for
    # runs that do not use C, the one with the forecasts for runs that do, so a run's logged C
    # never depends on what else ran.
    with console.status("features: indicators, MTF consensus, regime, fuzzy memberships, skew reference…"):
        bar_features(config.override({"fuzzy.use_fuzzy": False}), market)
    if forecaster is not None:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed:,}/{task.total:,} bars"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task(f"DeepMamba forecasts ({Path(str(forecaster.path)).name})",
                                     total=len(market.bar_times))
            bar_features(fuzzy_config, market, forecaster=forecaster,
                         progress=lambda done, total: progress.update(task, completed=done))
    features = bar_features(config, market)
    if config.filters.pop_source == "diffusion":
        from core.market_data import path_forecast_per_bar
        with console.status("DeepMamba's state over the run's bars for the diffusion POP (paths drawn at entry bars)…"):
            path_forecast_per_bar(config, market)          # kept per process: run_backtest reads it
    total = len(market.bar_times) if backtest.samples == 0 else min(backtest.samples, len(market.bar_times))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} bars"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"{backtest.engine} backtest", total=total)
        result = run_backtest(config, market, features=features,
                              progress=lambda done: progress.update(task, completed=done))
        extra_files, extra_html, comparison = {}, "", None
        if args.compare:
            tasks = {name: progress.add_task(f"ablation: {name}", total=total) for name, _ in SCENARIOS}
            runs = run_ablation(config, market,
                                progress=lambda name, done: progress.update(tasks[name], completed=done))
            comparison = comparison_table(runs)
            curves = daily_equity(runs)
            periods = trades_by_half_year(runs, backtest.start, backtest.end)
            extra_files = {"comparison.csv": comparison, "comparison_equity.csv": curves.reset_index(),
                           "comparison_trades_by_half_year.csv": periods.reset_index()}
            png64 = None
            if backtest.plot:
                png = render_comparison_png(curves, backtest.cash,
                                            f"Ablation {backtest.start} … {backtest.end} (synthetic chains)")
                extra_files["comparison.png"] = png
                png64 = base64.b64encode(png).decode("ascii")
            for run in runs:
                slug = run.name.lower().replace(" ", "_")
                extra_files[f"scenarios/{slug}/trades.csv"] = run.trades
                extra_files[f"scenarios/{slug}/metrics.json"] = to_json(run.metrics)
            extra_html = comparison_html(comparison, png64, periods)
    trades, equity, metrics = result.trades, result.equity, result.metrics
    extra_files["risk_events.csv"] = result.risk_events
    extra_files["hedges.csv"] = result.hedges
    greeks_png = None
    if backtest.plot:
        with console.status("drawing the plots…"):
            greeks_png = render_greeks_png(equity.reset_index(), config.to_dict()["risk"])
        extra_files["greeks.png"] = greeks_png
    extra_html = risk_panel(metrics, result.risk_events, greeks_png) + extra_html
    data_description = describe_run_data(config, market)
    data_description["features"] = result.features_description
    if vendor:
        data_description["period"]["requested"] = list(requested)
    run_info = {
        "command": "python core/main.py " + " ".join(argv),
        "engine": result.engine, "bars": result.bars, "driver_seconds": round(result.seconds, 3),
        "seed": backtest.seed, "started": pandas.Timestamp(started, unit="s", tz="UTC").isoformat(),
        "finished": pandas.Timestamp.now(tz="UTC").isoformat(),
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                     "pandas": pandas.__version__, "backtrader": backtrader.__version__},
        "backtrader_analyzers": result.analyzers,
        "pop_source": result.features_description.get("pop_source"),
    }
    with console.status("writing the run folder…"):
        written = write_run(out_dir, config_dict=config.to_dict(),
                            data_description=data_description, trades=trades,
                            equity=equity, metrics=metrics, run_info=run_info, plot=backtest.plot,
                            extra_files=extra_files, extra_html=extra_html)
    console.print(summary_table(metrics, trades))
    if metrics.get("sizing_note"):
        console.print(f"[bold yellow]{metrics['sizing_note']}[/bold yellow]")
    if comparison is not None:
        console.print(ablation_table(comparison))
        console.print(periods_table(periods))
    if vendor:
        synthetic_base = data_description["intraday_bars"]["synthetic"]
        what = ("option chains are YOUR vendor data; the intraday bars behind the MTF indicators are "
                + ("SYNTHETIC paths through daily bars (see data.json)" if synthetic_base else "yours too"))
    else:
        what = "option chains and intraday bars are SYNTHETIC (see data.json)"
    pop = result.features_description.get("pop_source") or {}
    if pop.get("source") == "diffusion":
        console.print(f"breach probability (--pop-source diffusion): {pop['what']}; {pop['model']}")
    console.print(f"{result.bars:,} bars in {result.seconds:.1f} s ({result.engine}); {what}")
    console.print(f"run folder: [bold]{written}[/bold]  (report.html, trades.csv, equity.csv, metrics.json, "
                  f"risk_events.csv, hedges.csv)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from core.config import Config, ConfigError
    from core.report import ReportError
    from data_factory.errors import DataError
    from intelligence.tda import TDAInputError   # a TDA setting the data cannot serve (--tda-window)

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(Config())
    args = parser.parse_args(argv)
    try:
        optimize = args.mode == "optimize" or args.use_optimizer
        from core.stress import check_flags as check_stress_flags
        check_stress_flags(parser, args)
        _check_mode_flags(parser, args, optimize)
        config = _load_config(args.config, _overrides(args))
        _check_options_data_mode(config, args, optimize)
        _check_pop_source(config, args, optimize)
        if args.mode == "stress":
            from core.stress import run as run_stress
            return run_stress(args, config, argv)
        if args.mode == "data":
            return _run_data_mode(args, config)
        if args.mode == "ingest":
            return _run_ingest_mode(args)
        if args.mode == "live":
            from core.live import run as run_live
            return run_live(args, config, argv)
        if optimize:
            from core.optimizer import run as run_optimizer
            return run_optimizer(args, config, argv)
        return _run_backtest_mode(args, config, argv)
    except (ConfigError, DataError, ReportError, TDAInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted: no run folder was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
