"""The backtest drivers and the one run function.

``run_backtest(config, market, features=None) -> RunResult`` is what the CLI, the ablation, the
benchmarks and the optimizer call: any source implementing the bar contract (``core.market.
MarketData``) in, trades, equity, metrics, rejections and risk events out. Data and feature
tables are loaded once per process (``core.market_data``), so it can be called thousands of
times.

``BacktestSession`` is the per-bar reference: at each bar it fills what was waiting for this bar
(next-bar fills), asks the engine for decisions, fills them against the market's quotes
(``core.execution``; hedges at the bar's price plus the share cost), books them
(``core.portfolio``) and records the account (``core.portfolio.account_marks``).

Two drivers run it:
- ``run_backtrader``: a Cerebro over the 5-minute spot bars (a feed built from preloaded arrays,
  since ``PandasData`` reads each bar with ``.iloc``), a ``bt.Strategy`` that steps the session on
  every bar, and Backtrader's Sharpe/DrawDown/Returns analyzers reading the session's equity
  through a broker shim.
- ``run_fast``: steps the same session only on the bars the engine names
  (``TradingEngine.next_event_bar``), fills in the bars between from the open condors'
  holding-period paths (``core.engine.PositionPaths``). Trades and equity are identical to the
  per-bar run.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd

from core.dto import (
    Action,
    ExitReason,
    HedgeFill,
    IronCondor,
    LegQuotes,
    MarketSnapshot,
    Position,
    RiskEvent,
    TradeDecision,
)
from core.engine import CONTEXT_FEATURES, TDA_COLUMNS, BarClock, PositionPaths, TradingEngine
from core.execution import (
    FillModel,
    fee_schedule,
    make_fill,
    round_fee_up,
    settlement_fill,
)
from core.market import MarketData, condor_leg_quotes, nearest_expiry_slice, require_market_data
from core.portfolio import Portfolio, account_marks
from intelligence.features import MEMBERSHIP_COLUMNS, FeatureRow
from risk.risk_manager import RiskManager

DAY_NS = 86_400 * 1_000_000_000
# Account columns recorded per bar (equity.csv, before the drawdown columns).
ACCOUNT_COLUMNS = ("cash", "equity", "equity_liquidation", "open_positions", "hedge_shares", "net_delta",
                   "net_gamma", "net_vega", "net_theta")


@dataclass
class BacktestResult:
    """What a driver produced: closed positions in close order, the per-bar account, the engine's
    rejection counts, the risk events, the hedge fills and run facts."""

    positions: list[Position]
    equity: pd.DataFrame
    rejections: dict
    engine: str
    bars: int
    seconds: float
    analyzers: dict = field(default_factory=dict)
    risk_events: list[RiskEvent] = field(default_factory=list)
    hedge_fills: list[HedgeFill] = field(default_factory=list)


class _TimestampsOf:
    """``index[i]`` of a tz-aware DatetimeIndex, built from its nanoseconds (the same Timestamp)."""

    def __init__(self, index: pd.DatetimeIndex):
        self._ns = index.as_unit("ns").asi8
        self._tz = index.tz

    def __getitem__(self, i: int) -> pd.Timestamp:
        return pd.Timestamp(int(self._ns[i]), tz=self._tz)


class BacktestSession:
    """One backtest's state and the per-bar step shared by both drivers."""

    def __init__(self, config, market: MarketData, progress=None, every_bar: bool = True, features=None,
                 candidates=None, paths=None):
        if paths is None and config.filters.pop_source == "diffusion":
            from core.market_data import path_forecast_per_bar
            paths = path_forecast_per_bar(config, market)
        market = require_market_data(market)
        self.config = config
        self.market = market
        self.fill_model = FillModel.from_config(config.backtest)
        self.fees = fee_schedule(config.backtest.fees)
        self.portfolio = Portfolio(config.backtest.cash)
        self.next_bar_fills = config.backtest.fill_on_next_bar
        self.symbol = config.backtest.underlying
        self.progress = progress

        times = market.bar_times
        total = len(times)
        samples = config.backtest.samples
        self.n_bars = total if samples == 0 else min(samples, total)
        self.bar_times = times[: self.n_bars]
        self.spot = market.spot_bars().to_numpy()[: self.n_bars]
        self.iv_index = market.iv_index_bars().to_numpy()[: self.n_bars]
        self.clock = BarClock.from_times(self.bar_times)
        self.session_day = self.clock.session_day
        self.minute_of_day = self.clock.minute_of_day

        if features is None:
            from core.market_data import bar_features
            features = bar_features(config, market)
        self.features = features
        # Boxing a Timestamp out of the index (~10 µs) costs more than the rest of a quiet bar: a
        # driver that steps every bar unboxes them all at once (~0.1 s for five years); one that
        # skips builds each from its nanoseconds (~4 µs).
        self._timestamps = list(self.bar_times) if every_bar else _TimestampsOf(self.bar_times)
        self.risk = RiskManager(config)
        self.engine = TradingEngine(config, self.portfolio, self.fill_model, self.clock, features, self.risk,
                                    None if candidates is None else candidates.view(self.bar_times.asi8),
                                    timestamps=self._timestamps, paths=paths)
        self.feature_columns = self.engine.feature_columns
        self.share_cost = float(config.hedge.share_cost)

        self.account = {name: np.empty(self.n_bars) for name in ACCOUNT_COLUMNS}
        self.account["open_positions"] = np.zeros(self.n_bars, dtype=np.int64)
        self.account["hedge_shares"] = np.zeros(self.n_bars, dtype=np.int64)
        self.pending: list[TradeDecision] = []
        self.current_equity = float(config.backtest.cash)
        self._structures_key: tuple = ()
        self._structures: tuple = ()

    # ------------------------------------------------------------------------------- market view
    def quote(self, bar: int, condor: IronCondor) -> LegQuotes:
        return condor_leg_quotes(self.market, bar, condor)

    def quote_many(self, bar: int, positions: list[Position]):
        key = tuple(p.position_id for p in positions)
        if self._structures_key != key:
            # Rebuilt only when the open set changes, not on every bar.
            self._structures_key = key
            expirations = np.array([p.condor.expiration for p in positions], dtype="datetime64[D]")
            expirations.setflags(write=False)      # lets the source remember its rows
            self._structures = (
                expirations,
                np.array([[p.condor.long_put_strike, p.condor.short_put_strike, p.condor.short_call_strike,
                           p.condor.long_call_strike] for p in positions]))
        return self.market.quote_structures(bar, *self._structures)

    def chain(self, bar: int, dte_min: int, dte_max: int):
        return self.market.slice_at(bar, dte_min=dte_min, dte_max=dte_max)

    def nearest_chain(self, bar: int, dte_min: int, dte_max: int):
        return nearest_expiry_slice(self.market, bar, dte_min, dte_max)

    def snapshot(self, bar: int) -> MarketSnapshot:
        return MarketSnapshot(
            timestamp=self._timestamps[bar], bar_index=bar, session_day=int(self.session_day[bar]),
            symbol=self.symbol,
            spot=float(self.spot[bar]), iv_index=float(self.iv_index[bar]),
            chain=partial(self.chain, bar), nearest_chain=partial(self.nearest_chain, bar),
            quote=partial(self.quote, bar),
            quote_many=partial(self.quote_many, bar), settlement_of=self.market.settlement_time,
            features=FeatureRow(self.feature_columns, bar) if self.feature_columns else {})

    # ------------------------------------------------------------------------------- fills
    def _fill(self, decision: TradeDecision, snapshot: MarketSnapshot) -> None:
        """Execute one decision at this bar's quotes and book it."""
        if decision.action is Action.HEDGE:
            self._fill_hedge(decision, snapshot)
            return
        if decision.action is Action.OPEN:
            condor = decision.condor
            leg_quotes = self.quote(snapshot.bar_index, condor)
            fill = make_fill(snapshot.timestamp, 0, Action.OPEN, leg_quotes.bid, leg_quotes.ask,
                             condor.quantity, decision.reason, self.fill_model, self.fees)
            self.portfolio.open_position(condor, fill, decision.context)
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

    def _fill_hedge(self, decision: TradeDecision, snapshot: MarketSnapshot) -> None:
        """Shares at the bar's price plus ``hedge.share_cost`` per share (rounded up to the cent).
        A next-bar unwind trades whatever is held by then."""
        shares = decision.shares
        if decision.reason in ("hedge_unwind", ExitReason.END_OF_DATA.value):
            shares = -self.portfolio.hedge_shares
        if not shares:
            return
        context = decision.context or {}
        before = float(context.get("delta_before", math.nan))
        cost = float(round_fee_up(abs(shares) * self.share_cost))
        self.portfolio.trade_shares(HedgeFill(snapshot.timestamp, int(shares), snapshot.spot, cost, decision.reason,
                                              before, before + shares))

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
        rows = self.engine.last_rows
        if filled or rows is None:
            self.record(bar, snapshot)
        else:
            # No fill at this bar: the open positions are the ones the engine just marked.
            self._write_account(bar, account_marks(self.portfolio.cash, self.portfolio.hedge_shares, snapshot.spot,
                                                   self.share_cost, rows))

    def record(self, bar: int, snapshot: MarketSnapshot) -> None:
        """The account after this bar's fills: cash, equity at mid and at the closing side, Greeks."""
        portfolio = self.portfolio
        positions = list(portfolio.open_positions.values())
        rows = None
        if positions:
            rows = self.engine.evaluate(positions, self.quote_many(bar, positions), np.array([snapshot.spot]),
                                        np.array([snapshot.session_day], dtype=np.int64))
        self._write_account(bar, account_marks(portfolio.cash, portfolio.hedge_shares, snapshot.spot,
                                               self.share_cost, rows))

    def record_skipped(self, paths: PositionPaths, start: int, stop: int) -> None:
        """Account records of bars [start, stop) that were not stepped: no fill happened, so the
        open positions' paths give the marks (``core.portfolio.account_mark_paths``)."""
        if stop <= start:
            return
        self._write_account(slice(start, stop), paths.account_marks(start, stop))

    def _write_account(self, bars, marks) -> None:
        """Store the account of one bar (an index, scalar marks) or a range (a slice, arrays), the
        positions and hedge shares as the portfolio holds them, and show the equity to the risk
        manager's drawdown rules."""
        account = self.account
        account["cash"][bars] = marks.cash
        account["equity"][bars] = marks.equity
        account["equity_liquidation"][bars] = marks.equity_liquidation
        account["open_positions"][bars] = len(self.portfolio.open_positions)
        account["hedge_shares"][bars] = self.portfolio.hedge_shares
        account["net_delta"][bars] = marks.delta
        account["net_gamma"][bars] = marks.gamma
        account["net_vega"][bars] = marks.vega
        account["net_theta"][bars] = marks.theta
        if isinstance(bars, slice):
            self.current_equity = float(marks.equity[-1])
            self.risk.observe_range(self.session_day[bars], marks.equity)
        else:
            self.current_equity = marks.equity
            self.risk.observe(int(self.session_day[bars]), marks.equity)

    def finish(self) -> None:
        """End of data: close every open position at the last bar (settle if it is its expiry)
        and sell or buy back the hedge shares; decisions still waiting for a next bar are dropped
        (there is none)."""
        bar = self.n_bars - 1
        snapshot = self.snapshot(bar)
        self.pending = []
        for position in list(self.portfolio.open_positions.values()):
            reason = (ExitReason.EXPIRY if snapshot.timestamp >= position.condor.settlement
                      else ExitReason.END_OF_DATA)
            self._fill(TradeDecision(Action.CLOSE, snapshot.timestamp, reason.value,
                                     position_id=position.position_id), snapshot)
        if self.portfolio.hedge_shares:
            delta = float(self.account["net_delta"][bar])
            self._fill(TradeDecision(Action.HEDGE, snapshot.timestamp, ExitReason.END_OF_DATA.value,
                                     shares=-self.portfolio.hedge_shares, context={"delta_before": delta}), snapshot)
        self.record(bar, snapshot)

    def result(self, engine_name: str, seconds: float, analyzers: dict | None = None) -> BacktestResult:
        # The underlying's price at each replayed bar rides along: the report's buy-and-hold
        # benchmark is measured on exactly the bars the strategy saw.
        equity = pd.DataFrame({**self.account, "underlying_price": self.spot},
                              index=pd.DatetimeIndex(self.bar_times, name="timestamp"))
        return BacktestResult(list(self.portfolio.closed), equity, dict(self.engine.rejections), engine_name,
                              self.n_bars, seconds, analyzers or {}, list(self.engine.risk_events),
                              list(self.portfolio.hedge_fills))

    def tick(self, bars_done: int) -> None:
        if self.progress is not None:
            self.progress(bars_done)


