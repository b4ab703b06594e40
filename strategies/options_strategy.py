"""The mechanical iron condor: which expiry, which strikes, whether the credit is worth it, and
when an open condor must be closed.

Pure rules over a chain slice and quote arrays; no pricing (the chain carries the Greeks), no
state, no knowledge of drivers, nothing imported from ``core``: settings arrive as any object with
the ``Config`` sections' attributes (``config.strategy``, ``config.exits``). Exit rules take arrays
with a leading bar axis so the fast driver evaluates a whole holding period with the same
arithmetic the per-bar driver uses on one bar.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

# Exit codes in the order they are checked when several hold at the same bar: losses first
# (a stop must never be reported as something milder), then profit, then the time-based exits.
# `exit_code_scalar` returns these numbers.
NO_EXIT = 0
# Dollars per share: far below the $0.01 tick, far above float noise on prices of a few dollars.
PRICE_TOLERANCE = 1e-9
# The names are ``core.dto.ExitReason`` values (a str enum, so either spelling is a key).
EXIT_ORDER = ("stop_loss", "profit_take", "dte_exit", "max_hold")
EXIT_CODE = {reason: code for code, reason in enumerate(EXIT_ORDER, start=1)}
REASON_OF_CODE = {code: reason for reason, code in EXIT_CODE.items()}


class ExitRules(NamedTuple):
    """The exit-rule settings as the compiled evaluators take them (numba accepts a NamedTuple):
    the fill model's spread fraction (what closing would cost), ``exits`` thresholds and the
    early-assignment check."""

    fill_fraction: float
    profit_take_pct: float
    loss_close_multiple: float
    early_assignment_extrinsic: float
    dte_exit: int
    max_hold_days: int
    early_assignment_days: int

    @classmethod
    def from_settings(cls, exits, fill_fraction: float) -> "ExitRules":
        """From ``Config.exits`` and the fill model's fraction."""
        return cls(float(fill_fraction), float(exits.profit_take_pct), float(exits.loss_close_multiple),
                   float(exits.early_assignment_extrinsic), int(exits.dte_exit), int(exits.max_hold_days),
                   int(exits.early_assignment_days))


@dataclass(frozen=True)
class CondorChoice:
    """Strikes picked from one chain slice, with the quotes the credit test used and the legs'
    Greeks per share (leg order: long put, short put, short call, long call)."""

    expiration: np.datetime64
    dte: int
    strikes: np.ndarray
    bid: np.ndarray
    ask: np.ndarray
    short_put_delta: float
    short_call_delta: float
    delta: np.ndarray | None = None
    gamma: np.ndarray | None = None
    vega: np.ndarray | None = None
    theta: np.ndarray | None = None

    @property
    def put_width(self) -> float:
        return float(self.strikes[1] - self.strikes[0])

    @property
    def call_width(self) -> float:
        return float(self.strikes[3] - self.strikes[2])

    @property
    def width(self) -> float:
        return max(self.put_width, self.call_width)


@dataclass(frozen=True)
class Rejection:
    """Why no condor was proposed at this bar (shown in logs, counted in reports)."""

    reason: str


# Codes of _choose_legs: 0 a condor, else the rejection.
_CHOICE_REJECTIONS = ("", "no_put_in_delta_band", "no_call_in_delta_band", "no_put_wing_listed",
                      "no_call_wing_listed", "short_strikes_cross")


@njit(cache=True)
def _pick_short(rows, strike, abs_delta, bid, low, high, prefer_lower_strike):
    """Row of the short strike among ``rows``: |delta| inside [low, high] closest to the band's
    centre, with a positive bid; ties go to the further-from-the-money strike. −1 if none."""
    target = 0.5 * (low + high)
    best = -1
    best_distance = 0.0
    for row in rows:
        d = abs_delta[row]
        if not (d >= low and d <= high and bid[row] > 0.0):
            continue
        distance = abs(d - target)
        if (best < 0 or distance < best_distance
                or (distance == best_distance
                    and (strike[row] < strike[best] if prefer_lower_strike else strike[row] > strike[best]))):
            best = row
            best_distance = distance
    return best


@njit(cache=True)
def _pick_wing(rows, strike, short_strike, sign, widths):
    """Row of the long wing: the narrowest width of ``widths`` (narrowest first) listed on the
    $1 grid (strikes compared in cents); −1 if none is listed."""
    for width in widths:
        wanted = short_strike + sign * width
        for row in rows:
            if abs(strike[row] - wanted) < 0.005:
                return row
    return -1


@njit(cache=True)
def _choose_legs(on_expiry, is_call, strike, abs_delta, bid, low, high, put_widths, call_widths):
    """(code, long put, short put, short call, long call) rows of the condor on the rows
    ``on_expiry`` marks (a code from _CHOICE_REJECTIONS, 0 when chosen)."""
    puts = np.flatnonzero(on_expiry & ~is_call)
    calls = np.flatnonzero(on_expiry & is_call)
    short_put = _pick_short(puts, strike, abs_delta, bid, low, high, True)
    if short_put < 0:
        return 1, -1, -1, -1, -1
    long_put = _pick_wing(puts, strike, strike[short_put], -1.0, put_widths)
    if long_put < 0:
        return 3, -1, -1, -1, -1
    short_call = _pick_short(calls, strike, abs_delta, bid, low, high, False)
    if short_call < 0:
        return 2, -1, -1, -1, -1
    long_call = _pick_wing(calls, strike, strike[short_call], 1.0, call_widths)
    if long_call < 0:
        return 4, -1, -1, -1, -1
    if strike[short_put] > strike[short_call]:
        return 5, -1, -1, -1, -1
    return 0, long_put, short_put, short_call, long_call


