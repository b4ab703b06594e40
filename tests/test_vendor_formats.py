"""Vendor file loaders (data_factory.vendor_formats): every format into the canonical schemas, format
detection, bad rows under stop/skip, streaming edge cases. Every file is written here, in tmp_path.

Run as a script (``python tests/test_vendor_formats.py --bench [MB]``) it writes an OptionsDX and a
Cboe file of about MB megabytes (default 200) under /tmp and prints the loaders' throughput.
"""
from __future__ import annotations

import datetime as dt
import gzip
import itertools
import math
import threading
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_factory.canonical import BAD_ROW_KINDS, BAR_SCHEMA, CHAIN_SCHEMA
from data_factory.errors import DataError
from data_factory.vendor_formats import (
    FORMATS, BadRowReport, _Prefetched, detect_format, format_kind, iter_bar_batches, iter_chain_batches, load_file,
)

NY = "America/New_York"


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz=NY)


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def pick(table: pa.Table, **match) -> dict:
    found = [r for r in rows(table) if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def write(tmp_path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ============================================================================== file builders
ODX_COLS = ["QUOTE_UNIXTIME", "QUOTE_READTIME", "QUOTE_DATE", "QUOTE_TIME_HOURS", "UNDERLYING_LAST", "EXPIRE_DATE",
            "EXPIRE_UNIX", "DTE", "C_DELTA", "C_GAMMA", "C_VEGA", "C_THETA", "C_RHO", "C_IV", "C_VOLUME", "C_LAST",
            "C_SIZE", "C_BID", "C_ASK", "STRIKE", "P_BID", "P_ASK", "P_SIZE", "P_LAST", "P_DELTA", "P_GAMMA",
            "P_VEGA", "P_THETA", "P_RHO", "P_IV", "P_VOLUME", "STRIKE_DISTANCE", "STRIKE_DISTANCE_PCT"]
ODX_HEADER = ", ".join(f"[{c}]" for c in ODX_COLS)
DEC1, DEC2 = 1638392400, 1638478800          # 2021-12-01 and 2021-12-02 16:00 ET (epoch seconds)


def odx_line(unix=DEC1, day="2021-12-01", spot="450.500000", exp="2021-12-03", strike="450.000000", **kw) -> str:
    values = {"QUOTE_UNIXTIME": unix, "QUOTE_READTIME": f"{day} 16:00", "QUOTE_DATE": day, "QUOTE_TIME_HOURS": "16.000000",
              "UNDERLYING_LAST": spot, "EXPIRE_DATE": exp, "EXPIRE_UNIX": 1638565200, "DTE": "2.000000",
              "C_DELTA": "0.550000", "C_GAMMA": "0.030000", "C_VEGA": "0.150000", "C_THETA": "-0.400000",
              "C_RHO": "0.010000", "C_IV": "0.210000", "C_VOLUME": "120.000000", "C_LAST": "5.20", "C_SIZE": "10 x 20",
              "C_BID": "5.100000", "C_ASK": "5.300000", "STRIKE": strike, "P_BID": "4.500000", "P_ASK": "4.700000",
              "P_SIZE": "5 x 7", "P_LAST": "4.60", "P_DELTA": "-0.450000", "P_GAMMA": "0.031000", "P_VEGA": "0.151000",
              "P_THETA": "-0.380000", "P_RHO": "-0.010000", "P_IV": "0.220000", "P_VOLUME": "7.000000",
              "STRIKE_DISTANCE": "0.5", "STRIKE_DISTANCE_PCT": "0.001"}
    values.update(kw)
    return ", ".join(str(values[c]) for c in ODX_COLS)


def optionsdx_file(tmp_path, extra: list[str] | None = None, name="spy_eod_202112.txt") -> str:
    lines = [ODX_HEADER,
             odx_line(),
             odx_line(strike="455.000000", C_IV=" ", C_VOLUME=" ", C_LAST="0.00", C_DELTA="0.300000", P_DELTA="-0.700000"),
             odx_line(unix=DEC2, day="2021-12-02", spot="452.250000", C_BID="6.000000", C_ASK="6.200000"),
             odx_line(unix=DEC2, day="2021-12-02", spot="452.250000", strike="455.000000")]
    return write(tmp_path, name, lines + (extra or []))


CBOE_COLS = ["underlying_symbol", "quote_date", "root", "expiration", "strike", "option_type", "open", "high", "low",
             "close", "trade_volume", "bid_size_1545", "bid_1545", "ask_size_1545", "ask_1545", "underlying_bid_1545",
             "underlying_ask_1545", "implied_underlying_price_1545", "active_underlying_price_1545",
             "implied_volatility_1545", "delta_1545", "gamma_1545", "theta_1545", "vega_1545", "rho_1545",
             "bid_size_eod", "bid_eod", "ask_size_eod", "ask_eod", "underlying_bid_eod", "underlying_ask_eod", "vwap",
             "open_interest", "delivery_code"]


def cboe_line(**kw) -> str:
    values = {"underlying_symbol": "^SPX", "quote_date": "2021-11-29", "root": "SPXW", "expiration": "2021-12-17",
              "strike": "4500.000", "option_type": "C", "open": "0.0000", "high": "0.0000", "low": "0.0000",
              "close": "71.2000", "trade_volume": "152", "bid_size_1545": "10", "bid_1545": "70.1000",
              "ask_size_1545": "12", "ask_1545": "70.9000", "underlying_bid_1545": "0.0000",
              "underlying_ask_1545": "0.0000", "implied_underlying_price_1545": "4651.2200",
              "active_underlying_price_1545": "4655.2700", "implied_volatility_1545": "0.1890",
              "delta_1545": "0.8120", "gamma_1545": "0.0011", "theta_1545": "-0.9200", "vega_1545": "2.6100",
              "rho_1545": "1.1000", "bid_size_eod": "9", "bid_eod": "70.3000", "ask_size_eod": "9", "ask_eod": "71.0000",
              "underlying_bid_eod": "0.0000", "underlying_ask_eod": "0.0000", "vwap": "71.1000",
              "open_interest": "2311", "delivery_code": "0"}
    values.update(kw)
    return ",".join(str(values[c]) for c in CBOE_COLS)


def cboe_lines() -> list[str]:
    return [",".join(CBOE_COLS),
            # 2021-11-26: NYSE closes at 13:00 → the _1545 snapshot is 12:45.
            cboe_line(quote_date="2021-11-26", active_underlying_price_1545="4594.6200"),
            cboe_line(quote_date="2021-11-26", root="SPX", option_type="p", strike="4400.000", bid_1545="35.5000",
                      ask_1545="36.1000", delta_1545="-0.2400", implied_volatility_1545="0.0000", close="0.0000",
                      active_underlying_price_1545="4594.6200"),
            cboe_line(),
            cboe_line(root="SPX")]


IVOL_COLS = ["symbol", "exchange", "date", "adjusted close", "option symbol", "expiration", "strike", "call/put",
             "style", "ask", "bid", "mean price", "iv", "volume", "open interest", "stock price for iv", "*",
             "delta", "vega", "gamma", "theta", "rho"]


def ivol_line(**kw) -> str:
    values = {"symbol": "SPY", "exchange": "NYSEArca", "date": "11/26/2021", "adjusted close": "448.1100",
              "option symbol": "SPY   211217C00450000", "expiration": "12/17/2021", "strike": "450", "call/put": "C",
              "style": "A", "ask": "7.30", "bid": "7.20", "mean price": "7.25", "iv": "0.2134", "volume": "1543",
              "open interest": "20123", "stock price for iv": "458.9700", "*": "*", "delta": "0.5420",
              "vega": "0.5110", "gamma": "0.0230", "theta": "-0.1700", "rho": "0.1300"}
    values.update(kw)
    return ",".join(str(values[c]) for c in IVOL_COLS)


ORATS_LONG = ["ticker", "tradeDate", "expirDate", "dte", "strike", "stockPrice", "callVolume", "callOpenInterest",
              "callBidSize", "callAskSize", "putVolume", "putOpenInterest", "putBidSize", "putAskSize", "callBidPrice",
              "callValue", "callAskPrice", "putBidPrice", "putValue", "putAskPrice", "callBidIv", "callMidIv",
              "callAskIv", "smvVol", "putBidIv", "putMidIv", "putAskIv", "residualRate", "delta", "gamma", "theta",
              "vega", "rho", "phi", "driftlessTheta", "extSmvVol", "extCallValue", "extPutValue", "spotPrice",
              "updatedAt"]


def orats_line(**kw) -> str:
    values = {"ticker": "SPY", "tradeDate": "2021-11-29", "expirDate": "2021-12-17", "dte": "19", "strike": "460",
              "stockPrice": "464.6", "callVolume": "1200", "callOpenInterest": "15000", "callBidSize": "10",
              "callAskSize": "12", "putVolume": "900", "putOpenInterest": "21000", "putBidSize": "8", "putAskSize": "9",
              "callBidPrice": "9.10", "callValue": "9.2", "callAskPrice": "9.30", "putBidPrice": "4.40",
              "putValue": "4.5", "putAskPrice": "4.55", "callBidIv": "0.19", "callMidIv": "0.195", "callAskIv": "0.2",
              "smvVol": "0.196", "putBidIv": "0.2", "putMidIv": "0.205", "putAskIv": "0.21", "residualRate": "0.001",
              "delta": "0.62", "gamma": "0.021", "theta": "-0.15", "vega": "0.45", "rho": "0.12", "phi": "-0.2",
              "driftlessTheta": "-0.14", "extSmvVol": "0.196", "extCallValue": "9.2", "extPutValue": "4.5",
              "spotPrice": "464.6", "updatedAt": ""}
    values.update(kw)
    return ",".join(str(values[c]) for c in ORATS_LONG)


def occ(root: str, expiry: str, right: str, strike: float) -> str:
    return f"{root}{expiry[2:4]}{expiry[5:7]}{expiry[8:10]}{right}{int(round(strike * 1000)):08d}"


def ns(text: str) -> int:
    return pd.Timestamp(text).value


# ============================================================================== OptionsDX
def test_optionsdx_line_becomes_a_call_row_and_a_put_row(tmp_path):
    table, report = load_file(optionsdx_file(tmp_path))
    assert table.schema == CHAIN_SCHEMA
    assert table.num_rows == 8 and report.rows_read == 8 and report.rows_kept == 8 and report.lines_read == 4
    call = pick(table, quote_time=ts("2021-12-01 16:00"), strike=450.0, option_type="C")
    assert call == {"quote_time": ts("2021-12-01 16:00"), "underlying": "SPY", "underlying_price": 450.5,
                    "expiration": dt.date(2021, 12, 3), "settlement": "PM", "strike": 450.0, "option_type": "C",
                    "bid": 5.1, "ask": 5.3, "last": 5.2, "volume": 120, "open_interest": None, "iv": 0.21,
                    "delta": 0.55, "gamma": 0.03, "theta": -0.4, "vega": 0.15, "source": "optionsdx"}
    put = pick(table, quote_time=ts("2021-12-01 16:00"), strike=450.0, option_type="P")
    assert (put["bid"], put["ask"], put["last"], put["volume"], put["iv"]) == (4.5, 4.7, 4.6, 7, 0.22)
    assert (put["delta"], put["gamma"], put["theta"], put["vega"]) == (-0.45, 0.031, -0.38, 0.151)
    # Blank C_IV → NaN, blank C_VOLUME → 0 (none traded), C_LAST 0 → NaN (no trade).
    blank = pick(table, quote_time=ts("2021-12-01 16:00"), strike=455.0, option_type="C")
    assert math.isnan(blank["iv"]) and blank["volume"] == 0 and math.isnan(blank["last"])
    second = pick(table, quote_time=ts("2021-12-02 16:00"), strike=450.0, option_type="C")
    assert (second["underlying_price"], second["bid"], second["ask"]) == (452.25, 6.0, 6.2)
    # The epoch seconds are an instant: 16:00 ET is 21:00 UTC in December.
    assert table.column("quote_time").type == pa.timestamp("ns", tz=NY)
    assert second["quote_time"].tz_convert("UTC") == pd.Timestamp("2021-12-02 21:00", tz="UTC")


def test_optionsdx_underlying_argument_names_it(tmp_path):
    table, _ = load_file(optionsdx_file(tmp_path), underlying="qqq")
    assert set(table.column("underlying").to_pylist()) == {"QQQ"}


# ============================================================================== Cboe
def test_cboe_1545_snapshot_half_day_root_settlement_and_missing_iv(tmp_path):
    table, report = load_file(write(tmp_path, "UnderlyingOptionsEODCalcs_2021-11-29.csv", cboe_lines()))
    assert table.schema == CHAIN_SCHEMA and report.rows_kept == 4
    half = pick(table, quote_time=ts("2021-11-26 12:45"), strike=4500.0)
    assert half == {"quote_time": ts("2021-11-26 12:45"), "underlying": "SPX", "underlying_price": 4594.62,
                    "expiration": dt.date(2021, 12, 17), "settlement": "PM", "strike": 4500.0, "option_type": "C",
                    "bid": 70.1, "ask": 70.9, "last": 71.2, "volume": 152, "open_interest": 2311, "iv": 0.189,
                    "delta": 0.812, "gamma": 0.0011, "theta": -0.92, "vega": 2.61, "source": "cboe"}
    put = pick(table, quote_time=ts("2021-11-26 12:45"), strike=4400.0)
    # lower-case 'p' → P; root SPX on the third Friday → AM; IV 0 → NaN; close 0 → no trade (NaN).
    assert put["option_type"] == "P" and put["settlement"] == "AM" and put["delta"] == -0.24
    assert math.isnan(put["iv"]) and math.isnan(put["last"])
    regular = [r for r in rows(table) if r["quote_time"] == ts("2021-11-29 15:45")]
    # SPX (AM) and SPXW (PM) of the same strike/expiry/type are two contracts, not a duplicate.
    assert sorted(r["settlement"] for r in regular) == ["AM", "PM"]
    assert regular[0]["underlying_price"] == 4655.27


def test_cboe_zip_us_dates_and_summer_time(tmp_path):
    lines = [",".join(CBOE_COLS),
             cboe_line(underlying_symbol="SPY", root="SPY", quote_date="7/1/2021 0:00:00", expiration="7/16/2021 0:00:00",
                       strike="430.000", active_underlying_price_1545="430.4300"),
             # Good Friday 2022-04-15 is a third Friday and a holiday: SPX AM expiry moves to Thursday.
             cboe_line(quote_date="4/11/2022 0:00:00", expiration="4/14/2022 0:00:00", root="SPX")]
    zpath = tmp_path / "UnderlyingOptionsEODCalcs_2021-07-01.zip"
    with zipfile.ZipFile(zpath, "w") as archive:
        archive.writestr("UnderlyingOptionsEODCalcs_2021-07-01.csv", "\n".join(lines) + "\n")
    assert detect_format(zpath) == "cboe"
    table, _ = load_file(zpath)
    spy = pick(table, underlying="SPY")
    assert spy["quote_time"] == ts("2021-07-01 15:45")
    assert spy["quote_time"].tz_convert("UTC") == pd.Timestamp("2021-07-01 19:45", tz="UTC")   # EDT
    assert spy["expiration"] == dt.date(2021, 7, 16) and spy["settlement"] == "PM"
    assert pick(table, underlying="SPX")["settlement"] == "AM"


def test_cboe_underlying_filter(tmp_path):
    lines = cboe_lines() + [cboe_line(underlying_symbol="SPY", root="SPY", strike="460.000",
                                      active_underlying_price_1545="464.0000")]
    path = write(tmp_path, "mixed.csv", lines)
    report = BadRowReport()
    table = pa.concat_tables(iter_chain_batches(path, underlying="SPY", report=report))
    assert table.column("underlying").to_pylist() == ["SPY"] and report.rows_filtered == 4
    assert report.rows_read == report.rows_kept + report.rows_filtered
    with pytest.raises(DataError, match=r"mixed\.csv: no rows for QQQ \(it holds SPX, SPY\)"):
        list(iter_chain_batches(path, underlying="QQQ"))


# ============================================================================== IVolatility
def test_ivolatility_iv_minus_one_and_unadjusted_price(tmp_path):
    lines = [",".join(IVOL_COLS),
             ivol_line(),
             ivol_line(**{"call/put": "P", "option symbol": "SPY   211217P00450000", "iv": "-1", "delta": "-0.4580",
                          "bid": "4.10", "ask": "4.20"}),
             ivol_line(date="11/29/2021", **{"stock price for iv": "464.6000", "adjusted close": "453.0000"})]
    table, _ = load_file(write(tmp_path, "ivol.csv", lines))
    call = pick(table, quote_time=ts("2021-11-26 13:00"), option_type="C")      # early close: 13:00
    assert call == {"quote_time": ts("2021-11-26 13:00"), "underlying": "SPY", "underlying_price": 458.97,
                    "expiration": dt.date(2021, 12, 17), "settlement": "PM", "strike": 450.0, "option_type": "C",
                    "bid": 7.2, "ask": 7.3, "last": call["last"], "volume": 1543, "open_interest": 20123, "iv": 0.2134,
                    "delta": 0.542, "gamma": 0.023, "theta": -0.17, "vega": 0.511, "source": "ivolatility"}
    assert math.isnan(call["last"])                               # mean price is a mid, not a trade
    put = pick(table, quote_time=ts("2021-11-26 13:00"), option_type="P")
    assert math.isnan(put["iv"]) and put["delta"] == -0.458 and (put["bid"], put["ask"]) == (4.1, 4.2)
    later = pick(table, quote_time=ts("2021-11-29 16:00"))
    assert later["underlying_price"] == 464.6                     # stock price for iv, never adjusted close


def test_ivolatility_two_digit_years(tmp_path):
    lines = [",".join(IVOL_COLS), ivol_line(date="11/29/21", expiration="12/17/21")]
    table, _ = load_file(write(tmp_path, "ivol2.csv", lines))
    row = rows(table)[0]
    assert row["quote_time"] == ts("2021-11-29 16:00") and row["expiration"] == dt.date(2021, 12, 17)


# ============================================================================== ORATS
def test_orats_long_names_put_greeks_and_index_spot(tmp_path):
    lines = [",".join(ORATS_LONG),
             orats_line(),
             orats_line(ticker="SPX", strike="4600", stockPrice="4662.10", spotPrice="4655.27", expirDate="2021-12-17"),
             orats_line(tradeDate="2021-11-30", updatedAt="2021-11-30 20:46:11")]
    table, report = load_file(write(tmp_path, "orats.csv", lines))
    assert report.rows_kept == 6
    call = pick(table, underlying="SPY", quote_time=ts("2021-11-29 16:00"), option_type="C")
    put = pick(table, underlying="SPY", quote_time=ts("2021-11-29 16:00"), option_type="P")
    assert call == {"quote_time": ts("2021-11-29 16:00"), "underlying": "SPY", "underlying_price": 464.6,
                    "expiration": dt.date(2021, 12, 17), "settlement": "PM", "strike": 460.0, "option_type": "C",
                    "bid": 9.1, "ask": 9.3, "last": call["last"], "volume": 1200, "open_interest": 15000, "iv": 0.195,
                    "delta": 0.62, "gamma": 0.021, "theta": -0.15, "vega": 0.45, "source": "orats"}
    assert put["delta"] == pytest.approx(0.62 - 1.0) and put["gamma"] == 0.021 and put["vega"] == 0.45
    assert math.isnan(put["theta"]) and math.isnan(call["last"])
    assert (put["bid"], put["ask"], put["volume"], put["open_interest"], put["iv"]) == (4.4, 4.55, 900, 21000, 0.205)
    # SPX: stockPrice is the implied forward → spotPrice; third-Friday SPX → AM.
    spx = pick(table, underlying="SPX", option_type="C")
    assert spx["underlying_price"] == 4655.27 and spx["settlement"] == "AM"
    # updatedAt (UTC) on the trade date gives the snapshot time.
    assert pick(table, underlying="SPY", option_type="C", expiration=dt.date(2021, 12, 17),
                quote_time=ts("2021-11-30 15:46:11"))["bid"] == 9.1


def test_orats_short_names(tmp_path):
    cols = ["ticker", "stkPx", "expirDate", "yte", "strike", "cVolu", "cOi", "pVolu", "pOi", "cBidPx", "cValue",
            "cAskPx", "pBidPx", "pValue", "pAskPx", "cBidIv", "cMidIv", "cAskIv", "smoothSmvVol", "pBidIv", "pMidIv",
            "pAskIv", "iRate", "divRate", "residualRateData", "delta", "gamma", "theta", "vega", "trade_date"]
    line = ("SPY,464.6,12/17/2021,0.0521,460,1200,15000,900,21000,9.1,9.2,9.3,4.4,4.5,4.55,0.19,0.195,0.2,0.196,"
            "0.2,0.205,0.21,0.001,0.013,0.0,0.62,0.021,-0.15,0.45,11/29/2021")
    path = write(tmp_path, "ORATS_SMV_Strikes_20211129.csv", [",".join(cols), line])
    assert detect_format(path) == "orats"
    table, _ = load_file(path)
    put = pick(table, option_type="P")
    assert put["quote_time"] == ts("2021-11-29 16:00") and put["underlying_price"] == 464.6
    assert put["delta"] == pytest.approx(-0.38) and (put["bid"], put["ask"], put["open_interest"]) == (4.4, 4.55, 21000)
    assert pick(table, option_type="C")["theta"] == -0.15


# ============================================================================== DeltaNeutral
def test_deltaneutral_rescales_theta_and_vega(tmp_path):
    header = ("UnderlyingSymbol,UnderlyingPrice,Exchange,OptionSymbol,Blank,Type,Expiration,DataDate,Strike,Last,Bid,"
              "Ask,Volume,OpenInterest,IV,Delta,Gamma,Theta,Vega,Alias")
    line = ("SPY,298.09,*,SPY191220C00300000,,call,12/20/2019,09/10/2019 16:00,300,7.99,7.96,8.06,514,74443,0.1443,"
            "0.4768,0.0176,-15.9085,61.8811,SPY191220C00300000")
    table, _ = load_file(write(tmp_path, "L2_options_20190910.csv", [header, line]))
    row = rows(table)[0]
    assert row["quote_time"] == ts("2019-09-10 16:00") and row["option_type"] == "C" and row["underlying_price"] == 298.09
    assert row["theta"] == pytest.approx(-15.9085 / 365) and row["vega"] == pytest.approx(0.618811)
    assert (row["bid"], row["ask"], row["last"], row["volume"], row["open_interest"]) == (7.96, 8.06, 7.99, 514, 74443)


# ============================================================================== option bars
POLY_HEADER = "ticker,volume,open,close,high,low,window_start,transactions"


def test_polygon_minute_bars_close_time_and_contract(tmp_path):
    spy = "O:" + occ("SPY", "2024-06-21", "C", 500)
    spxw = "O:" + occ("SPXW", "2024-06-21", "P", 5300)
    lines = [POLY_HEADER,
             f"{spxw},3,12.1,12.4,12.5,12.0,{ns('2024-06-03 13:30Z')},2",
             f"{spy},10,4.10,4.25,4.30,4.05,{ns('2024-06-03 13:30Z')},4",
             f"{spy},5,4.25,4.20,4.26,4.18,{ns('2024-06-03 13:31Z')},2"]
    path = write(tmp_path, "2024-06-03.csv", lines)
    assert detect_format(path) == "polygon_option_bars"
    table, _ = load_file(path)                     # width inferred: starts 1 minute apart
    first = pick(table, underlying="SPY", quote_time=ts("2024-06-03 09:31"))
    assert first == {"quote_time": ts("2024-06-03 09:31"), "underlying": "SPY", "underlying_price": None,
                     "expiration": dt.date(2024, 6, 21), "settlement": "PM", "strike": 500.0, "option_type": "C",
                     "bid": first["bid"], "ask": first["ask"], "last": 4.25, "volume": 10, "open_interest": None,
                     "iv": first["iv"], "delta": first["delta"], "gamma": first["gamma"], "theta": first["theta"],
                     "vega": first["vega"], "source": "polygon_option_bars"}
    assert all(math.isnan(first[k]) for k in ("bid", "ask", "iv", "delta", "gamma", "theta", "vega"))
    assert pick(table, underlying="SPY", quote_time=ts("2024-06-03 09:32"))["last"] == 4.20
    index = pick(table, underlying="SPX")
    assert (index["option_type"], index["strike"], index["settlement"]) == ("P", 5300.0, "PM")
    table5, _ = load_file(path, minutes=5)
    assert pick(table5, underlying="SPX")["quote_time"] == ts("2024-06-03 09:35")


def test_polygon_day_bars_stamp_the_session_close(tmp_path):
    spy = "O:" + occ("SPY", "2021-12-17", "C", 450)
    lines = [POLY_HEADER, f"{spy},100,5.0,5.5,5.8,4.9,{ns('2021-11-26 00:00-05:00')},40",
             f"{spy},90,5.5,6.1,6.3,5.4,{ns('2021-11-29 00:00-05:00')},38"]
    table, _ = load_file(write(tmp_path, "day.csv", lines))
    assert table.column("quote_time").to_pylist() == [ts("2021-11-26 13:00"), ts("2021-11-29 16:00")]


def test_alpaca_option_bars_rfc3339_starts(tmp_path):
    sym = occ("SPY", "2024-02-16", "P", 490)
    lines = ["symbol,timestamp,open,high,low,close,volume,trade_count,vwap",
             f"{sym},2024-02-05T14:30:00Z,1.10,1.15,1.05,1.12,40,12,1.11",
             f"{sym},2024-02-05T14:35:00Z,1.12,1.20,1.10,1.18,25,9,1.16"]
    path = write(tmp_path, "alpaca_options.csv", lines)
    assert detect_format(path) == "alpaca_option_bars"
    table, _ = load_file(path)                     # 5-minute bars: close = start + 5 min
    assert table.column("quote_time").to_pylist() == [ts("2024-02-05 09:35"), ts("2024-02-05 09:40")]
    row = rows(table)[1]
    assert (row["underlying"], row["option_type"], row["strike"], row["last"], row["volume"]) == ("SPY", "P", 490.0, 1.18, 25)
    assert row["underlying_price"] is None and row["source"] == "alpaca_option_bars"


# ============================================================================== stock bars
def test_stock_bars_alpaca_minutes_restamped_at_close(tmp_path):
    lines = ["symbol,timestamp,open,high,low,close,volume,trade_count,vwap",
             "SPY,2024-02-05 14:30:00+00:00,493.7,494.1,493.5,494.0,120000,900,493.9",
             "SPY,2024-02-05 14:31:00+00:00,494.0,494.3,493.9,494.2,80000,700,494.1"]
    path = write(tmp_path, "spy_1min.csv", lines)
    assert detect_format(path) == "stock_bars" and format_kind("stock_bars") == "bars"
    table, _ = load_file(path)
    assert table.schema == BAR_SCHEMA
    assert rows(table)[0] == {"time": ts("2024-02-05 09:31"), "symbol": "SPY", "minutes": 1, "open": 493.7,
                              "high": 494.1, "low": 493.5, "close": 494.0, "volume": 120000.0, "source": "stock_bars"}
    assert rows(table)[1]["time"] == ts("2024-02-05 09:32")


def test_stock_bars_polygon_daily_and_symbol_argument(tmp_path):
    lines = ["volume,open,close,high,low,window_start,transactions",
             f"5.1e7,467.0,468.9,469.6,466.2,{ns('2021-11-26 00:00-05:00')},400000",
             f"6.2e7,464.1,464.6,466.6,461.7,{ns('2021-11-29 00:00-05:00')},450000"]
    path = write(tmp_path, "spy_day.csv", lines)
    with pytest.raises(DataError, match="no symbol column"):
        load_file(path)
    table, _ = load_file(path, symbol="spy")
    assert table.column("time").to_pylist() == [ts("2021-11-26 13:00"), ts("2021-11-29 16:00")]
    assert set(table.column("minutes").to_pylist()) == {1440} and set(table.column("symbol").to_pylist()) == {"SPY"}
    with pytest.raises(DataError, match="stock_bars files hold bars, not chain"):
        list(iter_chain_batches(path))


def test_stock_bars_polygon_api_milliseconds_and_short_names(tmp_path):
    start = pd.Timestamp("2024-07-01 09:30", tz=NY).value // 1_000_000          # Unix ms, bar START
    lines = ["t,o,h,l,c,v,vw,n", f"{start},545.6,546.1,545.2,545.9,1.2e6,545.7,9000",
             f"{start + 300_000},545.9,546.5,545.8,546.4,8.0e5,546.1,7000"]
    report = BadRowReport()
    table = pa.concat_tables(iter_bar_batches(write(tmp_path, "aggs.csv", lines), symbol="SPY", report=report))
    assert table.column("time").to_pylist() == [ts("2024-07-01 09:35"), ts("2024-07-01 09:40")]
    assert set(table.column("minutes").to_pylist()) == {5} and table.column("close").to_pylist() == [545.9, 546.4]
    assert (report.format, report.rows_kept) == ("stock_bars", 2)


# ============================================================================== detection
def test_detects_every_format_and_names_unknown_headers(tmp_path):
    files = {
        "optionsdx": optionsdx_file(tmp_path),
        "cboe": write(tmp_path, "c.csv", cboe_lines()),
        "ivolatility": write(tmp_path, "i.csv", [",".join(IVOL_COLS), ivol_line()]),
        "orats": write(tmp_path, "o.csv", [",".join(ORATS_LONG), orats_line()]),
        "deltaneutral": write(tmp_path, "d.csv", ["underlying,underlying_last,exchange,optionroot,optionext,type,"
                                                  "expiration,quotedate,strike,last,bid,ask,volume,openinterest,"
                                                  "impliedvol,delta,gamma,theta,vega,optionalias,IVBid,IVAsk",
                                                  "SPY,298.09,*,SPY191220C00300000,,call,12/20/2019,09/10/2019,300,"
                                                  "7.99,7.96,8.06,514,74443,0.1443,0.4768,0.0176,-15.9085,61.8811,"
                                                  "SPY191220C00300000,0.14,0.15"]),
        "polygon_option_bars": write(tmp_path, "p.csv", [POLY_HEADER, "O:SPY240621C00500000,1,1,1,1,1,1717421400000000000,1"]),
        "alpaca_option_bars": write(tmp_path, "a.csv", ["symbol,timestamp,open,high,low,close,volume",
                                                        "SPY240621C00500000,2024-06-03T13:30:00Z,1,1,1,1,1"]),
        "stock_bars": write(tmp_path, "s.csv", ["ticker,volume,open,close,high,low,window_start,transactions",
                                                "SPY,1,1,1,1,1,1717421400000000000,1"]),
    }
    assert set(files) == set(FORMATS)
    for fmt, path in files.items():
        assert detect_format(path) == fmt
        assert format_kind(fmt) == ("bars" if fmt == "stock_bars" else "chain")
    gz = tmp_path / "p.csv.gz"
    gz.write_bytes(gzip.compress((tmp_path / "p.csv").read_bytes()))
    assert detect_format(gz) == "polygon_option_bars"
    unknown = write(tmp_path, "mystery.csv", ["when,what,price", "2021-01-04,x,1"])
    with pytest.raises(DataError, match=r"mystery\.csv: unknown file format; its header is 'when,what,price'"):
        detect_format(unknown)
    with pytest.raises(DataError, match="unknown format 'nope'"):
        format_kind("nope")


def test_format_override_must_match_the_header(tmp_path):
    path = optionsdx_file(tmp_path)
    with pytest.raises(DataError) as error:
        load_file(path, "cboe")
    assert str(error.value).startswith(f"{path}: --format cboe does not match its header (missing columns: "
                                       f"underlying_symbol, root, expiration, option_type, bid_1545")
    table, _ = load_file(path, "optionsdx")
    assert table.num_rows == 8


# ============================================================================== bad rows
# (kind, line text, field named in the message) on line 3 of a Cboe file (line 2 is good).
BAD_CBOE = [
    ("unparseable_date", cboe_line(expiration="2021-13-45"), "expiration"),
    ("missing_value", cboe_line(strike=""), "strike"),
    ("bad_option_type", cboe_line(option_type="X"), "option_type"),
    ("negative_quote", cboe_line(bid_1545="-0.0500"), "bid_1545"),
    ("crossed_quote", cboe_line(bid_1545="71.0000", ask_1545="70.5000"), "bid_1545"),
    ("bad_strike", cboe_line(strike="-5.000"), "strike"),
    ("bad_strike", cboe_line(strike="abc"), "strike"),                     # not a number: the text path
    ("no_underlying_price", cboe_line(active_underlying_price_1545="0.0000"), "active_underlying_price_1545"),
    ("expired_before_quote", cboe_line(expiration="2021-11-26"), "expiration"),
    ("duplicate_row", cboe_line(strike="4500.000"), "same key as line 2"),
]


def bad_cboe_file(tmp_path, bad_line: str) -> str:
    return write(tmp_path, "bad.csv", [",".join(CBOE_COLS), cboe_line(), bad_line,
                                       cboe_line(strike="4510.000"), cboe_line(strike="4520.000")])


def test_bad_row_cases_cover_every_kind():
    assert {kind for kind, _, _ in BAD_CBOE} == set(BAD_ROW_KINDS)


@pytest.mark.parametrize("kind,line,field", BAD_CBOE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_CBOE)])
def test_bad_row_stops_with_file_line_field(tmp_path, kind, line, field):
    path = bad_cboe_file(tmp_path, line)
    with pytest.raises(DataError) as error:
        load_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}: line 3: {kind}: ") and field in message


