"""Tests for analytics.gaps: gap size, the 0.19 % small-gap rule at its boundary, the ±0.01 %
direction rule at its boundary, scalars vs arrays, bad previous closes and session_gaps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analytics.gaps import (
    GAP_DOWN,
    GAP_UP,
    NO_GAP,
    gap_direction,
    gap_pct,
    is_small_gap,
    session_gaps,
)

NAN = float("nan")


def test_seed_example():
    assert gap_pct(open_price=580.5, prev_close=580.0) == pytest.approx(0.5 / 580.0)
    assert bool(is_small_gap(open_price=580.5, prev_close=580.0))  # 0.086 %
    assert gap_direction(580.5, 580.0) == GAP_UP


@pytest.mark.parametrize("prev_close, open_price", [
    (580.0, 581.102), (580.0, 578.898), (100.0, 100.19), (100.0, 99.81),
    # these two round to a hair *above* 0.0019 in floating point
    (123.45, 123.684555), (99.99, 100.179981),
])
def test_gap_of_exactly_019_percent_is_small(prev_close, open_price):
    assert gap_pct(open_price, prev_close) == pytest.approx(0.0019, rel=1e-9)
    assert bool(is_small_gap(open_price, prev_close))


@pytest.mark.parametrize("prev_close, open_price", [
    (580.0, 581.103), (580.0, 578.897), (100.0, 100.2), (100.0, 99.8),
])
def test_gap_just_above_019_percent_is_large(prev_close, open_price):
    assert not bool(is_small_gap(open_price, prev_close))


def test_direction_boundaries():
    prev = np.full(8, 100.0)
    opens = np.array([100.01, 99.99, 100.0101, 99.9899, 100.0, 100.005, 101.0, 95.0])
    direction = gap_direction(opens, prev)
    assert direction.dtype == np.int8
    np.testing.assert_array_equal(direction, [NO_GAP, NO_GAP, GAP_UP, GAP_DOWN, NO_GAP, NO_GAP,
                                              GAP_UP, GAP_DOWN])
    assert gap_direction(580.058, 580.0) == NO_GAP and gap_direction(580.06, 580.0) == GAP_UP
    assert gap_direction(100.5, 100.0, tolerance=0.01) == NO_GAP


def test_arrays_broadcast_and_bad_previous_close():
    np.testing.assert_allclose(gap_pct([101.0, 99.0, 100.0], 100.0), [0.01, 0.01, 0.0])
    result = gap_pct([101.0, 101.0, 101.0], [0.0, -5.0, NAN])
    assert np.isnan(result).all()
    np.testing.assert_array_equal(is_small_gap([101.0, 100.1], [NAN, 100.0]), [False, True])
    np.testing.assert_array_equal(gap_direction([101.0, NAN], [0.0, 100.0]), [NO_GAP, NO_GAP])
    assert np.ndim(gap_pct(101.0, 100.0)) == 0 and np.ndim(gap_direction(101.0, 100.0)) == 0
    assert bool(is_small_gap(100.3, 100.0, threshold=0.005))


def test_session_gaps_frame():
    index = pd.date_range("2018-01-02", periods=4, freq="B", tz="America/New_York")
    opens = pd.Series([268.0, 269.0, 268.0, 272.0], index=index)
    prev_close = pd.Series([NAN, 268.77, 268.2, 270.0], index=index)
    frame = session_gaps(opens, prev_close)
    assert list(frame.columns) == ["gap_pct", "is_small_gap", "gap_direction"]
    assert frame.index.equals(index)
    np.testing.assert_allclose(frame["gap_pct"], [NAN, 0.23 / 268.77, 0.2 / 268.2, 2.0 / 270.0],
                               equal_nan=True)
    assert frame["is_small_gap"].tolist() == [False, True, True, False]
    assert frame["gap_direction"].tolist() == [NO_GAP, GAP_UP, GAP_DOWN, GAP_UP]
    with pytest.raises(ValueError, match="previous_session_close"):
        session_gaps([1.0, 2.0], [1.0])
