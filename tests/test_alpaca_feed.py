"""AlpacaFeed (data_factory.alpaca_feed) against the local Alpaca imitation (tests.alpaca_fake).

Most tests here build the feed on 5-minute bars (``base_bar_minutes=5``,
``daily_source="intraday"``, ``pair=None``) with a configuration of 5-minute MTF timeframes: that
path is fast and exercises everything but the default inputs. The default path (1-minute base
bars, Alpaca's 1Day bars, the QQQ pair, ``Config()`` defaults) is tested here on ``MinuteBars``, a
small stand-in stock client that answers ``get_stock_bars`` the way alpaca-py does with
``raw_data=True`` (late and forming bars, extended hours), and against the fake itself in
tests/test_alpaca_fake.py and tests/test_live_run.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import requests
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.timeframe import TimeFrameUnit

from analytics.black_scholes import bsm_greeks
from core.config import Config
from core.market import CONDOR_IS_CALL, MarketData, require_market_data
from data_factory.alpaca_feed import (COMPUTED_IV_CONF, NO_IV_CONF, VENDOR_IV_CONF, AlpacaFeed,
                                      daily_iv_proxy, parse_occ_symbol)
from data_factory.errors import DataError
from data_factory.market_calendar import session_bounds, trading_sessions
from intelligence.features import compute_bar_features
from tests.alpaca_fake import FakeAlpaca, Fault

START = "2026-12-07 09:30"           # a Monday, 09:30 New York
NY = "America/New_York"
YEAR_SECONDS = 365.0 * 86_400.0
FIVE_MINUTE_CONFIG = {"mtf": {"base_bar_minutes": 5, "timeframes": [5, 15, 30]}}
# A chain window that fits one or two snapshot pages of the fake and brackets 30 days.
CHAIN_WINDOW = {"dte_min": 20, "dte_max": 40, "strike_range": 0.05}


def data_clients(fake: FakeAlpaca, raw_data: bool = False):
    stock = StockHistoricalDataClient("test-key", "test-secret", url_override=fake.url, raw_data=raw_data)
    option = OptionHistoricalDataClient("test-key", "test-secret", url_override=fake.url, raw_data=raw_data)
    for client in (stock, option):
        client._retry_wait = 0
    return stock, option


def fake_feed(fake: FakeAlpaca, warmup_sessions: int = 40, raw_data: bool = False, **kwargs) -> AlpacaFeed:
    stock, option = data_clients(fake, raw_data)
    settings = dict(pair=None, base_bar_minutes=5, daily_source="intraday", warmup_sessions=warmup_sessions,
                    **CHAIN_WINDOW)
    settings.update(kwargs)
    return AlpacaFeed(stock, option, **settings)


def fake_smile_iv(spot: float, strike):
    """The fake's volatility smile (tests/alpaca_fake.py ``_smile_iv``)."""
    m = np.log(np.asarray(strike, dtype=float) / spot)
    return 0.16 * (1.0 - 2.0 * m + 8.0 * m * m)


@pytest.fixture(scope="module")
def live():
    """One fake and one feed warmed up at 09:30 with 40 sessions, then one bar observed live."""
    with FakeAlpaca(now=START, spot=600.0, seed=0, history_days=45) as fake:
        feed = fake_feed(fake)
        warm_now = fake.now
        warm_bars = feed.warm_up(warm_now)
        warm_requests = feed.requests
        warm_times = feed.bar_times
        fake.advance(minutes=5)
        before = feed.requests
        position = feed.refresh(fake.now)
        yield {"fake": fake, "feed": feed, "warm_now": warm_now, "warm_bars": warm_bars,
               "warm_times": warm_times, "warm_requests": warm_requests, "position": position,
               "refresh_requests": feed.requests - before, "spot": fake.spot}


# ----------------------------------------------------------------------------------------------
# warm-up
# ----------------------------------------------------------------------------------------------

def test_warm_up_gives_forty_sessions_of_close_stamped_bars(live):
    times, now = live["warm_times"], live["warm_now"]
    expected = trading_sessions("2026-09-01", "2026-12-04")[-40:]
    bounds = session_bounds(expected)
    # 78 bars a session, 42 on the 13:00 early close after Thanksgiving (2026-11-27).
    per_session = ((bounds["close"] - bounds["open"]) / pd.Timedelta(minutes=5)).astype(int)
    assert per_session.loc["2026-11-27"] == 42
    assert live["warm_bars"] == len(times) == per_session.sum()
    assert str(times.tz) == NY
    sessions = pd.DatetimeIndex(pd.unique(times.tz_localize(None).normalize()))
    assert len(sessions) == 40 and sessions[-1] == pd.Timestamp("2026-12-04")
    assert sessions.equals(pd.DatetimeIndex(expected))
    # Close-time stamps: the first bar of a session closes 5 minutes after the open, the last at the close.
    day_of = times.tz_localize(None).normalize()
    first = pd.Series(times, index=day_of).groupby(level=0).first()
    last = pd.Series(times, index=day_of).groupby(level=0).last()
    assert (first.to_numpy() == (bounds["open"] + pd.Timedelta(minutes=5)).to_numpy()).all()
    assert (last.to_numpy() == bounds["close"].to_numpy()).all()
    assert times.max() <= now
    assert live["warm_requests"] <= 4


