"""Stage-3 RiskManager (``risk.risk_manager``) on constructed books and proposals, no market data:

- the sizing chain Q_final = min(Q_fuzzy or quantity, Q_risk, max_alloc, buying power, Greek
  caps), each rule binding in turn, at its exact boundary and a hair beyond, and against a brute
  force over whole contract counts;
- the kill switch (session and total drawdown): boundaries, once per session, the halt and its
  reset, the session reference; the vectorised forms (``observe_range``,
  ``first_drawdown_breach``) against the per-bar ones;
- the delta hedge (``hedge_shares``, ``first_hedge_trigger``).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest

from core.config import Config
from risk.risk_manager import (
    GREEKS,
    SIZING_REASONS,
    Book,
    DrawdownTrigger,
    Proposal,
    RiskManager,
    Sizing,
    cap_range,
    max_within_cap,
)

BASE = Config()
BIG = 1 << 30

# Nothing binds: ten condors of $500 max loss on $100k, Greek caps far away.
ROOMY = {
    "strategy.quantity": 10,
    "strategy.max_alloc": 1.0,
    "risk.max_account_risk_per_trade": 0.25,
    **{f"risk.max_trade_{g}": 1e6 for g in GREEKS},
    **{f"risk.max_portfolio_{g}": 1e6 for g in GREEKS},
}
BOOK = Book(equity=100_000.0, cash=100_000.0)
PROPOSAL = Proposal(max_loss=500.0, delta=2.0, gamma=0.5, vega=5.0, theta=3.0)


def manager(settings: dict | None = None, base: dict | None = None) -> RiskManager:
    merged = {**(base or {}), **(settings or {})}
    return RiskManager(BASE.override(merged) if merged else BASE)


def roomy(settings: dict | None = None) -> RiskManager:
    return manager(settings, ROOMY)


def with_greek(obj, greek: str, value: float):
    """A copy of a frozen Book/Proposal with one Greek changed."""
    return dataclasses.replace(obj, **{greek: value})


# ------------------------------------------------------------------------------------------------
# max_within_cap
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("current, per_unit, cap, expected", [
    (0.0, 50.0, 200.0, 4),
    (0.0, -50.0, 200.0, 4),
    (150.0, 50.0, 200.0, 1),           # one unit lands exactly on the cap
    (150.0, 60.0, 200.0, 0),           # one unit breaks it
    (-150.0, -60.0, 200.0, 0),
    (150.0, -50.0, 200.0, 7),          # towards the other side: 150 - 350 = -200
    (0.0, 200.0, 200.0, 1),
    (0.0, 200.0 * (1 + 1e-7), 200.0, 0),
    (0.0, 200.0 / 3.0, 200.0, 3),      # 3 × (200/3) is the cap up to float noise
    (0.0, -125.0 / 3.0, 125.0, 3),
    (0.1, 0.2, 0.3, 1),                # 0.30000000000000004: on the cap up to float noise
    (-0.1, -0.2, 0.3, 1),
    (0.1, 0.2, 0.7, 3),                # (0.7 - 0.1) / 0.2 is 2.9999999999999996 in floats
    # A book already beyond the cap: a unit that brings it back inside is allowed ...
    (250.0, -100.0, 200.0, 4),         # 150, 50, -50, -150; the 5th lands on -250
    (250.0, -50.0, 200.0, 9),          # 200 (on the cap) … -200 (on the cap)
    (-250.0, 50.0, 200.0, 9),
    (-250.0, 100.0, 200.0, 4),
    # ... also when it takes more than one unit to get back inside (the largest q is reported) ...
    (250.0, -30.0, 200.0, 15),         # 220 after one unit, 190 after two … -200 after fifteen
    # ... one that does not is refused.
    (250.0, 10.0, 200.0, 0),
    (-250.0, -10.0, 200.0, 0),
    (250.0, 0.0, 200.0, 0),
    # A unit with no exposure on a book inside (or on) the cap: no limit from this cap.
    (100.0, 0.0, 200.0, BIG),
    (-200.0, 0.0, 200.0, BIG),
])
def test_max_within_cap_hand_cases(current, per_unit, cap, expected):
    assert max_within_cap(current, per_unit, cap) == expected


@pytest.mark.parametrize("current, per_unit, cap, expected", [
    (0.0, 50.0, 200.0, (1, 4)),
    (250.0, -30.0, 200.0, (2, 15)),    # 220 (out), 190 (in) … -200 (on the cap), -230 (out)
    (-250.0, 30.0, 200.0, (2, 15)),
    (250.0, -100.0, 200.0, (1, 4)),
    (250.0, 10.0, 200.0, (1, 0)),      # never inside: lowest > highest
    (150.0, 60.0, 200.0, (1, 0)),
    (250.0, 0.0, 200.0, (1, 0)),
    (100.0, 0.0, 200.0, (1, BIG)),
])
def test_cap_range_hand_cases(current, per_unit, cap, expected):
    assert cap_range(current, per_unit, cap) == expected


def test_cap_range_is_the_interval_of_quantities_inside_the_cap():
    """Random cases: every q in [lowest, highest] fits, lowest − 1 (when ≥ 1) and highest + 1 do
    not; an empty range means no q in 1 … 200 fits; max_within_cap is the highest or 0."""
    rng = np.random.default_rng(7)
    empty = outside_start = inside_start = 0
    for _ in range(3000):
        cap = float(rng.uniform(1.0, 500.0))
        current = float(rng.uniform(-1.5, 1.5) * cap)
        per_unit = float(rng.normal(0.0, cap / 8.0))
        lowest, highest = cap_range(current, per_unit, cap)
        fits = [q for q in range(1, 201) if abs(current + q * per_unit) <= cap * (1 + 1e-12)]
        if lowest > highest:
            assert not fits, (current, per_unit, cap)
            assert max_within_cap(current, per_unit, cap) == 0
            empty += 1
            continue
        assert highest < BIG
        assert max_within_cap(current, per_unit, cap) == highest
        for k in (lowest, (lowest + highest) // 2, highest):
            assert abs(current + k * per_unit) <= cap * (1 + 1e-12), (current, per_unit, cap, k)
        assert abs(current + (highest + 1) * per_unit) > cap, (current, per_unit, cap, highest)
        if lowest > 1:
            assert abs(current + (lowest - 1) * per_unit) > cap
            outside_start += 1
        else:
            inside_start += 1
    assert empty > 300 and inside_start > 300 and outside_start > 30


# ------------------------------------------------------------------------------------------------
# the sizing chain: each rule binding in turn
# ------------------------------------------------------------------------------------------------

def test_nothing_binds_gives_the_base_quantity():
    sizing = roomy().size(PROPOSAL, BOOK)
    assert isinstance(sizing, Sizing)
    assert (sizing.quantity, sizing.reason) == (10, "")
    assert sizing.allowances["quantity"] == 10
    assert sizing.allowances["risk_budget"] == 50          # 0.25 × 100k / 500
    assert sizing.allowances["max_alloc"] == 200 and sizing.allowances["buying_power"] == 200
    assert sizing.explain() == "quantity 10 -> 10"


BINDING = [
    # (rule, settings, book changes, proposal changes); each rule allows exactly 4 condors.
    ("risk_budget", {"risk.max_account_risk_per_trade": 0.02}, {}, {}),                 # 2000 / 500
    ("max_alloc", {"strategy.max_alloc": 0.15}, {"committed_max_loss": 13_000.0}, {}),  # (15000-13000)/500
    ("buying_power", {}, {"cash": 2_000.0}, {}),
    ("trade_delta_limit", {"risk.max_trade_delta": 8.0}, {}, {"delta": -2.0}),
    ("trade_gamma_limit", {"risk.max_trade_gamma": 2.0}, {}, {"gamma": 0.5}),
    ("trade_vega_limit", {"risk.max_trade_vega": 20.0}, {}, {"vega": -5.0}),
    ("trade_theta_limit", {"risk.max_trade_theta": 12.0}, {}, {"theta": 3.0}),
    ("portfolio_delta_cap", {"risk.max_portfolio_delta": 100.0}, {"delta": 92.0}, {"delta": 2.0}),
    ("portfolio_gamma_cap", {"risk.max_portfolio_gamma": 10.0}, {"gamma": -8.0}, {"gamma": -0.5}),
    ("portfolio_vega_cap", {"risk.max_portfolio_vega": 500.0}, {"vega": -480.0}, {"vega": -5.0}),
    ("portfolio_theta_cap", {"risk.max_portfolio_theta": 250.0}, {"theta": 238.0}, {"theta": 3.0}),
]


def _apply(obj, changes: dict):
    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize("rule, settings, book_changes, proposal_changes", BINDING, ids=[b[0] for b in BINDING])
def test_each_rule_binds_in_turn(rule, settings, book_changes, proposal_changes):
    risk = roomy(settings)
    book, proposal = _apply(BOOK, book_changes), _apply(PROPOSAL, proposal_changes)
    sizing = risk.size(proposal, book)
    assert (sizing.quantity, sizing.reason) == (4, rule)
    assert sizing.allowances[rule] == 4
    # Q_final is the minimum of every allowance, and only the binding rule allows that little.
    assert sizing.quantity == min(sizing.allowances.values())
    assert [name for name, value in sizing.allowances.items() if value == 4] == [rule]
    text = sizing.explain()
    assert text.startswith("quantity 10") and f"{rule} 4" in text and text.endswith("-> 4")
    # Every other rule allowed at least the base, so explain() leaves them out.
    assert text.count(",") == 1
    # A base at or below the allowance is not cut.
    uncut = roomy({**settings, "strategy.quantity": 4}).size(proposal, book)
    assert (uncut.quantity, uncut.reason) == (4, "")


@pytest.mark.parametrize("rule, settings, book_changes, proposal_changes", BINDING, ids=[b[0] for b in BINDING])
def test_a_rule_allowing_nothing_refuses_with_its_name(rule, settings, book_changes, proposal_changes):
    risk = roomy(settings)
    # Scale the proposal's exposure (or max loss) up five-fold: 4 allowed becomes 0.
    proposal = _apply(PROPOSAL, proposal_changes)
    if rule in ("risk_budget", "max_alloc", "buying_power"):
        proposal = _apply(proposal, {"max_loss": proposal.max_loss * 5.0})
    else:
        greek = rule.split("_")[1]
        proposal = with_greek(proposal, greek, getattr(proposal, greek) * 5.0)
    sizing = risk.size(proposal, _apply(BOOK, book_changes))
    assert (sizing.quantity, sizing.reason) == (0, rule)
    assert "-> 0" in sizing.explain() and f"{rule} 0" in sizing.explain()


def test_ties_name_the_first_rule_in_chain_order():
    # risk budget and max_alloc both allow 4: the risk budget is applied first.
    risk = roomy({"risk.max_account_risk_per_trade": 0.02, "strategy.max_alloc": 0.02})
    sizing = risk.size(PROPOSAL, BOOK)
    assert (sizing.quantity, sizing.reason) == (4, "risk_budget")
    assert sizing.allowances["max_alloc"] == 4


def test_the_binding_rule_is_the_smallest_allowance():
    # Three rules cut, the Greek one cuts most.
    risk = roomy({"risk.max_account_risk_per_trade": 0.03, "strategy.max_alloc": 0.035,
                  "risk.max_trade_vega": 10.0})
    sizing = risk.size(PROPOSAL, BOOK)     # risk 6, alloc 7, vega 2
    assert (sizing.quantity, sizing.reason) == (2, "trade_vega_limit")
    assert sizing.explain() == "quantity 10, risk_budget 6, max_alloc 7, trade_vega_limit 2 -> 2"


# ------------------------------------------------------------------------------------------------
# per-trade Greek limits at their boundaries
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("greek", GREEKS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("quantity, cap", [(1, 100.0), (3, 125.0), (7, 25.0), (4, 250.0)])
def test_trade_limit_boundary(greek, sign, quantity, cap):
    risk = roomy({"strategy.quantity": quantity, f"risk.max_trade_{greek}": cap})
    at_cap = with_greek(PROPOSAL, greek, sign * cap / quantity)       # |greek| × q == cap
    sizing = risk.size(at_cap, BOOK)
    assert (sizing.quantity, sizing.reason) == (quantity, "")
    above = with_greek(PROPOSAL, greek, sign * cap / quantity * (1 + 1e-7))
    sizing = risk.size(above, BOOK)
    assert (sizing.quantity, sizing.reason) == (quantity - 1, f"trade_{greek}_limit")
    assert sizing.allowances[f"trade_{greek}_limit"] == quantity - 1


def test_a_zero_greek_puts_no_trade_limit():
    risk = roomy({"risk.max_trade_delta": 1.0})
    sizing = risk.size(with_greek(PROPOSAL, "delta", 0.0), BOOK)
    assert (sizing.quantity, sizing.reason) == (10, "")
    assert "trade_delta_limit" not in sizing.allowances


# ------------------------------------------------------------------------------------------------
# portfolio Greek caps at their boundaries, both signs, and from beyond the cap
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("greek", GREEKS)
@pytest.mark.parametrize("current, per_unit, quantity, cap", [
    (50.0, 50.0, 3, 200.0),            # 50 + 150 = 200
    (-50.0, -50.0, 3, 200.0),
    (0.0, 200.0 / 3.0, 3, 200.0),
    (-37.5, 12.5, 1, 25.0),            # -25
    (120.0, -80.0, 4, 200.0),          # 120 - 320 = -200: the other side
])
def test_portfolio_cap_boundary(greek, current, per_unit, quantity, cap):
    risk = roomy({"strategy.quantity": quantity, f"risk.max_portfolio_{greek}": cap})
    book = with_greek(BOOK, greek, current)
    sizing = risk.size(with_greek(PROPOSAL, greek, per_unit), book)
    assert (sizing.quantity, sizing.reason) == (quantity, "")
    # A hair beyond: q units land 1e-7 (relative) outside the cap.
    target = current + quantity * per_unit
    nudged = (target * (1 + 1e-7) - current) / quantity
    sizing = risk.size(with_greek(PROPOSAL, greek, nudged), book)
    assert (sizing.quantity, sizing.reason) == (quantity - 1, f"portfolio_{greek}_cap")


@pytest.mark.parametrize("greek", GREEKS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_book_beyond_the_cap(greek, sign):
    """A book already beyond |cap| = 200: a trade that brings it back inside is allowed (as far
    as it stays inside), one that does not is refused with the cap's reason."""
    risk = roomy({f"risk.max_portfolio_{greek}": 200.0, "strategy.quantity": 5})
    book = with_greek(BOOK, greek, sign * 250.0)
    reason = f"portfolio_{greek}_cap"
    back_inside = risk.size(with_greek(PROPOSAL, greek, -sign * 100.0), book)   # 150, 50, -50, -150, -250
    assert (back_inside.quantity, back_inside.reason) == (4, reason)
    one = roomy({f"risk.max_portfolio_{greek}": 200.0, "strategy.quantity": 1}).size(
        with_greek(PROPOSAL, greek, -sign * 100.0), book)
    assert (one.quantity, one.reason) == (1, "")
    for per_unit in (sign * 10.0, 0.0, -sign * 5.0):      # further out, unchanged, not far enough (225)
        refused = risk.size(with_greek(PROPOSAL, greek, per_unit), book)
        assert (refused.quantity, refused.reason) == (0, reason), per_unit
    # 5 condors of -30 end at 100, inside: allowed; 1 condor ends at 220, outside: refused, the
    # trade is too small to bring the book back (it needs at least 2).
    assert risk.size(with_greek(PROPOSAL, greek, -sign * 30.0), book).quantity == 5
    small = roomy({f"risk.max_portfolio_{greek}": 200.0, "strategy.quantity": 1}).size(
        with_greek(PROPOSAL, greek, -sign * 30.0), book)
    assert (small.quantity, small.reason) == (0, reason)


