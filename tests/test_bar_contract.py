"""The bar contract (core.market.MarketData) and the layering around it.

- The synthetic provider implements the contract; an object missing a member is refused with
  the missing names.
- A second source that implements only the contract — no batched quotes, no synthetic
  internals: ``quote_structures`` answered contract by contract — gives the same trades, equity,
  rejections and risk events through ``run_backtest`` with both drivers: the session and the
  drivers use nothing else of a source.
- Dependencies point one way: strategies/ and risk/ import nothing from core/, the engine and the
  drivers import nothing from data_factory/.
"""
from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.backtest_engine import run_backtest
from core.config import Config
from core.market import MarketData, require_market_data, structures_from_contracts
from core.market_data import bar_features, load_market
from data_factory.option_chain import SyntheticChainProvider

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Config().override({"backtest.start": dt.date(2016, 1, 4), "backtest.end": dt.date(2016, 2, 26),
                            "hedge.enable_hedge": True, "hedge.hedge_threshold": 0.08,
                            "risk.daily_drawdown_limit": 0.002, "risk.kill_switch_flatten": True})


class ContractOnlyMarket:
    """A source that has exactly the contract's members, answering from another source's
    arrays and single-contract quotes (a vendor store would answer from its files)."""

    def __init__(self, source):
        self._source = source
        self._bar_times = source.bar_times
        self._sessions = source.sessions

    @property
    def bar_times(self) -> pd.DatetimeIndex:
        return self._bar_times

    @property
    def sessions(self) -> pd.DatetimeIndex:
        return self._sessions

    def spot_bars(self) -> pd.Series:
        return self._source.spot_bars()

    def iv_index_bars(self) -> pd.Series:
        return self._source.iv_index_bars()

    def ohlcv_bars(self):
        return None

    def expirations_at(self, bar, dte_min=None, dte_max=None):
        return self._source.expirations_at(bar, dte_min, dte_max)

    def slice_at(self, bar, dte_min=None, dte_max=None, expiry=None):
        return self._source.slice_at(bar, dte_min, dte_max, expiry=expiry)

    def quote_contracts(self, bar_start, bar_stop, expiration, strikes, is_call):
        return self._source.quote_contracts(bar_start, bar_stop, expiration, strikes, is_call)

    def quote_structures(self, bar, expirations, strikes):
        return _Quotes(*structures_from_contracts(self, bar, expirations, strikes))

    def settlement_time(self, expiration):
        return self._source.settlement_time(expiration)

    def describe(self) -> dict:
        return {"source": "contract-only wrapper", "synthetic": True}


class _Quotes:
    def __init__(self, bid, ask, mid, delta, gamma, vega, theta):
        self.bid, self.ask, self.mid = bid, ask, mid
        self.delta, self.gamma, self.vega, self.theta = delta, gamma, vega, theta


@pytest.fixture(scope="module")
def market():
    return load_market(CONFIG)


def test_the_synthetic_provider_implements_the_contract(market):
    assert isinstance(market, SyntheticChainProvider)
    assert isinstance(market, MarketData)
    assert require_market_data(market) is market


def test_a_source_missing_members_is_refused_with_their_names():
    class Partial:
        bar_times = pd.DatetimeIndex([])

        def spot_bars(self):
            return pd.Series(dtype=float)

    with pytest.raises(TypeError, match="missing: sessions, iv_index_bars, .*quote_structures"):
        require_market_data(Partial())
    with pytest.raises(TypeError, match="does not implement the bar contract"):
        run_backtest(CONFIG, Partial(), features=object())


def test_structures_from_contracts_equals_the_batched_quotes(market):
    bar = 300
    expirations = market.expirations_at(bar, 20, 60)[:3]
    strikes = np.array([[180.0, 185.0, 205.0, 210.0], [176.0, 181.0, 207.0, 212.0], [170.0, 180.0, 210.0, 220.0]])
    batched = market.quote_structures(bar, expirations, strikes[: len(expirations)])
    one_by_one = structures_from_contracts(market, bar, expirations, strikes[: len(expirations)])
    for k, name in enumerate(("bid", "ask", "mid", "delta", "gamma", "vega", "theta")):
        assert np.array_equal(getattr(batched, name), one_by_one[k]), name


@pytest.mark.parametrize("engine", ["fast", "backtrader"])
def test_a_contract_only_source_runs_the_same_backtest(market, engine):
    config = CONFIG.override({"backtest.engine": engine})
    features = bar_features(config, market)
    other = ContractOnlyMarket(market)
    assert isinstance(other, MarketData) and not isinstance(other, SyntheticChainProvider)
    reference = run_backtest(config, market, features=features)
    result = run_backtest(config, other, features=features)
    pd.testing.assert_frame_equal(result.trades, reference.trades, check_exact=True)
    pd.testing.assert_frame_equal(result.equity, reference.equity, check_exact=True)
    pd.testing.assert_frame_equal(result.risk_events, reference.risk_events, check_exact=True)
    pd.testing.assert_frame_equal(result.hedges, reference.hedges, check_exact=True)
    assert result.rejections == reference.rejections
    # The run exercised the risk manager, not only entries and exits.
    assert len(reference.trades) >= 5 and len(reference.hedges) >= 5
    assert reference.metrics["risk"]["kill_switch_halts"] >= 1


# ------------------------------------------------------------------------------------------------
# layering
# ------------------------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("strategies", "core"), ("risk", "core"), ("analytics", "core"), ("data_factory", "core"),
    ("intelligence", "core"),
])
def test_lower_layers_import_nothing_from_core(folder, forbidden):
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                     if name == forbidden or name.startswith(forbidden + "."))
                 for path in (ROOT / folder).glob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("module", ["core/engine.py", "core/backtest_engine.py", "core/portfolio.py",
                                    "risk/risk_manager.py"])
def test_the_engine_and_drivers_see_no_data_source(module):
    names = imported_modules(ROOT / module)
    assert not [name for name in names if name.startswith("data_factory")], names