def test_warm_up_bars_are_the_vendor_bars_restamped_at_their_close(live):
    fake, feed = live["fake"], live["feed"]
    stock, _ = data_clients(fake, raw_data=True)
    from alpaca.data.requests import StockBarsRequest
    from alpaca.data.timeframe import TimeFrame
    day = pd.Timestamp("2026-12-04 09:30", tz=NY)
    request = StockBarsRequest(symbol_or_symbols="SPY", timeframe=TimeFrame(5, TimeFrameUnit.Minute),
                               start=day.to_pydatetime(), end=(day + pd.Timedelta(hours=7)).to_pydatetime())
    raw = stock.get_stock_bars(request)
    vendor = raw["SPY"]
    starts = pd.to_datetime([bar["t"] for bar in vendor], utc=True)
    ohlcv = feed.ohlcv_bars()
    mine = ohlcv.loc[(starts + pd.Timedelta(minutes=5)).tz_convert(NY)]
    assert np.allclose(mine["close"], [bar["c"] for bar in vendor])
    assert np.allclose(mine["open"], [bar["o"] for bar in vendor])
    assert np.allclose(mine["volume"], [bar["v"] for bar in vendor])
    assert feed.spot_bars().loc[mine.index].equals(mine["close"].rename("spot"))


def test_warm_up_bars_have_no_chain_and_say_so(live):
    feed = live["feed"]
    stamp = str(feed.bar_times[100])
    for ask in (lambda: feed.slice_at(100), lambda: feed.expirations_at(100, 0, 60),
                lambda: feed.quote_structures(100, np.array(["2027-01-08"], dtype="datetime64[D]"),
                                              np.array([[590.0, 595.0, 605.0, 610.0]])),
                lambda: feed.quote_contracts(100, 101, "2027-01-08", np.array([600.0]), np.array([True]))):
        with pytest.raises(DataError, match="no option chain was recorded") as error:
            ask()
        assert stamp in str(error.value)


def test_warm_up_iv_index_is_the_previous_sessions_proxy(live):
    feed = live["feed"]
    inputs = feed.feature_inputs()
    daily_iv = inputs["daily_iv"]
    warm = feed.iv_index_bars().iloc[:live["warm_bars"]]
    days = warm.index.tz_localize(None).normalize()
    for day in pd.unique(days)[1:]:
        previous = daily_iv.loc[daily_iv.index < day].iloc[-1]
        assert np.allclose(warm[days == day].to_numpy(), previous)
    assert np.isfinite(warm.iloc[100:]).all() and (warm.iloc[100:] > 5).all()
    # The fake's short history (45 sessions) is too short for the GARCH fit.
    assert set(feed.describe()["iv_index"]["proxy_sources"]) == {"realised_vol"}


# ----------------------------------------------------------------------------------------------
# refresh and the live chain
# ----------------------------------------------------------------------------------------------

def test_refresh_adds_exactly_one_bar_with_a_chain(live):
    feed, position = live["feed"], live["position"]
    assert position == live["warm_bars"] == len(feed.bar_times) - 1
    assert feed.bar_times[-1] == pd.Timestamp("2026-12-07 09:35", tz=NY)
    assert feed.spot_bars().iloc[-1] == live["spot"]
    chain = feed.slice_at(position)
    assert chain.synthetic is False and chain.european is False
    # A sub-slice and the frame keep saying the quotes are real and American.
    part = chain.select(chain.is_call)
    assert type(part) is type(chain) and part.synthetic is False and len(part) == int(chain.is_call.sum())
    assert chain.to_frame().attrs["synthetic"] is False and chain.to_frame().attrs["european"] is False
    assert chain.quote_time == feed.bar_times[-1] and chain.spot == live["spot"]
    assert len(chain) > 0
    # ChainSlice order: expiration, then calls before puts, then strike ascending.
    key = np.lexsort((chain.strike, ~chain.is_call, chain.expiration.astype(np.int64)))
    assert np.array_equal(key, np.arange(len(chain)))
    assert (chain.dte >= 20).all() and (chain.dte <= 40).all()
    assert chain.strike.min() >= math.floor(0.95 * chain.spot) and chain.strike.max() <= math.ceil(1.05 * chain.spot)
    settle_of = {e: feed.settlement_time(e).value for e in np.unique(chain.expiration)}
    settle = np.array([settle_of[e] for e in chain.expiration])
    assert np.allclose(chain.t_years, (settle - chain.quote_time_ns) / 1e9 / YEAR_SECONDS)
    assert np.array_equal(chain.mid, (chain.bid + chain.ask) / 2) and np.array_equal(chain.theo, chain.mid)
    assert (chain.quote_age_s == 0.0).all()          # the fake stamps quotes at its clock = the bar close
    assert feed.expirations_at(position).tolist() == np.unique(chain.expiration).tolist()


