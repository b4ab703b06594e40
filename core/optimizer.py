"""The seed's 6-phase serial optimizer: grids, the Optuna study, the trial executors, walk-forward
windows and the overfitting statistics. The run folder it writes is ``core.optimizer_report``'s.

Phases run in the seed's order (exits & risk; structure & entries; filters & regime; momentum;
trend & volatility; fuzzy weights); each searches its own parameters with the best values of the
phases before it fixed. Every trial is ``core.backtest_engine.run_backtest`` of one configuration
on the run's market (or a walk-forward window of it): the same function a user's backtest calls,
so a trial's metrics equal a standalone run's.

Why Optuna and not a loop of our own: its GridSampler walks the seed's grids in a seeded random
order (so ``--samples N`` is a fair sample), its TPE sampler does the wider search, and its
RDB storage (SQLite in the run folder, or any URL such as PostgreSQL) makes a study resumable and
shareable between machines, with heartbeats to recover trials of a machine that died.

Shared work: the market, μ_Mamba and the feature tables are built once in the parent and
inherited by the process pool's workers (fork); Ray gets the market and μ_Mamba through its object
store once and each Ray worker builds its feature tables once. A trial that changes only the fuzzy
weights re-blends the cached table (``core.market_data.bar_features``); entry candidates, chain
slices and quote paths are kept per worker (``candidate_memo``, ``core.market.MarketMemo``).

Usage: ``python core/optimizer.py --samples 100`` or ``python core/main.py --mode optimize …``
(see ``add_arguments`` for every flag).
"""
from __future__ import annotations

import base64
import concurrent.futures as futures
import json
import math
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import sys
from pathlib import Path

# `python core/optimizer.py` puts core/ on sys.path, not the project root.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(_PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(_PROJECT_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.config import Config, ConfigError  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The seed's grids ("Optimizable Parameter Reference (6-Phase Matrix)")
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One tunable setting (dotted config path) and its grid values, in order."""

    path: str
    values: tuple

    @property
    def name(self) -> str:
        return self.path.split(".")[-1]


@dataclass(frozen=True)
class Phase:
    number: int
    key: str
    title: str
    parameters: tuple[Parameter, ...]

    @property
    def grid_size(self) -> int:
        return math.prod(len(parameter.values) for parameter in self.parameters)

    def grid(self) -> list[dict]:
        """Every combination as {path: value}, in the order of the parameters' values."""
        paths = [parameter.path for parameter in self.parameters]
        return [dict(zip(paths, values)) for values in product(*(p.values for p in self.parameters))]


def _p(path: str, *values) -> Parameter:
    return Parameter(path, tuple(values))


# Phase 1's profit take: the seed says "0.40 - 0.95 (Step 0.1)"; the steps from 0.40 end at 0.90,
# so the range's stated end 0.95 is added as the last value.
SEED_PHASES: tuple[Phase, ...] = (
    Phase(1, "exits_risk", "Exits & Risk", (
        _p("exits.profit_take_pct", 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95),
        _p("exits.loss_close_multiple", 1.0, 1.5, 2.0, 2.5, 3.0),
        _p("exits.max_hold_days", 10, 14, 21, 30),
        _p("risk.max_account_risk_per_trade", 0.01, 0.02, 0.03),
    )),
    Phase(2, "structure_entries", "Structure & Entries", (
        _p("strategy.target_short_delta_low", 0.10, 0.12, 0.15),
        _p("strategy.target_short_delta_high", 0.20, 0.25, 0.30),
        _p("strategy.wing_width_min", 5.0, 10.0),
        _p("strategy.min_credit_to_width", 0.10, 0.15, 0.20),
        _p("strategy.use_skew_penalty", True, False),
    )),
    Phase(3, "filters_regime", "Filters & Regime", (
        _p("filters.iv_rank_min", 0.0, 10.0, 20.0, 30.0),
        _p("filters.vix_threshold", 25.0, 30.0, 40.0),
        _p("filters.vix_threshold_low", 15.0, 18.0, 20.0),
        _p("filters.max_volatility_pct", 0.02, 0.03, 0.04),
    )),
    Phase(4, "momentum", "Momentum (RSI, Stochastic, ADX)", (
        _p("momentum.rsi_neutral_min", 30.0, 40.0),
        _p("momentum.rsi_neutral_max", 60.0, 70.0),
        _p("momentum.stoch_neutral_min", 20.0, 30.0),
        _p("momentum.stoch_neutral_max", 70.0, 80.0),
        _p("momentum.adx_threshold_low", 20.0, 25.0, 30.0),
        _p("momentum.use_adx_filter", True, False),
    )),
    Phase(5, "trend_volatility", "Trend & Volatility (BBands, SMA, PSAR)", (
        _p("trend.bbands_squeeze_threshold", 0.01, 0.02, 0.03),
        _p("trend.sma_max_distance", 0.01, 0.02, 0.03, 0.04),
        _p("trend.psar_acceleration", 0.02, 0.025),
        _p("trend.psar_max_acceleration", 0.20, 0.25),
        _p("trend.use_psar_filter", True, False),
    )),
    Phase(6, "fuzzy_weights", "Fuzzy Weights (the blend)", (
        _p("fuzzy.fuzzy_weight_neural", 0.10, 0.20, 0.30),
        _p("fuzzy.fuzzy_weight_mtf", 0.10, 0.18, 0.25),
        _p("fuzzy.fuzzy_weight_iv", 0.10, 0.14, 0.20),
        _p("fuzzy.fuzzy_weight_regime", 0.08, 0.11, 0.15),
        _p("fuzzy.fuzzy_weight_rsi", 0.05, 0.10, 0.15),
        _p("fuzzy.fuzzy_weight_adx", 0.05, 0.10, 0.15),
    )),
)


class OptimizerError(ConfigError):
    """A bad optimizer setting (phase, grid, samples, window, executor or storage): one message,
    raised before any work starts; the CLI exits 2."""


def phases_from_grid_file(path: str, base: Sequence[Phase] = SEED_PHASES) -> tuple[Phase, ...]:
    """The seed's phases with the grids of a YAML file replacing theirs: ``{phase: {setting:
    [values]}}`` where phase is a number 1-6 or a phase key (``exits_risk`` …) and a setting is a
    dotted or unique bare config name. A phase the file names gets exactly the file's settings."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise OptimizerError(f"--grid {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise OptimizerError(f"--grid {path}: not valid YAML ({error})") from None
    if not isinstance(data, Mapping) or not data:
        raise OptimizerError(f"--grid {path}: expected a mapping of phases to {{setting: [values]}}, got {data!r}")
    phases = {phase.number: phase for phase in base}
    by_key = {phase.key: phase.number for phase in base}
    for phase_name, settings in data.items():
        number = _phase_number(phase_name, by_key, f"--grid {path}")
        if not isinstance(settings, Mapping) or not settings:
            raise OptimizerError(f"--grid {path}: phase {phase_name}: the grid is empty (give {{setting: [values]}})")
        parameters = []
        for name, values in settings.items():
            try:
                dotted = Config.resolve_key(str(name))
            except ConfigError as error:
                raise OptimizerError(f"--grid {path}: phase {phase_name}: {error}") from None
            if not isinstance(values, list) or not values:
                raise OptimizerError(f"--grid {path}: phase {phase_name}: {dotted}: the grid is empty "
                                     f"(give a non-empty list of values, got {values!r})")
            parameters.append(Parameter(dotted, tuple(values)))
        phases[number] = Phase(number, phases[number].key, phases[number].title, tuple(parameters))
    return tuple(phases[number] for number in sorted(phases))


def _phase_number(name, by_key: Mapping[str, int], where: str) -> int:
    text = str(name).strip()
    if text in by_key:
        return by_key[text]
    if text.isdigit() and 1 <= int(text) <= len(by_key):
        return int(text)
    names = ", ".join(f"{number} ({key})" for key, number in by_key.items())
    raise OptimizerError(f"{where}: unknown phase {text!r}; the phases are {names}")


def select_phases(text: str | None, phases: Sequence[Phase] = SEED_PHASES) -> tuple[Phase, ...]:
    """``--phases 1,2`` → those phases in the seed's order; None → all."""
    if text is None:
        return tuple(phases)
    by_key = {phase.key: phase.number for phase in phases}
    wanted = set()
    for part in str(text).split(","):
        if not part.strip():
            raise OptimizerError(f"--phases {text!r}: an empty entry; give phase numbers like 1,2,3")
        wanted.add(_phase_number(part, by_key, "--phases"))
    return tuple(phase for phase in phases if phase.number in wanted)


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------

