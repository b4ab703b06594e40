"""The live driver: the backtest's TradingEngine and RiskManager on an Alpaca account.

At start it checks everything that can stop a run before an order could be sent — keys, endpoint
overrides, the live-money guard, the account's options level, settings the live driver cannot act
on — then reconciles the journal with the broker (``core.live_orders.OrderDesk.reconcile``) and
rebuilds the open condors from the journal. Then, bar by bar on the broker's clock: the feed
(``data_factory.alpaca_feed.AlpacaFeed``) adds the bar that closed and its chain snapshot, the
feature table is rebuilt to include it (causal: the same numbers a backtest gets at that bar), the
engine decides, and each open or close goes out as one multi-leg order through the order desk.
The run folder's report (trades, equity, Greeks, metrics, HTML) is rewritten after every bar.

Live time is the broker's: the loop asks the broker's clock whether the market is open and when
it closes; this machine's clock only paces the polling.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from core.broker import AlpacaBroker, BrokerError, BrokerSetupError, CircuitOpen, Credentials, Endpoints, RetryPolicy
from core.config import Config, ConfigError
from core.dto import Action, Fill, IronCondor, LegQuotes, MarketSnapshot, TradeDecision
from core.journal import Intent, Journal, Leg, intent_id
from data_factory.errors import DataError
from core.live_orders import DeskSettings, OrderDesk, UnitPrices
from core.market import condor_leg_quotes, nearest_expiry_slice

EXCHANGE_TZ = "America/New_York"
LIVE_MONEY_CONFIRMATION = "I ACCEPT REAL MONEY RISK"
LIVE_FEES = "alpaca"
# The leg order of the engine's condors (core.dto.IronCondor): long put, short put, short call,
# long call; an open buys the longs and sells the shorts.
_OPEN_SIDES = ("buy", "sell", "sell", "buy")


class LiveError(RuntimeError):
    """A live run stopped for a reason its log explains (exit 1)."""


# ----------------------------------------------------------------------------------------------
# Symbols, legs, prices
# ----------------------------------------------------------------------------------------------

def occ_symbol(underlying: str, expiration, is_call: bool, strike: float) -> str:
    """The OCC option symbol (``SPY261218P00580000``): root, yymmdd, C/P, strike × 1000 in 8 digits."""
    day = pd.Timestamp(expiration)
    thousandths = int(round(float(strike) * 1000))
    if not 0 < thousandths < 100_000_000:
        raise ValueError(f"strike {strike!r} cannot be written in an OCC symbol")
    return f"{underlying}{day:%y%m%d}{'C' if is_call else 'P'}{thousandths:08d}"


def parse_occ(symbol: str, underlying: str) -> tuple[dt.date, bool, float]:
    """(expiration, is_call, strike) of an OCC symbol on ``underlying``; ValueError otherwise."""
    from data_factory.alpaca_feed import parse_occ_symbol

    parsed = parse_occ_symbol(symbol)
    if parsed is None or parsed[0] != underlying:
        raise ValueError(f"{symbol!r} is not an OCC option symbol on {underlying}")
    _, days, is_call, strike = parsed
    return dt.date(1970, 1, 1) + dt.timedelta(days=days), is_call, strike


def condor_legs(condor: IronCondor, underlying: str, action: str) -> tuple[Leg, ...]:
    """The four legs of ``condor`` for an ``open`` or a ``close`` order, in the engine's leg order."""
    opening = action == "open"
    legs = []
    for strike, is_call, open_side in zip(condor.strikes, condor.is_call, _OPEN_SIDES):
        side = open_side if opening else ("sell" if open_side == "buy" else "buy")
        intent = f"{side}_to_{'open' if opening else 'close'}"
        legs.append(Leg(occ_symbol(underlying, condor.expiration, bool(is_call), float(strike)), side, intent))
    return tuple(legs)


def unit_prices(quotes: LegQuotes, opening: bool) -> UnitPrices:
    """Net price of one condor unit from its legs' quotes: an open's credit (shorts at the bid,
    longs at the ask for the natural price), a close's debit (shorts at the ask, longs at the bid)."""
    bid, ask = np.asarray(quotes.bid, dtype=float), np.asarray(quotes.ask, dtype=float)
    mid = (bid + ask) / 2.0
    shorts, longs = np.array([1, 2]), np.array([0, 3])
    mid_value = mid[shorts].sum() - mid[longs].sum()
    if opening:
        return UnitPrices(mid_value, bid[shorts].sum() - ask[longs].sum())
    return UnitPrices(mid_value, ask[shorts].sum() - bid[longs].sum())


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LiveOptions:
    """What the command line says about this live run."""

    out: Path
    dry_run: bool = False
    max_bars: int | None = None
    poll_seconds: float = 15.0
    live_money: bool = False
    credentials: str | None = None


