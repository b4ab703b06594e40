"""Fills and fees: where each leg of a structure order fills inside its bid/ask, the net price of
the structure rounded to the tick against us, per-order commissions and regulatory fees, and the
``Fill`` value objects built from them (including settlement at expiry).

Everything here is pure and vectorised. Every function that turns quotes into prices accepts a
leading batch axis (bid/ask of shape ``(..., 4)``) and gives, for any row, the bitwise identical
result whether that row is passed alone or inside an ``(n_bars, 4)`` batch: only elementwise IEEE
operations are used, and the sum over the four legs is the explicit left-to-right
``((x0 + x1) + x2) + x3`` (``leg_sum``), never ``np.sum`` whose pairwise/SIMD order may depend on
the layout. The fast driver relies on this for parity with the per-bar driver.

Sign conventions (per share):
* ``net_price(...)`` is the structure's value to its short side, Σ(−ratio·leg price). Opening a
  short iron condor it is the credit received; closing it, the debit paid (both positive for a
  normal condor).
* ``Fill.net_price`` is cash per share into the account: + credit received, − debit paid. So an
  OPEN fill of a condor carries +credit and a CLOSE fill carries −debit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from core.dto import Action, ExitReason, Fill, IronCondor

# Leg order everywhere: long put, short put, short call, long call.
CONDOR_RATIOS = np.array([1, -1, -1, 1])
LEG_NAMES = ("long_put", "short_put", "short_call", "long_call")
TICK = 0.01
TICKS_PER_DOLLAR = 100.0
# Tolerance in ticks: a price that is a whole number of ticks up to float noise (1.2299999999999998)
# must count as that whole number, not fall one tick away.
_TICK_TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------
# Fill model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FillModel:
    """Where a leg fills inside its bid/ask, as a fraction of the spread measured from our
    favourable side: buying pays ``bid + fraction·(ask − bid)``, selling receives
    ``ask − fraction·(ask − bid)``. 0.5 is the mid, 1.0 the natural (pay the ask, hit the bid).

    Default 0.66: ORATS fills 2-leg trades at 66 % of the spread (verified in their methodology
    docs); their 4-leg figure (~53 %) is unverified, so the conservative verified number is used
    (see /work/shared/reference/peers.md). Fractions below 0.5 (better than mid) are refused: mid
    fills already flatter backtests, better-than-mid fills would do so systematically.
    """

    fraction: float = 0.66

    def __post_init__(self):
        if not (isinstance(self.fraction, (int, float)) and math.isfinite(self.fraction)
                and 0.5 <= self.fraction <= 1.0):
            raise ValueError(
                f"fill fraction must be between 0.5 (mid) and 1.0 (natural), got {self.fraction!r}; "
                f"fractions below 0.5 would fill better than mid and flatter results")

    @classmethod
    def from_config(cls, backtest_config) -> FillModel:
        """From ``Config.backtest``: 'mid' → 0.5, 'natural' → 1.0, 'spread_fraction' →
        ``fill_spread_fraction`` (which must be ≥ 0.5)."""
        model = backtest_config.fill_model
        if model == "mid":
            return cls(0.5)
        if model == "natural":
            return cls(1.0)
        if model == "spread_fraction":
            fraction = float(backtest_config.fill_spread_fraction)
            if not 0.5 <= fraction <= 1.0:
                raise ValueError(
                    f"backtest.fill_spread_fraction = {fraction} is not allowed with "
                    f"fill_model 'spread_fraction': it must be between 0.5 (mid) and 1.0 (natural); "
                    f"below 0.5 fills would be better than mid and flatter results")
            return cls(fraction)
        raise ValueError(
            f"backtest.fill_model = {model!r} is unknown; expected 'mid', 'natural' or 'spread_fraction'")


# --------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------

def leg_sum(terms: np.ndarray) -> np.ndarray:
    """Σ over the last axis (4 legs) in the fixed order ((t0 + t1) + t2) + t3, so a row's result
    does not depend on the batch it is computed in."""
    return ((terms[..., 0] + terms[..., 1]) + terms[..., 2]) + terms[..., 3]


_CONDOR_RATIOS_FLOAT = CONDOR_RATIOS.astype(np.float64)


def _as_ratios(ratios) -> np.ndarray:
    if ratios is CONDOR_RATIOS:  # the hot path (every bar of every position): already valid
        return _CONDOR_RATIOS_FLOAT
    ratios = np.asarray(ratios)
    if ratios.shape != (4,) or not np.all(np.isin(ratios, (-1, 1))):
        raise ValueError(f"ratios must be four values of +1 (long) or -1 (short), got {ratios.tolist()}")
    return ratios.astype(np.float64)


def _check_quotes(bid, ask) -> tuple[np.ndarray, np.ndarray]:
    bid = np.asarray(bid, dtype=np.float64)
    ask = np.asarray(ask, dtype=np.float64)
    if bid.shape != ask.shape or bid.ndim == 0 or bid.shape[-1] != 4:
        raise ValueError(f"bid and ask must both have shape (..., 4) (one column per leg), "
                         f"got {bid.shape} and {ask.shape}")
    bad = ~(np.isfinite(bid) & np.isfinite(ask) & (bid >= 0.0) & (bid <= ask))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        leg = LEG_NAMES[where[-1]]
        row = f"row {where[:-1]} " if len(where) > 1 else ""
        raise ValueError(f"bad quote at {row}leg {leg}: bid {bid[where]!r}, ask {ask[where]!r} "
                         f"(need finite 0 <= bid <= ask)")
    return bid, ask


def leg_fill_prices(bid, ask, ratios, opening: bool, fill_model: FillModel) -> np.ndarray:
    """Per-leg fill prices (..., 4). Opening, we buy the legs with ratio > 0 and sell those with
    ratio < 0; closing, the reverse."""
    bid, ask = _check_quotes(bid, ask)
    ratios = _as_ratios(ratios)
    buying = (ratios > 0) if opening else (ratios < 0)
    spread = ask - bid
    travelled = fill_model.fraction * spread
    return np.where(buying, bid + travelled, ask - travelled)


def round_against_us(price, receiving: bool):
    """Round a per-share net price to the $0.01 tick against us: down when we receive it (credit),
    up when we pay it (debit). Counting ticks with a small tolerance keeps float noise from moving
    a price that already is on the tick."""
    ticks = np.asarray(price, dtype=np.float64) / TICK
    if receiving:
        ticks = np.floor(ticks + _TICK_TOLERANCE)
    else:
        ticks = np.ceil(ticks - _TICK_TOLERANCE)
    return ticks / TICKS_PER_DOLLAR


def net_price(leg_prices, ratios, opening: bool):
    """Per-share net of the structure, Σ(−ratio·price) summed in fixed leg order, rounded to the
    tick against us. Opening a short condor this is the credit received
    ((short put + short call) − (long put + long call)), rounded down; closing, the debit paid
    (same expression at the closing prices), rounded up. Returns shape ``leg_prices.shape[:-1]``
    (a numpy scalar for one row)."""
    leg_prices = np.asarray(leg_prices, dtype=np.float64)
    if leg_prices.ndim == 0 or leg_prices.shape[-1] != 4:
        raise ValueError(f"leg_prices must have shape (..., 4), got {leg_prices.shape}")
    short_side_value = leg_sum(-_as_ratios(ratios) * leg_prices)
    return round_against_us(short_side_value, receiving=opening)


@njit(cache=True)
def close_debit_row(bid, ask, fraction: float) -> float:
    """``close_debit`` for one condor row (leg order, CONDOR_RATIOS) inside numba kernels: the
    same operations in the same order, so the per-bar evaluator and the fills agree bitwise
    (a test holds them together)."""
    p0 = ask[0] - fraction * (ask[0] - bid[0])     # long put sold
    p1 = bid[1] + fraction * (ask[1] - bid[1])     # short put bought
    p2 = bid[2] + fraction * (ask[2] - bid[2])     # short call bought
    p3 = ask[3] - fraction * (ask[3] - bid[3])     # long call sold
    value = ((-p0 + p1) + p2) + -p3
    return math.ceil(value / TICK - _TICK_TOLERANCE) / TICKS_PER_DOLLAR


@njit(cache=True)
def open_credit_row(bid, ask, fraction: float) -> float:
    """``open_credit``'s net credit for one condor row (leg order, CONDOR_RATIOS): the same
    operations in the same order, without the batch machinery (the engine prices every entry
    attempt with it; a test holds them together bitwise)."""
    p0 = bid[0] + fraction * (ask[0] - bid[0])     # long put bought
    p1 = ask[1] - fraction * (ask[1] - bid[1])     # short put sold
    p2 = ask[2] - fraction * (ask[2] - bid[2])     # short call sold
    p3 = bid[3] + fraction * (ask[3] - bid[3])     # long call bought
    value = ((-p0 + p1) + p2) + -p3
    return math.floor(value / TICK + _TICK_TOLERANCE) / TICKS_PER_DOLLAR


def open_credit(bid, ask, fill_model: FillModel) -> tuple[np.ndarray, np.ndarray]:
    """Opening a short iron condor: (per-leg fill prices, net credit per share rounded down)."""
    legs = leg_fill_prices(bid, ask, CONDOR_RATIOS, True, fill_model)
    return legs, net_price(legs, CONDOR_RATIOS, True)


def close_debit(bid, ask, fill_model: FillModel) -> tuple[np.ndarray, np.ndarray]:
    """Closing a short iron condor: (per-leg fill prices, net debit per share rounded up)."""
    legs = leg_fill_prices(bid, ask, CONDOR_RATIOS, False, fill_model)
    return legs, net_price(legs, CONDOR_RATIOS, False)


def settlement_values(strikes, is_call, underlying) -> np.ndarray:
    """Intrinsic value per share of each leg at expiry against the underlying's settlement price:
    calls max(S − K, 0), puts max(K − S, 0). ``underlying`` may carry a batch axis (shape (...))."""
    strikes = np.asarray(strikes, dtype=np.float64)
    underlying = np.asarray(underlying, dtype=np.float64)[..., None]
    return np.where(np.asarray(is_call), np.maximum(underlying - strikes, 0.0),
                    np.maximum(strikes - underlying, 0.0))


# --------------------------------------------------------------------------------------------
# Fees
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """Per-contract costs of option orders, in dollars.

    * ``commission_per_contract``: broker commission, on every contract bought or sold;
      ``min_commission_per_order`` applies per order when the commission is non-zero.
    * ``regulatory_per_contract``: fees passed through on every contract (Options Regulatory Fee
      + OCC clearing fee).
    * ``sell_fee_per_contract``: FINRA Trading Activity Fee, on contracts sold only.
    * ``assignment_fee_per_contract``: charged per contract exercised or assigned at expiry
      (default 0: neither preset charges a commission on expiry settlement).

    The SEC Section 31 fee (on the dollar value of sales, ~$0.003 per $100 of premium) is left out:
    it is orders of magnitude below the per-contract fees at condor premiums.
    """

    name: str
    commission_per_contract: float
    regulatory_per_contract: float
    sell_fee_per_contract: float
    min_commission_per_order: float = 0.0
    assignment_fee_per_contract: float = 0.0

    def __post_init__(self):
        for field_name in ("commission_per_contract", "regulatory_per_contract", "sell_fee_per_contract",
                           "min_commission_per_order", "assignment_fee_per_contract"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"fee schedule {self.name!r}: {field_name} must be a finite number >= 0, "
                                 f"got {value!r}")


# Approximate published schedules; configurable assumptions, not quotes from a live fee table:
# ORF ≈ $0.02685 and OCC clearing ≈ $0.025 per contract (charged on every contract), FINRA TAF
# ≈ $0.00279 per contract sold. These regulators revise their rates, sometimes several times a year.
_ORF_PER_CONTRACT = 0.02685
_OCC_CLEARING_PER_CONTRACT = 0.025
_FINRA_TAF_PER_CONTRACT_SOLD = 0.00279
_PASS_THROUGH = _ORF_PER_CONTRACT + _OCC_CLEARING_PER_CONTRACT

FEE_PRESETS: dict[str, FeeSchedule] = {
    # IBKR Pro fixed: $0.65/contract (the cheaper tiers for premiums under $0.10 are ignored, which
    # over-charges cheap wings slightly: conservative), $1.00 minimum per order.
    "ibkr": FeeSchedule("ibkr", 0.65, _PASS_THROUGH, _FINRA_TAF_PER_CONTRACT_SOLD, 1.00),
    # Alpaca: commission-free options, regulatory fees passed through.
    "alpaca": FeeSchedule("alpaca", 0.0, _PASS_THROUGH, _FINRA_TAF_PER_CONTRACT_SOLD),
    "none": FeeSchedule("none", 0.0, 0.0, 0.0),
}


def fee_schedule(name: str) -> FeeSchedule:
    """The preset called ``name`` (``Config.backtest.fees``)."""
    try:
        return FEE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown fee preset {name!r}; expected one of {sorted(FEE_PRESETS)}") from None


def round_fee_up(dollars):
    """Fees are charged in whole cents; round up (against us), tolerant of float noise."""
    return np.ceil(np.asarray(dollars, dtype=np.float64) * 100.0 - _TICK_TOLERANCE) / 100.0


def order_fees(schedule: FeeSchedule, contracts_per_leg, ratios, opening: bool):
    """Dollars of fees for one structure order of ``contracts_per_leg`` units (both entry and exit
    pay). Contracts sold: legs with ratio < 0 when opening, ratio > 0 when closing. The total is
    rounded up to the cent. ``contracts_per_leg`` may be an array (broadcasts)."""
    ratios = _as_ratios(ratios)
    units = np.asarray(contracts_per_leg)
    if np.any(units < 0):
        raise ValueError(f"contracts_per_leg must be >= 0, got {contracts_per_leg!r}")
    selling = (ratios < 0) if opening else (ratios > 0)
    contracts = units * float(np.abs(ratios).sum())
    contracts_sold = units * float(np.abs(ratios[selling]).sum())
    commission = schedule.commission_per_contract * contracts
    if schedule.commission_per_contract > 0.0:
        commission = np.where(contracts > 0, np.maximum(commission, schedule.min_commission_per_order), 0.0)
    total = (commission + schedule.regulatory_per_contract * contracts
             + schedule.sell_fee_per_contract * contracts_sold)
    return round_fee_up(total)


# --------------------------------------------------------------------------------------------
# Fills
# --------------------------------------------------------------------------------------------

def make_fill(timestamp: pd.Timestamp, position_id: int, action: Action, bid, ask, quantity: int,
              reason: str, fill_model: FillModel, fees: FeeSchedule, ratios=CONDOR_RATIOS) -> Fill:
    """A structure order filled at this bar's quotes (bid/ask of shape (4,)). OPEN: net_price =
    +credit; CLOSE: net_price = −debit; ``fees`` charged per ``order_fees``."""
    action = Action(action)
    if action is Action.HOLD:
        raise ValueError("make_fill: action must be OPEN or CLOSE, got HOLD")
    if not (isinstance(quantity, (int, np.integer)) and quantity >= 1):
        raise ValueError(f"make_fill: quantity must be a whole number >= 1, got {quantity!r}")
    if np.asarray(bid).shape != (4,):
        raise ValueError(f"make_fill: bid/ask must be four leg quotes, got shape {np.asarray(bid).shape}")
    opening = action is Action.OPEN
    legs = leg_fill_prices(bid, ask, ratios, opening, fill_model)
    structure_price = float(net_price(legs, ratios, opening))
    return Fill(
        timestamp=timestamp,
        position_id=int(position_id),
        action=action,
        leg_prices=tuple(float(p) for p in legs),
        net_price=structure_price if opening else 0.0 - structure_price,  # 0.0 − x: no −0.0
        quantity=int(quantity),
        fees=float(order_fees(fees, int(quantity), ratios, opening)),
        reason=str(reason),
    )


def settlement_fill(timestamp: pd.Timestamp, position_id: int, condor: IronCondor, underlying: float,
                    fees: FeeSchedule, reason: str = ExitReason.EXPIRY.value) -> tuple[Fill, tuple[str, ...]]:
    """Close a condor at expiry: every leg settles at its intrinsic value against ``underlying``
    (the settlement price). Returns the CLOSE fill (net_price = −Σ(−ratio·intrinsic), not rounded
    to a tick: settlement is an accounting amount, not a traded price) and the short legs that
    finish in the money (assigned).

    Modelling choice: an assignment is booked as cash-equivalent at the settlement price (shares
    delivered by assignment/exercise are taken as liquidated at that price, no overnight gap), so
    its cost is the leg's intrinsic value plus ``fees.assignment_fee_per_contract`` for every
    contract exercised or assigned. No commission is charged on settlement.
    """
    values = settlement_values(condor.strikes, condor.is_call, underlying)
    ratios = condor.ratios
    debit = float(leg_sum(-ratios.astype(np.float64) * values))
    in_the_money = values > 0.0
    assigned = tuple(name for name, itm, ratio in zip(LEG_NAMES, in_the_money, ratios) if itm and ratio < 0)
    settled_contracts = int(np.abs(ratios[in_the_money]).sum()) * condor.quantity
    fill = Fill(
        timestamp=timestamp,
        position_id=int(position_id),
        action=Action.CLOSE,
        leg_prices=tuple(float(v) for v in values),
        net_price=0.0 - debit,
        quantity=condor.quantity,
        fees=float(round_fee_up(fees.assignment_fee_per_contract * settled_contracts)),
        reason=str(reason),
    )
    return fill, assigned
