"""Synthetic chain provider: no-arbitrage of its prices, VIX round trip, spot–vol link, quotes, API.

The market is a small in-test fixture (seeded 5-minute spot path, chosen VIX closes), so these tests
do not depend on the embedded data or the intraday synthesiser.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analytics.vol_surface import (atm_total_variance, implied_volatility_surface, quote_bid_ask,
                                   quote_half_spread)
from data_factory.errors import DataError
from data_factory.expirations import listed_expirations
from data_factory.market_calendar import session_bounds, trading_sessions
from data_factory.option_chain import ChainSlice, SyntheticChainProvider

RATE = 0.02
DIV = 0.019
# Prior session (daily row only), then the bar sessions; 2018-11-23 closes at 13:00.
VIX_BY_SESSION = {
    "2018-11-16": 15.0, "2018-11-19": 12.0, "2018-11-20": 20.0, "2018-11-21": 30.0,
    "2018-11-23": 35.0, "2018-11-26": 15.0, "2018-11-27": 16.0, "2018-11-28": 14.0,
    "2018-11-29": 15.5, "2018-11-30": 15.0,
}


def make_market(seed: int = 3, start_price: float = 270.0, bar_minutes: int = 5):
    sessions = trading_sessions("2018-11-16", "2018-11-30")
    assert [str(s.date()) for s in sessions] == list(VIX_BY_SESSION)
    bounds = session_bounds(sessions[1:])
    rng = np.random.default_rng(seed)
    stamps, closes, daily_open, daily_close = [], [], [start_price], [start_price]
    price = start_price
    for session, (open_time, close_time) in zip(sessions[1:], bounds.itertuples(index=False)):
        times = pd.date_range(open_time + pd.Timedelta(minutes=bar_minutes), close_time,
                              freq=f"{bar_minutes}min")
        price *= math.exp(rng.normal(0, 0.003))                     # overnight gap
        daily_open.append(price)
        path = price * np.exp(np.cumsum(rng.normal(0, 0.01 / math.sqrt(len(times)), len(times))))
        stamps.append(times)
        closes.append(path)
        price = path[-1]
        daily_close.append(price)
    bars = pd.DataFrame({"close": np.concatenate(closes)},
                        index=pd.DatetimeIndex(np.concatenate([t.asi8 for t in stamps])).tz_localize("UTC")
                        .tz_convert("America/New_York"))
    daily = pd.DataFrame({"open": daily_open, "close": daily_close,
                          "iv_index": list(VIX_BY_SESSION.values()), "rate": RATE}, index=sessions)
    return bars, daily


@pytest.fixture(scope="module")
def market():
    return make_market()


@pytest.fixture(scope="module")
def provider(market):
    bars, daily = market
    return SyntheticChainProvider(bars, daily, dividend_yield=DIV)


def last_bar_of(provider, day: str) -> pd.Timestamp:
    times = provider.bar_times
    return times[times.normalize().tz_localize(None) == pd.Timestamp(day)][-1]


def _cboe_vix(chain: ChainSlice, rate: float) -> float:
    """Cboe VIX white-paper computation on the chain's mid quotes (independent of the surface)."""
    minutes_30, minutes_year = 30 * 1440, 525_600
    variances = []
    expiries = np.unique(chain.expiration)
    t_of = {e: chain.t_years[chain.expiration == e][0] for e in expiries}
    near = max((e for e in expiries if t_of[e] * minutes_year < minutes_30), key=lambda e: t_of[e])
    nxt = min((e for e in expiries if t_of[e] * minutes_year >= minutes_30), key=lambda e: t_of[e])
    for expiry in (near, nxt):
        rows = chain.expiration == expiry
        t = t_of[expiry]
        calls = pd.DataFrame({"K": chain.strike[rows & chain.is_call], "mid": chain.mid[rows & chain.is_call],
                              "bid": chain.bid[rows & chain.is_call]}).set_index("K")
        puts = pd.DataFrame({"K": chain.strike[rows & ~chain.is_call], "mid": chain.mid[rows & ~chain.is_call],
                             "bid": chain.bid[rows & ~chain.is_call]}).set_index("K")
        diff = (calls["mid"] - puts["mid"]).abs()
        k_star = diff.idxmin()
        forward = k_star + math.exp(rate * t) * (calls.loc[k_star, "mid"] - puts.loc[k_star, "mid"])
        k0 = calls.index[calls.index <= forward].max()
        strip = {}
        zeros = 0
        for k in sorted(puts.index[puts.index < k0], reverse=True):
            zeros = zeros + 1 if puts.loc[k, "bid"] == 0 else 0
            if zeros >= 2:
                break
            if puts.loc[k, "bid"] > 0:
                strip[k] = puts.loc[k, "mid"]
        zeros = 0
        for k in sorted(calls.index[calls.index > k0]):
            zeros = zeros + 1 if calls.loc[k, "bid"] == 0 else 0
            if zeros >= 2:
                break
            if calls.loc[k, "bid"] > 0:
                strip[k] = calls.loc[k, "mid"]
        strip[k0] = 0.5 * (puts.loc[k0, "mid"] + calls.loc[k0, "mid"])
        strikes = np.array(sorted(strip))
        quotes = np.array([strip[k] for k in strikes])
        delta_k = np.gradient(strikes) if strikes.size > 2 else np.ones_like(strikes)
        delta_k[0], delta_k[-1] = strikes[1] - strikes[0], strikes[-1] - strikes[-2]
        sigma2 = (2 / t) * np.sum(delta_k / strikes ** 2 * math.exp(rate * t) * quotes) - (forward / k0 - 1) ** 2 / t
        variances.append((t, sigma2))
    (t1, s1), (t2, s2) = variances
    n1, n2 = t1 * minutes_year, t2 * minutes_year
    blend = t1 * s1 * (n2 - minutes_30) / (n2 - n1) + t2 * s2 * (minutes_30 - n1) / (n2 - n1)
    return 100 * math.sqrt(blend * minutes_year / minutes_30)


