"""Black–Scholes–Merton prices and Greeks for European options with continuous rate and dividend yield.

Units: prices in dollars per share; ``T`` in years; ``r`` and ``q`` annualised, continuously
compounded; ``sigma`` a decimal. Greeks: delta per $1 of spot, gamma per $1, vega per one
volatility point (0.01), theta per calendar day (T/365), rho per one rate point (0.01).

The scalar kernel ``bsm_scalar`` is compiled with numba so that other numba kernels (the synthetic
chain, the implied-vol solver) price with exactly the same arithmetic.
"""
from __future__ import annotations

import math

from numba import njit

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@njit(cache=True, inline="always")
def norm_cdf(x: float) -> float:
    # erfc keeps full relative precision in the far tails, where 0.5*(1+erf) would cancel.
    return 0.5 * math.erfc(-x * SQRT_HALF)


@njit(cache=True, inline="always")
def norm_pdf(x: float) -> float:
    return INV_SQRT_2PI * math.exp(-0.5 * x * x)


@njit(cache=True)
def bsm_scalar(spot: float, strike: float, t_years: float, rate: float, div_yield: float,
               sigma: float, is_call: bool):
    """Return (price, delta, gamma, vega, theta, rho) for one option; inputs assumed valid."""
    sqrt_t = math.sqrt(t_years)
    sig_sqrt_t = sigma * sqrt_t
    disc_r = math.exp(-rate * t_years)
    disc_q = math.exp(-div_yield * t_years)
    d1 = (math.log(spot / strike) + (rate - div_yield + 0.5 * sigma * sigma) * t_years) / sig_sqrt_t
    d2 = d1 - sig_sqrt_t
    pdf_d1 = norm_pdf(d1)
    gamma = disc_q * pdf_d1 / (spot * sig_sqrt_t)
    vega = spot * disc_q * pdf_d1 * sqrt_t * 0.01
    decay = -spot * disc_q * pdf_d1 * sigma / (2.0 * sqrt_t)
    if is_call:
        n_d1 = norm_cdf(d1)
        n_d2 = norm_cdf(d2)
        price = spot * disc_q * n_d1 - strike * disc_r * n_d2
        delta = disc_q * n_d1
        theta = decay - rate * strike * disc_r * n_d2 + div_yield * spot * disc_q * n_d1
        rho = strike * t_years * disc_r * n_d2 * 0.01
    else:
        n_md1 = norm_cdf(-d1)
        n_md2 = norm_cdf(-d2)
        price = strike * disc_r * n_md2 - spot * disc_q * n_md1
        delta = -disc_q * n_md1
        theta = decay + rate * strike * disc_r * n_md2 - div_yield * spot * disc_q * n_md1
        rho = -strike * t_years * disc_r * n_md2 * 0.01
    return price, delta, gamma, vega, theta / 365.0, rho
