"""DeepMamba's diffusion head: a conditional DDPM over forward price paths, and what a condor
trader reads off the sampled paths (touch probabilities of the short strikes, POP, expected
excursions).

Owns ``PathRules`` (what a path is), ``path_targets`` (the training targets from bars),
``DiffusionHead`` (denoiser, noise schedule, loss, DDIM sampler), ``path_probabilities`` (sampled
paths + strikes → probabilities), ``PathForecast`` (the per-bar sampler a backtest asks at entry
bars) and ``delta_strikes`` / ``realised_touches`` (the calibration's strike rule and outcomes).

A path is ``steps`` (default 32) consecutive increments of log close, each ``step_bars`` bars long
(default 78 five-minute bars = one session, so 32 steps ≈ 45 calendar days, the longest condor
expiry the strategy opens), each divided by the step's implied σ at the forecast bar:

    z_k = ln(C[t + k·s] / C[t + (k−1)·s]) / σ_step,   σ_step = IV_t/100 · √(s / (78·252))

so a path says how the next 32 sessions move in units of what the IV index priced at t (the
variance risk premium shows as |z| < 1 on average). Scaling by IV keeps the target near unit
variance in calm and stormy years alike, which a diffusion model needs.

The head is a DDPM (Ho et al. 2020) with the cosine noise schedule (Nichol & Dhariwal 2021):
an MLP ε_θ(x_τ, τ, h_t) predicts the noise added to a path, conditioned on DeepMamba's final
hidden state h_t at the forecast bar (d_model values: everything the model read up to t).
Sampling uses DDIM's deterministic update (Song et al. 2021) on ``sample_steps`` of the
``train_steps`` noise levels: the same model, ~8× fewer denoiser calls than ancestral DDPM
sampling, and a fixed seed gives identical paths. Written here rather than taken from
``diffusers``: its schedulers target images/UNets and would add a large dependency for ~60 lines
of arithmetic on (paths × 32) tensors.

Touches between observed steps. Paths are observed once a session, but a short strike is lost
when any bar trades through it. Between two observed points x₁, x₂ (both on the safe side of a
barrier b), a Brownian bridge with step variance v crosses b with probability
exp(−2 (b − x₁)(b − x₂) / v) (the reflection principle); each path's v is its own realised
step variance. A path's touch probability is 1 − Π(1 − p_k) over its steps (1 if an observed
point is beyond b); the forecast is the mean over paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BARS_PER_SESSION = 78
TRADING_DAYS_PER_YEAR = 252
Z_CLIP = 6.0           # |z| beyond this (a 6-IV-σ session) is clipped in targets and samples
MIN_ALPHA_BAR = 1e-3
# DDIM levels per sample: 20 of the 200 training levels (~7 ms for 64 paths on one core, hidden 128)
SAMPLE_STEPS = 20


class PathInputError(ValueError):
    """A path setting or input that cannot work (names the setting)."""


@dataclass(frozen=True)
class PathRules:
    steps: int = 32                     # increments per path
    step_bars: int = BARS_PER_SESSION   # bars per increment

    def __post_init__(self):
        if int(self.steps) <= 0:
            raise PathInputError(f"path horizon: steps = {self.steps}; it must be at least 1")
        if int(self.step_bars) <= 0:
            raise PathInputError(f"path horizon: step_bars = {self.step_bars}; it must be at least 1")

    @property
    def horizon_bars(self) -> int:
        return int(self.steps) * int(self.step_bars)

    @property
    def sessions_per_step(self) -> float:
        return self.step_bars / BARS_PER_SESSION

    @property
    def horizon_sessions(self) -> float:
        return self.steps * self.sessions_per_step

    def step_sigma(self, iv_index) -> np.ndarray:
        """σ of one step's log return implied by the IV index (VIX points)."""
        years = self.step_bars / (BARS_PER_SESSION * TRADING_DAYS_PER_YEAR)
        return np.asarray(iv_index, dtype=float) / 100.0 * math.sqrt(years)

    def as_dict(self) -> dict:
        return {"steps": int(self.steps), "step_bars": int(self.step_bars),
                "definition": "z_k = ln(C[t+k·s]/C[t+(k−1)·s]) / (IV_t/100·√(s/(78·252))), k = 1..steps, "
                              "s = step_bars"}


