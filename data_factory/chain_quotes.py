"""What a vendor chain snapshot lacks, computed the same way for every real-data source (the live
Alpaca feed, a chain store): implied volatility solved from the mid where the vendor gives none,
Greeks from Black-Scholes-Merton where the vendor's are incomplete, a confidence per row saying
which, and the chain's 30-day ATM IV index. European formulas on American SPY contracts: the
sources say so in their ``describe()``."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from analytics.black_scholes import bsm_greeks
from analytics.implied_vol import implied_volatility

# iv_conf of a row by where its IV came from.
VENDOR_IV_CONF = 1.0
COMPUTED_IV_CONF = 0.5
NO_IV_CONF = 0.0


class CompletedQuotes(NamedTuple):
    iv: np.ndarray            # vendor IV where positive, else solved from the mid, else NaN
    iv_conf: np.ndarray       # VENDOR_IV_CONF / COMPUTED_IV_CONF / NO_IV_CONF
    greeks: np.ndarray        # (n, 5): delta, gamma, theta, vega, rho
    solved: np.ndarray        # bool: rows whose IV was solved from the mid (attempted)
    incomplete: np.ndarray    # bool: rows whose vendor Greeks were incomplete (replaced by the model's)


def complete_iv_and_greeks(mid, spot, strike, t_years, rate, dividend_yield, is_call, vendor_iv,
                           vendor_greeks) -> CompletedQuotes:
    """Per row: the vendor's IV where positive, else the IV solved from a positive mid; the
    vendor's Greeks where all of ``vendor_greeks``' columns (delta, gamma, theta, vega[, rho]) are
    finite, else the model's at that IV (NaN without one). ``spot``, ``rate`` and
    ``dividend_yield`` are scalars or per-row arrays. Rho is the vendor's when given as a fifth
    column, the model's on computed rows, else NaN."""
    n = len(mid)
    spot, rate, dividend_yield = (np.broadcast_to(np.asarray(x, dtype=float), (n,))
                                  for x in (spot, rate, dividend_yield))
    iv = np.where(np.isfinite(vendor_iv) & (vendor_iv > 0), vendor_iv, np.nan)
    iv_conf = np.where(np.isfinite(iv), VENDOR_IV_CONF, NO_IV_CONF)
    solve = ~np.isfinite(iv) & np.isfinite(mid) & (mid > 0)
    if solve.any():
        solved = implied_volatility(mid[solve], spot[solve], strike[solve], t_years[solve], rate[solve],
                                    dividend_yield[solve], is_call[solve]).iv
        iv[solve] = solved
        iv_conf[solve] = np.where(np.isfinite(solved), COMPUTED_IV_CONF, NO_IV_CONF)
    vendor_greeks = np.asarray(vendor_greeks, dtype=float)
    greeks = np.full((n, 5), np.nan)
    greeks[:, :vendor_greeks.shape[1]] = vendor_greeks
    incomplete = ~np.isfinite(vendor_greeks).all(axis=1)
    greeks[incomplete] = np.nan
    compute = incomplete & np.isfinite(iv)
    if compute.any():
        model = bsm_greeks(spot[compute], strike[compute], t_years[compute], rate[compute], dividend_yield[compute],
                           iv[compute], is_call[compute])
        greeks[compute] = np.column_stack([model.delta, model.gamma, model.theta, model.vega, model.rho])
    return CompletedQuotes(iv, iv_conf, greeks, solve, incomplete)


def atm_iv_index(chain, days: int) -> float:
    """``days``-calendar-day ATM IV × 100 of a chain: per expiration the put/call average IV at the
    strike nearest the spot (among strikes with an IV), interpolated linearly in total variance
    between the expirations on either side (flat beyond the nearest one); NaN without any."""
    points = []
    for expiration in np.unique(chain.expiration):
        rows = np.flatnonzero((chain.expiration == expiration) & np.isfinite(chain.iv) & (chain.iv > 0))
        if not rows.size:
            continue
        strikes = chain.strike[rows]
        nearest = strikes[np.argmin(np.abs(strikes - chain.spot))]
        atm = rows[strikes == nearest]
        t_years = float(chain.t_years[rows[0]])
        if t_years > 0:
            points.append((t_years, float(np.mean(chain.iv[atm]))))
    if not points:
        return math.nan
    points.sort()
    target = days / 365.0
    below = [p for p in points if p[0] <= target]
    above = [p for p in points if p[0] >= target]
    if below and above:
        (t1, v1), (t2, v2) = below[-1], above[0]
        if t2 == t1:
            return 100.0 * v1
        w1, w2 = v1 * v1 * t1, v2 * v2 * t2
        w = w1 + (w2 - w1) * (target - t1) / (t2 - t1)
        return 100.0 * math.sqrt(max(w, 0.0) / target)
    return 100.0 * (below[-1][1] if below else above[0][1])
