"""`python core/main.py --mode live` against the local imitation of Alpaca (tests/alpaca_fake.py):
the same engine trades a simulated session — it opens a condor as one multi-leg order, manages it,
closes it as one multi-leg order — and leaves a journal that agrees with the broker and a report
in the backtest's format. The fake's clock moves five minutes each time the driver waits, so a
session takes seconds."""
from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest

import core.live as live
from core.main import main
from tests.alpaca_fake import FakeAlpaca

NY = "America/New_York"
# The feed's default path (1-minute base bars, daily bars, the QQQ pair); a narrower chain than
# the default keeps a bar's snapshot to a few pages; a tight stop closes the condor within hours.
CONFIG = """
live: {poll_seconds: 0.01, step_seconds: 0.2, order_poll_seconds: 0.02, price_steps: 3, warmup_sessions: 20,
       chain_strike_range: 0.06}
exits: {loss_close_multiple: 0.1, dte_exit: 1}
strategy: {dte_min: 7, dte_max: 30}
"""


@pytest.fixture
def session(tmp_path, monkeypatch):
    fake = FakeAlpaca(now=pd.Timestamp("2026-12-07 09:20", tz=NY), spot=600.0, seed=5, history_days=900,
                      stocks=("SPY", "QQQ"))
    fake.start()
    for name, value in {"APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret",
                        "APCA_API_BASE_URL": fake.url, "APCA_API_DATA_URL": fake.url}.items():
        monkeypatch.setenv(name, value)

    class BrokerPacedTime:
        """The driver's waits move the broker's clock instead of this machine's."""

        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            fake.advance(minutes=5)

    monkeypatch.setattr(live, "time", BrokerPacedTime())
    config = tmp_path / "live.yaml"
    config.write_text(CONFIG)
    yield fake, config, tmp_path / "live"
    fake.stop()


