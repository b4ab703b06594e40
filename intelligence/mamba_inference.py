"""Inference with a trained DeepMamba checkpoint: μ_Mamba and every head for every trading bar.

Owns ``load_forecaster`` (checkpoint → ``Forecaster``: model + metadata, checked),
``Forecaster.forecast_per_bar`` (every head at the target bars) and
``Forecaster.neural_membership_per_bar``, the per-bar neural membership the fuzzy engine blends
in (``intelligence.features.BarFeatures.with_neural``). Features are rebuilt with the training
code (``intelligence.mamba_data.build_features``) and scaled with the checkpoint's train-split
statistics, so inference sees exactly what training saw.

Two inference methods; the checkpoint's metadata says which one its model was trained for:
- ``"inference": "stateful"`` (``train_mamba`` writes these): ONE causal pass over the whole
  period (``run_stateful``: the series in chunks, the recurrent state carried from chunk to
  chunk), starting from a zero state at the first row with every feature defined, as the training
  streams did; every bar's forecast reads all bars up to and including it. The first ``burn_in``
  bars of the pass (left out of the training loss) get μ = 0.5. Equal to stepping
  ``DeepMamba.step`` bar by bar from that start (tests/test_mamba_stateful.py). ~55k bars/s on
  one CPU core for the shipped model (benchmarks/bench_mamba.py).
- ``"windowed"`` (checkpoints without the key, trained on independent 128-bar windows before the
  stateful scheme): one ``lookback``-bar window per target bar, from a zero state, batched
  (``forecast_rows``); ~1,000 target bars/s. Kept so such checkpoints still give the forecasts
  they were trained for, and as the benchmark's "before".
Threads are the caller's choice (``torch.set_num_threads``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from intelligence import mamba_data as md
from intelligence.fuzzy_engine import NEUTRAL_NEURAL_MEMBERSHIP
from intelligence.mamba_diffusion import DiffusionHead, PathForecast, PathInputError, PathRules
from intelligence.mamba_engine import DeepMamba, membership_tensor

NEUTRAL_MEMBERSHIP = NEUTRAL_NEURAL_MEMBERSHIP   # the fuzzy engine's "no opinion"
# Windows per forward pass: on a CPU core 32 windows × 128 bars ran ~120k tokens/s, 4096 windows
# ~22k tokens/s at 5 GB peak memory (the SSD blocks no longer fit in cache).
MICRO_BATCH = 32
# Bars per forward call of the stateful pass: on a CPU core 512–2048-bar chunks ran 54–59k bars/s,
# 256 46k, one 16k-bar call 41k (the scan's blocks fall out of cache).
STATEFUL_CHUNK = 2048
INFERENCE_METHODS = ("stateful", "windowed")
REQUIRED_METADATA = ("model_config", "lookback", "feature_names", "scaler")


class ModelFileError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the code (names the file)."""


