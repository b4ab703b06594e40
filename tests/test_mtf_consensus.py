"""Multi-timeframe consensus (intelligence/mtf_consensus.py): session-anchored resampling of base
bars against an independent pandas reference, the trend vote against a hand-written EMA / Wilder
ATR, and no look-ahead (a higher-timeframe bar counts only once it has closed; later data never
changes an earlier consensus).

Hand-built bars cover a full session and an early close (13:00, the day after Thanksgiving); the
embedded 1-minute bars are the real input of a run.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import Config
from core.market_data import calendar_session_closes, embedded_chain_provider
from data_factory import embedded
from data_factory.intraday import intraday_bars
from intelligence.mtf_consensus import (
    mtf_consensus,
    resample_session_bars,
    trend_vote,
    votes_as_of,
)

NY = "America/New_York"
# 2015-11-27 closes at 13:00 (day after Thanksgiving): 210 one-minute bars; the others 390.
HAND_SESSIONS = (("2015-11-25", "16:00"), ("2015-11-27", "13:00"), ("2015-11-30", "16:00"))
EMBEDDED_START, EMBEDDED_END = "2015-11-19", "2015-12-04"


def hand_minute_bars(sessions=HAND_SESSIONS, seed: int = 7) -> pd.DataFrame:
    """1-minute OHLCV bars stamped at their close (09:31 … session close), a seeded random walk."""
    rng = np.random.default_rng(seed)
    frames = []
    price = 200.0
    for day, close_time in sessions:
        stamps = pd.date_range(f"{day} 09:31", f"{day} {close_time}", freq="1min", tz=NY)
        steps = rng.normal(0.0, 0.05, len(stamps))
        close = price + np.cumsum(steps)
        open_ = np.r_[price, close[:-1]]
        high = np.maximum(open_, close) + rng.uniform(0.0, 0.04, len(stamps))
        low = np.minimum(open_, close) - rng.uniform(0.0, 0.04, len(stamps))
        volume = rng.integers(100, 5_000, len(stamps)).astype(float)
        frames.append(pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume},
                                   index=pd.DatetimeIndex(stamps, name="timestamp")))
        price = close[-1] + 0.3      # an overnight gap
    return pd.concat(frames)


def pandas_reference(base: pd.DataFrame, minutes: int, base_minutes: int = 1) -> pd.DataFrame:
    """Per session, bins (open + k·m, open + (k+1)·m] from the session open (first bar's close minus
    one base bar), OHLCV aggregated, each bar stamped with its last base bar's close."""
    parts = []
    local = base.index.tz_convert(NY)
    for _, day in base.groupby(local.date):
        session_open = day.index[0] - pd.Timedelta(minutes=base_minutes)
        grouper = pd.Grouper(freq=f"{minutes}min", origin=session_open, closed="right", label="right")
        frame = day.assign(stamp=day.index).groupby(grouper).agg(
            open=("open", "first"), high=("high", "max"), low=("low", "min"), close=("close", "last"),
            volume=("volume", "sum"), stamp=("stamp", "max"), count=("close", "size"))
        parts.append(frame[frame["count"] > 0])
    return pd.concat(parts).set_index("stamp")


def as_frame(bars) -> pd.DataFrame:
    index = pd.DatetimeIndex(pd.to_datetime(bars.close_ns, unit="ns", utc=True)).tz_convert(NY)
    return pd.DataFrame({"open": bars.open, "high": bars.high, "low": bars.low, "close": bars.close,
                         "volume": bars.volume}, index=index)


def stamp_ns(text: str) -> int:
    return pd.Timestamp(text, tz=NY).tz_convert("UTC").as_unit("ns").value


def targets_of(bars: pd.DataFrame, minutes: int = 5) -> np.ndarray:
    return resample_session_bars(bars, minutes).close_ns


