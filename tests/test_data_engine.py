"""The data engine (data_factory.data_engine): which sessions a store's chains and the user's
bars share, what is left out and said, the gaps that are errors, and the bar stream."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_factory.canonical import BAR_SCHEMA
from data_factory.chain_store import ChainStore, ingest, write_chain_table
from data_factory.data_engine import coverage, stream
from data_factory.errors import DataError
from data_factory.vendor_market import VendorChainMarket
from tests.chain_fixtures import synthetic_eod_chain

NY = "America/New_York"


@pytest.fixture(scope="module")
def fixture():
    return synthetic_eod_chain("2018-03-01", "2018-03-09", time="12:00", dte_max=45)


def bar_file(provider, first, last, path):
    times = provider.bar_times
    keep = (times >= pd.Timestamp(f"{first} 09:30", tz=NY)) & (times <= pd.Timestamp(f"{last} 16:00", tz=NY))
    spot = provider.spot_bars()[keep]
    n = len(spot)
    table = pa.table({"time": pa.array(spot.index.as_unit("ns").asi8, pa.int64()).cast(pa.timestamp("ns")).cast(
                          pa.timestamp("ns", tz="UTC")).cast(BAR_SCHEMA.field("time").type),
                      "symbol": pa.array(["SPY"] * n), "minutes": pa.array(np.full(n, 5, dtype=np.int32)),
                      "open": spot.to_numpy(), "high": spot.to_numpy(), "low": spot.to_numpy(),
                      "close": spot.to_numpy(), "volume": np.ones(n), "source": pa.array(["test"] * n)},
                     schema=BAR_SCHEMA)
    pq.write_table(table, path)
    return spot


def test_chains_alone_use_every_session_and_the_vendor_spot(fixture, tmp_path):
    table, _ = fixture
    write_chain_table(table, tmp_path / "store")
    covered = coverage(ChainStore.open(tmp_path / "store"))
    assert len(covered.sessions) == 7 and covered.bar_sessions is None
    assert "the vendor's underlying price" in " ".join(covered.lines())


def test_bars_and_chains_overlap_and_the_rest_is_named(fixture, tmp_path):
    table, provider = fixture
    write_chain_table(table, tmp_path / "store")
    spot = bar_file(provider, "2018-03-05", "2018-03-09", tmp_path / "bars.parquet")
    ingest([tmp_path / "bars.parquet"], tmp_path / "store")
    store = ChainStore.open(tmp_path / "store")
    covered = coverage(store)
    assert [str(d.date()) for d in covered.sessions] == ["2018-03-05", "2018-03-06", "2018-03-07", "2018-03-08",
                                                         "2018-03-09"]
    assert [str(d.date()) for d in covered.chain_only] == ["2018-03-01", "2018-03-02"]
    assert "left out, chains without bars: 2 sessions (2018-03-01, 2018-03-02)" in covered.lines()
    # The market built from the store runs on the user's bars over the overlap.
    market = VendorChainMarket.from_store(store, dte_cap=45, alignment={"mode": "stale", "fail_fast": False})
    assert market.bar_times[0] == pd.Timestamp("2018-03-05 12:00", tz=NY)           # from the first snapshot
    assert market.spot_bars().iloc[5] == spot.loc[market.bar_times[5]]
    assert market.describe()["coverage"]["chain_only_sessions"] == ["2018-03-01", "2018-03-02"]
    views = list(stream(market, 30, 45, start=0, stop=4))
    assert [v.status for v in views] == ["exact", "prior", "prior", "stale"]     # 12:00, then older quotes
    assert views[1].spot == spot.loc[market.bar_times[1]] and len(views[0].chain) > 0
    assert (views[3].chain.quote_age_s == 15 * 60).all()


def test_a_session_without_a_chain_inside_the_span_is_an_error(fixture, tmp_path):
    table, _ = fixture
    day = pc.cast(pc.local_timestamp(table.column("quote_time")), pa.date32())
    gappy = table.filter(pc.not_equal(day, pa.scalar(pd.Timestamp("2018-03-06").date(), pa.date32())))
    write_chain_table(gappy, tmp_path / "store")
    store = ChainStore.open(tmp_path / "store")
    with pytest.raises(DataError, match="no option chain for session 2018-03-06"):
        coverage(store)
    assert len(coverage(store, start="2018-03-07").sessions) == 3            # a span after the gap is fine
    with pytest.raises(DataError, match="no chains between 2019-01-02 and 2019-02-01"):
        coverage(store, start="2019-01-02", end="2019-02-01")


def one_minute_bar_file(path, first, last, drop: int = 0):
    """The SPY 1-minute bars of a few sessions (close-stamped) as a canonical bar file."""
    from data_factory import embedded
    from data_factory.intraday import intraday_bars

    bars = intraday_bars(embedded.daily_bars("SPY", first, last), freq="1min", seed=7)
    if drop:
        bars = bars.drop(bars.index[100:100 + drop])
    n = len(bars)
    stamps = pa.array(bars.index.tz_convert("UTC").as_unit("ns").asi8, pa.int64())
    table = pa.table({"time": stamps.cast(pa.timestamp("ns")).cast(pa.timestamp("ns", tz="UTC")).cast(
                          BAR_SCHEMA.field("time").type),
                      "symbol": pa.array(["SPY"] * n), "minutes": pa.array(np.full(n, 1, dtype=np.int32)),
                      **{name: bars[name].to_numpy(dtype=float) for name in ("open", "high", "low", "close", "volume")},
                      "source": pa.array(["test"] * n)}, schema=BAR_SCHEMA)
    pq.write_table(table, path)
    return bars


def test_the_users_complete_one_minute_bars_feed_the_indicators_else_synthetic_paths_and_why(fixture, tmp_path):
    from core.config import Config
    from core.market_data import vendor_bar_features, vendor_feature_inputs

    table, _ = fixture
    config = Config()
    write_chain_table(table, tmp_path / "store")
    bars = one_minute_bar_file(tmp_path / "bars.parquet", "2018-03-01", "2018-03-09")
    ingest([tmp_path / "bars.parquet"], tmp_path / "store")
    market = VendorChainMarket.from_store(ChainStore.open(tmp_path / "store"), dte_cap=45)
    inputs = vendor_feature_inputs(config, market)
    assert inputs["base"].index.equals(bars.index) and np.array_equal(inputs["base"]["close"], bars["close"])
    features = vendor_bar_features(config, market)
    assert features.description["base_bars"] == "your 1-minute SPY bars (2,730 regular-session bars)"
    # The indicators' close at each decision bar is the user's bar close at that time.
    assert np.array_equal(features.columns["close"], bars["close"].reindex(market.bar_times).to_numpy())

    write_chain_table(table, tmp_path / "store2")
    one_minute_bar_file(tmp_path / "gappy.parquet", "2018-03-01", "2018-03-09", drop=3)
    ingest([tmp_path / "gappy.parquet"], tmp_path / "store2")
    market = VendorChainMarket.from_store(ChainStore.open(tmp_path / "store2"), dte_cap=45)
    base, why = market.user_base_bars(1)
    assert base is None and why == ("your 1-minute SPY bars are incomplete on 2018-03-01 (387 of 390 regular-session "
                                    "bars; 1 such sessions)")
    assert "SYNTHETIC intraday paths" in vendor_feature_inputs(config, market)["base_description"]