def refused_settings(config: Config) -> list[str]:
    """Settings the live driver cannot act on yet: accepted by a backtest, refused here rather
    than silently ignored."""
    problems = []
    if config.hedge.enable_hedge:
        problems.append("hedge.enable_hedge (--enable-hedge): share hedges are not traded live yet")
    if config.exits.dte_exit == 0:
        # Held to expiry, Alpaca exercises an in-the-money leg into shares and removes the
        # expired contracts overnight: the broker's account then differs from the condor the
        # engine settled, and the next start refuses to trade on the mismatch.
        problems.append("exits.dte_exit = 0 (hold to expiry): a live condor must be closed before it expires "
                        "(an in-the-money leg is exercised into shares at Alpaca); set exits.dte_exit to 1 or more")
    return problems


def confirm_live_money(read: Callable[[str], str] = input, interactive: bool | None = None) -> None:
    """The typed confirmation a live-money account needs; BrokerSetupError without it."""
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise BrokerSetupError(f"--live-money needs the typed confirmation {LIVE_MONEY_CONFIRMATION!r} on a terminal")
    answer = read(f"This trades REAL MONEY on Alpaca. Type '{LIVE_MONEY_CONFIRMATION}' to go on: ")
    if answer.strip() != LIVE_MONEY_CONFIRMATION:
        raise BrokerSetupError("live-money confirmation not given; nothing was sent")


def check_account(account: Mapping) -> None:
    """An account that can trade multi-leg options, or BrokerSetupError saying why not."""
    if str(account.get("status", "")).upper() not in ("ACTIVE", "ACCOUNTSTATUS.ACTIVE"):
        raise BrokerSetupError(f"the Alpaca account is {account.get('status')!r}, not ACTIVE")
    if account.get("trading_blocked") or account.get("account_blocked"):
        raise BrokerSetupError("the Alpaca account is blocked from trading")
    level = account.get("options_trading_level")
    if level is None or int(level) < 3:
        raise BrokerSetupError(f"the Alpaca account's options level is {level}; an iron condor as one multi-leg "
                               f"order needs level 3 (options approval in the Alpaca dashboard)")


def check_delta_band(chain, config: Config) -> None:
    """The start-up check on a chain snapshot: the nearest expiry in the DTE window must list a put
    and a call with |delta| inside the short-strike band and a bid. A chain without one can never
    open a condor (the engine would reject every bar as no_put/no_call_in_delta_band), so the run
    is refused with a ConfigError naming what the chain does hold."""
    from strategies.options_strategy import Rejection, choose_iron_condor

    strategy = config.strategy
    nearest = chain.expiration.min()
    choice = choose_iron_condor(chain.select(chain.expiration == nearest), config, expiration=nearest)
    if not isinstance(choice, Rejection) or choice.reason not in ("no_put_in_delta_band", "no_call_in_delta_band"):
        return
    side = "put" if choice.reason == "no_put_in_delta_band" else "call"
    rows = (chain.expiration == nearest) & (chain.is_call == (side == "call")) & np.isfinite(chain.delta)
    held = np.abs(chain.delta[rows])
    span = (f"|delta| {held.min():.3f} … {held.max():.3f} over {int(rows.sum())} {side}s" if held.size
            else f"no {side} with a delta")
    raise ConfigError(
        f"no {side} in the short-strike delta band at start: the chain at {chain.quote_time:%Y-%m-%d %H:%M} "
        f"(spot {chain.spot:.2f}, nearest expiry {np.datetime_as_string(nearest)} in DTE "
        f"{strategy.dte_min} … {strategy.dte_max}) has {span}, none with a bid inside "
        f"strategy.target_short_delta_low … high = {strategy.target_short_delta_low:g} … "
        f"{strategy.target_short_delta_high:g}; widen the band, the DTE window or live.chain_strike_range "
        f"(strikes within ±{config.live.chain_strike_range:.0%} of spot are fetched). No order was sent.")


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------