# ----------------------------------------------------------------------------------------------
# Backtrader driver
# ----------------------------------------------------------------------------------------------

def run_backtrader(config, market: MarketData, progress=None,
                   empty_strategy: bool = False, analyzers: bool = True,
                   analyzers_on_empty: bool = False, features=None, candidates=None, paths=None) -> BacktestResult:
    """Replay the bars through Backtrader with the engine hosted in a ``bt.Strategy``.

    ``empty_strategy`` runs the same Cerebro and feed with a strategy that does nothing (the
    benchmark's anchor; ``analyzers_on_empty`` attaches the analyzers to it too); ``analyzers``
    False leaves Backtrader's analyzers off (benchmark decomposition). ``paths``: the path
    forecast of a ``filters.pop_source`` diffusion run (None: ``path_forecast_per_bar``'s)."""
    import backtrader as bt

    session = BacktestSession(config, market, progress, features=features, candidates=candidates, paths=paths)
    feed = _array_feed(bt, session, market)

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


def _array_feed(bt, session: BacktestSession, market: MarketData):
    """A Backtrader feed over preloaded NumPy arrays (exchange-time datetimes, as Backtrader wants
    naive datetimes)."""
    bars = market.ohlcv_bars()
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

def run_fast(config, market: MarketData, progress=None, features=None, candidates=None, paths=None) -> BacktestResult:
    """Same trades and equity as the per-bar run, stepping only the bars the engine names
    (``TradingEngine.next_event_bar``); the bars between are recorded and booked from the open
    condors' holding-period paths."""
    started = time.perf_counter()
    session = BacktestSession(config, market, progress, every_bar=False, features=features, candidates=candidates,
                              paths=paths)
    engine = session.engine
    paths = PositionPaths(engine, session.market, session.spot, session.bar_times.asi8)
    n = session.n_bars
    bar = 0
    last_recorded = -1
    while bar < n:
        session.record_skipped(paths, last_recorded + 1, bar)
        paths.book_skipped(bar)
        session.step(bar)
        last_recorded = bar
        paths.track(bar)
        following = engine.next_event_bar(bar, paths, bool(session.pending))
        engine.skip(bar, following)
        bar = following
        session.tick(min(bar, n))
    session.finish()
    session.tick(n)
    return session.result("fast", time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Results as tables
# ----------------------------------------------------------------------------------------------

# Why each trade was taken and sized, as of its entry decision (trades.csv, after the fills).
ENTRY_CONTEXT_COLUMNS = ("regime", "confidence", "fuzzy_ft", *MEMBERSHIP_COLUMNS.values(), "mu_neural",
                         *CONTEXT_FEATURES, "skew", "iv_atm", "vrp", "breach_probability", "touch_put", "touch_call",
                         "pop_paths", "wing_adjustments",
                         "sizing", "sizing_limit", "condor_delta", "condor_gamma", "condor_vega", "condor_theta")
_TEXT_CONTEXT = {"regime", "wing_adjustments", "sizing", "sizing_limit"}


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
    # --tda-features runs: the topological columns at entry, after the others (absent otherwise)
    tda = [name for name in TDA_COLUMNS if any(name in position.entry_context for position in positions)]
    for row, position in zip(rows, positions):
        row.update({name: position.entry_context.get(name, np.nan) for name in tda})
    columns = ["position_id", "entry_time", "exit_time", "expiration", "long_put", "short_put", "short_call",
               "long_call", "contracts", "credit", "exit_debit", "fees", "pnl", "exit_reason",
               "max_adverse_excursion", "days_held", "max_loss", "assigned_legs", "early_assignment_risk",
               "notes", *ENTRY_CONTEXT_COLUMNS, *tda]
    return pd.DataFrame(rows, columns=columns)


def equity_frame(result: BacktestResult, starting_cash: float) -> pd.DataFrame:
    """Per-bar account with drawdown from the running peak (equity.csv layout)."""
    from analytics.performance import drawdown_series

    frame = result.equity.copy()
    drawdown = drawdown_series(frame["equity"], starting_cash)
    frame["drawdown"] = drawdown["drawdown"].to_numpy()
    frame["drawdown_pct"] = drawdown["drawdown_pct"].to_numpy()
    return frame


RISK_EVENT_COLUMNS = ("timestamp", "event", "reason", "attempts", "last_timestamp", "detail", "equity",
                      "reference_equity")
HEDGE_COLUMNS = ("timestamp", "shares", "price", "cost", "cash_flow", "reason", "delta_before", "delta_after",
                 "shares_held")


def risk_events_frame(events: list[RiskEvent]) -> pd.DataFrame:
    """One row per halt, flatten and risk rejection (consecutive attempts of a session with the
    same rejection in one row, ``attempts`` of them up to ``last_timestamp``), in time order
    (risk_events.csv)."""
    rows = [{"timestamp": e.timestamp, "event": e.kind, "reason": e.reason, "attempts": e.count,
             "last_timestamp": e.last_timestamp if e.last_timestamp is not None else e.timestamp,
             "detail": e.detail, "equity": e.equity, "reference_equity": e.reference_equity} for e in events]
    return pd.DataFrame(rows, columns=list(RISK_EVENT_COLUMNS))


def hedges_frame(fills: list[HedgeFill]) -> pd.DataFrame:
    """One row per hedge fill with the shares held after it (hedges.csv)."""
    rows, held = [], 0
    for fill in fills:
        held += fill.shares
        rows.append({"timestamp": fill.timestamp, "shares": fill.shares, "price": fill.price, "cost": fill.cost,
                     "cash_flow": fill.cash_flow, "reason": fill.reason, "delta_before": fill.delta_before,
                     "delta_after": fill.delta_after, "shares_held": held})
    return pd.DataFrame(rows, columns=list(HEDGE_COLUMNS))


DRIVERS = {"backtrader": run_backtrader, "fast": run_fast}


# ----------------------------------------------------------------------------------------------
# The run function
# ----------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """Everything one backtest produced, as tables: ``trades`` (trades.csv), ``equity`` (per bar,
    with drawdown and net Greeks: equity.csv), ``metrics`` (metrics.json: performance, rejections,
    risk and hedge figures), ``rejections`` (entry refusals by reason), ``risk_events`` and
    ``hedges`` (their CSVs), plus the closed positions and run facts."""

    config: object
    trades: pd.DataFrame
    equity: pd.DataFrame
    metrics: dict
    rejections: dict
    risk_events: pd.DataFrame
    hedges: pd.DataFrame
    positions: list
    engine: str
    bars: int
    seconds: float
    analyzers: dict
    features_description: dict


def run_backtest(config, market: MarketData, features=None, progress=None, candidates=None, paths=None) -> RunResult:
    """Backtest ``config`` on ``market`` (any source implementing ``core.market.MarketData``)
    with the driver ``config.backtest.engine`` names. ``features``: the bar feature table to use;
    None takes it from the per-process cache (``core.market_data.bar_features``), built once per
    market and per set of settings it depends on. ``progress(bars_done)`` is called as it runs.
    ``candidates``: a ``core.engine.CandidateMemo`` shared with other runs of the same candidate
    settings (the optimizer's; same result, each bar's condor chosen once). ``paths``: with
    ``filters.pop_source`` diffusion, the path forecast by bar of ``market``; None takes it from
    the per-process cache (``core.market_data.path_forecast_per_bar``). The run's description
    (``features_description``) says where the breach probability came from ("pop_source")."""
    from core.market_data import pop_source_description

    if features is None:
        from core.market_data import bar_features
        features = bar_features(config, market)
    diffusion = config.filters.pop_source == "diffusion"
    if diffusion and paths is None:
        from core.market_data import path_forecast_per_bar
        paths = path_forecast_per_bar(config, market)
    driver = partial(DRIVERS[config.backtest.engine], config, market, progress=progress, features=features,
                     candidates=candidates)
    if diffusion:
        # The paths are drawn at the entry bars during the run: one torch thread (two threads of
        # a small model collapse to ~1 s a bar when anything else is busy; one runs it in ~15 ms).
        from core.market_data import one_torch_thread
        with one_torch_thread():
            result = driver(paths=paths)
    else:
        result = driver()
    description = dict(getattr(features, "description", {}) or {})
    description["pop_source"] = pop_source_description(config, paths)
    return run_result(config, result, description)


def run_result(config, result: BacktestResult, features_description: dict, cash: float | None = None) -> RunResult:
    """A driver's result as tables and metrics (what ``run_backtest`` returns; the live driver
    reports its day the same way). ``cash``: the starting cash (default the configuration's)."""
    from analytics.performance import performance_metrics

    cash = config.backtest.cash if cash is None else float(cash)
    trades = trades_frame(result.positions)
    equity = equity_frame(result, cash)
    metrics = performance_metrics(equity["equity"], trades, cash, benchmark_price=equity.get("underlying_price"))
    metrics["entry_rejections"] = dict(sorted(result.rejections.items(), key=lambda item: -item[1]))
    events = risk_events_frame(result.risk_events)
    hedges = hedges_frame(result.hedge_fills)
    metrics["risk"] = risk_summary(events, trades, equity, result.rejections)
    metrics["hedge"] = hedge_summary(hedges)
    note = sizing_note(config, metrics, result.rejections)
    if note:
        metrics["sizing_note"] = note
    return RunResult(config, trades, equity, metrics, dict(result.rejections), events, hedges, result.positions,
                     result.engine, result.bars, result.seconds, result.analyzers, features_description)


def risk_summary(events: pd.DataFrame, trades: pd.DataFrame, equity: pd.DataFrame, rejections: dict) -> dict:
    """Counts of halts, flattens and risk rejections, and the extremes of the net Greeks."""
    from risk.risk_manager import SIZING_REASONS

    kinds = events["event"].value_counts().to_dict() if len(events) else {}
    summary = {
        "kill_switch_halts": int(kinds.get("kill_switch_halt", 0)),
        "max_drawdown_halts": int(kinds.get("max_drawdown_halt", 0)),
        "flattens": int(kinds.get("flatten", 0)),
        "positions_closed_by_kill_switch": int(trades["exit_reason"].isin(
            [ExitReason.KILL_SWITCH.value, ExitReason.MAX_DRAWDOWN.value]).sum()) if len(trades) else 0,
        "risk_rejections": {reason: int(rejections[reason]) for reason in SIZING_REASONS if rejections.get(reason)},
    }
    for greek in ("delta", "gamma", "vega", "theta"):
        column = equity[f"net_{greek}"].to_numpy(dtype=float)
        summary[f"max_abs_net_{greek}"] = float(np.abs(column).max()) if column.size else 0.0
    return summary


def hedge_summary(hedges: pd.DataFrame) -> dict:
    """Hedge trades, shares traded, costs and the hedge's P&L (every share is unwound by the end
    of the run, so its P&L is the sum of its cash flows, costs included)."""
    if len(hedges) == 0:
        return {"trades": 0, "shares_traded": 0, "costs": 0.0, "pnl": 0.0}
    return {"trades": int(len(hedges)), "shares_traded": int(hedges["shares"].abs().sum()),
            "costs": float(hedges["cost"].sum()), "pnl": float(hedges["cash_flow"].sum())}


def sizing_note(config, metrics: dict, rejections: dict) -> str | None:
    """One line when every candidate was sized to zero contracts, naming the rule and the
    setting to change; None otherwise."""
    from risk.risk_manager import SIZING_HINTS, SIZING_REASONS

    if metrics.get("trade_count"):
        return None
    sized_out = {reason: rejections[reason] for reason in SIZING_REASONS if rejections.get(reason)}
    if not sized_out:
        return None
    reason, count = max(sized_out.items(), key=lambda item: item[1])
    return (f"no trade: every candidate was sized to 0 contracts ({sum(sized_out.values()):,} times; "
            f"{count:,} by {reason}): {SIZING_HINTS[reason](config)}")
