"""Train the DeepMamba forecaster behind μ_Mamba, evaluate it out of sample, save it with its
metadata. Reads top to bottom (nanoGPT's train.py): settings → data → model → loop → evaluation.

    python intelligence/train_mamba.py                      # shipped default: embedded 2001–2013
    python -m intelligence.train_mamba --local-data bars.csv --epochs 20 --device cuda
    python -m intelligence.train_mamba --sweep 20 --max-steps 300     # Optuna TPE

Data: the embedded S&P 500 proxy's REAL daily bars from --train-start to --train-end expanded to
SYNTHETIC 5-minute bars (default 2001-01-02 … 2013-12-31, so the shipped model never saw the
2014–2018 backtest period), or a local CSV/Parquet of bars (--local-data). The period is split by
date into train / validation / test (in that order, gaps ≥ the target horizon between them).
Features and targets: ``intelligence.mamba_data``. Model: ``intelligence.mamba_engine.DeepMamba``.

Stateful training (truncated BPTT), for the one-pass inference it is used with: the train split is
cut into --batch-size contiguous streams (``mamba_data.StreamSegments``); step k trains on segment
k (--lookback bars) of every stream, starting from the recurrent state segment k − 1 ended in
(detached: gradients reach back one segment, the state reaches back to the stream's start). Each
stream starts from a zero state and its first --burn-in bars are left out of the loss; each epoch
moves the segment boundaries by a random offset. Validation and the test evaluation run one
causal pass over their split from a zero state, as ``intelligence.mamba_inference`` does over a
backtest period. The checkpoint's metadata says ``"inference": "stateful"``.

Outputs
- ``--out`` (default models/mamba_trained.pth): the best-validation weights and metadata (features,
  scaling, model config, target rules, data period/source, git commit, torch version, metrics),
  written atomically (temp file + os.replace);
- ``<out>.eval.json`` / ``<out>.eval.md``: test-split metrics against naive baselines;
- TensorBoard logs under --log-dir; per-epoch PNG snapshots under --snapshot-dir;
- ``--sweep N``: a CSV of the trials (--sweep-csv) and the best trial printed.
Exit status: 0 done, 2 bad flag / data / device, 1 training failed (e.g. repeated NaN losses).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python intelligence/train_mamba.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import numpy as np
import torch

from data_factory.errors import DataError
from intelligence import mamba_data as md
from intelligence.mamba_engine import CPU_CHUNK_SIZE, DeepMamba, loss
from intelligence.mamba_diffusion import PathInputError, PathRules
from intelligence.mamba_inference import run_stateful
from intelligence.tda import TDAInputError
from intelligence.path_training import calibration_markdown

CHECKPOINT_FORMAT = 1
GPU_CHUNK_SIZE = 256
SHIPPED_MODEL = "models/mamba_active.pth"   # what --mamba-model defaults to (core/config.py)
BACKTEST_START = "2014-01-03"      # first day of the default backtest period (DESIGN.md)


class TrainingError(RuntimeError):
    """Training could not go on (e.g. too many consecutive non-finite steps)."""


# ----------------------------------------------------------------------------------------------
# Settings

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_mamba", description="Train the DeepMamba forecaster (μ_Mamba) and evaluate it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--local-data", metavar="PATH",
                      help="CSV/Parquet bars: timestamp, open, high, low, close, volume[, iv_index]; "
                           "default: the embedded data (synthetic 5-minute bars)")
    data.add_argument("--train-start", default=None,
                      help="first date of the data period (embedded default 2001-01-02)")
    data.add_argument("--train-end", default=None,
                      help="last date of the data period (embedded default 2013-12-31)")
    data.add_argument("--data-seed", type=int, default=42, help="seed of the synthetic intraday bars")
    data.add_argument("--val-fraction", type=float, default=0.15)
    data.add_argument("--test-fraction", type=float, default=0.15)
    data.add_argument("--horizon-bars", type=int, default=md.TargetRules.horizon_bars,
                      help="target horizon in 5-minute bars (780 = 10 sessions)")
    data.add_argument("--tda-features", action="store_true",
                      help="add the 7 topological features (persistent homology of the trailing --tda-window "
                           "session returns, lagged one session) to the model's inputs")
    data.add_argument("--tda-window", type=int, default=60, help="sessions per persistence diagram (--tda-features)")
    data.add_argument("--pop-k", type=float, default=md.TargetRules.pop_k,
                      help="POP strikes at close·exp(±k·IV·√horizon)")
    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--d-state", type=int, default=32)
    model.add_argument("--headdim", type=int, default=32)
    model.add_argument("--lookback", type=int, default=128,
                       help="bars per training segment (truncated BPTT: the state carries over from "
                            "segment to segment, gradients reach back one segment)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=100,
                       help="an epoch puts each train row in about one window")
    train.add_argument("--batch-size", type=int, default=32,
                       help="parallel contiguous streams of the train split (one segment of each per step)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = ratio × lr")
    train.add_argument("--warmup-steps", type=int, default=200,
                       help="linear warm-up steps (at most a fifth of the run)")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--burn-in", type=int, default=None,
                       help="first bars of each stream (and of each validation/inference pass), run from a "
                            "zero state, left out of the loss; μ_Mamba is 0.5 there (default: lookback)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    train.add_argument("--patience", type=int, default=10,
                       help="stop after this many epochs without a better validation loss (0: never)")
    train.add_argument("--max-bad-steps", type=int, default=20,
                       help="abort after this many consecutive non-finite steps")
    train.add_argument("--seed", type=int, default=1337, help="torch seed (init, batch order)")
    train.add_argument("--ema", type=float, default=0.99, metavar="DECAY",
                       help="validate and save an exponential moving average of the weights with this decay "
                            "per step; 0 = the raw weights (on the shipped recipe 0.99 lowered the best validation "
                            "loss from 1.431 to 1.419 and improved every test row)")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    run.add_argument("--threads", type=int, default=1,
                     help="torch.set_num_threads; on a shared 2-core box one thread ran the default "
                          "model at ~33k tokens/s while two collapsed to 1k-17k when another process "
                          "was busy")
    run.add_argument("--out", default="models/mamba_trained.pth",
                     help="checkpoint to write (default: models/mamba_trained.pth; the backtest reads it with "
                          "--mamba-model). The shipped models/mamba_active.pth is replaced only with "
                          "--replace-shipped")
    run.add_argument("--replace-shipped", action="store_true",
                     help=f"allow --out {SHIPPED_MODEL} (the model every backtest uses by default)")
    run.add_argument("--log-dir", default="training_analytics/tb", help="TensorBoard directory")
    run.add_argument("--snapshot-dir", default="training_analytics/epoch_snapshots")
    run.add_argument("--scatter-every", type=int, default=500,
                     help="prediction-vs-actual scatter to TensorBoard every N steps (0: never)")
    run.add_argument("--log-every", type=int, default=10, help="scalars to TensorBoard every N steps")
    run.add_argument("--eval-stride", type=int, default=6,
                     help="evaluate a forecast every N test bars (1 = every bar)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    paths = p.add_argument_group("diffusion path head (stage 2, on the trained model, frozen)")
    paths.add_argument("--diffusion-head", action="store_true",
                       help="after training, fit the conditional diffusion head over forward price paths "
                            "(--pop-source diffusion in backtests) and write its calibration")
    paths.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                       help="skip training: add the diffusion head to this trained checkpoint (same data and "
                            "features), written to --out")
    paths.add_argument("--path-steps", type=int, default=32, help="steps per sampled path")
    paths.add_argument("--path-step-bars", type=int, default=78,
                       help="5-minute bars per path step (78 = one session: 32 steps ≈ 45 calendar days)")
    paths.add_argument("--diffusion-iters", type=int, default=3000,
                       help="optimizer steps of the head (the best validation loss is kept)")
    paths.add_argument("--diffusion-batch", type=int, default=1024, help="paths per step")
    paths.add_argument("--diffusion-lr", type=float, default=1e-3, help="peak learning rate (cosine to 0)")
    paths.add_argument("--diffusion-hidden", type=int, default=128, help="width of the denoiser MLP")
    paths.add_argument("--diffusion-cond-dropout", type=float, default=0.3,
                       help="share of training rows whose condition is zeroed (regularises the head: on the "
                            "shipped model 0.3 lowered the best validation loss from 0.4626 to 0.4600)")
    paths.add_argument("--calibration-every", type=int, default=26,
                       help="calibration: one test forecast every N bars (64 sampled paths each)")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--sweep", type=int, default=0, metavar="N",
                       help="Optuna TPE over d_model/layers/lr, N trials (objective: validation "
                            "loss); writes --sweep-csv, no checkpoint")
    sweep.add_argument("--sweep-csv", default="training_analytics/sweep_results.csv")
    fetch = p.add_argument_group("download (--save-only)")
    fetch.add_argument("--save-only", action="store_true",
                       help="download the last --years of --minutes bars from Alpaca (keys: APCA_API_KEY_ID / "
                            "APCA_API_SECRET_KEY or --credentials), write them to --save-path in the "
                            "--local-data format (regular session, close-stamped) and exit without training")
    fetch.add_argument("--symbol", default="SPY")
    fetch.add_argument("--years", type=float, default=2.0)
    fetch.add_argument("--minutes", type=int, default=md.BAR_MINUTES,
                       help=f"bar width (default {md.BAR_MINUTES}: the trainer's features and targets are defined "
                            f"on {md.BAR_MINUTES}-minute bars and it refuses others; the seed's 15 is not the default "
                            f"for that reason)")
    fetch.add_argument("--save-path", default="data/spy_training_data.csv")
    fetch.add_argument("--feed", choices=("iex", "sip"), default="iex", help="iex (free) or sip (paid plan)")
    fetch.add_argument("--end-date", default=None, help="last day of the download, YYYY-MM-DD; None: today")
    fetch.add_argument("--cache-dir", default=None,
                       help="month files of the download, reused by the next run; None: data/alpaca_bars/<feed>")
    fetch.add_argument("--credentials", metavar="FILE", default=None,
                       help="JSON {\"key_id\": …, \"secret_key\": …} outside the repository")
    args = p.parse_args(argv)

    def fail(message):
        p.error(message)
    if args.patience < 0:
        fail(f"--patience must be >= 0, got {args.patience}")
    for name in ("epochs", "batch_size", "lookback", "d_model", "layers", "d_state", "headdim",
                 "horizon_bars", "threads", "eval_stride", "max_bad_steps", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tda_window < 2:
        fail(f"--tda-window must be >= 2 sessions, got {args.tda_window}")
    if args.path_steps < 1 or args.path_step_bars < 1:
        fail(f"--path-steps and --path-step-bars must be >= 1 (the path horizon is their product), got "
             f"{args.path_steps} and {args.path_step_bars}")
    for name in ("diffusion_iters", "diffusion_batch", "diffusion_hidden", "calibration_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.diffusion_cond_dropout < 1.0:
        fail(f"--diffusion-cond-dropout must be in [0, 1), got {args.diffusion_cond_dropout}")
    if args.init_from and not args.diffusion_head:
        fail("--init-from adds a diffusion head to a trained checkpoint: give --diffusion-head with it")
    if args.init_from and args.sweep:
        fail("--init-from and --sweep do not go together")
    if not 0.0 <= args.ema < 1.0:
        fail(f"--ema must be in [0, 1), got {args.ema}")
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max-steps must be >= 1, got {args.max_steps}")
    if (2 * args.d_model) % args.headdim:
        fail(f"--headdim {args.headdim} must divide 2 × --d-model = {2 * args.d_model}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        fail(f"--lr must be a positive number, got {args.lr}")
    if not (0 < args.val_fraction < 1 and 0 < args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 0.9):
        fail("--val-fraction and --test-fraction must be in (0, 1) with a sum below 0.9")
    if args.save_only:
        from data_factory.download_alpaca_matched import SESSION_MINUTES
        if args.minutes not in SESSION_MINUTES:
            fail(f"--minutes must be one of {', '.join(map(str, SESSION_MINUTES))}, got {args.minutes}")
        if not (args.years > 0 and math.isfinite(args.years)):
            fail(f"--years must be a positive number, got {args.years}")
        args.symbol = args.symbol.strip().upper()
    if not args.save_only and not args.sweep and _is_shipped(args.out) and not args.replace_shipped:
        fail(f"--out {args.out} is the shipped model every backtest uses by default; give another --out (the "
             f"default is models/mamba_trained.pth) or add --replace-shipped to replace it")
    if args.burn_in is None:
        args.burn_in = args.lookback
    if args.burn_in < 0:
        fail(f"--burn-in must be >= 0, got {args.burn_in}")
    if args.local_data is None:
        args.train_start = args.train_start or "2001-01-02"
        args.train_end = args.train_end or "2013-12-31"
    return args


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device cuda: CUDA is not available (torch {torch.__version__}, "
                        f"built with CUDA {torch.version.cuda}); use --device cpu or auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def precision_of(device: torch.device) -> str:
    """bf16 autocast (+TF32) on GPUs with native bf16 (compute capability ≥ 8.0), fp32 otherwise
    (on a CPU, and on older GPUs such as a T4, where bf16 is emulated and Triton lacks bf16 dots)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16 autocast + TF32"
    return "fp32 + TF32" if device.type == "cuda" else "fp32"


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=_PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                               cwd=_PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