# ---------------------------------------------------------------------------------- no-arbitrage

def test_put_call_parity_on_model_prices(provider):
    chain = provider.slice(last_bar_of(provider, "2018-11-27"))
    frame = chain.to_frame()
    calls = frame[frame.right == "C"].set_index(["expiration", "strike"])
    puts = frame[frame.right == "P"].set_index(["expiration", "strike"])
    joined = calls.merge(puts, left_index=True, right_index=True, suffixes=("_c", "_p"))
    assert len(joined) == len(calls) == len(puts) > 1000
    k = joined.index.get_level_values("strike").to_numpy()
    t = joined["t_years_c"].to_numpy()
    parity = chain.spot * np.exp(-DIV * t) - k * np.exp(-RATE * t)
    assert np.abs(joined["theo_c"].to_numpy() - joined["theo_p"].to_numpy() - parity).max() < 1e-8


def test_calls_decreasing_and_convex_in_strike(provider):
    chain = provider.slice(provider.bar_times[200])
    for expiry in chain.expirations():
        rows = (chain.expiration == expiry) & chain.is_call
        strikes, calls = chain.strike[rows], chain.theo[rows]
        assert np.all(np.diff(strikes) == 1.0)
        assert np.all(np.diff(calls) <= 1e-12), expiry
        assert np.all(calls[:-2] - 2 * calls[1:-1] + calls[2:] >= -1e-10), expiry
        puts = chain.theo[(chain.expiration == expiry) & ~chain.is_call]
        assert np.all(np.diff(puts) >= -1e-12)


