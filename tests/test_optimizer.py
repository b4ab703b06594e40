"""The optimizer (core/optimizer.py) without real backtests: the phased search on a constructed
objective (fake executors), resume after a crash, a study shared through a real PostgreSQL
server, walk-forward windows and the DSR/PBO plumbing.

Real backtests (leakage, trials equal standalone runs, the process pool, Ray) are in
tests/test_optimizer_backtests.py; the command line in tests/test_optimizer_cli.py.
"""
from __future__ import annotations

import concurrent.futures as futures
import threading
import zlib
from collections import Counter

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from core.optimizer import (
    INFEASIBLE,
    SEED_PHASES,
    Parameter,
    Phase,
    PhaseOutcome,
    SearchOutcome,
    SearchSpec,
    Study,
    TrialRecord,
    WalkForwardSpec,
    open_storage,
    overfitting_statistics,
    pack_returns,
    per_observation_sharpe,
    phased_search,
    sensitivity,
    unpack_returns,
    walk_forward_windows,
)
from postgres_server import postgres_url  # noqa: F401

CASH = 25_000.0
NY = "America/New_York"

# ------------------------------------------------------------------------------------------------
# A constructed objective: separable, so searching one phase at a time with the others fixed
# (whatever they are fixed at) finds the global optimum of the whole product grid.
# ------------------------------------------------------------------------------------------------

PHASE_A = Phase(1, "a", "A", (Parameter("exits.max_hold_days", (10, 14, 21, 30)),
                              Parameter("exits.profit_take_pct", (0.4, 0.5, 0.6))))
PHASE_B = Phase(2, "b", "B", (Parameter("strategy.wing_width_min", (5.0, 10.0)),
                              Parameter("strategy.use_skew_penalty", (True, False))))
PHASE_C = Phase(3, "c", "C", (Parameter("filters.iv_rank_min", (0.0, 10.0, 20.0, 30.0, 40.0)),))
DEFAULTS = {"exits.max_hold_days": 14, "exits.profit_take_pct": 0.5, "strategy.wing_width_min": 5.0,
            "strategy.use_skew_penalty": True, "filters.iv_rank_min": 0.0}
TERMS = {
    "exits.max_hold_days": {10: 0.0, 14: 50.0, 21: 120.0, 30: 80.0},
    "exits.profit_take_pct": {0.4: 10.0, 0.5: 0.0, 0.6: 40.0},
    "strategy.wing_width_min": {5.0: 0.0, 10.0: 25.0},
    "strategy.use_skew_penalty": {True: 30.0, False: 0.0},
    "filters.iv_rank_min": {0.0: 0.0, 10.0: 70.0, 20.0: 15.0, 30.0: 5.0, 40.0: -20.0},
}
ARGMAX = {"exits.max_hold_days": 21, "exits.profit_take_pct": 0.6, "strategy.wing_width_min": 10.0,
          "strategy.use_skew_penalty": True, "filters.iv_rank_min": 10.0}


def objective(overrides) -> float:
    settings = {**DEFAULTS, **overrides}
    return sum(TERMS[path][settings[path]] for path in TERMS)


def brute_force_argmax(phases) -> dict:
    """The optimum over the product of every phase's grid (no phasing)."""
    grids = [phase.grid() for phase in phases]
    best, best_value = None, -np.inf
    for combination in _product(grids):
        merged = {k: v for part in combination for k, v in part.items()}
        if objective(merged) > best_value:
            best, best_value = merged, objective(merged)
    return best


def _product(grids):
    if not grids:
        yield ()
        return
    for head in grids[0]:
        for tail in _product(grids[1:]):
            yield (head, *tail)


def returns_of(overrides, days: int = 60) -> np.ndarray:
    """Deterministic daily returns per parameter set (seeded by the set)."""
    key = repr(sorted({**DEFAULTS, **overrides}.items())).encode()
    return np.random.default_rng(zlib.crc32(key)).normal(0.0005, 0.01, days)


class Crash(Exception):
    """Stands in for the process dying in the middle of a phase."""