# ----------------------------------------------------------------------------------------------
# Data

@dataclass
class Prepared:
    """Everything the loop and the evaluation read: one scaled feature tensor and one target
    tensor for the whole period (splits are row ranges of it), and the baseline columns."""

    features: torch.Tensor          # (N, F) float32, scaled
    targets: torch.Tensor           # (N, 5) float32, NaN where undefined / outside its split
    extras: dict                    # sigma_bar, last_return, trailing_rv, implied_vol (N,) numpy
    splits: dict
    scaler: md.Scaler
    rules: md.TargetRules
    first_row: int                  # first row with every feature defined
    description: dict
    index_first: str
    index_last: str
    train_base_rates: dict = field(default_factory=dict)


def _is_shipped(out) -> bool:
    return Path(out).resolve() == (_PROJECT_ROOT / SHIPPED_MODEL).resolve()


def prepare_data(args) -> Prepared:
    rules = md.TargetRules(horizon_bars=args.horizon_bars, pop_k=args.pop_k)
    if args.local_data:
        bars, iv, description = md.load_local_bars(args.local_data)
        spacing = description["median_bar_minutes"]
        if not math.isclose(spacing, md.BAR_MINUTES):
            raise DataError(
                f"{args.local_data}: the bars are {spacing:g} minutes apart (median); the forecaster is trained on "
                f"{md.BAR_MINUTES}-minute bars ({md.BARS_PER_SESSION} a session: its {args.horizon_bars}-bar target is "
                f"{args.horizon_bars / md.BARS_PER_SESSION:g} sessions, its vol windows count sessions of "
                f"{md.BAR_MINUTES}-minute bars) and the backtest feeds it {md.BAR_MINUTES}-minute bars. Give "
                f"{md.BAR_MINUTES}-minute bars (python intelligence/train_mamba.py --save-only --minutes "
                f"{md.BAR_MINUTES} downloads them)")
        if args.train_start or args.train_end:
            local = bars.index.tz_localize(None)
            keep = np.ones(len(bars), bool)
            if args.train_start:
                keep &= local >= np.datetime64(args.train_start)
            if args.train_end:
                keep &= local < np.datetime64(args.train_end) + np.timedelta64(1, "D")
            bars, iv = bars[keep], None if iv is None else iv[keep]
            if bars.empty:
                raise DataError(f"{args.local_data}: no rows between {args.train_start} and {args.train_end}")
        if iv is None:
            iv = md.realized_vol_iv_proxy(bars["close"].to_numpy(float))
    else:
        bars, iv, description = md.embedded_training_bars(args.train_start, args.train_end, args.data_seed)
    tda = {"window": args.tda_window, "dim": 3, "tau": 1} if args.tda_features else None
    try:
        raw_features = md.build_features(bars, iv, tda=tda).to_numpy()
    except TDAInputError as exc:
        raise DataError(f"--tda-window: {exc}") from None
    target_frame = md.build_targets(bars, iv, rules)
    splits = md.make_splits(bars.index, rules.horizon_bars, args.val_fraction, args.test_fraction)
    first_row = md.warmup_rows(raw_features)
    train_rows = slice(max(splits["train"].start, first_row), splits["train"].stop)
    scaler = md.Scaler.fit(raw_features, train_rows)
    targets = np.array(target_frame[list(md.TARGET_NAMES)].to_numpy(np.float64))  # writable copy
    for split in splits.values():
        md.mask_targets_to_split(targets, split, rules.horizon_bars)
    train_targets = targets[train_rows]
    base_rates = {name: float(np.nanmean(train_targets[:, k])) for k, name in enumerate(md.TARGET_NAMES)}
    description = {**description, "rows_used": len(bars), "feature_names": list(md.feature_names(tda)), "tda": tda}
    return Prepared(
        features=torch.from_numpy(scaler.transform(raw_features)),
        targets=torch.from_numpy(targets.astype(np.float32)),
        extras={**{name: target_frame[name].to_numpy(float)
                   for name in ("sigma_bar", "last_return", "trailing_rv", "implied_vol")},
                **{name: bars[name].to_numpy(float) for name in ("close", "high", "low")},
                "iv": np.asarray(iv, dtype=float),
                "close_ns": bars.index.tz_convert("UTC").as_unit("ns").asi8},
        splits=splits, scaler=scaler, rules=rules, first_row=first_row, description=description,
        index_first=str(bars.index[0]), index_last=str(bars.index[-1]), train_base_rates=base_rates)