def test_a_base_size_trade_that_brings_the_book_back_inside_is_allowed():
    assert max_within_cap(250.0, -30.0, 200.0) == 15       # 250 - 450 = -200
    risk = roomy({"risk.max_portfolio_delta": 200.0, "strategy.quantity": 5})
    sizing = risk.size(with_greek(PROPOSAL, "delta", -30.0), with_greek(BOOK, "delta", 250.0))
    assert sizing.quantity == 5


# ------------------------------------------------------------------------------------------------
# risk budget, fuzzy and dynamic sizing, risk limits off
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, equity, max_loss, expected", [
    (0.02, 100_000.0, 500.0, 4),                 # an exact multiple is allowed
    (0.02, 100_000.0, 500.01, 3),
    (0.02, 100_000.0, 2000.0, 1),
    (0.02, 100_000.0, 2000.01, 0),
    (0.03, 30_000.0, 900.0 / 7.0, 7),            # 0.03 × 30000 / (900/7) is 6.999999999999999 in floats
    (0.02, 25_000.0, 500.0 / 29.0, 29),          # 28.999999999999996 in floats
])
def test_risk_budget(budget, equity, max_loss, expected):
    risk = roomy({"risk.max_account_risk_per_trade": budget, "strategy.quantity": 1000})
    sizing = risk.size(Proposal(max_loss=max_loss), Book(equity=equity, cash=equity * 10))
    assert sizing.allowances["risk_budget"] == expected
    assert (sizing.quantity, sizing.reason) == (expected, "risk_budget")
    assert sizing.quantity == math.floor(budget * equity / max_loss + 1e-9)


