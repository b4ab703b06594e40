"""Benchmark: the diffusion path head's sampling cost per bar on one CPU core
(intelligence/mamba_diffusion.py), against an anchor timed in the same run.

Per bar, what ``--pop-source diffusion`` pays at an entry candidate: draw N paths
(``DiffusionHead.sample``: DDIM over 20 of the 200 training noise levels, the condition's
modulations computed once and shared by its N paths) and turn them into touch probabilities for a
pair of short strikes (``path_probabilities``). The anchor is ancestral DDPM sampling (Ho et al.:
one denoiser call per training level, 200, with fresh noise each step) of the same head, the
sampler the head would need without DDIM. Figures are medians over --repeats bars after a
warm-up; read the ratio (both timed interleaved here), not the seconds (the box is shared).

The head is the shipped checkpoint's (models/mamba_active.pth or --model) when it has one, else
an untrained head of the default size (the cost does not depend on the weights).

Usage:  .venv/bin/python benchmarks/bench_diffusion.py [--paths 16,64,256] [--repeats 40] [--model PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from intelligence.mamba_diffusion import SAMPLE_STEPS, DiffusionHead, PathRules, path_probabilities
from intelligence.mamba_inference import ModelFileError, load_forecaster


@torch.inference_mode()
def ancestral_sample(head: DiffusionHead, cond, n_paths: int, seed: int):
    """Plain DDPM ancestral sampling over every training level (the anchor)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(cond) * n_paths, head.steps), generator=generator)
    alpha_bar = head.alpha_bar
    for tau in range(head.train_steps - 1, -1, -1):
        a = alpha_bar[tau]
        a_prev = alpha_bar[tau - 1] if tau > 0 else torch.tensor(1.0)
        beta = 1 - a / a_prev
        eps = head(x, torch.full((len(cond),), tau), cond, repeat=n_paths)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-6, 6)
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x
        x = mean + ((beta * (1 - a_prev) / (1 - a)).sqrt() * torch.randn(x.shape, generator=generator)
                    if tau > 0 else 0.0)
    return x.reshape(len(cond), n_paths, head.steps)


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="16,64,256", help="paths per bar to time")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--model", default=str(ROOT / "models" / "mamba_active.pth"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        forecaster = load_forecaster(args.model)
        head, rules, source = forecaster.diffusion, forecaster.path_rules, args.model
    except ModelFileError:
        head = None
    if head is None:
        head, rules, source = DiffusionHead(64).eval(), PathRules(), "an untrained head of the default size"
    print(f"head: {source}; {sum(p.numel() for p in head.parameters()):,} parameters, paths of {rules.steps} steps; "
          f"DDIM {SAMPLE_STEPS} levels vs ancestral {head.train_steps}; one thread, torch {torch.__version__}")
    cond = torch.randn(1, head.cond_dim)
    sigma = rules.step_sigma(np.array([18.0]))[0]
    print(f"{'paths':>6} {'DDIM ms/bar':>12} {'+ probabilities':>16} {'ancestral ms/bar':>17} {'ratio':>7}")
    for n in (int(p) for p in args.paths.split(",")):
        seed = iter(range(10**6))
        ddim = median_ms(lambda: head.sample(cond, n, seed=next(seed)), args.repeats)
        z = head.sample(cond, n, seed=0)[0].double().numpy()
        probs = median_ms(lambda: path_probabilities(z, sigma, -0.05, 0.04, rules.steps - 1), args.repeats)
        ancestral = median_ms(lambda: ancestral_sample(head, cond, n, next(seed)), max(5, args.repeats // 4), warmup=1)
        print(f"{n:>6} {ddim:>12.2f} {ddim + probs:>16.2f} {ancestral:>17.2f} {ancestral / ddim:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