@pytest.mark.parametrize("kind,line,field", BAD_CBOE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_CBOE)])
def test_bad_row_skipped_and_counted(tmp_path, kind, line, field):
    table, report = load_file(bad_cboe_file(tmp_path, line), on_bad_rows="skip")
    assert report.counts == {kind: 1} and report.bad_rows == 1
    assert report.rows_read == 4 and report.rows_kept == 3 == table.num_rows
    assert sorted(table.column("strike").to_pylist()) == [4500.0, 4510.0, 4520.0]
    (example,) = report.examples
    assert example[1:3] == (3, kind) and field in example[3]
    assert report.to_dict()["counts"] == {kind: 1}


def test_optionsdx_bad_half_and_bad_line(tmp_path):
    path = optionsdx_file(tmp_path, [odx_line(unix=DEC2, day="2021-12-02", strike="460.000000", C_BID="9.0", C_ASK="8.0"),
                                     odx_line(unix=DEC2, day="2021-12-02", strike="465.000000", UNDERLYING_LAST=" ")])
    with pytest.raises(DataError, match=r"spy_eod_202112\.txt: line 6: crossed_quote: C_BID = 9\.0: bid 9\.0 above ask 8\.0"):
        load_file(path)
    table, report = load_file(path, on_bad_rows="skip")
    # A crossed call drops the call row only; no underlying price drops both halves of the line.
    assert report.counts == {"crossed_quote": 1, "no_underlying_price": 2}
    assert report.rows_read == 12 and report.rows_kept == 9 == table.num_rows
    assert pick(table, strike=460.0)["option_type"] == "P"
    assert sorted(e[1:3] for e in report.examples) == [(6, "crossed_quote"), (7, "no_underlying_price"),
                                                       (7, "no_underlying_price")]


