"""TradingEngine: per bar, a MarketSnapshot in, decisions out (open, close with reason, hedge).

The engine holds the strategy's rules and reads the portfolio; it never fills orders, reads files
or talks to Backtrader or a broker. It owns entry eligibility (the entry window, the daily entry
limit, each bar's Stage-2 gate code), exits, the rejection counts, and asks ``risk.RiskManager``
to approve and size every open, to block entries (max positions, kill switch) and to hedge.

Drivers use three things:
- ``on_bar(snapshot)``: the decisions at one bar (every driver, every stepped bar);
- ``next_event_bar(bar, paths, pending)`` and ``skip(bar, following, paths)``: for a driver that
  steps only the bars where something can happen (the fast driver), the next such bar — an
  entry can be tried, an exit rule or an expiry fires, a fill is due, the kill switch or the
  hedge would act — and the bookkeeping of the bars it skips (excursions, early-assignment
  flags, bulk-counted gate rejections), all from the same rules and arithmetic ``on_bar`` uses;
- ``PositionPaths``: each open condor's exit rules, marks and Greeks evaluated over its holding
  period at once (the compiled ``evaluate_condor_rows``, which ``on_bar`` runs on one bar).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import NamedTuple

import numpy as np
import pandas as pd
from numba import njit

from core.dto import (
    CONTRACT_MULTIPLIER,
    EPOCH_ORDINAL,
    Action,
    ExitReason,
    IronCondor,
    MarketSnapshot,
    Position,
    RiskEvent,
    TradeDecision,
)
from core.execution import FillModel, close_debit_row, open_credit_row
from core.portfolio import Portfolio, condor_marks
from intelligence.features import MEMBERSHIP_COLUMNS
from intelligence.regime_filter import regime_name
from risk.risk_manager import Book, DrawdownTrigger, Proposal, RiskManager
from strategies.condor_adjustments import (
    breach_probability,
    liquidity_problem,
    nearest_expiry_skew,
    plan_wings,
)
from strategies.entry_gates import GATE_REASONS, bar_gate_codes
from strategies.options_strategy import (
    REASON_OF_CODE,
    CondorChoice,
    ExitRules,
    Rejection,
    choose_iron_condor,
    credit_is_sufficient,
    exit_code_scalar,
)

# Feature columns copied into a trade's entry context (and trades.csv) besides the memberships.
CONTEXT_FEATURES = ("mtf_consensus", "iv_index", "iv_rank", "realized_vol", "rsi", "adx", "stoch_k",
                    "bb_position", "bb_width", "psar_position", "sma_distance", "volume_ratio",
                    "divergence_z", "gap_pct")

DAY_NS = 86_400 * 1_000_000_000
# The bar table's topological columns (intelligence.tda.TDA_COLUMNS, named here so the engine does
# not load gudhi; tests/test_tda_wiring.py holds the two lists equal).
TDA_COLUMNS = ("tda_h0_total", "tda_h1_total", "tda_h1_max", "tda_h0_entropy", "tda_h1_entropy",
               "tda_betti1_peak", "tda_betti1_mid")
# The regular session, 09:30–16:00 New York: 390 minutes, 78 five-minute bars.
SESSION_CLOSE_MINUTE = 16 * 60
SESSION_MINUTES = 390


def clock_minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def sessions_to_expiry(session_day: int, expiration, minute_of_day: int, busdays=None) -> float:
    """Trading sessions from a bar to the close of ``expiration``: ``np.busday_count`` from the
    bar's session (days since 1970-01-01) to the expiry day (today counted, the expiry day not:
    the count stands for the sessions after today, the expiry's included) plus the share of
    today's session still to run, (16:00 − the bar's close) / 390 minutes = bars left today / 78.
    ``busdays``: the ``np.busdaycalendar`` to count with: the path forecast's ``busdays`` (the
    exchange's sessions, ``core.market_data.nyse_busdays``; the engine reads no data source
    itself); None counts every weekday.
    Monday 10:00 to that Friday's close: 4 + 360/390."""
    start = np.datetime64(int(session_day), "D")
    end = np.datetime64(expiration, "D")
    whole = int(np.busday_count(start, end, busdaycal=np.busdaycalendar() if busdays is None else busdays))
    left = min(max(SESSION_CLOSE_MINUTE - int(minute_of_day), 0), SESSION_MINUTES) / SESSION_MINUTES
    return whole + left


_CLOCKS: dict = {}


