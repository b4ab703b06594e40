"""The live driver's journal: what this program decided, sent, and got filled, in one SQLite file
(WAL), written before the broker is asked and updated from what the broker answers.

It is what makes a restart safe. An order is journalled as ``sending`` — with the client order id
derived from its intent and attempt (``client_order_id``) — and committed before the HTTP request
leaves; so after a crash at any point, every order this program may have placed is in the journal,
and the broker can be asked about it by that id instead of sending it again (``core.broker``
reconciles at start). Nothing here talks to the broker.

Tables
------
``intents``    one decision to open or close a condor: its legs, quantity, why, and how far it got.
``orders``     one row per attempt of an intent (a price step is a new attempt with a new client id).
``leg_fills``  per order and leg, the cumulative filled quantity and average price the broker reports.
``events``     what happened, in words (the log a trader reads after a fault).

Positions are not stored: they are what the orders' fills add up to (``positions``,
``expected_legs``), so no crash can leave a fill recorded and its position not, or the reverse.

Why a hand-written SQLite layer: the journal is a handful of tables written from one process with
an exact commit point per step; an ORM would hide exactly the ordering that matters here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

# Order statuses after which the broker will not fill any more of it.
TERMINAL_ORDER_STATUSES = frozenset({"filled", "canceled", "expired", "rejected", "replaced", "done_for_day",
                                     "not_placed", "stopped", "suspended"})
# Client order ids of this program start with this (a broker order without it is not ours).
CLIENT_ID_PREFIX = "cb-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS intents (
    intent_id    TEXT PRIMARY KEY,
    created_at   TEXT NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ('open', 'close')),
    position_id  TEXT NOT NULL,
    quantity     INTEGER NOT NULL CHECK (quantity > 0),
    legs         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    context      TEXT NOT NULL,
    status       TEXT NOT NULL,
    filled_qty   INTEGER NOT NULL DEFAULT 0,
    updated_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    client_order_id  TEXT PRIMARY KEY,
    intent_id        TEXT NOT NULL REFERENCES intents(intent_id),
    attempt          INTEGER NOT NULL,
    quantity         INTEGER NOT NULL,
    limit_price      REAL NOT NULL,
    broker_order_id  TEXT,
    status           TEXT NOT NULL,
    filled_qty       INTEGER NOT NULL DEFAULT 0,
    filled_avg_price REAL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    last_error       TEXT,
    UNIQUE (intent_id, attempt)
);
CREATE TABLE IF NOT EXISTS leg_fills (
    client_order_id TEXT NOT NULL REFERENCES orders(client_order_id),
    symbol          TEXT NOT NULL,
    side            TEXT NOT NULL,
    filled_qty      INTEGER NOT NULL,
    avg_price       REAL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (client_order_id, symbol)
);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT NOT NULL,
    level    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Leg:
    """One leg of a multi-leg order: OCC symbol, side (``buy``/``sell``), Alpaca's position
    intent (``buy_to_open`` …) and ratio (1 for every leg of a condor)."""

    symbol: str
    side: str
    position_intent: str
    ratio_qty: int = 1


@dataclasses.dataclass(frozen=True)
class Intent:
    """A decision to open or close one condor position with ``quantity`` units of ``legs``."""

    intent_id: str
    action: str
    position_id: str
    quantity: int
    legs: tuple[Leg, ...]
    reason: str
    context: Mapping = dataclasses.field(default_factory=dict)


def intent_id(action: str, decided_at: pd.Timestamp, legs: Iterable[Leg], quantity: int) -> str:
    """The id of a decision: the same decision (bar, action, legs, quantity) gets the same id, so
    a program that restarts and decides it again finds it journalled instead of trading twice."""
    text = json.dumps([action, pd.Timestamp(decided_at).tz_convert("UTC").isoformat(),
                       [dataclasses.astuple(leg) for leg in legs], int(quantity)])
    stamp = pd.Timestamp(decided_at).tz_convert("America/New_York").strftime("%Y%m%d%H%M")
    return f"{action}-{stamp}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def client_order_id(intent: str, attempt: int) -> str:
    """The broker's client order id of attempt ``attempt`` of intent ``intent`` (unique forever:
    Alpaca refuses a reused id even after a cancel; at most 128 characters)."""
    cid = f"{CLIENT_ID_PREFIX}{intent}-a{attempt}"
    if len(cid) > 128:
        raise ValueError(f"client order id longer than 128 characters: {cid!r}")
    return cid


class JournalError(RuntimeError):
    """The journal cannot be used (a file that is not ours, a newer schema)."""


class Journal:
    """The journal in ``path`` (created if missing). Every method commits before it returns."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the order it records is sent.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise JournalError(f"{self.path}: not a usable journal ({error})") from None

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------------------ writing
    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._db:                        # one transaction, committed on exit
            return self._db.execute(sql, params)

    @staticmethod
    def _now(at=None) -> str:
        return pd.Timestamp.now(tz="UTC").isoformat() if at is None else pd.Timestamp(at).isoformat()

    def record_intent(self, intent: Intent, at=None) -> bool:
        """Journal a decision; False when it already is (the same decision made again)."""
        now = self._now(at)
        cursor = self._write(
            "INSERT OR IGNORE INTO intents (intent_id, created_at, action, position_id, quantity, legs, reason, "
            "context, status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'working', ?)",
            (intent.intent_id, now, intent.action, intent.position_id, int(intent.quantity),
             json.dumps([dataclasses.asdict(leg) for leg in intent.legs]), intent.reason,
             json.dumps(dict(intent.context), default=str), now))
        return cursor.rowcount == 1

    def order_sending(self, intent: str, attempt: int, quantity: int, limit_price: float, at=None) -> str:
        """Journal an order about to be sent (status ``sending``) and return its client id. Must
        be called, and return, before the request is made."""
        cid = client_order_id(intent, attempt)
        now = self._now(at)
        self._write("INSERT INTO orders (client_order_id, intent_id, attempt, quantity, limit_price, status, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'sending', ?, ?)",
                    (cid, intent, int(attempt), int(quantity), float(limit_price), now, now))
        return cid

    def order_update(self, cid: str, status: str, broker_order_id: str | None = None, filled_qty: int | None = None,
                     filled_avg_price: float | None = None, legs: Iterable[Mapping] = (), error: str | None = None,
                     at=None) -> None:
        """What the broker says about an order: its status, id, filled quantity and average net
        price, and each leg's cumulative fill (``legs``: dicts with symbol, side, filled_qty,
        filled_avg_price)."""
        now = self._now(at)
        with self._db:
            self._db.execute(
                "UPDATE orders SET status = ?, broker_order_id = COALESCE(?, broker_order_id), "
                "filled_qty = COALESCE(?, filled_qty), filled_avg_price = COALESCE(?, filled_avg_price), "
                "last_error = COALESCE(?, last_error), updated_at = ? WHERE client_order_id = ?",
                (status, broker_order_id, None if filled_qty is None else int(filled_qty), filled_avg_price, error,
                 now, cid))
            for leg in legs:
                self._db.execute(
                    "INSERT INTO leg_fills (client_order_id, symbol, side, filled_qty, avg_price, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_order_id, symbol) DO UPDATE SET "
                    "filled_qty = excluded.filled_qty, avg_price = excluded.avg_price, updated_at = excluded.updated_at",
                    (cid, leg["symbol"], leg["side"], int(leg["filled_qty"]), leg.get("filled_avg_price"), now))

    def intent_update(self, intent: str, status: str, filled_qty: int, at=None) -> None:
        self._write("UPDATE intents SET status = ?, filled_qty = ?, updated_at = ? WHERE intent_id = ?",
                    (status, int(filled_qty), self._now(at), intent))

    def event(self, kind: str, message: str, level: str = "info", at=None) -> None:
        self._write("INSERT INTO events (at, level, kind, message) VALUES (?, ?, ?, ?)",
                    (self._now(at), level, kind, message))

    # ------------------------------------------------------------------------------ reading
    def intent(self, intent: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM intents WHERE intent_id = ?", (intent,)).fetchone()

    def order(self, cid: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT * FROM orders WHERE client_order_id = ?", (cid,)).fetchone()

    def orders_of(self, intent: str) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM orders WHERE intent_id = ? ORDER BY attempt", (intent,)).fetchall()

    def unresolved_orders(self) -> list[sqlite3.Row]:
        """Orders the broker may still fill (or that may not have reached it): not terminal."""
        marks = ",".join("?" * len(TERMINAL_ORDER_STATUSES))
        return self._db.execute(f"SELECT * FROM orders WHERE status NOT IN ({marks}) ORDER BY created_at",
                                tuple(TERMINAL_ORDER_STATUSES)).fetchall()

    def working_intents(self) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM intents WHERE status = 'working' ORDER BY created_at").fetchall()

    def positions(self) -> list[dict]:
        """Every condor position the fills add up to, in the order first opened: ``position_id``,
        ``legs`` (as opened), ``opened`` and ``closed`` units, ``open`` units left, the average
        ``entry_credit`` and ``exit_debit`` per unit (net prices per share as the broker reports
        them, signs removed), ``opened_at`` (the first open order's time) and the opening
        intent's ``context``."""
        rows = self._db.execute(
            "SELECT i.position_id, i.action, i.legs, i.context, o.filled_qty, o.filled_avg_price, o.created_at "
            "FROM orders o JOIN intents i ON i.intent_id = o.intent_id WHERE o.filled_qty > 0 "
            "ORDER BY o.created_at, o.attempt").fetchall()
        out: dict[str, dict] = {}
        for row in rows:
            position = out.setdefault(row["position_id"], {
                "position_id": row["position_id"], "legs": None, "opened": 0, "closed": 0, "entry_credit": None,
                "exit_debit": None, "opened_at": None, "context": {}})
            qty = int(row["filled_qty"])
            price = abs(float(row["filled_avg_price"])) if row["filled_avg_price"] is not None else None
            if row["action"] == "open":
                if position["legs"] is None:
                    position["legs"] = [Leg(**leg) for leg in json.loads(row["legs"])]
                    position["opened_at"] = row["created_at"]
                    position["context"] = json.loads(row["context"])
                position["entry_credit"] = _average(position["entry_credit"], position["opened"], price, qty)
                position["opened"] += qty
            else:
                position["exit_debit"] = _average(position["exit_debit"], position["closed"], price, qty)
                position["closed"] += qty
        for position in out.values():
            position["open"] = position["opened"] - position["closed"]
        return list(out.values())

    def open_positions(self) -> list[dict]:
        return [p for p in self.positions() if p["open"] > 0]

    def expected_legs(self) -> dict[str, int]:
        """Per OCC symbol, the signed contracts every fill adds up to (long positive, short
        negative): what the broker's positions should show."""
        held: dict[str, int] = {}
        rows = self._db.execute("SELECT i.legs, o.filled_qty FROM orders o JOIN intents i "
                                "ON i.intent_id = o.intent_id WHERE o.filled_qty > 0").fetchall()
        for row in rows:
            for leg in json.loads(row["legs"]):
                signed = int(row["filled_qty"]) * int(leg["ratio_qty"]) * (1 if leg["side"] == "buy" else -1)
                held[leg["symbol"]] = held.get(leg["symbol"], 0) + signed
        return {symbol: qty for symbol, qty in held.items() if qty}

    def entries_by_session(self) -> dict[int, int]:
        """Condors opened (some units filled) per session, as days since 1970-01-01 of the
        exchange date the intent was made: the engine's daily entry limit across restarts."""
        out: dict[int, int] = {}
        for row in self._db.execute("SELECT created_at FROM intents WHERE action = 'open' AND filled_qty > 0"):
            day = pd.Timestamp(row["created_at"]).tz_convert("America/New_York").tz_localize(None).normalize()
            key = int(day.value // 86_400_000_000_000)
            out[key] = out.get(key, 0) + 1
        return out

    def events(self) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM events ORDER BY id").fetchall()

    def orders_sent_on(self, session_day) -> int:
        """Orders journalled (sent or about to be) on a session date (exchange time)."""
        day = pd.Timestamp(session_day).date()
        count = 0
        for row in self._db.execute("SELECT created_at FROM orders").fetchall():
            if pd.Timestamp(row["created_at"]).tz_convert("America/New_York").date() == day:
                count += 1
        return count


def _average(current: float | None, count: int, price: float | None, qty: int) -> float | None:
    if price is None:
        return current
    if current is None or count == 0:
        return price
    return (current * count + price * qty) / (count + qty)
