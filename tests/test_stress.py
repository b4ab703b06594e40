"""The stress test runner: market shocks move the market as stated, the historical windows load
the stated sessions, bad input stops with exit 2 and no folder, and one small end-to-end run
writes its table and HTML."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analytics.black_scholes import bsm_scalar
from core.config import Config
from core.main import main
from core.stress import (WINDOWS, StressJob, no_trade_reason, parameter_jobs, parameter_label, path_risk,
                         rich_tables, stress_html, stress_table, tornado_data)
from data_factory.option_chain import SyntheticChainProvider
from data_factory.shocks import ShockedMarket, ShockError, parse_shock, shocked_market

SHOCK_DAY = pd.Timestamp("2015-08-24")


@pytest.fixture(scope="module")
def provider():
    return SyntheticChainProvider.from_embedded(start="2015-08-10", end="2015-09-11", seed=7)


def _session_bars(provider, day) -> np.ndarray:
    return np.flatnonzero(provider.bar_times.tz_localize(None).normalize() == pd.Timestamp(day))


def test_iv_shock_doubles_every_quote_iv_at_the_shocked_bars_only(provider):
    market = shocked_market(provider, parse_shock("iv2"), [SHOCK_DAY], sessions_long=3)
    days = provider.bar_times.tz_localize(None).normalize()
    inside = (days >= SHOCK_DAY) & (days <= pd.Timestamp("2015-08-26"))
    assert np.array_equal(np.flatnonzero(inside), np.flatnonzero(market.iv_scale != 1.0))
    assert np.array_equal(market.iv_index_bars().to_numpy()[inside], 2 * provider.iv_index_bars().to_numpy()[inside])
    assert np.array_equal(market.iv_index_bars().to_numpy()[~inside], provider.iv_index_bars().to_numpy()[~inside])
    for bar in (_session_bars(provider, SHOCK_DAY)[0], _session_bars(provider, "2015-08-26")[-1]):
        base, shocked = provider.slice_at(bar, 20, 60), market.slice_at(bar, 20, 60)
        assert len(base) > 100 and np.array_equal(base.strike, shocked.strike)
        np.testing.assert_allclose(shocked.iv, 2 * base.iv, rtol=1e-12)
        # Prices follow from the shocked IV: Black-Scholes at the bar's spot with 2σ.
        row = len(base) // 3
        price = bsm_scalar(base.spot, base.strike[row], base.t_years[row], base.rate, base.dividend_yield,
                           2 * base.iv[row], bool(base.is_call[row]))[0]
        assert shocked.theo[row] == pytest.approx(price, rel=1e-12)
        assert (shocked.theo > base.theo).all() and (shocked.ask >= shocked.bid).all()
    for day in ("2015-08-21", "2015-08-27"):
        bar = _session_bars(provider, day)[10]
        base, shocked = provider.slice_at(bar, 20, 60), market.slice_at(bar, 20, 60)
        assert np.array_equal(base.iv, shocked.iv) and np.array_equal(base.mid, shocked.mid)
    # A held position's path across the shock: changed inside it, bitwise the same outside.
    first, last = _session_bars(provider, "2015-08-21")[0], _session_bars(provider, "2015-08-27")[-1] + 1
    expiry = provider.expirations_at(first, 30, 60)[0]
    strikes, is_call = np.array([180.0, 190.0, 215.0, 225.0]), np.array([False, False, True, True])
    base = provider.quote_contracts(first, last, expiry, strikes, is_call)
    shocked = market.quote_contracts(first, last, expiry, strikes, is_call)
    window = inside[first:last]
    assert np.array_equal(base.mid[~window], shocked.mid[~window])
    assert (shocked.mid[window] > base.mid[window]).all()
    structure = market.quote_structures(first + int(np.argmax(window)), np.array([expiry]), strikes[None, :])
    assert np.allclose(structure.mid[0], shocked.mid[int(np.argmax(window))])


def test_gap_moves_spot_and_chain_from_the_gap_session_on(provider):
    market = shocked_market(provider, parse_shock("gap5"), [SHOCK_DAY])
    days = provider.bar_times.tz_localize(None).normalize()
    after = days >= SHOCK_DAY
    base_spot, spot = provider.spot_bars().to_numpy(), market.spot_bars().to_numpy()
    assert np.array_equal(spot[~after], base_spot[~after])
    np.testing.assert_allclose(spot[after] / base_spot[after], 0.95, rtol=1e-14)
    first = int(np.argmax(after))
    # The gap is overnight: the session's first bar against the previous close moves by the gap.
    assert spot[first] / spot[first - 1] == pytest.approx(0.95 * base_spot[first] / base_spot[first - 1], rel=1e-12)
    ohlcv = market.ohlcv_bars()
    np.testing.assert_allclose(ohlcv["open"].to_numpy()[after], 0.95 * provider.ohlcv_bars()["open"].to_numpy()[after])
    # The chain is priced from the moved spot, the smile moving with it (sticky moneyness):
    # the quote at K equals 0.95 × the unshocked quote at K / 0.95, at the same IV.
    unshocked = ShockedMarket(provider, np.ones(len(days)), np.ones(len(days)))
    bar = first + 40
    expiry = provider.expirations_at(bar, 30, 60)[0]
    row = provider.expiry_row(expiry)
    strikes = np.array([170.0, 185.0, 200.0, 215.0])
    calls = np.array([False, False, True, True])
    gapped = market._quote(np.full(4, bar), np.full(4, row), strikes, calls)
    plain = unshocked._quote(np.full(4, bar), np.full(4, row), strikes / 0.95, calls)
    np.testing.assert_allclose(gapped[3], 0.95 * plain[3], rtol=1e-10)     # theo
    np.testing.assert_allclose(gapped[4], plain[4], rtol=1e-12)            # iv
    chain = market.slice_at(bar, 20, 60)
    assert chain.spot == pytest.approx(0.95 * provider.slice_at(bar, 20, 60).spot)
    assert chain.strike.min() <= 0.76 * chain.spot and chain.strike.max() >= 1.24 * chain.spot


def test_volvol_raises_the_dispersion_of_iv_changes_in_the_window_only(provider):
    market = shocked_market(provider, parse_shock("volvol3"), [SHOCK_DAY], sessions_long=5, seed=3)
    days = provider.bar_times.tz_localize(None).normalize()
    inside = np.flatnonzero(market.iv_scale != 1.0)
    assert days[inside[0]] == SHOCK_DAY and days[inside[-1]] == pd.Timestamp("2015-08-28")
    base = np.diff(np.log(provider.iv_index_bars().to_numpy()))
    shocked = np.diff(np.log(market.iv_index_bars().to_numpy()))
    window = np.zeros(len(base), dtype=bool)
    window[inside[0] - 1:inside[-1] + 1] = True          # the changes into, inside and out of it
    assert np.array_equal(base[~window], shocked[~window])
    ratio = shocked[window].std() / base[window].std()
    assert 2.4 < ratio < 3.6
    # Spot is untouched and the quotes scale with the multiplier.
    assert np.array_equal(market.spot_bars().to_numpy(), provider.spot_bars().to_numpy())
    bar = inside[len(inside) // 2]
    np.testing.assert_allclose(market.slice_at(bar, 20, 60).iv, market.iv_scale[bar] * provider.slice_at(bar, 20, 60).iv,
                               rtol=1e-12)


def test_shock_names_and_sizes():
    assert parse_shock("iv1.5").size == 1.5 and parse_shock("gap10").size == 10.0
    assert parse_shock("volvol").size == 3.0
    for bad, words in (("iv0", "greater than 0"), ("gap-5", "greater than 0"), ("gap100", "less than 100"),
                       ("crash", "unknown shock"), ("iv", "give the size"), ("volvol0.5", "greater than 1")):
        with pytest.raises(ShockError, match=words):
            parse_shock(bad)


@pytest.mark.parametrize("name", list(WINDOWS))
def test_each_historical_window_loads_its_stated_sessions(name):
    from core.market_data import embedded_chain_provider

    window = WINDOWS[name]
    config = Config().override({"backtest.start": window.start, "backtest.end": window.end})
    market = embedded_chain_provider(config)
    expected = {"2000-2002": ("2001-01-02", "2002-12-31"), "2008": ("2008-01-02", "2008-12-31"),
                "aug2015": ("2015-08-03", "2015-10-30"), "feb2018": ("2018-01-22", "2018-04-30"),
                "q4-2018": ("2018-10-01", "2018-12-31")}[name]
    assert (str(market.sessions[0].date()), str(market.sessions[-1].date())) == expected
    source = market.describe()["source"]["iv_source_counts"]
    assert set(source) == ({"garch_proxy"} if name in ("2000-2002", "2008") else {"vix"})
    assert ("GARCH" in window.note) == (name in ("2000-2002", "2008"))


def test_path_risk_worst_day_week_drawdown_and_recovery():
    risk = path_risk([100, 90, 95, 99, 101, 102, 80], 100)
    assert risk["worst_day_pct"] == pytest.approx(100 * (80 / 102 - 1))
    assert risk["max_drawdown_pct"] == pytest.approx(100 * (80 / 102 - 1))
    assert risk["recovery_sessions"] is None                      # never back to 102
    risk = path_risk([100, 90, 95, 101, 99], 100)
    assert risk["max_drawdown_pct"] == pytest.approx(-10.0)
    assert risk["recovery_sessions"] == 2 and risk["drawdown_sessions"] == 1
    assert risk["worst_week_pct"] == pytest.approx(-1.0)          # 100 → 99 over the 5 sessions


def test_parameter_shocks_move_one_parameter_one_grid_step():
    from core.optimizer import SEED_PHASES

    config = Config()
    jobs = parameter_jobs(config)
    grids = {p.path: list(p.values) for phase in SEED_PHASES for p in phase.parameters}
    assert {path for job in jobs for path in job.overrides} == set(grids)
    for job in jobs:
        (path, value), = job.overrides.items()
        section, name = path.split(".")
        current = getattr(getattr(config, section), name)
        values = grids[path]
        at = values.index(current) if current in values else None
        if at is not None:
            assert values.index(value) in (at - 1, at + 1)
    profit = [job.overrides["exits.profit_take_pct"] for job in jobs if "exits.profit_take_pct" in job.overrides]
    assert profit == [0.50]                # the baseline 0.40 is the grid's first value: only one step up


@pytest.mark.parametrize("flags, words", [
    (["--shocks", "iv2,crash"], "unknown shock"),
    (["--shocks", "iv0"], "must be greater than 0"),
    (["--shocks", "gap-5"], "must be greater than 0"),
    (["--windows", "2008,covid"], "unknown window"),
    (["--windows", "1995"], "outside the data"),
    (["--windows", "2018-06-01:2019-03-01"], "outside the data"),
    (["--shock-dates", "2015-08-22"], "not an NYSE session"),
    (["--shock-dates", "2012-05-01"], "outside the backtest period"),
])
def test_bad_input_exits_2_without_a_folder(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    code = main(["--mode", "stress", "--bt-start", "2015-08-03", "--bt-end", "2015-09-30", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_stress_flags_are_refused_outside_stress_mode(tmp_path, capsys):
    assert main(["--shocks", "iv2", "--out", str(tmp_path / "x")]) == 2
    assert "stress-mode flag" in capsys.readouterr().err


def test_small_stress_run_writes_its_table_and_html(tmp_path):
    out = tmp_path / "stress"
    code = main(["--mode", "stress", "--bt-start", "2015-08-03", "--bt-end", "2015-09-30", "--windows", "aug2015",
                 "--shocks", "iv2,gap10", "--shock-dates", "2015-08-19", "--workers", "2", "--out", str(out)])
    assert code == 0
    assert {"stress.csv", "stress.html", "stress.json", "config.yaml", "tornado.png", "market_shocks.png",
            "windows.png"} <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "stress.csv")
    assert list(table["group"].value_counts().sort_index().items()) == [
        ("baseline", 1), ("market", 2), ("parameter", len(parameter_jobs(Config()))), ("window", 1)]
    assert table["error"].isna().all()
    window = table[table["group"] == "window"].iloc[0]
    assert (window["first_session"], window["last_session"]) == ("2015-08-03", "2015-10-30")
    # SPY fell ~11 % peak to trough in the window (S&P 500 / 10, closes).
    assert -13 < window["spy_max_drawdown_pct"] < -9 and window["spy_worst_day_pct"] < -3
    baseline = table[table["group"] == "baseline"].iloc[0]
    gap = table[table["scenario"] == "gap10"].iloc[0]
    assert gap["return_pct"] != baseline["return_pct"]            # positions were open into the gap
    assert gap["return_change_pct"] == pytest.approx(gap["return_pct"] - baseline["return_pct"])
    # risk.max_account_risk_per_trade 0.02 → 0.01: $250 buys no condor. No trade is no change:
    # the Δ columns are blank and the reason is the worker's (a second run for the refusals).
    starved = table[table["scenario"] == "risk.max_account_risk_per_trade down"].iloc[0]
    assert starved["trades"] == 0 and starved["return_pct"] == 0.0
    assert np.isnan(starved["return_change_pct"]) and np.isnan(starved["fitness_change"])
    assert starved["no_trade_reason"] == "risk_budget" and "sized to 0 contracts" in starved["note"]
    assert table.loc[table["trades"] > 0, "no_trade_reason"].isna().all()
    page = (out / "stress.html").read_text()
    assert "gap10" in page and ">aug2015<" in page and "data:image/png;base64" in page
    assert "no trades: one condor&#x27;s max loss exceeds the per-trade risk budget" in page


# ----------------------------------------------------------------------------------------------
# Display: the terminal at 80 columns, stress.html, the no-trade rows and the tornado
# ----------------------------------------------------------------------------------------------

def _figures(trades, ret, drawdown, day=-1.0, week=-1.5, fit=None, **extra):
    return {"error": None, "trades": trades, "sessions": 1258, "return_pct": ret, "max_drawdown_pct": drawdown,
            "worst_day_pct": day, "worst_week_pct": week, "recovery_sessions": None,
            "fitness": (ret / abs(drawdown) if trades else None) if fit is None else fit, "seconds": 1.0, **extra}


@pytest.fixture(scope="module")
def display_table():
    """A stress table as a full default run makes it (the real parameter steps, made-up figures):
    a baseline losing 18.57 %, five windows, two shocks, every parameter step ranked by a
    distinct Δ return, and the two steps that made no trade."""
    jobs = [StressJob("baseline", "baseline", detail="the configuration as given")]
    results = [_figures(351, -18.57, -18.83)]
    windows = (("2000-2002", "2001-01-02", "2002-12-31", 501, 0.68, -0.86, -33.36, -43.46, -4.92),
               ("2008", "2008-01-02", "2008-12-31", 253, 0.27, -0.58, -38.49, -48.76, -9.03),
               ("q4-2018", "2018-10-01", "2018-12-31", 63, -2.76, -2.79, -13.97, -19.63, -3.29))
    for name, first, last, sessions, ret, drawdown, spy_ret, spy_dd, spy_day in windows:
        jobs.append(StressJob("window", f"window {name}", window=WINDOWS[name], detail=WINDOWS[name].note))
        results.append(_figures(12, ret, drawdown, first_session=first, last_session=last, sessions=sessions,
                                spy_return_pct=spy_ret, spy_max_drawdown_pct=spy_dd, spy_worst_day_pct=spy_day,
                                spy_worst_week_pct=-11.6, spy_recovery_sessions=None, recovery_sessions=218))
    from data_factory.shocks import parse_shock
    for name, ret in (("iv2", -19.80), ("gap10", -18.42)):
        jobs.append(StressJob("market", name, shock=parse_shock(name), detail=parse_shock(name).describe()))
        results.append(_figures(347, ret, ret - 0.26, day=-3.96))
    steps = parameter_jobs(Config())
    for i, job in enumerate(steps):
        jobs.append(job)
        if job.name in ("risk.max_account_risk_per_trade down", "strategy.wing_width_min up"):
            results.append(_figures(0, 0.0, 0.0, day=0.0, week=0.0, no_trade_reason="risk_budget",
                                    note="no trade: every candidate was sized to 0 contracts (1,199 times; 1,199 by "
                                         "risk_budget): raise --max-account-risk"))
        else:                                   # Δ return −2.00, +1.95, −1.90, … pp: a distinct rank each
            change = (2.0 - 0.05 * i) * (-1) ** (i + 1) if i < 30 else 0.0
            results.append(_figures(340 + i, -18.57 + change, -18.83 + change / 2, fit=-0.98 + change / 1000))
    return stress_table(jobs, results, [pd.Timestamp("2017-04-10")])


def test_no_trade_steps_are_not_changes(display_table):
    no_trade = display_table[display_table["trades"] == 0]
    assert set(no_trade["scenario"]) == {"risk.max_account_risk_per_trade down", "strategy.wing_width_min up"}
    # Flat equity is not an 18.57 pp improvement on the losing baseline: every Δ is blank.
    assert no_trade[["return_change_pct", "max_drawdown_change_pct", "fitness_change"]].isna().all().all()
    assert (no_trade["return_pct"] == 0.0).all() and (no_trade["no_trade_reason"] == "risk_budget").all()
    traded = display_table[(display_table["group"] == "parameter") & (display_table["trades"] > 0)]
    assert traded["return_change_pct"].notna().all()
    np.testing.assert_allclose(traded["max_drawdown_change_pct"], traded["return_change_pct"] / 2, atol=1e-9)
    rows, moved, still, silent = tornado_data(display_table)
    assert set(silent) == {"max_account_risk_per_trade 0.02→0.01", "wing_width_min 5→10"}
    assert (rows["trades"] > 0).all() and len(rows) == len(traded)
    # The largest swing on top (the last drawn), and a parameter whose every step changed nothing
    # is named apart, not drawn.
    swing = rows.groupby("parameter")["return_change_pct"].apply(lambda s: s.abs().max())
    assert moved == list(swing[swing > 0].sort_values().index)
    assert set(still) == set(swing[swing == 0].index) and not set(still) & set(moved)
    assert "risk.max_account_risk_per_trade" not in still


def test_no_trade_reason_names_the_sizing_rule_or_the_most_frequent_refusal():
    refusals = {"adx_trending": 10252, "risk_budget": 1199, "credit_below_minimum": 194}
    assert no_trade_reason({"entry_rejections": refusals, "sizing_note": "no trade: every candidate was sized to 0 "
                            "contracts"}) == ("risk_budget", "no trade: every candidate was sized to 0 contracts")
    key, text = no_trade_reason({"entry_rejections": {"adx_trending": 9, "vix_above_max": 3}})
    assert key == "adx_trending" and "adx_trending (9 bars)" in text
    assert no_trade_reason({}) == ("", "no trade")


def test_terminal_tables_fit_80_columns_untruncated(display_table):
    import io

    from rich.console import Console

    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    for shown in rich_tables(display_table):
        console.print(shown)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    body = text.replace("… 29 more in stress.csv / stress.html", "")
    assert "…" not in body and "..." not in body                 # no cell cut short
    # Historical windows: a session count, the strategy beside SPY, each figure on its row.
    row = next(line for line in lines if line.lstrip().startswith("2008 "))
    assert row.split() == ["2008", "253", "+0.27%", "-0.58%", "-1.00%", "-38.49%", "-48.76%", "-9.03%"]
    assert "2000-2002" in text and "q4-2018" in text and "2008-01-02" not in text
    # Market shocks: Δ return vs the baseline in pp.
    row = next(line for line in lines if line.lstrip().startswith("gap10 "))
    assert row.split() == ["gap10", "347", "-18.42%", "+0.15", "pp", "-18.68%", "-3.96%"]
    # Parameter shocks: the 10 largest |Δ return| in order, readable names; the no-trade steps
    # marked, with their reason; the rest counted.
    ranked = [line.split()[0] for line in lines if " pp" in line and line.split()[0] not in ("iv2", "gap10")]
    steps = parameter_jobs(Config())
    no_trade = ("risk.max_account_risk_per_trade down", "strategy.wing_width_min up")
    assert len(ranked) == 10
    assert "target_short_delta_high 0.25→0.3" in text
    assert steps[0].name == "exits.profit_take_pct up" and ranked[0] == "profit_take_pct"
    first = next(line for line in lines if line.lstrip().startswith("profit_take_pct 0.4→0.5"))
    assert first.split()[2:] == ["340", "-20.57%", "-2.00", "pp", "-1.00", "pp"]
    assert [name for name in ranked] == [parameter_label({"scenario": job.name, "detail": job.detail}).split()[0]
                                         for job in steps if job.name not in no_trade][:10]
    for label in ("max_account_risk_per_trade 0.02→0.01", "wing_width_min 5→10"):
        row = next(line for line in lines if line.lstrip().startswith(label))
        assert row.split()[-4:] == ["0", "0.00%", "no", "trades"] and " pp" not in row
    assert "one condor's max loss exceeds the per-trade risk budget" in " ".join(text.split())
    assert "… 29 more in stress.csv / stress.html" in text


def test_html_sections_sorted_and_every_header_defined(display_table):
    import re

    info = {"command": "python core/main.py --mode stress", "runs": len(display_table), "wall_seconds": 40.0,
            "workers": 2, "engine": "fast", "period": ["2014-01-02", "2018-12-31"], "seed": 42,
            "shock_dates": ["2017-04-10"], "shock_sessions": 5, "synthetic": "option chains are SYNTHETIC"}
    page = stress_html(display_table, {"Parameter shocks (tornado)": b"png"}, info)
    order = [page.index(f"<h2>{title}</h2>") for title in ("Historical windows vs SPY", "Market shocks",
                                                            "Parameter sensitivity", "Charts")]
    assert order == sorted(order)
    assert page.count("<table") == 3 and page.count("<div class='scroll'>") == 3
    headers = re.findall(r"<th(?:\s[^>]*)?>", page)
    assert len(headers) > 30 and all("title=" in th for th in headers)
    assert "net profit / |max drawdown|" in page and "worst 5-session return" in page
    # The windows' IV note is a footnote and a hover title, not a cell of its own.
    windows = page[page.index("<h2>Historical windows"):page.index("<h2>Market shocks")]
    assert windows.count("GARCH(1,1) proxy") == 4                   # 2 footnotes, 2 titles
    assert "-48.76%" in windows and "-38.49%" in windows
    # Parameter sensitivity: the no-trade steps first, marked, then by |Δ return|, largest first.
    params = page[page.index("<h2>Parameter sensitivity"):page.index("<h2>Charts")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", params)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert [c[1] for c in cells[:2]] == ["risk.max_account_risk_per_trade", "strategy.wing_width_min"]
    assert all("no trades" in c[4] and "pp" not in "".join(c) for c in cells[:2])
    changes = [abs(float(c[5].split()[0])) for c in cells[2:]]
    assert changes == sorted(changes, reverse=True) and changes[0] == 2.0
    assert "+18.57 pp" not in page
