"""The compiled per-bar evaluator must agree bitwise with the reference functions it mirrors:
fills (core.execution), exit rules (strategies.options_strategy), marks (core.portfolio), and the
provider's batched quotes with its single-contract quotes. Both drivers rely on it."""
from __future__ import annotations

import numpy as np
import pytest

from core.config import Config
from core.engine import PositionColumns, evaluate_condor_rows
from core.execution import CONDOR_RATIOS, FillModel, close_debit, close_debit_row, open_credit, open_credit_row
from core.portfolio import value_at_closing_side, value_at_mid
from strategies.options_strategy import ExitRules, exit_codes


def columns(credit, short_put, short_call, quantity, expiration_day, entry_day) -> PositionColumns:
    return PositionColumns(np.array([credit]), np.array([short_put]), np.array([short_call]),
                           np.array([quantity], dtype=np.int64), np.array([expiration_day], dtype=np.int64),
                           np.array([entry_day], dtype=np.int64))


def random_greeks(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(0.0, scale, (rows, 4)) for scale in (0.2, 0.02, 0.15, 0.03))


def random_quotes(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    bid = np.round(rng.uniform(0.0, 6.0, (rows, 4)), 2)
    ask = bid + np.round(rng.uniform(0.01, 0.25, (rows, 4)), 2)
    return bid, ask, 0.5 * (bid + ask)


@pytest.mark.parametrize("fraction", [0.5, 0.66, 0.8137, 1.0])
def test_close_debit_row_is_the_reference_close_debit(fraction):
    bid, ask, _ = random_quotes(20_000, seed=int(fraction * 1000))
    _, reference = close_debit(bid, ask, FillModel(fraction))
    compiled = np.array([close_debit_row(bid[i], ask[i], fraction) for i in range(len(bid))])
    assert np.array_equal(compiled, reference)


@pytest.mark.parametrize("fraction", [0.5, 0.66, 0.8137, 1.0])
def test_open_credit_row_is_the_reference_open_credit(fraction):
    bid, ask, _ = random_quotes(20_000, seed=int(fraction * 1000) + 1)
    _, reference = open_credit(bid, ask, FillModel(fraction))
    compiled = np.array([open_credit_row(bid[i], ask[i], fraction) for i in range(len(bid))])
    assert np.array_equal(compiled, reference)


def test_evaluator_rows_match_the_reference_rules_and_marks():
    config = Config().override({"exits.profit_take_pct": 0.4, "exits.loss_close_multiple": 1.0,
                                "exits.dte_exit": 5, "exits.max_hold_days": 10})
    exits = config.exits
    rows = 5_000
    bid, ask, mid = random_quotes(rows, seed=7)
    rng = np.random.default_rng(8)
    credit, quantity, expiration_day, entry_day = 1.15, 3, 17_000, 16_975
    session_day = np.sort(rng.integers(entry_day, expiration_day + 1, rows)).astype(np.int64)
    spot = rng.uniform(180.0, 220.0, rows)
    greeks = random_greeks(rows, seed=9)
    out_f, out_i = evaluate_condor_rows(bid, ask, mid, *greeks, spot, session_day,
                                        columns(credit, 195.0, 205.0, quantity, expiration_day, entry_day),
                                        ExitRules.from_settings(exits, 0.66))
    _, debit = close_debit(bid, ask, FillModel(0.66))
    assert np.array_equal(out_f[0], debit)
    assert np.array_equal(out_f[1], (debit - credit) * 100 * quantity)
    assert np.array_equal(out_f[2], value_at_mid(mid, CONDOR_RATIOS, quantity))
    assert np.array_equal(out_f[3], value_at_closing_side(bid, ask, CONDOR_RATIOS, quantity))
    expected_codes = exit_codes(debit, credit, expiration_day - session_day, session_day - entry_day, config)
    assert np.array_equal(out_i[0], expected_codes)
    assert set(np.unique(out_i[0])) >= {0, 1, 2, 3}          # the sample exercises several rules
    assert np.array_equal(out_i[2], expiration_day - session_day)
    # Net Greeks per row: Σ ratio·greek × 100 × contracts, legs summed in the fixed order.
    for row, values in zip(out_f[5:], greeks):
        expected = (((values[:, 0] - values[:, 1]) - values[:, 2]) + values[:, 3]) * (100.0 * quantity)
        assert np.array_equal(row, expected)


def test_settled_rows_give_nan_and_no_exit():
    bid, ask, mid = random_quotes(3, seed=1)
    bid[1] = ask[1] = mid[1] = np.nan
    greeks = random_greeks(3, seed=2)
    for values in greeks:
        values[1] = np.nan
    exits = Config().exits.model_copy(update={"dte_exit": 0, "max_hold_days": 30})
    out_f, out_i = evaluate_condor_rows(bid, ask, mid, *greeks, np.array([200.0]), np.array([100], dtype=np.int64),
                                        columns(1.0, 190.0, 210.0, 1, 101, 90), ExitRules.from_settings(exits, 0.66))
    assert np.isnan(out_f[:4, 1]).all() and np.isnan(out_f[5:, 1]).all() and out_i[0, 1] == 0
    assert np.isfinite(out_f[:4, [0, 2]]).all() and np.isfinite(out_f[5:, [0, 2]]).all()


def test_batched_structure_quotes_equal_single_contract_quotes():
    from data_factory.option_chain import SyntheticChainProvider

    provider = SyntheticChainProvider.from_embedded("2016-03-01", "2016-03-31")
    bar = 200
    chain = provider.slice_at(bar, dte_min=20, dte_max=70)
    expirations = np.unique(chain.expiration)[:3]
    strikes = np.array([[180.0, 185.0, 205.0, 210.0], [175.0, 182.0, 207.0, 214.0], [170.0, 180.0, 210.0, 220.0]])
    for offset in (0, 37, 150):
        quotes = provider.quote_structures(bar + offset, expirations, strikes[: len(expirations)])
        for i, expiration in enumerate(expirations):
            single = provider.quote_contracts(bar + offset, bar + offset + 1, expiration, strikes[i],
                                              np.array([False, False, True, True]))
            for name in ("bid", "ask", "mid", "delta", "gamma", "vega", "theta"):
                assert np.array_equal(getattr(quotes, name)[i], getattr(single, name)[0]), name


def test_batched_quotes_refuse_an_unlisted_expiry():
    from data_factory.errors import DataError
    from data_factory.option_chain import SyntheticChainProvider

    provider = SyntheticChainProvider.from_embedded("2016-03-01", "2016-03-10")
    with pytest.raises(DataError, match="2016-03-19 is not a listed expiry"):
        provider.quote_structures(0, np.array(["2016-03-19"], dtype="datetime64[D]"),
                                  np.array([[180.0, 185.0, 205.0, 210.0]]))
