"""TradingEngine: per bar, a MarketSnapshot in, decisions out (open, close with reason, hold).

The engine holds the strategy's rules and reads the portfolio; it never fills orders, reads files
or talks to Backtrader or a broker. Per-bar drivers call ``on_bar``; the fast driver also calls
``evaluate`` on whole holding periods (the same compiled arithmetic ``on_bar`` uses on one bar)
to find the bars where ``on_bar`` would act.
"""
from __future__ import annotations

import datetime as dt
import math
from typing import NamedTuple

import numpy as np
import pandas as pd
from numba import njit

from core.config import Config
from core.dto import (
    CONTRACT_MULTIPLIER,
    EPOCH_ORDINAL,
    Action,
    ExitReason,
    IronCondor,
    MarketSnapshot,
    Position,
    TradeDecision,
)
from core.execution import FillModel, close_debit_row, open_credit
from core.portfolio import Portfolio
from intelligence.features import MEMBERSHIP_COLUMNS
from intelligence.fuzzy_engine import dynamic_contracts
from intelligence.regime_filter import regime_names
from strategies.condor_adjustments import (
    breach_probability,
    liquidity_problem,
    nearest_expiry_skew,
    plan_wings,
)
from strategies.entry_gates import GATE_REASONS
from strategies.options_strategy import (
    REASON_OF_CODE,
    CondorChoice,
    Rejection,
    choose_iron_condor,
    credit_is_sufficient,
    exit_code_scalar,
)

