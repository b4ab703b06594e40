"""Market shocks for stress tests: a SYNTHETIC chain provider seen through a shocked spot path and
a shocked implied-volatility surface (the bar contract, ``core.market.MarketData``).

Owns ``ShockSpec`` (what a shock is: ``iv`` × factor, overnight ``gap`` of a fraction, a
``volvol`` spike of the dispersion of IV changes), the per-bar multipliers each shock implies
(``shock_multipliers``) and ``ShockedMarket``, which applies them to a ``SyntheticChainProvider``.

Every shock is two per-bar multipliers, known before the run and fixed for it:

* ``spot_scale[bar]``: the underlying at the bar is the provider's spot × this. A gap of fraction
  g at session d sets it to (1 − g) for every bar of d and of every later session (the session
  opens g below the previous close and the whole path after it is moved with it; several gaps
  compound). The surface is rebuilt on the shocked forward, so the smile moves with the spot
  (sticky moneyness): a quote at strike K after the gap is the unshocked quote at K / (1 − g),
  scaled by (1 − g) (Black–Scholes is homogeneous in spot and strike).
* ``iv_scale[bar]``: every quote's implied volatility at the bar is the provider's × this, and the
  price, Greeks and bid/ask follow from the shocked volatility (Black–Scholes–Merton at the bar's
  spot; the spread model reads the shocked IV index, so spreads widen with it). The bar's IV index
  is scaled too (what gates and regimes read). ``iv`` sets it to the factor for the
  ``sessions`` sessions from each shock session; ``volvol`` multiplies the IV by exp(B), B a seeded
  Brownian bridge over those sessions' bars, pinned to 0 at both ends, whose per-bar variance
  makes the standard deviation of bar-to-bar log IV changes inside the window ``factor`` times the
  unshocked one (independent noise adds variance: σ_e² = (factor² − 1)·σ_b²); outside the window
  nothing changes.

Bars a shock does not touch are answered by the provider itself, bitwise unchanged. Shocked bars
are priced by ``_shocked_quotes_kernel``, which runs the provider's own per-expiry and per-bar
steps (``_bar_state``, ``_expiry_state``) and its own scalar pricing functions, so an unshocked
quote and a shocked quote differ only by the shock. Everything here is SYNTHETIC and labelled so
in ``describe()``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from analytics.black_scholes import bsm_scalar
from analytics.vol_surface import (
    initial_variance_scalar,
    quote_bid_ask_scalar,
    quote_half_spread_from_scale,
    ssvi_total_variance_scalar,
)
from data_factory.errors import DataError
from data_factory.option_chain import (
    _P_A, _P_B, _P_KAPPA, _P_LIQ_FREE, _P_LIQ_SLOPE, _P_MIN_HALF, _P_RHO, _P_STRIKE_RANGE, _P_THETA_BAR,
    _P_TICK, _P_ZERO_BID, ChainSlice, ContractPath, StructureQuotes, SyntheticChainProvider, _bar_state,
    _expiry_state,
)

SHOCK_KINDS = {
    "iv": "every quote's implied volatility × SIZE for the shock sessions (e.g. iv1.5, iv2)",
    "gap": "an overnight gap of −SIZE % at each shock session, every later bar moved with it (gap5, gap10)",
    "volvol": "the dispersion of bar-to-bar IV changes × SIZE over the shock sessions (volvol = volvol3)",
}
DEFAULT_SHOCKS = ("iv1.5", "iv2", "gap5", "gap10", "volvol")
DEFAULT_VOLVOL_FACTOR = 3.0
_SHOCK_NAME = re.compile(r"^(iv|gap|volvol)(-?\d+(?:\.\d+)?)?$")


class ShockError(DataError):
    """A bad shock name, size or date: one message naming the value and what is wrong."""


@dataclass(frozen=True)
class ShockSpec:
    """One market shock: ``kind`` (iv | gap | volvol) and its ``size`` (IV factor; gap in percent;
    volvol factor on the dispersion of IV changes)."""

    kind: str
    size: float

    @property
    def name(self) -> str:
        return f"{self.kind}{self.size:g}"

    def describe(self) -> str:
        if self.kind == "iv":
            return f"IV × {self.size:g}"
        if self.kind == "gap":
            return f"overnight gap −{self.size:g} %"
        return f"vol-of-vol × {self.size:g}"


def parse_shock(text: str) -> ShockSpec:
    """``iv2`` → ShockSpec('iv', 2.0); ShockError for an unknown name or a size that is not
    positive (or a gap of 100 % or more, an IV-change dispersion factor of 1 or less)."""
    name = text.strip().lower()
    match = _SHOCK_NAME.match(name)
    if match is None:
        raise ShockError(f"--shocks {text!r}: unknown shock; use iv<factor>, gap<percent> or volvol[<factor>] "
                         f"(e.g. {','.join(DEFAULT_SHOCKS)})")
    kind, size_text = match.group(1), match.group(2)
    if size_text is None:
        if kind != "volvol":
            raise ShockError(f"--shocks {text!r}: give the size, e.g. {kind}{'2' if kind == 'iv' else '5'}")
        return ShockSpec(kind, DEFAULT_VOLVOL_FACTOR)
    size = float(size_text)
    if not size > 0:
        raise ShockError(f"--shocks {text!r}: the shock size {size:g} must be greater than 0")
    if kind == "gap" and size >= 100:
        raise ShockError(f"--shocks {text!r}: a gap of {size:g} % would take the spot to zero or below; "
                         f"give less than 100")
    if kind == "volvol" and size <= 1:
        raise ShockError(f"--shocks {text!r}: the vol-of-vol factor {size:g} multiplies the dispersion of IV "
                         f"changes and must be greater than 1 (added noise can only raise it)")
    return ShockSpec(kind, size)


def shock_multipliers(provider, spec: ShockSpec, shock_sessions, sessions_long: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(spot_scale, iv_scale) per bar of ``provider`` for ``spec`` applied at each session of
    ``shock_sessions`` (dates of the provider's sessions); ``sessions_long``: how many sessions an
    ``iv``/``volvol`` shock lasts; ``seed``: the volvol noise."""
    bar_times = provider.bar_times
    bar_days = bar_times.tz_localize(None).normalize()
    sessions = provider.sessions
    n = len(bar_times)
    spot_scale = np.ones(n)
    iv_scale = np.ones(n)
    rng = np.random.default_rng(seed)
    base_log_iv = np.log(provider.iv_index_bars().to_numpy(dtype=float))
    for day in sorted(pd.DatetimeIndex(shock_sessions).normalize()):
        position = sessions.get_indexer([day])[0]
        if position < 0:
            raise ShockError(f"--shock-dates {day.date()}: not a session of the period "
                             f"{sessions[0].date()} … {sessions[-1].date()}")
        if spec.kind == "gap":
            spot_scale[bar_days >= day] *= 1.0 - spec.size / 100.0
            continue
        last_day = sessions[min(position + sessions_long, len(sessions)) - 1]
        window = np.flatnonzero((bar_days >= day) & (bar_days <= last_day))
        if spec.kind == "iv":
            iv_scale[window] = spec.size
            continue
        # volvol: a bridge over the window's bars, starting and ending at 0 (no jump at either end).
        base_changes = np.diff(base_log_iv[window[0] - (window[0] > 0):window[-1] + 1])
        extra_sd = float(np.std(base_changes)) * math.sqrt(spec.size ** 2 - 1.0)
        walk = np.cumsum(rng.normal(0.0, extra_sd, len(window)))
        bridge = walk - np.arange(1, len(window) + 1) / len(window) * walk[-1]
        iv_scale[window] *= np.exp(bridge)
    return spot_scale, iv_scale