def test_skip_counts_several_of_a_kind_with_exact_lines(tmp_path):
    lines = [",".join(CBOE_COLS)] + [cboe_line(strike=f"{4000 + 5 * i}.000", option_type="Z" if i % 3 == 0 else "C")
                                     for i in range(12)]
    table, report = load_file(write(tmp_path, "many.csv", lines), on_bad_rows="skip")
    assert report.counts == {"bad_option_type": 4} and table.num_rows == 8
    assert [e[1] for e in report.examples] == [2, 5, 8, 11]


def test_malformed_and_blank_lines_keep_line_numbers(tmp_path):
    lines = [",".join(CBOE_COLS), cboe_line(), "", "^SPX,2021-11-29,SPXW,2021-12-17,4505.000,C",
             cboe_line(strike="4510.000"), cboe_line(strike="4515.000", bid_1545="99.0000")]
    path = write(tmp_path, "ragged.csv", lines)
    with pytest.raises(DataError, match=r"ragged\.csv: line 4: missing_value: expected 34 fields, found 6"):
        load_file(path)
    table, report = load_file(path, on_bad_rows="skip")
    assert report.counts == {"missing_value": 1, "crossed_quote": 1}
    assert [e[1] for e in report.examples] == [4, 6]                 # the blank line 3 is not a row
    assert table.column("strike").to_pylist() == [4500.0, 4510.0] and report.lines_read == 4