def test_calendar_total_variance_at_fixed_moneyness(provider):
    chain = provider.slice(provider.bar_times[300], dte_max=400)
    k_grid = np.linspace(-0.25, 0.15, 41)
    previous = None
    for expiry in chain.expirations():
        rows = (chain.expiration == expiry) & chain.is_call
        t = chain.t_years[rows][0]
        forward = chain.spot * math.exp((chain.rate - chain.dividend_yield) * t)
        k = np.log(chain.strike[rows] / forward)
        w = np.interp(k_grid, k, chain.iv[rows] ** 2 * t)
        inside = (k_grid > k[0]) & (k_grid < k[-1])
        if previous is not None:
            both = inside & previous[1]
            assert np.all(w[both] >= previous[0][both] - 1e-12), expiry
        previous = (w, inside)


def test_chain_iv_matches_surface_and_inverts_from_price(provider):
    from analytics.implied_vol import implied_volatility

    chain = provider.slice(provider.bar_times[150], dte_min=1, dte_max=60)
    forward = chain.spot * np.exp((chain.rate - chain.dividend_yield) * chain.t_years)
    surface = implied_volatility_surface(np.log(chain.strike / forward), chain.t_years, chain.iv_index)
    np.testing.assert_allclose(chain.iv, surface, rtol=1e-12)
    # Quotes follow the documented spread model applied to the model price.
    z = np.log(chain.strike / forward) / np.sqrt(atm_total_variance(chain.t_years, chain.iv_index))
    bid, ask = quote_bid_ask(chain.theo, quote_half_spread(chain.theo, chain.iv_index, chain.dte, z))
    np.testing.assert_allclose(chain.bid, bid, atol=1e-12)
    np.testing.assert_allclose(chain.ask, ask, atol=1e-12)
    usable = chain.vega > 1e-3
    result = implied_volatility(chain.theo[usable], chain.spot, chain.strike[usable], chain.t_years[usable],
                                chain.rate, chain.dividend_yield, chain.is_call[usable])
    np.testing.assert_allclose(result.iv, chain.iv[usable], rtol=1e-7)


# ---------------------------------------------------------------------------------- VIX anchoring

@pytest.mark.parametrize("day", ["2018-11-19", "2018-11-20", "2018-11-21", "2018-11-23", "2018-11-26"])
def test_vix_round_trip_from_chain_mids(provider, day):
    bar = last_bar_of(provider, day)
    chain = provider.slice(bar, dte_min=15, dte_max=45, strike_min=1, strike_max=10_000)
    assert chain.iv_index == pytest.approx(VIX_BY_SESSION[day], abs=1e-9)   # close bar carries the close
    assert _cboe_vix(chain, chain.rate) == pytest.approx(VIX_BY_SESSION[day], abs=0.5)


def test_intraday_iv_index_moves_minus_1_5_points_per_percent(market):
    bars, daily = market
    provider = SyntheticChainProvider(bars, daily, dividend_yield=DIV)
    iv = provider.iv_index_bars()
    spot = provider.spot_bars()
    session = iv.index.normalize().tz_localize(None)
    prior_close = daily["close"].shift(1).reindex(session).to_numpy()
    same_day = session[1:] == session[:-1]
    d_iv = np.diff(iv.to_numpy())[same_day]
    d_ret = (np.diff(spot.to_numpy()) / prior_close[1:] * 100)[same_day]
    slope = np.polyfit(d_ret, d_iv, 1)[0]
    assert slope == pytest.approx(-1.5, abs=0.1)
    # The close bar of every session carries that session's VIX close exactly.
    closes = iv.groupby(session).last()
    np.testing.assert_allclose(closes.to_numpy(), daily["iv_index"].iloc[1:].to_numpy(), atol=1e-9)
    # A different beta changes the slope accordingly.
    steeper = SyntheticChainProvider(bars, daily, dividend_yield=DIV, spot_vol_beta=-3.0).iv_index_bars()
    slope3 = np.polyfit(d_ret, np.diff(steeper.to_numpy())[same_day], 1)[0]
    assert slope3 == pytest.approx(-3.0, abs=0.1)



