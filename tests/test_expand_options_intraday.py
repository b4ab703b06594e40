"""EXPANDED intraday chains from EOD snapshots (``data_factory.expand_options_intraday``): no
look-ahead, BSM repricing along the intraday spot, labels, spreads, settled expirations, the CLI end
to end and its errors. Inputs: the synthetic provider's 15:45 snapshots, its own 5-minute spots."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from analytics.black_scholes import bsm_greeks
from data_factory import embedded
from data_factory.canonical import BAR_SCHEMA, CHAIN_SCHEMA, EXCHANGE_TZ
from data_factory.chain_store import ChainStore
from data_factory.errors import DataError
from data_factory.expand_options_intraday import (
    ExpansionStats, expand_daily_chains, main, session_grid,
)
from data_factory.expirations import settlement_times
from data_factory.option_chain import SECONDS_PER_YEAR
from tests.chain_fixtures import synthetic_eod_chain

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = ["2016-03-02", "2016-03-03", "2016-03-04", "2016-03-07"]   # Fri 03-04 is an expiry
KEY = ["expiration", "option_type", "strike"]


@pytest.fixture(scope="module")
def eod():
    table, provider = synthetic_eod_chain(SESSIONS[0], SESSIONS[-1], dte_max=45)
    return table, provider.spot_bars()


@pytest.fixture(scope="module")
def expanded(eod):
    table, spot = eod
    stats = ExpansionStats()
    frame = pa.concat_tables(list(expand_daily_chains(table, spot, 5, stats=stats))).to_pandas()
    return frame, stats


def _frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    frame["day"] = frame["quote_time"].dt.tz_convert(EXCHANGE_TZ).dt.strftime("%Y-%m-%d")
    return frame


def _at(frame: pd.DataFrame, stamp: str) -> pd.DataFrame:
    return frame[frame["quote_time"] == pd.Timestamp(stamp, tz=EXCHANGE_TZ)]


def _replace(table: pa.Table, name: str, values) -> pa.Table:
    """``table`` with column ``name`` replaced (the schema's field kept, nullability included)."""
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(index), values)


def _bars_table(spot: pd.Series) -> pa.Table:
    n = len(spot)
    values = spot.to_numpy(dtype=float)
    return pa.Table.from_pydict({
        "time": pa.array(spot.index.tz_convert("UTC").as_unit("ns").asi8, BAR_SCHEMA.field("time").type),
        "symbol": ["SPY"] * n, "minutes": pa.array(np.full(n, 5), pa.int32()), "open": values, "high": values,
        "low": values, "close": values, "volume": np.zeros(n), "source": ["test"] * n}, schema=BAR_SCHEMA)


# ----------------------------------------------------------------------------------------------
# the expansion
# ----------------------------------------------------------------------------------------------

def test_no_look_ahead_morning_uses_previous_snapshot(eod, expanded):
    table, spot = eod
    frame, _ = expanded
    snaps = _frame(table)
    ten = _at(frame, "2016-03-03 10:00")
    previous = ten.merge(snaps[snaps["day"] == "2016-03-02"], on=KEY, suffixes=("", "_v"))
    own = ten.merge(snaps[snaps["day"] == "2016-03-03"], on=KEY, suffixes=("", "_v"))
    assert len(previous) == len(ten) > 100
    np.testing.assert_array_equal(previous["iv"], previous["iv_v"])          # D−1's vendor IV, as given
    assert (np.abs(own["iv"] - own["iv_v"]) > 1e-4).mean() > 0.5             # not D's (it differs)
    assert (ten["underlying_price"] == spot.loc[pd.Timestamp("2016-03-03 10:00", tz=EXCHANGE_TZ)]).all()
    # The last bar before D's 15:45 snapshot still uses D−1's; 15:45 on uses D's own.
    before = _at(frame, "2016-03-03 15:40").merge(snaps[snaps["day"] == "2016-03-02"], on=KEY, suffixes=("", "_v"))
    np.testing.assert_array_equal(before["iv"], before["iv_v"])
    after = _at(frame, "2016-03-03 15:50").merge(snaps[snaps["day"] == "2016-03-03"], on=KEY, suffixes=("", "_v"))
    assert len(after) == len(_at(frame, "2016-03-03 15:50"))
    np.testing.assert_array_equal(after["iv"], after["iv_v"])


