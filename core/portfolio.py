"""The book and the one mark-to-market: open and closed condor positions, hedge shares, cash,
margin and buying power; what a position and the account are worth, and their Greeks, from quotes
the caller passes in.

The portfolio keeps state but never prices. Every mark — the per-bar driver's account record,
the fast driver's holding-period paths, the engine's kill-switch equity, the Python helpers
below — goes through the same arithmetic defined here:
- one condor at one bar: ``condor_marks`` (compiled; the engine's evaluator inlines it, and
  ``mark_condor_rows`` applies it to batches), with the legs summed in the fixed order
  ((long put − short put) − short call) + long call, so a row's numbers never depend on the batch
  it is computed in;
- the account: ``account_marks`` (one bar) and ``account_mark_paths`` (a range of bars), which
  add cash, each position's value in id order and the hedge shares in the same order.

Ids: the portfolio owns position ids, 1, 2, 3, ... in opening order. A fill passed to
``open_position`` carries either the placeholder 0 or exactly ``next_position_id``; the stored
entry fill always carries the assigned id.

Money: ``cash`` moves only by fills (``Fill.cash_flow``: premium minus fees; ``HedgeFill.
cash_flow``: shares sold minus bought minus cost). A short condor's credit sits in cash while the
position is open; its value to us (negative) comes back through the marks, so
``equity = cash + Σ position values + hedge shares × spot``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Literal, NamedTuple

import numpy as np
from numba import njit

from core.dto import (
    CONTRACT_MULTIPLIER,
    Action,
    Fill,
    HedgeFill,
    IronCondor,
    LegQuotes,
    PortfolioGreeks,
    Position,
)

# --------------------------------------------------------------------------------------------
# Marks (pure)
# --------------------------------------------------------------------------------------------

def _dollars_per_share(quantity: int) -> float:
    # One product of integers (exact), so per-share × this is a single rounding in any batch.
    return float(CONTRACT_MULTIPLIER * quantity)


@njit(cache=True, inline="always")
def condor_marks(bid, ask, mid, delta, gamma, vega, theta, dollars_per_share):
    """One condor at one bar (leg rows of four, order long put, short put, short call, long
    call): its value at mid, its value at the closing side (long legs at the bid, short legs at
    the ask, before fees), and its net delta, gamma, vega, theta, all × ``dollars_per_share``
    (100 × contracts): dollars for values, share-equivalents for delta and gamma, dollars per
    vol point for vega, dollars per day for theta."""
    mid_value = (((mid[0] - mid[1]) - mid[2]) + mid[3]) * dollars_per_share
    closing_value = (((bid[0] - ask[1]) - ask[2]) + bid[3]) * dollars_per_share
    net_delta = (((delta[0] - delta[1]) - delta[2]) + delta[3]) * dollars_per_share
    net_gamma = (((gamma[0] - gamma[1]) - gamma[2]) + gamma[3]) * dollars_per_share
    net_vega = (((vega[0] - vega[1]) - vega[2]) + vega[3]) * dollars_per_share
    net_theta = (((theta[0] - theta[1]) - theta[2]) + theta[3]) * dollars_per_share
    return mid_value, closing_value, net_delta, net_gamma, net_vega, net_theta


@njit(cache=True)
def _mark_rows_kernel(bid, ask, mid, delta, gamma, vega, theta, dollars_per_share):
    rows = bid.shape[0]
    out = np.empty((6, rows))
    for i in range(rows):
        marks = condor_marks(bid[i], ask[i], mid[i], delta[i], gamma[i], vega[i], theta[i], dollars_per_share)
        for k in range(6):
            out[k, i] = marks[k]
    return out


def mark_condor_rows(quantity: int, bid, ask, mid, delta=None, gamma=None, vega=None, theta=None) -> np.ndarray:
    """``condor_marks`` on rows of quotes (arrays (..., 4); Greeks default to zero): an array
    (6, ...) of mid value, closing-side value, net delta, gamma, vega, theta."""
    bid = np.asarray(bid, dtype=np.float64)
    shape = bid.shape[:-1]
    flat = [np.ascontiguousarray(np.broadcast_to(np.asarray(a if a is not None else 0.0, dtype=np.float64),
                                                 bid.shape)).reshape(-1, 4)
            for a in (bid, ask, mid, delta, gamma, vega, theta)]
    return _mark_rows_kernel(*flat, _dollars_per_share(quantity)).reshape((6, *shape))


def _require_condor_ratios(ratios) -> None:
    if not np.array_equal(np.asarray(ratios), np.array([1, -1, -1, 1])):
        raise ValueError(f"marks are defined for iron condors (ratios [1, -1, -1, 1]), got {np.asarray(ratios).tolist()}")


def value_at_mid(mid, ratios, quantity: int):
    """Dollars the condor is worth to us at mid: Σ ratio·mid × 100 × quantity (negative for a
    short condor). ``mid`` has shape (..., 4)."""
    _require_condor_ratios(ratios)
    mid = np.asarray(mid, dtype=np.float64)
    return mark_condor_rows(quantity, mid, mid, mid)[0][()]


def closing_side_prices(bid, ask, ratios) -> np.ndarray:
    """Per-leg prices if closed at the natural: long legs sold at the bid, short legs bought at the
    ask."""
    return np.where(np.asarray(ratios) > 0, np.asarray(bid, dtype=np.float64),
                    np.asarray(ask, dtype=np.float64))


def value_at_closing_side(bid, ask, ratios, quantity: int):
    """Dollars we would get (negative: pay) closing at the natural, before fees: the conservative
    mark (long legs at bid, short legs at ask)."""
    _require_condor_ratios(ratios)
    bid = np.asarray(bid, dtype=np.float64)
    return mark_condor_rows(quantity, bid, ask, bid)[1][()]


def position_value(position: Position, quotes: LegQuotes, side: Literal["mid", "closing"] = "mid") -> float:
    """One position's value in dollars from its legs' quotes at one bar."""
    if side not in ("mid", "closing"):
        raise ValueError(f"side must be 'mid' or 'closing', got {side!r}")
    marks = mark_condor_rows(position.condor.quantity, quotes.bid, quotes.ask, quotes.mid)
    return float(marks[0] if side == "mid" else marks[1])


def open_pnl(position: Position, value: float) -> float:
    """Unrealized P&L in dollars given the position's current value: entry cash flow (credit less
    entry fees) + value. Exit fees are not included (not yet paid)."""
    return position.entry_fill.cash_flow + value


class AccountMarks(NamedTuple):
    """The account at one bar (or, from ``account_mark_paths``, arrays over bars): cash, equity at
    mid, equity at the closing side, and the net Greeks (hedge shares in the delta)."""

    cash: float
    equity: float
    equity_liquidation: float
    delta: float
    gamma: float
    vega: float
    theta: float


def account_marks(cash: float, shares: int, spot: float, share_cost: float, rows=None) -> AccountMarks:
    """One bar: cash + each open position's value in id order + the hedge shares (at spot; at the
    closing side less ``share_cost`` per share). ``rows``: the open positions' evaluated rows at
    this bar (``mid_value``, ``closing_value``, ``delta``, ``gamma``, ``vega``, ``theta`` arrays,
    one entry per position, as ``core.engine.ConditionRows``), or None when none is open."""
    mid_total = cash
    closing_total = cash
    delta = gamma = vega = theta = 0.0
    if rows is not None:
        for mid_value, closing_value, net_delta, net_gamma, net_vega, net_theta in zip(
                rows.mid_value.tolist(), rows.closing_value.tolist(), rows.delta.tolist(), rows.gamma.tolist(),
                rows.vega.tolist(), rows.theta.tolist()):
            mid_total += mid_value
            closing_total += closing_value
            delta += net_delta
            gamma += net_gamma
            vega += net_vega
            theta += net_theta
    if shares:
        mid_total += shares * spot
        closing_total += shares * spot - abs(shares) * share_cost
        delta += shares
    return AccountMarks(cash, mid_total, closing_total, delta, gamma, vega, theta)


def account_mark_paths(cash: float, shares: int, spot: np.ndarray, share_cost: float, paths) -> AccountMarks:
    """``account_marks`` over a range of bars without fills: ``paths`` yields, per open position
    in id order, its (mid value, closing value, delta, gamma, vega, theta) arrays over the bars;
    ``spot`` the underlying per bar. The same additions in the same order, elementwise, so each
    bar's numbers equal what ``account_marks`` gives for it."""
    n = len(spot)
    mid_total = np.full(n, cash)
    closing_total = np.full(n, cash)
    delta, gamma, vega, theta = (np.zeros(n) for _ in range(4))
    for mid_value, closing_value, net_delta, net_gamma, net_vega, net_theta in paths:
        mid_total += mid_value
        closing_total += closing_value
        delta += net_delta
        gamma += net_gamma
        vega += net_vega
        theta += net_theta
    if shares:
        mid_total += shares * spot
        closing_total += shares * spot - abs(shares) * share_cost
        delta += shares
    return AccountMarks(np.full(n, cash), mid_total, closing_total, delta, gamma, vega, theta)