def test_iv_index_floor_holds_on_a_huge_rally(market):
    bars, daily = market
    bars, daily = bars.copy(), daily.copy()
    first_day = bars.index.normalize() == bars.index[0].normalize()
    x = np.linspace(0.0, 1.0, int(first_day.sum()))
    tent = 1.0 + 0.25 * (1.0 - np.abs(2.0 * x - 1.0))             # +25 % by mid-day, back by the close
    bars.loc[first_day, "close"] = bars.loc[first_day, "close"].to_numpy() * tent
    iv = SyntheticChainProvider(bars, daily).iv_index_bars()[first_day]
    # Unfloored, -1.5 points per % would reach about 15 - 1.5*25 < 0 mid-day.
    floor = 0.5 * min(VIX_BY_SESSION["2018-11-16"], VIX_BY_SESSION["2018-11-19"])
    assert iv.min() == pytest.approx(floor) and iv.iloc[-1] == pytest.approx(VIX_BY_SESSION["2018-11-19"])

# ---------------------------------------------------------------------------------- quotes

def test_quote_invariants(provider):
    for bar in provider.bar_times[::97]:
        chain = provider.slice(bar)
        assert np.all(chain.bid <= chain.mid) and np.all(chain.mid <= chain.ask)
        assert np.all(chain.bid >= 0) and np.all(chain.ask - chain.bid >= 0.01 - 1e-12)
        for prices in (chain.bid, chain.ask):
            assert np.abs(prices * 100 - np.round(prices * 100)).max() < 1e-9
        assert np.all(chain.bid[chain.theo < 0.02] == 0)
        assert np.all((chain.theo >= chain.bid - 1e-12) & (chain.theo <= chain.ask + 1e-12))
        assert np.all(chain.iv_conf == 1.0) and np.all(chain.quote_age_s == 0.0)


def _atm_spread(chain: ChainSlice, dte: int) -> float:
    rows = (chain.dte == dte) & chain.is_call
    atm = np.argmin(np.abs(chain.strike[rows] - chain.spot))
    return float((chain.ask - chain.bid)[rows][atm])


def _nearest_dte(chain: ChainSlice, target: int) -> int:
    dtes = np.unique(chain.dte)
    return int(dtes[np.argmin(np.abs(dtes - target))])


def test_spreads_widen_with_dte_vix_and_moneyness(provider):
    calm = provider.slice(last_bar_of(provider, "2018-11-26"), strike_min=1, strike_max=10_000)   # VIX 15
    stressed = provider.slice(last_bar_of(provider, "2018-11-23"), strike_min=1, strike_max=10_000)  # VIX 35
    d30, d90, d_leaps = (_nearest_dte(calm, d) for d in (30, 90, 700))
    assert _atm_spread(calm, d30) < _atm_spread(calm, d90) < _atm_spread(calm, d_leaps)
    # Practitioner targets (reference §7), at VIX 15.
    tol = 1e-9                                                   # difference of two tick prices
    assert 0.01 - tol <= _atm_spread(calm, d30) <= 0.03 + tol
    assert 0.03 - tol <= _atm_spread(calm, d90) <= 0.10 + tol
    assert 0.10 - tol <= _atm_spread(calm, d_leaps) <= 0.50 + tol
    ratio = _atm_spread(stressed, _nearest_dte(stressed, 30)) / _atm_spread(calm, d30)
    assert 2.0 <= ratio <= 4.0
    # Moneyness: relative spread grows into the OTM put wing, absolute spread into deep ITM calls.
    rows = (calm.dte == d30) & ~calm.is_call & (calm.strike <= calm.spot) & (calm.bid > 0)
    rel = ((calm.ask - calm.bid) / calm.mid)[rows][::-1]          # from ATM outward
    thirds = [part.mean() for part in np.array_split(rel, 3)]   # tick rounding makes it jagged
    assert thirds[0] < thirds[1] < thirds[2] and rel[-1] > 5 * rel[0]
    itm_calls = (calm.dte == d30) & calm.is_call & (calm.strike <= calm.spot)
    spread_itm = (calm.ask - calm.bid)[itm_calls][::-1]            # from ATM inward
    assert spread_itm[-1] > 3 * spread_itm[0]