OBJECTIVES = {
    "ratio": "net profit / |max drawdown| (the seed's fitness; drawdown at least 1 % of the starting cash)",
    "sharpe": "annualised Sharpe ratio of daily returns",
    "calmar": "CAGR % / |max drawdown %|",
}
# A trial below the minimum trade count (or with an invalid combination) is kept in the study
# with this value plus its trade count, so any feasible trial beats it and the grid point is
# never run again on resume (a failed Optuna trial would count as visited anyway).
INFEASIBLE = -1.0e6


def fitness(metrics: Mapping[str, Any], objective: str, min_trades: int, cash: float) -> float | None:
    """The objective of one run's metrics, or None when it is not feasible (fewer than
    ``min_trades`` trades, or the metric undefined)."""
    if (metrics.get("trade_count") or 0) < min_trades:
        return None
    if objective == "ratio":
        drawdown = max(abs(float(metrics.get("max_drawdown") or 0.0)), 0.01 * cash)
        return float(metrics["net_profit"]) / drawdown
    if objective == "sharpe":
        value = metrics.get("sharpe")
        return None if value is None else float(value)
    if objective == "calmar":
        cagr, drawdown_pct = metrics.get("cagr_pct"), metrics.get("max_drawdown_pct")
        if cagr is None or drawdown_pct is None:
            return None
        return float(cagr) / max(abs(float(drawdown_pct)), 1.0)
    raise OptimizerError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def study_value(fit: float | None, metrics: Mapping[str, Any]) -> float:
    return fit if fit is not None else INFEASIBLE + float(metrics.get("trade_count") or 0)


# ----------------------------------------------------------------------------------------------
# Search and walk-forward settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpec:
    """What one phased search does (the same on every walk-forward window)."""

    phases: tuple[Phase, ...] = SEED_PHASES
    sampler: str = "grid"                  # grid | tpe
    samples: int | None = None             # grid: points sampled per phase (None = the whole grid)
    trials: int = 50                       # tpe: trials per phase
    objective: str = "ratio"
    min_trades: int = 20
    seed: int = 42

    def trials_in(self, phase: Phase) -> int:
        if self.sampler == "tpe":
            return self.trials
        return phase.grid_size if self.samples is None else min(self.samples, phase.grid_size)

    def fingerprint(self) -> dict:
        return {"phases": [{"number": p.number, "parameters": {q.path: list(q.values) for q in p.parameters}}
                           for p in self.phases],
                "sampler": self.sampler, "samples": self.samples, "trials": self.trials,
                "objective": self.objective, "min_trades": self.min_trades, "seed": self.seed}


@dataclass(frozen=True)
class Window:
    """A run range of the market: bars [start, stop) and its sessions' dates."""

    index: int
    label: str
    start: int
    stop: int
    first_session: str
    last_session: str


@dataclass(frozen=True)
class WalkForwardSpec:
    train_months: int = 24
    test_months: int = 6
    mode: str = "rolling"                  # rolling | anchored


def walk_forward_windows(bar_times: pd.DatetimeIndex, spec: WalkForwardSpec,
                         min_days: int) -> tuple[list[tuple[Window, Window]], str | None]:
    """(in-sample, out-of-sample) window pairs over whole sessions, and a note on any sessions at
    the end left out (an out-of-sample tail shorter than ``min_days`` calendar days)."""
    sessions = pd.DatetimeIndex(bar_times.tz_localize(None).normalize())
    unique = pd.DatetimeIndex(pd.unique(sessions))
    first_bar = {day: int(i) for i, day in zip(np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]]),
                                                   sessions[np.r_[True, sessions[1:] != sessions[:-1]]])}
    n_bars = len(bar_times)

    def bar_of(day) -> int:
        later = unique[unique >= day]
        return first_bar[later[0]] if len(later) else n_bars

    def window(index: int, label: str, start_day, stop_day) -> Window:
        start, stop = bar_of(start_day), bar_of(stop_day)
        days = unique[(unique >= start_day) & (unique < stop_day)]
        return Window(index, label, start, stop, str(days[0].date()), str(days[-1].date()))

    pairs = []
    origin = unique[0]
    train_start = origin
    test_start = origin + pd.DateOffset(months=spec.train_months)
    note = None
    while test_start <= unique[-1]:
        test_stop = test_start + pd.DateOffset(months=spec.test_months)
        tail = unique[(unique >= test_start) & (unique < test_stop)]
        if (tail[-1] - tail[0]).days + 1 < min_days:
            note = (f"the last {len(tail)} sessions ({tail[0].date()} … {tail[-1].date()}) are not tested: shorter "
                    f"than the {min_days}-day hold period")
            break
        index = len(pairs)
        pairs.append((window(index, f"IS {index + 1}", train_start, test_start),
                      window(index, f"OOS {index + 1}", test_start, test_stop)))
        test_start = test_stop
        if spec.mode == "rolling":
            train_start = train_start + pd.DateOffset(months=spec.test_months)
    return pairs, note


# ----------------------------------------------------------------------------------------------
# Trials: what a worker does
# ----------------------------------------------------------------------------------------------


@dataclass
class WorkerContext:
    """What every trial shares: the base configuration, the market and μ_Mamba per bar (the
    costliest input, computed once in the parent)."""

    config: Config
    market: Any
    neural: tuple | None = None            # (values, description) or None


_CONTEXT: WorkerContext | None = None
_QUOTES = None                             # this process's MarketMemo over the context's market


def install_context(context: WorkerContext) -> None:
    """Make ``context`` this process's trial context (the parent before forking its pool; a Ray
    worker on its first task)."""
    global _CONTEXT, _QUOTES
    from core.market import MarketMemo
    from core.market_data import remember_neural

    _CONTEXT = context
    _QUOTES = MarketMemo(context.market)
    if context.neural is not None:
        remember_neural(context.config, context.market, *context.neural)


def evaluate(overrides: Mapping[str, Any], window: tuple[int, int] | None = None,
             with_equity: bool = False) -> dict:
    """One trial: ``run_backtest`` of the base configuration with ``overrides`` on the market (or
    its bars [start, stop)). Returns its metrics, daily returns (one per session of the range),
    the seconds it took and, on request, the daily closing equity; ``error`` for an invalid
    combination of settings."""
    from analytics.performance import daily_returns, session_closes
    from core.backtest_engine import run_backtest
    from core.market import BarWindow
    from core.market_data import bar_features

    context = _CONTEXT
    if context is None:
        raise RuntimeError("optimizer worker has no context (install_context was not called)")
    started = time.perf_counter()
    try:
        config = context.config.override(dict(overrides), source="optimizer trial")
    except ConfigError as error:
        return {"error": str(error), "metrics": {"trade_count": 0}, "seconds": 0.0}
    market = context.market
    features = bar_features(config, market)
    candidates = candidate_memo(config, market, features)
    # Trials open the same condors at the same bars again and again: their quote paths are
    # priced once per process (MarketMemo), the rest of the contract goes to the market.
    market = _QUOTES
    if window is not None:
        market = BarWindow(market, *window)
        features = features.window(*window)
    result = run_backtest(config, market, features=features, candidates=candidates)
    equity = result.equity["equity"]
    returns = daily_returns(equity, config.backtest.cash).to_numpy(dtype=np.float64)
    metrics = {name: result.metrics.get(name) for name in METRIC_COLUMNS}
    outcome = {"metrics": metrics, "returns": returns, "seconds": time.perf_counter() - started, "error": None}
    if with_equity:
        outcome["equity"] = session_closes(equity).to_numpy(dtype=np.float64)
        outcome["trades"] = result.trades
        # Why entries were refused (the sizing rule that cut them to zero), for a report of the run.
        outcome["refusals"] = {key: result.metrics[key] for key in ("entry_rejections", "sizing_note")
                               if key in result.metrics}
    return outcome


