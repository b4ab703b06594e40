"""Benchmark: BSM price + Greeks and implied volatility on one core, against same-run anchors.

Prints figures, asserts nothing (timings on a shared box drift ±30 %; read the ratios).

(a) ``analytics.black_scholes.bsm_greeks`` (numba loop) against a plain vectorised NumPy BSM
    (``scipy.special.ndtr``; price, delta, gamma, vega, theta, rho) written here, on the same random
    options, best of ``--repeats``; with the largest difference between the two per output.
(b) ``analytics.implied_vol.implied_volatility`` on a realistic SPY-like grid and on the broad
    test grid (prices from the NumPy reference, so the round trip crosses implementations), and
    per-option ``scipy.optimize.brentq`` on a subsample as the anchor, with both solvers' errors.

Usage:  .venv/bin/python benchmarks/bench_pricing.py [--n 2000000] [--iv-n 1000000]
        [--brentq-n 2000] [--repeats 5] [--seed 7]
"""
from __future__ import annotations

import os

# One core for everything, set before NumPy/numba are imported (they read these once).
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                  "NUMBA_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from scipy.optimize import brentq  # noqa: E402
from scipy.special import ndtr  # noqa: E402

from analytics.black_scholes import bsm_greeks  # noqa: E402
from analytics.implied_vol import implied_volatility  # noqa: E402

GREEK_FIELDS = ("price", "delta", "gamma", "vega", "theta", "rho")
# The NumPy anchor works in blocks that keep its temporaries in cache (faster than whole arrays).
NUMPY_BLOCK = 65_536


def numpy_reference_greeks(spot, strike, t_years, rate, div_yield, sigma, is_call,
                           block_size=NUMPY_BLOCK):
    """Textbook vectorised BSM with ndtr, in our units (vega/vol pt, theta/day, rho/rate pt)."""
    outputs = {name: np.empty(spot.shape) for name in GREEK_FIELDS}
    for start in range(0, spot.size, block_size):
        block = slice(start, start + block_size)
        s, k, t, r, q, v, call = (a[block] for a in
                                  (spot, strike, t_years, rate, div_yield, sigma, is_call))
        sqrt_t = np.sqrt(t)
        sig_sqrt_t = v * sqrt_t
        disc_r = np.exp(-r * t)
        disc_q = np.exp(-q * t)
        d1 = (np.log(s / k) + (r - q + 0.5 * v * v) * t) / sig_sqrt_t
        d2 = d1 - sig_sqrt_t
        sign = np.where(call, 1.0, -1.0)
        n1 = ndtr(sign * d1)
        n2 = ndtr(sign * d2)
        pdf = np.exp(-0.5 * d1 * d1) / math.sqrt(2.0 * math.pi)
        fwd_spot = s * disc_q
        pv_strike = k * disc_r
        outputs["price"][block] = sign * (fwd_spot * n1 - pv_strike * n2)
        outputs["delta"][block] = sign * disc_q * n1
        outputs["gamma"][block] = disc_q * pdf / (s * sig_sqrt_t)
        outputs["vega"][block] = fwd_spot * pdf * sqrt_t * 0.01
        outputs["theta"][block] = (-fwd_spot * pdf * v / (2.0 * sqrt_t)
                                   - sign * r * pv_strike * n2 + sign * q * fwd_spot * n1) / 365.0
        outputs["rho"][block] = sign * pv_strike * t * n2 * 0.01
    return outputs


def reference_price(spot, strike, t_years, rate, div_yield, sigma, is_call) -> float:
    """One option, plain scalar BSM (the per-option solver's model)."""
    sig_sqrt_t = sigma * math.sqrt(t_years)
    d1 = (math.log(spot / strike) + (rate - div_yield + 0.5 * sigma * sigma) * t_years) / sig_sqrt_t
    d2 = d1 - sig_sqrt_t
    fwd_spot = spot * math.exp(-div_yield * t_years)
    pv_strike = strike * math.exp(-rate * t_years)
    if is_call:
        return fwd_spot * ndtr(d1) - pv_strike * ndtr(d2)
    return pv_strike * ndtr(-d2) - fwd_spot * ndtr(-d1)


def reference_implied_vol(price, spot, strike, t_years, rate, div_yield, is_call) -> float:
    """brentq on [1e-4, 10], the common per-option implementation; NaN when not bracketed."""
    def error(sigma):
        return reference_price(spot, strike, t_years, rate, div_yield, sigma, is_call) - price
    try:
        return brentq(error, 1e-4, 10.0, xtol=1e-15, rtol=1e-15, maxiter=200)
    except ValueError:
        return math.nan