def test_rows_without_vendor_greeks_get_computed_iv_close_to_the_fakes_model(live):
    chain = live["feed"].slice_at(live["position"])
    missing = np.round(chain.strike) % 7 == 0          # the fake leaves these without greeks/IV
    assert missing.any() and (~missing).any()
    assert (chain.iv_conf[missing] == COMPUTED_IV_CONF).all()
    assert (chain.iv_conf[~missing] == VENDOR_IV_CONF).all()
    model_iv = fake_smile_iv(chain.spot, chain.strike)
    assert np.abs(chain.iv[missing] - model_iv[missing]).max() < 0.03          # a few vol points
    assert np.abs(chain.iv[~missing] - model_iv[~missing]).max() < 1e-4      # vendor IV, rounded to 4 places
    model = bsm_greeks(chain.spot, chain.strike, chain.t_years, 0.04, 0.013, model_iv, chain.is_call)
    assert np.abs(chain.delta[missing] - model.delta[missing]).max() < 0.02
    assert np.allclose(chain.vega[missing], model.vega[missing], rtol=0.1)
    assert np.allclose(chain.theta[missing], model.theta[missing], rtol=0.15, atol=0.005)
    assert np.isfinite(chain.gamma).all() and np.isfinite(chain.rho).all()


def test_live_iv_index_is_the_thirty_day_atm_iv(live):
    feed, position = live["feed"], live["position"]
    value = feed.iv_index_bars().iloc[position]
    atm = 100.0 * fake_smile_iv(live["spot"], round(live["spot"]))
    assert value == pytest.approx(atm, abs=0.2)
    assert feed.slice_at(position).iv_index == value
    # The session's daily IV close is the chain reading once one is recorded.
    assert feed.feature_inputs()["daily_iv"].iloc[-1] == value


def test_refresh_before_the_next_close_costs_no_request(live):
    feed = live["feed"]
    assert live["refresh_requests"] <= 4
    before = feed.requests
    assert feed.refresh(live["fake"].now) is None
    assert feed.requests == before


def test_feed_implements_the_bar_contract(live):
    feed = live["feed"]
    assert isinstance(feed, MarketData)
    assert require_market_data(feed) is feed
    assert feed.sessions[-1] == pd.Timestamp("2026-12-07") and len(feed.sessions) == 41
    assert feed.ohlcv_bars().index.equals(feed.bar_times)
    described = feed.describe()
    json.dumps(described)                                    # JSON-ready
    assert described["synthetic"] is False and described["european"] is False
    assert "American" in described["options"] and "PROXY" in described["iv_index"]["other_bars"]
    assert described["chain_bars"] == 1 and described["counts"]["computed_iv_rows"] > 0


def test_quote_contracts_and_structures_read_the_snapshot(live):
    feed, position = live["feed"], live["position"]
    chain = feed.slice_at(position)
    expiry = chain.expiration[0]
    rows = chain.expiration == expiry
    puts = np.sort(chain.strike[rows & ~chain.is_call])
    calls = np.sort(chain.strike[rows & chain.is_call])
    strikes = np.array([puts[2], puts[5], calls[-6], calls[-3]])
    path = feed.quote_contracts(position, position + 1, expiry, strikes, CONDOR_IS_CALL)
    assert path.bid.shape == (1, 4) and path.bar_time_ns[0] == chain.quote_time_ns and path.spot[0] == chain.spot
    for leg in range(4):
        row = np.flatnonzero(rows & (chain.strike == strikes[leg]) & (chain.is_call == CONDOR_IS_CALL[leg]))[0]
        assert path.bid[0, leg] == chain.bid[row] and path.mid[0, leg] == chain.mid[row]
        assert path.delta[0, leg] == chain.delta[row] and path.theta[0, leg] == chain.theta[row]
    structures = feed.quote_structures(position, np.array([expiry, expiry]), np.array([strikes, strikes + 1000]))
    assert np.array_equal(structures.mid[0], path.mid[0]) and np.array_equal(structures.vega[0], path.vega[0])
    assert np.isnan(structures.mid[1]).all()                   # not in the snapshot: NaN quotes
    assert np.array_equal(feed.slice_at(position, expiry=expiry).expirations(), [expiry])
    assert len(feed.slice_at(position, 30, 31)) < len(chain)
    with pytest.raises(DataError, match="no option chain was recorded"):
        feed.quote_contracts(position - 1, position + 1, expiry, strikes, CONDOR_IS_CALL)
    with pytest.raises(DataError, match="outside"):
        feed.slice_at(position + 1)


