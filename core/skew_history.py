"""The percentile skew rule's per-bar reference for a run on the embedded data, with the history
from before the run's first session (``intelligence.skew_reference`` does the work; this module
only builds the history provider, which needs ``core.market_data``).

History: a second chain provider over the ``filters.skew_lookback_sessions`` sessions just before
the run's first session (about a year with the default 252), clipped to the first day of the
embedded IV index (2001-01-02). Its session-close readings are the same numbers a provider over
the whole span would give (the synthetic chains of a day do not depend on the period's start).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analytics.skew import SkewMethod
from core.config import Config
from core.market_data import embedded_chain_provider, garch_config
from intelligence.skew_reference import session_close_skews, session_last_bars, skew_reference_for_bars

__all__ = ["embedded_skew_history", "embedded_skew_reference", "skew_rule_needs_reference"]


def skew_rule_needs_reference(config: Config) -> bool:
    """Whether a run's wing plans can use the percentile reference at all."""
    filters, strategy = config.filters, config.strategy
    return filters.use_entry_gates and strategy.use_skew_penalty and filters.skew_rule == "percentile"


def embedded_skew_history(config: Config, first_session, sessions: int | None = None,
                          method: SkewMethod = "interpolated") -> np.ndarray:
    """Session-close 15-delta skew readings (oldest first) of the ``sessions`` embedded sessions
    before ``first_session`` (default ``filters.skew_lookback_sessions``); fewer when the data
    starts later, empty when none precede it. ``method``: ``analytics.skew.chain_skew``'s
    reading (the engine uses the default)."""
    from data_factory import embedded
    from data_factory.market_calendar import trading_sessions

    count = config.filters.skew_lookback_sessions if sessions is None else int(sessions)
    first = pd.Timestamp(first_session)
    if first.tzinfo is not None:
        first = first.tz_convert("America/New_York").tz_localize(None)
    first = first.normalize()
    earliest = embedded.daily_iv_index(garch_config=garch_config(config)).index[0]
    if count < 1 or first <= earliest:
        return np.zeros(0)
    # ~1.45 calendar days per session; 2x + 10 days is always enough.
    candidates = trading_sessions(max(first - pd.Timedelta(days=2 * count + 10), earliest), first)
    candidates = candidates[candidates < first][-count:]
    if len(candidates) == 0:
        return np.zeros(0)
    provider = embedded_chain_provider(config, start=candidates[0].date(), end=candidates[-1].date())
    strategy = config.strategy
    return session_close_skews(lambda bar: provider.slice_at(bar, strategy.dte_min, strategy.dte_max),
                               session_last_bars(provider.bar_times), method=method)


def embedded_skew_reference(config: Config, provider, history: bool = True,
                            only_if_used: bool = True) -> np.ndarray:
    """The percentile skew rule's reference at every bar of ``provider`` (an embedded-data chain
    provider of the run: ``provider.bar_times``, ``provider.slice_at``), float64, one value per
    bar: pass ``reference[bar]`` to ``plan_wings(..., skew_reference=...)``.

    ``history``: prepend the session-close readings of the embedded sessions before the
    provider's first session, so the reference exists from the first bar; False: only the run's
    own sessions (NaN until ``filters.skew_min_sessions`` of them have closed).
    ``only_if_used``: all NaN, with no chain read, when ``skew_rule_needs_reference`` is False
    (seed rule, skew penalty off, or no Stage-2 gates)."""
    bar_times = provider.bar_times
    if only_if_used and not skew_rule_needs_reference(config):
        return np.full(len(bar_times), np.nan)
    strategy = config.strategy
    past = embedded_skew_history(config, bar_times[0]) if history and len(bar_times) else None
    return skew_reference_for_bars(lambda bar: provider.slice_at(bar, strategy.dte_min, strategy.dte_max),
                                   bar_times, config.filters, strategy.dte_min, strategy.dte_max,
                                   history_skews=past)