def path_targets(close, iv_index, rules: PathRules = PathRules()) -> np.ndarray:
    """(rows, steps) float32 path targets z (module docstring) for each bar t; NaN where t +
    steps·step_bars runs past the data or the IV index at t is not a positive number."""
    close = np.asarray(close, dtype=float)
    sigma = rules.step_sigma(iv_index)
    n, s, k = len(close), int(rules.step_bars), int(rules.steps)
    out = np.full((n, k), np.nan, dtype=np.float32)
    last = n - k * s                      # rows t with t + k·s ≤ n − 1
    if last <= 0:
        return out
    log_close = np.log(close)
    t = np.arange(last)
    offsets = s * np.arange(k + 1)
    points = log_close[t[:, None] + offsets[None, :]]                 # (rows, k+1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.diff(points, axis=1) / sigma[t, None]
    z[~(sigma[t] > 0)] = np.nan
    out[:last] = np.clip(z, -Z_CLIP, Z_CLIP)
    return out


# ----------------------------------------------------------------------------------------------
# The denoiser and the DDPM around it

def _cosine_alpha_bar(train_steps: int) -> torch.Tensor:
    """ᾱ_τ for τ = 1..T, the cosine schedule (Nichol & Dhariwal), floored at MIN_ALPHA_BAR.

    The floor: the plain schedule ends at ᾱ ≈ 1e-7, where DDIM's first x̂₀ = (x − √(1−ᾱ)ε̂)/√ᾱ
    multiplies any error of ε̂ by ~3,000 and the clamp then throws the path to ±Z_CLIP (measured:
    sampled z with 5–6× the data's spread). At ᾱ = 1e-3 the data still contributes ~3 % of x_T, so
    starting from pure noise there is as good as before and the first step is well conditioned."""
    s = 0.008
    grid = torch.linspace(0, train_steps, train_steps + 1, dtype=torch.float64) / train_steps
    f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = (f / f[0])[1:]
    return alpha_bar.clamp(min=MIN_ALPHA_BAR).float()


