"""alpaca-py 0.44.0's own clients against ``tests.alpaca_fake.FakeAlpaca``.

These tests pin the fake to the shapes and quirks in ``/work/shared/reference/alpaca-api.md``:
if the SDK can parse what the fake sends and the fake answers what the reference says Alpaca
answers, code tested against the fake (core/live.py, core/broker.py, data_factory/alpaca_feed.py)
sees what it will see on Alpaca paper.
"""
from __future__ import annotations

import json
import math
import time
import zlib

import numpy as np
import pandas as pd
import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.models.snapshots import OptionsSnapshot
from alpaca.data.requests import OptionChainRequest, OptionSnapshotRequest, StockBarsRequest
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import (AssetExchange, OrderClass, OrderSide, OrderStatus, PositionIntent,
                                  PositionSide, QueryOrderStatus, TimeInForce)
from alpaca.trading.requests import (GetOptionContractsRequest, GetOrdersRequest, LimitOrderRequest,
                                     MarketOrderRequest, OptionLegRequest, ReplaceOrderRequest)

from tests.alpaca_fake import DAY_ORDER_END_STATUS, FakeAlpaca, Fault

KEY, SECRET = "test-key", "test-secret"
NEW_YORK = "America/New_York"
START = pd.Timestamp("2026-12-07 09:30", tz=NEW_YORK)  # a Monday, at the open
FIVE_MINUTES = TimeFrame(5, TimeFrameUnit.Minute)

# alpaca-py 0.44.0's BarSet.df calls DataFrame.dropna(inplace=True), deprecated in pandas 3.1.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.dropna is deprecated")

# A 7-day iron condor around 600: long 580 P, short 585 P, short 615 C, long 620 C.
CONDOR = [("SPY261214P00580000", "buy"), ("SPY261214P00585000", "sell"),
          ("SPY261214C00615000", "sell"), ("SPY261214C00620000", "buy")]


def ny(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz=NEW_YORK)


@pytest.fixture
def fake():
    with FakeAlpaca(now=START, spot=600.0, seed=0, options_level=3, cash=100_000.0,
                    key_id=KEY, secret_key=SECRET, half_days=(), history_days=30) as server:
        yield server
        assert server.server_errors == []


@pytest.fixture
def trading(fake):
    client = TradingClient(KEY, SECRET, paper=True, url_override=fake.url)
    client._retry_wait = 0  # an injected 429/504 would otherwise cost 3 s a retry (reference §8)
    return client


@pytest.fixture
def options(fake):
    return OptionHistoricalDataClient(KEY, SECRET, url_override=fake.url)


@pytest.fixture
def stocks(fake):
    return StockHistoricalDataClient(KEY, SECRET, url_override=fake.url)


def raw(fake, method: str, path: str, timeout: float = 5.0, headers=None, **kwargs) -> requests.Response:
    """A plain request with the right keys (unless ``headers`` says otherwise)."""
    if headers is None:
        headers = {"APCA-API-KEY-ID": KEY, "APCA-API-SECRET-KEY": SECRET}
    return requests.request(method, fake.url + path, headers=headers, timeout=timeout, **kwargs)


def legs_for(condor, closing: bool = False) -> list[OptionLegRequest]:
    """Opening legs as given; closing legs with the sides reversed and *_to_close intents."""
    legs = []
    for symbol, side in condor:
        if closing:
            side = "sell" if side == "buy" else "buy"
        intent = PositionIntent(f"{side}_to_{'close' if closing else 'open'}")
        legs.append(OptionLegRequest(symbol=symbol, ratio_qty=1, side=OrderSide(side), position_intent=intent))
    return legs


def mleg(limit: float, client_order_id: str, legs, qty: int = 1, tif=TimeInForce.DAY) -> LimitOrderRequest:
    return LimitOrderRequest(qty=qty, order_class=OrderClass.MLEG, time_in_force=tif,
                             limit_price=limit, client_order_id=client_order_id, legs=legs)


def unit_prices(fake, legs) -> tuple[float, float]:
    """(natural, mid) of one unit in debit-positive terms, from the fake's current quotes."""
    natural = mid = 0.0
    for leg in legs:
        bid, ask = fake.quote(leg.symbol)
        sign = 1 if leg.side == OrderSide.BUY else -1
        natural += sign * (ask if sign > 0 else bid)
        mid += sign * (bid + ask) / 2
    return natural, mid


def cents_down(value: float) -> float:
    return math.floor(value * 100 + 1e-9) / 100


def marketable_credit(fake, legs) -> float:
    """A credit limit (negative) at the natural price: fills whatever fill_fraction is."""
    natural, _ = unit_prices(fake, legs)
    return -cents_down(-natural)


def api_error(call) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    return caught.value


# ---------------------------------------------------------------------------------------------
# Server basics
# ---------------------------------------------------------------------------------------------

def test_url_is_an_origin_and_stop_is_idempotent():
    fake = FakeAlpaca(now=START)
    with pytest.raises(RuntimeError):
        fake.url
    with fake:
        url = fake.url
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/")
        trading = TradingClient(KEY, SECRET, url_override=url)
        assert trading.get_clock().is_open  # its session now holds a kept-alive connection
    fake.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        trading.get_clock()  # a stopped fake answers nothing, not even on that connection


def test_wrong_keys_get_401_on_every_client(fake):
    error = api_error(TradingClient(KEY, "wrong", url_override=fake.url).get_account)
    assert (error.status_code, error.code, error.message) == (401, 40110000, "request is not authorized")
    data_client = StockHistoricalDataClient("other-key", SECRET, url_override=fake.url)
    error = api_error(lambda: data_client.get_stock_bars(
        StockBarsRequest(symbol_or_symbols="SPY", timeframe=FIVE_MINUTES)))
    assert error.status_code == 401
    assert raw(fake, "GET", "/v2/clock", headers={}).status_code == 401  # no headers at all


def test_requests_are_logged_with_query_body_and_status(fake, trading):
    trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, limit=7))
    method, path, query, body, status = fake.requests[-1]
    assert (method, path, body, status) == ("GET", "/v2/orders", None, 200)
    assert query == {"status": "all", "limit": "7"}


# ---------------------------------------------------------------------------------------------
# Clock and account
# ---------------------------------------------------------------------------------------------

def test_clock_during_and_after_the_session(fake, trading):
    clock = trading.get_clock()
    assert clock.is_open
    assert clock.timestamp == START
    assert clock.next_close == ny("2026-12-07 16:00") and clock.next_open == ny("2026-12-08 09:30")
    assert raw(fake, "GET", "/v2/clock").json()["timestamp"].endswith("-05:00")

    fake.set_time(ny("2026-12-07 16:00"))  # the close itself is outside the session
    clock = trading.get_clock()
    assert not clock.is_open
    assert clock.next_open == ny("2026-12-08 09:30") and clock.next_close == ny("2026-12-08 16:00")

    fake.set_time(ny("2026-12-11 17:00"))  # Friday evening: next session is Monday
    clock = trading.get_clock()
    assert not clock.is_open and clock.next_open == ny("2026-12-14 09:30")


def test_clock_before_the_open_and_on_a_holiday():
    with FakeAlpaca(now=ny("2026-11-26 11:00")) as fake:  # Thanksgiving
        clock = TradingClient(KEY, SECRET, url_override=fake.url).get_clock()
        assert not clock.is_open
        assert clock.next_open == ny("2026-11-27 09:30")
        assert clock.next_close == ny("2026-11-27 13:00")  # the exchange's own early close
    with FakeAlpaca(now=ny("2026-12-07 08:00")) as fake:
        clock = TradingClient(KEY, SECRET, url_override=fake.url).get_clock()
        assert not clock.is_open
        assert (clock.next_open, clock.next_close) == (ny("2026-12-07 09:30"), ny("2026-12-07 16:00"))


def test_clock_on_a_test_half_day():
    with FakeAlpaca(now=ny("2026-12-08 10:00"), half_days=("2026-12-08",)) as fake:
        trading = TradingClient(KEY, SECRET, url_override=fake.url)
        assert trading.get_clock().next_close == ny("2026-12-08 13:00")
        fake.set_time(ny("2026-12-08 13:00"))
        clock = trading.get_clock()
        assert not clock.is_open and clock.next_open == ny("2026-12-09 09:30")
        assert fake.quote(CONDOR[0][0])  # quotes still served after the early close
    with pytest.raises(ValueError, match="not an NYSE session"):
        FakeAlpaca(now=START, half_days=("2026-12-12",))  # a Saturday


