"""Align vendor option-chain snapshot times to bar times, with lag accounting and diagnostics.

Vendor chain snapshots are stamped whenever the vendor took them; bars are stamped at their CLOSE
time (``data_factory.intraday``: the 09:30–09:35 bar is stamped 09:35). This module decides, per
bar, which snapshot (if any) the bar may trade on, how old it is, and how much its implied
volatilities are still trusted. Pure NumPy: one ``searchsorted`` over the whole bar array, no
per-bar Python loop.

**No look-ahead, ever.** A bar uses only a snapshot stamped at or before the bar's close time; a
snapshot one nanosecond after the bar is invisible to that bar. Lags are ``bar time − snapshot
time`` and therefore never negative.

Times: ``bar_times`` and ``snapshot_times`` are tz-aware ``DatetimeIndex`` / ``Series`` / pyarrow
timestamp arrays, or int64 arrays of nanoseconds since the epoch (UTC). tz-naive datetimes are
refused (DataError): whether a naive 09:35 is New York or UTC is a five-hour look-ahead question,
not something to guess. Integer times must lie between 1980 and 2200 as nanoseconds, else
DataError: that catches seconds or microseconds passed as nanoseconds (pandas 3 infers
microsecond resolution for many indexes, and ``DatetimeIndex.asi8`` follows the index's unit).
Snapshot times must be strictly increasing (sorted and unique), else DataError naming the first
offending position. Bar times may come in any order. NaT is refused. Bad parameters (unknown
mode, negative tolerance or limit, ``tol > limit`` in prior/stale) raise ValueError, not DataError.

Lag limits: ``LAG_LIMITS_S`` per symbol (SPY/QQQ 600 s, SPX/SPXW 900 s; symbol matched
case-insensitively), ``DEFAULT_LAG_LIMIT_S`` for any other symbol, ``max_lag_s`` overrides both.
"Within the limit" means ``lag <= limit`` (a snapshot exactly 600 s old is still fine for SPY).

IV confidence: ``iv_conf = 0.5 ** (lag_s / IV_CONF_HALF_LIFE_S)`` (half-life 300 s: 1.0 fresh,
0.5 at 5 min, 0.25 at 10 min); 0.0 for a bar that uses no snapshot.

Modes (``ALIGNMENT_MODES``; ``tol`` = ``exact_tolerance_s``, ``limit`` = the symbol's lag limit;
"the latest snapshot" = the latest snapshot stamped at or before the bar):

* ``exact``: a bar uses a snapshot only if one is stamped at the bar time, i.e. the latest
  snapshot's lag is ``<= tol`` (tolerance only ever looks backwards: at or before the bar). Status
  ``exact``, lag as measured (0, or up to ``tol``), iv_conf from that lag. Every other bar: ``none``.
  The lag limit plays no part (``tol`` may exceed it) and there is no fail-fast check.
* ``prior``: the latest snapshot. Status ``exact`` when lag ``<= tol``, ``prior`` when lag
  ``<= limit``; beyond the limit the bar gets ``none`` (the snapshot is too old to trade on).
  iv_conf from the lag. Requires ``tol <= limit``.
* ``stale``: like ``prior``, but a snapshot beyond the limit is still used, with status ``stale``;
  its iv_conf has decayed accordingly (0.5 ** (lag/300) — about 0.06 at 20 min). Requires
  ``tol <= limit``.
* ``none``: no lag accounting. The latest snapshot, whatever its age, status ``exact`` (lag
  ``<= tol``) or ``prior``, iv_conf 1.0. Lags are still measured, stored in ``lag_s`` and reported by
  the diagnostics: the user chose to ignore them, the diagnostics still show the truth. No
  fail-fast check.
* In every mode a bar before the first snapshot (no snapshot at or before it) has status ``none``,
  snapshot −1, lag NaN, iv_conf 0.

Fail-fast (``fail_fast=True``, modes ``prior`` and ``stale`` only). The *stale rate* is
``bars whose latest snapshot is older than the limit / bars that have any snapshot at or before
them``. In ``stale`` mode the numerator is the ``stale`` bars; in ``prior`` mode it is the bars
that fell back to ``none`` because of the limit — they count as stale too, so a feed that is
mostly too old does not silently turn into "no trades". If the rate is ABOVE ``stale_fail_rate``
(20 %; exactly 20 % passes) ``align_snapshots`` raises DataError stating the rate, the limit, the
worst lag and the time of the earliest stale bar. Also under fail-fast in these two modes: if
there are bars but not one of them has a snapshot at or before it (no snapshots at all, or all
after the last bar) the rate is undefined and the feed is useless, so that raises DataError too.

Status encoding: ``Alignment.status`` is an int8 code array indexing ``STATUS_NAMES``
(``STATUS_NONE`` = 0 "none", ``STATUS_EXACT`` = 1 "exact", ``STATUS_PRIOR`` = 2 "prior",
``STATUS_STALE`` = 3 "stale"); ``Alignment.status_labels()`` gives the strings.

Diagnostics (``Alignment.diagnostics()``, JSON-ready, NaN written as None): bar count, count and
percent of all bars per status, exact-match percent, usable count/percent, bars before the first
snapshot, the stale rate as fail-fast computes it, lag quantiles p50/p90/p99/max/mean over the
usable bars (``lag_s``) and over every bar with any earlier snapshot (``raw_lag_s``, the truth
whatever the mode), iv_conf mean/min/p10 over the usable bars. Quantiles are NumPy's default
(linear interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_factory.errors import DataError

ALIGNMENT_MODES = ("exact", "prior", "stale", "none")
LAG_LIMITS_S = {"SPY": 600.0, "QQQ": 600.0, "SPX": 900.0, "SPXW": 900.0}
DEFAULT_LAG_LIMIT_S = 600.0
IV_CONF_HALF_LIFE_S = 300.0
STALE_FAIL_RATE = 0.20

STATUS_NAMES = ("none", "exact", "prior", "stale")
STATUS_NONE, STATUS_EXACT, STATUS_PRIOR, STATUS_STALE = range(len(STATUS_NAMES))

EXCHANGE_TZ = "America/New_York"      # how times are written in messages
_NS_PER_S = 1_000_000_000
_NAT = np.iinfo(np.int64).min
_INT64_MAX = np.iinfo(np.int64).max
# Integer times must fall in [1980, 2200) as ns: catches seconds/microseconds passed as ns.
_PLAUSIBLE_NS = (pd.Timestamp("1980-01-01", tz="UTC").value, pd.Timestamp("2200-01-01", tz="UTC").value)


def lag_limit(symbol: str, override: float | None = None) -> float:
    """The lag limit in seconds for ``symbol`` (``LAG_LIMITS_S``, else ``DEFAULT_LAG_LIMIT_S``);
    ``override`` wins when given (``>= 0``; ``inf`` means no limit)."""
    if override is not None:
        value = float(override)
        if not value >= 0.0:                     # also catches NaN
            raise ValueError(f"max_lag_s must be >= 0 seconds (inf for no limit), got {override!r}")
        return value
    return float(LAG_LIMITS_S.get(str(symbol).strip().upper(), DEFAULT_LAG_LIMIT_S))


def iv_confidence(lag_s: np.ndarray, half_life_s: float = IV_CONF_HALF_LIFE_S) -> np.ndarray:
    """``0.5 ** (lag_s / half_life_s)`` elementwise (float64); NaN lag gives 0.0. The half-life is
    ``data_pipeline.iv_conf_half_life_sec`` (300 s by default, the seed's figure)."""
    if not (np.isfinite(half_life_s) and half_life_s > 0):
        raise ValueError(f"half_life_s must be a positive number of seconds, got {half_life_s!r}")
    lag = np.asarray(lag_s, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        conf = np.power(0.5, lag / float(half_life_s))
    return np.where(np.isnan(lag), 0.0, conf)


def _fmt_time(ns: int) -> str:
    return str(pd.Timestamp(int(ns), tz="UTC").tz_convert(EXCHANGE_TZ))


def _fmt_s(seconds: float) -> str:
    return f"{seconds:,.0f} s" if np.isfinite(seconds) else "no limit"


def _as_ns(values, what: str) -> np.ndarray:
    """``values`` as a 1-d int64 array of UTC nanoseconds (see the module docstring)."""
    integer_input = False
    if isinstance(values, (pd.Series, pd.Index)) or not isinstance(values, np.ndarray):
        try:
            import pyarrow as pa
            if isinstance(values, (pa.Array, pa.ChunkedArray)):
                if not pa.types.is_timestamp(values.type):
                    raise DataError(f"{what}: a pyarrow {values.type} array is not a timestamp array")
                if values.type.tz is None:
                    raise DataError(f"{what}: tz-naive timestamps; pass tz-aware times or int64 ns UTC")
                if values.null_count:
                    raise DataError(f"{what}: {values.null_count} missing (null) times")
                values = np.asarray(values.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()),
                                    dtype=np.int64)
        except ImportError:                       # pragma: no cover - pyarrow is a dependency
            pass
    if isinstance(values, pd.Series):
        values = pd.Index(values)
    if not isinstance(values, (np.ndarray, pd.Index)):
        arr = np.asarray(values)
        values = arr if arr.dtype.kind in "iu" else pd.Index(values)
    if isinstance(values, pd.Index):
        if isinstance(values, pd.DatetimeIndex) or values.dtype.kind == "M":
            idx = pd.DatetimeIndex(values)
            if idx.tz is None:
                raise DataError(f"{what}: tz-naive times; pass tz-aware times (e.g. America/New_York) "
                                "or int64 nanoseconds UTC")
            out = idx.as_unit("ns").asi8
        elif values.dtype.kind in "iu":
            out = values.to_numpy()
            integer_input = True
        elif len(values) == 0:
            out = np.empty(0, dtype=np.int64)
        else:
            raise DataError(f"{what}: expected tz-aware times or int64 nanoseconds UTC, got {values.dtype}")
    else:
        if values.dtype.kind == "M":
            raise DataError(f"{what}: tz-naive datetime64 array; pass tz-aware times or int64 nanoseconds UTC")
        if values.dtype.kind not in "iu":
            if values.size == 0:
                values = values.astype(np.int64)
            else:
                raise DataError(f"{what}: expected tz-aware times or int64 nanoseconds UTC, got {values.dtype}")
        out = values
        integer_input = True
    out = np.ascontiguousarray(out, dtype=np.int64)
    if out.ndim != 1:
        raise DataError(f"{what}: expected a 1-d array of times, got shape {out.shape}")
    if out.size and (out == _NAT).any():
        raise DataError(f"{what}: missing time (NaT) at position {int(np.flatnonzero(out == _NAT)[0])}")
    if integer_input and out.size:
        bad = np.flatnonzero((out < _PLAUSIBLE_NS[0]) | (out >= _PLAUSIBLE_NS[1]))
        if bad.size:
            raise DataError(f"{what}: integer time {int(out[bad[0]])} at position {int(bad[0])} is not "
                            "nanoseconds since the epoch between 1980 and 2200 (microseconds? pandas 3 "
                            "DatetimeIndex.asi8 follows the index's unit: use .as_unit('ns').asi8)")
    return out


def _check_strictly_increasing(times: np.ndarray, what: str) -> None:
    if times.size < 2:
        return
    step = np.diff(times)
    bad = np.flatnonzero(step <= 0)
    if bad.size:
        pos = int(bad[0]) + 1
        kind = "duplicate" if step[bad[0]] == 0 else "out of order"
        raise DataError(f"{what}: {kind} time at position {pos} ({_fmt_time(times[pos])} after "
                        f"{_fmt_time(times[pos - 1])} at position {pos - 1}); snapshot times must be "
                        "sorted ascending and unique")


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.quantile(values, [0.5, 0.9, 0.99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(values.max()),
            "mean": float(values.mean())}


def _pct(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


@dataclass(frozen=True, eq=False)
class Alignment:
    """Per-bar result of ``align_snapshots`` (all arrays have one entry per bar, read-only).

    ``snapshot``: int64 index into the snapshot times, −1 = no snapshot used. ``lag_s``: float64
    ``bar − used snapshot`` in seconds, NaN when none is used. ``status``: int8 codes into
    ``STATUS_NAMES`` (0 none, 1 exact, 2 prior, 3 stale). ``iv_conf``: float64, 0 where none.
    ``raw_lag_s``: lag to the latest snapshot at or before the bar whatever the mode decided (NaN
    only before the first snapshot) — what fail-fast and the diagnostics measure.
    """
    mode: str
    symbol: str
    lag_limit_s: float
    snapshot: np.ndarray
    lag_s: np.ndarray
    status: np.ndarray
    iv_conf: np.ndarray
    raw_lag_s: np.ndarray = field(repr=False)
    exact_tolerance_s: float = 0.0
    n_snapshots: int = 0
    half_life_s: float = IV_CONF_HALF_LIFE_S

    def __len__(self) -> int:
        return int(self.snapshot.size)

    def usable(self) -> np.ndarray:
        """Bool per bar: the bar uses a snapshot."""
        return self.snapshot >= 0

    def status_labels(self) -> np.ndarray:
        """Status per bar as strings ("none", "exact", "prior", "stale")."""
        return np.asarray(STATUS_NAMES, dtype=object)[self.status]

    def counts(self) -> dict:
        tally = np.bincount(self.status, minlength=len(STATUS_NAMES))
        return {name: int(tally[code]) for code, name in enumerate(STATUS_NAMES)}

    def stale_rate(self) -> tuple[int, int]:
        """(bars whose latest snapshot is older than the limit, bars with any snapshot at or before
        them): the fail-fast numerator and denominator, whatever the mode."""
        has = ~np.isnan(self.raw_lag_s)
        beyond = has & (self.raw_lag_s > self.lag_limit_s)
        return int(beyond.sum()), int(has.sum())

    def diagnostics(self) -> dict:
        """JSON-ready summary (see the module docstring); percentages are of all bars."""
        n = len(self)
        counts = self.counts()
        used = self.usable()
        has = ~np.isnan(self.raw_lag_s)
        beyond, with_snapshot = self.stale_rate()
        conf = self.iv_conf[used]
        return {
            "mode": self.mode,
            "symbol": self.symbol,
            "lag_limit_s": float(self.lag_limit_s) if np.isfinite(self.lag_limit_s) else None,
            "exact_tolerance_s": float(self.exact_tolerance_s),
            "half_life_s": float(self.half_life_s),
            "bars": n,
            "snapshots": int(self.n_snapshots),
            "snapshots_used": int(np.unique(self.snapshot[used]).size),
            "counts": counts,
            "pct": {name: _pct(count, n) for name, count in counts.items()},
            "exact_match_pct": _pct(counts["exact"], n),
            "usable": int(used.sum()),
            "usable_pct": _pct(int(used.sum()), n),
            "before_first_snapshot": int(n - has.sum()),
            "beyond_limit": beyond,
            "stale_rate_pct": _pct(beyond, with_snapshot),
            "lag_s": _quantiles(self.lag_s[used]),
            "raw_lag_s": _quantiles(self.raw_lag_s[has]),
            "iv_conf": {"mean": float(conf.mean()) if conf.size else None,
                        "min": float(conf.min()) if conf.size else None,
                        "p10": float(np.quantile(conf, 0.1)) if conf.size else None},
        }

    def summary_lines(self) -> list[str]:
        """A few human lines for the terminal."""
        d = self.diagnostics()

        def num(value, fmt="{:,.0f}"):
            return "n/a" if value is None else fmt.format(value)

        lines = [f"chain alignment: {self.symbol}, mode {self.mode}, lag limit {_fmt_s(self.lag_limit_s)}, "
                 f"exact tolerance {self.exact_tolerance_s:g} s, {d['snapshots']} snapshots "
                 f"({d['snapshots_used']} used)"]
        lines.append(f"  bars {d['bars']}: " + ", ".join(
            f"{name} {d['counts'][name]} ({num(d['pct'][name], '{:.1f}')} %)"
            for name in ("exact", "prior", "stale", "none")))
        lag = d["lag_s"]
        lines.append(f"  lag over used bars (s): p50 {num(lag['p50'])}, p90 {num(lag['p90'])}, "
                     f"p99 {num(lag['p99'])}, max {num(lag['max'])}")
        conf = d["iv_conf"]
        lines.append(f"  iv_conf over used bars: mean {num(conf['mean'], '{:.3f}')}, "
                     f"min {num(conf['min'], '{:.3f}')}, p10 {num(conf['p10'], '{:.3f}')}")
        _, with_snapshot = self.stale_rate()
        lines.append(f"  latest snapshot older than the limit: {d['beyond_limit']} of {with_snapshot} bars "
                     f"({num(d['stale_rate_pct'], '{:.1f}')} %); before the first snapshot: "
                     f"{d['before_first_snapshot']} bars; worst lag {num(d['raw_lag_s']['max'])} s")
        return lines


def _freeze(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.setflags(write=False)


def align_snapshots(bar_times, snapshot_times, mode: str = "prior", symbol: str = "SPY",
                    max_lag_s: float | None = None, exact_tolerance_s: float = 0.0,
                    fail_fast: bool = True, stale_fail_rate: float = STALE_FAIL_RATE,
                    half_life_s: float = IV_CONF_HALF_LIFE_S) -> Alignment:
    """Align each bar to the latest snapshot at or before it, per ``mode`` (module docstring).

    Raises DataError for bad times (naive, NaT, snapshots unsorted or duplicated) and, with
    ``fail_fast`` in ``prior``/``stale`` mode, for a stale rate above ``stale_fail_rate``;
    ValueError for bad parameters.
    """
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"alignment mode must be one of {ALIGNMENT_MODES}, got {mode!r}")
    tol = float(exact_tolerance_s)
    if not (np.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"exact_tolerance_s must be finite and >= 0, got {exact_tolerance_s!r}")
    rate_limit = float(stale_fail_rate)
    if not 0.0 <= rate_limit <= 1.0:
        raise ValueError(f"stale_fail_rate must lie in [0, 1], got {stale_fail_rate!r}")
    limit = lag_limit(symbol, max_lag_s)
    if mode in ("prior", "stale") and tol > limit:
        raise ValueError(f"exact_tolerance_s {tol:g} exceeds the lag limit {limit:g} s in {mode} mode")
    symbol = str(symbol).strip().upper()

    bars = _as_ns(bar_times, "bar times")
    snaps = _as_ns(snapshot_times, "snapshot times")
    _check_strictly_increasing(snaps, "snapshot times")

    latest = np.searchsorted(snaps, bars, side="right").astype(np.int64) - 1   # snaps[latest] <= bar
    has = latest >= 0
    raw_lag_ns = np.zeros(bars.size, dtype=np.int64)
    raw_lag_ns[has] = bars[has] - snaps[latest[has]]
    raw_lag_s = np.where(has, raw_lag_ns / _NS_PER_S, np.nan)

    tol_ns = int(round(tol * _NS_PER_S))
    limit_ns = min(_INT64_MAX, int(round(limit * _NS_PER_S))) if np.isfinite(limit) else _INT64_MAX
    is_exact = has & (raw_lag_ns <= tol_ns)
    within = has & (raw_lag_ns <= limit_ns)
    beyond = has & ~within

    status = np.full(bars.size, STATUS_NONE, dtype=np.int8)
    if mode == "exact":
        used = is_exact
    elif mode == "prior":
        used = within
    else:                                   # stale, none: the latest snapshot whatever its age
        used = has
    status[used] = STATUS_PRIOR
    if mode == "stale":
        status[beyond] = STATUS_STALE
    status[is_exact] = STATUS_EXACT         # is_exact implies used in every mode

    snapshot = np.where(used, latest, -1).astype(np.int64)
    lag_s = np.where(used, raw_lag_s, np.nan)
    if mode == "none":
        iv_conf = np.where(used, 1.0, 0.0)
    else:
        iv_conf = iv_confidence(lag_s, half_life_s)
    _freeze(snapshot, lag_s, status, iv_conf, raw_lag_s)
    result = Alignment(mode=mode, symbol=symbol, lag_limit_s=limit, snapshot=snapshot, lag_s=lag_s,
                       status=status, iv_conf=iv_conf, raw_lag_s=raw_lag_s, exact_tolerance_s=tol,
                       n_snapshots=int(snaps.size), half_life_s=float(half_life_s))

    if fail_fast and mode in ("prior", "stale") and bars.size:
        n_with = int(has.sum())
        if n_with == 0:
            where = ("there are no snapshots" if snaps.size == 0 else
                     f"the first snapshot ({_fmt_time(snaps[0])}) is after the last bar ({_fmt_time(bars.max())})")
            raise DataError(f"chain alignment ({symbol}, {mode} mode): none of the {bars.size} bars has a "
                            f"snapshot at or before it: {where}")
        n_beyond = int(beyond.sum())
        if n_beyond / n_with > rate_limit:
            stale_bars = bars[beyond]
            first = stale_bars.min()
            worst = float(raw_lag_s[beyond].max())
            what = "are stale" if mode == "stale" else "fell back to none (counted as stale)"
            raise DataError(
                f"chain alignment ({symbol}, {mode} mode): {n_beyond} of {n_with} bars with a snapshot "
                f"{what}: stale rate {100.0 * n_beyond / n_with:.1f} % is above the fail-fast "
                f"{100.0 * rate_limit:.1f} %; lag limit {_fmt_s(limit)}, worst lag {worst:,.0f} s, "
                f"first stale bar {_fmt_time(first)}")
    return result


def row_confidence(quote_times_ns: np.ndarray, bar_time_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``(quote_age_s, iv_conf)`` for the rows of a chain slice used at ``bar_time_ns``.

    ``quote_times_ns``: each row's quote time (int64 ns UTC, or tz-aware times); ``bar_time_ns``:
    the bar's close time (int ns UTC or a tz-aware Timestamp). Every row must be quoted at or before
    the bar; a row quoted after it is look-ahead and raises DataError naming the first such row.
    """
    quotes = _as_ns(quote_times_ns, "quote times")
    if isinstance(bar_time_ns, pd.Timestamp) or hasattr(bar_time_ns, "tzinfo"):
        stamp = pd.Timestamp(bar_time_ns)
        if stamp.tzinfo is None:
            raise DataError("bar time: tz-naive; pass a tz-aware time or int64 nanoseconds UTC")
        bar = int(stamp.as_unit("ns").value)
    else:
        bar = int(bar_time_ns)
    ahead = quotes > bar
    if ahead.any():
        row = int(np.flatnonzero(ahead)[0])
        raise DataError(f"chain slice: row {row} is quoted at {_fmt_time(quotes[row])}, after the bar at "
                        f"{_fmt_time(bar)} ({int(ahead.sum())} rows in all): look-ahead")
    age_s = (bar - quotes) / _NS_PER_S
    return age_s, iv_confidence(age_s)
