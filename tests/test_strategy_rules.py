"""The iron-condor rules end to end on single condors: settlement at expiry (worthless, max loss,
one short leg assigned), the exit rules and their priority (strategies/options_strategy.py), fees
(core/execution.py), the engine's per-bar exit decisions and early-assignment flag (core/engine.py), and the
strike selection on a real synthetic chain slice with the engine's rejection reasons.

Every expected number is worked out by hand in the test (comments show the arithmetic); nothing
is copied from an implementation run.
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from core.backtest_engine import BacktestSession
from core.config import Config
from core.dto import (
    CONTRACT_MULTIPLIER,
    Action,
    ExitReason,
    IronCondor,
    LegQuotes,
    MarketSnapshot,
)
from core.engine import BarClock, TradingEngine
from core.execution import FillModel, fee_schedule, make_fill, settlement_fill
from core.market_data import embedded_chain_provider
from core.portfolio import Portfolio
from data_factory.option_chain import StructureQuotes
from risk.risk_manager import Book
from strategies.options_strategy import (
    EXIT_CODE,
    NO_EXIT,
    REASON_OF_CODE,
    CondorChoice,
    Rejection,
    choose_iron_condor,
    credit_is_sufficient,
    exit_codes,
)

NY = "America/New_York"
ENTRY_TIME = pd.Timestamp("2016-01-25 10:30", tz=NY)
EXPIRY = dt.date(2016, 2, 19)
SETTLEMENT = pd.Timestamp("2016-02-19 16:00", tz=NY)

# Leg order: long put, short put, short call, long call. Spreads of 0.10 on every leg.
OPEN_BID = np.array([0.40, 1.10, 0.95, 0.30])
OPEN_ASK = np.array([0.50, 1.20, 1.05, 0.40])
# At mid: long put 0.45, short put 1.15, short call 1.00, long call 0.35.
# Credit = (1.15 + 1.00) − (0.45 + 0.35) = 1.35 per share.
MID_CREDIT = 1.35


def make_condor(quantity: int = 2) -> IronCondor:
    # Put wing 195 − 190 = 5, call wing 220 − 215 = 5.
    return IronCondor(EXPIRY, SETTLEMENT, 190.0, 195.0, 215.0, 220.0, quantity)


def opened(condor: IronCondor, fill_model: FillModel, fees_name: str):
    """A portfolio holding ``condor`` opened at OPEN_BID/OPEN_ASK."""
    portfolio = Portfolio(100_000.0)
    entry = make_fill(ENTRY_TIME, 0, Action.OPEN, OPEN_BID, OPEN_ASK, condor.quantity, "entry", fill_model,
                      fee_schedule(fees_name))
    position = portfolio.open_position(condor, entry)
    return portfolio, position


def settle(portfolio: Portfolio, position, underlying: float, fees_name: str = "none"):
    fill, assigned = settlement_fill(SETTLEMENT, position.position_id, position.condor, underlying,
                                     fee_schedule(fees_name))
    portfolio.close_position(position.position_id, fill, assigned_legs=assigned)
    return fill, assigned


# ------------------------------------------------------------------------------------------------
# settlement at expiry, fees 'none' (clean arithmetic)
# ------------------------------------------------------------------------------------------------

def test_condor_expiring_worthless_keeps_the_whole_credit():
    condor = make_condor(quantity=2)
    portfolio, position = opened(condor, FillModel(0.5), "none")
    assert position.entry_credit == pytest.approx(MID_CREDIT, abs=1e-12)
    assert position.entry_fill.fees == 0.0

    # Spot 205 sits between the short strikes 195 and 215: every leg is out of the money.
    fill, assigned = settle(portfolio, position, 205.0)
    assert fill.leg_prices == (0.0, 0.0, 0.0, 0.0)
    assert fill.net_price == 0.0                      # debit 0
    assert fill.fees == 0.0
    assert fill.reason == ExitReason.EXPIRY.value
    assert assigned == ()
    # P&L = credit × 100 × contracts − entry fees = 1.35 × 100 × 2 − 0 = 270.
    assert position.realized_pnl == pytest.approx(270.0, abs=1e-9)
    assert portfolio.cash == pytest.approx(100_000.0 + 270.0, abs=1e-9)


@pytest.mark.parametrize("underlying", [187.5, 190.0, 150.0])
def test_condor_losing_the_full_put_wing_at_expiry(underlying):
    condor = make_condor(quantity=2)
    portfolio, position = opened(condor, FillModel(0.5), "none")
    fill, assigned = settle(portfolio, position, underlying)

    # Spot at or below the long put: short put worth 195 − S, long put 190 − S, the difference is
    # the wing width 5 whatever S is; calls expire worthless.
    expected_legs = (190.0 - underlying, 195.0 - underlying, 0.0, 0.0)
    assert fill.leg_prices == pytest.approx(expected_legs, abs=1e-12)
    assert -fill.net_price == pytest.approx(5.0, abs=1e-12)
    # Only short legs are "assigned"; the long put is exercised, not assigned.
    assert assigned == ("short_put",)
    assert position.assigned_legs == ("short_put",)
    # P&L = (credit − width) × 100 × contracts − fees = (1.35 − 5) × 100 × 2 = −730.
    assert position.realized_pnl == pytest.approx(-730.0, abs=1e-9)
    # ...which is exactly the max loss the portfolio reserves for the condor (fees 'none').
    assert position.max_loss == pytest.approx(730.0, abs=1e-9)


def test_condor_with_one_short_call_assigned_at_expiry():
    condor = make_condor(quantity=2)
    portfolio, position = opened(condor, FillModel(0.5), "none")
    # Spot 217.25 between the short call 215 and the long call 220: intrinsic = 217.25 − 215 = 2.25.
    fill, assigned = settle(portfolio, position, 217.25)
    assert fill.leg_prices == (0.0, 0.0, 2.25, 0.0)
    assert -fill.net_price == 2.25
    assert assigned == ("short_call",)
    # P&L = (1.35 − 2.25) × 100 × 2 = −180.
    assert position.realized_pnl == pytest.approx(-180.0, abs=1e-9)
    # The dto's own intrinsic value agrees with the settlement fill.
    assert condor.intrinsic_value(217.25) == 2.25


def test_spot_exactly_at_a_short_strike_is_not_assigned():
    condor = make_condor(quantity=1)
    for spot in (195.0, 215.0):
        portfolio, position = opened(condor, FillModel(0.5), "none")
        fill, assigned = settle(portfolio, position, spot)
        assert assigned == ()
        assert fill.net_price == 0.0


# ------------------------------------------------------------------------------------------------
# fees written out: ibkr and alpaca
# ------------------------------------------------------------------------------------------------

# Per-contract schedule (core/execution.py presets): ibkr commission 0.65 (min 1.00 per order);
# regulatory pass-through ORF 0.02685 + OCC 0.025 = 0.05185 on every contract; FINRA TAF 0.00279
# on contracts sold. Fees are rounded up to the cent per order.

def test_ibkr_fees_on_a_two_lot_condor_held_to_worthless_expiry():
    condor = make_condor(quantity=2)
    portfolio, position = opened(condor, FillModel(0.66), "ibkr")
    # 0.66 of the 0.10 spread from our side = 0.066:
    #   buy long put 0.40 + 0.066 = 0.466, sell short put 1.20 − 0.066 = 1.134,
    #   sell short call 1.05 − 0.066 = 0.984, buy long call 0.30 + 0.066 = 0.366.
    # Credit = 1.134 + 0.984 − 0.466 − 0.366 = 1.286, rounded down to the tick: 1.28.
    assert position.entry_credit == pytest.approx(1.28, abs=1e-12)
    assert position.entry_fill.leg_prices == pytest.approx((0.466, 1.134, 0.984, 0.366), abs=1e-12)
    # Entry: 4 legs × 2 = 8 contracts, 4 of them sold.
    #   commission 8 × 0.65 = 5.20 (> 1.00 minimum), regulatory 8 × 0.05185 = 0.4148,
    #   TAF 4 × 0.00279 = 0.01116; total 5.62596 → 5.63.
    assert position.entry_fill.fees == pytest.approx(5.63, abs=1e-12)
    fill, assigned = settle(portfolio, position, 205.0, "ibkr")
    assert assigned == ()
    # Expiry settlement charges no commission (assignment fee 0 in the preset).
    assert fill.fees == 0.0
    # P&L = 1.28 × 100 × 2 − 5.63 = 250.37.
    assert position.realized_pnl == pytest.approx(250.37, abs=1e-9)


def test_ibkr_fees_on_a_condor_closed_before_expiry():
    condor = make_condor(quantity=2)
    portfolio, position = opened(condor, FillModel(0.66), "ibkr")
    close_bid = np.array([0.10, 0.40, 0.30, 0.05])
    close_ask = np.array([0.14, 0.44, 0.34, 0.09])
    exit_fill = make_fill(ENTRY_TIME + pd.Timedelta(days=3), position.position_id, Action.CLOSE, close_bid,
                          close_ask, 2, ExitReason.PROFIT_TAKE.value, FillModel(0.66), fee_schedule("ibkr"))
    portfolio.close_position(position.position_id, exit_fill)
    # 0.66 × 0.04 = 0.0264: sell long put 0.14 − 0.0264 = 0.1136, buy short put 0.40 + 0.0264 = 0.4264,
    # buy short call 0.30 + 0.0264 = 0.3264, sell long call 0.09 − 0.0264 = 0.0636.
    # Debit = 0.4264 + 0.3264 − 0.1136 − 0.0636 = 0.5756, rounded up: 0.58.
    assert exit_fill.net_price == pytest.approx(-0.58, abs=1e-12)
    # Exit: again 8 contracts, 4 sold (the long legs): 5.20 + 0.4148 + 0.01116 → 5.63.
    assert exit_fill.fees == pytest.approx(5.63, abs=1e-12)
    # P&L = (1.28 − 0.58) × 200 − 5.63 − 5.63 = 140 − 11.26 = 128.74.
    assert position.realized_pnl == pytest.approx(128.74, abs=1e-9)


def test_one_lot_fee_presets():
    one_lot = np.array(1)
    # ibkr: 4 × 0.65 = 2.60 + 4 × 0.05185 = 0.2074 + 2 × 0.00279 = 0.00558 → 2.81298 → 2.82.
    ibkr = make_fill(ENTRY_TIME, 0, Action.OPEN, OPEN_BID, OPEN_ASK, int(one_lot), "entry", FillModel(0.5),
                     fee_schedule("ibkr"))
    assert ibkr.fees == pytest.approx(2.82, abs=1e-12)
    # alpaca: no commission; 0.2074 + 0.00558 = 0.21298 → 0.22.
    alpaca = make_fill(ENTRY_TIME, 0, Action.OPEN, OPEN_BID, OPEN_ASK, int(one_lot), "entry", FillModel(0.5),
                       fee_schedule("alpaca"))
    assert alpaca.fees == pytest.approx(0.22, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# exit rules: thresholds and priority (debit arrays built by hand)
# ------------------------------------------------------------------------------------------------

EXIT_TEST_CONFIG = Config().override({
    "exits.profit_take_pct": 0.5, "exits.loss_close_multiple": 2.0, "exits.dte_exit": 5,
    "exits.max_hold_days": 20,
})


def reasons(codes) -> list:
    return [None if code == NO_EXIT else REASON_OF_CODE[int(code)] for code in codes]


def test_profit_take_fires_exactly_at_the_threshold_bar():
    # Credit 1.00, take profit at 50 %: P&L ≥ 0.50 ⇔ debit ≤ 0.50.
    debit = np.array([0.95, 0.80, 0.51, 0.50, 0.40])
    codes = exit_codes(debit, 1.00, np.full(5, 30), np.arange(1, 6), EXIT_TEST_CONFIG)
    assert reasons(codes) == [None, None, None, ExitReason.PROFIT_TAKE, ExitReason.PROFIT_TAKE]


def test_stop_loss_fires_exactly_at_the_threshold_bar():
    # Credit 1.00, stop at 2 × credit: loss = debit − 1.00 ≥ 2.00 ⇔ debit ≥ 3.00.
    debit = np.array([1.20, 2.50, 2.99, 3.00, 3.50])
    codes = exit_codes(debit, 1.00, np.full(5, 30), np.arange(1, 6), EXIT_TEST_CONFIG)
    assert reasons(codes) == [None, None, None, ExitReason.STOP_LOSS, ExitReason.STOP_LOSS]


def test_dte_exit_and_max_hold_fire_at_their_day():
    flat = np.full(5, 1.00)                # P&L 0: neither profit nor stop
    by_dte = exit_codes(flat, 1.00, np.array([8, 7, 6, 5, 4]), np.full(5, 3), EXIT_TEST_CONFIG)
    assert reasons(by_dte) == [None, None, None, ExitReason.DTE_EXIT, ExitReason.DTE_EXIT]
    by_age = exit_codes(flat, 1.00, np.full(5, 30), np.array([17, 18, 19, 20, 21]), EXIT_TEST_CONFIG)
    assert reasons(by_age) == [None, None, None, ExitReason.MAX_HOLD, ExitReason.MAX_HOLD]


def test_dte_exit_zero_means_hold_to_expiry():
    config = EXIT_TEST_CONFIG.override({"exits.dte_exit": 0})
    # DTE 2, 1, 0 (expiry day) with P&L 0 and a young position: nothing closes it before expiry.
    codes = exit_codes(np.full(3, 1.00), 1.00, np.array([2, 1, 0]), np.full(3, 5), config)
    assert reasons(codes) == [None, None, None]
    # dte_exit 1 closes from the day before expiry on.
    codes = exit_codes(np.full(3, 1.00), 1.00, np.array([2, 1, 0]), np.full(3, 5),
                       EXIT_TEST_CONFIG.override({"exits.dte_exit": 1, "strategy.dte_min": 5}))
    assert reasons(codes) == [None, ExitReason.DTE_EXIT, ExitReason.DTE_EXIT]


def test_exit_priority_when_several_rules_hold_at_once():
    # Every row is also past dte_exit (dte 5 ≤ 5) and max hold (20 ≥ 20) unless changed.
    debit = np.array([3.00, 0.50, 1.00, 1.00, 1.00])
    dte = np.array([5, 5, 5, 6, 6])
    held = np.array([20, 20, 20, 20, 19])
    codes = exit_codes(debit, 1.00, dte, held, EXIT_TEST_CONFIG)
    assert reasons(codes) == [ExitReason.STOP_LOSS, ExitReason.PROFIT_TAKE, ExitReason.DTE_EXIT,
                              ExitReason.MAX_HOLD, None]
    # Stop and profit can only hold together in a degenerate case: credit 0 and debit 0 satisfy
    # both "loss 0 ≥ 2 × 0" and "P&L 0 ≥ 0.5 × 0"; the stop must win.
    both = exit_codes(np.array([0.0]), 0.0, np.array([30]), np.array([1]), EXIT_TEST_CONFIG)
    assert reasons(both) == [ExitReason.STOP_LOSS]
    assert EXIT_CODE[ExitReason.STOP_LOSS] != EXIT_CODE[ExitReason.PROFIT_TAKE]


def test_profit_take_at_default_40_percent_on_a_cent_grid_threshold():
    # Regression: in doubles 0.9 − 0.54 = 0.36 < 0.4 × 0.9 = 0.36000000000000004; a threshold hit
    # exactly on the cent grid must still fire.
    config = Config()                      # profit_take_pct 0.40
    # Credit 0.90 → 40 % is 0.36 → threshold debit 0.90 − 0.36 = 0.54 (a whole number of cents).
    codes = exit_codes(np.array([0.55, 0.54]), 0.90, np.full(2, 30), np.full(2, 1), config)
    assert reasons(codes) == [None, ExitReason.PROFIT_TAKE]


def test_stop_loss_at_seed_multiple_on_a_cent_grid_threshold():
    # Regression: in doubles −(0.56 − 1.40) = 0.8399999999999999 < 1.5 × 0.56 = 0.8400000000000001.
    config = Config().override({"exits.loss_close_multiple": 1.5})
    # Credit 0.56 → loss 1.5 × 0.56 = 0.84 → threshold debit 0.56 + 0.84 = 1.40.
    codes = exit_codes(np.array([1.39, 1.40]), 0.56, np.full(2, 30), np.full(2, 1), config)
    assert reasons(codes) == [None, ExitReason.STOP_LOSS]


def test_credit_minimum_is_inclusive():
    config = Config().override({"strategy.min_credit_to_width": 0.25})
    # 0.25 × width 5 = 1.25: a credit of 1.25 passes, 1.24 does not.
    assert credit_is_sufficient(1.25, 5.0, config)
    assert not credit_is_sufficient(1.24, 5.0, config)
    assert not credit_is_sufficient(0.0, 5.0, Config().override({"strategy.min_credit_to_width": 0.0}))


def test_credit_exactly_at_the_default_minimum_ratio_passes():
    # Regression: in doubles 0.1 × 6.0 = 0.6000000000000001 > 0.6.
    assert credit_is_sufficient(0.60, 6.0, Config())          # 0.10 × 6 = 0.60


# ------------------------------------------------------------------------------------------------
# the engine's exit decision on one bar
# ------------------------------------------------------------------------------------------------

def snapshot_at(stamp: pd.Timestamp, spot: float, bid=None, ask=None) -> MarketSnapshot:
    """A one-bar market where every open condor is quoted at ``bid``/``ask`` (NaN: settled)."""
    bid = np.full(4, np.nan) if bid is None else np.asarray(bid, float)
    ask = np.full(4, np.nan) if ask is None else np.asarray(ask, float)
    mid = 0.5 * (bid + ask)
    zeros = np.zeros(4)

    def quote_many(positions):
        count = len(positions)
        return StructureQuotes(*(np.tile(values, (count, 1)) for values in (bid, ask, mid, zeros, zeros, zeros,
                                                                             zeros)))

    def no_chain(*args):
        raise AssertionError("no entry may be tried outside the entry window")

    day = stamp.tz_localize(None).normalize().date()
    return MarketSnapshot(
        timestamp=stamp, bar_index=0, session_day=day.toordinal() - dt.date(1970, 1, 1).toordinal(),
        symbol="SPY", spot=spot, iv_index=20.0, chain=no_chain, nearest_chain=no_chain,
        quote=lambda condor: LegQuotes(bid, ask, mid, zeros, zeros, zeros, zeros), quote_many=quote_many,
        settlement_of=lambda expiration: SETTLEMENT)


def engine_with_position(config: Config):
    portfolio, position = opened(make_condor(quantity=1), FillModel(0.5), "none")
    # A one-bar clock: these snapshots are all bar 0, outside the entry window.
    clock = BarClock(np.zeros(1, dtype=np.int64), np.full(1, 15 * 60 + 45, dtype=np.int64))
    engine = TradingEngine(config, portfolio, FillModel(0.5), clock)
    return engine, position


# Bars after the entry window (15:30) so that on_bar only decides exits.
LATE = "15:45"


def test_engine_settles_at_expiry_against_the_close():
    engine, position = engine_with_position(EXIT_TEST_CONFIG)
    decisions = engine.on_bar(snapshot_at(SETTLEMENT, 217.25))
    assert len(decisions) == 1
    decision = decisions[0]
    assert decision.action is Action.CLOSE
    assert decision.reason == ExitReason.EXPIRY.value
    assert decision.position_id == position.position_id
    assert decision.expected_price == 2.25          # 217.25 − 215


def test_engine_decides_profit_take_from_the_bar_quotes_and_tracks_excursion():
    stamp = pd.Timestamp(f"2016-01-27 {LATE}", tz=NY)   # 23 DTE, held 2 days: only P&L rules fire
    # Mid close: long put 0.30, short put 0.95, short call 0.85, long call 0.25 →
    # debit 0.95 + 0.85 − 0.30 − 0.25 = 1.25 > credit 1.35 × 0.5: hold; loss = −0.10 (a gain).
    engine, position = engine_with_position(EXIT_TEST_CONFIG)
    assert engine.on_bar(snapshot_at(stamp, 205.0, [0.25, 0.90, 0.80, 0.20], [0.35, 1.00, 0.90, 0.30])) == []
    assert position.max_adverse_excursion == 0.0
    # Debit 2.60 + 0.10 − 0.02 − 0.04 = 2.64: loss (2.64 − 1.35) × 100 = 129 < 2 × 135: hold,
    # but the excursion is recorded.
    assert engine.on_bar(snapshot_at(stamp, 193.0, [0.00, 2.55, 0.08, 0.02], [0.04, 2.65, 0.12, 0.06])) == []
    assert position.max_adverse_excursion == pytest.approx(129.0, abs=1e-9)
    # Debit 0.40 + 0.35 − 0.05 − 0.05 = 0.65 ≤ 1.35 − 0.675 = 0.675: profit take.
    decisions = engine.on_bar(snapshot_at(stamp, 205.0, [0.03, 0.38, 0.33, 0.03], [0.07, 0.42, 0.37, 0.07]))
    assert [d.reason for d in decisions] == [ExitReason.PROFIT_TAKE.value]
    assert decisions[0].expected_price == pytest.approx(0.65, abs=1e-12)
    # A position with a close pending is not decided again on the next bar.
    assert engine.on_bar(snapshot_at(stamp, 205.0, [0.03, 0.38, 0.33, 0.03], [0.07, 0.42, 0.37, 0.07])) == []
    assert position.max_adverse_excursion == pytest.approx(129.0, abs=1e-9)


def test_engine_decides_stop_loss_at_twice_the_credit():
    stamp = pd.Timestamp(f"2016-01-27 {LATE}", tz=NY)
    engine, position = engine_with_position(EXIT_TEST_CONFIG)
    # Debit 4.10 + 0.10 − 0.05 − 0.05 = 4.10: loss 2.75 ≥ 2 × 1.35 = 2.70: stop.
    decisions = engine.on_bar(snapshot_at(stamp, 191.0, [0.03, 4.05, 0.08, 0.03], [0.07, 4.15, 0.12, 0.07]))
    assert [d.reason for d in decisions] == [ExitReason.STOP_LOSS.value]
    assert position.max_adverse_excursion == pytest.approx(275.0, abs=1e-9)


def test_engine_flags_early_assignment_risk_near_expiry():
    engine, position = engine_with_position(EXIT_TEST_CONFIG.override({"exits.dte_exit": 0}))
    stamp = pd.Timestamp(f"2016-02-17 {LATE}", tz=NY)  # 2 DTE ≤ early_assignment_days 3
    # Spot 192: short put 195 is 3.00 in the money; its mid 3.02 leaves 0.02 < 0.05 of extrinsic.
    engine.on_bar(snapshot_at(stamp, 192.0, [0.00, 3.00, 0.00, 0.00], [0.04, 3.04, 0.02, 0.02]))
    assert position.early_assignment_risk
    assert any("short put" in note for note in position.notes)


def test_engine_does_not_flag_with_enough_extrinsic_value_or_time():
    stamp = pd.Timestamp(f"2016-02-17 {LATE}", tz=NY)
    engine, position = engine_with_position(EXIT_TEST_CONFIG.override({"exits.dte_exit": 0}))
    # Short put mid 3.20: extrinsic 0.20 ≥ 0.05.
    engine.on_bar(snapshot_at(stamp, 192.0, [0.00, 3.15, 0.00, 0.00], [0.04, 3.25, 0.02, 0.02]))
    assert not position.early_assignment_risk
    # Same thin extrinsic, but 7 DTE (> 3 days): no flag.
    engine, position = engine_with_position(EXIT_TEST_CONFIG.override({"exits.dte_exit": 0}))
    engine.on_bar(snapshot_at(pd.Timestamp(f"2016-02-12 {LATE}", tz=NY), 192.0,
                              [0.00, 3.00, 0.00, 0.00], [0.04, 3.04, 0.02, 0.02]))
    assert not position.early_assignment_risk


# ------------------------------------------------------------------------------------------------
# strike selection on a real synthetic chain slice
# ------------------------------------------------------------------------------------------------

CHAIN_CONFIG = Config().override({
    "backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 1, 29),
    "strategy.wing_width_min": 3.5, "strategy.wing_width_max": 7.0,
    "strategy.target_short_delta_low": 0.10, "strategy.target_short_delta_high": 0.20,
    # The mechanical condor: these tests pin strike choice and credit; Stage-2 has its own tests.
    "filters.use_entry_gates": False,
})
CHAIN_TIME = pd.Timestamp("2016-01-12 10:30", tz=NY)


@pytest.fixture(scope="module")
def provider():
    return embedded_chain_provider(CHAIN_CONFIG)


@pytest.fixture(scope="module")
def chain_bar(provider):
    return provider.bar_index(CHAIN_TIME)


def scan_short(frame: pd.DataFrame, low: float, high: float, puts: bool) -> tuple[float, float]:
    """(strike, best distance) of the short leg by a plain scan: |delta| in [low, high], bid > 0,
    closest to the centre."""
    rows = frame[(frame["right"] == ("P" if puts else "C")) & (frame["bid"] > 0.0)]
    rows = rows[(rows["delta"].abs() >= low) & (rows["delta"].abs() <= high)]
    distance = (rows["delta"].abs() - 0.5 * (low + high)).abs()
    return float(rows["strike"][distance == distance.min()].iloc[0]), float(distance.min())


def test_condor_choice_on_a_chain_slice(provider, chain_bar):
    strategy = CHAIN_CONFIG.strategy
    chain = provider.slice_at(chain_bar, dte_min=strategy.dte_min, dte_max=strategy.dte_max)
    choice = choose_iron_condor(chain, CHAIN_CONFIG)
    assert isinstance(choice, CondorChoice)

    # Nearest expiry with dte in 30 … 45, found from the unrestricted chain.
    full = provider.slice_at(chain_bar).to_frame()
    in_range = full[(full["dte"] >= strategy.dte_min) & (full["dte"] <= strategy.dte_max)]
    nearest = in_range["expiration"].min()
    assert pd.Timestamp(choice.expiration) == nearest
    assert strategy.dte_min <= choice.dte <= strategy.dte_max
    assert (full["expiration"][full["dte"] < choice.dte] < nearest).all()

    on_expiry = in_range[in_range["expiration"] == nearest]
    low, high = strategy.target_short_delta_low, strategy.target_short_delta_high
    put_strike, put_distance = scan_short(on_expiry, low, high, puts=True)
    call_strike, call_distance = scan_short(on_expiry, low, high, puts=False)
    long_put, short_put, short_call, long_call = choice.strikes
    assert short_put == put_strike and short_call == call_strike
    assert low <= abs(choice.short_put_delta) <= high and low <= abs(choice.short_call_delta) <= high
    centre = 0.5 * (low + high)
    assert abs(abs(choice.short_put_delta) - centre) == put_distance
    assert abs(abs(choice.short_call_delta) - centre) == call_distance
    assert choice.short_put_delta < 0 < choice.short_call_delta

    # Wings: the narrowest listed width in [3.5, 7]: strikes are every $1, so 4 dollars.
    listed_puts = set(on_expiry["strike"][on_expiry["right"] == "P"])
    listed_calls = set(on_expiry["strike"][on_expiry["right"] == "C"])
    assert short_put - 4.0 in listed_puts and short_call + 4.0 in listed_calls
    assert (long_put, long_call) == (short_put - 4.0, short_call + 4.0)
    assert choice.width == 4.0

    # The quotes carried for the credit test are the chain's quotes of those four contracts.
    for leg, (strike, right) in enumerate(zip(choice.strikes, "PPCC")):
        row = on_expiry[(on_expiry["strike"] == strike) & (on_expiry["right"] == right)].iloc[0]
        assert (choice.bid[leg], choice.ask[leg]) == (row["bid"], row["ask"])


def test_missing_wing_and_missing_calls_are_named(provider, chain_bar):
    strategy = CHAIN_CONFIG.strategy
    chain = provider.slice_at(chain_bar, dte_min=strategy.dte_min, dte_max=strategy.dte_max)
    no_calls = chain.select(~chain.is_call)
    assert choose_iron_condor(no_calls, CHAIN_CONFIG) == Rejection("no_call_in_delta_band")
    empty = chain.select(np.zeros(len(chain), dtype=bool))
    assert choose_iron_condor(empty, CHAIN_CONFIG) == Rejection("no_expiry_in_dte_range")


def session_engine(config: Config, provider):
    session = BacktestSession(config, provider)
    return session, session.engine


FLAT_BOOK = Book(equity=25_000.0, cash=25_000.0)


def test_engine_opens_the_chosen_condor_at_the_fill_model_credit(provider, chain_bar):
    # max_alloc binds here (the risk budget, 20 % of equity, is far above it).
    config = CHAIN_CONFIG.override({"strategy.quantity": 3, "strategy.max_alloc": 0.03,
                                    "risk.max_account_risk_per_trade": 0.2})
    session, engine = session_engine(config, provider)
    snapshot = session.snapshot(chain_bar)
    decision = engine.entry_decision(snapshot, FLAT_BOOK)
    assert decision is not None and decision.action is Action.OPEN
    choice = choose_iron_condor(snapshot.chain(30, 45), config)
    condor = decision.condor
    assert (condor.long_put_strike, condor.short_put_strike, condor.short_call_strike,
            condor.long_call_strike) == tuple(choice.strikes)
    # Credit at 0.66 of each spread from our side, summed and rounded down to the cent.
    f = 0.66
    spread = choice.ask - choice.bid
    long_put, long_call = choice.bid[0] + f * spread[0], choice.bid[3] + f * spread[3]
    short_put, short_call = choice.ask[1] - f * spread[1], choice.ask[2] - f * spread[2]
    credit = math.floor((short_put + short_call - long_put - long_call) * 100 + 1e-9) / 100
    assert decision.expected_price == pytest.approx(credit, abs=1e-12)
    # Sizing: 3 % of 25,000 = 750 dollars of max loss; each condor risks (4 − credit) × 100.
    expected_quantity = min(3, math.floor(750.0 / ((4.0 - credit) * CONTRACT_MULTIPLIER)))
    assert 1 <= expected_quantity < 3
    assert condor.quantity == expected_quantity
    assert decision.context["sizing_limit"] == "max_alloc"
    # Settlement at the expiry's close (16:00 New York on a normal Friday).
    assert condor.expiration == pd.Timestamp(choice.expiration).date()
    assert condor.settlement == pd.Timestamp(f"{condor.expiration} 16:00", tz=NY)
    assert engine.rejections == {}


def test_engine_rejects_a_delta_band_the_chain_cannot_fill(provider, chain_bar):
    # The smallest |delta| among the nearest expiry's quoted puts (the slice spans ±25 % of spot);
    # a band entirely below it cannot be met.
    chain = provider.slice_at(chain_bar, dte_min=30, dte_max=45).to_frame()
    puts = chain[(chain["expiration"] == chain["expiration"].min()) & (chain["right"] == "P")
                 & (chain["bid"] > 0)]
    floor = float(puts["delta"].abs().min())
    config = CHAIN_CONFIG.override({"strategy.target_short_delta_low": floor / 4,
                                    "strategy.target_short_delta_high": floor / 2})
    session, engine = session_engine(config, provider)
    decision = engine.entry_decision(session.snapshot(chain_bar), FLAT_BOOK)
    assert decision is None
    assert engine.rejections == {"no_put_in_delta_band": 1}


def test_engine_rejects_a_credit_below_the_minimum_ratio(provider, chain_bar):
    config = CHAIN_CONFIG.override({"strategy.min_credit_to_width": 0.95})
    session, engine = session_engine(config, provider)
    decision = engine.entry_decision(session.snapshot(chain_bar), FLAT_BOOK)
    assert decision is None
    assert engine.rejections == {"credit_below_minimum": 1}
    # The same bar passes with the ratio lowered below credit / width.
    relaxed = CHAIN_CONFIG.override({"strategy.min_credit_to_width": 0.0})
    session, engine = session_engine(relaxed, provider)
    assert engine.entry_decision(session.snapshot(chain_bar), FLAT_BOOK) is not None


def test_engine_rejects_when_no_expiry_lies_in_the_dte_range(provider, chain_bar):
    full = provider.slice_at(chain_bar).to_frame()
    listed = set(full["dte"].unique())
    # A day count no listed expiry has (above exits.dte_exit 21, which the config requires).
    gap = next(d for d in range(22, 60) if d not in listed)
    config = CHAIN_CONFIG.override({"strategy.dte_min": gap, "strategy.dte_max": gap})
    session, engine = session_engine(config, provider)
    assert engine.entry_decision(session.snapshot(chain_bar), FLAT_BOOK) is None
    assert engine.rejections == {"no_expiry_in_dte_range": 1}


def test_no_entry_outside_the_window_or_over_the_limits(provider, chain_bar):
    session, engine = session_engine(CHAIN_CONFIG, provider)
    early = provider.bar_index(pd.Timestamp("2016-01-12 09:40", tz=NY))   # window opens 09:45
    assert engine.entry_allowed(session.snapshot(early), 0) == "outside_entry_window"
    assert engine.entry_decision(session.snapshot(early), FLAT_BOOK) is None
    snapshot = session.snapshot(chain_bar)
    assert engine.entry_allowed(snapshot, CHAIN_CONFIG.strategy.max_positions) == "max_positions"
    assert engine.entry_allowed(snapshot, 0) is None
    assert engine.entry_decision(snapshot, FLAT_BOOK).action is Action.OPEN
    # One entry decided this session: the daily limit (1) is used up for the rest of it.
    assert engine.entry_allowed(snapshot, 0) == "daily_entry_limit"
    later = session.snapshot(chain_bar + 5)
    assert engine.entry_allowed(later, 1) == "daily_entry_limit"
    assert engine.rejections == {}          # window and limits are not strategy rejections