FUZZY = {"sizing.dynamic_sizing": True, "fuzzy.use_fuzzy": True, "sizing.position_size_pct": 0.05}


@pytest.mark.parametrize("confidence, expected", [
    (0.29, 29),            # 0.29 × 100 is 28.999999999999996 in floats
    (1.0, 100),
    (0.5, 50),
    (0.999, 99),
    (0.004, 1),            # never less than one condor while the budget pays for one
    (0.0, 1),
])
def test_fuzzy_quantity(confidence, expected):
    risk = roomy(FUZZY)
    # Q_budget = floor(0.05 × 100000 / 50) = 100.
    sizing = risk.size(Proposal(max_loss=50.0, confidence=confidence), BOOK)
    assert sizing.allowances["position_size_pct"] == 100
    assert sizing.allowances["fuzzy"] == expected
    assert (sizing.quantity, sizing.reason) == (expected, "")
    assert "quantity" not in sizing.allowances
    assert sizing.explain() == f"position_size_pct 100, fuzzy {expected} -> {expected}"


def test_fuzzy_quantity_is_then_cut_by_the_other_rules():
    risk = roomy({**FUZZY, "risk.max_account_risk_per_trade": 0.01})     # 1000 / 50 = 20
    sizing = risk.size(Proposal(max_loss=50.0, confidence=0.29), BOOK)
    assert (sizing.quantity, sizing.reason) == (20, "risk_budget")
    assert "fuzzy 29" in sizing.explain() and "risk_budget 20" in sizing.explain()


