"""core/portfolio.py: cash through open/close, ids, margin and buying power, marks at mid and at
the closing side, Greeks aggregation and errors. Expected numbers worked by hand in comments."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from core.dto import Action, Fill, IronCondor, LegQuotes
from core.portfolio import (
    Portfolio,
    open_pnl,
    position_value,
    value_at_closing_side,
    value_at_mid,
)

T0 = pd.Timestamp("2024-03-01 10:30", tz="America/New_York")
T1 = pd.Timestamp("2024-03-05 14:00", tz="America/New_York")
RATIOS = np.array([1, -1, -1, 1])


def condor(quantity=2):
    # Put wing 400 − 390 = 10, call wing 425 − 420 = 5: width 10.
    return IronCondor(dt.date(2024, 3, 15), pd.Timestamp("2024-03-15 16:00", tz="America/New_York"),
                      390.0, 400.0, 420.0, 425.0, quantity)


def fill(action, net, quantity=2, fees=5.64, position_id=0, ts=T0):
    return Fill(ts, position_id, action, (0.0, 0.0, 0.0, 0.0), net, quantity, fees, "test")


def quotes(bid, ask, delta=(0.0,) * 4, gamma=(0.0,) * 4, vega=(0.0,) * 4, theta=(0.0,) * 4):
    bid, ask = np.array(bid), np.array(ask)
    return LegQuotes(bid, ask, (bid + ask) / 2, np.array(delta), np.array(gamma), np.array(vega),
                     np.array(theta))


def test_cash_through_open_and_close_equals_realized_pnl():
    book = Portfolio(10_000.0)
    position = book.open_position(condor(), fill(Action.OPEN, 1.26))
    # Credit 1.26 × 100 × 2 = 252 less 5.64 fees.
    assert book.cash == pytest.approx(10_000.0 + 252.0 - 5.64, abs=1e-9)
    assert position.position_id == 1 and position.entry_fill.position_id == 1
    closed = book.close_position(1, fill(Action.CLOSE, -0.40, ts=T1), notes=["profit take"])
    # Debit 0.40 × 200 = 80 plus 5.64 fees; P&L = 252 − 5.64 − 80 − 5.64 = 160.72.
    assert closed.realized_pnl == pytest.approx(160.72, abs=1e-9)
    assert book.cash == pytest.approx(10_000.0 + 160.72, abs=1e-9)
    assert book.realized_pnl == pytest.approx(160.72, abs=1e-9)
    assert not book.open_positions and book.closed == [closed] and closed.notes == ["profit take"]
    assert closed.exit_fill.position_id == 1
    assert book.equity({}) == pytest.approx(10_160.72, abs=1e-9)


def test_ids_are_assigned_in_order_and_closed_in_close_order():
    book = Portfolio(50_000.0)
    assert book.next_position_id == 1
    first = book.open_position(condor(1), fill(Action.OPEN, 1.0, quantity=1))
    second = book.open_position(condor(1), fill(Action.OPEN, 1.1, quantity=1, position_id=2))
    assert (first.position_id, second.position_id, book.next_position_id) == (1, 2, 3)
    with pytest.raises(ValueError, match="next id is 3"):
        book.open_position(condor(1), fill(Action.OPEN, 1.0, quantity=1, position_id=7))
    book.close_position(2, fill(Action.CLOSE, -0.5, quantity=1))
    book.close_position(1, fill(Action.CLOSE, -0.5, quantity=1))
    assert [p.position_id for p in book.closed] == [2, 1]
    assert book.position(1) is first


def test_errors_name_the_position():
    book = Portfolio(10_000.0)
    with pytest.raises(ValueError, match="quantity 3 differs"):
        book.open_position(condor(2), fill(Action.OPEN, 1.0, quantity=3))
    with pytest.raises(ValueError, match="OPEN fill"):
        book.open_position(condor(2), fill(Action.CLOSE, -1.0))
    with pytest.raises(ValueError, match="position id 99 is unknown"):
        book.close_position(99, fill(Action.CLOSE, -1.0))
    book.open_position(condor(2), fill(Action.OPEN, 1.0))
    with pytest.raises(ValueError, match="CLOSE fill"):
        book.close_position(1, fill(Action.OPEN, 1.0))
    with pytest.raises(ValueError, match="quantity 1 differs"):
        book.close_position(1, fill(Action.CLOSE, -1.0, quantity=1))
    with pytest.raises(ValueError, match="position id 4"):
        book.close_position(1, fill(Action.CLOSE, -1.0, position_id=4))
    book.close_position(1, fill(Action.CLOSE, -1.0))
    with pytest.raises(ValueError, match="position id 1 is already closed"):
        book.close_position(1, fill(Action.CLOSE, -1.0))
    with pytest.raises(ValueError, match="position id 1 is already closed"):
        book.update_excursion(1, 10.0)
    with pytest.raises(ValueError, match="starting_cash"):
        Portfolio(0.0)


def test_margin_and_buying_power():
    book = Portfolio(10_000.0)
    book.open_position(condor(2), fill(Action.OPEN, 1.26))
    # Broker requirement: width 10 × 100 × 2 = 2000. Max loss: (10 − 1.26) × 200 = 1748.
    assert book.margin_in_use == pytest.approx(2000.0)
    assert book.max_loss_at_risk == pytest.approx(1748.0)
    # Buying power = cash − requirement = (10000 + 252 − 5.64) − 2000; equivalently the starting
    # cash less the max loss and the fees paid: 10000 − 1748 − 5.64 = 8246.36.
    assert book.buying_power == pytest.approx(8246.36, abs=1e-9)
    book.open_position(condor(1), fill(Action.OPEN, 1.00, quantity=1, fees=2.82))
    # + 1000 requirement; cash + 100 − 2.82.
    assert book.margin_in_use == pytest.approx(3000.0)
    assert book.buying_power == pytest.approx(8246.36 + 100.0 - 2.82 - 1000.0, abs=1e-9)


def test_equity_at_mid_and_at_the_closing_side():
    book = Portfolio(10_000.0)
    position = book.open_position(condor(2), fill(Action.OPEN, 1.26))
    leg_quotes = quotes([0.50, 1.20, 1.00, 0.40], [0.60, 1.30, 1.12, 0.46])
    # Mid 0.55/1.25/1.06/0.43: value (0.55 − 1.25 − 1.06 + 0.43) × 200 = −1.33 × 200 = −266.
    assert position_value(position, leg_quotes, "mid") == pytest.approx(-266.0, abs=1e-9)
    # Closing side: longs at bid, shorts at ask: (0.50 − 1.30 − 1.12 + 0.40) × 200 = −304.
    assert position_value(position, leg_quotes, "closing") == pytest.approx(-304.0, abs=1e-9)
    cash = 10_000.0 + 252.0 - 5.64
    assert book.equity(book.marks_from_quotes({1: leg_quotes})) == pytest.approx(cash - 266.0, abs=1e-9)
    assert book.equity(book.marks_from_quotes({1: leg_quotes}, "closing")) == pytest.approx(cash - 304.0,
                                                                                              abs=1e-9)
    # Unrealized at mid: 252 − 5.64 − 266 = −19.64.
    assert open_pnl(position, -266.0) == pytest.approx(-19.64, abs=1e-9)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        book.equity({})
    with pytest.raises(ValueError, match=r"not open \[5\]"):
        book.equity({1: -266.0, 5: 0.0})


def test_marks_batch_rows_are_bitwise_identical():
    rng = np.random.default_rng(3)
    bid = np.round(rng.uniform(0, 5, size=(300, 4)), 2)
    ask = bid + np.round(rng.uniform(0, 0.4, size=(300, 4)), 2)
    mid = (bid + ask) / 2
    batch_mid = value_at_mid(mid, RATIOS, 3)
    batch_close = value_at_closing_side(bid, ask, RATIOS, 3)
    for row in range(300):
        assert value_at_mid(mid[row], RATIOS, 3) == batch_mid[row]
        assert value_at_closing_side(bid[row], ask[row], RATIOS, 3) == batch_close[row]
    # Closing side is never worth more than mid to us (we give up half a spread on every leg).
    assert (batch_close <= batch_mid + 1e-9).all()


def test_greeks_aggregate_over_positions():
    book = Portfolio(100_000.0)
    book.open_position(condor(2), fill(Action.OPEN, 1.26))
    book.open_position(condor(1), fill(Action.OPEN, 1.00, quantity=1))
    first = quotes([0.5] * 4, [0.6] * 4, delta=[-0.10, -0.25, 0.18, 0.08], gamma=[0.01, 0.02, 0.02, 0.01],
                   vega=[0.30, 0.50, 0.45, 0.25], theta=[-0.010, -0.030, -0.025, -0.012])
    second = quotes([0.5] * 4, [0.6] * 4, delta=[-0.05, -0.20, 0.20, 0.05], gamma=[0.0] * 4,
                    vega=[0.1, 0.2, 0.2, 0.1], theta=[0.0] * 4)
    greeks = book.greeks({1: first, 2: second})
    # Σ ratio·greek × 100 × qty. Position 1 (qty 2): delta (−0.10 + 0.25 − 0.18 + 0.08) = 0.05 → 10;
    # gamma (0.01 − 0.02 − 0.02 + 0.01) = −0.02 → −4; vega (0.30 − 0.50 − 0.45 + 0.25) = −0.40 → −80;
    # theta (−0.010 + 0.030 + 0.025 − 0.012) = 0.033 → 6.6.
    # Position 2 (qty 1): delta (−0.05 + 0.20 − 0.20 + 0.05) = 0 → 0; vega (0.1 − 0.2 − 0.2 + 0.1) → −20.
    assert greeks.delta == pytest.approx(10.0, abs=1e-9)
    assert greeks.gamma == pytest.approx(-4.0, abs=1e-9)
    assert greeks.vega == pytest.approx(-100.0, abs=1e-9)
    assert greeks.theta == pytest.approx(6.6, abs=1e-9)
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        book.greeks({1: first})


def test_excursion_keeps_the_running_maximum_and_risk_flag_notes_once():
    book = Portfolio(10_000.0)
    book.open_position(condor(2), fill(Action.OPEN, 1.26))
    assert [book.update_excursion(1, x) for x in (50.0, 30.0, -10.0, 80.0)] == [50.0, 50.0, 50.0, 80.0]
    book.flag_early_assignment_risk(1, "short put deep ITM")
    book.flag_early_assignment_risk(1, "short put deep ITM")
    position = book.close_position(1, fill(Action.CLOSE, -10.0), assigned_legs=("short_put",))
    assert position.max_adverse_excursion == 80.0 and position.early_assignment_risk
    assert position.notes == ["short put deep ITM"] and position.assigned_legs == ("short_put",)