def _time_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of noise levels τ (b,) → (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=tau.device) / half)
    angles = tau.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _AdaptiveBlock(nn.Module):
    """Pre-norm residual MLP block whose normalised input is scaled and shifted by the noise
    level and the condition (adaLN, as in DiT): h + W₂ SiLU(W₁ (LN(h)·(1 + γ) + β)). The
    multiplicative γ matters here: the noise a path carries is x·f(τ, h) — a product of the input
    and a function of level and condition — which a purely additive MLP learns poorly (measured:
    a 0.3-scale condition sampled at 0.6 after 1,000 steps without it)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.inner = nn.Linear(hidden, hidden)
        self.outer = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h, embedding, repeat: int = 1):
        gamma, beta = self.modulation(embedding).chunk(2, dim=-1)
        if repeat > 1:                      # one modulation per condition row, shared by its paths
            gamma, beta = gamma.repeat_interleave(repeat, 0), beta.repeat_interleave(repeat, 0)
        return h + self.outer(F.silu(self.inner(self.norm(h) * (1 + gamma) + beta)))


class DiffusionHead(nn.Module):
    """ε_θ(x_τ, τ, h): an MLP over a path x (b, steps) whose blocks are modulated by the noise
    level τ and the condition h (b, cond_dim) → the predicted noise (b, steps); plus the DDPM
    loss and a DDIM sampler."""

    def __init__(self, cond_dim: int, steps: int = 32, hidden: int = 128, depth: int = 3,
                 time_dim: int = 64, train_steps: int = 200):
        super().__init__()
        if steps <= 0:
            raise PathInputError(f"diffusion head: path steps = {steps}; it must be at least 1")
        self.cond_dim, self.steps, self.hidden, self.depth = int(cond_dim), int(steps), int(hidden), int(depth)
        self.time_dim, self.train_steps = int(time_dim), int(train_steps)
        self.input = nn.Linear(self.steps, hidden)
        self.time = nn.Linear(time_dim, hidden)
        self.cond = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList(_AdaptiveBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, self.steps)
        nn.init.zeros_(self.output.weight)          # start as "predict no noise"
        nn.init.zeros_(self.output.bias)
        self.register_buffer("alpha_bar", _cosine_alpha_bar(self.train_steps), persistent=False)

    def config(self) -> dict:
        return {"cond_dim": self.cond_dim, "steps": self.steps, "hidden": self.hidden, "depth": self.depth,
                "time_dim": self.time_dim, "train_steps": self.train_steps}

    def forward(self, x, tau, cond, repeat: int = 1):
        """x (b·repeat, steps) noisy paths; tau (b,) their noise levels; cond (b, cond_dim):
        row i of cond and tau serves paths i·repeat … (i+1)·repeat − 1 (sampling draws many paths
        per condition: the condition's embedding and modulations are computed once for them)."""
        embedding = F.silu(self.time(_time_embedding(tau, self.time_dim)) + self.cond(cond))
        shared = embedding.repeat_interleave(repeat, 0) if repeat > 1 else embedding
        h = self.input(x) + shared
        for block in self.blocks:
            h = block(h, embedding, repeat)
        return self.output(F.silu(self.out_norm(h)))

    def loss(self, cond, target, generator: torch.Generator | None = None, cond_dropout: float = 0.0):
        """DDPM ε-prediction loss (mean squared error) of paths ``target`` (b, steps) given
        ``cond`` (b, cond_dim); rows with any non-finite target are left out. ``generator``
        fixes the noise levels and noises (a validation loss that does not move between calls).
        ``cond_dropout``: the share of rows whose condition is zeroed (training only), so the
        head also learns the unconditional path distribution and leans on the condition only
        as far as it helps: the targets of neighbouring bars overlap almost entirely, and without
        it the head soon memorises the train split's hidden states."""
        finite = torch.isfinite(target).all(dim=1)
        if not bool(finite.any()):
            return torch.zeros((), device=cond.device, requires_grad=cond.requires_grad)
        x0, cond = target[finite].to(cond.dtype), cond[finite]
        device = cond.device
        if cond_dropout > 0.0:
            keep = torch.rand(len(cond), 1, device=device) >= cond_dropout
            cond = cond * keep
        tau = torch.randint(0, self.train_steps, (len(x0),), generator=generator,
                            device="cpu" if generator is not None else device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu" if generator is not None else device)
        noise = noise.to(device, x0.dtype)
        a = self.alpha_bar.to(device)[tau].unsqueeze(1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(self(noisy, tau, cond), noise)

    @torch.inference_mode()
    def sample(self, cond, n_paths: int, seed: int | None = None, sample_steps: int = SAMPLE_STEPS,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n_paths`` paths for each condition row: cond (b, cond_dim) → (b, n_paths, steps).

        DDIM (η = 0) over ``sample_steps`` noise levels spaced evenly over the training ones;
        the only randomness is the starting noise, drawn from ``generator`` (or a fresh one
        seeded with ``seed``), so the same seed gives the same paths."""
        if n_paths <= 0:
            raise PathInputError(f"diffusion sampling: n_paths = {n_paths}; it must be at least 1")
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        cond = torch.as_tensor(cond, dtype=torch.float32)
        b = cond.shape[0]
        x = torch.randn((b * n_paths, self.steps), generator=generator)
        levels = torch.linspace(self.train_steps - 1, 0, max(2, int(sample_steps))).round().long()
        alpha_bar = self.alpha_bar
        for i, tau in enumerate(levels):
            a = alpha_bar[tau]
            a_next = alpha_bar[levels[i + 1]] if i + 1 < len(levels) else torch.tensor(1.0)
            eps = self(x, tau.expand(b), cond, repeat=n_paths)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x0 = x0.clamp(-Z_CLIP, Z_CLIP)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x.reshape(b, n_paths, self.steps)


# ----------------------------------------------------------------------------------------------
# From paths to what a condor trader needs

def _bridge_no_cross(barrier_distance_1, barrier_distance_2, variance):
    """P(a Brownian bridge over one step with variance ``variance`` stays on the safe side of a
    barrier) given both ends are safe, at distances d1 and d2 from it: 1 − exp(−2 d1 d2 / v)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        cross = np.exp(-2.0 * barrier_distance_1 * barrier_distance_2 / np.maximum(variance, 1e-18))
    return 1.0 - np.where(np.isfinite(cross), cross, 0.0)


def path_probabilities(z, step_sigma: float, put_log_moneyness: float, call_log_moneyness: float,
                       horizon_steps: int) -> dict:
    """Sampled paths of one bar → probabilities for a condor whose short strikes sit at
    ``put_log_moneyness`` = ln(K_put/S) < 0 and ``call_log_moneyness`` = ln(K_call/S) > 0, held
    ``horizon_steps`` steps (1 … steps).

    z: (n_paths, steps) standardized increments; ``step_sigma``: the IV σ of a step at the bar.
    Returns touch_put and touch_call (each short strike traded through before expiry: observed
    points plus the Brownian-bridge chance between them), pop (neither touched), inside_at_expiry
    (price between the short strikes at expiry), expected_max_up / expected_max_down (mean over
    paths of the largest log move above / below the start, ≥ 0), all floats.
    """
    z = np.asarray(z, dtype=float)
    if z.ndim != 2:
        raise PathInputError(f"paths must be (n_paths, steps), got shape {z.shape}")
    h = int(horizon_steps)
    if not 1 <= h <= z.shape[1]:
        raise PathInputError(f"horizon_steps = {h}: the paths hold 1 … {z.shape[1]} steps")
    if not (put_log_moneyness < 0.0 < call_log_moneyness):
        raise PathInputError(f"short strikes must straddle spot: put ln(K/S) = {put_log_moneyness:.4f}, "
                             f"call ln(K/S) = {call_log_moneyness:.4f}")
    steps = z[:, :h] * float(step_sigma)
    points = np.concatenate([np.zeros((len(z), 1)), np.cumsum(steps, axis=1)], axis=1)   # (n, h+1)
    variance = np.mean(steps ** 2, axis=1, keepdims=True)                                 # per path
    below, above = points - put_log_moneyness, call_log_moneyness - points               # > 0: safe
    put_observed = (below <= 0).any(axis=1)
    call_observed = (above <= 0).any(axis=1)
    safe_put = np.prod(_bridge_no_cross(np.maximum(below[:, :-1], 0), np.maximum(below[:, 1:], 0),
                                        variance), axis=1)
    safe_call = np.prod(_bridge_no_cross(np.maximum(above[:, :-1], 0), np.maximum(above[:, 1:], 0),
                                         variance), axis=1)
    safe_put = np.where(put_observed, 0.0, safe_put)
    safe_call = np.where(call_observed, 0.0, safe_call)
    terminal = points[:, -1]
    return {
        "touch_put": float(np.mean(1.0 - safe_put)),
        "touch_call": float(np.mean(1.0 - safe_call)),
        "pop": float(np.mean(safe_put * safe_call)),
        "inside_at_expiry": float(np.mean((terminal > put_log_moneyness) & (terminal < call_log_moneyness))),
        "expected_max_up": float(np.mean(points.max(axis=1))),
        "expected_max_down": float(np.mean(-points.min(axis=1))),
    }


def horizon_steps_for(sessions: float, rules: PathRules) -> int:
    """Steps of ``rules`` that cover ``sessions`` trading sessions (rounded, at least 1);
    PathInputError when they run past the path horizon by more than half a step."""
    steps = round(float(sessions) / rules.sessions_per_step)
    if steps > rules.steps:
        raise PathInputError(f"{sessions:.1f} sessions to expiry run past the paths' {rules.steps} steps of "
                             f"{rules.step_bars} bars ({rules.horizon_sessions:g} sessions)")
    return max(1, steps)


class PathForecast:
    """Sampled forward paths for the bars of a run, drawn lazily (only the bars a strategy asks
    about) and kept: the backtest calls ``probabilities`` at its entry candidates.

    hidden: (bars, d_model) DeepMamba hidden state per run bar (NaN rows: no forecast yet);
    iv_index: (bars,) the IV index at each bar; the paths of bar i come from seed
    ``seed · 1_000_003 + i``, so a bar's paths do not depend on which bars were asked before.
    """

    def __init__(self, head: DiffusionHead, rules: PathRules, hidden: np.ndarray, iv_index: np.ndarray,
                 n_paths: int = 64, seed: int = 0, sample_steps: int = SAMPLE_STEPS, description: str = ""):
        if n_paths <= 0:
            raise PathInputError(f"n_paths = {n_paths}; it must be at least 1")
        self.head, self.rules = head.eval(), rules
        self.hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        self.step_sigma = rules.step_sigma(iv_index)
        self.n_paths, self.seed, self.sample_steps = int(n_paths), int(seed), int(sample_steps)
        self.description = description
        self._paths: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.hidden)

    def available(self, bar: int) -> bool:
        return bool(np.isfinite(self.hidden[bar]).all() and self.step_sigma[bar] > 0)

    def paths(self, bar: int) -> np.ndarray:
        """(n_paths, steps) standardized increments at ``bar`` (drawn once, then kept)."""
        cached = self._paths.get(bar)
        if cached is None:
            if not self.available(bar):
                raise PathInputError(f"bar {bar}: no path forecast (the model has no state there yet)")
            cond = torch.from_numpy(self.hidden[bar:bar + 1])
            cached = self.head.sample(cond, self.n_paths, seed=self.seed * 1_000_003 + int(bar),
                                      sample_steps=self.sample_steps)[0].double().numpy()
            self._paths[bar] = cached
        return cached

    def probabilities(self, bar: int, spot: float, put_strike: float, call_strike: float,
                      sessions_to_expiry: float) -> dict | None:
        """``path_probabilities`` for short strikes at ``bar``; None where the bar has no
        forecast."""
        if not self.available(bar):
            return None
        h = horizon_steps_for(sessions_to_expiry, self.rules)
        return path_probabilities(self.paths(bar), float(self.step_sigma[bar]), math.log(put_strike / spot),
                                  math.log(call_strike / spot), h)


# ----------------------------------------------------------------------------------------------
# Calibration helpers (the training script's report)

def delta_strikes(spot, iv_index, sessions: float, abs_delta: float):
    """Black-Scholes (r = q = 0) short strikes whose |Δ| is ``abs_delta``, σ = IV index/100,
    τ = sessions/252 → (ln(K_put/S), ln(K_call/S)) arrays. The delta approximation of each
    strike's touch probability is then 2·abs_delta."""
    from scipy.stats import norm

    sigma = np.asarray(iv_index, dtype=float) / 100.0
    root = sigma * math.sqrt(sessions / TRADING_DAYS_PER_YEAR)
    d = norm.ppf(1.0 - abs_delta)                   # |d1| at the target delta
    half_var = 0.5 * root ** 2
    put = -(d * root - half_var)                    # ln(K/S) = −(d1·σ√τ − σ²τ/2), d1 = +d
    call = d * root + half_var                      # d1 = −d
    return put, call


def realised_touches(high, low, close, rows, horizon_bars: int, put_log, call_log):
    """Did any bar in (t, t + horizon_bars] trade through each strike (log-moneyness ``put_log``,
    ``call_log`` per row, against the close at t)? → (put touched, call touched) bool arrays."""
    high, low, close = (np.asarray(a, dtype=float) for a in (high, low, close))
    rows = np.asarray(rows, dtype=np.int64)
    touched_put = np.zeros(len(rows), bool)
    touched_call = np.zeros(len(rows), bool)
    for i, t in enumerate(rows):
        lo = np.log(low[t + 1:t + 1 + horizon_bars].min() / close[t])
        hi = np.log(high[t + 1:t + 1 + horizon_bars].max() / close[t])
        touched_put[i] = lo <= put_log[i]
        touched_call[i] = hi >= call_log[i]
    return touched_put, touched_call