def test_missing_confidence_refuses_under_fuzzy_sizing():
    sizing = roomy(FUZZY).size(Proposal(max_loss=50.0), BOOK)
    assert (sizing.quantity, sizing.reason) == (0, "fuzzy_confidence_missing")
    sizing = roomy(FUZZY).size(Proposal(max_loss=50.0, confidence=math.inf), BOOK)
    assert (sizing.quantity, sizing.reason) == (0, "fuzzy_confidence_missing")
    # Without fuzzy the confidence is not needed.
    plain = roomy({**FUZZY, "fuzzy.use_fuzzy": False}).size(Proposal(max_loss=50.0), BOOK)
    assert (plain.quantity, plain.reason) == (100, "")
    # Fuzzy on but fixed quantity (no dynamic sizing): C does not size.
    fixed = roomy({"fuzzy.use_fuzzy": True, "strategy.quantity": 3}).size(Proposal(max_loss=50.0), BOOK)
    assert (fixed.quantity, fixed.reason) == (3, "")


@pytest.mark.parametrize("max_loss, expected", [(5000.0, 1), (5000.01, 0), (50_000.0, 0)])
def test_position_size_budget_below_one(max_loss, expected):
    sizing = roomy(FUZZY).size(Proposal(max_loss=max_loss, confidence=0.9), BOOK)
    assert sizing.allowances["position_size_pct"] == expected
    if expected:
        assert (sizing.quantity, sizing.reason) == (1, "")
    else:
        assert (sizing.quantity, sizing.reason) == (0, "position_size_pct_below_one")
        assert "fuzzy" not in sizing.allowances