class FakeExecutor:
    """Duck-typed executor: the outcome is a known function of the overrides. ``trades(overrides)``
    gives the trade count (default 100); ``crash_after``: the submit after that many raises."""

    name = "fake"

    def __init__(self, workers: int = 1, trades=None, crash_after: int | None = None, delay: float = 0.0,
                 value=None):
        self.workers = workers
        self.value = value or objective
        self.trades = trades or (lambda overrides: 100)
        self.crash_after = crash_after
        self.delay = delay
        self.calls: list[dict] = []
        self.windows: list = []
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=workers) if delay else None

    def outcome(self, overrides) -> dict:
        if self.delay:
            threading.Event().wait(self.delay)
        profit = self.value(overrides)
        return {"metrics": {"net_profit": profit, "max_drawdown": -0.005 * CASH,
                            "trade_count": self.trades(overrides), "sharpe": profit / 100.0},
                "returns": returns_of(overrides), "seconds": 0.0, "error": None}

    def submit(self, overrides, window=None, with_equity=False) -> futures.Future:
        with self._lock:
            if self.crash_after is not None and len(self.calls) >= self.crash_after:
                raise Crash(f"crash at submit {len(self.calls) + 1}")
            self.calls.append(dict(overrides))
            self.windows.append(window)
        if self._pool is not None:
            return self._pool.submit(self.outcome, dict(overrides))
        future: futures.Future = futures.Future()
        future.set_result(self.outcome(overrides))
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def make_study(url: str, spec: SearchSpec, local: bool = True, name: str = "t") -> Study:
    return Study(open_storage(url), name, spec, local=local, cash=CASH)


def complete_trials(url: str, study_name: str) -> list:
    study = optuna.load_study(study_name=study_name, storage=url)
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


# ------------------------------------------------------------------------------------------------
# 1. the phased logic finds the known optimum
# ------------------------------------------------------------------------------------------------

def test_phased_search_finds_the_known_optimum_of_a_separable_objective(tmp_path):
    phases = (PHASE_A, PHASE_B, PHASE_C)
    assert brute_force_argmax(phases) == ARGMAX          # the constructed optimum is what we think
    spec = SearchSpec(phases=phases, sampler="grid", samples=None, min_trades=20, seed=7)
    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, spec)
    executor = FakeExecutor()
    try:
        outcome = phased_search(study, None, executor)
    finally:
        study.close()

    assert outcome.overrides == ARGMAX
    assert outcome.best.fitness == pytest.approx(objective(ARGMAX) / (0.01 * CASH))
    assert outcome.best.value == outcome.best.fitness
    # Every phase ran its whole grid once, in its own study.
    assert [len(p.trials) for p in outcome.phases] == [12, 4, 5]
    assert len(executor.calls) == 12 + 4 + 5
    for phase in phases:
        trials = complete_trials(url, f"t-full-p{phase.number}")
        assert sorted(params_key(t.params) for t in trials) == sorted(params_key(g) for g in phase.grid())
    # Each phase fixes the earlier phases' best: phase 1's trials carry only phase 1's settings,
    # phase 2's carry phase 1's best, phase 3's carry the best of 1 and 2.
    phase_a_best = {k: ARGMAX[k] for k in ("exits.max_hold_days", "exits.profit_take_pct")}
    phase_b_best = {k: ARGMAX[k] for k in ("strategy.wing_width_min", "strategy.use_skew_penalty")}
    first, second, third = executor.calls[:12], executor.calls[12:16], executor.calls[16:]
    assert all(set(call) == set(phase_a_best) for call in first)
    assert all(call == {**phase_a_best, **{k: call[k] for k in phase_b_best}} for call in second)
    assert all(call == {**phase_a_best, **phase_b_best, "filters.iv_rank_min": call["filters.iv_rank_min"]}
               for call in third)
    assert [p.best_params for p in outcome.phases] == [phase_a_best, phase_b_best, {"filters.iv_rank_min": 10.0}]
    assert executor.windows == [None] * len(executor.calls)


