"""SYNTHETIC SPY option chains, computed lazily bar by bar from a VIX-anchored surface.

Owns ``ChainSlice`` (the immutable chain at one quote time, OptionQuote columns as NumPy arrays)
and ``SyntheticChainProvider`` (answers ``slice(timestamp, ...)`` for any bar of its data).

Model (all of it synthetic, labelled so in ``describe()`` and ``ChainSlice.to_frame().attrs``):

* **European by construction.** Every quote is a Black–Scholes–Merton price
  (``analytics.black_scholes.bsm_scalar``) on the forward ``F = S·e^{(r−q)T}``; the early-exercise
  premium of the real (American) SPY contract is not modelled.
* **Listing.** Expirations from ``data_factory.expirations`` (monthlies, quarterlies, LEAPS and
  Fri/Wed/Mon weeklies, holiday rules). Strikes: every $1 from ``(1 − strike_range − margin)`` to
  ``(1 + strike_range + margin)`` times the *prior session's close* (the day's open for the first
  session), i.e. 50 %–150 % by default, fixed for the whole day so strikes never move intraday.
  (Real SPY strikes widen to $5 far from the money; $1 everywhere is a simplification. The wide
  listing matters for variance-swap/VIX replication, whose put strip must reach zero bids: with
  ±35 % the Cboe formula lost 0.4 VIX points at VIX 35.) A slice by default returns the listed
  strikes from ``floor(0.75·S)`` to ``ceil(1.25·S)`` around the bar's spot S.
* **Time.** ``T`` = minutes from the bar's close time to the expiry's settlement (the session close,
  16:00 ET or 13:00 on early closes) over 525,600. An expiration whose settlement is not after the
  bar is not in the slice, so T > 0 always (on expiry day it trades until the 16:00 bar, excluded).
  ``dte`` = calendar days from the bar's session date to the expiration date.
* **IV index per bar.** ``iv_bar = vix_prev + β·R + f·(vix_close − vix_prev − β·R_cc)``: R is the
  return (in %) of the bar's spot since the previous session's close, R_cc the day's close-to-close
  return in %, f the elapsed fraction of the session at the bar, β = ``spot_vol_beta`` (−1.5 VIX
  points per +1 %, the 2014–2018 daily regression). The last bar of a day therefore carries the
  real VIX close, and intraday changes move ≈ β points per %. The value is floored at
  ``IV_INDEX_FLOOR_FRACTION`` of the smaller of the two closes, so a large rally cannot drive it
  to zero. The first session with no prior session in the data uses its open and its own close.
* **Surface per bar.** ``analytics.vol_surface``: variance term structure matched to ``iv_bar`` at
  30 days, SSVI smile, θ_T solved so each slice prices a variance swap at W(T). Rebuilt in
  log-moneyness k = ln(K/F) at every bar (sticky moneyness for the *shape*). Greeks are plain
  Black–Scholes (sticky-strike) Greeks: per the reference (§5), the slide along the skew and the
  β-driven level change nearly cancel at fixed strike, so the sticky-strike delta is the consistent
  one for this pair of rules.
* **Quotes.** ``analytics.vol_surface`` spread model; ``mid = (bid + ask)/2`` like a vendor mid;
  ``theo`` is the unrounded model price (use it for parity/arbitrage checks). ``iv_conf`` = 1.0 and
  ``quote_age_s`` = 0.0 (fresh model quotes).

Laziness and speed: nothing about a chain is stored. The constructor precomputes small per-bar
arrays (bar time, spot, session, IV index) and per-session arrays (rate, dividend yield, strike
bounds, CSR offsets into the listed expirations) once, vectorised. ``slice`` finds the bar with one
``searchsorted`` and calls one numba kernel that counts the rows, allocates the outputs and fills
them (surface + BSM + spread fused); the Python side only wraps array views.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import pandas as pd
from numba import njit

from analytics.black_scholes import bsm_scalar
from analytics.vol_surface import (
    SpreadParams, SurfaceParams, atm_total_variance_scalar, initial_variance_scalar,
    power_law_phi_scalar, quote_bid_ask_scalar, quote_half_spread_from_scale,
    quote_half_spread_scale_scalar, skew_floor_ratio_scalar,
    ssvi_total_variance_scalar, variance_swap_table, variance_swap_total_variance_scalar,
)
from data_factory.errors import DataError
from data_factory.expirations import listings_for_sessions, settlement_times
from data_factory.market_calendar import EXCHANGE_TZ, exchange_date, session_bounds

SECONDS_PER_YEAR = 525_600.0 * 60.0
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
IV_INDEX_FLOOR_FRACTION = 0.5
DEFAULT_STRIKE_RANGE = 0.25
DEFAULT_STRIKE_LISTING_MARGIN = 0.25
_NO_EXPIRY = np.iinfo(np.int64).min
_DTE_UNBOUNDED = 1 << 40

# Rows of the kernel's float output, in order.
_FLOAT_FIELDS = ("strike", "bid", "ask", "mid", "theo", "iv", "delta", "gamma", "theta", "vega", "rho",
                 "t_years", "iv_conf", "quote_age_s")
(_STRIKE, _BID, _ASK, _MID, _THEO, _IV, _DELTA, _GAMMA, _THETA, _VEGA, _RHO, _T_YEARS, _IV_CONF,
 _QUOTE_AGE) = range(len(_FLOAT_FIELDS))
# Layout of the packed model-parameter vector passed to the kernel.
(_P_THETA_BAR, _P_KAPPA, _P_RHO, _P_ETA, _P_GAMMA, _P_FLOOR_YEARS, _P_A, _P_B, _P_VIX_EXP, _P_VIX_REF,
 _P_MIN_HALF, _P_LIQ_SLOPE, _P_LIQ_FREE, _P_ZERO_BID, _P_TICK, _P_LN_W0, _P_LN_W_STEP, _P_LN_S0,
 _P_LN_S_STEP, _P_STRIKE_RANGE) = range(20)


@dataclass(frozen=True, slots=True, eq=False)
class ChainSlice:
    """The synthetic chain at one quote time: one row per (expiration, right, strike).

    Rows are ordered by expiration, then calls before puts, then strike ascending. Arrays are
    read-only views. Column names follow ``OptionQuote``; ``theo`` is the model price before the
    bid/ask rounding, ``dte`` calendar days, ``t_years`` the pricing T (minutes / 525,600).
    """

    quote_time_ns: int            # bar close time, ns since the epoch (UTC)
    spot: float
    iv_index: float               # the bar's IV index (VIX points) that anchors the surface
    rate: float
    dividend_yield: float
    expiration: np.ndarray        # datetime64[D]
    dte: np.ndarray               # int64 calendar days
    t_years: np.ndarray
    strike: np.ndarray
    is_call: np.ndarray           # bool
    bid: np.ndarray
    ask: np.ndarray
    mid: np.ndarray
    theo: np.ndarray
    iv: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    theta: np.ndarray
    vega: np.ndarray
    rho: np.ndarray
    iv_conf: np.ndarray
    quote_age_s: np.ndarray

    synthetic = True
    european = True

    def __len__(self) -> int:
        return int(self.strike.size)

    @property
    def quote_time(self) -> pd.Timestamp:
        return pd.Timestamp(self.quote_time_ns, tz="UTC").tz_convert(EXCHANGE_TZ)

    @property
    def right(self) -> np.ndarray:
        """'C' / 'P' per row (built on demand; ``is_call`` is the stored form)."""
        return np.where(self.is_call, "C", "P")

    def expirations(self) -> np.ndarray:
        """The distinct expirations in this slice (datetime64[D], ascending)."""
        return np.unique(self.expiration)

    def select(self, mask) -> "ChainSlice":
        """A new slice with the rows where ``mask`` (bool array or index array) selects."""
        columns = {f.name: getattr(self, f.name)[mask] for f in fields(self)
                   if isinstance(getattr(self, f.name), np.ndarray)}
        scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in columns}
        return type(self)(**scalars, **columns)

    def to_frame(self) -> pd.DataFrame:
        """Long-format DataFrame (one row per contract) with the OptionQuote columns; not for hot loops."""
        frame = pd.DataFrame({
            "quote_time": self.quote_time,
            "expiration": pd.DatetimeIndex(self.expiration.astype("datetime64[ns]")),
            "dte": self.dte, "t_years": self.t_years, "strike": self.strike, "right": self.right,
            "bid": self.bid, "ask": self.ask, "mid": self.mid, "theo": self.theo, "iv": self.iv,
            "delta": self.delta, "gamma": self.gamma, "theta": self.theta, "vega": self.vega,
            "rho": self.rho, "iv_conf": self.iv_conf, "quote_age_s": self.quote_age_s,
            "underlying_price": self.spot,
        })
        frame.attrs.update(synthetic=self.synthetic, european=self.european, iv_index=self.iv_index)
        return frame


@dataclass(frozen=True, slots=True, eq=False)
class ContractPath:
    """Quotes of a fixed set of contracts on one expiry over consecutive bars.

    Arrays are (n_bars, n_legs), legs in the order asked for; rows at or after the expiry's
    settlement are NaN. ``spot`` and ``bar_time_ns`` are per bar. The same arithmetic as
    ``ChainSlice``: a contract quoted either way gets bitwise the same numbers.
    """

    bar_start: int
    bar_time_ns: np.ndarray
    spot: np.ndarray
    bid: np.ndarray
    ask: np.ndarray
    mid: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray

    def __len__(self) -> int:
        return int(self.spot.size)


class StructureQuotes(NamedTuple):
    """Quotes of several four-leg structures at one bar: each array (k, 4), legs in the order
    long put, short put, short call, long call; Greeks per share in ``analytics.black_scholes``
    units. (A NamedTuple: the per-bar driver builds one every bar.)"""

    bid: np.ndarray
    ask: np.ndarray
    mid: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray


# ----------------------------------------------------------------------------------------------
# numba kernel: one bar's slice
# ----------------------------------------------------------------------------------------------

# The two per-option steps shared by the slice kernel and the contract-path kernel, so that a
# contract quoted through either gets bitwise the same numbers.
@njit(cache=False, inline="always")
def _expiry_state(settle_s, bar_time_s, dte, spot, iv_index, v0, rate, div_yield, model, table):
    """Per (bar, expiry): T, the ATM total variance solved to the variance swap, SSVI φ, the
    forward and the spread scale."""
    t_years = (settle_s - bar_time_s) / SECONDS_PER_YEAR
    total_var = variance_swap_total_variance_scalar(t_years, v0, model[_P_THETA_BAR], model[_P_KAPPA])
    skew_ratio = skew_floor_ratio_scalar(t_years, model[_P_FLOOR_YEARS])
    theta_atm = atm_total_variance_scalar(total_var, skew_ratio, model[_P_LN_W0], model[_P_LN_W_STEP],
                                          model[_P_LN_S0], model[_P_LN_S_STEP], table)
    phi = power_law_phi_scalar(theta_atm * skew_ratio, model[_P_ETA], model[_P_GAMMA])
    forward = spot * math.exp((rate - div_yield) * t_years)
    half_scale = quote_half_spread_scale_scalar(iv_index, float(dte), model[_P_VIX_EXP], model[_P_VIX_REF])
    return t_years, theta_atm, phi, forward, half_scale


@njit(cache=False, inline="always")
def _quote_option(strike, is_call, spot, t_years, theta_atm, phi, forward, half_scale, rate, div_yield,
                  model):
    """One contract: SSVI vol, BSM price and Greeks, tick-rounded bid/ask."""
    k = math.log(strike / forward)
    sigma = math.sqrt(ssvi_total_variance_scalar(k, theta_atm, phi, model[_P_RHO]) / t_years)
    z = k / math.sqrt(theta_atm)
    price, delta, gamma_, vega, theta_, rho_ = bsm_scalar(spot, strike, t_years, rate, div_yield, sigma,
                                                          is_call)
    half = quote_half_spread_from_scale(price, half_scale, z, model[_P_A], model[_P_B], model[_P_MIN_HALF],
                                        model[_P_LIQ_SLOPE], model[_P_LIQ_FREE])
    bid, ask = quote_bid_ask_scalar(price, half, model[_P_ZERO_BID], model[_P_TICK])
    return bid, ask, price, sigma, delta, gamma_, vega, theta_, rho_


@njit(cache=False, inline="always")
def _bar_state(bar, bar_i64, bar_f64, sess_f64):
    """What a bar fixes for every quote: close time (s), session row, spot, IV index, rate, q."""
    session = bar_i64[bar, 1]
    return (bar_i64[bar, 0], session, bar_f64[bar, 0], bar_f64[bar, 1], sess_f64[session, 0],
            sess_f64[session, 1])


# Not cached on disk: numba's cache is keyed on this file only, so an edit to bsm_scalar or to the
# vol_surface helpers it compiles in would leave a stale kernel. Compiling costs ~1 s per process.
@njit(cache=False)
def _slice_kernel(bar, dte_min, dte_max, only_expiry_day, strike_lo_req, strike_hi_req,
                  bar_i64, bar_f64, sess_i64, sess_f64, listed_expiry_ids, expiry_i64, model, table):
    bar_time_s, session, spot, iv_index, rate, div_yield = _bar_state(bar, bar_i64, bar_f64, sess_f64)
    session_day = sess_i64[session, 0]

    if math.isnan(strike_lo_req):
        strike_lo_req = math.floor(spot * (1.0 - model[_P_STRIKE_RANGE]))
    if math.isnan(strike_hi_req):
        strike_hi_req = math.ceil(spot * (1.0 + model[_P_STRIKE_RANGE]))
    strike_lo = max(sess_i64[session, 1], int(math.ceil(strike_lo_req)))
    strike_hi = min(sess_i64[session, 2], int(math.floor(strike_hi_req)))
    n_strikes = max(0, strike_hi - strike_lo + 1)

    first, stop = sess_i64[session, 3], sess_i64[session, 4]
    n_expiries = 0
    for j in range(first, stop):
        e = listed_expiry_ids[j]
        dte = expiry_i64[e, 0] - session_day
        if (expiry_i64[e, 1] > bar_time_s and dte_min <= dte <= dte_max
                and (only_expiry_day == _NO_EXPIRY or expiry_i64[e, 0] == only_expiry_day)):
            n_expiries += 1
    n_rows = n_expiries * n_strikes * 2
    out_f = np.empty((len(_FLOAT_FIELDS), n_rows))
    out_i = np.empty((2, n_rows), dtype=np.int64)
    out_call = np.empty(n_rows, dtype=np.bool_)
    if n_rows == 0:
        return out_f, out_i, out_call

    v0 = initial_variance_scalar(iv_index, model[_P_THETA_BAR], model[_P_KAPPA])
    row = 0
    for j in range(first, stop):
        e = listed_expiry_ids[j]
        expiry_day = expiry_i64[e, 0]
        dte = expiry_day - session_day
        if not (expiry_i64[e, 1] > bar_time_s and dte_min <= dte <= dte_max
                and (only_expiry_day == _NO_EXPIRY or expiry_day == only_expiry_day)):
            continue
        t_years, theta_atm, phi, forward, half_scale = _expiry_state(
            expiry_i64[e, 1], bar_time_s, dte, spot, iv_index, v0, rate, div_yield, model, table)
        for i in range(n_strikes):
            strike = float(strike_lo + i)
            for side in range(2):
                r = row + i + side * n_strikes
                is_call = side == 0
                (bid, ask, price, sigma, delta, gamma_, vega, theta_, rho_) = _quote_option(
                    strike, is_call, spot, t_years, theta_atm, phi, forward, half_scale, rate,
                    div_yield, model)
                out_f[_STRIKE, r] = strike
                out_f[_BID, r] = bid
                out_f[_ASK, r] = ask
                out_f[_MID, r] = 0.5 * (bid + ask)
                out_f[_THEO, r] = price
                out_f[_IV, r] = sigma
                out_f[_DELTA, r] = delta
                out_f[_GAMMA, r] = gamma_
                out_f[_THETA, r] = theta_
                out_f[_VEGA, r] = vega
                out_f[_RHO, r] = rho_
                out_f[_T_YEARS, r] = t_years
                out_f[_IV_CONF, r] = 1.0
                out_f[_QUOTE_AGE, r] = 0.0
                out_i[0, r] = expiry_day
                out_i[1, r] = dte
                out_call[r] = is_call
        row += 2 * n_strikes
    return out_f, out_i, out_call


@njit(cache=False)
def _contract_path_kernel(bar_start, bar_stop, expiry_day, settle_s, strikes, is_call, bar_i64, bar_f64,
                          sess_i64, sess_f64, model, table):
    """Quotes of fixed contracts (one expiry) at every bar in [bar_start, bar_stop): arrays
    (n_bars, n_legs) of bid, ask, mid, delta, gamma, vega, theta; NaN at or after settlement."""
    n_bars = bar_stop - bar_start
    n_legs = strikes.size
    out = np.full((7, n_bars, n_legs), np.nan)
    for b in range(n_bars):
        bar_time_s, session, spot, iv_index, rate, div_yield = _bar_state(bar_start + b, bar_i64, bar_f64,
                                                                          sess_f64)
        if bar_time_s >= settle_s:
            continue
        dte = expiry_day - sess_i64[session, 0]
        v0 = initial_variance_scalar(iv_index, model[_P_THETA_BAR], model[_P_KAPPA])
        t_years, theta_atm, phi, forward, half_scale = _expiry_state(
            settle_s, bar_time_s, dte, spot, iv_index, v0, rate, div_yield, model, table)
        for leg in range(n_legs):
            (bid, ask, price, sigma, delta, gamma_, vega, theta_, rho_) = _quote_option(
                strikes[leg], is_call[leg], spot, t_years, theta_atm, phi, forward, half_scale, rate,
                div_yield, model)
            out[0, b, leg] = bid
            out[1, b, leg] = ask
            out[2, b, leg] = 0.5 * (bid + ask)
            out[3, b, leg] = delta
            out[4, b, leg] = gamma_
            out[5, b, leg] = vega
            out[6, b, leg] = theta_
    return out


@njit(cache=False)
def _positions_at_bar_kernel(bar, expiry_rows, strikes, bar_i64, bar_f64, sess_i64, sess_f64, expiry_i64,
                             model, table):
    """Quotes of k four-leg structures (each on its own expiry) at one bar: (7, k, 4) bid, ask,
    mid, delta, gamma, vega, theta; NaN for a structure whose expiry has settled. Legs: put, put,
    call, call."""
    k = strikes.shape[0]
    out = np.full((7, k, 4), np.nan)
    bar_time_s, session, spot, iv_index, rate, div_yield = _bar_state(bar, bar_i64, bar_f64, sess_f64)
    v0 = initial_variance_scalar(iv_index, model[_P_THETA_BAR], model[_P_KAPPA])
    for p in range(k):
        settle_s = expiry_i64[expiry_rows[p], 1]
        if bar_time_s >= settle_s:
            continue
        dte = expiry_i64[expiry_rows[p], 0] - sess_i64[session, 0]
        t_years, theta_atm, phi, forward, half_scale = _expiry_state(
            settle_s, bar_time_s, dte, spot, iv_index, v0, rate, div_yield, model, table)
        for leg in range(4):
            (bid, ask, price, sigma, delta, gamma_, vega, theta_, rho_) = _quote_option(
                strikes[p, leg], leg >= 2, spot, t_years, theta_atm, phi, forward, half_scale, rate,
                div_yield, model)
            out[0, p, leg] = bid
            out[1, p, leg] = ask
            out[2, p, leg] = 0.5 * (bid + ask)
            out[3, p, leg] = delta
            out[4, p, leg] = gamma_
            out[5, p, leg] = vega
            out[6, p, leg] = theta_
    return out


# ----------------------------------------------------------------------------------------------
# construction helpers (vectorised, run once)
# ----------------------------------------------------------------------------------------------

def _bar_index_ns(index: pd.Index) -> pd.DatetimeIndex:
    if not isinstance(index, pd.DatetimeIndex):
        raise DataError("bars: the index must be a DatetimeIndex of bar close times")
    stamps = index if index.tz is not None else index.tz_localize(EXCHANGE_TZ)
    return stamps.tz_convert(EXCHANGE_TZ).as_unit("ns")


def _require_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; have {list(frame.columns)}")


def _require_finite_positive(values: pd.Series, what: str, allow_zero: bool = False) -> None:
    bad = ~np.isfinite(values.to_numpy(dtype=float))
    bad |= (values.to_numpy(dtype=float) < 0) if allow_zero else (values.to_numpy(dtype=float) <= 0)
    if bad.any():
        where = values.index[bad][0]
        label = where.date() if hasattr(where, "date") else where
        sign = ">= 0" if allow_zero else "> 0"
        raise DataError(f"{what} on {label} is {values[bad].iloc[0]!r}; it must be finite and {sign}")


class SyntheticChainProvider:
    """Lazy SYNTHETIC, EUROPEAN SPY option chains for every bar of a spot series.

    ``bars``: DataFrame with ``close`` (the spot at each bar) indexed by bar CLOSE times
    (tz-aware; tz-naive is read as America/New_York), strictly increasing, inside sessions.
    ``daily``: DataFrame indexed by session dates with ``close`` (spot), ``iv_index`` (VIX points)
    and ``rate`` (annual, continuous) for every session of ``bars``; optional ``open`` (strike
    centre for a first session without a prior one) and ``dividend_yield`` (else the
    ``dividend_yield`` argument). The row before the first bar session, if present, supplies the
    prior close and VIX.
    """

    def __init__(self, bars: pd.DataFrame, daily: pd.DataFrame, *, dividend_yield: float = 0.019,
                 surface: SurfaceParams = SurfaceParams(), spreads: SpreadParams = SpreadParams(),
                 spot_vol_beta: float = -1.5, strike_range: float = DEFAULT_STRIKE_RANGE,
                 strike_listing_margin: float = DEFAULT_STRIKE_LISTING_MARGIN,
                 source: dict | None = None) -> None:
        if not (0.0 < strike_range < 1.0) or not (0.0 <= strike_listing_margin < 1.0 - strike_range):
            raise ValueError(f"strike_range {strike_range} must lie in (0, 1) and strike_listing_margin "
                             f"{strike_listing_margin} in [0, 1 − strike_range)")
        if not math.isfinite(spot_vol_beta):
            raise ValueError(f"spot_vol_beta must be finite, got {spot_vol_beta!r}")
        self.surface = surface
        self.spreads = spreads
        self.spot_vol_beta = float(spot_vol_beta)
        self.strike_range = float(strike_range)
        self.strike_listing_margin = float(strike_listing_margin)
        self._source = dict(source or {})

        _require_columns(bars, ["close"], "bars")
        _require_columns(daily, ["close", "iv_index", "rate"], "daily")
        if len(bars) == 0:
            raise DataError("bars: no rows")
        bar_times = _bar_index_ns(bars.index)
        if not bar_times.is_monotonic_increasing or bar_times.has_duplicates:
            raise DataError("bars: timestamps must be strictly increasing")
        spot = bars["close"].to_numpy(dtype=float)
        _require_finite_positive(pd.Series(spot, index=bar_times), "bars close")

        daily = daily.copy()
        daily.index = pd.DatetimeIndex(daily.index).normalize()
        if not daily.index.is_monotonic_increasing or daily.index.has_duplicates:
            raise DataError("daily: session dates must be strictly increasing")
        bar_sessions = bar_times.tz_localize(None).normalize()
        sessions = pd.DatetimeIndex(bar_sessions.unique())
        missing = sessions.difference(daily.index)
        if len(missing):
            raise DataError(f"daily: no row for session {missing[0].date()} of the bars")
        position = daily.index.get_indexer(sessions)
        for column in ("close", "iv_index"):
            _require_finite_positive(daily[column].iloc[position], f"daily {column}")
        rates = daily["rate"].iloc[position].to_numpy(dtype=float)
        if not np.isfinite(rates).all():
            bad = sessions[~np.isfinite(rates)][0]
            raise DataError(f"daily rate on {bad.date()} is not finite")
        if "dividend_yield" in daily.columns:
            div = daily["dividend_yield"].iloc[position].to_numpy(dtype=float)
        else:
            div = np.full(len(sessions), float(dividend_yield))
        if not np.isfinite(div).all():
            raise DataError("dividend yield: not finite")

        close = daily["close"].to_numpy(dtype=float)
        vix = daily["iv_index"].to_numpy(dtype=float)
        has_prior = position > 0
        prior = np.where(has_prior, position - 1, position)
        if "open" in daily.columns:
            first_open = daily["open"].to_numpy(dtype=float)[position]
        else:
            first_bar = np.searchsorted(bar_sessions.asi8, sessions.asi8)
            first_open = spot[first_bar]
        base_price = np.where(has_prior, close[prior], first_open)
        base_vix = vix[prior]              # its own close when there is no prior session
        session_close = close[position]
        session_vix = vix[position]
        if not np.isfinite(base_price).all() or (base_price <= 0).any() or not np.isfinite(base_vix).all():
            bad = sessions[~(np.isfinite(base_price) & (base_price > 0) & np.isfinite(base_vix))][0]
            raise DataError(f"daily: the prior close / VIX for session {bad.date()} is missing or not positive")

        # Per bar: which session, elapsed fraction of it, IV index.
        session_of_bar = np.searchsorted(sessions.asi8, bar_sessions.asi8)
        bounds = session_bounds(sessions)
        open_ns = pd.DatetimeIndex(bounds["open"]).as_unit("ns").asi8
        close_ns = pd.DatetimeIndex(bounds["close"]).as_unit("ns").asi8
        bar_ns = bar_times.asi8
        outside = (bar_ns <= open_ns[session_of_bar]) | (bar_ns > close_ns[session_of_bar])
        if outside.any():
            raise DataError(f"bars: {bar_times[outside][0]} is not a bar close time inside its session "
                            f"(open, close]")
        elapsed = (bar_ns - open_ns[session_of_bar]) / (close_ns - open_ns)[session_of_bar]
        base_price_bar = base_price[session_of_bar]
        intraday_return_pct = (spot / base_price_bar - 1.0) * 100.0
        day_return_pct = (session_close / base_price - 1.0) * 100.0
        residual = session_vix - base_vix - self.spot_vol_beta * day_return_pct
        iv_bar = (base_vix[session_of_bar] + self.spot_vol_beta * intraday_return_pct
                  + elapsed * residual[session_of_bar])
        iv_floor = IV_INDEX_FLOOR_FRACTION * np.minimum(base_vix, session_vix)[session_of_bar]
        iv_bar = np.maximum(iv_bar, iv_floor)

        # Per session: strikes (fixed for the day) and listed expirations (CSR into a global table).
        listing_low = np.floor(base_price * (1.0 - strike_range - strike_listing_margin)).astype(np.int64)
        listing_high = np.ceil(base_price * (1.0 + strike_range + strike_listing_margin)).astype(np.int64)
        listing_low = np.maximum(listing_low, 1)
        offsets, listed_days = listings_for_sessions(sessions)
        expiry_days = np.unique(listed_days)
        settle = settlement_times(pd.DatetimeIndex(expiry_days.astype("datetime64[D]").astype("datetime64[ns]")))
        settle_s = settle.as_unit("ns").asi8 // 1_000_000_000

        session_days = sessions.asi8 // (86_400 * 1_000_000_000)
        self._bar_ns = bar_ns
        self._bar_i64 = np.ascontiguousarray(np.column_stack([bar_ns // 1_000_000_000, session_of_bar]).astype(np.int64))
        self._bar_f64 = np.ascontiguousarray(np.column_stack([spot, iv_bar]))
        self._sess_i64 = np.ascontiguousarray(np.column_stack(
            [session_days, listing_low, listing_high, offsets[:-1], offsets[1:]]).astype(np.int64))
        self._sess_f64 = np.ascontiguousarray(np.column_stack([rates, div]))
        self._listed_expiry_ids = np.searchsorted(expiry_days, listed_days).astype(np.int64)
        self._expiry_i64 = np.ascontiguousarray(np.column_stack([expiry_days, settle_s]).astype(np.int64))
        table = variance_swap_table(surface.rho, surface.eta, surface.gamma)
        self._table = table.ln_theta
        model = np.empty(20)
        model[[_P_THETA_BAR, _P_KAPPA, _P_RHO, _P_ETA, _P_GAMMA, _P_FLOOR_YEARS]] = [
            surface.long_run_variance, surface.mean_reversion, surface.rho, surface.eta, surface.gamma,
            surface.skew_floor_years]
        model[[_P_A, _P_B, _P_VIX_EXP, _P_VIX_REF, _P_MIN_HALF, _P_LIQ_SLOPE, _P_LIQ_FREE, _P_ZERO_BID,
               _P_TICK]] = [spreads.a, spreads.b, spreads.vix_exponent, spreads.vix_reference,
                            spreads.min_half, spreads.liquidity_slope, spreads.liquidity_free_sd,
                            spreads.zero_bid_below, spreads.tick]
        model[[_P_LN_W0, _P_LN_W_STEP, _P_LN_S0, _P_LN_S_STEP]] = [table.ln_w0, table.ln_w_step,
                                                                   table.ln_s0, table.ln_s_step]
        model[_P_STRIKE_RANGE] = strike_range
        self._model = model
        for array in (self._bar_ns, self._bar_i64, self._bar_f64, self._sess_i64, self._sess_f64,
                      self._listed_expiry_ids, self._expiry_i64, self._model):
            array.setflags(write=False)
        self._sessions = sessions
        self._bar_times = bar_times
        ohlcv = ["open", "high", "low", "close", "volume"]
        self._ohlcv = bars[ohlcv].copy() if set(ohlcv) <= set(bars.columns) else None
        self._session_listings: dict[int, list] = {}
        self._last_expirations: tuple = (None, None)
        self._structure_state = (self._bar_i64, self._bar_f64, self._sess_i64, self._sess_f64, self._expiry_i64,
                                 self._model, self._table)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_embedded(cls, start="2014-01-03", end="2018-12-31", seed: int = 42, freq: str = "5min",
                      symbol: str = "SPY", garch_config=None, **kwargs) -> "SyntheticChainProvider":
        """Provider over the embedded data: SPY proxy (S&P 500 / 10), synthetic intraday bars,
        VIX (GARCH proxy before 2014), Fama–French risk-free rate, constant dividend yield."""
        from data_factory import embedded
        from data_factory.intraday import intraday_bars
        from data_factory.market_calendar import CALENDAR_START, trading_sessions

        garch_kwargs = {} if garch_config is None else {"garch_config": garch_config}
        embedded.daily_bars(symbol, start, end)   # the requested period, checked as the user gave it
        first = pd.Timestamp(start)
        earlier = trading_sessions(max(first - pd.Timedelta(days=10), pd.Timestamp(CALENDAR_START)), first)
        earlier = earlier[earlier < first]
        daily_start = earlier[-1] if len(earlier) else first
        try:
            daily = embedded.daily_bars(symbol, daily_start, end)
            iv = embedded.daily_iv_index(daily_start, end, **garch_kwargs)
        except DataError:
            # No prior session in the data (e.g. the very first day): start without one.
            daily = embedded.daily_bars(symbol, first, end)
            iv = embedded.daily_iv_index(first, end, **garch_kwargs)
        missing = daily.index.difference(iv.index)
        if len(missing):
            raise DataError(f"from_embedded: no IV index for session {missing[0].date()} "
                            f"({len(missing)} sessions); the IV index covers {iv.index[0].date()} … "
                            f"{iv.index[-1].date()}")
        period = daily.loc[daily.index >= first]
        if period.empty:
            raise DataError(f"from_embedded: no sessions between {first.date()} and {end}")
        bars = intraday_bars(period, freq=freq, seed=seed)
        frame = pd.DataFrame({
            "open": daily["open"], "close": daily["close"],
            "iv_index": iv["iv_index"].reindex(daily.index),
            "rate": embedded.risk_free_rate(daily.index).to_numpy(),
        }, index=daily.index)
        kwargs.setdefault("dividend_yield", embedded.DEFAULT_DIVIDEND_YIELD)
        source = {"spot": f"embedded {symbol} daily bars ({daily.attrs.get('description', 'see embedded')}), "
                          f"synthetic {freq} intraday bars, seed={seed}",
                  "iv_index": "embedded VIX closes (GARCH proxy before 2014-01-03)",
                  "rate": "Fama–French RF, monthly, flat within the month",
                  "iv_source_counts": iv["iv_source"].loc[period.index].value_counts().to_dict()}
        return cls(bars, frame, source=source, **kwargs)

    # ------------------------------------------------------------------------------------------
    @property
    def bar_times(self) -> pd.DatetimeIndex:
        """Bar close times the provider can quote (tz-aware America/New_York)."""
        return self._bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self._sessions

    def ohlcv_bars(self) -> pd.DataFrame | None:
        """The spot bars' open/high/low/close/volume when the provider was given them (for a
        Backtrader feed), else None."""
        return self._ohlcv

    def iv_index_bars(self) -> pd.Series:
        """The per-bar IV index (VIX points) anchoring each bar's surface."""
        return pd.Series(self._bar_f64[:, 1], index=self._bar_times, name="iv_index")

    def spot_bars(self) -> pd.Series:
        return pd.Series(self._bar_f64[:, 0], index=self._bar_times, name="spot")

    def describe(self) -> dict:
        return {
            "model": "VIX-anchored variance term structure (Heston-type W(T)) + SSVI power-law smile, "
                     "theta_T solved to the variance swap; Black-Scholes-Merton quotes with a "
                     "VIX/DTE/liquidity-scaled bid/ask",
            "synthetic": True,
            "european": True,
            "surface": asdict(self.surface),
            "spreads": asdict(self.spreads),
            "spot_vol_beta": self.spot_vol_beta,
            "strike_step": 1.0,
            "strike_range": self.strike_range,
            "strike_listing_margin": self.strike_listing_margin,
            "bars": len(self._bar_ns),
            "first_bar": str(self._bar_times[0]),
            "last_bar": str(self._bar_times[-1]),
            "source": self._source,
        }

    # ------------------------------------------------------------------------------------------
    def bar_index(self, timestamp) -> int:
        """Position of the bar stamped ``timestamp``; DataError when it is not one of the bars."""
        if isinstance(timestamp, pd.Timestamp) and timestamp.tzinfo is not None:
            stamp = timestamp
        else:
            try:
                stamp = pd.Timestamp(timestamp)
            except (ValueError, TypeError) as exc:
                raise DataError(f"timestamp: cannot read {timestamp!r} as a time ({exc})") from None
            if stamp.tzinfo is None:
                stamp = stamp.tz_localize(EXCHANGE_TZ)
        ns = stamp.value if stamp.unit == "ns" else stamp.as_unit("ns").value
        position = int(self._bar_ns.searchsorted(ns))
        if position == len(self._bar_ns) or self._bar_ns[position] != ns:
            where = ("outside" if (ns < self._bar_ns[0] or ns > self._bar_ns[-1]) else "inside, but not a bar of")
            raise DataError(f"no bar at {stamp.tz_convert(EXCHANGE_TZ)}: the time is {where} the provider's "
                            f"bars, {self._bar_times[0]} … {self._bar_times[-1]} ({len(self._bar_ns)} bars)")
        return position

    def slice(self, timestamp, dte_min=None, dte_max=None, expiry=None, strike_min=None,
              strike_max=None) -> ChainSlice:
        """The chain at the bar stamped ``timestamp``.

        ``dte_min``/``dte_max``: inclusive calendar-day bounds; ``expiry``: one expiration date
        (an unlisted one gives an empty slice); ``strike_min``/``strike_max``: inclusive strike
        bounds (default ±``strike_range`` of the bar's spot, rounded outward to $1). An empty
        result is a valid empty slice.
        """
        return self.slice_at(self.bar_index(timestamp), dte_min, dte_max, expiry, strike_min, strike_max)

    def slice_at(self, bar: int, dte_min=None, dte_max=None, expiry=None, strike_min=None,
                 strike_max=None) -> ChainSlice:
        """``slice`` by bar position (0 … len(bar_times) − 1), for drivers that walk the bars."""
        n_bars = len(self._bar_ns)
        if not 0 <= bar < n_bars:
            raise DataError(f"bar position {bar} is outside 0 … {n_bars - 1}")
        low = -_DTE_UNBOUNDED if dte_min is None else int(dte_min)
        high = _DTE_UNBOUNDED if dte_max is None else int(dte_max)
        if low > high:
            raise ValueError(f"dte_min {dte_min} is greater than dte_max {dte_max}")
        k_low = math.nan if strike_min is None else float(strike_min)
        k_high = math.nan if strike_max is None else float(strike_max)
        if strike_min is not None and strike_max is not None and k_low > k_high:
            raise ValueError(f"strike_min {strike_min} is greater than strike_max {strike_max}")
        expiry_day = _NO_EXPIRY if expiry is None else self._expiry_day(expiry)
        out_f, out_i, out_call = _slice_kernel(
            bar, low, high, expiry_day, k_low, k_high, self._bar_i64, self._bar_f64, self._sess_i64,
            self._sess_f64, self._listed_expiry_ids, self._expiry_i64, self._model, self._table)
        out_f.flags.writeable = False
        out_i.flags.writeable = False
        out_call.flags.writeable = False
        session = self._bar_i64[bar, 1]
        return ChainSlice(
            int(self._bar_ns[bar]), float(self._bar_f64[bar, 0]), float(self._bar_f64[bar, 1]),
            float(self._sess_f64[session, 0]), float(self._sess_f64[session, 1]),
            out_i[0].view("datetime64[D]"), out_i[1], out_f[_T_YEARS], out_f[_STRIKE], out_call,
            out_f[_BID], out_f[_ASK], out_f[_MID], out_f[_THEO], out_f[_IV], out_f[_DELTA],
            out_f[_GAMMA], out_f[_THETA], out_f[_VEGA], out_f[_RHO], out_f[_IV_CONF], out_f[_QUOTE_AGE])

    def expiry_row(self, expiration) -> int:
        """Row of a listed expiration in the provider's expiry table."""
        expiry_day = self._expiry_day(expiration)
        row = int(np.searchsorted(self._expiry_i64[:, 0], expiry_day))
        if row == len(self._expiry_i64) or self._expiry_i64[row, 0] != expiry_day:
            raise DataError(f"expiration {pd.Timestamp(expiry_day, unit='D').date()} is not a listed expiry "
                            f"in the provider's period")
        return row

    def quote_structures(self, bar: int, expirations: np.ndarray, strikes: np.ndarray) -> StructureQuotes:
        """Quotes with Greeks of k put-put-call-call structures at one bar, in one kernel call:
        ``expirations`` (k,) ``datetime64[D]``, ``strikes`` (k, 4). Every array of the result is
        (k, 4); the numbers are the ones ``quote_contracts`` and ``slice`` give; NaN rows for
        settled expiries. The per-bar driver marks every open condor with it."""
        if expirations is self._last_expirations[0]:
            # The per-bar driver passes the same read-only array every bar while the open set is
            # unchanged (only read-only arrays are remembered, so the contents cannot have moved).
            rows = self._last_expirations[1]
        else:
            days = np.asarray(expirations, dtype="datetime64[D]").astype(np.int64)
            rows = np.searchsorted(self._expiry_i64[:, 0], days)
            if rows.size and ((rows >= len(self._expiry_i64)).any()
                              or (self._expiry_i64[np.minimum(rows, len(self._expiry_i64) - 1), 0] != days).any()):
                bad = [int(day) for day, row in zip(days, rows)
                       if row >= len(self._expiry_i64) or self._expiry_i64[row, 0] != day][0]
                raise DataError(f"expiration {pd.Timestamp(bad, unit='D').date()} is not a listed expiry in the "
                                f"provider's period")
            if isinstance(expirations, np.ndarray) and not expirations.flags.writeable:
                self._last_expirations = (expirations, rows)
        out = _positions_at_bar_kernel(bar, rows, np.asarray(strikes, dtype=np.float64), *self._structure_state)
        return StructureQuotes(*out)

    def quote_contracts(self, bar_start: int, bar_stop: int, expiration, strikes, is_call) -> ContractPath:
        """Quotes of the given contracts (one expiration) at bars ``bar_start … bar_stop − 1``.

        For position paths: the fast driver asks for a whole holding period at once, the per-bar
        driver for one bar; both get the numbers ``slice`` gives for the same contracts.
        """
        n_bars = len(self._bar_ns)
        if not (0 <= bar_start <= bar_stop <= n_bars):
            raise DataError(f"bar range {bar_start} … {bar_stop} is outside 0 … {n_bars}")
        row = self.expiry_row(expiration)
        expiry_day = int(self._expiry_i64[row, 0])
        strikes = np.ascontiguousarray(strikes, dtype=float)
        is_call = np.ascontiguousarray(is_call, dtype=np.bool_)
        if strikes.shape != is_call.shape or strikes.ndim != 1:
            raise ValueError("strikes and is_call must be 1-d arrays of the same length")
        out = _contract_path_kernel(bar_start, bar_stop, expiry_day, self._expiry_i64[row, 1], strikes,
                                    is_call, self._bar_i64, self._bar_f64, self._sess_i64, self._sess_f64,
                                    self._model, self._table)
        return ContractPath(bar_start, self._bar_ns[bar_start:bar_stop],
                            self._bar_f64[bar_start:bar_stop, 0], *out)

    def expirations_at(self, bar: int, dte_min=None, dte_max=None) -> np.ndarray:
        """The expirations listed and not yet settled at a bar, with ``dte_min … dte_max``
        calendar days to go (inclusive), ascending (datetime64[D]): what ``slice_at`` would
        return rows for, without pricing anything."""
        n_bars = len(self._bar_ns)
        if not 0 <= bar < n_bars:
            raise DataError(f"bar position {bar} is outside 0 … {n_bars - 1}")
        bar_time_s, session = (int(v) for v in self._bar_i64[bar])
        listed = self._session_listings.get(session)
        if listed is None:
            # (expiry day, settlement s, DTE) of the session's listings, ascending: a session's
            # listings are fixed, so each session is read once.
            first, stop = self._sess_i64[session, 3], self._sess_i64[session, 4]
            rows = self._expiry_i64[np.sort(self._listed_expiry_ids[first:stop])]
            dte = rows[:, 0] - self._sess_i64[session, 0]
            listed = self._session_listings[session] = list(zip(rows[:, 0].tolist(), rows[:, 1].tolist(),
                                                                 dte.tolist()))
        low = -_DTE_UNBOUNDED if dte_min is None else int(dte_min)
        high = _DTE_UNBOUNDED if dte_max is None else int(dte_max)
        days = [day for day, settle, dte in listed if settle > bar_time_s and low <= dte <= high]
        return np.array(days, dtype="datetime64[D]")

    def settlement_time(self, expiration) -> pd.Timestamp:
        """PM settlement (session close) of a listed expiration."""
        expiry_day = self._expiry_day(expiration)
        row = int(np.searchsorted(self._expiry_i64[:, 0], expiry_day))
        if row == len(self._expiry_i64) or self._expiry_i64[row, 0] != expiry_day:
            raise DataError(f"expiration {pd.Timestamp(expiry_day, unit='D').date()} is not listed")
        return pd.Timestamp(int(self._expiry_i64[row, 1]), unit="s", tz="UTC").tz_convert(EXCHANGE_TZ)

    def bar_index_at_or_before(self, timestamp) -> int:
        """Position of the last bar stamped at or before ``timestamp`` (−1 if none)."""
        stamp = pd.Timestamp(timestamp)
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize(EXCHANGE_TZ)
        return int(self._bar_ns.searchsorted(stamp.as_unit("ns").value, side="right")) - 1

    @staticmethod
    def _expiry_day(expiry) -> int:
        if type(expiry) is dt.date:  # the drivers' hot path: no parsing needed
            return expiry.toordinal() - _EPOCH_ORDINAL
        if isinstance(expiry, np.datetime64):     # an entry of expirations_at
            return int(expiry.astype("datetime64[D]").astype(np.int64))
        stamp = exchange_date(expiry, "expiry", check_range=False)
        return int(stamp.as_unit("ns").value // (86_400 * 1_000_000_000))
