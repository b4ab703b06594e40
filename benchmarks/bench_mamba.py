"""Benchmark: DeepMamba (intelligence/mamba_engine.py) CPU training throughput and one-bar step()
latency, against same-run anchors.

Prints figures, asserts nothing (the box is shared and drifts ±30 %; read the ratios, which come
from the same run with the models' timed steps interleaved round by round).

Training: tokens/s of a full step (forward, loss, backward, AdamW) on batch 32 × 128 bars of 8
features, for each size (small: 4 layers × d_model 64; large: 8 layers × d_model 128; d_state 32,
headdim 32, expand 2, d_conv 4) and each thread count, for
- ours: ``DeepMamba`` with all its heads and ``loss`` (a little more work than the anchors do);
- anchor ``mambapy``: mambapy's pure-PyTorch Mamba-1 (parallel scan), same d_model, layers,
  d_state, expand and d_conv;
- anchor ``transformers``: transformers' ``Mamba2Model`` run through its pure-PyTorch
  ``torch_forward`` path (no CUDA kernels on a CPU), same sizes, chunk_size --tf-chunk (default
  32, our chunk: its fastest on L = 128; its own default 256 is ~3× slower here).
Each anchor is wrapped like ours: Linear(8 → d_model) → backbone → RMSNorm → Linear(→ 6), MSE.
All use ``torch.optim.AdamW(fused=True)``. An anchor that is not installed is skipped (and said).

Step latency: ``DeepMamba.step`` at batch 1, one thread, under ``torch.inference_mode()``, median
and p99 over --step-iters bars after a warm-up; mambapy's ``step`` beside it when installed.

Inference (--inference-bars N, default 20000; 0 skips): the shipped checkpoint
(models/mamba_active.pth, or --model), one thread, on N bars of scaled random features: the
whole-period stateful pass (``intelligence.mamba_inference.run_stateful``, every head of every bar
from one causal pass) against the windowed path (``Forecaster.forecast_rows``: one 128-bar window
recomputed per target bar, the pre-issue-#14 inference), both timed in this run; bars/s of each.

Memory allocator: glibc returning freed pages to the OS costs small-model CPU training up to half
its time (shared/reference/performance-facts.md), so unless --default-malloc is given the script
re-executes itself with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised, for every model
alike, and prints which setting the figures used.

Usage:  .venv/bin/python benchmarks/bench_mamba.py [--sizes small,large] [--threads 1,2]
        [--steps 3] [--rounds 3] [--warmup 1] [--tf-chunk 32] [--step-iters 1000]
        [--chunk-sweep] [--default-malloc] [--skip-train] [--skip-step]
        [--inference-bars 20000] [--model models/mamba_active.pth]
"""
from __future__ import annotations

import os
import sys

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
                   "MALLOC_TRIM_THRESHOLD_": str(1024 ** 4)}

if "--default-malloc" not in sys.argv and any(os.environ.get(k) != v
                                              for k, v in MALLOC_SETTINGS.items()):
    os.environ.update(MALLOC_SETTINGS)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from intelligence.mamba_engine import CPU_CHUNK_SIZE, DeepMamba, loss

SIZES = {"small": {"d_model": 64, "n_layers": 4}, "large": {"d_model": 128, "n_layers": 8}}
BATCH, LENGTH, N_FEATURES, D_STATE, HEADDIM, EXPAND, D_CONV = 32, 128, 8, 32, 32, 2, 4


# ----------------------------------------------------------------------------------------------
# Models under test: each is (name, model, one_training_step)

def ours(size, chunk_size):
    model = DeepMamba(n_features=N_FEATURES, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND,
                      headdim=HEADDIM, chunk_size=chunk_size, prefer_kernels=False, **size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, LENGTH, N_FEATURES, generator=generator)
    targets = {name: torch.randn(BATCH, LENGTH, generator=generator)
               for name in ("next_return", "realized_vol", "max_up", "max_down")}
    targets["pop"] = (torch.rand(BATCH, LENGTH, generator=generator) > 0.5).float()

    def train_step():
        total, _ = loss(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return model, train_step


class Wrapped(nn.Module):
    """Linear(8 → d) → backbone → RMSNorm → Linear(d → 6): the anchors dressed like DeepMamba."""

    def __init__(self, backbone, d_model, call):
        super().__init__()
        self.embed, self.backbone = nn.Linear(N_FEATURES, d_model), backbone
        self.norm, self.head = nn.RMSNorm(d_model), nn.Linear(d_model, 6)
        self.call = call

    def forward(self, x):
        return self.head(self.norm(self.call(self.backbone, self.embed(x))))


def anchor_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, LENGTH, N_FEATURES, generator=generator)
    y = torch.randn(BATCH, LENGTH, 6, generator=generator)

    def train_step():
        total = F.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return train_step


