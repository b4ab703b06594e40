"""Black–Scholes–Merton prices and Greeks for European options with continuous rate and dividend yield.

Owns: the numba scalar kernel ``bsm_scalar`` (shared with other numba kernels: the synthetic chain,
the implied-vol solver), the vectorised array API ``bsm_price`` / ``bsm_greeks``, the input
validation codes shared with ``analytics.implied_vol``, and the strict-mode input check.

Units: prices in dollars per share; ``t_years`` in years; ``rate`` and ``div_yield`` annualised,
continuously compounded; ``sigma`` a decimal (0.20 = 20 %). Greeks: delta per $1 of spot, gamma
per $1, vega per one volatility point (0.01), theta per calendar day (``-dV/dT / 365``), rho per
one rate point (0.01).

Array API. Every argument may be a scalar or an array; they broadcast together (NumPy rules) and
the results have the broadcast shape (a 0-d array when every input is a scalar). ``is_call`` is a
bool (array) or option rights as strings: ``'C'``/``'P'`` or ``'CALL'``/``'PUT'``, any case.

NaN policy. Array pricing never raises for bad numbers; an element whose inputs are invalid gets
NaN in every output and a non-zero reason code (``PricingReason``), checked in this order:

====  =====================  ===============================================================
code  name                   meaning
====  =====================  ===============================================================
0     OK                     priced
1     NON_POSITIVE_SPOT      spot <= 0
2     NON_POSITIVE_STRIKE    strike <= 0
3     NON_POSITIVE_T         t_years <= 0 (expired options have no BSM price; use intrinsic)
4     NON_POSITIVE_SIGMA     sigma <= 0
5     NAN_INPUT              an input (any of the six numbers) is NaN or +-inf; checked first,
                             because NaN compares False and would slip through the sign tests
6     NON_FINITE_RESULT      inputs pass the checks but the result overflowed (absurd magnitudes,
                             e.g. sigma*sqrt(T) underflowing to 0); all outputs NaN
====  =====================  ===============================================================

``pricing_input_reasons`` returns codes 0–5 without pricing; ``bsm_greeks(...).reason`` also
reports code 6. With ``strict=True`` (or via ``check_pricing_inputs``) the first bad element
raises ``ValueError`` naming its index, field and value instead — for scalar and API use, where a
NaN would only travel further before anyone sees it. Malformed arguments (text that is not a
number, shapes that do not broadcast, rights other than C/P) always raise ``ValueError``.

Performance. The array kernels are numba loops over ``bsm_scalar`` on one thread (``parallel=True``
selects a ``prange`` variant). Broadcast scalars are passed as stride-0 views, never copied.
``fastmath`` is deliberately off: the NaN checks rely on IEEE semantics, and one core already runs
far above the 10M options/s target (see ``benchmarks/bench_pricing.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import cache

import numpy as np
from numba import njit, prange, types

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


@njit(cache=True, inline="always")
def norm_cdf(x: float) -> float:
    # erfc keeps full relative precision in the far tails, where 0.5*(1+erf) would cancel.
    return 0.5 * math.erfc(-x * SQRT_HALF)


@njit(cache=True, inline="always")
def norm_pdf(x: float) -> float:
    return INV_SQRT_2PI * math.exp(-0.5 * x * x)


@njit(cache=True, inline="always")
def _d1_d2_tails(spot, strike, t_years, rate, div_yield, sigma):
    """Shared front half of the BSM formulas.

    Returns sqrt(T), sigma*sqrt(T), e^{-rT}, e^{-qT}, S e^{-qT}, K e^{-rT}, d1, and the four
    normal probabilities N(d1), N(-d1), N(d2), N(-d2). Each pair comes from one erfc on its small
    side (full relative precision in the tail) and the other side by complement, which is exact
    to an ulp there because it is close to 1.
    """
    sqrt_t = math.sqrt(t_years)
    sig_sqrt_t = sigma * sqrt_t
    disc_r = math.exp(-rate * t_years)
    disc_q = math.exp(-div_yield * t_years)
    d1 = (math.log(spot / strike) + (rate - div_yield + 0.5 * sigma * sigma) * t_years) / sig_sqrt_t
    d2 = d1 - sig_sqrt_t
    tail_d1 = norm_cdf(-abs(d1))
    tail_d2 = norm_cdf(-abs(d2))
    n_d1 = tail_d1 if d1 < 0.0 else 1.0 - tail_d1
    n_md1 = 1.0 - tail_d1 if d1 < 0.0 else tail_d1
    n_d2 = tail_d2 if d2 < 0.0 else 1.0 - tail_d2
    n_md2 = 1.0 - tail_d2 if d2 < 0.0 else tail_d2
    return (sqrt_t, sig_sqrt_t, disc_r, disc_q, spot * disc_q, strike * disc_r, d1,
            n_d1, n_md1, n_d2, n_md2)


@njit(cache=True, inline="always")
def _price_from_parts(fwd_spot, pv_strike, n_d1, n_md1, n_d2, n_md2, is_call):
    """Price = discounted intrinsic value + the out-of-the-money option of the same strike.

    The OTM price is small and accurate to its own last digits; (S e^-qT - K e^-rT) is exact
    whenever the two are within a factor of 2 (Sterbenz). So an in-the-money price is accurate to
    about half an ulp, where ``S e^-qT N(d1) - K e^-rT N(d2)`` lost two or three ulps to its
    near-1 probabilities — and implied vol of deep ITM options is only as good as that.
    """
    # Both candidates and selects instead of nested branches: call/put and ITM/OTM are random
    # across a chain, and mispredicted branches cost more than two multiplications.
    call_in_the_money = fwd_spot >= pv_strike
    otm_price = (pv_strike * n_md2 - fwd_spot * n_md1 if call_in_the_money
                 else fwd_spot * n_d1 - pv_strike * n_d2)
    intrinsic = abs(fwd_spot - pv_strike) if is_call == call_in_the_money else 0.0
    return intrinsic + otm_price


@njit(cache=True)
def bsm_scalar(spot: float, strike: float, t_years: float, rate: float, div_yield: float,
               sigma: float, is_call: bool):
    """Return (price, delta, gamma, vega, theta, rho) for one option; inputs assumed valid."""
    (sqrt_t, sig_sqrt_t, disc_r, disc_q, fwd_spot, pv_strike, d1,
     n_d1, n_md1, n_d2, n_md2) = _d1_d2_tails(spot, strike, t_years, rate, div_yield, sigma)
    price = _price_from_parts(fwd_spot, pv_strike, n_d1, n_md1, n_d2, n_md2, is_call)
    pdf_d1 = norm_pdf(d1)
    gamma = disc_q * pdf_d1 / (spot * sig_sqrt_t)
    vega = fwd_spot * pdf_d1 * sqrt_t * 0.01
    decay = -fwd_spot * pdf_d1 * sigma / (2.0 * sqrt_t)
    if is_call:
        delta = disc_q * n_d1
        theta = decay - rate * pv_strike * n_d2 + div_yield * fwd_spot * n_d1
        rho = pv_strike * t_years * n_d2 * 0.01
    else:
        delta = -disc_q * n_md1
        theta = decay + rate * pv_strike * n_md2 - div_yield * fwd_spot * n_md1
        rho = -pv_strike * t_years * n_md2 * 0.01
    return price, delta, gamma, vega, theta / 365.0, rho


@njit(cache=True)
def bsm_price_scalar(spot: float, strike: float, t_years: float, rate: float, div_yield: float,
                     sigma: float, is_call: bool) -> float:
    """The price of ``bsm_scalar`` alone, with the same arithmetic (so bitwise the same number)."""
    (_, _, _, _, fwd_spot, pv_strike, _,
     n_d1, n_md1, n_d2, n_md2) = _d1_d2_tails(spot, strike, t_years, rate, div_yield, sigma)
    return _price_from_parts(fwd_spot, pv_strike, n_d1, n_md1, n_d2, n_md2, is_call)


class PricingReason(IntEnum):
    """Why an element of an array pricing call is NaN (0 = priced). See the module docstring."""

    OK = 0
    NON_POSITIVE_SPOT = 1
    NON_POSITIVE_STRIKE = 2
    NON_POSITIVE_T = 3
    NON_POSITIVE_SIGMA = 4
    NAN_INPUT = 5
    NON_FINITE_RESULT = 6


_PRICING_REASON_TEXT = {
    PricingReason.OK: "priced",
    PricingReason.NON_POSITIVE_SPOT: "spot must be > 0",
    PricingReason.NON_POSITIVE_STRIKE: "strike must be > 0",
    PricingReason.NON_POSITIVE_T: "t_years (time to expiry) must be > 0",
    PricingReason.NON_POSITIVE_SIGMA: "sigma (volatility) must be > 0",
    PricingReason.NAN_INPUT: "an input is NaN or infinite",
    PricingReason.NON_FINITE_RESULT: "inputs overflow or underflow the arithmetic (result not finite)",
}

# Which input a code blames; NAN_INPUT and NON_FINITE_RESULT are resolved per element.
_FIELD_OF_REASON = {1: "spot", 2: "strike", 3: "t_years", 4: "sigma"}
PRICING_FIELDS = ("spot", "strike", "t_years", "rate", "div_yield", "sigma")


def describe_code(code: int, reasons, texts: dict, what: str) -> str:
    """``'NAME: explanation'`` for a reason code of the enum ``reasons``; ValueError naming
    ``what`` for an unknown code."""
    try:
        reason = reasons(int(code))
    except ValueError:
        raise ValueError(f"unknown {what} reason code {code!r}; known: {[int(r) for r in reasons]}") from None
    return f"{reason.name}: {texts[reason]}"


def describe_reason(code: int) -> str:
    """``'NAME: explanation'`` for a pricing reason code; ValueError for an unknown code."""
    return describe_code(code, PricingReason, _PRICING_REASON_TEXT, "pricing")


@njit(cache=True, inline="always")
def input_reason_scalar(spot: float, strike: float, t_years: float, rate: float,
                        div_yield: float, sigma: float) -> int:
    """The ``PricingReason`` code of one option's inputs (0 when valid); usable from numba."""
    # Non-finite first: NaN compares False, so it would pass every sign test below.
    if not (math.isfinite(spot) and math.isfinite(strike) and math.isfinite(t_years)
            and math.isfinite(rate) and math.isfinite(div_yield) and math.isfinite(sigma)):
        return 5
    if spot <= 0.0:
        return 1
    if strike <= 0.0:
        return 2
    if t_years <= 0.0:
        return 3
    if sigma <= 0.0:
        return 4
    return 0