def test_dynamic_sizing_without_fuzzy_uses_the_whole_budget():
    risk = roomy({"sizing.dynamic_sizing": True, "sizing.position_size_pct": 0.1})
    sizing = risk.size(Proposal(max_loss=700.0, confidence=0.1), BOOK)   # 10000 / 700 = 14.28
    assert (sizing.quantity, sizing.reason) == (14, "")
    assert sizing.explain() == "position_size_pct 14 -> 14"


def test_fixed_quantity_when_dynamic_sizing_is_off():
    for quantity in (1, 2, 7):
        sizing = roomy({"strategy.quantity": quantity, "sizing.position_size_pct": 1.0}).size(
            Proposal(max_loss=50.0, confidence=0.9), BOOK)
        assert (sizing.quantity, sizing.reason) == (quantity, "")
        assert sizing.allowances["quantity"] == quantity and "position_size_pct" not in sizing.allowances


def test_risk_limits_off_drops_risk_budget_and_greek_caps_only():
    tight = {"risk.max_account_risk_per_trade": 0.001, **{f"risk.max_trade_{g}": 0.01 for g in GREEKS},
             **{f"risk.max_portfolio_{g}": 0.01 for g in GREEKS}}
    on = roomy(tight).size(PROPOSAL, BOOK)
    assert (on.quantity, on.reason) == (0, "risk_budget")
    off = roomy({**tight, "risk.use_risk_limits": False})
    sizing = off.size(PROPOSAL, BOOK)
    assert (sizing.quantity, sizing.reason) == (10, "")
    assert set(sizing.allowances) == {"quantity", "max_alloc", "buying_power"}
    # max_alloc and buying power still apply.
    cut = off.size(PROPOSAL, Book(equity=100_000.0, cash=1_600.0))
    assert (cut.quantity, cut.reason) == (3, "buying_power")
    cut = roomy({**tight, "risk.use_risk_limits": False, "strategy.max_alloc": 0.01}).size(PROPOSAL, BOOK)
    assert (cut.quantity, cut.reason) == (2, "max_alloc")
    assert off.daily_limit is None and off.total_limit is None


def test_committed_max_loss_beyond_the_allocation_refuses():
    risk = roomy({"strategy.max_alloc": 0.15})
    sizing = risk.size(PROPOSAL, Book(equity=100_000.0, cash=100_000.0, committed_max_loss=16_000.0))
    assert (sizing.quantity, sizing.reason) == (0, "max_alloc")


# ------------------------------------------------------------------------------------------------
# Q_final against a brute force over whole contract counts
# ------------------------------------------------------------------------------------------------

def _broken(q: int, config, proposal: Proposal, book: Book) -> set[str]:
    """The rules that q condors break, checked directly on q (no allowance arithmetic)."""
    risk, strategy = config.risk, config.strategy
    loss = q * proposal.max_loss
    tol = 1e-9
    broken = set()
    if risk.use_risk_limits and loss > risk.max_account_risk_per_trade * book.equity * (1 + tol):
        broken.add("risk_budget")
    if book.committed_max_loss + loss > strategy.max_alloc * book.equity * (1 + tol) + tol:
        broken.add("max_alloc")
    if book.committed_max_loss + loss > book.cash * (1 + tol) + tol:
        broken.add("buying_power")
    if risk.use_risk_limits:
        for greek in GREEKS:
            if q * abs(getattr(proposal, greek)) > getattr(risk, f"max_trade_{greek}") * (1 + tol):
                broken.add(f"trade_{greek}_limit")
            cap = getattr(risk, f"max_portfolio_{greek}")
            if abs(getattr(book, greek) + q * getattr(proposal, greek)) > cap + tol:
                broken.add(f"portfolio_{greek}_cap")
    return broken


def test_q_final_is_the_largest_quantity_every_rule_allows():
    rng = np.random.default_rng(2024)
    reasons = set()
    for case in range(300):
        settings = {
            "strategy.quantity": int(rng.integers(1, 40)),
            "strategy.max_alloc": float(rng.uniform(0.05, 1.0)),
            "risk.max_account_risk_per_trade": float(rng.uniform(0.005, 0.25)),
            "risk.use_risk_limits": bool(rng.random() < 0.85),
            **{f"risk.max_trade_{g}": float(rng.uniform(5.0, 300.0)) for g in GREEKS},
            **{f"risk.max_portfolio_{g}": float(rng.uniform(20.0, 600.0)) for g in GREEKS},
        }
        config = BASE.override(settings)
        equity = float(rng.uniform(5_000.0, 200_000.0))
        book = Book(equity=equity, cash=equity * float(rng.uniform(0.1, 1.2)),
                    committed_max_loss=equity * float(rng.uniform(0.0, 0.2)),
                    **{g: float(rng.uniform(-0.9, 0.9) * settings[f"risk.max_portfolio_{g}"]) for g in GREEKS})
        proposal = Proposal(max_loss=float(rng.uniform(50.0, 1500.0)),
                            **{g: float(rng.normal(0.0, 10.0)) for g in GREEKS})
        sizing = RiskManager(config).size(proposal, book)
        base = settings["strategy.quantity"]
        # Brute force: the largest q <= base with every 1..q allowed by every rule.
        expected = 0
        while expected < base and not _broken(expected + 1, config, proposal, book):
            expected += 1
        assert sizing.quantity == expected, (case, sizing, settings, book, proposal)
        if expected < base:
            # The named rule is one that q + 1 condors break.
            broken = _broken(expected + 1, config, proposal, book)
            assert sizing.reason in broken, (case, sizing, broken)
            assert sizing.reason in SIZING_REASONS
            reasons.add(sizing.reason)
        else:
            assert sizing.reason == ""
        assert sizing.quantity == max(0, min(sizing.allowances.values()))
    # The random cases exercised most rules as the binding one.
    assert len(reasons) >= 8, reasons