def test_phased_search_with_a_sampled_grid_keeps_to_the_sample(tmp_path):
    """--samples N: N distinct points of each phase's grid, the phase's choice the best of them."""
    spec = SearchSpec(phases=(PHASE_A, PHASE_C), samples=3, min_trades=20, seed=3)
    study = make_study(f"sqlite:///{tmp_path}/s.db", spec)
    executor = FakeExecutor()
    try:
        outcome = phased_search(study, None, executor)
    finally:
        study.close()
    assert [len(p.trials) for p in outcome.phases] == [3, 3]
    assert len(executor.calls) == 6
    base: dict = {}
    for result in outcome.phases:
        keys = [params_key(t.params) for t in result.trials]
        assert len(set(keys)) == 3
        for trial in result.trials:
            assert trial.value == pytest.approx(objective({**base, **trial.params}) / (0.01 * CASH))
        best = max(result.trials, key=lambda t: t.value)
        assert result.best_params == best.params
        base = {**base, **best.params}
    assert outcome.overrides == base
    assert all(set(call) == {"exits.max_hold_days", "exits.profit_take_pct", "filters.iv_rank_min"}
               for call in executor.calls[3:])


def test_infeasible_trials_lose_to_feasible_ones(tmp_path):
    """The global optimum trades too little: every feasible point beats it, and it is kept in
    the study with INFEASIBLE + its trade count (so it is not run again)."""
    optimum = {"exits.max_hold_days": 21, "exits.profit_take_pct": 0.6}
    thin = {"exits.max_hold_days": 21}       # every point with max_hold_days 21 trades 5 times

    def trades(overrides):
        return 5 if overrides["exits.max_hold_days"] == thin["exits.max_hold_days"] else 40

    spec = SearchSpec(phases=(PHASE_A,), min_trades=20)
    study = make_study(f"sqlite:///{tmp_path}/s.db", spec)
    try:
        outcome = phased_search(study, None, FakeExecutor(trades=trades))
    finally:
        study.close()
    # Without the trade minimum the optimum would be (21, 0.6); among feasible points it is (30, 0.6).
    assert brute_force_argmax((PHASE_A,)) == optimum
    assert outcome.overrides == {"exits.max_hold_days": 30, "exits.profit_take_pct": 0.6}
    infeasible = [t for t in outcome.trials if t.params["exits.max_hold_days"] == 21]
    assert len(infeasible) == 3
    assert all(t.fitness is None and t.value == INFEASIBLE + 5 for t in infeasible)
    feasible = [t for t in outcome.trials if t.fitness is not None]
    assert len(feasible) == 9 and min(t.value for t in feasible) > max(t.value for t in infeasible)


def test_when_nothing_is_feasible_the_most_trades_wins(tmp_path):
    spec = SearchSpec(phases=(PHASE_C,), min_trades=1000)
    study = make_study(f"sqlite:///{tmp_path}/s.db", spec)
    trades = {0.0: 3, 10.0: 1, 20.0: 7, 30.0: 2, 40.0: 0}
    try:
        outcome = phased_search(study, None, FakeExecutor(trades=lambda o: trades[o["filters.iv_rank_min"]]))
    finally:
        study.close()
    assert outcome.overrides == {"filters.iv_rank_min": 20.0}
    assert all(t.fitness is None for t in outcome.trials)


def test_returns_and_metrics_round_trip_through_the_study(tmp_path):
    values = np.random.default_rng(0).normal(0, 0.01, 1250)
    assert np.array_equal(unpack_returns(pack_returns(values)), values)
    assert len(pack_returns(values)) < 16_000
    spec = SearchSpec(phases=(PHASE_C,), min_trades=1)
    study = make_study(f"sqlite:///{tmp_path}/s.db", spec)
    executor = FakeExecutor()
    try:
        outcome = phased_search(study, None, executor)
    finally:
        study.close()
    for trial in outcome.trials:
        expected = executor.outcome(trial.params)
        assert np.array_equal(trial.returns, expected["returns"])
        assert trial.metrics == expected["metrics"]