def mambapy_model(size):
    from mambapy.mamba import Mamba, MambaConfig
    config = MambaConfig(d_model=size["d_model"], n_layers=size["n_layers"], d_state=D_STATE,
                         expand_factor=EXPAND, d_conv=D_CONV, pscan=True)
    return Wrapped(Mamba(config), size["d_model"], lambda backbone, h: backbone(h))


def transformers_model(size, chunk_size):
    from transformers import Mamba2Config, Mamba2Model
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()     # "falling back to PyTorch" notices: expected
    d_model = size["d_model"]
    config = Mamba2Config(hidden_size=d_model, num_hidden_layers=size["n_layers"],
                          state_size=D_STATE, expand=EXPAND, head_dim=HEADDIM,
                          num_heads=EXPAND * d_model // HEADDIM, n_groups=1, conv_kernel=D_CONV,
                          chunk_size=chunk_size, vocab_size=16)
    return Wrapped(Mamba2Model(config), d_model,
                   lambda backbone, h: backbone(inputs_embeds=h).last_hidden_state)


def installed(module):
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------------
# Timing

def time_training(contenders, threads, steps, rounds, warmup, slow_seconds=2.0):
    """Interleaved: every round times `steps` steps of each contender in turn → median s/step.

    A contender whose warm-up step took over slow_seconds (mambapy on the large size) is timed
    one step per round: its figure is not the one the ratios hinge on.
    """
    torch.set_num_threads(threads)
    per_round = {}
    for name, step in contenders:
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        slow = (time.perf_counter() - start) / max(1, warmup) > slow_seconds
        per_round[name] = 1 if slow else steps
    samples = {name: [] for name, _ in contenders}
    for _ in range(rounds):
        for name, step in contenders:
            for _ in range(per_round[name]):
                start = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def step_latency(step_once, iterations, warmup=100):
    times = []
    with torch.inference_mode():
        for i in range(warmup + iterations):
            start = time.perf_counter()
            step_once()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tf-chunk", type=int, default=CPU_CHUNK_SIZE)
    parser.add_argument("--step-iters", type=int, default=1000)
    parser.add_argument("--chunk-sweep", action="store_true",
                        help="also time ours at chunk sizes 16, 32, 64, 128 (small, 1 thread)")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--inference-bars", type=int, default=20000,
                        help="bars for the stateful-vs-windowed inference timing (0: skip)")
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "mamba_active.pth"))
    args = parser.parse_args(argv)

    malloc = ("glibc defaults" if args.default_malloc else
              " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items()))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs (load average {load}); "
          f"allocator: {malloc}")
    print(f"batch {BATCH} × {LENGTH} bars × {N_FEATURES} features; d_state {D_STATE}, headdim "
          f"{HEADDIM}, expand {EXPAND}, d_conv {D_CONV}; ours chunk {CPU_CHUNK_SIZE}; "
          f"transformers chunk {args.tf_chunk}; {args.rounds} rounds × {args.steps} timed steps")
    anchors = [("mambapy", "mambapy"), ("transformers", "transformers")]
    for name, module in anchors:
        if not installed(module):
            print(f"anchor {name}: not installed ({module}), skipped")

    if not args.skip_train:
        header = (f"{'size':6} {'thr':>3} {'model':13} {'ms/step':>9} {'tokens/s':>10} "
                  f"{'ours ×':>7}")
        print("\nTraining (forward + loss + backward + AdamW)\n" + header + "\n" + "-" * len(header))
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            for threads in (int(t) for t in args.threads.split(",")):
                torch.manual_seed(0)
                contenders = [("ours", ours(size, CPU_CHUNK_SIZE)[1])]
                if installed("mambapy"):
                    contenders.append(("mambapy", anchor_step(mambapy_model(size))))
                if installed("transformers"):
                    contenders.append(("transformers",
                                       anchor_step(transformers_model(size, args.tf_chunk))))
                seconds = time_training(contenders, threads, args.steps, args.rounds, args.warmup)
                tokens = {name: BATCH * LENGTH / s for name, s in seconds.items()}
                for name, _ in contenders:
                    ratio = "" if name == "ours" else f"{tokens['ours'] / tokens[name]:7.2f}"
                    print(f"{size_name:6} {threads:>3} {name:13} {seconds[name] * 1e3:9.1f} "
                          f"{tokens[name]:10.0f} {ratio:>7}")
                if len(tokens) > 1:
                    best = max(v for k, v in tokens.items() if k != "ours")
                    print(f"{'':6} {'':>3} {'→ vs faster anchor':23} {'':>10} "
                          f"{tokens['ours'] / best:7.2f}")

    if args.chunk_sweep:
        print("\nOurs by chunk size (small, 1 thread)")
        contenders = [(f"chunk {q}", ours(SIZES["small"], q)[1]) for q in (16, 32, 64, 128)]
        seconds = time_training(contenders, 1, args.steps, args.rounds, args.warmup)
        for name, s in seconds.items():
            print(f"  {name:10} {s * 1e3:8.1f} ms/step {BATCH * LENGTH / s:9.0f} tokens/s")

    if not args.skip_step:
        torch.set_num_threads(1)
        print(f"\nOne-bar step() latency, batch 1, one thread, {args.step_iters} bars "
              "(inference_mode)")
        torch.manual_seed(0)
        model, _ = ours(SIZES["small"], CPU_CHUNK_SIZE)
        model.eval()
        state = [model.allocate_state(1)]
        bar = torch.randn(1, N_FEATURES)

        def ours_once():
            _, state[0] = model.step(bar, state[0])
        median, p99 = step_latency(ours_once, args.step_iters)
        print(f"  ours (small)     median {median * 1e3:.3f} ms   p99 {p99 * 1e3:.3f} ms")
        if installed("mambapy"):
            anchor = mambapy_model(SIZES["small"]).eval()
            d_inner = EXPAND * SIZES["small"]["d_model"]
            caches = [[(None, torch.zeros(1, d_inner, D_CONV - 1))
                       for _ in range(SIZES["small"]["n_layers"])]]

            def mambapy_once():
                h = anchor.embed(bar)
                h, caches[0] = anchor.backbone.step(h, caches[0])
                anchor.head(anchor.norm(h))
            median, p99 = step_latency(mambapy_once, args.step_iters)
            print(f"  mambapy (small)  median {median * 1e3:.3f} ms   p99 {p99 * 1e3:.3f} ms")
        print("  transformers: step not timed (its cache API needs a generation loop)")

    if args.inference_bars > 0:
        time_inference(args.model, args.inference_bars)