class LiveSession:
    """One live run: the engine, its portfolio and risk manager, the feed, the order desk and the
    per-bar account record. ``features_of(feed)`` builds the feature table of every bar the feed
    has (``live_features``)."""

    def __init__(self, config: Config, broker: AlpacaBroker, feed, journal: Journal, desk: OrderDesk,
                 options: LiveOptions, features_of: Callable | None = None,
                 say: Callable[[str], None] | None = None):
        from core.execution import FillModel, fee_schedule
        from core.portfolio import Portfolio
        from risk.risk_manager import RiskManager

        self.config = config
        self.broker = broker
        self.feed = feed
        self.journal = journal
        self.desk = desk
        self.options = options
        self.underlying = config.backtest.underlying
        self.features_of = features_of or partial(live_features, config)
        self.say = say or (lambda line: None)
        self.fill_model = FillModel.from_config(config.backtest)
        # The broker's fees (no commission on options at Alpaca, regulatory fees per contract),
        # whatever backtest.fees says: a live fill pays what the broker charges.
        self.fees = fee_schedule(LIVE_FEES)
        self.risk = RiskManager(config)
        self.portfolio = Portfolio(config.backtest.cash)
        self.engine = None
        self.position_keys: dict[int, str] = {}       # engine position id -> the journal's position id
        self.account_rows: list[dict] = []
        self.bar_stamps: list[pd.Timestamp] = []
        self.latencies: list[float] = []              # seconds from the bar's data in hand to the first order sent
        self.decision_seconds: list[float] = []       # seconds from the bar's data in hand to the decisions
        self.requests: list[int] = []                 # broker + data requests per decision bar
        self.data_seconds: list[float] = []           # seconds to fetch a bar's bars and chain snapshot
        self.starting_equity: float | None = None
        self.features_description: dict = {}
        # The last complete quotes of each open condor (engine position id -> (7, 4) array) and
        # the positions whose quotes at the current bar are missing (marked at those instead).
        self._last_quotes: dict[int, np.ndarray] = {}
        self.stale_positions: set[int] = set()
        self.stale_marks = 0                          # position-bars marked at an earlier quote

    # ---------------------------------------------------------------------------- start
    def start(self) -> list[str]:
        """Reconcile, then rebuild the open condors and the cash from the journal and the account."""
        account = self.broker.account()
        check_account(account)
        self.desk.reconcile()                  # what it did is in the desk's log and the journal
        done = []
        for position in self.journal.open_positions():
            expirations, strikes, calls = set(), [], []
            for leg in position["legs"]:
                expiration, is_call, strike = parse_occ(leg.symbol, self.underlying)
                expirations.add(expiration)
                strikes.append(strike)
                calls.append(is_call)
            if len(expirations) != 1 or calls != [False, False, True, True]:
                raise LiveError(f"journal position {position['position_id']} is not an iron condor of one expiry")
            expiration = expirations.pop()
            condor = IronCondor(expiration, self.feed.settlement_time(expiration), *strikes,
                                quantity=int(position["open"]))
            fill = Fill(pd.Timestamp(position["opened_at"]), 0, Action.OPEN, (math.nan,) * 4,
                        float(position["entry_credit"]), int(position["open"]), 0.0, "entry")
            opened = self.portfolio.open_position(condor, fill, position["context"])
            self.position_keys[opened.position_id] = position["position_id"]
            done.append(f"open condor {position['position_id']}: {position['open']} unit(s) from the journal")
        # The broker's cash is the truth (credits received, fees paid, whatever else happened).
        self.portfolio.cash = float(account["cash"])
        self.starting_equity = float(account.get("equity") or account["cash"])
        return done

    # ---------------------------------------------------------------------------- one bar
    def requests_made(self) -> int:
        """HTTP requests so far, broker and data together."""
        return self.broker.requests + getattr(self.feed, "requests", 0)

    def held_symbols(self) -> list[str]:
        """The OCC symbols of every leg of the condors open now (the feed quotes them each bar)."""
        return [leg.symbol for position in self.portfolio.open_positions.values()
                for leg in condor_legs(position.condor, self.underlying, "open")]

    def step(self, bar: int, requests_before: int | None = None) -> list[TradeDecision]:
        """The decisions at ``bar`` (the bar that just closed) and their orders. ``requests_before``:
        the request count before the bar's data was fetched (for requests per bar)."""
        from core.engine import BarClock, TradingEngine
        from intelligence.features import FeatureRow

        started = time.perf_counter()
        if requests_before is None:
            requests_before = self.requests_made()
        features = self.features_of(self.feed)
        self.features_description = dict(getattr(features, "description", {}) or {})
        clock = BarClock.from_times(self.feed.bar_times)
        if self.engine is None:
            self.engine = TradingEngine(self.config, self.portfolio, self.fill_model, clock, features, self.risk)
            # Entries made before a restart count toward the daily limit.
            self.engine._entries_by_session.update(self.journal.entries_by_session())
        else:
            self.engine.extend(clock, features)
        snapshot = self._snapshot(bar, clock, FeatureRow(self.engine.feature_columns, bar))
        decisions = self.engine.on_bar(snapshot)
        self.decision_seconds.append(time.perf_counter() - started)
        first_order = None
        for decision in decisions:
            if decision.action is Action.HOLD:
                continue
            if first_order is None:
                first_order = time.perf_counter() - started
            self._execute(decision, snapshot)
        if first_order is not None:
            self.latencies.append(first_order)
        self._record(bar, snapshot)
        self.requests.append(self.requests_made() - requests_before)
        return decisions

    def _snapshot(self, bar: int, clock, features) -> MarketSnapshot:
        feed = self.feed
        return MarketSnapshot(
            timestamp=feed.bar_times[bar], bar_index=bar, session_day=int(clock.session_day[bar]),
            symbol=self.underlying, spot=float(feed.spot_bars().iloc[bar]),
            iv_index=float(feed.iv_index_bars().iloc[bar]),
            chain=partial(_chain, feed, bar), nearest_chain=partial(nearest_expiry_slice, feed, bar),
            quote=partial(condor_leg_quotes, feed, bar), quote_many=partial(self._quote_many_carried, bar),
            settlement_of=feed.settlement_time, features=features)

    def _quote_many_carried(self, bar: int, positions):
        """The open condors' quotes at ``bar``; a condor with a leg the snapshot did not quote
        (the vendor dropped it for a bar) is marked at its last complete quotes instead of NaN,
        until its settlement, and listed in ``stale_positions`` so no order is priced from them."""
        from data_factory.option_chain import StructureQuotes

        quotes = _quote_many(self.feed, bar, positions)
        table = np.stack(quotes)                                   # (7, k, 4)
        stamp = self.feed.bar_times[bar]
        for k, position in enumerate(positions):
            key = position.position_id
            if np.isfinite(table[:3, k]).all():
                self._last_quotes[key] = table[:, k].copy()
                if key in self.stale_positions:
                    self.stale_positions.discard(key)
                    self.journal.event("quotes_back", f"{_describe(position.condor)}: quoted again at {stamp}")
                continue
            last = self._last_quotes.get(key)
            if last is None or stamp >= position.condor.settlement:
                continue
            table[:, k] = last
            self.stale_marks += 1
            if key not in self.stale_positions:
                self.stale_positions.add(key)
                message = (f"{_describe(position.condor)}: no complete quote at {stamp}; marked at its last quotes, "
                           f"no order is priced until it is quoted again")
                self.journal.event("stale_quote", message, "warning")
                self.say(f"[yellow]{message}[/yellow]")
        return StructureQuotes(*table)

    def _execute(self, decision: TradeDecision, snapshot: MarketSnapshot) -> None:
        opening = decision.action is Action.OPEN
        if decision.action is Action.HEDGE:
            raise LiveError("a hedge decision in a live run (hedging is refused at start)")
        if opening:
            condor = decision.condor
            position = None
        else:
            position = self.portfolio.position(decision.position_id)
            condor = position.condor
        legs = condor_legs(condor, self.underlying, "open" if opening else "close")
        action = "open" if opening else "close"
        iid = intent_id(action, snapshot.timestamp, legs, condor.quantity)
        key = iid if opening else self.position_keys[position.position_id]
        intent = Intent(iid, action, key, condor.quantity, legs, decision.reason,
                        {k: v for k, v in (decision.context or {}).items() if _plain(v)})
        quotes = snapshot.quote(condor)
        prices = unit_prices(quotes, opening)
        if not (math.isfinite(prices.mid) and math.isfinite(prices.natural)):
            # Never an order priced from a missing quote: the decision comes again next bar.
            message = f"{action} of {_describe(condor)} deferred: no complete quote at {snapshot.timestamp}"
            self.journal.event("deferred", message, "warning")
            self.say(f"[yellow]{message}[/yellow]")
            return
        if self.options.dry_run:
            self.journal.record_intent(intent, at=snapshot.timestamp)
            self.journal.intent_update(iid, "dry_run", 0)
            self.desk.event("dry_run", f"{iid}: would {action} {condor.quantity} condor(s) {[l.symbol for l in legs]} "
                                       f"from mid {prices.mid:.2f} toward {prices.natural:.2f} ({decision.reason})")
            self.say(f"dry run: would {action} {condor.quantity} × {_describe(condor)} ({decision.reason})")
            return
        execution = self.desk.execute(intent, lambda: prices)
        if not execution.filled_qty:
            self.say(f"{action} of {_describe(condor)} {execution.status}")
            return
        from core.execution import CONDOR_RATIOS, order_fees

        filled = execution.filled_qty
        price = float(execution.average_price)
        fees = float(order_fees(self.fees, filled, CONDOR_RATIOS, opening))
        stamp = self.broker.clock()["timestamp"].tz_convert(EXCHANGE_TZ)
        if opening:
            condor = dataclasses.replace(condor, quantity=filled)
            fill = Fill(stamp, 0, Action.OPEN, tuple(float(p) for p in quotes.mid), price, filled, fees, decision.reason)
            opened = self.portfolio.open_position(condor, fill, decision.context)
            self.position_keys[opened.position_id] = iid
        else:
            fill = Fill(stamp, position.position_id, Action.CLOSE, tuple(float(p) for p in quotes.mid), -price, filled,
                        fees, decision.reason)
            if filled >= condor.quantity:
                self.portfolio.close_position(position.position_id, fill)
            else:
                self.portfolio.close_part(position.position_id, fill)
        self.say(f"{action} {filled} × {_describe(condor)} at {price:.2f} ({decision.reason})")

    def _record(self, bar: int, snapshot: MarketSnapshot) -> None:
        from core.portfolio import account_marks

        positions = list(self.portfolio.open_positions.values())
        rows = None
        if positions:
            quotes = snapshot.quote_many(positions)
            rows = self.engine.evaluate(positions, quotes, np.array([snapshot.spot]),
                                        np.array([snapshot.session_day], dtype=np.int64))
        marks = account_marks(self.portfolio.cash, self.portfolio.hedge_shares, snapshot.spot,
                              float(self.config.hedge.share_cost), rows)
        self.risk.observe(snapshot.session_day, float(marks.equity))
        self.bar_stamps.append(snapshot.timestamp)
        self.account_rows.append({
            "cash": float(marks.cash), "equity": float(marks.equity),
            "equity_liquidation": float(marks.equity_liquidation), "underlying_price": float(snapshot.spot),
            "open_positions": len(positions),
            "hedge_shares": int(self.portfolio.hedge_shares), "net_delta": float(marks.delta),
            "net_gamma": float(marks.gamma), "net_vega": float(marks.vega), "net_theta": float(marks.theta)})

    # ---------------------------------------------------------------------------- report
    def result(self):
        """The run so far as the backtest's RunResult (trades, equity, metrics)."""
        from core.backtest_engine import BacktestResult, run_result

        equity = pd.DataFrame(self.account_rows, index=pd.DatetimeIndex(self.bar_stamps, name="timestamp"))
        engine = self.engine
        raw = BacktestResult(list(self.portfolio.closed), equity, dict(engine.rejections) if engine else {}, "live",
                             len(self.account_rows), 0.0, {}, list(engine.risk_events) if engine else [], [])
        return run_result(self.config, raw, self.features_description,
                          cash=self.starting_equity or self.config.backtest.cash)

    def status_line(self) -> str:
        stamp = self.bar_stamps[-1] if self.bar_stamps else None
        equity = self.account_rows[-1]["equity"] if self.account_rows else math.nan
        pnl = equity - (self.starting_equity or equity)
        spot = float(self.feed.spot_bars().iloc[-1]) if len(self.feed.bar_times) else math.nan
        return (f"{stamp:%Y-%m-%d %H:%M} {self.underlying} {spot:.2f} | open condors "
                f"{len(self.portfolio.open_positions)} | P&L {pnl:+,.2f} | next: the bar closing at "
                f"{(stamp + pd.Timedelta(minutes=5)):%H:%M}" if stamp is not None else "waiting for the first bar")


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _describe(condor: IronCondor) -> str:
    return (f"{condor.expiration:%Y-%m-%d} {condor.long_put_strike:g}/{condor.short_put_strike:g}P "
            f"{condor.short_call_strike:g}/{condor.long_call_strike:g}C")


