"""The ten §6 membership functions against the seed's formulas written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.config import FUZZY_FACTORS
from intelligence import fuzzifier as fz

TOL = 1e-12


def approx(value: float) -> object:
    return pytest.approx(value, abs=TOL)


# --------------------------------------------------------------------------------------------
# the seed's own numbers, breakpoints and just inside / outside them


@pytest.mark.parametrize(
    ("consensus", "expected"),
    [(0.5, 1.0), (0.0, 0.0), (1.0, 0.0), (0.25, 0.5), (0.75, 0.5), (0.6, 0.8),
     (-0.1, 0.0), (1.2, 0.0)],
)
def test_mtf(consensus, expected):
    assert fz.mtf_membership(consensus) == approx(expected)
    if 0 <= consensus <= 1:
        assert fz.mtf_membership(consensus) == approx(1 - abs(consensus - 0.5) * 2)


@pytest.mark.parametrize(
    ("ivr", "expected"),
    [(60, 1.0), (59, 59 / 60), (61, 1.0), (100, 1.0), (30, 0.5), (0, 0.0), (-5, 0.0)],
)
def test_iv_rank(ivr, expected):
    assert fz.iv_rank_membership(ivr) == approx(expected)


@pytest.mark.parametrize(
    ("vix", "expected"),
    [(12, 1.0), (11.9, 1.0), (5, 1.0), (0, 1.0), (12.1, 1 - 0.1 / 18), (20, 1 - 8 / 18),
     (29.9, 1 - 17.9 / 18), (30, 0.0), (30.1, 0.0), (80, 0.0)],
)
def test_vix(vix, expected):
    assert fz.vix_membership(vix) == approx(expected)


def test_vix_20_is_the_seeds_0_56():
    assert fz.vix_membership(20) == pytest.approx(0.5556, abs=5e-5)


@pytest.mark.parametrize(
    ("rsi", "expected"),
    [(40, 1.0), (50, 1.0), (60, 1.0), (39, 0.975), (61, 0.975), (20, 0.5), (80, 0.5),
     (30, 30 / 40), (70, 30 / 40), (0, 0.0), (100, 0.0), (-1, 0.0), (101, 0.0)],
)
def test_rsi(rsi, expected):
    assert fz.rsi_membership(rsi) == approx(expected)
    if 0 <= rsi < 40:
        assert fz.rsi_membership(rsi) == approx(rsi / 40)
    elif 60 < rsi <= 100:
        assert fz.rsi_membership(rsi) == approx((100 - rsi) / 40)


@pytest.mark.parametrize(
    ("adx", "expected"),
    [(25, 1.0), (24.9, 1.0), (10, 1.0), (25.1, 1 - 0.1 / 15), (32.5, 0.5), (39.9, 1 - 14.9 / 15),
     (40, 0.0), (40.1, 0.0), (70, 0.0)],
)
def test_adx(adx, expected):
    assert fz.adx_membership(adx) == approx(expected)


@pytest.mark.parametrize(
    ("position", "width", "expected"),
    [
        (0.5, 0.0, 1.0),
        (0.5, 0.04, 0.7),
        (0.5, 0.05, 0.7),  # width term floored at 0
        (0.5, 0.02, 0.7 + 0.3 * 0.5),
        (0.0, 0.0, 0.3),
        (1.0, 0.0, 0.3),
        (0.25, 0.02, 0.7 * 0.5 + 0.3 * 0.5),
        (0.95, 0.01, 0.7 * (1 - 0.45 * 2) + 0.3 * (1 - 0.01 / 0.04)),
        (1.3, 0.02, 0.3 * 0.5),  # outside the bands: position term floored at 0, not -0.42
        (-0.2, 0.05, 0.0),
    ],
)
def test_bollinger(position, width, expected):
    assert fz.bollinger_membership(position, width) == approx(expected)


@pytest.mark.parametrize(
    ("k", "expected"),
    [(30, 1.0), (50, 1.0), (70, 1.0), (29, 29 / 30), (71, 29 / 30), (15, 0.5), (85, 0.5),
     (20, 20 / 30), (80, 20 / 30), (0, 0.0), (100, 0.0), (-3, 0.0), (103, 0.0)],
)
def test_stochastic(k, expected):
    assert fz.stochastic_membership(k) == approx(expected)


@pytest.mark.parametrize(
    ("position", "expected"),
    [(0.0, 1.0), (1.0, 0.0), (-1.0, 0.0), (0.3, 0.7), (-0.3, 0.7), (1.5, 0.0)],
)
def test_psar(position, expected):
    assert fz.psar_membership(position) == approx(expected)


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.8, 1.0), (0.79, 0.79 / 0.8), (0.81, 1.0), (3.0, 1.0), (0.4, 0.5), (0.0, 0.0), (-1, 0.0)],
)
def test_volume(ratio, expected):
    assert fz.volume_membership(ratio) == approx(expected)


@pytest.mark.parametrize(
    ("distance", "expected"),
    [(0.0, 1.0), (0.01, 0.5), (-0.01, 0.5), (0.02, 0.0), (-0.02, 0.0), (0.019, 0.05),
     (0.021, 0.0), (-0.5, 0.0)],
)
def test_sma_distance(distance, expected):
    assert fz.sma_distance_membership(distance) == approx(expected)


# --------------------------------------------------------------------------------------------
# shared behaviour of all ten


ONE_INPUT = {
    "mtf": (fz.mtf_membership, np.linspace(-0.2, 1.2, 57)),
    "iv": (fz.iv_rank_membership, np.linspace(-10, 110, 61)),
    "regime": (fz.vix_membership, np.linspace(0, 60, 61)),
    "rsi": (fz.rsi_membership, np.linspace(-5, 105, 111)),
    "adx": (fz.adx_membership, np.linspace(0, 60, 61)),
    "stoch": (fz.stochastic_membership, np.linspace(-5, 105, 111)),
    "psar": (fz.psar_membership, np.linspace(-1.5, 1.5, 31)),
    "volume": (fz.volume_membership, np.linspace(-0.5, 3, 36)),
    "sma": (fz.sma_distance_membership, np.linspace(-0.05, 0.05, 41)),
}


@pytest.mark.parametrize("key", sorted(ONE_INPUT))
def test_vectorised_equals_scalar_and_stays_in_unit_interval(key):
    function, grid = ONE_INPUT[key]
    vector = function(grid)
    assert isinstance(vector, np.ndarray) and vector.shape == grid.shape
    assert vector.dtype == np.float64
    scalars = np.array([function(float(x)) for x in grid])
    np.testing.assert_array_equal(vector, scalars)
    assert np.all((vector >= 0) & (vector <= 1))
    assert type(function(float(grid[0]))) is float
    assert function(grid.reshape(-1, 1)).shape == (grid.size, 1)


def test_bollinger_vectorised_equals_scalar_and_broadcasts():
    positions = np.linspace(-0.3, 1.3, 17)
    widths = np.linspace(0, 0.06, 17)
    vector = fz.bollinger_membership(positions, widths)
    scalars = np.array([fz.bollinger_membership(p, w) for p, w in zip(positions, widths, strict=True)])
    np.testing.assert_array_equal(vector, scalars)
    assert np.all((vector >= 0) & (vector <= 1))
    assert fz.bollinger_membership(positions, 0.0).shape == positions.shape
    with pytest.raises(ValueError, match="do not broadcast"):
        fz.bollinger_membership(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("key", sorted(ONE_INPUT))
def test_nan_in_nan_out(key):
    function, _ = ONE_INPUT[key]
    out = function(np.array([np.nan, 0.5, np.nan]))
    assert np.isnan(out[0]) and np.isnan(out[2]) and not np.isnan(out[1])
    assert math.isnan(function(float("nan")))


def test_bollinger_nan_in_either_input():
    out = fz.bollinger_membership(np.array([np.nan, 0.5, 0.5]), np.array([0.0, np.nan, 0.0]))
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2] == 1.0


def test_infinities_are_large_numbers_not_nan():
    assert fz.vix_membership(np.inf) == 0.0 and fz.vix_membership(-np.inf) == 1.0
    assert fz.rsi_membership(np.inf) == 0.0
    assert fz.iv_rank_membership(np.inf) == 1.0
    assert fz.sma_distance_membership(-np.inf) == 0.0


def test_empty_arrays():
    for function, _ in ONE_INPUT.values():
        assert function(np.array([])).shape == (0,)


# --------------------------------------------------------------------------------------------
# non-default breakpoints


def test_non_default_breakpoints():
    assert fz.iv_rank_membership(25, full=50) == approx(0.5)
    assert fz.vix_membership(20, calm=15, panic=25) == approx(0.5)
    assert fz.vix_membership(15, calm=15, panic=25) == approx(1.0)
    assert fz.rsi_membership(15, neutral_low=30, neutral_high=80) == approx(15 / 30)
    assert fz.rsi_membership(90, neutral_low=30, neutral_high=80) == approx(10 / 20)
    assert fz.rsi_membership(75, neutral_low=30, neutral_high=80) == approx(1.0)
    assert fz.adx_membership(30, low=20, high=40) == approx(0.5)
    assert fz.bollinger_membership(0.5, 0.05, position_share=0.5, width_zero=0.1) == approx(0.75)
    assert fz.bollinger_membership(0.0, 0.0, position_share=1.0) == approx(0.0)
    assert fz.stochastic_membership(10, neutral_low=20, neutral_high=90) == approx(0.5)
    assert fz.stochastic_membership(95, neutral_low=20, neutral_high=90) == approx(0.5)
    assert fz.volume_membership(0.5, full=1.0) == approx(0.5)
    assert fz.sma_distance_membership(0.025, zero=0.05) == approx(0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fz.iv_rank_membership(1, full=0), "full must be > 0"),
        (lambda: fz.vix_membership(1, calm=30, panic=12), "calm=30 must be less than panic=12"),
        (lambda: fz.vix_membership(1, calm=20, panic=20), "calm"),
        (lambda: fz.adx_membership(1, low=float("nan")), "low must be a finite number"),
        (lambda: fz.rsi_membership(1, neutral_low=60, neutral_high=40), "neutral_low=60"),
        (lambda: fz.rsi_membership(1, neutral_low=0, neutral_high=40), "0 < neutral_low"),
        (lambda: fz.stochastic_membership(1, neutral_low=30, neutral_high=100), "neutral_high"),
        (lambda: fz.bollinger_membership(0.5, 0, position_share=1.5), "position_share"),
        (lambda: fz.bollinger_membership(0.5, 0, width_zero=-0.04), "width_zero"),
        (lambda: fz.volume_membership(1, full=-1), "full"),
        (lambda: fz.sma_distance_membership(0, zero=0), "zero"),
        (lambda: fz.psar_membership("abc"), "psar_membership"),
    ],
)
def test_bad_breakpoints_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_membership_functions_cover_the_ten_factor_keys():
    assert tuple(fz.MEMBERSHIP_FUNCTIONS) == FUZZY_FACTORS
    assert "vix_membership" in fz.MEMBERSHIP_FUNCTIONS["regime"]
    for key, description in fz.MEMBERSHIP_FUNCTIONS.items():
        function_name = description.split(":")[0]
        assert callable(getattr(fz, function_name)), key
