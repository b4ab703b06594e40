"""The Parquet chain store (data_factory.chain_store): what goes in comes back by date and DTE,
an ingest that fails leaves nothing behind, and a store never mixes two copies of a session."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_factory import chain_store
from data_factory.canonical import CHAIN_SCHEMA
from data_factory.chain_store import ChainStore, ingest, write_chain_table
from data_factory.data_engine import coverage
from data_factory.errors import DataError
from tests.chain_fixtures import synthetic_eod_chain


@pytest.fixture(scope="module")
def chain():
    table, _provider = synthetic_eod_chain("2018-03-01", "2018-03-09", dte_max=50)
    return table


def test_a_store_gives_back_each_sessions_rows_by_dte(chain, tmp_path):
    summary = write_chain_table(chain, tmp_path / "store")
    assert summary.chain_rows == chain.num_rows and summary.dates[0] == "2018-03-01" and len(summary.dates) == 7
    store = ChainStore.open(tmp_path / "store")
    assert [d.date().isoformat() for d in store.dates()] == summary.dates
    day = store.read_chains("2018-03-05", "2018-03-05", dte_min=30, dte_max=45)
    # The same rows, by hand from the input table.
    quote_day = pc.cast(pc.local_timestamp(chain.column("quote_time")), pa.date32()).to_numpy(zero_copy_only=False)
    expiry = chain.column("expiration").to_numpy(zero_copy_only=False)
    dte = (expiry - quote_day).astype("timedelta64[D]").astype(int)
    wanted = (quote_day == np.datetime64("2018-03-05")) & (dte >= 30) & (dte <= 45)
    assert day.num_rows == int(wanted.sum()) > 0
    expected = chain.filter(pa.array(wanted)).sort_by([("expiration", "ascending"), ("option_type", "ascending"),
                                                       ("strike", "ascending")])
    for name in ("strike", "bid", "ask", "delta", "iv"):
        assert np.array_equal(day.column(name).to_numpy(), expected.column(name).to_numpy())
    assert day.schema.field("quote_time").type == CHAIN_SCHEMA.field("quote_time").type
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["chain_rows"] == chain.num_rows and manifest["sources"][0]["format"] == "canonical_parquet"


def test_a_session_already_in_the_store_is_refused_and_the_store_is_unchanged(chain, tmp_path):
    write_chain_table(chain, tmp_path / "store")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    manifest = (tmp_path / "store" / "manifest.json").read_text()
    with pytest.raises(DataError, match="already holds chains for 2018-03-01"):
        write_chain_table(chain, tmp_path / "store")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert (tmp_path / "store" / "manifest.json").read_text() == manifest


def test_an_ingest_that_fails_halfway_leaves_no_store(chain, tmp_path, monkeypatch):
    """The first batch is written to the staging folder, the second raises: no store appears."""
    first = chain.slice(0, chain.num_rows // 2)

    def broken(path, fmt, on_bad_rows, underlying):
        def batches():
            yield first
            raise DataError(f"{path}: line 9: bid -1 is negative")
        return "optionsdx", "chain", batches(), None

    monkeypatch.setattr(chain_store, "_open_input", broken)
    source = tmp_path / "vendor.txt"
    source.write_text("x")
    with pytest.raises(DataError, match="line 9"):
        ingest([source], tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_failed_ingest_into_an_existing_store_leaves_it_as_it_was(chain, tmp_path, monkeypatch):
    early = chain.filter(pc.less(chain.column("quote_time"), pa.scalar(pd.Timestamp("2018-03-06", tz="America/New_York"),
                                                                        chain.schema.field("quote_time").type)))
    late = chain.filter(pc.greater_equal(chain.column("quote_time"),
                                         pa.scalar(pd.Timestamp("2018-03-06", tz="America/New_York"),
                                                   chain.schema.field("quote_time").type)))
    write_chain_table(early, tmp_path / "store")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))

    def broken(path, fmt, on_bad_rows, underlying):
        def batches():
            yield late
            raise DataError("boom")
        return "optionsdx", "chain", batches(), None

    monkeypatch.setattr(chain_store, "_open_input", broken)
    source = tmp_path / "vendor.txt"
    source.write_text("x")
    with pytest.raises(DataError, match="boom"):
        ingest([source], tmp_path / "store")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert len(ChainStore.open(tmp_path / "store").dates()) == 3


def test_store_errors_name_the_path(tmp_path, chain):
    with pytest.raises(DataError, match="no such store directory"):
        ChainStore.open(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="not a chain store"):
        ChainStore.open(tmp_path / "half")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a chain store; give a new folder"):
        write_chain_table(chain, tmp_path / "full")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"strike": [1.0]}), bad)
    with pytest.raises(DataError, match="bad.parquet: a Parquet file without the canonical chain columns"):
        ingest([bad], tmp_path / "store2")
    assert not (tmp_path / "store2").exists()


def test_a_gap_in_the_requested_period_is_named(chain, tmp_path):
    keep = pc.not_equal(pc.cast(pc.local_timestamp(chain.column("quote_time")), pa.date32()),
                        pa.scalar(pd.Timestamp("2018-03-07").date(), pa.date32()))
    write_chain_table(chain.filter(keep), tmp_path / "store")
    store = ChainStore.open(tmp_path / "store")
    with pytest.raises(DataError, match="no option chain for session 2018-03-07"):
        coverage(store, start="2018-03-06", end="2018-03-08")
