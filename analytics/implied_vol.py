"""Implied volatility of European options under Black–Scholes–Merton: vectorised, safeguarded.

Owns: ``implied_volatility`` (arrays in, ``IVResult`` out), its numba per-option kernel
``implied_vol_scalar`` (callable from other numba code), and the ``IVReason`` codes.

Inputs and units are those of ``analytics.black_scholes``: price in dollars per share, ``t_years``
in years, ``rate``/``div_yield`` continuously compounded, ``is_call`` bools or 'C'/'P' strings;
all arguments broadcast together. The result ``iv`` is a decimal volatility (0.20 = 20 %).

Method (why not plain Newton on sigma). Plain Newton on the price is fast near the money but
diverges or crawls in the wings, where the price is exponentially flat in sigma, and loses digits
for in-the-money options, whose price is mostly intrinsic value. So each option is mapped to one
well-conditioned problem first:

1. Put–call parity turns the price into the price of the out-of-the-money option of the same
   strike: subtract the discounted intrinsic value ``max(±(S e^{-qT} − K e^{-rT}), 0)`` (exact in
   floating point when the two terms are within a factor 2). The no-arbitrage bounds are checked
   here.
2. That time value is normalised by ``sqrt(S e^{-qT} · K e^{-rT})``, leaving Black's formula in
   two numbers: log-moneyness ``x = ln(F/K) ≤ 0`` (a put is the call at ``−x``) and total
   volatility ``s = sigma sqrt(T)`` (the normalisation of Jäckel, "By Implication", 2006).
3. Halley's method (third order; its second derivative is free here) on ``g = ln b(x, s) − ln
   beta``. The logarithm makes the deep wings, where ``b ~ exp(−x²/2s²)``, nearly linear.
4. Start: ``s0 = 2√2 erfinv((beta − sinh(x/2)) / cosh(x/2))``, exact at the money and within
   a few per cent wherever the root is above about half the inflection point ``sqrt(2|x|)``.
   Far out of the money it overshoots, so after the first evaluation a fitted asymptotic model
   of ``ln b`` (``−x²/2s² + k ln s``) jumps close to the root. Typical cost: 3 price evaluations
   per option.
5. Every step is safeguarded by a bracket that starts as ``[sigma_min, sigma_max] · sqrt(T)`` and
   shrinks with each evaluation; a step that leaves it becomes a geometric bisection (or a single
   probe of the range end, which decides ``IV_BELOW_RANGE`` / ``IV_ABOVE_RANGE``), so the
   iteration cannot diverge.

NaN policy. The solver never raises for bad numbers: an element that cannot be solved gets
``iv = NaN`` and a reason code (int8). Codes 1–6 are those of ``PricingReason`` (code 4 does not
occur: sigma is the output here):

====  =======================  ==============================================================
code  name                     meaning
====  =======================  ==============================================================
0     OK                       solved
1     NON_POSITIVE_SPOT        spot <= 0
2     NON_POSITIVE_STRIKE      strike <= 0
3     NON_POSITIVE_T           t_years <= 0
5     NAN_INPUT                price, spot, strike, t_years, rate or div_yield is NaN or +-inf
6     NON_FINITE_RESULT        the arithmetic overflows or underflows: absurd magnitudes, or a
                               time value so small (< ~1e-306 of the price scale) that it is a
                               subnormal number with too few significant digits to invert
10    PRICE_BELOW_LOWER_BOUND  price <= discounted intrinsic value, max(S e^{-qT} − K e^{-rT}, 0)
                               for a call, max(K e^{-rT} − S e^{-qT}, 0) for a put (a price equal
                               to it means zero volatility; a negative price is below it too)
11    PRICE_ABOVE_UPPER_BOUND  price >= S e^{-qT} for a call, >= K e^{-rT} for a put
12    IV_BELOW_RANGE           within the bounds, but the implied vol is below ``sigma_min``
13    IV_ABOVE_RANGE           within the bounds, but the implied vol is above ``sigma_max``
14    NO_CONVERGENCE           the iteration budget ran out (not seen in tests; kept as a guard)
====  =======================  ==============================================================

``strict=True`` raises ValueError naming the first unsolved element (index, field, value, why).

Accuracy. "vega" in accuracy statements here means the raw derivative ``dPrice/dSigma`` (100 ×
the per-vol-point vega of ``bsm_greeks``). A price carries rounding error of a few ulps of itself,
so sigma is determined only to about ``ulp(price) / vega``; the solver adds no error beyond that
floor. Measured (``tests/test_implied_vol.py``): round trips recover sigma to within 1e-8 wherever
vega > 1e-6 on spot-100 grids (moneyness 0.5–2, T from one day to three years, sigma 0.05–1.5).
For much larger prices the floor scales with ``ulp(price)``: scale the vega threshold with spot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import cache

import numpy as np
from numba import njit, prange, types

from analytics.black_scholes import (
    INPUT_ARRAY,
    INPUT_BOOL_ARRAY,
    OUTPUT_ARRAY,
    REASON_ARRAY,
    PricingReason,
    as_float_array,
    as_is_call,
    broadcast_flat,
    describe_code,
    first_bad_element_message,
    input_reason_scalar,
    norm_cdf,
    norm_pdf,
)

SMALLEST_NORMAL = 2.2250738585072014e-308   # below this, doubles lose precision (subnormals)
DEFAULT_SIGMA_MIN = 1e-4
DEFAULT_SIGMA_MAX = 10.0
# Evaluations per option before giving up; typical use is 2–4, bisection alone needs ~60.
MAX_EVALUATIONS = 100
# Convergence: a step of relative size d leaves an error ~ d³ after Halley's step and ~ d² after
# Newton's (quadratic/cubic convergence), far below double precision at these sizes.
HALLEY_STEP_TOLERANCE = 1e-5
NEWTON_STEP_TOLERANCE = 1e-8
# Halley/Newton from the start converges in well under this many; past it, only bisect.
MAX_NEWTON_EVALUATIONS = 30
# Far from the root Halley's correction can be wild; outside this band take the Newton step.
HALLEY_MIN_DENOMINATOR = 0.5
HALLEY_MAX_DENOMINATOR = 2.0
# A bisection step has no quadratic bonus: stop only when the bracket itself is this narrow.
BISECTION_TOLERANCE = 1e-13


class IVReason(IntEnum):
    """Why an element of ``implied_volatility`` is NaN (0 = solved). See the module docstring."""

    OK = 0
    NON_POSITIVE_SPOT = int(PricingReason.NON_POSITIVE_SPOT)
    NON_POSITIVE_STRIKE = int(PricingReason.NON_POSITIVE_STRIKE)
    NON_POSITIVE_T = int(PricingReason.NON_POSITIVE_T)
    NAN_INPUT = int(PricingReason.NAN_INPUT)
    NON_FINITE_RESULT = int(PricingReason.NON_FINITE_RESULT)
    PRICE_BELOW_LOWER_BOUND = 10
    PRICE_ABOVE_UPPER_BOUND = 11
    IV_BELOW_RANGE = 12
    IV_ABOVE_RANGE = 13
    NO_CONVERGENCE = 14


_IV_REASON_TEXT = {
    IVReason.OK: "solved",
    IVReason.NON_POSITIVE_SPOT: "spot must be > 0",
    IVReason.NON_POSITIVE_STRIKE: "strike must be > 0",
    IVReason.NON_POSITIVE_T: "t_years (time to expiry) must be > 0",
    IVReason.NAN_INPUT: "an input is NaN or infinite",
    IVReason.NON_FINITE_RESULT:
        "inputs overflow or underflow the arithmetic (e.g. a subnormal time value, < 1e-306)",
    IVReason.PRICE_BELOW_LOWER_BOUND:
        "price is at or below the discounted intrinsic value (no-arbitrage lower bound)",
    IVReason.PRICE_ABOVE_UPPER_BOUND:
        "price is at or above the no-arbitrage upper bound (S e^-qT for calls, K e^-rT for puts)",
    IVReason.IV_BELOW_RANGE: "implied volatility is below sigma_min",
    IVReason.IV_ABOVE_RANGE: "implied volatility is above sigma_max",
    IVReason.NO_CONVERGENCE: "the solver did not converge",
}

# Codes as plain ints for the numba kernels.
_OK = 0
_NAN_INPUT = int(IVReason.NAN_INPUT)
_NON_FINITE = int(IVReason.NON_FINITE_RESULT)
_BELOW_LOWER = int(IVReason.PRICE_BELOW_LOWER_BOUND)
_ABOVE_UPPER = int(IVReason.PRICE_ABOVE_UPPER_BOUND)
_IV_BELOW = int(IVReason.IV_BELOW_RANGE)
_IV_ABOVE = int(IVReason.IV_ABOVE_RANGE)
_NO_CONVERGENCE = int(IVReason.NO_CONVERGENCE)

IV_FIELDS = ("price", "spot", "strike", "t_years", "rate", "div_yield")


def describe_iv_reason(code: int) -> str:
    """``'NAME: explanation'`` for an implied-vol reason code; ValueError for an unknown code."""
    return describe_code(code, IVReason, _IV_REASON_TEXT, "implied-vol")


@dataclass(frozen=True, eq=False)
class IVResult:
    """Implied volatilities (NaN where unsolved) and their ``IVReason`` codes, broadcast shape.

    ``evaluations`` counts the normalised-price evaluations spent per option (0 when rejected
    before solving), for diagnostics and benchmarks.
    """

    iv: np.ndarray
    reason: np.ndarray
    evaluations: np.ndarray


# ---------------------------------------------------------------------------------------------
# Numba kernels
# ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _normalized_otm_price(x: float, s: float, exp_half_x: float, exp_minus_half_x: float):
    """Normalised out-of-the-money Black call price b (x <= 0) and its slope db/ds."""
    d1 = x / s + 0.5 * s
    d2 = d1 - s
    b = exp_half_x * norm_cdf(d1) - exp_minus_half_x * norm_cdf(d2)
    return b, exp_half_x * norm_pdf(d1)


@njit(cache=True, inline="always")
def _erfinv_approx(y: float) -> float:
    """erf^-1(y) for 0 <= y < 1 (Giles, 2010, the single-precision formula).

    About 1e-7 relative for y < 1 - 1e-6, a few per cent in the last 1e-12 below 1: only a
    starting point needs it, and numba's math has no erfinv.
    """
    w = -math.log((1.0 - y) * (1.0 + y))
    if w < 5.0:
        w -= 2.5
        p = 2.81022636e-08
        p = 3.43273939e-07 + p * w
        p = -3.5233877e-06 + p * w
        p = -4.39150654e-06 + p * w
        p = 0.00021858087 + p * w
        p = -0.00125372503 + p * w
        p = -0.00417768164 + p * w
        p = 0.246640727 + p * w
        p = 1.50140941 + p * w
    else:
        w = math.sqrt(w) - 3.0
        p = -0.000200214257
        p = 0.000100950558 + p * w
        p = 0.00134934322 + p * w
        p = -0.00367342844 + p * w
        p = 0.00573950773 + p * w
        p = -0.0076224613 + p * w
        p = 0.00943887047 + p * w
        p = 1.00167406 + p * w
        p = 2.83297682 + p * w
    return p * y


@njit(cache=True, inline="always")
def _near_money_guess(beta: float, exp_half_x: float, exp_minus_half_x: float) -> float:
    """Total vol from b(x, s) ~ cosh(x/2) erf(s / 2√2) + sinh(x/2), the expansion in x/s.

    Exact at the money, within a few per cent wherever s >~ 0.5 sqrt(2|x|), and (measured) never
    below the root, so it is a safe first point; far below the money it overshoots.
    """
    y = (2.0 * beta - (exp_half_x - exp_minus_half_x)) / (exp_half_x + exp_minus_half_x)
    y = min(y, 1.0 - 1e-16)
    return 2.8284271247461903 * _erfinv_approx(y)


@njit(cache=True, inline="always")
def _low_vol_model_guess(x: float, log_beta: float, s_f: float, b_f: float,
                         db_ds_f: float) -> float:
    """Root of a model of ln b fitted at ``s_f`` (value, slope), for roots below ``s_f``.

    Model: ln b(s) = ln b_f - x²/2 (1/s² - 1/s_f²) + k ln(s/s_f), the small-``s`` asymptotics
    of Black's formula (``b ~ s³ exp(-x²/2s²)``) with k fitted to the slope. Solved by Newton in
    w = ln(s/s_f), on which the model equation is convex and decreasing, so the iterates climb
    monotonically from the k = 0 solution.
    """
    a = 0.5 * x * x / (s_f * s_f)
    gap = math.log(b_f) - log_beta               # > 0: the root lies below s_f
    k = s_f * db_ds_f / b_f - 2.0 * a
    w = -0.5 * math.log1p(gap / a)               # the k = 0 model, exact in e^{-2w}
    if k > 0.0:
        for _ in range(3):
            e = math.exp(-2.0 * w)
            f = a * (e - 1.0) - k * w - gap
            w -= f / (-2.0 * a * e - k)
    return s_f * math.exp(w)


@njit(cache=True)
def solve_total_vol(beta: float, x: float, s_lo: float, s_hi: float):
    """Total volatility ``s`` in [s_lo, s_hi] with normalised OTM price b(x, s) = beta.

    ``x <= 0`` and ``0 < beta < exp(x/2)`` (the caller checks the bounds).
    Returns ``(s, code, evaluations)``; s is NaN unless code is 0.
    """
    exp_half_x = math.exp(0.5 * x)
    exp_minus_half_x = math.exp(-0.5 * x)
    log_beta = math.log(beta)
    s_c = math.sqrt(2.0 * abs(x))  # inflection point of b(s): convex below, concave above
    lo = s_lo
    hi = s_hi
    lo_checked = False   # g(lo) < 0 has been seen, i.e. the root is not below lo
    hi_checked = False   # g(hi) > 0 has been seen
    s = min(max(_near_money_guess(beta, exp_half_x, exp_minus_half_x), s_lo), s_hi)
    for evaluation in range(1, MAX_EVALUATIONS + 1):
        b, db_ds = _normalized_otm_price(x, s, exp_half_x, exp_minus_half_x)
        g = math.log(b) - log_beta if b > 0.0 else -math.inf
        if g == 0.0:
            return s, _OK, evaluation
        if g < 0.0:
            if s >= s_hi:
                return np.nan, _IV_ABOVE, evaluation
            lo = s
            lo_checked = True
        else:
            if s <= s_lo:
                return np.nan, _IV_BELOW, evaluation
            hi = s
            hi_checked = True
        newton = False
        tolerance = 0.0
        if b > 0.0 and db_ds > 0.0:
            if evaluation == 1 and g > 0.0 and s < s_c:
                # The near-money start overshoots far out of the money; jump with the model.
                s_new = _low_vol_model_guess(x, log_beta, s, b, db_ds)
            else:
                # Halley's step on g: g' = b'/b and g'' = g'(x²/s³ - s/4) - g'², because
                # b'' = b'(x²/s³ - s/4); the second derivative costs no extra transcendental.
                g1 = db_ds / b
                g2 = g1 * (x * x / (s * s * s) - 0.25 * s) - g1 * g1
                newton_step = g / g1
                halley_denominator = 1.0 - 0.5 * newton_step * g2 / g1
                if HALLEY_MIN_DENOMINATOR <= halley_denominator <= HALLEY_MAX_DENOMINATOR:
                    s_new = s - newton_step / halley_denominator
                    tolerance = HALLEY_STEP_TOLERANCE
                else:
                    s_new = s - newton_step
                    tolerance = NEWTON_STEP_TOLERANCE
                newton = True
        else:
            s_new = np.nan
        if newton and abs(s_new - s) <= tolerance * s:
            # Converged. A last step that crosses a bracket end proven by an evaluation only
            # rounds onto it (the root lies inside); one that crosses an unprobed range end may
            # mean the root is outside the range, so fall through and probe that end.
            if (lo < s_new < hi or (s_new <= lo and lo_checked)
                    or (s_new >= hi and hi_checked)):
                return min(max(s_new, lo), hi), _OK, evaluation
        if not (lo < s_new < hi) or evaluation > MAX_NEWTON_EVALUATIONS:
            # Out of the bracket (or NaN), or Newton is not getting there: probe an unchecked
            # range end once (it decides IV_BELOW/ABOVE_RANGE), otherwise bisect geometrically,
            # since the bracket can span five decades.
            if s_new <= lo and not lo_checked:
                s_new = lo
            elif s_new >= hi and not hi_checked:
                s_new = hi
            else:
                s_new = math.sqrt(lo * hi)
            if lo_checked and hi_checked and hi - lo <= BISECTION_TOLERANCE * hi:
                return s_new, _OK, evaluation
        s = s_new
    return np.nan, _NO_CONVERGENCE, MAX_EVALUATIONS


@njit(cache=True)
def implied_vol_scalar(price: float, spot: float, strike: float, t_years: float, rate: float,
                       div_yield: float, is_call: bool, sigma_min: float, sigma_max: float):
    """``(iv, reason, evaluations)`` for one option; iv is NaN unless reason is 0."""
    if not math.isfinite(price):
        return np.nan, _NAN_INPUT, 0
    code = input_reason_scalar(spot, strike, t_years, rate, div_yield, 1.0)
    if code != 0:
        return np.nan, code, 0
    disc_spot = spot * math.exp(-div_yield * t_years)
    disc_strike = strike * math.exp(-rate * t_years)
    if is_call:
        intrinsic = max(disc_spot - disc_strike, 0.0)
        upper = disc_spot
    else:
        intrinsic = max(disc_strike - disc_spot, 0.0)
        upper = disc_strike
    if not (math.isfinite(intrinsic) and math.isfinite(upper)):
        return np.nan, _NON_FINITE, 0
    if price <= intrinsic:
        return np.nan, _BELOW_LOWER, 0
    if price >= upper:
        return np.nan, _ABOVE_UPPER, 0
    # Put–call parity: what is left above intrinsic is the out-of-the-money option's price.
    time_value = price - intrinsic
    log_moneyness = math.log(spot / strike) + (rate - div_yield) * t_years
    scale = math.sqrt(disc_spot) * math.sqrt(disc_strike)  # two roots: the product may overflow
    beta = time_value / scale
    x = -abs(log_moneyness)
    # A subnormal time value has lost its significant digits (and so has any price computed
    # that small): refuse it rather than return a volatility from noise.
    if not (math.isfinite(x) and beta >= SMALLEST_NORMAL and math.isfinite(beta)):
        return np.nan, _NON_FINITE, 0
    if beta >= math.exp(0.5 * x):
        # Rounding put the time value on the normalised upper bound though price < upper.
        return np.nan, _ABOVE_UPPER, 0
    sqrt_t = math.sqrt(t_years)
    s, code, evaluations = solve_total_vol(beta, x, sigma_min * sqrt_t, sigma_max * sqrt_t)
    return s / sqrt_t, code, evaluations


def _iv_loop(price, spot, strike, t_years, rate, div_yield, is_call, sigma_min, sigma_max,
             iv, reason, evaluations):
    for i in range(iv.shape[0]):
        iv[i], reason[i], evaluations[i] = implied_vol_scalar(
            price[i], spot[i], strike[i], t_years[i], rate[i], div_yield[i], is_call[i],
            sigma_min, sigma_max)


def _iv_loop_parallel(price, spot, strike, t_years, rate, div_yield, is_call, sigma_min,
                      sigma_max, iv, reason, evaluations):
    for i in prange(iv.shape[0]):
        iv[i], reason[i], evaluations[i] = implied_vol_scalar(
            price[i], spot[i], strike[i], t_years[i], rate[i], div_yield[i], is_call[i],
            sigma_min, sigma_max)


_IV_SIGNATURE = types.void(*(INPUT_ARRAY,) * 6, INPUT_BOOL_ARRAY, types.float64, types.float64,
                           OUTPUT_ARRAY, REASON_ARRAY,
                           types.Array(types.int16, 1, "C"))


@cache
def _compiled(parallel: bool):
    """Compile on first use, one signature (see ``black_scholes._compiled`` for why)."""
    loop = _iv_loop_parallel if parallel else _iv_loop
    return njit(_IV_SIGNATURE, cache=True, parallel=parallel)(loop)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def implied_volatility(price, spot, strike, t_years, rate, div_yield, is_call, *,
                       sigma_min: float = DEFAULT_SIGMA_MIN, sigma_max: float = DEFAULT_SIGMA_MAX,
                       strict: bool = False, parallel: bool = False) -> IVResult:
    """Black–Scholes–Merton implied volatility of European option prices, vectorised.

    Unsolvable elements are NaN with an ``IVReason`` code (see the module docstring);
    ``strict=True`` raises ValueError for the first one. The search range is
    ``[sigma_min, sigma_max]``; ``parallel=True`` uses all numba threads.
    """
    if not (0.0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")
    arrays = {name: as_float_array(name, value) for name, value in
              zip(IV_FIELDS, (price, spot, strike, t_years, rate, div_yield))}
    arrays["is_call"] = as_is_call(is_call)
    shape, flat = broadcast_flat(arrays)
    n = math.prod(shape)
    iv = np.empty(n)
    reason = np.empty(n, dtype=np.int8)
    evaluations = np.empty(n, dtype=np.int16)
    _compiled(parallel)(*flat.values(), float(sigma_min), float(sigma_max), iv, reason,
                        evaluations)
    if strict:
        message = first_bad_element_message("implied_volatility", shape, flat, reason,
                                            describe=describe_iv_reason)
        if message is not None:
            raise ValueError(message)
    return IVResult(iv.reshape(shape), reason.reshape(shape), evaluations.reshape(shape))
