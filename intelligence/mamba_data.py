"""The DeepMamba data pipeline: 5-minute bars → scaled feature matrix, forecast targets,
time-ordered splits and lazy lookback windows.

Owns
- ``load_local_bars`` (``--local-data``: CSV/Parquet bars, validated with one clear error) and
  ``embedded_training_bars`` (the embedded S&P 500 proxy expanded to SYNTHETIC 5-minute bars).
- ``causal_bar_iv_index`` / ``realized_vol_iv_proxy``: an IV index per bar that uses only what is
  known at the bar's close.
- ``build_features``: the model's input columns (``FEATURE_NAMES``, plus ``TDA_FEATURE_NAMES`` with
  ``tda=``; ``feature_names(tda)`` says which); row t uses bars ≤ t only.
- ``build_targets``: what the heads learn (``TARGET_NAMES``), under ``TargetRules``.
- ``Scaler``: z-score from the TRAIN split only, then soft clipping clip·tanh(z/clip); stored with
  the model so inference scales exactly as training did.
- ``make_splits``: train / validation / test by date, in time order, separated by gaps of at least
  the target horizon, so no target of an earlier split reads a price of a later one.
- ``WindowDataset`` and ``WindowBatchSampler``: (lookback × features) windows sliced from ONE
  contiguous tensor (memory O(rows × features), indexing O(1)).

Bars are the canonical frame: tz-aware (America/New_York) close-time index, columns
open high low close volume, 78 bars per full session. Target rules count horizons in bars.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import Dataset, Sampler

from analytics import indicators
from analytics.realized_vol import log_returns, realized_vol
from data_factory.errors import DataError
from intelligence.tda import (
    DEFAULT_DIM,
    DEFAULT_TAU,
    DEFAULT_WINDOW,
    TDA_COLUMNS,
    TDAInputError,
    lagged_close_tda,
    min_lagged_closes,
)

EXCHANGE_TZ = "America/New_York"
BAR_MINUTES = 5                          # the bar width every feature, target and the backtest use
BARS_PER_SESSION = 78                     # 5-minute bars in a 6.5-hour session
TRADING_DAYS_PER_YEAR = 252
SESSION_MINUTES = 390
BAR_COLUMNS = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS = ("open", "high", "low", "close")

# Model inputs, in column order. Every one is computed from bars up to and including its row.
FEATURE_NAMES = (
    "log_return",          # ln(close_t / close_{t−1})
    "rsi_centered",        # RSI(14)/100 − 0.5
    "atr_pct",             # ATR(14) / close
    "log_volume_ratio",    # ln(volume / SMA20(volume)), ratio floored at 1e-3
    "bollinger_position",  # Bollinger(20, 2σ) position − 0.5 (−0.5 lower band, +0.5 upper)
    "realized_vol_78",     # trailing 78-bar realized vol, annualised decimal
    "iv_index",            # IV index / 100 (annualised decimal)
    "sma_distance",        # (close − SMA20)/SMA20
    "minutes_since_open",  # (bar close time − 09:30) / 390 minutes
    "bar_range",           # ln(high / low) of the bar
)
# Optional topological inputs (``build_features(..., tda=...)``): persistent homology of the trailing
# ``window`` SESSION log returns (session close = the session's last bar), lagged one session and
# broadcast to every bar of the session (intelligence.tda.lagged_close_tda).
TDA_FEATURE_NAMES = TDA_COLUMNS
TDA_KEYS = ("window", "dim", "tau")
TARGET_NAMES = ("next_return", "realized_vol", "max_up", "max_down", "pop")
DEFAULT_CLIP = 4.0


@dataclass(frozen=True)
class TargetRules:
    """How targets are defined (stored in the checkpoint; the evaluation reads them back).

    With r the bar log returns, σ_t = √(mean of r² over the trailing ``trailing_vol_bars`` bars
    up to t) ("trailing bar vol"), h = ``horizon_bars`` and τ = h / (78·252) years:
    - next_return  = r_{t+1} / σ_t                                        (standardized)
    - realized_vol = ``rv_target_scale`` · √(78·252/h · Σ_{s=t+1..t+h} r_s²)  (annualised ×10)
    - max_up       = max(0, max_{s∈(t,t+h]} ln(high_s/close_t)) / (σ_t·√h)
    - max_down     = max(0, −min_{s∈(t,t+h]} ln(low_s/close_t)) / (σ_t·√h)
    - pop          = 1 if every bar s in (t, t+h] has low_s > close_t·e^{−kσ√τ} and
                     high_s < close_t·e^{+kσ√τ}, with σ = IV index_t/100 and k = ``pop_k``
                     (strikes k implied standard deviations away, touched = lost); else 0
    Every target is NaN where t + h runs past the data (or past the split it belongs to), or
    where σ_t / the IV index is not yet defined. h = 780 bars is 10 full sessions (fewer calendar
    sessions' worth when early closes fall inside).
    """

    horizon_bars: int = BARS_PER_SESSION * 10
    trailing_vol_bars: int = BARS_PER_SESSION * 5
    pop_k: float = 1.0
    rv_target_scale: float = 10.0
    bars_per_session: int = BARS_PER_SESSION
    trading_days_per_year: int = TRADING_DAYS_PER_YEAR

    def __post_init__(self):
        for name in ("horizon_bars", "trailing_vol_bars", "bars_per_session", "trading_days_per_year"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TargetRules.{name} must be a positive integer, got {value!r}")
        for name in ("pop_k", "rv_target_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"TargetRules.{name} must be a positive number")

    @property
    def periods_per_year(self) -> float:
        return float(self.bars_per_session * self.trading_days_per_year)

    @property
    def horizon_years(self) -> float:
        return self.horizon_bars / self.periods_per_year

    def as_dict(self) -> dict:
        return {**asdict(self), "definitions": inspect.cleandoc(self.__doc__).split("\n\n")[1]}


# ----------------------------------------------------------------------------------------------
# Loading bars

def _row_label(row: int, csv: bool) -> str:
    return f"row {row + 1} (line {row + 2})" if csv else f"row {row + 1}"


def _parse_timestamps(values: pd.Series) -> pd.Series:
    """Datetimes (NaT where unreadable); mixed UTC offsets are brought to UTC."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values
    try:
        stamps = pd.to_datetime(values, errors="coerce", format="mixed")
    except ValueError:
        # pandas 3 refuses several UTC offsets in one column (a file across a DST switch)
        # instead of returning objects: read them as instants.
        return pd.to_datetime(values, errors="coerce", format="mixed", utc=True)
    if not pd.api.types.is_datetime64_any_dtype(stamps):      # several offsets: object dtype
        stamps = pd.to_datetime(values, errors="coerce", format="mixed", utc=True)
    return stamps


def load_local_bars(path) -> tuple[pd.DataFrame, np.ndarray | None, dict]:
    """Read a CSV or Parquet file of bars: timestamp, open, high, low, close, volume[, iv_index].

    Timestamps are bar CLOSE times; tz-naive ones are read as America/New_York. ``iv_index`` is
    in VIX points. Returns (bars with a tz-aware index, iv_index per bar or None, description).
    Raises DataError naming the file, the row (and CSV line) and the column of the first problem:
    missing file or column, unparsable timestamp, non-numeric / non-positive price, negative
    volume, high/low not bracketing open/close, timestamps not strictly increasing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    csv = suffix in (".csv", ".txt")
    try:
        if csv:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".parquet", ".pq"):
            raw = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown format {suffix!r}; give a .csv or .parquet file")
    except DataError:
        raise
    except Exception as exc:   # noqa: BLE001 — any parser failure becomes one data error
        raise DataError(f"{path}: cannot read the file ({type(exc).__name__}: {exc})") from None
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    if raw.index.name is not None and str(raw.index.name).lower() == "timestamp":
        raw = raw.reset_index().rename(columns=str.lower)
    required = ("timestamp",) + BAR_COLUMNS
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (need {', '.join(required)}"
                        f"[, iv_index]; found {', '.join(map(str, raw.columns))})")
    if raw.empty:
        raise DataError(f"{path}: no rows")

    stamps_raw = raw["timestamp"]
    stamps = _parse_timestamps(stamps_raw)
    bad = stamps.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path} {_row_label(row, csv)}, column 'timestamp': cannot read "
                        f"{stamps_raw.iloc[row]!r} as a date-time")
    index = pd.DatetimeIndex(stamps)
    try:
        index = (index.tz_convert(EXCHANGE_TZ) if index.tz is not None
                 else index.tz_localize(EXCHANGE_TZ, ambiguous="raise", nonexistent="raise"))
    except Exception as exc:   # noqa: BLE001 — DST gaps/ambiguities in naive local times
        raise DataError(f"{path}, column 'timestamp': {exc} (give UTC offsets, e.g. "
                        "2015-03-02T09:35:00-05:00)") from None
    index = index.as_unit("ns")

    columns = {}
    for name in BAR_COLUMNS + (("iv_index",) if "iv_index" in raw.columns else ()):
        values = pd.to_numeric(raw[name], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path} {_row_label(row, csv)}, column {name!r}: "
                            f"{raw[name].iloc[row]!r} is not a finite number")
        columns[name] = values
    for name in PRICE_COLUMNS + (("iv_index",) if "iv_index" in columns else ()):
        bad = columns[name] <= 0
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path} {_row_label(row, csv)}, column {name!r}: "
                            f"{float(columns[name][row]):g} must be positive")
    bad = columns["volume"] < 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path} {_row_label(row, csv)}, column 'volume': must not be negative")
    for name in ("open", "close"):
        for edge, wrong, word in (("high", columns[name] > columns["high"], "above"),
                                  ("low", columns[name] < columns["low"], "below")):
            if wrong.any():
                row = int(np.flatnonzero(wrong)[0])
                raise DataError(f"{path} {_row_label(row, csv)}, column {name!r}: {float(columns[name][row]):g} is "
                                f"{word} {edge} {float(columns[edge][row]):g} (need low <= open, close <= high)")
    ns = index.asi8
    step = np.diff(ns)
    if (step <= 0).any():
        row = int(np.flatnonzero(step <= 0)[0]) + 1
        what = "duplicates" if step[row - 1] == 0 else "is earlier than"
        raise DataError(f"{path} {_row_label(row, csv)}, column 'timestamp': {index[row]} {what} "
                        f"the previous row ({index[row - 1]}); timestamps must be strictly increasing")

    bars = pd.DataFrame({name: columns[name] for name in BAR_COLUMNS},
                        index=pd.DatetimeIndex(index, name="timestamp"))
    iv = columns.get("iv_index")
    spacing = float(np.median(step)) / 60e9 if len(step) else float("nan")
    description = {
        "source": f"local file {path}",
        "synthetic": False,
        "rows": len(bars),
        "first": str(bars.index[0]), "last": str(bars.index[-1]),
        "median_bar_minutes": spacing,
        "iv_index": "column iv_index of the file" if iv is not None else
                    "PROXY: 1.2 × trailing 780-bar realized vol (no iv_index column)",
    }
    return bars, iv, description


def embedded_training_bars(start="2001-01-02", end="2013-12-31", seed: int = 42
                           ) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """SYNTHETIC 5-minute SPY-proxy bars of the embedded data for [start, end], the causal IV
    index per bar and a description saying which parts are synthetic."""
    from data_factory import embedded
    from data_factory.intraday import describe_intraday, intraday_bars

    daily = embedded.daily_bars("SPY", start, end)
    iv_daily = embedded.daily_iv_index(start, end)
    bars = intraday_bars(daily, freq="5min", seed=seed)
    iv = causal_bar_iv_index(bars, iv_daily["iv_index"])
    sources = iv_daily["iv_source"].value_counts().to_dict()
    description = {
        "source": "embedded (arch package data)",
        "synthetic": True,
        "period": {"start": str(daily.index[0].date()), "end": str(daily.index[-1].date()),
                   "sessions": len(daily), "bars": len(bars)},
        "daily_bars": "REAL S&P 500 daily OHLCV / 10 (SPY proxy)",
        "intraday_bars": describe_intraday(seed, "5min"),
        "iv_index": {"daily": "embedded IV index: VIX closes from 2014-01-03, SYNTHETIC GARCH(1,1) "
                              "proxy before", "daily_source_counts": {k: int(v) for k, v in sources.items()},
                     "per_bar": "previous session's close + (-1.5 VIX points per +1 % move since "
                                "that close), floored at half the previous close (causal)"},
        "synthetic_parts": ["5-minute bars (Brownian bridges through the real daily OHLC)",
                            "IV index before 2014 (GARCH proxy)", "intraday IV path"],
    }
    return bars, iv, description


def _session_dates(index: pd.DatetimeIndex) -> np.ndarray:
    """Local session date of each bar as naive-midnight int64 ns."""
    return index.tz_convert(EXCHANGE_TZ).tz_localize(None).normalize().as_unit("ns").asi8


def causal_bar_iv_index(bars: pd.DataFrame, daily_iv: pd.Series, spot_vol_beta: float = -1.5,
                        floor_fraction: float = 0.5) -> np.ndarray:
    """IV index (VIX points) per bar from what is known at the bar's close: the previous session's
    IV close moved by ``spot_vol_beta`` points per +1 % of spot since the previous session's last
    bar, floored at ``floor_fraction`` of that close. NaN for the first session in ``bars`` (no
    previous session). Unlike the chain provider's per-bar path this never interpolates toward
    the session's own closing VIX, which is not known until the close.
    """
    sessions = _session_dates(pd.DatetimeIndex(bars.index))
    close = bars["close"].to_numpy(float)
    first_of_session = np.r_[True, sessions[1:] != sessions[:-1]]
    starts = np.flatnonzero(first_of_session)
    session_ids = np.cumsum(first_of_session) - 1
    prev_close_by_session = np.r_[np.nan, close[starts[1:] - 1]]
    days = pd.DatetimeIndex(daily_iv.index)
    if days.tz is not None:
        days = days.tz_localize(None)
    day_ns = days.normalize().as_unit("ns").asi8
    values = daily_iv.to_numpy(float)
    # previous session's IV close: the last daily value strictly before the bar's session date
    pos = np.searchsorted(day_ns, sessions[starts], side="left") - 1
    prev_iv_by_session = np.where(pos >= 0, values[np.maximum(pos, 0)], np.nan)
    prev_iv = prev_iv_by_session[session_ids]
    prev_close = prev_close_by_session[session_ids]
    iv = prev_iv + spot_vol_beta * (close / prev_close - 1.0) * 100.0
    return np.maximum(iv, floor_fraction * prev_iv)


def realized_vol_iv_proxy(close, multiplier: float = 1.2, window: int = BARS_PER_SESSION * 10
                          ) -> np.ndarray:
    """A stand-in IV index (VIX points) for bars without one: ``multiplier`` × trailing
    ``window``-bar realized vol × 100 (1.2: implied over realised, as the GARCH proxy assumes)."""
    return 100.0 * multiplier * realized_vol(close, window, BARS_PER_SESSION * TRADING_DAYS_PER_YEAR)


# ----------------------------------------------------------------------------------------------
# Features and targets

def feature_names(tda: dict | None = None) -> tuple:
    """The columns ``build_features(..., tda=tda)`` returns, in order."""
    return FEATURE_NAMES if tda is None else FEATURE_NAMES + TDA_FEATURE_NAMES


def tda_parameters(tda: dict) -> tuple[int, int, int]:
    """(window, dim, tau) of a ``tda`` setting (keys ``TDA_KEYS``; a missing one takes
    intelligence.tda's default); TDAInputError on an unknown key."""
    if not isinstance(tda, dict):
        raise TDAInputError(f"tda: give a dict with keys {', '.join(TDA_KEYS)} (or None), got {tda!r}")
    unknown = sorted(set(tda) - set(TDA_KEYS))
    if unknown:
        raise TDAInputError(f"tda: unknown key {unknown[0]!r} (the keys are {', '.join(TDA_KEYS)})")
    return (tda.get("window", DEFAULT_WINDOW), tda.get("dim", DEFAULT_DIM), tda.get("tau", DEFAULT_TAU))


def session_tda_columns(bars: pd.DataFrame, tda: dict, earlier_closes: pd.Series | None = None
                        ) -> dict[str, np.ndarray]:
    """The TDA_FEATURE_NAMES per bar: each session's bars get the features of the trailing
    ``window`` session log returns ending at the PREVIOUS session's close (its last bar), so a bar
    never sees its own session's close. NaN for the first ``window + 1`` sessions.

    ``earlier_closes``: daily closes indexed by session date (e.g. the traded symbol's daily
    bars); those of sessions before the bars' first session are put in front of the bars' own
    session closes, so the first sessions of the bars get values too (a backtest replays only a
    few sessions of intraday bars before its start). TDAInputError when the closes are too few for
    any bar to get a value."""
    window, dim, tau = tda_parameters(tda)
    index = pd.DatetimeIndex(bars.index)
    sessions = _session_dates(index) if len(index) else np.empty(0, np.int64)
    first = np.r_[True, sessions[1:] != sessions[:-1]] if len(sessions) else np.zeros(0, bool)
    history = np.empty(0)
    if earlier_closes is not None and len(sessions):
        days = pd.DatetimeIndex(earlier_closes.index).tz_localize(None).normalize()
        keep = np.asarray(days < pd.Timestamp(sessions[0]))
        history = np.asarray(earlier_closes, dtype=float)[keep]
    n_sessions = int(first.sum()) + len(history)
    needed = min_lagged_closes(window) + 1        # window + 1 earlier closes, then the session itself
    if n_sessions < needed:
        span = (f" ({pd.Timestamp(sessions[0]).date()} .. {pd.Timestamp(sessions[-1]).date()})"
                if n_sessions else "")
        raise TDAInputError(f"tda window = {window:,} sessions but the bars hold {n_sessions:,} sessions{span}: "
                            f"a TDA value needs window + 1 = {needed - 1:,} earlier session closes, so no bar "
                            f"would get one; lower the TDA window (at most {n_sessions - 2:,} here) or give "
                            f"more bars")
    last = np.r_[first[1:], True]
    session_close = np.r_[history, bars["close"].to_numpy(float)[last]]
    lagged = lagged_close_tda(session_close, window, dim, tau)
    session_id = np.cumsum(first) - 1 + len(history)
    return {name: lagged[session_id, k] for k, name in enumerate(TDA_FEATURE_NAMES)}


def build_features(bars: pd.DataFrame, iv_index, *, tda: dict | None = None,
                   earlier_closes: pd.Series | None = None) -> pd.DataFrame:
    """The FEATURE_NAMES columns (float64, NaN during indicator warm-up), one row per bar.

    ``tda`` ({"window", "dim", "tau"}; sessions): also the TDA_FEATURE_NAMES columns
    (``session_tda_columns``: per session, lagged one session, NaN for the first window + 1
    sessions); ``feature_names(tda)`` gives the columns. TDAInputError when the bars hold too few
    sessions for any bar to get a TDA value. ``earlier_closes``: daily closes before the bars
    (``session_tda_columns``), read with ``tda`` only.

    Causal: row t depends on bars 0..t and iv_index[0..t] only, so cutting the input after row t
    leaves rows ≤ t unchanged (tests hold it to that; with ``tda``, for cuts that leave enough
    sessions not to raise).
    """
    iv_index = np.asarray(iv_index, dtype=float)
    if len(iv_index) != len(bars):
        raise ValueError(f"iv_index has {len(iv_index)} values for {len(bars)} bars")
    o, h, lo, c, v = (bars[name].to_numpy(float) for name in BAR_COLUMNS)
    del o
    ratio = indicators.volume_ratio(v, 20)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns = {
            "log_return": log_returns(c),
            "rsi_centered": indicators.rsi(c, 14) / 100.0 - 0.5,
            "atr_pct": indicators.atr(h, lo, c, 14) / c,
            "log_volume_ratio": np.log(np.maximum(ratio, 1e-3)),
            "bollinger_position": indicators.bollinger(c, 20, 2.0)[0] - 0.5,
            "realized_vol_78": realized_vol(c, BARS_PER_SESSION,
                                            BARS_PER_SESSION * TRADING_DAYS_PER_YEAR),
            "iv_index": iv_index / 100.0,
            "sma_distance": indicators.sma_distance(c, 20),
            "minutes_since_open": _minutes_since_open(pd.DatetimeIndex(bars.index)) / SESSION_MINUTES,
            "bar_range": np.log(h / lo),
        }
    if tda is not None:
        columns.update(session_tda_columns(bars, tda, earlier_closes))
    frame = pd.DataFrame(columns, index=bars.index)
    return frame[list(feature_names(tda))]


def _minutes_since_open(index: pd.DatetimeIndex) -> np.ndarray:
    local = index.tz_convert(EXCHANGE_TZ) if index.tz is not None else index
    minutes = local.hour * 60 + local.minute + local.second / 60.0
    return np.asarray(minutes - (9 * 60 + 30), dtype=float)


def trailing_bar_vol(close, window: int) -> np.ndarray:
    """σ_t = √(mean r² over the trailing ``window`` log returns up to t); NaN until defined."""
    r = log_returns(close)
    r2 = np.where(np.isfinite(r), r * r, 0.0)
    ok = np.isfinite(r).astype(float)
    csum, cnt = np.r_[0.0, np.cumsum(r2)], np.r_[0.0, np.cumsum(ok)]
    sigma = np.full(len(r), np.nan)
    if len(r) > window:
        t = np.arange(window, len(r))
        sums, counts = csum[t + 1] - csum[t + 1 - window], cnt[t + 1] - cnt[t + 1 - window]
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma[t] = np.where(counts == window, np.sqrt(sums / window), np.nan)
    return sigma


def _forward_windows(values: np.ndarray, horizon: int) -> np.ndarray:
    """Row t holds values[t+1 .. t+horizon] (only rows with a full horizon: len − horizon)."""
    return sliding_window_view(values[1:], horizon)


def build_targets(bars: pd.DataFrame, iv_index, rules: TargetRules = TargetRules()) -> pd.DataFrame:
    """The TARGET_NAMES columns per bar under ``rules`` (see TargetRules), NaN where undefined,
    plus the trailing quantities the baselines need: ``sigma_bar`` (σ_t), ``last_return``
    (r_t/σ_t), ``trailing_rv`` (trailing h-bar realized vol, annualised) and ``implied_vol``
    (IV index/100)."""
    iv_index = np.asarray(iv_index, dtype=float)
    c = bars["close"].to_numpy(float)
    log_h, log_l, log_c = (np.log(bars[n].to_numpy(float)) for n in ("high", "low", "close"))
    n, hz = len(c), rules.horizon_bars
    r = log_returns(c)
    sigma = trailing_bar_vol(c, rules.trailing_vol_bars)
    out = {name: np.full(n, np.nan) for name in TARGET_NAMES}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["next_return"][:-1] = r[1:] / sigma[:-1]
        if n > hz:
            rows = n - hz
            r2 = np.where(np.isfinite(r), r * r, np.nan)
            csum = np.r_[0.0, np.nancumsum(r2)]
            fwd_sum = csum[hz + 1:] - csum[1:rows + 1]                   # Σ r²_{t+1..t+h}
            out["realized_vol"][:rows] = rules.rv_target_scale * np.sqrt(
                rules.periods_per_year / hz * fwd_sum)
            top = _forward_windows(log_h, hz).max(axis=1)
            bottom = _forward_windows(log_l, hz).min(axis=1)
            scale = sigma[:rows] * math.sqrt(hz)
            up = np.maximum(top - log_c[:rows], 0.0)
            down = np.maximum(log_c[:rows] - bottom, 0.0)
            out["max_up"][:rows] = up / scale
            out["max_down"][:rows] = down / scale
            band = rules.pop_k * iv_index[:rows] / 100.0 * math.sqrt(rules.horizon_years)
            inside = (top - log_c[:rows] < band) & (log_c[:rows] - bottom < band)
            out["pop"][:rows] = np.where(np.isfinite(band), inside.astype(float), np.nan)
    for name in ("next_return", "max_up", "max_down"):
        out[name][~np.isfinite(out[name])] = np.nan
    frame = pd.DataFrame(out, index=bars.index)
    frame["sigma_bar"] = sigma
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["last_return"] = r / sigma
    frame["trailing_rv"] = realized_vol(c, hz, rules.periods_per_year)
    frame["implied_vol"] = iv_index / 100.0
    return frame


# ----------------------------------------------------------------------------------------------
# Scaling

@dataclass
class Scaler:
    """z = (x − mean)/std with mean/std from the train rows only, then clip·tanh(z/clip); NaN → 0
    (the train mean). Saved in the checkpoint as plain lists."""

    mean: np.ndarray
    std: np.ndarray
    clip: float = DEFAULT_CLIP

    @classmethod
    def fit(cls, features: np.ndarray, rows: slice, clip: float = DEFAULT_CLIP) -> Scaler:
        train = np.asarray(features[rows], dtype=np.float64)
        if not np.isfinite(train).any(axis=0).all():
            bad = int(np.flatnonzero(~np.isfinite(train).any(axis=0))[0])
            raise DataError(f"feature column {bad} has no finite value in the train split")
        mean = np.nanmean(train, axis=0)
        std = np.nanstd(train, axis=0)
        return cls(mean, np.where(std > 1e-12, std, 1.0), float(clip))

    def transform(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        z = self.clip * np.tanh(z / self.clip)
        return np.nan_to_num(z, nan=0.0, posinf=self.clip, neginf=-self.clip).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                "clip": self.clip, "rule": "z=(x-mean)/std (train split), clip*tanh(z/clip), NaN->0"}

    @classmethod
    def from_dict(cls, data: dict) -> Scaler:
        return cls(np.asarray(data["mean"], float), np.asarray(data["std"], float), float(data["clip"]))


def warmup_rows(features: np.ndarray) -> int:
    """First row from which every feature column has produced a value (indicator warm-up)."""
    finite = np.isfinite(features)
    firsts = [int(np.argmax(col)) if col.any() else len(features) for col in finite.T]
    return max(firsts) if firsts else 0


# ----------------------------------------------------------------------------------------------
# Splits

@dataclass(frozen=True)
class Split:
    """Rows [start, stop) of the bar series (half-open), first/last session dates."""

    name: str
    start: int
    stop: int
    first: str
    last: str

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def make_splits(index: pd.DatetimeIndex, horizon_bars: int, val_fraction: float = 0.15,
                test_fraction: float = 0.15) -> dict[str, Split]:
    """Train, validation and test by session date, in that time order. Cut points fall on session
    boundaries; after each cut the next split starts at the first session opening at least
    ``horizon_bars`` rows later, so the gap between splits is ≥ the target horizon."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 0.9):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 0.9")
    sessions = _session_dates(pd.DatetimeIndex(index))
    starts = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]])
    n_sessions = len(starts)
    bounds = np.r_[starts, len(sessions)]
    cut_val = round(n_sessions * (1 - val_fraction - test_fraction))
    cut_test = round(n_sessions * (1 - test_fraction))

    def first_session_after(row):
        k = int(np.searchsorted(starts, row, side="left"))
        return k

    train = (0, cut_val)
    val_start = first_session_after(bounds[cut_val] + horizon_bars)
    test_start = first_session_after(bounds[cut_test] + horizon_bars)
    val = (val_start, cut_test)
    test = (test_start, n_sessions)
    splits = {}
    day = pd.DatetimeIndex(sessions[starts]).strftime("%Y-%m-%d")
    for name, (a, b) in (("train", train), ("validation", val), ("test", test)):
        if b <= a:
            raise DataError(f"too little data for a {name} split: {n_sessions} sessions with a gap "
                            f"of {horizon_bars} bars between splits")
        splits[name] = Split(name, int(bounds[a]), int(bounds[b]), day[a], day[b - 1])
    return splits


def mask_targets_to_split(targets: np.ndarray, split: Split, horizon_bars: int) -> None:
    """In place: NaN the horizon-based targets (all but next_return, column 0) of rows whose
    horizon runs past the split's end, and next_return of its last row."""
    end = split.stop
    targets[max(split.start, end - horizon_bars):end, 1:] = np.nan
    targets[end - 1, 0] = np.nan


# ----------------------------------------------------------------------------------------------
# Lazy windows

class WindowDataset(Dataset):
    """(lookback × features) windows over rows [first_start, last_start + lookback) of ONE
    contiguous float32 tensor, with the matching (lookback × targets) rows.

    ``features`` (N, F) and ``targets`` (N, T) (or None) are kept as given (made contiguous, not
    copied window by window). Item i is the window starting at row first_start + i: a view
    (shares storage) built in O(1). ``batch(indices)`` gathers a (b, lookback, F) batch from a
    strided view of all windows (one copy of the batch, none of the series).
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor | None, lookback: int,
                 first_start: int = 0, last_start: int | None = None):
        if features.dim() != 2:
            raise ValueError(f"features must be (rows, features), got {tuple(features.shape)}")
        self.features = features.contiguous()
        self.targets = None if targets is None else targets.contiguous()
        if self.targets is not None and len(self.targets) != len(self.features):
            raise ValueError("features and targets must have the same number of rows")
        self.lookback = int(lookback)
        n = len(self.features)
        last_possible = n - self.lookback
        self.first_start = int(first_start)
        self.last_start = last_possible if last_start is None else min(int(last_start), last_possible)
        if self.last_start < self.first_start:
            raise ValueError(f"no window of {lookback} rows fits in rows [{first_start}, {n})")

    @classmethod
    def for_split(cls, features, targets, lookback, split: Split, first_row: int = 0):
        """Windows lying wholly inside ``split`` and starting at or after ``first_row``."""
        return cls(features, targets, lookback, max(split.start, first_row),
                   split.stop - lookback)

    def __len__(self) -> int:
        return self.last_start - self.first_start + 1

    def start_of(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        return self.first_start + i

    def __getitem__(self, i):
        s = self.start_of(int(i))
        x = self.features[s:s + self.lookback]
        return x if self.targets is None else (x, self.targets[s:s + self.lookback])

    def _windows(self, tensor: torch.Tensor) -> torch.Tensor:
        n, width = tensor.shape
        return tensor.as_strided((n - self.lookback + 1, self.lookback, width), (width, width, 1))

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked windows for the given item indices: x (b, L, F), y (b, L, T) or None."""
        starts = torch.as_tensor(indices, dtype=torch.long) + self.first_start
        x = self._windows(self.features)[starts]
        y = None if self.targets is None else self._windows(self.targets)[starts]
        return x, y

    __getitems__ = batch           # lets a DataLoader(batch_sampler=...) fetch whole batches

    def nbytes(self) -> int:
        total = self.features.untyped_storage().nbytes()
        if self.targets is not None:
            total += self.targets.untyped_storage().nbytes()
        return total


class WindowBatchSampler(Sampler):
    """Batches of window indices. An epoch takes every ``stride``-th window from a random offset
    (stride = lookback by default: each row sits in about one window per epoch) in random order;
    ``shuffle=False`` keeps time order and offset 0 (for validation)."""

    def __init__(self, n_windows: int, batch_size: int, stride: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        self.n_windows, self.batch_size, self.stride = int(n_windows), int(batch_size), max(1, int(stride))
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def _indices(self) -> torch.Tensor:
        offset = int(torch.randint(0, min(self.stride, self.n_windows), (1,),
                                   generator=self.generator)) if self.shuffle else 0
        idx = torch.arange(offset, self.n_windows, self.stride)
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=self.generator)]
        return idx

    def __iter__(self):
        idx = self._indices()
        for i in range(0, len(idx), self.batch_size):
            chunk = idx[i:i + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                break
            yield chunk.tolist()

    def __len__(self) -> int:
        n = len(range(0, self.n_windows, self.stride))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


# ----------------------------------------------------------------------------------------------
# Contiguous streams (stateful training)

class StreamSegments:
    """Segment start rows for stateful training with truncated BPTT.

    Rows [first, stop) of one split are cut into ``n_streams`` contiguous streams of equal length
    (a whole number of ``segment``-bar segments), each beginning ``offset`` rows later than the
    previous epoch's (a fresh random offset in [0, segment) per epoch, so segment boundaries move).
    ``epoch()`` gives a (segments, streams) array of start rows in which entry [k + 1, j] =
    [k, j] + segment: batch k holds segment k of every stream, so the recurrent state after batch
    k is the state entering batch k + 1. Streams start from a zero state, so the first
    ``burn_in`` bars of each are left out of the loss (the caller masks them).

    Fewer streams are used when the split is too short for ``n_streams`` streams of at least
    ``min_segments`` segments each (at least one stream is always made; ValueError if even one
    segment does not fit).
    """

    def __init__(self, first: int, stop: int, n_streams: int, segment: int, shuffle: bool = True,
                 seed: int = 0, min_segments: int = 2):
        self.first, self.stop, self.segment = int(first), int(stop), int(segment)
        self.shuffle = shuffle
        usable = self.stop - self.first - (self.segment - 1 if shuffle else 0)   # room for any offset
        if usable < self.segment:
            raise ValueError(f"rows [{first}, {stop}) hold no {segment}-bar segment")
        most = max(1, usable // (self.segment * max(1, int(min_segments))))
        self.n_streams = max(1, min(int(n_streams), most))
        self.n_segments = usable // (self.segment * self.n_streams)
        self.stream_length = self.n_segments * self.segment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_segments

    def epoch(self) -> np.ndarray:
        offset = int(torch.randint(0, self.segment, (1,), generator=self.generator)) if self.shuffle else 0
        stream_starts = self.first + offset + self.stream_length * np.arange(self.n_streams)
        return stream_starts[None, :] + self.segment * np.arange(self.n_segments)[:, None]

    @staticmethod
    def gather(tensor: torch.Tensor, starts, segment: int) -> torch.Tensor:
        """(rows, width) tensor → (len(starts), segment, width): the rows of each segment."""
        tensor = tensor.contiguous()                 # no-op when it is (train() makes it so once)
        n, width = tensor.shape
        windows = tensor.as_strided((n - segment + 1, segment, width), (width, width, 1))
        return windows[torch.as_tensor(np.asarray(starts), dtype=torch.long)]