@njit(cache=False)
def _shocked_quotes_kernel(bars, expiry_rows, strikes, is_call, spot_scale, iv_scale, bar_i64, bar_f64,
                           sess_i64, sess_f64, expiry_i64, model, table):
    """Quotes of arbitrary (bar, expiry, strike, right) rows under the shock: (10, n) bid, ask, mid,
    theo, iv, delta, gamma, theta, vega, rho; NaN where the expiry has settled at the bar.

    The same steps as the provider's kernels (``option_chain._quote_option``), with the spot and
    the volatility multiplied: the surface is anchored on the unshocked IV index (its shape is the
    provider's), the forward on the shocked spot, the spread scale on the shocked IV index."""
    n = strikes.size
    out = np.full((10, n), np.nan)
    for r in range(n):
        bar = bars[r]
        bar_time_s, session, spot, iv_index, rate, div_yield = _bar_state(bar, bar_i64, bar_f64, sess_f64)
        settle_s = expiry_i64[expiry_rows[r], 1]
        if bar_time_s >= settle_s:
            continue
        spot = spot * spot_scale[bar]
        scale = iv_scale[bar]
        dte = expiry_i64[expiry_rows[r], 0] - sess_i64[session, 0]
        v0 = initial_variance_scalar(iv_index, model[_P_THETA_BAR], model[_P_KAPPA])
        t_years, theta_atm, phi, forward, half_scale = _expiry_state(
            settle_s, bar_time_s, dte, spot, iv_index * scale, v0, rate, div_yield, model, table)
        k = math.log(strikes[r] / forward)
        sigma = math.sqrt(ssvi_total_variance_scalar(k, theta_atm, phi, model[_P_RHO]) / t_years) * scale
        z = k / math.sqrt(theta_atm)
        price, delta, gamma_, vega, theta_, rho_ = bsm_scalar(spot, strikes[r], t_years, rate, div_yield, sigma,
                                                              is_call[r])
        half = quote_half_spread_from_scale(price, half_scale, z, model[_P_A], model[_P_B], model[_P_MIN_HALF],
                                            model[_P_LIQ_SLOPE], model[_P_LIQ_FREE])
        bid, ask = quote_bid_ask_scalar(price, half, model[_P_ZERO_BID], model[_P_TICK])
        out[0, r] = bid
        out[1, r] = ask
        out[2, r] = 0.5 * (bid + ask)
        out[3, r] = price
        out[4, r] = sigma
        out[5, r] = delta
        out[6, r] = gamma_
        out[7, r] = theta_
        out[8, r] = vega
        out[9, r] = rho_
    return out


