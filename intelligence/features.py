"""The per-bar feature table of a run: indicators, MTF consensus, regime, fuzzy memberships and
confidence, computed once, vectorised, before the first bar is replayed.

Every column is aligned with the trading bars (5-minute bars stamped at their close) and uses data
up to and including that bar's close only:
- intraday indicators run on the trading bars from ``warmup_sessions`` sessions before the first
  traded session (the synthetic bars of a day depend only on the seed and that day, so the warm-up
  bars are the bars a longer run would have replayed);
- higher-timeframe votes count only once their bar has closed (``intelligence.mtf_consensus``);
- session-level inputs (gap, SPY/QQQ divergence, IV rank's history) use completed sessions, plus
  the current bar's own IV index for the rank;
- with ``regime.tda_features`` on, the ``TDA_COLUMNS`` (``intelligence.tda``: persistent homology
  of the trailing ``regime.tda_window`` daily log returns) are those of the sessions up to the
  previous session's close, like ``divergence_z``. Context only: nothing gates or sizes on them.

The neural factor is 0.5 (neutral) unless a forecaster supplies ``neural`` per bar.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analytics import indicators
from analytics.divergence import divergence_bias, price_ratio, rolling_zscore
from analytics.gaps import gap_direction, gap_pct
from analytics.realized_vol import realized_vol
from intelligence.fuzzy_engine import (
    NEUTRAL_NEURAL_MEMBERSHIP,
    MembershipBreakpoints,
    blend_with_neural,
    compute_fuzzy_confidence,
    score_bars,
)
from intelligence.mtf_consensus import (
    NANOS_PER_MINUTE,
    mtf_consensus,
    resample_session_bars,
)
from intelligence.regime_filter import classify_regime
from intelligence.tda import TDA_COLUMNS, TDAInputError, lagged_close_tda, min_lagged_closes

TRADING_BAR_MINUTES = 5
FULL_SESSION_MINUTES = 390
TRADING_DAYS_PER_YEAR = 252.0

# Fuzzy factor -> its membership column in the table and in trades.csv.
MEMBERSHIP_COLUMNS = {
    "mtf": "mu_mtf", "iv": "mu_iv", "regime": "mu_regime", "rsi": "mu_rsi", "adx": "mu_adx",
    "bbands": "mu_bbands", "stoch": "mu_stoch", "psar": "mu_psar", "volume": "mu_volume", "sma": "mu_sma",
}


class FeatureRow(Mapping):
    """One bar's features as a read-only mapping (what ``MarketSnapshot.features`` holds)."""

    __slots__ = ("_bar", "_columns")

    def __init__(self, columns: Mapping[str, np.ndarray], bar: int):
        self._columns = columns
        self._bar = bar

    def __getitem__(self, name: str):
        return self._columns[name][self._bar].item()

    def __iter__(self):
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)


@dataclass
class BarFeatures:
    """Feature columns (numpy arrays, one value per trading bar) and what they were built from."""

    columns: dict[str, np.ndarray]
    close_ns: np.ndarray
    description: dict

    def __len__(self) -> int:
        return len(self.close_ns)

    def row(self, bar: int) -> FeatureRow:
        return FeatureRow(self.columns, bar)

    def frame(self) -> pd.DataFrame:
        index = pd.DatetimeIndex(pd.to_datetime(self.close_ns, unit="ns", utc=True), name="timestamp")
        return pd.DataFrame(self.columns, index=index.tz_convert("America/New_York"))

    def reweighted(self, fuzzy) -> BarFeatures:
        """The same table with F_t and C re-blended from its membership columns with the weights
        of ``fuzzy`` (a ``FuzzyConfig``): the memberships do not depend on the weights, so an
        optimizer trial that changes only the weights need not rebuild the table. Same functions
        as ``compute_bar_features``, so the columns are identical to a rebuilt table's."""
        memberships = {factor: self.columns[column] for factor, column in MEMBERSHIP_COLUMNS.items()}
        shape = self.close_ns.shape
        fuzzy_ft = np.broadcast_to(np.asarray(compute_fuzzy_confidence(memberships, fuzzy.technical_weights()),
                                              dtype=np.float64), shape).copy()
        confidence = np.broadcast_to(np.asarray(blend_with_neural(fuzzy_ft, self.columns["mu_neural"],
                                                                  fuzzy.fuzzy_weight_neural), dtype=np.float64),
                                     shape).copy()
        columns = dict(self.columns)
        columns["fuzzy_ft"] = np.ascontiguousarray(fuzzy_ft)
        columns["confidence"] = np.ascontiguousarray(confidence)
        return BarFeatures(columns, self.close_ns, self.description)

    def window(self, start: int, stop: int) -> BarFeatures:
        """Rows ``start … stop − 1`` (views, no copy): the table of a run on that bar window. The
        features are causal, so a window's rows are what a run starting at ``start`` would see."""
        return BarFeatures({name: values[start:stop] for name, values in self.columns.items()},
                           self.close_ns[start:stop], dict(self.description, window=[int(start), int(stop)]))

    def with_neural(self, neural: np.ndarray, config) -> BarFeatures:
        """The same table with the neural membership replaced and the confidence re-blended."""
        columns = dict(self.columns)
        columns["mu_neural"] = np.asarray(neural, dtype=float)
        columns["confidence"] = np.asarray(blend_with_neural(columns["fuzzy_ft"], columns["mu_neural"],
                                                             config.fuzzy.fuzzy_weight_neural), dtype=float)
        return BarFeatures(columns, self.close_ns, dict(self.description, neural="supplied"))