def test_unreadable_number_after_good_blocks(tmp_path):
    # The fast path (typed columns) fails on 'n/a?' in block 3; reading resumes after the last
    # delivered line with text columns, so the value is a counted bad row at its real line.
    lines = [",".join(CBOE_COLS)] + [cboe_line(strike=f"{4000 + 5 * i}.000") for i in range(30)]
    lines[25] = cboe_line(strike="4300.000", delta_1545="n/a?")
    path = write(tmp_path, "late.csv", lines)
    with pytest.raises(DataError, match=r"late\.csv: line 26: missing_value: delta_1545 = 'n/a\?': not a number"):
        list(iter_chain_batches(path, block_bytes=2000))
    report = BadRowReport()
    batches = list(iter_chain_batches(path, on_bad_rows="skip", report=report, block_bytes=2000))
    assert len(batches) > 3 and report.counts == {"missing_value": 1} and report.examples[0][1] == 26
    assert sum(b.num_rows for b in batches) == 29


def test_duplicate_split_across_batches(tmp_path):
    lines = [",".join(CBOE_COLS)] + [cboe_line(strike=f"{4000 + 5 * i}.000") for i in range(20)]
    lines.append(cboe_line(strike="4095.000", bid_1545="1.0000", ask_1545="2.0000"))    # = line 21's key
    path = write(tmp_path, "dup.csv", lines)
    report = BadRowReport()
    batches = list(iter_chain_batches(path, on_bad_rows="skip", report=report, block_bytes=1200))
    assert len(batches) >= 3 and batches[-1].num_rows < 10      # line 21 and line 22 in different batches
    assert report.counts == {"duplicate_row": 1} and sum(b.num_rows for b in batches) == 20
    assert report.examples[0][1] == 22 and "same key as line 21" in report.examples[0][3]
    with pytest.raises(DataError, match=r"dup\.csv: line 22: duplicate_row: .*4095 C: same key as line 21"):
        list(iter_chain_batches(path, block_bytes=1200))


