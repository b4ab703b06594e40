"""Turns a resolved `Config` into the market data a run uses: embedded daily bars, synthetic
intraday bars and the lazy synthetic option-chain provider, plus the `data.json` description.

The data_factory layer takes plain parameter objects and never imports `core`; this module is
the one place that maps the configuration's `synthetic` section onto them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analytics.vol_surface import SpreadParams, SurfaceParams
from core.config import Config
from data_factory.embedded import describe_embedded_data
from data_factory.errors import DataError
from data_factory.garch_proxy import GarchProxyConfig
from data_factory.intraday import describe_intraday
from data_factory.option_chain import SyntheticChainProvider

# The VIX measures S&P 500 volatility, so only the S&P 500 proxy gets VIX-anchored chains.
EMBEDDED_CHAIN_SYMBOLS = ("SPY",)


def surface_params(config: Config) -> SurfaceParams:
    synthetic = config.synthetic
    return SurfaceParams(long_run_variance=synthetic.theta_bar, mean_reversion=synthetic.kappa,
                         rho=synthetic.surface_rho, eta=synthetic.surface_eta,
                         gamma=synthetic.surface_gamma)


def spread_params(config: Config) -> SpreadParams:
    synthetic = config.synthetic
    return SpreadParams(a=synthetic.bid_ask_a, b=synthetic.bid_ask_b,
                        vix_exponent=synthetic.bid_ask_c, min_half=synthetic.bid_ask_min_half)


def garch_config(config: Config) -> GarchProxyConfig:
    return GarchProxyConfig(vrp_multiplier=config.synthetic.garch_vrp_multiplier)


def embedded_chain_provider(config: Config, freq: str = "5min", start=None,
                            end=None) -> SyntheticChainProvider:
    """Chain provider over the embedded data with the configured seed and surface, for the
    configured backtest period unless ``start``/``end`` narrow it (e.g. one day to inspect)."""
    backtest = config.backtest
    if backtest.underlying not in EMBEDDED_CHAIN_SYMBOLS:
        raise DataError(f"backtest.underlying = {backtest.underlying!r}: the embedded data synthesises option "
                        f"chains for {', '.join(EMBEDDED_CHAIN_SYMBOLS)} only (anchored on the VIX, an S&P 500 "
                        f"volatility index)")
    return SyntheticChainProvider.from_embedded(
        start=backtest.start if start is None else start, end=backtest.end if end is None else end,
        seed=backtest.seed, freq=freq,
        symbol=backtest.underlying, garch_config=garch_config(config),
        dividend_yield=config.synthetic.dividend_yield, surface=surface_params(config),
        spreads=spread_params(config), spot_vol_beta=config.synthetic.spot_vol_beta)


def describe_run_data(config: Config, provider: SyntheticChainProvider, freq: str = "5min") -> dict:
    """What a run's data was and which parts were synthetic (the run folder's data.json)."""
    return {
        "period": {"start": str(config.backtest.start), "end": str(config.backtest.end),
                   "sessions": len(provider.sessions), "bars": len(provider.bar_times),
                   "bar_frequency": freq},
        "underlying": config.backtest.underlying,
        "embedded": describe_embedded_data(),
        "intraday_bars": describe_intraday(config.backtest.seed, freq),
        "option_chains": provider.describe(),
    }


# Sessions of intraday bars replayed before the first traded session so that indicators
# (slow SMA 50 bars, ADX ~2x14, 15-minute EMA/ATR 20 bars = 300 minutes) are warm at the start.
FEATURE_WARMUP_SESSIONS = 10
# Calendar days of daily history before the start: a year of IV closes for the 252-session
# IV rank and enough sessions for the divergence z-score.
DAILY_HISTORY_DAYS = 400


def embedded_bar_features(config: Config, provider: SyntheticChainProvider, neural=None,
                          forecaster=None, progress=None):
    """The run's feature table (``intelligence.features``) from the embedded data: 1-minute bars
    of the same seed from a warm-up before the start, the provider's per-bar IV index, daily IV
    closes (GARCH proxy before 2014) and the SPY/QQQ daily closes.

    ``neural``: μ_Mamba per bar, or None; ``forecaster`` (``load_forecaster``): compute μ_Mamba
    here from the checkpoint, over the warm-up and run bars (batch inference, one window per bar;
    ``progress(done, total)`` reports it)."""
    from data_factory import embedded
    from data_factory.intraday import intraday_bars
    from data_factory.market_calendar import CALENDAR_START, trading_sessions
    from intelligence.features import compute_bar_features

    backtest = config.backtest
    first = provider.sessions[0]
    last = provider.sessions[-1]
    earlier = trading_sessions(max(first - pd.Timedelta(days=40), pd.Timestamp(CALENDAR_START)), first)
    earlier = earlier[earlier < first]
    warm_start = earlier[-FEATURE_WARMUP_SESSIONS] if len(earlier) >= FEATURE_WARMUP_SESSIONS else first
    try:
        daily_warm = embedded.daily_bars(backtest.underlying, warm_start, last)
    except DataError:
        daily_warm = embedded.daily_bars(backtest.underlying, first, last)
    base = intraday_bars(daily_warm, freq=f"{config.mtf.base_bar_minutes}min", seed=backtest.seed)
    history_start = max(first - pd.Timedelta(days=DAILY_HISTORY_DAYS), pd.Timestamp("2001-01-02"))
    daily_iv = embedded.daily_iv_index(history_start, last, garch_config=garch_config(config))["iv_index"]
    daily_spot = embedded.daily_bars(backtest.underlying, history_start, last)
    daily_pair = embedded.daily_bars("QQQ", history_start, last)
    daily_pair.attrs["symbol"] = "QQQ (NASDAQ Composite / 40 proxy, daily)"
    target = provider.bar_times.tz_convert("UTC").as_unit("ns").asi8
    session_close_ns = calendar_session_closes(base.index)
    if neural is None and forecaster is not None:
        neural = neural_memberships(forecaster, base, session_close_ns, daily_iv, target, config, progress)
    features = compute_bar_features(config, base, target, provider.iv_index_bars().to_numpy(), daily_iv,
                                daily_spot, daily_pair, neural=neural,
                                session_close_ns=session_close_ns)
    # The percentile skew rule's reference per bar (NaN unless the rule is in use): session-close
    # readings of the run's chains, with a year of embedded history before the start.
    from core.skew_history import embedded_skew_reference
    from intelligence.features import BarFeatures
    reference = np.ascontiguousarray(embedded_skew_reference(config, provider), dtype=float)
    features = BarFeatures({**features.columns, "skew_reference": reference}, features.close_ns,
                           features.description)
    if forecaster is not None:
        features.description["neural"] = {
            "model": str(forecaster.path), "lookback": forecaster.lookback,
            "trained_on": f"{forecaster.metadata.get('data_first_bar')} … {forecaster.metadata.get('data_last_bar')}",
            "method": "one lookback window per bar (as trained); 0.5 until the window is full",
        }
    return features


def neural_memberships(forecaster, base, session_close_ns, daily_iv, target, config: Config, progress=None):
    """μ_Mamba per trading bar from the 5-minute bars (built from ``base``, warm-up included;
    ``session_close_ns`` per base bar as in ``calendar_session_closes``) and the causal per-bar IV
    index the model was trained on."""
    import torch

    from intelligence.features import TRADING_BAR_MINUTES
    from intelligence.mamba_data import causal_bar_iv_index
    from intelligence.mtf_consensus import resample_session_bars

    bars = resample_session_bars(base, TRADING_BAR_MINUTES, config.mtf.base_bar_minutes, session_close_ns)
    index = pd.DatetimeIndex(pd.to_datetime(bars.close_ns, unit="ns", utc=True)).tz_convert("America/New_York")
    frame = pd.DataFrame({"open": bars.open, "high": bars.high, "low": bars.low, "close": bars.close,
                          "volume": bars.volume}, index=index)
    iv = causal_bar_iv_index(frame, daily_iv, spot_vol_beta=config.synthetic.spot_vol_beta)
    # One thread: a small model runs fastest single-threaded on this class of machine, and two
    # threads collapse when anything else is busy (performance-facts, the training logs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return forecaster.neural_membership_per_bar(frame, iv, target, progress=progress)
    finally:
        torch.set_num_threads(threads)


def load_configured_forecaster(config: Config, explicit: bool, check_size: tuple = ()):
    """The checkpoint at ``mamba.weights_path`` (relative paths from the project root), checked
    against ``mamba.d_model``/``n_layers`` when those were given; None when ``use_neural`` is off
    or the default file is absent (``explicit`` False). ConfigError for an explicit path that
    cannot be used."""
    from pathlib import Path

    from core.config import ConfigError
    from intelligence.mamba_inference import ModelFileError, load_forecaster

    if not config.mamba.use_neural:
        return None
    path = Path(config.mamba.weights_path)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent.parent / path
    if not path.is_file() and not explicit:
        return None
    try:
        forecaster = load_forecaster(path)
    except ModelFileError as error:
        raise ConfigError(f"mamba.weights_path: {error}") from None
    shape = forecaster.metadata["model_config"]
    for field in check_size:
        key = {"d_model": "d_model", "n_layers": "n_layers"}[field]
        if int(shape[key]) != getattr(config.mamba, field):
            raise ConfigError(f"mamba.{field} = {getattr(config.mamba, field)} but the model {path} has "
                              f"{key} {shape[key]}: pass the matching --mamba-model, or train one of that "
                              f"size (python -m intelligence.train_mamba --d-model … --layers …)")
    return forecaster

def calendar_session_closes(bar_index: pd.DatetimeIndex):
    """The exchange calendar's close (UTC ns, early closes included) of the session of every bar
    in a tz-aware bar index: what ``intelligence.mtf_consensus`` needs to stamp the last bar of a
    session, even when the data ends before the session does."""
    from data_factory.market_calendar import session_bounds

    days = pd.DatetimeIndex(bar_index.tz_convert("America/New_York").tz_localize(None).normalize())
    sessions = days.unique()
    closes = pd.DatetimeIndex(session_bounds(sessions)["close"]).tz_convert("UTC").as_unit("ns")
    return pd.Series(closes.asi8, index=sessions).reindex(days).to_numpy()


# ----------------------------------------------------------------------------------------------
# Per-process caches: the data and the feature tables load once, whatever number of runs
# ----------------------------------------------------------------------------------------------

# Settings the feature table does NOT depend on, per section it reads: the gate thresholds and
# switches are applied to the finished table per run (``strategies.entry_gates.bar_gate_codes``),
# the chain-level checks and wing rules at the entry. A test perturbs each of them and checks
# that the table is unchanged, so a run that changes only these reuses the cached table.
FEATURE_INDEPENDENT_FIELDS = {
    "filters": {"iv_rank_min", "vix_threshold", "vix_threshold_low", "max_volatility_pct", "use_liquidity_gate",
                "vrp_threshold", "skew_threshold", "gap_small_threshold", "use_entry_gates", "use_vix_gate",
                "use_vrp_gate", "use_volatility_cap", "use_gap_rule", "gap_rule_minutes",
                "use_probability_filter", "max_breach_probability", "liquidity_max_spread_to_credit",
                "use_divergence_bias", "divergence_wing_increment"},
    "momentum": {"rsi_neutral_min", "rsi_neutral_max", "stoch_neutral_min", "stoch_neutral_max",
                 "adx_threshold_low", "use_adx_filter", "use_rsi_filter", "use_stoch_filter"},
    "trend": {"bbands_squeeze_threshold", "sma_max_distance", "use_psar_filter", "use_bbands_filter",
              "use_sma_filter"},
    "mtf": {"use_mtf", "consensus_min", "consensus_max"},
    "fuzzy": {"use_fuzzy", "min_confidence"},
    "regime": {"use_regime_wings", "wing_scale_crash", "wing_scale_low_vol"},
}
# Sections the features read (others — exits, risk, hedge, sizing, data_pipeline — never matter).
FEATURE_SECTIONS = ("filters", "momentum", "trend", "mtf", "fuzzy", "regime", "synthetic")
_MARKET_FIELDS = ("start", "end", "seed", "underlying")
_CACHE_SIZE = 4
_markets: dict = {}
_features: dict = {}


def _remember(cache: dict, key, value):
    # Insertion order is use order (a hit is re-inserted): the least recently used goes first.
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    return value


def market_key(config: Config) -> tuple:
    """The settings the embedded market data depends on."""
    import json

    backtest = config.backtest
    return (tuple(str(getattr(backtest, name)) for name in _MARKET_FIELDS),
            json.dumps(config.synthetic.model_dump(), sort_keys=True))


def load_market(config: Config) -> SyntheticChainProvider:
    """The embedded chain provider for ``config``, built once per process per period, seed and
    synthetic settings."""
    key = market_key(config)
    market = _markets.pop(key, None)
    if market is None:
        market = embedded_chain_provider(config)
    return _remember(_markets, key, market)


def uses_neural(config: Config) -> bool:
    """Whether a run's confidence C should carry the DeepMamba forecasts: the fuzzy confidence is
    used and the neural factor is on (the checkpoint is loaded if present)."""
    return bool(config.fuzzy.use_fuzzy and config.mamba.use_neural)


def feature_key(config: Config) -> str:
    """The settings a run's feature table depends on, as one string."""
    import json

    parts = {}
    for section in FEATURE_SECTIONS:
        values = getattr(config, section).model_dump()
        for name in FEATURE_INDEPENDENT_FIELDS.get(section, ()):
            values.pop(name, None)
        parts[section] = values
    parts["market"] = market_key(config)[0]
    parts["skew_dte"] = [config.strategy.dte_min, config.strategy.dte_max, config.strategy.use_skew_penalty,
                         config.filters.use_entry_gates]
    parts["neural"] = config.mamba.model_dump() if uses_neural(config) else None
    return json.dumps(parts, sort_keys=True, default=str)


def bar_features(config: Config, market, forecaster=None, progress=None):
    """The feature table of ``config`` on ``market`` (an embedded chain provider), built once per
    process per market and per settings it depends on (``feature_key``). With ``uses_neural``
    the DeepMamba checkpoint at ``mamba.weights_path`` supplies μ_Mamba (``forecaster`` if given,
    else loaded; a missing default checkpoint leaves μ = 0.5); ``progress(done, total)`` reports
    that inference."""
    key = (id(market), feature_key(config))
    cached = _features.pop(key, None)
    if cached is not None and cached[0] is market:
        _features[key] = cached             # most recently used last: evicted last
        return cached[1]
    if uses_neural(config) and forecaster is None:
        forecaster = load_configured_forecaster(config, explicit=False)
    features = embedded_bar_features(config, market, forecaster=forecaster if uses_neural(config) else None,
                                     progress=progress)
    _remember(_features, key, (market, features))
    return features