def target_dict(y: torch.Tensor, burn_in: int) -> dict:
    """(b, L, 5) target batch → loss() targets, the first burn_in positions masked out."""
    if burn_in:
        y = y.clone()
        y[:, :burn_in] = float("nan")
    return {name: y[..., k] for k, name in enumerate(md.TARGET_NAMES)}


# ----------------------------------------------------------------------------------------------
# One step, its guard, the schedule

@dataclass
class StepResult:
    ok: bool
    loss: float
    heads: dict
    grad_norm: float
    state: list | None = None       # stateful steps: the state after the segment, detached


def detach_state(state):
    return [tuple(t.detach() for t in layer) for layer in state]


def train_step(model, optimizer, x, y, lr, grad_clip=1.0, burn_in=0, autocast=None,
               stateful=False, state=None) -> StepResult:
    """Forward, loss, backward, clip, AdamW step. A non-finite loss or gradient norm skips the
    update (gradients dropped, weights untouched) and returns ok=False.

    stateful: the segment runs from ``state`` (None = zeros) with ``forward_stateful`` and the
    result carries the state after it, detached (truncated BPTT); otherwise a plain forward of
    independent windows. burn_in: the first positions left out of the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    new_state = None
    with autocast if autocast is not None else contextlib.nullcontext():
        if stateful:
            outputs, new_state = model.forward_stateful(x, state)
            new_state = detach_state(new_state)
        else:
            outputs = model(x)
    outputs = {k: v.float() for k, v in outputs.items()}
    total, heads = loss(outputs, target_dict(y, burn_in))
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total.item(), {k: v.item() for k, v in heads.items()}, float("nan"), new_state)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    values = {k: v.item() for k, v in heads.items()}
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total.item(), values, grad_norm.item(), new_state)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(True, total.item(), values, grad_norm.item(), new_state)


class NanGuard:
    """Counts skipped (non-finite) steps; raises TrainingError after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.skipped = int(limit), 0, 0

    def record(self, ok: bool, step: int) -> None:
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.limit:
            raise TrainingError(f"step {step}: {self.consecutive} consecutive steps with a non-finite "
                                f"loss or gradient ({self.skipped} skipped in all); lower --lr or check the data")


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to min_ratio·peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Validation, prediction, pictures

