"""The live journal: ids derived from decisions, orders journalled before they are sent, positions
as what the fills add up to, and all of it surviving a reopen (a restart)."""
from __future__ import annotations

import sqlite3

import pandas as pd
import pytest

from core.journal import Intent, Journal, JournalError, Leg, client_order_id, intent_id

NY = "America/New_York"
OPEN_LEGS = (Leg("SPY261218P00580000", "buy", "buy_to_open"), Leg("SPY261218P00590000", "sell", "sell_to_open"),
             Leg("SPY261218C00620000", "sell", "sell_to_open"), Leg("SPY261218C00630000", "buy", "buy_to_open"))
CLOSE_LEGS = (Leg("SPY261218P00580000", "sell", "sell_to_close"), Leg("SPY261218P00590000", "buy", "buy_to_close"),
              Leg("SPY261218C00620000", "buy", "buy_to_close"), Leg("SPY261218C00630000", "sell", "sell_to_close"))
DECIDED = pd.Timestamp("2026-12-07 10:35", tz=NY)


def open_intent(quantity=2) -> Intent:
    iid = intent_id("open", DECIDED, OPEN_LEGS, quantity)
    return Intent(iid, "open", iid, quantity, OPEN_LEGS, "entry", {"confidence": 0.7})


def test_the_same_decision_gets_the_same_ids_and_another_decision_others():
    assert intent_id("open", DECIDED, OPEN_LEGS, 2) == intent_id("open", DECIDED.tz_convert("UTC"), OPEN_LEGS, 2)
    others = {intent_id("open", DECIDED + pd.Timedelta(minutes=5), OPEN_LEGS, 2),
              intent_id("open", DECIDED, OPEN_LEGS, 3), intent_id("close", DECIDED, CLOSE_LEGS, 2)}
    assert len(others) == 3 and intent_id("open", DECIDED, OPEN_LEGS, 2) not in others
    iid = intent_id("open", DECIDED, OPEN_LEGS, 2)
    assert iid.startswith("open-202612071035-")
    assert client_order_id(iid, 0) != client_order_id(iid, 1)
    assert client_order_id(iid, 0).startswith("cb-") and len(client_order_id(iid, 99)) <= 128


def test_an_order_is_journalled_before_it_is_sent_and_fills_make_the_positions(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    intent = open_intent()
    assert journal.record_intent(intent) is True
    assert journal.record_intent(intent) is False              # decided again after a restart
    cid = journal.order_sending(intent.intent_id, 0, 2, -1.45, at=DECIDED)
    assert journal.order(cid)["status"] == "sending"
    assert [r["client_order_id"] for r in journal.unresolved_orders()] == [cid]
    assert journal.expected_legs() == {}                       # nothing filled yet
    journal.order_update(cid, "partially_filled", broker_order_id="b-1", filled_qty=1, filled_avg_price=-1.45,
                         legs=[{"symbol": leg.symbol, "side": leg.side, "filled_qty": 1, "filled_avg_price": 1.0}
                               for leg in OPEN_LEGS])
    assert journal.expected_legs() == {"SPY261218P00580000": 1, "SPY261218P00590000": -1,
                                       "SPY261218C00620000": -1, "SPY261218C00630000": 1}
    journal.order_update(cid, "canceled", filled_qty=1)
    cid2 = journal.order_sending(intent.intent_id, 1, 1, -1.40, at=DECIDED)
    journal.order_update(cid2, "filled", broker_order_id="b-2", filled_qty=1, filled_avg_price=-1.40)
    journal.intent_update(intent.intent_id, "filled", 2)
    assert journal.unresolved_orders() == []
    [position] = journal.open_positions()
    assert position["open"] == 2 and position["entry_credit"] == pytest.approx(1.425)
    assert position["legs"] == list(OPEN_LEGS) and position["context"] == {"confidence": 0.7}

    close_id = intent_id("close", DECIDED + pd.Timedelta(hours=2), CLOSE_LEGS, 2)
    journal.record_intent(Intent(close_id, "close", intent.intent_id, 2, CLOSE_LEGS, "profit_take"))
    cid3 = journal.order_sending(close_id, 0, 2, 0.70, at=DECIDED + pd.Timedelta(hours=2))
    journal.order_update(cid3, "filled", broker_order_id="b-3", filled_qty=2, filled_avg_price=0.70)
    assert journal.open_positions() == [] and journal.expected_legs() == {}
    [closed] = journal.positions()
    assert closed["closed"] == 2 and closed["exit_debit"] == pytest.approx(0.70)
    journal.close()

    again = Journal(tmp_path / "journal.sqlite")                # a restart reads the same state
    assert again.positions()[0]["exit_debit"] == pytest.approx(0.70)
    assert again.order(cid)["broker_order_id"] == "b-1" and again.order(cid)["filled_qty"] == 1
    assert again.orders_sent_on(DECIDED) == 3 and again.orders_sent_on(DECIDED + pd.Timedelta(days=1)) == 0
    mode = sqlite3.connect(tmp_path / "journal.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_an_attempt_is_journalled_once(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    intent = open_intent()
    journal.record_intent(intent)
    journal.order_sending(intent.intent_id, 0, 2, -1.45)
    with pytest.raises(sqlite3.IntegrityError):
        journal.order_sending(intent.intent_id, 0, 2, -1.45)


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are not the droids\n" * 100)
    with pytest.raises(JournalError, match="notes.sqlite"):
        Journal(path)