def test_a_resume_with_other_search_settings_is_refused(tmp_path):
    from core.optimizer import OptimizerError

    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, SearchSpec(phases=(PHASE_C,), min_trades=1))
    try:
        phased_search(study, None, FakeExecutor())
    finally:
        study.close()
    other = make_study(url, SearchSpec(phases=(PHASE_C,), min_trades=2))
    try:
        with pytest.raises(OptimizerError, match="other search settings"):
            phased_search(other, None, FakeExecutor())
    finally:
        other.close()


def test_sensitivity_steps_one_grid_value_from_the_optimum():
    phases = (PHASE_A, PHASE_B, PHASE_C)
    spec = SearchSpec(phases=phases, min_trades=20)
    best_fitness = objective(ARGMAX) / (0.01 * CASH)
    table = sensitivity(ARGMAX, phases, None, FakeExecutor(), spec, CASH, best_fitness)
    expected = []
    for phase in phases:
        for parameter in phase.parameters:
            at = parameter.values.index(ARGMAX[parameter.path])
            expected += [(parameter.path, parameter.values[k]) for k in (at - 1, at + 1)
                         if 0 <= k < len(parameter.values)]
    assert list(zip(table["parameter"], table["value"])) == expected
    for row in table.itertuples():
        moved = {**ARGMAX, row.parameter: row.value}
        assert row.fitness == pytest.approx(objective(moved) / (0.01 * CASH))
        assert row.change == pytest.approx(row.fitness - best_fitness)
        assert row.change < 0                   # the optimum: every single step loses
        assert row.step == ("down" if parameter_index(row.parameter, row.value) < parameter_index(
            row.parameter, ARGMAX[row.parameter]) else "up")


def parameter_index(path, value) -> int:
    for phase in (PHASE_A, PHASE_B, PHASE_C):
        for parameter in phase.parameters:
            if parameter.path == path:
                return parameter.values.index(value)
    raise KeyError(path)


def test_tpe_sampler_searches_each_grid_s_range(tmp_path):
    phase = Phase(1, "a", "A", (Parameter("exits.profit_take_pct", (0.4, 0.95)),
                                Parameter("exits.max_hold_days", (10, 14, 30)),
                                Parameter("strategy.use_skew_penalty", (True, False))))

    def value(overrides):
        return (1000.0 - 4000.0 * (overrides["exits.profit_take_pct"] - 0.7) ** 2
                - (overrides["exits.max_hold_days"] - 20) ** 2 + 50.0 * overrides["strategy.use_skew_penalty"])

    spec = SearchSpec(phases=(phase,), sampler="tpe", trials=30, min_trades=20, seed=1)
    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, spec)
    executor = FakeExecutor(value=value)
    try:
        outcome = phased_search(study, None, executor)
    finally:
        study.close()
    assert len(outcome.trials) == 30 and len(executor.calls) == 30
    for trial in outcome.trials:
        assert 0.4 <= trial.params["exits.profit_take_pct"] <= 0.95
        assert isinstance(trial.params["exits.max_hold_days"], int) and 10 <= trial.params["exits.max_hold_days"] <= 30
        assert trial.params["strategy.use_skew_penalty"] in (True, False)
    # Between grid values, not only on them.
    assert len({t.params["exits.max_hold_days"] for t in outcome.trials}) > 3
    best = max(outcome.trials, key=lambda t: t.value)
    assert outcome.overrides == best.params
    assert best.params["strategy.use_skew_penalty"] is True
    assert abs(best.params["exits.profit_take_pct"] - 0.7) < 0.15
    # A resume asks for nothing more.
    again = make_study(url, spec)
    more = FakeExecutor(value=value)
    try:
        assert phased_search(again, None, more).overrides == outcome.overrides
    finally:
        again.close()
    assert more.calls == []