def test_clock_only_moves_forward(fake):
    fake.advance(minutes=5)
    assert fake.now == ny("2026-12-07 09:35")
    with pytest.raises(ValueError):
        fake.set_time(START)
    with pytest.raises(ValueError):
        fake.advance(minutes=-1)


def test_account_fields(fake, trading):
    account = trading.get_account()
    assert account.status.value == "ACTIVE"
    assert (account.options_trading_level, account.options_approved_level) == (3, 3)
    assert float(account.cash) == float(account.equity) == float(account.last_equity) == 100_000.0
    assert float(account.options_buying_power) == 100_000.0 and account.trading_blocked is False
    body = raw(fake, "GET", "/v2/account").json()
    money = ("cash", "equity", "last_equity", "buying_power", "options_buying_power", "portfolio_value")
    assert all(isinstance(body[field], str) for field in money)  # money as strings (§2)
    assert "daytrade_count" not in body and "pattern_day_trader" not in body  # removed (§11.7)


def test_equity_marks_positions_at_mid(fake, trading):
    legs = legs_for(CONDOR)
    credit = marketable_credit(fake, legs)
    trading.submit_order(mleg(credit, "ic-equity", legs, qty=2))
    account = trading.get_account()
    marks = sum(qty * sum(fake.quote(symbol)) / 2 * 100 for symbol, qty in fake.positions.items())
    assert float(account.cash) == pytest.approx(100_000 - credit * 200)
    assert float(account.equity) == pytest.approx(fake.cash + marks, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Option contracts
# ---------------------------------------------------------------------------------------------

def test_contracts_default_to_the_coming_weekend(fake, trading):
    response = trading.get_option_contracts(GetOptionContractsRequest(underlying_symbols=["SPY"], limit=10_000))
    expirations = {c.expiration_date.isoformat() for c in response.option_contracts}
    assert expirations == {"2026-12-07", "2026-12-08", "2026-12-09", "2026-12-10", "2026-12-11"}
    assert response.next_page_token is None
    assert fake.requests[-1][2]["status"] == "active"  # the SDK always sends it (§2)


def test_contracts_paging_with_filters(fake, trading):
    request = GetOptionContractsRequest(
        underlying_symbols=["SPY"], expiration_date_gte="2026-12-14", expiration_date_lte="2026-12-18",
        type="put", strike_price_gte="590", strike_price_lte="610", limit=40)
    contracts, pages = [], 0
    while True:
        response = trading.get_option_contracts(request)
        contracts += response.option_contracts
        pages += 1
        if response.next_page_token is None:
            break
        request.page_token = response.next_page_token
    assert pages == 3 and len(contracts) == 5 * 21  # five expirations x strikes 590..610
    assert len({c.symbol for c in contracts}) == len(contracts)
    assert {c.type.value for c in contracts} == {"put"}
    first = contracts[0]
    assert first.symbol == "SPY261214P00590000" and first.strike_price == 590.0
    assert (first.root_symbol, first.underlying_symbol, first.size) == ("SPY", "SPY", "100")
    assert first.style.value == "american"


def test_listing_span_and_single_contract_lookup(fake, trading):
    response = trading.get_option_contracts(GetOptionContractsRequest(
        underlying_symbols=["SPY"], expiration_date_gte="2026-12-01", expiration_date_lte="2027-03-31",
        type="call", limit=10_000))
    expirations = sorted({c.expiration_date for c in response.option_contracts})
    assert expirations[0].isoformat() == "2026-12-07" and expirations[-1].isoformat() <= "2027-02-05"
    assert "2026-12-25" not in {e.isoformat() for e in expirations}  # no expiry on a holiday
    strikes = sorted({c.strike_price for c in response.option_contracts})
    assert (strikes[0], strikes[-1], len(strikes)) == (480.0, 720.0, 241)

    by_symbol = trading.get_option_contract("SPY261214C00615000")
    assert trading.get_option_contract(by_symbol.id) == by_symbol
    error = api_error(lambda: trading.get_option_contract("SPY261214C00999000"))
    assert (error.status_code, error.code) == (404, 40410000)


def test_expired_contracts_turn_inactive(fake, trading):
    fake.set_time(ny("2026-12-07 16:30"))
    active = trading.get_option_contracts(GetOptionContractsRequest(underlying_symbols=["SPY"], limit=10_000))
    assert "2026-12-07" not in {c.expiration_date.isoformat() for c in active.option_contracts}
    assert trading.get_option_contract("SPY261207P00600000").status.value == "inactive"


# ---------------------------------------------------------------------------------------------
# Option data
# ---------------------------------------------------------------------------------------------

def test_chain_snapshots_pages_and_missing_greeks(fake, options):
    chain = options.get_option_chain(OptionChainRequest(
        underlying_symbol="SPY", feed="indicative", expiration_date_gte="2026-12-14",
        expiration_date_lte="2026-12-18"))
    assert len(chain) == 5 * 241 * 2
    assert [r[2]["limit"] for r in fake.requests] == ["1000", "1000", "1000"]  # 3 pages of <= 1000
    assert all(isinstance(snapshot, OptionsSnapshot) for snapshot in chain.values())
    for symbol, snapshot in chain.items():
        strike = int(symbol[-8:]) / 1000
        quote = snapshot.latest_quote
        assert 0 <= quote.bid_price < quote.ask_price and quote.timestamp == fake.now
        mid = (quote.bid_price + quote.ask_price) / 2
        assert quote.ask_price - quote.bid_price == pytest.approx(max(0.01, 0.04 * mid), abs=0.011)
        assert snapshot.latest_trade.price > 0 and snapshot.latest_trade.timestamp <= fake.now
        if strike % 7 == 0:  # every 7th strike: no greeks and no IV (reference §5)
            assert snapshot.greeks is None and snapshot.implied_volatility is None
        else:
            assert snapshot.greeks is not None and snapshot.implied_volatility > 0
            call = symbol[9] == "C"  # SPY YYMMDD [C|P] strike
            # Greeks come rounded to 4 decimals: far out of the money a delta reads 0.0.
            assert (0 <= snapshot.greeks.delta <= 1) if call else (-1 <= snapshot.greeks.delta <= 0)
            assert snapshot.greeks.gamma >= 0 and snapshot.greeks.vega >= 0  # (deep ITM puts: theta > 0)
    at_the_money = chain["SPY261214P00601000"].greeks
    assert -0.6 < at_the_money.delta < -0.4 and at_the_money.gamma > 0 and at_the_money.vega > 0
    assert at_the_money.theta < 0 and at_the_money.rho < 0


def test_chain_filters_and_put_skew(fake, options):
    chain = options.get_option_chain(OptionChainRequest(
        underlying_symbol="SPY", type="put", expiration_date="2026-12-14",
        strike_price_gte=560, strike_price_lte=600))
    assert sorted(chain) == [f"SPY261214P00{k}000" for k in range(560, 601)]
    ivs = [chain[f"SPY261214P00{k}000"].implied_volatility for k in (561, 575, 590, 599)]
    assert ivs == sorted(ivs, reverse=True)  # lower strikes, higher vol
    assert options.get_option_chain(OptionChainRequest(underlying_symbol="QQQ")) == {}


def test_snapshots_by_symbol_match_the_fake_quotes(fake, options):
    symbols = [symbol for symbol, _ in CONDOR]
    snapshots = options.get_option_snapshot(OptionSnapshotRequest(symbol_or_symbols=symbols))
    assert sorted(snapshots) == sorted(symbols)
    for symbol in symbols:
        quote = snapshots[symbol].latest_quote
        assert (quote.bid_price, quote.ask_price) == fake.quote(symbol)


def test_quotes_follow_the_spot(fake):
    put, call = "SPY261214P00585000", "SPY261214C00615000"
    put_before, call_before = fake.quote(put), fake.quote(call)
    fake.spot = 590.0
    assert fake.spot == 590.0
    assert fake.quote(put)[0] > put_before[1] and fake.quote(call)[1] < call_before[0]
    fake.advance(5)  # the path continues from the forced price
    assert abs(fake.spot - 590.0) < 3.0


# ---------------------------------------------------------------------------------------------
# Stock bars
# ---------------------------------------------------------------------------------------------

def bars_df(stocks, **kwargs) -> pd.DataFrame:
    request = StockBarsRequest(symbol_or_symbols="SPY", timeframe=FIVE_MINUTES, feed="iex", **kwargs)
    return stocks.get_stock_bars(request).df.loc["SPY"]


def test_bars_cover_the_history_and_only_completed_bars(fake, stocks):
    df = bars_df(stocks, start=ny("2026-09-01"))
    assert list(df.columns) == ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
    sessions = df.index.tz_convert(NEW_YORK).normalize().unique()
    assert len(sessions) == 30  # history_days sessions before the start
    assert df.index[-1] == ny("2026-12-04 15:55")  # Friday's last bar, stamped at its start
    assert (df.index + pd.Timedelta(minutes=5) <= fake.now).all()
    assert df["close"].iloc[-1] == fake.spot == 600.0  # anchored at the start spot
    assert (df["high"] >= df[["open", "close"]].max(axis=1)).all()
    assert (df["low"] <= df[["open", "close"]].min(axis=1)).all()
    assert df["trade_count"].notna().all() and df["vwap"].notna().all()
    thanksgiving_friday = df[df.index.tz_convert(NEW_YORK).date == pd.Timestamp("2026-11-27").date()]
    assert len(thanksgiving_friday) == 42  # 09:30-13:00 early close
    within_session = df.index.to_series().diff() == pd.Timedelta(minutes=5)
    assert (df["open"][within_session] == df["close"].shift(1)[within_session]).all()


def test_bars_advance_with_the_clock(fake, stocks):
    fake.advance(minutes=12)  # 09:42: the 09:30 and 09:35 bars are complete, 09:40 is not
    df = bars_df(stocks, start=ny("2026-12-07 00:00"))
    assert list(df.index.tz_convert(NEW_YORK).strftime("%H:%M")) == ["09:30", "09:35"]
    assert df["close"].iloc[-1] == fake.spot
    later = bars_df(stocks, start=ny("2026-12-07 00:00"), end=ny("2026-12-07 09:35"))
    assert len(later) == 2  # `end` is inclusive of a bar starting at it


def test_bars_paging_limit_and_sort(fake, stocks):
    df = bars_df(stocks, start=ny("2026-11-01"), limit=120)
    assert len(df) == 120 and df.index[0] == ny("2026-11-02 09:30")
    tokens, collected, page_token = 0, [], None
    while True:
        params = {"symbols": "SPY", "timeframe": "5Min", "start": "2026-11-30T00:00:00Z", "limit": 100}
        if page_token:
            params["page_token"] = page_token
        body = raw(fake, "GET", "/v2/stocks/bars", params=params).json()
        collected += body["bars"]["SPY"]
        page_token = body["next_page_token"]
        if page_token is None:
            break
        tokens += 1
    assert len(collected) == 5 * 78 and tokens == 3
    assert all({"t", "o", "h", "l", "c", "v", "n", "vw"} <= set(bar) for bar in collected)
    assert collected[0]["t"] == "2026-11-30T14:30:00Z"
    params = {"symbols": "SPY", "timeframe": "5Min", "start": "2026-12-04T00:00:00Z", "sort": "desc", "limit": 1}
    newest = raw(fake, "GET", "/v2/stocks/bars", params=params).json()
    assert newest["bars"]["SPY"][0]["t"] == "2026-12-04T20:55:00Z"


def test_bars_are_seeded():
    def closes(seed):
        with FakeAlpaca(now=START, seed=seed, history_days=2) as fake:
            return list(bars_df(StockHistoricalDataClient(KEY, SECRET, url_override=fake.url),
                                start=ny("2026-12-01"))["close"])
    assert closes(1) == closes(1) != closes(2)


# ---------------------------------------------------------------------------------------------
# Stock bars: timeframes, QQQ, several symbols, history
# ---------------------------------------------------------------------------------------------

ONE_MINUTE = TimeFrame(1, TimeFrameUnit.Minute)
NS_PER_MINUTE = 60 * 10**9


@pytest.fixture
def pair_fake():
    """SPY and QQQ, 30 sessions of history, the clock at 11:02:30 on a Monday (mid-bar)."""
    with FakeAlpaca(now=ny("2026-12-07 11:02:30"), spot=600.0, seed=4, history_days=30,
                    stocks=("SPY", "QQQ")) as server:
        yield server
        assert server.server_errors == []


def pair_bars(fake, timeframe, symbols=("SPY", "QQQ"), raw_data=False, **kwargs) -> dict[str, pd.DataFrame]:
    """{symbol: frame indexed by the bar's start (UTC)} through alpaca-py's own client."""
    client = StockHistoricalDataClient(KEY, SECRET, url_override=fake.url, raw_data=raw_data)
    request = StockBarsRequest(symbol_or_symbols=list(symbols), timeframe=timeframe, feed="iex", **kwargs)
    response = client.get_stock_bars(request)
    if raw_data:
        return response
    frame = response.df
    return {symbol: frame.loc[symbol] for symbol in frame.index.get_level_values(0).unique()}


def test_five_minute_bars_keep_their_values():
    # The 5-minute master path, pinned: the JSON of every bar served at the start of the default
    # fixture, as written before 1-minute/daily bars and QQQ were added.
    with FakeAlpaca(now=START, spot=600.0, seed=0, history_days=30, stocks=("SPY", "QQQ")) as fake:
        collected, token = [], None
        while True:
            params = {"symbols": "SPY", "timeframe": "5Min", "start": "2026-01-01T00:00:00Z", "limit": 1000}
            if token:
                params["page_token"] = token
            body = raw(fake, "GET", "/v2/stocks/bars", params=params).json()
            collected += body["bars"]["SPY"]
            token = body["next_page_token"]
            if token is None:
                break
    assert len(collected) == 29 * 78 + 42
    assert zlib.crc32(json.dumps(collected, separators=(",", ":")).encode()) == 1728173567


def test_one_minute_bars_aggregate_exactly_to_the_five_minute_bars(pair_fake):
    start, end = ny("2026-11-25 09:30"), ny("2026-12-07 12:00")
    minutes = pair_bars(pair_fake, ONE_MINUTE, start=start, end=end)
    fives = pair_bars(pair_fake, FIVE_MINUTES, start=start, end=end)
    for symbol in ("SPY", "QQQ"):
        one, five = minutes[symbol], fives[symbol]
        bucket = one.index.floor("5min")
        # Every completed 5-minute bar has its five minutes; the forming 11:00 bar has 11:00 and 11:01.
        assert set(bucket) - set(five.index) == {ny("2026-12-07 11:00")}
        assert (one.index[-2:].tz_convert(NEW_YORK).strftime("%H:%M") == ["11:00", "11:01"]).all()
        whole = one[bucket.isin(five.index)]
        groups = whole.groupby(whole.index.floor("5min"))
        assert (groups.size() == 5).all() and groups.size().index.equals(five.index)
        assert (groups["open"].first() == five["open"]).all()
        assert (groups["close"].last() == five["close"]).all()
        assert (groups["high"].max() == five["high"]).all()
        assert (groups["low"].min() == five["low"]).all()
        assert (groups["volume"].sum() == five["volume"]).all()
        # Inside each minute: high/low around open and close, and inside the 5-minute range.
        assert (one["high"] >= one[["open", "close"]].max(axis=1)).all()
        assert (one["low"] <= one[["open", "close"]].min(axis=1)).all()
        parent = five.reindex(whole.index.floor("5min"))
        assert (whole["high"].to_numpy() <= parent["high"].to_numpy()).all()
        assert (whole["low"].to_numpy() >= parent["low"].to_numpy()).all()
        assert (one["volume"] > 0).all() and one["vwap"].notna().all()
        assert (one["close"] * 100).round(6).mod(1).eq(0).all()            # on the cent grid
        # Within the 5 minutes the path moves (a bridge, not a straight line) and opens where it closed.
        inner = whole.index.to_series().diff() == pd.Timedelta(minutes=1)
        assert (whole["open"][inner] == whole["close"].shift(1)[inner]).all()
        assert whole["close"].nunique() > 0.8 * len(five) * 2
    # Seeded and independent of the range asked for.
    again = pair_bars(pair_fake, ONE_MINUTE, symbols=("SPY",), start=ny("2026-12-01 10:03"), end=ny("2026-12-01 10:21"))
    assert again["SPY"].equals(minutes["SPY"].loc[ny("2026-12-01 10:03"):ny("2026-12-01 10:21")])
    with FakeAlpaca(now=pair_fake.now, spot=600.0, seed=4, history_days=30, stocks=("SPY", "QQQ")) as twin:
        assert pair_bars(twin, ONE_MINUTE, start=start, end=end)["QQQ"].equals(minutes["QQQ"])


def test_daily_bars_are_the_sessions_five_minute_bars(pair_fake):
    body = raw(pair_fake, "GET", "/v2/stocks/bars", params={
        "symbols": "SPY", "timeframe": "1Day", "start": "2026-11-20T00:00:00Z"}).json()
    stamps = [bar["t"] for bar in body["bars"]["SPY"]]
    # Stamped at the session date's New York midnight, in UTC (05:00Z in winter); no weekends,
    # no Thanksgiving; the session under way (Monday, open) is there with its bar so far.
    assert stamps[:5] == ["2026-11-20T05:00:00Z", "2026-11-23T05:00:00Z", "2026-11-24T05:00:00Z",
                          "2026-11-25T05:00:00Z", "2026-11-27T05:00:00Z"]
    assert stamps[-2:] == ["2026-12-04T05:00:00Z", "2026-12-07T05:00:00Z"]
    daily = pair_bars(pair_fake, TimeFrame.Day, start=ny("2026-11-20"))
    fives = pair_bars(pair_fake, FIVE_MINUTES, start=ny("2026-11-20"))
    minutes = pair_bars(pair_fake, ONE_MINUTE, start=ny("2026-12-07"))
    for symbol in ("SPY", "QQQ"):
        five = fives[symbol]
        day_of = five.index.tz_convert(NEW_YORK).normalize()
        groups = five.groupby(day_of)
        expected = pd.DataFrame({"open": groups["open"].first(), "high": groups["high"].max(),
                                 "low": groups["low"].min(), "close": groups["close"].last(),
                                 "volume": groups["volume"].sum()})
        got = daily[symbol]
        assert got.index.tz_convert(NEW_YORK).equals(expected.index)
        done = got.iloc[:-1]
        assert (done[expected.columns].to_numpy() == expected.iloc[:-1].to_numpy()).all()
        assert groups.size().loc[ny("2026-11-27")] == 42                   # the 13:00 early close
        # Monday so far: its completed minutes (11:00 and 11:01 of the forming 5-minute bar too).
        today, one = got.iloc[-1], minutes[symbol]
        assert today["open"] == one["open"].iloc[0] and today["close"] == one["close"].iloc[-1]
        assert today["high"] == one["high"].max() and today["low"] == one["low"].min()
        assert today["volume"] == one["volume"].sum()
        # Daily closes are prices the 5-minute bars had: one per session, from `start` on.
        assert got.index.min() == ny("2026-11-20")


def test_fifteen_minute_and_hour_bars_are_clock_aligned_session_aggregates(pair_fake):
    start = ny("2026-12-04 00:00")
    fives = pair_bars(pair_fake, FIVE_MINUTES, symbols=("QQQ",), start=start)["QQQ"]
    for timeframe, width in ((TimeFrame(15, TimeFrameUnit.Minute), "15min"), (TimeFrame.Hour, "1h")):
        bars = pair_bars(pair_fake, timeframe, symbols=("QQQ",), start=start)["QQQ"]
        groups = fives.groupby(fives.index.floor(width))
        complete = groups.size().index[groups.size().index + pd.Timedelta(width) <= pair_fake.now]
        assert bars.index.equals(complete)
        assert (bars["open"] == groups["open"].first().loc[complete]).all()
        assert (bars["high"] == groups["high"].max().loc[complete]).all()
        assert (bars["low"] == groups["low"].min().loc[complete]).all()
        assert (bars["close"] == groups["close"].last().loc[complete]).all()
        assert (bars["volume"] == groups["volume"].sum().loc[complete]).all()
    hours = pair_bars(pair_fake, TimeFrame.Hour, symbols=("QQQ",), start=start)["QQQ"].index.tz_convert(NEW_YORK)
    # Friday 09:00 (09:30-10:00) … 15:00; Monday 09:00 and 10:00 (11:00 is still forming).
    assert list(hours.strftime("%a %H:%M")) == [f"Fri {h:02d}:00" for h in range(9, 16)] + ["Mon 09:00", "Mon 10:00"]
    quarter = pair_bars(pair_fake, TimeFrame(15, TimeFrameUnit.Minute), symbols=("QQQ",), start=ny("2026-12-07"))
    assert quarter["QQQ"].index[-1] == ny("2026-12-07 10:45")


def test_qqq_has_its_own_path_correlated_with_spy(pair_fake):
    fives = pair_bars(pair_fake, FIVE_MINUTES, start=ny("2026-10-01"))
    spy, qqq = fives["SPY"]["close"], fives["QQQ"]["close"]
    assert spy.index.equals(qqq.index) and len(spy) > 2000
    # Anchored at the start (11:02:30): the bar completed then closes at 600 and 0.85 x 600.
    assert spy.loc[ny("2026-12-07 10:55")] == 600.0 and qqq.loc[ny("2026-12-07 10:55")] == 510.0
    r_spy, r_qqq = np.diff(np.log(spy.to_numpy())), np.diff(np.log(qqq.to_numpy()))
    beta = np.cov(r_qqq, r_spy)[0, 1] / np.var(r_spy, ddof=1)
    assert 0.6 < np.corrcoef(r_spy, r_qqq)[0, 1] < 0.9                 # correlated, not a copy
    assert 1.0 < beta < 1.3
    assert not np.allclose(qqq.to_numpy() / spy.to_numpy(), 0.85, atol=1e-3)
    # Only SPY and QQQ exist: other symbols are simply absent, as on Alpaca.
    params = {"timeframe": "1Day", "start": "2026-12-01T00:00:00Z"}
    body = raw(pair_fake, "GET", "/v2/stocks/bars", params={**params, "symbols": "SPY,XYZ,QQQ"}).json()
    assert list(body["bars"]) == ["QQQ", "SPY"]
    body = raw(pair_fake, "GET", "/v2/stocks/bars", params={**params, "symbols": "XYZ"}).json()
    assert body == {"bars": {}, "next_page_token": None}
    # Forcing SPY's price moves QQQ's forming bars (x beta) and leaves its completed bars alone.
    before = pair_bars(pair_fake, FIVE_MINUTES, symbols=("QQQ",), start=ny("2026-12-07"))["QQQ"]
    pair_fake.spot = pair_fake.spot * 1.01
    pair_fake.advance(minutes=5)
    after = pair_bars(pair_fake, FIVE_MINUTES, symbols=("QQQ",), start=ny("2026-12-07"))["QQQ"]
    assert after.iloc[:-1].equals(before) and after["close"].iloc[-1] > 1.005 * before["close"].iloc[-1]


def test_qqq_is_served_only_when_asked_for(fake, stocks):
    response = stocks.get_stock_bars(StockBarsRequest(symbol_or_symbols=["SPY", "QQQ"], timeframe=TimeFrame.Day,
                                                      start=ny("2026-11-01")))
    assert set(response.data) == {"SPY"}
    with pytest.raises(ValueError, match="stocks"):
        FakeAlpaca(now=START, stocks=("QQQ",))
    with pytest.raises(ValueError, match="stocks"):
        FakeAlpaca(now=START, stocks=("SPY", "IWM"))


def test_two_symbols_page_through_the_sdk_once_each(pair_fake):
    start = ny("2026-11-06 09:30")                       # 2 x 7,712 minutes: more than one page
    both = pair_bars(pair_fake, ONE_MINUTE, raw_data=True, start=start)
    pages = [q for m, p, q, b, s in pair_fake.requests if p == "/v2/stocks/bars"]
    assert len(pages) == 2 and pages[0]["limit"] == "10000" and "page_token" in pages[1]
    for symbol in ("SPY", "QQQ"):
        alone = pair_bars(pair_fake, ONE_MINUTE, symbols=(symbol,), raw_data=True, start=start)[symbol]
        assert both[symbol] == alone                      # everything once, in time order
        # 19 full sessions, the 13:00 close after Thanksgiving, Monday's 09:30 … 11:01.
        assert len({bar["t"] for bar in alone}) == len(alone) == 19 * 390 + 210 + 92
    # A total limit through the SDK: it asks for what is left (reference §7).
    limited = pair_bars(pair_fake, ONE_MINUTE, raw_data=True, start=start, limit=12_000)
    assert len(limited["QQQ"]) == len(both["QQQ"]) and len(limited["SPY"]) == 12_000 - len(both["QQQ"])
    assert limited["SPY"] == both["SPY"][:len(limited["SPY"])]
    # By hand: QQQ before SPY, the token continues where the page stopped (mid-symbol and at a
    # symbol's end), and `limit` counts bars across symbols; descending sorts each symbol by time.
    for sort in ("asc", "desc"):
        seen, token, sizes = [], None, []
        while True:
            params = {"symbols": "SPY,QQQ", "timeframe": "1Day", "start": "2026-11-02T00:00:00Z",
                      "limit": 7, "sort": sort}
            if token:
                params["page_token"] = token
            body = raw(pair_fake, "GET", "/v2/stocks/bars", params=params).json()
            sizes.append(sum(len(bars) for bars in body["bars"].values()))
            seen += [(symbol, bar["t"]) for symbol, bars in body["bars"].items() for bar in bars]
            token = body["next_page_token"]
            if token is None:
                break
        sessions = 25                                     # 2026-11-02 … 2026-12-07 (today so far)
        assert sizes == [7, 7, 7, 7, 7, 7, 7, 1] and len(set(seen)) == len(seen) == 2 * sessions
        assert [symbol for symbol, _ in seen] == ["QQQ"] * sessions + ["SPY"] * sessions
        times = [t for symbol, t in seen if symbol == "SPY"]
        assert times == sorted(times, reverse=sort == "desc")
    bad = raw(pair_fake, "GET", "/v2/stocks/bars", params={"symbols": "SPY", "timeframe": "1Day", "page_token": "x"})
    assert bad.status_code == 400


FRIDAY_LAST = ("12-04 15:59", "12-04 15:55", "12-04 15:45", "12-04 15:00")


@pytest.mark.parametrize("now, newest, last_day", [
    ("12-07 09:30", FRIDAY_LAST, "12-04"),                                  # Monday's open: nothing yet
    ("12-07 09:31", ("12-07 09:30", *FRIDAY_LAST[1:]), "12-07"),            # one minute done
    ("12-07 10:02:30", ("12-07 10:01", "12-07 09:55", "12-07 09:45", "12-07 09:00"), "12-07"),
    ("12-07 10:05", ("12-07 10:04", "12-07 10:00", "12-07 09:45", "12-07 09:00"), "12-07"),
    ("12-07 16:30", ("12-07 15:59", "12-07 15:55", "12-07 15:45", "12-07 15:00"), "12-07"),
    ("12-05 12:00", FRIDAY_LAST, "12-04"),                                  # Saturday
])
def test_no_bar_ends_after_now(now, newest, last_day):
    with FakeAlpaca(now=ny(f"2026-{now}"), seed=2, history_days=3, stocks=("SPY", "QQQ")) as fake:
        for (text, width), expected in zip((("1Min", 1), ("5Min", 5), ("15Min", 15), ("1Hour", 60)), newest):
            body = raw(fake, "GET", "/v2/stocks/bars", params={
                "symbols": "SPY,QQQ", "timeframe": text, "start": "2026-12-01T00:00:00Z", "limit": 10000}).json()
            for symbol in ("SPY", "QQQ"):
                stamps = pd.to_datetime([bar["t"] for bar in body["bars"][symbol]])
                assert (stamps + pd.Timedelta(minutes=width) <= fake.now).all(), (text, symbol)
                assert stamps[-1] == ny(f"2026-{expected}"), (text, symbol)     # the newest that has ended
        daily = raw(fake, "GET", "/v2/stocks/bars", params={
            "symbols": "SPY", "timeframe": "1Day", "start": "2026-12-01T00:00:00Z"}).json()["bars"]["SPY"]
        # Today's bar exists once a minute of the session is done; before that Friday is the last.
        assert pd.Timestamp(daily[-1]["t"]) == ny(f"2026-{last_day} 00:00")
        if fake.now.hour == 16:
            fives = raw(fake, "GET", "/v2/stocks/bars", params={
                "symbols": "SPY", "timeframe": "5Min", "start": "2026-12-07T00:00:00Z"}).json()["bars"]["SPY"]
            assert len(fives) == 78 and daily[-1]["c"] == fives[-1]["c"] == fake.spot


def test_history_bounds_every_timeframe():
    with FakeAlpaca(now=START, seed=1, history_days=3, stocks=("SPY", "QQQ")) as fake:
        # Three sessions before Monday 2026-12-07: Wed 12-02, Thu 12-03, Fri 12-04.
        for text in ("1Min", "5Min", "15Min", "1Hour", "1Day"):
            body = raw(fake, "GET", "/v2/stocks/bars", params={
                "symbols": "SPY,QQQ", "timeframe": text, "start": "2026-01-01T00:00:00Z", "limit": 10000}).json()
            for symbol in ("SPY", "QQQ"):
                days = pd.to_datetime([bar["t"] for bar in body["bars"][symbol]]).tz_convert(NEW_YORK).date
                assert sorted(set(days)) == [pd.Timestamp(d).date() for d in ("2026-12-02", "2026-12-03",
                                                                               "2026-12-04")], text
    began = time.perf_counter()
    with FakeAlpaca(now=START, seed=1, history_days=900, stocks=("SPY", "QQQ")) as fake:
        built = time.perf_counter() - began
        client = StockHistoricalDataClient(KEY, SECRET, url_override=fake.url, raw_data=True)
        daily = client.get_stock_bars(StockBarsRequest(symbol_or_symbols=["SPY", "QQQ"], timeframe=TimeFrame.Day,
                                                       start=ny("2020-01-01")))
        assert len(daily["SPY"]) == len(daily["QQQ"]) == 900
        began = time.perf_counter()
        minutes = client.get_stock_bars(StockBarsRequest(symbol_or_symbols="SPY", timeframe=ONE_MINUTE,
                                                         start=ny("2026-10-09 09:30")))["SPY"]
        fetched = time.perf_counter() - began
        assert len(minutes) == 39 * 390 + 210                  # 40 sessions, one of them 09:30-13:00
        pages = [q for m, p, q, b, s in fake.requests if q.get("timeframe") == "1Min"]
        assert len(pages) == 2
    # Large histories are cheap: generated lazily and vectorised (typically ~0.2 s and ~0.2 s).
    assert built < 1.0 and fetched < 1.0


def test_timeframes_the_fake_does_not_serve_are_422(pair_fake):
    for text in ("1Week", "2Min", "7Min", "2Hour", "1Month", "5min", ""):
        reply = raw(pair_fake, "GET", "/v2/stocks/bars", params={"symbols": "SPY", "timeframe": text})
        assert reply.status_code == 422, text
        assert reply.json()["message"].startswith("the fake serves timeframe=1Min, 5Min"), text
    for text in ("1T", "5T", "30Min", "1H", "1D"):               # the real API's short units too
        reply = raw(pair_fake, "GET", "/v2/stocks/bars", params={"symbols": "SPY", "timeframe": text,
                                                                 "start": "2026-12-04T00:00:00Z"})
        assert reply.status_code == 200 and reply.json()["bars"]["SPY"], text


def test_the_feeds_default_path_warms_up_against_the_fake():
    """``AlpacaFeed(stock, option)`` as the live driver builds it: 1-minute base bars, 1Day bars of
    SPY and QQQ over 1,200 calendar days (enough for the GARCH proxy), ``Config()`` features."""
    from core.config import Config
    from data_factory.alpaca_feed import AlpacaFeed
    from intelligence.features import compute_bar_features

    with FakeAlpaca(now=ny("2026-12-07 11:02:30"), spot=600.0, seed=8, history_days=900,
                    stocks=("SPY", "QQQ")) as fake:
        stock = StockHistoricalDataClient(KEY, SECRET, url_override=fake.url)
        option = OptionHistoricalDataClient(KEY, SECRET, url_override=fake.url)
        feed = AlpacaFeed(stock, option)
        defaults = (feed.base_bar_minutes, feed.pair, feed.daily_source, feed.proxy_history_days)
        assert defaults == (1, "QQQ", "daily", 1200)
        feed.warm_up(fake.now)
        asked = [(q["timeframe"], q["symbols"]) for m, p, q, b, s in fake.requests]
        assert asked == [("1Min", "SPY"), ("1Min", "SPY"), ("1Day", "SPY,QQQ")]      # two minute pages
        assert len(feed.sessions) == 41 and feed.bar_times[-1] == ny("2026-12-07 11:00")
        assert feed.describe()["counts"]["filled_bars"] == 0
        inputs = feed.feature_inputs()
        assert inputs["base"].index[-1] == ny("2026-12-07 11:00")       # the forming minute is not served
        assert inputs["daily_pair"].index[-1] == pd.Timestamp("2026-12-04")
        assert "garch" in feed.describe()["iv_index"]["proxy_sources"]
        features = compute_bar_features(Config(), inputs["base"], inputs["target"], feed.iv_index_bars().to_numpy(),
                                        inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"],
                                        session_close_ns=inputs["session_close_ns"])
        assert len(features) == len(feed.bar_times)
        for column in ("rsi", "adx", "mtf_consensus", "iv_rank", "divergence_z"):
            assert np.isfinite(features.columns[column][-1]), column
        assert features.columns["close"][-1] == fake.spot


# ---------------------------------------------------------------------------------------------
# Orders: the iron condor lifecycle
# ---------------------------------------------------------------------------------------------

def test_mleg_body_on_the_wire_is_the_reference_body(fake, trading):
    fake.fill_mode = "never"
    trading.submit_order(mleg(-1.48, "ic-SPY-20261214-8af20c7d", legs_for(CONDOR)))
    method, path, _, body, status = fake.requests[-1]
    assert (method, path, status) == ("POST", "/v2/orders", 200)
    assert list(body) == ["qty", "type", "time_in_force", "order_class", "client_order_id", "legs", "limit_price"]
    assert body["qty"] == 1.0 and body["limit_price"] == -1.48 and body["order_class"] == "mleg"
    assert body["legs"][1] == {"symbol": "SPY261214P00585000", "ratio_qty": 1.0, "side": "sell",
                               "position_intent": "sell_to_open"}


def test_iron_condor_fills_works_replaces_and_closes(fake, trading):
    legs = legs_for(CONDOR)
    natural, mid = unit_prices(fake, legs)
    assert mid < natural < 0  # a credit structure: crossing the spread gets less credit than mid

    # A marketable credit fills at once, at the limit.
    credit = marketable_credit(fake, legs)
    order = trading.submit_order(mleg(credit, "ic-1", legs))
    assert order.status == OrderStatus.FILLED and order.order_class == OrderClass.MLEG
    assert order.symbol is None and order.side is None and order.asset_class is None  # "" -> None
    assert float(order.filled_avg_price) == float(order.limit_price) == credit
    assert [leg.status for leg in order.legs] == [OrderStatus.FILLED] * 4
    leg_prices = [float(leg.filled_avg_price) for leg in order.legs]
    signed = sum((1 if leg.side == OrderSide.BUY else -1) * price for leg, price in zip(order.legs, leg_prices))
    assert signed == pytest.approx(credit) and min(leg_prices) >= 0
    assert fake.positions == {"SPY261214P00580000": 1, "SPY261214P00585000": -1,
                              "SPY261214C00615000": -1, "SPY261214C00620000": 1}
    assert fake.cash == pytest.approx(100_000 - credit * 100)

    positions = {p.symbol: p for p in trading.get_all_positions()}
    short_put = positions["SPY261214P00585000"]
    assert (short_put.qty, short_put.side, short_put.exchange) == ("-1", PositionSide.SHORT, AssetExchange.EMPTY)
    assert short_put.asset_class.value == "us_option" and float(short_put.market_value) < 0
    assert float(short_put.cost_basis) == pytest.approx(-100 * float(short_put.avg_entry_price))

    # An unmarketable credit (above mid) works; stepping it down by replace fills it.
    asked = -cents_down(-mid + 0.30)
    working = trading.submit_order(mleg(asked, "ic-2", legs))
    assert working.status == OrderStatus.NEW and working.filled_qty == "0"
    current, steps = working, 0
    while current.status != OrderStatus.FILLED:
        steps += 1
        assert steps < 100
        stepped = round(float(current.limit_price) + 0.05, 2)
        replacement = trading.replace_order_by_id(current.id, ReplaceOrderRequest(limit_price=stepped))
        assert replacement.replaces == current.id and replacement.id != current.id
        assert trading.get_order_by_id(current.id).status == OrderStatus.REPLACED
        current = replacement
    assert steps > 1 and float(current.filled_avg_price) == float(current.limit_price)
    filled_credit = float(current.limit_price)
    assert fake.positions["SPY261214P00585000"] == -2

    # Close both condors with a debit: buy_to_close / sell_to_close, positive limit.
    close_legs = legs_for(CONDOR, closing=True)
    close_natural, _ = unit_prices(fake, close_legs)
    debit = math.ceil(close_natural * 100 - 1e-9) / 100
    assert debit > 0
    closing = trading.submit_order(mleg(debit, "ic-close-1", close_legs, qty=2))
    assert closing.status == OrderStatus.FILLED
    assert {leg.position_intent for leg in closing.legs} == {PositionIntent.BUY_TO_CLOSE, PositionIntent.SELL_TO_CLOSE}
    assert fake.positions == {} and trading.get_all_positions() == []
    assert fake.cash == pytest.approx(100_000 - (credit + filled_credit) * 100 - debit * 200)


def test_fill_rule_threshold_between_natural_and_mid(fake, trading):
    legs = legs_for(CONDOR[:2])  # a put credit spread
    for fraction, name in ((0.0, "natural"), (0.5, "half"), (1.0, "mid")):
        fake.fill_fraction = fraction
        natural, mid = unit_prices(fake, legs)
        threshold_credit = -natural + fraction * (natural - mid)  # natural + f (mid - natural)
        best = cents_down(threshold_credit)
        working = trading.submit_order(mleg(-round(best + 0.01, 2), f"over-{name}", legs))
        assert working.status == OrderStatus.NEW
        trading.cancel_order_by_id(working.id)
        filled = trading.submit_order(mleg(-best, f"at-{name}", legs))
        assert filled.status == OrderStatus.FILLED


def test_working_orders_fill_when_the_market_comes_to_them(fake, trading):
    legs = legs_for(CONDOR[:2])
    natural, _ = unit_prices(fake, legs)
    asked = cents_down(-natural) + 0.25
    order = trading.submit_order(mleg(-asked, "waiting", legs))
    assert order.status == OrderStatus.NEW
    fake.advance(5)
    assert trading.get_order_by_id(order.id).status == OrderStatus.NEW
    fake.spot = fake.spot - 8  # SPY drops: the put spread is worth more
    fake.advance(5)
    assert trading.get_order_by_id(order.id).status == OrderStatus.FILLED


def test_orders_submitted_after_the_close_wait_for_the_next_session(fake, trading):
    fake.set_time(ny("2026-12-07 17:00"))
    legs = legs_for(CONDOR)
    order = trading.submit_order(mleg(-0.05, "after-hours", legs))
    assert order.status == OrderStatus.NEW and order.expires_at == ny("2026-12-08 16:00")
    fake.set_time(ny("2026-12-08 09:30"))
    assert trading.get_order_by_id(order.id).status == OrderStatus.FILLED


def test_day_orders_end_at_the_close_gtc_orders_stay(fake, trading):
    fake.fill_mode = "never"
    legs = legs_for(CONDOR)
    day = trading.submit_order(mleg(-0.05, "day", legs))
    gtc = trading.submit_order(mleg(-0.05, "gtc", legs, tif=TimeInForce.GTC))
    fake.set_time(ny("2026-12-07 16:05"))
    ended = trading.get_order_by_id(day.id)
    assert ended.status == OrderStatus(DAY_ORDER_END_STATUS)
    assert {leg.status for leg in ended.legs} == {OrderStatus(DAY_ORDER_END_STATUS)}
    assert trading.get_order_by_id(gtc.id).status == OrderStatus.NEW
    fake.set_time(ny("2026-12-14 16:00"))  # the contracts' expiry ends a gtc order too
    assert trading.get_order_by_id(gtc.id).status == OrderStatus.EXPIRED


def test_fill_mode_never_leaves_marketable_orders_working(fake, trading):
    fake.fill_mode = "never"
    legs = legs_for(CONDOR)
    order = trading.submit_order(mleg(marketable_credit(fake, legs), "never", legs))
    fake.advance(30)
    assert trading.get_order_by_id(order.id).status == OrderStatus.NEW
    fake.fill_mode = "auto"
    fake.advance(5)
    assert trading.get_order_by_id(order.id).status == OrderStatus.FILLED
    with pytest.raises(ValueError):
        fake.fill_mode = "sometimes"


def test_market_and_single_leg_orders(fake, trading):
    symbol = "SPY261214P00590000"
    bid, ask = fake.quote(symbol)
    bought = trading.submit_order(MarketOrderRequest(symbol=symbol, qty=2, side=OrderSide.BUY,
                                                     time_in_force=TimeInForce.DAY))
    assert bought.status == OrderStatus.FILLED and float(bought.filled_avg_price) == ask
    assert bought.symbol == symbol and bought.legs is None
    assert fake.positions == {symbol: 2} and fake.cash == pytest.approx(100_000 - ask * 200)
    sold = trading.submit_order(LimitOrderRequest(symbol=symbol, qty=2, side=OrderSide.SELL, limit_price=bid,
                                                  time_in_force=TimeInForce.DAY,
                                                  position_intent=PositionIntent.SELL_TO_CLOSE))
    assert sold.status == OrderStatus.FILLED and fake.positions == {}


def test_contracts_held_at_expiry_settle_at_intrinsic(fake, trading):
    symbol = "SPY261207C00590000"  # in the money, expiring today
    bought = trading.submit_order(MarketOrderRequest(symbol=symbol, qty=1, side=OrderSide.BUY,
                                                     time_in_force=TimeInForce.DAY))
    cash_after_buy = fake.cash
    fake.set_time(ny("2026-12-07 16:30"))
    assert fake.positions == {}
    assert fake.cash == pytest.approx(cash_after_buy + (fake.spot - 590) * 100)
    assert float(bought.filled_avg_price) > 0


def test_fill_activities(fake, trading):
    legs = legs_for(CONDOR)
    order = trading.submit_order(mleg(marketable_credit(fake, legs), "activities", legs))
    fills = trading.get("/account/activities/FILL")
    assert len(fills) == 4 and {f["order_id"] for f in fills} == {str(leg.id) for leg in order.legs}
    assert all(f["activity_type"] == "FILL" and f["type"] == "fill" for f in fills)


# ---------------------------------------------------------------------------------------------
# Orders: validation, ids, cancel, listing
# ---------------------------------------------------------------------------------------------

def test_validation_like_the_real_server(fake, trading):
    side_only = [OptionLegRequest(symbol=symbol, ratio_qty=1, side=OrderSide(side)) for symbol, side in CONDOR]
    error = api_error(lambda: trading.submit_order(mleg(-1.0, "no-intent", side_only)))
    assert (error.status_code, error.code, error.message) == (422, 42210000, "leg.0 position intent is required")

    error = api_error(lambda: trading.submit_order(mleg(-(0.1 + 0.2), "sub-penny", legs_for(CONDOR))))
    assert (error.status_code, error.code, error.message) == (422, 42210000, "invalid limit price")

    unknown = legs_for([("SPY261214P00999000", "buy"), CONDOR[1]])
    assert api_error(lambda: trading.submit_order(mleg(-1.0, "unknown", unknown))).status_code == 422

    error = api_error(lambda: trading.submit_order(mleg(-1.0, "ioc", legs_for(CONDOR), tif=TimeInForce.IOC)))
    assert (error.status_code, error.message) == (422, "invalid time in force")

    fake.set_time(ny("2026-12-07 18:00"))
    market = MarketOrderRequest(qty=1, order_class=OrderClass.MLEG, time_in_force=TimeInForce.DAY,
                                legs=legs_for(CONDOR), client_order_id="market-closed")
    error = api_error(lambda: trading.submit_order(market))
    assert error.message == "options market orders are only allowed during market hours"

    close_unheld = legs_for(CONDOR, closing=True)
    error = api_error(lambda: trading.submit_order(mleg(0.5, "close-unheld", close_unheld)))
    assert (error.status_code, error.code) == (403, 40310000)
    assert error.message.startswith("insufficient qty available for order (requested: 1, available: 0)")
    assert fake.orders == []  # nothing rejected was stored


def test_spreads_need_options_level_3():
    with FakeAlpaca(now=START, options_level=2) as fake:
        trading = TradingClient(KEY, SECRET, url_override=fake.url)
        assert trading.get_account().options_trading_level == 2
        error = api_error(lambda: trading.submit_order(mleg(-1.0, "level-2", legs_for(CONDOR))))
        assert (error.status_code, error.code) == (403, 40310000)
        assert error.message == "account not eligible to trade spreads or uncovered contracts"


def test_expiring_contracts_cannot_be_opened_late_on_expiry_day(fake, trading):
    fake.set_time(ny("2026-12-07 15:31"))
    legs = legs_for([("SPY261207P00590000", "buy"), ("SPY261207P00595000", "sell")])
    error = api_error(lambda: trading.submit_order(mleg(-0.01, "late-0dte", legs)))
    assert error.message == "contract SPY261207P00590000 expires soon, unable to open new positions"


def test_client_order_id_is_unique_forever(fake, trading):
    fake.fill_mode = "never"
    legs = legs_for(CONDOR)
    first = trading.submit_order(mleg(-1.0, "ic-dup", legs))
    error = api_error(lambda: trading.submit_order(mleg(-1.0, "ic-dup", legs)))
    assert (error.status_code, error.code, error.message) == (422, 40010001, "client_order_id must be unique")
    trading.cancel_order_by_id(first.id)
    error = api_error(lambda: trading.submit_order(mleg(-1.0, "ic-dup", legs)))
    assert (error.status_code, error.code) == (422, 40010001)
    assert len(fake.orders) == 1

    found = trading.get_order_by_client_id("ic-dup")
    assert found.id == first.id and found.status == OrderStatus.CANCELED
    error = api_error(lambda: trading.get_order_by_client_id("never-sent"))
    assert (error.status_code, error.code) == (404, 40410000)
    server_assigned = trading.submit_order(mleg(-1.0, None, legs))
    assert server_assigned.client_order_id  # the server assigns one when none is sent


def test_cancel_semantics(fake, trading):
    fake.fill_mode = "never"
    legs = legs_for(CONDOR)
    order = trading.submit_order(mleg(-1.0, "cancel-me", legs))
    assert trading.cancel_order_by_id(order.id) is None  # 204, empty body
    assert fake.requests[-1][4] == 204
    canceled = trading.get_order_by_id(order.id)
    assert canceled.status == OrderStatus.CANCELED and canceled.canceled_at is not None
    assert {leg.status for leg in canceled.legs} == {OrderStatus.CANCELED}

    error = api_error(lambda: trading.cancel_order_by_id(order.id))
    assert (error.status_code, error.message) == (422, "The order status is not cancelable")
    error = api_error(lambda: trading.cancel_order_by_id("00000000-0000-4000-8000-000000000000"))
    assert (error.status_code, error.code) == (404, 40410000)

    working = trading.submit_order(mleg(-1.0, "leg-cancel", legs))
    error = api_error(lambda: trading.cancel_order_by_id(working.legs[0].id))
    assert (error.status_code, error.code) == (422, 42210000)
    assert error.message == "cannot cancel individual legs of a mleg order"
    error = api_error(lambda: trading.replace_order_by_id(working.legs[0].id, ReplaceOrderRequest(limit_price=-1.1)))
    assert error.message == "cannot replace individual legs of a mleg order"

    other = trading.submit_order(mleg(-1.0, "cancel-all", legs))
    results = trading.cancel_orders()
    assert sorted(str(r.id) for r in results) == sorted([str(working.id), str(other.id)])
    assert {r.status for r in results} == {200}
    assert trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN)) == []