@torch.inference_mode()
def run_stateful(model: DeepMamba, features, chunk: int = STATEFUL_CHUNK, state=None, progress=None,
                 return_hidden: bool = False):
    """One causal pass of ``model`` over ``features`` (rows, n_features), oldest first, from
    ``state`` (None = zeros) → ({output name: (rows,) float64} plus 'mu', state after the last row).
    ``return_hidden``: also 'hidden', the final hidden state per row, (rows, d_model) float32.

    The rows go through ``DeepMamba.forward_stateful`` ``chunk`` at a time, each chunk starting
    from the state the previous one ended in, so the result does not depend on ``chunk`` beyond
    rounding. ``progress(done)``, if given, is called after each chunk with the rows done.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    n = len(features)
    out: dict[str, np.ndarray] = {}
    chunk = max(1, int(chunk))
    for c0 in range(0, n, chunk):
        o, state = model.forward_stateful(features[c0:c0 + chunk].unsqueeze(0), state,
                                          return_hidden=return_hidden)
        o["mu"] = membership_tensor(o)
        for name, value in o.items():
            if name not in out:
                out[name] = (np.empty((n, value.shape[-1]), dtype=np.float32) if name == "hidden"
                             else np.empty(n, dtype=np.float64))
            out[name][c0:c0 + chunk] = value[0].cpu().numpy() if name == "hidden" else value[0].double().cpu().numpy()
        if progress is not None:
            progress(min(n, c0 + chunk))
    return out, state


class Forecaster:
    """A DeepMamba model in eval mode on the CPU, with its checkpoint metadata."""

    def __init__(self, model: DeepMamba, metadata: dict, path: str | None = None):
        self.model = model.eval()
        self.metadata = metadata
        self.path = path
        self.lookback = int(metadata["lookback"])
        self.feature_names = tuple(metadata["feature_names"])
        self.scaler = md.Scaler.from_dict(metadata["scaler"])
        self.warmup_rows = int(metadata.get("warmup_rows", 0))
        # TDA inputs ({"window", "dim", "tau"}) when the model was trained with --tda-features
        self.tda = metadata.get("tda")
        self.inference = str(metadata.get("inference", "windowed"))
        # stateful: bars of the pass before its forecasts count (left out of the training loss)
        self.burn_in = int(metadata.get("burn_in", 0)) if self.inference == "stateful" else 0
        # The diffusion path head and its path rules, when the checkpoint has one (load_forecaster)
        self.diffusion: DiffusionHead | None = None
        self.path_rules: PathRules | None = None

    @property
    def history_sessions(self) -> int:
        """Sessions of bars before the first forecast bar the features need to be defined: the
        TDA inputs' window + 1 (their lag) + 1 when the model reads them, else 0."""
        return int(self.tda.get("window", 60)) + 2 if self.tda else 0

    @property
    def stateful(self) -> bool:
        return self.inference == "stateful"

    def method(self) -> str:
        """One line saying how forecasts are made (for run descriptions)."""
        if self.stateful:
            return (f"one causal pass over the whole period (recurrent state carried bar to bar, as "
                    f"trained); 0.5 for the first {self.burn_in} bars after the indicator warm-up")
        return "one lookback window per bar (as trained); 0.5 until the window is full"

    def scaled_features(self, bars_5min: pd.DataFrame, iv_index) -> np.ndarray:
        """(rows, features) float32, built and scaled as in training; NaN warm-up rows → 0."""
        raw = md.build_features(bars_5min, iv_index, tda=self.tda)
        if tuple(raw.columns) != self.feature_names:
            raise ModelFileError(f"{self.path}: the model was trained on features {list(self.feature_names)}, "
                                 f"this code builds {list(raw.columns)}")
        return self.scaler.transform(raw.to_numpy())

    @torch.inference_mode()
    def forecast_rows(self, features: np.ndarray | torch.Tensor, rows: np.ndarray, chunk: int = 4096,
                      micro_batch: int = MICRO_BATCH, progress=None) -> dict:
        """Forecasts at the given rows (each ≥ lookback − 1), each from the window of ``lookback``
        rows ending there → {output name: (len(rows),) float64} plus 'mu' (μ_Mamba).

        Rows go in chunks of ``chunk`` target bars; inside a chunk the model runs on
        ``micro_batch`` windows at a time, gathered from a strided view of the one feature
        tensor (no window is materialised outside its micro-batch).
        """
        features = torch.as_tensor(features, dtype=torch.float32).contiguous()
        dataset = md.WindowDataset(features, None, self.lookback)
        starts = np.asarray(rows, dtype=np.int64) - (self.lookback - 1)
        if len(starts) and (starts.min() < 0 or starts.max() > dataset.last_start):
            raise ValueError("forecast_rows: every row needs a full lookback window inside the features")
        out: dict[str, list] = {}
        for c0 in range(0, len(starts), max(1, int(chunk))):
            chunk_starts = starts[c0:c0 + chunk]
            parts: dict[str, list] = {}
            for b0 in range(0, len(chunk_starts), max(1, int(micro_batch))):
                x, _ = dataset.batch(chunk_starts[b0:b0 + micro_batch])
                o = self.model(x, last_only=True)
                o["mu"] = membership_tensor(o)
                for name, value in o.items():
                    parts.setdefault(name, []).append(value)
            for name, values in parts.items():
                out.setdefault(name, []).append(torch.cat(values).double().numpy())
            if progress is not None:
                progress(c0 + len(chunk_starts))
        if not out:
            return {"mu": np.empty(0)}
        return {name: np.concatenate(values) for name, values in out.items()}

    def forecast_per_bar(self, bars_5min: pd.DataFrame, iv_index, target_close_ns,
                         chunk: int | None = None, micro_batch: int = MICRO_BATCH,
                         progress=None, return_hidden: bool = False, earlier_closes=None) -> dict:
        """Every head and μ_Mamba ('mu') for each target bar (UTC ns close times, each one of
        ``bars_5min``'s bars) → {name: (len(targets),) float64}; NaN (μ: 0.5, the neutral value)
        where the model has no forecast yet (indicator warm-up, then the stateful burn-in or an
        unfilled window).

        ``bars_5min``: canonical 5-minute bars (tz-aware close-time index, open high low close
        volume) from early enough before the first target bar to warm up the indicators (and the
        state, or fill the window); ``iv_index``: the IV index (VIX points) per bar of
        ``bars_5min`` (``mamba_data.causal_bar_iv_index`` gives the causal one training used).
        A forecast at a bar reads bars ≤ it only. Stateful checkpoints: one pass from the first
        fully-defined row up to the last target bar (``chunk`` rows per call, default
        STATEFUL_CHUNK); windowed ones: ``forecast_rows`` (``chunk`` default 4096 target bars).
        ``progress(done, total)``, if given, is called after each chunk. ``return_hidden``
        (stateful checkpoints): also 'hidden', (len(targets), d_model) float32, NaN rows where
        there is no forecast (the diffusion head's condition). ``earlier_closes``: daily closes
        by session date before ``bars_5min`` for models with TDA inputs (their trailing window
        reaches further back than a backtest's warm-up bars; ignored otherwise).
        """
        if return_hidden and not self.stateful:
            raise ModelFileError(f"{self.path}: a windowed checkpoint has no per-bar hidden state for path sampling")
        index = pd.DatetimeIndex(bars_5min.index)
        if index.tz is None:
            raise ValueError("bars_5min: the index must be tz-aware bar close times")
        bar_ns = index.tz_convert("UTC").as_unit("ns").asi8
        targets = np.asarray(target_close_ns, dtype=np.int64)
        rows = np.searchsorted(bar_ns, targets)
        found = (rows < len(bar_ns)) & (bar_ns[np.minimum(rows, len(bar_ns) - 1)] == targets)
        if not found.all():
            first = pd.Timestamp(int(targets[~found][0]), tz="UTC").tz_convert(md.EXCHANGE_TZ)
            raise ValueError(f"neural_membership_per_bar: no bar of bars_5min closes at {first} "
                             f"({int((~found).sum())} target bars unmatched)")
        raw = md.build_features(bars_5min, iv_index, tda=self.tda, earlier_closes=earlier_closes)
        if tuple(raw.columns) != self.feature_names:
            raise ModelFileError(f"{self.path}: the model was trained on features {list(self.feature_names)}, "
                                 f"this code builds {list(raw.columns)}")
        raw = raw.to_numpy()
        features = self.scaler.transform(raw)
        warm = md.warmup_rows(raw)
        out = {"mu": np.full(len(rows), NEUTRAL_MEMBERSHIP)}
        if self.stateful:
            ready = rows >= warm + self.burn_in
            stop = int(rows.max()) + 1 if len(rows) else 0
            total = max(0, stop - warm)
            report = None if progress is None else (lambda done: progress(done, total))
            if ready.any():
                period, _ = run_stateful(self.model, features[warm:stop],
                                         chunk or STATEFUL_CHUNK, progress=report, return_hidden=return_hidden)
                picked = rows[ready] - warm
                for name, values in period.items():
                    column = np.full((len(rows), *values.shape[1:]), np.nan, dtype=values.dtype)
                    column[ready] = values[picked]
                    out[name] = column
            elif progress is not None:
                progress(total, total)
            if return_hidden and "hidden" not in out:
                out["hidden"] = np.full((len(rows), self.model.d_model), np.nan, dtype=np.float32)
        else:
            ready = rows >= warm + self.lookback - 1          # first row with a clean full window
            skipped = int((~ready).sum())
            report = None if progress is None else (lambda done: progress(skipped + done, len(rows)))
            if ready.any():
                forecast = self.forecast_rows(features, rows[ready], chunk or 4096, micro_batch,
                                              progress=report)
                for name, values in forecast.items():
                    column = np.full(len(rows), np.nan)
                    column[ready] = values
                    out[name] = column
            elif progress is not None:
                progress(len(rows), len(rows))
        out["mu"] = np.where(np.isfinite(out["mu"]), out["mu"], NEUTRAL_MEMBERSHIP)
        return out

    def missing_head_message(self) -> str:
        """What a checkpoint without a diffusion path head says when paths are asked of it."""
        return (f"{self.path}: this checkpoint has no diffusion path head (train one with "
                f"`python -m intelligence.train_mamba --diffusion-head`, or add it to this "
                f"model with `--init-from {self.path} --diffusion-head --out NEW.pth`)")

    def path_forecast(self, bars_5min: pd.DataFrame, iv_index, target_close_ns, n_paths: int = 64,
                      seed: int = 0, progress=None, earlier_closes=None) -> PathForecast:
        """The diffusion head's sampler over the target bars (``PathForecast``: paths drawn
        lazily at the bars asked about, ``n_paths`` each, seeded per bar). Same inputs as
        ``forecast_per_bar``; ModelFileError when the checkpoint has no diffusion head."""
        if self.diffusion is None:
            raise ModelFileError(self.missing_head_message())
        hidden = self.forecast_per_bar(bars_5min, iv_index, target_close_ns, progress=progress,
                                       return_hidden=True, earlier_closes=earlier_closes)["hidden"]
        index = pd.DatetimeIndex(bars_5min.index).tz_convert("UTC").as_unit("ns").asi8
        rows = np.searchsorted(index, np.asarray(target_close_ns, dtype=np.int64))
        bar_iv = np.asarray(iv_index, dtype=float)[rows]
        return PathForecast(self.diffusion, self.path_rules, hidden, bar_iv, n_paths=n_paths, seed=seed,
                            description=f"{self.path}: diffusion head, {n_paths} paths per bar of "
                                        f"{self.path_rules.steps} steps × {self.path_rules.step_bars} bars")

    def neural_membership_per_bar(self, bars_5min: pd.DataFrame, iv_index, target_close_ns,
                                  chunk: int | None = None, micro_batch: int = MICRO_BATCH,
                                  progress=None, earlier_closes=None) -> np.ndarray:
        """μ_Mamba ∈ [0, 1] for each target bar (see ``forecast_per_bar``); 0.5, the neutral
        value, where the model has no forecast yet."""
        return self.forecast_per_bar(bars_5min, iv_index, target_close_ns, chunk, micro_batch,
                                     progress, earlier_closes=earlier_closes)["mu"]


