"""Stage 3: the RiskManager, the single gate every open decision passes in every driver.

It sees the whole book (a read-only ``Book`` the engine builds at each bar) and never places
orders. What it owns:

- **Sizing** (``size``): the contracts of a proposed condor, as the minimum of every rule's
  allowance, each a whole number of condors:
  1. base: ``strategy.quantity``; with ``sizing.dynamic_sizing`` the condors
     ``sizing.position_size_pct`` of equity pays for at max loss, Q_budget, scaled by the fuzzy
     confidence C when ``fuzzy.use_fuzzy``: Q_fuzzy = max(1, ⌊C · Q_budget⌋) — C decides how much
     of the budget to use, never less than one condor while the budget pays for one (the fuzzy
     floor ``fuzzy.min_confidence`` decides whether to trade at all);
  2. risk budget (seed): Q_risk = ⌊``risk.max_account_risk_per_trade`` · equity / max loss per
     condor⌋;
  3. allocation: the max loss of every open condor plus this one within ``strategy.max_alloc``
     of equity, and within the cash (buying power of a defined-risk spread);
  4. Greeks: the trade's own |delta|, |gamma|, |vega|, |theta| within ``risk.max_trade_*`` and
     the portfolio's net Greeks after the trade within ``risk.max_portfolio_*``.
  Q_final = min(all); 0 means no trade, and the rule that cut it is the rejection reason.
- **Entry blocks** (``entry_block``): ``strategy.max_positions``, the kill switch's halt for
  the session, the total-drawdown halt.
- **The kill switch** (``check_drawdown`` per bar, ``first_drawdown_breach`` over a range of
  bars for the fast driver): equity at mid (realized + unrealized, hedge included) below the
  previous session close's equity by more than ``risk.daily_drawdown_limit`` halts new entries
  for the rest of the session (and, with ``risk.kill_switch_flatten``, closes every position);
  below the running peak by more than ``risk.max_drawdown_limit`` halts them for the rest of the
  run. The halt lifts at the next session.
- **The delta hedge** (``hedge_shares``, ``first_hedge_trigger``): beyond ``hedge.hedge_threshold``
  net delta per condor open, trade shares back to neutral; unwind them when no condor is open.

The per-bar and the vectorised forms use the same comparisons on the same numbers, which keeps
the fast driver's skipped bars identical to the per-bar driver's.

Why written here: no maintained library gates multi-leg option structures on portfolio Greeks
with a latching session kill switch (NautilusTrader's RiskEngine checks notional and rate limits
per order; LEAN's drawdown model is not latching; see the engine anchors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

# Contracts computed as ⌊x / y⌋: a ratio a float rounding below a whole number is that number.
_FLOOR_TOLERANCE = 1e-9
# Greek caps compare sums of products of quotes; a cap hit exactly must not fail by float noise.
_CAP_TOLERANCE = 1e-9

GREEKS = ("delta", "gamma", "vega", "theta")
_NO_SESSION = -(1 << 62)

# Rejection reasons of the sizing chain, in the order the rules are applied.
SIZING_REASONS = ("position_size_pct_below_one", "fuzzy_confidence_missing", "risk_budget",
                  "max_alloc", "buying_power", *(f"trade_{g}_limit" for g in GREEKS),
                  *(f"portfolio_{g}_cap" for g in GREEKS))
ENTRY_BLOCKS = ("max_positions", "kill_switch_halt", "max_drawdown_halt")
# The allowances that set the base size (the others can only cut it).
BASE_RULES = ("quantity", "position_size_pct", "fuzzy")


@dataclass(frozen=True, slots=True)
class Book:
    """The account as the gate sees it at a bar, before this bar's entry: equity at mid, cash,
    the max loss committed by the condors that stay open, their count and contracts, and the
    portfolio's net Greeks (hedge shares in the delta)."""

    equity: float
    cash: float
    committed_max_loss: float = 0.0
    open_condors: int = 0
    open_contracts: int = 0
    delta: float = 0.0
    gamma: float = 0.0
    vega: float = 0.0
    theta: float = 0.0
    hedge_shares: int = 0


@dataclass(frozen=True, slots=True)
class Proposal:
    """One condor unit the engine wants to open: its max loss in dollars ((width − credit) × 100),
    its net Greeks per condor (Σ ratio·greek × 100, the units of ``risk`` caps) and the fuzzy
    confidence C (NaN when there is none)."""

    max_loss: float
    delta: float = 0.0
    gamma: float = 0.0
    vega: float = 0.0
    theta: float = 0.0
    confidence: float = math.nan