# ------------------------------------------------------------------------------------------------
# entry blocks
# ------------------------------------------------------------------------------------------------

def test_entry_block_order():
    risk = manager({"strategy.max_positions": 2, "risk.max_drawdown_limit": 0.1, "backtest.cash": 100_000.0})
    assert risk.entry_block(10, 0) is None and risk.entry_block(10, 1) is None
    assert risk.entry_block(10, 2) == "max_positions"
    assert risk.check_drawdown(10, 89_999.0).kind == "max_drawdown"
    assert risk.entry_block(10, 0) == "max_drawdown_halt"
    assert risk.entry_block(11, 2) == "max_positions"        # the position cap is reported first
    assert risk.entry_block(500, 0) == "max_drawdown_halt"


# ------------------------------------------------------------------------------------------------
# kill switch
# ------------------------------------------------------------------------------------------------

KILL = {"backtest.cash": 100_000.0, "risk.daily_drawdown_limit": 0.02}


def test_session_loss_exactly_at_the_limit_does_not_fire_beyond_fires_once():
    risk = manager(KILL)
    day = 16_800
    # First bar of the run: the reference is the starting cash; 2 % of 100k is exactly 2000.
    assert risk.check_drawdown(day, 98_000.0) is None
    risk.observe(day, 98_000.0)
    assert risk.entry_block(day, 0) is None and not risk.session_halted(day)
    trigger = risk.check_drawdown(day, 97_999.99)
    assert isinstance(trigger, DrawdownTrigger)
    assert (trigger.kind, trigger.equity, trigger.reference, trigger.limit, trigger.flatten) == (
        "kill_switch", 97_999.99, 100_000.0, 0.02, False)
    assert trigger.drawdown == pytest.approx(0.0200001)
    risk.observe(day, 97_999.99)
    # Fires once per session, however far it falls.
    assert risk.check_drawdown(day, 90_000.0) is None
    risk.observe(day, 90_000.0)
    assert risk.entry_block(day, 0) == "kill_switch_halt" and risk.session_halted(day)
    # The next session is not halted; its reference is the last recorded equity (90k).
    assert risk.entry_block(day + 1, 0) is None and not risk.session_halted(day + 1)
    assert risk.check_drawdown(day + 1, 88_200.0) is None            # 90000 × 0.98
    risk.observe(day + 1, 89_000.0)
    trigger = risk.check_drawdown(day + 1, 88_199.0)
    assert trigger is not None and trigger.kind == "kill_switch" and trigger.reference == 90_000.0
    assert risk.session_halted(day + 1) and not risk.session_halted(day)


def test_session_reference_is_the_previous_sessions_last_bar():
    risk = manager(KILL)
    day = 16_900
    for equity in (100_000.0, 99_000.0, 98_500.0):
        assert risk.check_drawdown(day, equity) is None
        risk.observe(day, equity)
    # Session 2 opens at 99k: the reference stays 98 500 (its 2 % is 1970), not 99k (1980).
    assert risk.check_drawdown(day + 1, 99_000.0) is None
    risk.observe(day + 1, 99_000.0)
    assert risk.check_drawdown(day + 1, 97_000.0) is None             # 1500 below 98 500
    risk.observe(day + 1, 97_000.0)
    assert risk.check_drawdown(day + 1, 96_530.0) is None             # exactly 1970 below
    trigger = risk.check_drawdown(day + 1, 96_529.99)
    assert trigger.kind == "kill_switch" and trigger.reference == 98_500.0
    # A session with no bar recorded yet (a gap in sessions): the last recorded equity.
    risk.observe(day + 1, 96_000.0)
    trigger = risk.check_drawdown(day + 5, 94_079.0)                  # 96000 × 0.98 = 94080
    assert trigger.kind == "kill_switch" and trigger.reference == 96_000.0


def test_kill_switch_flatten_is_carried_on_the_trigger():
    risk = manager({**KILL, "risk.kill_switch_flatten": True})
    trigger = risk.check_drawdown(1, 97_000.0)
    assert trigger.kind == "kill_switch" and trigger.flatten is True


def test_risk_limits_off_has_no_kill_switch():
    risk = manager({**KILL, "risk.use_risk_limits": False, "risk.max_drawdown_limit": 0.05})
    assert risk.check_drawdown(1, 10_000.0) is None
    assert risk.first_drawdown_breach(np.array([1, 1]), np.array([10_000.0, 5_000.0])) is None
    assert risk.entry_block(1, 0) is None