def _chain(feed, bar, dte_min=None, dte_max=None):
    return feed.slice_at(bar, dte_min=dte_min, dte_max=dte_max)


def _quote_many(feed, bar, positions):
    expirations = np.array([p.condor.expiration for p in positions], dtype="datetime64[D]")
    strikes = np.array([[p.condor.long_put_strike, p.condor.short_put_strike, p.condor.short_call_strike,
                         p.condor.long_call_strike] for p in positions])
    return feed.quote_structures(bar, expirations, strikes)


class NeuralPerBar:
    """μ_Mamba per bar for a live run, each bar's value computed once, when the bar closes: the
    value the engine knew then (the forecaster reads only a window ending at the bar), and one
    window of inference per bar instead of the whole history every bar."""

    def __init__(self, forecaster):
        self.forecaster = forecaster
        self.path = str(forecaster.path)
        self._known: dict[int, float] = {}

    def __call__(self, config: Config, inputs: Mapping) -> np.ndarray:
        from core.market_data import earlier_session_closes, neural_memberships

        target = np.asarray(inputs["target"], dtype=np.int64)
        missing = np.array([t for t in target.tolist() if t not in self._known], dtype=np.int64)
        if missing.size:
            values = neural_memberships(self.forecaster, inputs["base"], inputs["session_close_ns"],
                                        inputs["daily_iv"], missing, config,
                                        earlier_closes=earlier_session_closes(inputs))
            self._known.update(zip(missing.tolist(), np.asarray(values, dtype=float).tolist()))
        return np.array([self._known[t] for t in target.tolist()], dtype=float)


