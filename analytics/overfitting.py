"""Overfitting statistics for the optimizer: the deflated Sharpe ratio (DSR) of the chosen
configuration and the probability of backtest overfitting (PBO) of the whole search.

Owns: ``expected_max_sharpe`` (the best Sharpe ratio luck alone is expected to produce among N
trials), ``probabilistic_sharpe_ratio`` (PSR), ``deflated_sharpe_ratio`` /
``deflated_sharpe_from_returns`` (PSR against that expected maximum) and
``probability_of_backtest_overfitting`` (combinatorially symmetric cross-validation, CSCV).

Written from the papers, numpy/scipy only:

* D. H. Bailey and M. López de Prado (2014), "The Deflated Sharpe Ratio: Correcting for Selection
  Bias, Backtest Overfitting and Non-Normality", Journal of Portfolio Management 40(5).
* D. H. Bailey, J. M. Borwein, M. López de Prado and Q. J. Zhu (2017), "The Probability of Backtest
  Overfitting", Journal of Computational Finance 20(4).

Conventions (so the numbers can be checked by hand against the papers):

* Every Sharpe ratio here is **per observation** (not annualised): mean / standard deviation of the
  per-period returns or P&L, risk-free rate 0, standard deviation with ddof 1. The PSR/DSR
  formulas are only valid in these units; to use an annualised figure divide it by
  √(periods per year) (and an annualised Sharpe *variance* by the periods per year).
* ``kurtosis`` is the raw (Pearson, non-excess) kurtosis: 3 for a normal distribution. Passing the
  excess (Fisher) kurtosis understates the fat-tail penalty.
* Skewness and kurtosis estimated from returns are the moment (biased) estimators of the paper,
  ``scipy.stats.skew`` / ``scipy.stats.kurtosis(fisher=False)`` with their defaults.

Bad input (non-finite numbers, too few observations, negative variances, inconsistent shapes)
raises ``ValueError`` naming the argument; nothing returns NaN silently.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from numbers import Integral, Real

import numpy as np
from scipy import stats

# The most CSCV combinations we evaluate: C(20, 10) = 184,756 (n_splits = 20). n_splits = 22
# would mean 705,432 combinations, far more than the statistic needs to be stable.
MAX_COMBINATIONS = 200_000
# A sample whose standard deviation is at most this fraction of its column's largest |value| is
# treated as constant (Sharpe 0). Rounding leaves a constant sample with a standard deviation of
# a few ulps instead of exactly 0, and mean / (a few ulps) would be an absurd Sharpe ratio.
ZERO_STD_RTOL = 1e-12
# Combinations per vectorised batch in the CSCV loop: bounds the (batch, S/2, N) temporaries to a
# few megabytes whatever the number of combinations.
_BATCH = 1024


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------

def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _integer(name: str, value, minimum: int) -> int:
    # bool is an Integral; True as a sample size is always a bug, so it is refused.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _finite_array(name: str, values, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), array.shape)
        where = where[0] if ndim == 1 else where
        raise ValueError(f"{name} must be finite; element {where} is {array[bad].flat[0]!r}")
    return array


# --------------------------------------------------------------------------------------------
# deflated Sharpe ratio (Bailey & López de Prado 2014)
# --------------------------------------------------------------------------------------------

def expected_max_sharpe(n_trials: int, sharpe_variance: float) -> float:
    """Expected maximum Sharpe ratio among ``n_trials`` independent trials whose true Sharpe is 0.

    SR0 = √V · ((1 − γ) Φ⁻¹(1 − 1/N) + γ Φ⁻¹(1 − 1/(N e))), with γ the Euler–Mascheroni constant
    (Bailey & López de Prado 2014, the False Strategy theorem). ``sharpe_variance`` V is the
    variance of the trials' Sharpe ratios, in the squared units of the Sharpe ratios compared
    against SR0 (per observation for the DSR; an annualised variance gives an annualised SR0).
    One trial involves no selection, so ``n_trials == 1`` gives exactly 0.
    """
    n_trials = _integer("n_trials", n_trials, 1)
    sharpe_variance = _finite("sharpe_variance", sharpe_variance)
    if sharpe_variance < 0.0:
        raise ValueError(f"sharpe_variance must be >= 0, got {sharpe_variance!r}")
    if n_trials == 1:
        # Φ⁻¹(0) = −inf: the formula is undefined at N = 1, and the maximum of one draw of a
        # zero-mean Sharpe is expected to be 0.
        return 0.0
    gamma = np.euler_gamma
    quantiles = (1.0 - gamma) * stats.norm.ppf(1.0 - 1.0 / n_trials) \
        + gamma * stats.norm.ppf(1.0 - 1.0 / (n_trials * math.e))
    return float(math.sqrt(sharpe_variance) * quantiles)


def probabilistic_sharpe_ratio(sharpe: float, benchmark_sharpe: float, n_observations: int,
                               skewness: float, kurtosis: float) -> float:
    """Probability that the true Sharpe ratio exceeds ``benchmark_sharpe`` (PSR), in [0, 1].

    PSR = Φ((SR − SR*) √(T − 1) / √(1 − γ3·SR + (γ4 − 1)/4 · SR²)).

    ``sharpe`` (SR) and ``benchmark_sharpe`` (SR*) are per observation, NOT annualised;
    ``n_observations`` (T) is the number of returns SR was estimated from (>= 2);
    ``skewness`` (γ3) and ``kurtosis`` (γ4) are those of the returns, the kurtosis raw
    (non-excess: 3 for normal returns). Negative skew and fat tails widen the standard error of SR
    and so lower the PSR of a positive Sharpe ratio.
    """
    sharpe = _finite("sharpe", sharpe)
    benchmark_sharpe = _finite("benchmark_sharpe", benchmark_sharpe)
    n_observations = _integer("n_observations", n_observations, 2)
    skewness = _finite("skewness", skewness)
    kurtosis = _finite("kurtosis", kurtosis)
    if kurtosis < 1.0:
        # Raw kurtosis is E[z⁴] >= (E[z²])² = 1 for any distribution.
        raise ValueError(f"kurtosis must be the raw (non-excess) kurtosis, >= 1; got {kurtosis!r}")
    # Variance of the SR estimator (times T − 1), from the asymptotic distribution of SR under
    # non-normal i.i.d. returns (Mertens 2002). Any real distribution has γ4 >= 1 + γ3², which
    # makes this quadratic in SR non-negative; a non-positive value means the moments are
    # inconsistent with each other.
    sr_variance = 1.0 - skewness * sharpe + (kurtosis - 1.0) / 4.0 * sharpe ** 2
    if not sr_variance > 0.0:
        raise ValueError(
            f"skewness {skewness!r} and kurtosis {kurtosis!r} are inconsistent (raw kurtosis must "
            f"be >= 1 + skewness²): the Sharpe ratio's variance 1 − γ3·SR + (γ4 − 1)/4·SR² is "
            f"{sr_variance!r} at SR = {sharpe!r}")
    z = (sharpe - benchmark_sharpe) * math.sqrt(n_observations - 1) / math.sqrt(sr_variance)
    return float(stats.norm.cdf(z))


@dataclass(frozen=True)
class DeflatedSharpe:
    """A deflated Sharpe ratio and the numbers it was computed from (Sharpe units per observation).

    ``dsr`` is the PSR of ``sharpe`` against ``expected_max_sharpe`` (SR0), the best Sharpe ratio
    expected from ``n_trials`` trials of zero skill: the probability that the chosen strategy's
    true Sharpe is positive after correcting for the selection among the trials. 0.95 is the
    conventional bar.
    """

    dsr: float
    expected_max_sharpe: float
    sharpe: float
    n_trials: int
    n_observations: int
    skewness: float
    kurtosis: float
    sharpe_variance: float


def deflated_sharpe_ratio(sharpe: float, n_observations: int, skewness: float, kurtosis: float,
                          n_trials: int, sharpe_variance: float) -> DeflatedSharpe:
    """Deflated Sharpe ratio of the best of ``n_trials`` trials (Bailey & López de Prado 2014).

    DSR = PSR(SR, SR0) with SR0 = ``expected_max_sharpe(n_trials, sharpe_variance)``.
    ``sharpe`` is the chosen trial's Sharpe ratio per observation, ``sharpe_variance`` the variance
    of all trials' per-observation Sharpe ratios, ``kurtosis`` raw (normal = 3). With one trial
    SR0 = 0 and the DSR is the PSR against a zero benchmark.
    """
    sr0 = expected_max_sharpe(n_trials, sharpe_variance)
    dsr = probabilistic_sharpe_ratio(sharpe, sr0, n_observations, skewness, kurtosis)
    return DeflatedSharpe(dsr=dsr, expected_max_sharpe=sr0, sharpe=float(sharpe),
                          n_trials=int(n_trials), n_observations=int(n_observations),
                          skewness=float(skewness), kurtosis=float(kurtosis),
                          sharpe_variance=float(sharpe_variance))


def deflated_sharpe_from_returns(returns: np.ndarray, trial_sharpes: np.ndarray) -> DeflatedSharpe:
    """DSR of a chosen strategy from its per-period ``returns`` and every trial's Sharpe ratio.

    ``returns``: the chosen strategy's per-period returns (or P&L; the Sharpe ratio is scale-free),
    1-D, at least 2 finite values, not constant. SR = mean / std (ddof 1), skewness and raw
    kurtosis by ``scipy.stats`` (moment estimators, ``fisher=False``).
    ``trial_sharpes``: the per-observation (non-annualised) Sharpe ratio of every trial of the
    search, the chosen one included; N = its length, V = its variance (ddof 1; 0 for one trial,
    where no selection took place).
    """
    returns = _finite_array("returns", returns, 1)
    trial_sharpes = _finite_array("trial_sharpes", trial_sharpes, 1)
    if returns.size < 2:
        raise ValueError(f"returns needs at least 2 observations, got {returns.size}")
    if trial_sharpes.size < 1:
        raise ValueError("trial_sharpes is empty: the search needs at least 1 trial")
    std = float(np.std(returns, ddof=1))
    if not std > ZERO_STD_RTOL * float(np.max(np.abs(returns))):
        raise ValueError("returns are constant: the Sharpe ratio is undefined")
    sharpe = float(np.mean(returns)) / std
    skewness = float(stats.skew(returns))
    kurtosis = float(stats.kurtosis(returns, fisher=False))
    variance = float(np.var(trial_sharpes, ddof=1)) if trial_sharpes.size > 1 else 0.0
    return deflated_sharpe_ratio(sharpe, returns.size, skewness, kurtosis,
                                 trial_sharpes.size, variance)


# --------------------------------------------------------------------------------------------
# probability of backtest overfitting (Bailey, Borwein, López de Prado & Zhu 2017)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PBOResult:
    """Outcome of CSCV; arrays have one entry per combination, in ``in_sample_blocks`` order.

    ``pbo``: share of combinations whose in-sample best column ranks at or below the median
    out of sample (logit <= 0). ``logits``: λ = ln(ω / (1 − ω)), ω = OOS rank / (N + 1).
    ``is_performance`` / ``oos_performance``: the chosen column's metric in sample and out of
    sample (the performance-degradation pairs). ``best_in_sample``: the chosen column index.
    ``in_sample_blocks``: (n_combinations, n_splits / 2) block indices forming the in-sample half,
    in ``itertools.combinations`` order; blocks are the contiguous row ranges of
    ``np.array_split(rows, n_splits)``. ``prob_oos_loss``: share of combinations whose chosen
    column has a negative OOS metric.
    """

    pbo: float
    logits: np.ndarray
    n_combinations: int
    n_splits: int
    is_performance: np.ndarray
    oos_performance: np.ndarray
    best_in_sample: np.ndarray
    in_sample_blocks: np.ndarray
    prob_oos_loss: float


def _block_aggregates(performance: np.ndarray, bounds: np.ndarray):
    """Per-block row count, mean and sum of squared deviations from the block mean, (S, N) each.

    Deviations from the block's own mean (two passes inside a block) rather than raw sums of
    squares: Σx² − (Σx)²/n cancels catastrophically when a column's mean is large against its
    spread, e.g. a configuration whose P&L is a constant 0 for a whole half.
    """
    counts = np.diff(bounds).astype(np.float64)
    means = np.add.reduceat(performance, bounds[:-1], axis=0) / counts[:, None]
    row_block = np.repeat(np.arange(counts.size), np.diff(bounds))
    deviations = performance - means[row_block]
    m2 = np.add.reduceat(deviations * deviations, bounds[:-1], axis=0)
    return counts, means, m2


def _half_sharpe(idx: np.ndarray, counts: np.ndarray, means: np.ndarray, m2: np.ndarray,
                 zero_std: np.ndarray) -> np.ndarray:
    """Sharpe ratio (per row, ddof 1) of every column over the union of blocks ``idx`` (k, S/2).

    Combines block aggregates with the parallel-variance identity
    M2 = Σ_b M2_b + Σ_b n_b (mean_b − mean)², the between-block term computed from differences
    (not as Σ n_b mean_b² − n mean²) for the same cancellation reason as in ``_block_aggregates``.
    Returns (k, N).
    """
    n_b = counts[idx]                                   # (k, h)
    n = n_b.sum(axis=1)                                 # (k,)
    block_means = means[idx]                            # (k, h, N)
    mean = np.einsum("kh,khn->kn", n_b, block_means) / n[:, None]
    spread = block_means - mean[:, None, :]
    between = np.einsum("kh,khn->kn", n_b, spread * spread)
    variance = (m2[idx].sum(axis=1) + between) / (n - 1.0)[:, None]
    std = np.sqrt(variance)
    constant = std <= zero_std                          # zero_std broadcasts over (N,)
    # A constant sample (e.g. a configuration that never traded there) scores 0: it neither
    # earned nor lost, which ranks it between the winners and the losers.
    return np.where(constant, 0.0, mean / np.where(constant, 1.0, std))


def _oos_rank(chosen_oos: np.ndarray, oos: np.ndarray) -> np.ndarray:
    """Rank (1 = worst, N = best) of the chosen column's OOS metric among all N; ties average."""
    less = (oos < chosen_oos[:, None]).sum(axis=1)
    equal = (oos == chosen_oos[:, None]).sum(axis=1)   # includes the chosen column itself
    return less + (equal + 1) / 2.0