def test_duplicate_far_apart_in_a_sorted_snapshot(tmp_path):
    # Sorted lines take the order-check path; the repeat (of line 3, 40 lines back and several
    # blocks earlier) breaks the order, and the snapshot's remembered keys catch it.
    lines = [ODX_HEADER] + [odx_line(strike=f"{400 + i}.000000") for i in range(40)]
    lines.append(odx_line(strike="401.000000", C_BID="1.0", C_ASK="1.1"))
    lines += [odx_line(unix=DEC2, day="2021-12-02", strike=f"{400 + i}.000000") for i in range(5)]
    path = write(tmp_path, "far.txt", lines)
    report = BadRowReport()
    batches = list(iter_chain_batches(path, on_bad_rows="skip", report=report, block_bytes=3000))
    assert len(batches) > 4
    assert report.counts == {"duplicate_row": 2}                      # its C row and its P row
    assert [e[1] for e in report.examples] == [42, 42] and all("same key as line 3" in e[3] for e in report.examples)
    assert report.rows_kept == 2 * 45 == sum(b.num_rows for b in batches)
    # The same rows without the repeat: no false duplicate on the fast path.
    clean = write(tmp_path, "clean.txt", lines[:41] + lines[42:])
    table, report = load_file(clean, block_bytes=3000)
    assert report.counts == {} and table.num_rows == 90