# Filter settings read only by the per-bar gate codes (strategies.entry_gates), never by the
# entry candidate: trials that differ only in these share their candidates.
GATE_ONLY_FILTERS = frozenset({"iv_rank_min", "vix_threshold", "use_vix_gate", "max_volatility_pct",
                               "use_volatility_cap", "use_gap_rule", "gap_rule_minutes", "gap_small_threshold"})
# Strategy settings applied after the memo's candidate (the credit test, in
# core.engine.TradingEngine._entry_decision).
AFTER_CANDIDATE_STRATEGY = frozenset({"min_credit_to_width"})
# The feature columns a candidate reads (core.engine.TradingEngine._entry_candidate).
CANDIDATE_FEATURES = ("regime", "skew_reference", "divergence_bias", "realized_vol")
_MEMO_SIZE = 32
_memos: dict = {}
_digests: dict = {}                         # ids of candidate columns -> (the columns, their digest)


def candidate_memo(config: Config, market, features):
    """The ``CandidateMemo`` of this configuration's candidate settings on ``market`` with
    ``features`` (the full table): one per process per (market, content of the candidate feature
    columns, strategy / filter / regime / fill settings), least recently used dropped beyond 32.
    The columns are keyed by content, not identity: a table rebuilt for a setting the candidate
    does not read (a PSAR step, say) shares the memo of the table before it."""
    import hashlib

    from core.engine import CandidateMemo

    settings = candidate_settings(config)
    columns = tuple(features.columns.get(name) for name in CANDIDATE_FEATURES)
    ids = tuple(id(column) for column in columns)
    known = _digests.pop(ids, None)
    if known is None:
        digest = hashlib.blake2b(digest_size=16)
        for name, column in zip(CANDIDATE_FEATURES, columns):
            digest.update(name.encode())
            if column is not None:
                digest.update(np.ascontiguousarray(column).tobytes())
        # The columns are kept with their digest, so their ids are not reused while it is known.
        known = (columns, digest.hexdigest())
    _digests[ids] = known
    while len(_digests) > _MEMO_SIZE:
        _digests.pop(next(iter(_digests)))
    key = (id(market), known[1], settings)
    memo = _memos.pop(key, None)
    if memo is None:
        # The memo holds the market whose id is in its key, so the id is never reused for other
        # data while the memo exists.
        memo = CandidateMemo(anchors=(market,))
    _memos[key] = memo
    while len(_memos) > _MEMO_SIZE:
        _memos.pop(next(iter(_memos)))
    return memo


def candidate_settings(config: Config) -> str:
    """The settings an entry candidate depends on, as one string (part of ``candidate_memo``'s
    key)."""
    filters = {k: v for k, v in config.filters.model_dump().items() if k not in GATE_ONLY_FILTERS}
    strategy = {k: v for k, v in config.strategy.model_dump().items() if k not in AFTER_CANDIDATE_STRATEGY}
    return json.dumps([strategy, filters, config.regime.model_dump(), config.backtest.fill_model,
                       config.backtest.fill_spread_fraction], sort_keys=True, default=str)


def trial_affinity(overrides: Mapping[str, Any]) -> str:
    """What a trial's per-process memos are keyed by: its feature table's settings and its
    candidate settings. Trials with the same affinity reuse each other's work in one process."""
    from core.market_data import feature_key

    config = _CONTEXT.config.override(dict(overrides))
    return feature_key(config) + candidate_settings(config)


METRIC_COLUMNS = ("net_profit", "max_drawdown", "max_drawdown_pct", "total_return_pct", "cagr_pct", "sharpe",
                  "sortino", "trade_count", "win_rate", "profit_factor", "expectancy", "avg_days_held")


