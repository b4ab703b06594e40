"""Entry gates on the bar's features (Stage 2): which bars may open a condor at all.

Computed once per run over every bar (one vectorised pass), so a driver only looks up a code per
bar. A code names the FIRST gate that failed in the priority order of ``GATE_REASONS``; 0 means
every enabled gate passed. Gates that need the option chain (VRP against the ATM IV, the breach
probability of the chosen strikes, liquidity) are checked later, on the chosen condor
(``strategies.condor_adjustments``).

Toggles: ``filters.use_entry_gates`` False turns off every filter gate (the mechanical condor);
the MTF band (``mtf.use_mtf``) and the fuzzy floor (``fuzzy.use_fuzzy`` with
``fuzzy.min_confidence``) are scenario switches and apply independently of it.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Code i (1-based) is GATE_REASONS[i]; the order is the priority when several gates fail.
GATE_REASONS = (
    "",
    "features_warmup",
    "vix_above_max",
    "iv_rank_below_min",
    "recent_move_above_cap",
    "large_gap_open",
    "adx_trending",
    "rsi_outside_neutral",
    "stoch_outside_neutral",
    "psar_trend",
    "bbands_expansion",
    "sma_distance_too_large",
    "mtf_consensus_outside_band",
    "fuzzy_confidence_below_min",
)
GATE_CODE = {reason: code for code, reason in enumerate(GATE_REASONS) if reason}


def _gates(columns: Mapping[str, np.ndarray], config) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
    """(reason, feature columns it reads, fails-mask) of every enabled gate. NaN comparisons are
    False, so a NaN input never fails a gate here; the warm-up gate catches it."""
    filters, momentum, trend = config.filters, config.momentum, config.trend
    gates = []
    if filters.use_entry_gates:
        if filters.use_vix_gate:
            gates.append(("vix_above_max", ("iv_index",), columns["iv_index"] > filters.vix_threshold))
        if filters.iv_rank_min > 0:
            gates.append(("iv_rank_below_min", ("iv_rank",), columns["iv_rank"] < filters.iv_rank_min))
        if filters.use_volatility_cap:
            gates.append(("recent_move_above_cap", ("recent_move",),
                          columns["recent_move"] > filters.max_volatility_pct))
        if filters.use_gap_rule and filters.gap_rule_minutes > 0:
            gates.append(("large_gap_open", ("gap_pct",),
                          (columns["gap_pct"] > filters.gap_small_threshold)
                          & (columns["minutes_since_open"] <= filters.gap_rule_minutes)))
        if momentum.use_adx_filter:
            gates.append(("adx_trending", ("adx",), columns["adx"] > momentum.adx_threshold_low))
        if momentum.use_rsi_filter:
            rsi = columns["rsi"]
            gates.append(("rsi_outside_neutral", ("rsi",),
                          (rsi < momentum.rsi_neutral_min) | (rsi > momentum.rsi_neutral_max)))
        if momentum.use_stoch_filter:
            k = columns["stoch_k"]
            gates.append(("stoch_outside_neutral", ("stoch_k",),
                          (k < momentum.stoch_neutral_min) | (k > momentum.stoch_neutral_max)))
        if trend.use_psar_filter:
            gates.append(("psar_trend", ("psar_position",), np.abs(columns["psar_position"]) >= 1.0))
        if trend.use_bbands_filter:
            gates.append(("bbands_expansion", ("bb_width",), columns["bb_width"] > trend.bbands_squeeze_threshold))
        if trend.use_sma_filter:
            gates.append(("sma_distance_too_large", ("sma_distance",),
                          np.abs(columns["sma_distance"]) > trend.sma_max_distance))
    if config.mtf.use_mtf:
        consensus = columns["mtf_consensus"]
        gates.append(("mtf_consensus_outside_band", ("mtf_consensus",),
                      (consensus < config.mtf.consensus_min) | (consensus > config.mtf.consensus_max)))
    if config.fuzzy.use_fuzzy and config.fuzzy.min_confidence > 0:
        gates.append(("fuzzy_confidence_below_min", ("confidence",),
                      columns["confidence"] < config.fuzzy.min_confidence))
    return gates


def bar_gate_codes(columns: Mapping[str, np.ndarray], config) -> np.ndarray:
    """Per bar: 0 when every enabled gate passes, else the code of the first failing gate
    (``GATE_REASONS[code]`` is its reason). A bar where an enabled gate's input is NaN (indicator
    warm-up) gets ``features_warmup``."""
    gates = _gates(columns, config)
    n = len(next(iter(columns.values())))
    codes = np.zeros(n, dtype=np.int8)
    # Assign from the lowest priority up, so the highest-priority failure is what stays.
    for reason, _, fails in sorted(gates, key=lambda gate: -GATE_CODE[gate[0]]):
        codes[fails] = GATE_CODE[reason]
    needed = {name for _, names, _ in gates for name in names}
    if needed:
        warming = np.zeros(n, dtype=bool)
        for name in needed:
            warming |= np.isnan(columns[name])
        codes[warming] = GATE_CODE["features_warmup"]
    return codes


def gate_summary(codes: np.ndarray) -> dict[str, int]:
    """How many bars each gate blocked (first failing gate only), for reports."""
    counts = np.bincount(codes.astype(np.int64), minlength=len(GATE_REASONS))
    return {GATE_REASONS[code]: int(count) for code, count in enumerate(counts) if code and count}
