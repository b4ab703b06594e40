"""Tests for analytics.skew: the seed example, the steep-skew threshold, chain_skew on small
hand-built chains, both readings (interpolated to the exact target: hand-computed brackets, the
nearest-row fallback outside the listed range, exact hits and ties; the nearest row: wing choice,
ATM averaging, ties), missing sides, unsolved IVs, string rights, row-order independence, and
against plain-loop references on random chains; the compiled kernels against the NumPy reference
(``_chain_skew_reference``), bitwise, on thousands of adversarial random chains (ties, duplicates,
unsolved rows, NumPy's pairwise mean of several IVs at one strike, the fallback for very many) and
on embedded chain slices; and the causal trailing percentile reference (hand cases, causality,
NaN handling, a plain-loop reference)."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from analytics.skew import (
    _PAIRWISE_BLOCK,
    _USE_REFERENCE,
    MISSING_READING,
    SkewReading,
    _chain_skew_kernel,
    _chain_skew_reference,
    chain_skew,
    is_steep_skew,
    skew_metric,
    trailing_skew_reference,
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


def test_chain_skew_small_chain_interpolated():
    reading = chain_skew(*small_chain(), spot=580.0)
    assert reading == chain_skew(*small_chain(), spot=580.0, method="interpolated")  # the default
    assert isinstance(reading, SkewReading) and reading.is_valid
    # Put: 15Δ lies between |delta| .12 (IV .26) and .30 (IV .23): .26 + (.03 / .18) × (−.03) = .255.
    assert reading.iv_put == pytest.approx(0.255, abs=1e-15)
    # Call: between .10 (IV .16) and .17 (IV .17): .16 + (.05 / .07) × .01.
    assert reading.iv_call == pytest.approx(0.16 + 0.01 * 5.0 / 7.0, abs=1e-15)
    # ATM: the spot is a listed strike, so the mean of its put and call IVs.
    assert reading.iv_atm == pytest.approx((0.20 + 0.18) / 2, abs=1e-15)
    assert reading.skew == pytest.approx((0.255 - (0.16 + 0.01 * 5.0 / 7.0)) / 0.19, abs=1e-14)
    with pytest.raises(AttributeError):
        reading.skew = 0.0  # frozen


def test_chain_skew_small_chain_nearest():
    reading = chain_skew(*small_chain(), spot=580.0, method="nearest")
    assert reading.is_valid
    assert reading.iv_put == 0.26  # |delta| 0.12 is closest to 0.15 (0.03 away, 0.30 is 0.15)
    assert reading.iv_call == 0.17  # 0.17 is 0.02 away, 0.10 is 0.05
    assert reading.iv_atm == pytest.approx((0.20 + 0.18) / 2)
    assert reading.skew == pytest.approx((0.26 - 0.17) / 0.19)


def test_chain_skew_atm_interpolated_in_strike():
    strike, is_call, delta, iv = small_chain()
    # 575 lies halfway between 570 (put only, .23) and 580 (mean .19): .21.
    assert chain_skew(strike, is_call, delta, iv, 575.0).iv_atm == pytest.approx(0.21, abs=1e-15)
    # 582.5: a quarter of the way from 580 (.19) to 590 (call only, .17): .185.
    assert chain_skew(strike, is_call, delta, iv, 582.5).iv_atm == pytest.approx(0.185, abs=1e-15)
    # Outside the listed strikes: the nearest strike, as the nearest reading.
    assert chain_skew(strike, is_call, delta, iv, 550.0).iv_atm == 0.26
    assert chain_skew(strike, is_call, delta, iv, 612.0).iv_atm == 0.16
    # The nearest reading: spot 575 is 5 from both 570 and 580, the lower strike (570) is ATM.
    assert chain_skew(strike, is_call, delta, iv, 575.0, method="nearest").iv_atm == pytest.approx(0.23)
    assert chain_skew(strike, is_call, delta, iv, 582.5, method="nearest").iv_atm == pytest.approx(0.19)


def test_chain_skew_falls_back_to_nearest_when_the_target_is_not_bracketed():
    strike, is_call, delta, iv = small_chain()
    # 5Δ: every put and call |delta| lies above it, so the most OTM rows are read as they are.
    reading = chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.05)
    assert (reading.iv_put, reading.iv_call) == (0.26, 0.16)
    assert reading == chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.05, method="nearest")
    # 11Δ: bracketed on the call side (.10 … .17) but not on the put side (lowest put is .12).
    reading = chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.11)
    assert reading.iv_put == 0.26
    assert reading.iv_call == pytest.approx(0.16 + 0.01 * 0.01 / 0.07, abs=1e-15)
    # 60Δ: every |delta| lies below it, the deepest in-the-money row of each side.
    reading = chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.60)
    assert (reading.iv_put, reading.iv_call) == (0.20, 0.18)


def test_chain_skew_exact_target_and_ties():
    # A row exactly on the target is read as is (no neighbour enters).
    strike = np.array([560.0, 565.0, 570.0, 590.0, 595.0, 600.0])
    is_call = np.array([False, False, False, True, True, True])
    delta = np.array([-0.125, -0.25, -0.375, 0.375, 0.25, 0.125])
    iv = np.array([0.30, 0.26, 0.24, 0.19, 0.18, 0.17])
    reading = chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.25)
    assert (reading.iv_put, reading.iv_call) == (0.26, 0.18)
    # Without the on-target rows the target is exactly halfway between .125 and .375.
    keep = np.array([True, False, True, True, False, True])
    args = (strike[keep], is_call[keep], delta[keep], iv[keep], 580.0)
    reading = chain_skew(*args, wing_delta=0.25)
    assert reading.iv_put == pytest.approx(0.27, abs=1e-15)
    assert reading.iv_call == pytest.approx(0.18, abs=1e-15)
    # Nearest: .125 and .375 are both exactly .125 from .25, the further OTM (.125) wins.
    reading = chain_skew(*args, wing_delta=0.25, method="nearest")
    assert (reading.iv_put, reading.iv_call) == (0.30, 0.17)
    # Equal |delta| at a bracket end (noisy deltas): the lower strike, whatever the row order.
    strike = np.array([555.0, 560.0, 570.0, 590.0, 600.0, 605.0])
    delta = np.array([-0.125, -0.125, -0.375, 0.375, 0.125, 0.125])
    iv = np.array([0.32, 0.30, 0.24, 0.19, 0.17, 0.165])
    expected = chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.25)
    assert expected.iv_put == pytest.approx((0.32 + 0.24) / 2, abs=1e-15)    # 555, not 560
    assert expected.iv_call == pytest.approx((0.17 + 0.19) / 2, abs=1e-15)   # 600, not 605
    rng = np.random.default_rng(3)
    for _ in range(10):
        order = rng.permutation(6)
        for method in ("interpolated", "nearest"):
            assert chain_skew(strike[order], is_call[order], delta[order], iv[order], 580.0, wing_delta=0.25,
                              method=method) == chain_skew(strike, is_call, delta, iv, 580.0, wing_delta=0.25,
                                                           method=method)


@pytest.mark.parametrize("method", ["interpolated", "nearest"])
def test_chain_skew_order_does_not_matter(method):
    strike, is_call, delta, iv = small_chain()
    for spot in (580.0, 575.0, 583.0):
        order = np.array([5, 3, 0, 4, 2, 1])
        assert chain_skew(strike[order], is_call[order], delta[order], iv[order], spot, method=method) == \
            chain_skew(strike, is_call, delta, iv, spot, method=method)


@pytest.mark.parametrize("method", ["interpolated", "nearest"])
def test_chain_skew_atm_uses_whichever_side_exists(method):
    strike, is_call, delta, iv = small_chain()
    keep = np.array([True, True, False, True, True, True])  # drop the 580 put
    assert chain_skew(strike[keep], is_call[keep], delta[keep], iv[keep], 580.0, method=method).iv_atm == 0.18
    iv_unsolved = iv.copy()
    iv_unsolved[3] = NAN  # the 580 call did not solve: the put alone is ATM
    assert chain_skew(strike, is_call, delta, iv_unsolved, 580.0, method=method).iv_atm == 0.20


def test_chain_skew_ignores_unsolved_wings():
    strike, is_call, delta, iv = small_chain()
    iv = iv.copy()
    iv[0] = 0.0  # the 12-delta put has no IV
    delta = delta.copy()
    delta[4] = NAN  # the 17-delta call has no delta
    # Nearest: the 30-delta put and the 10-delta call are the closest usable rows.
    reading = chain_skew(strike, is_call, delta, iv, 580.0, method="nearest")
    assert (reading.iv_put, reading.iv_call) == (0.23, 0.16)
    # Interpolated: no usable put below 15Δ, so the nearest (30Δ) one; the call target is now
    # bracketed by .10 (IV .16) and .52 (IV .18).
    reading = chain_skew(strike, is_call, delta, iv, 580.0)
    assert reading.iv_put == 0.23
    assert reading.iv_call == pytest.approx(0.16 + 0.02 * 0.05 / 0.42, abs=1e-15)
    # A 580 call with no delta still counts for the ATM IV (the ATM reading needs no delta).
    delta[3] = NAN
    assert chain_skew(strike, is_call, delta, iv, 580.0).iv_atm == pytest.approx(0.19, abs=1e-15)


@pytest.mark.parametrize("method", ["interpolated", "nearest"])
def test_chain_skew_missing_side_or_empty(method):
    strike, is_call, delta, iv = small_chain()
    puts = ~is_call
    assert chain_skew(strike[puts], is_call[puts], delta[puts], iv[puts], 580.0, method=method) == MISSING_READING
    empty = np.array([])
    reading = chain_skew(empty, empty.astype(bool), empty, empty, 580.0, method=method)
    assert math.isnan(reading.iv_put) and math.isnan(reading.iv_call)
    assert math.isnan(reading.iv_atm) and math.isnan(reading.skew) and not reading.is_valid
    no_iv = chain_skew(strike, is_call, delta, np.full(6, NAN), 580.0, method=method)
    assert no_iv == MISSING_READING


def test_chain_skew_accepts_string_rights():
    strike, is_call, delta, iv = small_chain()
    rights = np.where(is_call, "C", "p")
    assert chain_skew(strike, rights, delta, iv, 580.0) == chain_skew(strike, is_call, delta, iv,
                                                                      580.0)
    assert chain_skew(strike, is_call.astype(int), delta, iv, 580.0).is_valid


def random_chain(seed: int):
    """A $1 grid around spot 580.37 with a put skew, a little delta noise and 40 unsolved IVs."""
    rng = np.random.default_rng(seed)
    strikes = np.arange(400.0, 760.0, 1.0)
    strike = np.concatenate([strikes, strikes])
    is_call = np.concatenate([np.zeros(len(strikes), bool), np.ones(len(strikes), bool)])
    spot = 580.37
    moneyness = np.log(strike / spot) / 0.05
    call_delta = 0.5 * (1.0 - np.tanh(moneyness)) + rng.normal(0, 1e-4, len(strike))
    delta = np.where(is_call, call_delta, call_delta - 1.0)
    iv = 0.18 - 0.1 * np.log(strike / spot) + rng.normal(0, 0.002, len(strike))
    iv[rng.choice(len(iv), 40, replace=False)] = NAN
    return strike, is_call, delta, iv, spot


def test_chain_skew_nearest_matches_loop_reference():
    strike, is_call, delta, iv, spot = random_chain(4)
    reading = chain_skew(strike, is_call, delta, iv, spot, wing_delta=0.15, method="nearest")

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


@pytest.mark.parametrize("seed, wing_delta", [(4, 0.15), (5, 0.15), (6, 0.10), (7, 0.25)])
def test_chain_skew_interpolated_matches_loop_reference(seed, wing_delta):
    strike, is_call, delta, iv, spot = random_chain(seed)
    reading = chain_skew(strike, is_call, delta, iv, spot, wing_delta=wing_delta)

    def wing(want_call):
        lo = hi = (None, None)  # (|delta|, iv) of the bracket ends
        for c, d, v in zip(is_call, delta, iv, strict=True):
            if c != want_call or math.isnan(v):
                continue
            d = abs(d)
            if d <= wing_delta and (lo[0] is None or d > lo[0]):
                lo = (d, v)
            if d >= wing_delta and (hi[0] is None or d < hi[0]):
                hi = (d, v)
        if hi[0] == lo[0]:
            return lo[1]
        return lo[1] + (wing_delta - lo[0]) / (hi[0] - lo[0]) * (hi[1] - lo[1])

    def atm_at(level):
        sides = [[v for k, c, v in zip(strike, is_call, iv, strict=True)
                  if k == level and c == want_call and not math.isnan(v)] for want_call in (True, False)]
        sides = [sum(s) / len(s) for s in sides if s]
        return sum(sides) / len(sides)

    k_lo = max(k for k, v in zip(strike, iv, strict=True) if k <= spot and not math.isnan(v))
    k_hi = min(k for k, v in zip(strike, iv, strict=True) if k >= spot and not math.isnan(v))
    iv_atm = atm_at(k_lo) + (spot - k_lo) / (k_hi - k_lo) * (atm_at(k_hi) - atm_at(k_lo))
    assert reading.iv_put == pytest.approx(wing(False), rel=1e-13)
    assert reading.iv_call == pytest.approx(wing(True), rel=1e-13)
    assert reading.iv_atm == pytest.approx(iv_atm, rel=1e-13)
    assert reading.skew > 0.0  # the surface has a put skew
    # Row order does not matter.
    order = np.random.default_rng(seed + 100).permutation(len(strike))
    assert chain_skew(strike[order], is_call[order], delta[order], iv[order], spot, wing_delta=wing_delta) == reading


def test_chain_skew_interpolated_is_smooth_where_nearest_jumps():
    # A smooth surface read as the spot drifts by cents: the interpolated skew moves by
    # a small fraction of what the nearest-strike reading jumps when its 15Δ row changes.
    def surface_chain(spot):
        strikes = np.arange(500.0, 660.0, 1.0)
        strike = np.concatenate([strikes, strikes])
        is_call = np.concatenate([np.zeros(len(strikes), bool), np.ones(len(strikes), bool)])
        x = np.log(strike / spot) / 0.04
        call_delta = 0.5 * (1.0 - np.tanh(x))
        delta = np.where(is_call, call_delta, call_delta - 1.0)
        iv = 0.16 - 0.25 * np.log(strike / spot) + 0.5 * np.log(strike / spot) ** 2
        return strike, is_call, delta, iv, spot

    spots = 580.0 + np.arange(0.0, 1.0, 0.05)
    interpolated = np.array([chain_skew(*surface_chain(s)).skew for s in spots])
    nearest = np.array([chain_skew(*surface_chain(s), method="nearest").skew for s in spots])
    assert np.ptp(interpolated) < 1e-3
    assert np.ptp(nearest) > 5 * np.ptp(interpolated)


@pytest.mark.parametrize("function", [chain_skew, _chain_skew_reference])
@pytest.mark.parametrize("kwargs, name", [
    ({"spot": 0.0}, "spot"),
    ({"spot": NAN}, "spot"),
    ({"wing_delta": 0.0}, "wing_delta"),
    ({"wing_delta": 1.5}, "wing_delta"),
    ({"iv": np.ones(5)}, "iv"),
    ({"is_call": np.array(["C", "X", "P", "C", "C", "P"])}, "is_call"),
    ({"is_call": np.array([0, 2, 1, 1, 0, 0])}, "is_call"),
    ({"method": "linear"}, "method"),
])
def test_chain_skew_bad_arguments(function, kwargs, name):
    strike, is_call, delta, iv = small_chain()
    arguments = {"strike": strike, "is_call": is_call, "delta": delta, "iv": iv, "spot": 580.0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        function(**arguments)


# ------------------------------------------------------------------------------------------------
# the compiled kernels against the NumPy reference: bitwise
# ------------------------------------------------------------------------------------------------

def same_bits(a: float, b: float) -> bool:
    """Bitwise equality of two floats, any NaN equal to any NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_same_reading(got: SkewReading, want: SkewReading, context) -> None:
    assert type(got) is SkewReading
    for field in ("iv_put", "iv_call", "iv_atm", "skew"):
        a, b = getattr(got, field), getattr(want, field)
        assert type(a) is float, (field, type(a), context)
        assert same_bits(a, b), (field, a, b, context)


