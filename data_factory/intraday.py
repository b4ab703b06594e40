"""Synthetic intraday bars (1, 5 or 15 minutes) built from real daily OHLCV bars.

SYNTHETIC DATA. Every real session is expanded into a seeded random price path that starts at the
day's open, ends at its close and touches its high and low exactly; bars are cut from that path.

Timestamps: America/New_York, tz-aware, and each bar is stamped with its CLOSE time. The bar
covering 09:30–09:35 is stamped 09:35, so everything in a bar is known at its stamp and a
consumer reading bar *t* at time *t* never sees the future. A full session has 390 one-minute
bars (09:31 … 16:00) or 78 five-minute bars (09:35 … 16:00); early closes (13:00) have fewer.
Session times come from ``data_factory.market_calendar.session_bounds``.

Path construction, per session (all days of equal length are processed together as arrays):

1. Volatility clock. Intraday variance is U-shaped (high after the open, raised before the close;
   Andersen & Bollerslev 1997, *Intraday periodicity and volatility persistence*). Sub-steps of
   ``SUBSTEPS_PER_MINUTE`` per minute get variance weights ``1 + a·e^{-t/λ} + b·e^{-(T-t)/λ}``; their
   cumulative share is the "clock" in [0, 1].
2. Times of the high and the low. Each is drawn on the clock from the Brownian first-passage law
   given its distance from the open and from the close (an extreme near the close tends to come
   late, one far from both in mid-session). If the high equals the open it is placed at the
   start, if it equals the close at the end; the same for the low.
3. Brownian bridges, in clock time, through the anchors open → first extreme → second extreme →
   close, with a noise scale from the day's range (Parkinson: σ ≈ (H − L) / (2·√ln 2)).
4. Reflection. Excursions outside [low, high] are folded back by reflection at the two barriers
   (modular, so any excursion lands inside); anchors are inside or on the barriers and stay put,
   and they are then assigned again so no floating-point operation can move them.
5. Bars. A one-minute bar's open is the previous minute's close (the day's open for the first),
   its high/low are the extremes of its sub-steps including the open, its close the last sub-step.
   5- and 15-minute bars are aggregated from the 1-minute bars (first open, max high, min low,
   last close, summed volume), so all frequencies agree.

Volume: U-shaped minute weights (heavier at the close, the closing auction) times seeded
log-normal noise, turned into whole shares that sum EXACTLY to the day's volume by
largest-remainder rounding. Volumes are returned as float64 holding whole numbers.

Randomness: each session draws from ``np.random.default_rng([seed, date.toordinal()])``, so a day's
bars depend only on the seed, the date and that day's OHLCV, never on the requested range.
``df.attrs`` labels the frame synthetic, but pandas operations may drop ``attrs``; run reports
should use ``describe_intraday``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from data_factory.embedded import validate_daily_bars
from data_factory.errors import DataError
from data_factory.market_calendar import EXCHANGE_TZ, session_bounds, trading_sessions

SUBSTEPS_PER_MINUTE = 6                      # 10-second path resolution inside each minute
FREQ_MINUTES = {"1min": 1, "5min": 5, "15min": 15}
NANOS_PER_MINUTE = 60 * 1_000_000_000
CHUNK_DAYS = 32
LOG2 = np.log(2.0)


@dataclass(frozen=True)
class IntradayShape:
    """Stylised intraday seasonality (typical magnitudes for US large-cap index products)."""

    open_variance_boost: float = 3.0     # variance right after the open = (1 + 3.0) × midday
    close_variance_boost: float = 1.5    # variance right before the close = (1 + 1.5) × midday
    variance_decay_minutes: float = 20.0
    open_volume_boost: float = 3.0
    close_volume_boost: float = 4.0      # the closing auction draws more than the open
    volume_decay_minutes: float = 20.0
    volume_noise_sigma: float = 0.35     # log-normal minute-volume noise


DEFAULT_SHAPE = IntradayShape()


def describe_intraday(seed: int, freq: str = "5min", shape: IntradayShape = DEFAULT_SHAPE) -> dict:
    """What the synthetic intraday bars are and how they were made, for a run report."""
    return {
        "synthetic": True,
        "source": f"brownian_bridge(seed={seed})",
        "method": "seeded Brownian bridges on a U-shaped volatility clock through open, high, low "
                  "and close of each real day, reflected into [low, high]; "
                  f"{SUBSTEPS_PER_MINUTE} sub-steps per minute",
        "freq": freq,
        "seed": seed,
        "timestamps": "America/New_York, each bar stamped with its close time (09:30-09:35 -> 09:35)",
        "sessions": "NYSE calendar (exchange_calendars XNYS), early closes included",
        "exact": "first open, last close, max high, min low and total volume equal the daily bar",
        "per_day_rng": "numpy default_rng([seed, date.toordinal()])",
        "shape": asdict(shape),
    }


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _checked_daily(daily: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(daily, pd.DataFrame):
        raise DataError(f"daily bars must be a DataFrame, got {type(daily).__name__}")
    if daily.empty:
        raise DataError("daily bars: no rows")
    validate_daily_bars(daily, "daily bars")
    index = daily.index
    if index.tz is not None:
        raise DataError("daily bars: index must hold tz-naive session dates, not tz-aware timestamps")
    not_midnight = index != index.normalize()
    if not_midnight.any():
        raise DataError(f"daily bars {index[not_midnight][0]}: date carries a time of day; "
                        "expected session dates at midnight")
    if index.has_duplicates:
        raise DataError(f"daily bars {index[index.duplicated()][0].date()}: duplicate date")
    sessions = trading_sessions(index.min(), index.max())
    off = ~index.isin(sessions)
    if off.any():
        raise DataError(f"daily bars {index[off][0].date()}: date is not an NYSE session "
                        f"({int(off.sum())} such rows)")
    volume = daily["volume"].to_numpy(dtype=float)
    fractional = volume != np.floor(volume)
    if fractional.any():
        raise DataError(f"daily bars {index[fractional][0].date()}: volume {volume[fractional][0]} "
                        "is not a whole number of shares")
    if (volume >= 2.0 ** 53).any():
        raise DataError(f"daily bars {index[volume >= 2.0 ** 53][0].date()}: volume too large to split exactly")
    return daily[["open", "high", "low", "close", "volume"]].astype("float64").sort_index()


# ---------------------------------------------------------------------------------------------
# path and bars for days of one session length
# ---------------------------------------------------------------------------------------------

def _u_shape(minutes_from_open: np.ndarray, session_minutes: int, open_boost: float,
             close_boost: float, decay: float) -> np.ndarray:
    return (1.0 + open_boost * np.exp(-minutes_from_open / decay)
            + close_boost * np.exp(-(session_minutes - minutes_from_open) / decay))


def _volatility_clock(session_minutes: int, shape: IntradayShape) -> np.ndarray:
    """Cumulative share of the day's variance at each sub-step boundary; 0 … 1 exactly."""
    steps = session_minutes * SUBSTEPS_PER_MINUTE
    midpoints = (np.arange(steps) + 0.5) / SUBSTEPS_PER_MINUTE
    weight = _u_shape(midpoints, session_minutes, shape.open_variance_boost,
                      shape.close_variance_boost, shape.variance_decay_minutes)
    clock = np.concatenate([[0.0], np.cumsum(weight / weight.sum())])
    clock[-1] = 1.0
    return clock


