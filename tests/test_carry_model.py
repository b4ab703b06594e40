"""Tests for analytics.carry_model: the seed's fair-value example, vectorised use, basis, the
carry-state labels and the ValueError checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analytics.carry_model import (
    BACKWARDATION,
    CONTANGO,
    FLAT,
    UNKNOWN,
    basis,
    carry_state,
    fair_value,
)

NAN = float("nan")


def test_seed_example():
    # 580·e^{0.035·0.25} = 580·e^{0.00875}; series 1 + x + x²/2 + x³/6 = 1.008788393 → 585.09727
    value = fair_value(spot=580.0, rate=0.05, dividend_yield=0.015, tau_years=0.25)
    assert value == pytest.approx(585.09727, abs=1e-5)
    assert value == pytest.approx(580.0 * math.exp(0.00875), rel=1e-15)
    assert basis(futures_price=582.0, spot=580.0) == pytest.approx(2.0)
    assert carry_state(basis(582.0, 580.0)) == CONTANGO


def test_fair_value_vectorised_and_limits():
    tau = np.array([0.0, 0.25, 1.0])
    values = fair_value(580.0, 0.05, 0.015, tau)
    np.testing.assert_allclose(values, 580.0 * np.exp(0.035 * tau), rtol=1e-15)
    assert values[0] == 580.0  # no time, no carry
    assert fair_value(580.0, 0.01, 0.03, 1.0) < 580.0  # dividends above rates: F below spot
    assert fair_value(580.0, 0.02, 0.02, 2.0) == pytest.approx(580.0)
    assert np.isnan(fair_value(580.0, NAN, 0.015, 0.25))


def test_basis_and_states():
    futures = np.array([582.0, 578.5, 580.0, NAN])
    values = basis(futures, 580.0)
    np.testing.assert_allclose(values, [2.0, -1.5, 0.0, NAN], equal_nan=True)
    np.testing.assert_array_equal(carry_state(values), [CONTANGO, BACKWARDATION, FLAT, UNKNOWN])
    assert carry_state(-0.01) == BACKWARDATION and isinstance(carry_state(0.0), str)
    assert carry_state(0.05, tolerance=0.1) == FLAT
    assert carry_state(0.15, tolerance=0.1) == CONTANGO


@pytest.mark.parametrize("call, name", [
    (lambda: fair_value(580.0, 0.05, 0.015, -0.1), "tau_years"),
    (lambda: fair_value(np.array([580.0, 0.0]), 0.05, 0.015, 0.25), "spot"),
    (lambda: fair_value(-1.0, 0.05, 0.015, 0.25), "spot"),
    (lambda: basis(582.0, 0.0), "spot"),
    (lambda: carry_state(1.0, tolerance=-1.0), "tolerance"),
])
def test_rejects_impossible_inputs(call, name):
    with pytest.raises(ValueError, match=name):
        call()