def intraday_iv_rank(session_of_bar: np.ndarray, bar_iv: np.ndarray, daily_iv: pd.Series,
                     window: int = 252) -> np.ndarray:
    """IV rank (0-100) of each bar's IV index within the last ``window`` values: the previous
    ``window − 1`` completed sessions' closes and the bar's own value (no later close is used).
    NaN while fewer than ``window − 1`` earlier sessions exist; 50 when the range is flat."""
    history = daily_iv.to_numpy(float)
    previous = pd.Series(history).rolling(window - 1, min_periods=window - 1)
    # Row d of these holds the min/max of sessions d-window+1 … d-1 (shift: exclude session d).
    low = previous.min().shift(1).to_numpy()
    high = previous.max().shift(1).to_numpy()
    # Both sides in nanoseconds (pandas 3 may build a date index in microseconds).
    row = np.searchsorted(pd.DatetimeIndex(daily_iv.index).as_unit("ns").asi8, session_of_bar)
    lo = np.minimum(low[row], bar_iv)
    hi = np.maximum(high[row], bar_iv)
    with np.errstate(invalid="ignore", divide="ignore"):
        rank = 100.0 * (bar_iv - lo) / (hi - lo)
    return np.where(hi == lo, 50.0, rank)


def lagged_daily_tda(daily_spot: pd.DataFrame, day_row: np.ndarray, regime) -> dict[str, np.ndarray]:
    """The ``TDA_COLUMNS`` per trading bar: bar ``i`` (session row ``day_row[i]`` of
    ``daily_spot``) gets the features of the ``regime.tda_window`` daily log returns ending at the
    previous session's close. NaN while fewer closes precede the session (warm-up).

    Raises ``TDAInputError`` (one message naming ``regime.tda_window``) when no bar gets a value.
    """
    window, dim, tau = regime.tda_window, regime.tda_dim, regime.tda_tau
    sessions = pd.DatetimeIndex(daily_spot.index)
    if len(day_row) == 0:
        return {name: np.empty(0) for name in TDA_COLUMNS}
    needed = min_lagged_closes(window)
    # Daily sessions strictly before the first / last trading bar's session.
    before_first, before_last = int(day_row.min()), int(day_row.max())

    def day(row):
        return sessions[min(row, len(sessions) - 1)].date()

    if before_last < needed:
        most = before_last - 1
        advice = (f"lower --tda-window (at most {most:,} here)" if most >= 8 else
                  "lower --tda-window or run a longer period")
        raise TDAInputError(
            f"regime.tda_window = {window:,} sessions but the daily data holds {before_last:,} sessions before the "
            f"last trading session {day(before_last)} ({before_first:,} before the first, {day(before_first)}): "
            f"a TDA value needs tda_window + 1 = {needed:,} earlier daily closes, so no bar would get one; {advice}")
    # Only the closes the bars can see: from `needed` sessions before the first bar's session.
    lo = max(0, before_first - needed)
    try:
        lagged = lagged_close_tda(daily_spot["close"].to_numpy(float)[lo:before_last + 1], window, dim, tau)
    except TDAInputError as error:
        raise TDAInputError(f"regime.tda_window = {window}, regime.tda_dim = {dim}, regime.tda_tau = {tau} "
                            f"(daily closes {day(lo)} .. {day(before_last)}): "
                            f"{error}") from None
    return {name: lagged[day_row - lo, k] for k, name in enumerate(TDA_COLUMNS)}