# ------------------------------------------------------------------------------------------------
# 2. a study killed mid-way resumes without repeating finished trials (unit level; the end-to-end
#    kill -9 of the command is in tests/test_optimizer_cli.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["grid", "tpe"])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_crashed_phase_resumes_without_repeating_finished_trials(tmp_path, workers, sampler):
    phase = Phase(1, "a", "A", (Parameter("exits.max_hold_days", (10, 14, 21, 30)),
                                Parameter("exits.loss_close_multiple", (1.0, 1.5, 2.0, 2.5, 3.0))))
    spec = SearchSpec(phases=(phase,), sampler=sampler, samples=12, trials=12, min_trades=20, seed=11)
    url = f"sqlite:///{tmp_path}/s.db"
    first = make_study(url, spec)
    def value(overrides):           # TPE samples between the grid's values
        return 100.0 * overrides["exits.max_hold_days"] - 50.0 * overrides["exits.loss_close_multiple"]

    crashing = FakeExecutor(workers=workers, crash_after=10, value=value)   # past the first batch in flight
    try:
        with pytest.raises(Crash):
            phased_search(first, None, crashing)
    finally:
        first.close()

    study = optuna.load_study(study_name="t-full-p1", storage=url)
    before = {t.number: (t.params, t.value, t.user_attrs["metrics"])
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    left_running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert 0 < len(before) < 12
    finished_before = {params_key(p) for p, _, _ in before.values()}
    # Submitted before the crash, its result never written.
    lost = {params_key(c) for c in crashing.calls} - finished_before
    if sampler == "grid":
        # The run folder's grid study writes a trial only once it is finished: nothing is left
        # running, and the points that were running are simply missing.
        assert not left_running
        assert lost, "the crash should cut off a submitted point"
    else:
        # Ask / tell: the asked trials stay running in the database until recovered.
        # (the one asked for the submit that crashed among them).
        assert left_running, "the crash should leave trials running in the database"
        running = {params_key(t.params) for t in left_running}
        assert lost <= running
        lost = running

    # A new process on the same storage (a new connection, a new Study).
    again = make_study(url, spec, local=True)
    resumed = FakeExecutor(workers=workers, value=value)
    try:
        outcome = phased_search(again, None, resumed)
    finally:
        again.close()

    complete = complete_trials(url, "t-full-p1")
    assert len(complete) == 12
    keys = [params_key(t.params) for t in complete]
    assert len(set(keys)) == 12, Counter(keys).most_common(2)
    after = {t.number: (t.params, t.value, t.user_attrs["metrics"]) for t in complete}
    for number, kept in before.items():
        assert after[number] == kept
    # The resumed executor was asked only for what was missing: no finished point again, the
    # points cut off (their results lost) run once more.
    assert len(resumed.calls) == 12 - len(before)
    assert not finished_before & {params_key(c) for c in resumed.calls}
    assert lost <= {params_key(c) for c in resumed.calls}
    states = Counter(t.state for t in optuna.load_study(study_name="t-full-p1", storage=url).get_trials())
    assert states[TrialState.RUNNING] == 0 and states[TrialState.FAIL] == len(left_running)
    assert states[TrialState.WAITING] == 0
    assert outcome.phases[0].reused == len(before)
    assert len(outcome.trials) == 12


def test_a_finished_study_reruns_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = SearchSpec(phases=(PHASE_A, PHASE_B), min_trades=1)
    first = make_study(url, spec)
    try:
        done = phased_search(first, None, FakeExecutor())
    finally:
        first.close()
    again = make_study(url, spec)
    executor = FakeExecutor()
    try:
        outcome = phased_search(again, None, executor)
    finally:
        again.close()
    assert executor.calls == []
    assert outcome.overrides == done.overrides
    assert [p.reused for p in outcome.phases] == [12, 4]


# ------------------------------------------------------------------------------------------------
# 6. a shared study on a real PostgreSQL server (two "machines")
# ------------------------------------------------------------------------------------------------

def test_two_machines_share_a_study_on_postgresql(postgres_url):  # noqa: F811
    spec = SearchSpec(phases=(PHASE_A, PHASE_B), min_trades=20, seed=5)
    machines = [make_study(postgres_url, spec, local=False, name="shared") for _ in range(2)]
    executors = [FakeExecutor(workers=2, delay=0.05) for _ in range(2)]
    results: list = [None, None]
    errors: list = []

    def work(index):
        try:
            results[index] = phased_search(machines[index], None, executors[index])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        for machine in machines:
            machine.close()
        for executor in executors:
            executor.close()
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    for phase in (PHASE_A, PHASE_B):
        complete = complete_trials(postgres_url, f"shared-full-p{phase.number}")
        keys = [params_key(t.params) for t in complete]
        assert Counter(keys) == Counter(params_key(g) for g in phase.grid()), "each grid point exactly once"
    # Both machines did part of the work and both chose the same (the true) optimum.
    assert all(executor.calls for executor in executors)
    assert len(executors[0].calls) + len(executors[1].calls) == 12 + 4
    assert results[0].overrides == results[1].overrides == {k: ARGMAX[k] for k in ARGMAX
                                                             if k != "filters.iv_rank_min"}


def test_a_second_machine_after_the_first_reruns_nothing(postgres_url):  # noqa: F811
    spec = SearchSpec(phases=(PHASE_C,), min_trades=20)
    first = make_study(postgres_url, spec, local=False, name="sequential")
    try:
        one = phased_search(first, None, FakeExecutor())
    finally:
        first.close()
    second = make_study(postgres_url, spec, local=False, name="sequential")
    executor = FakeExecutor()
    try:
        two = phased_search(second, None, executor)
    finally:
        second.close()
    assert executor.calls == []
    assert one.overrides == two.overrides == {"filters.iv_rank_min": 10.0}
    assert len(complete_trials(postgres_url, "sequential-full-p3")) == 5


# ------------------------------------------------------------------------------------------------
# 3. walk-forward windows
# ------------------------------------------------------------------------------------------------

def bar_times(start: str, end: str, per_day: int = 3) -> pd.DatetimeIndex:
    days = pd.bdate_range(start, end)
    times = [day + pd.Timedelta(hours=10) + pd.Timedelta(minutes=90 * k) for day in days for k in range(per_day)]
    return pd.DatetimeIndex(times).tz_localize(NY)


def sessions_of(times: pd.DatetimeIndex, window) -> pd.DatetimeIndex:
    part = times[window.start:window.stop]
    return pd.DatetimeIndex(pd.unique(part.tz_localize(None).normalize()))


@pytest.mark.parametrize("mode", ["rolling", "anchored"])
def test_walk_forward_windows_keep_out_of_sample_data_out_of_the_fit(mode):
    times = bar_times("2015-01-02", "2016-12-30")
    all_sessions = pd.DatetimeIndex(pd.unique(times.tz_localize(None).normalize()))
    pairs, note = walk_forward_windows(times, WalkForwardSpec(train_months=6, test_months=3, mode=mode), min_days=30)
    assert len(pairs) == 6                      # OOS from 2015-07-02 in 3-month steps to the end
    for k, (ins, oos) in enumerate(pairs):
        assert ins.index == oos.index == k and ins.label == f"IS {k + 1}" and oos.label == f"OOS {k + 1}"
        # The fit ends where the test starts: no bar in both, none skipped between them.
        assert ins.stop == oos.start and ins.start < ins.stop and oos.start < oos.stop
        fit = sessions_of(times, ins)
        test = sessions_of(times, oos)
        assert fit.max() < test.min()
        assert fit.intersection(test).empty
        # Windows are whole sessions, contiguous in the calendar of sessions.
        day = times.tz_localize(None).normalize()
        for start in (ins.start, oos.start):
            assert start == 0 or day[start] != day[start - 1]
        for window, days in ((ins, fit), (oos, test)):
            at = all_sessions.get_indexer(days)
            assert (np.diff(at) == 1).all()
            assert str(days[0].date()) == window.first_session and str(days[-1].date()) == window.last_session
        # Out-of-sample windows tile the test period one after another.
        if k:
            assert oos.start == pairs[k - 1][1].stop
        if mode == "anchored":
            assert ins.start == 0
        else:
            assert fit[0] >= all_sessions[0] + pd.DateOffset(months=3 * k)
            assert fit[0] < all_sessions[0] + pd.DateOffset(months=3 * k) + pd.Timedelta(days=5)
            assert fit[-1] < fit[0] + pd.DateOffset(months=6)
    assert pairs[0][0].start == 0 and pairs[0][0].first_session == "2015-01-02"
    assert pairs[0][1].first_session == "2015-07-02"
    if mode == "rolling":
        assert [p[0].first_session for p in pairs] == ["2015-01-02", "2015-04-02", "2015-07-02", "2015-10-02",
                                                      "2016-01-04", "2016-04-04"]
    # 2015-07-02 + 6 × 3 months = 2017-01-02 > the last session: every session is tested, no note.
    assert pairs[-1][1].stop == len(times)
    assert note is None


def test_walk_forward_leaves_out_a_short_tail_and_says_so():
    times = bar_times("2015-01-02", "2015-12-15")
    pairs, note = walk_forward_windows(times, WalkForwardSpec(train_months=6, test_months=3), min_days=30)
    # OOS 1: 2015-07-02 … 2015-10-01; the next would be 2015-10-02 … 2015-12-15 (75 days): kept.
    assert len(pairs) == 2
    assert pairs[-1][1].stop == len(times) and note is None
    pairs, note = walk_forward_windows(times, WalkForwardSpec(train_months=6, test_months=3), min_days=80)
    assert len(pairs) == 1
    assert pairs[0][1].last_session == "2015-10-01"
    assert note is not None and "2015-10-02" in note and "2015-12-15" in note and "80-day" in note
    untested = pd.DatetimeIndex(pd.unique(times[pairs[0][1].stop:].tz_localize(None).normalize()))
    assert f"the last {len(untested)} sessions" in note


# ------------------------------------------------------------------------------------------------
# 7. DSR / PBO plumbing
# ------------------------------------------------------------------------------------------------

def search_of(returns: list[np.ndarray]) -> SearchOutcome:
    """A one-phase search whose trials have these daily returns; each trial's value is its
    in-sample Sharpe ratio (so the best is the in-sample winner)."""
    phase = Phase(1, "x", "X", (Parameter("p.k", tuple(range(len(returns)))),))
    trials = [TrialRecord("full", 1, k, {"p.k": k}, per_observation_sharpe(r), per_observation_sharpe(r),
                          {"trade_count": 50}, r, 0.0) for k, r in enumerate(returns)]
    best = max(trials, key=lambda t: t.value)
    return SearchOutcome(None, {"p.k": best.params["p.k"]},
                         [PhaseOutcome(phase, best.params, best.value, best.fitness, trials)])


def test_overfitting_statistics_tell_noise_from_a_planted_edge():
    noise_pbo, noise_dsr = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        noise = [rng.normal(0.0, 0.01, 500) for _ in range(24)]
        planted = [r.copy() for r in noise]
        planted[7] = planted[7] + 0.004          # one configuration with a real edge every day

        by_noise = overfitting_statistics(search_of(noise))
        by_edge = overfitting_statistics(search_of(planted))
        for stats in (by_noise, by_edge):
            assert stats["n_trials"] == 24
            assert 0.0 <= stats["dsr"] <= 1.0
            assert 0.0 <= stats["pbo"] <= 1.0
            assert stats["pbo_splits"] == 16 and stats["pbo_combinations"] == 12870
            assert len(stats["pbo_logits"]) == 12870
            assert stats["observations"] == 500
        assert search_of(planted).best.params == {"p.k": 7}
        # The planted edge wins out of sample too, and survives the deflation.
        assert by_edge["pbo"] < 0.05
        assert by_edge["dsr"] > 0.99
        assert by_edge["sharpe_daily"] == pytest.approx(per_observation_sharpe(planted[7]))
        noise_pbo.append(by_noise["pbo"])
        noise_dsr.append(by_noise["dsr"])
    # Noise: the in-sample winner lands below the median out of sample about half the time
    # (PBO ~ 0.5), and its Sharpe ratio is no more than luck gives among 24 tries.
    assert min(noise_pbo) > 0.3 and 0.4 < np.mean(noise_pbo) < 0.7
    assert np.mean(noise_dsr) < 0.75


def test_overfitting_statistics_with_too_little_to_go_on():
    one = overfitting_statistics(search_of([np.random.default_rng(1).normal(0, 0.01, 100)]))
    assert one["n_trials"] == 1 and "note" in one and "pbo" not in one and "dsr" not in one
    empty = overfitting_statistics(SearchOutcome(None, {}))
    assert empty["n_trials"] == 0 and "note" in empty


# ------------------------------------------------------------------------------------------------
# a process killed in the middle of asking for a trial (its parameters partly or not yet written)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written", [0, 1])
@pytest.mark.parametrize("samples", [None, 6])
def test_a_trial_cut_off_while_being_asked_is_run_whole_on_resume(tmp_path, written, samples):
    phase = Phase(1, "a", "A", (Parameter("exits.max_hold_days", (10, 14, 21)),
                                Parameter("exits.profit_take_pct", (0.4, 0.5, 0.6))))
    spec = SearchSpec(phases=(phase,), samples=samples, min_trades=20, seed=9)
    url = f"sqlite:///{tmp_path}/s.db"
    first = make_study(url, spec)
    try:
        executor = FakeExecutor(crash_after=2)
        with pytest.raises(Crash):
            phased_search(first, None, executor)
        # The next trial is created and given its grid point, then the process dies after
        # writing `written` of its two parameters.
        study = first.open(None, phase)
        cut = study.ask()
        for parameter in phase.parameters[:written]:
            cut.suggest_categorical(parameter.path, list(parameter.values))
    finally:
        first.close()
    grid_id = optuna.load_study(study_name="t-full-p1", storage=url).trials[cut.number].system_attrs["grid_id"]

    again = make_study(url, spec)
    resumed = FakeExecutor()
    try:
        outcome = phased_search(again, None, resumed)
    finally:
        again.close()
    target = phase.grid_size if samples is None else samples
    complete = complete_trials(url, "t-full-p1")
    keys = [params_key(t.params) for t in complete]
    assert len(complete) == target and len(set(keys)) == target, Counter(keys).most_common(2)
    if samples is None:
        assert set(keys) == {params_key(g) for g in phase.grid()}
    # The cut-off trial's grid point ran (whole) exactly once.
    again_for_cut = [t for t in complete if t.system_attrs.get("grid_id") == grid_id]
    assert len(again_for_cut) == 1
    assert set(again_for_cut[0].params) == {p.path for p in phase.parameters}
    assert outcome.overrides == max(complete, key=lambda t: (t.value, -t.number)).params


def test_a_phase_whose_trials_all_tie_is_named():
    from core.optimizer_report import flat_phases

    def record(number, value):
        return TrialRecord("full", 6, number, {"fuzzy.fuzzy_weight_rsi": 0.05 * number}, value, value,
                           {"trade_count": 30}, np.zeros(3), 0.0)

    phases = SEED_PHASES
    tied = PhaseOutcome(phases[5], {}, 0.4, 0.4, [record(n, 0.4) for n in range(3)])
    moving = PhaseOutcome(phases[0], {}, 0.5, 0.5, [record(0, 0.4), record(1, 0.5)])
    notes = flat_phases({"searches": [SearchOutcome(None, {}, [moving, tied])]})
    assert len(notes) == 1 and "phase 6" in notes[0] and "all 3 trials" in notes[0]


def test_the_process_pool_sends_a_trial_where_its_affinity_was_seen_unless_that_leaves_a_worker_waiting():
    from core.optimizer import ProcessExecutor

    pool = ProcessExecutor(2)                 # no process starts before a submit
    try:
        pool._seen[1].add("structure A")
        pool._busy[:] = [1, 2]
        assert pool._choose("structure A") == 1          # one more waiting than the least busy: worth it
        assert pool._choose("structure B") == 0          # new: the least busy worker
        pool._busy[:] = [1, 3]
        assert pool._choose("structure A") == 0          # two more waiting: not worth it
        pool._busy[:] = [0, 1]
        assert pool._choose("structure A") == 0          # never leave a worker idle
        pool._seen[0].add("structure A")
        pool._busy[:] = [2, 2]
        assert pool._choose("structure A") == 0          # both know it: the first least busy
        pool._busy[:] = [3, 2]
        assert pool._choose("structure A") == 1
    finally:
        pool.close()