def random_options(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The broad test grid: moneyness 0.5–2, T 1 day–3 years, sigma 0.05–1.5."""
    spot = rng.uniform(50.0, 500.0, n)
    return {
        "spot": spot,
        "strike": spot * rng.uniform(0.5, 2.0, n),
        "t_years": rng.uniform(1.0 / 365.0, 3.0, n),
        "rate": rng.uniform(-0.01, 0.08, n),
        "div_yield": rng.uniform(0.0, 0.05, n),
        "sigma": rng.uniform(0.05, 1.5, n),
        "is_call": rng.random(n) < 0.5,
    }


def spy_like_chain(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A realistic index-option grid: 1–365 days, strikes ±3 sd around spot, put skew."""
    spot = rng.uniform(180.0, 480.0, n)
    t_years = rng.integers(1, 366, n) / 365.0
    atm_vol = rng.uniform(0.09, 0.45, n)
    standardised = rng.uniform(-3.0, 3.0, n)
    log_moneyness = standardised * atm_vol * np.sqrt(t_years)
    sigma = np.clip(atm_vol * (1.0 - 0.6 * log_moneyness / np.sqrt(t_years + 0.05)), 0.05, 1.5)
    return {
        "spot": spot,
        "strike": np.round(spot * np.exp(log_moneyness), 0),
        "t_years": t_years,
        "rate": rng.uniform(0.0, 0.05, n),
        "div_yield": rng.uniform(0.0, 0.02, n),
        "sigma": sigma,
        "is_call": log_moneyness > 0.0,   # the liquid side: out-of-the-money calls and puts
    }


def best_time(function, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_greeks(n: int, repeats: int, rng, console: Console) -> None:
    options = random_options(n, rng)
    args = tuple(options.values())
    bsm_greeks(*(a[:1000] for a in args))  # compile / load the numba cache outside the timing
    ours = bsm_greeks(*args)
    reference = numpy_reference_greeks(*args)
    ours_s = best_time(lambda: bsm_greeks(*args), repeats)
    numpy_s = best_time(lambda: numpy_reference_greeks(*args), repeats)
    numpy_whole_s = best_time(lambda: numpy_reference_greeks(*args, block_size=n), repeats)

    table = Table(title=f"(a) BSM price + 5 Greeks, {n:,} options, one core, best of {repeats}")
    table.add_column("implementation")
    table.add_column("seconds", justify="right")
    table.add_column("M options/s", justify="right")
    table.add_row("analytics.bsm_greeks (numba, 1 thread)", f"{ours_s:.4f}",
                  f"{n / ours_s / 1e6:.1f}")
    table.add_row("NumPy + scipy.special.ndtr, 64k blocks", f"{numpy_s:.4f}",
                  f"{n / numpy_s / 1e6:.1f}")
    table.add_row("NumPy + scipy.special.ndtr, whole arrays", f"{numpy_whole_s:.4f}",
                  f"{n / numpy_whole_s / 1e6:.1f}")
    table.add_row("ratio ours / NumPy 64k blocks", "", f"{numpy_s / ours_s:.2f}x")
    table.add_row("ratio ours / NumPy whole arrays", "", f"{numpy_whole_s / ours_s:.2f}x")
    console.print(table)

    agreement = Table(title="(a) agreement, ours vs NumPy reference")
    agreement.add_column("output")
    agreement.add_column("max |diff|", justify="right")
    agreement.add_column("max |diff| / max(|ref|, 1e-3·scale)", justify="right")
    scale = {"price": options["spot"], "delta": 1.0, "gamma": 1.0 / options["spot"],
             "vega": options["spot"] * 0.01, "theta": options["spot"] / 365.0,
             "rho": options["strike"] * 0.01}
    for name in GREEK_FIELDS:
        diff = np.abs(getattr(ours, name) - reference[name])
        relative = diff / np.maximum(np.abs(reference[name]), 1e-3 * np.broadcast_to(
            scale[name], diff.shape))
        agreement.add_row(name, f"{diff.max():.2e}", f"{relative.max():.2e}")
    console.print(agreement)


def solve_grid(options, repeats: int):
    """Round trip on one grid: prices from the NumPy reference (so ours inverts someone else's
    arithmetic), then our solver, best of ``repeats``; returns what the table needs."""
    args = tuple(options[f] for f in ("spot", "strike", "t_years", "rate", "div_yield"))
    reference = numpy_reference_greeks(*args, options["sigma"], options["is_call"])
    price = reference["price"]
    implied_volatility(price[:1000], *(a[:1000] for a in args), options["is_call"][:1000])
    result = implied_volatility(price, *args, options["is_call"])
    seconds = best_time(lambda: implied_volatility(price, *args, options["is_call"]), repeats)
    # Sigma is only defined to ~ulp(price)/vega, so the 1e-8 target applies where the raw vega
    # dPrice/dSigma > 1e-6 per $100 of spot (the threshold scales with the price's ulp).
    vega_per_100_spot = reference["vega"] * 100.0 * 100.0 / options["spot"]
    return args, price, vega_per_100_spot, result, seconds


def bench_implied_vol(n: int, brentq_n: int, repeats: int, rng, console: Console) -> None:
    table = Table(title=f"(b) implied volatility, {n:,} options per grid, one core, "
                        f"best of {repeats}")
    for column in ("grid / solver", "options/s", "evals/option", "solved, vega>1e-6",
                   "max |iv-sigma|, vega>1e-6", "same, vega>1e-4", "reason: count"):
        table.add_column(column, justify="left" if column.startswith(("grid", "reasons"))
                         else "right")
    spy = None
    for label, options in (("SPY-like chain: ours", spy_like_chain(n, rng)),
                           ("broad test grid: ours", random_options(n, rng))):
        args, price, vega_per_100_spot, result, seconds = solve_grid(options, repeats)
        conditioned = vega_per_100_spot > 1e-6
        solved = result.reason == 0
        error = np.abs(result.iv - options["sigma"])
        reasons, counts = np.unique(result.reason, return_counts=True)
        table.add_row(label, f"{n / seconds:,.0f}", f"{result.evaluations[solved].mean():.2f}",
                      f"{solved[conditioned].mean():.4%}",
                      f"{np.nanmax(error[solved & conditioned]):.2e}",
                      f"{np.nanmax(error[solved & (vega_per_100_spot > 1e-4)]):.2e}",
                      ", ".join(f"{int(r)}: {c:,}" for r, c in zip(reasons, counts)))
        if spy is None:
            spy = (options, args, price, result, seconds, conditioned)

    # The per-option anchor on a subsample of the SPY-like grid.
    options, args, price, result, seconds, conditioned = spy
    sample = rng.choice(np.flatnonzero(conditioned), size=min(brentq_n, int(conditioned.sum())),
                        replace=False)
    start = time.perf_counter()
    brentq_iv = np.array([reference_implied_vol(price[i], *(a[i] for a in args),
                                                bool(options["is_call"][i])) for i in sample])
    brentq_s = time.perf_counter() - start
    ours_error = np.abs(result.iv[sample] - options["sigma"][sample])
    brentq_error = np.abs(brentq_iv - options["sigma"][sample])
    table.add_row(f"SPY-like {sample.size:,} subsample: ours", "", "",
                  f"{(result.reason[sample] == 0).mean():.4%}", f"{np.nanmax(ours_error):.2e}",
                  "", "")
    table.add_row("  same: scipy brentq per option", f"{sample.size / brentq_s:,.0f}", "",
                  f"{np.isfinite(brentq_iv).mean():.4%}", f"{np.nanmax(brentq_error):.2e}", "",
                  "")
    table.add_row("  ratio ours / brentq", f"{(n / seconds) / (sample.size / brentq_s):,.0f}x",
                  "", "", "", "", "")
    console.print(table)
    console.print(f"max |ours - brentq| on the subsample: "
                  f"{np.nanmax(np.abs(result.iv[sample] - brentq_iv)):.2e}; reason codes: "
                  "0 solved, 6 subnormal/overflow, 10 price <= intrinsic, 11 >= upper bound, "
                  "12/13 outside [1e-4, 10]; vega = raw dPrice/dSigma per $100 of spot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000, help="options for (a)")
    parser.add_argument("--iv-n", type=int, default=1_000_000, help="options for (b)")
    parser.add_argument("--brentq-n", type=int, default=2_000, help="brentq subsample for (b)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    console = Console(width=140)
    rng = np.random.default_rng(args.seed)
    console.print(f"numpy {np.__version__}; threads pinned to 1 "
                  f"(NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']})")
    bench_greeks(args.n, args.repeats, rng, console)
    bench_implied_vol(args.iv_n, args.brentq_n, args.repeats, rng, console)


if __name__ == "__main__":
    main()