def choose_iron_condor(chain, config, wings=None, expiration=None) -> CondorChoice | Rejection:
    """Pick the condor from a chain slice already limited to ``dte_min … dte_max``.

    Rules (documented choices where the seed is silent): the nearest expiry in the slice; each
    short strike is the one whose |delta| is closest to the centre of
    ``target_short_delta_low … high`` (puts and calls separately); each long wing is the narrowest
    listed width in ``wing_width_min … wing_width_max`` dollars, or in the per-side ranges of
    ``wings`` (a ``WingPlan``: the Stage-2 regime/skew/divergence adjustments). Puts are chosen
    before calls, so a chain that fails both is reported by its put side.
    """
    strategy = config.strategy
    if len(chain) == 0:
        return Rejection("no_expiry_in_dte_range")
    expirations = chain.expiration
    if expiration is None:
        # A slice of one expiry (the engine's nearest_chain) needs no search.
        expiration = expirations[0] if expirations[0] == expirations[-1] else expirations.min()
    on_expiry = expirations == expiration
    if wings is None:
        put_widths = call_widths = strikes_width_candidates(strategy)
    else:
        put_widths, call_widths = width_candidates(*wings.put_range), width_candidates(*wings.call_range)
    code, long_put, short_put, short_call, long_call = _choose_legs(
        on_expiry, chain.is_call, chain.strike, np.abs(chain.delta), chain.bid, strategy.target_short_delta_low,
        strategy.target_short_delta_high, put_widths, call_widths)
    if code:
        return Rejection(_CHOICE_REJECTIONS[code])
    legs = np.array([long_put, short_put, short_call, long_call])
    return CondorChoice(
        expiration=expiration, dte=int(chain.dte[short_put]), strikes=chain.strike[legs], bid=chain.bid[legs],
        ask=chain.ask[legs], short_put_delta=float(chain.delta[short_put]),
        short_call_delta=float(chain.delta[short_call]), delta=chain.delta[legs], gamma=chain.gamma[legs],
        vega=chain.vega[legs], theta=chain.theta[legs])


def strikes_width_candidates(strategy) -> np.ndarray:
    """Wing widths to try, narrowest first: whole dollars from ``wing_width_min`` to ``wing_width_max``."""
    return width_candidates(strategy.wing_width_min, strategy.wing_width_max)


def width_candidates(low: float, high: float) -> np.ndarray:
    """Whole-dollar widths from ``low`` to ``high``, narrowest first (``low`` alone when the range
    holds no whole dollar; the $1 strike grid then finds no wing unless ``low`` is whole)."""
    first = np.ceil(low - 1e-9)
    last = np.floor(high + 1e-9)
    if last < first:
        return np.array([low])
    return np.arange(first, last + 1.0)


def credit_is_sufficient(credit: float, width: float, config) -> bool:
    """The credit (at the fill model, per share) must be at least ``min_credit_to_width`` × width
    (a credit exactly at the minimum passes, whatever the float rounding of the product)."""
    return credit > 0.0 and credit >= config.strategy.min_credit_to_width * width - PRICE_TOLERANCE


@njit(cache=True)
def exit_code_scalar(close_debit: float, entry_credit: float, dte: int, days_held: int,
                     profit_take_pct: float, loss_close_multiple: float, dte_exit: int,
                     max_hold_days: int) -> int:
    """Exit code for one bar of one condor (0 = hold), in priority order: stop loss, profit take,
    DTE exit (``dte_exit`` 0 = off: hold to expiry), max hold. The one implementation of the rule;
    every caller goes through it."""
    pnl = entry_credit - close_debit
    # Prices sit on a cent grid; a threshold hit exactly must not miss by float noise
    # (0.9 − 0.54 = 0.35999999999999999 < 0.4 × 0.9), so compare with a tolerance far below a cent.
    if -pnl >= loss_close_multiple * entry_credit - PRICE_TOLERANCE:
        return 1
    if pnl >= profit_take_pct * entry_credit - PRICE_TOLERANCE:
        return 2
    if dte_exit > 0 and dte <= dte_exit:
        return 3
    if days_held >= max_hold_days:
        return 4
    return 0


@njit(cache=True)
def _exit_codes_kernel(close_debit, entry_credit, dte, days_held, profit_take_pct, loss_close_multiple,
                       dte_exit, max_hold_days):
    codes = np.zeros(close_debit.size, dtype=np.int8)
    for i in range(close_debit.size):
        codes[i] = exit_code_scalar(close_debit[i], entry_credit, dte[i], days_held[i], profit_take_pct,
                                    loss_close_multiple, dte_exit, max_hold_days)
    return codes


def exit_codes(close_debit: np.ndarray, entry_credit: float, dte: np.ndarray, days_held: np.ndarray,
               config) -> np.ndarray:
    """Exit code per bar (0 = hold) for one open condor.

    ``close_debit``: what closing would cost per share at the fill model; ``dte``: calendar days
    from the bar's session to expiry; ``days_held``: calendar days since the entry session.
    Profit take: P&L ≥ profit_take_pct × credit; stop loss: loss ≥ loss_close_multiple × credit
    (seed formulas, P&L per share at the closing price). A NaN debit (no quote) never triggers.
    """
    exits = config.exits
    debit = np.ascontiguousarray(close_debit, dtype=np.float64).ravel()
    shape = np.shape(close_debit)
    dte = np.broadcast_to(np.asarray(dte, dtype=np.int64), shape).ravel()
    days_held = np.broadcast_to(np.asarray(days_held, dtype=np.int64), shape).ravel()
    codes = _exit_codes_kernel(debit, float(entry_credit), np.ascontiguousarray(dte),
                               np.ascontiguousarray(days_held), exits.profit_take_pct,
                               exits.loss_close_multiple, exits.dte_exit, exits.max_hold_days)
    return codes.reshape(shape)