def adversarial_chain(rng: np.random.Generator):
    """A small chain built to hit every tie rule: strikes on a $1 grid over a narrow range (many
    duplicates), deltas and IVs drawn partly from small pools (equal |delta| and IV ties, |delta|
    exactly on the usual targets), unsolved IVs (NaN, 0, negative, inf), NaN deltas and strikes,
    sometimes a block of rows of one side at one strike; the spot on a strike, between strikes or
    outside the listed range."""
    n = int(rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 40, 80]))
    base = float(rng.integers(50, 600))
    strike = base + rng.integers(0, int(rng.choice([2, 4, 10, 30])), n).astype(float)
    is_call = rng.random(n) < rng.choice([0.5, 0.1, 0.9])
    pool = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 0.12, 0.18, 0.3])
    abs_delta = np.where(rng.random(n) < 0.4, rng.choice(pool, n), np.round(rng.random(n), int(rng.choice([2, 3, 17]))))
    if rng.random() < 0.1:
        abs_delta = abs_delta * 1e-17          # |delta| far below the target (rounded distances tie)
    delta = np.where(is_call, abs_delta, -abs_delta)
    delta[rng.random(n) < 0.08] = np.nan
    iv_pool = np.array([0.1, 0.2, 0.25, 0.3, 0.15])
    iv = np.where(rng.random(n) < 0.4, rng.choice(iv_pool, n), 0.05 + 0.5 * rng.random(n))
    bad = rng.random(n) < 0.15
    iv[bad] = rng.choice([np.nan, 0.0, -0.2, -0.0, np.inf, -np.inf], int(bad.sum()))
    strike[rng.random(n) < 0.02] = rng.choice([np.nan, np.inf])
    if n and rng.random() < 0.25:            # a block of one side's rows at one strike
        m = int(rng.integers(3, 20))
        at = float(rng.choice(strike[np.isfinite(strike)])) if np.isfinite(strike).any() else base
        strike = np.concatenate([strike, np.full(m, at)])
        is_call = np.concatenate([is_call, np.full(m, bool(rng.random() < 0.5))])
        delta = np.concatenate([delta, np.full(m, -0.5) * rng.choice([1.0, -1.0]) * rng.random(m)])
        iv = np.concatenate([iv, 0.05 + 0.5 * rng.random(m)])
    finite = strike[np.isfinite(strike)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (base, base + 5.0)
    kind = rng.integers(0, 4)
    if kind == 0 and len(finite):
        spot = float(rng.choice(finite))                 # exactly on a listed strike
    elif kind == 1:
        spot = float(rng.uniform(lo - 1.0, hi + 1.0))    # inside (or just outside) the range
    elif kind == 2:
        spot = float(rng.choice([lo - 3.25, hi + 2.5, lo + 0.5]))  # outside / halfway
    else:
        spot = float(np.round(rng.uniform(lo, hi + 1e-9), 2))
    spot = max(spot, 0.01)
    order = rng.permutation(len(strike))
    return strike[order], is_call[order], delta[order], iv[order], spot


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_compiled_matches_reference_bitwise_on_random_chains(seed):
    rng = np.random.default_rng(1000 + seed)
    cases = 0
    for _ in range(600):
        strike, is_call, delta, iv, spot = adversarial_chain(rng)
        wings = (0.15, float(rng.choice([0.05, 0.1, 0.12, 0.25, 0.5, 0.9])), float(rng.uniform(0.01, 0.99)))
        for wing_delta in wings:
            for method in ("interpolated", "nearest"):
                got = chain_skew(strike, is_call, delta, iv, spot, wing_delta=wing_delta, method=method)
                want = _chain_skew_reference(strike, is_call, delta, iv, spot, wing_delta=wing_delta, method=method)
                assert_same_reading(got, want, (seed, strike, is_call, delta, iv, spot, wing_delta, method))
                cases += 1
    assert cases == 600 * 3 * 2


@pytest.mark.parametrize("size", [*range(3, 20), 31, 64, 100, 127, _PAIRWISE_BLOCK, _PAIRWISE_BLOCK + 1, 300])
def test_compiled_mean_of_several_ivs_at_one_strike_is_numpys(size):
    # Spot on a strike where one side has ``size`` rows of distinct IVs: the ATM IV is their
    # np.sort(values).mean() (NumPy's pairwise sum), averaged with the other side's single IV.
    rng = np.random.default_rng(size)
    for _ in range(20):
        values = 0.05 + rng.random(size) * rng.choice([1.0, 1e-3, 1e3])
        strike = np.concatenate([[99.0, 100.0, 101.0], np.full(size, 100.0)])
        is_call = np.concatenate([[False, True, True], np.zeros(size, bool)])
        delta = np.concatenate([[-0.1, 0.5, 0.1], np.full(size, -0.5)])
        iv = np.concatenate([[0.3, 0.2, 0.15], values])
        expected = (0.2 + float(np.sort(values).mean())) / 2
        for method in ("interpolated", "nearest"):
            got = chain_skew(strike, is_call, delta, iv, 100.0, method=method)
            assert same_bits(got.iv_atm, expected)
            assert_same_reading(got, _chain_skew_reference(strike, is_call, delta, iv, 100.0, method=method), size)
        # Past NumPy's unrolled block the kernel hands the chain back to the reference.
        status = _chain_skew_kernel(strike, is_call, delta, iv, 100.0, 0.15, True)[0]
        assert (status == _USE_REFERENCE) == (size > _PAIRWISE_BLOCK)


@pytest.mark.parametrize("method", ["interpolated", "nearest"])
def test_compiled_matches_reference_on_the_loop_reference_chains(method):
    for seed in range(4, 12):
        strike, is_call, delta, iv, spot = random_chain(seed)
        for wing_delta in (0.05, 0.10, 0.15, 0.25):
            for shift in (0.0, 0.37, -0.37, 0.5):
                args = (strike, is_call, delta, iv, round(spot + shift, 2))
                assert_same_reading(chain_skew(*args, wing_delta=wing_delta, method=method),
                                    _chain_skew_reference(*args, wing_delta=wing_delta, method=method), seed)


@pytest.fixture(scope="module")
def january_2016():
    from core.config import Config
    from core.market_data import load_market

    return load_market(Config().override({"backtest.start": "2016-01-04", "backtest.end": "2016-01-29"}))


def test_compiled_matches_reference_on_embedded_chains(january_2016):
    market = january_2016
    bars = np.unique(np.linspace(0, len(market.bar_times) - 1, 300).astype(int))
    compared = 0
    for bar in bars:
        chain = market.slice_at(int(bar), 30, 45)
        if len(chain) == 0:
            continue
        rows = chain.expiration == chain.expiration.min()
        args = (chain.strike[rows], chain.is_call[rows], chain.delta[rows], chain.iv[rows], chain.spot)
        for wing_delta in (0.10, 0.15, 0.25):
            for method in ("interpolated", "nearest"):
                got = chain_skew(*args, wing_delta=wing_delta, method=method)
                assert_same_reading(got, _chain_skew_reference(*args, wing_delta=wing_delta, method=method),
                                    (bar, wing_delta, method))
                assert got.is_valid
                compared += 1
    assert compared >= 250 * 6


# ------------------------------------------------------------------------------------------------
# trailing_skew_reference
# ------------------------------------------------------------------------------------------------

def test_trailing_reference_hand_cases():
    skews = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # Window of 3 previous sessions, median, at least 2 readings.
    got = trailing_skew_reference(skews, lookback=3, percentile=50.0, min_sessions=2)
    np.testing.assert_array_equal(got, [NAN, NAN, 1.5, 2.0, 3.0, 4.0])
    # 80th percentile with linear interpolation: of [1, 2, 3] → 1 + 0.8 × 2 = 2.6.
    got = trailing_skew_reference(skews, lookback=3, percentile=80.0, min_sessions=3)
    np.testing.assert_allclose(got, [NAN, NAN, NAN, 2.6, 3.6, 4.6], equal_nan=True)
    # A long lookback uses every earlier session.
    got = trailing_skew_reference(skews, lookback=100, percentile=50.0, min_sessions=1)
    np.testing.assert_array_equal(got, [NAN, 1.0, 1.5, 2.0, 2.5, 3.0])


def test_trailing_reference_never_uses_the_session_itself():
    # A spike on session 3 is not part of session 3's reference, only of later ones.
    skews = np.array([0.7, 0.7, 0.7, 5.0, 0.7])
    got = trailing_skew_reference(skews, lookback=3, percentile=99.0, min_sessions=1)
    assert got[3] == pytest.approx(0.7) and got[4] > 4.0


def test_trailing_reference_is_causal():
    rng = np.random.default_rng(5)
    skews = rng.normal(0.72, 0.02, 300)
    base = trailing_skew_reference(skews, 50, 80.0, 20)
    for cut in (0, 1, 19, 20, 21, 150, 299):
        changed = skews.copy()
        changed[cut:] = rng.normal(3.0, 1.0, len(changed) - cut)
        got = trailing_skew_reference(changed, 50, 80.0, 20)
        # Every reference up to and including session `cut` (which uses sessions < cut) is unchanged.
        np.testing.assert_array_equal(got[:cut + 1], base[:cut + 1])
    # Prefixes give the same references as the full series.
    for n in (1, 25, 100):
        np.testing.assert_array_equal(trailing_skew_reference(skews[:n], 50, 80.0, 20), base[:n])


def test_trailing_reference_skips_nan_readings_and_counts_only_valid_ones():
    skews = np.array([1.0, NAN, 3.0, NAN, NAN, 5.0])
    got = trailing_skew_reference(skews, lookback=3, percentile=50.0, min_sessions=2)
    # Session 3: window [1, NaN, 3] → 2 valid; session 4: [NaN, 3, NaN] → 1 valid; 5: [3, NaN, NaN].
    np.testing.assert_array_equal(got, [NAN, NAN, NAN, 2.0, NAN, NAN])
    assert trailing_skew_reference(np.array([]), 10, 80.0, 1).shape == (0,)
    assert np.isnan(trailing_skew_reference(np.full(5, NAN), 3, 50.0, 1)).all()


def test_trailing_reference_matches_a_plain_loop():
    rng = np.random.default_rng(11)
    skews = rng.normal(0.72, 0.02, 400)
    skews[rng.random(400) < 0.05] = NAN
    lookback, percentile, min_sessions = 60, 80.0, 20
    expected = np.full(len(skews), NAN)
    for i in range(len(skews)):
        window = skews[max(0, i - lookback):i]
        window = window[~np.isnan(window)]
        if len(window) >= min_sessions:
            expected[i] = np.percentile(window, percentile)
    np.testing.assert_allclose(trailing_skew_reference(skews, lookback, percentile, min_sessions), expected,
                               rtol=0, atol=1e-15, equal_nan=True)


@pytest.mark.parametrize("kwargs", [
    {"lookback": 0}, {"lookback": 2.5}, {"min_sessions": 0}, {"percentile": 0.0}, {"percentile": 100.0},
    {"percentile": NAN},
])
def test_trailing_reference_rejects_bad_parameters(kwargs):
    arguments = {"lookback": 5, "percentile": 80.0, "min_sessions": 2, **kwargs}
    with pytest.raises(ValueError):
        trailing_skew_reference(np.ones(10), **arguments)
    with pytest.raises(ValueError):
        trailing_skew_reference(np.ones((2, 5)), 5, 80.0, 2)