def _extreme_step(distance_from_open: float, distance_to_close: float, noise_scale: float,
                  uniform: float, clock: np.ndarray) -> int:
    """Sub-step of the day's high (or low), drawn given how far it lies from the open and close.

    For a Brownian motion (scale σ on the clock) that first reaches its maximum a above the start
    at clock time θ and then ends b below it, the density of θ is the product of two first-passage
    densities: θ^(-3/2)·e^{-a²/(2σ²θ)} · (1-θ)^(-3/2)·e^{-b²/(2σ²(1-θ))}. An extreme equal to the
    open (a = 0) sits at the start, one equal to the close (b = 0) at the end. Sampled by inverse
    CDF on the sub-step grid; one day at a time so no day's draw depends on another day's array.
    """
    steps = len(clock) - 1
    if distance_from_open == 0.0:
        return 0
    if distance_to_close == 0.0:
        return steps
    theta = clock[1:steps]
    variance = noise_scale * noise_scale
    log_density = (-1.5 * np.log(theta) - distance_from_open ** 2 / (2.0 * variance * theta)
                   - 1.5 * np.log1p(-theta) - distance_to_close ** 2 / (2.0 * variance * (1.0 - theta)))
    cumulative = np.cumsum(np.exp(log_density - log_density.max()))
    return 1 + min(int(np.searchsorted(cumulative, uniform * cumulative[-1])), steps - 2)


