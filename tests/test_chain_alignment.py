"""Chain-snapshot alignment: modes, lag limits, IV confidence decay, fail-fast, diagnostics."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_factory.chain_alignment import (
    ALIGNMENT_MODES, DEFAULT_LAG_LIMIT_S, IV_CONF_HALF_LIFE_S, LAG_LIMITS_S, STALE_FAIL_RATE,
    STATUS_NAMES, align_snapshots, iv_confidence, lag_limit, row_confidence,
)
from data_factory.errors import DataError

NY = "America/New_York"
DAY = "2024-03-05"
NAN = np.nan

# Bars 09:35 … 10:30 (12 five-minute bars, stamped at their close).
BARS = pd.date_range(f"{DAY} 09:35", f"{DAY} 10:30", freq="5min", tz=NY)
# Snapshots: one after 09:35 (so that bar has none), two on bars, two 2 minutes before a bar,
# then a 27-minute hole (12-, 17-, 22-minute-old snapshots), then one on the 10:30 bar.
SNAPS = pd.DatetimeIndex([f"{DAY} 09:36:30", f"{DAY} 09:40", f"{DAY} 09:45", f"{DAY} 09:53",
                          f"{DAY} 10:03", f"{DAY} 10:30"]).tz_localize(NY)
# Per bar: the latest snapshot at or before it and its age in seconds (hand-computed).
LATEST = np.array([-1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5])
RAW_LAG = np.array([NAN, 0, 0, 300, 120, 420, 120, 420, 720, 1020, 1320, 0])
BARS_NS, SNAPS_NS = BARS.as_unit("ns").asi8, SNAPS.as_unit("ns").asi8   # pandas 3 infers "us"
A, B = 0.5 ** 0.4, 0.5 ** 1.4          # iv_conf at 120 s and 420 s


def codes(*names):
    return np.array([STATUS_NAMES.index(name) for name in names], dtype=np.int8)


def check(result, snapshot, lag, status, conf):
    np.testing.assert_array_equal(result.snapshot, snapshot)
    np.testing.assert_array_equal(result.lag_s, np.array(lag, dtype=float))     # NaN == NaN here
    np.testing.assert_array_equal(result.status, codes(*status))
    np.testing.assert_allclose(result.iv_conf, conf, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(result.raw_lag_s, RAW_LAG)
    np.testing.assert_array_equal(result.usable(), np.asarray(snapshot) >= 0)
    assert list(result.status_labels()) == list(status)


def test_constants_and_limits():
    assert ALIGNMENT_MODES == ("exact", "prior", "stale", "none")
    assert LAG_LIMITS_S == {"SPY": 600.0, "QQQ": 600.0, "SPX": 900.0, "SPXW": 900.0}
    assert (DEFAULT_LAG_LIMIT_S, IV_CONF_HALF_LIFE_S, STALE_FAIL_RATE) == (600.0, 300.0, 0.20)
    assert lag_limit("SPY") == 600.0 and lag_limit("qqq") == 600.0
    assert lag_limit("SPX") == 900.0 and lag_limit(" spxw ") == 900.0
    assert lag_limit("IWM") == 600.0
    assert lag_limit("SPX", override=120) == 120.0
    assert lag_limit("SPY", override=float("inf")) == float("inf")
    with pytest.raises(ValueError, match="max_lag_s"):
        lag_limit("SPY", override=-1)
    with pytest.raises(ValueError, match="max_lag_s"):
        lag_limit("SPY", override=float("nan"))


def test_iv_confidence_formula():
    conf = iv_confidence(np.array([0.0, 150.0, 300.0, 600.0, 900.0, NAN]))
    np.testing.assert_allclose(conf, [1.0, 2 ** -0.5, 0.5, 0.25, 0.125, 0.0], rtol=1e-15, atol=0)
    assert conf.dtype == np.float64


def test_prior_mode_spy():
    result = align_snapshots(BARS, SNAPS, mode="prior", symbol="SPY", fail_fast=False)
    assert (result.mode, result.symbol, result.lag_limit_s) == ("prior", "SPY", 600.0)
    check(result,
          snapshot=[-1, 1, 2, 2, 3, 3, 4, 4, -1, -1, -1, 5],
          lag=[NAN, 0, 0, 300, 120, 420, 120, 420, NAN, NAN, NAN, 0],
          status=["none", "exact", "exact", "prior", "prior", "prior", "prior", "prior",
                  "none", "none", "none", "exact"],
          conf=[0, 1, 1, 0.5, A, B, A, B, 0, 0, 0, 1])


def test_stale_mode_spy():
    result = align_snapshots(BARS, SNAPS, mode="stale", symbol="SPY", fail_fast=False)
    check(result,
          snapshot=[-1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5],
          lag=[NAN, 0, 0, 300, 120, 420, 120, 420, 720, 1020, 1320, 0],
          status=["none", "exact", "exact", "prior", "prior", "prior", "prior", "prior",
                  "stale", "stale", "stale", "exact"],
          conf=[0, 1, 1, 0.5, A, B, A, B, 0.5 ** 2.4, 0.5 ** 3.4, 0.5 ** 4.4, 1])


def test_exact_mode_with_and_without_tolerance():
    result = align_snapshots(BARS, SNAPS, mode="exact", fail_fast=False)
    check(result,
          snapshot=[-1, 1, 2, -1, -1, -1, -1, -1, -1, -1, -1, 5],
          lag=[NAN, 0, 0, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0],
          status=["none", "exact", "exact"] + ["none"] * 8 + ["exact"],
          conf=[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    # 120 s tolerance looks backwards only: the 2-minutes-before snapshots now count as exact.
    tol = align_snapshots(BARS, SNAPS, mode="exact", exact_tolerance_s=120)
    check(tol,
          snapshot=[-1, 1, 2, -1, 3, -1, 4, -1, -1, -1, -1, 5],
          lag=[NAN, 0, 0, NAN, 120, NAN, 120, NAN, NAN, NAN, NAN, 0],
          status=["none", "exact", "exact", "none", "exact", "none", "exact"] + ["none"] * 4 + ["exact"],
          conf=[0, 1, 1, 0, A, 0, A, 0, 0, 0, 0, 1])
    # Just under 120 s: those two bars drop out again.
    assert align_snapshots(BARS, SNAPS, mode="exact", exact_tolerance_s=119.999).usable().sum() == 3


def test_prior_mode_tolerance_marks_exact():
    result = align_snapshots(BARS, SNAPS, mode="prior", exact_tolerance_s=120, fail_fast=False)
    np.testing.assert_array_equal(result.status, codes(
        "none", "exact", "exact", "prior", "exact", "prior", "exact", "prior", "none", "none", "none", "exact"))
    with pytest.raises(ValueError, match="exceeds the lag limit"):
        align_snapshots(BARS, SNAPS, mode="prior", exact_tolerance_s=601)


def test_none_mode_ignores_lag_but_measures_it():
    result = align_snapshots(BARS, SNAPS, mode="none", symbol="SPY", fail_fast=True)   # never fails
    check(result,
          snapshot=[-1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5],
          lag=[NAN, 0, 0, 300, 120, 420, 120, 420, 720, 1020, 1320, 0],
          status=["none", "exact", "exact", "prior", "prior", "prior", "prior", "prior",
                  "prior", "prior", "prior", "exact"],
          conf=[0] + [1] * 11)
    d = result.diagnostics()
    assert d["lag_s"]["max"] == 1320.0 and d["beyond_limit"] == 3
    assert d["counts"] == {"none": 1, "exact": 3, "prior": 8, "stale": 0}


def test_per_symbol_limit_changes_status_and_fail_fast():
    # The 10:15 bar's snapshot is 720 s old: too old for SPY (600 s), fine for SPX (900 s).
    spy = align_snapshots(BARS, SNAPS, mode="prior", symbol="SPY", fail_fast=False)
    spx = align_snapshots(BARS, SNAPS, mode="prior", symbol="SPX", fail_fast=False)
    bar = BARS.get_loc(pd.Timestamp(f"{DAY} 10:15", tz=NY))
    assert STATUS_NAMES[spy.status[bar]] == "none" and spy.snapshot[bar] == -1
    assert STATUS_NAMES[spx.status[bar]] == "prior" and spx.snapshot[bar] == 4
    assert spx.lag_s[bar] == 720.0 and spx.iv_conf[bar] == pytest.approx(0.5 ** 2.4, rel=1e-15)
    assert spx.lag_limit_s == 900.0
    stale_spx = align_snapshots(BARS, SNAPS, mode="stale", symbol="SPXW", fail_fast=False)
    np.testing.assert_array_equal(stale_spx.status[8:11], codes("prior", "stale", "stale"))
    # An override beats the table.
    override = align_snapshots(BARS, SNAPS, mode="prior", symbol="SPY", max_lag_s=720, fail_fast=False)
    assert override.lag_limit_s == 720.0 and STATUS_NAMES[override.status[bar]] == "prior"
    # Stale rate: SPY 3 of 11 bars with a snapshot (27 %) fails, SPX 2 of 11 (18 %) passes.
    with pytest.raises(DataError):
        align_snapshots(BARS, SNAPS, mode="prior", symbol="SPY")
    assert align_snapshots(BARS, SNAPS, mode="prior", symbol="SPX").usable().sum() == 9


def test_one_nanosecond_after_the_bar_is_never_used():
    bar = pd.Timestamp(f"{DAY} 10:00", tz=NY).value
    snaps = np.array([bar - 600 * 10**9, bar + 1], dtype=np.int64)
    for mode in ALIGNMENT_MODES:
        result = align_snapshots(np.array([bar]), snaps, mode=mode, fail_fast=False)
        if mode == "exact":
            assert result.snapshot[0] == -1
        else:
            assert result.snapshot[0] == 0 and result.lag_s[0] == 600.0
        assert result.raw_lag_s[0] == 600.0
    only_future = align_snapshots(np.array([bar]), np.array([bar + 1]), mode="none")
    assert only_future.snapshot[0] == -1 and np.isnan(only_future.lag_s[0])
    assert only_future.iv_conf[0] == 0.0 and STATUS_NAMES[only_future.status[0]] == "none"
    # The snapshot stamped exactly at the bar is allowed.
    at_bar = align_snapshots(np.array([bar]), np.array([bar]), mode="exact")
    assert at_bar.snapshot[0] == 0 and at_bar.lag_s[0] == 0.0


def test_never_looks_ahead_on_random_times():
    rng = np.random.default_rng(7)
    start = pd.Timestamp(f"{DAY} 09:30", tz=NY).value
    bars = start + np.sort(rng.integers(0, 6_000 * 10**9, 500))
    snaps = np.unique(start + rng.integers(0, 6_000 * 10**9, 80))
    for mode in ("prior", "stale", "none"):
        result = align_snapshots(bars, snaps, mode=mode, fail_fast=False)
        used = result.usable()
        assert (snaps[result.snapshot[used]] <= bars[used]).all()
        for i in range(bars.size):                    # brute force on a small case
            earlier = np.flatnonzero(snaps <= bars[i])
            expected = earlier[-1] if earlier.size else -1
            if used[i]:
                assert result.snapshot[i] == expected
                assert result.lag_s[i] == (bars[i] - snaps[expected]) / 1e9
            else:
                assert expected == -1 or (mode == "prior" and result.raw_lag_s[i] > 600)


def _hourly(lags_s, n_before=0):
    """Bars an hour apart, each with its own snapshot ``lag`` seconds before it; ``n_before`` extra
    bars come before the first snapshot."""
    t0 = pd.Timestamp("2024-03-04 10:00", tz=NY).value
    hour = 3600 * 10**9
    bars = t0 + hour * np.arange(n_before + len(lags_s), dtype=np.int64)
    snaps = bars[n_before:] - np.asarray(lags_s, dtype=np.int64) * 10**9
    return bars, snaps


@pytest.mark.parametrize("mode", ["prior", "stale"])
def test_fail_fast_threshold(mode):
    ok_bars, ok_snaps = _hourly([0] * 8 + [700, 700])           # exactly 20 %: passes
    result = align_snapshots(ok_bars, ok_snaps, mode=mode)
    assert result.diagnostics()["stale_rate_pct"] == pytest.approx(20.0)
    bad_bars, bad_snaps = _hourly([0] * 7 + [700, 650, 800])    # 30 %: raises
    with pytest.raises(DataError) as info:
        align_snapshots(bad_bars, bad_snaps, mode=mode)
    message = str(info.value)
    assert "30.0 %" in message and "20.0 %" in message
    assert "lag limit 600 s" in message and "worst lag 800 s" in message
    assert "first stale bar 2024-03-04 17:00:00-05:00" in message
    assert "SPY" in message and mode in message
    # Without fail-fast the same data aligns.
    assert align_snapshots(bad_bars, bad_snaps, mode=mode, fail_fast=False).stale_rate() == (3, 10)
    # A custom rate.
    align_snapshots(bad_bars, bad_snaps, mode=mode, stale_fail_rate=0.3)
    # Modes without lag accounting never fail.
    align_snapshots(bad_bars, bad_snaps, mode="none")
    align_snapshots(bad_bars, bad_snaps, mode="exact")


def test_fail_fast_denominator_is_bars_with_a_snapshot():
    # 3 stale of 10 bars with a snapshot (30 %) raises, although 3 of all 15 bars would be 20 %.
    bars, snaps = _hourly([0] * 7 + [700] * 3, n_before=5)
    with pytest.raises(DataError, match="3 of 10 bars"):
        align_snapshots(bars, snaps, mode="prior")
    result = align_snapshots(bars, snaps, mode="prior", fail_fast=False)
    assert result.counts() == {"none": 8, "exact": 7, "prior": 0, "stale": 0}


def test_fail_fast_when_no_bar_has_a_snapshot():
    bars = BARS_NS
    with pytest.raises(DataError, match="no snapshots"):
        align_snapshots(bars, np.array([], dtype=np.int64), mode="prior")
    with pytest.raises(DataError, match="after the last bar"):
        align_snapshots(bars, np.array([bars[-1] + 1]), mode="stale")
    empty = align_snapshots(bars, np.array([], dtype=np.int64), mode="none")
    assert (empty.snapshot == -1).all() and (empty.iv_conf == 0).all()
    assert align_snapshots(np.array([], dtype=np.int64), SNAPS, mode="prior").diagnostics()["bars"] == 0


def test_bad_snapshot_times_name_the_position():
    t = SNAPS_NS
    with pytest.raises(DataError, match="duplicate time at position 3"):
        align_snapshots(BARS, np.array([t[0], t[1], t[2], t[2], t[3]]))
    with pytest.raises(DataError, match="out of order time at position 2"):
        align_snapshots(BARS, np.array([t[0], t[2], t[1], t[3]]))
    with pytest.raises(DataError, match="out of order time at position 1"):
        align_snapshots(BARS, SNAPS[::-1])
    with pytest.raises(DataError, match="tz-naive"):
        align_snapshots(BARS, SNAPS.tz_localize(None))
    with pytest.raises(DataError, match="tz-naive"):
        align_snapshots(BARS.tz_localize(None), SNAPS)
    with pytest.raises(DataError, match="NaT.*position 1"):
        align_snapshots(BARS, pd.DatetimeIndex([SNAPS[0], pd.NaT], tz=NY))
    with pytest.raises(DataError, match="float64"):
        align_snapshots(BARS, np.array([1.5, 2.5]))
    with pytest.raises(ValueError, match="mode"):
        align_snapshots(BARS, SNAPS, mode="nearest")
    # Microseconds passed as nanoseconds (pandas 3: asi8 follows the index's unit).
    with pytest.raises(DataError, match="position 0 is not nanoseconds"):
        align_snapshots(BARS.as_unit("us").asi8, SNAPS)
    with pytest.raises(DataError, match="snapshot times: integer time 7 at position 2"):
        align_snapshots(BARS, np.array([SNAPS_NS[0], SNAPS_NS[1], 7]))


def test_diagnostics_match_hand_computation():
    result = align_snapshots(BARS, SNAPS, mode="prior", symbol="SPY", fail_fast=False)
    d = result.diagnostics()
    json.dumps(d)                                                   # JSON-ready
    assert d["mode"] == "prior" and d["symbol"] == "SPY" and d["lag_limit_s"] == 600.0
    assert d["bars"] == 12 and d["snapshots"] == 6 and d["snapshots_used"] == 5   # 09:36:30 never used
    assert d["counts"] == {"none": 4, "exact": 3, "prior": 5, "stale": 0}
    assert d["pct"] == {"none": 100 * 4 / 12, "exact": 25.0, "prior": 100 * 5 / 12, "stale": 0.0}
    assert d["exact_match_pct"] == 25.0
    assert d["usable"] == 8 and d["usable_pct"] == pytest.approx(100 * 8 / 12)
    assert d["before_first_snapshot"] == 1 and d["beyond_limit"] == 3
    assert d["stale_rate_pct"] == pytest.approx(100 * 3 / 11)
    # Used lags, sorted: 0 0 0 120 120 300 420 420 (linear-interpolated quantiles).
    assert d["lag_s"] == {"p50": 120.0, "p90": 420.0, "p99": 420.0, "max": 420.0, "mean": 1380 / 8}
    # Every latest-snapshot lag, sorted: 0 0 0 120 120 300 420 420 720 1020 1320.
    raw = d["raw_lag_s"]
    assert (raw["p50"], raw["p90"], raw["max"]) == (300.0, 1020.0, 1320.0)
    assert raw["p99"] == pytest.approx(1020 + 0.9 * 300)
    assert raw["mean"] == pytest.approx(4440 / 11)
    # iv_conf over the used bars: 1 1 1 0.5 A A B B.
    assert d["iv_conf"]["mean"] == pytest.approx((3 + 0.5 + 2 * A + 2 * B) / 8, rel=1e-14)
    assert d["iv_conf"]["min"] == pytest.approx(B, rel=1e-14)
    assert d["iv_conf"]["p10"] == pytest.approx(B, rel=1e-14)
    lines = result.summary_lines()
    text = "\n".join(lines)
    assert "SPY, mode prior, lag limit 600 s" in lines[0]
    assert "exact 3 (25.0 %)" in text and "none 4 (33.3 %)" in text
    assert "p50 120, p90 420, p99 420, max 420" in text
    assert "3 of 11 bars (27.3 %)" in text and "worst lag 1,320 s" in text


def test_diagnostics_without_usable_bars():
    result = align_snapshots(BARS[:1], SNAPS, mode="exact")
    d = result.diagnostics()
    json.dumps(d)
    assert d["usable"] == 0 and d["lag_s"]["p50"] is None and d["iv_conf"]["mean"] is None
    assert result.summary_lines()[2].endswith("p50 n/a, p90 n/a, p99 n/a, max n/a")


def test_time_inputs_are_equivalent():
    base = align_snapshots(BARS_NS, SNAPS_NS, mode="stale", fail_fast=False)
    variants = [
        (BARS, SNAPS),
        (BARS.tz_convert("UTC"), SNAPS.tz_convert("Europe/London")),
        (pd.Series(BARS), pd.Series(SNAPS)),
        (list(BARS), pa.array(SNAPS)),
        (BARS.as_unit("s"), pa.chunked_array([pa.array(SNAPS[:3]), pa.array(SNAPS[3:])])),
        (BARS_NS.tolist(), pd.Series(SNAPS_NS)),
    ]
    for bars, snaps in variants:
        other = align_snapshots(bars, snaps, mode="stale", fail_fast=False)
        for name in ("snapshot", "lag_s", "status", "iv_conf", "raw_lag_s"):
            np.testing.assert_array_equal(getattr(other, name), getattr(base, name))
    with pytest.raises(DataError, match="tz-naive"):
        align_snapshots(BARS, pa.array(SNAPS.tz_localize(None)))


def test_bars_in_any_order():
    order = np.random.default_rng(3).permutation(len(BARS))
    shuffled = align_snapshots(BARS[order], SNAPS, mode="stale", fail_fast=False)
    base = align_snapshots(BARS, SNAPS, mode="stale", fail_fast=False)
    np.testing.assert_array_equal(shuffled.snapshot, base.snapshot[order])
    np.testing.assert_array_equal(shuffled.status, base.status[order])


def test_result_arrays_are_read_only():
    result = align_snapshots(BARS, SNAPS, mode="prior", fail_fast=False)
    with pytest.raises(ValueError):
        result.snapshot[0] = 3
    assert result.snapshot.dtype == np.int64 and result.lag_s.dtype == np.float64
    assert result.iv_conf.dtype == np.float64 and len(result) == 12


def test_full_session_and_large_input():
    # 78 five-minute bars, a snapshot 2 minutes before every third bar: lags 120, 420, 720, ...
    bars = pd.date_range(f"{DAY} 09:35", f"{DAY} 16:00", freq="5min", tz=NY)
    snaps = bars[::3] - pd.Timedelta(minutes=2)
    result = align_snapshots(bars, snaps, mode="stale", fail_fast=False)
    np.testing.assert_array_equal(result.lag_s, np.tile([120.0, 420.0, 720.0], 26))
    np.testing.assert_array_equal(result.snapshot, np.repeat(np.arange(26), 3))
    assert result.counts() == {"none": 0, "exact": 0, "prior": 52, "stale": 26}
    with pytest.raises(DataError, match=r"26 of 78 bars .*33\.3 %.*first stale bar 2024-03-05 09:45:00-05:00"):
        align_snapshots(bars, snaps, mode="prior")
    # A year of one-minute bars against irregular snapshots: one vectorised pass.
    t0 = pd.Timestamp("2024-01-02 09:31", tz=NY).value
    many_bars = t0 + 60 * 10**9 * np.arange(100_000, dtype=np.int64)
    many_snaps = np.unique(t0 + np.random.default_rng(1).integers(-60, 6_000_000, 40_000) * 10**9)
    big = align_snapshots(many_bars, many_snaps, mode="stale", fail_fast=False)
    used = big.usable()
    assert used.sum() > 99_000
    assert (many_snaps[big.snapshot[used]] <= many_bars[used]).all()
    assert (big.lag_s[used] >= 0).all()


def test_row_confidence():
    bar = pd.Timestamp(f"{DAY} 10:00", tz=NY)
    quotes = np.array([bar.value, bar.value - 300 * 10**9, bar.value - 600 * 10**9])
    age, conf = row_confidence(quotes, bar.value)
    np.testing.assert_array_equal(age, [0.0, 300.0, 600.0])
    np.testing.assert_allclose(conf, [1.0, 0.5, 0.25], rtol=1e-15)
    age2, conf2 = row_confidence(pd.DatetimeIndex(quotes, tz="UTC"), bar)
    np.testing.assert_array_equal(age2, age)
    with pytest.raises(DataError, match="row 1 is quoted at 2024-03-05 10:00:00.000000001-05:00.*look-ahead"):
        row_confidence(np.array([bar.value, bar.value + 1, bar.value + 2]), bar.value)
