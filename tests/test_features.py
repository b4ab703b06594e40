"""The per-bar feature table (intelligence/features.py, core/market_data.py::embedded_bar_features)
on a few weeks of embedded data: no look-ahead (a longer run repeats every earlier value, and later
daily closes change nothing on earlier sessions), alignment with the provider's bars, memberships
and the confidence blend, the intraday IV rank against a hand loop, and ``FeatureRow`` as a
read-only mapping.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest

import intelligence.features as features_module
from core.config import Config
from core.market_data import (
    embedded_bar_features,
    embedded_chain_provider,
    garch_config,
)
from data_factory import embedded
from intelligence.features import (
    MEMBERSHIP_COLUMNS,
    BarFeatures,
    FeatureRow,
    compute_bar_features,
    intraday_iv_rank,
)

NY = "America/New_York"
START = dt.date(2016, 1, 4)
END_SHORT, END_LONG = dt.date(2016, 1, 22), dt.date(2016, 2, 12)
CONFIG = Config().override({"backtest.start": START, "backtest.end": END_LONG})
SHORT_CONFIG = CONFIG.override({"backtest.end": END_SHORT})


@pytest.fixture(scope="module")
def provider():
    return embedded_chain_provider(CONFIG)


@pytest.fixture(scope="module")
def captured(provider):
    """The long run's features and the exact inputs ``embedded_bar_features`` handed to
    ``compute_bar_features`` (to re-run it on altered inputs)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return compute_bar_features(*args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(features_module, "compute_bar_features", spy)
    try:
        table = embedded_bar_features(CONFIG, provider)
    finally:
        patch.undo()
    assert len(calls) == 1
    return table, calls[0]


@pytest.fixture(scope="module")
def features(captured):
    return captured[0]


@pytest.fixture(scope="module")
def short_features():
    return embedded_bar_features(SHORT_CONFIG, embedded_chain_provider(SHORT_CONFIG))


def session_dates(features: BarFeatures) -> np.ndarray:
    stamps = pd.DatetimeIndex(pd.to_datetime(features.close_ns, unit="ns", utc=True)).tz_convert(NY)
    return np.asarray(stamps.date)


# ------------------------------------------------------------------------------------------------
# no look-ahead
# ------------------------------------------------------------------------------------------------

def test_a_longer_run_repeats_every_earlier_value(features, short_features):
    n = len(short_features)
    assert 0 < n < len(features)
    np.testing.assert_array_equal(short_features.close_ns, features.close_ns[:n])
    assert set(short_features.columns) == set(features.columns)
    for name, values in short_features.columns.items():
        np.testing.assert_array_equal(values, features.columns[name][:n], err_msg=name)
    # The warm-up made the indicators usable from the first traded bar on, and the comparison
    # above covered real numbers, not only NaN.
    for name in ("rsi", "adx", "bb_width", "mtf_consensus", "iv_rank", "confidence"):
        assert np.isfinite(short_features.columns[name]).all(), name


def test_later_daily_closes_change_nothing_on_earlier_sessions(captured):
    table, (args, kwargs) = captured
    config, base, target, bar_iv, daily_iv, daily_spot, daily_pair = args
    day = pd.Timestamp("2016-01-20")
    # Every daily close from `day` on, and every intraday bar after that session, made different.
    spot = daily_spot.copy()
    spot.loc[spot.index >= day, ["open", "high", "low", "close"]] *= 1.07
    pair = daily_pair.copy()
    pair.loc[pair.index >= day, "close"] *= 0.9
    iv = daily_iv.copy()
    iv.loc[iv.index >= day] += 15.0
    later_bars = base.index.tz_convert(NY).tz_localize(None).normalize() > day
    shifted = base.copy()
    shifted.loc[later_bars, ["open", "high", "low", "close"]] *= 1.05
    bar_iv_changed = np.where(session_dates(table) > day.date(), bar_iv + 3.0, bar_iv)
    # The session's own open (the gap) is known at its open: keep it; its close is not.
    spot.loc[day, "open"] = daily_spot.loc[day, "open"]
    changed = compute_bar_features(config, shifted, target, bar_iv_changed, iv, spot, pair, **kwargs)
    upto = int((session_dates(table) <= day.date()).sum())
    assert 0 < upto < len(table)
    # (skew_reference is added after compute_bar_features; tests/test_skew_reference.py holds it.)
    assert set(table.columns) - set(changed.columns) == {"skew_reference"}
    for name, values in changed.columns.items():
        np.testing.assert_array_equal(values[:upto], table.columns[name][:upto], err_msg=name)
    # ... while the next session does see the changes (the test can fail).
    after = slice(upto, upto + 78)
    for name in ("gap_pct", "divergence_z", "iv_rank", "close"):
        assert not np.array_equal(changed.columns[name][after], table.columns[name][after]), name


# ------------------------------------------------------------------------------------------------
# alignment and ranges
# ------------------------------------------------------------------------------------------------

def test_columns_align_with_the_providers_bars(features, provider):
    n = len(provider.bar_times)
    assert len(features) == n
    np.testing.assert_array_equal(features.close_ns, provider.bar_times.tz_convert("UTC").as_unit("ns").asi8)
    for name, values in features.columns.items():
        assert values.shape == (n,), name
        assert values.dtype == np.float64, name
    np.testing.assert_array_equal(features.columns["close"], provider.spot_bars().to_numpy())
    np.testing.assert_array_equal(features.columns["iv_index"], provider.iv_index_bars().to_numpy())
    frame = features.frame()
    assert frame.index.equals(provider.bar_times.as_unit("ns"))
    assert list(frame.columns) == list(features.columns)
    local = provider.bar_times.tz_convert(NY)
    minutes = (local.hour * 60 + local.minute - (9 * 60 + 30)).to_numpy().astype(float)
    np.testing.assert_array_equal(features.columns["minutes_since_open"], minutes)


def test_gap_pct_is_the_sessions_open_against_the_previous_close(features):
    daily = embedded.daily_bars("SPY", "2015-12-01", END_LONG)
    gaps = (daily["open"] / daily["close"].shift(1) - 1.0).abs()
    dates = pd.to_datetime(session_dates(features))
    np.testing.assert_allclose(features.columns["gap_pct"], gaps.reindex(dates).to_numpy(), rtol=1e-12)


def test_memberships_lie_in_the_unit_interval(features):
    columns = features.columns
    for name in (*MEMBERSHIP_COLUMNS.values(), "mu_neural", "fuzzy_ft", "confidence"):
        values = columns[name]
        finite = values[np.isfinite(values)]
        assert finite.size == values.size, name           # warm-up made them all known
        assert ((finite >= 0.0) & (finite <= 1.0)).all(), name
    # Two of the seed's memberships by hand: min(1, IVR/60) and the VIX shoulder 12 → 30.
    np.testing.assert_allclose(columns["mu_iv"], np.clip(columns["iv_rank"] / 60.0, 0.0, 1.0), rtol=1e-12)
    np.testing.assert_allclose(columns["mu_regime"], np.clip(1.0 - (columns["iv_index"] - 12.0) / 18.0, 0.0, 1.0),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(columns["mu_mtf"], 1.0 - 2.0 * np.abs(columns["mtf_consensus"] - 0.5), rtol=1e-12)
    for minutes in CONFIG.mtf.timeframes:
        votes = columns[f"mtf_vote_{minutes}m"]
        assert ((votes >= 0.0) & (votes <= 1.0)).all()
    assert set(np.unique(columns["regime"])) <= {-1.0, 0.0, 1.0, 2.0, 3.0, 4.0}


def test_confidence_blends_a_neutral_neural_factor_with_ft(features):
    columns = features.columns
    weight = CONFIG.fuzzy.fuzzy_weight_neural
    assert weight == 0.20
    assert (columns["mu_neural"] == 0.5).all()
    np.testing.assert_allclose(columns["confidence"], weight * 0.5 + (1.0 - weight) * columns["fuzzy_ft"],
                               rtol=1e-12)
    # F_t is the normalised weighted mean of the ten memberships.
    weights = CONFIG.fuzzy.normalised_technical_weights()
    ft = sum(weight * columns[MEMBERSHIP_COLUMNS[factor]] for factor, weight in weights.items())
    np.testing.assert_allclose(columns["fuzzy_ft"], ft, rtol=1e-12)
    assert features.description["neural"].startswith("neutral")


def test_with_neural_reblends_the_confidence(features):
    rng = np.random.default_rng(3)
    neural = rng.uniform(0.0, 1.0, len(features))
    before = {name: values.copy() for name, values in features.columns.items()}
    blended = features.with_neural(neural, CONFIG)
    weight = CONFIG.fuzzy.fuzzy_weight_neural
    np.testing.assert_array_equal(blended.columns["mu_neural"], neural)
    np.testing.assert_allclose(blended.columns["confidence"], weight * neural + (1 - weight) * features.columns["fuzzy_ft"],
                               rtol=1e-12)
    assert not np.allclose(blended.columns["confidence"], features.columns["confidence"])
    for name in set(features.columns) - {"mu_neural", "confidence"}:
        np.testing.assert_array_equal(blended.columns[name], features.columns[name], err_msg=name)
    assert blended.description["neural"] == "supplied"
    # The original table is left as it was.
    for name, values in before.items():
        np.testing.assert_array_equal(features.columns[name], values, err_msg=name)
    # Another neural weight blends with that weight.
    heavy = CONFIG.override({"fuzzy.fuzzy_weight_neural": 0.5})
    np.testing.assert_allclose(features.with_neural(neural, heavy).columns["confidence"],
                               0.5 * neural + 0.5 * features.columns["fuzzy_ft"], rtol=1e-12)


def test_neural_supplied_to_the_builder_equals_with_neural(captured, features):
    _, (args, _) = captured
    neural = np.linspace(0.0, 1.0, len(features))
    built = compute_bar_features(*args, neural=neural)
    np.testing.assert_allclose(built.columns["confidence"], features.with_neural(neural, CONFIG).columns["confidence"],
                               rtol=1e-12)
    np.testing.assert_array_equal(built.columns["fuzzy_ft"], features.columns["fuzzy_ft"])


def test_targets_without_a_base_bar_are_refused(captured):
    _, (args, kwargs) = captured
    config, base, target, *rest = args
    bad = target.copy()
    bad[10] += 60 * 1_000_000_000           # 09:36 + … : no 5-minute bar closes there
    with pytest.raises(ValueError, match="no 5-minute bar closing at"):
        compute_bar_features(config, base, bad, *rest, **kwargs)


# ------------------------------------------------------------------------------------------------
# intraday IV rank
# ------------------------------------------------------------------------------------------------

def hand_iv_rank(session_of_bar, bar_iv, daily_iv, window=252):
    sessions = list(daily_iv.index.asi8)
    history = daily_iv.to_numpy(float)
    out = np.empty(len(bar_iv))
    for i, (session, value) in enumerate(zip(session_of_bar, bar_iv)):
        d = sessions.index(session)
        if d < window - 1:
            out[i] = np.nan
            continue
        values = list(history[d - (window - 1): d]) + [value]
        low, high = min(values), max(values)
        out[i] = 50.0 if high == low else 100.0 * (value - low) / (high - low)
    return out


def test_intraday_iv_rank_against_a_hand_loop():
    rng = np.random.default_rng(11)
    days = pd.bdate_range("2015-01-01", periods=300).as_unit("ns")
    daily_iv = pd.Series(15.0 + np.cumsum(rng.normal(0.0, 0.5, len(days))), index=days)
    # Four bars on each of the sessions 240 … 299 (some before a full window exists), with values
    # inside, above and below the year's range.
    chosen = np.repeat(np.arange(240, 300), 4)
    session_of_bar = days.asi8[chosen]
    bar_iv = daily_iv.to_numpy()[chosen] + rng.normal(0.0, 4.0, len(chosen))
    got = intraday_iv_rank(session_of_bar, bar_iv, daily_iv)
    expected = hand_iv_rank(session_of_bar, bar_iv, daily_iv)
    assert np.isnan(got[chosen < 251]).all() and np.isfinite(got[chosen >= 251]).all()
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)
    assert (got[np.isfinite(got)] == 0.0).any() and (got[np.isfinite(got)] == 100.0).any()
    # The session's own close (known only at its end) is never used: any value leaves the ranks alone.
    last = session_of_bar == days.asi8[299]
    for extreme in (1.0, 99.0):
        changed = daily_iv.copy()
        changed.iloc[299] = extreme
        np.testing.assert_array_equal(intraday_iv_rank(session_of_bar, bar_iv, changed)[last], got[last])
    # A rising history: the oldest of the 251 sessions is the low, so the window's edges matter.
    rising = pd.Series(np.arange(300, dtype=float), index=days)
    flat_bars = rising.to_numpy()[chosen] - 0.5
    np.testing.assert_allclose(intraday_iv_rank(session_of_bar, flat_bars, rising),
                               hand_iv_rank(session_of_bar, flat_bars, rising), rtol=1e-12, equal_nan=True)


def test_intraday_iv_rank_is_50_on_a_flat_history():
    days = pd.bdate_range("2015-01-01", periods=260).as_unit("ns")
    daily_iv = pd.Series(20.0, index=days)
    session_of_bar = days.asi8[255:]
    np.testing.assert_array_equal(intraday_iv_rank(session_of_bar, np.full(5, 20.0), daily_iv), np.full(5, 50.0))
    # A bar above the flat year ranks 100, below it 0.
    np.testing.assert_array_equal(intraday_iv_rank(session_of_bar[:2], np.array([21.0, 19.0]), daily_iv),
                                  [100.0, 0.0])


def test_the_tables_iv_rank_follows_the_hand_loop(features):
    history_start = pd.Timestamp(START) - pd.Timedelta(days=400)
    daily_iv = embedded.daily_iv_index(history_start, END_LONG, garch_config=garch_config(CONFIG))["iv_index"]
    sessions = pd.to_datetime(session_dates(features)).as_unit("ns").asi8
    expected = hand_iv_rank(sessions, features.columns["iv_index"], daily_iv)
    np.testing.assert_allclose(features.columns["iv_rank"], expected, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# FeatureRow
# ------------------------------------------------------------------------------------------------

def test_feature_row_is_a_read_only_mapping(features):
    bar = 100
    row = features.row(bar)
    assert isinstance(row, Mapping) and isinstance(row, FeatureRow)
    assert len(row) == len(features.columns)
    assert list(row) == list(features.columns)
    assert "confidence" in row and "no_such_feature" not in row
    value = row["confidence"]
    assert type(value) is float and value == features.columns["confidence"][bar]
    assert dict(row) == {name: values[bar] for name, values in features.columns.items()}
    assert row.get("no_such_feature") is None and row.get("close") == features.columns["close"][bar]
    with pytest.raises(KeyError):
        row["no_such_feature"]
    with pytest.raises(TypeError):
        row["close"] = 1.0                      # type: ignore[index]
    assert dict(features.row(bar + 1)) != dict(row)
    assert bool(row)


def test_a_five_minute_base_gives_the_same_five_and_fifteen_minute_votes(provider, features):
    """The embedded 5-minute bars are aggregated from the 1-minute bars, so building the 5- and
    15-minute timeframes from 5-minute base bars must give the votes built from 1-minute bars."""
    five = CONFIG.override({"mtf.base_bar_minutes": 5, "mtf.timeframes": (5, 15)})
    table = embedded_bar_features(five, provider)
    assert table.description["base_bar_minutes"] == 5
    assert "mtf_vote_1m" not in table.columns
    for minutes in (5, 15):
        np.testing.assert_array_equal(table.columns[f"mtf_vote_{minutes}m"], features.columns[f"mtf_vote_{minutes}m"])
    # C now averages two timeframes instead of three.
    np.testing.assert_allclose(table.columns["mtf_consensus"],
                               0.5 * (table.columns["mtf_vote_5m"] + table.columns["mtf_vote_15m"]), rtol=1e-12)
    for name in ("close", "rsi", "adx", "iv_rank", "gap_pct", "divergence_z"):
        np.testing.assert_array_equal(table.columns[name], features.columns[name], err_msg=name)
