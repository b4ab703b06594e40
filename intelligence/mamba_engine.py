"""DeepMamba: the sequence forecaster behind μ_Mamba — a pure-PyTorch Mamba-2 (SSD) stack with
multi-head outputs, its recurrent one-bar step, its losses and the neural fuzzy membership.

Owns
- ``Mamba2``: a clean-room Mamba-2 mixer, weight-compatible with ``mamba_ssm.Mamba2`` (same
  constructor arguments, parameter names, shapes and init). Training runs the whole mixer as one
  autograd node (``_Mamba2Fused``: in_proj, causal conv, chunked SSD scan — quadratic inside
  chunks, recurrent between them — gated RMSNorm, out_proj) with hand-written backwards laid out
  for CPU BLAS; ``step`` advances one bar in O(1) from a (conv_state, ssm_state) pair.
- ``ssd_chunked``: that scan on its own (differentiable), the piece the tests hold to a float64
  sequential recurrence.
- ``make_mixer``: ``mamba_ssm.Mamba2`` when CUDA and mamba_ssm are importable, ours otherwise.
- ``DeepMamba``: input projection, N pre-norm residual Mamba-2 blocks (RMSNorm), final norm and the
  heads of ``HEADS``; ``forward`` (whole sequences), ``prefill`` + ``step`` (bar by bar).
- ``loss``: total and per-head losses; ``neural_membership``: forecasts → μ_Mamba in [0, 1].

Shapes: b batch, L bars, H heads, P headdim, N d_state, G ngroups, W d_conv, Q chunk_size.
Threads: ``torch.set_num_threads`` is the caller's job; nothing here touches it.
Why hand-written backwards: on a CPU core a training step of this size is bound by memory passes
over (b, L, ·) tensors, not by FLOPs. Autograd's generic backward of the SSD, the depthwise conv and
the gated norm made about twice the passes (and mkldnn's depthwise weight gradient is slow); the
SSD's factored form (see _ssd_forward_factored) turns its per-head (Q × Q) decay blocks into
group-wide GEMMs; in_proj as three row-block GEMMs gives contiguous parts instead of strided
slices. Together ~2× the throughput of a plain-autograd port (benchmarks/bench_mamba.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Chunk length for CPU training on L = 128 bars (benchmarks/bench_mamba.py --chunk-sweep: 32 and
# 64 measure alike, 16 and 128 ~5-10 % slower). 32 keeps each chunk's total decay inside the
# factored form's bound for larger dt·|A| than 64 would (see _ssd_forward_any).
CPU_CHUNK_SIZE = 32


# ----------------------------------------------------------------------------------------------
# The SSD scan

def ssd_chunked(x, dt, A, B, C, chunk_size=CPU_CHUNK_SIZE, D=None, initial_state=None,
                return_final_state=False):
    """The Mamba-2 selective scan, chunked.

    Computes, per head h with state h_t (P × N) and h_{-1} = initial_state (zeros if None):
        h_t = exp(dt_t·A)·h_{t−1} + dt_t·(x_t ⊗ B_t),      y_t = h_t·C_t + D ⊙ x_t
    x (b, L, H, P); dt (b, L, H), already softplus-ed and clamped; A (H,) ≤ 0; B, C (b, L, G, N),
    head h reading group h // (H/G); D None, (H,) or (H·P,). Returns y (b, L, H, P), and the final
    state (b, H, P, N) when return_final_state. Differentiable in every input.
    """
    b, L, H, P = x.shape
    if D is None:
        D = x.new_zeros(H)
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, B.shape[-1])
    y, final_state = _SSD.apply(x, dt, A, B, C, D, initial_state, min(chunk_size, L))
    return (y, final_state) if return_final_state else y


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, Q):
        with torch.autocast(x.device.type, enabled=False):
            y, final_state, saved, ctx.factored = _ssd_forward_any(x, dt, A, B, C, D,
                                                                   initial_state, Q)
        ctx.save_for_backward(*saved)
        return y, final_state

    @staticmethod
    def backward(ctx, gy, g_final):
        return (*_ssd_backward_any(ctx.factored, ctx.saved_tensors, gy, g_final), None)


# Largest |exponent| the factored form may meet (see _ssd_forward_factored): e^40 ≈ 2e17 leaves
# float32 ~1e21 of headroom for the GEMM sums; a chunk whose total log-decay exceeds twice this
# sends the whole call to the masked form.
FACTORED_EXPONENT_BOUND = {torch.float32: 40.0, torch.float64: 300.0}


def _ssd_forward_any(x, dt, A, B, C, D, initial_state, Q):
    """The factored form when the chunks' decays allow it, else the masked one →
    (y, final state, kept tensors, factored?).

    The factored form needs every chunk's total log-decay within 2·FACTORED_EXPONENT_BOUND; when a
    chunk of Q bars decays more (large dt·|A|), shorter chunks are tried (down to 8 bars; the
    chunk length never changes the result beyond rounding) before falling back.
    """
    b, L, H, _ = x.shape
    dtype = _compute_dtype(x)
    a = (dt * A).to(dtype)
    limit = -2.0 * FACTORED_EXPONENT_BOUND.get(dtype, 40.0)
    q = Q
    while True:
        totals = F.pad(a, (0, 0, 0, (-L) % q)).view(b, -1, q, H).sum(2)
        if float(totals.min()) >= limit:
            return (*_ssd_forward_factored(x, dt, A, B, C, D, initial_state, q, a=a), True)
        if q <= 8:
            return (*_ssd_forward_masked(x, dt, A, B, C, D, initial_state, Q), False)
        q = max(8, q // 2)


def _ssd_backward_any(factored, saved, gy, g_final, dx_out=None, dB_out=None, dC_out=None):
    backward = _ssd_backward_factored if factored else _ssd_backward_masked
    return backward(saved, gy, g_final, dx_out, dB_out, dC_out)


def _ssd_forward_factored(x, dt, A, B, C, D, initial_state, Q, a=None):
    """Chunked SSD in factored form → (y, final state, tensors kept for backward).

    Inside a chunk (T = b·c chunks of Q bars): cum = running sum of a = dt·A, tot = cum_{Q−1}
    (the chunk's total log-decay), u = cum − tot/2, so the decay between bars j ≤ l factors as
    exp(cum_l − cum_j) = exp(u_l)·exp(−u_j) with |u| ≤ |tot|/2; _ssd_forward_any only comes here
    when that stays within FACTORED_EXPONENT_BOUND (no overflow, no cancellation beyond float
    rounding). With Xs = x·dt·exp(−u) and E = exp(tot/2) per chunk and head:
      chunk end states  S_k = Σ_j Xs_j ⊗ B_j                         per group: one GEMM
      between chunks    with starts_k = E_k·R_k (R_k the state entering chunk k):
                        W_k = starts_k + S_k,  starts_{k+1} = E_k E_{k+1} W_k,  R_c = E_{c−1} W_{c−1}
      outputs           Y[l] = exp(u_l)·(Σ_{j≤l} (C_l·B_j) Xs_j + C_l·starts_k)   one GEMM + one
                                                                                  accumulated GEMM
    Every product is a GEMM over all heads of a group on token-major (Q, H/G·P) blocks; no
    (Q × Q) block per head and no transposed copy is made.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    Hg = H // G
    c = -(-L // Q)
    Lp, T = c * Q, b * c
    pad = Lp - L
    dtype = _compute_dtype(x)

    a = (dt * A).to(dtype) if a is None else a
    dtp = dt.to(dtype)
    if pad:
        a, dtp, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (a, dtp, B, C))
    cum = a.view(T, Q, H).cumsum(1)                                     # (T, Q, H)
    u = cum - 0.5 * cum[:, Q - 1:]
    exp_u = torch.exp(u)
    exp_minus_u = torch.exp(-u)
    s = dtp.view(T, Q, H) * exp_minus_u                                 # Xs = x·s
    Xs = x.new_empty(b, Lp, H, P, dtype=dtype)
    torch.mul(x, s.view(b, Lp, H)[:, :L].unsqueeze(-1), out=Xs[:, :L])
    if pad:
        Xs[:, L:] = 0
    Xs_g = _token_to_group(Xs.view(T, Q, H, P), G)                      # (T·G, Q, Hg·P)
    Bg = B.reshape(T, Q, G, N).transpose(1, 2).reshape(T * G, Q, N)
    Cg = C.reshape(T, Q, G, N).transpose(1, 2).reshape(T * G, Q, N)
    CB = torch.bmm(Cg, Bg.transpose(1, 2)).tril_()                      # (T·G, Q, Q)

    S = torch.bmm(Xs_g.transpose(1, 2), Bg).view(b, c, H, P, N)
    E = exp_u[:, Q - 1].reshape(b, c, H, 1, 1)                           # exp(tot/2)
    E_pair = E[:, :-1] * E[:, 1:]                                       # E_k·E_{k+1}
    starts, W = torch.empty_like(S), torch.empty_like(S)
    if initial_state is None:
        starts[:, 0] = 0
    else:
        torch.mul(initial_state.to(dtype), E[:, 0], out=starts[:, 0])
    for k in range(c):
        torch.add(starts[:, k], S[:, k], out=W[:, k])
        if k + 1 < c:
            torch.mul(W[:, k], E_pair[:, k], out=starts[:, k + 1])
    final_state = W[:, c - 1] * E[:, c - 1]

    V = torch.bmm(Cg, starts.view(T * G, Hg * P, N).transpose(1, 2))    # (T·G, Q, Hg·P)
    V.baddbmm_(CB, Xs_g)
    y = x.new_empty(b, Lp, H, P, dtype=dtype)
    torch.mul(_group_to_token(V, G, H), exp_u.unsqueeze(-1), out=y.view(T, Q, H, P))
    y = y[:, :L]
    y.addcmul_(x, D.view(H, -1).to(dtype))
    saved = (x, dt, A, D, s, exp_u, exp_minus_u, Xs, CB, Bg, Cg, starts, W, V, E_pair)
    return y, final_state, saved


def _ssd_backward_factored(saved, gy, g_final, dx_out=None, dB_out=None, dC_out=None):
    """Gradients of _ssd_forward_factored → (dx, ddt, dA, dB, dC, dD, d_initial_state).

    The centring tot/2 is held constant (the result does not depend on it, so that is exact);
    then the gradient on tot_k through the chunk recurrence is Σ d R_{k+1} ⊙ R_{k+1}.
    """
    x, dt, A, D, s, exp_u, exp_minus_u, Xs, CB, Bg, Cg, starts, W, V, E_pair = saved
    b, L, H, P = x.shape
    T, Q = exp_u.shape[0], exp_u.shape[1]
    G, N = Bg.shape[0] // T, Bg.shape[-1]
    Hg, c = H // G, T // b
    Lp = c * Q
    dtype = Xs.dtype
    if gy is None:
        gy = x.new_zeros(b, L, H, P)
    gy = gy.to(dtype)
    gyp = F.pad(gy, (0, 0, 0, 0, 0, Lp - L)) if Lp != L else gy
    gy4 = gyp.reshape(T, Q, H, P)

    # y = exp(u)·V + D·x
    d_u = _rowdot(gy4, _group_to_token(V, G, H)).mul_(exp_u)            # (T, Q, H)
    dV_g = _token_to_group(gy4 * exp_u.unsqueeze(-1), G)                 # (T·G, Q, Hg·P)
    Xs_g = _token_to_group(Xs.view(T, Q, H, P), G)
    # V = C·startsᵀ + tril(C Bᵀ)·Xs
    dXs_g = torch.bmm(CB.transpose(1, 2), dV_g)
    dCB = torch.bmm(dV_g, Xs_g.transpose(1, 2)).tril_()
    dC = torch.bmm(dV_g, starts.view(T * G, Hg * P, N)).baddbmm_(dCB, Bg)
    dB = torch.bmm(dCB.transpose(1, 2), Cg)
    d_starts = torch.bmm(dV_g.transpose(1, 2), Cg).view(b, c, H, P, N)

    # between chunks, backwards: dS_k = E_k·dR_{k+1} = E_k E_{k+1}·(d starts_{k+1} + dS_{k+1})
    E = exp_u[:, Q - 1].reshape(b, c, H, 1, 1)
    dS = torch.empty_like(d_starts)
    if g_final is None:
        dS[:, c - 1] = 0
    else:
        torch.mul(g_final.to(dtype), E[:, c - 1], out=dS[:, c - 1])
    for k in range(c - 1, 0, -1):
        torch.mul(d_starts[:, k] + dS[:, k], E_pair[:, k - 1], out=dS[:, k - 1])
    d_initial = (d_starts[:, 0] + dS[:, 0]) * E[:, 0]
    d_u[:, Q - 1] += (dS * W).sum((-1, -2)).view(T, H)                 # Σ dR_{k+1} ⊙ R_{k+1}
    # S = Xsᵀ·B
    dS_g = dS.view(T * G, Hg * P, N)
    dXs_g.baddbmm_(Bg, dS_g.transpose(1, 2))
    dB.baddbmm_(Xs_g, dS_g)

    # Xs = x·s with s = dt·exp(−u)
    dXs = _group_to_token(dXs_g, G, H).view(b, Lp, H, P)[:, :L]
    d_s = (dXs * x).sum(-1)                                             # (b, L, H)
    s_l = s.view(b, Lp, H)[:, :L]
    d_u.view(b, Lp, H)[:, :L].addcmul_(d_s, s_l, value=-1.0)
    da = d_u.flip(1).cumsum(1).flip(1).view(b, Lp, H)[:, :L]            # cum = running sum of a
    dx = torch.mul(dXs, s_l.unsqueeze(-1), out=dx_out)
    dx.addcmul_(gy, D.view(H, -1).to(dtype))
    ddt = (d_s * exp_minus_u.view(b, Lp, H)[:, :L]).addcmul_(da, A)
    return _backward_tail(dx, ddt, da, dt, gy, x, A, D, dB, dC, dB_out, dC_out, d_initial, b, c, G, Q, N, Lp, L, H)


def _backward_tail(dx, ddt, da, dt, gy, x, A, D, dB, dC, dB_out, dC_out, d_initial, b, c, G, Q, N, Lp, L, H):
    """The gradient pieces both SSD backward forms finish the same way: dA, dD, and dB/dC
    unchunked back to (b, L, G, N) (into the caller's buffers when given)."""
    dA = (da * dt).sum((0, 1))
    gy_x = (gy * x).sum((0, 1))                                         # (H, P)
    dD = gy_x.sum(-1) if D.numel() == H else gy_x.reshape(-1)
    grads = []
    for grad, out in ((dB, dB_out), (dC, dC_out)):
        grad = grad.view(b, c, G, Q, N).transpose(2, 3).reshape(b, Lp, G, N)[:, :L]
        grads.append(grad if out is None else out.copy_(grad))
    return (dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), grads[0], grads[1],
            dD.to(D.dtype), d_initial)