def test_max_drawdown_limit_from_the_running_peak_halts_for_good():
    risk = manager({**KILL, "risk.daily_drawdown_limit": 0.5, "risk.max_drawdown_limit": 0.1})
    day = 17_000
    for equity in (100_000.0, 110_000.0, 120_000.0, 115_000.0):
        assert risk.check_drawdown(day, equity) is None
        risk.observe(day, equity)
    assert risk.check_drawdown(day, 108_000.0) is None                # exactly 10 % below 120k
    risk.observe(day, 108_000.0)
    # The current bar's equity counts in the peak (a new high is no drawdown).
    assert risk.check_drawdown(day, 125_000.0) is None
    trigger = risk.check_drawdown(day, 107_999.0)
    assert (trigger.kind, trigger.reference, trigger.limit) == ("max_drawdown", 120_000.0, 0.1)
    assert risk.halted_for_good
    for later in (day, day + 1, day + 300):
        assert risk.entry_block(later, 0) == "max_drawdown_halt" and risk.session_halted(later)
    # It fires once; the session kill switch no longer fires either.
    assert risk.check_drawdown(day + 1, 10_000.0) is None
    assert risk.first_drawdown_breach(np.array([day + 2]), np.array([1.0])) is None


def test_max_drawdown_off_by_default():
    risk = manager({**KILL, "risk.daily_drawdown_limit": 0.9})
    assert risk.total_limit is None
    risk.observe(1, 200_000.0)
    assert risk.check_drawdown(1, 100_000.0) is None                  # 50 % from the peak


# ------------------------------------------------------------------------------------------------
# vectorised forms against the per-bar ones
# ------------------------------------------------------------------------------------------------

def _state(risk: RiskManager) -> tuple:
    return (risk._last_session, risk._session_open, risk._last_equity, risk._peak, risk.halted_session,
            risk.halted_for_good)


def _random_sessions(rng, n_sessions: int, first_day: int) -> np.ndarray:
    days = first_day + np.cumsum(rng.integers(1, 4, size=n_sessions))      # gaps of 1-3 days
    return np.repeat(days, rng.integers(1, 12, size=n_sessions)).astype(np.int64)


def _random_equity(rng, n: int, start: float, scale: float = 0.004) -> np.ndarray:
    steps = rng.normal(0.0, scale, size=n)
    jumps = rng.random(n) < 0.03
    steps[jumps] += rng.normal(0.0, 0.02, size=int(jumps.sum()))
    return start * np.exp(np.cumsum(steps))


@pytest.mark.parametrize("seed", range(8))
def test_observe_range_equals_observe_bar_by_bar(seed):
    rng = np.random.default_rng(seed)
    days = _random_sessions(rng, 12, 16_000)
    equities = _random_equity(rng, len(days), 100_000.0)
    one, many = manager(KILL), manager(KILL)
    i = 0
    while i < len(days):
        stop = min(len(days), i + int(rng.integers(1, 15)))
        for j in range(i, stop):
            one.observe(int(days[j]), float(equities[j]))
        many.observe_range(days[i:stop], equities[i:stop])
        assert _state(one) == _state(many), (seed, i, stop)
        # The same state answers the same: the kill switch on a probe bar of this or the next session.
        for probe_day in (int(days[stop - 1]), int(days[stop - 1]) + 1):
            probe = float(equities[stop - 1]) * 0.975
            a, b = copy.deepcopy(one).check_drawdown(probe_day, probe), copy.deepcopy(many).check_drawdown(
                probe_day, probe)
            assert a == b
        i = stop
    many.observe_range(days[:0], equities[:0])       # nothing: no change
    assert _state(one) == _state(many)


def _sequential_first_fire(risk: RiskManager, days, equities) -> int | None:
    risk = copy.deepcopy(risk)
    for i, (day, equity) in enumerate(zip(days, equities)):
        if risk.check_drawdown(int(day), float(equity)) is not None:
            return i
        risk.observe(int(day), float(equity))
    return None


