"""GARCH(1,1) implied-volatility proxy for days without VIX (the embedded data before 2014).

The embedded VIX starts on 2014-01-03; the S&P 500 bars go back to 1999. For the earlier days this
module builds a stand-in for a 30-day implied volatility, in VIX points, from S&P 500 returns only:

1. Parameters. A GARCH(1,1) with constant mean and normal errors is fitted with ``arch`` at the
   start of every calendar month on all returns up to the previous session (an expanding window).
   No fit happens before ``warmup_returns`` returns exist.
2. Variance path. With that month's parameters the GARCH recursion is run over the returns up to
   each day *t* of the month, giving the one-step variance forecast for *t+1* known at *t*'s close.
3. 30-day variance. The GARCH term structure ``E_t[σ²_{t+k}] = ω·Σ_{j<k-1} φ^j + φ^{k-1}·σ²_{t+1}``
   (φ = α+β) is averaged over ``horizon_sessions`` sessions (21 ≈ 30 calendar days) and
   annualised with 252 sessions a year.
4. Risk premium. Implied vol is above expected realised vol (the variance risk premium), so the
   proxy is ``vrp_multiplier × sqrt(annualised 30-day variance)``.

The value for day *t* therefore uses no return after *t*: the fit ends before the month starts and
the recursion ends at *t*. ``vrp_multiplier = 1.2`` is an ASSUMPTION taken from the literature on the
variance risk premium (implied vol typically exceeds subsequently realised vol by a factor of about
1.1–1.4 for the S&P 500); it is deliberately NOT calibrated on the 2014–2018 VIX, because the
1999–2013 values must not depend on later data. The overlap with the real VIX is only used to
validate the proxy (see the tests).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from arch import arch_model
from arch.univariate import GARCH
from scipy.signal import lfilter

from data_factory.errors import DataError

SESSIONS_PER_YEAR = 252


@dataclass(frozen=True)
class GarchProxyConfig:
    """Settings of the GARCH implied-volatility proxy (see the module docstring)."""

    warmup_returns: int = 500        # returns needed before the first fit (≈ two years)
    horizon_sessions: int = 21       # ≈ 30 calendar days, the VIX horizon
    vrp_multiplier: float = 1.2      # implied / expected realised vol; literature assumption
    backcast_returns: int = 75       # arch's own backcast window (first 75 returns, weights 0.94^i)

    def __post_init__(self):
        if self.warmup_returns < 100:
            raise ValueError(f"warmup_returns must be at least 100, got {self.warmup_returns}")
        if self.horizon_sessions < 1:
            raise ValueError(f"horizon_sessions must be at least 1, got {self.horizon_sessions}")
        if not self.vrp_multiplier > 0:
            raise ValueError(f"vrp_multiplier must be positive, got {self.vrp_multiplier}")

    def as_dict(self) -> dict:
        return asdict(self)


def log_returns_pct(close: pd.Series) -> pd.Series:
    """Close-to-close log returns in percent, indexed by the later date (first date dropped)."""
    if (close <= 0).any() or close.isna().any():
        raise DataError("close prices for returns must be positive and not NaN")
    return (100.0 * np.log(close).diff()).iloc[1:].rename("return_pct")


def _fit_garch(returns_pct: np.ndarray, backcast: float) -> tuple[np.ndarray, bool]:
    """(mu, omega, alpha, beta) of a GARCH(1,1) fitted with arch, and whether the optimiser converged."""
    model = arch_model(returns_pct, mean="Constant", vol="GARCH", p=1, q=1, dist="normal",
                       rescale=False)
    with warnings.catch_warnings():
        # Convergence problems are reported through the returned flag, not as warnings.
        warnings.simplefilter("ignore")
        result = model.fit(disp="off", backcast=backcast, show_warning=False)
    return np.asarray(result.params, dtype=float), result.convergence_flag == 0


def one_step_variance(returns_pct: np.ndarray, params: np.ndarray, backcast: float) -> np.ndarray:
    """σ²_{t+1} known at the close of each day t, for the given GARCH(1,1) parameters.

    Element t is ``ω + α·ε_t² + β·σ²_t``, with arch's start ``σ²_0 = ω + (α+β)·backcast``. The
    recursion is linear in σ², so scipy's IIR filter runs it in C instead of a Python loop.
    """
    mu, omega, alpha, beta = params
    residual_sq = (returns_pct - mu) ** 2
    first_variance = omega + (alpha + beta) * backcast
    drive = omega + alpha * residual_sq
    filtered, _ = lfilter([1.0], [1.0, -beta], drive, zi=[beta * first_variance])
    return filtered


def average_variance_coefficients(omega: float, persistence: float, horizon: int) -> tuple[float, float]:
    """(a, b) with mean_{k=1..H} E_t[σ²_{t+k}] = a + b·σ²_{t+1} for a GARCH(1,1).

    Summed term by term instead of the closed form ω/(1-φ)… so that φ ≥ 1 (IGARCH-like fits) needs
    no special case.
    """
    intercept, slope = 0.0, 1.0        # E_t[σ²_{t+1}] = 0 + 1·σ²_{t+1}
    total_intercept, total_slope = intercept, slope
    for _ in range(horizon - 1):
        intercept, slope = omega + persistence * intercept, persistence * slope
        total_intercept += intercept
        total_slope += slope
    return total_intercept / horizon, total_slope / horizon


def _month_starts(dates: pd.DatetimeIndex) -> np.ndarray:
    month = dates.to_period("M")
    return np.flatnonzero(np.r_[True, month[1:] != month[:-1]])


def proxy_first_date(return_dates: pd.DatetimeIndex,
                     config: GarchProxyConfig = GarchProxyConfig()) -> pd.Timestamp:
    """First date the proxy has a value: the first month start after the warm-up (no fitting needed)."""
    starts = _month_starts(return_dates)
    eligible = starts[starts >= config.warmup_returns]
    if len(eligible) == 0:
        raise DataError(f"GARCH proxy: no month starts after the {config.warmup_returns}-return warm-up")
    return pd.Timestamp(return_dates[eligible[0]])


def garch_iv_proxy(returns_pct: pd.Series, config: GarchProxyConfig = GarchProxyConfig()) -> pd.DataFrame:
    """GARCH implied-vol proxy (VIX points) for each return date from the first fitted month on.

    ``returns_pct``: log returns in percent indexed by session date (see ``log_returns_pct``).
    Columns: ``iv_proxy`` (VIX points, with the risk premium), ``garch_vol_30d`` (annualised %,
    expected realised), ``fit_through`` (last return date used by the parameters), ``mu``,
    ``omega``, ``alpha``, ``beta``, ``fit_converged``. Truncating the returns after any day leaves
    every value up to that day unchanged (no look-ahead).
    """
    if not isinstance(returns_pct.index, pd.DatetimeIndex):
        raise DataError("returns_pct must be indexed by session dates (DatetimeIndex)")
    if returns_pct.isna().any():
        raise DataError(f"returns_pct has NaN on {returns_pct.index[returns_pct.isna()][0].date()}")
    if not returns_pct.index.is_monotonic_increasing or returns_pct.index.has_duplicates:
        raise DataError("returns_pct dates must be strictly increasing")
    values = returns_pct.to_numpy(dtype=float)
    dates = returns_pct.index
    if len(values) <= config.warmup_returns:
        raise DataError(f"GARCH proxy needs more than {config.warmup_returns} returns, got {len(values)}")

    # arch's backcast from the first returns only, so it never changes when later data is added.
    early = values[:config.backcast_returns]
    backcast = GARCH().backcast(early - early.mean())

    month_starts = _month_starts(dates)
    month_ends = np.r_[month_starts[1:], len(values)]
    rows = []
    for start, end in zip(month_starts, month_ends):
        if start < config.warmup_returns:
            continue
        params, converged = _fit_garch(values[:start], backcast)
        mu, omega, alpha, beta = params
        next_day_variance = one_step_variance(values[:end], params, backcast)[start:end]
        a, b = average_variance_coefficients(omega, alpha + beta, config.horizon_sessions)
        vol_30d = np.sqrt(SESSIONS_PER_YEAR * (a + b * next_day_variance))
        rows.append(pd.DataFrame({
            "iv_proxy": config.vrp_multiplier * vol_30d,
            "garch_vol_30d": vol_30d,
            "fit_through": dates[start - 1],
            "mu": mu, "omega": omega, "alpha": alpha, "beta": beta,
            "fit_converged": converged,
        }, index=dates[start:end]))
    if not rows:
        raise DataError(f"GARCH proxy: no month starts after the {config.warmup_returns}-return warm-up")
    frame = pd.concat(rows)
    frame.index.name = "date"
    return frame