def split_pass(model, prep: Prepared, split: str, autocast=None):
    """One causal pass over a split from a zero state (rows from max(split start, first
    defined row) to its end), as inference runs → ({output: (rows,) numpy} plus 'mu', first row)."""
    s = prep.splits[split]
    first = max(s.start, prep.first_row)
    was_training = model.training
    model.eval()
    with autocast if autocast is not None else contextlib.nullcontext():
        out, _ = run_stateful(model, prep.features[first:s.stop].to(next(model.parameters()).device))
    model.train(was_training)
    return out, first


@torch.inference_mode()
def validation_loss(model, prep: Prepared, split: str, burn_in: int, sample_every: int, autocast=None):
    """Loss over one causal pass of a split from a zero state, its first burn_in bars left out
    → (loss, per-head losses, forecasts every ``sample_every`` bars {output: (n,)}, their
    targets (n, 5))."""
    out, first = split_pass(model, prep, split, autocast)
    y = prep.targets[first:prep.splits[split].stop].unsqueeze(0)
    outputs = {k: torch.from_numpy(v).float().unsqueeze(0) for k, v in out.items()}
    total, heads = loss(outputs, target_dict(y, burn_in))
    sample = np.arange(min(burn_in, y.shape[1] - 1), y.shape[1], max(1, sample_every))
    return (total.item(), {k: v.item() for k, v in heads.items()},
            {k: v[sample].astype(np.float32) for k, v in out.items()}, y[0, sample].numpy())