@dataclass(frozen=True, slots=True)
class Sizing:
    """The gate's answer: contracts (0 = refused), the rule that set the size (the rejection
    reason when 0; '' when nothing cut the base size) and every rule's allowance."""

    quantity: int
    reason: str
    allowances: dict = field(default_factory=dict)

    def explain(self) -> str:
        """The base allowance and every rule that allowed less, e.g. 'quantity 3, risk_budget 1
        -> 1' (rules that allowed at least the base are left out)."""
        parts, base = [], None
        for name, value in self.allowances.items():
            if name in BASE_RULES:
                parts.append(f"{name} {value}")
                base = value
            elif base is None or value < base:
                parts.append(f"{name} {value}")
        return ", ".join(parts) + f" -> {self.quantity}"


@dataclass(frozen=True, slots=True)
class DrawdownTrigger:
    """The kill switch fired at this bar: ``kind`` 'kill_switch' (session) or 'max_drawdown'
    (from the peak), the equity and the reference it fell from, and whether to flatten."""

    kind: str
    equity: float
    reference: float
    limit: float
    flatten: bool

    @property
    def drawdown(self) -> float:
        return (self.reference - self.equity) / self.reference


def _floor_ratio(numerator: float, denominator: float) -> int:
    if denominator <= 0.0:
        return 1 << 30
    return max(0, math.floor(numerator / denominator + _FLOOR_TOLERANCE))


def cap_range(current: float, per_unit: float, cap: float) -> tuple[int, int]:
    """(lowest, highest) whole q ≥ 1 with |current + q·per_unit| ≤ cap: the quantities a cap
    allows form one interval (a large highest when per_unit is 0 and the book is inside; lowest
    > highest when none fits). A book already beyond the cap allows only trades that bring it
    back inside, which may need more than one unit. None fits: (1, 0)."""
    big = 1 << 30
    if per_unit == 0.0:
        return (1, big) if abs(current) <= cap + _CAP_TOLERANCE else (1, 0)
    # |current + q·u| ≤ cap  ⇔  (−cap − current)/u ≤ q ≤ (cap − current)/u  (bounds swap for u < 0).
    low, high = (-cap - current) / per_unit, (cap - current) / per_unit
    if per_unit < 0.0:
        low, high = high, low
    lowest = max(1, math.ceil(low - _FLOOR_TOLERANCE))
    highest = math.floor(high + _FLOOR_TOLERANCE)
    if highest < lowest:
        return 1, 0                      # none fits
    return lowest, min(highest, big)


def max_within_cap(current: float, per_unit: float, cap: float) -> int:
    """The largest whole q ≥ 1 with |current + q·per_unit| ≤ cap, or 0 when no q ≥ 1 fits."""
    lowest, highest = cap_range(current, per_unit, cap)
    return highest if lowest <= highest else 0


