"""Embedded daily data: proxies, ranges, errors, risk-free rate, VIX alignment and the GARCH proxy."""
from __future__ import annotations

import csv
import gzip
import importlib.resources
import math

import numpy as np
import pandas as pd
import pytest
from arch import arch_model
from arch.data import nasdaq, sp500, vix

from data_factory import embedded
from data_factory.embedded import (align_vix_to_sessions, daily_bars, daily_iv_index,
                                   describe_embedded_data, dividend_yield, risk_free_rate,
                                   validate_daily_bars)
from data_factory.errors import DataError
from data_factory.garch_proxy import (GarchProxyConfig, average_variance_coefficients,
                                      garch_iv_proxy, log_returns_pct, one_step_variance)
from data_factory.market_calendar import is_session, trading_sessions


# ------------------------------------------------------------------------------ daily bars

def test_spy_and_qqq_are_the_index_divided_by_their_stated_divisors():
    raw_sp, raw_nq = sp500.load(), nasdaq.load()
    spy, qqq = daily_bars("SPY"), daily_bars("QQQ")
    for column, raw_column in [("open", "Open"), ("high", "High"), ("low", "Low"), ("close", "Close")]:
        np.testing.assert_array_equal(spy[column].to_numpy(), raw_sp[raw_column].to_numpy() / 10.0)
        np.testing.assert_array_equal(qqq[column].to_numpy(), raw_nq[raw_column].to_numpy() / 40.0)
    np.testing.assert_array_equal(spy["volume"].to_numpy(), raw_sp["Volume"].to_numpy().astype(float))
    np.testing.assert_array_equal(daily_bars("SPX")["close"].to_numpy(), raw_sp["Close"].to_numpy())
    assert spy.attrs["proxy"] is True and daily_bars("SPX").attrs["proxy"] is False


def test_daily_bars_shape_dtypes_and_session_index():
    spy = daily_bars("spy")                      # case-insensitive symbol
    assert list(spy.columns) == ["open", "high", "low", "close", "volume"]
    assert all(dtype == np.float64 for dtype in spy.dtypes)
    assert spy.index.name == "date" and spy.index.tz is None
    assert spy.index[0] == pd.Timestamp("1999-01-04") and spy.index[-1] == pd.Timestamp("2018-12-31")
    assert spy.index.equals(trading_sessions("1999-01-04", "2018-12-31"))
    assert len(spy) == 5031


def test_daily_bars_slices_inclusively_and_returns_independent_copies():
    window = daily_bars("SPY", "2014-01-03", "2014-01-31")
    assert window.index[0] == pd.Timestamp("2014-01-03") and window.index[-1] == pd.Timestamp("2014-01-31")
    assert len(window) == len(trading_sessions("2014-01-03", "2014-01-31"))
    before = window["close"].iloc[0]
    window.loc[window.index[0], "close"] = -1.0
    assert daily_bars("SPY", "2014-01-03", "2014-01-03")["close"].iloc[0] == before


@pytest.mark.parametrize("call, words", [
    (lambda: daily_bars("XYZ"), ["XYZ", "SPY", "QQQ"]),
    (lambda: daily_bars("SPY", start="1998-06-01"), ["1998-06-01", "1999-01-04", "2018-12-31"]),
    (lambda: daily_bars("SPY", end="2019-03-01"), ["2019-03-01", "1999-01-04", "2018-12-31"]),
    (lambda: daily_bars("SPY", "2015-02-01", "2015-01-01"), ["2015-02-01", "after", "2015-01-01"]),
    (lambda: daily_bars("SPY", "2014-01-04", "2014-01-05"), ["no sessions", "2014-01-04"]),
    (lambda: daily_bars("SPY", start="not a date"), ["start", "not a date"]),
])
def test_daily_bars_bad_requests_say_what_is_wrong(call, words):
    with pytest.raises(DataError) as error:
        call()
    for word in words:
        assert word in str(error.value)


