"""The value objects shared by every driver (backtest and, later, live): legs, condors, quotes at
a bar, decisions, fills, positions and portfolio Greeks.

Units everywhere: prices in dollars per share; P&L, fees and cash in dollars (×100 multiplier);
quantities in contracts; times tz-aware America/New_York; deltas signed per contract.
Derived numbers are properties, never stored twice.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import pandas as pd

CONTRACT_MULTIPLIER = 100
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class Right(str, Enum):
    CALL = "C"
    PUT = "P"


@dataclass(frozen=True, slots=True)
class OptionLeg:
    """One contract line of a structure: ``ratio`` is signed per structure unit (−1 short, +1 long)."""

    expiration: dt.date
    strike: float
    right: Right
    ratio: int

    @property
    def is_call(self) -> bool:
        return self.right is Right.CALL

    @property
    def is_short(self) -> bool:
        return self.ratio < 0


@dataclass(frozen=True, slots=True)
class IronCondor:
    """Short put spread + short call spread on one expiry; ``quantity`` condors (contracts per leg).

    Leg order everywhere (arrays of four): long put, short put, short call, long call.
    """

    expiration: dt.date
    settlement: pd.Timestamp          # PM settlement time of the expiry (session close)
    long_put_strike: float
    short_put_strike: float
    short_call_strike: float
    long_call_strike: float
    quantity: int

    def __post_init__(self):
        if not (self.long_put_strike < self.short_put_strike <= self.short_call_strike
                < self.long_call_strike):
            raise ValueError(
                f"iron condor strikes must satisfy long put < short put <= short call < long call, got "
                f"{self.long_put_strike}/{self.short_put_strike}/{self.short_call_strike}/"
                f"{self.long_call_strike}")
        if self.quantity < 1:
            raise ValueError(f"iron condor quantity must be >= 1, got {self.quantity}")

    @property
    def strikes(self) -> np.ndarray:
        return np.array([self.long_put_strike, self.short_put_strike, self.short_call_strike,
                         self.long_call_strike])

    @property
    def is_call(self) -> np.ndarray:
        return np.array([False, False, True, True])

    @property
    def ratios(self) -> np.ndarray:
        """Signed contracts per condor unit in leg order (+1 long, −1 short)."""
        return np.array([1, -1, -1, 1])

    @property
    def legs(self) -> tuple[OptionLeg, ...]:
        rights = (Right.PUT, Right.PUT, Right.CALL, Right.CALL)
        return tuple(OptionLeg(self.expiration, float(k), right, int(ratio))
                     for k, right, ratio in zip(self.strikes, rights, self.ratios))

    @property
    def put_width(self) -> float:
        return self.short_put_strike - self.long_put_strike

    @property
    def call_width(self) -> float:
        return self.long_call_strike - self.short_call_strike

    @property
    def expiration_day(self) -> int:
        """The expiration as days since 1970-01-01 (for day counts without calendar objects)."""
        return self.expiration.toordinal() - EPOCH_ORDINAL

    @property
    def width(self) -> float:
        """The wider wing: at expiry only one side can finish in the money."""
        return max(self.put_width, self.call_width)

    def intrinsic_value(self, underlying: float) -> float:
        """Value per share of the condor to its holder (what the short side owes) at ``underlying``."""
        put_spread = min(max(self.short_put_strike - underlying, 0.0), self.put_width)
        call_spread = min(max(underlying - self.short_call_strike, 0.0), self.call_width)
        return put_spread + call_spread


@dataclass(frozen=True, slots=True)
class LegQuotes:
    """Quotes of a structure's legs at one bar (arrays in leg order)."""

    bid: np.ndarray
    ask: np.ndarray
    mid: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray


class Action(str, Enum):
    OPEN = "open"
    CLOSE = "close"
    HOLD = "hold"
    HEDGE = "hedge"        # trade underlying shares (TradeDecision.shares, signed)


class ExitReason(str, Enum):
    PROFIT_TAKE = "profit_take"
    STOP_LOSS = "stop_loss"
    DTE_EXIT = "dte_exit"
    MAX_HOLD = "max_hold"
    EXPIRY = "expiry"
    END_OF_DATA = "end_of_data"
    KILL_SWITCH = "kill_switch"          # the daily drawdown kill switch flattened the book
    MAX_DRAWDOWN = "max_drawdown"        # the total drawdown limit flattened the book


@dataclass(frozen=True, slots=True)
class TradeDecision:
    """What the engine decided at one bar. OPEN carries the condor and its expected credit;
    CLOSE carries the position id and the reason; HEDGE the signed shares to trade (+ buy) and
    the portfolio delta that triggered it; HOLD says why nothing was done (for logs)."""

    action: Action
    timestamp: pd.Timestamp
    reason: str
    condor: IronCondor | None = None
    position_id: int | None = None
    expected_price: float | None = None   # per share: credit for OPEN, debit for CLOSE
    context: Mapping | None = None        # OPEN: the features and checks behind the entry
    shares: int = 0                       # HEDGE: shares to trade, signed


