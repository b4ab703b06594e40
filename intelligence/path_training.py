"""Training and calibration of DeepMamba's diffusion path head (``intelligence.mamba_diffusion``):
the second stage of ``train_mamba --diffusion-head``.

Stage 2 runs on the trained trunk, frozen: one causal pass over the train and validation splits
gives the hidden state h_t at every bar (as inference computes it), and the head learns
p(path | h_t) on those. The head's loss never reaches the trunk, so adding it cannot change the
point forecasts (μ_Mamba, the evaluation table); and training it on the final trunk rather than
a moving one is what inference will condition it on. ``--init-from CHECKPOINT`` runs this stage
alone on an already trained model.

Calibration (test split, never seen by either stage), written into the evaluation report:
- coverage of the central 50/80/95 % intervals of the sampled cumulative log return, at several
  horizons and pooled over all 32 steps;
- the PIT (probability integral transform: where the realised value falls among the samples)
  histogram at the full horizon; a calibrated forecast gives a flat one;
- the Brier score of the short-strike touch probabilities against the delta approximation
  (2|Δ|, what the entry filter uses by default), for Black-Scholes strikes at |Δ| 0.10 and 0.20
  with ``horizon`` sessions to expiry; the outcome is whether any 5-minute bar's high/low traded
  through the strike.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from intelligence.mamba_diffusion import (
    DiffusionHead,
    PathRules,
    delta_strikes,
    path_probabilities,
    path_targets,
    realised_touches,
)
from intelligence.mamba_inference import run_stateful

COVERAGE_LEVELS = (0.50, 0.80, 0.95)
TOUCH_DELTAS = (0.10, 0.20)
PIT_BINS = 10


def split_paths(prep, rules: PathRules, split) -> np.ndarray:
    """Path targets of every bar, NaN outside ``split`` and where the path runs past its end."""
    z = path_targets(prep.extras["close"], prep.extras["iv"], rules)
    out = np.full_like(z, np.nan)
    stop = min(split.stop - rules.horizon_bars, split.stop)
    if stop > split.start:
        out[split.start:stop] = z[split.start:stop]
    return out


def split_hidden(model, prep, split, device=None) -> tuple[np.ndarray, int]:
    """The frozen trunk's hidden state per bar of ``split`` from one causal pass from a zero
    state (rows from max(split start, first defined row)) → ((rows, d_model) float32, first row)."""
    first = max(split.start, prep.first_row)
    was_training = model.training
    model.eval()
    features = prep.features[first:split.stop]
    if device is not None:
        features = features.to(device)
    out, _ = run_stateful(model, features, return_hidden=True)
    model.train(was_training)
    return out["hidden"], first


def _rows_with_paths(hidden_first: int, n_hidden: int, z: np.ndarray, burn_in: int) -> np.ndarray:
    rows = np.arange(hidden_first + burn_in, hidden_first + n_hidden)
    return rows[np.isfinite(z[rows]).all(axis=1)]


def train_diffusion_head(model, prep, args, rules: PathRules, say=print, writer=None, device=None) -> dict:
    """Fit a ``DiffusionHead`` on the frozen ``model``'s hidden states → {'head' (best
    validation loss, eval mode), 'config', 'history', 'best_val_loss', 'best_iter', 'seconds',
    'train_rows', 'val_rows'}."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed + 1)
    generator = np.random.default_rng(args.seed + 1)
    train_split, val_split = prep.splits["train"], prep.splits["validation"]
    h_train, f_train = split_hidden(model, prep, train_split, device)
    h_val, f_val = split_hidden(model, prep, val_split, device)
    z_train, z_val = split_paths(prep, rules, train_split), split_paths(prep, rules, val_split)
    train_rows = _rows_with_paths(f_train, len(h_train), z_train, args.burn_in)
    val_rows = _rows_with_paths(f_val, len(h_val), z_val, args.burn_in)
    if len(train_rows) < 200 or len(val_rows) < 20:
        raise ValueError(f"the diffusion head needs paths of {rules.horizon_bars} bars inside the splits: "
                         f"{len(train_rows)} train and {len(val_rows)} validation bars have one (a shorter "
                         f"--path-steps or more data)")
    cond_train = torch.from_numpy(h_train[train_rows - f_train])
    target_train = torch.from_numpy(z_train[train_rows])
    val_pick = val_rows[np.linspace(0, len(val_rows) - 1, min(len(val_rows), 20_000)).round().astype(int)]
    cond_val = torch.from_numpy(h_val[val_pick - f_val])
    target_val = torch.from_numpy(z_val[val_pick])

    head = DiffusionHead(model.d_model, rules.steps, hidden=args.diffusion_hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.diffusion_lr, weight_decay=0.01)
    iters, batch = int(args.diffusion_iters), int(args.diffusion_batch)
    history = {"iter": [], "train_loss": [], "val_iter": [], "val_loss": []}
    best = {"val_loss": math.inf, "state": None, "iter": None}
    say(f"diffusion head: {sum(p.numel() for p in head.parameters()):,} parameters, paths of {rules.steps} steps × "
        f"{rules.step_bars} bars; {len(train_rows):,} train / {len(val_rows):,} validation bars; {iters} iterations "
        f"of {batch}")
    head.train()
    running = []
    for it in range(iters):
        lr = args.diffusion_lr * 0.5 * (1 + math.cos(math.pi * it / iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pick = torch.from_numpy(generator.integers(0, len(train_rows), batch))
        loss = head.loss(cond_train[pick], target_train[pick], cond_dropout=args.diffusion_cond_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        last = it + 1 == iters
        if (it + 1) % 250 == 0 or last:
            head.eval()
            with torch.no_grad():
                val = head.loss(cond_val, target_val, generator=torch.Generator().manual_seed(7)).item()
            head.train()
            history["iter"].append(it + 1)
            history["train_loss"].append(float(np.mean(running)))
            history["val_iter"].append(it + 1)
            history["val_loss"].append(val)
            running = []
            improved = val < best["val_loss"]
            if improved:
                best.update(val_loss=val, iter=it + 1,
                            state=copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()}))
            if writer is not None:
                writer.add_scalar("diffusion/train_loss", history["train_loss"][-1], it + 1)
                writer.add_scalar("diffusion/val_loss", val, it + 1)
            if (it + 1) % 1000 == 0 or last:
                say(f"  diffusion iter {it + 1}: train {history['train_loss'][-1]:.4f} val {val:.4f}"
                    + (" (best)" if improved else ""))
    head.load_state_dict(best["state"])
    head.eval()
    return {"head": head, "config": head.config(), "history": history, "best_val_loss": best["val_loss"],
            "best_iter": best["iter"], "seconds": time.perf_counter() - t0,
            "train_rows": int(len(train_rows)), "val_rows": int(len(val_rows))}


# ----------------------------------------------------------------------------------------------
# Calibration on the test split

def calibrate_paths(model, head: DiffusionHead, prep, args, rules: PathRules, split_name: str = "test",
                    n_paths: int = 64, every: int = 26, seed: int = 0, device=None) -> dict:
    """Out-of-sample calibration of the sampled paths (module docstring) → a JSON-able dict
    (plus '_arrays': the samples and outcomes the figures draw, not for JSON)."""
    split = prep.splits[split_name]
    hidden, first = split_hidden(model, prep, split, device)
    z = split_paths(prep, rules, split)
    rows = _rows_with_paths(first, len(hidden), z, args.burn_in)[::max(1, int(every))]
    if len(rows) == 0:
        raise ValueError(f"no {split_name} bar has a full {rules.horizon_bars}-bar path to score")
    sigma = rules.step_sigma(prep.extras["iv"])[rows]
    samples = []
    for c0 in range(0, len(rows), 256):
        part = rows[c0:c0 + 256]
        samples.append(head.sample(torch.from_numpy(hidden[part - first]), n_paths, seed=seed + c0).double().numpy())
    z_samples = np.concatenate(samples)                               # (rows, n_paths, steps)
    cum_samples = np.cumsum(z_samples * sigma[:, None, None], axis=2)
    cum_real = np.cumsum(z[rows].astype(float) * sigma[:, None], axis=1)   # (rows, steps)

    horizons = sorted({1, max(1, rules.steps // 4), max(1, rules.steps // 2), rules.steps})
    coverage = {}
    for level in COVERAGE_LEVELS:
        lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
        lo = np.quantile(cum_samples, lo_q, axis=1)
        hi = np.quantile(cum_samples, hi_q, axis=1)
        inside = (cum_real >= lo) & (cum_real <= hi)                  # (rows, steps)
        coverage[f"{level:.0%}"] = {"all_steps": float(inside.mean()),
                                    **{f"step_{k}": float(inside[:, k - 1].mean()) for k in horizons}}
    pit = (cum_samples[:, :, -1] < cum_real[:, -1:]).mean(axis=1)
    pit_counts = np.histogram(pit, bins=PIT_BINS, range=(0, 1))[0]
    expected = len(pit) / PIT_BINS
    pit_chi2 = float(((pit_counts - expected) ** 2 / expected).sum())

    sessions = rules.horizon_sessions
    horizon_bars = rules.horizon_bars
    touch = {}
    close, high, low, iv = (prep.extras[name] for name in ("close", "high", "low", "iv"))
    for delta in TOUCH_DELTAS:
        put_log, call_log = delta_strikes(close[rows], iv[rows], sessions, delta)
        touched_put, touched_call = realised_touches(high, low, close, rows, horizon_bars, put_log, call_log)
        p_put = np.empty(len(rows))
        p_call = np.empty(len(rows))
        for i in range(len(rows)):
            probs = path_probabilities(z_samples[i], sigma[i], put_log[i], call_log[i], rules.steps)
            p_put[i], p_call[i] = probs["touch_put"], probs["touch_call"]
        outcome = np.concatenate([touched_put, touched_call]).astype(float)
        model_p = np.concatenate([p_put, p_call])
        delta_p = np.full_like(model_p, min(1.0, 2 * delta))
        touch[f"delta_{delta:.2f}"] = {
            "n": int(len(outcome)), "observed_rate": float(outcome.mean()),
            "observed_put": float(touched_put.mean()), "observed_call": float(touched_call.mean()),
            "mean_forecast": {"diffusion": float(model_p.mean()), "delta": float(delta_p.mean())},
            "brier": {"diffusion": float(np.mean((model_p - outcome) ** 2)),
                      "delta": float(np.mean((delta_p - outcome) ** 2))},
            "reliability": _reliability(model_p, outcome),
        }
    return {
        "split": split_name, "first": split.first, "last": split.last, "forecasts": int(len(rows)),
        "every_n_bars": int(every), "paths_per_forecast": int(n_paths), "horizon_sessions": sessions,
        "coverage": coverage, "pit": {"bins": PIT_BINS, "counts": pit_counts.tolist(), "chi2": pit_chi2,
                                      "chi2_dof": PIT_BINS - 1},
        "touch": touch,
        "_arrays": {"rows": rows, "cum_samples": cum_samples, "cum_real": cum_real, "pit": pit,
                    "close": close[rows], "close_ns": prep.extras["close_ns"][rows] if "close_ns" in prep.extras else None},
    }


def _reliability(p: np.ndarray, outcome: np.ndarray, bins: int = 5) -> list:
    """(forecast bin, mean forecast, observed rate, n) for a reliability table."""
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            table.append({"mean_forecast": float(p[mask].mean()), "observed": float(outcome[mask].mean()),
                          "n": int(mask.sum())})
    return table


def calibration_markdown(cal: dict) -> str:
    lines = [f"## Path head calibration ({cal['split']} split, {cal['first']} … {cal['last']})", "",
             (f"{cal['forecasts']} forecasts (every {cal['every_n_bars']} bars), {cal['paths_per_forecast']} sampled "
              f"paths each, {cal['horizon_sessions']:g} sessions ahead. Coverage: share of realised cumulative log "
              f"returns inside the sampled central interval (nominal in the first column)."), "",
             "| interval | all steps | " + " | ".join(k.replace("step_", "step ") for k in
                                                        next(iter(cal["coverage"].values())) if k != "all_steps") + " |",
             "|---|---|" + "---|" * (len(next(iter(cal["coverage"].values()))) - 1)]
    for level, row in cal["coverage"].items():
        lines.append(f"| {level} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    pit = cal["pit"]
    lines += ["", (f"PIT at the full horizon ({pit['bins']} bins, a flat histogram is calibrated): counts "
                   f"{pit['counts']}, χ² = {pit['chi2']:.1f} on {pit['chi2_dof']} degrees of freedom."), "",
              "Short-strike touch probability (any 5-minute bar through the strike before expiry), Black-Scholes "
              "strikes at the IV index; Brier score, lower is better:", "",
              "| strikes | n | observed | mean forecast diffusion / delta | Brier diffusion | Brier delta (2|Δ|) |",
              "|---|---|---|---|---|---|"]
    for name, row in cal["touch"].items():
        lines.append(f"| |Δ| {name.split('_')[1]} | {row['n']} | {row['observed_rate']:.3f} | "
                     f"{row['mean_forecast']['diffusion']:.3f} / {row['mean_forecast']['delta']:.3f} | "
                     f"{row['brier']['diffusion']:.4f} | {row['brier']['delta']:.4f} |")
    return "\n".join(lines) + "\n"


def calibration_figure(cal: dict, title: str = ""):
    """PIT histogram, coverage by step and sampled 32-session trajectories against the realised
    path for four forecast dates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = cal["_arrays"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    ax.hist(arrays["pit"], bins=cal["pit"]["bins"], range=(0, 1), color="tab:blue", alpha=0.8)
    ax.axhline(len(arrays["pit"]) / cal["pit"]["bins"], color="k", lw=1, ls="--", label="calibrated")
    ax.set_title(f"PIT at {cal['horizon_sessions']:g} sessions (χ² {cal['pit']['chi2']:.0f})")
    ax.legend()
    ax = axes[0, 1]
    cum_samples, cum_real = arrays["cum_samples"], arrays["cum_real"]
    steps = np.arange(1, cum_real.shape[1] + 1)
    for level in COVERAGE_LEVELS:
        lo = np.quantile(cum_samples, (1 - level) / 2, axis=1)
        hi = np.quantile(cum_samples, 1 - (1 - level) / 2, axis=1)
        ax.plot(steps, ((cum_real >= lo) & (cum_real <= hi)).mean(axis=0), label=f"{level:.0%} interval")
        ax.axhline(level, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("sessions ahead")
    ax.set_title("coverage by horizon (dotted: nominal)")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    for name, row in cal["touch"].items():
        rel = row["reliability"]
        ax.plot([r["mean_forecast"] for r in rel], [r["observed"] for r in rel], "o-", label=f"|Δ| {name[6:]}")
        ax.plot([2 * float(name[6:])], [row["observed_rate"]], "x", ms=10, color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("forecast touch probability")
    ax.set_ylabel("observed")
    ax.set_title("touch reliability (x: the 2|Δ| rule)")
    ax.legend(fontsize=8)
    picks = np.linspace(0, len(cum_real) - 1, 3).round().astype(int)
    for ax, i in zip(axes[1], picks):
        spot = arrays["close"][i]
        paths = spot * np.exp(np.concatenate([np.zeros((cum_samples.shape[1], 1)), cum_samples[i]], axis=1))
        x = np.arange(paths.shape[1])
        ax.plot(x, paths.T, color="tab:blue", alpha=0.12, lw=0.8)
        ax.plot(x, spot * np.exp(np.r_[0.0, cum_real[i]]), color="k", lw=2, label="realised")
        stamps = arrays.get("close_ns")
        when = (f"{np.datetime64(int(stamps[i]), 'ns').astype('datetime64[m]')} UTC" if stamps is not None
                else f"forecast {i}")
        ax.set_title(f"{when}: {cum_samples.shape[1]} sampled paths vs realised", fontsize=10)
        ax.set_xlabel("sessions ahead")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