def test_corrupt_source_row_is_reported_with_symbol_date_and_field(monkeypatch):
    corrupt = sp500.load().copy()
    corrupt.loc[pd.Timestamp("2008-10-10"), "Low"] = corrupt.loc[pd.Timestamp("2008-10-10"), "Close"] + 5
    monkeypatch.setattr(embedded, "_arch_frame", lambda name: corrupt)
    with pytest.raises(DataError) as error:
        embedded._symbol_frame.__wrapped__("SPY")
    message = str(error.value)
    assert "SPY" in message and "2008-10-10" in message and "below low" in message


@pytest.mark.parametrize("column, value, words", [
    ("close", np.nan, ["close", "missing"]),
    ("open", 0.0, ["open", "positive"]),
    ("high", 99.0, ["above high"]),
    ("volume", -5.0, ["volume", "negative"]),
])
def test_validate_daily_bars_names_date_and_field(column, value, words):
    frame = pd.DataFrame({"open": [100.0, 101.0], "high": [102.0, 103.0], "low": [99.0, 100.0],
                          "close": [101.0, 102.0], "volume": [1e6, 1e6]},
                         index=pd.DatetimeIndex(["2015-03-02", "2015-03-03"], name="date"))
    frame.loc[pd.Timestamp("2015-03-03"), column] = value
    with pytest.raises(DataError) as error:
        validate_daily_bars(frame, "test")
    assert "2015-03-03" in str(error.value)
    for word in words:
        assert word in str(error.value)
    with pytest.raises(DataError, match="missing columns"):
        validate_daily_bars(frame.drop(columns="low"), "test")


# ------------------------------------------------------------------------------ rates and dividends

def _raw_rf_percent(yyyymm: str) -> float:
    resource = importlib.resources.files("arch.data.frenchdata") / "frenchdata.csv.gz"
    with importlib.resources.as_file(resource) as path, gzip.open(path, "rt") as handle:
        for row in csv.DictReader(handle):
            if row["Date"] == yyyymm:
                return float(row["RF"])
    raise KeyError(yyyymm)


def test_risk_free_rate_matches_hand_conversion_and_is_flat_within_month():
    june = pd.date_range("2018-06-01", "2018-06-30", freq="D")
    rates = risk_free_rate(june)
    expected = 12.0 * math.log(1.0 + _raw_rf_percent("201806") / 100.0)
    assert _raw_rf_percent("201806") == 0.14
    np.testing.assert_allclose(rates.to_numpy(), expected, rtol=0, atol=1e-15)
    assert rates.index.equals(june) and rates.name == "risk_free_rate"
    # 2014 T-bill returns were essentially zero; 2018 rose to about 2 %.
    assert risk_free_rate(pd.date_range("2014-01-01", "2014-12-31", freq="MS")).max() < 0.002
    assert 0.015 < risk_free_rate("2018-11-15").iloc[0] < 0.025


def test_risk_free_rate_reads_tz_aware_timestamps_in_new_york_time():
    stamps = pd.DatetimeIndex(["2018-06-30 23:30", "2018-07-02 10:00"], tz="America/New_York").tz_convert("UTC")
    rates = risk_free_rate(stamps)
    assert rates.index.equals(stamps)                       # indexed by the inputs as given
    assert rates.iloc[0] == risk_free_rate("2018-06-15").iloc[0]    # 03:30 UTC on July 1 is June 30 in NY
    assert rates.iloc[1] == risk_free_rate("2018-07-15").iloc[0]
    assert rates.iloc[0] != rates.iloc[1]


def test_risk_free_rate_carries_november_2018_forward_then_stops():
    november = 12.0 * math.log(1.0 + _raw_rf_percent("201811") / 100.0)
    carried = risk_free_rate(["2018-12-03", "2018-12-31", "2019-01-03"])
    np.testing.assert_allclose(carried.to_numpy(), november, rtol=0, atol=1e-15)
    with pytest.raises(DataError, match="2019-02-01"):
        risk_free_rate("2019-02-01")
    with pytest.raises(DataError, match="before the data"):
        risk_free_rate("1926-06-30")
    assert list(embedded.monthly_risk_free().query("carried_forward").index.astype(str)) == ["2018-12", "2019-01"]


