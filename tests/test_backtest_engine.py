"""The backtest drivers (core/backtest_engine.py) on the embedded data: the Backtrader driver and
the fast driver give bitwise identical trades and equity curves (same-bar fills, next-bar fills, and
condors held to expiry and settled/assigned); the books balance; and no decision at or before a bar
depends on data after it (a shorter data set, and spot/VIX changed after a session's close).

One provider per period is built per module (a month of 5-minute bars loads in about a second).
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from core.backtest_engine import run_backtrader, run_fast, trades_frame
from core.config import Config
from core.dto import CONTRACT_MULTIPLIER, ExitReason
from core.market_data import (
    embedded_chain_provider,
    garch_config,
    spread_params,
    surface_params,
)
from data_factory import embedded
from data_factory.intraday import intraday_bars
from data_factory.market_calendar import trading_sessions
from data_factory.option_chain import SyntheticChainProvider

NY = "America/New_York"
START, END = dt.date(2016, 1, 4), dt.date(2016, 3, 31)
SHORT_END = dt.date(2016, 2, 29)                 # END minus one month, for the look-ahead test
# The mechanical condor (no Stage-2 gates): these tests pin the exit and fill mechanics;
# tests/test_intelligence_backtest.py covers the gated strategy.
BASE = Config().override({"backtest.start": START, "backtest.end": END, "filters.use_entry_gates": False})
# Short-dated condors held to expiry: DTE exit off (0), no time stop, P&L rules out of reach.
HOLD_TO_SETTLEMENT = BASE.override({
    "strategy.dte_min": 5, "strategy.dte_max": 12, "exits.dte_exit": 0, "exits.max_hold_days": 365,
    "exits.profit_take_pct": 1.0, "exits.loss_close_multiple": 10.0,
})
ENTRY_FIELDS = ["position_id", "entry_time", "expiration", "long_put", "short_put", "short_call", "long_call",
                "contracts", "credit"]


@pytest.fixture(scope="module")
def provider():
    return embedded_chain_provider(BASE)


@pytest.fixture(scope="module")
def fast_base(provider):
    return run_fast(BASE, provider)


@pytest.fixture(scope="module")
def fast_to_expiry(provider):
    return run_fast(HOLD_TO_SETTLEMENT, provider)


def assert_identical_runs(first, second):
    """Trades and per-bar account bitwise equal (every column, exact floats)."""
    trades_a, trades_b = trades_frame(first.positions), trades_frame(second.positions)
    pd.testing.assert_frame_equal(trades_a, trades_b, check_exact=True)
    pd.testing.assert_frame_equal(first.equity, second.equity, check_exact=True)
    assert first.bars == second.bars


def ibkr_order_fee(quantity: int) -> float:
    """One condor order at the ibkr preset, by hand: 4·q contracts at 0.65 commission and 0.05185
    regulatory, 2·q of them sold at 0.00279 TAF, rounded up to the cent."""
    dollars = 4 * quantity * 0.65 + 4 * quantity * (0.02685 + 0.025) + 2 * quantity * 0.00279
    return math.ceil(dollars * 100 - 1e-9) / 100


def minute_of_day(stamps: pd.Series) -> np.ndarray:
    local = pd.DatetimeIndex(stamps).tz_convert(NY)
    return (local.hour * 60 + local.minute).to_numpy()


# ------------------------------------------------------------------------------------------------
# driver parity
# ------------------------------------------------------------------------------------------------

def test_backtrader_and_fast_drivers_agree_on_three_months(provider, fast_base):
    assert len(provider.bar_times) > 4_500                     # ~61 sessions × 78 bars
    slow = run_backtrader(BASE, provider)
    assert_identical_runs(fast_base, slow)
    trades = trades_frame(fast_base.positions)
    assert len(trades) >= 15
    # The run exercises several exit rules, not one path only.
    reasons = set(trades["exit_reason"])
    assert {ExitReason.PROFIT_TAKE.value, ExitReason.STOP_LOSS.value}.issubset(reasons)
    assert len(reasons) >= 4
    assert slow.engine == "backtrader" and fast_base.engine == "fast"
    assert {"sharpe_ratio", "max_drawdown_pct"}.issubset(slow.analyzers)


def test_next_bar_fills_agree_between_drivers(provider, fast_base):
    config = BASE.override({"backtest.fill_on_next_bar": True, "backtest.samples": 1_600})
    fast = run_fast(config, provider)
    slow = run_backtrader(config, provider)
    assert_identical_runs(fast, slow)
    assert fast.bars == 1_600
    trades = trades_frame(fast.positions)
    assert len(trades) >= 5
    # Decisions are made on bars 09:45 … 15:30; their fills land one 5-minute bar later.
    minutes = minute_of_day(trades["entry_time"])
    assert (minutes >= 9 * 60 + 50).all() and (minutes <= 15 * 60 + 35).all()
    # The first trade is decided at the first window bar of the run, as in the same-bar run, and
    # filled one bar later at that bar's quotes (same strikes, possibly a different credit).
    same_bar = trades_frame(fast_base.positions).iloc[0]
    first = trades.iloc[0]
    assert first["entry_time"] == same_bar["entry_time"] + pd.Timedelta(minutes=5)
    assert [first[k] for k in ("long_put", "short_put", "short_call", "long_call")] == \
           [same_bar[k] for k in ("long_put", "short_put", "short_call", "long_call")]


def test_condors_held_to_expiry_agree_between_drivers_and_settle_at_intrinsic(provider, fast_to_expiry):
    slow = run_backtrader(HOLD_TO_SETTLEMENT, provider)
    assert_identical_runs(fast_to_expiry, slow)

    trades = trades_frame(fast_to_expiry.positions)
    # With dte_exit 0 nothing closes a condor on its expiry day before the settlement.
    assert ExitReason.DTE_EXIT.value not in set(trades["exit_reason"])
    expired = trades[trades["exit_reason"] == ExitReason.EXPIRY.value]
    assert len(expired) >= 5
    spot = provider.spot_bars()
    for _, trade in expired.iterrows():
        # Settled at the expiry's close (16:00, or 13:00 on an early close) against that bar's spot.
        exit_time = pd.Timestamp(trade["exit_time"]).tz_convert(NY)
        assert exit_time.date().isoformat() == trade["expiration"]
        assert exit_time == provider.settlement_time(trade["expiration"])
        s = float(spot.loc[exit_time])
        put_value = min(max(trade["short_put"] - s, 0.0), trade["short_put"] - trade["long_put"])
        call_value = min(max(s - trade["short_call"], 0.0), trade["long_call"] - trade["short_call"])
        assert trade["exit_debit"] == pytest.approx(put_value + call_value, abs=1e-9)
        expected_assigned = [leg for leg, itm in (("short_put", s < trade["short_put"]),
                                                  ("short_call", s > trade["short_call"])) if itm]
        assert trade["assigned_legs"] == "+".join(expected_assigned)
        # Settlement costs no fees: only the entry order's.
        assert trade["fees"] == pytest.approx(ibkr_order_fee(int(trade["contracts"])), abs=1e-9)
    # Over two months of 5–12 DTE condors through the early-2016 sell-off, some short legs finish
    # in the money: the assignment path is part of the parity check.
    assert (expired["assigned_legs"] != "").any()


# ------------------------------------------------------------------------------------------------
# the books
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run", ["fast_base", "fast_to_expiry"])
def test_trade_pnl_and_equity_balance(run, request):
    result = request.getfixturevalue(run)
    config = BASE
    trades = trades_frame(result.positions)
    quantity = trades["contracts"].to_numpy()
    # P&L = (credit − exit debit) × 100 × contracts − fees, to the cent.
    by_hand = (trades["credit"] - trades["exit_debit"]) * CONTRACT_MULTIPLIER * quantity - trades["fees"]
    np.testing.assert_allclose(trades["pnl"], by_hand, rtol=0, atol=1e-6)
    # Non-expiry exits pay the ibkr fee on both orders.
    traded = trades["exit_reason"] != ExitReason.EXPIRY.value
    round_trip = np.array([2 * ibkr_order_fee(int(q)) for q in quantity])
    np.testing.assert_allclose(trades["fees"][traded], round_trip[traded.to_numpy()], rtol=0, atol=1e-9)
    # The run ends flat: last equity = cash = starting cash + Σ P&L.
    equity = result.equity
    assert equity["open_positions"].iloc[-1] == 0
    assert equity["equity"].iloc[-1] == equity["cash"].iloc[-1]
    assert equity["cash"].iloc[-1] == pytest.approx(config.backtest.cash + trades["pnl"].sum(), abs=1e-6)
    # Equity at the closing side never exceeds equity at mid.
    assert (equity["equity_liquidation"] <= equity["equity"] + 1e-9).all()


def test_entry_rules_hold_over_the_run(fast_base):
    strategy = BASE.strategy
    trades = trades_frame(fast_base.positions)
    entries = pd.DatetimeIndex(trades["entry_time"]).tz_convert(NY)
    exits = pd.DatetimeIndex(trades["exit_time"]).tz_convert(NY)
    minutes = entries.hour * 60 + entries.minute
    assert ((minutes >= 9 * 60 + 45) & (minutes <= 15 * 60 + 30)).all()
    # At most one entry per session.
    assert not pd.Series(entries.date).duplicated().any()
    # At most max_positions open: positions entered before and still open after each new entry
    # (a position closed on the entry's own bar frees its slot), plus the new one.
    for entry in entries:
        still_open = int(((entries < entry) & (exits > entry)).sum())
        assert still_open + 1 <= strategy.max_positions
    # Expiries chosen inside the DTE range, counted from the entry session.
    dte = (pd.to_datetime(trades["expiration"]) - pd.DatetimeIndex(entries.date)).dt.days
    assert ((dte >= strategy.dte_min) & (dte <= strategy.dte_max)).all()
    # Wings are within wing_min … wing_max.
    put_width = trades["short_put"] - trades["long_put"]
    call_width = trades["long_call"] - trades["short_call"]
    for width in (put_width, call_width):
        assert ((width >= strategy.wing_width_min) & (width <= strategy.wing_width_max)).all()


def test_max_adverse_excursion_covers_the_exit_loss(fast_base):
    # With same-bar fills the exit is filled at the quotes on which the exit was decided, and the
    # excursion is tracked on every bar through that one, so it is at least the realised loss
    # before fees.
    trades = trades_frame(fast_base.positions)
    loss_at_exit = (trades["exit_debit"] - trades["credit"]) * CONTRACT_MULTIPLIER * trades["contracts"]
    assert (trades["max_adverse_excursion"] >= loss_at_exit - 1e-9).all()
    assert (trades["max_adverse_excursion"] >= 0).all()
    stopped = trades[trades["exit_reason"] == ExitReason.STOP_LOSS.value]
    # A stop fires at loss ≥ loss_close_multiple × credit per share.
    multiple = BASE.exits.loss_close_multiple
    assert ((stopped["exit_debit"] - stopped["credit"]) >= multiple * stopped["credit"] - 1e-9).all()


# ------------------------------------------------------------------------------------------------
# no look-ahead
# ------------------------------------------------------------------------------------------------

def entries_table(trades: pd.DataFrame, upto: pd.Timestamp) -> pd.DataFrame:
    return trades.loc[trades["entry_time"] <= upto, ENTRY_FIELDS].sort_values("position_id") \
        .reset_index(drop=True)


def exits_table(trades: pd.DataFrame, before: pd.Timestamp, inclusive: bool) -> pd.DataFrame:
    done = trades["exit_time"] <= before if inclusive else trades["exit_time"] < before
    columns = ["position_id", "exit_time", "exit_debit", "fees", "pnl", "exit_reason", "max_adverse_excursion",
               "assigned_legs", "early_assignment_risk"]
    return trades.loc[done, columns].sort_values("position_id").reset_index(drop=True)


def test_a_month_more_data_changes_no_earlier_decision(provider, fast_base):
    short_provider = embedded_chain_provider(BASE.override({"backtest.end": SHORT_END}))
    cut = short_provider.bar_times[-1]                         # 2016-02-29 16:00
    assert cut.date() == SHORT_END and provider.bar_times[-1].date() == END
    short = run_fast(BASE, short_provider)
    short_trades, long_trades = trades_frame(short.positions), trades_frame(fast_base.positions)

    # Premise: the longer data set agrees on every bar up to the cut.
    n = len(short_provider.bar_times)
    assert (provider.bar_times[:n] == short_provider.bar_times).all()
    np.testing.assert_array_equal(provider.spot_bars().to_numpy()[:n], short_provider.spot_bars().to_numpy())
    np.testing.assert_array_equal(provider.iv_index_bars().to_numpy()[:n],
                                  short_provider.iv_index_bars().to_numpy())

    # Every entry up to the cut and every exit before it are the same decisions.
    pd.testing.assert_frame_equal(entries_table(short_trades, cut), entries_table(long_trades, cut),
                                  check_exact=True)
    pd.testing.assert_frame_equal(exits_table(short_trades, cut, False), exits_table(long_trades, cut, False),
                                  check_exact=True)
    assert len(entries_table(short_trades, cut)) >= 10
    # What the shorter run closed for lack of data is what the longer run still held at the cut.
    ended = short_trades.loc[short_trades["exit_reason"] == ExitReason.END_OF_DATA.value, "position_id"]
    held = long_trades.loc[(long_trades["entry_time"] <= cut) & (long_trades["exit_time"] > cut), "position_id"]
    assert sorted(ended) == sorted(held)
    # The account matches bar for bar before the cut (the cut bar itself books the forced closes).
    pd.testing.assert_frame_equal(short.equity.iloc[: n - 1], fast_base.equity.iloc[: n - 1], check_exact=True)


def embedded_frames(config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (bars, daily) frames SyntheticChainProvider.from_embedded builds for the configured
    period, rebuilt here so they can be changed before the provider is made."""
    backtest = config.backtest
    first = pd.Timestamp(backtest.start)
    earlier = trading_sessions(first - pd.Timedelta(days=10), first)
    daily_start = earlier[earlier < first][-1]
    daily = embedded.daily_bars(backtest.underlying, daily_start, backtest.end)
    iv = embedded.daily_iv_index(daily_start, backtest.end, garch_config=garch_config(config))
    bars = intraday_bars(daily.loc[daily.index >= first], freq="5min", seed=backtest.seed)
    frame = pd.DataFrame({
        "open": daily["open"], "close": daily["close"], "iv_index": iv["iv_index"].reindex(daily.index),
        "rate": embedded.risk_free_rate(daily.index).to_numpy(),
    }, index=daily.index)
    return bars[["close"]], frame