def pack_returns(values: np.ndarray) -> str:
    """Daily returns as text for a study's user attributes (float64, zlib, base64: ~5 KB for five
    years), so a shared study carries what DSR and PBO need from every machine's trials."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(values, dtype="<f8").tobytes(), 6)).decode("ascii")


def unpack_returns(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f8").copy()


# ----------------------------------------------------------------------------------------------
# Executors: all hand back concurrent.futures.Future objects
# ----------------------------------------------------------------------------------------------


class InlineExecutor:
    """One worker: trials run in this process, one at a time."""

    workers = 1
    name = "inline (1 worker)"

    def submit(self, overrides, window=None, with_equity=False) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(evaluate(overrides, window, with_equity))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future

    def close(self) -> None:
        pass


class ProcessExecutor:
    """Local worker processes, one pool of one process each. Workers are forked after the parent
    has built the market, the feature tables and μ_Mamba, so they inherit all of it (and numba's
    compiled code) instead of rebuilding it per worker.

    A trial goes to a worker that has already run one with its affinity (``trial_affinity``: the
    same feature table and entry candidates, so it reuses that work) unless that worker has more
    than one trial more waiting than the least busy one, or another worker is idle; otherwise to
    the least busy worker. A phase that
    changes the condor's structure (phase 2) then builds each structure's candidates in one
    process, not in every one; a phase with one affinity spreads evenly."""

    def __init__(self, workers: int):
        import multiprocessing

        self.workers = workers
        self.name = f"process pool ({workers} workers)"
        context = multiprocessing.get_context("fork")
        self._pools = [futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_worker_start)
                       for _ in range(workers)]
        self._busy = [0] * workers                   # trials submitted and not finished, per worker
        self._seen: list[set] = [set() for _ in range(workers)]
        self._lock = threading.Lock()

    def _choose(self, affinity: str) -> int:
        least = min(self._busy)
        # One trial more than the least busy worker is worth waiting for; leaving a worker idle
        # is not.
        allowed = least + 1 if least > 0 else 0
        known = [i for i in range(self.workers) if affinity in self._seen[i] and self._busy[i] <= allowed]
        if known:
            return min(known, key=lambda i: self._busy[i])
        return self._busy.index(least)

    def submit(self, overrides, window=None, with_equity=False) -> futures.Future:
        affinity = trial_affinity(overrides) if self.workers > 1 else ""
        with self._lock:
            worker = self._choose(affinity)
            self._busy[worker] += 1
            self._seen[worker].add(affinity)
        future = self._pools[worker].submit(evaluate, dict(overrides), window, with_equity)
        future.add_done_callback(lambda _, worker=worker: self._finished(worker))
        return future

    def submit_call(self, function, *args) -> futures.Future:
        """Any picklable call on the least busy worker (the stress runner's scenarios), in the
        same forked processes that hold the market and feature tables."""
        with self._lock:
            worker = self._busy.index(min(self._busy))
            self._busy[worker] += 1
        future = self._pools[worker].submit(function, *args)
        future.add_done_callback(lambda _, worker=worker: self._finished(worker))
        return future

    def _finished(self, worker: int) -> None:
        with self._lock:
            self._busy[worker] -= 1

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


def _worker_start() -> None:
    # One thread per worker: the workers already use every core.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


class RayExecutor:
    """Trials as Ray tasks on a cluster (``address``: ``auto``, ``host:port``, ``ray://host:port``)
    or on a local Ray instance started here (address None). The context goes into Ray's object
    store once; each worker process installs it on its first task."""

    def __init__(self, address: str | None, context: WorkerContext, workers: int | None = None):
        import ray

        self._ray = ray
        kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True,
                  "logging_level": "ERROR"}
        if address is None:
            kwargs["num_cpus"] = workers or os.cpu_count() or 1
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise OptimizerError(f"--ray-address {address}: cannot connect to a Ray cluster ({error})") from None
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self.name = f"Ray ({self.workers} CPUs, {'local' if address is None else address})"
        self._context_ref = ray.put(context)
        self._remote = ray.remote(num_cpus=1)(_ray_trial)

    def submit(self, overrides, window=None, with_equity=False) -> futures.Future:
        # The reference travels inside a list so Ray does not fetch it for every task: the
        # worker fetches it once and keeps it (_ray_trial).
        return self._remote.remote([self._context_ref], dict(overrides), window, with_equity).future()

    def close(self) -> None:
        self._ray.shutdown()


_RAY_CONTEXT_ID: str | None = None


def _ray_trial(context_ref: list, overrides, window, with_equity):
    global _RAY_CONTEXT_ID
    import ray

    key = context_ref[0].hex()
    if _RAY_CONTEXT_ID != key:
        _worker_start()
        install_context(ray.get(context_ref[0]))
        _RAY_CONTEXT_ID = key
    return evaluate(overrides, window, with_equity)


def check_ray_address(address: str) -> None:
    """Fail fast on an address nothing listens at (``ray.init`` would wait long before saying
    so); ``auto`` is left to Ray, which answers at once."""
    import socket

    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise OptimizerError(f"--ray-address {address!r}: give auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=3.0):
            pass
    except OSError as error:
        raise OptimizerError(f"--ray-address {address}: nothing answers at {host}:{port} "
                             f"({error.strerror or error}); start the cluster with `ray start --head` "
                             f"or give its address") from None


# ----------------------------------------------------------------------------------------------
# The study: storage, resume, ask / tell
# ----------------------------------------------------------------------------------------------

HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 90


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` with heartbeats (a trial whose machine stops beating is
    failed and its grid point run again). One clear error when the database cannot be reached."""
    import warnings

    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and GridSampler's handling of re-queued trials are marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # We record heartbeats ourselves around ask/tell (Study._heartbeat), which Optuna warns about.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                             grace_period=GRACE_SECONDS)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OptimizerError(f"--storage {_hide_password(url)}: cannot open the study database ({reason})") from None
    if sqlite:
        # A trial is about twenty small transactions (Optuna writes each parameter on its own);
        # with SQLite's default journal each one waits for the disk, and the parent's bookkeeping
        # then takes CPU from the workers (TPE and shared studies pay it per trial; a local grid
        # writes its finished points with add_trial). Write-ahead logging with NORMAL sync
        # keeps the database consistent after a crash (a power cut may lose the last trials,
        # which a resume runs again).
        from sqlalchemy import event

        def _pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(storage.engine, "connect", _pragmas)
        storage.engine.dispose()            # pooled connections reconnect with the pragmas
    return storage


def _hide_password(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@dataclass
class TrialRecord:
    """One finished trial as the report sees it."""

    window: str
    phase: int
    number: int
    params: dict
    value: float
    fitness: float | None
    metrics: dict
    returns: np.ndarray
    seconds: float
    error: str | None = None


@dataclass
class PhaseOutcome:
    phase: Phase
    best_params: dict
    best_value: float
    best_fitness: float | None
    trials: list[TrialRecord]
    reused: int = 0                          # trials found finished in the study (resume)


@dataclass
class SearchOutcome:
    window: Window | None
    overrides: dict
    phases: list[PhaseOutcome] = field(default_factory=list)

    @property
    def trials(self) -> list[TrialRecord]:
        return [trial for phase in self.phases for trial in phase.trials]

    @property
    def best(self) -> TrialRecord | None:
        return _best_record(self.phases[-1].trials) if self.phases else None


def _best_record(trials: Iterable[TrialRecord]) -> TrialRecord | None:
    trials = list(trials)
    return max(trials, key=lambda t: (t.value, -t.number)) if trials else None


def _distributions(phase: Phase, sampler: str) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for parameter in phase.parameters:
        values = parameter.values
        if sampler == "grid" or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values) \
                or len(values) < 2:
            out[parameter.path] = CategoricalDistribution(list(values))
        elif all(isinstance(v, int) for v in values):
            out[parameter.path] = IntDistribution(min(values), max(values))
        else:
            out[parameter.path] = FloatDistribution(float(min(values)), float(max(values)))
    return out


def _sampler(phase: Phase, spec: SearchSpec, started: int = 0):
    """The phase's sampler; ``started``: trials already in its study (a TPE seed moves on by
    them, so a resumed study does not replay the random start-up points drawn before)."""
    import optuna

    if spec.sampler == "grid":
        return _grid_sampler_class()({p.path: list(p.values) for p in phase.parameters}, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed + phase.number + 7919 * started,
                                      n_startup_trials=min(10, spec.trials))


_GRID_SAMPLER = None


def _grid_sampler_class():
    """GridSampler without its ``after_trial``: that only calls ``study.stop()`` once the grid is
    exhausted, which ends ``study.optimize`` but raises RuntimeError under ask/tell (the trial
    that finished the grid would crash the phase). ``run_phase`` counts trials itself."""
    global _GRID_SAMPLER
    if _GRID_SAMPLER is None:
        import optuna

        class GridSampler(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values) -> None:
                return None

        _GRID_SAMPLER = GridSampler
    return _GRID_SAMPLER


class Study:
    """The phased search's studies in one storage: one Optuna study per (window, phase), named
    ``<name>-<window>-p<phase>``, the search settings kept on each so a resume with other
    settings is refused."""

    def __init__(self, storage, name: str, spec: SearchSpec, local: bool, cash: float):
        self.storage = storage
        self.cash = float(cash)
        self.name = name
        self.spec = spec
        self.local = local                  # the run folder's own SQLite: no other machine uses it
        self._beating: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS / 2):
            with self._lock:
                ids = list(self._beating)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried on the next tick
                    pass

    def study_name(self, window: Window | None, phase: Phase) -> str:
        return f"{self.name}-{'full' if window is None else f'w{window.index + 1}'}-p{phase.number}"

    def open(self, window: Window | None, phase: Phase):
        import optuna

        name = self.study_name(window, phase)
        study = optuna.create_study(study_name=name, storage=self.storage, sampler=_sampler(phase, self.spec),
                                    direction="maximize", load_if_exists=True)
        fingerprint = json.dumps(self.spec.fingerprint(), sort_keys=True)
        stored = study.user_attrs.get("search")
        if stored is None:
            study.set_user_attr("search", fingerprint)
        elif stored != fingerprint:
            raise OptimizerError(f"study {name!r} in this storage was started with other search settings; resume "
                                 f"with the same --phases/--grid/--sampler/--samples/--trials/--objective/"
                                 f"--min-trades/--seed, or use another --study-name")
        if self.spec.sampler == "tpe":
            started = len(study.get_trials(deepcopy=False))
            if started:
                study.sampler = _sampler(phase, self.spec, started)
        return study

    def recover(self, study, phase: Phase) -> int:
        """Trials left running by a process that died: with the run folder's own database every
        running trial is such a trial (this process holds the folder's lock); with a shared
        database, those whose heartbeat stopped. Each is failed and queued again, so its grid
        point still runs: a grid trial by its grid point (the process may have died before all its
        parameters were written), another by its parameters when it has them all. (The run
        folder's grid study needs no queue: it runs whatever grid point is not finished.)
        Returns how many."""
        import optuna
        from optuna.trial import TrialState

        if self.local:
            stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            for trial in stale:
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
            optuna.storages.fail_stale_trials(study)
            stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number not in before]
        if self.local and self.spec.sampler == "grid":
            # ``_run_grid_points`` runs every grid point not finished: nothing to queue.
            return len(stale)
        for trial in stale:
            if "grid_id" in trial.system_attrs and "search_space" in trial.system_attrs:
                # GridSampler gives a waiting trial that carries a grid id that grid point.
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, user_attrs={"requeued_from": trial.number},
                    system_attrs={key: trial.system_attrs[key] for key in ("grid_id", "search_space")}))
            elif set(trial.params) == {parameter.path for parameter in phase.parameters}:
                study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        return len(stale)

    def run_phase(self, phase: Phase, base: Mapping[str, Any], window: Window | None, executor,
                  on_trial: Callable[[TrialRecord], None] | None = None) -> PhaseOutcome:
        """Run the phase's trials that the study does not have yet, on ``executor``; wait for
        trials other machines are running; the best (highest value, then earliest) is the phase's
        choice."""
        from optuna.trial import TrialState

        spec = self.spec
        study = self.open(window, phase)
        reused = None
        while True:
            reused = self._run_missing(study, phase, base, window, executor, on_trial, reused)
            # Trials other machines still run: wait for them; those of a machine that stopped
            # beating are failed and queued again, and this machine runs them.
            if not self._wait_for_others(study, phase):
                break
        trials = [self._record_from_frozen(window, phase, t)
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        best = _best_record(trials)
        if best is None:
            raise OptimizerError(f"phase {phase.number} ({phase.title}) finished no trial")
        return PhaseOutcome(phase, dict(best.params), best.value, best.fitness, trials, reused)

    def _run_missing(self, study, phase: Phase, base: Mapping[str, Any], window: Window | None, executor,
                     on_trial, reused: int | None) -> int:
        """Ask and run trials until the phase has its target (counting what is finished and what
        other machines run); returns the count of trials found finished the first time."""
        from optuna.trial import TrialState

        spec = self.spec
        self.recover(study, phase)
        if self.local and spec.sampler == "grid":
            return self._run_grid_points(study, phase, base, window, executor, on_trial, reused)
        target = spec.trials_in(phase)
        distributions = _distributions(phase, spec.sampler)
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        reused = complete if reused is None else reused
        others = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        in_flight: dict[futures.Future, Any] = {}
        window_range = None if window is None else (window.start, window.stop)
        if on_trial is not None:
            on_trial(None, complete, target)
        capacity = max(1, executor.workers) * 2
        exhausted = False
        try:
            while True:
                while len(in_flight) < capacity and not exhausted:
                    if self.local:
                        if not (complete + len(in_flight) + others < target or waiting > 0):
                            break
                    else:
                        # Other machines ask and finish trials of this study meanwhile: count
                        # again before each ask, or every machine would run the whole target.
                        states = Counter(t.state for t in study.get_trials(
                            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)))
                        waiting = states[TrialState.WAITING]
                        if not (states[TrialState.COMPLETE] + states[TrialState.RUNNING] < target or waiting > 0):
                            break
                    trial = study.ask(distributions)
                    waiting = max(0, waiting - 1)
                    if not self.local and spec.sampler == "grid" and self._taken(study, trial):
                        # Two machines asked for the grid's last point at once: the sampler gave
                        # this one a point another trial already runs. Nothing is left to ask.
                        study.tell(trial, state=TrialState.FAIL)
                        exhausted = True
                        break
                    if not self.local:       # the run folder's own study has no other machine
                        with self._lock:
                            self._beating[trial._trial_id] = time.time()
                        self.storage.record_heartbeat(trial._trial_id)
                    overrides = {**base, **trial.params}
                    in_flight[executor.submit(overrides, window_range)] = trial
                if not in_flight:
                    break
                done, _ = futures.wait(list(in_flight), return_when=futures.FIRST_COMPLETED)
                for future in done:
                    trial = in_flight.pop(future)
                    outcome = future.result()
                    fit, value, attrs = self._outcome_attrs(outcome)
                    for key, attr in attrs.items():
                        trial.set_user_attr(key, attr)
                    study.tell(trial, value)
                    with self._lock:
                        self._beating.pop(trial._trial_id, None)
                    complete += 1
                    if on_trial is not None:
                        on_trial(self._record(window, phase, trial.number, trial.params, value, fit, outcome),
                                 complete, target)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        return reused

    def _run_grid_points(self, study, phase: Phase, base: Mapping[str, Any], window: Window | None, executor,
                         on_trial, reused: int | None) -> int:
        """The run folder's own grid study (no other machine asks from it): its grid points not
        finished yet, in the grid sampler's seeded order, each written as one finished trial
        when its result is in, instead of Optuna's ask / tell (a trial row, then each parameter,
        attribute and the value in transactions of their own: ~23 ms a trial against ~8 ms).
        Results are written in that order (a few held back while an earlier point still runs),
        so trial numbers, which break ties between equal values, do not depend on which worker
        finished first. A process killed here leaves only finished trials in the study; the
        points it was running are simply not there, and run on resume."""
        import optuna
        from optuna.trial import TrialState

        sampler = _sampler(phase, self.spec)
        # GridSampler's seeded shuffle of the grid (its private list, read for this pinned Optuna
        # release): a point's position is its ``grid_id``, which the sampler itself would give,
        # so a shared study opened later on this database sees these points as visited.
        points = sampler._all_grids
        names = list(sampler._search_space)
        search_space = dict(sampler._search_space)
        distributions = _distributions(phase, "grid")
        target = self.spec.trials_in(phase)
        done = {tuple(t.params.get(name) for name in names)
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        complete = len(done)
        reused = complete if reused is None else reused
        queue = [grid_id for grid_id in range(len(points))[:target] if tuple(points[grid_id]) not in done]
        number = len(study.get_trials(deepcopy=False))
        window_range = None if window is None else (window.start, window.stop)
        if on_trial is not None:
            on_trial(None, complete, target)
        capacity = max(1, executor.workers) * 3
        submitted: dict[futures.Future, int] = {}
        results: dict[int, dict] = {}               # finished, waiting for earlier points to be written
        order = list(queue)
        position = 0                                 # the next point to submit
        written = 0                                  # points of ``order`` written so far
        try:
            while written < len(order):
                while len(submitted) + len(results) < capacity and position < len(order):
                    grid_id = order[position]
                    params = dict(zip(names, points[grid_id]))
                    submitted[executor.submit({**base, **params}, window_range)] = grid_id
                    position += 1
                done_now, _ = futures.wait(list(submitted), return_when=futures.FIRST_COMPLETED)
                for future in done_now:
                    results[submitted.pop(future)] = future.result()
                while written < len(order) and order[written] in results:
                    grid_id = order[written]
                    outcome = results.pop(grid_id)
                    params = dict(zip(names, points[grid_id]))
                    fit, value, attrs = self._outcome_attrs(outcome)
                    study.add_trial(optuna.trial.create_trial(
                        params=params, distributions=distributions, value=value, user_attrs=attrs,
                        system_attrs={"grid_id": grid_id, "search_space": search_space}))
                    written += 1
                    complete += 1
                    if on_trial is not None:
                        on_trial(self._record(window, phase, number, params, value, fit, outcome), complete, target)
                    number += 1
        except BaseException:
            for future in submitted:
                future.cancel()
            raise
        return reused

    def _outcome_attrs(self, outcome: dict) -> tuple[float | None, float, dict]:
        """A trial's fitness, study value and user attributes from its outcome."""
        spec = self.spec
        fit = None if outcome["error"] else fitness(outcome["metrics"], spec.objective, spec.min_trades, self.cash)
        value = study_value(fit, outcome["metrics"]) - (1.0 if outcome["error"] else 0.0)
        attrs = {"metrics": _jsonable(outcome["metrics"]), "seconds": round(float(outcome["seconds"]), 4)}
        if outcome["error"]:
            attrs["error"] = outcome["error"]
        else:
            attrs["returns"] = pack_returns(outcome["returns"])
        return fit, value, attrs

    @staticmethod
    def _taken(study, trial) -> bool:
        from optuna.trial import TrialState

        return any(other.params == trial.params and other.number != trial.number
                   for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))

    def _wait_for_others(self, study, phase: Phase) -> bool:
        """Wait until no trial of the phase runs anywhere; True when some were a stopped
        machine's and were queued again (to be run here)."""
        from optuna.trial import TrialState

        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.recover(study, phase):
                return True
            time.sleep(2.0)
        return False

    @staticmethod
    def _record(window, phase, number, params, value, fit, outcome) -> TrialRecord:
        return TrialRecord(window.label if window else "full", phase.number, number, dict(params), float(value), fit,
                           dict(outcome["metrics"]), np.asarray(outcome.get("returns", np.empty(0))),
                           float(outcome["seconds"]), outcome.get("error"))

    def _record_from_frozen(self, window, phase, trial) -> TrialRecord:
        attrs = trial.user_attrs
        metrics = dict(attrs.get("metrics", {}))
        error = attrs.get("error")
        fit = None if error else fitness(metrics, self.spec.objective, self.spec.min_trades, self.cash)
        returns = unpack_returns(attrs["returns"]) if "returns" in attrs else np.empty(0)
        return TrialRecord(window.label if window else "full", phase.number, trial.number, dict(trial.params),
                           float(trial.value), fit, metrics, returns, float(attrs.get("seconds", 0.0)), error)


