"""TradingEngine: per bar, a MarketSnapshot in, decisions out (open, close with reason, hold).

The engine holds the strategy's rules and reads the portfolio; it never fills orders, reads files
or talks to Backtrader or a broker. Drivers call ``on_bar`` (the per-bar drivers) or the two
halves it is made of, ``exit_decision`` and ``entry_decision`` (the fast driver, which evaluates
exits on whole holding periods with the same arithmetic).
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd

from core.config import Config
from core.dto import (
    CONTRACT_MULTIPLIER, EPOCH_ORDINAL, Action, ExitReason, IronCondor, LegQuotes, MarketSnapshot, Position,
    TradeDecision,
)
from core.execution import FillModel, close_debit, open_credit
from core.portfolio import Portfolio, position_value
from strategies.options_strategy import (
    REASON_OF_CODE, CondorChoice, Rejection, choose_iron_condor, credit_is_sufficient, exit_codes,
)

DAY_NS = 86_400 * 1_000_000_000


def clock_minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class TradingEngine:
    """The iron-condor decision logic shared by every driver."""

    def __init__(self, config: Config, portfolio: Portfolio, fill_model: FillModel):
        self.config = config
        self.portfolio = portfolio
        self.fill_model = fill_model
        self._window = (clock_minutes(config.strategy.entry_window_start),
                        clock_minutes(config.strategy.entry_window_end))
        self._entries_by_session: dict[dt.date, int] = {}
        self._closing: set[int] = set()
        self._entry_days: dict[int, int] = {}          # positions with a close decided, not yet filled
        self.rejections: dict[str, int] = {}     # why entries were not made, for the report

    # ----------------------------------------------------------------------------- bookkeeping
    def note_opened(self, session_date: dt.date) -> None:
        self._entries_by_session[session_date] = self._entries_by_session.get(session_date, 0) + 1

    def entries_on(self, session_date: dt.date) -> int:
        return self._entries_by_session.get(session_date, 0)

    def note_closed(self, position_id: int) -> None:
        self._closing.discard(position_id)

    def is_closing(self, position_id: int) -> bool:
        return position_id in self._closing

    def active_positions(self) -> list[Position]:
        """Open positions without a pending close, in id order."""
        return [p for p in self.portfolio.open_positions.values() if p.position_id not in self._closing]

    # ----------------------------------------------------------------------------- exits
    def exit_decision(self, position: Position, snapshot: MarketSnapshot,
                      quotes: LegQuotes | None) -> TradeDecision | None:
        """Close decision for one open position at this bar, or None to hold.

        At (or after) the expiry's settlement the position settles; otherwise the exit rules run
        on the cost to close at the fill model.
        """
        condor = position.condor
        if snapshot.timestamp >= condor.settlement:
            return TradeDecision(Action.CLOSE, snapshot.timestamp, ExitReason.EXPIRY.value,
                                 position_id=position.position_id,
                                 expected_price=condor.intrinsic_value(snapshot.spot))
        _, debit = close_debit(quotes.bid[np.newaxis, :], quotes.ask[np.newaxis, :], self.fill_model)
        dte = np.array([condor.expiration_day - snapshot.session_day])
        days_held = np.array([snapshot.session_day - self.entry_day(position)])
        code = int(exit_codes(debit, position.entry_credit, dte, days_held, self.config)[0])
        self.track_excursion(position, float(debit[0]))
        self.flag_early_assignment(position, quotes, snapshot.spot, int(dte[0]))
        if code == 0:
            return None
        return TradeDecision(Action.CLOSE, snapshot.timestamp, REASON_OF_CODE[code].value,
                             position_id=position.position_id, expected_price=float(debit[0]))

    def entry_day(self, position: Position) -> int:
        """The entry bar's session as days since 1970-01-01 (cached per position)."""
        day = self._entry_days.get(position.position_id)
        if day is None:
            stamp = position.entry_fill.timestamp
            day = self._entry_days[position.position_id] = stamp.date().toordinal() - EPOCH_ORDINAL
        return day

    def track_excursion(self, position: Position, close_debit: float) -> None:
        loss = (close_debit - position.entry_credit) * CONTRACT_MULTIPLIER * position.condor.quantity
        if loss > position.max_adverse_excursion:
            self.portfolio.update_excursion(position.position_id, loss)

    def flag_early_assignment(self, position: Position, quotes: LegQuotes, spot: float, dte: int) -> None:
        """Trade-log flag: a short leg in the money with little extrinsic value near expiry."""
        exits = self.config.exits
        if position.early_assignment_risk or dte > exits.early_assignment_days:
            return
        condor = position.condor
        for leg, strike, is_call in ((1, condor.short_put_strike, False), (2, condor.short_call_strike, True)):
            intrinsic = max(spot - strike, 0.0) if is_call else max(strike - spot, 0.0)
            if intrinsic > 0.0 and quotes.mid[leg] - intrinsic < exits.early_assignment_extrinsic:
                self.portfolio.flag_early_assignment_risk(
                    position.position_id,
                    f"early-assignment risk {'short call' if is_call else 'short put'} {strike:g}: "
                    f"ITM by {intrinsic:.2f}, extrinsic {quotes.mid[leg] - intrinsic:.3f}, {dte} DTE")
                return

    # ----------------------------------------------------------------------------- entries
    def entry_allowed(self, snapshot: MarketSnapshot, open_count: int) -> str | None:
        """None when an entry may be tried at this bar, else the reason it may not."""
        stamp = snapshot.timestamp
        minute = stamp.hour * 60 + stamp.minute
        if not (self._window[0] <= minute <= self._window[1]):
            return "outside_entry_window"
        limit = self.config.strategy.max_entries_per_day
        if limit and self.entries_on(stamp.date()) >= limit:
            return "daily_entry_limit"
        if open_count >= self.config.strategy.max_positions:
            return "max_positions"
        return None

    def entry_decision(self, snapshot: MarketSnapshot, equity: float, open_count: int,
                       committed_risk: float) -> TradeDecision | None:
        """Open decision at this bar, or None. ``equity`` is the account at mid, ``committed_risk``
        the max loss (dollars) of the positions that stay open."""
        if self.entry_allowed(snapshot, open_count) is not None:
            return None
        strategy = self.config.strategy
        choice = choose_iron_condor(snapshot.chain(strategy.dte_min, strategy.dte_max), self.config)
        if isinstance(choice, Rejection):
            return self._reject(choice.reason)
        _, credit = open_credit(choice.bid[np.newaxis, :], choice.ask[np.newaxis, :], self.fill_model)
        credit = float(credit[0])
        if not credit_is_sufficient(credit, choice.width, self.config):
            return self._reject("credit_below_minimum")
        quantity = self._size(choice, credit, equity, committed_risk)
        if quantity < 1:
            return self._reject("max_alloc")
        condor = self._condor(choice, quantity, snapshot)
        return TradeDecision(Action.OPEN, snapshot.timestamp, "entry", condor=condor, expected_price=credit)

    def _size(self, choice: CondorChoice, credit: float, equity: float, committed_risk: float) -> int:
        """Contracts: the configured quantity, cut so that the max loss of all open condors stays
        within ``max_alloc`` of equity and within the cash available as buying power."""
        risk_per_condor = (choice.width - credit) * CONTRACT_MULTIPLIER
        budget = min(self.config.strategy.max_alloc * equity, self.portfolio.cash) - committed_risk
        if risk_per_condor <= 0.0:
            return self.config.strategy.quantity
        return max(0, min(self.config.strategy.quantity, math.floor(budget / risk_per_condor)))

    def _condor(self, choice: CondorChoice, quantity: int, snapshot: MarketSnapshot) -> IronCondor:
        expiration = pd.Timestamp(choice.expiration).date()
        strikes = choice.strikes
        return IronCondor(expiration, snapshot.settlement_of(expiration), float(strikes[0]),
                          float(strikes[1]), float(strikes[2]), float(strikes[3]), quantity)

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        return None

    # ----------------------------------------------------------------------------- per bar
    def mark_at_mid(self, position: Position, quotes: LegQuotes | None, snapshot: MarketSnapshot) -> float:
        """Dollars the position is worth to us at this bar: at mid, or at its settlement value
        once the expiry has settled (no quotes then)."""
        if snapshot.timestamp >= position.condor.settlement:
            return -position.condor.intrinsic_value(snapshot.spot) * CONTRACT_MULTIPLIER * position.condor.quantity
        return position_value(position, quotes, "mid")

    def on_bar(self, snapshot: MarketSnapshot) -> list[TradeDecision]:
        """Exits for every open position, then at most one entry, all decided on the account as it
        stands before this bar's fills. The legs' quotes fetched here are kept on ``last_quotes``
        (by position id) for the driver's fills and marks."""
        decisions = []
        self.last_quotes = {}
        for position in self.portfolio.open_positions.values():
            quotes = None
            if snapshot.timestamp < position.condor.settlement:
                quotes = snapshot.quote(position.condor)
            self.last_quotes[position.position_id] = quotes
            if position.position_id in self._closing:
                continue
            decision = self.exit_decision(position, snapshot, quotes)
            if decision is not None:
                self._closing.add(position.position_id)
                decisions.append(decision)
        active = self.active_positions()
        if self.entry_allowed(snapshot, len(active)) is None:
            equity = self.portfolio.cash
            for position in self.portfolio.open_positions.values():
                equity += self.mark_at_mid(position, self.last_quotes[position.position_id], snapshot)
            committed = 0.0
            for position in active:
                committed += position.max_loss
            entry = self.entry_decision(snapshot, equity, len(active), committed)
            if entry is not None:
                decisions.append(entry)
        return decisions