def test_dividend_yield_is_the_documented_constant():
    assert dividend_yield() == 0.019
    series = dividend_yield(pd.DatetimeIndex(["2015-01-02", "2016-01-04"]))
    assert (series == 0.019).all() and len(series) == 2


# ------------------------------------------------------------------------------ VIX and the IV index

def test_vix_holiday_rows_are_dropped_and_counted():
    raw = vix.load()["vix"]
    nan_dates = raw.index[raw.isna()]
    assert not any(is_session(day) for day in nan_dates)       # the trap: NaN rows are holidays
    iv = daily_iv_index("2014-01-03", "2019-01-03")
    assert iv.index.equals(trading_sessions("2014-01-03", "2019-01-03"))
    assert (iv["iv_source"] == "vix").all() and not iv["iv_index"].isna().any()
    np.testing.assert_array_equal(iv["iv_index"].to_numpy(), raw.dropna().to_numpy())
    counts = describe_embedded_data()["iv_index"]["vix"]
    assert counts["non_session_rows_dropped"] == len(nan_dates) == 46
    assert "2018-12-05" in counts["non_session_dates_dropped"]
    assert counts["session_days_forward_filled"] == 0


def test_iv_source_labels_switch_from_proxy_to_vix():
    iv = daily_iv_index("2013-12-20", "2014-01-10")
    assert (iv.loc[:"2014-01-02", "iv_source"] == "garch_proxy").all()
    assert (iv.loc["2014-01-03":, "iv_source"] == "vix").all()
    assert iv.loc["2014-01-03", "iv_index"] == 13.76
    with pytest.raises(DataError, match="2001-01-02"):
        daily_iv_index("2000-06-01", "2001-06-01")


def test_user_vix_gaps_on_sessions_are_forward_filled_and_labelled():
    dates = pd.DatetimeIndex(["2015-03-02", "2015-03-03", "2015-03-04", "2015-03-06",
                              "2015-03-07", "2015-03-09"])          # 03-05 absent, 03-07 a Saturday
    values = [14.0, np.nan, 15.0, 16.0, 99.0, 17.0]
    frame, counts = align_vix_to_sessions(pd.Series(values, index=dates))
    assert list(frame.index) == list(trading_sessions("2015-03-02", "2015-03-09"))
    assert frame.loc["2015-03-03", "iv_index"] == 14.0 and frame.loc["2015-03-03", "iv_source"] == "vix_ffill"
    assert frame.loc["2015-03-05", "iv_index"] == 15.0 and frame.loc["2015-03-05", "iv_source"] == "vix_ffill"
    assert (frame.loc[["2015-03-02", "2015-03-04", "2015-03-06", "2015-03-09"], "iv_source"] == "vix").all()
    assert counts["session_days_forward_filled"] == 2
    assert counts["non_session_rows_dropped"] == 1 and counts["non_session_dates_dropped"] == ["2015-03-07"]
    with pytest.raises(DataError, match="positive"):
        align_vix_to_sessions(pd.Series([14.0, -1.0], index=dates[:2]))


def test_describe_embedded_data_names_proxies_and_synthetic_parts():
    description = describe_embedded_data()
    assert description["daily_bars"]["SPY"]["divisor"] == 10.0
    assert "Composite" in description["daily_bars"]["QQQ"]["description"]
    assert description["daily_bars"]["QQQ"]["zero_volume_days"] == ["2015-05-12", "2018-01-09"]
    proxy = description["iv_index"]["garch_proxy"]
    assert proxy["synthetic"] is True and proxy["first"] == "2001-01-02" and proxy["vrp_multiplier"] == 1.2
    assert description["risk_free_rate"]["carried_forward_months"] == ["2018-12", "2019-01"]


# ------------------------------------------------------------------------------ GARCH proxy

@pytest.fixture(scope="module")
def early_returns() -> pd.Series:
    return log_returns_pct(sp500.load()["Close"]).loc[:"2001-06-29"]