def scatter_figure(pred: dict, actual: np.ndarray, title: str):
    """Prediction vs actual for the five heads (POP as a calibration plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
    for k, name in enumerate(md.TARGET_NAMES):
        ax, a = axes[k], actual[:, k]
        p = pred["pop" if name == "pop" else name]
        ok = np.isfinite(a) & np.isfinite(p)
        a, p = a[ok], p[ok]
        if name == "pop":
            bins = np.linspace(0, 1, 11)
            which = np.clip(np.digitize(p, bins) - 1, 0, 9)
            centers = [p[which == b].mean() for b in range(10) if (which == b).any()]
            rates = [a[which == b].mean() for b in range(10) if (which == b).any()]
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.plot(centers, rates, "o-")
            ax.set_xlabel("predicted POP")
            ax.set_ylabel("observed frequency")
        else:
            ax.scatter(a, p, s=3, alpha=0.3)
            if len(a):
                lo, hi = np.percentile(np.r_[a, p], [0.5, 99.5])
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
            ax.set_xlabel("actual")
            ax.set_ylabel("predicted")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def epoch_snapshot(path: Path, history: dict, pred: dict, actual: np.ndarray, epoch: int) -> None:
    """PNG: train/validation loss curves and the validation scatter of this epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = scatter_figure(pred, actual, f"validation, epoch {epoch}")
    fig.savefig(path.with_name(path.stem + "_scatter.png"), dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = np.asarray(history["train_step"]), np.asarray(history["train_loss"])
    if len(losses):
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label="train (smoothed)")
    ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(f"DeepMamba loss, epoch {epoch}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Checkpoint

def save_checkpoint(path: Path, state_dict: dict, metadata: dict, diffusion_state: dict | None = None) -> None:
    """torch.save to a temp file beside ``path``, then os.replace: never a half-written file.
    ``diffusion_state``: the diffusion path head's weights (``metadata['diffusion']`` describes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": CHECKPOINT_FORMAT, "model_state": {k: v.detach().cpu() for k, v in state_dict.items()},
               "metadata": metadata}
    if diffusion_state is not None:
        payload["diffusion_state"] = {k: v.detach().cpu() for k, v in diffusion_state.items()}
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_config(args, n_features: int, device: torch.device) -> dict:
    return {"n_features": n_features, "d_model": args.d_model, "n_layers": args.layers,
            "d_state": args.d_state, "d_conv": 4, "expand": 2, "headdim": args.headdim, "ngroups": 1,
            "chunk_size": GPU_CHUNK_SIZE if device.type == "cuda" else CPU_CHUNK_SIZE}


# ----------------------------------------------------------------------------------------------
# Evaluation against naive baselines (test split)

def _mse(a, b):
    return float(np.mean((a - b) ** 2))


def _mae(a, b):
    return float(np.mean(np.abs(a - b)))


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def evaluate(model, prep: Prepared, args, split="test", autocast=None) -> dict:
    """Forecasts every --eval-stride bars of ``split`` against naive baselines, per target; see
    the .md report for the definitions. The forecasts come from one causal pass over the split
    from a zero state (as inference runs); they are scored from the split's first row +
    lookback − 1 on (the rows the earlier windowed models were scored on, so tables compare)."""
    period, first = split_pass(model, prep, split, autocast)
    rows = np.arange(first + args.lookback - 1, prep.splits[split].stop, args.eval_stride)
    pred = {k: v[rows - first] for k, v in period.items()}
    y = prep.targets.numpy()[rows].astype(np.float64)
    sigma, last = prep.extras["sigma_bar"][rows], prep.extras["last_return"][rows]
    trailing_rv, implied = prep.extras["trailing_rv"][rows], prep.extras["implied_vol"][rows]
    rules, base = prep.rules, prep.train_base_rates
    report = {"split": split, "first": prep.splits[split].first, "last": prep.splits[split].last,
              "forecasts": len(rows), "every_n_bars": args.eval_stride}

    ok = np.isfinite(y[:, 0]) & np.isfinite(last)
    a, p, persist = y[ok, 0], pred["next_return"][ok].astype(float), last[ok]
    moved = a != 0
    report["next_return"] = {
        "units": "next bar log return / trailing bar vol (standardized)", "n": int(ok.sum()),
        "mse": {"model": _mse(a, p), "zero": _mse(a, 0.0), "persistence": _mse(a, persist)},
        "hit_rate": {"model": float(np.mean(np.sign(p[moved]) == np.sign(a[moved]))),
                     "persistence": float(np.mean(np.sign(persist[moved]) == np.sign(a[moved]))),
                     "always_up": float(np.mean(a[moved] > 0)),
                     "zero": None},
        "note": "hit rate over bars whose next return is not 0; the zero forecast has no direction",
    }

    ok = np.isfinite(y[:, 1]) & np.isfinite(trailing_rv) & np.isfinite(implied)
    a = y[ok, 1] / rules.rv_target_scale
    p = pred["realized_vol"][ok].astype(float) / rules.rv_target_scale
    report["realized_vol"] = {
        "units": f"annualised realized vol over the next {rules.horizon_bars} bars (decimal)", "n": int(ok.sum()),
        "mae": {"model": _mae(a, p), "trailing_rv": _mae(a, trailing_rv[ok]), "implied_vol": _mae(a, implied[ok])},
        "rmse": {"model": _rmse(a, p), "trailing_rv": _rmse(a, trailing_rv[ok]),
                 "implied_vol": _rmse(a, implied[ok])},
        "note": f"trailing_rv: realized vol of the previous {rules.horizon_bars} bars; implied_vol: IV index/100",
    }

    ok = np.isfinite(y[:, 4])
    a, p = y[ok, 4], np.clip(pred["pop"][ok].astype(float), 1e-6, 1 - 1e-6)
    p0 = float(np.clip(base["pop"], 1e-6, 1 - 1e-6))
    report["pop"] = {
        "units": "probability", "n": int(ok.sum()), "observed_rate": float(a.mean()) if ok.any() else None,
        "train_base_rate": base["pop"],
        "brier": {"model": _mse(a, p), "base_rate": _mse(a, p0)},
        "log_loss": {"model": float(-np.mean(a * np.log(p) + (1 - a) * np.log(1 - p))),
                     "base_rate": float(-np.mean(a * np.log(p0) + (1 - a) * np.log(1 - p0)))},
    }

    scale = sigma * math.sqrt(rules.horizon_bars)
    for k, name in ((2, "max_up"), (3, "max_down")):
        ok = np.isfinite(y[:, k]) & np.isfinite(scale)
        a, p = y[ok, k] * scale[ok], pred[name][ok].astype(float) * scale[ok]
        kappa = base[name]
        report[name] = {
            "units": f"log excursion over the next {rules.horizon_bars} bars", "n": int(ok.sum()),
            "mae": {"model": _mae(a, p), "trailing_vol_scaling": _mae(a, kappa * scale[ok])},
            "note": f"baseline: {kappa:.3f} (train mean) × trailing bar vol × √horizon",
        }
    mu = pred["mu"].astype(float)
    report["mu_mamba"] = {"mean": float(mu.mean()), "std": float(mu.std()),
                          "share_above_0.5": float(np.mean(mu > 0.5)),
                          "mean_confidence": float(pred["confidence"].mean())}
    return report


def report_markdown(ev: dict, meta: dict) -> str:
    nr, rv, pop, up, dn = ev["next_return"], ev["realized_vol"], ev["pop"], ev["max_up"], ev["max_down"]
    data = meta["data"]
    synthetic = data.get("synthetic", False)
    lines = [
        f"# DeepMamba evaluation — {Path(meta['out']).name}",
        "",
        (f"Out-of-sample ({ev['split']} split, {ev['first']} … {ev['last']}): {ev['forecasts']} forecasts, "
        f"one every {ev['every_n_bars']} bars from bar {meta['lookback']} of the split on, all from "
        f"one causal pass over the split (recurrent state carried bar to bar, as at inference)."),
        "",
        ("**Data: the intraday bars are SYNTHETIC** (seeded Brownian bridges through REAL S&P 500 daily "
         "OHLC; IV index before 2014 a GARCH proxy). These numbers say how the model does on that series, "
         "not on real SPY intraday data. Within a session the synthetic path is pinned to the day's real "
         "high, low and close, which can make bar-to-bar moves more predictable than real bars are: read "
         "the next-return rows with that in mind." if synthetic else f"Data: {data.get('source')}."),
        "",
        "| target | metric | model | baselines |",
        "|---|---|---|---|",
        (f"| next return (standardized) | MSE | {nr['mse']['model']:.4f} | zero {nr['mse']['zero']:.4f}, "
        f"persistence {nr['mse']['persistence']:.4f} |"),
        (f"| | directional hit rate | {nr['hit_rate']['model']:.3f} | persistence "
        f"{nr['hit_rate']['persistence']:.3f}, always-up {nr['hit_rate']['always_up']:.3f} |"),
        (f"| realized vol (annualised) | MAE | {rv['mae']['model']:.4f} | trailing RV {rv['mae']['trailing_rv']:.4f}, "
        f"IV index {rv['mae']['implied_vol']:.4f} |"),
        (f"| | RMSE | {rv['rmse']['model']:.4f} | trailing RV {rv['rmse']['trailing_rv']:.4f}, "
        f"IV index {rv['rmse']['implied_vol']:.4f} |"),
        (f"| POP (observed {pop['observed_rate']:.3f}) | Brier | {pop['brier']['model']:.4f} | "
        f"train base rate {pop['train_base_rate']:.3f}: {pop['brier']['base_rate']:.4f} |"),
        f"| | log loss | {pop['log_loss']['model']:.4f} | base rate {pop['log_loss']['base_rate']:.4f} |",
        (f"| max up excursion (log) | MAE | {up['mae']['model']:.5f} | trailing-vol scaling "
        f"{up['mae']['trailing_vol_scaling']:.5f} |"),
        (f"| max down excursion (log) | MAE | {dn['mae']['model']:.5f} | trailing-vol scaling "
        f"{dn['mae']['trailing_vol_scaling']:.5f} |"),
        "",
        (f"μ_Mamba on these bars: mean {ev['mu_mamba']['mean']:.3f}, std {ev['mu_mamba']['std']:.3f}, "
        f"share above 0.5 {ev['mu_mamba']['share_above_0.5']:.3f}."),
        "",
        "Targets (`intelligence.mamba_data.TargetRules`):",
        "",
        "```",
        meta["target_rules"]["definitions"],
        "```",
        "",
        (f"Trained: {meta['training']['steps']} steps, best validation loss {meta['metrics']['best_val_loss']:.4f} "
        f"at step {meta['metrics']['best_step']}; command: `{meta['command']}`."),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The training run

def train(args, prep: Prepared, device: torch.device, *, quiet=False, write_outputs=True) -> dict:
    """One training run; returns {'best_val_loss', 'best_state', 'metadata', 'model', ...}."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision_of(device).startswith("bf16") else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    features, targets = prep.features.to(device).contiguous(), prep.targets.to(device).contiguous()
    train_split = prep.splits["train"]
    segments = md.StreamSegments(max(train_split.start, prep.first_row), train_split.stop, args.batch_size,
                                 args.lookback, seed=args.seed,
                                 min_segments=2 + args.burn_in // args.lookback)
    steps_per_epoch = len(segments)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = min(args.warmup_steps, max(1, total_steps // 5))   # short runs still reach the peak

    config = model_config(args, features.shape[1], device)
    # our mixer on every device: it resumes from a state (mamba_ssm's Mamba2.forward does not)
    model = DeepMamba(**config, prefer_kernels=False).to(device)
    optimizer = model.configure_optimizer(lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    guard = NanGuard(args.max_bad_steps)
    # --ema: the averaged weights are what validation scores and the checkpoint holds (the raw ones
    # keep training); averaging damps the step-to-step noise of fitting heavily overlapping targets
    averaged = None
    if args.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    scored = model if averaged is None else averaged.module

    writer = None
    if write_outputs and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(args.log_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")))
    snapshot_dir = Path(args.snapshot_dir) if write_outputs and args.snapshot_dir else None
    if snapshot_dir:
        snapshot_dir.mkdir(parents=True, exist_ok=True)

    progress = None
    if not (quiet or args.no_progress):
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        progress.start()
        task = progress.add_task("train", total=total_steps, info="")

    def say(text):
        if quiet:
            return
        if progress is not None:
            progress.console.print(text)
        else:
            print(text, flush=True)

    say(f"DeepMamba {n_params:,} parameters, {config}; {segments.n_streams} streams of "
        f"{segments.stream_length:,} bars in {args.lookback}-bar segments, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, device {device}, threads {torch.get_num_threads()}")
    history = {"train_step": [], "train_loss": [], "val_step": [], "val_loss": []}
    best = {"val_loss": float("inf"), "state": None, "step": None, "epoch": None, "heads": None}
    step, tokens, train_seconds, epoch = 0, 0, 0.0, 0
    model.train()
    try:
        while step < total_steps:
            epoch += 1
            state, bars_run = None, 0          # every stream starts the epoch from a zero state
            for starts in segments.epoch():
                if step >= total_steps:
                    break
                t0 = time.perf_counter()
                x = md.StreamSegments.gather(features, starts, args.lookback)
                y = md.StreamSegments.gather(targets, starts, args.lookback)
                lr = cosine_lr(step, total_steps, args.lr, warmup_steps, args.min_lr_ratio)
                state_before = state
                result = train_step(model, optimizer, x, y, lr, args.grad_clip,
                                    max(0, args.burn_in - bars_run), autocast, stateful=True, state=state)
                if result.ok:
                    state, bars_run = result.state, bars_run + args.lookback
                    if averaged is not None:
                        averaged.update_parameters(model)
                else:                          # a poisoned state is not carried: restart the streams
                    state, bars_run = None, 0
                if cuda:
                    torch.cuda.synchronize()
                train_seconds += time.perf_counter() - t0
                tokens += x.shape[0] * x.shape[1]
                guard.record(result.ok, step)
                if result.ok:
                    history["train_step"].append(step)
                    history["train_loss"].append(result.loss)
                if writer is not None and result.ok and step % args.log_every == 0:
                    writer.add_scalar("loss/total", result.loss, step)
                    for name, value in result.heads.items():
                        writer.add_scalar(f"loss/{name}", value, step)
                    writer.add_scalar("lr", lr, step)
                    writer.add_scalar("grad_norm", result.grad_norm, step)
                    writer.add_scalar("tokens_per_second", tokens / max(train_seconds, 1e-9), step)
                if writer is not None and args.scatter_every and step % args.scatter_every == 0:
                    with torch.inference_mode(), autocast if autocast is not None else contextlib.nullcontext():
                        model.eval()
                        out = {k: v.float()[:, -1].cpu().numpy()
                               for k, v in model.forward_stateful(x, state_before)[0].items()}
                        model.train()
                    fig = scatter_figure(out, y[:, -1].float().cpu().numpy(), f"train batch, step {step}")
                    writer.add_figure("scatter/train_batch", fig, step)
                step += 1
                if progress is not None:
                    progress.update(task, advance=1, info=f"epoch {epoch} loss {result.loss:.4f} lr {lr:.2e} "
                                                          f"{tokens / max(train_seconds, 1e-9):,.0f} tok/s")
            # per-epoch validation (also after a partial last epoch)
            val_loss, val_heads, val_pred, val_actual = validation_loss(
                scored, prep, "validation", args.burn_in, args.lookback, autocast)
            history["val_step"].append(step)
            history["val_loss"].append(val_loss)
            improved = val_loss < best["val_loss"]
            if improved:
                best.update(val_loss=val_loss, step=step, epoch=epoch, heads=val_heads,
                            state=copy.deepcopy({k: v.detach().cpu() for k, v in scored.state_dict().items()}))
            say(f"epoch {epoch} step {step}: train {np.mean(history['train_loss'][-steps_per_epoch:]):.4f} "
                f"val {val_loss:.4f}" + (" (best)" if improved else "")
                + f" | {tokens / max(train_seconds, 1e-9):,.0f} tok/s")
            if writer is not None:
                writer.add_scalar("val/total", val_loss, step)
                for name, value in val_heads.items():
                    writer.add_scalar(f"val/{name}", value, step)
            if snapshot_dir is not None:
                epoch_snapshot(snapshot_dir / f"epoch_{epoch:03d}.png", history, val_pred, val_actual, epoch)
            if writer is not None:
                writer.add_figure("scatter/validation",
                                  scatter_figure(val_pred, val_actual, f"validation, epoch {epoch}"), step)
            if improved and write_outputs:
                # the best so far is on disk at once: an interrupted run still leaves a usable model
                meta = build_metadata(args, prep, config, best, history, step, tokens, train_seconds, guard, device)
                save_checkpoint(Path(args.out), best["state"], meta)
            if args.patience and best["epoch"] is not None and epoch - best["epoch"] >= args.patience:
                # the horizon targets overlap heavily (780 bars each), so the train split holds few
                # independent samples and the model soon starts fitting its noise
                say(f"early stop: no better validation loss for {args.patience} epochs (best epoch {best['epoch']})")
                best["stopped_early"] = True
                break
    finally:
        if progress is not None:
            progress.stop()
        if writer is not None:
            writer.flush()
            writer.close()
    if best["state"] is None or not math.isfinite(best["val_loss"]):
        raise TrainingError("no finite validation loss was reached; nothing saved")
    model.load_state_dict(best["state"])
    meta = build_metadata(args, prep, config, best, history, step, tokens, train_seconds, guard, device)
    return {"best_val_loss": best["val_loss"], "best_state": best["state"], "metadata": meta, "model": model,
            "history": history, "autocast": autocast, "tokens_per_second": tokens / max(train_seconds, 1e-9)}


def build_metadata(args, prep: Prepared, config, best, history, step, tokens, train_seconds, guard, device) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_class": "intelligence.mamba_engine.DeepMamba",
        "model_config": config,
        "lookback": args.lookback,
        "inference": "stateful",
        "stateful_training": {"streams": args.batch_size, "segment_bars": args.lookback,
                              "burn_in": args.burn_in,
                              "scheme": "contiguous streams of the train split, state carried across "
                                        "segments (detached: truncated BPTT), zero state + burn-in at "
                                        "stream starts"},
        "feature_names": list(prep_feature_names(prep)),
        "tda": prep.description.get("tda"),
        "scaler": prep.scaler.to_dict(),
        "warmup_rows": prep.first_row,
        "target_names": list(md.TARGET_NAMES),
        "target_rules": prep.rules.as_dict(),
        "burn_in": args.burn_in,
        "strike_input": "none (the POP head learned the fixed k·IV·√horizon rule)",
        "membership": "mu = 0.5 + confidence·(POP − 0.5) (mamba_engine.membership_tensor, no range scale)",
        "train_base_rates": prep.train_base_rates,
        "data": prep.description,
        "data_first_bar": prep.index_first, "data_last_bar": prep.index_last,
        "splits": {name: {"first": s.first, "last": s.last, "rows": [s.start, s.stop]}
                   for name, s in prep.splits.items()},
        "training": {"args": {k: v for k, v in vars(args).items()}, "steps": step, "epochs_run": len(history["val_loss"]),
                     "stopped_early": bool(best.get("stopped_early", False)),
                     "tokens": tokens, "train_seconds": train_seconds,
                     "tokens_per_second": tokens / max(train_seconds, 1e-9), "skipped_steps": guard.skipped,
                     "device": str(device), "threads": torch.get_num_threads(),
                     "precision": precision_of(device),
                     "val_loss_history": list(zip(history["val_step"], history["val_loss"]))},
        "metrics": {"best_val_loss": best["val_loss"], "best_step": best["step"], "best_epoch": best["epoch"],
                    "best_val_heads": best["heads"]},
        "git": git_commit(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m intelligence.train_mamba",
                             *(sys.argv[1:] if args._argv is None else args._argv)]),
        "out": str(args.out),
    }


def load_trained(args, prep: Prepared, device):
    """--init-from: the checkpoint's trunk (frozen) → (model, metadata, state dict). DataError
    when it is not a stateful DeepMamba trained on the features and scaling ``prep`` has."""
    from intelligence.mamba_inference import ModelFileError, load_forecaster
    try:
        forecaster = load_forecaster(args.init_from)
    except ModelFileError as exc:
        raise DataError(str(exc)) from None
    meta = copy.deepcopy(forecaster.metadata)
    if not forecaster.stateful:
        raise DataError(f"{args.init_from}: a windowed checkpoint; the path head conditions on the stateful "
                        f"pass's hidden state (retrain it with this version of train_mamba)")
    if list(meta["feature_names"]) != [str(name) for name in prep_feature_names(prep)]:
        raise DataError(f"{args.init_from}: trained on features {meta['feature_names']}, this run builds "
                        f"{list(prep_feature_names(prep))}")
    theirs, ours = md.Scaler.from_dict(meta["scaler"]), prep.scaler
    if not (np.allclose(theirs.mean, ours.mean, rtol=1e-6, atol=1e-9)
            and np.allclose(theirs.std, ours.std, rtol=1e-6, atol=1e-9)):
        raise DataError(f"{args.init_from}: its feature scaling differs from this run's data: give the data "
                        f"options it was trained with (`{meta.get('command')}`)")
    args.burn_in = int(meta.get("burn_in", args.burn_in))
    args.lookback = int(meta["lookback"])
    model = forecaster.model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    meta["trunk_from"] = str(args.init_from)
    meta["out"] = str(args.out)
    return model, meta, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def prep_feature_names(prep: Prepared) -> tuple:
    return tuple(prep.description.get("feature_names", md.FEATURE_NAMES))


def fit_path_head(args, prep: Prepared, model, meta: dict, device, out: Path):
    """Stage 2 (intelligence/path_training.py): fit the diffusion head on the frozen ``model``,
    calibrate it on the test split, write the figure beside ``out`` and the description into
    ``meta['diffusion']`` → (head state dict, calibration dict for the reports)."""
    from intelligence.path_training import calibrate_paths, calibration_figure, train_diffusion_head

    rules = PathRules(args.path_steps, args.path_step_bars)
    writer = None
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(args.log_dir) / (datetime.now().strftime("%Y%m%d-%H%M%S") + "-paths")))
    try:
        fitted = train_diffusion_head(model, prep, args, rules, writer=writer, device=device)
        # the validation split's calibration is what settings are chosen by; the test split's is
        # the out-of-sample figure
        selection = calibrate_paths(model, fitted["head"], prep, args, rules, "validation",
                                    every=args.calibration_every, seed=args.seed, device=device)
        selection.pop("_arrays")
        print("validation calibration: " + "; ".join(
            f"{level} interval covers {row['all_steps']:.3f}" for level, row in selection["coverage"].items())
            + "; touch Brier " + ", ".join(f"|Δ| {name[6:]}: diffusion {row['brier']['diffusion']:.4f} vs delta "
                                            f"{row['brier']['delta']:.4f}" for name, row in selection["touch"].items()),
            flush=True)
        t0 = time.perf_counter()
        calibration = calibrate_paths(model, fitted["head"], prep, args, rules, every=args.calibration_every,
                                      seed=args.seed, device=device)
        print(f"calibration: {calibration['forecasts']} test forecasts × 64 paths in {time.perf_counter() - t0:.1f} s; "
              + "; ".join(f"{level} interval covers {row['all_steps']:.3f}" for level, row in calibration["coverage"].items())
              + "; touch Brier " + ", ".join(f"|Δ| {name[6:]}: diffusion {row['brier']['diffusion']:.4f} vs delta "
                                              f"{row['brier']['delta']:.4f}" for name, row in calibration["touch"].items()),
              flush=True)
        figure = calibration_figure(calibration, f"{out.name}: diffusion path head, test split")
        figure_path = out.with_name(out.name + ".paths.png")
        figure_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(figure_path, dpi=80)
        if writer is not None:
            writer.add_figure("paths/test_calibration_and_45_day_trajectories", figure, 0)
    finally:
        if writer is not None:
            writer.close()
    calibration.pop("_arrays")
    meta["diffusion"] = {
        "config": fitted["config"], "path_rules": rules.as_dict(), "sampler": "DDIM (eta 0), 20 levels",
        "condition": "DeepMamba final hidden state at the forecast bar (norm_f output), trunk frozen",
        "training": {"iterations": args.diffusion_iters, "batch": args.diffusion_batch, "lr": args.diffusion_lr,
                     "cond_dropout": args.diffusion_cond_dropout,
                     "best_val_loss": fitted["best_val_loss"], "best_iter": fitted["best_iter"],
                     "seconds": fitted["seconds"], "train_rows": fitted["train_rows"],
                     "val_rows": fitted["val_rows"]},
        "calibration": calibration,
        "validation_calibration": selection,
        "command": " ".join(["python -m intelligence.train_mamba",
                             *(sys.argv[1:] if args._argv is None else args._argv)]),
    }
    return fitted["head"].state_dict(), calibration


def run_sweep(args, prep: Prepared, device) -> int:
    """Optuna TPE over d_model, layers and lr; objective = best validation loss of a run."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        trial_args = copy.copy(args)
        trial_args.d_model = trial.suggest_categorical("d_model", [32, 64, 128])
        trial_args.layers = trial.suggest_int("layers", 2, 6)
        trial_args.lr = trial.suggest_float("lr", 2e-4, 3e-3, log=True)
        if (2 * trial_args.d_model) % trial_args.headdim:
            trial_args.headdim = 16
        try:
            result = train(trial_args, prep, device, quiet=True, write_outputs=False)
        except TrainingError:
            return float("inf")
        print(f"trial {trial.number}: d_model {trial_args.d_model} layers {trial_args.layers} "
              f"lr {trial_args.lr:.2e} -> val {result['best_val_loss']:.4f}", flush=True)
        return result["best_val_loss"]

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=args.seed))
    study.optimize(objective, n_trials=args.sweep)
    csv = Path(args.sweep_csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(csv, index=False)
    b = study.best_trial
    print(f"best trial {b.number}: val loss {b.value:.4f} with {b.params}; trials written to {csv}")
    print(f"train it: python -m intelligence.train_mamba --d-model {b.params['d_model']} --layers "
          f"{b.params['layers']} --lr {b.params['lr']:.3g} ...")
    return 0


def save_only(args) -> int:
    """--save-only: download (resumable, data_factory.download_alpaca_matched), write the
    --local-data CSV, say how to train on it; no training. 0 done, 1 download failed, 2 setup."""
    from data_factory import download_alpaca_matched as dl
    from data_factory.alpaca_access import AccessSetupError, load_credentials

    try:
        endpoints = dl.data_endpoints()
        credentials = load_credentials(path=args.credentials)
        result = dl.save_training_data(credentials, endpoints, symbol=args.symbol, years=args.years,
                                       minutes=args.minutes, save_path=args.save_path, cache_dir=args.cache_dir,
                                       feed=args.feed, end=args.end_date, progress=not args.no_progress)
        md.load_local_bars(result["path"])          # the file reads back as --local-data
    except AccessSetupError as exc:
        print(f"train_mamba: error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"train_mamba: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_mamba: interrupted; the months downloaded so far are kept, rerun to resume", file=sys.stderr)
        return 130
    print(dl.describe_summary(result["download"]))
    print(f"saved {result['path']}: {result['rows']:,} regular-session {args.minutes}-minute bars of {result['symbol']} "
          f"over {result['sessions']} sessions, {result['first']} … {result['last']} (bar close times; "
          f"{result['dropped']:,} extended-hours bars left out)")
    if args.minutes != md.BAR_MINUTES:
        print(f"note: the forecaster trains on {md.BAR_MINUTES}-minute bars only and refuses these "
              f"{args.minutes}-minute ones; download with --minutes {md.BAR_MINUTES} to train on them")
    else:
        print(f"train on it: python intelligence/train_mamba.py --local-data {result['path']}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args._argv = None if argv is None else list(argv)
    if args.save_only:
        return save_only(args)
    try:
        device = pick_device(args.device)
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        prep = prepare_data(args)
        print(f"data: {prep.description.get('source')} {prep.index_first} … {prep.index_last}, "
              f"{len(prep.features):,} bars × {prep.features.shape[1]} features "
              f"({time.perf_counter() - t0:.1f} s); splits "
              + ", ".join(f"{s.name} {s.first}…{s.last} ({len(s):,})" for s in prep.splits.values()), flush=True)
    except DataError as exc:
        print(f"train_mamba: error: {exc}", file=sys.stderr)
        return 2
    if not args.local_data and prep.splits["test"].last >= BACKTEST_START:
        print(f"note: the data period reaches {prep.splits['test'].last}, inside the default backtest period "
              f"(from {BACKTEST_START}); a backtest there would not be out of sample", flush=True)
    if args.sweep:
        return run_sweep(args, prep, device)
    if args.init_from:
        try:
            model, meta, best_state = load_trained(args, prep, device)
        except DataError as exc:
            print(f"train_mamba: error: {exc}", file=sys.stderr)
            return 2
        autocast = None
        print(f"trunk: {args.init_from} (trained by `{meta['command']}`), frozen", flush=True)
    else:
        try:
            result = train(args, prep, device)
        except TrainingError as exc:
            print(f"train_mamba: error: {exc}", file=sys.stderr)
            return 1
        model, meta, best_state, autocast = (result["model"], result["metadata"], result["best_state"],
                                             result["autocast"])
    ev = evaluate(model, prep, args, "test", autocast)
    meta["metrics"]["test"] = ev
    out = Path(args.out)
    diffusion_state, calibration = None, None
    if args.diffusion_head:
        try:
            diffusion_state, calibration = fit_path_head(args, prep, model, meta, device, out)
        except (ValueError, PathInputError) as exc:
            print(f"train_mamba: error: {exc}", file=sys.stderr)
            return 2
    save_checkpoint(out, best_state, meta, diffusion_state)
    eval_json = out.with_name(out.name + ".eval.json")
    eval_md = out.with_name(out.name + ".eval.md")
    write_text_atomic(eval_json, json.dumps({"evaluation": ev, "validation": meta["metrics"],
                                             "data": meta["data"], "target_rules": meta["target_rules"],
                                             "command": meta["command"], "paths": calibration},
                                            indent=2, default=str))
    write_text_atomic(eval_md, report_markdown(ev, meta)
                      + ("" if calibration is None else "\n" + calibration_markdown(calibration)
                         + f"\n![calibration]({out.name}.paths.png)\n"))
    nr, rv, pop = ev["next_return"], ev["realized_vol"], ev["pop"]
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB); test: next-return MSE {nr['mse']['model']:.4f} "
          f"(zero {nr['mse']['zero']:.4f}), RV MAE {rv['mae']['model']:.4f} (trailing {rv['mae']['trailing_rv']:.4f}, "
          f"IV {rv['mae']['implied_vol']:.4f}), POP Brier {pop['brier']['model']:.4f} "
          f"(base rate {pop['brier']['base_rate']:.4f}); report {eval_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
