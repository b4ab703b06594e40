"""The backtest drivers: they own the clock and feed the TradingEngine one bar at a time.

``BacktestSession`` is the per-bar reference: at each bar it fills what was waiting for this bar
(next-bar fills), asks the engine for decisions, fills them against the synthetic chain's quotes
(``core.execution``), books them (``core.portfolio``) and records the account.

Two drivers run it:
- ``run_backtrader``: a Cerebro over the 5-minute spot bars (a feed built from preloaded arrays,
  since ``PandasData`` reads each bar with ``.iloc``), a ``bt.Strategy`` that steps the session on
  every bar, and Backtrader's Sharpe/DrawDown/Returns analyzers reading the session's equity
  through a broker shim.
- ``run_fast``: steps the same session only on bars where something can happen (an entry can be
  tried, an exit rule or the expiry fires, a fill is due, the last bar), found by evaluating each
  open condor's whole holding period at once with the same arithmetic; the equity of the bars in
  between is filled in from the same position paths. Trades are identical to the per-bar run.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd

from core.config import Config
from core.dto import (
    Action,
    ExitReason,
    IronCondor,
    LegQuotes,
    MarketSnapshot,
    Position,
    TradeDecision,
)
from core.engine import CONTEXT_FEATURES, ConditionRows, TradingEngine, clock_minutes
from core.execution import (
    FillModel,
    fee_schedule,
    make_fill,
    settlement_fill,
)
from core.portfolio import Portfolio
from data_factory.option_chain import SyntheticChainProvider
from intelligence.features import MEMBERSHIP_COLUMNS, FeatureRow
from strategies.entry_gates import GATE_REASONS, bar_gate_codes

DAY_NS = 86_400 * 1_000_000_000
_NO_VALUES = np.empty(0)


@dataclass
class BacktestResult:
    """What a run produced: closed positions in close order, the per-bar account, the engine's
    rejection counts and run facts."""

    positions: list[Position]
    equity: pd.DataFrame
    rejections: dict
    engine: str
    bars: int
    seconds: float
    analyzers: dict = field(default_factory=dict)


class BacktestSession:
    """One backtest's state and the per-bar step shared by both drivers."""

    def __init__(self, config: Config, provider: SyntheticChainProvider, progress=None, every_bar: bool = True,
                 features=None):
        self.config = config
        self.provider = provider
        self.fill_model = FillModel.from_config(config.backtest)
        self.fees = fee_schedule(config.backtest.fees)
        self.portfolio = Portfolio(config.backtest.cash)
        self.engine = TradingEngine(config, self.portfolio, self.fill_model)
        self.next_bar_fills = config.backtest.fill_on_next_bar
        self.symbol = config.backtest.underlying
        self.progress = progress

        times = provider.bar_times
        total = len(times)
        samples = config.backtest.samples
        self.n_bars = total if samples == 0 else min(samples, total)
        self.bar_times = times[: self.n_bars]
        self.spot = provider.spot_bars().to_numpy()[: self.n_bars]
        self.iv_index = provider.iv_index_bars().to_numpy()[: self.n_bars]
        local = self.bar_times.tz_convert("America/New_York")
        self.session_day = (local.tz_localize(None).normalize().asi8 // DAY_NS).astype(np.int64)
        self.minute_of_day = (local.hour * 60 + local.minute).to_numpy().astype(np.int64)

        self.cash = np.empty(self.n_bars)
        self.equity_mid = np.empty(self.n_bars)
        self.equity_closing = np.empty(self.n_bars)
        self.open_count = np.zeros(self.n_bars, dtype=np.int64)
        self.pending: list[TradeDecision] = []
        self.current_equity = float(config.backtest.cash)
        self._expiry_rows: dict = {}
        self._quote_structures = provider.quote_structures
        self._structures_key: tuple = ()
        self._structures: tuple = ()
        # Boxing a Timestamp out of the index (~10 µs) costs more than the rest of a quiet bar: a
        # driver that steps every bar unboxes them all at once (~0.1 s for five years).
        self._timestamps = list(self.bar_times) if every_bar else self.bar_times
        # The feature table (indicators, memberships, regime) and this config's entry-gate code per
        # bar; built here unless the caller shares one across runs (the ablation does).
        if features is None:
            from core.market_data import embedded_bar_features
            features = embedded_bar_features(config, provider)
        if len(features) < self.n_bars:
            raise ValueError(f"the feature table has {len(features)} bars, the run {self.n_bars}")
        self.feature_columns = dict(features.columns)
        self.feature_columns["gate_code"] = bar_gate_codes(features.columns, config)

    # ------------------------------------------------------------------------------- market view
    def quote(self, bar: int, condor: IronCondor) -> LegQuotes:
        path = self.provider.quote_contracts(bar, bar + 1, condor.expiration, condor.strikes, condor.is_call)
        return LegQuotes(path.bid[0], path.ask[0], path.mid[0], path.delta[0], path.gamma[0],
                         path.vega[0], path.theta[0])

    def quote_many(self, bar: int, positions: list[Position]):
        key = tuple(p.position_id for p in positions)
        if self._structures_key != key:
            # Rebuilt only when the open set changes, not on every bar.
            self._structures_key = key
            self._structures = (
                np.array([self._expiry_row(p.condor) for p in positions], dtype=np.int64),
                np.array([[p.condor.long_put_strike, p.condor.short_put_strike, p.condor.short_call_strike,
                           p.condor.long_call_strike] for p in positions]))
        return self._quote_structures(bar, *self._structures)

    def _expiry_row(self, condor: IronCondor) -> int:
        row = self._expiry_rows.get(condor.expiration)
        if row is None:
            row = self._expiry_rows[condor.expiration] = self.provider.expiry_row(condor.expiration)
        return row

    def chain(self, bar: int, dte_min: int, dte_max: int):
        return self.provider.slice_at(bar, dte_min=dte_min, dte_max=dte_max)

    def snapshot(self, bar: int) -> MarketSnapshot:
        return MarketSnapshot(
            timestamp=self._timestamps[bar], bar_index=bar, session_day=int(self.session_day[bar]),
            symbol=self.symbol,
            spot=float(self.spot[bar]), iv_index=float(self.iv_index[bar]),
            chain=partial(self.chain, bar), quote=partial(self.quote, bar),
            quote_many=partial(self.quote_many, bar), settlement_of=self.provider.settlement_time,
            features=FeatureRow(self.feature_columns, bar))

    # ------------------------------------------------------------------------------- fills
    def _fill(self, decision: TradeDecision, snapshot: MarketSnapshot) -> None:
        """Execute one decision at this bar's quotes and book it."""
        if decision.action is Action.OPEN:
            condor = decision.condor
            leg_quotes = self.quote(snapshot.bar_index, condor)
            fill = make_fill(snapshot.timestamp, 0, Action.OPEN, leg_quotes.bid, leg_quotes.ask,
                             condor.quantity, decision.reason, self.fill_model, self.fees)
            self.portfolio.open_position(condor, fill, decision.context)
            self.engine.note_opened(snapshot.timestamp.date())
            return
        position = self.portfolio.position(decision.position_id)
        condor = position.condor
        if snapshot.timestamp >= condor.settlement:
            fill, assigned = settlement_fill(snapshot.timestamp, position.position_id, condor, snapshot.spot,
                                             self.fees)
            self.portfolio.close_position(position.position_id, fill, assigned_legs=assigned)
        else:
            leg_quotes = self.quote(snapshot.bar_index, condor)
            fill = make_fill(snapshot.timestamp, position.position_id, Action.CLOSE, leg_quotes.bid,
                             leg_quotes.ask, condor.quantity, decision.reason, self.fill_model, self.fees)
            self.portfolio.close_position(position.position_id, fill)
        self.engine.note_closed(position.position_id)

    def step(self, bar: int) -> None:
        """One bar: due fills, the engine's decisions, their fills, the account record."""
        snapshot = self.snapshot(bar)
        filled = False
        if self.pending:
            due, self.pending = self.pending, []
            for decision in due:
                self._fill(decision, snapshot)
            filled = True
        decisions = self.engine.on_bar(snapshot)
        for decision in decisions:
            settles_now = (decision.action is Action.CLOSE
                           and snapshot.timestamp >= self.portfolio.position(decision.position_id).condor.settlement)
            if self.next_bar_fills and not settles_now:
                self.pending.append(decision)
            else:
                self._fill(decision, snapshot)
                filled = True
        if filled or self.engine.last_rows is None:
            self.record(bar, snapshot)
        else:
            # No fill at this bar: the open positions are the ones the engine just marked.
            self._store(bar, self.portfolio.cash, self.engine.last_rows.mid_value, self.engine.last_rows.closing_value)

    def record(self, bar: int, snapshot: MarketSnapshot) -> None:
        """The account after this bar's fills: cash, equity at mid and at the closing side."""
        positions = list(self.portfolio.open_positions.values())
        if not positions:
            self._store(bar, self.portfolio.cash, _NO_VALUES, _NO_VALUES)
            return
        bid, ask, mid = self.quote_many(bar, positions)
        rows = self.engine.evaluate(positions, bid, ask, mid, np.array([snapshot.spot]),
                                    np.array([snapshot.session_day], dtype=np.int64))
        self._store(bar, self.portfolio.cash, rows.mid_value, rows.closing_value)

    def _store(self, bar: int, cash: float, mid_values, closing_values) -> None:
        # Summed position by position in id order, as the fast driver sums its paths.
        mid_total = cash
        closing_total = cash
        for value in mid_values.tolist():
            mid_total += value
        for value in closing_values.tolist():
            closing_total += value
        self.cash[bar] = cash
        self.equity_mid[bar] = mid_total
        self.equity_closing[bar] = closing_total
        self.open_count[bar] = len(mid_values)
        self.current_equity = mid_total

    def finish(self) -> None:
        """End of data: close every open position at the last bar (settle if it is its expiry);
        decisions still waiting for a next bar are dropped (there is none)."""
        bar = self.n_bars - 1
        snapshot = self.snapshot(bar)
        self.pending = []
        for position in list(self.portfolio.open_positions.values()):
            reason = (ExitReason.EXPIRY if snapshot.timestamp >= position.condor.settlement
                      else ExitReason.END_OF_DATA)
            self._fill(TradeDecision(Action.CLOSE, snapshot.timestamp, reason.value,
                                     position_id=position.position_id), snapshot)
        self.record(bar, snapshot)

    def result(self, engine_name: str, seconds: float, analyzers: dict | None = None) -> BacktestResult:
        equity = pd.DataFrame({
            "cash": self.cash, "equity": self.equity_mid, "equity_liquidation": self.equity_closing,
            "open_positions": self.open_count,
        }, index=pd.DatetimeIndex(self.bar_times, name="timestamp"))
        return BacktestResult(list(self.portfolio.closed), equity, dict(self.engine.rejections), engine_name,
                              self.n_bars, seconds, analyzers or {})

    def tick(self, bars_done: int) -> None:
        if self.progress is not None:
            self.progress(bars_done)


# ----------------------------------------------------------------------------------------------
# Backtrader driver
# ----------------------------------------------------------------------------------------------

def run_backtrader(config: Config, provider: SyntheticChainProvider, progress=None,
                   empty_strategy: bool = False, analyzers: bool = True,
                   analyzers_on_empty: bool = False, features=None) -> BacktestResult:
    """Replay the bars through Backtrader with the engine hosted in a ``bt.Strategy``.

    ``empty_strategy`` runs the same Cerebro and feed with a strategy that does nothing (the
    benchmark's anchor; ``analyzers_on_empty`` attaches the analyzers to it too); ``analyzers``
    False leaves Backtrader's analyzers off (benchmark decomposition)."""
    import backtrader as bt

    session = BacktestSession(config, provider, progress, features=features)
    feed = _array_feed(bt, session, provider)

    class SessionBroker(bt.brokers.BackBroker):
        # Backtrader's analyzers read the account through the broker; the account is the session's.
        def getvalue(self, datas=None, mkt=False, lever=False):
            return session.current_equity

        get_value = getvalue

        def getcash(self):
            return session.portfolio.cash

        get_cash = getcash

    class CondorStrategy(bt.Strategy):
        def start(self):
            self.bar = 0

        def next(self):
            # Bars arrive in order, one call each: count them rather than ask len(self).
            bar = self.bar
            session.step(bar)
            self.bar = bar + 1
            if bar % 2000 == 0:
                session.tick(bar + 1)

    class EmptyStrategy(bt.Strategy):
        def next(self):
            pass

    cerebro = bt.Cerebro(stdstats=False, preload=True)
    cerebro.broker = SessionBroker()
    cerebro.broker.set_cash(config.backtest.cash)
    cerebro.adddata(feed)
    cerebro.addstrategy(EmptyStrategy if empty_strategy else CondorStrategy)
    if (analyzers and not empty_strategy) or analyzers_on_empty:
        cerebro.addanalyzer(bt.analyzers.SharpeRatio, _name="sharpe", timeframe=bt.TimeFrame.Days,
                            riskfreerate=0.0, annualize=True, factor=252)
        cerebro.addanalyzer(bt.analyzers.DrawDown, _name="drawdown")
        cerebro.addanalyzer(bt.analyzers.Returns, _name="returns", tann=252)
    started = time.perf_counter()
    # Backtrader allocates many small objects per bar; moving everything alive now (the bars, the
    # chain tables) out of the collector's sight keeps the periodic full collections cheap.
    gc.freeze()
    try:
        strategies = cerebro.run()
    finally:
        gc.unfreeze()
    if empty_strategy:
        return session.result("backtrader-empty", time.perf_counter() - started)
    session.finish()
    session.tick(session.n_bars)
    strategy = strategies[0]
    if not analyzers:
        return session.result("backtrader", time.perf_counter() - started)
    figures = {
        "sharpe_ratio": strategy.analyzers.sharpe.get_analysis().get("sharperatio"),
        "max_drawdown_pct": strategy.analyzers.drawdown.get_analysis().max.drawdown,
        "max_drawdown_money": strategy.analyzers.drawdown.get_analysis().max.moneydown,
        "annual_return_pct": 100.0 * strategy.analyzers.returns.get_analysis().get("rnorm", float("nan")),
        "note": "Backtrader analyzers read the equity at mid through the broker shim, before the "
                "end-of-data close; metrics.json is computed from equity.csv",
    }
    return session.result("backtrader", time.perf_counter() - started, figures)


def _array_feed(bt, session: BacktestSession, provider: SyntheticChainProvider):
    """A Backtrader feed over preloaded NumPy arrays (exchange-time datetimes, as Backtrader wants
    naive datetimes)."""
    bars = provider.ohlcv_bars()
    local_ns = session.bar_times.tz_convert("America/New_York").tz_localize(None).asi8
    # Backtrader's date2num: days since 0001-01-01 (proleptic ordinal 1) as a float.
    date_numbers = local_ns / DAY_NS + 719163.0
    close = session.spot
    if bars is not None:
        opens, highs, lows, volumes = (bars[c].to_numpy()[: session.n_bars] for c in ("open", "high", "low", "volume"))
    else:
        opens = highs = lows = close
        volumes = np.zeros_like(close)

    class ArrayFeed(bt.feed.DataBase):
        def start(self):
            super().start()
            self._row = 0

        def _load(self):
            row = self._row
            if row >= session.n_bars:
                return False
            self.lines.datetime[0] = date_numbers[row]
            self.lines.open[0] = opens[row]
            self.lines.high[0] = highs[row]
            self.lines.low[0] = lows[row]
            self.lines.close[0] = close[row]
            self.lines.volume[0] = volumes[row]
            self.lines.openinterest[0] = 0.0
            self._row = row + 1
            return True

    return ArrayFeed(name=session.symbol)


# ----------------------------------------------------------------------------------------------
# Fast driver
# ----------------------------------------------------------------------------------------------

# Bars of a holding period evaluated at once; most condors exit within two weeks, so the path is
# extended chunk by chunk (doubling) instead of being evaluated all the way to expiry up front.
PATH_CHUNK_BARS = 512


class _PositionPath:
    """One open condor evaluated on the bars from its fill bar towards the bar before settlement
    (or the end of the data): the rows the per-bar engine would compute bar by bar, computed
    lazily in chunks."""

    def __init__(self, session: BacktestSession, position: Position, first_bar: int):
        condor = position.condor
        self.session = session
        self.position = position
        self.first_bar = first_bar
        self.settle_bar = int(np.searchsorted(session.bar_times.asi8, condor.settlement.as_unit("ns").value,
                                              side="left"))
        self.stop_bar = min(self.settle_bar, session.n_bars)    # exclusive end of quotable bars
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
        session, condor = self.session, self.position.condor
        quotes = session.provider.quote_contracts(start, stop, condor.expiration, condor.strikes, condor.is_call)
        rows = session.engine.evaluate([self.position], quotes.bid, quotes.ask, quotes.mid,
                                       session.spot[start:stop], session.session_day[start:stop])
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
        return min(self.settle_bar, self.session.n_bars)


def run_fast(config: Config, provider: SyntheticChainProvider, progress=None, features=None) -> BacktestResult:
    """Same trades as the per-bar run, stepping only the bars where something can happen."""
    started = time.perf_counter()
    session = BacktestSession(config, provider, progress, every_bar=False, features=features)
    engine = session.engine
    n = session.n_bars
    window = (clock_minutes(config.strategy.entry_window_start), clock_minutes(config.strategy.entry_window_end))
    all_window_bars = np.flatnonzero((session.minute_of_day >= window[0]) & (session.minute_of_day <= window[1]))
    # Window bars whose entry gates fail can only add a rejection: they are not stepped, their
    # rejections are counted in bulk (``_count_gated``), exactly as the per-bar run counts them.
    gate_codes = session.feature_columns["gate_code"][: n]
    passing = gate_codes[all_window_bars] == 0
    window_bars = all_window_bars[passing]
    window_days = session.session_day[window_bars]
    gated_bars = all_window_bars[~passing]
    paths: dict[int, _PositionPath] = {}
    scanned_to: dict[int, int] = {}      # per position: bars before this one are already booked

    def next_exit_bar(position_id: int, after: int) -> int:
        return paths[position_id].first_exit(after)

    def book_skipped(position: Position, upto: int) -> None:
        """Excursion and early-assignment checks the per-bar engine made on the skipped bars
        [scanned_to, upto) of an open position, from its path."""
        path = paths[position.position_id]
        start = scanned_to[position.position_id]
        stop = min(upto, path.stop_bar)
        if stop <= start:
            return
        path.ensure(stop)
        offset = start - path.first_bar
        rows = path.rows
        worst = float(rows.loss[offset: stop - path.first_bar].max())
        if worst > position.max_adverse_excursion:
            session.portfolio.update_excursion(position.position_id, worst)
        if not position.early_assignment_risk:
            flagged = np.flatnonzero(rows.early_assignment[offset: stop - path.first_bar])
            if flagged.size:
                row = offset + int(flagged[0])
                engine.apply_row(position, rows, row, float(session.spot[path.first_bar + row]))
        scanned_to[position.position_id] = stop

    bar = 0
    last_recorded = -1
    while bar < n:
        _fill_skipped_equity(session, paths, last_recorded + 1, bar)
        for position in session.portfolio.open_positions.values():
            if not engine.is_closing(position.position_id):
                book_skipped(position, bar)
        session.step(bar)
        last_recorded = bar
        for position in session.portfolio.open_positions.values():
            if position.position_id not in paths:
                paths[position.position_id] = _PositionPath(session, position, bar)
            scanned_to[position.position_id] = bar + 1
        following = _next_event_bar(session, bar, window_bars, window_days, next_exit_bar)
        _count_gated(session, bar, following, gated_bars, gate_codes)
        bar = following
        session.tick(min(bar, n))
    session.finish()
    session.tick(n)
    return session.result("fast", time.perf_counter() - started)


def _next_event_bar(session: BacktestSession, bar: int, window_bars: np.ndarray, window_days: np.ndarray,
                    next_exit_bar) -> int:
    """The next bar after ``bar`` where the per-bar engine could do anything: a fill is due, an
    exit rule or an expiry fires, an entry may be tried, or the data ends."""
    n = session.n_bars
    engine = session.engine
    strategy = session.config.strategy
    if session.pending:
        return bar + 1
    candidates = [n - 1] if bar < n - 1 else [n]
    active = 0
    for position in session.portfolio.open_positions.values():
        if engine.is_closing(position.position_id):
            continue
        active += 1
        candidates.append(next_exit_bar(position.position_id, bar + 1))
    if active < strategy.max_positions:
        index = int(np.searchsorted(window_bars, bar + 1))
        while index < window_bars.size:
            candidate = int(window_bars[index])
            limit = strategy.max_entries_per_day
            if not limit or engine.entries_on(session.bar_times[candidate].date()) < limit:
                candidates.append(candidate)
                break
            # This session's entries are used up: jump to the first window bar of a later session.
            index = int(np.searchsorted(window_days, session.session_day[candidate] + 1))
    return min(candidates)


def _count_gated(session: BacktestSession, bar: int, following: int, gated_bars: np.ndarray,
                 gate_codes: np.ndarray) -> None:
    """Book the entry-gate rejections of the gated window bars strictly between ``bar`` and
    ``following``, where the per-bar engine would have tried an entry: fewer active positions
    than ``max_positions`` and the session's entries below the daily limit (no fill happens on
    skipped bars, so both stay as they are after ``bar``)."""
    if session.pending:
        return
    engine = session.engine
    strategy = session.config.strategy
    active = sum(1 for p in session.portfolio.open_positions.values() if not engine.is_closing(p.position_id))
    if active >= strategy.max_positions:
        return
    skipped = gated_bars[np.searchsorted(gated_bars, bar + 1): np.searchsorted(gated_bars, following)]
    if skipped.size == 0:
        return
    limit = strategy.max_entries_per_day
    if limit and engine.entries_on(session.bar_times[bar].date()) >= limit:
        # Later sessions have no entries yet; only this session's bars are out.
        skipped = skipped[session.session_day[skipped] != session.session_day[bar]]
    for code, count in zip(*np.unique(gate_codes[skipped], return_counts=True)):
        reason = GATE_REASONS[int(code)]
        engine.rejections[reason] = engine.rejections.get(reason, 0) + int(count)


def _fill_skipped_equity(session: BacktestSession, paths: dict, start: int, stop: int) -> None:
    """Account records of bars [start, stop) that were not stepped: cash unchanged since the last
    stepped bar, positions marked from their paths, summed in id order like ``_store``."""
    if stop <= start:
        return
    cash = session.portfolio.cash
    mid_total = np.full(stop - start, cash)
    closing_total = np.full(stop - start, cash)
    for position_id in session.portfolio.open_positions:
        path = paths[position_id]
        path.ensure(stop)
        rows = slice(start - path.first_bar, stop - path.first_bar)
        mid_total += path.rows.mid_value[rows]
        closing_total += path.rows.closing_value[rows]
    session.cash[start:stop] = cash
    session.equity_mid[start:stop] = mid_total
    session.equity_closing[start:stop] = closing_total
    session.open_count[start:stop] = len(session.portfolio.open_positions)
    session.current_equity = float(mid_total[-1])


# ----------------------------------------------------------------------------------------------
# Results as tables
# ----------------------------------------------------------------------------------------------

# Why each trade was taken and sized, as of its entry decision (trades.csv, after the fills).
ENTRY_CONTEXT_COLUMNS = ("regime", "confidence", "fuzzy_ft", *MEMBERSHIP_COLUMNS.values(), "mu_neural",
                         *CONTEXT_FEATURES, "skew", "iv_atm", "vrp", "breach_probability", "wing_adjustments")
_TEXT_CONTEXT = {"regime", "wing_adjustments"}


def trades_frame(positions: list[Position]) -> pd.DataFrame:
    """One row per closed condor, in close order (the trades.csv layout)."""
    rows = []
    for position in positions:
        condor, entry, exit_ = position.condor, position.entry_fill, position.exit_fill
        entry_session = entry.timestamp.tz_localize(None).normalize()
        exit_session = exit_.timestamp.tz_localize(None).normalize()
        rows.append({
            "position_id": position.position_id,
            "entry_time": entry.timestamp, "exit_time": exit_.timestamp,
            "expiration": pd.Timestamp(condor.expiration).date().isoformat(),
            "long_put": condor.long_put_strike, "short_put": condor.short_put_strike,
            "short_call": condor.short_call_strike, "long_call": condor.long_call_strike,
            "contracts": condor.quantity,
            "credit": entry.net_price, "exit_debit": 0.0 - exit_.net_price,
            "fees": entry.fees + exit_.fees, "pnl": position.realized_pnl,
            "exit_reason": exit_.reason,
            "max_adverse_excursion": position.max_adverse_excursion,
            "days_held": (exit_session - entry_session).days,
            "max_loss": position.max_loss,
            "assigned_legs": "+".join(position.assigned_legs),
            "early_assignment_risk": position.early_assignment_risk,
            "notes": "; ".join(position.notes),
            **{column: position.entry_context.get(column, "" if column in _TEXT_CONTEXT else np.nan)
               for column in ENTRY_CONTEXT_COLUMNS},
        })
    columns = ["position_id", "entry_time", "exit_time", "expiration", "long_put", "short_put", "short_call",
               "long_call", "contracts", "credit", "exit_debit", "fees", "pnl", "exit_reason",
               "max_adverse_excursion", "days_held", "max_loss", "assigned_legs", "early_assignment_risk",
               "notes", *ENTRY_CONTEXT_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def equity_frame(result: BacktestResult, starting_cash: float) -> pd.DataFrame:
    """Per-bar account with drawdown from the running peak (equity.csv layout)."""
    from analytics.performance import drawdown_series

    frame = result.equity.copy()
    drawdown = drawdown_series(frame["equity"], starting_cash)
    frame["drawdown"] = drawdown["drawdown"].to_numpy()
    frame["drawdown_pct"] = drawdown["drawdown_pct"].to_numpy()
    return frame


DRIVERS = {"backtrader": run_backtrader, "fast": run_fast}