@dataclass(frozen=True, slots=True)
class Fill:
    """An executed structure order: per-leg prices, the net per share (credit > 0 received,
    < 0 paid), contracts and fees in dollars."""

    timestamp: pd.Timestamp
    position_id: int
    action: Action
    leg_prices: tuple[float, float, float, float]
    net_price: float
    quantity: int
    fees: float
    reason: str

    @property
    def cash_flow(self) -> float:
        """Dollars into the account (premium minus fees)."""
        return self.net_price * self.quantity * CONTRACT_MULTIPLIER - self.fees


@dataclass(slots=True)
class Position:
    """An open (or closed) condor and what happened to it. Mutable: the portfolio owns it."""

    position_id: int
    condor: IronCondor
    entry_fill: Fill
    exit_fill: Fill | None = None
    max_adverse_excursion: float = 0.0      # worst unrealized loss in dollars at the closing side
    assigned_legs: tuple[str, ...] = ()     # e.g. ('short_put',) when a short leg settled ITM
    early_assignment_risk: bool = False     # a short leg was deep ITM near expiry
    notes: list[str] = field(default_factory=list)
    entry_context: dict = field(default_factory=dict)   # regime, confidence, memberships at entry

    @property
    def entry_credit(self) -> float:
        return self.entry_fill.net_price

    @property
    def max_loss(self) -> float:
        """Dollars at risk: (width − credit) × 100 × contracts."""
        return (self.condor.width - self.entry_credit) * CONTRACT_MULTIPLIER * self.condor.quantity

    @property
    def is_open(self) -> bool:
        return self.exit_fill is None

    @property
    def realized_pnl(self) -> float | None:
        if self.exit_fill is None:
            return None
        return self.entry_fill.cash_flow + self.exit_fill.cash_flow


@dataclass(frozen=True, slots=True)
class HedgeFill:
    """Underlying shares traded by the delta hedge: signed ``shares`` (+ bought) at ``price``,
    ``cost`` dollars (``hedge.share_cost`` per share), the book's delta before and after."""

    timestamp: pd.Timestamp
    shares: int
    price: float
    cost: float
    reason: str
    delta_before: float
    delta_after: float

    @property
    def cash_flow(self) -> float:
        """Dollars into the account (sales positive) after the cost."""
        return -(self.shares * self.price) - self.cost


@dataclass(frozen=True, slots=True)
class RiskEvent:
    """Something the risk manager did or refused: ``kind`` is one of ``kill_switch_halt``,
    ``max_drawdown_halt``, ``flatten``, ``risk_rejection``; ``reason`` the rule; ``detail`` a
    one-line explanation with the numbers. The same rejection on consecutive entry attempts of
    a session is one event with ``count`` attempts from ``timestamp`` to ``last_timestamp``."""

    timestamp: pd.Timestamp
    kind: str
    reason: str
    detail: str
    equity: float = float("nan")
    reference_equity: float = float("nan")   # session open (kill switch) or peak (max drawdown)
    count: int = 1                           # consecutive bars of the same rejection in a session
    last_timestamp: pd.Timestamp | None = None


@dataclass(frozen=True, slots=True)
class PortfolioGreeks:
    """Net Greeks of the open positions: delta per $1 (shares-equivalent ×100 applied),
    gamma per $1, vega per vol point and theta per day, all in dollars."""

    delta: float = 0.0
    gamma: float = 0.0
    vega: float = 0.0
    theta: float = 0.0


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    """Everything the engine may know at one bar, nothing from later.

    ``chain(dte_min, dte_max)`` returns the option-chain slice at this bar, ``nearest_chain``
    the slice of the nearest expiry in that DTE range only (what the condor is built from);
    ``quote(condor)``
    returns this bar's quotes of a structure's legs; ``quote_many(positions)`` the quotes and Greeks
    of several open condors at once. ``features`` holds the bar's feature row (indicators, MTF
    consensus, memberships, confidence, regime, entry-gate code; ``intelligence.features``).
    """

    timestamp: pd.Timestamp
    bar_index: int
    session_day: int                       # the bar's session as days since 1970-01-01
    symbol: str
    spot: float
    iv_index: float
    chain: Callable                        # chain(dte_min, dte_max) -> ChainSlice at this bar
    nearest_chain: Callable                # nearest_chain(dte_min, dte_max) -> the nearest expiry's slice
    quote: Callable[[IronCondor], LegQuotes]
    quote_many: Callable          # quote_many(positions) -> StructureQuotes (bid, ask, mid, Greeks), each (k, 4)
    settlement_of: Callable[[dt.date], pd.Timestamp]   # listed expiry -> its settlement time
    features: Mapping = field(default_factory=dict)