def test_changing_a_snapshot_never_changes_earlier_bars(eod, expanded):
    table, spot = eod
    frame, _ = expanded
    quote = table.column("quote_time").to_pandas().dt.tz_convert(EXCHANGE_TZ)
    on_d = pa.array((quote.dt.strftime("%Y-%m-%d") == "2016-03-03").to_numpy())
    doubled = _replace(table, "iv", pc.if_else(on_d, pc.multiply(table.column("iv"), 2.0), table.column("iv")))
    changed = pa.concat_tables(list(expand_daily_chains(doubled, spot, 5, sessions=["2016-03-03"]))).to_pandas()
    original = frame[frame["quote_time"].dt.strftime("%Y-%m-%d") == "2016-03-03"].reset_index(drop=True)
    early = original["quote_time"] < pd.Timestamp("2016-03-03 15:45", tz=EXCHANGE_TZ)
    assert early.sum() > 0 and len(changed) == len(original)
    pd.testing.assert_frame_equal(changed[early.to_numpy()], original[early])
    assert not np.allclose(changed.loc[~early.to_numpy(), "ask"], original.loc[~early, "ask"])


def test_quotes_are_bsm_at_the_bar_spot_and_time(eod, expanded):
    frame, _ = expanded
    rows = frame[frame["quote_time"].dt.strftime("%Y-%m-%d") == "2016-03-04"].sample(4000, random_state=1)
    bar = pd.DatetimeIndex(rows["quote_time"])
    settle = settlement_times(pd.DatetimeIndex(rows["expiration"].astype("datetime64[ns]")))
    t_years = (settle.tz_convert("UTC").as_unit("ns").asi8 - bar.tz_convert("UTC").as_unit("ns").asi8) / 1e9 \
        / SECONDS_PER_YEAR
    rate = embedded.risk_free_rate(pd.DatetimeIndex(["2016-03-04"])).iloc[0]
    model = bsm_greeks(rows["underlying_price"].to_numpy(), rows["strike"].to_numpy(), t_years, rate,
                       embedded.dividend_yield(), rows["iv"].to_numpy(), (rows["option_type"] == "C").to_numpy())
    inside = (rows["bid"] > 0).to_numpy()          # not floored at zero
    assert inside.sum() > 1000
    mid = 0.5 * (rows["bid"] + rows["ask"]).to_numpy()
    assert np.abs(mid - model.price)[inside].max() <= 0.005 + 1e-9
    np.testing.assert_allclose(rows["delta"], model.delta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows["vega"], model.vega, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rows["theta"], model.theta, rtol=1e-12, atol=1e-12)
    cents = np.round(rows[["bid", "ask"]].to_numpy() * 100)
    np.testing.assert_allclose(rows[["bid", "ask"]].to_numpy() * 100, cents, atol=1e-6)
    assert (rows["bid"] <= rows["ask"]).all() and (rows["bid"] >= 0).all()


def test_the_snapshot_bar_reproduces_the_vendor_quote(eod, expanded):
    table, _ = eod
    frame, _ = expanded
    same = _at(frame, "2016-03-03 15:45").merge(_frame(table).query("day == '2016-03-03'"), on=KEY,
                                                  suffixes=("", "_v"))
    assert len(same) > 100
    np.testing.assert_allclose(same["delta"], same["delta_v"], atol=1e-9)
    quoted = same["bid_v"] > 0
    assert np.abs(same["bid"] - same["bid_v"])[quoted].max() <= 0.0100001
    assert np.abs(same["ask"] - same["ask_v"])[quoted].max() <= 0.0100001


def test_every_row_labelled_and_schema(eod, expanded):
    frame, stats = expanded
    assert frame["source"].str.startswith("expanded:").all()
    assert set(frame["source"]) == {"expanded:synthetic-fixture"}
    assert frame["volume"].isna().all() and frame["open_interest"].isna().all() and frame["last"].isna().all()
    table, spot = eod
    first = next(expand_daily_chains(table, spot, 5, sessions=["2016-03-03"], label="expanded(synthetic spot)"))
    assert first.schema.equals(CHAIN_SCHEMA)
    assert pc.all(pc.starts_with(first.column("source"), "expanded(synthetic spot):")).as_py()
    assert stats.rows == len(frame) and stats.sessions == 4


def test_half_spreads_carried(eod, expanded):
    table, _ = eod
    frame, _ = expanded
    rows = _at(frame, "2016-03-04 11:00").merge(_frame(table).query("day == '2016-03-03'"), on=KEY,
                                                  suffixes=("", "_v"))
    inside = (rows["bid"] > 0) & (rows["bid_v"] > 0)
    assert inside.sum() > 100
    spread = (rows["ask"] - rows["bid"])[inside]
    vendor = (rows["ask_v"] - rows["bid_v"])[inside]
    assert np.abs(spread - vendor).max() <= 0.0100001


