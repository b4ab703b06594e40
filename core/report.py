"""A backtest's run folder: what was run, on what data, and what came out.

Owns the files of one run (``config.yaml``, ``data.json``, ``trades.csv``, ``equity.csv``,
``metrics.json``, ``run.json``, ``equity.png``, ``greeks.png``, ``trades.png``, ``report.html``), the
rule that a run folder only appears once it is complete, and the terminal summary table. It computes
no performance figures: the metrics (returns, drawdowns, ratios, the buy-and-hold benchmark, monthly
and yearly returns) arrive ready-made from ``analytics.performance`` and are only formatted here;
the report's own tables are counts and sums of trades.csv rows.

Conventions the formatting relies on (those of ``analytics.performance``): money in dollars;
keys ending ``_pct`` (``cagr_pct``, ``max_drawdown_pct``, equity.csv's ``drawdown_pct``) already in
percent (-5.2 = -5.2 %); ``win_rate`` a fraction (0.71 = 71 %); times tz-aware.

Atomicity: everything is written into a sibling ``<name>.partial-<pid>-*`` folder which is renamed
onto ``out_dir`` as the last step; any failure removes it, so a folder named ``out_dir`` is always a
complete run. A process killed outright leaves at most a folder whose name says ``partial``.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import html
import io
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analytics.performance import ANNUALISED_KEYS, MIN_SESSIONS_TO_ANNUALISE, benchmark_equity

# Order of the columns in trades.csv / equity.csv; columns not listed follow in the order given.
TRADE_COLUMNS: tuple[str, ...] = (
    "position_id", "entry_time", "exit_time", "expiration", "long_put", "short_put", "short_call",
    "long_call", "contracts", "credit", "exit_debit", "fees", "pnl", "exit_reason",
    "max_adverse_excursion", "days_held", "max_loss", "assigned_legs", "early_assignment_risk", "notes",
)
EQUITY_COLUMNS: tuple[str, ...] = (
    "timestamp", "cash", "equity", "equity_liquidation", "drawdown", "drawdown_pct", "underlying_price",
    "open_positions", "hedge_shares", "net_delta", "net_gamma", "net_vega", "net_theta",
)
# trades.csv keeps dollar amounts to the cent and per-share prices to 1/100 of a cent: fills are on
# the $0.01 tick and settlement amounts follow the spot's decimals, so rounding here only removes
# float noise (171.99999999999997) that no account ever held.
TRADE_DOLLAR_COLUMNS = ("fees", "pnl", "max_adverse_excursion", "max_loss")
TRADE_PRICE_COLUMNS = ("credit", "exit_debit")
TRADE_PRICE_DECIMALS = 4

# Above this many trades the HTML shows the first and last HTML_TRADE_EDGE rows (trades.csv has all).
HTML_TRADE_LIMIT = 2_000
HTML_TRADE_EDGE = 1_000

# The PNG is drawn at FIGURE_INCHES × FIGURE_DPI = 1400 × 800 pixels.
FIGURE_INCHES = (14.0, 8.0)
FIGURE_DPI = 100
# The trade histograms (trades.png) need less height: 1400 × 520 pixels.
TRADES_FIGURE_INCHES = (14.0, 5.2)

FILE_NAMES = ("config.yaml", "data.json", "trades.csv", "equity.csv", "metrics.json", "run.json",
              "equity.png", "greeks.png", "trades.png", "report.html")


class ReportError(ValueError):
    """An output folder that cannot take a run, or report input that cannot be written.

    ``path`` is the folder (or file) concerned, ``reason`` the short why ("not empty", ...).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str = ""):
        self.path = Path(path)
        self.reason = reason
        message = f"output folder {str(self.path)!r}: {reason}"
        super().__init__(message + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------------------------
# output folder
# ---------------------------------------------------------------------------------------------

def default_run_dir(base: str | os.PathLike[str] = "runs") -> Path:
    """``<base>/<YYYYmmdd-HHMMSS>`` in local time, with ``-2``, ``-3``... added if that exists.

    Nothing is created: two processes starting in the same second may get the same name; the
    second to finish then gets a ReportError from `write_run` instead of overwriting the first.
    """
    base = Path(base)
    stem = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = base / stem
    suffix = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = base / f"{stem}-{suffix}"
        suffix += 1
    return candidate


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Fail fast (before a long run) if ``out_dir`` cannot become this run's folder.

    Creates the parent folders if missing and writes/removes a probe folder in the parent, so an
    unwritable place is found now rather than after the run. Returns ``out_dir`` as a Path.
    Raises ReportError naming the path and the reason: is a file, not empty, not writable.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise ReportError(out_dir, "is a broken symbolic link")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ReportError(out_dir, "is a file, not a folder")
        try:
            entries = sorted(entry.name for entry in out_dir.iterdir())
        except OSError as error:
            raise ReportError(out_dir, "cannot be read", error.strerror or str(error)) from None
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ReportError(out_dir, "already exists and is not empty",
                              f"{len(entries)} entries: {shown}; choose another --out or remove it")
    parent = out_dir.absolute().parent
    blocker = _first_non_folder(parent)
    if blocker is not None:
        raise ReportError(out_dir, "not writable",
                          f"{str(blocker)!r} is a file, so no folder can be made under it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as error:
        raise ReportError(out_dir, "not writable",
                          f"cannot create a folder in {str(parent)!r}: {error.strerror or error}") from None
    return out_dir


def _first_non_folder(path: Path) -> Path | None:
    """The first existing component of ``path`` (from the root down) that is not a folder."""
    for candidate in reversed((path, *path.parents)):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------------

def write_run(out_dir: str | os.PathLike[str], *, config_dict: Mapping[str, Any],
              data_description: Mapping[str, Any], trades: pd.DataFrame, equity: pd.DataFrame,
              metrics: Mapping[str, Any], run_info: Mapping[str, Any], plot: bool = True,
              extra_files: Mapping[str, bytes | str | pd.DataFrame] | None = None,
              extra_html: str = "") -> Path:
    """Write one run's folder; it appears at ``out_dir`` complete or not at all.

    ``config_dict`` is the resolved configuration (``Config.to_dict()``; a Config is accepted),
    ``data_description`` what the data was and what of it is synthetic (``describe_run_data``),
    ``trades`` one row per condor, ``equity`` one row per bar (a ``timestamp`` column or a
    DatetimeIndex), ``metrics`` the performance figures, ``run_info`` command line, engine, seed,
    times and versions. With ``plot=False`` no PNG is drawn and the HTML has no image.
    ``extra_files`` (relative path -> bytes, text or a frame written as CSV) and ``extra_html``
    (a section placed after the metrics) carry optional outputs such as the ablation comparison.
    The Greeks plot is drawn here (``greeks.png``) unless ``extra_files`` brings one (the CLI's,
    shown by its risk panel), so every report with net_* columns shows it.
    Returns ``out_dir``. ReportError if ``out_dir`` exists and is not empty or cannot be written.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    if hasattr(config_dict, "to_dict") and not isinstance(config_dict, Mapping):
        config_dict = config_dict.to_dict()
    _check_inputs(config_dict, data_description, trades, equity, metrics, run_info, plot)
    trades_out = ordered_frame(trades, TRADE_COLUMNS, empty_default=True)
    equity_out = ordered_frame(_with_timestamp_column(equity), EQUITY_COLUMNS, empty_default=False)
    # Converted before the folder exists, so bad times fail before any work is done.
    trades_csv, equity_csv = csv_ready(round_trade_money(trades_out)), csv_ready(equity_out)
    replayed = replayed_period(equity_out)
    titles = title_lines(config_dict, data_description, replayed)
    extra_files = dict(extra_files or {})

    with staged_folder(out_dir) as staging:
        _write_text(staging / "config.yaml",
                    "# CondorBrain resolved configuration; load with core.config.Config.from_yaml.\n"
                    + yaml.safe_dump(to_plain(config_dict), sort_keys=False, default_flow_style=False,
                                     allow_unicode=True))
        _write_text(staging / "data.json", to_json(data_description))
        _write_csv(staging / "trades.csv", trades_csv)
        _write_csv(staging / "equity.csv", equity_csv)
        _write_text(staging / "metrics.json", to_json(metrics))
        _write_text(staging / "run.json", to_json(run_info))
        png = greeks_png = trades_png = None
        if plot:
            png = render_equity_png(equity_out, titles, starting_cash=_section(config_dict, "backtest").get("cash"))
            (staging / "equity.png").write_bytes(png)
            trades_png = render_trades_png(trades_out, _section(config_dict, "strategy").get("min_credit_to_width"))
            (staging / "trades.png").write_bytes(trades_png)
            if "greeks.png" not in extra_files and all(column in equity_out.columns for column, _, _ in GREEK_PANELS):
                greeks_png = render_greeks_png(equity_out, _section(config_dict, "risk"))
                extra_files["greeks.png"] = greeks_png
        for name, content in extra_files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, pd.DataFrame):
                _write_csv(target, csv_ready(content))
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                _write_text(target, content)
        _write_text(staging / "report.html",
                    render_html(config_dict=config_dict, data_description=data_description,
                                trades=trades_out, metrics=metrics, run_info=run_info, png=png,
                                extra_html=extra_html, replayed=replayed, greeks_png=greeks_png,
                                trades_png=trades_png))
    return out_dir


@contextlib.contextmanager
def staged_folder(out_dir: Path):
    """A staging folder beside ``out_dir`` to write a run folder into; renamed to ``out_dir`` when
    the block ends without an error, removed when it raises, so the folder appears complete or not
    at all (the backtest's run folder, the stress test's)."""
    staging = make_staging_dir(out_dir)
    try:
        yield staging
        try:
            # POSIX rename replaces an empty folder in one step and refuses a non-empty one, so a
            # folder created meanwhile by someone else is never overwritten.
            os.rename(staging, out_dir)
        except OSError as error:
            raise ReportError(out_dir, "could not be created", error.strerror or str(error)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_staging_dir(out_dir: Path) -> Path:
    """A new, uniquely named sibling ``<name>.partial-<pid>-<token>`` of ``out_dir``.

    os.mkdir rather than tempfile.mkdtemp: mkdtemp makes the folder private (0700), and the
    renamed folder should get the same permissions as any folder the user creates (umask).
    """
    parent = out_dir.absolute().parent
    for _ in range(100):
        staging = parent / f"{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue
        except OSError as error:
            raise ReportError(out_dir, "not writable",
                              f"cannot create a folder in {str(parent)!r}: {error.strerror or error}") from None
    raise ReportError(out_dir, "not writable", f"no free temporary folder name in {str(parent)!r}")


def _check_inputs(config_dict, data_description, trades, equity, metrics, run_info, plot) -> None:
    for name, value in (("config_dict", config_dict), ("data_description", data_description),
                        ("metrics", metrics), ("run_info", run_info)):
        if not isinstance(value, Mapping):
            raise TypeError(f"write_run: {name} must be a mapping, got {type(value).__name__}")
    for name, value in (("trades", trades), ("equity", equity)):
        if not isinstance(value, pd.DataFrame):
            raise TypeError(f"write_run: {name} must be a pandas DataFrame, got {type(value).__name__}")
    if plot and "equity" not in equity.columns:
        raise ValueError(f"write_run: equity has no 'equity' column to plot; columns are "
                         f"{list(equity.columns)}")


def _with_timestamp_column(equity: pd.DataFrame) -> pd.DataFrame:
    """The bar times as the ``timestamp`` column (the equity curve is often indexed by them)."""
    if "timestamp" in equity.columns:
        return equity.reset_index(drop=True)
    if isinstance(equity.index, pd.DatetimeIndex):
        frame = equity.copy()
        frame.index = frame.index.rename("timestamp")
        return frame.reset_index()
    raise ValueError("write_run: equity needs a 'timestamp' column or a DatetimeIndex of bar times")


def round_trade_money(trades: pd.DataFrame) -> pd.DataFrame:
    """``trades`` with dollar columns rounded to the cent and per-share prices to
    TRADE_PRICE_DECIMALS (see TRADE_DOLLAR_COLUMNS for why); other columns untouched."""
    out = trades.copy()
    for columns, decimals in ((TRADE_DOLLAR_COLUMNS, 2), (TRADE_PRICE_COLUMNS, TRADE_PRICE_DECIMALS)):
        for column in columns:
            if column in out.columns and pd.api.types.is_float_dtype(out[column].dtype):
                # + 0.0 turns the -0.0 that rounding a tiny negative leaves into 0.0.
                out[column] = out[column].round(decimals) + 0.0
    return out


def replayed_period(equity: pd.DataFrame) -> dict | None:
    """First and last bar replayed, bars and exchange sessions, from the equity rows (what the run
    actually covered, which ``--bt-samples`` or the data can make shorter than the configuration
    asked); None without rows or times."""
    if len(equity) == 0 or "timestamp" not in equity.columns:
        return None
    times = pd.to_datetime(equity["timestamp"])
    if isinstance(times.dtype, pd.DatetimeTZDtype):
        times = times.dt.tz_convert("America/New_York")
    return {"first": times.iloc[0], "last": times.iloc[-1], "bars": int(len(times)),
            "sessions": int(times.dt.normalize().nunique())}


def ordered_frame(frame: pd.DataFrame, preferred: tuple[str, ...], empty_default: bool) -> pd.DataFrame:
    """``frame`` with the ``preferred`` columns first (those present), the rest in given order.

    A frame with no columns at all becomes an empty frame with the preferred columns when
    ``empty_default`` (a run without trades still gets a trades.csv header).
    """
    if len(frame.columns) == 0 and empty_default:
        return pd.DataFrame(columns=list(preferred))
    duplicated = frame.columns[frame.columns.duplicated()].tolist()
    if duplicated:
        raise ValueError(f"write_run: duplicate column names {duplicated}")
    present = [column for column in preferred if column in frame.columns]
    others = [column for column in frame.columns if column not in preferred]
    return frame.loc[:, present + others].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# plain values: JSON, YAML, CSV
# ---------------------------------------------------------------------------------------------

def to_plain(value: Any) -> Any:
    """``value`` with numpy/pandas scalars as Python ones, NaN/inf/NaT as None, enums as their
    values, times as ISO 8601 strings (dates stay dates for YAML), containers as dicts/lists."""
    if isinstance(value, Mapping):
        return {str(key.value if isinstance(key, enum.Enum) else key): to_plain(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray, pd.Series, pd.Index)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        return [to_plain(item) for item in items]
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if value is None or value is pd.NaT or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return value.isoformat()
    if isinstance(value, (np.datetime64, np.timedelta64)):
        return None if np.isnat(value) else to_plain(pd.Timestamp(value) if isinstance(value, np.datetime64)
                                                     else pd.Timedelta(value))
    if isinstance(value, (dt.date, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def to_json(value: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens) of ``to_plain(value)``, dates as ISO strings."""
    return json.dumps(to_plain(value), indent=2, allow_nan=False,
                      default=lambda item: item.isoformat() if isinstance(item, dt.date) else str(item)) + "\n"


def csv_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with times as ISO 8601 strings (with offset for tz-aware times; dates as
    YYYY-MM-DD) and enums as their values; numbers untouched so they round-trip exactly."""
    out = frame.copy()
    for column in out.columns:
        series = out[column]
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            out[column] = _iso_times(series)
        elif pd.api.types.is_datetime64_dtype(series.dtype):
            raise ValueError(f"write_run: column {column!r} holds times without a time zone; "
                             "times must be tz-aware (America/New_York)")
        elif series.dtype == object:
            out[column] = [_iso_cell(value, column) for value in series]
    return out


def _iso_times(series: pd.Series) -> pd.Series:
    values = series.dt.tz_localize(None)
    whole_seconds = series.isna() | ((series.dt.microsecond == 0) & (series.dt.nanosecond == 0))
    if not bool(whole_seconds.all()):
        return series.map(lambda stamp: "" if pd.isna(stamp) else stamp.isoformat())
    # Same text as Timestamp.isoformat(), built from arrays: strftime/isoformat per element cost
    # about a second on a five-year five-minute equity curve.
    local = values.to_numpy(dtype="datetime64[ns]")
    utc = series.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    valid = ~np.isnat(local)
    offset_minutes = np.zeros(len(series), dtype=np.int64)
    offset_minutes[valid] = (local[valid] - utc[valid]) // np.timedelta64(1, "m")
    offset_text = {minutes: f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
                   for minutes in np.unique(offset_minutes[valid]).tolist()}
    clock = np.datetime_as_string(local, unit="s").astype(object)
    offsets = np.array([offset_text.get(minutes, "") for minutes in offset_minutes.tolist()], dtype=object)
    text = np.where(valid, clock + offsets, "")
    return pd.Series(text, index=series.index, dtype=object)


def _iso_cell(value: Any, column: str) -> Any:
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        if value.tzinfo is None:
            raise ValueError(f"write_run: column {column!r} holds a time without a time zone "
                             f"({value}); times must be tz-aware (America/New_York)")
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return "|".join(str(_iso_cell(item, column)) for item in value)
    return value


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    # Python's float repr round-trips exactly; no float_format on purpose.
    frame.to_csv(path, index=False, lineterminator="\n")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# metrics for people
# ---------------------------------------------------------------------------------------------

# (key, label, kind) in display order, keys as analytics.performance.performance_metrics names
# them. Kinds: usd, pct (already in percent), fraction (shown as %), ratio, days, count.
METRIC_DISPLAY: tuple[tuple[str, str, str], ...] = (
    ("net_profit", "Net profit", "usd"),
    ("total_return_pct", "Total return", "pct"),
    ("benchmark_total_return_pct", "Buy-and-hold return", "pct"),
    ("cagr_pct", "CAGR", "pct"),
    ("max_drawdown", "Max drawdown $", "usd"),
    ("max_drawdown_pct", "Max drawdown %", "pct"),
    ("sharpe", "Sharpe", "ratio"),
    ("sortino", "Sortino", "ratio"),
    ("beta", "Beta to the underlying", "ratio"),
    ("win_rate", "Win rate", "fraction"),
    ("expectancy", "Expectancy per trade", "usd"),
    ("win_loss_ratio", "Win/loss ratio", "ratio"),
    ("profit_factor", "Profit factor", "ratio"),
    ("avg_days_held", "Avg days held", "days"),
    ("trade_count", "Trades", "count"),
    ("fitness", "Fitness (net profit / |max DD|)", "ratio"),
)

# The HTML's return-and-risk table: (label, strategy key, buy-and-hold key, kind).
PERFORMANCE_ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("Final equity", "final_equity", "benchmark_final_equity", "usd"),
    ("Net profit", "net_profit", None, "usd"),
    ("Total return", "total_return_pct", "benchmark_total_return_pct", "pct"),
    ("CAGR", "cagr_pct", "benchmark_cagr_pct", "pct"),
    ("Max drawdown %", "max_drawdown_pct", "benchmark_max_drawdown_pct", "pct"),
    ("Max drawdown $", "max_drawdown", None, "usd"),
    ("Sharpe", "sharpe", "benchmark_sharpe", "ratio"),
    ("Sortino", "sortino", "benchmark_sortino", "ratio"),
    ("Beta to the underlying", "beta", None, "ratio"),
    ("Correlation with the underlying", "correlation", None, "ratio"),
    ("Alpha (annualised)", "alpha_pct", None, "pct"),
    ("Fitness (net profit / |max DD|)", "fitness", None, "ratio"),
)
# The HTML's trade-statistics table: (key, label, kind).
TRADE_METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("trade_count", "Trades", "count"),
    ("win_rate", "Win rate", "fraction"),
    ("expectancy", "Expectancy per trade", "usd"),
    ("win_loss_ratio", "Win/loss ratio", "ratio"),
    ("profit_factor", "Profit factor", "ratio"),
    ("avg_win", "Average win", "usd"),
    ("avg_loss", "Average loss", "usd"),
    ("gross_profit", "Gross profit", "usd"),
    ("gross_loss", "Gross loss", "usd"),
    ("avg_days_held", "Avg days held", "days"),
)
# Shown elsewhere (header, heat map, risk panel) or not a figure: not repeated as "other metrics".
_NOT_OTHER_METRICS = frozenset({"first_bar", "last_bar", "bars", "sessions", "annualised", "years"})

# The other figures performance_metrics returns, shown after the headline ones in the HTML.
OTHER_METRICS: dict[str, tuple[str, str]] = {
    "final_equity": ("Final equity", "usd"),
    "total_return_pct": ("Total return", "pct"),
    "years": ("Years", "ratio"),
    "expectancy": ("Expectancy per trade", "usd"),
    "gross_profit": ("Gross profit", "usd"),
    "gross_loss": ("Gross loss", "usd"),
    "avg_win": ("Average win", "usd"),
    "avg_loss": ("Average loss", "usd"),
}

_ANNUALISED_NOTE = (f"annualised; not reported (n/a) when the replayed bars span fewer than "
                    f"{MIN_SESSIONS_TO_ANNUALISE} exchange sessions")
# One line per figure, shown on hover (title attribute) and in the report's definitions list.
METRIC_DEFINITIONS: dict[str, str] = {
    "final_equity": "Equity at mid (cash + open positions at mid prices) at the last bar replayed.",
    "net_profit": "Final equity − starting cash, in dollars, after fees.",
    "total_return_pct": "Net profit / starting cash.",
    "cagr_pct": "Compound annual growth rate: (final / starting equity)^(1 / years) − 1, years of 365.25 days "
                f"from the first to the last bar; {_ANNUALISED_NOTE}.",
    "max_drawdown_pct": "Deepest fall of equity below its running peak (the peak starts at the starting cash), "
                        "in percent of that peak.",
    "max_drawdown": "Deepest fall of equity below its running peak, in dollars.",
    "sharpe": "Mean / standard deviation (ddof 1) of daily returns × √252, risk-free rate 0. Daily return: "
              f"last equity of each session over the previous one's (the first over the starting cash); {_ANNUALISED_NOTE}.",
    "sortino": "Mean daily return / downside deviation × √252; downside deviation = √mean(min(r, 0)²) over all "
               f"days; {_ANNUALISED_NOTE}.",
    "beta": "Slope of the least-squares line of the strategy's daily returns on the underlying's "
            "(buy and hold): how many % the strategy moves per 1 % of the underlying.",
    "correlation": "Pearson correlation of the strategy's daily returns with the underlying's (buy and hold).",
    "alpha_pct": "Intercept of that regression (the daily return with the underlying flat), compounded over "
                 f"252 sessions; {_ANNUALISED_NOTE}.",
    "fitness": "Net profit / |max drawdown $| (the optimizer's default objective).",
    "benchmark": "Buy and hold of the underlying on the bars replayed: the starting cash invested at the first "
                 "bar's price, a price return (no dividends).",
    "trade_count": "Condors opened and closed (the run ends flat).",
    "win_rate": "Share of trades with P&L > 0 (a zero-P&L trade counts as neither win nor loss).",
    "expectancy": "Mean P&L per trade in dollars, after fees: what one more trade is worth on average.",
    "win_loss_ratio": "Average winning trade / |average losing trade| (not the expectancy: a high ratio with a "
                      "low win rate can still lose money).",
    "profit_factor": "Gross profit / |gross loss|.",
    "avg_win": "Mean P&L of the winning trades.",
    "avg_loss": "Mean P&L of the losing trades.",
    "gross_profit": "Sum of the winning trades' P&L.",
    "gross_loss": "Sum of the losing trades' P&L.",
    "avg_days_held": "Mean calendar days from the entry session to the exit session.",
    "monthly_returns": "Last equity of each month over the last equity of the month before (the first month "
                       "over the starting cash); the year column likewise per year.",
}
# The keys analytics.performance leaves None for a too-short period, said so in the report.
_ANNUALISED = frozenset(ANNUALISED_KEYS)


def metric_value(metrics: Mapping[str, Any], key: str) -> tuple[str | None, Any]:
    """(key, value) if ``metrics`` has ``key``, else (None, None)."""
    if key in metrics:
        return key, metrics[key]
    return None, None


def metric_kind(key: str, value: Any) -> str:
    """How to show a metric not in METRIC_DISPLAY, judged from its name."""
    name = key.lower()
    if name.endswith("_pct"):
        return "pct"
    if name.endswith(("_rate", "_fraction")):
        return "fraction"
    if any(word in name for word in ("profit", "pnl", "usd", "dollar", "fees", "cash", "equity",
                                     "loss", "gain", "expectancy")) and "ratio" not in name \
            and "factor" not in name:
        return "usd"
    if "days" in name:
        return "days"
    if isinstance(value, (bool, np.bool_)):
        return "text"
    if isinstance(value, (int, np.integer)):
        return "count"
    if isinstance(value, (float, np.floating)):
        return "ratio"
    return "text"


def format_value(value: Any, kind: str) -> str:
    """A number as a person reads it: $1,234.56, 12.34 % (``pct`` is already in percent,
    ``fraction`` is multiplied by 100), 1.23, 4.5 days, 1,234; n/a if missing or undefined."""
    if isinstance(value, (float, np.floating)) and math.isinf(value) and kind != "text":
        # metrics.json stores it as null; a person should still see that it was infinite.
        return "∞" if value > 0 else "-∞"
    plain = to_plain(value)
    if plain is None:
        return "n/a"
    if kind == "text" or isinstance(plain, (str, list, dict, bool)):
        return str(plain)
    number = float(plain)
    if kind == "usd":
        return f"-${abs(number):,.2f}" if number < 0 else f"${number:,.2f}"
    if kind == "pct":
        return f"{number:,.2f} %"
    if kind == "fraction":
        return f"{number * 100:,.2f} %"
    if kind == "days":
        return f"{number:,.1f} days"
    if kind == "count":
        return f"{int(round(number)):,}" if number == round(number) else f"{number:,.2f}"
    return f"{number:,.2f}"


def metric_text(metrics: Mapping[str, Any], key: str, kind: str) -> str:
    """``format_value`` of ``metrics[key]``, or "n/a (period too short)" for an annualised
    figure the metrics left out because the replayed period was too short."""
    value = metrics.get(key)
    if value is None and key in _ANNUALISED and metrics.get("annualised") is False:
        return "n/a (period too short)"
    return format_value(value, kind)


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, formatted value) for the known metrics in order, then every other scalar key."""
    rows, used = [], set()
    for key, label, kind in METRIC_DISPLAY:
        found, _ = metric_value(metrics, key)
        if found is not None:
            used.add(found)
        rows.append((found or key, label, metric_text(metrics, key, kind)))
    for key, value in metrics.items():
        if key in used or key in _NOT_OTHER_METRICS or isinstance(value, Mapping):
            # Tables of counts (entry rejections by reason) get their own panel.
            continue
        label, kind = OTHER_METRICS.get(key, (key.replace("_", " ").capitalize(), metric_kind(key, value)))
        rows.append((key, label, metric_text(metrics, key, kind)))
    return rows


def exit_reason_counts(trades: pd.DataFrame) -> list[tuple[str, int]]:
    """(exit reason, trades) most frequent first, ties by name; open trades as "(open)"."""
    if "exit_reason" not in trades.columns or trades.empty:
        return []
    reasons = [("(open)" if value is None or (isinstance(value, float) and math.isnan(value))
                else str(value.value if isinstance(value, enum.Enum) else value))
               for value in trades["exit_reason"]]
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def summary_table(metrics: Mapping[str, Any], trades: pd.DataFrame):
    """The terminal summary: the headline metrics, a section of exit-reason counts, then the risk
    manager's figures (halts, rejections, hedge) when it did anything."""
    from rich.table import Table

    table = Table(title="Backtest summary", title_justify="left", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, kind in METRIC_DISPLAY:
        table.add_row(label, metric_text(metrics, key, kind))
    table.add_section()
    counts = exit_reason_counts(trades)
    total = sum(count for _, count in counts)
    if not counts:
        table.add_row("[bold]exit reasons[/bold]", "no trades")
    else:
        table.add_row("[bold]exit reasons[/bold]", "[bold]trades (share)[/bold]")
        for reason, count in counts:
            table.add_row(f"  {reason}", f"{count:,} ({count / total:.0%})")
    risk = metrics.get("risk") or {}
    hedge = metrics.get("hedge") or {}
    if risk:
        table.add_section()
        table.add_row("[bold]risk[/bold]", "")
        table.add_row("  kill-switch halts (sessions)", f"{risk.get('kill_switch_halts', 0):,}")
        if risk.get("max_drawdown_halts"):
            table.add_row("  max-drawdown halt", "yes")
        if risk.get("positions_closed_by_kill_switch"):
            table.add_row("  condors flattened by a halt", f"{risk['positions_closed_by_kill_switch']:,}")
        rejected = risk.get("risk_rejections") or {}
        table.add_row("  entries refused by sizing/caps", f"{sum(rejected.values()):,}"
                      + (f" (most: {max(rejected, key=rejected.get)})" if rejected else ""))
        table.add_row("  max |net delta| (shares)", f"{risk.get('max_abs_net_delta', 0.0):,.1f}")
    if hedge.get("trades"):
        table.add_row("  hedge trades / shares", f"{hedge['trades']:,} / {hedge['shares_traded']:,}")
        table.add_row("  hedge P&L (after costs)", format_value(hedge["pnl"], "usd"))
    return table


# ---------------------------------------------------------------------------------------------
# what the data was
# ---------------------------------------------------------------------------------------------

_DESCRIBING_KEYS = ("description", "model", "method", "source")


def synthetic_items(data_description: Mapping[str, Any]) -> list[str]:
    """One line per synthetic, proxy or assumed part of the data, found anywhere in the
    description, shallowest first: sections marked ``synthetic: true`` / ``proxy: true`` /
    ``assumption: true``. A section that carries its own summary (a list under a key mentioning
    "synthetic", e.g. ``synthetic_or_proxy``) is represented by that list alone."""
    found: list[tuple[int, str]] = []

    def describe(node: Mapping[str, Any]) -> str:
        for key in _DESCRIBING_KEYS:
            if isinstance(node.get(key), str):
                return node[key]
        if "value" in node:
            return f"value {to_plain(node['value'])}"
        return ""

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, (list, tuple)):
            for item in node:
                walk(item, path)
            return
        if not isinstance(node, Mapping):
            return
        summaries = [item for key, item in node.items()
                     if "synthetic" in str(key) and isinstance(item, (list, tuple))]
        if summaries:
            found.extend((len(path) + 1, str(entry)) for summary in summaries for entry in summary)
            return
        where = " › ".join(part.replace("_", " ") for part in path) or "data"
        if node.get("synthetic") is True or node.get("proxy") is True:
            tag = "synthetic" if node.get("synthetic") is True else "proxy"
            text = describe(node)
            found.append((len(path), f"{where} ({tag}): {text}" if text else f"{where} ({tag})"))
        elif node.get("assumption") is True:
            why = f" — {node['why']}" if isinstance(node.get("why"), str) else ""
            found.append((len(path), f"{where} (assumption): {describe(node)}{why}"))
        for key, item in node.items():
            walk(item, (*path, str(key)))

    walk(data_description, ())
    ordered = sorted(enumerate(found), key=lambda pair: (pair[1][0], pair[0]))
    return list(dict.fromkeys(text for _, (_, text) in ordered))


def data_label(data_description: Mapping[str, Any], underlying: str | None = None) -> str:
    """A short label for titles, e.g. "SPY proxy, synthetic intraday bars, option chains".

    ``data_description['label']`` wins when given (user data can name itself).
    """
    if isinstance(data_description.get("label"), str):
        return data_description["label"]
    underlying = underlying or data_description.get("underlying")
    proxied = False

    def find_proxy(node: Any) -> None:
        nonlocal proxied
        if isinstance(node, Mapping):
            for key, item in node.items():
                if key == underlying and isinstance(item, Mapping) and item.get("proxy") is True:
                    proxied = True
                find_proxy(item)

    find_proxy(data_description)
    synthetic_sections = [str(key).replace("_", " ") for key, item in data_description.items()
                          if isinstance(item, Mapping) and item.get("synthetic") is True]
    parts = []
    if underlying:
        parts.append(f"{underlying} proxy" if proxied else str(underlying))
    if synthetic_sections:
        parts.append("synthetic " + ", ".join(synthetic_sections))
    elif synthetic_items(data_description):
        parts.append("partly synthetic data")
    return ", ".join(parts) if parts else "data as described in data.json"


def _section(config_dict: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config_dict.get(name)
    return section if isinstance(section, Mapping) else {}


def _requested_period(config_dict: Mapping[str, Any], data_description: Mapping[str, Any]) -> tuple[Any, Any]:
    backtest = _section(config_dict, "backtest")
    period = data_description.get("period") if isinstance(data_description.get("period"), Mapping) else {}
    return to_plain(backtest.get("start", period.get("start", "?"))), to_plain(backtest.get("end", period.get("end", "?")))


def _replayed_differs(replayed: Mapping[str, Any] | None, requested: tuple[Any, Any]) -> bool:
    return replayed is not None and (replayed["first"].date().isoformat(),
                                     replayed["last"].date().isoformat()) != tuple(map(str, requested))


def run_facts(config_dict: Mapping[str, Any], data_description: Mapping[str, Any],
              run_info: Mapping[str, Any], replayed: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(label, text) pairs for the report header: the period replayed (``replayed``, from
    `replayed_period`; the requested one too when they differ), engine, fills, fees, cash, seed."""
    backtest = _section(config_dict, "backtest")
    period = data_description.get("period") if isinstance(data_description.get("period"), Mapping) else {}
    requested = _requested_period(config_dict, data_description)
    requested_text = f"{requested[0]} … {requested[1]}"
    facts_of_period = []
    if replayed is None:
        period_text = requested_text
        extra = [f"{period[key]:,} {key}" for key in ("sessions", "bars") if isinstance(period.get(key), int)]
    else:
        period_text = (f"{replayed['first'].strftime('%Y-%m-%d %H:%M')} … "
                       f"{replayed['last'].strftime('%Y-%m-%d %H:%M')}")
        extra = [f"{replayed['sessions']:,} sessions", f"{replayed['bars']:,} bars"]
    if period.get("bar_frequency"):
        extra.append(f"bar size {period['bar_frequency']}")
    if extra:
        period_text += " (" + ", ".join(extra) + ")"
    facts_of_period.append(("Period replayed" if replayed is not None else "Period", period_text))
    if _replayed_differs(replayed, requested):
        why = (f"; --bt-samples {int(backtest['samples']):,} stopped the replay after that many bars"
               if backtest.get("samples") else "")
        facts_of_period.append(("Requested", requested_text + why))
    fill_model = backtest.get("fill_model", "?")
    fill_text = str(fill_model)
    if fill_model == "spread_fraction" and backtest.get("fill_spread_fraction") is not None:
        fill_text += (f": {float(backtest['fill_spread_fraction']) * 100:.0f} % of the bid/ask spread from "
                      "our side (50 % = mid, 100 % = natural)")
    if "fill_on_next_bar" in backtest:
        fill_text += "; fills at the next bar" if backtest["fill_on_next_bar"] else "; fills at the signal bar"
    facts = [
        ("Underlying", str(backtest.get("underlying", data_description.get("underlying", "?")))),
        ("Data", data_label(data_description, backtest.get("underlying"))),
        *facts_of_period,
        ("Engine", str(run_info.get("engine", backtest.get("engine", "?")))),
        ("Fill model", fill_text),
        ("Fees", str(backtest.get("fees", "?"))),
    ]
    features = data_description.get("features") if isinstance(data_description.get("features"), Mapping) else {}
    pop_source = features.get("pop_source") if isinstance(features.get("pop_source"), Mapping) else {}
    if pop_source.get("source") == "diffusion":
        # the entry filter read sampled paths, not 2|delta|: say so where the run is described
        facts.append(("Breach probability", f"{pop_source.get('what', 'diffusion paths')} "
                                             f"({pop_source.get('model', 'DeepMamba')})"))
    if backtest.get("cash") is not None:
        facts.append(("Starting cash", format_value(backtest["cash"], "usd")))
    seed = run_info.get("seed", backtest.get("seed"))
    if seed is not None:
        facts.append(("Seed", str(seed)))
    return facts


def title_lines(config_dict: Mapping[str, Any], data_description: Mapping[str, Any],
                replayed: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(title, subtitle) of the PNG and the page: what was traded over when (the sessions replayed
    when ``replayed`` is given, else the configured period), and which data it rests on."""
    backtest = _section(config_dict, "backtest")
    underlying = backtest.get("underlying", data_description.get("underlying", ""))
    if replayed is not None:
        start, end = replayed["first"].date().isoformat(), replayed["last"].date().isoformat()
    else:
        start, end = _requested_period(config_dict, data_description)
    kind = "live session" if str(backtest.get("engine", "")).startswith("live") else "backtest"
    title = f"{underlying} iron condor {kind}, {start} … {end}".strip()
    subtitle_parts = [f"Data: {data_label(data_description, underlying or None)}"]
    if backtest.get("engine") is not None:
        subtitle_parts.append(f"engine {backtest['engine']}")
    if backtest.get("fill_model") == "spread_fraction" and backtest.get("fill_spread_fraction") is not None:
        subtitle_parts.append(f"fills at {float(backtest['fill_spread_fraction']) * 100:.0f} % of the spread")
    elif backtest.get("fill_model") is not None:
        subtitle_parts.append(f"fills at {backtest['fill_model']}")
    if backtest.get("fees") is not None:
        subtitle_parts.append(f"fees {backtest['fees']}")
    return title, " · ".join(subtitle_parts)


# ---------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------

def _dollar_tick(value: float, _position=None) -> str:
    """An axis tick in dollars with the sign in front: −$125, $40."""
    return f"−${abs(value):,.0f}" if value < 0 else f"${value:,.0f}"


def render_equity_png(equity: pd.DataFrame, titles: tuple[str, str], starting_cash: float | None = None) -> bytes:
    """Equity (at mid, and at liquidation value lighter) above drawdown %, sharing the time axis;
    1400 × 800 pixels. ``equity`` has a ``timestamp`` column and an ``equity`` column. With an
    ``underlying_price`` column, buy and hold of the underlying from ``starting_cash`` (default the
    first equity) is drawn on both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    times = pd.to_datetime(equity["timestamp"])
    if isinstance(times.dtype, pd.DatetimeTZDtype):
        # Plot wall-clock exchange time; matplotlib would otherwise convert to UTC.
        times = times.dt.tz_localize(None)
    times = times.to_numpy(dtype="datetime64[ns]")
    figure, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=FIGURE_INCHES, dpi=FIGURE_DPI,
        gridspec_kw={"height_ratios": [3, 1.3], "hspace": 0.06})
    try:
        figure.suptitle(titles[0], fontsize=16, fontweight="bold", x=0.06, ha="left", y=0.975)
        figure.text(0.06, 0.925, titles[1], fontsize=11.5, color="#9a3412", ha="left")
        if len(equity) == 0:
            top.text(0.5, 0.5, "no equity rows", ha="center", va="center", transform=top.transAxes)
        else:
            if "equity_liquidation" in equity.columns:
                top.plot(*envelope(times, equity["equity_liquidation"].to_numpy(dtype=float)),
                         color="#93c5fd", linewidth=1.0, label="equity at liquidation value (closing side)")
            top.plot(*envelope(times, equity["equity"].to_numpy(dtype=float)), color="#1d4ed8",
                     linewidth=1.4, label="equity at mid")
            held = None
            if "underlying_price" in equity.columns and equity["underlying_price"].notna().all():
                cash = float(starting_cash) if starting_cash else float(equity["equity"].iloc[0])
                held = benchmark_equity(pd.Series(equity["underlying_price"].to_numpy(dtype=float),
                                                  index=pd.DatetimeIndex(times, tz="UTC")), cash).to_numpy()
                top.plot(*envelope(times, held), color="#6b7280", linewidth=1.0, alpha=0.8, zorder=1,
                         label="buy and hold of the underlying (same starting cash)")
            # Above the plot area, so it never hides the curve.
            top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=10.5, frameon=False,
                       borderaxespad=0.2)
            drawdown, drawdown_label, formatter = _drawdown_to_plot(equity)
            if drawdown is not None:
                drawdown_times, drawdown = envelope(times, drawdown)
                bottom.fill_between(drawdown_times, drawdown, 0.0, color="#dc2626", alpha=0.35, linewidth=0)
                bottom.plot(drawdown_times, drawdown, color="#b91c1c", linewidth=0.9, label="strategy")
                if held is not None and "drawdown_pct" in equity.columns:
                    peak = np.maximum.accumulate(np.maximum(held, cash))
                    bottom.plot(*envelope(times, (held - peak) / peak * 100.0), color="#6b7280", linewidth=0.9,
                                alpha=0.8, label="buy and hold")
                    bottom.legend(loc="lower left", fontsize=10, frameon=False)
                bottom.yaxis.set_major_formatter(FuncFormatter(formatter))
                bottom.set_ylabel(drawdown_label, fontsize=12)
            else:
                bottom.text(0.5, 0.5, "no drawdown column", ha="center", va="center",
                            transform=bottom.transAxes)
        top.set_ylabel("equity ($)", fontsize=12)
        top.yaxis.set_major_formatter(FuncFormatter(_dollar_tick))
        for axis in (top, bottom):
            axis.tick_params(labelsize=11)
        return _time_axes_png(figure, (top, bottom), top_margin=0.87, bottom_margin=0.07)
    finally:
        plt.close(figure)


def _time_axes_png(figure, axes, top_margin: float, bottom_margin: float) -> bytes:
    """The house style of a figure of stacked axes sharing a time axis (light grid, no top/right
    spines, concise dates on the bottom axis), saved as PNG bytes."""
    import matplotlib.dates as mdates

    for axis in axes:
        axis.grid(True, color="#e5e7eb", linewidth=0.8)
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
    locator = mdates.AutoDateLocator(minticks=4, maxticks=12)
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    figure.subplots_adjust(left=0.08, right=0.98, top=top_margin, bottom=bottom_margin)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


GREEK_PANELS = (("net_delta", "delta (shares)", "max_portfolio_delta"),
                 ("net_gamma", "gamma (sh. per $1)", "max_portfolio_gamma"),
                 ("net_vega", "vega ($ per vol pt)", "max_portfolio_vega"),
                 ("net_theta", "theta ($ per day)", "max_portfolio_theta"))


def render_greeks_png(equity: pd.DataFrame, risk_config: Mapping[str, Any] | None = None) -> bytes:
    """The portfolio's net delta (and the hedge shares), gamma, vega and theta per bar, each with
    its cap from the ``risk`` section as dashed lines; 1400 × 800 pixels. ``equity`` has a
    ``timestamp`` column and the ``net_*`` columns of equity.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    risk_config = risk_config or {}
    times = pd.to_datetime(equity["timestamp"])
    if isinstance(times.dtype, pd.DatetimeTZDtype):
        times = times.dt.tz_localize(None)
    times = times.to_numpy(dtype="datetime64[ns]")
    figure, axes = plt.subplots(4, 1, sharex=True, figsize=FIGURE_INCHES, dpi=FIGURE_DPI,
                                gridspec_kw={"hspace": 0.12})
    try:
        figure.suptitle("Portfolio Greeks per bar (caps dashed)", fontsize=15, fontweight="bold", x=0.06,
                        ha="left", y=0.975)
        for axis, (column, label, cap_key) in zip(axes, GREEK_PANELS):
            if column in equity.columns and len(equity):
                axis.plot(*envelope(times, equity[column].to_numpy(dtype=float)), color="#1d4ed8", linewidth=1.0)
                if column == "net_delta" and "hedge_shares" in equity.columns and equity["hedge_shares"].any():
                    axis.plot(*envelope(times, equity["hedge_shares"].to_numpy(dtype=float)), color="#059669",
                              linewidth=0.9, label="hedge shares")
                    axis.legend(loc="upper right", fontsize=10, frameon=False)
            cap = risk_config.get(cap_key)
            if cap and risk_config.get("use_risk_limits", True):
                for level in (cap, -cap):
                    axis.axhline(level, color="#dc2626", linestyle="--", linewidth=0.9)
            axis.axhline(0.0, color="#9ca3af", linewidth=0.6)
            axis.set_ylabel(label, fontsize=10)
        return _time_axes_png(figure, axes, top_margin=0.92, bottom_margin=0.06)
    finally:
        plt.close(figure)


def render_trades_png(trades: pd.DataFrame, min_credit_to_width: float | None = None) -> bytes:
    """Two histograms, 1400 × 520 pixels: per-trade P&L (losses red, gains green, mean and median
    marked) and credit / wing width at entry (the configured minimum dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, (left, right) = plt.subplots(1, 2, figsize=TRADES_FIGURE_INCHES, dpi=FIGURE_DPI,
                                         gridspec_kw={"width_ratios": [1.6, 1], "wspace": 0.18})
    try:
        figure.suptitle("Per-trade P&L and credit / wing width at entry", fontsize=15, fontweight="bold",
                        x=0.06, ha="left", y=0.975)
        pnl = trades["pnl"].astype(float).to_numpy() if "pnl" in trades.columns else np.array([])
        if pnl.size == 0:
            for axis in (left, right):
                axis.text(0.5, 0.5, "no trades", ha="center", va="center", transform=axis.transAxes)
        else:
            edges = np.histogram_bin_edges(pnl, bins=min(60, max(10, int(np.sqrt(pnl.size) * 2))))
            if edges[0] < 0.0 < edges[-1]:
                # A bin edge at exactly zero keeps every bar one colour: all loss or all gain.
                step = edges[1] - edges[0]
                edges = np.arange(np.floor(edges[0] / step), np.ceil(edges[-1] / step) + 1) * step
            counts, edges = np.histogram(pnl, bins=edges)
            colors = ["#dc2626" if high <= 0.0 else "#16a34a" for high in edges[1:]]
            left.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colors, alpha=0.75,
                     edgecolor="white", linewidth=0.5)
            for value, style, name in ((float(np.mean(pnl)), "-", "mean"), (float(np.median(pnl)), ":", "median")):
                left.axvline(value, color="#111827", linestyle=style, linewidth=1.3,
                             label=f"{name} {format_value(value, 'usd')}")
            left.legend(loc="upper left", fontsize=11, frameon=False)
            left.xaxis.set_major_formatter(FuncFormatter(_dollar_tick))
            left.set_xlabel("P&L per trade (after fees)", fontsize=12)
            left.set_ylabel("trades", fontsize=12)
            if {"credit", "short_put", "long_put", "short_call", "long_call"} <= set(trades.columns):
                ratio = credit_to_width(trades).dropna().to_numpy()
                right.hist(ratio, bins=min(40, max(8, int(np.sqrt(ratio.size) * 2))), color="#2563eb", alpha=0.75,
                           edgecolor="white", linewidth=0.5)
                if min_credit_to_width:
                    right.axvline(float(min_credit_to_width), color="#dc2626", linestyle="--", linewidth=1.2,
                                  label=f"configured minimum {float(min_credit_to_width):.2f}")
                    right.legend(loc="upper right", fontsize=11, frameon=False)
                right.set_xlabel("credit / wider wing width", fontsize=12)
                right.set_ylabel("trades", fontsize=12)
        for axis in (left, right):
            axis.grid(True, color="#e5e7eb", linewidth=0.8)
            axis.tick_params(labelsize=11)
            for side in ("top", "right"):
                axis.spines[side].set_visible(False)
        figure.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.12)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
        return buffer.getvalue()
    finally:
        plt.close(figure)


# Risk events shown in the HTML (risk_events.csv has all of them).
HTML_RISK_EVENT_LIMIT = 200


def risk_panel(metrics: Mapping[str, Any], risk_events: pd.DataFrame, greeks_png: bytes | None = None) -> str:
    """Stage 3 in the report: the Greeks plot, halts and flattens, entries refused by the risk
    manager by rule, the hedge's trades, costs and P&L, and the first risk events."""
    risk = metrics.get("risk") or {}
    hedge = metrics.get("hedge") or {}
    parts = ["<h2>Risk manager: Greeks, kill switch, sizing caps, hedge</h2>"]
    note = metrics.get("sizing_note")
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if greeks_png is not None:
        encoded = base64.b64encode(greeks_png).decode("ascii")
        parts.append(f'<img alt="portfolio Greeks" width="1400" height="800" src="data:image/png;base64,{encoded}">')
    parts.append('<div class="grid"><div><h3>Halts and hedge</h3><table class="data">')
    rows = [("Kill-switch halts (sessions)", f"{risk.get('kill_switch_halts', 0):,}"),
            ("Max-drawdown halt", "yes" if risk.get("max_drawdown_halts") else "no"),
            ("Flattens", f"{risk.get('flattens', 0):,}"),
            ("Condors closed by a halt", f"{risk.get('positions_closed_by_kill_switch', 0):,}"),
            ("Max |net delta| (shares)", f"{risk.get('max_abs_net_delta', 0.0):,.1f}"),
            ("Max |net gamma|", f"{risk.get('max_abs_net_gamma', 0.0):,.2f}"),
            ("Max |net vega| ($/vol pt)", f"{risk.get('max_abs_net_vega', 0.0):,.1f}"),
            ("Max |net theta| ($/day)", f"{risk.get('max_abs_net_theta', 0.0):,.1f}"),
            ("Hedge trades", f"{hedge.get('trades', 0):,}"),
            ("Hedge shares traded", f"{hedge.get('shares_traded', 0):,}"),
            ("Hedge costs", format_value(hedge.get("costs", 0.0), "usd")),
            ("Hedge P&L after costs", format_value(hedge.get("pnl", 0.0), "usd"))]
    parts.extend(f"<tr><td>{_e(label)}</td><td class='num'>{_e(text)}</td></tr>" for label, text in rows)
    parts.append("</table></div>")
    rejected = risk.get("risk_rejections") or {}
    parts.append('<div><h3>Entries refused by sizing and caps</h3><table class="data">'
                 "<tr><th>rule</th><th>attempts</th></tr>")
    if rejected:
        parts.extend(f"<tr><td>{_e(reason)}</td><td class='num'>{int(count):,}</td></tr>"
                     for reason, count in sorted(rejected.items(), key=lambda item: -item[1]))
    else:
        parts.append('<tr><td colspan="2">none</td></tr>')
    parts.append("</table></div></div>")
    if len(risk_events):
        shown = risk_events.head(HTML_RISK_EVENT_LIMIT)
        parts.append(f"<h3>Risk events ({len(risk_events):,}; "
                     + (f"first {HTML_RISK_EVENT_LIMIT} shown, " if len(risk_events) > HTML_RISK_EVENT_LIMIT else "")
                     + "all in risk_events.csv)</h3>")
        parts.append('<table class="data"><tr><th>time</th><th>event</th><th>reason</th><th>attempts</th>'
                     "<th>detail</th></tr>")
        for row in shown.itertuples(index=False):
            stamp, _ = _cell(row.timestamp, "timestamp")
            parts.append(f"<tr><td>{_e(stamp)}</td><td>{_e(row.event)}</td><td>{_e(row.reason)}</td>"
                         f"<td class='num'>{int(row.attempts):,}</td><td>{_e(row.detail)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def envelope(times: np.ndarray, values: np.ndarray, buckets: int = 4_000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2 × ``buckets`` points that draw like the full series at 1400 px: each bucket of
    consecutive points keeps its minimum and maximum in time order, plus the last point.

    Why: Agg spends seconds stroking 100k-point lines that no pixel can show, and plain
    every-n-th sampling would drop the extremes (the deepest drawdown) from the picture.
    """
    count = len(values)
    if count <= 2 * buckets:
        return times, values
    bucket_of = np.arange(count) * buckets // count
    starts = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
    # NaN would win neither reduction; treat it as absent by filling with the bucket's own values.
    filled_low = np.where(np.isnan(values), np.inf, values)
    filled_high = np.where(np.isnan(values), -np.inf, values)
    # Buckets are contiguous, so after sorting by (bucket, value) bucket i still starts at
    # starts[i]; the first entry there is the bucket's minimum (maximum for the negated sort).
    lowest = np.lexsort((filled_low, bucket_of))[starts]
    highest = np.lexsort((-filled_high, bucket_of))[starts]
    keep = np.unique(np.concatenate([lowest, highest, [count - 1]]))
    return times[keep], values[keep]


def _drawdown_to_plot(equity: pd.DataFrame):
    """(values drawn below zero, axis label, tick formatter) from drawdown_pct, else drawdown $.

    Either sign convention is accepted: the depth is drawn downwards.
    """
    if "drawdown_pct" in equity.columns:
        # Already in percent (analytics.performance.drawdown_series).
        values = -np.abs(equity["drawdown_pct"].to_numpy(dtype=float))
        return values, "drawdown (%)", lambda value, _: f"{value:.3g} %"
    if "drawdown" in equity.columns:
        values = -np.abs(equity["drawdown"].to_numpy(dtype=float))
        return values, "drawdown ($)", _dollar_tick
    return None, "", None


# ---------------------------------------------------------------------------------------------
# the HTML report
# ---------------------------------------------------------------------------------------------

_TRADE_LABELS = {
    "entry_time": "Entry", "exit_time": "Exit", "expiration": "Expiry", "long_put": "Long put",
    "short_put": "Short put", "short_call": "Short call", "long_call": "Long call",
    "contracts": "Contracts", "credit": "Credit", "exit_debit": "Exit debit", "fees": "Fees",
    "pnl": "P&L", "exit_reason": "Exit reason", "max_adverse_excursion": "Max adverse exc.",
    "position_id": "Id", "days_held": "Days held", "max_loss": "Max loss", "assigned_legs": "Assigned",
    "early_assignment_risk": "Early assign. risk", "notes": "Notes",
}
_STRIKE_COLUMNS = {"long_put", "short_put", "short_call", "long_call"}
_DOLLAR_COLUMNS = {"fees", "pnl", "max_adverse_excursion", "max_loss"}

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1440px;
color:#111827;padding:0 16px;line-height:1.4}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
.sub{color:#4b5563;margin:0 0 16px}
.facts{border-collapse:collapse;margin:8px 0}.facts th{text-align:left;padding:2px 16px 2px 0;color:#4b5563;
font-weight:600}.facts td{padding:2px 0}
.synthetic{border:2px solid #d97706;background:#fffbeb;border-radius:6px;padding:10px 16px;margin:16px 0}
.synthetic h2{margin:0 0 6px;color:#92400e}.synthetic ul{margin:4px 0 4px 18px;padding:0}
img{max-width:100%;height:auto;border:1px solid #e5e7eb}
.scroll{overflow:auto;width:fit-content;max-width:100%;border:1px solid #e5e7eb}
.scroll.trades{max-height:640px}
.scroll table.data{margin:0}
td.defined{text-decoration:underline dotted #9ca3af;cursor:help}
table.heat td{min-width:52px}table.heat td.year{font-weight:600}
.definitions{margin:24px 0;font-size:13px}.definitions dt{font-weight:600;margin-top:6px}
.definitions dd{margin:0 0 0 16px;color:#374151}
h3{font-size:15px;margin:16px 0 6px}
table.data{border-collapse:collapse;font-size:13px}
table.data th,table.data td{border-bottom:1px solid #e5e7eb;padding:3px 8px;white-space:nowrap}
table.data th{background:#f3f4f6;position:sticky;top:0;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.neg{color:#b91c1c}.pos{color:#047857}
.note{color:#92400e;font-style:italic}
.grid{display:flex;gap:40px;flex-wrap:wrap;align-items:flex-start}
pre{background:#f9fafb;padding:8px;white-space:pre-wrap;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(*, config_dict: Mapping[str, Any], data_description: Mapping[str, Any],
                trades: pd.DataFrame, metrics: Mapping[str, Any], run_info: Mapping[str, Any],
                png: bytes | None, extra_html: str = "", replayed: Mapping[str, Any] | None = None,
                greeks_png: bytes | None = None, trades_png: bytes | None = None) -> str:
    """The self-contained report: inline CSS, the PNGs as data: URIs, no scripts or links.

    Order: what ran on what (the period replayed), the equity against buy and hold, return and
    risk next to the benchmark, trade statistics, monthly returns, the trades' P&L by what they
    were at entry and how they ended, ``extra_html`` (the CLI's risk panel, the ablation), the
    Greeks when ``greeks_png`` is given, the intelligence panel, every trade, the definitions."""
    title, subtitle = title_lines(config_dict, data_description, replayed)
    underlying = str(_section(config_dict, "backtest").get("underlying", data_description.get("underlying", "")))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(subtitle)}</p>',
        '<table class="facts">',
        *(f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>"
          for label, text in run_facts(config_dict, data_description, run_info, replayed)),
        "</table>",
        _synthetic_box(data_description),
    ]
    if metrics.get("annualised") is False:
        parts.append(f'<p class="note">The replayed bars span {int(metrics.get("sessions") or 0):,} session(s), '
                     f"fewer than {MIN_SESSIONS_TO_ANNUALISE}: CAGR, Sharpe, Sortino and alpha are not reported "
                     "(a few days scaled to a year say nothing about a year).</p>")
    if png is not None:
        parts.append(_img(png, "equity and drawdown against buy and hold"))
    parts.append(_metrics_section(metrics, underlying or "the underlying"))
    parts.append(_monthly_returns_table(metrics, underlying or "underlying"))
    parts.append(trade_analysis(trades, trades_png))
    parts.append(extra_html)
    if greeks_png is not None:
        parts.append("<h2>Portfolio Greeks</h2>")
        parts.append(_img(greeks_png, "portfolio Greeks"))
    parts.append(intelligence_panel(trades, metrics))
    shown_columns = [c for c in trades.columns if c in TRADE_COLUMNS or c in ("regime", "confidence")]
    parts.append(_trade_table(trades[shown_columns]))
    parts.append(_run_info_block(run_info))
    parts.append(_definitions_block())
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _img(png: bytes, alt: str) -> str:
    # The PNG header's own size (IHDR width and height), so the page reserves the right space.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" width="{width}" height="{height}" src="data:image/png;base64,{encoded}">'


def _label_cell(key: str, label: str) -> str:
    definition = METRIC_DEFINITIONS.get(key)
    if definition is None:
        return f'<td title="{_e(key)}">{_e(label)}</td>'
    return f'<td class="defined" title="{_e(definition)}">{_e(label)}</td>'


def _metrics_section(metrics: Mapping[str, Any], underlying: str) -> str:
    """Return and risk, the strategy beside buy and hold of the underlying; the trade statistics;
    then any other scalar figure the metrics carry."""
    has_benchmark = "benchmark_total_return_pct" in metrics
    parts = ['<div class="grid"><div><h2>Metrics</h2><table class="data">',
             "<tr><th>return and risk</th><th>strategy</th>"
             + (f'<th title="{_e(METRIC_DEFINITIONS["benchmark"])}">buy and hold {_e(underlying)}</th>'
                if has_benchmark else "") + "</tr>"]
    used = set()
    for label, key, benchmark_key, kind in PERFORMANCE_ROWS:
        used.update({key, benchmark_key})
        cells = f'<td class="num">{_e(metric_text(metrics, key, kind))}</td>'
        if has_benchmark:
            cells += (f'<td class="num">{_e(metric_text(metrics, benchmark_key, kind))}</td>' if benchmark_key
                      else "<td></td>")
        parts.append(f"<tr>{_label_cell(key, label)}{cells}</tr>")
    parts.append("</table></div>")
    parts.append('<div><h2>Trade statistics</h2><table class="data"><tr><th>statistic</th><th>value</th></tr>')
    for key, label, kind in TRADE_METRIC_ROWS:
        used.add(key)
        parts.append(f'<tr>{_label_cell(key, label)}<td class="num">{_e(metric_text(metrics, key, kind))}</td></tr>')
    parts.append("</table></div>")
    others = [(key, label, text) for key, label, text in metric_rows(metrics)
              if key not in used and not key.startswith("benchmark_")]
    if others:
        parts.append('<div><h2>Other figures</h2><table class="data"><tr><th>figure</th><th>value</th></tr>')
        parts.extend(f'<tr>{_label_cell(key, label)}<td class="num">{_e(text)}</td></tr>'
                     for key, label, text in others)
        parts.append("</table></div>")
    parts.append("</div>")
    return "\n".join(parts)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _heat_style(value: float, scale: float) -> str:
    """Green for gains, red for losses, deeper with the size of the move (relative to ``scale``)."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    alpha = 0.08 + 0.6 * strength
    rgb = "22,163,74" if value > 0 else ("220,38,38" if value < 0 else "156,163,175")
    return f"background:rgba({rgb},{alpha:.2f})"


def _monthly_returns_table(metrics: Mapping[str, Any], underlying: str) -> str:
    """Months × years heat map of the strategy's monthly returns, its yearly return and the
    underlying's (buy and hold) per year; empty when the metrics carry no monthly returns."""
    monthly = metrics.get("monthly_returns_pct")
    if not isinstance(monthly, Mapping) or not monthly:
        return ""
    yearly = metrics.get("yearly_returns_pct") or {}
    benchmark_yearly = metrics.get("benchmark_yearly_returns_pct") or {}
    years = sorted({label[:4] for label in monthly})
    finite = [abs(float(v)) for v in monthly.values() if v is not None and math.isfinite(float(v))]
    scale = max([*finite, 0.5])
    year_values = [abs(float(v)) for v in yearly.values() if v is not None]
    year_scale = max([*year_values, 0.5])
    parts = ["<h2>Monthly and yearly returns (%)</h2>",
             f'<p class="sub">{_e(METRIC_DEFINITIONS["monthly_returns"])} Partial first and last months count '
             "from the first bar / to the last bar replayed.</p>",
             '<div class="scroll"><table class="data heat"><tr><th>year</th>'
             + "".join(f"<th>{month}</th>" for month in _MONTHS)
             + f'<th>whole year</th><th title="{_e(METRIC_DEFINITIONS["benchmark"])}">{_e(underlying)} buy and hold</th></tr>']
    for year in years:
        cells = []
        for number in range(1, 13):
            value = monthly.get(f"{year}-{number:02d}")
            if value is None:
                cells.append("<td></td>")
            else:
                cells.append(f'<td class="num" style="{_heat_style(float(value), scale)}">{float(value):.2f}</td>')
        for values, cell_scale in ((yearly, year_scale), (benchmark_yearly, year_scale)):
            value = values.get(year)
            cells.append("<td></td>" if value is None else
                         f'<td class="num year" style="{_heat_style(float(value), cell_scale)}">{float(value):.2f}</td>')
        parts.append(f"<tr><th>{_e(year)}</th>{''.join(cells)}</tr>")
    parts.append("</table></div>")
    return "\n".join(parts)


# Buckets of the trade breakdowns: days to expiry and the IV index (VIX points) at entry.
DTE_EDGES = (-0.5, 7.5, 14.5, 21.5, 30.5, 45.5, 60.5, math.inf)
DTE_LABELS = ("0–7", "8–14", "15–21", "22–30", "31–45", "46–60", "61+")
IV_EDGES = (-math.inf, 12.0, 15.0, 20.0, 25.0, 30.0, math.inf)
IV_LABELS = ("< 12", "12–15", "15–20", "20–25", "25–30", "≥ 30")


def _exchange_times(series: pd.Series) -> pd.Series:
    times = pd.to_datetime(series, utc=True) if series.dtype == object else pd.to_datetime(series)
    if isinstance(times.dtype, pd.DatetimeTZDtype):
        times = times.dt.tz_convert("America/New_York").dt.tz_localize(None)
    return times


def entry_dte(trades: pd.DataFrame) -> pd.Series:
    """Calendar days from each trade's entry session to its expiration."""
    expiration = pd.to_datetime(trades["expiration"].astype(str)).dt.normalize()
    return (expiration - _exchange_times(trades["entry_time"]).dt.normalize()).dt.days


def credit_to_width(trades: pd.DataFrame) -> pd.Series:
    """Credit per share / the wider wing (the most a condor can lose per share before the credit)."""
    width = np.maximum(trades["short_put"].astype(float) - trades["long_put"].astype(float),
                       trades["long_call"].astype(float) - trades["short_call"].astype(float))
    return trades["credit"].astype(float) / width.where(width > 0)


def _breakdown_table(title: str, column: str, labels: pd.Series, pnl: pd.Series,
                     order: tuple[str, ...] | None = None) -> str:
    """Trades, share, win rate, total and mean P&L per bucket; by ``order`` or most trades first."""
    frame = pd.DataFrame({"bucket": labels.astype(object), "pnl": pnl.astype(float)}).dropna(subset=["bucket"])
    if frame.empty:
        return ""
    groups = frame.groupby("bucket", sort=False)["pnl"]
    table = pd.DataFrame({"trades": groups.size(), "wins": groups.apply(lambda values: (values > 0).mean()),
                          "total": groups.sum(), "mean": groups.mean()})
    if order is not None:
        table = table.reindex([label for label in order if label in table.index])
    else:
        table = table.sort_values("trades", ascending=False, kind="stable")
    total = int(table["trades"].sum())
    rows = [f'<div><h3>{_e(title)}</h3><table class="data"><tr><th>{_e(column)}</th><th>trades</th><th>share</th>'
            "<th>win rate</th><th>total P&amp;L</th><th>mean P&amp;L</th></tr>"]
    for label, row in table.iterrows():
        sign = "neg" if row["total"] < 0 else ("pos" if row["total"] > 0 else "")
        rows.append(f"<tr><td>{_e(label)}</td><td class='num'>{int(row['trades']):,}</td>"
                    f"<td class='num'>{row['trades'] / total:.0%}</td><td class='num'>{row['wins']:.0%}</td>"
                    f"<td class='num {sign}'>{_e(format_value(float(row['total']), 'usd'))}</td>"
                    f"<td class='num'>{_e(format_value(float(row['mean']), 'usd'))}</td></tr>")
    rows.append("</table></div>")
    return "\n".join(rows)


def trade_analysis(trades: pd.DataFrame, trades_png: bytes | None = None) -> str:
    """The trades' P&L distribution and credit-to-width (``trades_png``), and P&L by days to
    expiry at entry, by exit reason, by regime and by IV index at entry (those the trades carry)."""
    if len(trades) == 0 or "pnl" not in trades.columns:
        return ""
    pnl = trades["pnl"].astype(float)
    parts = ["<h2>P&amp;L per trade: distribution and where it came from</h2>"]
    if trades_png is not None:
        parts.append(_img(trades_png, "per-trade P&L distribution and credit-to-width distribution"))
    summary = pnl.describe(percentiles=[0.05, 0.5, 0.95])
    parts.append('<p class="sub">Per-trade P&amp;L: median ' + _e(format_value(summary["50%"], "usd"))
                 + ", 5th percentile " + _e(format_value(summary["5%"], "usd")) + ", 95th percentile "
                 + _e(format_value(summary["95%"], "usd")) + ", worst " + _e(format_value(summary["min"], "usd"))
                 + ", best " + _e(format_value(summary["max"], "usd")) + ".</p>")
    tables = []
    if "expiration" in trades.columns and "entry_time" in trades.columns:
        buckets = pd.cut(entry_dte(trades), DTE_EDGES, labels=DTE_LABELS)
        tables.append(_breakdown_table("By days to expiry at entry", "DTE", buckets, pnl, DTE_LABELS))
    if "exit_reason" in trades.columns:
        reasons = trades["exit_reason"].map(_reason_text)
        tables.append(_breakdown_table("By exit reason", "exit reason", reasons, pnl))
    if "regime" in trades.columns:
        regimes = trades["regime"].astype(object).where(trades["regime"].astype(str).str.len() > 0)
        if regimes.notna().any():
            tables.append(_breakdown_table("By regime at entry", "regime", regimes, pnl))
    if "iv_index" in trades.columns and pd.to_numeric(trades["iv_index"], errors="coerce").notna().any():
        buckets = pd.cut(pd.to_numeric(trades["iv_index"], errors="coerce"), IV_EDGES, labels=IV_LABELS, right=False)
        tables.append(_breakdown_table("By IV index (VIX) at entry", "IV index", buckets, pnl, IV_LABELS))
    if {"credit", "short_put", "long_put", "short_call", "long_call"} <= set(trades.columns):
        ratio = credit_to_width(trades)
        buckets = pd.cut(ratio, [-math.inf, 0.10, 0.15, 0.20, 0.25, 0.33, math.inf],
                         labels=["< 0.10", "0.10–0.15", "0.15–0.20", "0.20–0.25", "0.25–0.33", "≥ 0.33"], right=False)
        tables.append(_breakdown_table("By credit / wing width", "credit / width", buckets, pnl,
                                       ("< 0.10", "0.10–0.15", "0.15–0.20", "0.20–0.25", "0.25–0.33", "≥ 0.33")))
    parts.append('<div class="grid">' + "".join(tables) + "</div>")
    return "\n".join(parts)


def _reason_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "(open)"
    return str(value.value if isinstance(value, enum.Enum) else value)


def _definitions_block() -> str:
    items = "".join(f"<dt>{_e(key.replace('_', ' '))}</dt><dd>{_e(text)}</dd>"
                    for key, text in METRIC_DEFINITIONS.items())
    return ('<details class="definitions"><summary>How each figure is computed</summary>'
            f"<dl>{items}</dl></details>")


def ablation_table(comparison: pd.DataFrame):
    """The ablation's side-by-side figures as a rich table for the terminal."""
    from rich.table import Table

    table = Table(title="Ablation (same data, fast driver)")
    for column in ("scenario", "trades", "net P&L", "return", "Sharpe", "max DD", "win", "qty",
                   "top rejection after gates"):
        table.add_column(column, justify="left" if column in ("scenario", "top rejection after gates") else "right",
                         no_wrap=column != "top rejection after gates")
    for row in comparison.to_dict("records"):
        table.add_row(row["scenario"], f"{row['trades']:,}", format_value(row["net_profit"], "usd"),
                      format_value(row["total_return_pct"], "pct"), format_value(row["sharpe"], "ratio"),
                      format_value(row["max_drawdown_pct"], "pct"),
                      "–" if row["win_rate"] is None else f"{row['win_rate']:.0%}",
                      "–" if row["mean_contracts"] is None else f"{row['mean_contracts']:.2f}",
                      str(row["top_rejection"]))
    for row in comparison.to_dict("records"):
        if "NOTE:" in row["what"]:
            table.caption = f"{row['scenario']}: {row['what'].split('NOTE: ', 1)[1]}"
    return table


def periods_table(periods: pd.DataFrame):
    """Trades entered per half-year and scenario (the ablation) as a rich table; empty cells red."""
    from rich.table import Table

    table = Table(title="Trades entered per half-year (ablation)")
    table.add_column("half-year")
    for name in periods.columns:
        table.add_column(str(name), justify="right")
    for label, row in periods.iterrows():
        table.add_row(str(label), *[f"[red]{count}[/red]" if count == 0 else f"{count:,}" for count in row])
    return table


def _bucket_rows(trades: pd.DataFrame, key: pd.Series) -> list[str]:
    rows = []
    for label, group in trades.groupby(key, observed=True, sort=True):
        pnl = group["pnl"].astype(float)
        rows.append(f"<tr><td>{_e(label)}</td><td class='num'>{len(group):,}</td>"
                    f"<td class='num'>{(pnl > 0).mean():.0%}</td>"
                    f"<td class='num'>{_e(format_value(float(pnl.sum()), 'usd'))}</td>"
                    f"<td class='num'>{_e(format_value(float(pnl.mean()), 'usd'))}</td>"
                    f"<td class='num'>{group['contracts'].astype(float).mean():.2f}</td></tr>")
    return rows


def intelligence_panel(trades: pd.DataFrame, metrics: Mapping[str, Any]) -> str:
    """Why trades were taken and sized: results by regime and by fuzzy confidence at entry, the
    mean membership of winners and losers, and the entry rejections by reason."""
    parts = []
    rejections = metrics.get("entry_rejections") or {}
    has_context = "confidence" in trades.columns and trades["confidence"].notna().any()
    if not has_context and not rejections:
        return ""
    parts.append("<h2>Intelligence: why trades were taken and sized</h2>")
    head = ("<tr><th>{}</th><th>trades</th><th>win rate</th><th>total P&amp;L</th><th>mean P&amp;L</th>"
            "<th>mean contracts</th></tr>")
    parts.append('<div class="grid">')
    if has_context:
        parts.append('<div><h3>By regime at entry</h3><table class="data">' + head.format("regime"))
        parts.extend(_bucket_rows(trades, trades["regime"].fillna("").astype(str)))
        parts.append("</table></div>")
        confidence = trades["confidence"].astype(float)
        buckets = pd.cut(confidence, [0.0, 0.4, 0.5, 0.6, 0.7, 1.0], include_lowest=True)
        parts.append('<div><h3>By fuzzy confidence C at entry</h3><table class="data">' + head.format("C"))
        parts.extend(_bucket_rows(trades, buckets.astype(str)))
        parts.append("</table></div>")
        mu_columns = [c for c in trades.columns if c.startswith("mu_")]
        winners = trades["pnl"].astype(float) > 0
        parts.append('<div><h3>Mean membership at entry</h3><table class="data">'
                     "<tr><th>factor</th><th>winners</th><th>losers</th></tr>")
        for column in mu_columns:
            values = trades[column].astype(float)
            parts.append(f"<tr><td>{_e(column[3:])}</td><td class='num'>{values[winners].mean():.3f}</td>"
                         f"<td class='num'>{values[~winners].mean():.3f}</td></tr>")
        parts.append("</table></div>")
    if rejections:
        parts.append('<div><h3>Entries rejected, by reason</h3><table class="data">'
                     "<tr><th>reason</th><th>bars</th></tr>")
        for reason, count in sorted(rejections.items(), key=lambda item: -item[1]):
            parts.append(f"<tr><td>{_e(reason)}</td><td class='num'>{int(count):,}</td></tr>")
        parts.append("</table></div>")
    parts.append("</div>")
    return "\n".join(parts)


def _synthetic_box(data_description: Mapping[str, Any]) -> str:
    items = synthetic_items(data_description)
    if not items:
        return ('<div class="synthetic"><h2>Data</h2><p>Nothing in this run\'s data description is '
                "marked synthetic, proxy or assumed; see data.json.</p></div>")
    lines = "".join(f"<li>{_e(item)}</li>" for item in items)
    chains = data_description.get("option_chains")
    if isinstance(chains, Mapping) and chains.get("synthetic") is False:
        return ('<div class="synthetic"><h2>What was synthetic</h2>'
                f"<p><strong>Quotes and fills are real option data: {_e(str(chains.get('source', '')))}.</strong> "
                "The parts below are synthetic, proxies or assumptions; they shape the indicators and sizing, "
                f"not the prices. Full description in data.json.</p><ul>{lines}</ul></div>")
    return ('<div class="synthetic"><h2>What was synthetic</h2>'
            "<p><strong>This run is not a replay of real market quotes.</strong> The parts below are "
            "synthetic, proxies or assumptions; results describe the model as much as the market. "
            f"Full description in data.json.</p><ul>{lines}</ul></div>")


def _cell(value: Any, column: str) -> tuple[str, str]:
    """(text, css class) of one trade-table cell."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, str) and column.endswith(("_time", "timestamp")) and "T" in value:
        return value[:16].replace("T", " "), ""
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.strftime("%Y-%m-%d %H:%M"), ""
    if isinstance(value, dt.date):
        return value.isoformat(), ""
    if isinstance(value, enum.Enum):
        return str(value.value), ""
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), ""
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}", "num"
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if column in _STRIKE_COLUMNS:
            return f"{number:.2f}".rstrip("0").rstrip("."), "num"
        if column in _DOLLAR_COLUMNS or column.endswith(("_usd", "_dollars")):
            sign_class = "num neg" if number < 0 else ("num pos" if number > 0 and column == "pnl" else "num")
            return format_value(number, "usd"), sign_class
        return f"{number:,.2f}", "num"
    return str(value), ""


def _trade_table(trades: pd.DataFrame) -> str:
    count = len(trades)
    parts = [f"<h2>Trades ({count:,})</h2>"]
    if count == 0:
        parts.append("<p>No trades.</p>")
        return "\n".join(parts)
    columns = list(trades.columns)
    zones = sorted({str(trades[column].dt.tz) for column in columns
                    if isinstance(trades[column].dtype, pd.DatetimeTZDtype)})
    if zones:
        parts.append(f"<p>Times in {_e(', '.join(zones))}; prices per share, money in dollars.</p>")
    if count > HTML_TRADE_LIMIT:
        shown = [(trades.iloc[:HTML_TRADE_EDGE], 0), (trades.iloc[-HTML_TRADE_EDGE:], count - HTML_TRADE_EDGE)]
        parts.append(f'<p class="note">{count:,} trades: the first and last {HTML_TRADE_EDGE:,} are shown; '
                     "trades.csv has all of them.</p>")
    else:
        shown = [(trades, 0)]
    # A scrolling box (both directions, header row sticky) rather than a page-wide table that the
    # browser cuts off at the window's edge.
    parts.append('<div class="scroll trades"><table class="data"><tr><th>#</th>'
                 + "".join(f"<th>{_e(_TRADE_LABELS.get(c, str(c).replace('_', ' ')))}</th>" for c in columns)
                 + "</tr>")
    for block_number, (block, first_row) in enumerate(shown):
        if block_number > 0:
            parts.append(f'<tr><td class="note" colspan="{len(columns) + 1}">… {count - 2 * HTML_TRADE_EDGE:,} '
                         "trades not shown (see trades.csv) …</td></tr>")
        for offset, row in enumerate(block.itertuples(index=False, name=None)):
            cells = []
            for column, value in zip(columns, row, strict=True):
                text, css = _cell(value, str(column))
                cells.append(f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>")
            parts.append(f'<tr><td class="num">{first_row + offset + 1:,}</td>{"".join(cells)}</tr>')
    parts.append("</table></div>")
    return "\n".join(parts)


def _run_info_block(run_info: Mapping[str, Any]) -> str:
    if not run_info:
        return ""
    return "<h2>Run</h2><pre>" + _e(to_json(run_info).strip()) + "</pre>"
