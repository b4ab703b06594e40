"""The CPU kernels behind intelligence.mamba_engine's Mamba-2 layer: forward/backward pairs
written for CPU BLAS, each an autograd Function or a helper of one.

Owns
- ``ssd_chunked``: the Mamba-2 selective scan, chunked (quadratic inside chunks, recurrent
  between them), differentiable; two forms, chosen per call by ``_ssd_forward_any``: factored
  (group-wide GEMMs, the fast one) and masked (explicit per-head decay blocks, the fallback where
  the factored form would lose precision: chunks that decay too much, or float32 chunks longer
  than FACTORED_MAX_CHUNK).
- ``Mamba2Fused``: the whole mixer (in_proj, causal conv + SiLU, SSD, gated RMSNorm, out_proj) as
  one autograd node, the CPU analog of mamba_ssm's mamba_split_conv1d_scan_combined.
- ``RMSNormFunction``: x / rms(x) · weight with its backward, for DeepMamba's block norms.

Shapes: b batch, L bars, H heads, P headdim, N d_state, G ngroups, W d_conv, Q chunk_size.
Why hand-written backwards: on a CPU core a training step of this size is bound by memory passes
over (b, L, ·) tensors, not by FLOPs. Autograd's generic backward of the SSD, the depthwise conv and
the gated norm made about twice the passes (and mkldnn's depthwise weight gradient is slow); the
SSD's factored form (see _ssd_forward_factored) turns its per-head (Q × Q) decay blocks into
group-wide GEMMs; in_proj as three row-block GEMMs gives contiguous parts instead of strided
slices. Together ~2× the throughput of a plain-autograd port (benchmarks/bench_mamba.py).
This module holds no parameters: Mamba2Fused reads the layer's configuration from the module
it is given, and imports nothing from the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
# Longest chunk the factored form takes. Its gradient on a (hence dt, dt_bias, A_log) is a total
# minus partial sums inside each chunk, whose rounding grows with the chunk's length and decay:
# measured against a float64 recurrence (layer at init, L = 256, float32), 32-bar chunks stay
# within 3e-6 relative, while 128- and 256-bar chunks reached 1–2e-5 (1e-4 before the exponents
# were taken in float64); the masked form sums each segment directly and stays near 5e-7 at any
# length. Float64 has ~1e9 times the margin.
FACTORED_MAX_CHUNK = {torch.float32: 32, torch.float64: 1 << 30}
# Shortest chunk the factored form is tried at: at 8 bars its per-chunk loop and small GEMMs make
# it ~2× slower than the masked form at 32 (benchmarks/bench_mamba.py's layer size).
FACTORED_MIN_CHUNK = 16


def _ssd_forward_any(x, dt, A, B, C, D, initial_state, Q):
    """The factored form when chunk length and decays allow it, else the masked one →
    (y, final state, kept tensors, factored?).

    The factored form is taken at chunk length q = Q, Q/2, … (not below FACTORED_MIN_CHUNK; the
    chunk length never changes the result beyond rounding) for the first q that is at most
    FACTORED_MAX_CHUNK and whose chunks' total log-decays all stay within
    2·FACTORED_EXPONENT_BOUND; otherwise the masked form runs at Q. So a float32 call with
    Q > 32 (a GPU-sized chunk) gets the masked form, which keeps its gradients precise, and the
    CPU default Q = 32 the factored one unless some head decays by more than e^−80 in 16 bars.
    """
    b, L, H, _ = x.shape
    dtype = compute_dtype(x)
    if Q > FACTORED_MAX_CHUNK.get(dtype, 32):
        return (*_ssd_forward_masked(x, dt, A, B, C, D, initial_state, Q), False)
    a = (dt * A).to(dtype)
    limit = -2.0 * FACTORED_EXPONENT_BOUND.get(dtype, 40.0)
    q = Q
    while True:
        totals = F.pad(a, (0, 0, 0, (-L) % q)).view(b, -1, q, H).sum(2)
        if float(totals.min()) >= limit:
            return (*_ssd_forward_factored(x, dt, A, B, C, D, initial_state, q, a=a), True)
        if q // 2 < FACTORED_MIN_CHUNK:
            return (*_ssd_forward_masked(x, dt, A, B, C, D, initial_state, Q), False)
        q //= 2


def _ssd_backward_any(factored, saved, gy, g_final, dx_out=None, dB_out=None, dC_out=None):
    backward = _ssd_backward_factored if factored else _ssd_backward_masked
    return backward(saved, gy, g_final, dx_out, dB_out, dC_out)


def _ssd_forward_factored(x, dt, A, B, C, D, initial_state, Q, a=None):
    """Chunked SSD in factored form → (y, final state, tensors kept for backward).

    Inside a chunk (T = b·c chunks of Q bars): cum = running sum of a = dt·A, tot = cum_{Q−1}
    (the chunk's total log-decay), u = cum − tot/2, so the decay between bars j ≤ l factors as
    exp(cum_l − cum_j) = exp(u_l)·exp(−u_j) with |u| ≤ |tot|/2; _ssd_forward_any only comes here
    when that stays within FACTORED_EXPONENT_BOUND (no overflow) and Q within FACTORED_MAX_CHUNK
    (the backward's sums over a chunk stay precise). With Xs = x·dt·exp(−u) and E = exp(tot/2) per chunk and head:
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
    dtype = compute_dtype(x)

    a = (dt * A).to(dtype) if a is None else a
    dtp = dt.to(dtype)
    if pad:
        a, dtp, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (a, dtp, B, C))
    # The decays are products exp(u_l)·exp(−u_j) of factors up to e^±40: u rounded to float32
    # would put |u|·eps (~5e-6) of relative error into every decay, and into every gradient
    # through them; on (T, Q, H) the float64 cumsum and exponentials cost next to nothing.
    cum = a.view(T, Q, H).to(torch.float64).cumsum(1)                  # (T, Q, H)
    u = cum - 0.5 * cum[:, Q - 1:]
    exp_u = torch.exp(u).to(dtype)
    exp_minus_u = torch.exp(-u).to(dtype)
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


class Mamba2Fused(torch.autograd.Function):
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
            out = Mamba2Fused._forward(ctx, u, in_weight, in_bias, conv_weight, conv_bias,
                                       dt_bias, A_log, D, norm_weight, out_weight, out_bias,
                                       layer)
        return out

    @staticmethod
    def _forward(ctx, u, in_weight, in_bias, conv_weight, conv_bias, dt_bias, A_log, D,
                 norm_weight, out_weight, out_bias, layer):
        input_dtype = u.dtype
        dtype = compute_dtype(u)
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
        dt = clamp_dt(F.softplus(dt_in), layer.dt_limit)
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


def clamp_dt(dt, dt_limit):
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def compute_dtype(t):
    """dt, A, decays and states in float32 at least (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# RMSNorm (DeepMamba's block and final norms)

class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) · weight over the last dim, as F.rms_norm, with a hand-written backward
    (autograd's decomposition made ~2× the memory passes)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        input_dtype, d = x.dtype, x.shape[-1]
        x = x.to(compute_dtype(x))                    # float32 at least, as under autocast
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
