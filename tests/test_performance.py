"""analytics/performance.py on tiny hand-worked runs. The expected numbers are computed here with
plain Python arithmetic (the statistics module, explicit loops), independently of the numpy/pandas
code under test."""
from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest

from analytics.performance import daily_returns, drawdown_series, performance_metrics

# The hand examples span four sessions: short of the report's threshold for annualised figures,
# which these tests check the formulas of (the threshold has its own tests in test_report_figures).
ANY_PERIOD = {"min_sessions_to_annualise": 1}

START = 1000.0
# Four sessions, several bars in some of them.
TIMES = ["2024-01-02 10:00", "2024-01-02 16:00", "2024-01-03 10:00", "2024-01-03 16:00",
         "2024-01-04 10:00", "2024-01-04 16:00", "2024-01-05 16:00"]
VALUES = [1000.0, 1010.0, 990.0, 980.0, 1000.0, 1030.0, 1020.0]


def equity_series(values=VALUES, times=TIMES, tz="America/New_York"):
    return pd.Series(values, index=pd.DatetimeIndex(times).tz_localize(tz))


def trades_frame(pnl, days):
    times = pd.DatetimeIndex(["2024-01-02 10:00"] * len(pnl)).tz_localize("America/New_York")
    return pd.DataFrame({"entry_time": times, "exit_time": times, "pnl": pnl, "days_held": days})


TRADES = trades_frame([50.0, -20.0, 30.0, -40.0, 0.0], [1, 2, 3, 4, 5])


def test_drawdown_by_hand():
    frame = drawdown_series(equity_series(), START)
    # Peaks 1000 1010 1010 1010 1010 1030 1030 → drawdowns 0 0 −20 −30 −10 0 −10.
    assert frame["drawdown"].tolist() == [0.0, 0.0, -20.0, -30.0, -10.0, 0.0, -10.0]
    assert frame["drawdown_pct"].iloc[3] == pytest.approx(-30.0 / 1010.0 * 100.0)
    # Equity opening below the starting cash is already a drawdown.
    below = drawdown_series(equity_series([990.0, 1000.0], TIMES[:2]), START)
    assert below["drawdown"].tolist() == [-10.0, 0.0]


def test_metrics_on_a_hand_example():
    metrics = performance_metrics(equity_series(), TRADES, START, **ANY_PERIOD)
    assert metrics["net_profit"] == pytest.approx(20.0)
    assert metrics["total_return_pct"] == pytest.approx(2.0)
    assert metrics["max_drawdown"] == pytest.approx(-30.0)
    assert metrics["max_drawdown_pct"] == pytest.approx(-30.0 / 1010.0 * 100.0)
    assert metrics["fitness"] == pytest.approx(20.0 / 30.0)

    # Session closes 1010, 980, 1030, 1020; the first measured against the starting 1000.
    closes = [1000.0, 1010.0, 980.0, 1030.0, 1020.0]
    returns = [closes[i] / closes[i - 1] - 1.0 for i in range(1, len(closes))]
    assert daily_returns(equity_series(), START).tolist() == pytest.approx(returns)
    sharpe = statistics.mean(returns) / statistics.stdev(returns) * math.sqrt(252)
    downside = math.sqrt(sum(min(r, 0.0) ** 2 for r in returns) / len(returns))
    sortino = statistics.mean(returns) / downside * math.sqrt(252)
    assert metrics["sharpe"] == pytest.approx(sharpe, rel=1e-12)
    assert metrics["sortino"] == pytest.approx(sortino, rel=1e-12)

    # 2024-01-02 10:00 → 2024-01-05 16:00 is 3.25 calendar days.
    years = 3.25 / 365.25
    assert metrics["cagr_pct"] == pytest.approx((1.02 ** (1.0 / years) - 1.0) * 100.0, rel=1e-12)

    # Trades 50, −20, 30, −40, 0: wins 80, losses −60.
    assert metrics["trade_count"] == 5
    assert metrics["win_rate"] == pytest.approx(2 / 5)
    assert metrics["profit_factor"] == pytest.approx(80.0 / 60.0)
    assert metrics["win_loss_ratio"] == pytest.approx((80.0 / 2) / (60.0 / 2))
    assert metrics["expectancy"] == pytest.approx(20.0 / 5)
    assert metrics["avg_days_held"] == pytest.approx(3.0)
    json.dumps(metrics, allow_nan=False)


def test_session_grouping_uses_exchange_time():
    # The same instants indexed in UTC give the same sessions and the same numbers.
    eastern = equity_series()
    utc = eastern.tz_convert("UTC")
    assert performance_metrics(utc, TRADES, START) == performance_metrics(eastern, TRADES, START)


def test_no_trades_and_flat_equity():
    flat = equity_series([START] * len(VALUES))
    metrics = performance_metrics(flat, trades_frame([], []), START, **ANY_PERIOD)
    assert metrics["net_profit"] == 0.0 and metrics["max_drawdown"] == 0.0
    assert metrics["trade_count"] == 0
    for key in ("fitness", "sharpe", "sortino", "win_rate", "profit_factor", "win_loss_ratio",
                "expectancy", "avg_days_held"):
        assert metrics[key] is None, key
    assert metrics["cagr_pct"] == 0.0
    json.dumps(metrics, allow_nan=False)


def test_all_winners():
    rising = equity_series([1000.0, 1005.0, 1010.0, 1012.0, 1015.0, 1020.0, 1030.0])
    metrics = performance_metrics(rising, trades_frame([10.0, 20.0], [2, 4]), START, **ANY_PERIOD)
    assert metrics["win_rate"] == 1.0
    assert metrics["profit_factor"] is None          # no losing trade: undefined, not inf
    assert metrics["win_loss_ratio"] is None
    assert metrics["sortino"] is None                 # no losing day
    assert metrics["fitness"] is None                 # no drawdown
    assert metrics["sharpe"] is not None and metrics["sharpe"] > 0
    json.dumps(metrics, allow_nan=False)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="tz-aware"):
        performance_metrics(pd.Series([1.0], index=pd.DatetimeIndex(["2024-01-02"])), TRADES, START)
    with pytest.raises(ValueError, match="empty"):
        performance_metrics(pd.Series([], dtype=float, index=pd.DatetimeIndex([], tz="UTC")), TRADES, START)
    broken = equity_series([1000.0, float("nan"), 990.0], TIMES[:3])
    with pytest.raises(ValueError, match="2024-01-02 16:00"):
        performance_metrics(broken, TRADES, START)
    with pytest.raises(ValueError, match="days_held"):
        performance_metrics(equity_series(), TRADES.drop(columns="days_held"), START)
    bad_pnl = trades_frame([1.0, float("inf")], [1, 1])
    with pytest.raises(ValueError, match="row 1"):
        performance_metrics(equity_series(), bad_pnl, START)