def test_settled_expirations_dropped_and_first_session_partial(expanded):
    frame, stats = expanded
    expiry = pd.Timestamp("2016-03-04").date()
    friday = frame[frame["expiration"] == expiry]
    assert len(friday) and friday["quote_time"].max() == pd.Timestamp("2016-03-04 15:55", tz=EXCHANGE_TZ)
    assert not len(_at(frame, "2016-03-04 16:00").query("expiration == @expiry"))
    monday = frame[frame["quote_time"].dt.strftime("%Y-%m-%d") == "2016-03-07"]
    assert len(monday) and (monday["expiration"] > expiry).all()
    # The first session has no earlier snapshot: only its bars from 15:45 on.
    first = frame[frame["quote_time"].dt.strftime("%Y-%m-%d") == "2016-03-02"]
    assert sorted(first["quote_time"].dt.strftime("%H:%M").unique()) == ["15:45", "15:50", "15:55", "16:00"]
    assert stats.partial_sessions == ["2016-03-02"] and stats.bars_without_snapshot == 74
    times = frame[frame["quote_time"].dt.strftime("%Y-%m-%d") == "2016-03-03"]["quote_time"].unique()
    assert len(times) == 78


def test_dte_max_and_strike_band(eod):
    table, spot = eod
    narrow = pa.concat_tables(list(expand_daily_chains(table, spot, 5, dte_max=7, strike_band=0.05,
                                                       sessions=["2016-03-03"]))).to_pandas()
    days = (pd.to_datetime(narrow["expiration"]) - pd.Timestamp("2016-03-03")).dt.days
    assert len(narrow) and days.max() <= 7
    assert narrow["strike"].between(0.94 * narrow["underlying_price"].min(),
                                    1.06 * narrow["underlying_price"].max()).all()
    # The band is fixed per snapshot: the same contracts at every bar priced from one snapshot.
    morning = narrow[narrow["quote_time"] < pd.Timestamp("2016-03-03 15:45", tz=EXCHANGE_TZ)]
    assert morning.groupby("quote_time").size().nunique() == 1


def test_iv_solved_from_the_mid_where_the_vendor_has_none(eod):
    table, spot = eod
    nan = pa.array(np.full(table.num_rows, np.nan))
    no_iv = _replace(table, "iv", nan)
    # A few contracts with neither an IV nor a quote: dropped and counted.
    unquoted = np.zeros(table.num_rows, dtype=bool)
    unquoted[:7] = True
    bid = pc.if_else(pa.array(unquoted), pa.scalar(np.nan), no_iv.column("bid"))
    no_iv = _replace(no_iv, "bid", bid)
    stats = ExpansionStats()
    out = pa.concat_tables(list(expand_daily_chains(no_iv, spot, 5, sessions=["2016-03-03"], stats=stats))).to_pandas()
    assert stats.solved_iv > 1000 and stats.contracts_without_iv >= 1
    rows = _at(out, "2016-03-03 10:00").merge(_frame(table).query("day == '2016-03-02'"), on=KEY, suffixes=("", "_v"))
    near = (np.abs(rows["strike"] / rows["underlying_price"] - 1) < 0.03) & (rows["expiration"] > pd.Timestamp(
        "2016-03-10").date())
    assert near.sum() > 10
    assert np.abs(rows["iv"] - rows["iv_v"])[near].max() < 0.01


def test_api_errors(eod):
    table, spot = eod
    with pytest.raises(DataError, match="do not cover session 2016-03-04"):
        list(expand_daily_chains(table, spot[spot.index.strftime("%Y-%m-%d") != "2016-03-04"], 5))
    shifted = _replace(table, "quote_time", pc.subtract(table.column("quote_time"), pa.scalar(pd.Timedelta(hours=3))))
    with pytest.raises(DataError, match="EOD data"):
        list(expand_daily_chains(pa.concat_tables([table, shifted]), spot, 5))
    other = _replace(table, "underlying", pa.array(["QQQ"] * table.num_rows))
    with pytest.raises(DataError, match="one underlying"):
        list(expand_daily_chains(pa.concat_tables([table, other]), spot, 5))
    with pytest.raises(DataError, match="no usable snapshot"):
        list(expand_daily_chains(table.slice(0, 0), spot, 5))
    with pytest.raises(DataError, match="tz-aware"):
        list(expand_daily_chains(table, spot.tz_localize(None), 5))


