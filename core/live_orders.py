"""The order desk: turns an intent (open or close one condor position) into one multi-leg limit
order at a time, journal first, and brings the journal and the broker into agreement at start.

Pricing. An open is a net credit, a close a net debit, per condor unit. Attempt k of n asks
mid + k/(n − 1) of the way to the natural price (sell legs at the bid, buy legs at the ask), with
fresh quotes each attempt, rounded to the cent toward the natural price (so rounding never makes
an order less likely to fill than its step says). An attempt that has not filled within
``step_seconds`` is cancelled; what it filled counts, the rest goes into the next attempt; after
the last attempt the intent is left ``unfilled`` (or ``partially_filled``). Each attempt is a new
order with its own client id: Alpaca refuses to replace some multi-leg orders (reference §9), and
a cancel-and-send leaves no doubt about which price filled.

Safety. Every order is journalled as ``sending`` before the request, so whatever fails — a
timeout, a 5xx, the process killed between the request and the journal update — the order is
known by its client id, looked up instead of sent again (``submit``), and resolved at the next
start (``reconcile``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from core.broker import AlpacaBroker, BrokerError, BrokerSetupError, LegOrder, UncertainSubmit
from core.journal import CLIENT_ID_PREFIX, TERMINAL_ORDER_STATUSES, Intent, Journal
from data_factory.alpaca_feed import parse_occ_symbol

DUPLICATE_CLIENT_ID = 40010001     # Alpaca's code for a reused client_order_id (reference §11.4)
CENT = 0.01


class ReconcileError(BrokerSetupError):
    """The broker and the journal disagree in a way the journal cannot explain: no trading."""


class _Rejected(Exception):
    """The broker refused the order: no further attempt of this intent."""


def is_option_of(symbol: str, underlying: str) -> bool:
    """An OCC option symbol on ``underlying`` (root, yymmdd, C/P, 8-digit strike)."""
    parsed = parse_occ_symbol(symbol)
    return parsed is not None and parsed[0] == underlying


@dataclasses.dataclass(frozen=True)
class DeskSettings:
    steps: int = 4                  # attempts from mid to the natural price
    step_seconds: float = 20.0      # how long an attempt may work before it is cancelled
    poll_seconds: float = 2.0       # how often a working order is read back
    # After a submit with no answer, how long the broker is asked for the order by its client id
    # before it is taken as never placed: a request that timed out here may still reach the
    # broker a moment later.
    uncertain_grace_seconds: float = 20.0
    # Orders (every attempt counts) per session, in the broker's time; None: no cap.
    max_orders_per_day: int | None = None


@dataclasses.dataclass(frozen=True)
class UnitPrices:
    """Net price of one condor unit at mid and at the natural price, positive dollars per share
    (a credit for an open, a debit for a close)."""

    mid: float
    natural: float


@dataclasses.dataclass
class Execution:
    intent_id: str
    status: str                     # filled | partially_filled | unfilled | failed
    filled_qty: int
    average_price: float | None     # net per unit, positive dollars per share
    attempts: int


def attempt_price(prices: UnitPrices, attempt: int, steps: int, credit: bool) -> float:
    """The net price (positive) of attempt ``attempt`` (0-based) of ``steps``, in cents."""
    share = 1.0 if steps <= 1 else min(1.0, attempt / (steps - 1))
    price = prices.mid + share * (prices.natural - prices.mid)
    # Toward the natural price: a credit rounds down, a debit up (1e-9: float noise on exact cents).
    cents = math.floor(price * 100 + 1e-9) if credit else math.ceil(price * 100 - 1e-9)
    if not credit:
        cents = max(cents, 1)       # a condor worth nothing is still bought back at a cent
    return cents / 100.0


def signed_limit(price: float, credit: bool) -> float:
    """Alpaca's sign convention: a net credit is a negative limit, a net debit a positive one
    (reference §3). Refuses a price that is not a positive number of cents."""
    if not (price > 0 and math.isfinite(price)):
        raise ValueError(f"{'credit' if credit else 'debit'} of {price!r} per condor: nothing to send")
    if abs(round(price, 2) - price) > 1e-9:
        raise ValueError(f"price {price!r} is not in cents")
    return -round(price, 2) if credit else round(price, 2)


def order_fills(order: dict) -> tuple[int, float | None, list[dict]]:
    """(filled condor units, net average price per unit or None, per-leg fills) of a broker order."""
    filled = int(float(order.get("filled_qty") or 0))
    average = order.get("filled_avg_price")
    average = None if average in (None, "") else float(average)
    legs = [{"symbol": leg["symbol"], "side": leg["side"], "filled_qty": int(float(leg.get("filled_qty") or 0)),
             "filled_avg_price": None if leg.get("filled_avg_price") in (None, "") else float(leg["filled_avg_price"])}
            for leg in (order.get("legs") or [])]
    return filled, average, legs


class OrderDesk:
    """Works intents on ``broker``, journalling in ``journal``. ``log(kind, message)`` hears
    what happens (it also goes into the journal's events)."""

    def __init__(self, broker: AlpacaBroker, journal: Journal, settings: DeskSettings = DeskSettings(),
                 underlying: str = "SPY", sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, log: Callable[[str, str], None] | None = None,
                 stamp: Callable[[], object] | None = None):
        # ``stamp()``: the broker's time, for the journal's order times (orders per session day
        # are counted in the broker's time, not this machine's).
        self._stamp = stamp or (lambda: None)
        self.broker = broker
        self.underlying = underlying
        self.journal = journal
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self._log = log or (lambda kind, message: None)

    def event(self, kind: str, message: str, level: str = "info") -> None:
        self.journal.event(kind, message, level)
        self._log(kind, message)

    # ---------------------------------------------------------------------------- one intent
    def execute(self, intent: Intent, prices: Callable[[], UnitPrices]) -> Execution:
        """Work ``intent`` to the end (filled, or every attempt spent); ``prices()`` gives the
        current unit prices before each attempt."""
        credit = intent.action == "open"
        self.journal.record_intent(intent, at=self._stamp())
        filled_before = sum(int(row["filled_qty"]) for row in self.journal.orders_of(intent.intent_id))
        remaining = intent.quantity - filled_before
        attempt = len(self.journal.orders_of(intent.intent_id))
        total_value = 0.0
        filled = filled_before
        for row in self.journal.orders_of(intent.intent_id):
            if row["filled_avg_price"] is not None:
                total_value += abs(float(row["filled_avg_price"])) * int(row["filled_qty"])
        steps = self.settings.steps
        step = 0
        while remaining > 0 and step < steps:
            quote = prices()
            try:
                limit = signed_limit(attempt_price(quote, step, steps, credit), credit)
            except ValueError as error:
                self.event("order_refused", f"{intent.intent_id}: {error} (mid {quote.mid:.2f}, natural "
                                            f"{quote.natural:.2f})", "warning")
                break
            if self._order_cap_reached():
                self.event("order_limit", f"{intent.intent_id}: attempt {attempt} not sent — today's orders reach "
                                          f"live.max_orders_per_day ({self.settings.max_orders_per_day})", "warning")
                break
            try:
                outcome = self._attempt(intent, attempt, remaining, limit)
            except _Rejected:
                attempt += 1
                break
            attempt += 1
            if outcome is None:              # never reached the broker: the next step
                step += 1
                continue
            qty, average = outcome
            if qty:
                total_value += (average or abs(limit)) * qty
                filled += qty
                remaining -= qty
            step += 1
        for qty, average in self._late_arrivals(intent.intent_id):
            if qty:
                total_value += (average or 0.0) * qty
                filled += qty
                remaining -= qty
        status = ("filled" if remaining <= 0 else "partially_filled" if filled > 0 else "unfilled")
        if filled == 0 and self.journal.intent(intent.intent_id)["status"] == "failed":
            status = "failed"
        self.journal.intent_update(intent.intent_id, status, filled)
        average = total_value / filled if filled else None
        self.event("intent_" + status, f"{intent.intent_id}: {filled} of {intent.quantity} filled"
                   + (f" at {average:.2f} net per condor" if average is not None else ""))
        return Execution(intent.intent_id, status, filled, average, attempt)

    def _attempt(self, intent: Intent, attempt: int, quantity: int, limit: float) -> tuple[int, float | None] | None:
        """One order: journal, send, let it work ``step_seconds``, cancel what is left, record.
        Returns (units filled, their net average price) or None when no order was placed."""
        cid = self.journal.order_sending(intent.intent_id, attempt, quantity, limit, at=self._stamp())
        order = self.submit(cid, intent, quantity, limit)
        if order is None:
            return None
        deadline = self._clock() + self.settings.step_seconds
        while order["status"] not in TERMINAL_ORDER_STATUSES:
            if self._clock() >= deadline:
                self.broker.cancel(order["id"])
                order = self._until_terminal(order["id"])
                break
            self._sleep(self.settings.poll_seconds)
            order = self.broker.order(order["id"])
            self._record(cid, order)
        self._record(cid, order)
        qty, average, _ = order_fills(order)
        return qty, (abs(average) if average is not None else None)

    def _order_cap_reached(self) -> bool:
        cap, now = self.settings.max_orders_per_day, self._stamp()
        return cap is not None and now is not None and self.journal.orders_sent_on(now) >= cap

    def submit(self, cid: str, intent: Intent, quantity: int, limit: float) -> dict | None:
        """Send the journalled order ``cid``; whatever the answer, the journal ends up with what
        the broker has. None when the order never reached the broker; _Rejected when the broker
        refused it."""
        legs = [LegOrder(leg.symbol, leg.side, leg.position_intent, leg.ratio_qty) for leg in intent.legs]
        try:
            order = self.broker.submit_mleg(cid, legs, quantity, limit)
        except UncertainSubmit as error:
            self.event("order_uncertain", f"{cid}: {error}; looking it up by client id", "warning")
            order = self._look_up_late(cid)
            if order is None:
                self.journal.order_update(cid, "not_placed", error=str(error))
                self.event("order_not_placed", f"{cid}: the broker has no such order after "
                                               f"{self.settings.uncertain_grace_seconds:g} s; taken as not placed "
                                               f"(looked up again before the intent ends and at the next start)")
                return None
            self.event("order_found", f"{cid}: placed after all (broker id {order['id']}, {order['status']})")
        except BrokerError as error:
            if error.code == DUPLICATE_CLIENT_ID:
                order = self.broker.order_by_client_id(cid)
                if order is not None:
                    self.event("order_found", f"{cid}: already at the broker (sent before a restart); adopted")
                    self._record(cid, order)
                    return order
            self.journal.order_update(cid, "rejected", error=str(error))
            self.journal.intent_update(intent.intent_id, "failed", 0)
            self.event("order_rejected", f"{cid}: {error}", "error")
            raise _Rejected(str(error)) from None
        self._record(cid, order)
        self.event("order_sent", f"{cid}: {quantity} condor(s) at {limit:+.2f} ({order['status']})")
        return order

    def _look_up_late(self, cid: str) -> dict | None:
        """The order ``cid`` if the broker has it now or within the grace period, else None."""
        deadline = self._clock() + self.settings.uncertain_grace_seconds
        while True:
            order = self.broker.order_by_client_id(cid)
            if order is not None or self._clock() >= deadline:
                return order
            self._sleep(self.settings.poll_seconds)

    def _late_arrivals(self, intent: str) -> list[tuple[int, float | None]]:
        """Orders of ``intent`` taken as not placed that the broker has after all: each is
        cancelled if still working and recorded; returns their (units filled, average price)."""
        found = []
        for row in self.journal.orders_of(intent):
            if row["status"] != "not_placed":
                continue
            order = self.broker.order_by_client_id(row["client_order_id"])
            if order is None:
                continue
            if order["status"] not in TERMINAL_ORDER_STATUSES:
                self.broker.cancel(order["id"])
                order = self._until_terminal(order["id"])
            self._record(row["client_order_id"], order)
            qty, average, _ = order_fills(order)
            self.event("order_found", f"{row['client_order_id']}: reached the broker late ({order['status']}, "
                                      f"{qty} filled); recorded", "warning")
            found.append((qty, None if average is None else abs(average)))
        return found

    def _until_terminal(self, order_id: str) -> dict:
        """Read a cancelled order back until the broker says it is done (it may pass through
        ``pending_cancel``, and fill meanwhile)."""
        for _ in range(200):
            order = self.broker.order(order_id)
            if order["status"] in TERMINAL_ORDER_STATUSES:
                return order
            self._sleep(self.settings.poll_seconds)
        raise BrokerError(f"order {order_id}: still {order['status']} long after its cancel")

    def _record(self, cid: str, order: dict) -> None:
        qty, average, legs = order_fills(order)
        self.journal.order_update(cid, str(order["status"]), broker_order_id=str(order["id"]), filled_qty=qty,
                                  filled_avg_price=average, legs=legs)

    def cancel_working(self) -> str:
        """Cancel every order of this program the journal does not know the end of, and record
        how each ended (Ctrl-C, a fault): nothing is left working that the journal does not know."""
        count = 0
        for row in self.journal.unresolved_orders():
            order = self.broker.order_by_client_id(row["client_order_id"])
            if order is None:
                self.journal.order_update(row["client_order_id"], "not_placed")
                continue
            if order["status"] not in TERMINAL_ORDER_STATUSES:
                self.broker.cancel(order["id"])
                order = self._until_terminal(order["id"])
                count += 1
            self._record(row["client_order_id"], order)
        return f"{count} working order(s) cancelled"

    # ---------------------------------------------------------------------------- at start
    def reconcile(self) -> list[str]:
        """Bring the journal up to date with the broker before trading: every order the journal
        does not know the end of is looked up by client id (``sending`` ones may never have
        reached the broker), this program's orders still working are cancelled, interrupted
        intents are closed with what they filled, and the positions the fills add up to must be
        the broker's. Returns what was done; raises ReconcileError when broker and journal
        disagree in a way the journal cannot explain."""
        done: list[str] = []
        for row in self.journal.unresolved_orders():
            cid = row["client_order_id"]
            order = self.broker.order_by_client_id(cid)
            if order is None:
                self.journal.order_update(cid, "not_placed")
                done.append(f"{cid}: journalled as {row['status']}, never reached the broker")
                continue
            if order["status"] not in TERMINAL_ORDER_STATUSES:
                self.broker.cancel(order["id"])
                order = self._until_terminal(order["id"])
                done.append(f"{cid}: left working by the last run; cancelled")
            self._record(cid, order)
            qty = order_fills(order)[0]
            done.append(f"{cid}: {order['status']} at the broker ({qty} filled)")
        for row in self.journal._db.execute("SELECT intent_id FROM orders WHERE status = 'not_placed' "
                                            "GROUP BY intent_id").fetchall():
            for qty, _ in self._late_arrivals(row["intent_id"]):
                done.append(f"{row['intent_id']}: an order taken as not placed reached the broker ({qty} filled)")
        for row in self.journal.working_intents():
            filled = sum(int(o["filled_qty"]) for o in self.journal.orders_of(row["intent_id"]))
            status = "filled" if filled >= int(row["quantity"]) else "partially_filled" if filled else "unfilled"
            self.journal.intent_update(row["intent_id"], status, filled)
            done.append(f"{row['intent_id']}: interrupted; {filled} of {row['quantity']} filled")
        known = {row["client_order_id"] for row in self.journal._db.execute("SELECT client_order_id FROM orders")}
        foreign = []
        for order in self.broker.open_orders():
            cid = str(order.get("client_order_id") or "")
            if cid.startswith(CLIENT_ID_PREFIX) and cid not in known:
                # Ours by its id, but not in this journal: another journal's order. Cancel it.
                self.broker.cancel(order["id"])
                done.append(f"{cid}: working order of this program missing from the journal; cancelled")
            elif not cid.startswith(CLIENT_ID_PREFIX):
                foreign.append(f"{order.get('symbol') or 'multi-leg'} ({cid or order['id']})")
        if foreign:
            raise ReconcileError("open orders this program did not place: " + ", ".join(foreign)
                                 + "; cancel them or trade another account")
        # Only the underlying's options are compared: shares or other holdings of the account
        # are not this program's business.
        expected = self.journal.expected_legs()
        held = {symbol: qty for symbol, qty in self.broker.positions().items()
                if qty and is_option_of(symbol, self.underlying)}
        if held != expected:
            rows = [f"{symbol}: broker {held.get(symbol, 0):+d}, journal {expected.get(symbol, 0):+d}"
                    for symbol in sorted(set(held) | set(expected)) if held.get(symbol, 0) != expected.get(symbol, 0)]
            raise ReconcileError("the broker's positions are not what the journal's fills add up to ("
                                 + "; ".join(rows) + "); close or explain them before trading")
        for line in done:
            self.event("reconcile", line)
        return done