def test_order_listing_filters(fake, trading):
    fake.fill_mode = "never"
    legs = legs_for(CONDOR)
    ids = []
    for i in range(4):
        ids.append(trading.submit_order(mleg(-1.0, f"list-{i}", legs)).id)
        fake.advance(1)
    trading.cancel_order_by_id(ids[0])
    open_orders = trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN))
    assert [o.id for o in open_orders] == ids[:0:-1]  # newest first by default
    assert all(o.legs and len(o.legs) == 4 for o in open_orders)  # legs always nested
    closed = trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED))
    assert [o.id for o in closed] == [ids[0]]
    ascending = trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, direction="asc", limit=2, nested=True))
    assert [o.id for o in ascending] == ids[:2]
    window = trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, after=ny("2026-12-07 09:30"),
                                                 until=ny("2026-12-07 09:33")))
    assert sorted(o.id for o in window) == sorted(ids[1:3])
    # The SDK sends the datetime as given (offset included), not converted to UTC.
    assert pd.Timestamp(fake.requests[-1][2]["after"]) == ny("2026-12-07 09:30")
    by_symbol = trading.get_orders(GetOrdersRequest(status=QueryOrderStatus.ALL, symbols=["SPY261214C00620000"]))
    assert len(by_symbol) == 4
    assert [o["client_order_id"] for o in fake.orders] == [f"list-{i}" for i in range(4)]


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

