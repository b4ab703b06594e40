"""DeepMamba: the sequence forecaster behind μ_Mamba — a pure-PyTorch Mamba-2 (SSD) stack with
multi-head outputs, its recurrent one-bar step, its losses and the neural fuzzy membership.

Owns
- ``Mamba2``: a clean-room Mamba-2 mixer, weight-compatible with ``mamba_ssm.Mamba2`` (same
  constructor arguments, parameter names, shapes and init) and call-compatible for decoding
  (``allocate_inference_cache``, then ``step(hidden_states, conv_state, ssm_state)`` per bar,
  updating the two state tensors in place, as upstream's). Training runs the whole mixer as one
  autograd node (``mamba_kernels.Mamba2Fused``).
- ``mamba2_step``: the same one-bar step as a pure function of (conv_state, ssm_state), leaving the
  given state untouched; it reads only the attributes ours and mamba_ssm's Mamba2 share, so
  DeepMamba steps either mixer with it.
- ``make_mixer``: ``mamba_ssm.Mamba2`` when CUDA and mamba_ssm are importable, ours otherwise.
- ``DeepMamba``: input projection, N pre-norm residual Mamba-2 blocks (RMSNorm), final norm and the
  heads of ``HEADS``; ``forward`` (whole sequences), ``prefill`` + ``step`` (bar by bar).
- ``loss``: total and per-head losses; ``neural_membership``: forecasts → μ_Mamba in [0, 1].

The kernels (the chunked SSD scan ``ssd_chunked``, the fused mixer and the norms' hand-written
backwards) live in ``intelligence.mamba_kernels``; ``CPU_CHUNK_SIZE`` and ``ssd_chunked`` are
re-exported here.

Shapes: b batch, L bars, H heads, P headdim, N d_state, G ngroups, W d_conv, Q chunk_size.
Threads: ``torch.set_num_threads`` is the caller's job; nothing here touches it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from intelligence.mamba_kernels import (
    CPU_CHUNK_SIZE,
    Mamba2Fused,
    RMSNormFunction,
    clamp_dt,
    compute_dtype,
    ssd_chunked,
)

__all__ = [
    "CPU_CHUNK_SIZE", "HEADS", "HEAD_WEIGHTS", "Block", "DeepMamba", "HeadSpec", "Mamba2",
    "RMSNorm", "gated_rms_norm", "loss", "make_mixer", "mamba2_step", "membership_tensor",
    "neural_membership", "ssd_chunked",
]


# ----------------------------------------------------------------------------------------------
# The Mamba-2 mixer

def gated_rms_norm(y, z, weight, eps, group_size, norm_before_gate):
    """mamba_ssm's RMSNormGated, plain autograd: RMS over groups of group_size channels, gate
    silu(z) before (norm_before_gate=False) or after the norm; weight None = no norm, gate only."""
    if weight is None:
        return y * F.silu(z)
    if not norm_before_gate:
        y = y * F.silu(z)
    d = y.shape[-1]
    if group_size == d:
        y = F.rms_norm(y, (d,), weight, eps)
    else:
        y = F.rms_norm(y.unflatten(-1, (d // group_size, group_size)), (group_size,), None,
                       eps).flatten(-2) * weight
    if norm_before_gate:
        y = y * F.silu(z)
    return y


class Mamba2(nn.Module):
    """Mamba-2 mixer, pure PyTorch, weight-compatible with ``mamba_ssm.Mamba2``.

    Arguments, defaults, parameter names/shapes and init are upstream's (see
    shared/reference/mamba2.md §1–2). use_mem_eff_path, process_group and sequence_parallel are
    accepted and ignored: there are no GPU kernels and no tensor parallelism here. chunk_size only
    changes speed; the scan uses min(chunk_size, L), and CPU_CHUNK_SIZE is the fast value on a CPU.
    """

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64,
                 d_ssm=None, ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True,
                 norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None,
                 sequence_parallel=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.headdim, self.ngroups = headdim, ngroups
        assert self.d_ssm % headdim == 0, "d_ssm must be a multiple of headdim"
        self.nheads = self.d_ssm // headdim
        assert self.nheads % ngroups == 0, "nheads must be a multiple of ngroups"
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.use_mem_eff_path = use_mem_eff_path
        self.activation = "silu"

        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # softplus(dt_bias) = dt ~ logU(dt_min, dt_max) at init (floored), stored as its inverse
        dt = torch.exp(torch.rand(self.nheads, device=device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = _GatedRMSNorm(self.d_ssm, group_size=self.d_ssm // ngroups,
                                      norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, u, state=None, return_state=False):
        """u (b, L, d_model) → y (b, L, d_model).

        state, optional: a (conv_state, ssm_state) pair to continue from (as
        ``allocate_inference_cache``, ``allocate_state``, ``step`` or an earlier forward left it);
        return_state=True also returns the state after the last position, so a forward over
        history followed by ``step`` per new bar equals one forward over everything. Without
        either, the fused training path runs.
        """
        if state is not None or return_state:
            return self._forward_with_state(u, state, return_state)
        if self.d_inner != self.d_ssm:                   # gated-MLP variant: plain autograd
            return self._forward_with_state(u, None, False)
        return Mamba2Fused.apply(u, self.in_proj.weight, self.in_proj.bias, self.conv1d.weight,
                                 self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                                 self.norm.weight if self.rmsnorm else None,
                                 self.out_proj.weight, self.out_proj.bias, self)

    def _forward_with_state(self, u, state, return_state):
        """The same layer in plain autograd ops (F.conv1d, ssd_chunked, gated_rms_norm), able to
        start from and return a recurrent state: prefill, and resuming on a warm state."""
        b, L, _ = u.shape
        W, H, P, G, N = self.d_conv, self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(u)
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * G * N - H) // 2
        z0, x0, z, xBC, dt_raw = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, H],
                                             -1)
        xBC_t = xBC.transpose(1, 2)
        if state is None:
            history = F.pad(xBC_t, (W - 1, 0))
        else:
            history = torch.cat([state[0][:, :, 1:].to(xBC.dtype), xBC_t], dim=-1)
        conv = F.conv1d(history, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        xBC = F.silu(conv.transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_ssm, G * N, G * N], dim=-1)
        dt = clamp_dt(F.softplus((dt_raw + self.dt_bias).to(compute_dtype(u))), self.dt_limit)
        A = -torch.exp(self.A_log.to(dt.dtype))
        y, ssm_state = ssd_chunked(x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)),
                                   C.unflatten(-1, (G, N)), chunk_size=self.chunk_size, D=self.D,
                                   initial_state=None if state is None else state[1],
                                   return_final_state=True)
        y = gated_rms_norm(y.reshape(b, L, self.d_ssm).to(u.dtype), z,
                           self.norm.weight if self.rmsnorm else None,
                           self.norm.eps if self.rmsnorm else 0.0, self.d_ssm // G,
                           self.norm_before_gate)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        y = self.out_proj(y)
        if not return_state:
            return y
        return y, (history[:, :, -W:].contiguous(), ssm_state)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """mamba_ssm.Mamba2's: zero (conv_state (b, conv_dim, W), ssm_state (b, H, P, N)) for
        ``step``, with upstream's layouts and dtypes: conv_state a transposed view of a
        (b, W, conv_dim) tensor in the conv weight's dtype, ssm_state in in_proj's; both in dtype
        when given. max_seqlen and kwargs are accepted and unused (the state does not grow)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device,
                                 dtype=conv_dtype).transpose(1, 2)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state,
                                device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """mamba_ssm.Mamba2's: one new bar, hidden_states (b, 1, d_model) → (out (b, 1, d_model),
        conv_state, ssm_state), the two state tensors updated in place and returned.

        The states come from ``allocate_inference_cache`` (or a forward with return_state, or
        ``allocate_state``). O(1) in the history length. The recurrence runs in float32 at least
        whatever ssm_state's dtype. Unlike upstream's step (mamba2.md §5), dt is clamped to
        dt_limit, D is indexed per channel when D_has_hdim and ngroups > 1 works, so this equals
        forward at every position. ``mamba2_step`` is the same step leaving its state untouched.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one bar, hidden_states (b, 1, d_model); got "
                             f"{tuple(hidden_states.shape)}")
        h = ssm_state.to(compute_dtype(ssm_state))
        out, (new_conv_state, new_ssm_state) = mamba2_step(self, hidden_states[:, 0],
                                                           (conv_state, h))
        conv_state.copy_(new_conv_state)
        ssm_state.copy_(new_ssm_state)
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_state(self, batch, device=None, dtype=None):
        """Zero (conv_state (b, conv_dim, W), ssm_state (b, H, P, N)) for ``mamba2_step``: the
        state before bar 0, ssm_state in float32 at least (DeepMamba's own state).

        conv_state holds the raw (pre-conv) xBC of the last W bars, newest last, as mamba_ssm's.
        """
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return (torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)))


class _GatedRMSNorm(nn.Module):
    """Parameter holder with mamba_ssm's names: ``norm.weight`` only (no bias)."""

    def __init__(self, d, group_size, norm_before_gate, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.norm_before_gate, self.eps = group_size, norm_before_gate, eps

    def forward(self, y, z):
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


def mamba2_step(mixer, u, state):
    """One new bar, functional: u (b, d_model), state (conv_state, ssm_state) → (y (b, d_model),
    new state); the state passed in is left as it was (so a caller may keep it, or branch from it).

    Written against the attribute names ours and mamba_ssm's Mamba2 share, so a mamba_ssm mixer
    can be stepped with our state layout too. Kept to few tensor ops (slices, not
    split; F.linear, not the module call): at batch 1 a step costs its op count, a few µs each,
    not its arithmetic."""
    conv_state, ssm_state = state
    b = u.shape[0]
    H, P, G, N = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
    d_ssm = mixer.d_ssm
    zxbcdt = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias)
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * G * N - H) // 2
    z = zxbcdt[:, 2 * d_mlp:2 * d_mlp + d_ssm]
    conv_state = torch.cat((conv_state[:, :, 1:], zxbcdt[:, 2 * d_mlp + d_ssm:-H, None]), -1)
    xBC = (conv_state * mixer.conv1d.weight.squeeze(1)).sum(-1)
    if mixer.conv1d.bias is not None:
        xBC += mixer.conv1d.bias
    xBC = F.silu(xBC)
    x = xBC[:, :d_ssm].view(b, G, H // G, P, 1)
    dt = F.softplus(zxbcdt[:, -H:] + mixer.dt_bias)
    if dt.dtype != ssm_state.dtype:
        dt = dt.to(ssm_state.dtype)
    dt = clamp_dt(dt, mixer.dt_limit).view(b, G, H // G, 1, 1)
    A_log = mixer.A_log if mixer.A_log.dtype == dt.dtype else mixer.A_log.to(dt.dtype)
    decay = torch.exp(dt * -torch.exp(A_log).view(G, H // G, 1, 1))
    h = torch.addcmul(ssm_state.view(b, G, H // G, P, N) * decay, x * dt,
                      xBC[:, d_ssm:d_ssm + G * N].view(b, G, 1, 1, N))
    # y = h·C as multiply-and-sum: at these sizes cheaper than a batched matmul's dispatch
    y = (h * xBC[:, d_ssm + G * N:].view(b, G, 1, 1, N)).sum(-1).view(b, H, P)
    y = torch.addcmul(y, x.view(b, H, P), mixer.D.view(H, -1)).view(b, d_ssm)
    if y.dtype != u.dtype:
        y = y.to(u.dtype)
    if getattr(mixer, "rmsnorm", True):
        y = gated_rms_norm(y, z, mixer.norm.weight, mixer.norm.eps, d_ssm // G,
                           mixer.norm_before_gate)
    else:
        y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(zxbcdt[:, :d_mlp]) * zxbcdt[:, d_mlp:2 * d_mlp], y], dim=-1)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias), (conv_state,
                                                                      h.view(b, H, P, N))


def make_mixer(d_model, prefer_kernels=True, **kwargs):
    """mamba_ssm.Mamba2 when CUDA and mamba_ssm are importable (and prefer_kernels), else ours.

    The two share parameter names and shapes, so weights move between them by state_dict.
    """
    if prefer_kernels and torch.cuda.is_available():
        try:
            from mamba_ssm import Mamba2 as KernelMamba2
        except ImportError:
            pass
        else:
            return KernelMamba2(d_model, **kwargs)
    return Mamba2(d_model, **kwargs)


# ----------------------------------------------------------------------------------------------
# Heads, losses, membership

@dataclass(frozen=True)
class HeadSpec:
    name: str          # key in forward()'s outputs and in the targets of loss()
    loss: str          # "huber" (δ = 1 on standardized targets) or "bce" (on the logit)
    weight: float      # default weight in the total loss
    meaning: str


HEADS = (
    HeadSpec("next_return", "huber", 1.0,
             "next bar's log return (standardized by the caller, e.g. ÷ trailing bar vol)"),
    HeadSpec("realized_vol", "huber", 1.0,
             "realized vol over the holding horizon, ≥ 0 (softplus), same scale as its target"),
    HeadSpec("max_up", "huber", 0.5,
             "largest up excursion of log price over the horizon, ≥ 0 (softplus)"),
    HeadSpec("max_down", "huber", 0.5,
             "largest down excursion of log price over the horizon, as a positive size"),
    HeadSpec("pop", "bce", 1.0,
             "P(price stays strictly between the short strikes to expiry); output 'pop' in (0, 1), "
             "trained on 'pop_logit' against 0/1 (or a probability)"),
    HeadSpec("confidence", "huber", 0.25,
             "'error_scale' ≥ 0 predicts |next_return target − next_return forecast| (forecast "
             "detached, so this head never bends the return head); confidence = 1/(1 + "
             "error_scale): 1 = error expected to be 0, ≈ 0.55 = no better than guessing 0 on "
             "unit-variance returns (E|z| ≈ 0.8)"),
)
HEAD_WEIGHTS = {spec.name: spec.weight for spec in HEADS}
# columns of the shared regression projection, in order
_REGRESSION_COLUMNS = ("next_return", "realized_vol", "max_up", "max_down", "error_scale")


def loss(outputs, targets, weights=None):
    """Weighted multi-head loss → (total, {head name: loss}).

    outputs: forward()/step() dict. targets: any of next_return, realized_vol, max_up, max_down
    (same shape as the outputs: (b, L) per position or (b,)) and pop (0/1 or a probability).
    The confidence head needs no target of its own: it is fitted to the size of the return
    forecast's error (needs next_return). Positions whose target is not finite (NaN at the end of
    a series, where the horizon runs out) are left out of that head; a head with no target given
    is left out of the total. weights: per-head weights, default HEAD_WEIGHTS. Per-head values are
    tensors (call .item() to log them).
    """
    weights = HEAD_WEIGHTS if weights is None else {**HEAD_WEIGHTS, **weights}
    per_head = {}
    for spec in HEADS:
        if spec.name == "confidence":
            if "next_return" not in targets:
                continue
            prediction = outputs["error_scale"]
            target = (targets["next_return"] - outputs["next_return"].detach()).abs()
        elif spec.name == "pop":
            if "pop" not in targets:
                continue
            prediction, target = outputs["pop_logit"], targets["pop"]
        else:
            if spec.name not in targets:
                continue
            prediction, target = outputs[spec.name], targets[spec.name]
        target = target.to(prediction.dtype)
        finite = torch.isfinite(target)
        target = torch.where(finite, target, torch.zeros((), dtype=target.dtype))
        if spec.loss == "bce":
            elementwise = F.binary_cross_entropy_with_logits(prediction, target, reduction="none")
        else:
            elementwise = F.huber_loss(prediction, target, reduction="none", delta=1.0)
        per_head[spec.name] = (elementwise * finite).sum() / finite.sum().clamp(min=1)
    total = sum(weights[name] * value for name, value in per_head.items())
    if not per_head:
        raise ValueError(f"loss: no target for any head; give some of {[h.name for h in HEADS]}")
    return total, per_head


def membership_tensor(outputs, range_scale=None):
    """μ_Mamba per forecast, vectorised (same shape as outputs['pop']); see neural_membership."""
    score = outputs["pop"]
    if range_scale is not None:
        expected_range = 0.5 * (outputs["max_up"] + outputs["max_down"])
        calm = range_scale / (range_scale + expected_range)
        score = 0.5 * (score + calm)
    mu = 0.5 + outputs["confidence"] * (score - 0.5)
    return mu.clamp(0.0, 1.0)


def neural_membership(outputs, range_scale=None) -> float:
    """μ_Mamba ∈ [0, 1] for the fuzzy engine, from one bar's forecasts.

        score = POP                                          (range_scale None)
        score = (POP + calm) / 2,  calm = s / (s + (max_up + max_down)/2)   (range_scale = s)
        μ     = 0.5 + confidence · (score − 0.5)

    So μ is 0.5 (neutral) when the model has no confidence or no view (score 0.5); near 1 when it
    is confident the condor stays inside its strikes (and, with a range scale such as the distance
    to the short strikes in target units, that the expected range is small against it); near 0
    when it is confident of the opposite. outputs: forward(..., last_only=True)/step() for one bar
    (every value a single element); for many bars use membership_tensor.
    """
    mu = membership_tensor(outputs, range_scale)
    if mu.numel() != 1:
        raise ValueError(f"neural_membership takes one bar's forecasts, got {mu.numel()} values; "
                         "use membership_tensor for batches")
    return float(mu)


# ----------------------------------------------------------------------------------------------
# DeepMamba

class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last dim; as nn.RMSNorm (same ``weight``), with a hand-written
    backward (autograd's decomposition made ~2× the memory passes)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        if torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)     # one op for step()



class Block(nn.Module):
    """Pre-norm residual block: h + mixer(RMSNorm(h))."""

    def __init__(self, d_model, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=1e-5)
        self.mixer = make_mixer(d_model, **mixer_kwargs)

    def forward(self, h):
        return h + self.mixer(self.norm(h))


class DeepMamba(nn.Module):
    """Bars (b, L, n_features) → forecasts: Linear embed, n_layers pre-norm residual Mamba-2
    blocks, RMSNorm, then the heads of HEADS. Configuration is the keyword defaults below.

    Inputs are the caller's standardized features, one row per bar, oldest first. strike_distance,
    optional, (b, 2) or (b, L, 2): distances of the short put and short call below/above spot
    (positive log-moneyness in the caller's scale) for the POP head; None means no strike input,
    which a model trained on one fixed strike rule reads as "that rule's strikes".

    Outputs, each (b, L) (or (b,) from last_only/prefill/step): next_return; realized_vol, max_up,
    max_down (≥ 0, softplus); pop_logit and pop = sigmoid(pop_logit) ∈ (0, 1); error_scale ≥ 0
    (the expected |next_return error|) and confidence = 1 / (1 + error_scale) ∈ (0, 1].
    """

    def __init__(self, n_features=8, d_model=64, n_layers=4, d_state=32, d_conv=4, expand=2,
                 headdim=32, ngroups=1, chunk_size=CPU_CHUNK_SIZE, prefer_kernels=True,
                 **mixer_kwargs):
        super().__init__()
        self.n_features, self.d_model, self.n_layers = n_features, d_model, n_layers
        self.embed = nn.Linear(n_features, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                  ngroups=ngroups, chunk_size=chunk_size, layer_idx=i,
                  prefer_kernels=prefer_kernels, **mixer_kwargs)
            for i in range(n_layers))
        self.norm_f = RMSNorm(d_model, eps=1e-5)
        self.regression = nn.Linear(d_model, len(_REGRESSION_COLUMNS))
        self.pop_hidden = nn.Linear(d_model + 2, d_model)
        self.pop_out = nn.Linear(d_model, 1)
        # GPT-2/mamba_ssm residual scaling: each block's output projection shrunk by 1/sqrt(depth)
        with torch.no_grad():
            for block in self.layers:
                block.mixer.out_proj.weight.div_(math.sqrt(n_layers))

    def _heads(self, h, strike_distance):
        raw = F.linear(h, self.regression.weight, self.regression.bias)
        if strike_distance is not None:
            if strike_distance.dim() < h.dim():                        # (b, 2) for every bar
                strike_distance = strike_distance.unsqueeze(-2)
            strike_distance = strike_distance.to(h.dtype)
        # pop_hidden reads [h, strike_distance]; applied by parts, so no concatenated copy
        hidden = F.linear(h, self.pop_hidden.weight[:, :-2], self.pop_hidden.bias)
        if strike_distance is not None:
            hidden = hidden + F.linear(strike_distance, self.pop_hidden.weight[:, -2:])
        pop_logit = F.linear(F.silu(hidden), self.pop_out.weight, self.pop_out.bias).squeeze(-1)
        next_return = raw[..., 0]
        positive = F.softplus(raw[..., 1:])
        error_scale = positive[..., 3]
        return {
            "next_return": next_return,
            "realized_vol": positive[..., 0],
            "max_up": positive[..., 1],
            "max_down": positive[..., 2],
            "pop_logit": pop_logit,
            "pop": torch.sigmoid(pop_logit),
            "error_scale": error_scale,
            "confidence": torch.reciprocal(error_scale + 1.0),
        }

    def forward(self, x, strike_distance=None, last_only=False):
        """x (b, L, n_features) → {name: (b, L)} per position (the forecast made at each bar from
        bars up to and including it), or {name: (b,)} for the last bar only when last_only."""
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        if last_only:
            h = h[:, -1]
            if strike_distance is not None and strike_distance.dim() == 3:
                strike_distance = strike_distance[:, -1]
        return self._heads(self.norm_f(h), strike_distance)

    def allocate_state(self, batch, device=None, dtype=None):
        """Per-layer zero states: the state before the first bar."""
        return [_allocate(block.mixer, batch, device, dtype) for block in self.layers]

    def prefill(self, x, strike_distance=None):
        """Run the history x (b, L, n_features) → (last bar's outputs, state for step)."""
        h, state = self._blocks_from(x, None)
        if strike_distance is not None and strike_distance.dim() == 3:
            strike_distance = strike_distance[:, -1]
        return self._heads(h[:, -1], strike_distance), state

    def forward_stateful(self, x, state=None, strike_distance=None, return_hidden=False):
        """x (b, L, n_features), starting from ``state`` (``allocate_state``/``prefill``/a previous
        call; None = zeros, the state before the first bar) → ({name: (b, L)} per position, state
        after the last bar).

        One causal pass: chaining calls over consecutive pieces of a series, each from the state
        the previous one returned, equals one call over the whole series and equals ``step`` bar
        by bar (tests/test_mamba_stateful.py). Differentiable, including through ``state``
        (truncated BPTT detaches it between segments). A mamba_ssm mixer is stepped bar by bar.
        ``return_hidden``: the outputs also hold 'hidden', the final-normed hidden states
        (b, L, d_model) the heads read (the diffusion head's condition).
        """
        h, state = self._blocks_from(x, state)
        outputs = self._heads(h, strike_distance)
        if return_hidden:
            outputs["hidden"] = h
        return outputs, state

    def _blocks_from(self, x, state):
        """The blocks over x (b, L, n_features) from ``state`` (None: zeros) → (final-normed
        hidden states (b, L, d_model), the state after the last bar)."""
        h = self.embed(x)
        new_state = []
        for i, block in enumerate(self.layers):
            layer_state = None if state is None else state[i]
            if isinstance(block.mixer, Mamba2):
                y, layer_state = block.mixer(block.norm(h), state=layer_state, return_state=True)
            else:                                              # a kernel mixer: step through
                if layer_state is None:
                    layer_state = _allocate(block.mixer, x.shape[0], None, None)
                ys = []
                for t in range(h.shape[1]):
                    y_t, layer_state = mamba2_step(block.mixer, block.norm(h[:, t]), layer_state)
                    ys.append(y_t)
                y = torch.stack(ys, 1)
            h = h + y
            new_state.append(layer_state)
        return self.norm_f(h), new_state

    def step(self, x_t, state, strike_distance=None):
        """One new bar x_t (b, n_features) → ({name: (b,)}, new state); O(1) per bar.

        Equals forward(...)[:, t] over the same bars. For speed call it under
        torch.inference_mode(); the state passed in is not modified.
        """
        h = F.linear(x_t, self.embed.weight, self.embed.bias)
        new_state = []
        for block, layer_state in zip(self.layers, state):
            y, layer_state = mamba2_step(block.mixer, block.norm(h), layer_state)
            h = h + y
            new_state.append(layer_state)
        return self._heads(self.norm_f(h), strike_distance), new_state

    def configure_optimizer(self, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)):
        """AdamW with decay on matrices only (not on biases, norms, dt_bias, A_log, D)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False)
                (no_decay if skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def _allocate(mixer, batch, device, dtype):
    if isinstance(mixer, Mamba2):
        return mixer.allocate_state(batch, device, dtype)
    return Mamba2.allocate_state(mixer, batch, device, dtype)
