"""A backtest on a vendor-format file, end to end: an OptionsDX EOD file (written here from
realistic chains) is ingested, backtested with ``--options-data``, and every trade's credit, debit
and P&L is recomputed by hand from the file's own text rows."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from core.main import main
from data_factory.option_chain import SyntheticChainProvider
from tests.chain_fixtures import write_optionsdx

FRACTION = 0.66          # backtest.fill_spread_fraction (the default)


@pytest.fixture(scope="module")
def vendor_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vendor")
    provider = SyntheticChainProvider.from_embedded(start="2018-01-02", end="2018-04-30", seed=42)
    closes = [bar for bar, stamp in enumerate(provider.bar_times) if stamp.strftime("%H:%M") == "16:00"]
    path = folder / "spy_eod_2018.txt"
    lines = write_optionsdx([provider.slice_at(bar, dte_min=0, dte_max=50) for bar in closes], path)
    return path, lines


def hand_rows(path):
    """{(unix time, expiry, strike, 'C'|'P'): (bid, ask)} read with str.split — no project code."""
    rows = {}
    with open(path) as handle:
        header = [name.strip(" []") for name in handle.readline().split(", ")]
        at = {name: header.index(name) for name in ("QUOTE_UNIXTIME", "EXPIRE_DATE", "STRIKE", "C_BID", "C_ASK",
                                                    "P_BID", "P_ASK")}
        for line in handle:
            cells = line.rstrip("\n").split(", ")
            key = (int(cells[at["QUOTE_UNIXTIME"]]), cells[at["EXPIRE_DATE"]], float(cells[at["STRIKE"]]))
            rows[(*key, "C")] = (float(cells[at["C_BID"]]), float(cells[at["C_ASK"]]))
            rows[(*key, "P")] = (float(cells[at["P_BID"]]), float(cells[at["P_ASK"]]))
    return rows


def test_a_backtest_on_an_optionsdx_file_trades_the_files_own_quotes(vendor_file, tmp_path, capsys):
    path, lines = vendor_file
    store, out = tmp_path / "store", tmp_path / "run"
    assert main(["--mode", "ingest", "--input", str(path), "--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert f"{2 * lines:,} chain rows" in text and "optionsdx" in text
    config = tmp_path / "eod.yaml"
    config.write_text('strategy: {entry_window_end: "16:00"}\n')
    assert main(["--options-data", str(store), "--config", str(config), "--engine", "fast", "--no-gates",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "option chains are YOUR vendor data" in text
    trades = pd.read_csv(out / "trades.csv")
    assert len(trades) >= 3, text
    quotes = hand_rows(path)
    for trade in trades.itertuples():
        legs = ((trade.long_put, "P", +1), (trade.short_put, "P", -1), (trade.short_call, "C", -1),
                (trade.long_call, "C", +1))
        entry = int(pd.Timestamp(trade.entry_time).timestamp())
        value = 0.0
        for strike, right, ratio in legs:
            bid, ask = quotes[(entry, trade.expiration, float(strike), right)]
            # Opening: buy the longs at bid + f·spread, sell the shorts at ask − f·spread.
            price = bid + FRACTION * (ask - bid) if ratio > 0 else ask - FRACTION * (ask - bid)
            value += -ratio * price
        assert trade.credit == pytest.approx(math.floor(value * 100 + 1e-6) / 100, abs=1e-9), trade
        if trade.exit_reason in ("expiry", "end_of_data"):
            continue
        exit_at = int(pd.Timestamp(trade.exit_time).timestamp())
        value = 0.0
        for strike, right, ratio in legs:
            bid, ask = quotes[(exit_at, trade.expiration, float(strike), right)]
            # Closing: sell the longs at ask − f·spread, buy the shorts back at bid + f·spread.
            price = ask - FRACTION * (ask - bid) if ratio > 0 else bid + FRACTION * (ask - bid)
            value += -ratio * price
        debit = math.ceil(value * 100 - 1e-6) / 100
        assert trade.exit_debit == pytest.approx(debit, abs=1e-9), trade
        assert trade.pnl == pytest.approx((trade.credit - debit) * 100 * trade.contracts - trade.fees, abs=1e-6)
    data = json.loads((out / "data.json").read_text())
    assert data["option_chains"]["synthetic"] is False and data["intraday_bars"]["synthetic"] is True
    # The run's period is the file's sessions, not the configured default it was narrowed from.
    assert data["period"]["start"] == "2018-01-02" and data["period"]["end"] == "2018-04-30"
    assert data["period"]["requested"] == ["2014-01-03", "2018-12-31"]
    assert "SPY iron condor backtest, 2018-01-02 … 2018-04-30" in (out / "report.html").read_text()
    assert data["option_chains"]["alignment"]["counts"]["exact"] == data["period"]["bars"]


def test_end_of_day_chains_trade_at_the_snapshot_unless_the_user_set_a_window_the_data_misses(vendor_file, tmp_path,
                                                                                               capsys):
    path, _ = vendor_file
    store = tmp_path / "store"
    assert main(["--mode", "ingest", "--input", str(path), "--store", str(store)]) == 0
    capsys.readouterr()
    # The default entry window (to 15:30) would never reach a 16:00 snapshot: the run trades at it.
    out = tmp_path / "run"
    assert main(["--options-data", str(store), "--engine", "fast", "--no-gates", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "end-of-day chains: entries at the vendor's snapshot, 16:00" in text
    trades = pd.read_csv(out / "trades.csv")
    assert len(trades) >= 3 and (pd.to_datetime(trades["entry_time"], utc=True)
                                 .dt.tz_convert("America/New_York").dt.strftime("%H:%M") == "16:00").all()
    assert "entry_window_end: '16:00'" in (out / "config.yaml").read_text()
    # A window the user chose that the snapshots never reach is refused, nothing written.
    config = tmp_path / "morning.yaml"
    config.write_text('strategy: {entry_window_end: "11:00"}\n')
    refused = tmp_path / "refused"
    assert main(["--options-data", str(store), "--config", str(config), "--engine", "fast",
                 "--out", str(refused)]) == 2
    error = capsys.readouterr().err
    assert "every decision bar is outside the entry window 09:45 … 11:00" in error and not refused.exists()


@pytest.mark.parametrize("mode, says", [(["--mode", "optimize"], "the optimizer runs its trials on the embedded"),
                                        (["--use-optimizer"], "the optimizer runs its trials on the embedded"),
                                        (["--mode", "live", "--dry-run"], "a live run trades Alpaca's own chains"),
                                        (["--mode", "data"], "--mode data shows the embedded synthetic chain")])
def test_option_data_outside_a_backtest_is_refused_not_ignored(mode, says, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*mode, "--options-data", str(tmp_path / "store"), "--out", str(out)]
                if mode[-1] != "data" else [*mode, "--options-data", str(tmp_path / "store")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and says in error[0] and "read by backtests only" in error[0] and not out.exists()