class TimeoutSession(requests.Session):
    """A requests session with a default timeout: alpaca-py sends none (reference §8)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.default_timeout = timeout

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(*args, **kwargs)


def count(fake, method: str, path: str) -> int:
    return sum(1 for r in fake.requests if r[0] == method and r[1] == path)


def test_429_is_retried_by_the_sdk_then_succeeds(fake, trading):
    fake.inject(Fault(method="GET", path="/v2/account", kind="429", times=2))
    assert trading.get_account().status.value == "ACTIVE"
    assert [r[4] for r in fake.requests] == [429, 429, 200]
    assert fake.pending_faults == []


def test_429_persisting_raises_with_rate_limit_headers(fake, trading):
    fake.inject(Fault(method="GET", path="/v2/account", kind="429", times=4))
    error = api_error(trading.get_account)
    assert error.status_code == 429 and count(fake, "GET", "/v2/account") == 4  # 1 + 3 retries
    assert error.response.headers["X-Ratelimit-Remaining"] == "0"
    assert int(error.response.headers["X-Ratelimit-Reset"]) >= int(time.time())
    assert error.code == 42910000


def test_5xx_faults(fake, trading):
    fake.inject(Fault(method="GET", path="/v2/clock", kind="500"))
    error = api_error(trading.get_clock)
    assert (error.status_code, error.code) == (500, 50010000)
    assert count(fake, "GET", "/v2/clock") == 1  # 500 is not retried

    fake.inject(Fault(method="GET", path="/v2/clock", kind="502"))
    error = api_error(trading.get_clock)
    assert error.status_code == 502 and "<html>" in str(error)
    with pytest.raises(json.JSONDecodeError):
        error.code  # an HTML body: .code runs json.loads and fails (reference §8)

    fake.inject(Fault(method="GET", path="/v2/clock", kind="503"))
    assert api_error(trading.get_clock).status_code == 503
    assert count(fake, "GET", "/v2/clock") == 3

    fake.inject(Fault(method="GET", path="/v2/clock", kind="504"))
    assert trading.get_clock().is_open  # 504 is retried by the SDK
    assert [r[4] for r in fake.requests[-2:]] == [504, 200]


def test_faults_are_used_in_injection_order_and_only_where_they_match(fake, trading):
    fake.inject(Fault(method="GET", path="/v2/orders", kind="500"))
    fake.inject(Fault(method="GET", path="/v2/orders", kind="503"))
    fake.inject(Fault(method="POST", path="/v2/orders", kind="500"))
    assert trading.get_clock().is_open  # another path: untouched
    assert api_error(trading.get_orders).status_code == 500
    assert api_error(lambda: trading.get_order_by_client_id("x")).status_code == 503  # prefix match
    assert api_error(lambda: trading.get_order_by_client_id("x")).status_code == 404
    assert len(fake.pending_faults) == 1 and fake.pending_faults[0][0].method == "POST"
    with pytest.raises(ValueError):
        Fault(kind="418")
    with pytest.raises(ValueError):
        Fault(kind="partial")


def test_timeout_fault(fake, trading):
    fake.inject(Fault(method="GET", path="/v2/account", kind="timeout", delay=0.6))
    with pytest.raises(requests.exceptions.Timeout):
        raw(fake, "GET", "/v2/account", timeout=0.2)
    assert raw(fake, "GET", "/v2/account").status_code == 200

    trading._session = TimeoutSession(0.2)
    legs = legs_for(CONDOR)
    fake.inject(Fault(kind="timeout", delay=0.6))
    with pytest.raises(requests.exceptions.Timeout):
        trading.submit_order(mleg(marketable_credit(fake, legs), "slow", legs))
    deadline = time.monotonic() + 5
    while not [o for o in fake.orders if o["client_order_id"] == "slow"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert trading.get_order_by_client_id("slow").status == OrderStatus.FILLED  # it went through


def test_accept_then_500_places_the_order_anyway(fake, trading):
    legs = legs_for(CONDOR)
    fake.inject(Fault(kind="accept_then_500"))
    error = api_error(lambda: trading.submit_order(mleg(marketable_credit(fake, legs), "ic-unknown", legs)))
    assert error.status_code == 500
    placed = trading.get_order_by_client_id("ic-unknown")
    assert placed.status == OrderStatus.FILLED and fake.positions
    error = api_error(lambda: trading.submit_order(mleg(-1.0, "ic-unknown", legs)))  # no blind resubmit
    assert error.code == 40010001


def test_accept_then_drop_closes_the_connection(fake, trading):
    legs = legs_for(CONDOR)
    fake.inject(Fault(kind="accept_then_drop"))
    with pytest.raises(requests.exceptions.ConnectionError):
        trading.submit_order(mleg(marketable_credit(fake, legs), "ic-dropped", legs))
    assert fake.requests[-1][4] is None
    assert trading.get_order_by_client_id("ic-dropped").status == OrderStatus.FILLED  # same client still works


def test_reject_fault(fake, trading):
    legs = legs_for(CONDOR)
    fake.inject(Fault(kind="reject"))
    error = api_error(lambda: trading.submit_order(mleg(-1.0, "ic-rejected", legs)))
    assert (error.status_code, error.code) == (403, 40310000)
    assert error.message.startswith("insufficient options buying power (required: ")
    assert fake.orders == []
    assert trading.submit_order(mleg(-1.0, "ic-rejected", legs)).client_order_id == "ic-rejected"


def test_partial_fault(fake, trading):
    legs = legs_for(CONDOR)
    fake.inject(Fault(kind="partial", partial_qty=1))
    order = trading.submit_order(mleg(-0.05, "ic-partial", legs, qty=3))
    assert order.status == OrderStatus.PARTIALLY_FILLED and order.filled_qty == "1"
    assert {leg.filled_qty for leg in order.legs} == {"1"} and {leg.qty for leg in order.legs} == {"3"}
    assert fake.positions["SPY261214P00585000"] == -1
    assert fake.cash == pytest.approx(100_000 + 0.05 * 100)
    fake.advance(5)  # the rest is still marketable: it fills
    done = trading.get_order_by_id(order.id)
    assert done.status == OrderStatus.FILLED and done.filled_qty == "3"
    assert float(done.filled_avg_price) == -0.05 and fake.positions["SPY261214P00585000"] == -3

    fake.inject(Fault(kind="partial", partial_qty=2))
    error = api_error(lambda: trading.submit_order(mleg(-0.05, "ic-too-small", legs, qty=2)))
    assert error.status_code == 500  # a misconfigured fault says so loudly, and creates nothing
    assert "ic-too-small" not in {o["client_order_id"] for o in fake.orders}