class RiskManager:
    """The Stage-3 gate and its state for one run (halts, session reference equity, peak)."""

    def __init__(self, config):
        self.config = config
        risk, hedge = config.risk, config.hedge
        self.limits_on = bool(risk.use_risk_limits)
        self.hedging = bool(hedge.enable_hedge)
        self.daily_limit = float(risk.daily_drawdown_limit) if self.limits_on else None
        self.total_limit = (float(risk.max_drawdown_limit)
                            if self.limits_on and risk.max_drawdown_limit is not None else None)
        self.flatten = bool(risk.kill_switch_flatten)
        self.max_positions = int(config.strategy.max_positions)
        self.hedge_threshold = float(hedge.hedge_threshold)
        self.share_cost = float(hedge.share_cost)
        starting = float(config.backtest.cash)
        # What the drawdown rules compare against, from the recorded equity (``observe``).
        self._last_session = _NO_SESSION  # session day of the last recorded bar
        self._session_open = starting    # equity at the close of the session before it
        self._last_equity = starting     # equity of the last recorded bar
        self._peak = starting
        self.halted_session = _NO_SESSION  # session day halted by the kill switch
        self.halted_for_good = False     # the total drawdown limit fired

    # ----------------------------------------------------------------------------- entries
    def entry_block(self, session_day: int, open_condors: int) -> str | None:
        """None when a new condor may be considered at this bar, else why not."""
        if open_condors >= self.max_positions:
            return "max_positions"
        if self.halted_for_good:
            return "max_drawdown_halt"
        if session_day == self.halted_session:
            return "kill_switch_halt"
        return None

    def session_halted(self, session_day: int) -> bool:
        return self.halted_for_good or session_day == self.halted_session

    def size(self, proposal: Proposal, book: Book) -> Sizing:
        """Contracts for ``proposal`` given ``book`` (the module docstring lists the chain)."""
        config = self.config
        strategy, sizing = config.strategy, config.sizing
        risk = config.risk
        max_loss = proposal.max_loss
        allowances: dict[str, int] = {}
        if sizing.dynamic_sizing:
            budget = _floor_ratio(sizing.position_size_pct * book.equity, max_loss)
            allowances["position_size_pct"] = budget
            if budget < 1:
                return Sizing(0, "position_size_pct_below_one", allowances)
            if config.fuzzy.use_fuzzy:
                if not math.isfinite(proposal.confidence):
                    return Sizing(0, "fuzzy_confidence_missing", allowances)
                base = max(1, math.floor(proposal.confidence * budget + _FLOOR_TOLERANCE))
                allowances["fuzzy"] = base
            else:
                base = budget
        else:
            base = int(strategy.quantity)
            allowances["quantity"] = base
        quantity, reason = base, ""

        def cut(name: str, allowed: int) -> None:
            nonlocal quantity, reason
            allowances[name] = min(allowed, 1 << 30)
            if allowed < quantity:
                quantity, reason = allowed, name

        if self.limits_on:
            cut("risk_budget", _floor_ratio(risk.max_account_risk_per_trade * book.equity, max_loss))
        cut("max_alloc", _floor_ratio(strategy.max_alloc * book.equity - book.committed_max_loss, max_loss))
        cut("buying_power", _floor_ratio(book.cash - book.committed_max_loss, max_loss))
        floors: list[tuple[int, str]] = []
        if self.limits_on:
            for greek in GREEKS:
                per_unit = getattr(proposal, greek)
                trade_cap = getattr(risk, f"max_trade_{greek}")
                cut(f"trade_{greek}_limit", _floor_ratio(trade_cap, abs(per_unit)))
                lowest, highest = cap_range(getattr(book, greek), per_unit, getattr(risk, f"max_portfolio_{greek}"))
                if lowest > highest:
                    highest = 0
                elif lowest > 1:
                    floors.append((lowest, f"portfolio_{greek}_cap"))
                cut(f"portfolio_{greek}_cap", highest)
        for lowest, name in floors:
            # A book beyond a cap: only a trade large enough to bring it back inside may go.
            if quantity < lowest:
                quantity, reason = 0, name
        quantity = max(0, quantity)
        allowances = {name: value for name, value in allowances.items() if value < 1 << 30}
        return Sizing(quantity, reason if quantity < base else "", allowances)

    # ----------------------------------------------------------------------------- kill switch
    def observe(self, session_day: int, equity: float) -> None:
        """A recorded bar (equity at mid after its fills): keeps the previous session's closing
        equity for the kill switch and the running peak."""
        if session_day != self._last_session:
            self._session_open = self._last_equity
            self._last_session = session_day
        self._last_equity = equity
        if equity > self._peak:
            self._peak = equity

    def observe_range(self, session_days: np.ndarray, equities: np.ndarray) -> None:
        """``observe`` for consecutive recorded bars at once (the fast driver's skipped bars)."""
        if len(equities) == 0:
            return
        changes = np.flatnonzero(session_days[1:] != session_days[:-1])
        if changes.size:
            last_start = int(changes[-1]) + 1
            self._session_open = float(equities[last_start - 1])
            self._last_session = int(session_days[-1])
        elif int(session_days[0]) != self._last_session:
            self._session_open = self._last_equity
            self._last_session = int(session_days[0])
        self._last_equity = float(equities[-1])
        peak = float(equities.max())
        if peak > self._peak:
            self._peak = peak

    def _reference(self, session_day: int) -> float:
        # A bar of a session not recorded yet opens it: its reference is the last recorded equity.
        return self._session_open if session_day == self._last_session else self._last_equity

    def check_drawdown(self, session_day: int, equity: float) -> DrawdownTrigger | None:
        """At a bar, before its decisions, with the equity at mid: the kill switch's trigger, if
        it fires now (it fires once per session; the total limit once per run)."""
        if self.total_limit is not None and not self.halted_for_good:
            peak = self._peak if self._peak > equity else equity
            if peak - equity > self.total_limit * peak:
                self.halted_for_good = True
                return DrawdownTrigger("max_drawdown", equity, peak, self.total_limit, self.flatten)
        if self.daily_limit is not None and session_day != self.halted_session and not self.halted_for_good:
            reference = self._reference(session_day)
            if reference - equity > self.daily_limit * reference:
                self.halted_session = session_day
                return DrawdownTrigger("kill_switch", equity, reference, self.daily_limit, self.flatten)
        return None

    def first_drawdown_breach(self, session_days: np.ndarray, equities: np.ndarray) -> int | None:
        """Over consecutive bars without fills (their equity at mid): the offset of the first bar
        where ``check_drawdown`` would fire, else None. Does not change any state."""
        if len(equities) == 0 or (self.daily_limit is None and self.total_limit is None) or self.halted_for_good:
            return None
        hit = _first_breach(session_days, equities, self._last_session, self._session_open, self._last_equity,
                            self._peak, self.halted_session,
                            -1.0 if self.daily_limit is None else self.daily_limit,
                            -1.0 if self.total_limit is None else self.total_limit)
        return None if hit < 0 else hit

    # ----------------------------------------------------------------------------- hedge
    def hedge_shares(self, net_delta: float, open_contracts: int, shares_held: int) -> int:
        """Shares to trade now (signed, 0 = none): back to neutral when |net delta| is beyond the
        threshold × 100 × condor contracts open; everything back when no condor is open."""
        if not self.hedging:
            return 0
        if open_contracts == 0:
            return -shares_held
        if abs(net_delta) > self.hedge_threshold * 100.0 * open_contracts + _CAP_TOLERANCE:
            return -int(np.round(net_delta))
        return 0

    def first_hedge_trigger(self, net_deltas: np.ndarray, open_contracts: int, shares_held: int) -> int | None:
        """Over bars without fills (the book's net delta per bar): the offset of the first bar
        where ``hedge_shares`` would trade, else None."""
        if not self.hedging or len(net_deltas) == 0:
            return None
        if open_contracts == 0:
            return 0 if shares_held else None
        hits = np.flatnonzero((np.abs(net_deltas) > self.hedge_threshold * 100.0 * open_contracts + _CAP_TOLERANCE)
                              & (np.round(net_deltas) != 0.0))
        return int(hits[0]) if hits.size else None