# ------------------------------------------------------------------------------------------------
# resampling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("minutes", [5, 15, 60])
def test_resample_matches_a_pandas_groupby_per_session(minutes):
    base = hand_minute_bars()
    got = as_frame(resample_session_bars(base, minutes))
    expected = pandas_reference(base, minutes)
    assert got.index.equals(expected.index), (got.index[:5], expected.index[:5])
    for column in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    # Bars never cross a session: one group per session of ceil(session minutes / m) bars.
    per_session = got.groupby(got.index.date).size().to_numpy()
    np.testing.assert_array_equal(per_session, [-(-390 // minutes), -(-210 // minutes), -(-390 // minutes)])


def test_close_stamps_and_the_early_close_partial_bar():
    base = hand_minute_bars()
    five = as_frame(resample_session_bars(base, 5))
    assert five.index[0] == pd.Timestamp("2015-11-25 09:35", tz=NY)
    assert five.index[77] == pd.Timestamp("2015-11-25 16:00", tz=NY)
    assert five.index[78] == pd.Timestamp("2015-11-27 09:35", tz=NY)    # next session starts afresh
    hourly = as_frame(resample_session_bars(base, 60))
    early = hourly[hourly.index.date == pd.Timestamp("2015-11-27").date()]
    # 09:30-10:30, …, 11:30-12:30 and the partial 12:30-13:00 bar, stamped at the 13:00 close.
    assert list(early.index.strftime("%H:%M")) == ["10:30", "11:30", "12:30", "13:00"]
    tail = base.loc["2015-11-27 12:31":"2015-11-27 13:00"]
    assert len(tail) == 30
    last = early.iloc[-1]
    assert last["high"] == tail["high"].max() and last["low"] == tail["low"].min()
    assert last["open"] == tail["open"].iloc[0] and last["close"] == tail["close"].iloc[-1]
    assert last["volume"] == tail["volume"].sum()
    full_day = hourly[hourly.index.date == pd.Timestamp("2015-11-25").date()]
    assert full_day.index[-1] == pd.Timestamp("2015-11-25 16:00", tz=NY)    # 15:30-16:00, partial
    # The first hourly bar of the next session covers 09:31-10:30 of that session only.
    first_next = hourly[hourly.index.date == pd.Timestamp("2015-11-30").date()].iloc[0]
    head = base.loc["2015-11-30 09:31":"2015-11-30 10:30"]
    assert first_next["high"] == head["high"].max() and first_next["open"] == head["open"].iloc[0]


def test_fifteen_minute_bars_from_five_minute_base_equal_those_from_one_minute():
    base = hand_minute_bars()
    five = pandas_reference(base, 5)[["open", "high", "low", "close", "volume"]]
    from_five = as_frame(resample_session_bars(five, 15, base_minutes=5))
    from_one = as_frame(resample_session_bars(base, 15))
    pd.testing.assert_frame_equal(from_five, from_one)


def test_resample_to_the_base_size_returns_the_base_bars():
    base = hand_minute_bars()
    same = as_frame(resample_session_bars(base, 1))
    expected = base.rename_axis(None)
    expected.index = expected.index.as_unit("ns")
    pd.testing.assert_frame_equal(same, expected, check_freq=False)


@pytest.fixture(scope="module")
def embedded_minutes():
    daily = embedded.daily_bars("SPY", EMBEDDED_START, EMBEDDED_END)
    return intraday_bars(daily, freq="1min", seed=42)


def test_five_minute_resample_of_embedded_minutes_is_the_providers_five_minute_bars(embedded_minutes):
    config = Config().override({"backtest.start": EMBEDDED_START, "backtest.end": EMBEDDED_END})
    provider = embedded_chain_provider(config)
    bars = resample_session_bars(embedded_minutes, 5)
    expected_ns = provider.bar_times.tz_convert("UTC").as_unit("ns").asi8
    np.testing.assert_array_equal(bars.close_ns, expected_ns)
    np.testing.assert_array_equal(bars.close, provider.spot_bars().to_numpy())
    ohlcv = provider.ohlcv_bars()
    for column in ("open", "high", "low", "volume"):
        np.testing.assert_array_equal(getattr(bars, column), ohlcv[column].to_numpy(), err_msg=column)
    # The early close is in the period: 42 five-minute bars on 2015-11-27.
    local = provider.bar_times.tz_convert(NY)
    assert (local.date == pd.Timestamp("2015-11-27").date()).sum() == 42


# ------------------------------------------------------------------------------------------------
# the trend vote
# ------------------------------------------------------------------------------------------------

def hand_vote(high, low, close, period):
    """0.5 + 0.5 tanh((close − EMA)/ATR): EMA seeded with the SMA of the first ``period`` closes,
    ATR Wilder-smoothed from the mean of the first ``period`` true ranges (TA-Lib's conventions)."""
    n = len(close)
    ema = np.full(n, np.nan)
    ema[period - 1] = close[:period].mean()
    alpha = 2.0 / (period + 1.0)
    for i in range(period, n):
        ema[i] = alpha * close[i] + (1 - alpha) * ema[i - 1]
    true_range = np.full(n, np.nan)
    for i in range(1, n):
        true_range[i] = max(high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1]))
    atr = np.full(n, np.nan)
    atr[period] = true_range[1: period + 1].mean()
    for i in range(period + 1, n):
        atr[i] = (atr[i - 1] * (period - 1) + true_range[i]) / period
    return 0.5 + 0.5 * np.tanh((close - ema) / atr)


@pytest.mark.parametrize("period", [5, 20])
def test_trend_vote_matches_a_hand_written_ema_and_wilder_atr(period):
    bars = resample_session_bars(hand_minute_bars(), 5)
    votes = trend_vote(bars, period)
    expected = hand_vote(bars.high, bars.low, bars.close, period)
    assert np.isnan(votes[:period]).all()
    np.testing.assert_allclose(votes, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_votes_lie_in_the_unit_interval_and_point_with_the_trend(embedded_minutes):
    for minutes in (1, 5, 15):
        votes = trend_vote(resample_session_bars(embedded_minutes, minutes))
        finite = votes[np.isfinite(votes)]
        assert finite.size > 0.8 * votes.size
        assert ((finite >= 0.0) & (finite <= 1.0)).all()
        assert finite.min() < 0.3 and finite.max() > 0.7          # not stuck at neutral
    stamps = pd.date_range("2016-03-01 09:31", periods=200, freq="1min", tz=NY)
    rising = np.linspace(100.0, 110.0, 200)
    up = pd.DataFrame({"high": rising + 0.05, "low": rising - 0.05, "close": rising}, index=stamps)
    down = pd.DataFrame({"high": rising[::-1] + 0.05, "low": rising[::-1] - 0.05, "close": rising[::-1]},
                        index=stamps)
    assert (trend_vote(resample_session_bars(up, 1))[20:] > 0.5).all()
    assert (trend_vote(resample_session_bars(down, 1))[20:] < 0.5).all()


def test_a_flat_series_votes_exactly_neutral():
    stamps = pd.date_range("2016-03-01 09:31", "2016-03-01 16:00", freq="1min", tz=NY)
    flat = pd.DataFrame({"open": 100.0, "high": 100.0, "low": 100.0, "close": 100.0}, index=stamps)
    targets = targets_of(flat)
    result = mtf_consensus(flat, targets, (1, 5, 15), (1, 1, 1), period=5)
    for minutes, votes in result.votes.items():
        finite = votes[np.isfinite(votes)]
        assert finite.size > 0, minutes
        assert (finite == 0.5).all(), minutes
    assert (result.consensus[np.isfinite(result.consensus)] == 0.5).all()


# ------------------------------------------------------------------------------------------------
# no look-ahead
# ------------------------------------------------------------------------------------------------

LOOKAHEAD_CUTS = ["2015-11-30 10:07", "2015-11-30 10:00", "2015-11-27 13:00", "2015-12-01 16:00",
                  "2015-12-02 12:44"]


@pytest.fixture(scope="module")
def full_consensus(embedded_minutes):
    targets = targets_of(embedded_minutes)
    return targets, mtf_consensus(embedded_minutes, targets, (1, 5, 15, 60), (1, 1, 1, 1))


def assert_same_up_to(first, second, count):
    np.testing.assert_array_equal(first.consensus[:count], second.consensus[:count])
    for minutes in first.votes:
        np.testing.assert_array_equal(first.votes[minutes][:count], second.votes[minutes][:count],
                                      err_msg=f"{minutes}-minute vote")


@pytest.mark.parametrize("cut", LOOKAHEAD_CUTS)
def test_changing_every_bar_after_a_time_changes_nothing_up_to_it(embedded_minutes, full_consensus, cut):
    targets, full = full_consensus
    cut_ns = stamp_ns(cut)
    later = embedded_minutes.index.tz_convert("UTC").as_unit("ns").asi8 > cut_ns
    changed = embedded_minutes.copy()
    for column in ("open", "high", "low", "close"):
        changed.loc[later, column] *= 1.1
    result = mtf_consensus(changed, targets, (1, 5, 15, 60), (1, 1, 1, 1))
    upto = int(np.searchsorted(targets, cut_ns, side="right"))
    assert 0 < upto < len(targets)
    assert np.isfinite(full.consensus[:upto]).any()
    assert_same_up_to(result, full, upto)
    # The change is visible after the cut (so the comparison above can fail).
    assert not np.allclose(result.consensus[upto:], full.consensus[upto:], equal_nan=True)


# Cuts where every timeframe's last bucket is complete in the truncated data (or the cut is no
# target time), so the truncated run sees the same closed bars as the full one.
COMPLETE_CUTS = ["2015-11-30 10:07", "2015-11-27 13:00", "2015-12-01 16:00", "2015-12-02 12:44",
                 "2015-11-30 11:30"]
# Cuts that end the data inside an open higher-timeframe bar AT a target time: data up to 10:05
# (what a live feed has at 10:05) holds the forming 10:00-10:15 bar.
OPEN_BAR_CUTS = ["2015-11-30 10:05", "2015-11-30 10:00"]


def assert_truncated_run_matches(embedded_minutes, full_consensus, cut):
    targets, full = full_consensus
    cut_ns = stamp_ns(cut)
    upto = int(np.searchsorted(targets, cut_ns, side="right"))
    stamps = embedded_minutes.index.tz_convert("UTC").as_unit("ns").asi8
    kept = embedded_minutes[stamps <= cut_ns]
    # A feed that ends mid-session stamps its bars with the calendar's session closes.
    truncated = mtf_consensus(kept, targets[:upto], (1, 5, 15, 60), (1, 1, 1, 1),
                              session_close_ns=calendar_session_closes(kept.index))
    assert len(truncated.consensus) == upto
    assert_same_up_to(truncated, full, upto)


@pytest.mark.parametrize("cut", COMPLETE_CUTS)
def test_data_truncated_at_a_time_gives_the_same_values_up_to_it(embedded_minutes, full_consensus, cut):
    assert_truncated_run_matches(embedded_minutes, full_consensus, cut)


# Data ending inside a forming 15-/60-minute bar (a live feed at 10:05): that bar must not count
# as closed at 10:05; bars are stamped at their real close time.
@pytest.mark.parametrize("cut", OPEN_BAR_CUTS)
def test_data_ending_inside_an_open_bar_gives_the_same_values_up_to_it(embedded_minutes, full_consensus, cut):
    assert_truncated_run_matches(embedded_minutes, full_consensus, cut)


def test_a_target_inside_an_open_bar_sees_the_last_closed_bar(embedded_minutes, full_consensus):
    targets, full = full_consensus
    bars15 = resample_session_bars(embedded_minutes, 15)
    votes15 = trend_vote(bars15)
    closed_at_10 = int(np.flatnonzero(bars15.close_ns == stamp_ns("2015-11-30 10:00"))[0])
    assert bars15.close_ns[closed_at_10 + 1] == stamp_ns("2015-11-30 10:15")
    assert votes15[closed_at_10] != votes15[closed_at_10 + 1]       # the two candidates differ
    for when, expected in (("10:00", closed_at_10), ("10:05", closed_at_10), ("10:10", closed_at_10),
                           ("10:15", closed_at_10 + 1)):
        row = int(np.flatnonzero(targets == stamp_ns(f"2015-11-30 {when}"))[0])
        assert full.votes[15][row] == votes15[expected], when
    # The first 5-minute bar of a session sees the previous session's last hourly bar (16:00).
    bars60 = resample_session_bars(embedded_minutes, 60)
    votes60 = trend_vote(bars60)
    row = int(np.flatnonzero(targets == stamp_ns("2015-12-01 09:35"))[0])
    last_hour = int(np.flatnonzero(bars60.close_ns == stamp_ns("2015-11-30 16:00"))[0])
    assert full.votes[60][row] == votes60[last_hour]


def test_votes_as_of_is_nan_before_the_first_close_and_steps_at_closes():
    stamps = pd.date_range("2016-03-01 09:31", periods=60, freq="1min", tz=NY)
    bars = resample_session_bars(pd.DataFrame({"high": 1.0, "low": 1.0, "close": 1.0}, index=stamps), 15)
    votes = np.array([0.1, 0.2, 0.3, 0.4])
    targets = np.array([stamp_ns(t) for t in ("2016-03-01 09:40", "2016-03-01 09:45", "2016-03-01 09:59",
                                              "2016-03-01 10:00", "2016-03-01 10:31")])
    np.testing.assert_array_equal(votes_as_of(targets, bars, votes), [np.nan, 0.1, 0.1, 0.2, 0.4])


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------

def test_weights_are_normalised(embedded_minutes, full_consensus):
    targets, full = full_consensus
    only_first = mtf_consensus(embedded_minutes, targets, (1, 5, 15), (2, 0, 0))
    np.testing.assert_array_equal(only_first.consensus, full.votes[1])
    # A zero weight drops the timeframe even during its warm-up (C is not NaN because of it).
    assert np.isfinite(only_first.consensus).sum() > np.isfinite(full.votes[15]).sum()
    weighted = mtf_consensus(embedded_minutes, targets, (1, 5, 15), (1, 1, 2))
    expected = 0.25 * full.votes[1] + 0.25 * full.votes[5] + 0.5 * full.votes[15]
    np.testing.assert_allclose(weighted.consensus, expected, rtol=1e-12, equal_nan=True)
    scaled = mtf_consensus(embedded_minutes, targets, (1, 5, 15), (10, 10, 20))
    np.testing.assert_allclose(scaled.consensus, weighted.consensus, rtol=1e-12, equal_nan=True)
    finite = weighted.consensus[np.isfinite(weighted.consensus)]
    assert ((finite >= 0.0) & (finite <= 1.0)).all()


@pytest.mark.parametrize("timeframes, weights, words", [
    pytest.param((1, 5, 15), (1, 1), ("2 weights", "3 timeframes"), id="length-mismatch"),
    pytest.param((1, 5, 15), (1, -1, 1), ("must be >= 0",), id="negative"),
    pytest.param((1, 5, 15), (0, 0, 0), ("sum to more than 0",), id="zero-sum"),
])
def test_bad_weights_are_refused(timeframes, weights, words):
    base = hand_minute_bars()
    with pytest.raises(ValueError) as error:
        mtf_consensus(base, targets_of(base), timeframes, weights)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_a_timeframe_that_is_not_a_multiple_of_the_base_bar_is_refused():
    base = hand_minute_bars()
    five = pandas_reference(base, 5)[["open", "high", "low", "close", "volume"]]
    with pytest.raises(ValueError, match="not a multiple of the base bar"):
        resample_session_bars(five, 7, base_minutes=5)
    with pytest.raises(ValueError, match="12 min"):
        mtf_consensus(five, targets_of(base), (5, 12), (1, 1), base_minutes=5)