def live_features(config: Config, feed, neural: NeuralPerBar | None = None):
    """The feature table of every bar ``feed`` has: ``intelligence.features.compute_bar_features``
    on the feed's inputs, rebuilt each bar over the warm-up and the day (causal, so the rows of
    earlier bars do not change). ``neural``: μ_Mamba per bar from the DeepMamba checkpoint (None
    leaves it neutral, as a backtest without the checkpoint does)."""
    from intelligence.features import compute_bar_features

    inputs = feed.feature_inputs()
    values = neural(config, inputs) if neural is not None else None
    features = compute_bar_features(config, inputs["base"], inputs["target"], feed.iv_index_bars().to_numpy(),
                                    inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"], neural=values,
                                    session_close_ns=inputs["session_close_ns"])
    features.description["data"] = feed.describe()
    features.description["neural"] = neural.path if neural is not None else "neutral (0.5)"
    return features


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def data_clients(credentials: Credentials, endpoints: Endpoints, timeout: float):
    """alpaca-py's stock and option data clients on ``endpoints.data_url``, with the same request
    timeout as the trading client and the SDK's fixed-wait retry off (the feed reports errors)."""
    from alpaca.data.historical.option import OptionHistoricalDataClient
    from alpaca.data.historical.stock import StockHistoricalDataClient

    from core.broker import DATA_URL, _harden

    override = None if endpoints.data_url == DATA_URL else endpoints.data_url
    stock = StockHistoricalDataClient(credentials.key_id, credentials.secret_key, url_override=override)
    option = OptionHistoricalDataClient(credentials.key_id, credentials.secret_key, url_override=override)
    for client in (stock, option):
        _harden(client, timeout)
    return stock, option