def test_empty_header_only_and_missing_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        load_file(empty)
    header_only = write(tmp_path, "header.csv", [",".join(CBOE_COLS)])
    with pytest.raises(DataError, match=r"header\.csv: only a header, no data rows"):
        list(iter_chain_batches(header_only))
    with pytest.raises(DataError, match=r"nowhere\.csv: no such file"):
        detect_format(tmp_path / "nowhere.csv")
    with pytest.raises(DataError, match="on_bad_rows 'maybe'"):
        load_file(header_only, "cboe", on_bad_rows="maybe")


def test_streams_in_batches_of_the_block_size(tmp_path):
    lines = [ODX_HEADER] + [odx_line(unix=DEC1 + 86400 * (i // 10), day=f"2021-12-{1 + i // 10:02d}",
                                     exp="2021-12-31", strike=f"{400 + i % 10}.000000") for i in range(60)]
    path = write(tmp_path, "stream.txt", lines)
    report = BadRowReport()
    batches = list(iter_chain_batches(path, report=report, block_bytes=4096))
    assert len(batches) > 3 and all(b.schema == CHAIN_SCHEMA for b in batches)
    whole, _ = load_file(path)
    order = [("quote_time", "ascending"), ("strike", "ascending"), ("option_type", "ascending")]
    assert pa.concat_tables(batches).sort_by(order).equals(whole.sort_by(order))
    assert report.rows_kept == 120 == whole.num_rows


def test_gzip_polygon_file_bad_ticker_and_underlying_filter(tmp_path):
    good = "O:" + occ("SPY", "2024-06-21", "C", 500)
    lines = [POLY_HEADER, f"O:AAPL240621C00190000,7,1.0,1.1,1.2,0.9,{ns('2024-06-03 13:30Z')},3",
             f"O:SPYX,1,1.0,1.0,1.0,1.0,{ns('2024-06-03 13:30Z')},1",
             f"{good},10,4.10,4.25,4.30,4.05,{ns('2024-06-03 13:30Z')},4",
             f"{good},5,4.25,4.20,4.26,4.18,{ns('2024-06-03 13:31Z')},2"]
    path = tmp_path / "2024-06-03.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"line 3: missing_value: ticker = 'O:SPYX': not an OCC option symbol"):
        load_file(path)
    report = BadRowReport()
    table = pa.concat_tables(iter_chain_batches(path, on_bad_rows="skip", report=report, underlying="spy"))
    assert table.column("last").to_pylist() == [4.25, 4.20]
    assert (report.rows_read, report.rows_kept, report.rows_filtered, report.counts) == (4, 2, 1, {"missing_value": 1})


def test_blank_lines_filling_whole_blocks(tmp_path):
    lines = [",".join(CBOE_COLS), cboe_line()] + [""] * 300 + [cboe_line(strike="4510.000", bid_1545="-1.0000")]
    path = write(tmp_path, "gaps.csv", lines)
    with pytest.raises(DataError, match=r"gaps\.csv: line 303: negative_quote: bid_1545 = -1\.0"):
        list(iter_chain_batches(path, block_bytes=100))
    table, report = load_file(path, on_bad_rows="skip")
    assert table.num_rows == 1 and report.lines_read == 2 and report.rows_read == 2


# ============================================================================== benchmark (not a test)
def _bench(megabytes: float) -> None:
    import time

    out = "/tmp/vendor_formats_bench"
    import os
    os.makedirs(out, exist_ok=True)
    odx = os.path.join(out, "optionsdx.txt")
    cboe = os.path.join(out, "cboe.csv")
    n_odx = int(megabytes * 1e6 / 300)
    n_cboe = int(megabytes * 1e6 / 200)
    rng = np.random.default_rng(0)
    with open(odx, "w") as fh:
        fh.write(ODX_HEADER + "\n")
        for start in range(0, n_odx, 100_000):
            i = np.arange(start, min(start + 100_000, n_odx))
            day = i // 2000
            unix = DEC1 + day * 86400
            days = (pd.Timestamp("2021-12-01") + pd.to_timedelta(day, "D")).strftime("%Y-%m-%d")
            exps = (pd.Timestamp("2021-12-03") + pd.to_timedelta(day + 7 * ((i % 2000) // 200), "D")).strftime("%Y-%m-%d")
            bid = np.round(rng.random(len(i)) * 10, 2)
            frame = pd.DataFrame({c: ["0.000000"] * len(i) for c in ODX_COLS})
            frame["QUOTE_UNIXTIME"], frame["QUOTE_DATE"], frame["EXPIRE_DATE"] = unix, days, exps
            frame["UNDERLYING_LAST"], frame["STRIKE"] = "450.500000", [f"{300 + k % 200:.6f}" for k in i]
            for side in "CP":
                for col in ("DELTA", "GAMMA", "VEGA", "THETA", "IV", "VOLUME", "LAST"):
                    frame[f"{side}_{col}"] = np.char.mod("%.6f", rng.random(len(i)))
                frame[f"{side}_BID"], frame[f"{side}_ASK"] = np.char.mod("%.6f", bid), np.char.mod("%.6f", bid + 0.05)
                frame[f"{side}_SIZE"] = "10 x 20"
            frame.to_csv(fh, header=False, index=False, sep="\x01")
    with open(odx) as fh:
        text = fh.read().replace("\x01", ", ")
    with open(odx, "w") as fh:
        fh.write(text)
    with open(cboe, "w") as fh:
        fh.write(",".join(CBOE_COLS) + "\n")
        for start in range(0, n_cboe, 100_000):
            i = np.arange(start, min(start + 100_000, n_cboe))
            frame = pd.DataFrame({c: ["0.0000"] * len(i) for c in CBOE_COLS})
            frame["underlying_symbol"], frame["root"], frame["quote_date"] = "SPY", "SPY", "2021-11-29"
            frame["expiration"] = (pd.Timestamp("2021-12-03") + pd.to_timedelta(7 * (i // 4000), "D")).strftime("%Y-%m-%d")
            frame["strike"] = np.char.mod("%.3f", 100 + (i // 2) % 4000 * 0.5)
            frame["option_type"] = np.where(i % 2 == 0, "C", "P")
            bid = np.round(rng.random(len(i)) * 10, 2)
            frame["bid_1545"], frame["ask_1545"] = np.char.mod("%.4f", bid), np.char.mod("%.4f", bid + 0.05)
            frame["active_underlying_price_1545"] = "464.6000"
            for col in ("close", "implied_volatility_1545", "delta_1545", "gamma_1545", "theta_1545", "vega_1545"):
                frame[col] = np.char.mod("%.4f", rng.random(len(i)))
            frame["trade_volume"], frame["open_interest"] = rng.integers(0, 999, len(i)), rng.integers(0, 99999, len(i))
            frame.to_csv(fh, header=False, index=False)
    import data_factory.vendor_formats as vf
    vf._calendar_days()                                   # the NYSE calendar loads once per process
    for fmt, path in (("optionsdx", odx), ("cboe", cboe)):
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            n = sum(t.num_rows for t in iter_chain_batches(path, fmt))
            best = min(best, time.perf_counter() - started)
        print(f"{fmt}: {os.path.getsize(path) / 1e6:.0f} MB, {n} canonical rows, best of 3 {best:.2f} s "
              f"= {n / best / 1e6:.2f} M rows/s")


if __name__ == "__main__":
    import sys

    if "--bench" in sys.argv:
        rest = [a for a in sys.argv[1:] if a != "--bench"]
        _bench(float(rest[0]) if rest else 200.0)


def _prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "csv-prefetch" and t.is_alive()]


def test_prefetching_keeps_order_raises_where_the_source_failed_and_stops_on_close():
    def source():
        yield from range(5)
        raise ValueError("broken at 5")

    seen = []
    with pytest.raises(ValueError, match="broken at 5"):
        for item in _Prefetched(source(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]

    produced = []

    def endless():
        for number in itertools.count():
            produced.append(number)
            yield number

    blocks = _Prefetched(endless(), depth=2)
    first = next(iter(blocks))
    blocks.close()
    assert first == 0 and not blocks._thread.is_alive()
    assert len(produced) <= 5                  # it stopped a queue's depth ahead, not at the end


def test_a_bad_row_mid_file_stops_the_parsing_thread(tmp_path):
    lines = [",".join(CBOE_COLS)] + [cboe_line(strike=f"{4000 + 5 * i}.000") for i in range(400)]
    lines[300] = cboe_line(strike="5500.000", option_type="Z")
    path = write(tmp_path, "midway.csv", lines)
    before = len(_prefetch_threads())
    with pytest.raises(DataError, match=r"midway\.csv: line 301: bad_option_type"):
        list(iter_chain_batches(path, block_bytes=4000))
    assert len(_prefetch_threads()) == before