def compute_bar_features(config, base_bars: pd.DataFrame, target_close_ns: np.ndarray, bar_iv_index: np.ndarray,
                         daily_iv: pd.Series, daily_spot: pd.DataFrame, daily_pair: pd.DataFrame | None,
                         neural: np.ndarray | None = None,
                         session_close_ns: np.ndarray | None = None) -> BarFeatures:
    """The feature table for trading bars closing at ``target_close_ns`` (UTC ns).

    ``base_bars``: the finest bars (``mtf.base_bar_minutes``; tz-aware close-time index;
    open/high/low/close/volume) from the warm-up start to the last trading bar. ``bar_iv_index``:
    the IV index (VIX points) per trading bar. ``daily_iv``: the IV index's session closes indexed
    by session (naive dates), from at least a year before the first trading bar. ``daily_spot``
    and ``daily_pair``: daily bars of the traded symbol and of the divergence pair (QQQ), or None.
    ``session_close_ns``: the calendar close (UTC ns) of each base bar's session (see
    ``resample_session_bars``; required for data that ends mid-session).
    """
    mtf = config.mtf
    trading = resample_session_bars(base_bars, TRADING_BAR_MINUTES, mtf.base_bar_minutes, session_close_ns)
    rows = np.searchsorted(trading.close_ns, target_close_ns)
    if (rows >= len(trading.close_ns)).any() or not np.array_equal(trading.close_ns[rows], target_close_ns):
        missing = np.flatnonzero((rows >= len(trading.close_ns))
                                 | (trading.close_ns[np.minimum(rows, len(trading.close_ns) - 1)] != target_close_ns))
        stamp = pd.Timestamp(int(target_close_ns[missing[0]]), tz="UTC").tz_convert("America/New_York")
        raise ValueError(f"features: the base bars have no {TRADING_BAR_MINUTES}-minute bar closing at {stamp} "
                         f"({len(missing)} trading bars unmatched)")
    high, low, close, volume = trading.high, trading.low, trading.close, trading.volume
    momentum, trend, filters, regime = config.momentum, config.trend, config.filters, config.regime

    full = {}
    full["close"] = close
    full["rsi"] = indicators.rsi(close, momentum.rsi_period)
    full["adx"] = indicators.adx(high, low, close, momentum.adx_period)
    full["atr"] = indicators.atr(high, low, close, momentum.adx_period)
    full["bb_position"], full["bb_width"] = indicators.bollinger(close, trend.bbands_period, trend.bbands_std)
    full["stoch_k"], full["stoch_d"] = indicators.stochastic(high, low, close, momentum.stoch_k_period,
                                                             momentum.stoch_d_period)
    full["psar"] = indicators.parabolic_sar(high, low, trend.psar_acceleration, trend.psar_max_acceleration)
    full["psar_position"] = indicators.psar_position(close, full["psar"], full["atr"], trend.psar_position_scale)
    full["sma_distance"] = indicators.sma_distance(close, trend.sma_period)
    full["volume_ratio"] = indicators.volume_ratio(volume, trend.volume_sma_period)
    full["sma_fast"] = indicators.sma(close, regime.sma_fast_period)
    full["sma_slow"] = indicators.sma(close, regime.sma_slow_period)
    bars_per_session = FULL_SESSION_MINUTES // TRADING_BAR_MINUTES
    full["realized_vol"] = realized_vol(close, filters.realized_vol_window,
                                        periods_per_year=TRADING_DAYS_PER_YEAR * bars_per_session)
    # Move over the last full session of bars (the max_volatility_pct cap).
    recent = np.full(len(close), np.nan)
    recent[bars_per_session:] = np.abs(close[bars_per_session:] / close[:-bars_per_session] - 1.0)
    full["recent_move"] = recent
    columns = {name: values[rows] for name, values in full.items()}

    consensus = mtf_consensus(base_bars, target_close_ns, mtf.timeframes, mtf.weights(),
                              base_minutes=mtf.base_bar_minutes, period=mtf.trend_period,
                              session_close_ns=session_close_ns)
    columns["mtf_consensus"] = consensus.consensus
    for minutes, votes in consensus.votes.items():
        columns[f"mtf_vote_{minutes}m"] = votes

    # Session of each trading bar (naive midnight ns) and minutes since that session's open.
    local = pd.DatetimeIndex(pd.to_datetime(target_close_ns, unit="ns", utc=True)).tz_convert("America/New_York")
    session_ns = local.tz_localize(None).normalize().asi8
    first_of_session = np.r_[True, session_ns[1:] != session_ns[:-1]]
    open_ns = np.maximum.accumulate(np.where(first_of_session, target_close_ns, 0)) \
        - TRADING_BAR_MINUTES * NANOS_PER_MINUTE
    columns["minutes_since_open"] = ((target_close_ns - open_ns) // NANOS_PER_MINUTE).astype(float)

    columns["iv_index"] = np.asarray(bar_iv_index, dtype=float)
    columns["iv_rank"] = intraday_iv_rank(session_ns, columns["iv_index"], daily_iv)

    # Gap of the bar's session: its open against the previous session's close (both known at the open).
    spot_sessions = pd.DatetimeIndex(daily_spot.index).as_unit("ns").asi8
    day_row = np.searchsorted(spot_sessions, session_ns)
    prev_close = daily_spot["close"].shift(1).to_numpy(float)
    session_open = daily_spot["open"].to_numpy(float)
    columns["gap_pct"] = gap_pct(session_open, prev_close)[day_row]
    columns["gap_direction"] = gap_direction(session_open, prev_close, filters.gap_direction_tolerance)[day_row]

    if daily_pair is not None:
        pair = daily_pair["close"].reindex(daily_spot.index)
        z = rolling_zscore(price_ratio(daily_spot["close"].to_numpy(float), pair.to_numpy(float)),
                           filters.divergence_lookback)
        # A session sees the z-score of completed sessions only (yesterday's close and before).
        z_previous = np.r_[np.nan, z[:-1]]
        columns["divergence_z"] = z_previous[day_row]
        columns["divergence_bias"] = divergence_bias(columns["divergence_z"], filters.divergence_z).astype(float)
    else:
        columns["divergence_z"] = np.full(len(target_close_ns), np.nan)
        columns["divergence_bias"] = np.zeros(len(target_close_ns))

    if regime.tda_features:
        # Each session sees the features of completed sessions only (yesterday's close and before).
        columns.update(lagged_daily_tda(daily_spot, day_row, regime))

    columns["regime"] = classify_regime(columns["adx"], columns["iv_index"], columns["close"],
                                        columns["sma_fast"], columns["sma_slow"], trend_adx=regime.trend_adx,
                                        crash_vix=regime.crash_vix,
                                        high_vol_vix=filters.vix_threshold_low).astype(float)

    fuzzy = config.fuzzy
    neural_values = (np.full(len(target_close_ns), NEUTRAL_NEURAL_MEMBERSHIP) if neural is None
                     else np.asarray(neural, dtype=float))
    scores = score_bars(
        {"mtf_consensus": columns["mtf_consensus"], "iv_rank": columns["iv_rank"], "vix": columns["iv_index"],
         "rsi": columns["rsi"], "adx": columns["adx"], "bb_position": columns["bb_position"],
         "bb_width": columns["bb_width"], "stoch_k": columns["stoch_k"],
         "psar_position": columns["psar_position"], "volume_ratio": columns["volume_ratio"],
         "sma_distance": columns["sma_distance"]},
        fuzzy.technical_weights(), MembershipBreakpoints.from_fuzzy_config(fuzzy), neural=neural_values,
        neural_weight=fuzzy.fuzzy_weight_neural)
    for factor, column in MEMBERSHIP_COLUMNS.items():
        columns[column] = np.asarray(scores.memberships[factor], dtype=float)
    columns["mu_neural"] = neural_values
    columns["fuzzy_ft"] = np.asarray(scores.fuzzy_confidence, dtype=float)
    columns["confidence"] = np.asarray(scores.confidence, dtype=float)

    description = {
        "trading_bar_minutes": TRADING_BAR_MINUTES,
        "base_bar_minutes": mtf.base_bar_minutes,
        "mtf_timeframes": list(mtf.timeframes),
        "mtf_vote": "0.5 + 0.5 tanh((close - EMA_n) / ATR_n) on completed bars of each timeframe",
        "warmup_bars": int(rows[0]) if len(rows) else 0,
        "divergence_pair": None if daily_pair is None else daily_pair.attrs.get("symbol", "pair"),
        "neural": "neutral 0.5 (no forecaster)" if neural is None else "supplied",
    }
    if regime.tda_features:
        description["tda"] = {"window": regime.tda_window, "dim": regime.tda_dim, "tau": regime.tda_tau,
                              "lagged": "one session",
                              "bars_without_value": int(np.isnan(columns[TDA_COLUMNS[0]]).sum())}
    return BarFeatures({name: np.ascontiguousarray(values, dtype=float) for name, values in columns.items()},
                       np.asarray(target_close_ns, dtype=np.int64), description)