# What to change when a rule sizes every candidate to zero (the run summary's one line).
SIZING_HINTS = {
    "position_size_pct_below_one": lambda c: (
        f"sizing.position_size_pct {c.sizing.position_size_pct:g} of equity pays for less than one condor at max "
        f"loss; raise --position-size-pct or --bt-cash"),
    "fuzzy_confidence_missing": lambda c: "the fuzzy confidence C was not available; check the feature warm-up",
    "risk_budget": lambda c: (
        f"risk.max_account_risk_per_trade {c.risk.max_account_risk_per_trade:g} × ${c.backtest.cash:,.0f} = "
        f"${c.risk.max_account_risk_per_trade * c.backtest.cash:,.0f} is less than one condor's max loss; raise "
        f"--max-account-risk, narrow the wings (--wing-max) or raise --bt-cash"),
    "max_alloc": lambda c: (
        f"strategy.max_alloc {c.strategy.max_alloc:g} of equity leaves no room for one condor's max loss; raise "
        f"--max-alloc or --bt-cash"),
    "buying_power": lambda c: "the cash does not cover one condor's max loss; raise --bt-cash",
    **{f"trade_{g}_limit": (lambda c, g=g: f"one condor's |{g}| exceeds risk.max_trade_{g} "
                                           f"{getattr(c.risk, 'max_trade_' + g):g}; raise it in the config")
       for g in GREEKS},
    **{f"portfolio_{g}_cap": (lambda c, g=g: f"the portfolio's net {g} would exceed risk.max_portfolio_{g} "
                                             f"{getattr(c.risk, 'max_portfolio_' + g):g}; raise --max-portfolio-{g}")
       for g in GREEKS},
}


@njit(cache=True)
def _first_breach(session_days, equities, last_session, session_open, last_equity, peak, halted_session,
                  daily_limit, total_limit):
    """``check_drawdown`` then ``observe`` bar by bar on a copy of the state (limits < 0 are off):
    the offset of the first bar that fires, or −1. The comparisons are ``check_drawdown``'s."""
    for i in range(equities.shape[0]):
        day = session_days[i]
        equity = equities[i]
        if total_limit >= 0.0:
            top = peak if peak > equity else equity
            if top - equity > total_limit * top:
                return i
        if daily_limit >= 0.0 and day != halted_session:
            reference = session_open if day == last_session else last_equity
            if reference - equity > daily_limit * reference:
                return i
        if day != last_session:
            session_open = last_equity
            last_session = day
        last_equity = equity
        if equity > peak:
            peak = equity
    return -1