# --------------------------------------------------------------------------------------------
# The book
# --------------------------------------------------------------------------------------------

class Portfolio:
    """Open positions by id, closed positions in close order, hedge shares and cash."""

    def __init__(self, starting_cash: float):
        if not (isinstance(starting_cash, (int, float)) and math.isfinite(starting_cash) and starting_cash > 0):
            raise ValueError(f"starting_cash must be a finite number > 0, got {starting_cash!r}")
        self.starting_cash = float(starting_cash)
        self.cash = float(starting_cash)
        self._open: dict[int, Position] = {}
        self.closed: list[Position] = []
        self._next_id = 1
        self.hedge_shares = 0                     # underlying shares held by the delta hedge (signed)
        self.hedge_fills: list[HedgeFill] = []

    # -- views ---------------------------------------------------------------------------------

    @property
    def open_positions(self) -> Mapping[int, Position]:
        """Read-only view of open positions by id (in opening order)."""
        return MappingProxyType(self._open)

    @property
    def next_position_id(self) -> int:
        """The id the next ``open_position`` will assign."""
        return self._next_id

    def position(self, position_id: int) -> Position:
        """An open or closed position by id."""
        if position_id in self._open:
            return self._open[position_id]
        for position in self.closed:
            if position.position_id == position_id:
                return position
        raise ValueError(f"no position with id {position_id}")

    @property
    def margin_in_use(self) -> float:
        """Dollars the broker holds against open positions: Reg-T requirement of a defined-risk
        condor, the wider wing × 100 × contracts. The credit received sits in cash, so relative to
        the cash before the trade this blocks exactly the max loss ((width − credit) × 100 × qty)."""
        return float(sum(p.condor.width * _dollars_per_share(p.condor.quantity) for p in self._open.values()))

    @property
    def max_loss_at_risk(self) -> float:
        """Σ max loss of open positions in dollars ((width − entry credit) × 100 × contracts)."""
        return float(sum(p.max_loss for p in self._open.values()))

    @property
    def buying_power(self) -> float:
        """Cash a broker would let us commit to new defined-risk spreads: cash − margin_in_use."""
        return self.cash - self.margin_in_use

    @property
    def realized_pnl(self) -> float:
        """Σ realized P&L of closed positions (net of entry and exit fees)."""
        return float(sum(p.realized_pnl for p in self.closed))

    # -- state changes -------------------------------------------------------------------------

    def open_position(self, condor: IronCondor, fill: Fill, context: Mapping | None = None) -> Position:
        """Book an OPEN fill of ``condor`` under the next id (fill.position_id must be 0 or that
        id) and add its cash flow (credit − fees). ``context``: why it was opened (features,
        memberships, regime at the decision), kept on the position for the trade log."""
        if fill.action is not Action.OPEN:
            raise ValueError(f"open_position needs an OPEN fill, got {fill.action.value!r}")
        if fill.quantity != condor.quantity:
            raise ValueError(f"open_position: fill quantity {fill.quantity} differs from the condor's "
                             f"quantity {condor.quantity}")
        position_id = self._next_id
        if fill.position_id not in (0, None, position_id):
            raise ValueError(f"open_position: fill carries position id {fill.position_id}, but the next "
                             f"id is {position_id} (pass 0 to have it assigned)")
        if fill.position_id != position_id:
            fill = dataclasses.replace(fill, position_id=position_id)
        position = Position(position_id=position_id, condor=condor, entry_fill=fill,
                            entry_context=dict(context) if context else {})
        self._open[position_id] = position
        self._next_id += 1
        self.cash += fill.cash_flow
        return position

    def _open_position_or_raise(self, position_id: int, operation: str) -> Position:
        position = self._open.get(position_id)
        if position is None:
            state = "already closed" if any(p.position_id == position_id for p in self.closed) else "unknown"
            raise ValueError(f"{operation}: position id {position_id} is {state}, not open")
        return position

    def close_position(self, position_id: int, fill: Fill, assigned_legs: Iterable[str] = (),
                       notes: Iterable[str] = ()) -> Position:
        """Book a CLOSE fill (fill.position_id must be 0 or ``position_id``): add its cash flow
        (−debit − fees), record assigned short legs and notes, move the position to ``closed``."""
        position = self._open_position_or_raise(position_id, "close_position")
        if fill.action is not Action.CLOSE:
            raise ValueError(f"close_position({position_id}) needs a CLOSE fill, got {fill.action.value!r}")
        if fill.quantity != position.condor.quantity:
            raise ValueError(f"close_position({position_id}): fill quantity {fill.quantity} differs from "
                             f"the position's {position.condor.quantity}")
        if fill.position_id not in (0, None, position_id):
            raise ValueError(f"close_position({position_id}): fill carries position id {fill.position_id}")
        if fill.position_id != position_id:
            fill = dataclasses.replace(fill, position_id=position_id)
        position.exit_fill = fill
        position.assigned_legs = tuple(position.assigned_legs) + tuple(assigned_legs)
        position.notes.extend(notes)
        del self._open[position_id]
        self.closed.append(position)
        self.cash += fill.cash_flow
        return position

    def close_part(self, position_id: int, fill: Fill) -> Position:
        """Book a CLOSE fill for fewer units than the position holds (a live order that filled in
        part): those units become a closed position of their own (same id, the entry fill's
        fees shared pro rata), the rest stays open. A fill for every unit is ``close_position``."""
        position = self._open_position_or_raise(position_id, "close_part")
        held = position.condor.quantity
        if not 1 <= fill.quantity < held:
            raise ValueError(f"close_part({position_id}): {fill.quantity} of {held} units; use close_position "
                             f"for all of them")
        share = fill.quantity / held
        entry = position.entry_fill
        closed = dataclasses.replace(
            position, condor=dataclasses.replace(position.condor, quantity=fill.quantity),
            entry_fill=dataclasses.replace(entry, quantity=fill.quantity, fees=entry.fees * share),
            exit_fill=dataclasses.replace(fill, position_id=position_id), notes=list(position.notes),
            entry_context=dict(position.entry_context))
        position.condor = dataclasses.replace(position.condor, quantity=held - fill.quantity)
        position.entry_fill = dataclasses.replace(entry, quantity=held - fill.quantity, fees=entry.fees * (1 - share))
        self.closed.append(closed)
        self.cash += fill.cash_flow
        return closed

    def trade_shares(self, fill: HedgeFill) -> None:
        """Book a hedge fill: shares change by ``fill.shares``, cash by its cash flow."""
        if not isinstance(fill.shares, (int, np.integer)) or fill.shares == 0:
            raise ValueError(f"trade_shares: shares must be a non-zero whole number, got {fill.shares!r}")
        if not (math.isfinite(fill.price) and fill.price > 0 and math.isfinite(fill.cost) and fill.cost >= 0):
            raise ValueError(f"trade_shares: price {fill.price!r} must be > 0 and cost {fill.cost!r} >= 0")
        self.hedge_shares += int(fill.shares)
        self.cash += fill.cash_flow
        self.hedge_fills.append(fill)

    def update_excursion(self, position_id: int, loss_dollars: float) -> float:
        """Keep the running maximum of adverse excursion (a loss as a positive number of dollars;
        gains leave it unchanged). Returns the updated maximum."""
        position = self._open_position_or_raise(position_id, "update_excursion")
        if not math.isfinite(loss_dollars):
            raise ValueError(f"update_excursion({position_id}): loss must be finite, got {loss_dollars!r}")
        position.max_adverse_excursion = max(position.max_adverse_excursion, float(loss_dollars))
        return position.max_adverse_excursion

    def flag_early_assignment_risk(self, position_id: int, note: str) -> None:
        """Mark an open position as carrying early-assignment risk (once) and note why."""
        position = self._open_position_or_raise(position_id, "flag_early_assignment_risk")
        if not position.early_assignment_risk:
            position.early_assignment_risk = True
            position.notes.append(note)

    # -- marks (quotes in, numbers out) --------------------------------------------------------

    def _require_all_open(self, keys, what: str) -> None:
        missing = [pid for pid in self._open if pid not in keys]
        extra = [pid for pid in keys if pid not in self._open]
        if missing or extra:
            raise ValueError(f"{what} must cover exactly the open positions {list(self._open)}: "
                             f"missing {missing}, not open {extra}")

    def equity(self, marks: Mapping[int, float]) -> float:
        """cash + Σ position values, ``marks`` = {position id: value in dollars} for every open
        position (from ``position_value`` at mid or closing side)."""
        self._require_all_open(marks, "marks")
        total = self.cash
        for position_id in self._open:       # opening order: a fixed summation order
            total += float(marks[position_id])
        return total

    def marks_from_quotes(self, quotes: Mapping[int, LegQuotes],
                          side: Literal["mid", "closing"] = "mid") -> dict[int, float]:
        """{id: value in dollars} of every open position from its legs' quotes."""
        self._require_all_open(quotes, "quotes")
        return {pid: position_value(p, quotes[pid], side) for pid, p in self._open.items()}

    def greeks(self, quotes: Mapping[int, LegQuotes]) -> PortfolioGreeks:
        """Net Greeks of the open positions plus the hedge shares' delta: Σ ratio·greek × 100 ×
        contracts (``condor_marks``), with the quotes' per-share Greeks in
        ``analytics.black_scholes`` units (delta and gamma per $1 of the underlying, vega per vol
        point, theta per calendar day)."""
        self._require_all_open(quotes, "quotes")
        totals = [0.0, 0.0, 0.0, 0.0]
        for position_id, position in self._open.items():
            q = quotes[position_id]
            marks = mark_condor_rows(position.condor.quantity, q.bid, q.ask, q.mid, q.delta, q.gamma, q.vega,
                                     q.theta)
            for k in range(4):
                totals[k] += float(marks[2 + k])
        return PortfolioGreeks(totals[0] + self.hedge_shares, totals[1], totals[2], totals[3])