def test_one_step_variance_reproduces_arch_conditional_variance(early_returns):
    sample = early_returns.to_numpy()
    early = sample[:75]
    backcast = float(np.sum((early - early.mean()) ** 2 * 0.94 ** np.arange(75)) / np.sum(0.94 ** np.arange(75)))
    result = arch_model(sample, mean="Constant", vol="GARCH", p=1, q=1, dist="normal",
                        rescale=False).fit(disp="off", backcast=backcast)
    mine = one_step_variance(sample, np.asarray(result.params), backcast)
    np.testing.assert_allclose(mine[:-1], result.conditional_volatility[1:] ** 2, rtol=1e-10)
    forecast = result.forecast(horizon=21, reindex=False).variance.to_numpy()[-1]
    omega, alpha, beta = result.params.iloc[1:]
    a, b = average_variance_coefficients(omega, alpha + beta, 21)
    np.testing.assert_allclose(a + b * mine[-1], forecast.mean(), rtol=1e-10)


def test_average_variance_coefficients_match_the_closed_form():
    omega, phi, horizon, next_var = 0.02, 0.97, 21, 1.7
    long_run = omega / (1 - phi)
    closed = long_run + (next_var - long_run) * (1 - phi ** horizon) / (horizon * (1 - phi))
    a, b = average_variance_coefficients(omega, phi, horizon)
    assert a + b * next_var == pytest.approx(closed, rel=1e-12)
    a1, b1 = average_variance_coefficients(0.01, 1.0, 3)     # IGARCH: h, h+ω, h+2ω
    assert (a1, b1) == pytest.approx((0.01, 1.0))


def test_garch_proxy_uses_no_data_after_the_day(early_returns):
    config = GarchProxyConfig(warmup_returns=300)
    full = garch_iv_proxy(early_returns, config)
    cut = pd.Timestamp("2000-11-15")
    truncated = garch_iv_proxy(early_returns.loc[:cut], config)
    pd.testing.assert_frame_equal(truncated, full.loc[:cut])
    # Wilder returns after the cut must not change anything up to it either.
    shocked = early_returns.copy()
    shocked.loc[shocked.index > cut] *= 4.0
    pd.testing.assert_frame_equal(garch_iv_proxy(shocked, config).loc[:cut], full.loc[:cut])
    assert not garch_iv_proxy(shocked, config).loc[cut:].iloc[1:].equals(full.loc[cut:].iloc[1:])
    # Parameters come from fits that end before the month of the day they serve.
    assert (full["fit_through"].dt.to_period("M") < full.index.to_period("M")).all()
    assert full["fit_converged"].all()


def test_garch_proxy_needs_the_warm_up():
    with pytest.raises(DataError, match="500"):
        garch_iv_proxy(pd.Series(np.zeros(400), index=trading_sessions("2001-01-02", "2003-01-01")[:400]))


def test_embedded_garch_proxy_is_plausible_and_tracks_vix():
    proxy = embedded.garch_proxy()["iv_proxy"]
    assert np.isfinite(proxy).all() and (proxy > 0).all()
    assert proxy.index[0] == pd.Timestamp("2001-01-02")
    assert proxy.loc["2008-10"].mean() > 40            # crash: VIX averaged ~60 that month
    assert proxy.loc["2005"].mean() < 20               # calm: VIX averaged ~12.8
    real = vix.load()["vix"].dropna()
    both = pd.concat([proxy, real], axis=1, join="inner").loc["2014":"2018"]
    correlation = both.corr().iloc[0, 1]
    print(f"\nGARCH proxy vs VIX 2014-2018: corr {correlation:.3f}, mean {both['iv_proxy'].mean():.2f} "
          f"vs {both['vix'].mean():.2f}, median ratio VIX/proxy {(both['vix'] / both['iv_proxy']).median():.3f}")
    assert correlation > 0.7
    assert 0.7 < both["vix"].mean() / both["iv_proxy"].mean() < 1.4