def journal_rows(out, sql):
    with sqlite3.connect(out / "journal.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql)]


def journal_rows_while_running(out, sql):
    """``journal_rows`` for polling a driver that is still starting: the journal file exists a
    moment before its tables do (sqlite creates the file on connect, the schema follows), so a
    missing table then means "nothing yet", not an error."""
    if not (out / "journal.sqlite").exists():
        return []
    try:
        return journal_rows(out, sql)
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise


def test_a_live_session_opens_manages_and_closes_a_condor_as_one_order_each_way(session, capsys):
    fake, config, out = session
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "78",
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    intents = journal_rows(out, "SELECT action, status, filled_qty, reason FROM intents ORDER BY created_at")
    assert [(i["action"], i["status"]) for i in intents] == [("open", "filled"), ("close", "filled")], intents
    assert intents[1]["reason"] == "stop_loss"
    parents = [o for o in fake.orders if str(o["client_order_id"]).startswith("cb-")]
    assert parents and all(o["order_class"] == "mleg" and len(o["legs"]) == 4 for o in parents)
    opens = [o for o in parents if o["client_order_id"].startswith("cb-open")]
    closes = [o for o in parents if o["client_order_id"].startswith("cb-close")]
    assert all(float(o["limit_price"]) < 0 for o in opens) and all(float(o["limit_price"]) > 0 for o in closes)
    assert sum(float(o["filled_qty"]) for o in opens) == sum(float(o["filled_qty"]) for o in closes) == 1
    assert {s: q for s, q in fake.positions.items() if q} == {}            # flat at the broker and in the journal
    assert journal_rows(out, "SELECT * FROM orders WHERE status NOT IN ('filled', 'canceled', 'expired')") == []

    report = out / "report"
    trades = pd.read_csv(report / "trades.csv")
    assert len(trades) == 1 and trades.loc[0, "exit_reason"] == "stop_loss"
    assert trades.loc[0, "credit"] == pytest.approx(-float([o for o in opens if o["status"] == "filled"][0]
                                                         ["filled_avg_price"]))
    equity = pd.read_csv(report / "equity.csv")
    assert len(equity) == 78                                                   # the whole session
    run = json.loads((report / "run.json").read_text())
    assert run["engine"] == "live (Alpaca)" and run["requests_per_bar_median"] <= 10
    html = (report / "report.html").read_text()
    assert "GARCH / realised-vol proxy" in html and "European Black-Scholes" in html    # the data box says so
    assert "open condors 1" in text and "done: 78 bar(s)" in text


def test_a_condor_held_overnight_past_the_chain_window_is_marked_and_closed(session, capsys):
    """Opened Monday at 3 DTE (the window is 3 … 5), held overnight: on Tuesday its DTE (2) is
    below the chain request's window, so its legs are quoted by the held-contract snapshot; the
    DTE exit closes it as one order at Tuesday's first bar."""
    fake, config, out = session
    config.write_text(CONFIG.replace("exits: {loss_close_multiple: 0.1, dte_exit: 1}",
                                     "exits: {loss_close_multiple: 5.0, profit_take_pct: 0.99, dte_exit: 2}")
                      .replace("strategy: {dte_min: 7, dte_max: 30}", "strategy: {dte_min: 3, dte_max: 5}"))
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "80",
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    intents = journal_rows(out, "SELECT action, status, reason, created_at FROM intents ORDER BY created_at")
    assert [(i["action"], i["status"]) for i in intents] == [("open", "filled"), ("close", "filled")], intents
    assert intents[1]["reason"] == "dte_exit"
    assert pd.Timestamp(intents[1]["created_at"]).tz_convert(NY).date() == pd.Timestamp("2026-12-08").date()
    assert {s: q for s, q in fake.positions.items() if q} == {}
    equity = pd.read_csv(out / "report" / "equity.csv")
    assert len(equity) == 80 and equity["equity"].notna().all()           # marked every bar, overnight too


def test_a_held_leg_missing_from_the_snapshot_is_marked_at_its_last_quote_and_no_order_is_priced_from_it(
        session, monkeypatch, capsys):
    from data_factory.alpaca_feed import AlpacaFeed

    fake, config, out = session
    structures, contracts = AlpacaFeed.quote_structures, AlpacaFeed.quote_contracts
    gap = {"start": None, "times": set()}

    def blanked(quotes, bar):
        if gap["start"] is not None and gap["start"] <= bar < gap["start"] + 6:
            quotes.bid[..., 2] = quotes.ask[..., 2] = quotes.mid[..., 2] = np.nan    # the short call vanishes
        return quotes

    def quote_structures(self, bar, expirations, strikes):
        if gap["start"] is None:
            gap["start"] = bar + 1                           # from the bar after the condor opened
        if gap["start"] <= bar < gap["start"] + 6:
            gap["times"].add(self.bar_times[bar])
        return blanked(structures(self, bar, expirations, strikes), bar)

    def quote_contracts(self, bar_start, bar_stop, expiration, strikes, is_call):
        return blanked(contracts(self, bar_start, bar_stop, expiration, strikes, is_call), bar_start)

    monkeypatch.setattr(AlpacaFeed, "quote_structures", quote_structures)
    monkeypatch.setattr(AlpacaFeed, "quote_contracts", quote_contracts)
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "24",
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert gap["start"] is not None and "no complete quote" in text and "marked at its last quotes" in text
    equity = pd.read_csv(out / "report" / "equity.csv")
    assert len(equity) == 24 and equity["equity"].notna().all()
    events = journal_rows(out, "SELECT kind FROM events")
    assert [e["kind"] for e in events].count("stale_quote") == 1 and any(e["kind"] == "quotes_back" for e in events)
    close_orders = [o for o in fake.orders if str(o["client_order_id"]).startswith("cb-close")]
    gap_window = (min(gap["times"]), max(gap["times"]) + pd.Timedelta(minutes=4))
    assert len(gap["times"]) == 6
    created = pd.to_datetime([i["created_at"] for i in journal_rows(out, "SELECT created_at FROM intents")], utc=True)
    assert not ((created >= gap_window[0]) & (created <= gap_window[1])).any()     # nothing sent in the gap
    assert all(float(o["limit_price"]) > 0 for o in close_orders)   # every close was priced from real quotes


def test_a_dry_run_decides_and_journals_without_sending(session, capsys):
    fake, config, out = session
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "8",
                   "--dry-run", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert not [o for o in fake.orders]                                        # nothing sent
    intents = journal_rows(out, "SELECT action, status FROM intents")
    assert intents == [{"action": "open", "status": "dry_run"}]
    assert "dry run: would open" in text


class Killed(BaseException):
    """Stands in for the process being killed: nothing in the driver catches it."""


def test_a_driver_killed_between_sending_an_order_and_recording_it_restarts_without_a_duplicate(
        session, monkeypatch, capsys):
    from core.broker import AlpacaBroker

    fake, config, out = session
    fake.fill_fraction = 1.0                     # the first attempt (at mid) fills
    send = AlpacaBroker.submit_mleg

    def send_then_die(self, *args, **kwargs):
        send(self, *args, **kwargs)              # the broker has the order ...
        raise Killed()                           # ... and the journal never hears the answer

    monkeypatch.setattr(AlpacaBroker, "submit_mleg", send_then_die)
    args = ["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--out", str(out)]
    with pytest.raises(Killed):
        main([*args, "--max-bars", "20"])
    [order] = journal_rows(out, "SELECT client_order_id, status FROM orders")
    assert order["status"] == "sending"
    assert [o["status"] for o in fake.orders] == ["filled"] and any(fake.positions.values())

    monkeypatch.setattr(AlpacaBroker, "submit_mleg", send)
    capsys.readouterr()
    status = main([*args, "--max-bars", "20"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert f"reconcile {order['client_order_id']}: filled at the broker" in text   # reconciled at start
    assert "open condor" in text and "from the journal" in text
    opens = [o for o in fake.orders if str(o["client_order_id"]).startswith("cb-open")]
    assert len(opens) == 1                                                      # never sent again
    intents = journal_rows(out, "SELECT action, status FROM intents ORDER BY created_at")
    assert intents[0] == {"action": "open", "status": "filled"}, text
    assert all(i == {"action": "close", "status": "filled"} for i in intents[1:]), text
    # The restored condor is managed: the journal's fills are the broker's positions.
    from core.journal import Journal

    journal = Journal(out / "journal.sqlite")
    assert journal.expected_legs() == {s: q for s, q in fake.positions.items() if q}
    journal.close()


def test_ctrl_c_cancels_the_working_order_and_leaves_nothing_unknown(session, monkeypatch, capsys):
    from core.broker import AlpacaBroker

    fake, config, out = session
    fake.fill_mode = "never"                     # the order keeps working
    read = AlpacaBroker.order
    calls = []

    def read_then_interrupt(self, order_id):
        calls.append(order_id)
        if len(calls) == 2:
            raise KeyboardInterrupt()            # Ctrl-C while the desk waits on a working order
        return read(self, order_id)

    monkeypatch.setattr(AlpacaBroker, "order", read_then_interrupt)
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "20",
                   "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 130, text
    assert "1 working order(s) cancelled" in text
    ours = [o for o in fake.orders if str(o["client_order_id"]).startswith("cb-")]
    assert ours and all(o["status"] == "canceled" for o in ours)
    unresolved = journal_rows(out, "SELECT * FROM orders WHERE status NOT IN ('filled', 'canceled', 'expired', "
                                   "'not_placed')")
    assert unresolved == []


def test_an_account_without_options_approval_is_refused_before_anything_is_sent(session, capsys):
    fake, config, out = session
    fake.options_level = 2
    status = main(["--mode", "live", "--config", str(config), "--max-bars", "3", "--out", str(out)])
    captured = capsys.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and "options level is 2" in errors[0], captured
    assert fake.orders == [] and not out.exists()                    # nothing sent, no run folder


def test_a_chain_with_no_short_strike_in_the_delta_band_is_refused_at_start(session, capsys):
    fake, config, out = session
    # Strikes within ±2% of spot at 7-30 DTE: every put is far above |delta| 0.02.
    config.write_text(CONFIG.replace("chain_strike_range: 0.06", "chain_strike_range: 0.02").replace(
        "strategy: {dte_min: 7, dte_max: 30}",
        "strategy: {dte_min: 7, dte_max: 30, target_short_delta_low: 0.01, target_short_delta_high: 0.02}"))
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--max-bars", "3",
                   "--out", str(out)])
    captured = capsys.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1, captured
    assert "no put in the short-strike delta band at start" in errors[0]
    assert "0.01 … 0.02" in errors[0] and "|delta| 0." in errors[0]        # says what the chain does hold
    assert fake.orders == [] and not out.exists()                    # nothing sent, no run folder


def test_a_restart_with_a_condor_open_manages_it_even_when_the_band_is_empty(session, capsys):
    fake, config, out = session
    fake.fill_fraction = 1.0
    args = ["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--out", str(out)]
    assert main([*args, "--max-bars", "6"]) == 0
    assert any(fake.positions.values())                              # a condor is open
    config.write_text(CONFIG.replace("chain_strike_range: 0.06", "chain_strike_range: 0.02").replace(
        "strategy: {dte_min: 7, dte_max: 30}",
        "strategy: {dte_min: 7, dte_max: 30, target_short_delta_low: 0.01, target_short_delta_high: 0.02}"))
    capsys.readouterr()
    status = main([*args, "--max-bars", "2"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "warning: no put in the short-strike delta band at start" in text
    assert "from the journal" in text and "open condors 1" in text  # still managed


def test_an_api_that_keeps_failing_stops_the_run_with_exit_1(session, monkeypatch, capsys):
    from tests.alpaca_fake import Fault

    fake, config, out = session
    config.write_text(CONFIG.replace("price_steps: 3,", "price_steps: 3, breaker_failures: 2, breaker_cooldown: 0, "
                                                       "max_breaker_trips: 2, retry_base_wait: 0.01,"))
    advance = fake.advance

    def advance_then_fail(minutes=5):
        advance(minutes=minutes)
        if fake.now >= pd.Timestamp("2026-12-07 10:00", tz=NY) and not fake.pending_faults:
            fake.inject(Fault("GET", "/v2/clock", "503", times=1000))       # the API goes down at 10:00

    monkeypatch.setattr(fake, "advance", advance_then_fail)
    status = main(["--mode", "live", "--config", str(config), "--no-gates", "--no-neural", "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert status == 1, text
    # Each failed poll is skipped and logged; after breaker_failures × max_breaker_trips in a row
    # the run stops (with a cool-down the open circuit itself would stop it: tests/test_broker_setup).
    assert "error: 5 polls in a row failed; last: clock: HTTP 503" in text
    events = journal_rows(out, "SELECT kind FROM events")
    assert {"api_error", "stopped"} <= {e["kind"] for e in events}
    assert (out / "report" / "trades.csv").is_file()                   # the report of the bars before it


def test_a_driver_process_killed_while_its_order_is_on_the_wire_restarts_without_a_duplicate(tmp_path):
    """A real SIGKILL of `core/main.py --mode live` while its order request is still on its way
    (the broker holds the request 3 s, then places the order): the journal says `sending`, the
    broker has the order. The restarted driver finds it by client id and never sends it again."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.alpaca_fake import Fault

    root = Path(__file__).resolve().parent.parent
    fake = FakeAlpaca(now=pd.Timestamp("2026-12-07 09:20", tz=NY), spot=600.0, seed=5, history_days=900,
                      stocks=("SPY", "QQQ"))
    fake.start()
    try:
        fake.clock_step = 5                       # each clock read of the driver moves the market on
        fake.fill_fraction = 1.0
        fake.inject(Fault("POST", "/v2/orders", "timeout", delay=3.0))
        config = tmp_path / "live.yaml"
        config.write_text(CONFIG)
        out = tmp_path / "live"
        env = {**os.environ, "APCA_API_KEY_ID": "test-key", "APCA_API_SECRET_KEY": "test-secret",
               "APCA_API_BASE_URL": fake.url, "APCA_API_DATA_URL": fake.url}
        args = [sys.executable, "core/main.py", "--mode", "live", "--config", str(config), "--no-gates",
                "--no-neural", "--poll-seconds", "0.01", "--out", str(out)]
        log = open(tmp_path / "first.log", "w")
        driver = subprocess.Popen([*args, "--max-bars", "40"], cwd=root, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while True:                               # until the order is journalled as being sent
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no order journalled in 240 s: " + (tmp_path / "first.log").read_text()[-2000:]
            if journal_rows_while_running(out, "SELECT 1 FROM orders WHERE status = 'sending'"):
                break
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        log.close()
        assert journal_rows(out, "SELECT status FROM orders") == [{"status": "sending"}]
        deadline = time.monotonic() + 10
        while not [o for o in fake.orders if o["status"] == "filled"]:      # the held request goes through
            assert time.monotonic() < deadline
            time.sleep(0.05)

        again = subprocess.run([*args, "--max-bars", "10"], cwd=root, env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "filled at the broker" in again.stdout
        opens = [o for o in fake.orders if str(o["client_order_id"]).startswith("cb-open")]
        assert len(opens) == 1                                               # never sent twice
        from core.journal import Journal

        journal = Journal(out / "journal.sqlite")
        assert journal.expected_legs() == {s: q for s, q in fake.positions.items() if q} != {}
        journal.close()
    finally:
        if "driver" in locals() and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        fake.stop()
