"""core/execution.py: fill prices inside the spread, condor net prices rounded against us, batch
parity, fee presets and the fills built from them. Expected numbers are worked by hand in the
comments, never taken from the implementation."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from core.config import BacktestConfig
from core.dto import Action, IronCondor
from core.execution import (
    CONDOR_RATIOS,
    FEE_PRESETS,
    FeeSchedule,
    FillModel,
    close_debit,
    fee_schedule,
    leg_fill_prices,
    leg_sum,
    make_fill,
    net_price,
    open_credit,
    order_fees,
    round_against_us,
    settlement_fill,
)

TS = pd.Timestamp("2024-03-01 10:30", tz="America/New_York")
# Leg order: long put, short put, short call, long call.
BID = np.array([0.50, 1.20, 1.00, 0.40])
ASK = np.array([0.60, 1.30, 1.12, 0.46])


# ---------------------------------------------------------------- fill model

def test_single_leg_fill_at_066_of_the_spread():
    # bid 1.00, ask 1.10, spread 0.10; buying pays 1.00 + 0.066, selling gets 1.10 − 0.066.
    model = FillModel(0.66)
    bid = np.array([1.00, 1.00, 1.00, 1.00])
    ask = np.array([1.10, 1.10, 1.10, 1.10])
    opening = leg_fill_prices(bid, ask, CONDOR_RATIOS, True, model)
    assert opening == pytest.approx([1.066, 1.034, 1.034, 1.066], abs=1e-12)
    closing = leg_fill_prices(bid, ask, CONDOR_RATIOS, False, model)
    assert closing == pytest.approx([1.034, 1.066, 1.066, 1.034], abs=1e-12)


def test_mid_and_natural_limits():
    mid = leg_fill_prices(BID, ASK, CONDOR_RATIOS, True, FillModel(0.5))
    assert mid == pytest.approx([0.55, 1.25, 1.06, 0.43], abs=1e-12)
    natural_open = leg_fill_prices(BID, ASK, CONDOR_RATIOS, True, FillModel(1.0))
    assert natural_open.tolist() == [0.60, 1.20, 1.00, 0.46]      # buy at ask, sell at bid
    natural_close = leg_fill_prices(BID, ASK, CONDOR_RATIOS, False, FillModel(1.0))
    assert natural_close.tolist() == [0.50, 1.30, 1.12, 0.40]


def test_condor_credit_and_debit_by_hand_rounded_against_us():
    model = FillModel(0.66)
    # Opening: buy LP 0.50+0.066=0.566, sell SP 1.30−0.066=1.234, sell SC 1.12−0.0792=1.0408,
    # buy LC 0.40+0.0396=0.4396. Credit 1.234+1.0408−0.566−0.4396 = 1.2692 → down to 1.26.
    legs, credit = open_credit(BID, ASK, model)
    assert legs == pytest.approx([0.566, 1.234, 1.0408, 0.4396], abs=1e-12)
    assert credit == 1.26
    # Closing: sell LP 0.60−0.066=0.534, buy SP 1.20+0.066=1.266, buy SC 1.00+0.0792=1.0792,
    # sell LC 0.46−0.0396=0.4204. Debit 1.266+1.0792−0.534−0.4204 = 1.3908 → up to 1.40.
    legs, debit = close_debit(BID, ASK, model)
    assert legs == pytest.approx([0.534, 1.266, 1.0792, 0.4204], abs=1e-12)
    assert debit == 1.40
    # Mid: 1.25+1.06−0.55−0.43 = 1.33 exactly on the tick, both ways.
    assert open_credit(BID, ASK, FillModel(0.5))[1] == 1.33
    assert close_debit(BID, ASK, FillModel(0.5))[1] == 1.33
    # Natural: credit 1.20+1.00−0.60−0.46 = 1.14; debit 1.30+1.12−0.50−0.40 = 1.52.
    assert open_credit(BID, ASK, FillModel(1.0))[1] == 1.14
    assert close_debit(BID, ASK, FillModel(1.0))[1] == 1.52


def test_tick_rounding_ignores_float_noise():
    # Zero-width quotes fill exactly at the quote. In floats, ((−0.05 + 0.1) + 0.3) − 0.2 is
    # 0.14999999999999997 and ((−0.05 + 0.1) + 0.45) − 0.35 is 0.15000000000000002; both are 0.15.
    below = np.array([0.05, 0.1, 0.3, 0.2])
    above = np.array([0.05, 0.1, 0.45, 0.35])
    assert ((-0.05 + 0.1) + 0.3) - 0.2 < 0.15 < ((-0.05 + 0.1) + 0.45) - 0.35
    for quotes in (below, above):
        assert open_credit(quotes, quotes, FillModel(0.5))[1] == 0.15
        assert close_debit(quotes, quotes, FillModel(0.5))[1] == 0.15
    assert round_against_us(0.1 + 0.2, receiving=False) == 0.30
    assert round_against_us(0.7 - 0.4, receiving=True) == 0.30
    # Off-tick amounts go against us, negative ones included.
    assert round_against_us(0.301, receiving=True) == 0.30
    assert round_against_us(0.301, receiving=False) == 0.31
    assert round_against_us(-0.301, receiving=True) == -0.31


def test_net_price_sign_for_a_long_structure():
    # A long iron condor (ratios −1 +1 +1 −1) opened at 0.5/1.0/1.0/0.5 costs 1.0: net −1.0.
    legs = np.array([0.5, 1.0, 1.0, 0.5])
    assert net_price(legs, -CONDOR_RATIOS, True) == -1.0


def test_batch_rows_are_bitwise_identical_to_single_rows():
    rng = np.random.default_rng(7)
    n = 400
    bid = np.round(rng.uniform(0.0, 8.0, size=(n, 4)), 2)
    ask = bid + np.round(rng.uniform(0.0, 0.6, size=(n, 4)), 2)
    # A strided, Fortran-ordered copy exercises another memory layout of the same values.
    bid_f, ask_f = np.asfortranarray(bid), np.asfortranarray(ask)
    for fraction in (0.5, 0.66, 0.8312, 1.0):
        model = FillModel(fraction)
        for make in (open_credit, close_debit):
            batch_legs, batch_net = make(bid, ask, model)
            f_legs, f_net = make(bid_f, ask_f, model)
            assert batch_legs.shape == (n, 4) and batch_net.shape == (n,)
            assert np.array_equal(batch_legs, f_legs) and np.array_equal(batch_net, f_net)
            for row in range(0, n, 7):
                legs, net = make(bid[row], ask[row], model)
                assert (legs == batch_legs[row]).all()
                assert net == batch_net[row]
                one_row_legs, one_row_net = make(bid[row:row + 1], ask[row:row + 1], model)
                assert (one_row_legs[0] == batch_legs[row]).all() and one_row_net[0] == batch_net[row]
    # The unrounded fixed-order sum too.
    terms = rng.normal(size=(n, 4))
    sums = leg_sum(terms)
    assert all(leg_sum(terms[row]) == sums[row] for row in range(n))


def test_bad_quotes_and_fractions_are_refused():
    with pytest.raises(ValueError, match="short_call"):
        leg_fill_prices(BID, np.array([0.60, 1.30, 0.90, 0.46]), CONDOR_RATIOS, True, FillModel())
    batch_bid = np.tile(BID, (3, 1))
    batch_bid[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"row \(2,\) leg long_put"):
        open_credit(batch_bid, np.tile(ASK, (3, 1)), FillModel())
    with pytest.raises(ValueError, match="shape"):
        open_credit(BID[:3], ASK[:3], FillModel())
    with pytest.raises(ValueError, match="0.5"):
        FillModel(0.4)
    with pytest.raises(ValueError):
        FillModel(1.2)


def test_fill_model_from_config():
    assert FillModel.from_config(BacktestConfig(fill_model="mid")).fraction == 0.5
    assert FillModel.from_config(BacktestConfig(fill_model="natural")).fraction == 1.0
    assert FillModel.from_config(BacktestConfig()).fraction == 0.66     # the documented default
    assert FillModel.from_config(BacktestConfig(fill_spread_fraction=0.75)).fraction == 0.75
    with pytest.raises(ValueError, match="fill_spread_fraction = 0.3"):
        FillModel.from_config(BacktestConfig(fill_spread_fraction=0.3))


# ---------------------------------------------------------------- fees

def test_fee_presets_on_a_four_leg_open_and_close():
    ibkr, alpaca, none = FEE_PRESETS["ibkr"], FEE_PRESETS["alpaca"], FEE_PRESETS["none"]
    # IBKR, 1 condor = 4 contracts, 2 sold (shorts when opening, longs when closing):
    # 4×0.65 + 4×(0.02685 + 0.025) + 2×0.00279 = 2.60 + 0.2074 + 0.00558 = 2.81298 → 2.82.
    assert order_fees(ibkr, 1, CONDOR_RATIOS, True) == 2.82
    assert order_fees(ibkr, 1, CONDOR_RATIOS, False) == 2.82
    # IBKR, 3 condors: 12×0.65 + 12×0.05185 + 6×0.00279 = 7.80 + 0.6222 + 0.01674 = 8.43894 → 8.44.
    assert order_fees(ibkr, 3, CONDOR_RATIOS, True) == 8.44
    # Alpaca, 1 condor: 0.2074 + 0.00558 = 0.21298 → 0.22.
    assert order_fees(alpaca, 1, CONDOR_RATIOS, True) == 0.22
    assert order_fees(none, 5, CONDOR_RATIOS, False) == 0.0
    # Vectorised over quantities.
    assert order_fees(ibkr, np.array([1, 3]), CONDOR_RATIOS, True).tolist() == [2.82, 8.44]


def test_fee_sold_side_depends_on_direction_and_minimum_applies():
    # A schedule with only a $1 sell fee: opening sells the two shorts, closing the two longs.
    taf_only = FeeSchedule("taf", 0.0, 0.0, 1.0)
    assert order_fees(taf_only, 2, CONDOR_RATIOS, True) == 4.0      # 2 shorts × 2 sold
    assert order_fees(taf_only, 2, CONDOR_RATIOS, False) == 4.0     # 2 longs × 2 sold
    cheap = FeeSchedule("cheap", 0.10, 0.0, 0.0, min_commission_per_order=1.00)
    assert order_fees(cheap, 1, CONDOR_RATIOS, True) == 1.00        # 4 × 0.10 = 0.40 < $1 minimum
    assert order_fees(cheap, 5, CONDOR_RATIOS, True) == 2.00        # 20 × 0.10
    assert fee_schedule("ibkr") is FEE_PRESETS["ibkr"]
    with pytest.raises(ValueError, match="unknown fee preset 'schwab'"):
        fee_schedule("schwab")
    with pytest.raises(ValueError, match="commission_per_contract"):
        FeeSchedule("bad", -0.1, 0.0, 0.0)


# ---------------------------------------------------------------- fills

def test_make_fill_open_and_close_cash_flows():
    model, ibkr = FillModel(0.66), FEE_PRESETS["ibkr"]
    opened = make_fill(TS, 0, Action.OPEN, BID, ASK, 1, "entry", model, ibkr)
    assert opened.action is Action.OPEN and opened.net_price == 1.26 and opened.fees == 2.82
    assert opened.leg_prices == pytest.approx((0.566, 1.234, 1.0408, 0.4396), abs=1e-12)
    assert opened.cash_flow == pytest.approx(126.0 - 2.82, abs=1e-9)
    closed = make_fill(TS, 1, Action.CLOSE, BID, ASK, 1, "stop_loss", model, ibkr)
    assert closed.net_price == -1.40 and closed.fees == 2.82 and closed.position_id == 1
    assert closed.cash_flow == pytest.approx(-140.0 - 2.82, abs=1e-9)
    with pytest.raises(ValueError, match="HOLD"):
        make_fill(TS, 1, Action.HOLD, BID, ASK, 1, "x", model, ibkr)
    with pytest.raises(ValueError, match="quantity"):
        make_fill(TS, 1, Action.OPEN, BID, ASK, 0, "x", model, ibkr)


def _condor(quantity=2):
    return IronCondor(dt.date(2024, 3, 15), pd.Timestamp("2024-03-15 16:00", tz="America/New_York"),
                      390.0, 400.0, 420.0, 425.0, quantity)


@pytest.mark.parametrize("underlying, debit, assigned", [
    (410.0, 0.0, ()),                         # between the shorts: expires worthless
    (395.0, 5.0, ("short_put",)),             # short put 5 ITM, long put OTM
    (380.0, 10.0, ("short_put",)),            # both puts ITM: 20 − 10 = the put width
    (422.5, 2.5, ("short_call",)),
    (440.0, 5.0, ("short_call",)),            # call width
    (400.0, 0.0, ()),                         # exactly at the short strike: not in the money
])
def test_settlement_at_intrinsic_value(underlying, debit, assigned):
    condor = _condor()
    fill, assigned_legs = settlement_fill(TS, 3, condor, underlying, FEE_PRESETS["ibkr"])
    assert fill.action is Action.CLOSE and fill.position_id == 3 and fill.reason == "expiry"
    assert fill.net_price == pytest.approx(-debit, abs=1e-12)
    assert math.copysign(1.0, fill.net_price) == (-1.0 if debit else 1.0)   # no −0.0
    assert fill.net_price == pytest.approx(-condor.intrinsic_value(underlying), abs=1e-12)
    assert fill.fees == 0.0                   # no commission on settlement
    assert assigned_legs == assigned
    assert fill.cash_flow == pytest.approx(-debit * 200.0, abs=1e-9)


def test_settlement_assignment_fee_counts_every_itm_contract():
    with_fee = FeeSchedule("x", 0.65, 0.05, 0.0, assignment_fee_per_contract=1.0)
    # At 380 both put legs finish ITM: 2 legs × 2 condors = 4 contracts × $1.
    fill, _ = settlement_fill(TS, 1, _condor(2), 380.0, with_fee)
    assert fill.fees == 4.0
