"""Topological (TDA) features of returns: persistent homology of sliding-window delay embeddings.

Owns: ``rolling_tda_features`` (one row per return, causal), ``tda_features_at`` (rows at chosen
window ends only), ``session_tda_features`` (one row per intraday session), ``lagged_close_tda``
(one row per session close, lagged one session: what the bar table and the DeepMamba inputs use),
the helpers ``delay_embedding`` and ``session_log_returns``, ``TDA_COLUMNS`` and ``TDAInputError``.

Method, per window of the trailing ``window`` log returns ending at a point (nothing after it):

1. scale-normalise: divide the window by its own standard deviation, so a calm and a stormy
   quarter with the same *shape* give the same features (volatility is already a feature of its
   own; these columns say how the returns are arranged, not how large they are). The mean is
   irrelevant: a delay embedding's distances do not change when every return shifts by a constant;
2. delay-embed it: points ``(r_t, r_{t+tau}, ..., r_{t+(dim-1)tau})``, ``window - (dim-1)tau`` points;
3. Vietoris-Rips persistence of that point cloud (H0 and H1), by GUDHI's Ripser fork, truncated at
   the cloud's enclosing radius (beyond it the complex is a cone: nothing is born or dies there, so
   the diagrams are exact);
4. summarise the diagrams into the ``TDA_COLUMNS`` (all in normalised units):

   tda_h0_total      sum of H0 bar lengths (finite bars; the one infinite bar is dropped)
   tda_h1_total      sum of H1 bar lengths (= the area under the Betti-1 curve)
   tda_h1_max        longest H1 bar: the most persistent loop (a cycle in the return dynamics)
   tda_h0_entropy    persistence entropy of H0: -sum p log p, p = length / total (nats)
   tda_h1_entropy    the same for H1 (0 when there is at most one loop)
   tda_betti1_peak   the largest number of H1 loops alive at one filtration scale
   tda_betti1_mid    Betti-1 at the median H0 death scale (the scale where half the points have
                     merged), so the probe scale follows the cloud rather than a fixed constant

A window whose returns are all equal (standard deviation 0 to rounding) embeds to one point: every
feature is 0. Rows before the first full window are NaN.

Cost: one library call per window (the diagrams of overlapping windows share no work that Ripser
could reuse); ~0.4 ms for the default 58-point cloud, so five years of daily closes costs about half
a second. Intraday, one value per *session* (``session_tda_features``) instead of one per 5-minute
bar keeps five years of bars at about a second; see ``benchmarks/bench_tda.py``.

Library: GUDHI (``gudhi`` wheel, no runtime dependency beyond numpy). Its Ripser fork is called
directly on a dense distance matrix (``gudhi._ripser_ext._full``, the routine behind
``gudhi.sklearn.RipsPersistence``, used here without scikit-learn); if a GUDHI release moves it,
the public ``SimplexTree`` path computes the same diagrams (a test holds the two equal).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist, squareform

import gudhi

try:  # the fast path: GUDHI's Ripser fork on a dense distance matrix
    from gudhi._ripser_ext import _full as _gudhi_ripser_full
except ImportError:  # pragma: no cover - only on a GUDHI that renamed its private module
    _gudhi_ripser_full = None

__all__ = ["TDA_COLUMNS", "TDAInputError", "delay_embedding", "rolling_tda_features", "tda_features_at",
           "session_tda_features", "session_log_returns", "persistence_diagrams", "lagged_close_tda",
           "min_lagged_closes"]

TDA_COLUMNS = ("tda_h0_total", "tda_h1_total", "tda_h1_max", "tda_h0_entropy", "tda_h1_entropy",
               "tda_betti1_peak", "tda_betti1_mid")

DEFAULT_WINDOW = 60        # daily: about a quarter of sessions
DEFAULT_DIM = 3
DEFAULT_TAU = 1
MIN_POINTS = 10            # fewer embedded points than this give diagrams too sparse to mean anything
DEFAULT_SESSION_WINDOW = 78  # intraday: one session of 5-minute returns
# Ripser over Z/2: loops in a 3-D cloud of returns carry no torsion worth a larger field.
_COEFF_FIELD = 2


class TDAInputError(ValueError):
    """A TDA parameter or input that cannot give features; the message names the parameter."""


def _check_params(n_returns: int, window: int, dim: int, tau: int) -> None:
    for name, value in (("window", window), ("dim", dim), ("tau", tau)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TDAInputError(f"tda: {name} must be an integer, got {value!r}")
    if dim < 2:
        raise TDAInputError(f"tda: dim (embedding dimension) must be >= 2, got {dim}")
    if tau < 1:
        raise TDAInputError(f"tda: tau (embedding delay) must be >= 1, got {tau}")
    needed = (dim - 1) * tau + MIN_POINTS
    if window < needed:
        raise TDAInputError(f"tda: window={window} is too short for dim={dim}, tau={tau}: the embedding "
                            f"needs window >= (dim-1)*tau + {MIN_POINTS} = {needed} returns")
    if window > n_returns:
        raise TDAInputError(f"tda: window={window} is longer than the data ({n_returns} returns); "
                            f"shorten the TDA window or supply more history")


def _as_returns(log_returns) -> np.ndarray:
    returns = np.asarray(log_returns, dtype=float)
    if returns.ndim != 1:
        raise TDAInputError(f"tda: log_returns must be one-dimensional, got shape {returns.shape}")
    bad = np.flatnonzero(~np.isfinite(returns))
    if len(bad):
        raise TDAInputError(f"tda: log_returns has {len(bad)} non-finite value(s), first at position "
                            f"{bad[0]} ({returns[bad[0]]}); drop or fill them before computing TDA features")
    return returns


def delay_embedding(x: np.ndarray, dim: int, tau: int) -> np.ndarray:
    """Points ``(x_t, x_{t+tau}, ..., x_{t+(dim-1)tau})``: shape ``(len(x) - (dim-1)tau, dim)``."""
    x = np.asarray(x, dtype=float)
    n_points = len(x) - (dim - 1) * tau
    if n_points < 1:
        raise TDAInputError(f"tda: {len(x)} values are too few to embed with dim={dim}, tau={tau}")
    return np.lib.stride_tricks.sliding_window_view(x, (dim - 1) * tau + 1)[:n_points, ::tau]


def _diagrams_simplex_tree(distances: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    tree = gudhi.SimplexTree.create_from_array(distances, max_filtration=radius)
    tree.collapse_edges()
    tree.expansion(2)
    tree.compute_persistence(homology_coeff_field=_COEFF_FIELD, persistence_dim_max=True)
    return (np.asarray(tree.persistence_intervals_in_dimension(0)).reshape(-1, 2),
            np.asarray(tree.persistence_intervals_in_dimension(1)).reshape(-1, 2))


def persistence_diagrams(points: np.ndarray, fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """H0 and H1 Vietoris-Rips diagrams (``(k, 2)`` birth/death arrays) of a point cloud.

    ``fast=False`` uses GUDHI's public SimplexTree (edge-collapsed); both give the same diagrams.
    H0 holds one infinite bar (the component that never dies).
    """
    distances = squareform(pdist(points))
    # Enclosing radius: at this scale one point reaches all others and the complex is a cone.
    radius = float(distances.max(axis=1).min())
    if fast and _gudhi_ripser_full is not None:
        diagrams = _gudhi_ripser_full(distances, max_dimension=1, max_edge_length=radius,
                                      homology_coeff_field=_COEFF_FIELD)
        h1 = diagrams[1] if len(diagrams) > 1 else np.empty((0, 2))
        return np.asarray(diagrams[0]).reshape(-1, 2), np.asarray(h1).reshape(-1, 2)
    return _diagrams_simplex_tree(distances, radius)


def _entropy(lengths: np.ndarray) -> float:
    total = lengths.sum()
    if total <= 0.0:
        return 0.0
    p = lengths[lengths > 0.0] / total
    return float(-(p * np.log(p)).sum())


def _betti_at(intervals: np.ndarray, scale: float) -> int:
    return int(((intervals[:, 0] <= scale) & (intervals[:, 1] > scale)).sum())


def _betti_peak(intervals: np.ndarray) -> int:
    if len(intervals) == 0:
        return 0
    # Sweep: +1 at each birth, -1 at each death; deaths sort before births at equal scales.
    scales = np.concatenate([intervals[:, 0], intervals[:, 1]])
    steps = np.concatenate([np.ones(len(intervals)), -np.ones(len(intervals))])
    return int(np.cumsum(steps[np.lexsort((steps, scales))]).max())


def _summarise(h0: np.ndarray, h1: np.ndarray) -> tuple[float, ...]:
    h0_deaths = h0[np.isfinite(h0[:, 1]), 1]
    h1 = h1[np.isfinite(h1[:, 1])]
    h1_lengths = h1[:, 1] - h1[:, 0]
    mid_scale = float(np.median(h0_deaths)) if len(h0_deaths) else 0.0
    return (float(h0_deaths.sum()), float(h1_lengths.sum()),
            float(h1_lengths.max()) if len(h1_lengths) else 0.0,
            _entropy(h0_deaths), _entropy(h1_lengths),
            float(_betti_peak(h1)), float(_betti_at(h1, mid_scale)))


def _window_features(window_returns: np.ndarray, embedded: np.ndarray) -> tuple[float, ...]:
    """``embedded``: the delay embedding of the raw ``window_returns`` (scaled here, not re-embedded)."""
    scale = window_returns.std()
    # All returns equal (to rounding): the embedding is one point, no topology at all.
    if not scale > 1e-12 * max(float(np.abs(window_returns).max()), 1e-300):
        return (0.0,) * len(TDA_COLUMNS)
    return _summarise(*persistence_diagrams(embedded / scale))


def tda_features_at(log_returns, ends, window: int = DEFAULT_WINDOW, dim: int = DEFAULT_DIM,
                    tau: int = DEFAULT_TAU) -> pd.DataFrame:
    """The ``TDA_COLUMNS`` of the windows ``log_returns[end - window + 1 : end + 1]`` for each end.

    One row per entry of ``ends`` (positions in ``log_returns``); an end with fewer than ``window``
    returns up to it gets NaN. Raises ``TDAInputError`` on bad parameters or non-finite returns.
    """
    returns = _as_returns(log_returns)
    _check_params(len(returns), window, dim, tau)
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    if len(ends) and (ends.min() < 0 or ends.max() >= len(returns)):
        raise TDAInputError(f"tda: ends must be positions in log_returns (0..{len(returns) - 1}), "
                            f"got {ends.min()}..{ends.max()}")
    values = np.full((len(ends), len(TDA_COLUMNS)), np.nan)
    # Embed the whole series once: a window's embedding is a run of consecutive rows of it.
    embedded = delay_embedding(returns, dim, tau)
    n_points = window - (dim - 1) * tau
    for row, end in enumerate(ends):
        if end >= window - 1:
            start = end - window + 1
            values[row] = _window_features(returns[start:end + 1], embedded[start:start + n_points])
    return pd.DataFrame(values, columns=list(TDA_COLUMNS))


def rolling_tda_features(log_returns, window: int = DEFAULT_WINDOW, dim: int = DEFAULT_DIM,
                         tau: int = DEFAULT_TAU) -> pd.DataFrame:
    """Row ``t``: the ``TDA_COLUMNS`` of the trailing ``window`` returns ending at ``t`` (causal).

    Same length as ``log_returns``, NaN for the first ``window - 1`` rows; the index is the input's
    when it is a Series, else a RangeIndex. For daily closes pass ``np.diff(np.log(close))`` and
    shift by one row to align with the closes (row ``t`` of the returns ends at close ``t + 1``).
    """
    returns = _as_returns(log_returns)
    _check_params(len(returns), window, dim, tau)
    frame = tda_features_at(returns, np.arange(len(returns)), window, dim, tau)
    if isinstance(log_returns, pd.Series):
        frame.index = log_returns.index
    return frame


def session_log_returns(open_, close, session) -> np.ndarray:
    """Intraday log returns that never span the overnight gap.

    Bar ``i``'s return is ``log(close_i / close_{i-1})`` inside a session and ``log(close_i /
    open_i)`` for a session's first bar: the overnight gap (a different process, often ten times a
    5-minute move) would otherwise dominate a scale-normalised window.
    """
    open_, close = np.asarray(open_, dtype=float), np.asarray(close, dtype=float)
    session = np.asarray(session)
    previous = np.r_[np.nan, close[:-1]]
    first = np.r_[True, session[1:] != session[:-1]]
    return np.log(close / np.where(first, open_, previous))


def session_tda_features(log_returns, session, window: int = DEFAULT_SESSION_WINDOW, dim: int = DEFAULT_DIM,
                         tau: int = DEFAULT_TAU) -> pd.DataFrame:
    """One row per session: the ``TDA_COLUMNS`` of the trailing ``window`` returns ending at the
    session's last bar (so they are known at that session's close, and belong to the *next*
    session's bars). ``session``: a label per return (e.g. the session date), sessions contiguous.

    Indexed by the session labels in order; NaN for sessions with fewer than ``window`` returns
    up to their close.
    """
    returns = _as_returns(log_returns)
    session = np.asarray(session)
    if len(session) != len(returns):
        raise TDAInputError(f"tda: session has {len(session)} labels for {len(returns)} returns")
    _check_params(len(returns), window, dim, tau)
    last = np.r_[session[1:] != session[:-1], True] if len(session) else np.zeros(0, bool)
    ends = np.flatnonzero(last)
    frame = tda_features_at(returns, ends, window, dim, tau)
    frame.index = pd.Index(session[ends], name="session")
    return frame



def min_lagged_closes(window: int) -> int:
    """Closes ``lagged_close_tda`` needs before its first defined row: row ``k`` is defined from
    ``k = window + 1`` on (``window`` returns need ``window + 1`` closes, all before session ``k``)."""
    return window + 1


def lagged_close_tda(close, window: int = DEFAULT_WINDOW, dim: int = DEFAULT_DIM,
                     tau: int = DEFAULT_TAU) -> np.ndarray:
    """``(len(close), 7)`` float64: row ``k`` holds the ``TDA_COLUMNS`` of the trailing ``window``
    log returns of ``close`` ending at close ``k - 1``, so it is known before session ``k`` opens
    (lagged one session; close ``k`` and later never enter row ``k``). NaN for the first
    ``min_lagged_closes(window)`` rows (all rows when ``close`` is that short or shorter).

    ``close``: one close per session, in time order (daily bars' closes, or the last intraday bar
    of each session). Raises ``TDAInputError`` on bad parameters or a non-positive / non-finite
    close (naming its position).
    """
    close = np.asarray(close, dtype=float)
    if close.ndim != 1:
        raise TDAInputError(f"tda: close must be one-dimensional, got shape {close.shape}")
    bad = np.flatnonzero(~(np.isfinite(close) & (close > 0.0)))
    if len(bad):
        raise TDAInputError(f"tda: {len(bad)} close(s) are not positive finite numbers, first at position "
                            f"{bad[0]} of {len(close)} ({close[bad[0]]})")
    out = np.full((len(close), len(TDA_COLUMNS)), np.nan)
    first = min_lagged_closes(window)
    if len(close) <= first:
        _check_params(window, window, dim, tau)   # bad parameters still fail loudly
        return out
    # Returns ending at closes 1 .. n-2 (the last close is never read: it belongs to no lagged row).
    returns = np.diff(np.log(close[:-1]))
    out[2:] = rolling_tda_features(returns, window, dim, tau).to_numpy()
    return out