def load_forecaster(path) -> Forecaster:
    """Checkpoint written by ``intelligence.train_mamba`` → Forecaster (CPU, eval mode).

    Raises ModelFileError naming the file for a missing or unreadable file, missing metadata,
    or weights whose names/shapes do not fit the configured model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file (train one with "
                             "`python -m intelligence.train_mamba`, see models/README.md)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # noqa: BLE001 — truncated/corrupt/foreign files
        raise ModelFileError(f"{path}: not a readable DeepMamba checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(checkpoint, dict) or "model_state" not in checkpoint or "metadata" not in checkpoint:
        raise ModelFileError(f"{path}: not a DeepMamba checkpoint (expected keys model_state and metadata)")
    metadata = checkpoint["metadata"]
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}")
    inference = metadata.get("inference", "windowed")
    if inference not in INFERENCE_METHODS:
        raise ModelFileError(f"{path}: metadata names inference {inference!r}; this code runs "
                             f"{' or '.join(INFERENCE_METHODS)}")
    config = dict(metadata["model_config"])
    n_features = len(metadata["feature_names"])
    if config.get("n_features") != n_features or len(metadata["scaler"]["mean"]) != n_features:
        raise ModelFileError(f"{path}: metadata disagrees on the number of features (model "
                             f"{config.get('n_features')}, names {n_features}, scaler "
                             f"{len(metadata['scaler']['mean'])})")
    try:
        model = DeepMamba(**config, prefer_kernels=False)
        model.load_state_dict(checkpoint["model_state"], strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit the model config {config}: "
                             f"{str(exc).splitlines()[0]} …") from None
    forecaster = Forecaster(model, metadata, str(path))
    if "diffusion" in metadata:
        if "diffusion_state" not in checkpoint:
            raise ModelFileError(f"{path}: metadata describes a diffusion head but the file holds no weights for it")
        try:
            head = DiffusionHead(**metadata["diffusion"]["config"])
            head.load_state_dict(checkpoint["diffusion_state"], strict=True)
            rules = PathRules(**{k: v for k, v in metadata["diffusion"]["path_rules"].items()
                                 if k in ("steps", "step_bars")})
        except (RuntimeError, TypeError, KeyError, PathInputError) as exc:
            raise ModelFileError(f"{path}: the diffusion head does not fit its config: "
                                 f"{str(exc).splitlines()[0]} …") from None
        forecaster.diffusion, forecaster.path_rules = head.eval(), rules
    return forecaster
