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

import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd

from core.config import Config
from core.dto import (
    CONTRACT_MULTIPLIER, Action, ExitReason, IronCondor, LegQuotes, MarketSnapshot, Position,
    TradeDecision,
)
from core.engine import TradingEngine, clock_minutes
from core.execution import (
    CONDOR_RATIOS, FillModel, close_debit, fee_schedule, make_fill, settlement_fill,
)
from core.portfolio import Portfolio, value_at_closing_side, value_at_mid
from data_factory.option_chain import SyntheticChainProvider
from strategies.options_strategy import exit_codes

DAY_NS = 86_400 * 1_000_000_000


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

    def __init__(self, config: Config, provider: SyntheticChainProvider, progress=None):
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

    # ------------------------------------------------------------------------------- market view
    def quote(self, bar: int, condor: IronCondor) -> LegQuotes:
        path = self.provider.quote_contracts(bar, bar + 1, condor.expiration, condor.strikes, condor.is_call)
        return LegQuotes(path.bid[0], path.ask[0], path.mid[0], path.delta[0], path.gamma[0],
                         path.vega[0], path.theta[0])

    def chain(self, bar: int, dte_min: int, dte_max: int):
        return self.provider.slice_at(bar, dte_min=dte_min, dte_max=dte_max)

    def snapshot(self, bar: int) -> MarketSnapshot:
        return MarketSnapshot(
            timestamp=self.bar_times[bar], bar_index=bar, session_day=int(self.session_day[bar]),
            symbol=self.symbol,
            spot=float(self.spot[bar]), iv_index=float(self.iv_index[bar]),
            chain=partial(self.chain, bar), quote=partial(self.quote, bar),
            settlement_of=self.provider.settlement_time)

    # ------------------------------------------------------------------------------- fills
    def _fill(self, decision: TradeDecision, snapshot: MarketSnapshot, quotes: dict) -> None:
        """Execute one decision at this bar's quotes and book it."""
        if decision.action is Action.OPEN:
            condor = decision.condor
            leg_quotes = self.quote(snapshot.bar_index, condor)
            fill = make_fill(snapshot.timestamp, 0, Action.OPEN, leg_quotes.bid, leg_quotes.ask,
                             condor.quantity, decision.reason, self.fill_model, self.fees)
            position = self.portfolio.open_position(condor, fill)
            self.engine.note_opened(snapshot.timestamp.date())
            quotes[position.position_id] = leg_quotes
            return
        position = self.portfolio.position(decision.position_id)
        condor = position.condor
        if snapshot.timestamp >= condor.settlement:
            fill, assigned = settlement_fill(snapshot.timestamp, position.position_id, condor, snapshot.spot,
                                             self.fees)
            self.portfolio.close_position(position.position_id, fill, assigned_legs=assigned)
        else:
            leg_quotes = quotes.get(position.position_id)
            if leg_quotes is None:
                leg_quotes = self.quote(snapshot.bar_index, condor)
            fill = make_fill(snapshot.timestamp, position.position_id, Action.CLOSE, leg_quotes.bid,
                             leg_quotes.ask, condor.quantity, decision.reason, self.fill_model, self.fees)
            self.portfolio.close_position(position.position_id, fill)
        self.engine.note_closed(position.position_id)

    def step(self, bar: int) -> None:
        """One bar: due fills, the engine's decisions, their fills, the account record."""
        snapshot = self.snapshot(bar)
        quotes: dict[int, LegQuotes] = {}
        if self.pending:
            due, self.pending = self.pending, []
            for decision in due:
                self._fill(decision, snapshot, quotes)
        decisions = self.engine.on_bar(snapshot)
        quotes.update({pid: q for pid, q in self.engine.last_quotes.items() if q is not None})
        for decision in decisions:
            settles_now = (decision.action is Action.CLOSE
                           and snapshot.timestamp >= self.portfolio.position(decision.position_id).condor.settlement)
            if self.next_bar_fills and not settles_now:
                self.pending.append(decision)
            else:
                self._fill(decision, snapshot, quotes)
        self.record(bar, snapshot, quotes)

    def record(self, bar: int, snapshot: MarketSnapshot, quotes: dict) -> None:
        """The account after this bar's fills: cash, equity at mid and at the closing side."""
        cash = self.portfolio.cash
        mid_total = cash
        closing_total = cash
        for position in self.portfolio.open_positions.values():
            leg_quotes = quotes.get(position.position_id)
            if leg_quotes is None:
                leg_quotes = self.quote(bar, position.condor)
                quotes[position.position_id] = leg_quotes
            quantity = position.condor.quantity
            mid_total += float(value_at_mid(leg_quotes.mid, CONDOR_RATIOS, quantity))
            closing_total += float(value_at_closing_side(leg_quotes.bid, leg_quotes.ask, CONDOR_RATIOS, quantity))
        self.cash[bar] = cash
        self.equity_mid[bar] = mid_total
        self.equity_closing[bar] = closing_total
        self.open_count[bar] = len(self.portfolio.open_positions)
        self.current_equity = mid_total

    def finish(self) -> None:
        """End of data: close every open position at the last bar (settle if it is its expiry);
        decisions still waiting for a next bar are dropped (there is none)."""
        bar = self.n_bars - 1
        snapshot = self.snapshot(bar)
        self.pending = []
        quotes: dict[int, LegQuotes] = {}
        for position in list(self.portfolio.open_positions.values()):
            reason = (ExitReason.EXPIRY if snapshot.timestamp >= position.condor.settlement
                      else ExitReason.END_OF_DATA)
            self._fill(TradeDecision(Action.CLOSE, snapshot.timestamp, reason.value,
                                     position_id=position.position_id), snapshot, quotes)
        self.record(bar, snapshot, quotes)

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
                   empty_strategy: bool = False) -> BacktestResult:
    """Replay the bars through Backtrader with the engine hosted in a ``bt.Strategy``.

    ``empty_strategy`` runs the same Cerebro and feed with a strategy that does nothing (the
    benchmark's anchor)."""
    import backtrader as bt

    session = BacktestSession(config, provider, progress)
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
        def next(self):
            bar = len(self) - 1
            session.step(bar)
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
    if not empty_strategy:
        cerebro.addanalyzer(bt.analyzers.SharpeRatio, _name="sharpe", timeframe=bt.TimeFrame.Days,
                            riskfreerate=0.0, annualize=True, factor=252)
        cerebro.addanalyzer(bt.analyzers.DrawDown, _name="drawdown")
        cerebro.addanalyzer(bt.analyzers.Returns, _name="returns", tann=252)
    started = time.perf_counter()
    strategies = cerebro.run()
    if empty_strategy:
        return session.result("backtrader-empty", time.perf_counter() - started)
    session.finish()
    session.tick(session.n_bars)
    strategy = strategies[0]
    analyzers = {
        "sharpe_ratio": strategy.analyzers.sharpe.get_analysis().get("sharperatio"),
        "max_drawdown_pct": strategy.analyzers.drawdown.get_analysis().max.drawdown,
        "max_drawdown_money": strategy.analyzers.drawdown.get_analysis().max.moneydown,
        "annual_return_pct": 100.0 * strategy.analyzers.returns.get_analysis().get("rnorm", float("nan")),
        "note": "Backtrader analyzers read the equity at mid through the broker shim, before the "
                "end-of-data close; metrics.json is computed from equity.csv",
    }
    return session.result("backtrader", time.perf_counter() - started, analyzers)