# ---------------------------------------------------------------------------------- slicing

def test_slice_respects_dte_and_lists_every_expiry_in_range(provider):
    bar = provider.bar_times[40]
    chain = provider.slice(bar, dte_min=30, dte_max=45)
    assert len(chain) > 0 and chain.dte.min() >= 30 and chain.dte.max() <= 45
    session = bar.normalize().tz_localize(None)
    listed = listed_expirations(session)
    expected = listed[((listed - session).days >= 30) & ((listed - session).days <= 45)]
    np.testing.assert_array_equal(chain.expirations(), expected.values.astype("datetime64[D]"))
    np.testing.assert_array_equal(chain.dte, (chain.expiration - session.to_datetime64().astype("datetime64[D]"))
                                  .astype(np.int64))


def test_default_strikes_cover_25_percent_on_dollar_grid(provider):
    for bar in provider.bar_times[::131]:
        chain = provider.slice(bar, dte_min=20, dte_max=50)
        for expiry in chain.expirations():
            for is_call in (True, False):
                strikes = chain.strike[(chain.expiration == expiry) & (chain.is_call == is_call)]
                assert np.all(np.diff(strikes) == 1.0)
                assert strikes[0] <= 0.75 * chain.spot < strikes[0] + 1
                assert strikes[-1] - 1 < 1.25 * chain.spot <= strikes[-1]


def test_strike_filter_and_listed_strikes_fixed_within_day(provider):
    chain = provider.slice(provider.bar_times[10], strike_min=250.5, strike_max=260)
    assert chain.strike.min() == 251 and chain.strike.max() == 260
    day_bars = provider.bar_times[provider.bar_times.normalize() == provider.bar_times[0].normalize()]
    bounds = {(s.strike.min(), s.strike.max()) for s in
              (provider.slice(b, expiry=provider.slice(b, dte_min=30, dte_max=40).expiration[0],
                              strike_min=1, strike_max=10_000) for b in day_bars[::10])}
    assert len(bounds) == 1                                       # strikes do not move intraday


def test_expiry_filter_and_expiry_day_settlement(provider):
    times = provider.bar_times
    friday = times[times.normalize().tz_localize(None) == pd.Timestamp("2018-11-23")]
    assert friday[-1].hour == 13                                   # early close
    before = provider.slice(friday[-2], expiry="2018-11-23")
    assert len(before) > 0 and np.all(before.dte == 0)
    assert before.t_years[0] == pytest.approx(5 / 525_600)
    assert len(provider.slice(friday[-1], expiry="2018-11-23")) == 0   # settled at 13:00
    assert len(provider.slice(friday[-2], expiry="2018-11-24")) == 0   # not listed: empty, not an error


def test_empty_slice_is_valid(provider):
    chain = provider.slice(provider.bar_times[0], dte_min=5000, dte_max=6000)
    assert len(chain) == 0 and chain.to_frame().empty
    assert chain.synthetic and chain.european