@pytest.mark.parametrize("total_limit", [None, 0.04])
def test_first_drawdown_breach_equals_the_per_bar_kill_switch(total_limit):
    settings = {**KILL, "risk.daily_drawdown_limit": 0.01, "risk.max_drawdown_limit": total_limit}
    outcomes = {"none": 0, "first_bar": 0, "later": 0, "after_halted_session": 0, "max_drawdown": 0}
    for seed in range(120):
        rng = np.random.default_rng(1000 + seed)
        risk = manager(settings)
        # History: a few sessions recorded bar by bar (the kill switch checked as the engine does).
        history_days = _random_sessions(rng, int(rng.integers(1, 4)), 15_000)
        history = _random_equity(rng, len(history_days), 100_000.0, scale=0.002)
        for day, equity in zip(history_days, history):
            risk.check_drawdown(int(day), float(equity))
            risk.observe(int(day), float(equity))
        last_day = int(history_days[-1])
        mode = seed % 3
        if mode == 1 and not risk.halted_for_good and risk.halted_session != last_day:
            # The current session halted by the kill switch (a 1.5 % loss), the path continues in it.
            low = risk._session_open * 0.985
            assert risk.check_drawdown(last_day, low) is not None
            risk.observe(last_day, low)
        # Paths start mid-session (mode 0, 1) or at a new session (mode 2).
        first_day = last_day if mode in (0, 1) else last_day + int(rng.integers(1, 3))
        days = np.concatenate([np.full(int(rng.integers(1, 10)), first_day),
                               _random_sessions(rng, int(rng.integers(0, 6)), first_day)]).astype(np.int64)
        equities = _random_equity(rng, len(days), risk._last_equity, scale=0.004)
        before = _state(risk)
        got = risk.first_drawdown_breach(days, equities)
        assert _state(risk) == before                       # no state change
        expected = _sequential_first_fire(risk, days, equities)
        assert got == expected, (seed, got, expected)
        if expected is None:
            outcomes["none"] += 1
        else:
            outcomes["first_bar" if expected == 0 else "later"] += 1
            if risk.halted_session == first_day and days[expected] != first_day:
                outcomes["after_halted_session"] += 1
            kind = copy.deepcopy(risk)
            for day, equity in zip(days[:expected], equities[:expected]):
                kind.check_drawdown(int(day), float(equity))
                kind.observe(int(day), float(equity))
            if kind.check_drawdown(int(days[expected]), float(equities[expected])).kind == "max_drawdown":
                outcomes["max_drawdown"] += 1
    # The random paths covered every situation.
    assert outcomes["none"] >= 10 and outcomes["later"] >= 10 and outcomes["after_halted_session"] >= 3, outcomes
    if total_limit is not None:
        assert outcomes["max_drawdown"] >= 3, outcomes
    assert manager(settings).first_drawdown_breach(np.array([], dtype=np.int64), np.array([])) is None


# ------------------------------------------------------------------------------------------------
# delta hedge
# ------------------------------------------------------------------------------------------------

HEDGE = {"hedge.enable_hedge": True, "hedge.hedge_threshold": 0.1}


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.2, 0.25])
@pytest.mark.parametrize("contracts", [1, 2, 3, 5])
def test_hedge_only_beyond_the_threshold(threshold, contracts):
    risk = manager({**HEDGE, "hedge.hedge_threshold": threshold})
    bound = round(threshold * 100 * contracts, 9)           # share-equivalents
    for sign in (1.0, -1.0):
        assert risk.hedge_shares(sign * bound, contracts, 0) == 0
        assert risk.hedge_shares(sign * bound, contracts, 17) == 0
        assert risk.hedge_shares(sign * (bound - 0.3), contracts, 0) == 0
        beyond = sign * (bound + 1e-6)
        assert risk.hedge_shares(beyond, contracts, 0) == -round(beyond)
        for delta in (sign * (bound + 0.4), sign * (bound + 2.6), sign * (bound * 3 + 0.5)):
            shares = risk.hedge_shares(delta, contracts, 5)
            assert shares == -round(delta) and isinstance(shares, int)
            assert abs(delta + shares) <= 0.5              # back to neutral in whole shares


def test_hedge_unwinds_when_no_condor_is_open_and_does_nothing_when_off():
    risk = manager(HEDGE)
    assert risk.hedge_shares(37.0, 0, 37) == -37
    assert risk.hedge_shares(-12.0, 0, -12) == 12
    assert risk.hedge_shares(0.0, 0, 0) == 0
    off = manager({**HEDGE, "hedge.enable_hedge": False})
    assert not off.hedging
    assert off.hedge_shares(500.0, 1, 0) == 0 and off.hedge_shares(37.0, 0, 37) == 0
    assert off.first_hedge_trigger(np.array([500.0, 900.0]), 1, 0) is None
    assert off.first_hedge_trigger(np.array([37.0]), 0, 37) is None


@pytest.mark.parametrize("seed", range(6))
def test_first_hedge_trigger_equals_the_per_bar_hedge(seed):
    rng = np.random.default_rng(seed)
    risk = manager({**HEDGE, "hedge.hedge_threshold": float(rng.choice([0.05, 0.1, 0.2]))})
    found = {"none": 0, "hit": 0, "unwind": 0}
    for _ in range(150):
        contracts = int(rng.integers(0, 5))
        held = int(rng.integers(-30, 31)) if rng.random() < 0.6 else 0
        n = int(rng.integers(1, 60))
        scale = risk.hedge_threshold * 100 * max(contracts, 1)
        deltas = np.cumsum(rng.normal(0.0, scale * 0.15, size=n)) + rng.normal(0.0, scale * 0.3)
        if rng.random() < 0.1:
            deltas[rng.integers(0, n)] = np.nan           # a settled bar has no Greeks
        expected = next((i for i, d in enumerate(deltas) if risk.hedge_shares(float(d), contracts, held)), None)
        assert risk.first_hedge_trigger(deltas, contracts, held) == expected, (contracts, held, deltas)
        if expected is None:
            found["none"] += 1
        elif contracts == 0:
            found["unwind"] += 1
        else:
            found["hit"] += 1
    assert all(count >= 5 for count in found.values()), found
    assert risk.first_hedge_trigger(np.array([]), 2, 0) is None
