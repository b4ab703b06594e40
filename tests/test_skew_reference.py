"""The percentile skew rule's reference: the config settings, the per-bar plumbing of
intelligence/skew_reference.py on hand cases, and on short embedded periods (core/skew_history.py):
the session-close readings are the engine's entry readings at the close bars, every bar of a
session carries that session's reference, the history provider continues the run's sessions
seamlessly, and nothing looks ahead (a shorter run gives the same references on its bars)."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from analytics.skew import trailing_skew_reference
from core.config import Config, ConfigError
from core.market_data import embedded_chain_provider
from core.skew_history import embedded_skew_history, embedded_skew_reference, skew_rule_needs_reference
from intelligence.skew_reference import (
    session_close_skews,
    session_last_bars,
    skew_reference_for_bars,
    skew_reference_per_bar,
)
from strategies.condor_adjustments import nearest_expiry_skew, plan_wings

NY = "America/New_York"
NAN = math.nan


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

def test_skew_rule_settings_defaults_and_rules():
    filters = Config().filters
    assert (filters.skew_rule, filters.skew_percentile, filters.skew_lookback_sessions, filters.skew_min_sessions,
            filters.skew_threshold) == ("percentile", 80.0, 252, 20, 0.15)
    assert Config().override({"skew_rule": "seed"}).filters.skew_rule == "seed"
    for bad in ({"filters.skew_rule": "absolute"}, {"filters.skew_percentile": 0.0},
                {"filters.skew_percentile": 100.0}, {"filters.skew_lookback_sessions": 0},
                {"filters.skew_min_sessions": 0},
                {"filters.skew_lookback_sessions": 10, "filters.skew_min_sessions": 11}):
        with pytest.raises(ConfigError):
            Config().override(bad)
    assert Config().override({"filters.skew_lookback_sessions": 10,
                              "filters.skew_min_sessions": 10}).filters.skew_min_sessions == 10


def test_skew_rule_needs_reference():
    config = Config()
    assert skew_rule_needs_reference(config)
    for change in ({"filters.skew_rule": "seed"}, {"strategy.use_skew_penalty": False},
                   {"filters.use_entry_gates": False}):
        assert not skew_rule_needs_reference(config.override(change))


# ------------------------------------------------------------------------------------------------
# hand cases
# ------------------------------------------------------------------------------------------------

def bar_index(*days: tuple[str, int]) -> pd.DatetimeIndex:
    """``count`` 5-minute bars from 09:35 on each day."""
    stamps = [pd.Timestamp(f"{day} 09:35", tz=NY) + pd.Timedelta(minutes=5 * k) for day, count in days
              for k in range(count)]
    return pd.DatetimeIndex(stamps)


def test_session_last_bars():
    times = bar_index(("2016-01-04", 3), ("2016-01-05", 1), ("2016-01-06", 4))
    np.testing.assert_array_equal(session_last_bars(times), [2, 3, 7])
    # Sessions are exchange-time days even when the index is in UTC (a 15:55 NY bar is 20:55 UTC).
    np.testing.assert_array_equal(session_last_bars(times.tz_convert("UTC")), [2, 3, 7])
    assert session_last_bars(times[:0]).shape == (0,)
    with pytest.raises(ValueError):
        session_last_bars(times.tz_localize(None))
    with pytest.raises(ValueError):
        session_last_bars(times[::-1])


def test_skew_reference_per_bar_gives_each_bar_its_sessions_value():
    np.testing.assert_array_equal(skew_reference_per_bar([NAN, 0.7, 0.8], [2, 3, 7]),
                                  [NAN, NAN, NAN, 0.7, 0.8, 0.8, 0.8, 0.8])
    # Bars after the last close (data ending mid-session) get NaN.
    np.testing.assert_array_equal(skew_reference_per_bar([0.5], [1], n_bars=4), [0.5, 0.5, NAN, NAN])
    assert skew_reference_per_bar([], []).shape == (0,)
    with pytest.raises(ValueError):
        skew_reference_per_bar([0.1, 0.2], [3])
    with pytest.raises(ValueError):
        skew_reference_per_bar([0.1, 0.2], [3, 3])


class FakeChain:
    """The columns ``nearest_expiry_skew`` reads, for a chain source that is not the provider."""

    def __init__(self, spot, rows):
        self.spot = spot
        columns = list(zip(*rows)) if rows else [[]] * 6
        self.expiration = np.array(columns[0], dtype="datetime64[D]")
        self.dte = np.array(columns[1], dtype=np.int64)
        self.strike = np.array(columns[2], dtype=float)
        self.is_call = np.array(columns[3], dtype=bool)
        self.delta = np.array(columns[4], dtype=float)
        self.iv = np.array(columns[5], dtype=float)

    def __len__(self):
        return len(self.strike)

    def select(self, mask):
        rows = list(zip(self.expiration[mask], self.dte[mask], self.strike[mask], self.is_call[mask],
                        self.delta[mask], self.iv[mask]))
        return FakeChain(self.spot, rows)


def fake_expiry(expiry: str, dte: int, put_iv: float, call_iv: float, atm_iv: float):
    return [(expiry, dte, 90.0, False, -0.15, put_iv), (expiry, dte, 100.0, False, -0.5, atm_iv),
            (expiry, dte, 100.0, True, 0.5, atm_iv), (expiry, dte, 110.0, True, 0.15, call_iv)]


def test_session_close_skews_reads_the_nearest_expiry_in_the_dte_range():
    chains = {
        # A 10-day expiry outside 30 … 45 must be ignored when the range is given.
        4: FakeChain(100.0, fake_expiry("2016-01-15", 10, 0.5, 0.1, 0.2) + fake_expiry("2016-02-19", 45, 0.3, 0.1, 0.2)
                     + fake_expiry("2016-03-18", 73, 0.9, 0.1, 0.2)),
        9: FakeChain(100.0, []),                                      # empty slice: NaN
        12: FakeChain(100.0, fake_expiry("2016-02-19", 40, 0.25, 0.15, 0.2)),
    }
    calls = []

    def chain_at(bar):
        calls.append(bar)
        return chains[bar]

    got = session_close_skews(chain_at, [4, 9, 12], dte_min=30, dte_max=45)
    np.testing.assert_allclose(got, [(0.3 - 0.1) / 0.2, NAN, (0.25 - 0.15) / 0.2], equal_nan=True)
    assert calls == [4, 9, 12]                                        # one slice per session
    # Without a range: the nearest expiry of whatever the source returns.
    assert session_close_skews(chain_at, [4])[0] == pytest.approx((0.5 - 0.1) / 0.2)


# ------------------------------------------------------------------------------------------------
# embedded data
# ------------------------------------------------------------------------------------------------

# A short lookback keeps the history provider small (30 sessions ≈ six weeks).
SHORT = Config().override({"backtest.start": dt.date(2016, 2, 1), "backtest.end": dt.date(2016, 2, 29),
                           "filters.skew_lookback_sessions": 30, "filters.skew_min_sessions": 10})


@pytest.fixture(scope="module")
def february():
    return embedded_chain_provider(SHORT)


def chain_source(provider, config):
    strategy = config.strategy
    return lambda bar: provider.slice_at(bar, strategy.dte_min, strategy.dte_max)


def test_session_close_readings_are_the_engines_reading_at_the_close_bar(february):
    last = session_last_bars(february.bar_times)
    assert len(last) == len(february.sessions) == 20
    assert all(february.bar_times[bar].strftime("%H:%M") == "16:00" for bar in last)
    skews = session_close_skews(chain_source(february, SHORT), last)
    for i in (0, 7, 19):
        _, reading = nearest_expiry_skew(february.slice_at(int(last[i]), 30, 45))
        assert skews[i] == reading.skew
    # The synthetic 15-delta metric sits far above the seed's 0.15 on every session.
    assert (skews > 0.6).all() and (skews < 0.8).all()


def test_without_history_the_reference_waits_for_min_sessions(february):
    reference = embedded_skew_reference(SHORT, february, history=False)
    last = session_last_bars(february.bar_times)
    skews = session_close_skews(chain_source(february, SHORT), last)
    expected = trailing_skew_reference(skews, 30, 80.0, 10)
    np.testing.assert_array_equal(reference[last], expected)
    assert np.isnan(reference[:last[9] + 1]).all()                   # sessions 0 … 9: fewer than 10 before
    assert np.isfinite(reference[last[9] + 1:]).all()
    # Every bar of a session has its session's value.
    np.testing.assert_array_equal(reference, skew_reference_per_bar(expected, last, len(february.bar_times)))


def test_history_continues_the_run_and_nothing_looks_ahead(february):
    reference = embedded_skew_reference(SHORT, february)
    assert reference.shape == (len(february.bar_times),) and np.isfinite(reference).all()
    history = embedded_skew_history(SHORT, february.bar_times[0])
    assert len(history) == 30
    # The same numbers as one provider over history + run: its sessions' references on the run's bars.
    first_history_day = dt.date(2015, 12, 16)                       # 30 sessions before 2016-02-01
    span = embedded_chain_provider(SHORT, start=first_history_day, end=dt.date(2016, 2, 29))
    assert span.sessions[30] == pd.Timestamp("2016-02-01")
    span_reference = skew_reference_for_bars(chain_source(span, SHORT), span.bar_times, SHORT.filters, 30, 45)
    offset = span.bar_index(february.bar_times[0])
    np.testing.assert_array_equal(span_reference[offset:], reference)
    # Causal: a run that ends earlier has the same references on the bars it has.
    early = SHORT.override({"backtest.end": dt.date(2016, 2, 10)})
    shorter = embedded_skew_reference(early, embedded_chain_provider(early))
    np.testing.assert_array_equal(shorter, reference[:len(shorter)])


def test_history_is_clipped_at_the_start_of_the_data():
    assert embedded_skew_history(SHORT, "2001-01-02").shape == (0,)
    assert len(embedded_skew_history(SHORT, "2001-01-04", sessions=30)) == 2     # 01-02 and 01-03


def test_the_reference_is_not_computed_when_the_rule_cannot_use_it(february, monkeypatch):
    import core.skew_history as skew_history

    def fail(*args, **kwargs):
        raise AssertionError("no chain should be read")

    monkeypatch.setattr(skew_history, "skew_reference_for_bars", fail)
    seed = SHORT.override({"filters.skew_rule": "seed"})
    reference = embedded_skew_reference(seed, february)
    assert reference.shape == (len(february.bar_times),) and np.isnan(reference).all()


def test_the_reference_drives_the_put_wing_on_a_minority_of_close_bars(february):
    # End to end on the close bars: the percentile rule widens the put wing only where the close
    # reading exceeds the trailing 80th percentile; the seed rule widens it everywhere.
    reference = embedded_skew_reference(SHORT, february)
    last = session_last_bars(february.bar_times)
    skews = session_close_skews(chain_source(february, SHORT), last)
    seed = SHORT.override({"filters.skew_rule": "seed"})
    widened = [plan_wings(SHORT, "HIGH_VOL_RANGE", skews[i], 0, reference[bar]).put_range != (5.0, 10.0)
               for i, bar in enumerate(last)]
    assert widened == list(skews > reference[last])
    assert 0 < sum(widened) < len(widened)
    assert all(plan_wings(seed, "HIGH_VOL_RANGE", s, 0, reference[bar]).put_range == (10.0, 10.0)
               for s, bar in zip(skews, last))