def test_session_grid_half_day():
    normal, half = session_grid(pd.DatetimeIndex(["2016-11-23", "2016-11-25"]), 5)
    assert len(normal) == 78 and len(half) == 42
    assert pd.Timestamp(half[-1], tz="UTC").tz_convert(EXCHANGE_TZ).strftime("%H:%M") == "13:00"
    assert len(session_grid(pd.DatetimeIndex(["2016-11-23"]), 1)[0]) == 390


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(eod, tmp_path_factory):
    """A small EOD input (0–10 DTE) and the provider's 5-minute bars, as Parquet files."""
    table, spot = eod
    folder = tmp_path_factory.mktemp("expand-inputs")
    days = pc.subtract(pc.cast(table.column("expiration"), pa.int32()),
                       pc.cast(pc.cast(pc.local_timestamp(table.column("quote_time")), pa.date32()), pa.int32()))
    small = table.filter(pc.less_equal(days, 10))
    pq.write_table(small, folder / "eod.parquet")
    pq.write_table(_bars_table(spot), folder / "bars.parquet")
    return folder, small, spot


def _store_times(store: ChainStore) -> pd.Series:
    return pd.Series(store.read_chains(columns=["quote_time"]).column("quote_time").to_pandas().unique())


def test_cli_end_to_end_with_bars(tiny, tmp_path, capsys):
    folder, small, spot = tiny
    out = tmp_path / "expanded"
    status = main(["--input", str(folder / "eod.parquet"), "--bars", str(folder / "bars.parquet"),
                   "--store", str(out), "--strike-band", "0.1"])
    text = " ".join(capsys.readouterr().out.split())     # rich wraps lines
    assert status == 0, text
    assert "EXPANDED" in text and "not vendor quotes" in text
    store = ChainStore.open(out)
    assert [str(d.date()) for d in store.dates()] == SESSIONS
    times = pd.DatetimeIndex(_store_times(store)).tz_convert(EXCHANGE_TZ)
    assert (times.minute % 5 == 0).all() and (times.second == 0).all()
    day = times[times.strftime("%Y-%m-%d") == "2016-03-03"]
    assert len(day) == 78 and day.min().strftime("%H:%M") == "09:35" and day.max().strftime("%H:%M") == "16:00"
    rows = store.read_chains()
    assert pc.all(pc.starts_with(rows.column("source"), "expanded:")).as_py()
    # Same numbers as the API on the same spot.
    api = pa.concat_tables(list(expand_daily_chains(small, spot, 5, strike_band=0.1)))
    assert rows.num_rows == api.num_rows
    np.testing.assert_array_equal(rows.column("ask").to_numpy(), api.column("ask").to_numpy())
    assert ChainStore.open(out).manifest["expansions"][0]["minutes"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".expand")]