def _array_feed(bt, session: BacktestSession, provider: SyntheticChainProvider):
    """A Backtrader feed over preloaded NumPy arrays (exchange-time datetimes, as Backtrader wants
    naive datetimes)."""
    bars = provider.ohlcv_bars() if hasattr(provider, "ohlcv_bars") else None
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

@dataclass
class _PositionPath:
    """One open condor's quotes from its entry bar to the bar before settlement (or data end)."""

    first_bar: int
    stop_bar: int               # exclusive: settlement bar or n_bars
    settle_bar: int             # bar at/after settlement (n_bars if beyond the data)
    mid_value: np.ndarray       # dollars at mid per bar
    closing_value: np.ndarray   # dollars at the closing side per bar
    loss: np.ndarray            # adverse excursion candidate per bar (dollars)
    codes: np.ndarray           # exit code per bar (0 = hold)
    mid: np.ndarray             # (n, 4) leg mids, for the early-assignment flag


def run_fast(config: Config, provider: SyntheticChainProvider, progress=None) -> BacktestResult:
    """Same trades as the per-bar run, stepping only the bars where something can happen."""
    started = time.perf_counter()
    session = BacktestSession(config, provider, progress)
    engine = session.engine
    n = session.n_bars
    window = (clock_minutes(config.strategy.entry_window_start), clock_minutes(config.strategy.entry_window_end))
    in_window = (session.minute_of_day >= window[0]) & (session.minute_of_day <= window[1])
    window_bars = np.flatnonzero(in_window)
    window_days = session.session_day[window_bars]
    limit = config.strategy.max_entries_per_day
    max_positions = config.strategy.max_positions
    settlement_ns = {}
    paths: dict[int, _PositionPath] = {}
    scanned_to: dict[int, int] = {}      # per position: bars before this one are already applied
    bar_ns = session.bar_times.asi8

    def settle_bar_of(condor: IronCondor) -> int:
        key = condor.expiration
        if key not in settlement_ns:
            settlement_ns[key] = condor.settlement.as_unit("ns").value
        return int(np.searchsorted(bar_ns, settlement_ns[key], side="left"))

    def build_path(position: Position, fill_bar: int) -> _PositionPath:
        condor = position.condor
        settle = min(settle_bar_of(condor), n)
        quotes = provider.quote_contracts(fill_bar, settle, condor.expiration, condor.strikes, condor.is_call)
        _, debit = close_debit(quotes.bid, quotes.ask, session.fill_model)
        quantity = condor.quantity
        days = session.session_day[fill_bar:settle]
        codes = exit_codes(debit, position.entry_credit, condor.expiration_day - days,
                           days - engine.entry_day(position), config)
        loss = (debit - position.entry_credit) * CONTRACT_MULTIPLIER * quantity
        return _PositionPath(
            fill_bar, settle, settle_bar_of(condor),
            value_at_mid(quotes.mid, CONDOR_RATIOS, quantity),
            value_at_closing_side(quotes.bid, quotes.ask, CONDOR_RATIOS, quantity),
            loss, codes, quotes.mid)

    def next_exit_bar(position_id: int, after: int) -> int:
        """First bar ≥ ``after`` where the engine would decide to close this position."""
        path = paths[position_id]
        start = max(after, path.first_bar)
        if start < path.stop_bar:
            hits = np.flatnonzero(path.codes[start - path.first_bar:])
            if hits.size:
                return start + int(hits[0])
        return path.settle_bar if path.settle_bar < n else n

    def apply_skipped(position: Position, upto: int) -> None:
        """Excursion and early-assignment checks the per-bar engine would have made on the
        skipped bars [scanned_to, upto) of an open position."""
        path = paths[position.position_id]
        start = max(scanned_to.get(position.position_id, path.first_bar), path.first_bar)
        stop = min(upto, path.stop_bar)
        if stop <= start:
            return
        offset = slice(start - path.first_bar, stop - path.first_bar)
        worst = float(path.loss[offset].max())
        if worst > position.max_adverse_excursion:
            session.portfolio.update_excursion(position.position_id, worst)
        if not position.early_assignment_risk:
            _early_assignment_scan(session, position, path, start, stop)
        scanned_to[position.position_id] = stop

    bar = 0
    last_recorded = -1
    while bar < n:
        # Record the skipped bars' account from the paths, then step this event bar.
        _fill_skipped_equity(session, paths, last_recorded + 1, bar)
        for position in session.portfolio.open_positions.values():
            if not engine.is_closing(position.position_id):
                apply_skipped(position, bar)
        before_ids = set(session.portfolio.open_positions)
        session.step(bar)
        last_recorded = bar
        for position in session.portfolio.open_positions.values():
            if position.position_id not in before_ids:
                fill_bar = bar
                paths[position.position_id] = build_path(position, fill_bar)
                scanned_to[position.position_id] = bar + 1
            else:
                scanned_to[position.position_id] = bar + 1
        bar = _next_event_bar(session, bar, window_bars, window_days, limit, max_positions, next_exit_bar)
        session.tick(min(bar, n))
    session.finish()
    session.tick(n)
    return session.result("fast", time.perf_counter() - started)