class ShockedMarket:
    """A ``SyntheticChainProvider`` under per-bar spot and IV multipliers (the bar contract).

    ``spot_scale``/``iv_scale``: one multiplier per bar (see the module docstring); ``label``:
    what the shock is, for ``describe()``."""

    def __init__(self, provider: SyntheticChainProvider, spot_scale: np.ndarray, iv_scale: np.ndarray,
                 label: str = "shock"):
        if not isinstance(provider, SyntheticChainProvider):
            # The repricing runs the synthetic surface itself; user chains have no surface to shock.
            raise ShockError(f"market shocks need the embedded synthetic chains, not {type(provider).__name__}")
        n = len(provider.bar_times)
        spot_scale = np.ascontiguousarray(spot_scale, dtype=np.float64)
        iv_scale = np.ascontiguousarray(iv_scale, dtype=np.float64)
        for name, values in (("spot_scale", spot_scale), ("iv_scale", iv_scale)):
            if values.shape != (n,) or not np.isfinite(values).all() or (values <= 0).any():
                raise ShockError(f"{name}: need {n} finite positive multipliers, one per bar")
        self.provider = provider
        self.spot_scale = spot_scale
        self.iv_scale = iv_scale
        self.label = label
        self._shocked = (spot_scale != 1.0) | (iv_scale != 1.0)
        self._shocked_bars = np.flatnonzero(self._shocked)
        for array in (self.spot_scale, self.iv_scale, self._shocked):
            array.setflags(write=False)
        self._state = (provider._bar_i64, provider._bar_f64, provider._sess_i64, provider._sess_f64,
                       provider._expiry_i64, provider._model, provider._table)

    # -- what does not change --------------------------------------------------------------------
    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self.provider.bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self.provider.sessions

    def expirations_at(self, bar: int, dte_min=None, dte_max=None) -> np.ndarray:
        return self.provider.expirations_at(bar, dte_min, dte_max)

    def settlement_time(self, expiration) -> pd.Timestamp:
        return self.provider.settlement_time(expiration)

    def is_shocked(self, bar: int) -> bool:
        return bool(self._shocked[bar])

    # -- per-bar series --------------------------------------------------------------------------
    def spot_bars(self) -> pd.Series:
        return self.provider.spot_bars() * self.spot_scale

    def iv_index_bars(self) -> pd.Series:
        return self.provider.iv_index_bars() * self.iv_scale

    def ohlcv_bars(self) -> pd.DataFrame | None:
        bars = self.provider.ohlcv_bars()
        if bars is None:
            return None
        bars = bars.copy()
        for column in ("open", "high", "low", "close"):
            bars[column] = bars[column].to_numpy(dtype=float) * self.spot_scale
        return bars

    def describe(self) -> dict:
        return {**self.provider.describe(),
                "shock": {"label": self.label, "synthetic": True, "shocked_bars": int(self._shocked.sum()),
                          "first_shocked_bar": (str(self.bar_times[self._shocked_bars[0]])
                                                if len(self._shocked_bars) else None),
                          "spot_scale_min": float(self.spot_scale.min()),
                          "iv_scale_min": float(self.iv_scale.min()), "iv_scale_max": float(self.iv_scale.max())}}

    # -- quotes ----------------------------------------------------------------------------------
    def _quote(self, bars, expiry_rows, strikes, is_call) -> np.ndarray:
        return _shocked_quotes_kernel(np.ascontiguousarray(bars, dtype=np.int64),
                                      np.ascontiguousarray(expiry_rows, dtype=np.int64),
                                      np.ascontiguousarray(strikes, dtype=np.float64),
                                      np.ascontiguousarray(is_call, dtype=np.bool_),
                                      self.spot_scale, self.iv_scale, *self._state)

    def slice_at(self, bar: int, dte_min=None, dte_max=None, expiry=None):
        if not self._shocked[bar]:
            return self.provider.slice_at(bar, dte_min, dte_max, expiry)
        # The listed strikes around the shocked spot (the provider's listing is ±50 % of the prior
        # close, wide enough for any gap this module accepts within a session's range).
        spot = float(self.provider._bar_f64[bar, 0] * self.spot_scale[bar])
        strike_range = self.provider._model[_P_STRIKE_RANGE]
        base = self.provider.slice_at(bar, dte_min, dte_max, expiry, strike_min=math.floor(spot * (1 - strike_range)),
                                      strike_max=math.ceil(spot * (1 + strike_range)))
        rows = np.searchsorted(self.provider._expiry_i64[:, 0], base.expiration.astype(np.int64))
        quotes = self._quote(np.full(len(base), bar), rows, base.strike, base.is_call)
        for array in quotes:
            array.flags.writeable = False
        bid, ask, mid, theo, iv, delta, gamma, theta, vega, rho = quotes
        return ChainSlice(base.quote_time_ns, spot, base.iv_index * float(self.iv_scale[bar]), base.rate,
                          base.dividend_yield, base.expiration, base.dte, base.t_years, base.strike, base.is_call,
                          bid, ask, mid, theo, iv, delta, gamma, theta, vega, rho, base.iv_conf, base.quote_age_s)

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes, is_call) -> ContractPath:
        path = self.provider.quote_contracts(bar_start, bar_stop, expiration, strikes, is_call)
        shocked = np.flatnonzero(self._shocked[bar_start:bar_stop])
        if len(shocked) == 0:
            return path
        strikes = np.ascontiguousarray(strikes, dtype=float)
        is_call = np.ascontiguousarray(is_call, dtype=np.bool_)
        legs = strikes.size
        bars = np.repeat(bar_start + shocked, legs)
        row = self.provider.expiry_row(expiration)
        quotes = self._quote(bars, np.full(bars.size, row), np.tile(strikes, len(shocked)),
                             np.tile(is_call, len(shocked)))
        fields = {}
        for name, k in (("bid", 0), ("ask", 1), ("mid", 2), ("delta", 5), ("gamma", 6), ("vega", 8),
                        ("theta", 7)):
            values = np.array(getattr(path, name), dtype=float)
            values[shocked] = quotes[k].reshape(len(shocked), legs)
            fields[name] = values
        spot = np.array(path.spot, dtype=float) * self.spot_scale[bar_start:bar_stop]
        return ContractPath(path.bar_start, path.bar_time_ns, spot, fields["bid"], fields["ask"], fields["mid"],
                            fields["delta"], fields["gamma"], fields["vega"], fields["theta"])

    def quote_structures(self, bar: int, expirations: np.ndarray, strikes: np.ndarray) -> StructureQuotes:
        if not self._shocked[bar]:
            return self.provider.quote_structures(bar, expirations, strikes)
        strikes = np.asarray(strikes, dtype=np.float64)
        k = strikes.shape[0]
        rows = np.array([self.provider.expiry_row(day) for day in np.asarray(expirations, dtype="datetime64[D]")],
                        dtype=np.int64)
        quotes = self._quote(np.full(4 * k, bar), np.repeat(rows, 4), strikes.reshape(-1),
                             np.tile(np.array([False, False, True, True]), k))
        return StructureQuotes(*(quotes[index].reshape(k, 4) for index in (0, 1, 2, 5, 6, 8, 7)))


def shocked_market(provider: SyntheticChainProvider, spec: ShockSpec, shock_sessions, sessions_long: int = 5,
                   seed: int = 42) -> ShockedMarket:
    """``provider`` under ``spec`` at each of ``shock_sessions`` (see ``shock_multipliers``)."""
    spot_scale, iv_scale = shock_multipliers(provider, spec, shock_sessions, sessions_long, seed)
    dates = ", ".join(str(pd.Timestamp(day).date()) for day in sorted(pd.DatetimeIndex(shock_sessions)))
    span = "" if spec.kind == "gap" else f", {sessions_long} sessions each"
    return ShockedMarket(provider, spot_scale, iv_scale, label=f"{spec.describe()} at {dates}{span} (SYNTHETIC)")