def test_held_contracts_outside_the_chain_request_are_quoted_with_one_more_request():
    """A condor held past the chain window (DTE below dte_min, strikes beyond the strike range)
    is still marked: track() names its legs, and each bar's snapshot quotes them."""
    with FakeAlpaca(now=START, spot=600.0, seed=3, history_days=12) as fake:
        feed = fake_feed(fake, warmup_sessions=5)
        feed.warm_up(fake.now)
        today = pd.Timestamp(START).date()
        parsed = [(s, parse_occ_symbol(s)) for s in fake.contract_symbols]
        near = min(day for _s, (_r, day, _c, _k) in parsed if day - pd.Timestamp(today).value // 86_400_000_000_000 >= 1)
        held = {}
        for symbol, (_root, day, is_call, strike) in parsed:       # DTE < 20 and a strike 8% away
            if day == near and ((not is_call and strike in (540.0, 550.0)) or (is_call and strike in (650.0, 660.0))):
                held[(is_call, strike)] = symbol
        assert len(held) == 4, held
        fake.advance(minutes=5)
        before = feed.requests
        untracked = feed.refresh(fake.now)
        chain_requests = feed.requests - before
        strikes = np.array([[540.0, 550.0, 650.0, 660.0]])
        expiry = np.array([near], dtype="datetime64[D]")
        assert np.isnan(feed.quote_structures(untracked, expiry, strikes).mid).all()   # outside the request
        feed.track(held.values())
        fake.advance(minutes=5)
        before = feed.requests
        position = feed.refresh(fake.now)
        assert feed.requests - before == chain_requests + 1              # one request for the four
        quotes = feed.quote_structures(position, expiry, strikes)
        assert np.isfinite(quotes.mid).all() and np.isfinite(quotes.delta).all()
        assert (quotes.bid <= quotes.ask).all()
        path = feed.quote_contracts(position, position + 1, expiry[0], strikes[0], CONDOR_IS_CALL)
        assert np.array_equal(path.mid[0], quotes.mid[0])
        # The entry chain and its expirations are the chain request's alone.
        assert near not in feed.expirations_at(position).astype(np.int64)
        assert (feed.slice_at(position).dte >= 20).all()
        with pytest.raises(ValueError, match="not an OCC symbol of a SPY option"):
            feed.track(["QQQ261218C00500000"])


def test_settlement_time_follows_the_exchange_calendar(live):
    feed = live["feed"]
    assert feed.settlement_time("2026-12-18") == pd.Timestamp("2026-12-18 16:00", tz=NY)
    assert feed.settlement_time(np.datetime64("2026-12-24")) == pd.Timestamp("2026-12-24 13:00", tz=NY)
    assert feed.settlement_time(pd.Timestamp("2026-11-27").date()) == pd.Timestamp("2026-11-27 13:00", tz=NY)
    with pytest.raises(DataError, match="not an exchange session"):
        feed.settlement_time("2026-12-25")


def test_feature_inputs_feed_compute_bar_features(live):
    feed = live["feed"]
    inputs = feed.feature_inputs()
    assert set(inputs) == {"base", "session_close_ns", "daily_iv", "daily_spot", "daily_pair", "target"}
    assert np.array_equal(inputs["target"], feed.bar_times.tz_convert("UTC").as_unit("ns").asi8)
    assert inputs["base"].index.max() <= feed.bar_times[-1]
    assert inputs["daily_spot"].index[-1] == pd.Timestamp("2026-12-07")     # the session under way
    assert feed.sessions.isin(inputs["daily_iv"].index).all()
    config = Config.from_dict(FIVE_MINUTE_CONFIG)
    features = compute_bar_features(config, inputs["base"], inputs["target"], feed.iv_index_bars().to_numpy(),
                                    inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"],
                                    session_close_ns=inputs["session_close_ns"])
    assert len(features) == len(feed.bar_times)
    for column in ("rsi", "adx", "mtf_consensus", "gap_pct", "iv_index"):
        assert np.isfinite(features.columns[column][-1]), column
    assert features.columns["close"][-1] == live["spot"]


# ----------------------------------------------------------------------------------------------
# fresh feeds: clock, look-ahead, requests, errors
# ----------------------------------------------------------------------------------------------

def test_no_look_ahead_and_bars_that_closed_unobserved_have_no_chain():
    with FakeAlpaca(now="2026-12-07 10:02", spot=600.0, seed=3, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5)
        feed.warm_up(fake.now)
        assert feed.bar_times[-1] == pd.Timestamp("2026-12-07 10:00", tz=NY)
        requests_per_bar = []
        for minutes in (3, 5, 5):
            fake.advance(minutes=minutes)
            before = feed.requests
            position = feed.refresh(fake.now)
            requests_per_bar.append(feed.requests - before)
            assert feed.bar_times[-1] <= fake.now and position == len(feed.bar_times) - 1
        assert max(requests_per_bar) <= 4
        fake.advance(minutes=2)                              # 10:17: the 10:20 bar is still forming
        assert feed.refresh(fake.now) is None
        assert feed.bar_times[-1] == pd.Timestamp("2026-12-07 10:15", tz=NY)
        fake.advance(minutes=13)                              # 10:30: two bars closed while away
        position = feed.refresh(fake.now)
        assert feed.bar_times[-3:].equals(pd.DatetimeIndex(["2026-12-07 10:20", "2026-12-07 10:25",
                                                            "2026-12-07 10:30"]).tz_localize(NY))
        assert len(feed.slice_at(position)) > 0
        with pytest.raises(DataError, match="10:25:00"):
            feed.slice_at(position - 1)
        # Its IV index is the previous session's IV close, like a warm-up bar's.
        daily_iv = feed.feature_inputs()["daily_iv"]
        assert feed.iv_index_bars().iloc[position - 1] == daily_iv.loc[pd.Timestamp("2026-12-04")]
        assert feed.iv_index_bars().iloc[position] != feed.iv_index_bars().iloc[position - 1]
        with pytest.raises(ValueError, match="before"):
            feed.refresh(fake.now - pd.Timedelta(minutes=1))


def test_across_a_session_boundary():
    with FakeAlpaca(now="2026-12-04 15:50", spot=600.0, seed=10, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5)
        feed.warm_up(fake.now)
        fake.advance(minutes=10)                                         # Friday 16:00: the last bar
        close_bar = feed.refresh(fake.now)
        assert feed.bar_times[close_bar] == pd.Timestamp("2026-12-04 16:00", tz=NY)
        friday_close_iv = feed.iv_index_bars().iloc[close_bar]
        fake.set_time(pd.Timestamp("2026-12-05 12:00", tz=NY))         # Saturday: nothing, no request
        before = feed.requests
        assert feed.refresh(fake.now) is None and feed.requests == before
        fake.set_time(pd.Timestamp("2026-12-07 09:35", tz=NY))
        position = feed.refresh(fake.now)
        # One daily request for Friday, one bar request, the chain pages.
        assert feed.requests - before <= 4
        assert position == close_bar + 1 and feed.bar_times[position] == pd.Timestamp("2026-12-07 09:35", tz=NY)
        inputs = feed.feature_inputs()
        assert inputs["daily_iv"].loc[pd.Timestamp("2026-12-04")] == friday_close_iv   # the chain reading
        assert inputs["daily_spot"].loc[pd.Timestamp("2026-12-04"), "close"] == feed.spot_bars().iloc[close_bar]
        config = Config.from_dict(FIVE_MINUTE_CONFIG)
        features = compute_bar_features(config, inputs["base"], inputs["target"], feed.iv_index_bars().to_numpy(),
                                        inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"],
                                        session_close_ns=inputs["session_close_ns"])
        monday_open = feed.ohlcv_bars()["open"].iloc[position]
        # Monday's gap: its first bar's open against Friday's close (a fraction).
        friday_close = feed.spot_bars().iloc[close_bar]
        assert features.columns["gap_pct"][-1] == pytest.approx(abs(monday_open / friday_close - 1.0))


def test_a_bars_error_is_a_data_error_and_changes_nothing():
    with FakeAlpaca(now=START, spot=600.0, seed=1, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5)
        feed.warm_up(fake.now)
        count = len(feed.bar_times)
        fake.advance(minutes=5)
        fake.inject(Fault(method="GET", path="/v2/stocks/bars", kind="500"))
        with pytest.raises(DataError, match=r"^Alpaca 5-minute bars request for SPY .* failed: HTTP 500") as error:
            feed.refresh(fake.now)
        assert "\n" not in str(error.value)
        assert len(feed.bar_times) == count
        fake.inject(Fault(method="GET", path="/v2/stocks/bars", kind="502"))   # an HTML body
        with pytest.raises(DataError, match="HTTP 502: 502 Bad Gateway"):
            feed.refresh(fake.now)
        assert feed.refresh(fake.now) == count                # the next try succeeds


def test_a_chain_error_adds_no_bar_and_the_retry_records_it():
    with FakeAlpaca(now=START, spot=600.0, seed=2, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5, raw_data=True)
        feed.warm_up(fake.now)
        count = len(feed.bar_times)
        fake.advance(minutes=5)
        fake.inject(Fault(method="GET", path="/v1beta1/options/snapshots", kind="503"))
        with pytest.raises(DataError, match="option chain request for SPY at 2026-12-07 09:35.*HTTP 503"):
            feed.refresh(fake.now)
        assert len(feed.bar_times) == count
        position = feed.refresh(fake.now)
        assert position == count and len(feed.slice_at(position)) > 0


def test_raw_and_parsed_clients_give_the_same_chain():
    with FakeAlpaca(now=START, spot=600.0, seed=4, history_days=8) as fake:
        feeds = [fake_feed(fake, warmup_sessions=5, raw_data=raw) for raw in (False, True)]
        for feed in feeds:
            feed.warm_up(fake.now)
        fake.advance(minutes=5)
        parsed, raw = (feed.slice_at(feed.refresh(fake.now)) for feed in feeds)
        for name in ("expiration", "strike", "is_call", "bid", "ask", "iv", "delta", "gamma", "theta", "vega",
                     "rho", "iv_conf", "quote_age_s"):
            assert np.array_equal(getattr(parsed, name), getattr(raw, name), equal_nan=True), name
        assert parsed.iv_index == raw.iv_index
        assert np.array_equal(feeds[0].iv_index_bars(), feeds[1].iv_index_bars())


def test_a_chain_without_contracts_in_the_window_is_a_data_error():
    with FakeAlpaca(now=START, spot=600.0, seed=5, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5, dte_min=70, dte_max=90)   # the fake lists 60 days
        feed.warm_up(fake.now)
        fake.advance(minutes=5)
        with pytest.raises(DataError, match=r"no contract in the DTE window 70 … 90"):
            feed.refresh(fake.now)


def test_an_empty_pair_response_is_a_data_error():
    with FakeAlpaca(now=START, spot=600.0, seed=6, history_days=8) as fake:
        feed = fake_feed(fake, warmup_sessions=5, pair="QQQ")              # the fake has no QQQ
        with pytest.raises(DataError, match="no daily QQQ bars"):
            feed.warm_up(fake.now)


def test_warm_up_needs_bars_for_every_session():
    with FakeAlpaca(now=START, spot=600.0, seed=7, history_days=3) as fake:
        feed = fake_feed(fake, warmup_sessions=5)                         # only 3 sessions exist
        with pytest.raises(DataError, match=r"no 5-minute SPY bars for session 2026-11-30 \(2 of 5"):
            feed.warm_up(fake.now)


# ----------------------------------------------------------------------------------------------
# the default path: 1-minute base bars, 1Day bars, the QQQ pair, Config() defaults
# ----------------------------------------------------------------------------------------------

class MinuteBars:
    """A stand-in ``StockHistoricalDataClient(raw_data=True)``: deterministic 1-minute bars of SPY
    and QQQ from 08:00 to 17:00 (extended hours the feed must drop), stamped at their start, up to
    and INCLUDING the bar still forming at ``now`` (the feed must drop it too), and 1Day bars
    stamped at New York midnight, today's forming one included. ``missing``: minute starts not
    published (yet)."""

    BASE = {"SPY": 600.0, "QQQ": 500.0}

    def __init__(self):
        self._session = requests.Session()
        self.now = None
        self.missing: set[pd.Timestamp] = set()
        self.calls = []

    @staticmethod
    def price(symbol: str, minute_ns):
        t = np.asarray(minute_ns, dtype=np.int64) / 60e9
        phase = 0.0 if symbol == "SPY" else 1.0
        # Smooth waves of several periods plus a per-minute wiggle: trends, ranges and returns.
        x = 0.02 * np.sin(t / 4000 + phase) + 0.004 * np.sin(t / 97) + 0.0015 * np.sin(t / 13 + phase) \
            + 0.0008 * np.sin(t * 1.7)
        return MinuteBars.BASE[symbol] * np.exp(x)

    def get_stock_bars(self, request):
        start = pd.Timestamp(request.start, tz="UTC") if request.start.tzinfo is None else pd.Timestamp(request.start)
        end = pd.Timestamp(request.end, tz="UTC") if request.end.tzinfo is None else pd.Timestamp(request.end)
        end = min(end, self.now.tz_convert("UTC"))
        unit = request.timeframe.unit_value
        self.calls.append((unit, start, end))
        days = trading_sessions(start.tz_convert(NY).date(), end.tz_convert(NY).date())
        bounds = session_bounds(days)
        out = {}
        for symbol in request.symbol_or_symbols:
            bars = []
            for day, open_, close in zip(days, bounds["open"], bounds["close"]):
                local = pd.Timestamp(day).tz_localize(NY)
                if unit == TimeFrameUnit.Day:
                    if not start <= local <= end or open_ >= self.now:
                        continue
                    minutes = pd.date_range(open_, min(close, self.now), freq="1min", inclusive="left")
                    prices = self.price(symbol, minutes.asi8)
                    bars.append(self._bar(local, prices[0], prices.max(), prices.min(), prices[-1], 1e7))
                    continue
                minutes = pd.date_range(local + pd.Timedelta(hours=8), local + pd.Timedelta(hours=17), freq="1min",
                                        inclusive="left")
                minutes = minutes[(minutes >= start) & (minutes <= end)]
                opens = self.price(symbol, minutes.asi8)
                closes = self.price(symbol, (minutes + pd.Timedelta(minutes=1)).asi8)
                for stamp, o, c in zip(minutes, opens, closes):
                    if stamp in self.missing:
                        continue
                    bars.append(self._bar(stamp, o, max(o, c) * 1.0002, min(o, c) * 0.9998, c, 1000.0))
            if bars:
                out[symbol] = bars
        return out

    @staticmethod
    def _bar(stamp, o, h, low, c, v):
        return {"t": stamp.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ"), "o": round(float(o), 2),
                "h": round(float(h), 2), "l": round(float(low), 2), "c": round(float(c), 2), "v": v, "n": 10,
                "vw": round(float(c), 2)}


def test_one_minute_default_path_with_config_defaults():
    with FakeAlpaca(now="2026-12-07 10:00", spot=600.0, seed=8, history_days=2) as fake:
        stock = MinuteBars()
        stock.now = fake.now
        _, option = data_clients(fake)
        feed = AlpacaFeed(stock, option, warmup_sessions=10, **CHAIN_WINDOW)   # 1-minute, 1Day, QQQ
        feed.warm_up(fake.now)
        times = feed.bar_times
        assert times[-1] == pd.Timestamp("2026-12-07 10:00", tz=NY)           # the forming 10:00 minute dropped
        assert len(feed.sessions) == 11 and len(times) == 9 * 78 + 42 + 6     # 2026-11-27 closes at 13:00
        base = feed.feature_inputs()["base"]
        local = base.index.tz_convert(NY)
        minute_of_day = local.hour * 60 + local.minute
        assert minute_of_day.min() == 9 * 60 + 31 and minute_of_day.max() == 16 * 60   # extended hours dropped
        assert base.index.max() <= fake.now

        # The minute ending at 10:05 is late: no bar until it arrives or the grace (30 s) ends.
        stock.missing = {pd.Timestamp("2026-12-07 10:04", tz=NY)}
        fake.set_time(pd.Timestamp("2026-12-07 10:05:10", tz=NY))
        stock.now = fake.now
        assert feed.refresh(fake.now) is None
        fake.set_time(pd.Timestamp("2026-12-07 10:05:40", tz=NY))
        stock.now = fake.now
        position = feed.refresh(fake.now)
        assert feed.bar_times[position] == pd.Timestamp("2026-12-07 10:05", tz=NY)
        chain = feed.slice_at(position)
        assert np.allclose(chain.quote_age_s, -40.0)       # snapshot taken 40 s after the close
        # Published late, the minute never rewrites the bar that closed without it.
        stock.missing = set(pd.date_range("2026-12-07 10:05", periods=5, freq="1min", tz=NY))
        fake.set_time(pd.Timestamp("2026-12-07 10:11", tz=NY))
        stock.now = fake.now
        position = feed.refresh(fake.now)           # 10:10 without a single minute: a flat bar
        base = feed.feature_inputs()["base"]
        assert pd.Timestamp("2026-12-07 10:05", tz=NY) not in base.index
        flat = base.loc[pd.Timestamp("2026-12-07 10:10", tz=NY)]
        assert flat["volume"] == 0 and flat["open"] == flat["close"] == base["close"].iloc[-2]
        assert feed.describe()["counts"]["filled_bars"] == 1

        inputs = feed.feature_inputs()
        assert inputs["daily_pair"].index[-1] == pd.Timestamp("2026-12-04")
        assert inputs["daily_spot"].index[-1] == pd.Timestamp("2026-12-07")
        assert inputs["daily_spot"].index[0] >= pd.Timestamp("2026-12-07") - pd.Timedelta(days=400)
        assert "garch" in feed.describe()["iv_index"]["proxy_sources"]
        features = compute_bar_features(Config(), inputs["base"], inputs["target"], feed.iv_index_bars().to_numpy(),
                                        inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"],
                                        session_close_ns=inputs["session_close_ns"])
        for column in ("rsi", "adx", "mtf_consensus", "iv_rank", "divergence_z", "gap_pct"):
            assert np.isfinite(features.columns[column][-1]), column
        # Requests: one minute-bar request per refresh that finds a closed bar, plus the chain.
        assert [unit for unit, _, _ in stock.calls].count(TimeFrameUnit.Day) == 1


# ----------------------------------------------------------------------------------------------
# snapshots the fake cannot produce: malformed symbols, partial Greeks, missing quotes
# ----------------------------------------------------------------------------------------------

class ChainStub:
    """A stand-in ``OptionHistoricalDataClient(raw_data=True)`` serving fixed snapshots."""

    def __init__(self, snapshots):
        self._session = requests.Session()
        self.snapshots = snapshots

    def get_option_chain(self, request):
        return self.snapshots


def test_parse_occ_symbol_is_defensive():
    day = (np.datetime64("2026-12-07") - np.datetime64("1970-01-01")).astype(int)
    assert parse_occ_symbol("SPY261207P00600000") == ("SPY", day, False, 600.0)
    assert parse_occ_symbol("SPY261218C00612500")[1:] == (day + 11, True, 612.5)
    assert parse_occ_symbol("XOM2241220P00280000")[0] == "XOM2"      # Alpaca-API#266: a foreign root
    for bad in ("SPY-BAD", "SPY261307C00600000", "SPY261207X00600000", "SPY261207C0060000", None, 12,
                "SPY261207C00000000"):
        assert parse_occ_symbol(bad) is None, bad


def test_malformed_symbols_partial_greeks_and_missing_quotes():
    with FakeAlpaca(now=START, spot=600.0, seed=9, history_days=8) as fake:
        stock, _ = data_clients(fake)
        quote = {"t": "2026-12-07T14:35:00Z", "bp": 5.0, "bs": 1, "bx": "C", "ap": 5.2, "as": 1, "ax": "C", "c": "A"}
        greeks = {"delta": 0.5, "gamma": 0.02, "theta": -0.2, "vega": 0.6, "rho": 0.2}
        snapshots = {
            "SPY270108C00600000": {"latestQuote": quote, "greeks": greeks, "impliedVolatility": 0.15},
            "SPY270108P00600000": {"latestQuote": quote, "greeks": {k: v for k, v in greeks.items() if k != "rho"}},
            "SPY270108P00590000": {"latestTrade": {"t": "2026-12-07T14:30:00Z", "p": 3.0}},   # no quote
            "SPY270108C00610000": {"latestQuote": {**quote, "bp": 0.0, "ap": 0.0}},              # no market
            "XOM2241220P00280000": {"latestQuote": quote},                                        # foreign root
            "SPY-BAD": {"latestQuote": quote},                                                    # malformed
            "SPY261212C00600000": {"latestQuote": quote},   # a Saturday expiry: in the window, not a session
            "SPY270305C00600000": {"latestQuote": quote},   # outside the DTE window
        }
        feed = AlpacaFeed(stock, ChainStub(snapshots), pair=None, base_bar_minutes=5, daily_source="intraday",
                          warmup_sessions=3, dte_min=0, dte_max=40)
        feed.warm_up(fake.now)
        fake.advance(minutes=5)
        chain = feed.slice_at(feed.refresh(fake.now))
        assert chain.strike.tolist() == [600.0, 610.0, 590.0, 600.0]
        assert chain.is_call.tolist() == [True, True, False, False]
        vendor, no_market, no_quote, partial = range(4)
        assert chain.iv[vendor] == 0.15 and chain.iv_conf[vendor] == VENDOR_IV_CONF and chain.rho[vendor] == 0.2
        assert chain.quote_age_s[vendor] == 0.0
        # Greeks without rho count as no Greeks: IV solved from the mid, Greeks from it.
        assert chain.iv_conf[partial] == COMPUTED_IV_CONF and math.isfinite(chain.rho[partial])
        assert chain.delta[partial] < 0
        for row in (no_market, no_quote):
            assert math.isnan(chain.mid[row]) and math.isnan(chain.iv[row]) and math.isnan(chain.delta[row])
            assert chain.iv_conf[row] == NO_IV_CONF
        assert math.isnan(chain.quote_age_s[no_quote])
        counts = feed.describe()["counts"]
        assert counts["malformed_symbols"] == 2 and counts["foreign_roots"] == 1
        assert counts["no_quote_rows"] == 2 and counts["no_iv_rows"] == 2


def test_a_chain_the_sdk_models_reject_is_a_data_error_naming_raw_data():
    from alpaca.data.historical.utils import parse_obj_as_symbol_dict
    from alpaca.data.models.snapshots import OptionsSnapshot

    class ParsingChainStub(ChainStub):
        """Parses like ``OptionHistoricalDataClient(raw_data=False)`` does."""

        def get_option_chain(self, request):
            return parse_obj_as_symbol_dict(OptionsSnapshot, self.snapshots)

    quote = {"t": "2026-12-07T14:35:00Z", "bp": 5.0, "bs": 1, "bx": "C", "ap": 5.2, "as": 1, "ax": "C", "c": "A"}
    partial = {"latestQuote": quote, "greeks": {"delta": -0.5, "gamma": 0.02, "theta": -0.2, "vega": 0.6}}
    with FakeAlpaca(now=START, spot=600.0, seed=11, history_days=8) as fake:
        stock, _ = data_clients(fake)
        feed = AlpacaFeed(stock, ParsingChainStub({"SPY270108P00600000": partial}), pair=None, base_bar_minutes=5,
                          daily_source="intraday", warmup_sessions=3)
        feed.warm_up(fake.now)
        fake.advance(minutes=5)
        with pytest.raises(DataError, match="did not parse .*raw_data=True"):
            feed.refresh(fake.now)


def test_daily_iv_proxy_uses_garch_once_there_is_history():
    days = trading_sessions("2023-06-01", "2026-12-04")
    rng = np.random.default_rng(0)
    closes = pd.Series(400.0 * np.exp(np.cumsum(rng.standard_normal(len(days)) * 0.01)), index=days)
    values, source = daily_iv_proxy(closes)
    assert set(source.unique()) == {"realised_vol", "garch"}
    assert source.iloc[-1] == "garch" and source.iloc[0] == "realised_vol"
    # 1 % a day is 15.9 % a year; times the 1.2 risk premium.
    assert values.iloc[-100:].mean() == pytest.approx(1.2 * 100 * 0.01 * math.sqrt(252), rel=0.15)
    # No look-ahead: the proxy up to a day does not change when later closes arrive.
    early, _ = daily_iv_proxy(closes.iloc[:-30])
    assert np.allclose(values.loc[early.index], early, equal_nan=True)