def provider_from_frames(config: Config, bars: pd.DataFrame, daily: pd.DataFrame) -> SyntheticChainProvider:
    synthetic = config.synthetic
    return SyntheticChainProvider(bars, daily, dividend_yield=synthetic.dividend_yield,
                                  surface=surface_params(config), spreads=spread_params(config),
                                  spot_vol_beta=synthetic.spot_vol_beta)


def test_changing_spot_and_vix_after_a_session_close_changes_no_decision_up_to_it(provider, fast_base):
    bars, daily = embedded_frames(BASE)
    # The rebuilt frames are the provider's data.
    np.testing.assert_array_equal(bars["close"].to_numpy(), provider.spot_bars().to_numpy())

    # Cut at a session's last bar: the synthetic intraday IV bridges to the same day's VIX close,
    # so the change starts with the next session.
    session = pd.Timestamp("2016-02-12")
    local = bars.index.tz_convert(NY) if bars.index.tz is not None else bars.index.tz_localize(NY)
    cut = local[local.normalize().tz_localize(None) == session][-1]
    after_bars = local > cut
    changed_bars = bars.copy()
    changed_bars.loc[after_bars, "close"] = bars.loc[after_bars, "close"] * 1.05
    changed_daily = daily.copy()
    after_days = changed_daily.index > session
    for column in ("open", "close"):
        changed_daily.loc[after_days, column] = daily.loc[after_days, column] * 1.05
    changed_daily.loc[after_days, "iv_index"] = daily.loc[after_days, "iv_index"] + 6.0
    changed = provider_from_frames(BASE, changed_bars, changed_daily)

    cut_bar = provider.bar_index(cut)
    assert cut.hour == 16 and cut_bar + 1 < len(provider.bar_times)
    # Premise: every bar up to the cut is quoted the same; the next one is not.
    np.testing.assert_array_equal(changed.spot_bars().to_numpy()[: cut_bar + 1],
                                  provider.spot_bars().to_numpy()[: cut_bar + 1])
    np.testing.assert_array_equal(changed.iv_index_bars().to_numpy()[: cut_bar + 1],
                                  provider.iv_index_bars().to_numpy()[: cut_bar + 1])
    np.testing.assert_array_equal(changed.slice_at(cut_bar, 30, 45).bid, provider.slice_at(cut_bar, 30, 45).bid)
    assert changed.spot_bars().iloc[cut_bar + 1] != provider.spot_bars().iloc[cut_bar + 1]

    run = run_fast(BASE, changed)
    base_trades, changed_trades = trades_frame(fast_base.positions), trades_frame(run.positions)
    pd.testing.assert_frame_equal(entries_table(base_trades, cut), entries_table(changed_trades, cut),
                                  check_exact=True)
    pd.testing.assert_frame_equal(exits_table(base_trades, cut, True), exits_table(changed_trades, cut, True),
                                  check_exact=True)
    assert len(entries_table(base_trades, cut)) >= 8
    pd.testing.assert_frame_equal(run.equity.iloc[: cut_bar + 1], fast_base.equity.iloc[: cut_bar + 1],
                                  check_exact=True)
    # The change does reach the decisions after the cut (the test can tell data apart).
    later = ["entry_time", "long_put", "short_put", "short_call", "long_call", "credit"]
    assert not base_trades.loc[base_trades["entry_time"] > cut, later].reset_index(drop=True).equals(
        changed_trades.loc[changed_trades["entry_time"] > cut, later].reset_index(drop=True))


def test_backtrader_feed_carries_the_synthetic_ohlcv_in_exchange_time(provider):
    import backtrader as bt

    from core.backtest_engine import BacktestSession, _array_feed

    config = BASE.override({"backtest.samples": 200})
    session = BacktestSession(config, provider)
    seen = []

    class Recorder(bt.Strategy):
        def next(self):
            data = self.data
            seen.append((data.datetime.datetime(0), data.open[0], data.high[0], data.low[0], data.close[0],
                         data.volume[0]))

    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(_array_feed(bt, session, provider))
    cerebro.addstrategy(Recorder)
    cerebro.run()
    bars = provider.ohlcv_bars().iloc[:200]
    assert len(seen) == 200
    expected_times = bars.index.tz_convert("America/New_York").tz_localize(None).to_pydatetime()
    # Backtrader stores times as float day numbers: equal to the microsecond.
    assert all(abs((got[0] - want).total_seconds()) < 1e-3 for got, want in zip(seen, expected_times))
    assert np.array_equal(np.array([row[1:] for row in seen]),
                          bars[["open", "high", "low", "close", "volume"]].to_numpy())
