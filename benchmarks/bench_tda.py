"""TDA feature cost over the default period (2014-01-03 .. 2018-12-31), and how the features differ
across that period's volatility regimes. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_tda.py            # ~40 s on 2 cores

Paths measured:
- daily: ``rolling_tda_features`` on the log returns of the embedded SPY closes (window 60, dim 3,
  tau 1), one row per session;
- intraday: ``session_tda_features`` on the SYNTHETIC 5-minute bars (seed 42), one row per session
  from that session's 78 returns (and, for comparison, 156 = this session plus the previous one).

Anchors, measured in the same run on the same windows:
- naive: GUDHI's public ``RipsComplex(points).create_simplex_tree(max_dimension=2).persistence()``
  per window (what the library's tutorial does) instead of the enclosing-radius Ripser call;
- floor: numpy/scipy pairwise distances of the same windows (the part any method must pay);
- per-bar intraday: one window per 5-minute bar (97,650 windows), extrapolated from 2,000 bars,
  which is why the intraday variant is one value per session.

Wiring (what a run pays when the features are switched on):
- bar table: ``intelligence.features.lagged_daily_tda`` (what ``compute_bar_features`` calls with
  ``regime.tda_features``) for every 5-minute trading bar of the period, daily closes from 400
  days before the start (as ``core.market_data.embedded_feature_inputs`` gives them), window 60;
- DeepMamba inputs: ``build_features(bars, iv, tda={window 60, dim 3, tau 1})`` against
  ``build_features(bars, iv)`` on the period's SYNTHETIC 5-minute bars
  (``embedded_training_bars``), with a constant IV array.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist

import gudhi
from data_factory import embedded, intraday
from core.config import Config
from intelligence import mamba_data
from intelligence.features import lagged_daily_tda
from intelligence.tda import (
    TDA_COLUMNS,
    delay_embedding,
    rolling_tda_features,
    session_log_returns,
    session_tda_features,
    tda_features_at,
)

START, END = "2014-01-03", "2018-12-31"
DAILY_WINDOW, SESSION_WINDOW, DIM, TAU = 60, 78, 3, 1


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def _windows(returns: np.ndarray, ends: np.ndarray, window: int) -> list[np.ndarray]:
    return [delay_embedding(returns[e - window + 1:e + 1] / returns[e - window + 1:e + 1].std(), DIM, TAU)
            for e in ends if e >= window - 1]


def _naive(clouds):
    for cloud in clouds:
        gudhi.RipsComplex(points=cloud).create_simplex_tree(max_dimension=2).persistence()


def _floor(clouds):
    for cloud in clouds:
        pdist(cloud)


def _wiring(row) -> None:
    """The cost of the features as the bar table and the DeepMamba inputs compute them."""
    print(f"\nwired into the bar table and the DeepMamba inputs (window {DAILY_WINDOW}, dim {DIM}, tau {TAU}):")
    regime = Config().override({"regime.tda_features": True}).regime
    history = embedded.daily_bars("SPY", pd.Timestamp(START) - pd.Timedelta(days=400), END)
    bars, _, _ = mamba_data.embedded_training_bars(START, END)
    session_ns = mamba_data._session_dates(pd.DatetimeIndex(bars.index))
    day_row = np.searchsorted(pd.DatetimeIndex(history.index).as_unit("ns").asi8, session_ns)
    columns, seconds = _timed(lagged_daily_tda, history, day_row, regime)
    undefined = int(np.isnan(columns[TDA_COLUMNS[0]]).sum())
    row(f"bar table: lagged_daily_tda, {len(day_row):,} bars ({undefined} NaN)",
        len(np.unique(day_row)), seconds)
    iv = np.full(len(bars), 15.0)
    plain, plain_seconds = _timed(mamba_data.build_features, bars, iv)
    tda = {"window": DAILY_WINDOW, "dim": DIM, "tau": TAU}
    with_tda, seconds = _timed(mamba_data.build_features, bars, iv, tda=tda)
    sessions = len(np.unique(session_ns))
    row(f"build_features(tda=...), {len(bars):,} bars", sessions, seconds)
    row("  anchor: build_features without tda", sessions, plain_seconds)
    print(f"    -> TDA adds {seconds - plain_seconds:.2f} s; warmup_rows {mamba_data.warmup_rows(plain.to_numpy()):,} "
          f"without, {mamba_data.warmup_rows(with_tda.to_numpy()):,} with ({DAILY_WINDOW + 1} sessions)")


def main() -> None:
    daily = embedded.daily_bars("SPY", START, END)
    close = daily["close"].to_numpy(float)
    daily_returns = np.diff(np.log(close))
    bars = intraday.intraday_bars(daily, freq="5min", seed=42)
    session = bars.index.tz_convert("America/New_York").tz_localize(None).normalize().to_numpy()
    bar_returns = session_log_returns(bars["open"], bars["close"], session)

    print(f"TDA feature cost, {START} .. {END}: {len(close)} sessions, {len(bars)} SYNTHETIC 5-minute bars")
    print(f"gudhi {gudhi.__version__}; dim={DIM}, tau={TAU}; one core\n")
    print(f"{'path':58s} {'windows':>8s} {'seconds':>9s} {'ms/window':>10s}")

    def row(name, windows, seconds):
        print(f"{name:58s} {windows:8d} {seconds:9.3f} {1e3 * seconds / max(windows, 1):10.3f}")

    daily_frame, seconds = _timed(rolling_tda_features, daily_returns, window=DAILY_WINDOW, dim=DIM, tau=TAU)
    n_daily = int(daily_frame["tda_h0_total"].notna().sum())
    row(f"daily rolling_tda_features (window {DAILY_WINDOW})", n_daily, seconds)
    clouds = _windows(daily_returns, np.arange(len(daily_returns)), DAILY_WINDOW)
    row("  anchor: naive gudhi RipsComplex+SimplexTree", len(clouds), _timed(_naive, clouds)[1])
    row("  anchor: pairwise distances only (floor)", len(clouds), _timed(_floor, clouds)[1])

    for window in (SESSION_WINDOW, 2 * SESSION_WINDOW):
        frame, seconds = _timed(session_tda_features, bar_returns, session, window=window, dim=DIM, tau=TAU)
        row(f"intraday session_tda_features (window {window})", int(frame["tda_h0_total"].notna().sum()),
            seconds)
        if window == SESSION_WINDOW:
            session_frame = frame
    ends = np.flatnonzero(np.r_[session[1:] != session[:-1], True])
    clouds = _windows(bar_returns, ends[:200], SESSION_WINDOW)
    naive_seconds = _timed(_naive, clouds)[1]
    row(f"  anchor: naive gudhi, window {SESSION_WINDOW}, 200 sessions", len(clouds), naive_seconds)
    print(f"    -> extrapolated to {len(ends)} sessions: {naive_seconds * len(ends) / len(clouds):.1f} s")
    sample = np.arange(SESSION_WINDOW, SESSION_WINDOW + 2000)
    _, seconds = _timed(tda_features_at, bar_returns, sample, window=SESSION_WINDOW, dim=DIM, tau=TAU)
    row(f"  per-bar intraday (window {SESSION_WINDOW}), 2,000 bars", len(sample), seconds)
    print(f"    -> extrapolated to {len(bars)} bars: {seconds * len(bars) / len(sample):.1f} s")

    _wiring(row)

    # --- regimes ---------------------------------------------------------------------------
    iv = embedded.daily_iv_index(START, END)["iv_index"]
    features = pd.DataFrame(daily_frame.to_numpy(), columns=list(TDA_COLUMNS), index=daily.index[1:])
    features["iv_index"] = iv.reindex(features.index).to_numpy()
    log_close = pd.Series(np.log(close), index=daily.index)
    features["rv60"] = log_close.diff().rolling(DAILY_WINDOW).std().reindex(features.index) * np.sqrt(252)
    features["fwd_rv20"] = (log_close.diff().rolling(20).std().shift(-20).reindex(features.index)
                            * np.sqrt(252))
    features = features.dropna(subset=["tda_h0_total"])
    buckets = pd.cut(features["iv_index"], [0, 13, 16, 20, 100], right=False,
                     labels=["VIX<13", "13-16", "16-20", "VIX>=20"])
    print(f"\nDaily TDA features (window {DAILY_WINDOW} returns ending at the session) by that session's "
          f"IV index, mean (n):")
    table = features.groupby(buckets, observed=True)[list(TDA_COLUMNS)].mean()
    table.insert(0, "n", features.groupby(buckets, observed=True).size())
    noise = rolling_tda_features(np.random.default_rng(0).standard_normal(5000), window=DAILY_WINDOW,
                                 dim=DIM, tau=TAU).mean()
    table.loc["iid normal"] = [np.nan, *noise.to_numpy()]
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 3):
        print(table)
        print("\nSpearman correlation with the IV index, trailing 60-day realized vol and the NEXT 20 "
              "days' realized vol:")
        print(features[list(TDA_COLUMNS)].apply(
            lambda col: pd.Series({other: col.corr(features[other], method="spearman")
                                   for other in ("iv_index", "rv60", "fwd_rv20")})).T)

    session_frame = session_frame.copy()
    session_frame["iv_index"] = iv.reindex(pd.DatetimeIndex(session_frame.index)).to_numpy()
    buckets = pd.cut(session_frame["iv_index"], [0, 13, 16, 20, 100], right=False,
                     labels=["VIX<13", "13-16", "16-20", "VIX>=20"])
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 3):
        print(f"\nIntraday (SYNTHETIC bars) session features, window {SESSION_WINDOW}, by IV index, mean:")
        print(session_frame.groupby(buckets, observed=True)[list(TDA_COLUMNS)].mean())


if __name__ == "__main__":
    main()