def test_cli_synthetic_spot_and_default_store(tiny, tmp_path, monkeypatch, capsys):
    folder, _, _ = tiny
    monkeypatch.chdir(tmp_path)
    status = main(["--input", str(folder / "eod.parquet"), "--dte-max", "7", "--start", "2016-03-03",
                   "--end", "2016-03-04"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "SYNTHETIC" in text
    store = ChainStore.open(tmp_path / "data" / "expanded" / "eod-5min")
    assert [str(d.date()) for d in store.dates()] == ["2016-03-03", "2016-03-04"]
    rows = store.read_chains(columns=["source"])
    assert pc.all(pc.starts_with(rows.column("source"), "expanded(synthetic spot):")).as_py()
    # --start is not the input's first session: its morning has D−1's snapshot, so it is whole.
    assert len(_store_times(store)) == 2 * 78


def _fails(args, tmp_path, capsys) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    status = main(args)
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before        # nothing written
    return errors[0]


def test_cli_errors(tiny, tmp_path, capsys):
    folder, small, spot = tiny
    out = str(tmp_path / "out")
    message = _fails(["--input", str(tmp_path / "nope.csv"), "--store", out], tmp_path, capsys)
    assert "nope.csv" in message and "no such" in message

    unusable = small
    for name in ("iv", "bid", "ask"):
        unusable = _replace(unusable, name, pa.array(np.full(small.num_rows, np.nan)))
    pq.write_table(unusable, tmp_path / "unusable.parquet")
    assert "no usable snapshot" in _fails(["--input", str(tmp_path / "unusable.parquet"), "--store", out],
                                          tmp_path, capsys)

    short = spot[spot.index.strftime("%Y-%m-%d") != "2016-03-04"]
    pq.write_table(_bars_table(short), tmp_path / "short_bars.parquet")
    assert "do not cover session 2016-03-04" in _fails(
        ["--input", str(folder / "eod.parquet"), "--bars", str(tmp_path / "short_bars.parquet"), "--store", out],
        tmp_path, capsys)

    noon = _replace(small, "quote_time", pc.subtract(small.column("quote_time"), pa.scalar(pd.Timedelta(hours=3))))
    pq.write_table(pa.concat_tables([small, noon]), tmp_path / "intraday.parquet")
    message = _fails(["--input", str(tmp_path / "intraday.parquet"), "--store", out], tmp_path, capsys)
    assert "EOD data" in message and "one snapshot per session" in message


def test_script_runs_from_the_repo_root(tmp_path):
    result = subprocess.run([sys.executable, "data_factory/expand_options_intraday.py", "--input",
                             str(tmp_path / "missing"), "--store", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "missing" in result.stderr


def test_one_minute_bars(eod, expanded):
    table, spot = eod
    frame, _ = expanded
    day = spot[spot.index.strftime("%Y-%m-%d") == "2016-03-03"]
    grid = pd.date_range(day.index[0] - pd.Timedelta(minutes=4), day.index[-1], freq="1min")
    one = day.reindex(grid).bfill()          # the 5-minute closes hold at their own stamps
    out = next(expand_daily_chains(table, one, 1, sessions=["2016-03-03"])).to_pandas()
    assert out["quote_time"].nunique() == 390
    at_ten = _at(out, "2016-03-03 10:00").reset_index(drop=True)
    pd.testing.assert_frame_equal(at_ten, _at(frame, "2016-03-03 10:00").reset_index(drop=True))


def test_cli_vendor_files_and_stock_bar_csv(eod, tmp_path, capsys):
    """An IVolatility EOD CSV (snapshots at 16:00) and an Alpaca-style stock-bar CSV, both through
    ``chain_store.ingest``: the 16:00 bar uses D's snapshot, 09:35 … 15:55 D−1's."""
    table, spot = eod
    rows = table.to_pandas()
    rows = rows[((rows["strike"] / rows["underlying_price"] - 1).abs() < 0.03)
                & (pd.to_datetime(rows["expiration"]) <= pd.Timestamp("2016-03-11"))]
    rows = rows[rows["quote_time"].dt.strftime("%Y-%m-%d") <= "2016-03-04"]
    pd.DataFrame({
        "symbol": "SPY", "exchange": "NYSEArca", "date": rows["quote_time"].dt.strftime("%m/%d/%Y"),
        "adjusted close": rows["underlying_price"], "option symbol": "SPY", "expiration":
            pd.to_datetime(rows["expiration"]).dt.strftime("%m/%d/%Y"), "strike": rows["strike"],
        "call/put": rows["option_type"], "style": "A", "ask": rows["ask"], "bid": rows["bid"],
        "mean price": (rows["bid"] + rows["ask"]) / 2, "iv": rows["iv"], "volume": 1, "open interest": 1,
        "stock price for iv": rows["underlying_price"], "*": "*", "delta": rows["delta"], "vega": rows["vega"],
        "gamma": rows["gamma"], "theta": rows["theta"], "rho": 0.0,
    }).to_csv(tmp_path / "ivol.csv", index=False)
    starts = (spot.index - pd.Timedelta(minutes=5)).tz_convert("UTC").as_unit("ns").asi8 // 1_000_000_000
    pd.DataFrame({"symbol": "SPY", "timestamp": starts, "open": spot.values, "high": spot.values, "low": spot.values,
                  "close": spot.values, "volume": 100}).to_csv(tmp_path / "bars.csv", index=False)
    out = tmp_path / "out"
    status = main(["--input", str(tmp_path / "ivol.csv"), "--bars", str(tmp_path / "bars.csv"), "--store", str(out)])
    text = capsys.readouterr()
    assert status == 0, text.out + text.err
    frame = _frame(ChainStore.open(out).read_chains())
    assert set(frame["source"]) == {"expanded:ivolatility"}
    assert frame.groupby("day")["quote_time"].nunique().to_dict() == {"2016-03-02": 1, "2016-03-03": 78,
                                                                      "2016-03-04": 78}
    snaps = _frame(table)
    last = _at(frame, "2016-03-03 16:00").merge(snaps.query("day == '2016-03-03'"), on=KEY, suffixes=("", "_v"))
    before = _at(frame, "2016-03-03 15:55").merge(snaps.query("day == '2016-03-02'"), on=KEY, suffixes=("", "_v"))
    assert len(last) and len(before)
    np.testing.assert_allclose(last["iv"], last["iv_v"], rtol=1e-6)
    np.testing.assert_allclose(before["iv"], before["iv_v"], rtol=1e-6)
