"""The order desk against a local imitation of Alpaca (tests/alpaca_fake.py), fault by fault: each
condor is one multi-leg order per attempt; whatever fails — 429, 5xx, an HTML error page, a timeout,
a dropped connection, a rejection, a partial fill, a duplicate client id, the process killed
between sending an order and recording it — no order is sent twice, no fill is lost, the journal's
fills add up to the broker's positions afterwards, and the journal's events say what happened."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from tests.alpaca_fake import Fault, FakeAlpaca
from core.broker import AlpacaBroker, CircuitOpen, Credentials, Endpoints, LegOrder, RetryPolicy
from core.dto import IronCondor, LegQuotes
from core.journal import Intent, Journal, intent_id
from core.live import condor_legs, unit_prices
from core.live_orders import DeskSettings, OrderDesk, ReconcileError, is_option_of

NY = "America/New_York"
START = pd.Timestamp("2026-12-07 10:00", tz=NY)


@pytest.fixture
def fake():
    with FakeAlpaca(now=START, spot=600.0, seed=3, history_days=5) as server:
        # Fills at mid: one attempt per order unless a test says otherwise (the stepping test and
        # the first one use the default rule).
        server.fill_fraction = 1.0
        yield server


def make_broker(fake, timeout=2.0):
    policy = RetryPolicy(attempts=4, base_wait=0.0, max_wait=0.0, breaker_failures=5, breaker_cooldown=60.0)
    return AlpacaBroker(Credentials("test-key", "test-secret"), Endpoints(fake.url, fake.url), timeout=timeout,
                        policy=policy, sleep=lambda seconds: None)


@pytest.fixture
def desk(fake, tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    settings = DeskSettings(steps=3, step_seconds=0.3, poll_seconds=0.02, uncertain_grace_seconds=1.0)
    yield OrderDesk(make_broker(fake), journal, settings, underlying="SPY")
    journal.close()


def condor(fake, quantity=1, offset=12.0, width=5.0) -> IronCondor:
    """A condor on a listed expiry about two weeks out, shorts ``offset`` dollars from spot."""
    spot = round(fake.spot)
    expiration = (START + pd.Timedelta(days=14)).date()
    while expiration.weekday() >= 5:
        expiration += dt.timedelta(days=1)
    settle = pd.Timestamp(f"{expiration} 16:00", tz=NY)
    return IronCondor(expiration, settle, spot - offset - width, spot - offset, spot + offset, spot + offset + width,
                      quantity)


def prices_of(fake, legs, opening):
    quotes = [fake.quote(leg.symbol) for leg in legs]
    bid, ask = np.array([q[0] for q in quotes]), np.array([q[1] for q in quotes])
    nan = np.full(4, np.nan)
    return unit_prices(LegQuotes(bid, ask, (bid + ask) / 2, nan, nan, nan, nan), opening)


def open_intent(fake, quantity=1, at=START):
    structure = condor(fake, quantity)
    legs = condor_legs(structure, "SPY", "open")
    iid = intent_id("open", at, legs, quantity)
    return Intent(iid, "open", iid, quantity, legs, "entry"), structure


def close_intent(fake, opened: Intent, structure, at):
    legs = condor_legs(structure, "SPY", "close")
    iid = intent_id("close", at, legs, opened.quantity)
    return Intent(iid, "close", opened.intent_id, opened.quantity, legs, "profit_take")


def broker_options(fake) -> dict:
    return {symbol: qty for symbol, qty in fake.positions.items() if qty and is_option_of(symbol, "SPY")}


def orders_of(fake, cid_part: str) -> list[dict]:
    return [order for order in fake.orders if cid_part in str(order.get("client_order_id"))]


def assert_agree(fake, desk):
    """The journal's fills add up to the broker's positions, and nothing of ours is left working."""
    assert desk.journal.expected_legs() == broker_options(fake)
    assert desk.journal.unresolved_orders() == []
    assert not [o for o in fake.orders if o["status"] in ("new", "accepted", "partially_filled", "pending_new")]


def events(desk) -> list[str]:
    return [f"{row['kind']}: {row['message']}" for row in desk.journal.events()]


# ------------------------------------------------------------------------------------------------

def test_a_condor_opens_and_closes_as_one_multi_leg_order_each_way(fake, desk):
    fake.fill_fraction = 0.5                  # mid does not fill: the desk steps toward natural
    intent, structure = open_intent(fake, quantity=2)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "filled" and done.filled_qty == 2 and done.average_price > 0
    sent = orders_of(fake, intent.intent_id)
    assert [o["status"] for o in sent] == ["canceled"] * (len(sent) - 1) + ["filled"]   # stepped until it filled
    for order in sent:
        assert order["order_class"] == "mleg" and len(order["legs"]) == 4
        assert float(order["limit_price"]) < 0                               # a credit is a negative limit
        assert {leg["position_intent"] for leg in order["legs"]} == {"buy_to_open", "sell_to_open"}
    held = broker_options(fake)
    assert held == {structure_leg.symbol: (2 if structure_leg.side == "buy" else -2) for structure_leg in intent.legs}
    assert_agree(fake, desk)

    fake.advance(minutes=30)
    closing = close_intent(fake, intent, structure, START + pd.Timedelta(minutes=30))
    done = desk.execute(closing, lambda: prices_of(fake, closing.legs, False))
    assert done.status == "filled"
    assert all(float(o["limit_price"]) > 0 for o in orders_of(fake, closing.intent_id))   # a debit is positive
    assert broker_options(fake) == {}
    assert_agree(fake, desk)
    [position] = desk.journal.positions()
    assert position["open"] == 0 and position["exit_debit"] > 0


def test_an_unfilled_order_steps_toward_natural_then_is_cancelled(fake, desk):
    fake.fill_mode = "never"
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "unfilled" and done.attempts == 3
    sent = orders_of(fake, intent.intent_id)
    assert [o["status"] for o in sent] == ["canceled"] * 3
    credits = [-float(o["limit_price"]) for o in sent]
    assert credits[0] > credits[1] > credits[2]                              # mid toward natural
    assert len({o["client_order_id"] for o in sent}) == 3                   # a new client id per attempt
    assert_agree(fake, desk)


@pytest.mark.parametrize("fault", ["accept_then_500", "accept_then_drop"])
def test_an_order_placed_without_an_answer_is_found_by_client_id_not_sent_again(fake, desk, fault):
    # The broker took the order, then answered 500 / dropped the connection.
    fake.inject(Fault("POST", "/v2/orders", fault))
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "filled"
    assert len(orders_of(fake, intent.intent_id)) == 1                       # no duplicate
    said = events(desk)
    assert any(e.startswith("order_uncertain") for e in said) and any(e.startswith("order_found") for e in said), said
    assert_agree(fake, desk)


def test_a_500_before_the_order_was_placed_sends_the_next_attempt_once(fake, desk):
    fake.inject(Fault("POST", "/v2/orders", "500"))
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "filled"
    assert len(orders_of(fake, intent.intent_id)) == 1                       # the first never existed
    statuses = [row["status"] for row in desk.journal.orders_of(intent.intent_id)]
    assert statuses == ["not_placed", "filled"]
    assert_agree(fake, desk)


def test_a_timed_out_submit_that_reaches_the_broker_late_is_adopted_not_doubled(fake, tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    desk = OrderDesk(make_broker(fake, timeout=0.3), journal,
                     DeskSettings(steps=2, step_seconds=0.3, poll_seconds=0.05, uncertain_grace_seconds=2.0))
    fake.inject(Fault("POST", "/v2/orders", "timeout", delay=0.8))
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "filled" and done.filled_qty == 1
    assert len(orders_of(fake, intent.intent_id)) == 1
    assert_agree(fake, desk)
    journal.close()


def test_a_rate_limit_on_submit_is_waited_out_and_the_order_sent_once(fake, desk):
    fake.inject(Fault("POST", "/v2/orders", "429", times=2))
    intent, _ = open_intent(fake)
    assert desk.execute(intent, lambda: prices_of(fake, intent.legs, True)).status == "filled"
    assert len(orders_of(fake, intent.intent_id)) == 1
    posts = [r for r in fake.requests if r[0] == "POST" and r[1] == "/v2/orders"]
    assert [r[4] for r in posts] == [429, 429, 200]
    assert_agree(fake, desk)


def test_server_errors_and_an_html_error_page_on_reads_are_retried(fake, desk):
    fake.fill_mode = "never"
    fake.inject(Fault("GET", "/v2/orders/", "502", times=1))
    fake.inject(Fault("GET", "/v2/orders/", "503", times=1))
    intent, _ = open_intent(fake)
    desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert_agree(fake, desk)


def test_a_rejected_order_fails_the_intent_and_is_logged(fake, desk):
    fake.inject(Fault("POST", "/v2/orders", "reject"))
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "failed" and done.filled_qty == 0
    assert orders_of(fake, intent.intent_id) == []
    assert any(e.startswith("order_rejected") and "buying power" in e for e in events(desk)), events(desk)
    assert_agree(fake, desk)


def test_a_partial_fill_is_kept_and_the_rest_goes_into_the_next_attempt(fake, desk):
    fake.inject(Fault("POST", "/v2/orders", "partial", partial_qty=1))
    fake.fill_mode = "never"
    intent, _ = open_intent(fake, quantity=3)
    calls = []

    def prices():
        calls.append(1)
        if len(calls) == 2:
            fake.fill_mode = "auto"           # the second attempt fills
        return prices_of(fake, intent.legs, True)

    done = desk.execute(intent, prices)
    assert done.status == "filled" and done.filled_qty == 3
    sent = orders_of(fake, intent.intent_id)
    assert [int(float(o["filled_qty"])) for o in sent] == [1, 2] and [int(float(o["qty"])) for o in sent] == [3, 2]
    assert_agree(fake, desk)


def test_an_order_sent_before_a_crash_is_recognised_at_restart(fake, desk, tmp_path):
    """The process died after the request left and before the journal heard the answer: the
    journal says `sending`; the broker has the order (filled). The next start records it."""
    intent, _ = open_intent(fake)
    desk.journal.record_intent(intent)
    prices = prices_of(fake, intent.legs, True)
    cid = desk.journal.order_sending(intent.intent_id, 0, 1, -round(prices.natural - 0.01, 2))
    desk.broker.submit_mleg(cid, [LegOrder(l.symbol, l.side, l.position_intent) for l in intent.legs], 1,
                            -round(prices.natural - 0.01, 2))                   # ... and then the crash
    assert desk.journal.expected_legs() == {} and broker_options(fake) != {}

    restarted = OrderDesk(make_broker(fake), Journal(desk.journal.path), desk.settings)
    done = restarted.reconcile()
    assert any(cid in line and "filled" in line for line in done), done
    assert restarted.journal.expected_legs() == broker_options(fake)
    assert len(orders_of(fake, intent.intent_id)) == 1
    # Deciding the same thing again resumes the journalled intent instead of trading twice.
    again = restarted.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert again.filled_qty == 1 and len(orders_of(fake, intent.intent_id)) == 1


def test_a_working_order_left_by_a_dead_process_is_cancelled_at_restart(fake, desk):
    fake.fill_mode = "never"
    intent, _ = open_intent(fake)
    desk.journal.record_intent(intent)
    cid = desk.journal.order_sending(intent.intent_id, 0, 1, -0.50)
    desk.broker.submit_mleg(cid, [LegOrder(l.symbol, l.side, l.position_intent) for l in intent.legs], 1, -0.50)
    done = OrderDesk(make_broker(fake), desk.journal, desk.settings).reconcile()
    assert any("cancelled" in line for line in done), done
    assert orders_of(fake, intent.intent_id)[0]["status"] == "canceled"
    assert desk.journal.intent(intent.intent_id)["status"] == "unfilled"
    assert_agree(fake, desk)


def test_a_duplicate_client_id_is_adopted_not_resent(fake, desk):
    intent, _ = open_intent(fake)
    desk.journal.record_intent(intent)
    prices = prices_of(fake, intent.legs, True)
    limit = -round(prices.natural - 0.01, 2)
    cid = desk.journal.order_sending(intent.intent_id, 0, 1, limit)
    legs = [LegOrder(l.symbol, l.side, l.position_intent) for l in intent.legs]
    desk.broker.submit_mleg(cid, legs, 1, limit)
    order = desk.submit(cid, intent, 1, limit)                          # sent again with the same id
    assert order is not None and order["client_order_id"] == cid
    assert len(orders_of(fake, intent.intent_id)) == 1
    assert any("adopted" in e for e in events(desk))


def test_positions_the_journal_cannot_explain_stop_the_start(fake, desk):
    intent, _ = open_intent(fake)
    legs = [LegOrder(l.symbol, l.side, l.position_intent) for l in intent.legs]
    prices = prices_of(fake, intent.legs, True)
    desk.broker.submit_mleg("manual-order-1", legs, 1, -round(prices.natural - 0.01, 2))   # not ours
    with pytest.raises(ReconcileError, match="not what the journal's fills add up to"):
        desk.reconcile()


def test_a_foreign_working_order_stops_the_start(fake, desk):
    fake.fill_mode = "never"
    intent, _ = open_intent(fake)
    legs = [LegOrder(l.symbol, l.side, l.position_intent) for l in intent.legs]
    desk.broker.submit_mleg("manual-order-2", legs, 1, -0.50)
    with pytest.raises(ReconcileError, match="did not place"):
        desk.reconcile()


def test_repeated_api_failures_open_the_circuit(fake):
    broker = make_broker(fake)
    fake.inject(Fault("GET", "/v2/clock", "503", times=20))
    with pytest.raises(Exception):
        broker.clock()                       # 4 attempts, all 503
    with pytest.raises(CircuitOpen):
        broker.clock()                       # the 5th failure opens the circuit; then nothing is sent
        broker.clock()
    sent = [r for r in fake.requests if r[1] == "/v2/clock"]
    assert len(sent) == 5


def test_the_daily_order_cap_counts_every_attempt(fake, tmp_path):
    fake.fill_mode = "never"
    journal = Journal(tmp_path / "j.sqlite")
    desk = OrderDesk(make_broker(fake), journal, DeskSettings(steps=4, step_seconds=0.05, poll_seconds=0.01,
                                                              max_orders_per_day=2), stamp=lambda: fake.now)
    intent, _ = open_intent(fake)
    done = desk.execute(intent, lambda: prices_of(fake, intent.legs, True))
    assert done.status == "unfilled" and len(orders_of(fake, intent.intent_id)) == 2
    assert any(e.startswith("order_limit") for e in events(desk)), events(desk)
    journal.close()