def _noise_scale(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Day's price-unit volatility from its range (Parkinson: E[range²] = 4·ln2·σ²)."""
    return (high - low) / (2.0 * np.sqrt(LOG2))


def _price_paths(ohlc: np.ndarray, normals: np.ndarray, high_step: np.ndarray, low_step: np.ndarray,
                 clock: np.ndarray) -> np.ndarray:
    """Paths (days × steps+1) through each day's anchors; see the module docstring."""
    day_open, high, low, day_close = ohlc.T
    days, steps = normals.shape
    # Two interior extremes drawn on the same sub-step: move the low one step (a path cannot be
    # at the high and the low at once unless the day is flat).
    clash = (high_step == low_step) & (high > low)
    low_step = np.where(clash, np.where(low_step < steps - 1, low_step + 1, low_step - 1), low_step)

    high_first = high_step <= low_step
    anchor_steps = np.stack([np.zeros(days, dtype=np.int64),
                             np.where(high_first, high_step, low_step),
                             np.where(high_first, low_step, high_step),
                             np.full(days, steps, dtype=np.int64)], axis=1)
    anchor_values = np.stack([day_open, np.where(high_first, high, low),
                              np.where(high_first, low, high), day_close], axis=1)

    day_range = high - low
    noise_scale = _noise_scale(high, low)
    increments = normals * np.sqrt(np.diff(clock))[None, :]
    walk = np.zeros((days, steps + 1))
    np.cumsum(increments, axis=1, out=walk[:, 1:])
    walk *= noise_scale[:, None]

    step_index = np.arange(steps + 1)
    segment = ((step_index[None, :] > anchor_steps[:, 1:2]).astype(np.int64)
               + (step_index[None, :] > anchor_steps[:, 2:3]))
    left_step = np.take_along_axis(anchor_steps, segment, axis=1)
    right_step = np.take_along_axis(anchor_steps, segment + 1, axis=1)
    left_value = np.take_along_axis(anchor_values, segment, axis=1)
    right_value = np.take_along_axis(anchor_values, segment + 1, axis=1)
    left_clock, right_clock = clock[left_step], clock[right_step]
    span = right_clock - left_clock
    fraction = np.divide(clock[None, :] - left_clock, span, out=np.zeros_like(span), where=span > 0)
    left_walk = np.take_along_axis(walk, left_step, axis=1)
    right_walk = np.take_along_axis(walk, right_step, axis=1)
    path = (left_value + fraction * (right_value - left_value)
            + (walk - left_walk) - fraction * (right_walk - left_walk))

    # Reflect into [low, high]: fold with period 2·range, mirror the upper half.
    safe_range = np.where(day_range > 0, day_range, 1.0)[:, None]
    folded = np.mod(path - low[:, None], 2.0 * safe_range)
    path = low[:, None] + np.where(folded > safe_range, 2.0 * safe_range - folded, folded)
    np.clip(path, low[:, None], high[:, None], out=path)

    rows = np.arange(days)
    path[:, 0] = day_open
    path[rows, anchor_steps[:, 1]] = anchor_values[:, 1]
    path[rows, anchor_steps[:, 2]] = anchor_values[:, 2]
    path[:, -1] = day_close
    flat = day_range == 0
    path[flat] = day_open[flat, None]
    return path


def _minute_volumes(day_volume: np.ndarray, noise: np.ndarray, session_minutes: int,
                    shape: IntradayShape) -> np.ndarray:
    """Whole-share minute volumes summing exactly to each day's volume (largest remainder)."""
    centres = np.arange(session_minutes) + 0.5
    weight = _u_shape(centres, session_minutes, shape.open_volume_boost, shape.close_volume_boost,
                      shape.volume_decay_minutes)[None, :] * noise
    weight /= weight.sum(axis=1, keepdims=True)
    target = weight * day_volume[:, None]
    whole = np.floor(target)
    shortfall = (day_volume - whole.sum(axis=1)).round().astype(np.int64)
    if (shortfall < 0).any() or (shortfall > session_minutes).any():
        raise AssertionError("largest-remainder rounding out of range")  # cannot happen for V < 2**53
    order = np.argsort(-(target - whole), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(session_minutes)[None, :].repeat(len(order), 0), axis=1)
    return whole + (rank < shortfall[:, None])


def _chunk_bars(ohlc: np.ndarray, day_volume: np.ndarray, ordinals: np.ndarray,
                open_nanos: np.ndarray, clock: np.ndarray, session_minutes: int, bar_minutes: int,
                seed: int, shape: IntradayShape):
    """Bars for a block of days sharing one session length: (stamps_ns, ohlcv rows)."""
    steps = session_minutes * SUBSTEPS_PER_MINUTE
    days = len(ohlc)
    noise_scale = _noise_scale(ohlc[:, 1], ohlc[:, 2])
    normals = np.empty((days, steps))
    volume_noise = np.empty((days, session_minutes))
    high_step = np.empty(days, dtype=np.int64)
    low_step = np.empty(days, dtype=np.int64)
    # One generator per session: the draws of a day never depend on which other days are built.
    for row in range(days):
        rng = np.random.default_rng([seed, int(ordinals[row])])
        normals[row] = rng.standard_normal(steps)
        volume_noise[row] = rng.lognormal(0.0, shape.volume_noise_sigma, size=session_minutes)
        uniform_high, uniform_low = rng.random(2)
        day_open, high, low, day_close = ohlc[row]
        high_step[row] = _extreme_step(high - day_open, high - day_close, noise_scale[row],
                                       uniform_high, clock)
        low_step[row] = _extreme_step(day_open - low, day_close - low, noise_scale[row],
                                      uniform_low, clock)
    path = _price_paths(ohlc, normals, high_step, low_step, clock)

    k = SUBSTEPS_PER_MINUTE
    windows = path[:, :steps].reshape(days, session_minutes, k)
    minute_open = windows[:, :, 0]
    minute_close = path[:, k::k]
    minute_high = np.maximum(windows.max(axis=2), minute_close)
    minute_low = np.minimum(windows.min(axis=2), minute_close)
    minute_volume = _minute_volumes(day_volume, volume_noise, session_minutes, shape)

    starts = np.arange(0, session_minutes, bar_minutes)
    ends = np.minimum(starts + bar_minutes, session_minutes)
    bar_open = minute_open[:, starts]
    bar_high = np.maximum.reduceat(minute_high, starts, axis=1)
    bar_low = np.minimum.reduceat(minute_low, starts, axis=1)
    bar_close = minute_close[:, ends - 1]
    bar_volume = np.add.reduceat(minute_volume, starts, axis=1)
    stamps = open_nanos[:, None] + ends[None, :].astype(np.int64) * NANOS_PER_MINUTE
    values = np.stack([bar_open, bar_high, bar_low, bar_close, bar_volume], axis=-1)
    return stamps.ravel(), values.reshape(-1, 5)


def _bars_for_length(daily: pd.DataFrame, open_nanos: np.ndarray, session_minutes: int,
                     bar_minutes: int, seed: int, shape: IntradayShape):
    """Bars for days that share one session length, in blocks of ``CHUNK_DAYS`` (keeps the
    days × sub-steps work arrays small enough to stay in cache)."""
    clock = _volatility_clock(session_minutes, shape)
    ohlc = daily[["open", "high", "low", "close"]].to_numpy()
    day_volume = daily["volume"].to_numpy()
    ordinals = np.array([day.toordinal() for day in daily.index], dtype=np.int64)
    stamps, values = [], []
    for first in range(0, len(daily), CHUNK_DAYS):
        block = slice(first, first + CHUNK_DAYS)
        block_stamps, block_values = _chunk_bars(ohlc[block], day_volume[block], ordinals[block],
                                                 open_nanos[block], clock, session_minutes,
                                                 bar_minutes, seed, shape)
        stamps.append(block_stamps)
        values.append(block_values)
    return np.concatenate(stamps), np.concatenate(values)


def intraday_bars(daily: pd.DataFrame, freq: str = "5min", seed: int = 42,
                  shape: IntradayShape = DEFAULT_SHAPE) -> pd.DataFrame:
    """SYNTHETIC intraday ``open high low close volume`` bars for every day of ``daily``.

    ``daily``: daily bars indexed by NYSE session dates (e.g. ``embedded.daily_bars('SPY')``).
    ``freq``: '1min', '5min' or '15min'. Index: tz-aware America/New_York bar close times, named
    ``timestamp``. Same seed and day → identical bars; see the module docstring for the method.
    """
    if freq not in FREQ_MINUTES:
        raise DataError(f"freq {freq!r} is not supported; use one of {list(FREQ_MINUTES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    checked = _checked_daily(daily)
    bounds = session_bounds(checked.index)
    open_nanos = pd.DatetimeIndex(bounds["open"]).tz_convert("UTC").as_unit("ns").asi8
    close_nanos = pd.DatetimeIndex(bounds["close"]).tz_convert("UTC").as_unit("ns").asi8
    session_minutes = (close_nanos - open_nanos) // NANOS_PER_MINUTE

    all_stamps, all_values = [], []
    for length in np.unique(session_minutes):
        rows = np.flatnonzero(session_minutes == length)
        stamps, values = _bars_for_length(checked.iloc[rows], open_nanos[rows], int(length),
                                          FREQ_MINUTES[freq], int(seed), shape)
        all_stamps.append(stamps)
        all_values.append(values)
    stamps = np.concatenate(all_stamps)
    values = np.concatenate(all_values)
    order = np.argsort(stamps, kind="stable")
    index = pd.DatetimeIndex(pd.to_datetime(stamps[order], unit="ns", utc=True),
                             name="timestamp").tz_convert(EXCHANGE_TZ)
    bars = pd.DataFrame(values[order], index=index, columns=["open", "high", "low", "close", "volume"])
    bars.attrs.update(synthetic=True, source=f"brownian_bridge(seed={seed})", freq=freq)
    return bars
