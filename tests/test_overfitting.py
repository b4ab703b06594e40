"""analytics/overfitting.py: the deflated Sharpe ratio against the numerical example of Bailey &
López de Prado (2014) and against independent computations (numerical integration, hand-worked
PSR), and CSCV's probability of backtest overfitting on pure noise (≈ 0.5), on a planted edge
(≈ 0) and against a direct row-slicing computation of every combination."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import integrate, stats

from analytics.overfitting import (
    DeflatedSharpe,
    _block_aggregates,
    _half_sharpe,
    PBOResult,
    deflated_sharpe_from_returns,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
    probability_of_backtest_overfitting,
)

NAN = float("nan")
INF = float("inf")

# --------------------------------------------------------------------------------------------
# deflated Sharpe ratio
# --------------------------------------------------------------------------------------------

# Bailey & López de Prado (2014), "The Deflated Sharpe Ratio", section "A numerical example":
# annualised SR 2.5 over T = 1250 daily observations (250 a year), skewness −3, raw kurtosis 10,
# N = 100 trials whose annualised Sharpe ratios have variance 0.5.
PAPER = dict(sharpe=2.5 / math.sqrt(250), n_observations=1250, skewness=-3.0, kurtosis=10.0,
             n_trials=100, sharpe_variance=0.5 / 250)


def test_paper_numerical_example():
    """The paper reports SR0 ≈ 0.1132 per observation and DSR ≈ 0.9004.

    The brief that commissioned this module also quoted SR0 ≈ 1.7907 annualised; the formula gives
    0.113172 × √250 = 1.78941 (and the paper's rounded 0.1132 × √250 = 1.7898), so 1.7894 is what
    is pinned here. The DSR's z-score, worked by hand from the same inputs:
    (0.158114 − 0.113172)·√1249 / √(1 + 3·0.158114 + 9/4·0.158114²) = 1.28382 → Φ = 0.90040.
    """
    result = deflated_sharpe_ratio(**PAPER)
    assert isinstance(result, DeflatedSharpe)
    assert result.expected_max_sharpe == pytest.approx(0.1132, abs=1e-4)
    assert result.expected_max_sharpe * math.sqrt(250) == pytest.approx(1.7894, abs=1e-3)
    assert result.dsr == pytest.approx(0.9004, abs=1e-3)
    # the record carries what it was computed from
    assert result.sharpe == pytest.approx(2.5 / math.sqrt(250))
    assert (result.n_trials, result.n_observations) == (100, 1250)
    assert (result.skewness, result.kurtosis, result.sharpe_variance) == (-3.0, 10.0, 0.002)
    # annualised SR0 straight from the annualised variance: same formula, other units
    assert expected_max_sharpe(100, 0.5) == pytest.approx(1.7894, abs=1e-3)
    with pytest.raises(AttributeError):  # frozen
        result.dsr = 1.0


@pytest.mark.parametrize("n_trials, rel", [(10, 0.03), (100, 0.01), (1000, 0.005), (10000, 0.003)])
def test_expected_max_sharpe_approximates_the_expected_maximum_of_normals(n_trials, rel):
    """SR0/√V approximates E[max of N standard normals]; the exact value by integrating
    x · N φ(x) Φ(x)^(N−1), independently of the closed form under test."""
    exact, _ = integrate.quad(
        lambda x: x * n_trials * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n_trials - 1),
        -12.0, 12.0, limit=200)
    variance = 0.04
    assert expected_max_sharpe(n_trials, variance) == pytest.approx(0.2 * exact, rel=rel)


def test_expected_max_sharpe_edges():
    assert expected_max_sharpe(1, 0.5) == 0.0
    assert expected_max_sharpe(50, 0.0) == 0.0
    values = [expected_max_sharpe(n, 0.01) for n in (2, 5, 20, 100, 1000)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # SR0 scales with the standard deviation of the trials' Sharpe ratios
    assert expected_max_sharpe(100, 0.04) == pytest.approx(2.0 * expected_max_sharpe(100, 0.01))


def test_psr_hand_worked_normal_case():
    # normal returns (γ3 = 0, γ4 = 3), SR = 0.1, T = 101: z = 0.1·√100 / √(1 + 0.5·0.01)
    z = 0.1 * 10.0 / math.sqrt(1.005)
    expected = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    assert probabilistic_sharpe_ratio(0.1, 0.0, 101, 0.0, 3.0) == pytest.approx(expected, rel=1e-12)
    assert probabilistic_sharpe_ratio(0.07, 0.07, 500, -1.0, 6.0) == pytest.approx(0.5)
    # negative skew and fat tails lower the confidence in a positive Sharpe ratio
    normal = probabilistic_sharpe_ratio(0.1, 0.0, 252, 0.0, 3.0)
    assert probabilistic_sharpe_ratio(0.1, 0.0, 252, -2.0, 3.0 + 4.0) < normal
    assert probabilistic_sharpe_ratio(0.1, 0.0, 252, 0.0, 12.0) < normal


def test_dsr_increases_with_sharpe_and_decreases_with_trials():
    base = dict(n_observations=1250, skewness=-1.0, kurtosis=5.0, sharpe_variance=0.002)
    by_sharpe = [deflated_sharpe_ratio(sr, n_trials=50, **base).dsr
                 for sr in (0.05, 0.08, 0.1, 0.15)]
    assert all(b > a for a, b in zip(by_sharpe, by_sharpe[1:]))
    by_trials = [deflated_sharpe_ratio(0.12, n_trials=n, **base).dsr for n in (1, 2, 10, 100, 1000)]
    assert all(b < a for a, b in zip(by_trials, by_trials[1:]))


def test_one_trial_dsr_is_psr_against_zero():
    result = deflated_sharpe_ratio(0.08, 500, -0.5, 4.0, n_trials=1, sharpe_variance=0.003)
    assert result.expected_max_sharpe == 0.0
    assert result.dsr == probabilistic_sharpe_ratio(0.08, 0.0, 500, -0.5, 4.0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_observations=1), "n_observations"),
    (dict(n_observations=0), "n_observations"),
    (dict(n_observations=100.0), "n_observations"),
    (dict(n_observations=True), "n_observations"),
    (dict(sharpe_variance=-0.001), "sharpe_variance"),
    (dict(sharpe_variance=NAN), "sharpe_variance"),
    (dict(sharpe=NAN), "sharpe"),
    (dict(sharpe=INF), "sharpe"),
    (dict(skewness=NAN), "skewness"),
    (dict(kurtosis=INF), "kurtosis"),
    (dict(kurtosis=0.5), "kurtosis"),           # raw kurtosis is never below 1
    (dict(n_trials=0), "n_trials"),
    (dict(n_trials=2.5), "n_trials"),
])
def test_dsr_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        deflated_sharpe_ratio(**{**PAPER, **kwargs})


def test_psr_bad_input():
    with pytest.raises(ValueError, match="benchmark_sharpe"):
        probabilistic_sharpe_ratio(0.1, NAN, 100, 0.0, 3.0)
    # skewness 3 with raw kurtosis 2 violates γ4 >= 1 + γ3²; the SR variance goes negative
    with pytest.raises(ValueError, match="inconsistent"):
        probabilistic_sharpe_ratio(1.0, 0.0, 100, 3.0, 2.0)


def test_dsr_from_returns_matches_hand_moments():
    rng = np.random.default_rng(7)
    returns = 0.001 + 0.01 * rng.standard_t(df=5, size=750) - 0.02 * (rng.random(750) < 0.02)
    trial_sharpes = rng.normal(0.0, 0.04, size=40)
    result = deflated_sharpe_from_returns(returns, trial_sharpes)
    # moments written out (population moments, as in the paper), independently of scipy
    mean = returns.mean()
    dev = returns - mean
    m2 = (dev ** 2).mean()
    sharpe = mean / math.sqrt((dev ** 2).sum() / (returns.size - 1))
    skew = (dev ** 3).mean() / m2 ** 1.5
    kurt = (dev ** 4).mean() / m2 ** 2
    variance = ((trial_sharpes - trial_sharpes.mean()) ** 2).sum() / (trial_sharpes.size - 1)
    assert result.sharpe == pytest.approx(sharpe, rel=1e-12)
    assert result.skewness == pytest.approx(skew, rel=1e-9)
    assert result.kurtosis == pytest.approx(kurt, rel=1e-9)
    assert result.kurtosis > 3.5  # fat-tailed sample: a raw kurtosis, not an excess one
    assert result.sharpe_variance == pytest.approx(variance, rel=1e-12)
    assert (result.n_trials, result.n_observations) == (40, 750)
    expected = deflated_sharpe_ratio(sharpe, 750, skew, kurt, 40, variance)
    assert result.dsr == pytest.approx(expected.dsr, rel=1e-9)
    assert 0.0 < result.dsr < 1.0
    # one trial: no selection, V = 0 and the DSR is the PSR against 0
    single = deflated_sharpe_from_returns(returns, trial_sharpes[:1])
    assert single.sharpe_variance == 0.0 and single.expected_max_sharpe == 0.0
    assert single.dsr == pytest.approx(probabilistic_sharpe_ratio(sharpe, 0.0, 750, skew, kurt))


@pytest.mark.parametrize("returns, trials, name", [
    (np.array([0.01, NAN, 0.02]), np.array([0.1, 0.2]), "returns"),
    (np.array([[0.01, 0.02], [0.0, 0.01]]), np.array([0.1, 0.2]), "returns"),
    (np.array([0.01]), np.array([0.1, 0.2]), "returns"),
    (np.full(20, 0.003), np.array([0.1, 0.2]), "constant"),
    (np.array([0.01, -0.02, 0.03]), np.array([]), "trial_sharpes"),
    (np.array([0.01, -0.02, 0.03]), np.array([0.1, INF]), "trial_sharpes"),
])
def test_dsr_from_returns_bad_input(returns, trials, name):
    with pytest.raises(ValueError, match=name):
        deflated_sharpe_from_returns(returns, trials)


# --------------------------------------------------------------------------------------------
# probability of backtest overfitting
# --------------------------------------------------------------------------------------------

def direct_sharpe(sub: np.ndarray) -> np.ndarray:
    """Per-column Sharpe by slicing rows: the reference for the block-aggregate computation
    (same convention: ddof 1, a constant column scores 0)."""
    std = sub.std(axis=0, ddof=1)
    constant = std <= 1e-12 * np.abs(sub).max(axis=0)
    return np.where(constant, 0.0, sub.mean(axis=0) / np.where(constant, 1.0, std))


def block_rows(n_rows: int, n_splits: int, blocks) -> np.ndarray:
    parts = np.array_split(np.arange(n_rows), n_splits)
    return np.concatenate([parts[b] for b in sorted(blocks)])


def noise(seed: int, n_rows: int = 1000, n_cols: int = 100) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_rows, n_cols))


def test_noise_gives_pbo_near_half():
    result = probability_of_backtest_overfitting(noise(0))
    assert isinstance(result, PBOResult)
    assert (result.n_splits, result.n_combinations) == (16, 12870)
    assert 0.3 < result.pbo < 0.7                       # 0.477 for this seed
    assert result.logits.shape == result.is_performance.shape == result.oos_performance.shape \
        == result.best_in_sample.shape == (12870,)
    assert result.in_sample_blocks.shape == (12870, 8)
    # in-sample best of noise degrades out of sample: the IS maximum beats the OOS figure
    assert result.is_performance.mean() > result.oos_performance.mean() + 0.05
    assert abs(result.oos_performance.mean()) < 0.03
    assert result.pbo == pytest.approx(np.mean(result.logits <= 0.0))


def test_noise_pbo_across_seeds():
    # the PBO of one noise matrix is itself noisy (sd ≈ 0.16 across seeds): check the average
    at_default = [probability_of_backtest_overfitting(noise(seed)).pbo for seed in range(10)]
    assert 0.4 < np.mean(at_default) < 0.6             # 0.426 for seeds 0-9
    # many small problems pin the null value tighter (sd of this mean ≈ 0.013)
    small = [probability_of_backtest_overfitting(noise(seed, 400, 50), n_splits=8).pbo
             for seed in range(200)]
    assert 0.45 < np.mean(small) < 0.55                # 0.495


def test_planted_edge_gives_pbo_near_zero():
    performance = noise(0)
    performance[:, 17] += 0.25                          # a persistent drift of a quarter sd a day
    result = probability_of_backtest_overfitting(performance)
    assert result.pbo < 0.1                             # 0.0003
    assert np.mean(result.best_in_sample == 17) > 0.95
    assert np.median(result.logits) == pytest.approx(math.log(100 / 1))  # rank N of N+1
    assert result.prob_oos_loss < 0.01


def test_block_aggregates_equal_direct_slicing():
    """One combination by hand, then every combination via the callable-metric path, on a matrix
    built to break naive sums of squares (Σx² − (Σx)²/n): rows not divisible by S, a column with a
    huge offset against its spread, a column constant (0) for its first half and a column constant
    everywhere."""
    rng = np.random.default_rng(3)
    n_rows, n_splits = 103, 6
    performance = rng.normal(size=(n_rows, 7))
    performance[:, 1] = 1e6 + 0.01 * rng.normal(size=n_rows)   # Sharpe ≈ 1e8: always chosen
    performance[:, 4] = -1e6 + 0.01 * rng.normal(size=n_rows)  # Sharpe ≈ −1e8: never chosen
    performance[:52, 2] = 0.0                          # blocks 0-2: the first half
    performance[:, 3] = 0.1
    result = probability_of_backtest_overfitting(performance, n_splits=n_splits)
    assert result.n_combinations == 20

    k = 7                                               # blocks (0, 3, 4) in sample
    is_blocks = result.in_sample_blocks[k]
    np.testing.assert_array_equal(is_blocks, [0, 3, 4])
    oos_blocks = sorted(set(range(n_splits)) - set(is_blocks.tolist()))
    is_sharpe = direct_sharpe(performance[block_rows(n_rows, n_splits, is_blocks)])
    oos_sharpe = direct_sharpe(performance[block_rows(n_rows, n_splits, oos_blocks)])
    assert is_sharpe[3] == 0.0 and oos_sharpe[3] == 0.0

    # every column's Sharpe from the block aggregates, against the sliced rows. The offset columns
    # agree to ~1e-8 only: 1e6 + 0.01·z is itself stored to 1e-10, 1e-8 of its spread.
    sizes = [len(b) for b in np.array_split(np.arange(n_rows), n_splits)]
    counts, means, m2 = _block_aggregates(performance, np.cumsum([0] + sizes))
    zero_std = 1e-12 * np.abs(performance).max(axis=0)
    first_half = _half_sharpe(np.array([[0, 1, 2]]), counts, means, m2, zero_std)[0]
    assert first_half[2] == 0.0 and first_half[3] == 0.0   # constant there: exactly 0
    assert abs(first_half[0]) < 1.0 and first_half[1] > 1e7 and first_half[4] < -1e7
    for blocks, direct in ((is_blocks, is_sharpe), (np.array(oos_blocks), oos_sharpe)):
        aggregated = _half_sharpe(blocks[None, :], counts, means, m2, zero_std)[0]
        np.testing.assert_allclose(aggregated, direct, rtol=1e-6)
        plain = [0, 2, 3, 5, 6]
        np.testing.assert_allclose(aggregated[plain], direct[plain], rtol=1e-12, atol=1e-15)

    best = int(np.argmax(is_sharpe))
    assert best == 1
    assert result.best_in_sample[k] == best
    assert result.is_performance[k] == pytest.approx(is_sharpe[best], rel=1e-6)
    assert result.oos_performance[k] == pytest.approx(oos_sharpe[best], rel=1e-6)
    rank = 1 + np.sum(oos_sharpe < oos_sharpe[best])
    assert result.logits[k] == pytest.approx(math.log(rank / (8 - rank)))

    sliced = probability_of_backtest_overfitting(performance, n_splits=n_splits,
                                                 metric=direct_sharpe)
    np.testing.assert_array_equal(sliced.best_in_sample, result.best_in_sample)
    np.testing.assert_allclose(sliced.is_performance, result.is_performance, rtol=1e-6)
    np.testing.assert_allclose(sliced.oos_performance, result.oos_performance, rtol=1e-6)
    np.testing.assert_allclose(sliced.logits, result.logits, rtol=1e-12)
    assert sliced.pbo == result.pbo

    # without column 1 the choice is among ordinary columns: a tight match, and a real ranking
    rest = performance[:, [0, 2, 3, 4, 5, 6]]
    aggregated = probability_of_backtest_overfitting(rest, n_splits=n_splits)
    sliced = probability_of_backtest_overfitting(rest, n_splits=n_splits, metric=direct_sharpe)
    np.testing.assert_array_equal(sliced.best_in_sample, aggregated.best_in_sample)
    assert len(set(aggregated.best_in_sample.tolist())) > 1
    np.testing.assert_allclose(sliced.is_performance, aggregated.is_performance, rtol=1e-12)
    np.testing.assert_allclose(sliced.oos_performance, aggregated.oos_performance, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_array_equal(sliced.logits, aggregated.logits)
    assert sliced.pbo == aggregated.pbo


def test_constant_columns_score_zero_and_ties_share_their_rank():
    # three columns: a constant (Sharpe 0 everywhere), one always up, one always down. The
    # up-column wins every in-sample half and ranks 3 of 3 out of sample: λ = ln(3/1).
    t = np.arange(40, dtype=np.float64)
    up = 1.0 + 0.1 * np.sin(t)
    performance = np.column_stack([np.full(40, 0.25), up, -up])
    result = probability_of_backtest_overfitting(performance, n_splits=4)
    assert (result.best_in_sample == 1).all()
    np.testing.assert_allclose(result.logits, math.log(3.0))
    assert result.pbo == 0.0
    # two identical best columns: a tie in sample goes to the lower index, and out of sample the
    # pair shares rank 2.5 of 3, ω = 2.5/4
    tied = probability_of_backtest_overfitting(np.column_stack([-up, up, up]), n_splits=4)
    assert (tied.best_in_sample == 1).all()
    np.testing.assert_allclose(tied.logits, math.log(2.5 / 1.5))
    # all columns flat: everything scores 0, ranks (N+1)/2, λ = 0, counted as overfit
    flat = probability_of_backtest_overfitting(np.zeros((40, 3)), n_splits=4)
    np.testing.assert_array_equal(flat.is_performance, 0.0)
    assert flat.pbo == 1.0 and np.all(flat.logits == 0.0)


def test_deterministic_and_fast():
    performance = noise(11, n_rows=1250, n_cols=200)
    start = time.perf_counter()
    first = probability_of_backtest_overfitting(performance, n_splits=16)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"CSCV with T=1250, N=200, S=16 took {elapsed:.2f} s"
    second = probability_of_backtest_overfitting(performance.copy(), n_splits=16)
    assert first.pbo == second.pbo
    np.testing.assert_array_equal(first.logits, second.logits)


@pytest.mark.parametrize("performance, kwargs, name", [
    (np.zeros(50), {}, "performance"),                                  # 1-D
    (np.zeros((50, 1)), {}, "columns"),                                 # N < 2
    (np.where(np.eye(50, 4) > 0, NAN, 0.0), {}, "performance"),          # NaN
    (np.where(np.eye(50, 4) > 0, INF, 0.0), {}, "performance"),          # inf
    (np.zeros((50, 4)), dict(n_splits=5), "n_splits"),                  # odd
    (np.zeros((50, 4)), dict(n_splits=0), "n_splits"),
    (np.zeros((50, 4)), dict(n_splits=8.0), "n_splits"),
    (np.zeros((50, 4)), dict(n_splits=True), "n_splits"),
    (np.zeros((6, 4)), dict(n_splits=8), "n_splits"),                   # S > T
    (np.zeros((30, 4)), dict(n_splits=22), "n_splits"),                 # too many combinations
    (np.zeros((3, 4)), dict(n_splits=2), "too few rows"),               # a 1-row half
    (np.zeros((50, 4)), dict(metric=lambda sub: sub.mean()), "metric"),  # not one score per column
    (np.zeros((50, 4)), dict(metric=lambda sub: np.full(4, NAN)), "metric"),
    (np.zeros((50, 4)), dict(metric="sharpe"), "metric"),
])
def test_pbo_bad_input(performance, kwargs, name):
    with pytest.raises(ValueError, match=name):
        probability_of_backtest_overfitting(performance, **kwargs)