# Feature columns copied into a trade's entry context (and trades.csv) besides the memberships.
CONTEXT_FEATURES = ("mtf_consensus", "iv_index", "iv_rank", "realized_vol", "rsi", "adx", "stoch_k",
                    "bb_position", "bb_width", "psar_position", "sma_distance", "volume_ratio",
                    "divergence_z", "gap_pct")


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
        self._closing: set[int] = set()          # positions with a close decided, not yet filled
        self._entry_days: dict[int, int] = {}
        self._columns_key: tuple = ()
        self._columns: tuple = ()
        self._bar_spot = np.zeros(1)                   # one-bar inputs, reused every bar
        self._bar_day = np.zeros(1, dtype=np.int64)
        exits = config.exits
        # The exit-rule settings packed for the compiled evaluator (few arguments dispatch faster).
        self._rule_floats = np.array([fill_model.fraction, exits.profit_take_pct, exits.loss_close_multiple,
                                      exits.early_assignment_extrinsic])
        self._rule_ints = np.array([exits.dte_exit, exits.max_hold_days, exits.early_assignment_days],
                                   dtype=np.int64)
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

    # ----------------------------------------------------------------------------- exits
    def evaluate(self, positions: list[Position], bid: np.ndarray, ask: np.ndarray, mid: np.ndarray,
                 spot: np.ndarray, session_day: np.ndarray) -> ConditionRows:
        """The exit rules, excursions, early-assignment checks and marks of open condors on rows
        of quotes: one row per position at one bar (per-bar drivers) or one row per bar of one
        position (the fast driver's holding-period paths). Same compiled arithmetic either way."""
        # One position's constants broadcast over however many rows (bars) there are.
        columns_f, columns_i = self._position_columns(positions)
        out_f, out_i = evaluate_condor_rows(bid, ask, mid, spot, session_day, columns_f, columns_i,
                                            self._rule_floats, self._rule_ints)
        return ConditionRows(out_f[0], out_f[1], out_f[2], out_f[3], out_i[0], out_i[1], out_f[4], out_i[2])

    def _position_columns(self, positions: list[Position]):
        """Per-position constants as arrays, rebuilt only when the set of positions changes (the
        per-bar drivers ask for the same open set on most bars)."""
        key = tuple(p.position_id for p in positions)
        if self._columns_key != key:
            self._columns_key = key
            self._columns = _position_columns(positions, [self.entry_day(p) for p in positions])
        return self._columns

    def exit_decisions(self, snapshot: MarketSnapshot, positions: list[Position],
                       rows: ConditionRows) -> list[TradeDecision]:
        """Close decisions for open positions (rows in the same order) at this bar; also books
        their excursions and early-assignment flags. At or after settlement a position settles."""
        decisions = []
        debits = rows.debit.tolist()
        codes = rows.code.tolist()
        losses = rows.loss.tolist()
        flags = rows.early_assignment.tolist()
        for i, position in enumerate(positions):
            if position.position_id in self._closing:
                continue
            condor = position.condor
            # No quotes (NaN) exactly when the expiry has settled.
            if debits[i] != debits[i] and snapshot.timestamp >= condor.settlement:
                decisions.append(TradeDecision(Action.CLOSE, snapshot.timestamp, ExitReason.EXPIRY.value,
                                               position_id=position.position_id,
                                               expected_price=condor.intrinsic_value(snapshot.spot)))
                continue
            if losses[i] > position.max_adverse_excursion or (flags[i] and not position.early_assignment_risk):
                self.apply_row(position, rows, i, snapshot.spot)
            code = codes[i]
            if code:
                decisions.append(TradeDecision(Action.CLOSE, snapshot.timestamp, REASON_OF_CODE[code].value,
                                               position_id=position.position_id, expected_price=debits[i]))
        for decision in decisions:
            self._closing.add(decision.position_id)
        return decisions

    def apply_row(self, position: Position, rows: ConditionRows, i: int, spot: float) -> None:
        """Book one evaluated bar of a position: its adverse excursion and, the first time, an
        early-assignment flag."""
        loss = float(rows.loss[i])
        if loss > position.max_adverse_excursion:
            self.portfolio.update_excursion(position.position_id, loss)
        flag = int(rows.early_assignment[i])
        if flag and not position.early_assignment_risk:
            condor = position.condor
            is_call = flag == 2
            strike = condor.short_call_strike if is_call else condor.short_put_strike
            intrinsic = max(spot - strike, 0.0) if is_call else max(strike - spot, 0.0)
            extrinsic = float(rows.short_mid[i]) - intrinsic
            self.portfolio.flag_early_assignment_risk(
                position.position_id,
                f"early-assignment risk {'short call' if is_call else 'short put'} {strike:g}: "
                f"ITM by {intrinsic:.2f}, extrinsic {extrinsic:.3f}, {int(rows.dte[i])} DTE")

    def entry_day(self, position: Position) -> int:
        """The entry bar's session as days since 1970-01-01 (cached per position)."""
        day = self._entry_days.get(position.position_id)
        if day is None:
            stamp = position.entry_fill.timestamp
            day = self._entry_days[position.position_id] = stamp.date().toordinal() - EPOCH_ORDINAL
        return day

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
        the max loss (dollars) of the positions that stay open.

        Order: the bar's entry gates (one pre-computed code, ``strategies.entry_gates``), the
        condor with Stage-2 wings, the chain-level checks (VRP, breach probability, liquidity),
        the credit test, then the size (fixed, or fuzzy/dynamic)."""
        if self.entry_allowed(snapshot, open_count) is not None:
            return None
        features = snapshot.features
        if features:
            gate = int(features["gate_code"])
            if gate:
                return self._reject(GATE_REASONS[gate])
        config = self.config
        strategy, filters = config.strategy, config.filters
        chain = snapshot.chain(strategy.dte_min, strategy.dte_max)
        stage2 = filters.use_entry_gates and bool(features)
        context: dict = {}
        wings = None
        reading = None
        regime_name = str(regime_names(np.array([features["regime"]]))[0]) if features else ""
        if stage2:
            _, reading = nearest_expiry_skew(chain)
            skew = reading.skew if reading is not None else math.nan
            wings = plan_wings(config, regime_name, skew, int(features["divergence_bias"]))
            context.update(skew=skew, iv_atm=reading.iv_atm if reading is not None else math.nan,
                           wing_adjustments="; ".join(wings.adjustments))
        choice = choose_iron_condor(chain, config, wings)
        if isinstance(choice, Rejection):
            return self._reject(choice.reason)
        if stage2:
            if filters.use_vrp_gate:
                vrp = context["iv_atm"] - features["realized_vol"]
                context["vrp"] = vrp
                if not vrp > filters.vrp_threshold:
                    return self._reject("vrp_below_threshold")
            probability = breach_probability(choice)
            context["breach_probability"] = probability
            if filters.use_probability_filter and probability > filters.max_breach_probability:
                return self._reject("breach_probability_above_max")
            if filters.use_liquidity_gate:
                problem = liquidity_problem(choice, filters.liquidity_max_spread_to_credit)
                if problem is not None:
                    return self._reject(problem)
        _, credit = open_credit(choice.bid[np.newaxis, :], choice.ask[np.newaxis, :], self.fill_model)
        credit = float(credit[0])
        if not credit_is_sufficient(credit, choice.width, config):
            return self._reject("credit_below_minimum")
        confidence = float(features["confidence"]) if features else math.nan
        quantity, reason = self._size(choice, credit, equity, committed_risk, confidence)
        if quantity < 1:
            return self._reject(reason)
        if features:
            context.update(self._feature_context(features, regime_name))
        condor = self._condor(choice, quantity, snapshot)
        return TradeDecision(Action.OPEN, snapshot.timestamp, "entry", condor=condor, expected_price=credit,
                             context=context)

    @staticmethod
    def _feature_context(features, regime_name: str) -> dict:
        """What a trader needs to see why a trade was taken and sized: regime, C, F_t, each
        membership and the main features at the decision bar."""
        context = {"regime": regime_name,
                   "confidence": features["confidence"], "fuzzy_ft": features["fuzzy_ft"],
                   "mu_neural": features["mu_neural"]}
        for column in MEMBERSHIP_COLUMNS.values():
            context[column] = features[column]
        for name in CONTEXT_FEATURES:
            context[name] = features[name]
        return context

    def _size(self, choice: CondorChoice, credit: float, equity: float, committed_risk: float,
              confidence: float) -> tuple[int, str]:
        """Contracts and, when 0, why. Fixed ``quantity``, or with ``sizing.dynamic_sizing``
        floor(C × the condors ``position_size_pct`` of equity pays for), C the fuzzy confidence
        when ``fuzzy.use_fuzzy`` (else 1); either way cut so that the max loss of all open condors
        stays within ``max_alloc`` of equity and within the cash available as buying power."""
        risk_per_condor = (choice.width - credit) * CONTRACT_MULTIPLIER
        budget = min(self.config.strategy.max_alloc * equity, self.portfolio.cash) - committed_risk
        wanted = self.config.strategy.quantity
        if self.config.sizing.dynamic_sizing:
            allowed = (math.floor(self.config.sizing.position_size_pct * equity / risk_per_condor)
                       if risk_per_condor > 0.0 else self.config.strategy.quantity)
            scale = confidence if self.config.fuzzy.use_fuzzy else 1.0
            wanted = dynamic_contracts(scale, max(0, allowed))
            if wanted < 1:
                return 0, "fuzzy_size_zero" if self.config.fuzzy.use_fuzzy else "position_size_pct_below_one"
        if risk_per_condor <= 0.0:
            return wanted, ""
        return max(0, min(wanted, math.floor(budget / risk_per_condor))), "max_alloc"

    def _condor(self, choice: CondorChoice, quantity: int, snapshot: MarketSnapshot) -> IronCondor:
        expiration = pd.Timestamp(choice.expiration).date()
        strikes = choice.strikes
        return IronCondor(expiration, snapshot.settlement_of(expiration), float(strikes[0]),
                          float(strikes[1]), float(strikes[2]), float(strikes[3]), quantity)

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    # ----------------------------------------------------------------------------- per bar
    def on_bar(self, snapshot: MarketSnapshot) -> list[TradeDecision]:
        """Exits for every open position, then at most one entry, all decided on the account as it
        stands before this bar's fills. The rows evaluated here (one per open position, in id
        order) stay on ``last_rows`` for the driver's account record."""
        positions = list(self.portfolio.open_positions.values())
        decisions = []
        rows = None
        if positions:
            bid, ask, mid = snapshot.quote_many(positions)
            self._bar_spot[0] = snapshot.spot
            self._bar_day[0] = snapshot.session_day
            rows = self.evaluate(positions, bid, ask, mid, self._bar_spot, self._bar_day)
            decisions = self.exit_decisions(snapshot, positions, rows)
        self.last_rows = rows
        active_count = len(positions) - len(self._closing)
        if self.entry_allowed(snapshot, active_count) is None:
            equity = self.portfolio.cash
            committed = 0.0
            for i, position in enumerate(positions):
                if snapshot.timestamp >= position.condor.settlement:
                    equity += -position.condor.intrinsic_value(snapshot.spot) * CONTRACT_MULTIPLIER * position.condor.quantity
                else:
                    equity += float(rows.mid_value[i])
                if position.position_id not in self._closing:
                    committed += position.max_loss
            entry = self.entry_decision(snapshot, equity, active_count, committed)
            if entry is not None:
                decisions.append(entry)
        return decisions