def write_report(session: LiveSession, out: Path, argv) -> Path:
    """Rewrite ``out/report`` (the backtest's run-folder layout) with the run so far; the folder
    is swapped in whole, so a reader never sees half of it."""
    from core.report import write_run

    result = session.result()
    staging, target, old = out / ".report-new", out / "report", out / ".report-old"
    for stale in (staging, old):
        shutil.rmtree(stale, ignore_errors=True)
    run_info = {"command": "python core/main.py " + " ".join(argv), "engine": "live (Alpaca)",
                "dry_run": session.options.dry_run, "bars": len(session.account_rows),
                "decision_seconds_median": _median(session.decision_seconds),
                "decision_seconds_max": max(session.decision_seconds) if session.decision_seconds else None,
                "order_latency_seconds_median": _median(session.latencies),
                "data_fetch_seconds_median": _median(session.data_seconds),
                "requests_per_bar_median": _median(session.requests),
                "written_at": pd.Timestamp.now(tz="UTC").isoformat()}
    description = {"source": "Alpaca (live)", "synthetic": False, **session.features_description.get("data", {})}
    write_run(staging, config_dict=live_report_config(session), data_description=description, trades=result.trades,
              equity=result.equity, metrics=result.metrics, run_info=run_info,
              plot=bool(session.config.backtest.plot) and len(result.equity) > 1)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def live_report_config(session: LiveSession) -> dict:
    """The configuration as the live report shows it: the session's dates, the account's
    starting equity, the broker's fills and fees (the backtest's fill model and seed do not
    apply to live fills)."""
    config = session.config.to_dict()
    backtest = dict(config["backtest"])
    if session.bar_stamps:
        backtest["start"] = session.bar_stamps[0].date()
        backtest["end"] = session.bar_stamps[-1].date()
    backtest.update(engine="live (Alpaca)", fees=f"{LIVE_FEES} (the broker's)",
                    fill_model="the broker's (one multi-leg limit order per condor, stepped mid → natural)",
                    cash=session.starting_equity if session.starting_equity is not None else backtest["cash"])
    for key in ("fill_spread_fraction", "fill_on_next_bar", "seed", "samples"):
        backtest.pop(key, None)
    config["backtest"] = backtest
    return config