class BarClock(NamedTuple):
    """Per bar of a run: its session as days since 1970-01-01 and its close as minutes after
    midnight, exchange time."""

    session_day: np.ndarray
    minute_of_day: np.ndarray

    @classmethod
    def from_times(cls, bar_times: pd.DatetimeIndex) -> BarClock:
        # Kept per process by the bars' instants (~9 ms to build for five years, ~0.3 ms to hash):
        # an optimizer builds a session per trial over the same bars. Read-only, as shared.
        utc_ns = np.ascontiguousarray(bar_times.as_unit("ns").asi8)
        key = hashlib.blake2b(utc_ns.tobytes(), digest_size=16).digest()
        clock = _CLOCKS.pop(key, None)
        if clock is None:
            local = bar_times.tz_convert("America/New_York")
            session_day = (local.tz_localize(None).normalize().as_unit("ns").asi8 // DAY_NS).astype(np.int64)
            minute = (local.hour * 60 + local.minute).to_numpy().astype(np.int64)
            session_day.flags.writeable = False
            minute.flags.writeable = False
            clock = cls(session_day, minute)
        _CLOCKS[key] = clock
        while len(_CLOCKS) > 8:
            _CLOCKS.pop(next(iter(_CLOCKS)))
        return clock

    def __len__(self) -> int:
        return len(self.session_day)


class CandidateMemo:
    """Entry candidates (``TradingEngine._entry_candidate``: the condor a configuration would open
    at a bar before sizing, or why none) kept by bar time for runs that share everything a
    candidate depends on: the market, the feature table's regime / skew / divergence / realised
    volatility columns and the strategy, filter, regime and fill settings. The optimizer keeps one
    per such set (``core.optimizer.candidate_memo``), so its trials choose each bar's condor once;
    a run without one computes every candidate itself, with the same result."""

    __slots__ = ("by_time", "anchors")

    def __init__(self, anchors: tuple = ()):
        self.by_time: dict[int, object] = {}
        self.anchors = anchors              # objects the key's ids refer to, kept alive with it

    def view(self, bar_ns: np.ndarray) -> RunCandidates:
        return RunCandidates(self.by_time, bar_ns)


class RunCandidates:
    """A ``CandidateMemo`` addressed by one run's bar positions."""

    __slots__ = ("_store", "_bar_ns")

    def __init__(self, store: dict, bar_ns: np.ndarray):
        self._store = store
        self._bar_ns = bar_ns

    def get(self, bar: int):
        return self._store.get(int(self._bar_ns[bar]))

    def put(self, bar: int, candidate) -> None:
        self._store[int(self._bar_ns[bar])] = candidate


class TradingEngine:
    """The iron-condor decision logic shared by every driver."""

    def __init__(self, config, portfolio: Portfolio, fill_model: FillModel, clock: BarClock,
                 features=None, risk: RiskManager | None = None, candidates: RunCandidates | None = None,
                 timestamps=None, paths=None):
        self.config = config
        self.candidates = candidates
        # filters.pop_source = diffusion: the run's path forecast by bar (``available(bar)``,
        # ``probabilities(bar, spot, short put, short call, sessions)``: a
        # ``intelligence.mamba_diffusion.PathForecast`` from ``core.market_data.path_forecast_per_bar``).
        self.path_forecast = paths if config.filters.pop_source == "diffusion" else None
        if config.filters.pop_source == "diffusion" and paths is None:
            from core.config import ConfigError

            raise ConfigError("filters.pop_source = diffusion: this run has no path forecast to read the breach "
                              "probability from (core.market_data.path_forecast_per_bar builds it for a backtest)")
        # Bar times as Timestamps by bar index (a run with ``candidates`` logs the sizing
        # refusals of bars it does not step with them).
        self._timestamps = timestamps
        self._flat_refusals: dict[int, tuple] = {}
        self.portfolio = portfolio
        self.fill_model = fill_model
        self.risk = risk if risk is not None else RiskManager(config)
        self.exit_rules = ExitRules.from_settings(config.exits, fill_model.fraction)
        self._window = (clock_minutes(config.strategy.entry_window_start),
                        clock_minutes(config.strategy.entry_window_end))
        self.extend(clock, features)
        self._entries_by_session: dict[int, int] = {}
        self._closing: set[int] = set()          # positions with a close decided, not yet filled
        self._entry_days: dict[int, int] = {}
        self._columns_key: tuple = ()
        self._columns = None
        self._bar_spot = np.zeros(1)                   # one-bar inputs, reused every bar
        self._bar_day = np.zeros(1, dtype=np.int64)
        self.rejections: dict[str, int] = {}     # why entries were not made, for the report
        self.risk_events: list[RiskEvent] = []
        self._last_rejection_session = -1
        self.last_rows: ConditionRows | None = None

    def extend(self, clock: BarClock, features=None) -> None:
        """Take the run's bars (``clock``) and feature table (``features``, at least as many
        bars): at construction, and in a live run each time bars are added (the state — open
        positions, entries per session, rejections, events — is kept). Earlier bars must be the
        same bars as before."""
        n = len(clock)
        self.clock = clock
        self.feature_columns = dict(features.columns) if features is not None else {}
        # regime.tda_features: the topological columns go into each trade's context as they are
        self._tda_columns = tuple(name for name in TDA_COLUMNS if name in self.feature_columns)
        if features is not None and len(features) < n:
            raise ValueError(f"the feature table has {len(features)} bars, the run {n}")
        # This configuration's Stage-2 gate code per bar (0 = every enabled gate passes).
        self.gate_codes = (bar_gate_codes(features.columns, self.config)[:n] if features is not None
                           else np.zeros(n, dtype=np.int8))
        window = self._window
        in_window = (clock.minute_of_day >= window[0]) & (clock.minute_of_day <= window[1])
        self._open_window_bars = np.flatnonzero(in_window & (self.gate_codes == 0))
        self._open_window_days = clock.session_day[self._open_window_bars]
        self._gated_window_bars = np.flatnonzero(in_window & (self.gate_codes != 0))

    # ----------------------------------------------------------------------------- per bar
    def on_bar(self, snapshot: MarketSnapshot) -> list[TradeDecision]:
        """The decisions at this bar, all on the account as it stands before this bar's fills:
        the kill switch (on equity at mid), the exits of every open position, at most one entry,
        then the hedge of what stays open. The rows evaluated here (one per open position, in id
        order) stay on ``last_rows`` for the driver's account record."""
        portfolio = self.portfolio
        positions = list(portfolio.open_positions.values())
        closing = self._closing
        if closing:
            closing.intersection_update(portfolio.open_positions)     # filled closes drop out
        rows = None
        if positions:
            quotes = snapshot.quote_many(positions)
            self._bar_spot[0] = snapshot.spot
            self._bar_day[0] = snapshot.session_day
            rows = self.evaluate(positions, quotes, self._bar_spot, self._bar_day)
        self.last_rows = rows
        risk = self.risk
        equity = None
        trigger = None
        if risk.daily_limit is not None or risk.total_limit is not None:
            equity = self._equity_at_mid(positions, rows, snapshot)
            trigger = risk.check_drawdown(snapshot.session_day, equity)
        decisions = self.exit_decisions(snapshot, positions, rows) if positions else []
        if trigger is not None:
            decisions.extend(self._on_drawdown(trigger, snapshot, positions))
        staying = [i for i, position in enumerate(positions) if position.position_id not in closing]
        entry = None
        book = None
        may_enter = self.entry_allowed(snapshot, len(staying)) is None
        if may_enter or risk.hedging:
            if equity is None:
                equity = self._equity_at_mid(positions, rows, snapshot)
            book = self._book(equity, positions, rows, staying)
        if may_enter:
            entry = self._entry_decision(snapshot, book)
            if entry is not None:
                decisions.append(entry)
        if risk.hedging:
            hedge = self._hedge_decision(snapshot, book, entry)
            if hedge is not None:
                decisions.append(hedge)
        return decisions

    def _equity_at_mid(self, positions, rows, snapshot: MarketSnapshot) -> float:
        """cash + each open position's value at mid (its intrinsic value once settled) + hedge
        shares at spot: ``core.portfolio.account_marks``' order, which the fast driver's path
        marks repeat."""
        equity = self.portfolio.cash
        for i, position in enumerate(positions):
            if snapshot.timestamp >= position.condor.settlement:
                equity += -position.condor.intrinsic_value(snapshot.spot) * CONTRACT_MULTIPLIER * position.condor.quantity
            else:
                equity += float(rows.mid_value[i])
        shares = self.portfolio.hedge_shares
        if shares:
            equity += shares * snapshot.spot
        return equity

    def _book(self, equity: float, positions, rows, staying: list[int]) -> Book:
        committed = 0.0
        contracts = 0
        delta = gamma = vega = theta = 0.0
        for i in staying:
            position = positions[i]
            committed += position.max_loss
            contracts += position.condor.quantity
            delta += float(rows.delta[i])
            gamma += float(rows.gamma[i])
            vega += float(rows.vega[i])
            theta += float(rows.theta[i])
        shares = self.portfolio.hedge_shares
        if shares:
            delta += shares
        return Book(equity, self.portfolio.cash, committed, len(staying), contracts, delta, gamma, vega, theta,
                    shares)

    def _on_drawdown(self, trigger: DrawdownTrigger, snapshot: MarketSnapshot, positions) -> list[TradeDecision]:
        """Log the halt; with flatten, close every position not already closing."""
        kind = "kill_switch_halt" if trigger.kind == "kill_switch" else "max_drawdown_halt"
        reference = "the previous session close" if trigger.kind == "kill_switch" else "the peak"
        scope = "the rest of the session" if trigger.kind == "kill_switch" else "the rest of the run"
        self.risk_events.append(RiskEvent(
            snapshot.timestamp, kind, trigger.kind,
            f"equity {trigger.equity:,.2f} is {trigger.drawdown:.2%} below {reference} ({trigger.reference:,.2f}), "
            f"beyond the {trigger.limit:.2%} limit: no new entries for {scope}",
            trigger.equity, trigger.reference))
        if not trigger.flatten:
            return []
        reason = ExitReason.KILL_SWITCH.value if trigger.kind == "kill_switch" else ExitReason.MAX_DRAWDOWN.value
        decisions = []
        for position in positions:
            if position.position_id in self._closing or snapshot.timestamp >= position.condor.settlement:
                continue
            decisions.append(TradeDecision(Action.CLOSE, snapshot.timestamp, reason, position_id=position.position_id))
            self._closing.add(position.position_id)
        if decisions or self.portfolio.hedge_shares:
            self.risk_events.append(RiskEvent(
                snapshot.timestamp, "flatten", reason,
                f"closing {len(decisions)} condor(s)"
                + (f" and {self.portfolio.hedge_shares:+d} hedge shares" if self.portfolio.hedge_shares else ""),
                trigger.equity, trigger.reference))
        return decisions

    def _hedge_decision(self, snapshot: MarketSnapshot, book: Book, entry: TradeDecision | None) -> TradeDecision | None:
        """Shares to trade after this bar's decisions: the net delta of the condors that stay
        open (the book's, hedge shares included) and of the one being opened, against the
        threshold."""
        delta = book.delta
        contracts = book.open_contracts
        if entry is not None:
            delta += entry.condor.quantity * float(entry.context["condor_delta"])
            contracts += entry.condor.quantity
        shares = self.risk.hedge_shares(delta, contracts, book.hedge_shares)
        if not shares:
            return None
        reason = "hedge" if contracts else "hedge_unwind"
        return TradeDecision(Action.HEDGE, snapshot.timestamp, reason, shares=shares, expected_price=snapshot.spot,
                             context={"delta_before": delta, "open_contracts": contracts})

    # ----------------------------------------------------------------------------- exits
    def evaluate(self, positions: list[Position], quotes, spot: np.ndarray, session_day: np.ndarray) -> ConditionRows:
        """The exit rules, excursions, early-assignment checks, marks and Greeks of open condors
        on rows of quotes (``quotes`` has bid, ask, mid, delta, gamma, vega, theta arrays (rows,
        4)): one row per position at one bar (per-bar drivers) or one row per bar of one position
        (the fast driver's holding-period paths). Same compiled arithmetic either way."""
        columns = self._position_columns(positions)
        out_f, out_i = evaluate_condor_rows(quotes.bid, quotes.ask, quotes.mid, quotes.delta, quotes.gamma,
                                            quotes.vega, quotes.theta, spot, session_day, columns,
                                            self.exit_rules)
        return ConditionRows(*out_f[:4], out_i[0], out_i[1], out_f[4], out_i[2], *out_f[5:])

    def _position_columns(self, positions: list[Position]) -> PositionColumns:
        """Per-position constants as arrays, rebuilt only when the set of positions changes (the
        per-bar drivers ask for the same open set on most bars)."""
        key = tuple(p.position_id for p in positions)
        if self._columns_key != key:
            self._columns_key = key
            self._columns = PositionColumns(
                np.array([p.entry_credit for p in positions]),
                np.array([p.condor.short_put_strike for p in positions]),
                np.array([p.condor.short_call_strike for p in positions]),
                np.array([p.condor.quantity for p in positions], dtype=np.int64),
                np.array([p.condor.expiration_day for p in positions], dtype=np.int64),
                np.array([self.entry_day(p) for p in positions], dtype=np.int64))
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
                self.book_row(position, rows, i, snapshot.spot)
            code = codes[i]
            if code:
                decisions.append(TradeDecision(Action.CLOSE, snapshot.timestamp, REASON_OF_CODE[code],
                                               position_id=position.position_id, expected_price=debits[i]))
        for decision in decisions:
            self._closing.add(decision.position_id)
        return decisions

    def book_row(self, position: Position, rows: ConditionRows, i: int, spot: float) -> None:
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

    def is_closing(self, position_id: int) -> bool:
        """A close was decided for this position and has not been filled yet."""
        return position_id in self._closing and position_id in self.portfolio.open_positions

    # ----------------------------------------------------------------------------- entries
    def entries_on(self, session_day: int) -> int:
        """Entries decided in the session (days since 1970-01-01)."""
        return self._entries_by_session.get(session_day, 0)

    def entry_allowed(self, snapshot: MarketSnapshot, open_count: int) -> str | None:
        """None when an entry may be tried at this bar, else the reason it may not: outside the
        entry window, the session's entries used up, or a block of the risk manager (max
        positions, a halt)."""
        stamp = snapshot.timestamp
        minute = stamp.hour * 60 + stamp.minute
        if not (self._window[0] <= minute <= self._window[1]):
            return "outside_entry_window"
        limit = self.config.strategy.max_entries_per_day
        if limit and self.entries_on(snapshot.session_day) >= limit:
            return "daily_entry_limit"
        return self.risk.entry_block(snapshot.session_day, open_count)

    def entry_decision(self, snapshot: MarketSnapshot, book: Book) -> TradeDecision | None:
        """Open decision at this bar for the account ``book``, or None (the reason counted in
        ``rejections`` once the entry window, daily limit and risk blocks allow a try)."""
        if self.entry_allowed(snapshot, book.open_condors) is not None:
            return None
        return self._entry_decision(snapshot, book)

    def _entry_decision(self, snapshot: MarketSnapshot, book: Book) -> TradeDecision | None:
        """``entry_decision`` once ``entry_allowed`` has passed.

        Order: the bar's entry gates (this configuration's code for the bar,
        ``strategies.entry_gates``), the condor with Stage-2 wings, the chain-level checks (VRP,
        breach probability, liquidity), the credit test, then the risk manager's approval and
        size."""
        gate = int(self.gate_codes[snapshot.bar_index])
        if gate:
            return self._reject(GATE_REASONS[gate])
        features = snapshot.features
        config = self.config
        memo = self.candidates
        candidate = memo.get(snapshot.bar_index) if memo is not None else None
        if candidate is None:
            candidate = self._entry_candidate(snapshot, features)
            if memo is not None:
                memo.put(snapshot.bar_index, candidate)
        if isinstance(candidate, str):
            return self._reject(candidate)
        choice, credit, context = candidate
        if not credit_is_sufficient(credit, choice.width, config):
            return self._reject("credit_below_minimum")
        context = dict(context)
        regime = context.pop("_regime")
        proposal = self._proposal(snapshot.bar_index, choice, credit)
        sizing = self.risk.size(proposal, book)
        if sizing.quantity < 1:
            return self._refuse(snapshot.timestamp, snapshot.session_day, sizing, proposal, book.equity)
        if features:
            context.update(self._feature_context(features, regime))
            for name in self._tda_columns:
                context[name] = features[name]
        context.update(sizing=sizing.explain(), sizing_limit=sizing.reason, condor_delta=proposal.delta,
                       condor_gamma=proposal.gamma, condor_vega=proposal.vega, condor_theta=proposal.theta)
        self._entries_by_session[snapshot.session_day] = self.entries_on(snapshot.session_day) + 1
        condor = self._condor(choice, sizing.quantity, snapshot)
        return TradeDecision(Action.OPEN, snapshot.timestamp, "entry", condor=condor, expected_price=credit,
                             context=context)

    def _entry_candidate(self, snapshot: MarketSnapshot, features):
        """What this configuration would open at the bar before the credit test and sizing:
        (condor, credit, context) or the reason there is none. It depends only on the bar's chain
        and features and on the strategy (but its minimum credit), filter, regime and fill
        settings, so runs that share those (an optimizer's trials) can share it
        (``CandidateMemo``). With ``filters.pop_source`` diffusion it also reads the run's path
        forecast, which is fixed by the market, the checkpoint, ``filters.diffusion_paths`` and
        the seed (paths per bar are seeded by the bar, whichever bars were asked before)."""
        config = self.config
        strategy, filters = config.strategy, config.filters
        chain = snapshot.nearest_chain(strategy.dte_min, strategy.dte_max)
        stage2 = filters.use_entry_gates and bool(features)
        context: dict = {}
        wings = None
        reading = None
        regime = regime_name(features["regime"]) if features else ""
        context["_regime"] = regime
        if stage2:
            _, reading = nearest_expiry_skew(chain)
            skew = reading.skew if reading is not None else math.nan
            reference = features["skew_reference"] if "skew_reference" in self.feature_columns else math.nan
            wings = plan_wings(config, regime, skew, int(features["divergence_bias"]), skew_reference=reference)
            context.update(skew=skew, iv_atm=reading.iv_atm if reading is not None else math.nan,
                           wing_adjustments="; ".join(wings.adjustments))
        choice = choose_iron_condor(chain, config, wings)
        if isinstance(choice, Rejection):
            return choice.reason
        if stage2:
            if filters.use_vrp_gate:
                vrp = context["iv_atm"] - features["realized_vol"]
                context["vrp"] = vrp
                if not vrp > filters.vrp_threshold:
                    return "vrp_below_threshold"
            if self.path_forecast is not None:
                probability = self._path_probability(snapshot, choice, context)
                if isinstance(probability, str):
                    return probability
            else:
                probability = breach_probability(choice)
            context["breach_probability"] = probability
            if filters.use_probability_filter and probability > filters.max_breach_probability:
                return "breach_probability_above_max"
            if filters.use_liquidity_gate:
                problem = liquidity_problem(choice, filters.liquidity_max_spread_to_credit)
                if problem is not None:
                    return problem
        # The credit test (``strategy.min_credit_to_width``) is left to ``_entry_decision``: a memo
        # then serves trials that differ only in the minimum credit.
        return choice, open_credit_row(choice.bid, choice.ask, self.fill_model.fraction), context

    def _path_probability(self, snapshot: MarketSnapshot, choice: CondorChoice, context: dict):
        """The diffusion POP's breach probability of ``choice`` at the bar: max(touch put, touch
        call) over the sampled paths to expiry (the touches and the paths' POP go into
        ``context``), or the reason there is none: no forecast at the bar yet
        ("no_path_forecast"), or an expiry past the paths ("expiry_beyond_path_horizon")."""
        from intelligence.mamba_diffusion import PathInputError

        bar = snapshot.bar_index
        put, call = float(choice.strikes[1]), float(choice.strikes[2])
        spot = float(snapshot.spot)
        if not put < spot < call:
            # A short strike at or beyond spot is touched already: nothing to sample.
            touch_put, touch_call = float(put >= spot), float(call <= spot)
            context.update(touch_put=touch_put, touch_call=touch_call, pop_paths=0.0)
            return max(touch_put, touch_call)
        sessions = sessions_to_expiry(snapshot.session_day, choice.expiration, int(self.clock.minute_of_day[bar]),
                                      getattr(self.path_forecast, "busdays", None))
        try:
            probs = self.path_forecast.probabilities(bar, spot, put, call, sessions)
        except PathInputError:
            return "expiry_beyond_path_horizon"
        if probs is None:
            return "no_path_forecast"
        touch_put, touch_call = float(probs["touch_put"]), float(probs["touch_call"])
        context.update(touch_put=touch_put, touch_call=touch_call, pop_paths=float(probs["pop"]))
        return max(touch_put, touch_call)

    @staticmethod
    def _feature_context(features, regime: str) -> dict:
        """What a trader needs to see why a trade was taken and sized: regime, C, F_t, each
        membership and the main features at the decision bar."""
        context = {"regime": regime,
                   "confidence": features["confidence"], "fuzzy_ft": features["fuzzy_ft"],
                   "mu_neural": features["mu_neural"]}
        for column in MEMBERSHIP_COLUMNS.values():
            context[column] = features[column]
        for name in CONTEXT_FEATURES:
            context[name] = features[name]
        return context

    def _condor(self, choice: CondorChoice, quantity: int, snapshot: MarketSnapshot) -> IronCondor:
        expiration = pd.Timestamp(choice.expiration).date()
        strikes = choice.strikes
        return IronCondor(expiration, snapshot.settlement_of(expiration), float(strikes[0]),
                          float(strikes[1]), float(strikes[2]), float(strikes[3]), quantity)

    def _proposal(self, bar: int, choice: CondorChoice, credit: float) -> Proposal:
        columns = self.feature_columns
        confidence = float(columns["confidence"][bar]) if columns and self.config.fuzzy.use_fuzzy else math.nan
        return _proposal(choice, credit, confidence)

    def _refuse(self, timestamp: pd.Timestamp, session_day: int, sizing, proposal: Proposal, equity: float) -> None:
        """An entry the risk manager sized to zero: counted and logged."""
        self._log_rejection(timestamp, session_day, sizing.reason,
                            f"sized to 0 contracts: {sizing.explain()} (max loss {proposal.max_loss:,.2f} per "
                            f"condor)", equity)
        return self._reject(sizing.reason)

    def _log_rejection(self, timestamp: pd.Timestamp, session_day: int, reason: str, detail: str,
                       equity: float) -> None:
        """A risk rejection into the event log; a repeat of the previous attempt's rejection in
        the same session extends that event (count, last time) instead of adding a row."""
        events = self.risk_events
        if events:
            last = events[-1]
            if (last.kind == "risk_rejection" and last.reason == reason
                    and self._last_rejection_session == session_day):
                events[-1] = dataclasses.replace(last, count=last.count + 1, last_timestamp=timestamp,
                                                 detail=detail, equity=equity)
                return
        events.append(RiskEvent(timestamp, "risk_rejection", reason, detail, equity, last_timestamp=timestamp))
        self._last_rejection_session = session_day

    def _reject(self, reason: str, count: int = 1) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + count

    # ----------------------------------------------------------------------------- event skipping
    def next_event_bar(self, bar: int, paths: PositionPaths, pending: bool) -> int:
        """The next bar after ``bar`` where ``on_bar`` could do anything, for a driver that has
        just stepped ``bar``: a fill is due (``pending``), an exit rule or an expiry fires, an
        entry may be tried, the kill switch or the hedge would act, or the data ends."""
        n = len(self.clock)
        if pending:
            return bar + 1
        candidates = [n - 1] if bar < n - 1 else [n]
        staying = [p for p in self.portfolio.open_positions.values() if not self.is_closing(p.position_id)]
        for position in staying:
            candidates.append(paths.first_exit(position.position_id, bar + 1))
        entry = self._next_entry_bar(bar, len(staying))
        if entry is not None:
            candidates.append(entry)
        horizon = min(candidates)
        if horizon > bar + 1:
            hit = self._first_risk_event(bar + 1, horizon, paths)
            if hit is not None:
                horizon = hit
        return horizon

    def _next_entry_bar(self, bar: int, staying: int) -> int | None:
        """The next window bar after ``bar`` whose gates pass and where an entry may be tried
        (positions below the cap, the session's entries and the risk halts allowing)."""
        if self._entries_blocked(staying):
            return None
        bars, days = self._open_window_bars, self._open_window_days
        memo = self.candidates
        flat = self._flat_equity()
        index = int(np.searchsorted(bars, bar + 1))
        while index < bars.size:
            day = int(days[index])
            if self._session_closed_to_entries(day):
                # This session is out: jump to the first window bar of a later session.
                index = int(np.searchsorted(days, day + 1))
                continue
            candidate = int(bars[index])
            if memo is not None and self._known_outcome(candidate, flat) is not None:
                # Known to open nothing (another run with the same candidate settings found its
                # condor, or none): counted and logged by ``skip``, not stepped.
                index += 1
                continue
            return candidate
        return None

    def _flat_equity(self) -> float | None:
        """The equity of an account that holds nothing (no condor, no hedge shares): its cash,
        the same at every bar until a fill; None when it holds something."""
        portfolio = self.portfolio
        if portfolio.open_positions or portfolio.hedge_shares:
            return None
        return portfolio.cash

    def _known_outcome(self, bar: int, flat_equity: float | None):
        """An entry attempt at ``bar`` that the memo shows opens nothing, without stepping the
        bar: the rejection reason (str), or, on an account that holds nothing (``flat_equity``
        its equity and cash, ``on_bar``'s book then), the sizing that refuses the memo's condor
        with its proposal; None when the bar must be stepped (the candidate is unknown, or the
        account holds positions whose marks move the book, or a condor would open)."""
        candidate = self.candidates.get(bar)
        if candidate is None or isinstance(candidate, str):
            return candidate
        choice, credit, _ = candidate
        if not credit_is_sufficient(credit, choice.width, self.config):
            return "credit_below_minimum"
        if flat_equity is None or self._timestamps is None:
            return None
        known = self._flat_refusals.get(bar)
        if known is not None and known[0] == flat_equity:
            return known[1]
        proposal = self._proposal(bar, choice, credit)
        sizing = self.risk.size(proposal, Book(flat_equity, flat_equity))
        refusal = (sizing, proposal) if sizing.quantity < 1 else None
        self._flat_refusals[bar] = (flat_equity, refusal)
        return refusal

    def _entries_blocked(self, staying: int) -> bool:
        """No entry can be tried on any later bar until a fill: the positions are at the cap, or
        the total drawdown limit has halted entries for good (``entry_allowed``'s rules that do
        not depend on the bar)."""
        return self.risk.entry_block(-1, staying) in ("max_positions", "max_drawdown_halt")

    def _session_closed_to_entries(self, session_day: int) -> bool:
        """``entry_allowed``'s per-session rules: the session's entries are used up or the kill
        switch has halted it."""
        limit = self.config.strategy.max_entries_per_day
        return bool(limit and self.entries_on(session_day) >= limit) or self.risk.session_halted(session_day)

    def _first_risk_event(self, start: int, stop: int, paths: PositionPaths) -> int | None:
        """The first bar in [start, stop) where the kill switch or the hedge would act, from the
        open positions' paths (no fills happen in between)."""
        risk = self.risk
        drawdown = risk.daily_limit is not None or risk.total_limit is not None
        if not (drawdown or (risk.hedging and (self.portfolio.open_positions or self.portfolio.hedge_shares))):
            return None
        marks = paths.account_marks(start, stop)
        hits = []
        if drawdown:
            hit = risk.first_drawdown_breach(self.clock.session_day[start:stop], marks.equity)
            if hit is not None:
                hits.append(hit)
        if risk.hedging:
            contracts = sum(p.condor.quantity for p in self.portfolio.open_positions.values())
            hit = risk.first_hedge_trigger(marks.delta, contracts, self.portfolio.hedge_shares)
            if hit is not None:
                hits.append(hit)
        return start + min(hits) if hits else None

    def skip(self, bar: int, following: int) -> None:
        """Book what ``on_bar`` would have counted on the bars strictly between ``bar`` and
        ``following`` that are not stepped: the rejections of gated window bars where an entry
        would have been tried (positions below the cap, the session's entries and the risk halts
        allowing; no fill happens on skipped bars, so all of that stays as it is after ``bar``)."""
        staying = sum(1 for p in self.portfolio.open_positions.values() if not self.is_closing(p.position_id))
        if self._entries_blocked(staying):
            return
        self._skip_known_rejections(bar, following)
        gated = self._gated_window_bars
        skipped = gated[np.searchsorted(gated, bar + 1): np.searchsorted(gated, following)]
        if skipped.size == 0:
            return
        days = self.clock.session_day[skipped]
        if days[0] == days[-1]:                          # one session (the usual case): no sort
            if self._session_closed_to_entries(int(days[0])):
                return
        else:
            starts = np.flatnonzero(np.r_[True, days[1:] != days[:-1]])
            keep = np.ones(skipped.size, dtype=bool)
            for first, last in zip(starts, np.r_[starts[1:], skipped.size]):
                if self._session_closed_to_entries(int(days[first])):
                    keep[first:last] = False
            skipped = skipped[keep]
        counts = np.bincount(self.gate_codes[skipped], minlength=len(GATE_REASONS))
        for code in np.flatnonzero(counts):
            self._reject(GATE_REASONS[int(code)], int(counts[code]))

    def _skip_known_rejections(self, bar: int, following: int) -> None:
        """The rejections of the window bars (gates passing) strictly between ``bar`` and
        ``following`` that ``_next_entry_bar`` passed over because the memo shows they open
        nothing: counted, and a sizing refusal logged, as ``on_bar`` would."""
        if self.candidates is None:
            return
        flat = self._flat_equity()
        bars, days = self._open_window_bars, self._open_window_days
        index = int(np.searchsorted(bars, bar + 1))
        stop = int(np.searchsorted(bars, following))
        while index < stop:
            day = int(days[index])
            if self._session_closed_to_entries(day):
                index = int(np.searchsorted(days, day + 1))
                continue
            skipped = int(bars[index])
            outcome = self._known_outcome(skipped, flat)
            if isinstance(outcome, str):
                self._reject(outcome)
            elif outcome is not None:
                sizing, proposal = outcome
                self._refuse(self._timestamps[skipped], day, sizing, proposal, flat)
            index += 1
        self._flat_refusals.clear()


def _proposal(choice: CondorChoice, credit: float, confidence: float) -> Proposal:
    # One condor unit's net Greeks in the caps' units: the portfolio's own mark (condor_marks)
    # at 100 dollars per share, so a proposal and the open position it becomes agree.
    mid = 0.5 * (choice.bid + choice.ask)
    _, _, delta, gamma, vega, theta = condor_marks(choice.bid, choice.ask, mid, choice.delta, choice.gamma,
                                                   choice.vega, choice.theta, float(CONTRACT_MULTIPLIER))
    return Proposal(max_loss=(choice.width - credit) * CONTRACT_MULTIPLIER, delta=delta, gamma=gamma, vega=vega,
                    theta=theta, confidence=confidence)


# ----------------------------------------------------------------------------------------------
# The compiled evaluator
# ----------------------------------------------------------------------------------------------

class ConditionRows(NamedTuple):
    """``evaluate``'s output per row: debit to close at the fill model, adverse excursion in
    dollars, mid and closing-side values in dollars, exit code, early-assignment flag (0 none,
    1 short put, 2 short call), the flagged short leg's mid, the row's DTE, and the condor's net
    delta, gamma, vega, theta (``core.portfolio.condor_marks`` units). (A NamedTuple: built once
    per bar per driver, it must be cheap to make.)"""

    debit: np.ndarray
    loss: np.ndarray
    mid_value: np.ndarray
    closing_value: np.ndarray
    code: np.ndarray
    early_assignment: np.ndarray
    short_mid: np.ndarray
    dte: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray


class PositionColumns(NamedTuple):
    """Per-position constants the evaluator reads, one entry per position (or one for all rows)."""

    entry_credit: np.ndarray
    short_put_strike: np.ndarray
    short_call_strike: np.ndarray
    quantity: np.ndarray
    expiration_day: np.ndarray
    entry_day: np.ndarray


# Rows of the evaluator's float and int outputs.
_DEBIT, _LOSS, _MID_VALUE, _CLOSING_VALUE, _SHORT_MID, _DELTA, _GAMMA, _VEGA, _THETA = range(9)
_CODE, _EARLY_ASSIGNMENT, _DTE = range(3)


@njit(cache=False, inline="always")
def _row(values, i):
    # Per-row input, or one value broadcast to every row.
    return values[i] if values.shape[0] > 1 else values[0]


@njit(cache=False)
def evaluate_condor_rows(bid, ask, mid, delta, gamma, vega, theta, spot, session_day, columns, rules):
    """Per row (a condor at a bar; legs long put, short put, short call, long call): the debit to
    close at the fill model (as ``core.execution.close_debit``), the exit code (as
    ``exit_code_scalar``), the adverse excursion, the marks and Greeks (``core.portfolio.
    condor_marks``) and the early-assignment check. ``spot``, ``session_day`` and the position
    ``columns`` are per row or one row for all; ``rules`` an ``ExitRules``. Rows without quotes
    (NaN: settled) give NaN numbers and code 0. Not cached on disk: it compiles in functions
    from other modules."""
    rows = bid.shape[0]
    out_f = np.full((9, rows), np.nan)
    out_i = np.zeros((3, rows), dtype=np.int64)
    per_row_position = columns.entry_credit.shape[0] > 1
    for i in range(rows):
        p = i if per_row_position else 0
        day = _row(session_day, i)
        dte = columns.expiration_day[p] - day
        out_i[_DTE, i] = dte
        if math.isnan(bid[i, 0]):
            continue
        entry_credit = columns.entry_credit[p]
        contracts = columns.quantity[p]
        debit = close_debit_row(bid[i], ask[i], rules.fill_fraction)
        out_f[_DEBIT, i] = debit
        out_f[_LOSS, i] = (debit - entry_credit) * 100 * contracts
        marks = condor_marks(bid[i], ask[i], mid[i], delta[i], gamma[i], vega[i], theta[i], float(100 * contracts))
        out_f[_MID_VALUE, i] = marks[0]
        out_f[_CLOSING_VALUE, i] = marks[1]
        out_f[_DELTA, i] = marks[2]
        out_f[_GAMMA, i] = marks[3]
        out_f[_VEGA, i] = marks[4]
        out_f[_THETA, i] = marks[5]
        out_i[_CODE, i] = exit_code_scalar(debit, entry_credit, dte, day - columns.entry_day[p], rules.profit_take_pct,
                                           rules.loss_close_multiple, rules.dte_exit, rules.max_hold_days)
        if dte <= rules.early_assignment_days:
            price = _row(spot, i)
            put_intrinsic = max(columns.short_put_strike[p] - price, 0.0)
            call_intrinsic = max(price - columns.short_call_strike[p], 0.0)
            if put_intrinsic > 0.0 and mid[i, 1] - put_intrinsic < rules.early_assignment_extrinsic:
                out_i[_EARLY_ASSIGNMENT, i] = 1
                out_f[_SHORT_MID, i] = mid[i, 1]
            elif call_intrinsic > 0.0 and mid[i, 2] - call_intrinsic < rules.early_assignment_extrinsic:
                out_i[_EARLY_ASSIGNMENT, i] = 2
                out_f[_SHORT_MID, i] = mid[i, 2]
    return out_f, out_i


# ----------------------------------------------------------------------------------------------
# Holding-period paths (the fast driver)
# ----------------------------------------------------------------------------------------------

# Bars of a holding period evaluated at once; most condors exit within two weeks, so the path is
# extended chunk by chunk (doubling) instead of being evaluated all the way to expiry up front.
PATH_CHUNK_BARS = 512


class PositionPath:
    """One open condor evaluated on the bars from its fill bar towards the bar before settlement
    (or the end of the data): the rows ``on_bar`` would compute bar by bar, computed lazily in
    chunks."""

    def __init__(self, engine: TradingEngine, market, position: Position, first_bar: int, bar_ns: np.ndarray,
                 spot: np.ndarray):
        condor = position.condor
        self.engine = engine
        self.market = market
        self.position = position
        self.first_bar = first_bar
        self.spot = spot
        n_bars = len(spot)
        self.settle_bar = int(np.searchsorted(bar_ns, condor.settlement.as_unit("ns").value, side="left"))
        self.stop_bar = min(self.settle_bar, n_bars)    # exclusive end of quotable bars
        self.n_bars = n_bars
        self.computed_to = first_bar
        self.chunk = PATH_CHUNK_BARS
        self.rows: ConditionRows | None = None

    def ensure(self, upto: int) -> None:
        """Evaluate the bars before ``upto`` (capped at the last quotable bar)."""
        upto = min(upto, self.stop_bar)
        while self.computed_to < upto:
            self.extend(max(upto, self.computed_to + self.chunk))

    def extend(self, to: int) -> None:
        start, stop = self.computed_to, min(to, self.stop_bar)
        condor = self.position.condor
        quotes = self.market.quote_contracts(start, stop, condor.expiration, condor.strikes, condor.is_call)
        rows = self.engine.evaluate([self.position], quotes, self.spot[start:stop],
                                    self.engine.clock.session_day[start:stop])
        if self.rows is not None:
            rows = ConditionRows(*(np.concatenate([old, new]) for old, new in zip(self.rows, rows)))
        self.rows = rows
        self.computed_to = stop
        self.chunk *= 2

    def first_exit(self, after: int) -> int:
        """First bar ≥ ``after`` where the engine would decide to close, else the settlement bar
        (or the end of the data)."""
        start = max(after, self.first_bar)
        while start < self.stop_bar:
            self.ensure(start + 1)
            hits = np.flatnonzero(self.rows.code[start - self.first_bar:])
            if hits.size:
                return start + int(hits[0])
            start = self.computed_to
        return min(self.settle_bar, self.n_bars)

    def window(self, start: int, stop: int) -> slice:
        self.ensure(stop)
        return slice(start - self.first_bar, stop - self.first_bar)


class PositionPaths:
    """The open positions' paths for a driver that skips bars, and the bookkeeping of the bars it
    skips: account marks (``core.portfolio.account_mark_paths``) and each position's excursions
    and early-assignment flags."""

    def __init__(self, engine: TradingEngine, market, spot: np.ndarray, bar_ns: np.ndarray):
        self.engine = engine
        self.market = market
        self.spot = spot
        self.bar_ns = bar_ns
        self.paths: dict[int, PositionPath] = {}
        self.booked_to: dict[int, int] = {}      # per position: bars before this one are booked
        self._last_marks = None

    def track(self, bar: int) -> None:
        """After stepping ``bar``: start paths for positions opened at it; everything up to it is
        booked."""
        for position in self.engine.portfolio.open_positions.values():
            if position.position_id not in self.paths:
                self.paths[position.position_id] = PositionPath(self.engine, self.market, position, bar, self.bar_ns,
                                                                self.spot)
            self.booked_to[position.position_id] = bar + 1

    def first_exit(self, position_id: int, after: int) -> int:
        return self.paths[position_id].first_exit(after)

    def account_marks(self, start: int, stop: int):
        """The account on bars [start, stop), none of them with a fill. The last range is kept:
        the driver records the bars the engine has just scanned for risk events."""
        from core.portfolio import AccountMarks, account_mark_paths

        portfolio = self.engine.portfolio
        state = (portfolio.cash, portfolio.hedge_shares, tuple(portfolio.open_positions))
        cached = self._last_marks
        if cached is not None and cached[0] == start and stop <= cached[1] and cached[2] == state:
            return AccountMarks(*(column[: stop - start] for column in cached[3]))

        def columns():
            for position_id in portfolio.open_positions:
                path = self.paths[position_id]
                window = path.window(start, stop)
                rows = path.rows
                yield (rows.mid_value[window], rows.closing_value[window], rows.delta[window], rows.gamma[window],
                       rows.vega[window], rows.theta[window])

        marks = account_mark_paths(portfolio.cash, portfolio.hedge_shares, self.spot[start:stop],
                                   self.engine.risk.share_cost, columns())
        self._last_marks = (start, stop, state, marks)
        return marks

    def book_skipped(self, upto: int) -> None:
        """The excursion and early-assignment checks ``on_bar`` made on the skipped bars
        [booked_to, upto) of every open position not being closed."""
        engine = self.engine
        for position in engine.portfolio.open_positions.values():
            if engine.is_closing(position.position_id):
                continue
            path = self.paths[position.position_id]
            start = self.booked_to[position.position_id]
            stop = min(upto, path.stop_bar)
            if stop <= start:
                continue
            window = path.window(start, stop)
            rows = path.rows
            worst = float(rows.loss[window].max())
            if worst > position.max_adverse_excursion:
                engine.portfolio.update_excursion(position.position_id, worst)
            if not position.early_assignment_risk:
                flagged = np.flatnonzero(rows.early_assignment[window])
                if flagged.size:
                    row = window.start + int(flagged[0])
                    engine.book_row(position, rows, row, float(self.spot[path.first_bar + row]))
            self.booked_to[position.position_id] = stop
