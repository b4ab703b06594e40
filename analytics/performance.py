"""Performance metrics of a finished run: drawdown series and the summary numbers of
``metrics.json`` (net profit, returns, drawdown, Sharpe, Sortino, trade statistics, fitness).

Pure functions on an equity series (pd.Series of dollars indexed by tz-aware bar times) and a
trades frame (one row per closed trade, columns at least ``entry_time, exit_time, pnl, days_held``;
``pnl`` in dollars net of fees). Results are plain Python floats/ints/None so they go straight to
JSON; None means "undefined" (e.g. a profit factor with no losing trade), never NaN or inf.

Conventions (so the numbers can be recomputed by hand from equity.csv and trades.csv):
* Drawdown is the equity change from the running peak, a number <= 0 (dollars and percent); the
  running peak starts at ``starting_cash``. ``max_drawdown`` is the most negative value (a
  negative number, 0.0 when equity never fell); fitness divides by its absolute value.
* Daily returns: the last equity of each exchange session (America/New_York date), simple returns
  from one session to the next, the first measured against ``starting_cash``.
* Sharpe = mean / std (ddof 1) × √252 of the daily returns, risk-free rate 0.
  Sortino = mean / downside deviation × √252, downside deviation = √(mean(min(r, 0)²)) over all
  days (target 0).
* CAGR over calendar time from the first to the last bar (years of 365.25 days).
* ``net_profit`` = last equity − starting cash (equals Σ trade pnl when the run ends flat).
* Annualised figures (CAGR, Sharpe, Sortino, alpha and the benchmark's CAGR, Sharpe and Sortino)
  are None when the replayed bars span fewer than ``MIN_SESSIONS_TO_ANNUALISE`` exchange sessions
  (``annualised`` is then False): a return or a ratio measured over a few days and scaled to a year
  says nothing about a year (one quiet day annualises to a Sharpe of any size).
* Monthly / yearly returns: the last equity of each calendar month (year) over the last equity of
  the one before, the first measured against ``starting_cash``; keys "YYYY-MM" / "YYYY", percent.
* Benchmark (buy and hold of the underlying on the same bars): ``starting_cash`` × price / first
  bar's price, a price return (no dividends: the embedded SPY is a price-index proxy). Its daily
  and period returns follow the rules above with its first bar's value as the start. ``beta``,
  ``correlation`` and ``alpha_pct`` regress the strategy's daily returns on the benchmark's
  (ordinary least squares, ``scipy.stats.linregress``): beta the slope, correlation Pearson's r,
  alpha the daily intercept compounded over 252 sessions, in percent.

Why hand-written rather than ``empyrical-reloaded``: the formulas are a few lines each and agree
with empyrical's (Sharpe with ddof 1, Sortino's downside deviation over all days), but
empyrical-reloaded 0.7.1 pins ``peewee<3.17.4``, which the registry offers only as a source
distribution (the project installs from wheels), and brings an ORM and a price downloader along.
The regression uses SciPy, already a dependency.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

TRADING_DAYS_PER_YEAR = 252
# Kept here rather than imported: analytics must not depend on data_factory or core.
_EXCHANGE_TZ = "America/New_York"
TRADE_COLUMNS = ("entry_time", "exit_time", "pnl", "days_held")
# About one trading month: below this many sessions no annualised figure is reported.
MIN_SESSIONS_TO_ANNUALISE = 20
# The keys that are None when the replayed period is shorter than MIN_SESSIONS_TO_ANNUALISE.
ANNUALISED_KEYS = ("cagr_pct", "sharpe", "sortino", "alpha_pct", "benchmark_cagr_pct", "benchmark_sharpe",
                   "benchmark_sortino")


def _check_equity(equity: pd.Series) -> pd.Series:
    if not isinstance(equity, pd.Series):
        raise TypeError(f"equity must be a pandas Series, got {type(equity).__name__}")
    if equity.empty:
        raise ValueError("equity series is empty: no bars were replayed")
    if not isinstance(equity.index, pd.DatetimeIndex) or equity.index.tz is None:
        raise ValueError("equity must be indexed by tz-aware timestamps (a DatetimeIndex with a time zone)")
    if not equity.index.is_monotonic_increasing:
        raise ValueError("equity index must be sorted by time")
    values = equity.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"equity is not a finite number at {equity.index[np.argmax(bad)]}: "
                         f"{values[np.argmax(bad)]!r}")
    return equity.astype(np.float64)


def _check_trades(trades: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in TRADE_COLUMNS if c not in trades.columns]
    if missing:
        raise ValueError(f"trades is missing column(s) {missing}; needs {list(TRADE_COLUMNS)}")
    pnl = trades["pnl"].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(pnl)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"trades row {row}: pnl is not a finite number ({pnl[row]!r})")
    return trades


def drawdown_series(equity: pd.Series, starting_cash: float | None = None) -> pd.DataFrame:
    """Per bar: ``peak`` (running max of equity, starting from ``starting_cash`` when given),
    ``drawdown`` (equity − peak, dollars, <= 0) and ``drawdown_pct`` (percent of the peak, <= 0)."""
    equity = _check_equity(equity)
    peak = equity.cummax()
    if starting_cash is not None:
        peak = peak.clip(lower=float(starting_cash))
    drawdown = equity - peak
    return pd.DataFrame({"peak": peak, "drawdown": drawdown, "drawdown_pct": drawdown / peak * 100.0})


def session_closes(equity: pd.Series) -> pd.Series:
    """The last equity of each exchange session, indexed by session date."""
    equity = _check_equity(equity)
    # The last bar of each session, found on integer day keys: the index is sorted and every
    # value finite (checked above), so this is groupby(date).last() without building a Python
    # date per bar (the optimizer calls it for every trial).
    day_ns = equity.index.tz_convert(_EXCHANGE_TZ).tz_localize(None).normalize().as_unit("ns").asi8
    last = np.flatnonzero(np.r_[day_ns[1:] != day_ns[:-1], True])
    dates = pd.DatetimeIndex(day_ns[last]).date
    return pd.Series(equity.to_numpy()[last], index=pd.Index(dates, dtype=object), name=equity.name)


def daily_returns(equity: pd.Series, starting_cash: float) -> pd.Series:
    """Simple returns between the last equity of consecutive exchange sessions; the first session
    is measured against ``starting_cash``. Indexed by session date."""
    session_close = session_closes(equity)
    previous = session_close.shift(1)
    previous.iloc[0] = float(starting_cash)
    return session_close / previous - 1.0


def _none_if_not_finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def sharpe_ratio(returns: pd.Series) -> float | None:
    """Annualised Sharpe of daily returns (rf = 0); None with fewer than 2 days or no variation."""
    values = returns.to_numpy(dtype=np.float64)
    if values.size < 2:
        return None
    std = float(np.std(values, ddof=1))
    if std == 0.0:
        return None
    return _none_if_not_finite(float(np.mean(values)) / std * math.sqrt(TRADING_DAYS_PER_YEAR))


def sortino_ratio(returns: pd.Series) -> float | None:
    """Annualised Sortino of daily returns (target 0); None with no days or no losing day."""
    values = returns.to_numpy(dtype=np.float64)
    if values.size == 0:
        return None
    downside = math.sqrt(float(np.mean(np.minimum(values, 0.0) ** 2)))
    if downside == 0.0:
        return None
    return _none_if_not_finite(float(np.mean(values)) / downside * math.sqrt(TRADING_DAYS_PER_YEAR))


def trade_statistics(trades: pd.DataFrame) -> dict:
    """Win rate (fraction of trades with pnl > 0; zero-pnl trades count as neither win nor loss
    but stay in the denominator), profit factor (gross profit / |gross loss|; None without a
    losing trade), win/loss ratio (average win / |average loss|; None without both a win and a
    loss), expectancy (mean pnl per trade, dollars), average days held and the trade count."""
    trades = _check_trades(trades)
    pnl = trades["pnl"].to_numpy(dtype=np.float64)
    count = int(pnl.size)
    wins = pnl[pnl > 0.0]
    losses = pnl[pnl < 0.0]
    gross_profit = float(wins.sum())
    gross_loss = float(losses.sum())
    return {
        "trade_count": count,
        "win_rate": float(wins.size / count) if count else None,
        "gross_profit": gross_profit,
        "gross_loss": gross_loss,
        "profit_factor": gross_profit / abs(gross_loss) if losses.size else None,
        "avg_win": float(wins.mean()) if wins.size else None,
        "avg_loss": float(losses.mean()) if losses.size else None,
        "win_loss_ratio": (float(wins.mean()) / abs(float(losses.mean()))
                           if wins.size and losses.size else None),
        "expectancy": float(pnl.mean()) if count else None,
        "avg_days_held": float(trades["days_held"].to_numpy(dtype=np.float64).mean()) if count else None,
    }


def period_returns(values: pd.Series, start_value: float, period: str) -> dict[str, float]:
    """Percent return of each calendar month (``period="month"``, keys "YYYY-MM") or year
    (``"year"``, keys "YYYY"): the last value of the period (its last session's close) over the last
    value of the one before, the first over ``start_value``. ``values`` as an equity series."""
    if period not in ("month", "year"):
        raise ValueError(f"period must be 'month' or 'year', got {period!r}")
    closes = session_closes(values)
    dates = pd.DatetimeIndex(pd.to_datetime(closes.index))
    labels = dates.strftime("%Y-%m" if period == "month" else "%Y")
    last = pd.Series(closes.to_numpy(dtype=np.float64), index=labels).groupby(level=0, sort=False).last()
    previous = np.r_[float(start_value), last.to_numpy()[:-1]]
    return {str(label): float(value) for label, value in zip(last.index, (last.to_numpy() / previous - 1.0) * 100.0)}


def benchmark_equity(price: pd.Series, starting_cash: float) -> pd.Series:
    """Buy and hold: ``starting_cash`` invested in the underlying at the first bar's price."""
    price = _check_equity(price)
    first = float(price.iloc[0])
    if not first > 0.0:
        raise ValueError(f"benchmark price must be > 0, got {first!r} at {price.index[0]}")
    return price / first * float(starting_cash)


def benchmark_metrics(equity: pd.Series, price: pd.Series, starting_cash: float) -> dict:
    """The buy-and-hold benchmark on the same bars and the strategy measured against it (see the
    module docstring). Keys: benchmark_final_equity, benchmark_total_return_pct,
    benchmark_cagr_pct, benchmark_max_drawdown_pct, benchmark_sharpe, benchmark_sortino, beta,
    correlation, alpha_pct, benchmark_yearly_returns_pct. ``price`` must share ``equity``'s index."""
    from scipy.stats import linregress

    equity = _check_equity(equity)
    price = _check_equity(price)
    if not price.index.equals(equity.index):
        raise ValueError("benchmark price must have one value per equity bar (the same timestamps)")
    if not (price > 0.0).all():
        raise ValueError(f"benchmark price must be > 0; it is {float(price.min())!r} at {price.idxmin()}")
    held = benchmark_equity(price, starting_cash)
    final = float(held.iloc[-1])
    years = (held.index[-1] - held.index[0]).total_seconds() / (365.25 * 86400.0)
    held_returns = daily_returns(held, starting_cash)
    strategy_returns = daily_returns(equity, starting_cash)
    beta = correlation = alpha_pct = None
    x = held_returns.to_numpy(dtype=np.float64)
    y = strategy_returns.to_numpy(dtype=np.float64)
    # A regression needs two days and some movement on both sides (r is undefined otherwise).
    if x.size >= 2 and np.ptp(x) > 0.0 and np.ptp(y) > 0.0:
        fit = linregress(x, y)
        beta, correlation = _none_if_not_finite(fit.slope), _none_if_not_finite(fit.rvalue)
        alpha_pct = _none_if_not_finite(((1.0 + fit.intercept) ** TRADING_DAYS_PER_YEAR - 1.0) * 100.0)
    return {
        "benchmark_final_equity": final,
        "benchmark_total_return_pct": (final / float(starting_cash) - 1.0) * 100.0,
        "benchmark_cagr_pct": (_none_if_not_finite(((final / starting_cash) ** (1.0 / years) - 1.0) * 100.0)
                               if years > 0.0 else None),
        "benchmark_max_drawdown_pct": float(drawdown_series(held, starting_cash)["drawdown_pct"].min()),
        "benchmark_sharpe": sharpe_ratio(held_returns),
        "benchmark_sortino": sortino_ratio(held_returns),
        "beta": beta,
        "correlation": correlation,
        "alpha_pct": alpha_pct,
        "benchmark_yearly_returns_pct": period_returns(held, starting_cash, "year"),
    }


def performance_metrics(equity: pd.Series, trades: pd.DataFrame, starting_cash: float,
                        benchmark_price: pd.Series | None = None,
                        min_sessions_to_annualise: int = MIN_SESSIONS_TO_ANNUALISE) -> dict:
    """The run's summary: see the module docstring for every convention. Keys: net_profit,
    total_return_pct, cagr_pct, max_drawdown, max_drawdown_pct, sharpe, sortino, win_rate,
    profit_factor, win_loss_ratio, expectancy, avg_days_held, trade_count, fitness, plus
    gross_profit, gross_loss, avg_win, avg_loss, final_equity, years, the replayed period
    (first_bar, last_bar, bars, sessions, annualised) and monthly_returns_pct /
    yearly_returns_pct. With ``benchmark_price`` (the underlying's price at each equity bar) the
    keys of ``benchmark_metrics`` too. Annualised figures are None below
    ``min_sessions_to_annualise`` sessions (1 reports them for any period)."""
    if not (math.isfinite(starting_cash) and starting_cash > 0):
        raise ValueError(f"starting_cash must be a finite number > 0, got {starting_cash!r}")
    equity = _check_equity(equity)
    final_equity = float(equity.iloc[-1])
    net_profit = final_equity - float(starting_cash)

    years = (equity.index[-1] - equity.index[0]).total_seconds() / (365.25 * 86400.0)
    if years <= 0.0:
        cagr_pct = None
    elif final_equity <= 0.0:
        cagr_pct = -100.0
    else:
        cagr_pct = _none_if_not_finite(((final_equity / starting_cash) ** (1.0 / years) - 1.0) * 100.0)

    drawdowns = drawdown_series(equity, starting_cash)
    max_drawdown = float(drawdowns["drawdown"].min())
    returns = daily_returns(equity, starting_cash)
    sessions = int(len(returns))

    metrics = {
        "net_profit": net_profit,
        "final_equity": final_equity,
        "total_return_pct": net_profit / starting_cash * 100.0,
        "years": float(years),
        "cagr_pct": cagr_pct,
        "max_drawdown": max_drawdown,
        "max_drawdown_pct": float(drawdowns["drawdown_pct"].min()),
        "sharpe": sharpe_ratio(returns),
        "sortino": sortino_ratio(returns),
    }
    metrics.update(trade_statistics(trades))
    metrics["fitness"] = net_profit / abs(max_drawdown) if max_drawdown < 0.0 else None
    metrics.update({
        "first_bar": equity.index[0].tz_convert(_EXCHANGE_TZ).isoformat(),
        "last_bar": equity.index[-1].tz_convert(_EXCHANGE_TZ).isoformat(),
        "bars": int(len(equity)), "sessions": sessions,
        "annualised": sessions >= min_sessions_to_annualise,
        "monthly_returns_pct": period_returns(equity, starting_cash, "month"),
        "yearly_returns_pct": period_returns(equity, starting_cash, "year"),
    })
    if benchmark_price is not None:
        metrics.update(benchmark_metrics(equity, benchmark_price, starting_cash))
    if not metrics["annualised"]:
        for key in ANNUALISED_KEYS:
            if key in metrics:
                metrics[key] = None
    return metrics
