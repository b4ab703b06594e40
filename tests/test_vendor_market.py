"""The bar contract over the trader's own chains (data_factory.vendor_market): the quotes a bar
sees are the vendor's rows of the snapshot aligned to it — never a later one — with IV and
Greeks solved where the vendor has none, and one clear error for each kind of unusable data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.config import ConfigError
from core.market import require_market_data
from data_factory.errors import DataError
from data_factory.vendor_market import VendorChainMarket
from tests.chain_fixtures import synthetic_eod_chain

NY = "America/New_York"


@pytest.fixture(scope="module")
def eod():
    table, provider = synthetic_eod_chain("2018-02-01", "2018-02-28", dte_max=50)
    return table, provider


def keyed(chain):
    return {(str(e), bool(c), float(k)): i for i, (e, c, k) in
            enumerate(zip(chain.expiration, chain.is_call, chain.strike))}


def test_each_bar_sees_its_snapshots_vendor_rows(eod):
    table, provider = eod
    market = require_market_data(VendorChainMarket(table, dte_cap=50))
    assert len(market.bar_times) == 19 and all(t.strftime("%H:%M") == "15:45" for t in market.bar_times)
    for bar in (0, 7, 18):
        stamp = market.bar_times[bar]
        ours = market.slice_at(bar, 25, 45)
        theirs = provider.slice(stamp, dte_min=25, dte_max=45)
        assert ours.spot == theirs.spot and ours.quote_time_ns == theirs.quote_time_ns
        mine, other = keyed(ours), keyed(theirs)
        common = sorted(set(mine) & set(other))
        assert len(common) == len(other)                       # the vendor's band is wider, never narrower
        a = np.array([mine[k] for k in common])
        b = np.array([other[k] for k in common])
        for name in ("bid", "ask", "iv", "delta", "gamma", "theta", "vega", "dte"):
            assert np.array_equal(getattr(ours, name)[a], getattr(theirs, name)[b]), name
        assert np.allclose(ours.t_years[a], theirs.t_years[b], rtol=0, atol=1e-12)
        assert (ours.iv_conf == 1.0).all() and (ours.quote_age_s == 0.0).all()
        assert not ours.synthetic and not ours.european
    # A condor's quotes through the structure and the contract path agree with the rows.
    chain = market.slice_at(3, 30, 45)
    expiry = chain.expiration[0]
    puts = np.sort(chain.strike[(chain.expiration == expiry) & ~chain.is_call])
    calls = np.sort(chain.strike[(chain.expiration == expiry) & chain.is_call])
    near = lambda values, target: values[np.argmin(np.abs(values - target))]
    strikes = np.array([near(puts, 0.92 * chain.spot), near(puts, 0.95 * chain.spot), near(calls, 1.03 * chain.spot),
                        near(calls, 1.05 * chain.spot)])
    path = market.quote_contracts(3, 8, expiry, strikes, np.array([False, False, True, True]))
    structures = market.quote_structures(5, np.array([expiry, expiry]), np.array([strikes, strikes + 0.5]))
    assert np.array_equal(structures.bid[0], path.bid[2], equal_nan=True) and np.isnan(structures.bid[1]).all()
    assert np.isfinite(path.mid).all()
    theirs = provider.quote_contracts(int(provider.bar_times.get_loc(market.bar_times[5])),
                                      int(provider.bar_times.get_loc(market.bar_times[5])) + 1, expiry, strikes,
                                      np.array([False, False, True, True]))
    assert np.array_equal(path.mid[2], theirs.mid[0])


def test_missing_iv_and_greeks_are_solved_from_the_mid(eod):
    table, provider = eod
    market = VendorChainMarket(table, dte_cap=50)
    bare = VendorChainMarket(synthetic_eod_chain("2018-02-01", "2018-02-28", dte_max=50, drop_greeks=True)[0],
                             dte_cap=50)
    given, solved = market.slice_at(4, 30, 45), bare.slice_at(4, 30, 45)
    assert np.array_equal(given.strike, solved.strike)
    near = (np.abs(given.strike / given.spot - 1) < 0.05) & (given.mid > 0.5)
    assert near.sum() > 10
    # Cent-rounded quotes around the model price: the IV from the mid is within a vol point.
    assert np.abs(solved.iv[near] - given.iv[near]).max() < 0.01
    assert np.abs(solved.delta[near] - given.delta[near]).max() < 0.02
    assert (solved.iv_conf[near] == 0.5).all() and bare.solved_iv_rows > 0


def test_a_snapshot_off_the_bar_grid_is_used_at_the_next_close_with_its_age():
    table, _ = synthetic_eod_chain("2018-02-05", "2018-02-06", time="15:45", dte_max=40)
    late = pc.add(pc.cast(table.column("quote_time"), pa.int64()), pa.scalar(120 * 10**9, pa.int64()))   # 15:47
    table = table.set_column(0, "quote_time", pc.cast(late, table.schema.field("quote_time").type))
    market = VendorChainMarket(table, dte_cap=40)
    assert [t.strftime("%H:%M") for t in market.bar_times] == ["15:50", "15:50"]
    chain = market.slice_at(0)
    assert (chain.quote_age_s == 180.0).all()
    assert chain.iv_conf.max() == pytest.approx(0.5 ** (180 / 300))
    assert market.describe()["alignment"]["counts"]["prior"] == 2


def test_the_users_spot_bars_become_the_decision_bars_and_stale_snapshots_are_refused():
    table, provider = synthetic_eod_chain("2018-02-05", "2018-02-06", time="12:00", dte_max=40)
    day = provider.bar_times[(provider.bar_times >= pd.Timestamp("2018-02-05 09:30", tz=NY))
                             & (provider.bar_times <= pd.Timestamp("2018-02-06 16:00", tz=NY))]
    spot = provider.spot_bars().loc[day]
    # Prior mode (SPY limit 600 s): 12:00 … 12:10 use the noon snapshot; most bars would be stale.
    with pytest.raises(DataError, match="stale rate .* is above the fail-fast 20.0 %"):
        VendorChainMarket(table, dte_cap=40, spot_bars=spot)
    market = VendorChainMarket(table, dte_cap=40, spot_bars=spot, alignment={"mode": "prior", "fail_fast": False})
    times = [t.strftime("%m-%d %H:%M") for t in market.bar_times]
    assert times[0] == "02-05 12:00" and times[-1] == "02-06 16:00"         # nothing before the first snapshot
    used = {t.strftime("%m-%d %H:%M") for t, ok in zip(market.bar_times, market.alignment.usable()) if ok}
    assert used == {"02-05 12:00", "02-05 12:05", "02-05 12:10", "02-06 12:00", "02-06 12:05", "02-06 12:10"}
    at = times.index("02-05 12:10")
    assert (market.slice_at(at).quote_age_s == 600.0).all()
    assert len(market.slice_at(times.index("02-05 12:15"))) == 0            # no chain: no stale trading
    assert market.spot_bars().iloc[at] == spot.loc[pd.Timestamp("2018-02-05 12:10", tz=NY)]
    # Stale mode keeps the noon quotes all afternoon, at a decayed confidence; none mode at 1.0.
    stale = VendorChainMarket(table, dte_cap=40, spot_bars=spot, alignment={"mode": "stale", "fail_fast": False})
    afternoon = [t.strftime("%m-%d %H:%M") for t in stale.bar_times].index("02-05 15:00")
    assert (stale.slice_at(afternoon).quote_age_s == 3 * 3600).all()
    assert stale.slice_at(afternoon).iv_conf.max() == pytest.approx(0.5 ** 36)
    loose = VendorChainMarket(table, dte_cap=40, spot_bars=spot, alignment={"mode": "none"})
    assert loose.slice_at(afternoon).iv_conf.max() == 1.0


def test_unusable_chains_are_refused_with_their_time(eod):
    table, _ = eod
    one_day = table.filter(pc.less(pc.cast(table.column("quote_time"), pa.int64()),
                                   pa.scalar(pd.Timestamp("2018-02-02", tz=NY).value, pa.int64())))
    no_price = one_day.set_column(2, "underlying_price", pa.nulls(one_day.num_rows, pa.float64()))
    with pytest.raises(DataError, match="the chain at 2018-02-01 15:45 EST has no underlying price"):
        VendorChainMarket(no_price)
    evening = pc.add(pc.cast(one_day.column("quote_time"), pa.int64()), pa.scalar(75 * 60 * 10**9, pa.int64()))
    after_close = one_day.set_column(0, "quote_time", pc.cast(evening, one_day.schema.field("quote_time").type))
    with pytest.raises(DataError, match="2018-02-01 17:00 EST is outside the regular session"):
        VendorChainMarket(after_close)
    doubled = pa.concat_tables([one_day, one_day.slice(0, 1)])
    with pytest.raises(DataError, match="two rows for .* at 2018-02-01 15:45"):
        VendorChainMarket(doubled)
    with pytest.raises(DataError, match="no QQQ option rows"):
        VendorChainMarket(one_day, underlying="QQQ")


def test_a_missing_rate_matters_only_where_something_must_be_solved(eod):
    def no_rate(days):
        raise ConfigError("set backtest.risk_free_rate")

    table, _ = eod
    VendorChainMarket(table, dte_cap=50, rate_of=no_rate)                  # vendor IV and Greeks: fine
    bare = synthetic_eod_chain("2018-02-01", "2018-02-05", dte_max=50, drop_greeks=True)[0]
    with pytest.raises(ConfigError, match="set backtest.risk_free_rate"):
        VendorChainMarket(bare, dte_cap=50, rate_of=no_rate)


def test_a_contract_missing_from_one_snapshot_is_marked_at_its_last_quote(eod):
    table, _ = eod
    market = VendorChainMarket(table, dte_cap=50)
    chain = market.slice_at(2, 30, 45)
    expiry = chain.expiration[0]
    put = float(chain.strike[(chain.expiration == expiry) & ~chain.is_call][-10])
    # The vendor's snapshot of bar 3 lacks that put.
    day3 = pa.scalar(market.bar_times[3].value, pa.int64())
    drop = pc.and_(pc.and_(pc.equal(pc.cast(table.column("quote_time"), pa.int64()), day3),
                           pc.equal(table.column("strike"), put)),
                   pc.and_(pc.equal(table.column("option_type"), "P"),
                           pc.equal(table.column("expiration"), pa.scalar(pd.Timestamp(expiry).date(), pa.date32()))))
    gappy = VendorChainMarket(table.filter(pc.invert(drop)), dte_cap=50)
    seen = gappy.slice_at(3, expiry=expiry)
    assert put not in seen.strike[~seen.is_call]              # entries never see it
    path = gappy.quote_contracts(2, 5, expiry, np.array([put]), np.array([False]))
    full = market.quote_contracts(2, 5, expiry, np.array([put]), np.array([False]))
    assert path.mid[1, 0] == full.mid[0, 0]                  # bar 3 carries bar 2's quote, not bar 4's
    assert path.mid[2, 0] == full.mid[2, 0] and gappy.carried_quotes == 1
    assert "1 contract-bars quoted from an earlier snapshot" in gappy.describe()["carried_quotes"]


def test_chains_without_any_quote_are_refused_rather_than_never_trading(eod):
    table, _ = eod
    bars_only = table.set_column(7, "bid", pa.nulls(table.num_rows, pa.float64())).set_column(
        8, "ask", pa.nulls(table.num_rows, pa.float64()))
    with pytest.raises(DataError, match="none of the .* chain rows has a bid and an ask"):
        VendorChainMarket(bars_only, dte_cap=50)
