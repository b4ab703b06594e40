"""Regime classifier: every branch, the precedence, warm-up NaNs and threshold validation."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import FiltersConfig, RegimeConfig
from intelligence.regime_filter import Regime, classify_regime, regime_names

BULL_STACK = {"close": 110.0, "sma_fast": 105.0, "sma_slow": 100.0}
BEAR_STACK = {"close": 90.0, "sma_fast": 95.0, "sma_slow": 100.0}
FLAT_STACK = {"close": 100.0, "sma_fast": 100.0, "sma_slow": 100.0}


def classify(adx, vix, stack, **thresholds):
    return classify_regime(adx, vix, stack["close"], stack["sma_fast"], stack["sma_slow"], **thresholds)


@pytest.mark.parametrize(
    ("adx", "vix", "stack", "expected"),
    [
        # CRASH_MODE beats everything, including a perfect trend alignment
        (30, 40, BULL_STACK, Regime.CRASH_MODE),
        (30, 35, BEAR_STACK, Regime.CRASH_MODE),
        (10, 35, FLAT_STACK, Regime.CRASH_MODE),
        (30, 34.99, BULL_STACK, Regime.BULL_TREND),
        # trends need ADX >= 25 and a strict stack
        (25, 15, BULL_STACK, Regime.BULL_TREND),
        (25, 25, BULL_STACK, Regime.BULL_TREND),  # trend beats HIGH_VOL_RANGE
        (24.99, 15, BULL_STACK, Regime.LOW_VOL_RANGE),
        (25, 15, BEAR_STACK, Regime.BEAR_TREND),
        (40, 25, BEAR_STACK, Regime.BEAR_TREND),
        (24.99, 25, BEAR_STACK, Regime.HIGH_VOL_RANGE),
        # ranges
        (30, 20, FLAT_STACK, Regime.HIGH_VOL_RANGE),
        (30, 19.99, FLAT_STACK, Regime.LOW_VOL_RANGE),
        (10, 12, FLAT_STACK, Regime.LOW_VOL_RANGE),
        # mixed stacks are not trends
        (30, 15, {"close": 110.0, "sma_fast": 95.0, "sma_slow": 100.0}, Regime.LOW_VOL_RANGE),
        (30, 15, {"close": 98.0, "sma_fast": 105.0, "sma_slow": 100.0}, Regime.LOW_VOL_RANGE),
        (30, 15, {"close": 105.0, "sma_fast": 105.0, "sma_slow": 100.0}, Regime.LOW_VOL_RANGE),
        (30, 22, {"close": 90.0, "sma_fast": 95.0, "sma_slow": 95.0}, Regime.HIGH_VOL_RANGE),
    ],
)
def test_branches_and_precedence(adx, vix, stack, expected):
    code = classify(adx, vix, stack)
    assert code.dtype == np.int8 and code.shape == ()
    assert Regime(int(code)) is expected


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(5)
    n = 400
    adx = rng.uniform(10, 45, n)
    vix = rng.uniform(9, 45, n)
    close = rng.uniform(95, 105, n)
    fast = rng.uniform(95, 105, n)
    slow = rng.uniform(95, 105, n)
    codes = classify_regime(adx, vix, close, fast, slow)
    assert codes.shape == (n,) and codes.dtype == np.int8
    one_by_one = [int(classify_regime(*row)) for row in zip(adx, vix, close, fast, slow, strict=True)]
    np.testing.assert_array_equal(codes, one_by_one)
    assert set(np.unique(codes)) == {int(r) for r in Regime if r is not Regime.UNKNOWN}


def test_hand_written_rules_on_random_bars():
    rng = np.random.default_rng(9)
    adx, vix = rng.uniform(10, 45, 300), rng.uniform(9, 45, 300)
    close, fast, slow = (rng.uniform(95, 105, 300) for _ in range(3))
    codes = classify_regime(adx, vix, close, fast, slow)
    for i in range(300):
        if vix[i] >= 35:
            want = Regime.CRASH_MODE
        elif adx[i] >= 25 and close[i] > fast[i] > slow[i]:
            want = Regime.BULL_TREND
        elif adx[i] >= 25 and close[i] < fast[i] < slow[i]:
            want = Regime.BEAR_TREND
        elif vix[i] >= 20:
            want = Regime.HIGH_VOL_RANGE
        else:
            want = Regime.LOW_VOL_RANGE
        assert codes[i] == want, i


def test_non_default_thresholds():
    assert classify(20, 15, BULL_STACK, trend_adx=20) == Regime.BULL_TREND
    assert classify(20, 15, BULL_STACK) == Regime.LOW_VOL_RANGE
    assert classify(30, 30, FLAT_STACK, crash_vix=30, high_vol_vix=18) == Regime.CRASH_MODE
    assert classify(30, 18, FLAT_STACK, crash_vix=30, high_vol_vix=18) == Regime.HIGH_VOL_RANGE
    assert classify(30, 17.9, FLAT_STACK, crash_vix=30, high_vol_vix=18) == Regime.LOW_VOL_RANGE


def test_defaults_match_the_config():
    config = RegimeConfig()
    for name in ("trend_adx", "crash_vix"):
        assert classify_regime.__kwdefaults__[name] == getattr(config, name)
    # the high-vol boundary is the Phase-3 filter setting filters.vix_threshold_low
    assert classify_regime.__kwdefaults__["high_vol_vix"] == FiltersConfig().vix_threshold_low


def test_warm_up_nan_is_unknown_except_a_known_crash():
    nan = np.nan
    adx = np.array([nan, 30, 30, 30, 30, nan, 30])
    vix = np.array([15, nan, 15, 15, 15, 40, nan])
    close = np.array([110, 110, nan, 110, 110, 110, 110])
    fast = np.array([105, 105, 105, nan, 105, nan, 105])
    slow = np.array([100, 100, 100, 100, nan, nan, 100])
    codes = classify_regime(adx, vix, close, fast, slow)
    assert list(codes) == [Regime.UNKNOWN] * 5 + [Regime.CRASH_MODE, Regime.UNKNOWN]
    assert Regime.UNKNOWN == -1


def test_inputs_broadcast():
    codes = classify_regime(np.array([10.0, 30.0]), 15.0, 110.0, 105.0, 100.0)
    np.testing.assert_array_equal(codes, [Regime.LOW_VOL_RANGE, Regime.BULL_TREND])
    with pytest.raises(ValueError, match="do not broadcast"):
        classify_regime(np.zeros(2), np.zeros(3), 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"high_vol_vix": 35.0}, "high_vol_vix=35.0 must be less than crash_vix=35.0"),
        ({"high_vol_vix": 40.0, "crash_vix": 30.0}, "high_vol_vix"),
        ({"trend_adx": -1.0}, "trend_adx must be >= 0"),
        ({"crash_vix": -5.0, "high_vol_vix": -10.0}, "crash_vix must be >= 0"),
        ({"high_vol_vix": -1.0}, "high_vol_vix must be >= 0"),
        ({"trend_adx": float("nan")}, "trend_adx must be a finite number"),
        ({"crash_vix": float("inf")}, "crash_vix must be a finite number"),
    ],
)
def test_bad_thresholds_name_the_argument(thresholds, message):
    with pytest.raises(ValueError, match=message):
        classify(30, 15, BULL_STACK, **thresholds)


def test_regime_names():
    codes = np.array([0, 1, 2, 3, 4, -1], dtype=np.int8)
    names = regime_names(codes)
    assert names.dtype == object
    assert list(names) == [
        "BULL_TREND", "BEAR_TREND", "HIGH_VOL_RANGE", "LOW_VOL_RANGE", "CRASH_MODE", "UNKNOWN",
    ]
    assert list(regime_names(codes.astype(float))) == list(names)  # float feature columns
    assert regime_names(np.int8(4)) == "CRASH_MODE"
    assert regime_names(codes.reshape(2, 3)).shape == (2, 3)
    for regime in Regime:
        assert regime_names(int(regime)) == regime.name


@pytest.mark.parametrize("codes", [np.array([5]), np.array([-2]), np.array([np.nan]), np.array([1.5]),
                                   np.array(["BULL_TREND"])])
def test_regime_names_rejects_unknown_codes(codes):
    with pytest.raises(ValueError, match="regime_names"):
        regime_names(codes)