def probability_of_backtest_overfitting(
        performance: np.ndarray, n_splits: int = 16,
        metric: Callable[[np.ndarray], np.ndarray] | None = None) -> PBOResult:
    """Probability of backtest overfitting by combinatorially symmetric cross-validation (CSCV).

    ``performance``: T×N matrix, rows time periods in time order (daily P&L or returns), columns
    the N trial configurations (N >= 2), all finite. The rows are cut into ``n_splits`` (S, even,
    2 <= S <= T) contiguous blocks (``np.array_split``: when S does not divide T the first T mod S
    blocks get one row more; no row is dropped). For each of the C(S, S/2) ways of choosing S/2
    blocks as in-sample (the other S/2 are out-of-sample), the column with the best in-sample
    metric is chosen (the lowest index on a tie), its out-of-sample rank r among the N columns is
    taken (1 = worst; tied values share their average rank), ω = r / (N + 1) and
    λ = ln(ω / (1 − ω)). PBO is the share of combinations with λ <= 0, i.e. the in-sample best at
    or below the out-of-sample median. Noise gives PBO ≈ 0.5; genuine, persistent skill gives ≈ 0.

    ``metric``: None for the Sharpe ratio per row (mean / std, ddof 1, risk-free 0), computed from
    per-block aggregates so that S = 16 (12,870 combinations) stays fast; a column constant over a
    half (std <= 1e-12 × the column's largest |value|) scores 0 there. Each half then needs at
    least 2 rows. Otherwise a callable taking the (rows, N) sub-matrix of one half (its rows in
    time order) and returning N scores, higher is better; NaN scores are refused, ±inf allowed.
    At most ``MAX_COMBINATIONS`` combinations (S <= 20). Deterministic: no randomness anywhere.
    """
    performance = _finite_array("performance", performance, 2)
    n_rows, n_cols = performance.shape
    n_splits = _integer("n_splits", n_splits, 2)
    if n_splits % 2:
        raise ValueError(f"n_splits must be even, got {n_splits}")
    if n_splits > n_rows:
        raise ValueError(f"n_splits ({n_splits}) must be <= the number of rows of performance "
                         f"({n_rows}): every block needs at least one row")
    if n_cols < 2:
        raise ValueError(f"performance needs at least 2 columns (trials) to rank, got {n_cols}")
    half = n_splits // 2
    n_combinations = math.comb(n_splits, half)
    if n_combinations > MAX_COMBINATIONS:
        raise ValueError(f"n_splits = {n_splits} gives {n_combinations:,} combinations, more than "
                         f"{MAX_COMBINATIONS:,}; use n_splits <= 20")
    if metric is not None and not callable(metric):
        raise ValueError(f"metric must be None or a callable, got {metric!r}")

    sizes = np.array([len(b) for b in np.array_split(np.arange(n_rows), n_splits)])
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    if metric is None and np.sort(sizes)[:half].sum() < 2:
        raise ValueError(f"performance has too few rows ({n_rows}) for n_splits = {n_splits}: the "
                         f"Sharpe ratio of a half needs at least 2 rows")

    # itertools.combinations is lexicographic, so combination i and combination C − 1 − i are
    # complements: the out-of-sample half of one is the in-sample half of the other. Every half
    # is therefore scored once, and the first C/2 combinations (those holding block 0) drive it.
    in_sample = np.array(list(combinations(range(n_splits), half)), dtype=np.intp)
    mirrored = np.sort(np.concatenate((in_sample, in_sample[::-1]), axis=1), axis=1)
    assert (mirrored == np.arange(n_splits)).all(), "combinations are not complementary"

    if metric is None:
        counts, means, m2 = _block_aggregates(performance, bounds)
        zero_std = ZERO_STD_RTOL * np.abs(performance).max(axis=0)

        def score(idx: np.ndarray) -> np.ndarray:
            return _half_sharpe(idx, counts, means, m2, zero_std)
    else:
        row_block = np.repeat(np.arange(n_splits), sizes)

        def score(idx: np.ndarray) -> np.ndarray:
            out = np.empty((idx.shape[0], n_cols))
            for k, blocks in enumerate(idx):
                values = np.asarray(metric(performance[np.isin(row_block, blocks)]),
                                    dtype=np.float64)
                if values.shape != (n_cols,):
                    raise ValueError(f"metric must return {n_cols} scores (one per column), got "
                                     f"shape {values.shape}")
                if np.isnan(values).any():
                    raise ValueError(f"metric returned NaN for in-sample blocks {blocks.tolist()}")
                out[k] = values
            return out

    chosen = np.empty(n_combinations, dtype=np.intp)
    is_perf = np.empty(n_combinations)
    oos_perf = np.empty(n_combinations)
    ranks = np.empty(n_combinations)
    for start in range(0, n_combinations // 2, _BATCH):
        first = np.arange(start, min(start + _BATCH, n_combinations // 2))
        second = n_combinations - 1 - first             # the complementary halves
        a, b = score(in_sample[first]), score(in_sample[second])
        for pos, is_scores, oos_scores in ((first, a, b), (second, b, a)):
            best = np.argmax(is_scores, axis=1)
            rows = np.arange(best.size)
            chosen[pos] = best
            is_perf[pos] = is_scores[rows, best]
            oos_perf[pos] = oos_scores[rows, best]
            ranks[pos] = _oos_rank(oos_scores[rows, best], oos_scores)

    omega = ranks / (n_cols + 1)
    logits = np.log(omega / (1.0 - omega))
    # λ <= 0 ⇔ ω <= 1/2 ⇔ 2r <= N + 1; ranks are multiples of 1/2, so this comparison is exact
    # where the logit of a median rank could round to ±1e-17.
    overfit = 2.0 * ranks <= n_cols + 1
    return PBOResult(pbo=float(overfit.mean()), logits=logits, n_combinations=n_combinations,
                     n_splits=n_splits, is_performance=is_perf, oos_performance=oos_perf,
                     best_in_sample=chosen, in_sample_blocks=in_sample,
                     prob_oos_loss=float((oos_perf < 0.0).mean()))