def time_inference(path, n_bars, windowed_bars=4000):
    """Whole-period stateful pass vs windowed per-bar inference, shipped model, one thread."""
    import numpy as np

    from intelligence.mamba_inference import STATEFUL_CHUNK, load_forecaster, run_stateful
    torch.set_num_threads(1)
    forecaster = load_forecaster(path)
    n_features = len(forecaster.feature_names)
    features = torch.randn(n_bars, n_features, generator=torch.Generator().manual_seed(0)).clamp(-4, 4)
    print(f"\nInference, {Path(path).name} ({forecaster.inference} checkpoint), one thread, "
          f"{n_bars:,} bars of random scaled features")
    run_stateful(forecaster.model, features[:4096])                          # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run_stateful(forecaster.model, features)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"  stateful whole-period pass (chunk {STATEFUL_CHUNK}): {n_bars / best:10,.0f} bars/s "
          f"(best of 3: {best:.2f} s; every head of every bar)")
    lookback = forecaster.lookback
    rows = np.arange(lookback - 1, min(n_bars, lookback - 1 + windowed_bars))
    forecaster.forecast_rows(features, rows[:256])                           # warm-up
    t0 = time.perf_counter()
    forecaster.forecast_rows(features, rows)
    windowed = time.perf_counter() - t0
    print(f"  windowed ({lookback}-bar window per bar):      {len(rows) / windowed:10,.0f} bars/s "
          f"({len(rows):,} target bars in {windowed:.2f} s)")
    print(f"  → stateful / windowed: ×{(n_bars / best) / (len(rows) / windowed):.0f}")


if __name__ == "__main__":
    main()