def _next_event_bar(session: BacktestSession, bar: int, window_bars: np.ndarray, window_days: np.ndarray,
                    limit: int, max_positions: int, next_exit_bar) -> int:
    """The next bar after ``bar`` where the per-bar engine could do anything."""
    n = session.n_bars
    engine = session.engine
    if session.pending:
        return bar + 1
    candidates = [n - 1] if bar < n - 1 else [n]
    active = 0
    for position in session.portfolio.open_positions.values():
        if engine.is_closing(position.position_id):
            continue
        active += 1
        candidates.append(next_exit_bar(position.position_id, bar + 1))
    if active < max_positions:
        position_in_window = int(np.searchsorted(window_bars, bar + 1))
        while position_in_window < window_bars.size:
            candidate = int(window_bars[position_in_window])
            day = session.bar_times[candidate].date()
            if not limit or engine.entries_on(day) < limit:
                candidates.append(candidate)
                break
            # This session is used up: jump to the first window bar of a later session.
            position_in_window = int(np.searchsorted(window_days, session.session_day[candidate] + 1))
    return min(candidates)


def _fill_skipped_equity(session: BacktestSession, paths: dict, start: int, stop: int) -> None:
    """Account records of bars [start, stop) that were not stepped: cash unchanged since the last
    stepped bar, positions marked from their paths, summed in id order like ``record``."""
    if stop <= start:
        return
    cash = session.portfolio.cash
    mid_total = np.full(stop - start, cash)
    closing_total = np.full(stop - start, cash)
    for position_id in session.portfolio.open_positions:
        path = paths[position_id]
        rows = slice(start - path.first_bar, stop - path.first_bar)
        mid_total += path.mid_value[rows]
        closing_total += path.closing_value[rows]
    session.cash[start:stop] = cash
    session.equity_mid[start:stop] = mid_total
    session.equity_closing[start:stop] = closing_total
    session.open_count[start:stop] = len(session.portfolio.open_positions)
    session.current_equity = float(mid_total[-1])