class ConditionRows(NamedTuple):
    """``evaluate``'s output per row: debit to close at the fill model, adverse excursion in
    dollars, mid and closing-side values in dollars, exit code, early-assignment flag (0 none,
    1 short put, 2 short call), the flagged short leg's mid and the row's DTE. (A NamedTuple:
    built once per bar per driver, it must be cheap to make.)"""

    debit: np.ndarray
    loss: np.ndarray
    mid_value: np.ndarray
    closing_value: np.ndarray
    code: np.ndarray
    early_assignment: np.ndarray
    short_mid: np.ndarray
    dte: np.ndarray


@njit(cache=False, inline="always")
def _row(values, i):
    # Per-row input, or one value broadcast to every row.
    return values[i] if values.shape[0] > 1 else values[0]


def _position_columns(positions: list[Position], entry_days: list[int]):
    """(k, 3) floats: entry credit, short put and short call strikes; (k, 3) ints: contracts,
    expiration day, entry day."""
    floats = np.array([[p.entry_credit, p.condor.short_put_strike, p.condor.short_call_strike] for p in positions])
    ints = np.array([[p.condor.quantity, p.condor.expiration_day, day] for p, day in zip(positions, entry_days)],
                    dtype=np.int64)
    return floats, ints


@njit(cache=False)
def evaluate_condor_rows(bid, ask, mid, spot, session_day, columns_f, columns_i, rule_floats, rule_ints):
    """Per row (a condor at a bar; legs long put, short put, short call, long call): the debit to
    close at the fill model (as ``core.execution.close_debit``), the exit code (as
    ``exit_code_scalar``), the adverse excursion, mid and closing-side values (as
    ``core.portfolio``) and the early-assignment check. ``spot``, ``session_day`` and the
    position columns are per row or one row for all. Rows without quotes (NaN: settled) give NaN
    numbers and code 0. Not cached on disk: it compiles in functions from other modules."""
    fraction, profit_take_pct, loss_close_multiple, early_assignment_extrinsic = (
        rule_floats[0], rule_floats[1], rule_floats[2], rule_floats[3])
    dte_exit, max_hold_days, early_assignment_days = rule_ints[0], rule_ints[1], rule_ints[2]
    rows = bid.shape[0]
    out_f = np.full((5, rows), np.nan)
    out_i = np.zeros((3, rows), dtype=np.int64)
    per_row_position = columns_f.shape[0] > 1
    for i in range(rows):
        p = i if per_row_position else 0
        day = _row(session_day, i)
        dte = columns_i[p, 1] - day
        out_i[2, i] = dte
        if math.isnan(bid[i, 0]):
            continue
        entry_credit = columns_f[p, 0]
        contracts = columns_i[p, 0]
        debit = close_debit_row(bid[i], ask[i], fraction)
        out_f[0, i] = debit
        out_f[1, i] = (debit - entry_credit) * 100 * contracts
        dollars_per_share = float(100 * contracts)
        out_f[2, i] = (((mid[i, 0] - mid[i, 1]) - mid[i, 2]) + mid[i, 3]) * dollars_per_share
        out_f[3, i] = (((bid[i, 0] - ask[i, 1]) - ask[i, 2]) + bid[i, 3]) * dollars_per_share
        out_i[0, i] = exit_code_scalar(debit, entry_credit, dte, day - columns_i[p, 2], profit_take_pct,
                                       loss_close_multiple, dte_exit, max_hold_days)
        if dte <= early_assignment_days:
            price = _row(spot, i)
            put_intrinsic = max(columns_f[p, 1] - price, 0.0)
            call_intrinsic = max(price - columns_f[p, 2], 0.0)
            if put_intrinsic > 0.0 and mid[i, 1] - put_intrinsic < early_assignment_extrinsic:
                out_i[1, i] = 1
                out_f[4, i] = mid[i, 1]
            elif call_intrinsic > 0.0 and mid[i, 2] - call_intrinsic < early_assignment_extrinsic:
                out_i[1, i] = 2
                out_f[4, i] = mid[i, 2]
    return out_f, out_i
