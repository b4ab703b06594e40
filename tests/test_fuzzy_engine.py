"""F_t, the neural blend, dynamic sizing and score_bars (seed §6, DESIGN.md weight decisions)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from core.config import FuzzyConfig
from intelligence import fuzzifier as fz
from intelligence.fuzzy_engine import (
    DEFAULT_NEURAL_WEIGHT,
    DEFAULT_WEIGHTS,
    FEATURE_KEYS,
    NEUTRAL_NEURAL_MEMBERSHIP,
    FuzzyScores,
    MembershipBreakpoints,
    blend_with_neural,
    compute_fuzzy_confidence,
    dynamic_contracts,
    score_bars,
)

SEED_MEMBERSHIPS = {
    "mtf": 0.60, "iv": 0.80, "regime": 0.70, "rsi": 0.50, "adx": 0.85,
    "bbands": 0.65, "stoch": 0.55, "psar": 0.90, "volume": 0.75, "sma": 0.80,
}
SEED_WEIGHTS = {
    "mtf": 0.18, "iv": 0.14, "regime": 0.11, "rsi": 0.10, "adx": 0.10,
    "bbands": 0.09, "stoch": 0.08, "psar": 0.07, "volume": 0.07, "sma": 0.06,
}


# --------------------------------------------------------------------------------------------
# F_t


def test_seed_worked_example_is_0_698_not_0_71():
    hand = (0.18 * 0.60 + 0.14 * 0.80 + 0.11 * 0.70 + 0.10 * 0.50 + 0.10 * 0.85
            + 0.09 * 0.65 + 0.08 * 0.55 + 0.07 * 0.90 + 0.07 * 0.75 + 0.06 * 0.80)
    ft = compute_fuzzy_confidence(SEED_MEMBERSHIPS, SEED_WEIGHTS)
    assert isinstance(ft, float)
    assert ft == pytest.approx(hand, abs=1e-12)
    assert ft == pytest.approx(0.698, abs=1e-12)
    assert f"{ft:.2f}" == "0.70"  # the seed prints 0.71


def test_default_weights_are_the_worked_example_and_the_config_defaults():
    assert dict(DEFAULT_WEIGHTS) == SEED_WEIGHTS
    assert dict(DEFAULT_WEIGHTS) == FuzzyConfig().technical_weights()
    assert math.fsum(DEFAULT_WEIGHTS.values()) == pytest.approx(1.0, abs=1e-12)
    assert FuzzyConfig().fuzzy_weight_neural == DEFAULT_NEURAL_WEIGHT


def test_weights_are_normalised_over_the_keys_given():
    doubled = {key: 2 * w for key, w in SEED_WEIGHTS.items()}
    assert compute_fuzzy_confidence(SEED_MEMBERSHIPS, doubled) == pytest.approx(0.698, abs=1e-12)
    two = compute_fuzzy_confidence({"rsi": 0.2, "adx": 1.0}, {"rsi": 3.0, "adx": 1.0})
    assert two == pytest.approx((3 * 0.2 + 1 * 1.0) / 4, abs=1e-15)


def test_all_ones_give_exactly_one_and_all_zeros_zero():
    ones = dict.fromkeys(SEED_WEIGHTS, 1.0)
    assert compute_fuzzy_confidence(ones, {k: 0.1 for k in SEED_WEIGHTS}) == 1.0
    assert compute_fuzzy_confidence(dict.fromkeys(SEED_WEIGHTS, 0.0), SEED_WEIGHTS) == 0.0


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(7)
    arrays = {key: rng.uniform(0, 1, 50) for key in SEED_WEIGHTS}
    vector = compute_fuzzy_confidence(arrays, SEED_WEIGHTS)
    assert isinstance(vector, np.ndarray) and vector.shape == (50,)
    for i in (0, 17, 49):
        row = {key: float(values[i]) for key, values in arrays.items()}
        assert vector[i] == pytest.approx(compute_fuzzy_confidence(row, SEED_WEIGHTS), abs=1e-15)
    hand = sum(SEED_WEIGHTS[k] * arrays[k] for k in SEED_WEIGHTS)
    np.testing.assert_allclose(vector, hand, atol=1e-12)


def test_scalars_broadcast_against_arrays_and_key_order_does_not_matter():
    memberships = dict(SEED_MEMBERSHIPS, mtf=np.array([0.60, 0.0, 1.0]))
    ft = compute_fuzzy_confidence(memberships, SEED_WEIGHTS)
    assert ft[0] == pytest.approx(0.698, abs=1e-12)
    assert ft[1] == pytest.approx(0.698 - 0.18 * 0.60, abs=1e-12)
    reversed_order = dict(reversed(list(memberships.items())))
    np.testing.assert_array_equal(compute_fuzzy_confidence(reversed_order, SEED_WEIGHTS), ft)


def test_nan_membership_with_weight_gives_nan_bar_only():
    memberships = dict(SEED_MEMBERSHIPS, rsi=np.array([0.5, np.nan, 0.5]))
    ft = compute_fuzzy_confidence(memberships, SEED_WEIGHTS)
    assert np.isnan(ft[1])
    assert ft[0] == pytest.approx(0.698, abs=1e-12) and ft[2] == ft[0]


def test_nan_membership_with_zero_weight_is_ignored():
    weights = dict(SEED_WEIGHTS, rsi=0.0)
    memberships = dict(SEED_MEMBERSHIPS, rsi=float("nan"))
    ft = compute_fuzzy_confidence(memberships, weights)
    hand = (0.698 - 0.10 * 0.50) / 0.90
    assert ft == pytest.approx(hand, abs=1e-12)


@pytest.mark.parametrize(
    ("memberships", "weights", "message"),
    [
        (dict(SEED_MEMBERSHIPS), {k: w for k, w in SEED_WEIGHTS.items() if k != "sma"},
         r"memberships without a weight: \['sma'\]"),
        ({k: m for k, m in SEED_MEMBERSHIPS.items() if k != "iv"}, SEED_WEIGHTS,
         r"weights without a membership: \['iv'\]"),
        (SEED_MEMBERSHIPS, dict(SEED_WEIGHTS, adx=-0.1), "weight 'adx' is negative"),
        (SEED_MEMBERSHIPS, dict.fromkeys(SEED_WEIGHTS, 0.0), "sum to 0"),
        (SEED_MEMBERSHIPS, dict(SEED_WEIGHTS, psar=float("nan")), "weight 'psar' must be a finite"),
        (dict(SEED_MEMBERSHIPS, volume=1.2), SEED_WEIGHTS, r"membership 'volume' must be in \[0, 1\]"),
        (dict(SEED_MEMBERSHIPS, mtf=np.zeros(3), iv=np.zeros(4)), SEED_WEIGHTS, "same shape"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(memberships, weights, message):
    with pytest.raises(ValueError, match=message):
        compute_fuzzy_confidence(memberships, weights)


# --------------------------------------------------------------------------------------------
# C and the size


def test_blend_with_neural_arithmetic():
    assert blend_with_neural(0.698, 0.9, 0.2) == pytest.approx(0.2 * 0.9 + 0.8 * 0.698, abs=1e-15)
    assert blend_with_neural(0.698, 0.9, 0.0) == pytest.approx(0.698, abs=1e-15)
    assert blend_with_neural(0.698, 0.9, 1.0) == pytest.approx(0.9, abs=1e-15)
    # the empty neural slot: C = 0.1 + 0.8 * F_t with the default weight
    assert NEUTRAL_NEURAL_MEMBERSHIP == 0.5
    assert blend_with_neural(0.698) == pytest.approx(0.1 + 0.8 * 0.698, abs=1e-15)
    assert blend_with_neural(0.0) == pytest.approx(0.1) and blend_with_neural(1.0) == pytest.approx(0.9)


def test_blend_vectorised_and_nan():
    fuzzy = np.array([0.0, 0.5, np.nan, 1.0])
    neural = np.array([1.0, 0.5, 0.5, np.nan])
    c = blend_with_neural(fuzzy, neural, 0.25)
    np.testing.assert_allclose(c[:2], [0.25, 0.5], atol=1e-15)
    assert np.isnan(c[2]) and np.isnan(c[3])


@pytest.mark.parametrize("weight", [-0.1, 1.1, float("nan")])
def test_blend_rejects_bad_weight(weight):
    with pytest.raises(ValueError, match="neural_weight"):
        blend_with_neural(0.5, 0.5, weight)


def test_blend_rejects_memberships_outside_unit_interval():
    with pytest.raises(ValueError, match="neural_membership"):
        blend_with_neural(0.5, 1.5)
    with pytest.raises(ValueError, match="fuzzy_confidence"):
        blend_with_neural(-0.2, 0.5)


@pytest.mark.parametrize(
    ("confidence", "max_contracts", "expected"),
    [(0.0, 10, 0), (0.09, 10, 0), (0.1, 10, 1), (0.699, 10, 6), (0.7, 10, 7), (0.75, 10, 7),
     (0.999, 10, 9), (1.0, 10, 10), (0.29, 100, 29), (0.5, 0, 0), (float("nan"), 10, 0),
     (-0.3, 10, 0), (1.5, 10, 10)],
)
def test_dynamic_contracts_floors(confidence, max_contracts, expected):
    result = dynamic_contracts(confidence, max_contracts)
    assert type(result) is int and result == expected


def test_dynamic_contracts_vectorised():
    c = np.array([0.0, 0.349, 0.35, np.nan, 1.0])
    out = dynamic_contracts(c, 20)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [0, 6, 7, 0, 20])


def test_dynamic_contracts_rejects_bad_max():
    with pytest.raises(ValueError, match="max_contracts"):
        dynamic_contracts(0.5, -1)
    with pytest.raises(TypeError, match="max_contracts"):
        dynamic_contracts(0.5, 2.5)


# --------------------------------------------------------------------------------------------
# score_bars


def _features(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "mtf_consensus": rng.uniform(0, 1, n),
        "iv_rank": rng.uniform(0, 100, n),
        "vix": rng.uniform(9, 40, n),
        "rsi": rng.uniform(10, 90, n),
        "adx": rng.uniform(10, 50, n),
        "bb_position": rng.uniform(-0.2, 1.2, n),
        "bb_width": rng.uniform(0, 0.06, n),
        "stoch_k": rng.uniform(0, 100, n),
        "psar_position": rng.uniform(-1, 1, n),
        "volume_ratio": rng.uniform(0, 2, n),
        "sma_distance": rng.uniform(-0.03, 0.03, n),
        "unused_column": np.zeros(n),
    }


def test_score_bars_matches_the_functions_one_by_one():
    features = _features()
    scores = score_bars(features)
    assert isinstance(scores, FuzzyScores)
    expected = {
        "mtf": fz.mtf_membership(features["mtf_consensus"]),
        "iv": fz.iv_rank_membership(features["iv_rank"]),
        "regime": fz.vix_membership(features["vix"]),
        "rsi": fz.rsi_membership(features["rsi"]),
        "adx": fz.adx_membership(features["adx"]),
        "bbands": fz.bollinger_membership(features["bb_position"], features["bb_width"]),
        "stoch": fz.stochastic_membership(features["stoch_k"]),
        "psar": fz.psar_membership(features["psar_position"]),
        "volume": fz.volume_membership(features["volume_ratio"]),
        "sma": fz.sma_distance_membership(features["sma_distance"]),
    }
    assert set(scores.memberships) == set(expected)
    for key, values in expected.items():
        np.testing.assert_array_equal(scores.memberships[key], values, err_msg=key)
    hand_ft = sum(SEED_WEIGHTS[k] * expected[k] for k in SEED_WEIGHTS)
    np.testing.assert_allclose(scores.fuzzy_confidence, hand_ft, atol=1e-12)
    np.testing.assert_allclose(scores.confidence, 0.2 * 0.5 + 0.8 * hand_ft, atol=1e-12)


def test_score_bars_neural_and_weight():
    features = _features(4)
    neural = np.array([0.0, 0.25, 0.5, 1.0])
    scores = score_bars(features, neural=neural, neural_weight=0.4)
    np.testing.assert_allclose(
        scores.confidence, 0.4 * neural + 0.6 * scores.fuzzy_confidence, atol=1e-15
    )
    with pytest.raises(ValueError, match="neural has shape"):
        score_bars(features, neural=np.zeros(3))


def test_score_bars_non_default_breakpoints_and_weights():
    features = _features(5)
    points = MembershipBreakpoints(vix_calm=15, vix_panic=25, rsi_neutral_low=30)
    only_vix = dict.fromkeys(SEED_WEIGHTS, 0.0) | {"regime": 1.0}
    scores = score_bars(features, only_vix, points)
    expected = fz.vix_membership(features["vix"], calm=15, panic=25)
    np.testing.assert_allclose(scores.fuzzy_confidence, expected, atol=1e-15)
    np.testing.assert_array_equal(
        scores.memberships["rsi"], fz.rsi_membership(features["rsi"], neutral_low=30)
    )


def test_score_bars_warm_up_nan_gives_nan_confidence_on_that_bar():
    features = _features(3)
    features["adx"] = np.array([np.nan, 20.0, 20.0])
    scores = score_bars(features)
    assert np.isnan(scores.memberships["adx"][0])
    assert np.isnan(scores.fuzzy_confidence[0]) and np.isnan(scores.confidence[0])
    assert not np.any(np.isnan(scores.confidence[1:]))
    np.testing.assert_array_equal(dynamic_contracts(scores.confidence, 10)[0], 0)


def test_score_bars_results_are_read_only():
    scores = score_bars(_features(3))
    with pytest.raises(ValueError, match="read-only"):
        scores.confidence[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        scores.memberships["rsi"][0] = 1.0
    with pytest.raises(TypeError):
        scores.memberships["rsi"] = np.zeros(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scores.confidence = np.zeros(3)


def test_score_bars_input_errors():
    features = _features(3)
    del features["stoch_k"]
    with pytest.raises(ValueError, match="stoch_k"):
        score_bars(features)
    features = _features(3)
    features["rsi"] = np.zeros(4)
    with pytest.raises(ValueError, match="differ in shape"):
        score_bars(features)
    with pytest.raises(ValueError, match="vix_membership: calm"):
        score_bars(_features(3), breakpoints=MembershipBreakpoints(vix_calm=40))


def test_score_bars_scalar_features():
    scalars = {key: float(values[0]) for key, values in _features(1).items()}
    scores = score_bars(scalars)
    assert scores.confidence.shape == ()
    assert scores.confidence == pytest.approx(float(score_bars(_features(1)).confidence[0]), abs=1e-15)


def test_breakpoint_defaults_match_the_seed_and_the_config():
    points = MembershipBreakpoints()
    assert dataclasses.astuple(points) == (60, 12, 30, 40, 60, 25, 40, 0.7, 0.04, 30, 70, 0.8, 0.02)
    assert MembershipBreakpoints.from_fuzzy_config(FuzzyConfig()) == points
    custom = FuzzyConfig(vix_membership_calm=14.0, sma_distance_membership_zero=0.03)
    from_config = MembershipBreakpoints.from_fuzzy_config(custom)
    assert from_config.vix_calm == 14.0 and from_config.sma_distance_zero == 0.03


def test_feature_keys():
    assert FEATURE_KEYS == (
        "mtf_consensus", "iv_rank", "vix", "rsi", "adx", "bb_position", "bb_width",
        "stoch_k", "psar_position", "volume_ratio", "sma_distance",
    )


def test_a_backtest_worth_of_bars_is_array_at_once():
    n = 100_000
    rng = np.random.default_rng(3)
    features = {key: rng.uniform(0, 1, n) for key in FEATURE_KEYS}
    scores = score_bars(features)
    assert scores.confidence.shape == (n,)
    assert np.all((scores.confidence >= 0.1) & (scores.confidence <= 0.9))