def _early_assignment_scan(session: BacktestSession, position: Position, path: _PositionPath,
                           start: int, stop: int) -> None:
    """Find the first bar in [start, stop) where the engine's early-assignment check fires and
    let the engine flag it from that bar's numbers (same rule, same note)."""
    exits = session.config.exits
    condor = position.condor
    dte = condor.expiration_day - session.session_day[start:stop]
    near = dte <= exits.early_assignment_days
    if not near.any():
        return
    spot = session.spot[start:stop]
    rows = slice(start - path.first_bar, stop - path.first_bar)
    put_intrinsic = np.maximum(condor.short_put_strike - spot, 0.0)
    call_intrinsic = np.maximum(spot - condor.short_call_strike, 0.0)
    put_hit = (put_intrinsic > 0.0) & (path.mid[rows, 1] - put_intrinsic < exits.early_assignment_extrinsic)
    call_hit = (call_intrinsic > 0.0) & (path.mid[rows, 2] - call_intrinsic < exits.early_assignment_extrinsic)
    hits = np.flatnonzero(near & (put_hit | call_hit))
    if hits.size:
        row = int(hits[0])
        bar = start + row
        mids = path.mid[row + start - path.first_bar]
        quotes = LegQuotes(mids, mids, mids, mids, mids, mids, mids)
        session.engine.flag_early_assignment(position, quotes, float(session.spot[bar]), int(dte[row]))


# ----------------------------------------------------------------------------------------------
# Results as tables
# ----------------------------------------------------------------------------------------------

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
        })
    columns = ["position_id", "entry_time", "exit_time", "expiration", "long_put", "short_put", "short_call",
               "long_call", "contracts", "credit", "exit_debit", "fees", "pnl", "exit_reason",
               "max_adverse_excursion", "days_held", "max_loss", "assigned_legs", "early_assignment_risk",
               "notes"]
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