def _journal_has_open_positions(path: Path) -> bool:
    journal = Journal(path)
    try:
        return bool(journal.open_positions())
    finally:
        journal.close()


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


def run(args, config: Config, argv) -> int:
    """``python core/main.py --mode live``: see the module docstring. Exit 0 when the run ends
    (``--max-bars`` reached), 2 when it cannot start, 1 when it stops on a fault, 130 on Ctrl-C."""
    from rich.console import Console

    from core.broker import endpoints_from_env, load_credentials
    from core.market_data import load_configured_forecaster, uses_neural

    console = Console(stderr=False, highlight=False)
    live = config.live
    options = LiveOptions(out=Path(args.out or "runs/live"), dry_run=bool(args.dry_run), max_bars=args.max_bars,
                          poll_seconds=float(args.poll_seconds or live.poll_seconds),
                          live_money=bool(args.live_money), credentials=args.credentials)
    problems = refused_settings(config)
    if problems:
        raise ConfigError("the live driver cannot act on: " + "; ".join(problems))
    credentials = load_credentials(path=options.credentials)
    endpoints = endpoints_from_env(live_money=options.live_money)
    if options.live_money:
        confirm_live_money()

    def log(kind: str, message: str) -> None:
        console.print(f"[dim]{kind}[/dim] {message}")

    broker = AlpacaBroker(credentials, endpoints, timeout=live.request_timeout,
                          policy=RetryPolicy(base_wait=live.retry_base_wait, breaker_failures=live.breaker_failures,
                                             breaker_cooldown=live.breaker_cooldown), log=log)
    # The account before anything is written: a run that cannot trade leaves no run folder.
    try:
        check_account(broker.account())
    except BrokerError as error:
        raise BrokerSetupError(f"the Alpaca account could not be read at {endpoints.trading_url}: {error}") from None
    from data_factory.alpaca_feed import AlpacaFeed

    stock, option = data_clients(credentials, endpoints, live.request_timeout)
    feed = AlpacaFeed(stock, option, underlying=config.backtest.underlying, stock_feed=live.stock_feed,
                      option_feed=live.option_feed, dte_min=config.strategy.dte_min, dte_max=config.strategy.dte_max,
                      base_bar_minutes=config.mtf.base_bar_minutes, warmup_sessions=live.warmup_sessions,
                      strike_range=live.chain_strike_range, request_timeout_s=live.request_timeout)
    # History and one chain snapshot before anything is written, too: a run whose data cannot be
    # read, or whose chain holds no short strike in the delta band, leaves no run folder.
    journal_path = options.out / "journal.sqlite"
    try:
        clock = broker.clock()
        feed.warm_up(clock["timestamp"])
        chain = feed.probe_chain()
    except BrokerError as error:
        raise BrokerSetupError(f"the broker's clock could not be read at start: {error}") from None
    try:
        check_delta_band(chain, config)
    except ConfigError as error:
        if not (journal_path.exists() and _journal_has_open_positions(journal_path)):
            raise
        # A restart with condors open: they are still managed; new entries wait for the band.
        log("start", f"warning: {error}")
    options.out.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path)
    broker._log = lambda kind, message: (journal.event(kind, message, "warning"), log(kind, message))
    now = {"stamp": None}
    desk = OrderDesk(broker, journal, DeskSettings(live.price_steps, live.step_seconds, live.order_poll_seconds,
                                                   uncertain_grace_seconds=2 * live.request_timeout,
                                                   max_orders_per_day=live.max_orders_per_day),
                     underlying=config.backtest.underlying, log=log, stamp=lambda: now["stamp"])
    forecaster = load_configured_forecaster(config, explicit=False) if uses_neural(config) else None
    neural = NeuralPerBar(forecaster) if forecaster is not None else None
    session = LiveSession(config, broker, feed, journal, desk, options,
                          features_of=partial(live_features, config, neural=neural), say=console.print)
    try:
        for line in session.start():
            console.print(f"[dim]start[/dim] {line}")
    except BrokerError as error:
        raise BrokerSetupError(f"the broker could not be read at start: {error}") from None
    mode = "DRY RUN (no order is sent)" if options.dry_run else ("LIVE MONEY" if endpoints.live_money else "paper")
    console.print(f"CondorBrain live: {mode}; trading {endpoints.trading_url}; journal {journal.path}")
    bars = 0
    failures = 0                           # polls in a row that failed
    closed_said = False
    try:
        now["stamp"] = clock["timestamp"]
        # The warm-up's features (and μ_Mamba over its history) now, not in the first bar's decision.
        session.features_of(feed)
        while options.max_bars is None or bars < options.max_bars:
            try:
                clock = broker.clock()
                now["stamp"] = clock["timestamp"]
                if not clock["is_open"]:
                    if not closed_said:
                        console.print(f"market closed at {clock['timestamp']:%Y-%m-%d %H:%M %Z}; next open "
                                      f"{clock['next_open']:%Y-%m-%d %H:%M %Z}")
                        closed_said = True
                    # Until a minute before the open, at most 60 polls' worth at a time (15 minutes
                    # at the default poll; the broker's clock is read again after each wait).
                    until_open = (clock["next_open"] - clock["timestamp"]).total_seconds() - 60.0
                    time.sleep(min(max(options.poll_seconds, until_open), 60.0 * options.poll_seconds))
                    continue
                closed_said = False
                before = session.requests_made() - 1          # the clock read above belongs to this bar
                fetch_started = time.perf_counter()
                feed.track(session.held_symbols())
                bar = feed.refresh(clock["timestamp"])
                if bar is None:
                    time.sleep(options.poll_seconds)
                    continue
                session.data_seconds.append(time.perf_counter() - fetch_started)
                session.step(bar, before)
                bars += 1
                write_report(session, options.out, argv)
                console.print(session.status_line())
            except CircuitOpen as error:
                if broker.breaker.trips >= live.max_breaker_trips:
                    raise LiveError(f"the API kept failing (circuit opened {broker.breaker.trips} times): {error}"
                                    ) from None
                journal.event("circuit_open", str(error), "error")
                console.print(f"[yellow]{error}[/yellow]")
                time.sleep(max(options.poll_seconds, live.breaker_cooldown))
            except (BrokerError, DataError) as error:
                # A request that failed after its retries: the bar is skipped and the next poll
                # tries again; the circuit breaker ends a run whose API keeps failing. A refusal
                # (4xx other than 429: keys revoked, a bad request) ends it at once.
                status = getattr(error, "status", None)
                if status is not None and 400 <= status < 500 and status != 429:
                    raise
                failures += 1
                if failures > live.breaker_failures * live.max_breaker_trips:
                    raise LiveError(f"{failures} polls in a row failed; last: {error}") from None
                journal.event("api_error", str(error), "error")
                console.print(f"[yellow]{error}[/yellow]")
                time.sleep(options.poll_seconds)
            else:
                failures = 0
    except KeyboardInterrupt:
        stopped = desk.cancel_working()
        write_report(session, options.out, argv) if session.account_rows else None
        console.print(f"stopped by Ctrl-C; {stopped}; journal {journal.path}")
        return 130
    except (LiveError, BrokerError, DataError) as error:
        journal.event("stopped", str(error), "error")
        try:
            console.print(desk.cancel_working())
        except BrokerError:
            console.print("[red]could not cancel working orders; they are in the journal and are reconciled at the "
                          "next start[/red]")
        if session.account_rows:
            write_report(session, options.out, argv)
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        journal.close()
    console.print(f"done: {bars} bar(s); report {options.out / 'report'}; decision median "
                  f"{(_median(session.decision_seconds) or 0) * 1000:.0f} ms; requests per bar median "
                  f"{_median(session.requests) or 0:.0f}")
    return 0