def _jsonable(values: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# The phased search, walk-forward, statistics
# ----------------------------------------------------------------------------------------------


def phased_search(study: Study, window: Window | None, executor, on_trial=None, on_phase=None) -> SearchOutcome:
    """The phases in order, each with the best values of the ones before fixed."""
    outcome = SearchOutcome(window, {})
    for phase in study.spec.phases:
        if on_phase is not None:
            on_phase(window, phase)
        report = None if on_trial is None else (
            lambda record, complete, target, phase=phase: on_trial(record, complete, target, window, phase))
        result = study.run_phase(phase, outcome.overrides, window, executor, report)
        outcome.phases.append(result)
        outcome.overrides = {**outcome.overrides, **result.best_params}
    return outcome


def per_observation_sharpe(returns: np.ndarray) -> float:
    if returns.size < 2:
        return 0.0
    std = float(np.std(returns, ddof=1))
    return float(np.mean(returns)) / std if std > 0 else 0.0


def overfitting_statistics(search: SearchOutcome, n_splits: int = 16) -> dict:
    """DSR of the chosen configuration for the number of trials tried, and PBO by CSCV over the
    trials' daily returns (every trial of the search, all phases)."""
    from analytics.overfitting import deflated_sharpe_from_returns, probability_of_backtest_overfitting

    trials = [t for t in search.trials if t.error is None and t.returns.size]
    best = search.best
    out: dict = {"n_trials": len(trials)}
    if best is None or best.returns.size < 3 or len(trials) < 2:
        out["note"] = "too few trials or days for DSR/PBO"
        return out
    sharpes = np.array([per_observation_sharpe(t.returns) for t in trials])
    try:
        dsr = deflated_sharpe_from_returns(best.returns, sharpes)
        out.update(dsr=dsr.dsr, sharpe_daily=dsr.sharpe, expected_max_sharpe_daily=dsr.expected_max_sharpe,
                   sharpe_variance_daily=dsr.sharpe_variance, skewness=dsr.skewness, kurtosis=dsr.kurtosis,
                   observations=dsr.n_observations)
    except ValueError as error:
        out["dsr_note"] = str(error)
    lengths = {t.returns.size for t in trials}
    if len(lengths) == 1:
        matrix = np.column_stack([t.returns for t in trials])
        splits = min(n_splits, (matrix.shape[0] // 2) * 2)
        try:
            pbo = probability_of_backtest_overfitting(matrix, n_splits=splits)
            out.update(pbo=pbo.pbo, pbo_combinations=pbo.n_combinations, pbo_splits=pbo.n_splits,
                       pbo_prob_oos_loss=pbo.prob_oos_loss, pbo_logits=pbo.logits)
        except ValueError as error:
            out["pbo_note"] = str(error)
    return out


def sensitivity(best: Mapping[str, Any], phases: Sequence[Phase], window: Window | None, executor,
                spec: SearchSpec, cash: float, best_fitness: float | None) -> pd.DataFrame:
    """How fitness moves when each parameter moves one grid step from the optimum (others held)."""
    jobs = []
    for phase in phases:
        for parameter in phase.parameters:
            values = list(parameter.values)
            current = best.get(parameter.path)
            if current is None:
                continue
            at = nearest_index(values, current)
            for step in (-1, 1):
                k = at + step
                if 0 <= k < len(values) and values[k] != current:
                    jobs.append((phase.number, parameter.path, current, values[k], step))
    window_range = None if window is None else (window.start, window.stop)
    submitted = [(job, executor.submit({**best, job[1]: job[3]}, window_range)) for job in jobs]
    rows = []
    for (phase, path, current, value, step), future in submitted:
        outcome = future.result()
        fit = None if outcome["error"] else fitness(outcome["metrics"], spec.objective, spec.min_trades, cash)
        rows.append({"phase": phase, "parameter": path, "best_value": current, "step": "down" if step < 0 else "up",
                     "value": value, "fitness": fit, "best_fitness": best_fitness,
                     "change": None if fit is None or best_fitness is None else fit - best_fitness,
                     "trades": outcome["metrics"].get("trade_count"), "error": outcome["error"]})
    return pd.DataFrame(rows, columns=["phase", "parameter", "best_value", "step", "value", "fitness", "best_fitness",
                                       "change", "trades", "error"])


def nearest_index(values: list, current) -> int:
    if current in values:
        return values.index(current)
    try:
        return int(np.argmin([abs(float(v) - float(current)) for v in values]))
    except (TypeError, ValueError):
        return 0


def trials_frame(searches: Sequence[SearchOutcome]) -> pd.DataFrame:
    """Every trial: window, phase, number, parameters, value, fitness, metrics, seconds."""
    rows = []
    for search in searches:
        for trial in search.trials:
            row = {"window": trial.window, "phase": trial.phase, "trial": trial.number, "value": trial.value,
                   "fitness": trial.fitness, "feasible": trial.fitness is not None, "seconds": trial.seconds,
                   "error": trial.error}
            row.update({f"param.{k}": v for k, v in trial.params.items()})
            row.update({f"metric.{k}": trial.metrics.get(k) for k in METRIC_COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# The command: flags, the run folder, the orchestration
# ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The optimizer's flags (``python core/main.py --mode optimize`` and ``core/optimizer.py``)."""
    group = parser.add_argument_group("optimize mode (--mode optimize, or --use-optimizer)")
    group.add_argument("--samples", type=int, default=None, metavar="N",
                       help="grid sampler: sample N points of each phase's grid (default: the whole grid)")
    group.add_argument("--phases", default=None, metavar="LIST",
                       help="phases to run, e.g. 1,2 (1 exits & risk, 2 structure & entries, 3 filters & regime, "
                            "4 momentum, 5 trend & volatility, 6 fuzzy weights; default: all)")
    group.add_argument("--grid", default=None, metavar="FILE",
                       help="YAML {phase: {setting: [values]}} replacing the seed's grids of the phases it names")
    group.add_argument("--sampler", choices=["grid", "tpe"], default="grid",
                       help="grid: the seed's grids (Optuna GridSampler); tpe: Optuna TPE over each grid's range "
                            "(default: grid)")
    group.add_argument("--trials", type=int, default=None, metavar="N", help="tpe: trials per phase (default: 50)")
    group.add_argument("--objective", choices=sorted(OBJECTIVES), default="ratio",
                       help="ratio: net profit / |max drawdown| (the seed's); sharpe; calmar (default: ratio)")
    group.add_argument("--min-trades", type=int, default=20, metavar="N",
                       help="a trial with fewer trades is infeasible (default: 20)")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="local worker processes (default: every core)")
    group.add_argument("--executor", choices=["process", "ray"], default="process",
                       help="process: a local process pool; ray: Ray tasks (default: process)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to use: auto, host:port or ray://host:port (default: a local Ray instance)")
    group.add_argument("--storage", default=None, metavar="URL",
                       help="Optuna storage URL shared by several machines, e.g. postgresql+psycopg://user@host/db "
                            "(default: sqlite in the run folder)")
    group.add_argument("--study-name", default="condorbrain", metavar="NAME",
                       help="study name prefix in the storage (default: condorbrain)")
    group.add_argument("--walk-forward", action="store_true",
                       help="walk-forward: the phased search on each in-sample window, its choice traded on the "
                            "next out-of-sample window")
    group.add_argument("--wf-train-months", type=int, default=24, metavar="N", help="in-sample months (default: 24)")
    group.add_argument("--wf-test-months", type=int, default=6, metavar="N",
                       help="out-of-sample months (default: 6)")
    group.add_argument("--wf-mode", choices=["rolling", "anchored"], default="rolling",
                       help="rolling: the in-sample window moves; anchored: it grows from the start (default: rolling)")
    group.add_argument("--no-sensitivity", action="store_true",
                       help="skip the one-grid-step sensitivity runs around the optimum")


@dataclass
class OptimizerSettings:
    spec: SearchSpec
    workers: int
    executor: str
    ray_address: str | None
    storage: str | None
    study_name: str
    walk_forward: WalkForwardSpec | None
    sensitivity: bool


def settings_from_args(args, config: Config) -> OptimizerSettings:
    """Validated optimizer settings; OptimizerError (one message) before any work starts."""
    phases = phases_from_grid_file(args.grid) if args.grid else SEED_PHASES
    phases = select_phases(args.phases, phases)
    if args.samples is not None and args.samples <= 0:
        raise OptimizerError(f"--samples {args.samples}: must be at least 1 (points sampled per phase)")
    if args.trials is not None and args.trials <= 0:
        raise OptimizerError(f"--trials {args.trials}: must be at least 1 (trials per phase)")
    if args.trials is not None and args.sampler != "tpe":
        raise OptimizerError("--trials counts TPE trials: give --sampler tpe, or --samples N for the grid")
    if args.samples is not None and args.sampler == "tpe":
        raise OptimizerError("--samples samples the grid: with --sampler tpe give --trials N")
    if args.min_trades < 0:
        raise OptimizerError(f"--min-trades {args.min_trades}: must be 0 or more")
    workers = args.workers if args.workers is not None else (len(os.sched_getaffinity(0))
                                                             if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers <= 0:
        raise OptimizerError(f"--workers {args.workers}: must be at least 1")
    if args.ray_address and args.executor != "ray":
        raise OptimizerError("--ray-address needs --executor ray")
    for phase in phases:
        for parameter in phase.parameters:
            for value in parameter.values:
                try:
                    config.override({parameter.path: value}, source="optimizer grid")
                except ConfigError as error:
                    raise OptimizerError(f"phase {phase.number} ({phase.title}): {parameter.path} = {value!r} is not a "
                                         f"valid value: {error}") from None
    spec = SearchSpec(phases=phases, sampler=args.sampler, samples=args.samples, trials=args.trials or 50,
                      objective=args.objective, min_trades=args.min_trades, seed=config.backtest.seed)
    walk = None
    if args.walk_forward:
        if args.wf_train_months < 1 or args.wf_test_months < 1:
            raise OptimizerError("--wf-train-months and --wf-test-months must be at least 1")
        walk = WalkForwardSpec(args.wf_train_months, args.wf_test_months, args.wf_mode)
        hold = longest_hold_days(config, phases)
        for flag, months in (("--wf-test-months", args.wf_test_months), ("--wf-train-months", args.wf_train_months)):
            if months * 28 < hold:
                raise OptimizerError(f"{flag} {months}: a window of {months} month(s) is shorter than the hold period "
                                     f"({hold} days, exits.max_hold_days of the search); give at least "
                                     f"{math.ceil(hold / 28)} month(s)")
        start, end = pd.Timestamp(config.backtest.start), pd.Timestamp(config.backtest.end)
        if start + pd.DateOffset(months=args.wf_train_months + args.wf_test_months) > end + pd.Timedelta(days=1):
            raise OptimizerError(f"--walk-forward: {config.backtest.start} … {config.backtest.end} is shorter than one "
                                 f"in-sample ({args.wf_train_months} months) plus one out-of-sample "
                                 f"({args.wf_test_months} months) window")
    elif args.wf_mode != "rolling" or args.wf_train_months != 24 or args.wf_test_months != 6:
        raise OptimizerError("--wf-train-months/--wf-test-months/--wf-mode need --walk-forward")
    return OptimizerSettings(spec, workers, args.executor, args.ray_address, args.storage, args.study_name, walk,
                             not args.no_sensitivity)


def longest_hold_days(config: Config, phases: Sequence[Phase]) -> int:
    values = [config.exits.max_hold_days]
    for phase in phases:
        for parameter in phase.parameters:
            if parameter.path == "exits.max_hold_days":
                values.extend(int(v) for v in parameter.values)
    return max(values)


def prepare_run_dir(out: str | None) -> tuple[Any, bool]:
    """The run folder and whether this is a resume: an existing folder with ``optimizer.json`` is
    resumed; anything else must be new or empty (``core.report.check_output_dir``)."""
    from core.report import check_output_dir, default_run_dir

    if out is not None and (Path(out) / "optimizer.json").is_file():
        return Path(out), True
    folder = check_output_dir(out) if out else default_run_dir("runs")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, False


class FolderLock:
    """One optimizer per run folder: a second process on the same folder is refused (and, since
    this one holds the lock, a running trial found in the folder's database is from a process
    that died)."""

    def __init__(self, folder):
        import fcntl

        self._file = open(folder / ".optimizer.lock", "w")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise OptimizerError(f"{folder}: another optimizer is running in this folder") from None

    def release(self) -> None:
        self._file.close()


def write_json_atomic(path, value) -> None:
    from core.report import to_json

    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(to_json(value), encoding="utf-8")
    os.replace(temp, path)


def run(args, config: Config, argv: Sequence[str]) -> int:
    """``--mode optimize``: validate everything, build the shared inputs once, run the phased
    search (or walk-forward), compute DSR, PBO and the sensitivity, write the run folder."""
    from rich.console import Console

    console = Console()
    if args.engine is None:
        config = config.override({"backtest.engine": "fast"}, source="optimizer")
    settings = settings_from_args(args, config)
    if settings.executor == "ray" and settings.ray_address:
        check_ray_address(settings.ray_address)
    from core import optimizer_report as report

    # A shared database is checked before the folder is made, so a bad URL leaves nothing behind.
    storage = open_storage(settings.storage) if settings.storage else None
    # So are the data (a period outside it; the market is cached for build_context) and a
    # checkpoint given with --mamba-model (refused as in the backtest mode, not run as neutral).
    from core.market_data import load_configured_forecaster, load_market, uses_neural

    with console.status(f"loading {config.backtest.start} … {config.backtest.end}…"):
        load_market(config)
    forecaster = None
    if getattr(args, "mamba_model", None) is not None and uses_neural(config):
        forecaster = load_configured_forecaster(
            config, explicit=True, check_size=tuple(name for name, flag in (("d_model", args.mamba_d_model),
                                                                            ("n_layers", args.mamba_layers))
                                                    if flag is not None))
    folder, resuming = prepare_run_dir(args.out)
    lock = FolderLock(folder)
    try:
        if resuming:
            check_resume(folder, config, settings)
        storage_url = settings.storage or f"sqlite:///{folder.resolve() / 'study.db'}"
        if storage is None:
            storage = open_storage(storage_url)
        manifest_path = folder / "optimizer.json"
        manifest = {
            "command": "python core/main.py " + " ".join(argv), "status": "running",
            "started": pd.Timestamp.now(tz="UTC").isoformat(), "resumed": resuming,
            "storage": _hide_password(storage_url), "study_name": settings.study_name,
            "search": settings.spec.fingerprint(), "executor": settings.executor, "workers": settings.workers,
            "walk_forward": None if settings.walk_forward is None else vars(settings.walk_forward),
            "period": [str(config.backtest.start), str(config.backtest.end)],
            "resume_with": f"python core/main.py {' '.join(_resume_argv(argv, folder))}",
        }
        write_json_atomic(manifest_path, manifest)
        config.to_yaml(folder / "base_config.yaml")
        started = time.perf_counter()
        context = build_context(config, console, forecaster)
        install_context(context)
        # The base configuration once in this process before the workers fork: it checks the set-up
        # end to end, is the "before" the summary compares the winner with, and leaves the memos
        # (entry candidates, quote paths) warm for every worker.
        with console.status("baseline: the base configuration once…"):
            baseline = evaluate({})
        executor = make_executor(settings, context)
        study = Study(storage, settings.study_name, settings.spec, local=settings.storage is None,
                      cash=config.backtest.cash)
        try:
            results = execute(settings, context, study, executor, console)
        finally:
            study.close()
            executor.close()
        results["seconds"] = time.perf_counter() - started
        results["executor"] = executor.name
        results["baseline"] = baseline
        with console.status("writing the run folder…"):
            written = report.write_results(folder, config, settings, results)
        manifest.update(status="complete", finished=pd.Timestamp.now(tz="UTC").isoformat(),
                        seconds=round(results["seconds"], 1), trials=results["trial_count"],
                        trials_per_second=round(results["trials_per_second"], 3))
        write_json_atomic(manifest_path, manifest)
        report.print_summary(console, settings, results, written)
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are kept in {folder}; resume with the same command and --out {folder}",
              file=sys.stderr)
        return 130
    finally:
        lock.release()
    return 0


def check_resume(folder, config: Config, settings: OptimizerSettings) -> None:
    """A resumed run folder must be resumed with the search and the base configuration it was
    started with: its study's trials would otherwise be mixed with (or taken for) trials of
    another period or other settings. Checked before anything in the folder is rewritten."""
    from core.report import to_json

    manifest = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    now = json.loads(to_json({"search": settings.spec.fingerprint(),
                              "walk_forward": None if settings.walk_forward is None else vars(settings.walk_forward)}))
    changed = [f"{key.replace('_', '-')} settings" for key in now if manifest.get(key) != now[key]]
    base = folder / "base_config.yaml"
    if base.is_file() and Config.from_yaml(base).to_dict() != config.to_dict():
        changed.append("base configuration (period or strategy settings)")
    if changed:
        raise OptimizerError(f"--out {folder}: this run folder was started with other {' and '.join(changed)}; "
                             f"resume it with {manifest.get('resume_with', 'the same command')}, or give a new --out")


def _resume_argv(argv: Sequence[str], folder) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--out":
            skip = True
            continue
        if item.startswith("--out="):
            continue
        out.append(item)
    return [*out, "--out", str(folder)]


def build_context(config: Config, console, forecaster=None) -> WorkerContext:
    """The market, μ_Mamba (with a progress bar: minutes on a CPU) and the base feature table,
    built once here; the workers inherit them."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from core.market_data import bar_features, load_market, neural_per_bar, uses_neural

    with console.status(f"loading {config.backtest.start} … {config.backtest.end}: embedded data, synthetic bars "
                        f"and chains…"):
        market = load_market(config)
    neural = None
    if uses_neural(config):
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task("DeepMamba forecasts (once for every trial)", total=len(market.bar_times))
            values, description = neural_per_bar(config, market, forecaster,
                                                 progress=lambda done, total: progress.update(task, completed=done,
                                                                                              total=total))
        neural = (values, description) if values is not None else None
    with console.status("features: indicators, MTF consensus, regime, memberships (once for every trial)…"):
        bar_features(config, market)
    return WorkerContext(config, market, neural)


def make_executor(settings: OptimizerSettings, context: WorkerContext):
    if settings.executor == "ray":
        return RayExecutor(settings.ray_address, context, settings.workers)
    if settings.workers == 1:
        return InlineExecutor()
    return ProcessExecutor(settings.workers)


def execute(settings: OptimizerSettings, context: WorkerContext, study: Study, executor, console) -> dict:
    """The search(es) with a progress bar per phase, then the statistics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    config = context.config
    spec = settings.spec
    searches: list[SearchOutcome] = []
    walk_rows = []
    oos_returns = []
    windows = [(None, None)]
    tail_note = None
    if settings.walk_forward is not None:
        windows, tail_note = walk_forward_windows(context.market.bar_times, settings.walk_forward,
                                                  longest_hold_days(config, spec.phases))
    new_trials = 0
    trial_seconds = 0.0
    wall_started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
                  _rate_column(), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        tasks: dict = {}

        def on_phase(window, phase):
            label = f"{window.label}: " if window is not None else ""
            tasks[(window, phase.number)] = progress.add_task(f"{label}phase {phase.number} {phase.title}",
                                                              total=spec.trials_in(phase))

        def on_trial(record, complete, target, window=None, phase=None):
            nonlocal new_trials, trial_seconds
            task = tasks[(window, phase.number)]
            if record is None:              # the phase starts (trials found finished on a resume)
                progress.update(task, completed=complete, total=max(target, complete))
                return
            new_trials += 1
            trial_seconds += record.seconds
            progress.update(task, completed=complete, total=max(target, complete))

        for in_sample, out_of_sample in windows:
            search = phased_search(study, in_sample, executor, on_trial=on_trial, on_phase=on_phase)
            searches.append(search)
            if out_of_sample is not None:
                best = search.best
                outcome = executor.submit(search.overrides, (out_of_sample.start, out_of_sample.stop), True).result()
                fit = None if outcome["error"] else fitness(outcome["metrics"], spec.objective, 0, config.backtest.cash)
                oos_returns.append(outcome["returns"])
                walk_rows.append({
                    "window": in_sample.index + 1, "in_sample": f"{in_sample.first_session} … {in_sample.last_session}",
                    "out_of_sample": f"{out_of_sample.first_session} … {out_of_sample.last_session}",
                    "is_fitness": best.fitness, "is_net_profit": best.metrics.get("net_profit"),
                    "is_max_drawdown": best.metrics.get("max_drawdown"), "is_trades": best.metrics.get("trade_count"),
                    "is_sharpe": best.metrics.get("sharpe"),
                    "oos_fitness": fit, "oos_net_profit": outcome["metrics"].get("net_profit"),
                    "oos_max_drawdown": outcome["metrics"].get("max_drawdown"),
                    "oos_trades": outcome["metrics"].get("trade_count"), "oos_sharpe": outcome["metrics"].get("sharpe"),
                    "is_returns": best.returns, "oos_returns": outcome["returns"],
                    "is_sessions": _window_sessions(context.market.bar_times, in_sample),
                    "oos_sessions": _window_sessions(context.market.bar_times, out_of_sample),
                    "choice": dict(search.overrides),
                    "oos_trades_frame": outcome.get("trades"),
                })
    wall = time.perf_counter() - wall_started
    final = searches[-1]
    statistics = [overfitting_statistics(search) for search in searches]
    sens = None
    if settings.sensitivity and final.best is not None:
        with console.status("sensitivity: one grid step from the optimum on each parameter…"):
            sens = sensitivity(final.overrides, spec.phases, final.window, executor, spec, config.backtest.cash,
                               final.best.fitness)
    best_equity = None
    if final.window is None:
        best_equity = executor.submit(final.overrides, None, True).result()
    total_trials = sum(len(search.trials) for search in searches)
    return {
        "searches": searches, "statistics": statistics, "sensitivity": sens, "walk_forward": walk_rows,
        "walk_forward_note": tail_note, "best_overrides": dict(final.overrides), "best_equity": best_equity,
        "sessions": _window_sessions(context.market.bar_times, None),
        "trial_count": total_trials, "new_trials": new_trials, "search_seconds": wall,
        "trial_seconds": trial_seconds,
        "trials_per_second": new_trials / wall if wall > 0 and new_trials else 0.0,
    }


def _window_sessions(bar_times: pd.DatetimeIndex, window: Window | None) -> pd.DatetimeIndex:
    times = bar_times if window is None else bar_times[window.start:window.stop]
    return pd.DatetimeIndex(pd.unique(times.tz_localize(None).normalize()))


def _rate_column():
    """A rich progress column: trials per second over the task so far (rich's own speed column
    shows bytes). Built on first use so that importing this module does not import rich."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("  … /s" if speed is None else f"{speed:5.1f}/s")

    return RateColumn()


def main(argv: Sequence[str] | None = None) -> int:
    """``python core/optimizer.py [flags]``: the same as ``python core/main.py --mode optimize``."""
    from core.main import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["--mode", "optimize", *argv])


if __name__ == "__main__":
    sys.exit(main())
