"""Turns a resolved `Config` into the market data a run uses: embedded daily bars, synthetic
intraday bars and the lazy synthetic option-chain provider, plus the `data.json` description.

The data_factory layer takes plain parameter objects and never imports `core`; this module is
the one place that maps the configuration's `synthetic` section onto them.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd

from analytics.vol_surface import SpreadParams, SurfaceParams
from core.config import FUZZY_FACTORS, Config
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
    if is_vendor_market(provider):
        chains = provider.describe()
        return {
            "period": {"start": str(provider.sessions[0].date()), "end": str(provider.sessions[-1].date()),
                       "requested": [str(config.backtest.start), str(config.backtest.end)],
                       "sessions": len(provider.sessions), "bars": len(provider.bar_times),
                       "bar_frequency": "one decision bar per vendor snapshot (5-minute grid)"},
            "label": f"{config.backtest.underlying}, your option chains" + (
                ", synthetic intraday paths for the indicators"
                if vendor_intraday_description(config, provider)["synthetic"] else ", your intraday bars"),
            "underlying": config.backtest.underlying,
            "option_chains": chains,
            "intraday_bars": vendor_intraday_description(config, provider),
        }
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


def embedded_feature_inputs(config: Config, provider: SyntheticChainProvider) -> dict:
    """What a feature table of the embedded data is built from: 1-minute bars of the run's seed
    from a warm-up before the start (``base``), the calendar close of each base bar's session,
    daily IV closes (GARCH proxy before 2014), SPY/QQQ daily bars and the trading bars' close
    times (UTC ns)."""
    from data_factory import embedded
    from data_factory.intraday import intraday_bars
    from data_factory.market_calendar import CALENDAR_START, trading_sessions

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
    daily_pair = embedded.daily_bars("QQQ", history_start, last)
    daily_pair.attrs["symbol"] = "QQQ (NASDAQ Composite / 40 proxy, daily)"
    return {
        "base": base,
        "session_close_ns": calendar_session_closes(base.index),
        "daily_iv": embedded.daily_iv_index(history_start, last, garch_config=garch_config(config))["iv_index"],
        "daily_spot": embedded.daily_bars(backtest.underlying, history_start, last),
        "daily_pair": daily_pair,
        "target": provider.bar_times.tz_convert("UTC").as_unit("ns").asi8,
    }


def embedded_bar_features(config: Config, provider: SyntheticChainProvider, neural=None,
                          forecaster=None, progress=None):
    """The run's feature table (``intelligence.features``) from the embedded data
    (``embedded_feature_inputs``) and the provider's per-bar IV index.

    ``neural``: μ_Mamba per bar, or None; ``forecaster`` (``load_forecaster``): compute μ_Mamba
    here from the checkpoint, over the warm-up and run bars (batch inference, one window per bar;
    ``progress(done, total)`` reports it)."""
    from intelligence.features import compute_bar_features

    inputs = embedded_feature_inputs(config, provider)
    description = None
    if neural is None and forecaster is not None:
        neural, description = neural_from_inputs(config, inputs, forecaster, progress)
    features = compute_bar_features(config, inputs["base"], inputs["target"], provider.iv_index_bars().to_numpy(),
                                    inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"], neural=neural,
                                    session_close_ns=inputs["session_close_ns"])
    # The percentile skew rule's reference per bar (NaN unless the rule is in use): session-close
    # readings of the run's chains, with a year of embedded history before the start.
    from core.skew_history import embedded_skew_reference
    from intelligence.features import BarFeatures
    reference = np.ascontiguousarray(embedded_skew_reference(config, provider), dtype=float)
    features = BarFeatures({**features.columns, "skew_reference": reference}, features.close_ns,
                           features.description)
    if description is not None:
        features.description["neural"] = description
    return features


def embedded_neural_memberships(config: Config, provider: SyntheticChainProvider, forecaster, progress=None):
    """μ_Mamba per trading bar of ``provider`` from the checkpoint ``forecaster``, and a
    description of where it came from."""
    inputs = vendor_feature_inputs(config, provider) if is_vendor_market(provider) else embedded_feature_inputs(config, provider)
    return neural_from_inputs(config, inputs, forecaster, progress)


def neural_from_inputs(config: Config, inputs: dict, forecaster, progress=None):
    values = neural_memberships(forecaster, inputs["base"], inputs["session_close_ns"], inputs["daily_iv"],
                                inputs["target"], config, progress, earlier_closes=earlier_session_closes(inputs))
    description = {
        "model": str(forecaster.path), "lookback": forecaster.lookback,
        "trained_on": f"{forecaster.metadata.get('data_first_bar')} … {forecaster.metadata.get('data_last_bar')}",
        "method": forecaster.method(),
    }
    return values, description


def neural_memberships(forecaster, base, session_close_ns, daily_iv, target, config: Config, progress=None,
                       earlier_closes=None):
    """μ_Mamba per trading bar from the 5-minute bars (built from ``base``, warm-up included;
    ``session_close_ns`` per base bar as in ``calendar_session_closes``) and the causal per-bar IV
    index the model was trained on. ``earlier_closes``: the traded symbol's daily closes before
    the bars, for a model with TDA inputs (``earlier_session_closes``)."""
    frame, iv = model_bars(base, session_close_ns, daily_iv, config)
    with one_torch_thread():
        return forecaster.neural_membership_per_bar(frame, iv, target, progress=progress,
                                                    earlier_closes=earlier_closes)


def earlier_session_closes(inputs: dict):
    """The traded symbol's daily closes (``inputs['daily_spot']``, a year and more before the
    start) that a model with TDA inputs reads for the sessions before the replayed bars; None
    when the inputs have none."""
    daily = inputs.get("daily_spot")
    return None if daily is None else daily["close"]


def model_bars(base, session_close_ns, daily_iv, config: Config):
    """What DeepMamba reads: the 5-minute bars built from ``base`` (tz-aware close-time index,
    open high low close volume) and the causal per-bar IV index the model was trained on."""
    from intelligence.features import TRADING_BAR_MINUTES
    from intelligence.mamba_data import causal_bar_iv_index
    from intelligence.mtf_consensus import resample_session_bars

    bars = resample_session_bars(base, TRADING_BAR_MINUTES, config.mtf.base_bar_minutes, session_close_ns)
    index = pd.DatetimeIndex(pd.to_datetime(bars.close_ns, unit="ns", utc=True)).tz_convert("America/New_York")
    frame = pd.DataFrame({"open": bars.open, "high": bars.high, "low": bars.low, "close": bars.close,
                          "volume": bars.volume}, index=index)
    iv = causal_bar_iv_index(frame, daily_iv, spot_vol_beta=config.synthetic.spot_vol_beta)
    return frame, iv


@contextmanager
def one_torch_thread():
    """One torch thread inside the block: a small model runs fastest single-threaded on this
    class of machine, and two threads collapse when anything else is busy (performance-facts,
    the training logs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_configured_forecaster(config: Config, explicit: bool, check_size: tuple = ()):
    """The checkpoint at ``mamba.weights_path`` (relative paths from the project root), checked
    against ``mamba.d_model``/``n_layers`` when those were given; None when ``use_neural`` is off
    or the default file is absent (``explicit`` False). ConfigError for an explicit path that
    cannot be used."""
    from core.config import ConfigError
    from intelligence.mamba_inference import ModelFileError, load_forecaster

    if not config.mamba.use_neural:
        return None
    path = _weights_file(config)
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
    "filters": {"iv_rank_min", "vix_threshold", "max_volatility_pct", "use_liquidity_gate",
                "vrp_threshold", "skew_threshold", "gap_small_threshold", "use_entry_gates", "use_vix_gate",
                "use_vrp_gate", "use_volatility_cap", "use_gap_rule", "gap_rule_minutes",
                "use_probability_filter", "max_breach_probability", "liquidity_max_spread_to_credit",
                "use_divergence_bias", "divergence_wing_increment", "pop_source", "diffusion_paths"},
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
_MARKET_FIELDS = ("start", "end", "seed", "underlying", "options_data")
_CACHE_SIZE = 8
_markets: dict = {}
_features: dict = {}
_neural: dict = {}


def _remember(cache: dict, key, value, size: int = _CACHE_SIZE):
    # Insertion order is use order (a hit is re-inserted): the least recently used goes first.
    cache[key] = value
    while len(cache) > size:
        cache.pop(next(iter(cache)))
    return value


# ----------------------------------------------------------------------------------------------
# The trader's own option data (--options-data: a chain store or vendor files)
# ----------------------------------------------------------------------------------------------

def is_vendor_market(market) -> bool:
    from data_factory.vendor_market import VendorChainMarket

    return isinstance(getattr(market, "market", market), VendorChainMarket)


def options_store(path, progress=None):
    """The ``ChainStore`` of ``--options-data PATH``: a store directory as it is, or vendor
    files / a folder of them ingested once into a cache store keyed by their paths, sizes and
    modification times (``$CONDORBRAIN_CACHE`` or ~/.cache/condorbrain/stores)."""
    import hashlib
    import os
    from pathlib import Path

    from data_factory.chain_store import ChainStore, ingest

    source = Path(path).expanduser()
    if ChainStore.is_store(source):
        return ChainStore.open(source)
    if not source.exists():
        raise DataError(f"--options-data {path}: no such file, folder or chain store")
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")) \
        if source.is_dir() else [source]
    if not files:
        raise DataError(f"--options-data {path}: the folder holds no files")
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = Path(os.environ.get("CONDORBRAIN_CACHE") or Path.home() / ".cache" / "condorbrain") / "stores"
    store_dir = cache / digest.hexdigest()[:20]
    if not ChainStore.is_store(store_dir):
        ingest([source], store_dir, progress=progress)
    return ChainStore.open(store_dir)


def load_vendor_market(config: Config, progress=None):
    """The bar contract over ``backtest.options_data`` for the configured period, narrowed to the
    sessions the store covers (a gap inside them is an error)."""
    from data_factory.vendor_market import VendorChainMarket

    from core.config import BacktestConfig

    backtest, strategy, pipeline = config.backtest, config.strategy, config.data_pipeline
    store = options_store(backtest.options_data, progress)
    dates = store.dates()
    if not len(dates):
        raise DataError(f"--options-data {backtest.options_data}: the store holds no option chains")
    start, end = pd.Timestamp(backtest.start), pd.Timestamp(backtest.end)
    defaults = BacktestConfig()
    if (backtest.start, backtest.end) == (defaults.start, defaults.end) and (end < dates[0] or start > dates[-1]):
        # The period was never chosen (the embedded data's default): the store's own.
        start, end = dates[0], dates[-1]
    elif end < dates[0] or start > dates[-1]:
        raise DataError(f"--options-data {backtest.options_data}: the requested period {start.date()} … {end.date()} "
                        f"has no chains (the data covers {dates[0].date()} … {dates[-1].date()}); pick dates inside "
                        f"it with --bt-start/--bt-end")
    start, end = max(start, dates[0]), min(end, dates[-1])
    # Held condors are quoted until they close: the window reaches from expiry day to dte_max.
    market = VendorChainMarket.from_store(
        store, start=start, end=end, underlying=backtest.underlying,
        dte_cap=max(strategy.dte_max, 1), alignment=pipeline_settings(pipeline, backtest.underlying),
        rate_of=lambda days: vendor_rates(days, backtest.risk_free_rate),
        dividend_yield_of=lambda days: np.full(len(days), float(config.synthetic.dividend_yield)))
    vendor_entry_window_end(config, market)
    return market


def vendor_entry_window_end(config: Config, market) -> str:
    """The entry window's end a run on ``market`` (user option data) uses: the configured one when
    some decision bar falls inside the window; for end-of-day chains (no bar inside, every bar
    after the window) with the window's end left at its default, the latest snapshot time, so EOD
    data trades at its snapshot, one decision bar per session, as the vendor published it. A
    window set by the user that the data never reaches is a ConfigError: no condor could open."""
    from core.config import ConfigError, StrategyConfig
    from core.engine import clock_minutes

    strategy = config.strategy
    start, end = clock_minutes(strategy.entry_window_start), clock_minutes(strategy.entry_window_end)
    minutes = np.asarray(market.bar_times.hour * 60 + market.bar_times.minute)
    if ((minutes >= start) & (minutes <= end)).any():
        return strategy.entry_window_end
    if strategy.entry_window_end == StrategyConfig().entry_window_end and (minutes > end).all():
        latest = int(minutes.max())
        return f"{latest // 60:02d}:{latest % 60:02d}"
    times = sorted({f"{stamp:%H:%M}" for stamp in market.bar_times[:500]})
    raise ConfigError(
        f"--options-data {config.backtest.options_data}: every decision bar is outside the entry window "
        f"{strategy.entry_window_start} … {strategy.entry_window_end} (the chains are snapshots at "
        f"{', '.join(times[:6])}{' …' if len(times) > 6 else ''}), so no condor could ever open. End-of-day "
        f"data trades at its snapshot: put `strategy: {{entry_window_end: \"{times[-1]}\"}}` in a --config file, "
        f"or expand the chains intraday with data_factory/expand_options_intraday.py")


def vendor_rates(days, fixed: float | None) -> np.ndarray:
    """The risk-free rate per session for solving user option data: ``backtest.risk_free_rate``
    when set, else the embedded Fama-French series (which ends 2019-01: later sessions need the
    setting, refused with a message naming it)."""
    from core.config import ConfigError
    from data_factory import embedded

    days = pd.DatetimeIndex(days)
    if fixed is not None:
        return np.full(len(days), float(fixed))
    try:
        return embedded.risk_free_rate(days).to_numpy(dtype=float)
    except DataError as error:
        raise ConfigError(f"the option data runs past the embedded risk-free rate series ({error}); set "
                          f"backtest.risk_free_rate (e.g. 0.045) in a --config file: it is used where the vendor "
                          f"gives no IV or Greeks") from None


def pipeline_settings(pipeline, symbol: str) -> dict:
    """``data_factory.chain_alignment.align_snapshots`` keywords from the data_pipeline section."""
    limit = pipeline.max_lag_sec.get(symbol.upper())
    return {"mode": pipeline.alignment_mode, "max_lag_s": None if limit is None else float(limit),
            "fail_fast": pipeline.fail_fast, "stale_fail_rate": pipeline.max_stale_rate,
            "half_life_s": pipeline.iv_conf_half_life_sec}


def vendor_intraday_description(config: Config, market) -> dict:
    """What the multi-timeframe indicators of a vendor-data run read: the user's bars from the
    store when complete, else synthetic paths (and why)."""
    base, what = market.user_base_bars(config.mtf.base_bar_minutes)
    if base is not None:
        return {"synthetic": False, "what": what + " feed the multi-timeframe indicators"}
    return {"synthetic": True,
            "what": f"SYNTHETIC intraday paths through {market.daily_bars()[1]} feed the multi-timeframe indicators "
                    f"only ({what}); quotes and fills are the vendor's"}


def vendor_feature_inputs(config: Config, market) -> dict:
    """``compute_bar_features`` inputs for a vendor chain market: synthetic intraday base bars
    through the market's daily bars (a warm-up of FEATURE_WARMUP_SESSIONS before the first
    session where the daily bars have them), the chains' session-close IV index as the daily IV
    (the embedded IV history before it for the IV rank where that covers), daily bars of the
    underlying and, where the embedded data covers the period, of QQQ."""
    from data_factory import embedded
    from data_factory.intraday import intraday_bars

    daily, daily_what = market.daily_bars()
    base, base_what = market.user_base_bars(config.mtf.base_bar_minutes)
    if base is None:
        why = base_what
        base = intraday_bars(daily, freq=f"{config.mtf.base_bar_minutes}min", seed=config.backtest.seed)
        base_what = f"SYNTHETIC intraday paths through {daily_what} ({why})"
    iv = market.iv_index_bars()
    chain_iv = iv.groupby(iv.index.tz_localize(None).normalize()).last()
    first = market.sessions[0]
    try:
        history = embedded.daily_iv_index(first - pd.Timedelta(days=DAILY_HISTORY_DAYS), first,
                                          garch_config=garch_config(config))["iv_index"]
        history = history[history.index < first]
    except DataError:
        history = pd.Series(dtype=float)
    daily_iv = pd.concat([history, chain_iv])
    try:
        pair = embedded.daily_bars("QQQ", first - pd.Timedelta(days=DAILY_HISTORY_DAYS), market.sessions[-1])
        pair = pair if market.sessions.isin(pair.index).all() else None
    except DataError:
        pair = None
    return {"base": base, "session_close_ns": calendar_session_closes(base.index), "daily_iv": daily_iv,
            "daily_spot": daily, "daily_pair": pair, "base_description": base_what,
            "target": market.bar_times.tz_convert("UTC").as_unit("ns").asi8}


def vendor_bar_features(config: Config, market, neural=None):
    from intelligence.features import BarFeatures, compute_bar_features

    from core.skew_history import embedded_skew_reference

    inputs = vendor_feature_inputs(config, market)
    features = compute_bar_features(config, inputs["base"], inputs["target"], market.iv_index_bars().to_numpy(),
                                    inputs["daily_iv"], inputs["daily_spot"], inputs["daily_pair"], neural=neural,
                                    session_close_ns=inputs["session_close_ns"])
    reference = np.ascontiguousarray(embedded_skew_reference(config, market, history=False), dtype=float)
    features = BarFeatures({**features.columns, "skew_reference": reference}, features.close_ns, features.description)
    features.description["data"] = market.describe()["source"]
    features.description["base_bars"] = inputs["base_description"]
    return features


def market_key(config: Config) -> tuple:
    """The settings the embedded market data depends on."""
    import json

    backtest = config.backtest
    depends = config.synthetic.model_dump()
    if backtest.options_data:
        # A vendor market is built for the strategy's DTE window and the alignment settings.
        depends = {"dte_max": config.strategy.dte_max, "data_pipeline": config.data_pipeline.model_dump()}
    return (tuple(str(getattr(backtest, name)) for name in _MARKET_FIELDS), json.dumps(depends, sort_keys=True))


def load_market(config: Config) -> SyntheticChainProvider:
    """The embedded chain provider for ``config``, built once per process per period, seed and
    synthetic settings."""
    key = market_key(config)
    market = _markets.pop(key, None)
    if market is None:
        market = load_vendor_market(config) if config.backtest.options_data else embedded_chain_provider(config)
    return _remember(_markets, key, market)


def uses_neural(config: Config) -> bool:
    """Whether a run's confidence C should carry the DeepMamba forecasts: the fuzzy confidence is
    used and the neural factor is on (the checkpoint is loaded if present)."""
    return bool(config.fuzzy.use_fuzzy and config.mamba.use_neural)


# The fuzzy weights do not change the memberships, only how F_t and C blend them: a table built
# with other weights is re-blended (``BarFeatures.reweighted``, milliseconds) instead of rebuilt.
FUZZY_WEIGHT_FIELDS = frozenset(f"fuzzy_weight_{factor}" for factor in (*FUZZY_FACTORS, "neural"))


def feature_key(config: Config) -> str:
    """The settings a run's feature table depends on, as one string (the fuzzy weights are left
    out: see ``FUZZY_WEIGHT_FIELDS``)."""
    import json

    parts = {}
    for section in FEATURE_SECTIONS:
        values = getattr(config, section).model_dump()
        for name in FEATURE_INDEPENDENT_FIELDS.get(section, ()):
            values.pop(name, None)
        if section == "fuzzy":
            for name in FUZZY_WEIGHT_FIELDS:
                values.pop(name, None)
        parts[section] = values
    parts["market"] = market_key(config)[0]
    parts["skew_dte"] = [config.strategy.dte_min, config.strategy.dte_max, config.strategy.use_skew_penalty,
                         config.filters.use_entry_gates]
    parts["neural"] = neural_key(config)
    return json.dumps(parts, sort_keys=True, default=str)


def neural_key(config: Config) -> str | None:
    """The settings μ_Mamba per bar depends on (the checkpoint and its settings), or None when a
    run does not use it."""
    import json

    return json.dumps(config.mamba.model_dump(), sort_keys=True, default=str) if uses_neural(config) else None


def neural_per_bar(config: Config, market, forecaster=None, progress=None):
    """μ_Mamba per bar of ``market`` for ``config`` and what it came from, built once per process
    per market and checkpoint settings (the batch inference is the costliest part of a feature
    table: minutes on a CPU for five years). (None, None) when the run does not use it or the
    default checkpoint is absent."""
    if not uses_neural(config):
        return None, None
    key = (id(market), neural_key(config))
    cached = _neural.pop(key, None)
    if cached is not None and cached[0] is market:
        _neural[key] = cached
        return cached[1], cached[2]
    if forecaster is None:
        forecaster = load_configured_forecaster(config, explicit=False)
    if forecaster is None:
        _remember(_neural, key, (market, None, None))
        return None, None
    values, description = embedded_neural_memberships(config, market, forecaster, progress)
    _remember(_neural, key, (market, values, description))
    return values, description


def remember_neural(config: Config, market, values, description) -> None:
    """Seed the μ_Mamba cache of this process for ``market`` (an optimizer worker receiving what
    the parent computed, instead of running the inference again)."""
    if uses_neural(config):
        _remember(_neural, (id(market), neural_key(config)), (market, values, description))


def bar_features(config: Config, market, forecaster=None, progress=None):
    """The feature table of ``config`` on ``market`` (an embedded chain provider), built once per
    process per market and per settings it depends on (``feature_key``); a run with other fuzzy
    weights gets the cached table re-blended. With ``uses_neural`` the DeepMamba checkpoint at
    ``mamba.weights_path`` supplies μ_Mamba (``forecaster`` if given, else loaded; a missing
    default checkpoint leaves μ = 0.5; see ``neural_per_bar``); ``progress(done, total)`` reports
    that inference."""
    key = (id(market), feature_key(config))
    cached = _features.pop(key, None)
    if cached is not None and cached[0] is market:
        _features[key] = cached             # most recently used last: evicted last
        features, weights = cached[1], cached[2]
    else:
        neural, neural_description = neural_per_bar(config, market, forecaster, progress)
        if is_vendor_market(market):
            features = vendor_bar_features(config, market, neural=neural)
        else:
            features = embedded_bar_features(config, market, neural=neural)
        if neural_description is not None:
            features.description["neural"] = neural_description
        weights = _fuzzy_weights(config)
        _remember(_features, key, (market, features, weights))
    if weights != _fuzzy_weights(config):
        features = features.reweighted(config.fuzzy)
    return features


def _fuzzy_weights(config: Config) -> dict:
    return {name: getattr(config.fuzzy, name) for name in sorted(FUZZY_WEIGHT_FIELDS)}


# ----------------------------------------------------------------------------------------------
# The diffusion POP (filters.pop_source = diffusion): DeepMamba's sampled forward paths per bar
# ----------------------------------------------------------------------------------------------

# Trading sessions per calendar day, to compare strategy.dte_max with the paths' horizon.
SESSIONS_PER_CALENDAR_DAY = 252 / 365
# A PathForecast holds a (bars, d_model) hidden state (~25 MB for five years) and the paths drawn.
_PATH_CACHE_SIZE = 4
_paths: dict = {}
_path_models: dict = {}


def _weights_file(config: Config):
    """``mamba.weights_path``, a relative one from the project root."""
    from pathlib import Path

    path = Path(config.mamba.weights_path)
    return path if path.is_absolute() else Path(__file__).resolve().parent.parent / path


def path_forecaster(config: Config):
    """The checkpoint at ``mamba.weights_path`` for the diffusion POP, checked: it exists, has a
    diffusion head, and its paths reach ``strategy.dte_max``. Loaded whatever ``fuzzy.use_fuzzy``
    and ``mamba.use_neural`` say (the POP needs the model without the fuzzy engine); kept per
    process per file. ConfigError naming the settings otherwise."""
    from core.config import ConfigError
    from intelligence.mamba_inference import ModelFileError, load_forecaster

    path = _weights_file(config)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    key = (str(path), stamp)
    forecaster = _path_models.get(key)
    if forecaster is None:
        try:
            forecaster = load_forecaster(path)
        except ModelFileError as error:
            raise ConfigError(f"filters.pop_source = diffusion reads the model at mamba.weights_path "
                              f"(--mamba-model): {error}") from None
        _remember(_path_models, key, forecaster, size=2)
    if forecaster.diffusion is None:
        raise ConfigError(f"--pop-source diffusion (filters.pop_source) needs a DeepMamba model trained with "
                          f"--diffusion-head: {forecaster.missing_head_message()}")
    rules = forecaster.path_rules
    sessions = config.strategy.dte_max * SESSIONS_PER_CALENDAR_DAY
    if sessions > rules.horizon_sessions:
        raise ConfigError(
            f"filters.pop_source = diffusion: strategy.dte_max = {config.strategy.dte_max} days (≈ {sessions:.1f} "
            f"sessions) runs past the path horizon of {path} ({rules.steps} steps × {rules.step_bars} bars = "
            f"{rules.horizon_sessions:g} sessions ≈ {rules.horizon_sessions / SESSIONS_PER_CALENDAR_DAY:.0f} "
            f"calendar days): lower --dte-max to at most "
            f"{int(rules.horizon_sessions / SESSIONS_PER_CALENDAR_DAY)}, train a model with longer paths, or use "
            f"--pop-source delta")
    return forecaster


def path_model_inputs(config: Config, market) -> dict:
    """The DeepMamba inputs (base bars, their session closes, daily IV, the trading bars' close
    times) for ``market``: the embedded data's, the option data's (``vendor_feature_inputs``) or,
    for a stress test's ``ShockedMarket``, the embedded ones with its shock applied as the stress
    test's feature table applies it (prices by each session's spot multiplier, daily IV closes by
    the IV multiplier at each session's last bar). ConfigError for a source without them."""
    from core.config import ConfigError
    from data_factory.shocks import ShockedMarket

    if is_vendor_market(market):
        return vendor_feature_inputs(config, market)
    if isinstance(market, ShockedMarket):
        return shocked_feature_inputs(config, market)
    if isinstance(market, SyntheticChainProvider):
        return embedded_feature_inputs(config, market)
    raise ConfigError(f"filters.pop_source = diffusion: the path forecast reads the bars DeepMamba was trained on, "
                      f"which a {type(market).__name__} market does not provide (the embedded data and --options-data "
                      f"do); use --pop-source delta")


_BUSDAYS: list = []


def nyse_busdays() -> np.busdaycalendar:
    """Weekdays less the NYSE holidays of the exchange calendar (1999 … 2030), for counting
    sessions with ``np.busday_count``; built once per process."""
    if not _BUSDAYS:
        from data_factory.market_calendar import CALENDAR_END, CALENDAR_START, trading_sessions

        sessions = trading_sessions(CALENDAR_START, CALENDAR_END).values.astype("datetime64[D]")
        weekdays = pd.bdate_range(CALENDAR_START, CALENDAR_END).values.astype("datetime64[D]")
        _BUSDAYS.append(np.busdaycalendar(holidays=np.setdiff1d(weekdays, sessions)))
    return _BUSDAYS[0]


def shocked_feature_inputs(config: Config, market) -> dict:
    """``embedded_feature_inputs`` of a stress test's ``ShockedMarket`` with its shock applied where
    the strategy and the model read prices: the 1-minute base bars and the daily SPY and QQQ bars
    moved by each session's spot multiplier (a gap is market-wide, so the SPY/QQQ ratio does not
    see it as a divergence), the daily IV closes by the multiplier at each session's last bar.
    Causal as the unshocked inputs are: the multipliers of a session apply from its open."""
    inputs = embedded_feature_inputs(config, market)
    bar_days = market.bar_times.tz_localize(None).normalize()
    spot_by_session = pd.Series(market.spot_scale, index=bar_days).groupby(level=0).first()
    iv_by_session = pd.Series(market.iv_scale, index=bar_days).groupby(level=0).last()

    def per_day(scale: pd.Series, days) -> np.ndarray:
        return scale.reindex(pd.DatetimeIndex(days)).fillna(1.0).to_numpy()

    prices = ["open", "high", "low", "close"]
    base = inputs["base"].copy()
    base[prices] = base[prices].to_numpy() * per_day(spot_by_session, base.index.tz_localize(None).normalize())[:, None]
    inputs["base"] = base
    for key in ("daily_spot", "daily_pair"):
        frame = inputs[key]
        if frame is not None:
            frame = frame.copy()
            columns = [c for c in prices if c in frame.columns]
            frame[columns] = frame[columns].to_numpy() * per_day(spot_by_session, frame.index)[:, None]
            inputs[key] = frame
    inputs["daily_iv"] = inputs["daily_iv"] * per_day(iv_by_session, inputs["daily_iv"].index)
    return inputs


class PathWindow:
    """A ``PathForecast`` addressed by the bars of a window [start, stop) of its market (a
    ``core.market.BarWindow``: the optimizer's walk-forward folds)."""

    def __init__(self, paths, start: int, stop: int):
        self.paths, self.start, self.stop = paths, int(start), int(stop)
        self.busdays = getattr(paths, "busdays", None)
        self.description = getattr(paths, "description", "")

    def __len__(self) -> int:
        return self.stop - self.start

    def available(self, bar: int) -> bool:
        return self.paths.available(self.start + bar)

    def probabilities(self, bar: int, *args, **kwargs):
        return self.paths.probabilities(self.start + bar, *args, **kwargs)


def path_forecast_per_bar(config: Config, market, progress=None):
    """The diffusion head's ``PathForecast`` over the trading bars of ``market`` (None when
    ``filters.pop_source`` is delta): the checkpoint at ``mamba.weights_path``
    (``path_forecaster``), DeepMamba's state carried over the same inputs the neural pass reads
    (``path_model_inputs``), ``filters.diffusion_paths`` paths per bar seeded from
    ``backtest.seed``, drawn lazily at the bars the engine asks about. Built once per process per
    market, checkpoint, path count and seed (a window or memo of a market shares its market's).
    ``progress(done, total)`` reports the pass over the bars."""
    if config.filters.pop_source != "diffusion":
        return None
    from core.market import BarWindow, MarketMemo

    if isinstance(market, BarWindow):
        return PathWindow(path_forecast_per_bar(config, market.market, progress), market.start, market.stop)
    if isinstance(market, MarketMemo):
        return path_forecast_per_bar(config, market.market, progress)
    forecaster = path_forecaster(config)
    n_paths, seed = int(config.filters.diffusion_paths), int(config.backtest.seed)
    key = (id(market), str(_weights_file(config)), n_paths, seed)
    cached = _paths.pop(key, None)
    if cached is not None and cached[0] is market and cached[1] is forecaster:
        _paths[key] = cached
        return cached[2]
    inputs = path_model_inputs(config, market)
    frame, iv = model_bars(inputs["base"], inputs["session_close_ns"], inputs["daily_iv"], config)
    with one_torch_thread():
        paths = forecaster.path_forecast(frame, iv, inputs["target"], n_paths=n_paths, seed=seed, progress=progress,
                                         earlier_closes=earlier_session_closes(inputs))
    if inputs.get("base_description"):
        paths.description = f"{paths.description}; model inputs: {inputs['base_description']}"
    paths.busdays = nyse_busdays()          # the engine counts sessions to expiry with it
    # The market and the model ride along: the key's id is never reused while the entry exists.
    _remember(_paths, key, (market, forecaster, paths), size=_PATH_CACHE_SIZE)
    return paths


def pop_source_description(config: Config, paths=None) -> dict:
    """What a run's breach probability (the probability filter's input) came from, for the run's
    description (data.json's features, run.json)."""
    if config.filters.pop_source != "diffusion":
        return {"source": "delta", "what": "2·max(|Δ short put|, |Δ short call|) capped at 1 (the reflection "
                                           "principle on a lognormal)"}
    return {"source": "diffusion", "paths_per_bar": int(config.filters.diffusion_paths),
            "seed": int(config.backtest.seed),
            "what": "max(touch put, touch call) over DeepMamba's sampled forward paths to expiry",
            "model": getattr(paths, "description", "") or str(config.mamba.weights_path)}
