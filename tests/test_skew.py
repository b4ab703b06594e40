"""Tests for analytics.skew: the seed example, the steep-skew threshold, and chain_skew on small
hand-built chains (wing choice, ATM averaging, ties, missing sides, unsolved IVs, string rights)
and against a plain-loop reference on a random chain."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analytics.skew import (
    MISSING_READING,
    SkewReading,
    chain_skew,
    is_steep_skew,
    skew_metric,
)

NAN = float("nan")


def test_seed_example():
    skew = skew_metric(iv_put=0.30, iv_call=0.20, iv_atm=0.25)
    assert skew == pytest.approx(0.4)
    assert bool(is_steep_skew(skew, threshold=0.15))


def test_metric_vectorised_and_threshold():
    skews = skew_metric([0.30, 0.20, 0.22, 0.25], [0.20, 0.20, 0.25, 0.20], [0.25, 0.20, 0.20, 0.0])
    np.testing.assert_allclose(skews, [0.4, 0.0, -0.15, NAN], equal_nan=True)
    np.testing.assert_array_equal(is_steep_skew([0.4, 0.15, 0.1500001, 0.0, NAN]),
                                  [True, False, True, False, False])


def small_chain():
    """Spot 580. Puts at 560/570/580 (|delta| .12/.30/.48), calls at 580/590/600 (.52/.17/.10)."""
    strike = np.array([560.0, 570.0, 580.0, 580.0, 590.0, 600.0])
    is_call = np.array([False, False, False, True, True, True])
    delta = np.array([-0.12, -0.30, -0.48, 0.52, 0.17, 0.10])
    iv = np.array([0.26, 0.23, 0.20, 0.18, 0.17, 0.16])
    return strike, is_call, delta, iv


def test_chain_skew_small_chain():
    reading = chain_skew(*small_chain(), spot=580.0)
    assert isinstance(reading, SkewReading) and reading.is_valid
    assert reading.iv_put == 0.26  # |delta| 0.12 is closest to 0.15 (0.03 away, 0.30 is 0.15)
    assert reading.iv_call == 0.17  # 0.17 is 0.02 away, 0.10 is 0.05
    assert reading.iv_atm == pytest.approx((0.20 + 0.18) / 2)
    assert reading.skew == pytest.approx((0.26 - 0.17) / 0.19)
    with pytest.raises(AttributeError):
        reading.skew = 0.0  # frozen


def test_chain_skew_order_does_not_matter_and_ties():
    strike, is_call, delta, iv = small_chain()
    order = np.array([5, 3, 0, 4, 2, 1])
    assert chain_skew(strike[order], is_call[order], delta[order], iv[order], 580.0) == \
        chain_skew(strike, is_call, delta, iv, 580.0)
    # Spot 575 is 5 from both 570 and 580: the lower strike (570, put only) is ATM.
    assert chain_skew(strike, is_call, delta, iv, spot=575.0).iv_atm == pytest.approx(0.23)
    # |delta| 0.10 and 0.20 are both 0.05 from 0.15: the further OTM (0.10) wins.
    tie = chain_skew([560.0, 570.0, 590.0, 600.0], [False, False, True, True],
                     [-0.10, -0.20, 0.20, 0.10], [0.30, 0.25, 0.19, 0.18], 580.0)
    assert (tie.iv_put, tie.iv_call) == (0.30, 0.18)


def test_chain_skew_atm_uses_whichever_side_exists():
    strike, is_call, delta, iv = small_chain()
    keep = np.array([True, True, False, True, True, True])  # drop the 580 put
    assert chain_skew(strike[keep], is_call[keep], delta[keep], iv[keep], 580.0).iv_atm == 0.18
    iv_unsolved = iv.copy()
    iv_unsolved[3] = NAN  # the 580 call did not solve: the put alone is ATM
    assert chain_skew(strike, is_call, delta, iv_unsolved, 580.0).iv_atm == 0.20


def test_chain_skew_ignores_unsolved_wings():
    strike, is_call, delta, iv = small_chain()
    iv = iv.copy()
    iv[0] = 0.0  # the 12-delta put has no IV: the 30-delta put is the closest usable one
    delta = delta.copy()
    delta[4] = NAN  # the 17-delta call has no delta
    reading = chain_skew(strike, is_call, delta, iv, 580.0)
    assert (reading.iv_put, reading.iv_call) == (0.23, 0.16)


def test_chain_skew_missing_side_or_empty():
    strike, is_call, delta, iv = small_chain()
    puts = ~is_call
    assert chain_skew(strike[puts], is_call[puts], delta[puts], iv[puts], 580.0) == MISSING_READING
    empty = np.array([])
    reading = chain_skew(empty, empty.astype(bool), empty, empty, 580.0)
    assert math.isnan(reading.iv_put) and math.isnan(reading.iv_call)
    assert math.isnan(reading.iv_atm) and math.isnan(reading.skew) and not reading.is_valid
    no_iv = chain_skew(strike, is_call, delta, np.full(6, NAN), 580.0)
    assert no_iv == MISSING_READING


def test_chain_skew_accepts_string_rights():
    strike, is_call, delta, iv = small_chain()
    rights = np.where(is_call, "C", "p")
    assert chain_skew(strike, rights, delta, iv, 580.0) == chain_skew(strike, is_call, delta, iv,
                                                                      580.0)
    assert chain_skew(strike, is_call.astype(int), delta, iv, 580.0).is_valid


def test_chain_skew_matches_loop_reference():
    rng = np.random.default_rng(4)
    strikes = np.arange(400.0, 760.0, 1.0)
    strike = np.concatenate([strikes, strikes])
    is_call = np.concatenate([np.zeros(len(strikes), bool), np.ones(len(strikes), bool)])
    spot = 580.37
    moneyness = np.log(strike / spot) / 0.05
    call_delta = 0.5 * (1.0 - np.tanh(moneyness)) + rng.normal(0, 1e-4, len(strike))
    delta = np.where(is_call, call_delta, call_delta - 1.0)
    iv = 0.18 - 0.1 * np.log(strike / spot) + rng.normal(0, 0.002, len(strike))
    iv[rng.choice(len(iv), 40, replace=False)] = NAN
    reading = chain_skew(strike, is_call, delta, iv, spot, wing_delta=0.15)

    best = {True: (math.inf, None), False: (math.inf, None)}
    atm = (math.inf, None)
    for k, c, d, v in zip(strike, is_call, delta, iv, strict=True):
        if math.isnan(v):
            continue
        if abs(abs(d) - 0.15) < best[c][0]:
            best[c] = (abs(abs(d) - 0.15), v)
        if abs(k - spot) < atm[0]:
            atm = (abs(k - spot), k)
    at = [v for k, v in zip(strike, iv, strict=True) if k == atm[1] and not math.isnan(v)]
    assert reading.iv_put == best[False][1] and reading.iv_call == best[True][1]
    assert reading.iv_atm == pytest.approx(sum(at) / len(at))
    assert reading.skew > 0.0  # the surface has a put skew


@pytest.mark.parametrize("kwargs, name", [
    ({"spot": 0.0}, "spot"),
    ({"spot": NAN}, "spot"),
    ({"wing_delta": 0.0}, "wing_delta"),
    ({"wing_delta": 1.5}, "wing_delta"),
    ({"iv": np.ones(5)}, "iv"),
    ({"is_call": np.array(["C", "X", "P", "C", "C", "P"])}, "is_call"),
    ({"is_call": np.array([0, 2, 1, 1, 0, 0])}, "is_call"),
])
def test_chain_skew_bad_arguments(kwargs, name):
    strike, is_call, delta, iv = small_chain()
    arguments = {"strike": strike, "is_call": is_call, "delta": delta, "iv": iv, "spot": 580.0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        chain_skew(**arguments)