# ---------------------------------------------------------------------------------------------
# Turning user arguments into flat kernel inputs
# ---------------------------------------------------------------------------------------------

def as_float_array(name: str, value) -> np.ndarray:
    """``value`` as a float64 array, or ValueError naming the argument."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be read as numbers ({exc})") from None
    return array


def as_is_call(value) -> np.ndarray:
    """Option rights as a bool array (True = call) from bools, 0/1 integers or 'C'/'P' strings."""
    array = np.asarray(value)
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind in "iu":
        bad = (array != 0) & (array != 1)
        if bad.any():
            _raise_bad_right(array, bad, "expected booleans, 0/1, or 'C'/'P'")
        return array.astype(np.bool_)
    if array.dtype.kind in "USO":
        # Fast path: exact one-letter codes are a plain vectorised comparison.
        calls = (array == "C") | (array == "c")
        puts = (array == "P") | (array == "p")
        other = ~(calls | puts)
        if other.any():
            words = np.char.upper(np.char.strip(array[other].astype(str)))
            word_calls = np.isin(words, ("C", "CALL"))
            word_puts = np.isin(words, ("P", "PUT"))
            if not (word_calls | word_puts).all():
                bad = np.zeros(array.shape, dtype=bool)
                bad[other] = ~(word_calls | word_puts)
                _raise_bad_right(array, bad, "expected 'C'/'P' or 'CALL'/'PUT'")
            calls = np.array(calls, dtype=np.bool_)
            calls[other] = word_calls
        return np.asarray(calls, dtype=np.bool_)
    raise ValueError(f"is_call: expected booleans or 'C'/'P' strings, got dtype {array.dtype}")


def _raise_bad_right(array: np.ndarray, bad: np.ndarray, expected: str):
    flat_index = int(np.flatnonzero(bad.reshape(-1))[0])
    raise ValueError(f"is_call: element {_format_index(flat_index, array.shape)} is "
                     f"{_plain(array.reshape(-1)[flat_index])}; {expected}")


def _format_index(flat_index: int, shape: tuple) -> str:
    if len(shape) == 0:
        return "(scalar)"
    if len(shape) == 1:
        return str(flat_index)
    return str(tuple(int(i) for i in np.unravel_index(flat_index, shape)))


def broadcast_flat(arrays: dict[str, np.ndarray]) -> tuple[tuple, dict[str, np.ndarray]]:
    """Broadcast named arrays together; return the shape and 1-D views of the broadcast length.

    A broadcast scalar becomes a stride-0 view (no copy); a full-size contiguous array stays a
    view; only mixed-shape broadcasting (e.g. (n, 1) against (1, m)) materialises a copy.
    """
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{name} {a.shape}" for name, a in arrays.items())
        raise ValueError(f"option inputs do not broadcast together: {shapes}") from None
    flat = {name: np.broadcast_to(a, shape).reshape(-1) for name, a in arrays.items()}
    return shape, flat


def _prepare(spot, strike, t_years, rate, div_yield, sigma, is_call=None):
    arrays = {name: as_float_array(name, value) for name, value in
              zip(PRICING_FIELDS, (spot, strike, t_years, rate, div_yield, sigma))}
    if is_call is not None:
        arrays["is_call"] = as_is_call(is_call)
    return broadcast_flat(arrays)


def _plain(value) -> str:
    # repr of a Python scalar: 'nan', '-1.0', 'True' rather than 'np.float64(-1.0)'.
    return repr(value.item() if isinstance(value, np.generic) else value)


def first_bad_element_message(context: str, shape: tuple, flat: dict[str, np.ndarray],
                              reasons: np.ndarray, describe=describe_reason) -> str | None:
    """The message naming the first element with a non-zero reason, or None when all are OK."""
    bad = np.flatnonzero(reasons)
    if bad.size == 0:
        return None
    i = int(bad[0])
    code = int(reasons[i])
    where = f"element {_format_index(i, shape)}"
    field = _FIELD_OF_REASON.get(code)
    if code == PricingReason.NAN_INPUT:
        field = next(name for name, a in flat.items()
                     if a.dtype.kind == "f" and not np.isfinite(a[i]))
    if field is None:
        values = ", ".join(f"{name}={_plain(a[i])}" for name, a in flat.items())
        return f"{context}: {where} ({values}): {describe(code)}"
    return f"{context}: {where} has {field}={_plain(flat[field][i])}: {describe(code)}"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

INPUT_ARRAY = types.Array(types.float64, 1, "A", readonly=True)
INPUT_BOOL_ARRAY = types.Array(types.boolean, 1, "A", readonly=True)
OUTPUT_ARRAY = types.Array(types.float64, 1, "C")
REASON_ARRAY = types.Array(types.int8, 1, "C")


@njit(cache=True, inline="always")
def _degenerate(spot: float, t_years: float, sigma: float) -> bool:
    """True when sigma*sqrt(T) or spot*sigma*sqrt(T) underflows to 0.

    ``bsm_scalar`` divides by both, and numba's default (Python) error model raises
    ZeroDivisionError on a float division by zero rather than returning inf.
    """
    sig_sqrt_t = sigma * math.sqrt(t_years)
    return not (sig_sqrt_t > 0.0 and spot * sig_sqrt_t > 0.0)


@njit(cache=True)
def bsm_checked_scalar(spot: float, strike: float, t_years: float, rate: float, div_yield: float,
                       sigma: float, is_call: bool):
    """``(reason, price, delta, gamma, vega, theta, rho)`` for one option, NaNs when reason != 0.

    The validating wrapper of ``bsm_scalar`` that the array API uses; callable from numba.
    """
    code = input_reason_scalar(spot, strike, t_years, rate, div_yield, sigma)
    if code == 0 and _degenerate(spot, t_years, sigma):
        code = 6
    if code == 0:
        p, d, g, v, th, rh = bsm_scalar(spot, strike, t_years, rate, div_yield, sigma, is_call)
        # One sum catches any inf/NaN among the six (inf - inf is NaN, not finite either).
        if math.isfinite(p + d + g + v + th + rh):
            return 0, p, d, g, v, th, rh
        code = 6
    nan = np.nan
    return code, nan, nan, nan, nan, nan, nan


@njit(cache=True)
def bsm_price_checked_scalar(spot: float, strike: float, t_years: float, rate: float,
                             div_yield: float, sigma: float, is_call: bool):
    """``(reason, price)`` for one option, price NaN when reason != 0; callable from numba."""
    code = input_reason_scalar(spot, strike, t_years, rate, div_yield, sigma)
    if code == 0 and _degenerate(spot, t_years, sigma):
        code = 6
    if code == 0:
        p = bsm_price_scalar(spot, strike, t_years, rate, div_yield, sigma, is_call)
        if math.isfinite(p):
            return 0, p
        code = 6
    return code, np.nan


# The loops pass scalars to the per-option helpers, never arrays: a numba call that takes arrays
# pays reference counting per array per call, which measured 3x slower here.
def _greeks_loop(spot, strike, t_years, rate, div_yield, sigma, is_call,
                 price, delta, gamma, vega, theta, rho, reason):
    for i in range(price.shape[0]):
        (reason[i], price[i], delta[i], gamma[i], vega[i], theta[i], rho[i]) = bsm_checked_scalar(
            spot[i], strike[i], t_years[i], rate[i], div_yield[i], sigma[i], is_call[i])


def _greeks_loop_parallel(spot, strike, t_years, rate, div_yield, sigma, is_call,
                          price, delta, gamma, vega, theta, rho, reason):
    for i in prange(price.shape[0]):
        (reason[i], price[i], delta[i], gamma[i], vega[i], theta[i], rho[i]) = bsm_checked_scalar(
            spot[i], strike[i], t_years[i], rate[i], div_yield[i], sigma[i], is_call[i])


def _price_loop(spot, strike, t_years, rate, div_yield, sigma, is_call, price, reason):
    for i in range(price.shape[0]):
        reason[i], price[i] = bsm_price_checked_scalar(
            spot[i], strike[i], t_years[i], rate[i], div_yield[i], sigma[i], is_call[i])


def _price_loop_parallel(spot, strike, t_years, rate, div_yield, sigma, is_call, price, reason):
    for i in prange(price.shape[0]):
        reason[i], price[i] = bsm_price_checked_scalar(
            spot[i], strike[i], t_years[i], rate[i], div_yield[i], sigma[i], is_call[i])


def _reason_loop(spot, strike, t_years, rate, div_yield, sigma, reason):
    for i in range(reason.shape[0]):
        reason[i] = input_reason_scalar(spot[i], strike[i], t_years[i], rate[i], div_yield[i],
                                        sigma[i])


_GREEKS_SIGNATURE = (INPUT_ARRAY,) * 6 + (INPUT_BOOL_ARRAY,) + (OUTPUT_ARRAY,) * 6 + (REASON_ARRAY,)
_PRICE_SIGNATURE = (INPUT_ARRAY,) * 6 + (INPUT_BOOL_ARRAY, OUTPUT_ARRAY, REASON_ARRAY)
_SIGNATURES = {
    _greeks_loop: _GREEKS_SIGNATURE,
    _greeks_loop_parallel: _GREEKS_SIGNATURE,
    _price_loop: _PRICE_SIGNATURE,
    _price_loop_parallel: _PRICE_SIGNATURE,
    _reason_loop: (INPUT_ARRAY,) * 6 + (REASON_ARRAY,),
}


@cache
def _compiled(loop):
    """Compile a loop on first use with its one explicit signature.

    One signature of read-only, any-layout 1-D arrays accepts contiguous arrays and stride-0
    broadcast views alike, so there is exactly one machine-code version per loop (cached on disk
    by numba), and importing this module costs nothing for callers that only use ``bsm_scalar``.
    """
    return njit(types.void(*_SIGNATURES[loop]), cache=True,
                parallel=loop in (_greeks_loop_parallel, _price_loop_parallel))(loop)


# ---------------------------------------------------------------------------------------------
# Public array API
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Greeks:
    """Prices and Greeks of a batch of options, all arrays of the broadcast input shape.

    ``vega`` per vol point, ``theta`` per calendar day, ``rho`` per rate point; ``reason`` holds
    the ``PricingReason`` code of each element (0 = priced; otherwise every field is NaN there).
    """

    price: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray
    rho: np.ndarray
    reason: np.ndarray


def bsm_greeks(spot, strike, t_years, rate, div_yield, sigma, is_call, *,
               strict: bool = False, parallel: bool = False) -> Greeks:
    """Price and all Greeks of European options (BSM with dividend yield), vectorised.

    Invalid elements are NaN with a reason code (see the module docstring); ``strict=True``
    raises ValueError for the first one instead. ``parallel=True`` uses all numba threads.
    """
    shape, flat = _prepare(spot, strike, t_years, rate, div_yield, sigma, is_call)
    n = math.prod(shape)
    outputs = [np.empty(n) for _ in range(6)]
    reason = np.empty(n, dtype=np.int8)
    loop = _greeks_loop_parallel if parallel else _greeks_loop
    _compiled(loop)(*flat.values(), *outputs, reason)
    if strict:
        _raise_if_bad("bsm_greeks", shape, flat, reason)
    return Greeks(*(a.reshape(shape) for a in outputs), reason=reason.reshape(shape))


def bsm_price(spot, strike, t_years, rate, div_yield, sigma, is_call, *,
              strict: bool = False, parallel: bool = False) -> np.ndarray:
    """BSM price of European options, vectorised; invalid elements are NaN (``strict`` raises).

    The same numbers as ``bsm_greeks(...).price``, computed without the Greeks.
    Use ``pricing_input_reasons`` for the reason codes of NaN elements.
    """
    shape, flat = _prepare(spot, strike, t_years, rate, div_yield, sigma, is_call)
    n = math.prod(shape)
    price = np.empty(n)
    reason = np.empty(n, dtype=np.int8)
    loop = _price_loop_parallel if parallel else _price_loop
    _compiled(loop)(*flat.values(), price, reason)
    if strict:
        _raise_if_bad("bsm_price", shape, flat, reason)
    return price.reshape(shape)


def pricing_input_reasons(spot, strike, t_years, rate, div_yield, sigma) -> np.ndarray:
    """``PricingReason`` codes (int8, broadcast shape) of the inputs alone: 0 where valid."""
    shape, flat = _prepare(spot, strike, t_years, rate, div_yield, sigma)
    reason = np.empty(math.prod(shape), dtype=np.int8)
    _compiled(_reason_loop)(*flat.values(), reason)
    return reason.reshape(shape)


def check_pricing_inputs(spot, strike, t_years, rate, div_yield, sigma) -> None:
    """Raise ValueError naming the first invalid element's index, field and value (or pass)."""
    shape, flat = _prepare(spot, strike, t_years, rate, div_yield, sigma)
    reason = np.empty(math.prod(shape), dtype=np.int8)
    _compiled(_reason_loop)(*flat.values(), reason)
    _raise_if_bad("pricing inputs", shape, flat, reason)


def _raise_if_bad(context: str, shape: tuple, flat: dict, reason: np.ndarray) -> None:
    message = first_bad_element_message(context, shape, flat, reason)
    if message is not None:
        raise ValueError(message)
