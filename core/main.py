"""CondorBrain command line: `python core/main.py --mode MODE [options]`.

Modes present now:
  data   what the embedded data is (sources, periods, what is synthetic) and the synthetic option
         chain a strategy would see at one bar.
The backtest, optimize and live modes plug in here as their capabilities land.

Errors in flags, configuration or data print one message and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `python core/main.py` puts core/ on sys.path, not the project root; make the packages importable
# without requiring an installed copy.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(_PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(_PROJECT_ROOT))

USAGE_ERROR = 2


def _build_parser(config_defaults) -> argparse.ArgumentParser:
    strategy = config_defaults.strategy
    parser = argparse.ArgumentParser(
        prog="python core/main.py",
        description="CondorBrain (Quantor-MTFuzz): backtest, optimize and paper-trade SPY iron condors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mode", choices=["data"], default="data",
                        help="data: describe the embedded data and show a synthetic chain at one bar")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (partial files allowed)")
    group = parser.add_argument_group("data mode")
    group.add_argument("--date", default="2015-08-24",
                       help="session to show the chain for (YYYY-MM-DD, 2001-01-02 … 2018-12-31)")
    group.add_argument("--time", default="10:00",
                       help="bar close time (HH:MM, America/New_York; 5-minute bars 09:35 … 16:00)")
    group.add_argument("--dte-min", type=int, default=None,
                       help=f"shortest expiry shown in days (default: config, {strategy.dte_min})")
    group.add_argument("--dte-max", type=int, default=None,
                       help=f"longest expiry shown in days (default: config, {strategy.dte_max})")
    group.add_argument("--seed", type=int, default=None,
                       help=f"seed of the synthetic intraday bars (default: config, {config_defaults.backtest.seed})")
    group.add_argument("--strikes", type=int, default=12,
                       help="strikes shown per side of the money for the nearest expiry in range")
    return parser


def _load_config(path: str | None, overrides: dict):
    from core.config import Config

    config = Config.from_yaml(path) if path else Config()
    return config.override(overrides) if overrides else config


def _run_data_mode(args, config) -> int:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from core.market_data import describe_run_data, embedded_chain_provider
    from data_factory.errors import DataError
    from data_factory.market_calendar import is_session, next_session_on_or_after, previous_session_on_or_before

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

    dte_min = config.strategy.dte_min if args.dte_min is None else args.dte_min
    dte_max = config.strategy.dte_max if args.dte_max is None else args.dte_max
    if dte_min < 0 or dte_max < dte_min:
        raise DataError(f"--dte-min {dte_min} / --dte-max {dte_max}: need 0 <= dte-min <= dte-max")
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from core.config import Config, ConfigError
    from data_factory.errors import DataError

    parser = _build_parser(Config())
    args = parser.parse_args(argv)
    overrides = {}
    if args.seed is not None:
        overrides["backtest.seed"] = args.seed
    try:
        config = _load_config(args.config, overrides)
        if args.mode == "data":
            return _run_data_mode(args, config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    parser.error(f"unknown mode {args.mode}")
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