def test_deterministic_and_order_independent(market):
    bars, daily = market
    first = SyntheticChainProvider(bars, daily, dividend_yield=DIV)
    second = SyntheticChainProvider(bars, daily, dividend_yield=DIV)
    target = first.bar_times[333]
    for bar in second.bar_times[::50]:                              # a different history of calls
        second.slice(bar)
    a, b = first.slice(target, dte_max=60), second.slice(target, dte_max=60)
    for name in ("expiration", "strike", "is_call", "bid", "ask", "mid", "theo", "iv", "delta", "gamma",
                 "theta", "vega", "rho", "dte", "t_years"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # Lazy: the provider holds O(bars) arrays, never a materialised chain.
    held = sum(v.nbytes for v in vars(first).values() if isinstance(v, np.ndarray))
    assert held < 200 * len(first.bar_times) + 200_000


def test_slice_is_immutable(provider):
    chain = provider.slice(provider.bar_times[5])
    with pytest.raises(ValueError):
        chain.bid[0] = 1.0
    with pytest.raises(AttributeError):
        chain.spot = 1.0


def test_describe_labels_synthetic_and_european(provider):
    info = provider.describe()
    assert info["synthetic"] is True and info["european"] is True
    assert info["surface"]["rho"] == -0.7 and info["spot_vol_beta"] == -1.5
    assert provider.slice(provider.bar_times[1]).to_frame().attrs["synthetic"] is True


# ---------------------------------------------------------------------------------- errors

def test_bad_timestamps_raise_data_error_naming_time_and_range(provider):
    with pytest.raises(DataError, match=r"no bar at 2018-11-19 09:37:00-05:00.*inside.*2018-11-19 09:35"):
        provider.slice(pd.Timestamp("2018-11-19 09:37", tz="America/New_York"))
    with pytest.raises(DataError, match=r"no bar at 2019-01-02 10:00:00-05:00.*outside"):
        provider.slice("2019-01-02 10:00")
    with pytest.raises(DataError, match="cannot read"):
        provider.slice("not a time")
    with pytest.raises(DataError, match="outside 0"):
        provider.slice_at(10**9)


def test_bad_ranges_raise_value_error(provider):
    bar = provider.bar_times[0]
    with pytest.raises(ValueError, match="dte_min 50 is greater than dte_max 30"):
        provider.slice(bar, dte_min=50, dte_max=30)
    with pytest.raises(ValueError, match="strike_min"):
        provider.slice(bar, strike_min=300, strike_max=200)


def test_bad_inputs_raise_data_error(market):
    bars, daily = market
    with pytest.raises(DataError, match="no row for session 2018-11-19"):
        SyntheticChainProvider(bars, daily.drop(pd.Timestamp("2018-11-19")))
    broken = daily.copy()
    broken.loc[pd.Timestamp("2018-11-20"), "iv_index"] = np.nan
    with pytest.raises(DataError, match="iv_index on 2018-11-20"):
        SyntheticChainProvider(bars, broken)
    with pytest.raises(DataError, match="missing column"):
        SyntheticChainProvider(bars, daily.drop(columns="rate"))
    shifted = bars.copy()
    shifted.index = shifted.index - pd.Timedelta(hours=7)          # bars before the open
    with pytest.raises(DataError, match="inside its session"):
        SyntheticChainProvider(shifted, daily)


def test_from_embedded_anchors_each_close_on_the_real_vix():
    from data_factory import embedded

    provider = SyntheticChainProvider.from_embedded("2015-08-20", "2015-08-27", seed=7)
    vix = embedded.daily_iv_index("2015-08-20", "2015-08-27")
    spot = embedded.daily_bars("SPY", "2015-08-20", "2015-08-27")["close"]
    session = provider.bar_times.normalize().tz_localize(None)
    np.testing.assert_allclose(provider.iv_index_bars().groupby(session).last().to_numpy(),
                               vix["iv_index"].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(provider.spot_bars().groupby(session).last().to_numpy(), spot.to_numpy())
    info = provider.describe()
    assert info["synthetic"] and info["source"]["iv_source_counts"] == {"vix": 6}
    # 2015-08-24: the largest VIX close of the embedded data, reached on a -3.9 % day.
    stressed = provider.slice(last_bar_of(provider, "2015-08-24"), dte_min=20, dte_max=40)
    assert stressed.iv_index == pytest.approx(vix.loc["2015-08-24", "iv_index"])
    assert len(stressed) > 0 and np.all(stressed.ask > stressed.bid)
