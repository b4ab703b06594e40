"""The book: open and closed condor positions, cash, margin and buying power, and the marks
(position values, equity, Greeks) computed from quotes the caller passes in.

The portfolio keeps state but never prices: marks are pure functions of quotes (``value_at_mid``,
``value_at_closing_side``), usable on one row or on an (n_bars, 4) batch with bitwise identical
rows (fixed leg order, see ``core.execution.leg_sum``).

Ids: the portfolio owns position ids, 1, 2, 3, ... in opening order. A fill passed to
``open_position`` carries either the placeholder 0 or exactly ``next_position_id``; the stored
entry fill always carries the assigned id.

Money: ``cash`` moves only by fills (``Fill.cash_flow``: premium minus fees). A short condor's
credit sits in cash while the position is open; its value to us (negative) comes back through the
marks, so ``equity = cash + Σ position values``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Literal

import numpy as np

from core.dto import (
    CONTRACT_MULTIPLIER,
    Action,
    Fill,
    IronCondor,
    LegQuotes,
    PortfolioGreeks,
    Position,
)
from core.execution import leg_sum

# --------------------------------------------------------------------------------------------
# Marks (pure)
# --------------------------------------------------------------------------------------------

def _dollars_per_share(quantity: int) -> float:
    # One product of integers (exact), so per-share × this is a single rounding in any batch.
    return float(CONTRACT_MULTIPLIER * quantity)


def value_at_mid(mid, ratios, quantity: int):
    """Dollars the position is worth to us at mid: Σ ratio·mid × 100 × quantity (negative for a
    short condor). ``mid`` has shape (..., 4)."""
    mid = np.asarray(mid, dtype=np.float64)
    return leg_sum(np.asarray(ratios, dtype=np.float64) * mid) * _dollars_per_share(quantity)


def closing_side_prices(bid, ask, ratios) -> np.ndarray:
    """Per-leg prices if closed at the natural: long legs sold at the bid, short legs bought at the
    ask."""
    return np.where(np.asarray(ratios) > 0, np.asarray(bid, dtype=np.float64),
                    np.asarray(ask, dtype=np.float64))


def value_at_closing_side(bid, ask, ratios, quantity: int):
    """Dollars we would get (negative: pay) closing at the natural, before fees: the conservative
    mark (long legs at bid, short legs at ask)."""
    prices = closing_side_prices(bid, ask, ratios)
    return leg_sum(np.asarray(ratios, dtype=np.float64) * prices) * _dollars_per_share(quantity)


def position_value(position: Position, quotes: LegQuotes, side: Literal["mid", "closing"] = "mid") -> float:
    """One position's value in dollars from its legs' quotes at one bar."""
    ratios = position.condor.ratios
    quantity = position.condor.quantity
    if side == "mid":
        return float(value_at_mid(quotes.mid, ratios, quantity))
    if side == "closing":
        return float(value_at_closing_side(quotes.bid, quotes.ask, ratios, quantity))
    raise ValueError(f"side must be 'mid' or 'closing', got {side!r}")


def open_pnl(position: Position, value: float) -> float:
    """Unrealized P&L in dollars given the position's current value: entry cash flow (credit less
    entry fees) + value. Exit fees are not included (not yet paid)."""
    return position.entry_fill.cash_flow + value


# --------------------------------------------------------------------------------------------
# The book
# --------------------------------------------------------------------------------------------

class Portfolio:
    """Open positions by id, closed positions in close order, and cash."""

    def __init__(self, starting_cash: float):
        if not (isinstance(starting_cash, (int, float)) and math.isfinite(starting_cash) and starting_cash > 0):
            raise ValueError(f"starting_cash must be a finite number > 0, got {starting_cash!r}")
        self.starting_cash = float(starting_cash)
        self.cash = float(starting_cash)
        self._open: dict[int, Position] = {}
        self.closed: list[Position] = []
        self._next_id = 1

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
        """Net Greeks of the open positions in dollars: Σ ratio·greek × 100 × contracts, with the
        quotes' per-share Greeks in ``analytics.black_scholes`` units (delta and gamma per $1 of
        the underlying, vega per vol point, theta per calendar day)."""
        self._require_all_open(quotes, "quotes")
        totals = {"delta": 0.0, "gamma": 0.0, "vega": 0.0, "theta": 0.0}
        for position_id, position in self._open.items():
            ratios = position.condor.ratios.astype(np.float64)
            scale = _dollars_per_share(position.condor.quantity)
            leg_quotes = quotes[position_id]
            for name in totals:
                totals[name] += float(leg_sum(ratios * np.asarray(getattr(leg_quotes, name), dtype=np.float64))) * scale
        return PortfolioGreeks(**totals)
