"""The per-process caches behind run_backtest (core.market_data): the market and the feature table
are built once per set of settings they depend on, and a setting left out of the feature key
really does not change the table (each one is perturbed here and the table rebuilt from scratch).
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

import core.market_data as market_data
from core.backtest_engine import run_backtest
from core.config import Config
from core.market_data import (
    FEATURE_INDEPENDENT_FIELDS,
    bar_features,
    embedded_bar_features,
    feature_key,
    load_market,
)

CONFIG = Config().override({"backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 1, 29),
                            "backtest.engine": "fast"})

# A different valid value for every field the feature key leaves out.
PERTURBED = {
    "filters.iv_rank_min": 10.0, "filters.vix_threshold": 30.0,
    "filters.max_volatility_pct": 0.03, "filters.use_liquidity_gate": False, "filters.vrp_threshold": 0.03,
    "filters.skew_threshold": 0.2, "filters.gap_small_threshold": 0.003, "filters.use_vix_gate": False,
    "filters.use_vrp_gate": False, "filters.use_volatility_cap": False, "filters.use_gap_rule": False,
    "filters.gap_rule_minutes": 30, "filters.use_probability_filter": False, "filters.max_breach_probability": 0.5,
    "filters.pop_source": "diffusion", "filters.diffusion_paths": 32,
    "filters.liquidity_max_spread_to_credit": 0.6, "filters.use_divergence_bias": False,
    "filters.divergence_wing_increment": 3.0,
    "momentum.rsi_neutral_min": 40.0, "momentum.rsi_neutral_max": 70.0, "momentum.stoch_neutral_min": 20.0,
    "momentum.stoch_neutral_max": 80.0, "momentum.adx_threshold_low": 30.0, "momentum.use_adx_filter": False,
    "momentum.use_rsi_filter": False, "momentum.use_stoch_filter": False,
    "trend.bbands_squeeze_threshold": 0.03, "trend.sma_max_distance": 0.03, "trend.use_psar_filter": False,
    "trend.use_bbands_filter": False, "trend.use_sma_filter": False,
    "mtf.use_mtf": True, "mtf.consensus_min": 0.3, "mtf.consensus_max": 0.7,
    "fuzzy.min_confidence": 0.2,
    "regime.use_regime_wings": False, "regime.wing_scale_crash": 1.5, "regime.wing_scale_low_vol": 0.8,
}


@pytest.fixture(scope="module")
def market():
    return load_market(CONFIG)


@pytest.fixture(scope="module")
def table(market):
    return bar_features(CONFIG, market)


def test_every_left_out_field_is_perturbed_here():
    listed = {f"{section}.{name}" for section, names in FEATURE_INDEPENDENT_FIELDS.items() for name in names}
    assert listed == set(PERTURBED) | {"filters.use_entry_gates", "fuzzy.use_fuzzy"}


def test_the_market_is_loaded_once_per_period(market):
    assert load_market(CONFIG.override({"exits.profit_take_pct": 0.6, "risk.max_portfolio_delta": 150.0})) is market
    other = load_market(CONFIG.override({"backtest.seed": 7}))
    assert other is not market and len(other.bar_times) == len(market.bar_times)


def test_exit_risk_hedge_and_sizing_settings_reuse_the_table(market, table):
    changed = CONFIG.override({"exits.profit_take_pct": 0.7, "exits.max_hold_days": 21, "risk.max_portfolio_vega": 300.0,
                               "risk.daily_drawdown_limit": 0.05, "hedge.enable_hedge": True, "sizing.dynamic_sizing": True,
                               "strategy.max_alloc": 0.3, "strategy.quantity": 2, "backtest.engine": "backtrader"})
    assert feature_key(changed) == feature_key(CONFIG)
    assert bar_features(changed, market) is table


@pytest.mark.parametrize("dotted", sorted(PERTURBED))
def test_a_left_out_setting_does_not_change_the_table(market, table, dotted):
    changed = CONFIG.override({dotted: PERTURBED[dotted]})
    assert getattr(getattr(changed, dotted.split(".")[0]), dotted.split(".")[1]) != \
        getattr(getattr(CONFIG, dotted.split(".")[0]), dotted.split(".")[1])
    assert feature_key(changed) == feature_key(CONFIG)
    assert bar_features(changed, market) is table
    fresh = embedded_bar_features(changed, market)         # built from scratch, no cache
    assert set(fresh.columns) == set(table.columns)
    for name, values in fresh.columns.items():
        np.testing.assert_array_equal(values, table.columns[name], err_msg=f"{dotted}: {name}")


@pytest.mark.parametrize("dotted, value", [("momentum.rsi_period", 10), ("mtf.trend_period", 30),
                                           ("trend.psar_acceleration", 0.025), ("filters.realized_vol_window", 40),
                                           ("filters.vix_threshold_low", 15.0)])
def test_a_setting_the_features_read_builds_a_new_table(market, table, dotted, value):
    changed = CONFIG.override({dotted: value})
    assert feature_key(changed) != feature_key(CONFIG)
    other = bar_features(changed, market)
    assert other is not table
    assert any(not np.array_equal(other.columns[name], table.columns[name], equal_nan=True)
               for name in table.columns)


@pytest.mark.parametrize("changes", [{"fuzzy.fuzzy_weight_rsi": 0.2},
                                     {"fuzzy.fuzzy_weight_neural": 0.3, "fuzzy.fuzzy_weight_mtf": 0.25,
                                      "fuzzy.fuzzy_weight_iv": 0.1, "fuzzy.fuzzy_weight_adx": 0.05}])
def test_other_fuzzy_weights_reblend_the_cached_table_exactly(market, table, monkeypatch, changes):
    changed = CONFIG.override(changes)
    assert feature_key(changed) == feature_key(CONFIG)
    built = []
    original = market_data.embedded_bar_features
    monkeypatch.setattr(market_data, "embedded_bar_features",
                        lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    reblended = bar_features(changed, market)
    assert built == []
    fresh = original(changed, market)          # rebuilt from scratch with the new weights
    assert not np.array_equal(fresh.columns["confidence"], table.columns["confidence"], equal_nan=True)
    assert set(fresh.columns) == set(reblended.columns)
    for name, values in fresh.columns.items():
        np.testing.assert_array_equal(values, reblended.columns[name], err_msg=name)
    # and back to the original weights: the cached table itself
    assert bar_features(CONFIG, market) is table


def test_repeated_runs_build_the_features_once(market, monkeypatch):
    bar_features(CONFIG, market)        # cached (again, if earlier tests pushed it out)
    built = []
    original = market_data.embedded_bar_features
    monkeypatch.setattr(market_data, "embedded_bar_features",
                        lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    first = run_backtest(CONFIG, market)
    for take in (0.5, 0.6, 0.7):
        again = run_backtest(CONFIG.override({"exits.profit_take_pct": take}), market)
        assert again.bars == first.bars
    assert built == []
    run_backtest(CONFIG.override({"momentum.rsi_period": 9}), market)
    assert built == [1]