def _ssd_forward_masked(x, dt, A, B, C, D, initial_state, Q):
    """Chunked SSD with explicit per-head decay blocks (the fallback for chunks that decay too
    strongly for the factored form) → (y, final state, tensors kept for backward).

    Inside a chunk of Q bars (T = b·c chunks in all): a_t = dt_t·A, cum = running sum of a,
    decay[l, j] = exp(a_{j+1} + … + a_l), X = dt·x.
      1. diagonal blocks   Y[l] = Σ_{j≤l} decay[l, j] (C_l·B_j) X_j     per head: (Q×Q) @ (Q×P)
      2. chunk end states  S    = Σ_j decay[Q−1, j] X_j ⊗ B_j            per group: one GEMM
      3. between chunks    R_{k+1} = exp(cum_{Q−1})·R_k + S_k            a loop over chunks
      4. start state out   Y[l] += exp(cum_l) (C_l · R_k)                per group: one GEMM
    Tokens stay major ((T, Q, H, P), as they leave in_proj), so steps 2 and 4 are single GEMMs over
    all heads of a group ((H/G·P) × Q × N); only step 1 runs per head, on a head-major copy of X.
    Nothing of size (L × L) or (Q × Q × P) is built. L is padded to a multiple of Q with zeros
    *after* the softplus: padded steps decay by 1 and add nothing, so the final state is exact.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    Hg = H // G
    c = -(-L // Q)
    Lp, T = c * Q, b * c
    pad = Lp - L

    X = x.new_empty(b, Lp, H, P)
    torch.mul(x, dt.unsqueeze(-1), out=X[:, :L])
    a = (dt * A).to(X.dtype)
    if pad:
        X[:, L:] = 0
        a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (a, B, C))
    X4 = X.view(T, Q, H, P)
    Bg = B.reshape(T, Q, G, N).transpose(1, 2).reshape(T * G, Q, N)
    Cg = C.reshape(T, Q, G, N).transpose(1, 2).reshape(T * G, Q, N)
    ah = a.reshape(T, Q, H).transpose(1, 2).contiguous()              # (T, H, Q)
    cum = ah.cumsum(-1)

    # decay[l, j] = exp(a_{j+1} + … + a_l) for j ≤ l, the segment sums made by one GEMM with a
    # 0/1 mask: every term is ≤ 0, so nothing cancels (cum_l − cum_j would lose |cum|·eps even
    # for short segments). Above the diagonal the sum is empty and decay is exp(0) = 1, harmless:
    # the causal mask sits on the small C·Bᵀ block (and its gradient) instead, and no −inf is
    # ever exponentiated (exp(−inf) runs ~7× slower than a finite exp on x86 CPUs, and a masked
    # entry can never overflow into a 0·inf in a backward).
    decay = torch.mm(ah.view(T * H, Q), _segment_mask(Q, X)).view(T, H, Q, Q).exp_()

    # 1. diagonal blocks
    CB = torch.bmm(Cg, Bg.transpose(1, 2)).tril_()                      # (T·G, Q, Q)
    M = (decay.view(T, G, Hg, Q, Q) * CB.view(T, G, 1, Q, Q)).view(T * H, Q, Q)
    Xh = X4.transpose(1, 2).reshape(T * H, Q, P)
    Y_diag = torch.bmm(M, Xh)                                           # (T·H, Q, P)

    # 2. chunk end states
    decay_end = decay[:, :, Q - 1, :]                                   # (T, H, Q)
    Xd_g = _token_to_group(X4 * decay_end.transpose(1, 2).unsqueeze(-1), G)   # (T·G, Q, Hg·P)
    S = torch.bmm(Xd_g.transpose(1, 2), Bg).view(b, c, H, P, N)

    # 3. between chunks
    chunk_decay = torch.exp(cum[:, :, Q - 1]).view(b, c, H, 1, 1)
    starts = torch.empty_like(S)
    R = X.new_zeros(b, H, P, N) if initial_state is None else initial_state.to(X.dtype)
    for k in range(c):
        starts[:, k] = R
        R = torch.addcmul(S[:, k], R, chunk_decay[:, k])

    # 4. start states seen from inside each chunk
    CR = torch.bmm(Cg, starts.view(T * G, Hg * P, N).transpose(1, 2))   # (T·G, Q, Hg·P)
    E = torch.exp(cum)                                                  # (T, H, Q)
    y = X.new_empty(b, Lp, H, P)
    torch.addcmul(Y_diag.view(T, H, Q, P).transpose(1, 2), _group_to_token(CR, G, H),
                  E.transpose(1, 2).unsqueeze(-1), out=y.view(T, Q, H, P))
    y = y[:, :L]
    y.addcmul_(x, D.view(H, -1).to(y.dtype))
    saved = (x, dt, A, D, X, CB, decay, Bg, Cg, starts, E, chunk_decay)
    return y, R, saved


def _ssd_backward_masked(saved, gy, g_final, dx_out=None, dB_out=None, dC_out=None):
    """Gradients of _ssd_forward_masked → (dx, ddt, dA, dB, dC, dD, d_initial_state).

    Reuses the forward's decay blocks and chunk states. The gradient reaching each a_k is summed
    over the segments that contain k directly, never as a total minus a partial sum (which
    cancels). dx_out, dB_out, dC_out: optional views to write those gradients into.
    """
    x, dt, A, D, X, CB, decay, Bg, Cg, starts, E, chunk_decay = saved
    b, L, H, P = x.shape
    T, Q = decay.shape[0], decay.shape[-1]
    G = Bg.shape[0] // T
    N = Bg.shape[-1]
    Hg, c = H // G, T // b
    Lp = c * Q
    # recomputed rather than kept: less memory live between forward and backward
    X4 = X.view(T, Q, H, P)
    M = (decay.view(T, G, Hg, Q, Q) * CB.view(T, G, 1, Q, Q)).view(T * H, Q, Q)
    Xh = X4.transpose(1, 2).reshape(T * H, Q, P)
    Xd_g = _token_to_group(X4 * decay[:, :, Q - 1, :].transpose(1, 2).unsqueeze(-1), G)
    CR = torch.bmm(Cg, starts.view(T * G, Hg * P, N).transpose(1, 2))
    if gy is None:
        gy = x.new_zeros(b, L, H, P)
    gyp = gy.to(X.dtype)
    if Lp != L:
        gyp = F.pad(gyp, (0, 0, 0, 0, 0, Lp - L))
    gy4 = gyp.reshape(T, Q, H, P)

    # 1. diagonal blocks
    gYh = gy4.transpose(1, 2).reshape(T * H, Q, P)
    dM = torch.bmm(gYh, Xh.transpose(1, 2))                             # (T·H, Q, Q)
    dXh = torch.bmm(M.transpose(1, 2), gYh)                             # (T·H, Q, P)
    dseg = (dM * M).view(T, H, Q, Q)                                    # d/d(a_{j+1}+…+a_l)
    dCB = dM.view(T, G, Hg, Q, Q).mul_(decay.view(T, G, Hg, Q, Q)).sum(2).view(T * G, Q, Q)
    dCB.tril_()
    dC = torch.bmm(dCB, Bg)
    dB = torch.bmm(dCB.transpose(1, 2), Cg)
    # d a_k = Σ_{j<k≤l} dseg[l, j]: the forward's mask GEMM transposed
    da = torch.mm(dseg.view(T * H, Q * Q), _segment_mask(Q, X).t()).view(T, H, Q)

    # 4. start states
    gE = gy4 * E.transpose(1, 2).unsqueeze(-1)                          # (T, Q, H, P)
    d_cum = _rowdot(gE, _group_to_token(CR, G, H)).transpose(1, 2)      # d/d cum_l, (T, H, Q)
    da += d_cum.flip(-1).cumsum(-1).flip(-1)
    gE_g = _token_to_group(gE, G)                                       # (T·G, Q, Hg·P)
    dC += torch.bmm(gE_g, starts.view(T * G, Hg * P, N))
    d_starts = torch.bmm(gE_g.transpose(1, 2), Cg).view(b, c, H, P, N)

    # 3. between chunks, backwards
    g = X.new_zeros(b, H, P, N) if g_final is None else g_final.to(X.dtype)
    dS = torch.empty_like(d_starts)
    for k in reversed(range(c)):
        dS[:, k] = g
        g = torch.addcmul(d_starts[:, k], g, chunk_decay[:, k])
    d_initial = g
    d_chunk_total = (dS * starts).sum((-1, -2)) * chunk_decay.view(b, c, H)

    # 2. chunk end states
    dS_g = dS.view(T * G, Hg * P, N)
    dXd = _group_to_token(torch.bmm(Bg, dS_g.transpose(1, 2)), G, H)    # (T, Q, H, P)
    dB += torch.bmm(Xd_g, dS_g)
    decay_end = decay[:, :, Q - 1, :]                                   # (T, H, Q)
    d_end = _rowdot(dXd, X.view(T, Q, H, P)).transpose(1, 2) * decay_end
    da[:, :, 1:] += d_end[:, :, :-1].cumsum(-1)                         # d_end: d/d(a_{j+1…Q−1})
    da += d_chunk_total.view(T, H, 1)

    dX = torch.addcmul(dXh.view(T, H, Q, P).transpose(1, 2), dXd,
                       decay_end.transpose(1, 2).unsqueeze(-1), out=dXd)
    dX = dX.view(b, Lp, H, P)[:, :L]
    da = da.transpose(1, 2).reshape(b, Lp, H)[:, :L]

    gy = gy.to(X.dtype)
    Dv = D.view(H, -1).to(X.dtype)
    dx = torch.addcmul(dX * dt.unsqueeze(-1), gy, Dv, out=dx_out)
    ddt = (dX * x).sum(-1).addcmul_(da, A)
    return _backward_tail(dx, ddt, da, dt, gy, x, A, D, dB, dC, dB_out, dC_out, d_initial, b, c, G, Q, N, Lp, L, H)


def _rowdot(a, b):
    """Σ over the last dim of a·b, as a batch of tiny GEMMs (≈2× a multiply-then-sum on CPU)."""
    P = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, P), b.reshape(-1, P, 1)).view(a.shape[:-1])


def _segment_mask(Q, like):
    """(Q, Q·Q) 0/1: column (l, j) picks a_k for j < k ≤ l, so a @ mask = all segment sums."""
    key = (Q, like.dtype, like.device)
    mask = _SEGMENT_MASKS.get(key)
    if mask is None:
        k, l, j = torch.meshgrid(torch.arange(Q), torch.arange(Q), torch.arange(Q), indexing="ij")
        mask = ((j < k) & (k <= l)).to(like.dtype).reshape(Q, Q * Q).to(like.device)
        _SEGMENT_MASKS[key] = mask
    return mask


_SEGMENT_MASKS: dict = {}


def _token_to_group(t, G):
    """(T, Q, H, P) → (T·G, Q, H/G·P): a view when G = 1."""
    T, Q, H, P = t.shape
    return t.reshape(T, Q, G, (H // G) * P).transpose(1, 2).reshape(T * G, Q, (H // G) * P)


def _group_to_token(t, G, H):
    """(T·G, Q, H/G·P) → (T, Q, H, P): a view when G = 1 (a strided view otherwise)."""
    TG, Q, F_ = t.shape
    return t.view(TG // G, G, Q, F_).transpose(1, 2).reshape(TG // G, Q, H, F_ * G // H)


# ----------------------------------------------------------------------------------------------
# Causal depthwise conv + SiLU, and gated RMSNorm + out_proj: forward/backward pairs for the
# fused mixer

def _conv_silu_forward(xBC, weight, bias):
    """silu(causal depthwise conv) on token-major (b, L, C) → (out, pre-activation).

    out[t] = silu(bias + Σ_k weight[:, k]·xBC[t − (W−1−k)]), zeros before t = 0: W shifted
    multiply-adds on the layout in_proj produced, no transposes and no padded copy. The taps are
    read from a (W, C) copy: a strided (C,) weight column halves the speed of each pass.
    """
    L, W = xBC.shape[1], weight.shape[1]
    taps = weight.t().contiguous()
    if bias is None:
        v = xBC * taps[W - 1]
    else:
        v = torch.addcmul(bias, xBC, taps[W - 1])
    for s in range(1, min(W, L)):
        v[:, s:].addcmul_(xBC[:, :L - s], taps[W - 1 - s])
    return F.silu(v), v


def _conv_silu_backward(g, v, xBC, weight, has_bias):
    """Gradients of _conv_silu_forward → (d xBC, d weight (C, W), d bias or None)."""
    L, W = xBC.shape[1], weight.shape[1]
    taps = weight.t().contiguous()
    dv = torch.ops.aten.silu_backward(g, v)
    dx = dv * taps[W - 1]
    for s in range(1, min(W, L)):
        dx[:, :L - s].addcmul_(dv[:, s:], taps[W - 1 - s])
    d_taps = taps.new_zeros(taps.shape)
    for s in range(min(W, L)):
        d_taps[W - 1 - s] = (dv[:, s:] * xBC[:, :L - s]).sum((0, 1))
    return dx, d_taps.t().contiguous(), dv.sum((0, 1)) if has_bias else None


def _norm_project_forward(y, z, weight, eps, ngroups, norm_before_gate, proj_weight, proj_bias):
    """mamba_ssm's RMSNormGated (see gated_rms_norm) followed by out_proj → (out, kept tensors).

    The norm weight is folded into the projection, (n·w)·Wᵀ = n·(W·diag w)ᵀ: a (d_model × d)
    multiply instead of a pass over (b, L, d). With one group the per-row rstd also moves to the
    narrower projection output: out = rstd·((y·silu z) @ (W·w)ᵀ) + bias.
    """
    sz = F.silu(z)
    if weight is None:                                                  # rmsnorm=False
        m = y * sz
        return F.linear(m, proj_weight, proj_bias), (y, z, sz, None, None, m)
    if ngroups == 1:
        gated = y * sz
        source = y if norm_before_gate else gated
        rstd = torch.linalg.vector_norm(source, dim=-1, keepdim=True).square_()
        rstd = rstd.div_(source.shape[-1]).add_(eps).rsqrt_()           # (b, L, 1)
        q = F.linear(gated, proj_weight * weight)
        out = torch.mul(q, rstd) if proj_bias is None else torch.addcmul(proj_bias, q, rstd)
        return out, (y, z, sz, gated, rstd, q)
    g = y if norm_before_gate else y * sz
    b, L, d = g.shape
    gg = g.view(b, L, ngroups, d // ngroups)
    rstd = torch.linalg.vector_norm(gg, dim=-1, keepdim=True).square_()
    rstd = rstd.div_(d // ngroups).add_(eps).rsqrt_()                   # (b, L, G, 1)
    n = (gg * rstd).view(b, L, d)
    m = n * sz if norm_before_gate else n                               # what meets the weight
    return F.linear(m, proj_weight * weight, proj_bias), (y, z, sz, n, rstd, m)


def _norm_project_backward(gout, saved, weight, ngroups, norm_before_gate, proj_weight,
                           has_proj_bias):
    """Gradients of _norm_project_forward → (dy, dz, d weight, d proj_weight, d proj_bias)."""
    y, z, sz, n, rstd, m = saved
    b, L, d = y.shape
    silu_grad = torch.ops.aten.silu_backward
    rows = gout.reshape(-1, gout.shape[-1])
    d_proj_bias = rows.sum(0) if has_proj_bias else None
    if weight is not None and ngroups == 1:
        gated, q = n, m                                                 # see the forward
        dq = (gout * rstd).reshape(rows.shape)
        folded = proj_weight * weight
        d_folded = torch.mm(dq.t(), gated.reshape(-1, d))
        d_gated = torch.mm(dq, folded).view(b, L, d)
        # rstd = (mean(s²) + eps)^(−1/2): d s = −rstd³/d · (d rstd) · s, d rstd = Σ gout·q
        coef = _rowdot(gout, q).unsqueeze(-1).mul_(rstd.pow(3)).div_(-d)
        if norm_before_gate:
            dy = torch.addcmul(d_gated * sz, y, coef)
        else:
            d_gated.addcmul_(gated, coef)
            dy = d_gated * sz
        return (dy, silu_grad(d_gated * y, z), (d_folded * proj_weight).sum(0),
                d_folded * weight, d_proj_bias)
    folded = proj_weight if weight is None else proj_weight * weight
    dm = torch.mm(rows, folded).view(b, L, d)
    d_folded = torch.mm(rows.t(), m.reshape(-1, d))
    if weight is None:                                                  # m = y·silu(z)
        return dm * sz, silu_grad(dm * y, z), None, d_folded, d_proj_bias
    d_weight, d_proj_weight = (d_folded * proj_weight).sum(0), d_folded * weight
    if norm_before_gate:                                                # m = n·silu(z)
        dz = silu_grad(dm * n, z)
        dm = dm * sz
    gs = d // ngroups
    dmg, ng = dm.view(b, L, ngroups, gs), n.view(b, L, ngroups, gs)
    mean = _rowdot(dmg, ng).unsqueeze(-1).div_(-gs)
    dg = torch.addcmul(dmg, ng, mean).mul_(rstd).view(b, L, d)          # rstd·(dn − n·⟨dn·n⟩)
    if norm_before_gate:
        return dg, dz, d_weight, d_proj_weight, d_proj_bias
    return dg * sz, silu_grad(dg * y, z), d_weight, d_proj_weight, d_proj_bias


class _Mamba2Fused(torch.autograd.Function):
    """The whole mixer, u → out_proj output, as one autograd node (the CPU analog of mamba_ssm's
    mamba_split_conv1d_scan_combined): in_proj, conv, SSD, gated norm, out_proj.

    in_proj runs as three GEMMs on row blocks of its weight (z, xBC, dt), so each part comes out
    contiguous rather than as a strided slice of one (b, L, d_in_proj) output, and the backward
    accumulates the input gradient with addmm instead of concatenating three gradients. For the
    gated-MLP variant (d_ssm < d_inner) the layer uses its plain-autograd path instead.
    """

    @staticmethod
    def forward(ctx, u, in_weight, in_bias, conv_weight, conv_bias, dt_bias, A_log, D,
                norm_weight, out_weight, out_bias, layer):
        # under autocast (bf16 training on a GPU), everything in here stays in float32 at least,
        # as upstream's kernels keep dt, decays, states and the norm
        with torch.autocast(u.device.type, enabled=False):
            out = _Mamba2Fused._forward(ctx, u, in_weight, in_bias, conv_weight, conv_bias,
                                        dt_bias, A_log, D, norm_weight, out_weight, out_bias,
                                        layer)
        return out

    @staticmethod
    def _forward(ctx, u, in_weight, in_bias, conv_weight, conv_bias, dt_bias, A_log, D,
                 norm_weight, out_weight, out_bias, layer):
        input_dtype = u.dtype
        dtype = _compute_dtype(u)
        u, in_weight, in_bias, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, out_weight, \
            out_bias = (None if t is None else t.to(dtype) for t in (
                u, in_weight, in_bias, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                out_weight, out_bias))
        b, L, _ = u.shape
        H, P, G, N = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
        d_ssm, conv_dim = layer.d_ssm, layer.conv_dim
        parts = (d_ssm, conv_dim, H)
        weights = torch.split(in_weight, parts)
        biases = torch.split(in_bias, parts) if in_bias is not None else (None,) * 3
        z, xBC_raw, dt_raw = (F.linear(u, w, bias) for w, bias in zip(weights, biases))
        dt_in = dt_raw + dt_bias
        weight = conv_weight.view(conv_dim, -1)
        xBC, v = _conv_silu_forward(xBC_raw, weight, conv_bias)
        x = xBC[..., :d_ssm].unflatten(-1, (H, P))
        B = xBC[..., d_ssm:d_ssm + G * N].unflatten(-1, (G, N))
        C = xBC[..., d_ssm + G * N:].unflatten(-1, (G, N))
        dt = _clamp_dt(F.softplus(dt_in), layer.dt_limit)
        A = -torch.exp(A_log.to(dt.dtype))
        y, _, ssd_saved, ctx.factored = _ssd_forward_any(x, dt, A, B, C, D, None,
                                                         min(layer.chunk_size, L))
        eps = layer.norm.eps if layer.rmsnorm else 0.0
        out, norm_saved = _norm_project_forward(y.reshape(b, L, d_ssm), z, norm_weight, eps, G,
                                                layer.norm_before_gate, out_weight, out_bias)
        ctx.save_for_backward(u, in_weight, xBC_raw, weight, conv_bias, dt_in, A, norm_weight,
                              out_weight, v, *ssd_saved, *norm_saved)
        ctx.has_biases = (in_bias is not None, out_bias is not None)
        ctx.n_ssd = len(ssd_saved)
        ctx.config = (d_ssm, conv_dim, H, P, G, N, layer.dt_limit, layer.norm_before_gate,
                      conv_weight.shape, input_dtype)
        return out.to(input_dtype)

    @staticmethod
    def backward(ctx, gout):
        (u, in_weight, xBC_raw, weight, conv_bias, dt_in, A, norm_weight, out_weight, v,
         *rest) = ctx.saved_tensors
        ssd_saved, norm_saved = rest[:ctx.n_ssd], rest[ctx.n_ssd:]
        (d_ssm, conv_dim, H, P, G, N, dt_limit, norm_before_gate, conv_weight_shape,
         input_dtype) = ctx.config
        has_in_bias, has_out_bias = ctx.has_biases
        b, L, d_model = u.shape
        gout = gout.to(u.dtype)
        dy, dz, d_norm_weight, d_out_weight, d_out_bias = _norm_project_backward(
            gout, norm_saved, norm_weight, G, norm_before_gate, out_weight, has_out_bias)
        d_xBC = gout.new_empty(b, L, conv_dim)
        _, ddt, dA, _, _, dD, _ = _ssd_backward_any(
            ctx.factored, ssd_saved, dy.view(b, L, H, P), None,
            dx_out=d_xBC[..., :d_ssm].view(b, L, H, P),
            dB_out=d_xBC[..., d_ssm:d_ssm + G * N].view(b, L, G, N),
            dC_out=d_xBC[..., d_ssm + G * N:].view(b, L, G, N))
        ddt_in = ddt.mul_(torch.sigmoid(dt_in))                            # softplus' = sigmoid
        if dt_limit != (0.0, float("inf")):
            dt = F.softplus(dt_in)
            ddt_in.mul_((dt >= dt_limit[0]) & (dt <= dt_limit[1]))
        d_xBC_raw, d_weight, d_bias = _conv_silu_backward(d_xBC, v, xBC_raw, weight,
                                                          conv_bias is not None)
        # in_proj: du = Σ_part d(part) @ W_part; dW_part = d(part)ᵀ @ u
        rows = u.reshape(-1, d_model)
        grads = [g.reshape(-1, g.shape[-1]) for g in (dz, d_xBC_raw, ddt_in)]
        weights = torch.split(in_weight, (d_ssm, conv_dim, H))
        du = torch.mm(grads[0], weights[0])
        d_in_weight = torch.empty_like(in_weight)
        offset = 0
        for g, w in zip(grads, weights):
            if g is not grads[0]:
                du.addmm_(g, w)
            torch.mm(g.t(), rows, out=d_in_weight[offset:offset + w.shape[0]])
            offset += w.shape[0]
        d_in_bias = torch.cat([g.sum(0) for g in grads]) if has_in_bias else None
        return (du.view(b, L, d_model).to(input_dtype), d_in_weight, d_in_bias,
                d_weight.view(conv_weight_shape), d_bias, ddt_in.sum((0, 1)), dA * A, dD,
                d_norm_weight, d_out_weight, d_out_bias, None)


def _clamp_dt(dt, dt_limit):
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _compute_dtype(t):
    """dt, A, decays and states in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


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

        state, optional: a (conv_state, ssm_state) pair to continue from (as ``allocate_state``,
        ``step`` or an earlier forward left it); return_state=True also returns the state after
        the last position, so a forward over history followed by ``step`` per new bar equals one
        forward over everything. Without either, the fused training path runs.
        """
        if state is not None or return_state:
            return self._forward_with_state(u, state, return_state)
        if self.d_inner != self.d_ssm:                   # gated-MLP variant: plain autograd
            return self._forward_with_state(u, None, False)
        return _Mamba2Fused.apply(u, self.in_proj.weight, self.in_proj.bias, self.conv1d.weight,
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
        dt = _clamp_dt(F.softplus((dt_raw + self.dt_bias).to(_compute_dtype(u))), self.dt_limit)
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

    def allocate_state(self, batch, device=None, dtype=None):
        """Zero (conv_state (b, conv_dim, W), ssm_state (b, H, P, N)): the state before bar 0.

        conv_state holds the raw (pre-conv) xBC of the last W bars, newest last, as mamba_ssm's.
        """
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return (torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
                torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=torch.promote_types(dtype, torch.float32)))

    def step(self, u, state):
        """One new bar: u (b, d_model), state (conv_state, ssm_state) → (y (b, d_model), state).

        O(1) in the history length. The returned state is new tensors; the one passed in is left
        as it was. dt is clamped to dt_limit and D indexed per channel when D_has_hdim, which
        upstream's step does not do (so compare with forward, not with upstream's step).
        """
        return mamba2_step(self, u, state)


class _GatedRMSNorm(nn.Module):
    """Parameter holder with mamba_ssm's names: ``norm.weight`` only (no bias)."""

    def __init__(self, d, group_size, norm_before_gate, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.norm_before_gate, self.eps = group_size, norm_before_gate, eps

    def forward(self, y, z):
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


def mamba2_step(mixer, u, state):
    """Recurrent step written against the attribute names ours and mamba_ssm's Mamba2 share, so a
    mamba_ssm mixer can be stepped with our state layout too. Kept to few tensor ops (slices, not
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
    dt = _clamp_dt(dt, mixer.dt_limit).view(b, G, H // G, 1, 1)
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
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)     # one op for step()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        input_dtype, d = x.dtype, x.shape[-1]
        x = x.to(_compute_dtype(x))                    # float32 at least, as under autocast
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps)
        rstd = rstd.rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        ctx.input_dtype = input_dtype
        return torch.mul(x, rstd).mul_(weight).to(input_dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        g = g.to(x.dtype)
        x_hat = x * rstd
        g_hat = g * weight
        d_weight = (g * x_hat).reshape(-1, d).sum(0)
        mean = _rowdot(g_hat, x_hat).unsqueeze(-1).div_(-d)
        dx = torch.addcmul(g_hat, x_hat, mean).mul_(rstd)
        return dx.to(ctx.input_dtype), d_weight.to(weight.dtype), None


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
        h = self.embed(x)
        state = []
        for block in self.layers:
            if isinstance(block.mixer, Mamba2):
                y, layer_state = block.mixer(block.norm(h), return_state=True)
            else:                                              # a kernel mixer: step through
                layer_state = _allocate(block.mixer, x.shape[0], None, None)
                ys = []
                for t in range(h.shape[1]):
                    y_t, layer_state = mamba2_step(block.mixer, block.norm(h[:, t]), layer_state)
                    ys.append(y_t)
                y = torch.stack(ys, 1)
            h = h + y
            state.append(layer_state)
        if strike_distance is not None and strike_distance.dim() == 3:
            strike_distance = strike_distance[:, -1]
        return self._heads(self.norm_f(h[:, -1]), strike_distance), state

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
