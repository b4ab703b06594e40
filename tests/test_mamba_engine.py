"""Tests for intelligence.mamba_engine: the chunked SSD scan and the Mamba-2 layer against a float64
sequential recurrence written here (outputs, final states, gradients), step() against forward,
state_dict names/shapes against shared/reference/mamba2.md §2, the heads, loss and μ_Mamba, and
(when a CUDA-recorded fixture exists) our CPU layer against mamba_ssm's GPU output."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import intelligence.mamba_kernels as kernels
from intelligence.mamba_engine import (
    CPU_CHUNK_SIZE,
    HEADS,
    DeepMamba,
    Mamba2,
    loss,
    make_mixer,
    mamba2_step,
    membership_tensor,
    neural_membership,
    ssd_chunked,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mamba2_gpu_parity.npz"


@pytest.fixture(params=["auto", "masked"])
def form(request, monkeypatch):
    """The SSD's two forms: "auto" takes the factored one whenever the chunk decays allow it
    (the usual case); "masked" forces the explicit-decay fallback."""
    if request.param == "masked":
        monkeypatch.setattr(kernels, "FACTORED_EXPONENT_BOUND",
                            {torch.float32: 0.0, torch.float64: 0.0})
    return request.param


def rel(a, b):
    """Relative L2 error of a against the reference b."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------
# The oracle: h_t = exp(dt·A)·h_{t−1} + dt·x ⊗ B, y = h·C + D·x, one step at a time, float64

def recurrence(x, dt, A, B, C, D, initial_state=None):
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    B_heads = B.repeat_interleave(H // G, dim=2)
    C_heads = C.repeat_interleave(H // G, dim=2)
    h = x.new_zeros(b, H, P, N) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B_heads[:, t, :, None, :]
        ys.append((h @ C_heads[:, t, :, :, None]).squeeze(-1) + x[:, t] * D.view(H, -1))
    return torch.stack(ys, dim=1), h


def ssd_inputs(b, L, H, P, G, N, D_has_hdim, seed):
    """Realistic magnitudes: dt = softplus(·) around the init range, A from (1, 16)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x = randn(b, L, H, P)
    dt = F.softplus(randn(b, L, H) - 3.0)
    A = -torch.empty(H, dtype=torch.float64).uniform_(1.0, 16.0, generator=g)
    B, C = randn(b, L, G, N), randn(b, L, G, N)
    D = randn(H * P if D_has_hdim else H)
    h0 = randn(b, H, P, N)
    return [x, dt, A, B, C, D, h0]


SSD_CASES = [  # (L, Q, G, D_has_hdim): multiple / not multiple of Q, shorter than Q, G 1 and 2
    (128, 32, 1, False),
    (100, 32, 2, True),
    (70, 16, 2, False),
    (7, 32, 1, True),
    (1, 32, 1, False),
]


@pytest.mark.parametrize("L, Q, G, D_has_hdim", SSD_CASES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ssd_matches_the_sequential_recurrence(L, Q, G, D_has_hdim, dtype, tolerance, form):
    inputs = ssd_inputs(2, L, 4, 8, G, 16, D_has_hdim, seed=L)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y_ref, h_ref = recurrence(*leaves)
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves)

    ours = [t.to(dtype).requires_grad_() for t in inputs]
    x, dt, A, B, C, D, h0 = ours
    y, h = ssd_chunked(x, dt, A, B, C, chunk_size=Q, D=D, initial_state=h0,
                       return_final_state=True)
    assert y.dtype == dtype and y.shape == (2, L, 4, 8)
    assert rel(y, y_ref) < tolerance
    assert rel(h, h_ref) < tolerance
    grads = torch.autograd.grad((y * gy.to(dtype)).sum() + (h * gh.to(dtype)).sum(), ours)
    for name, grad, grad_ref in zip(["x", "dt", "A", "B", "C", "D", "h0"], grads, grads_ref):
        assert rel(grad, grad_ref) < tolerance, name


def test_ssd_chunk_size_changes_nothing_but_rounding(form):
    x, dt, A, B, C, D, _ = ssd_inputs(2, 96, 4, 8, 1, 16, False, seed=3)
    outputs = [ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D) for q in (8, 32, 64, 96, 256)]
    for y in outputs[1:]:
        assert rel(y, outputs[0]) < 1e-13


def test_ssd_defaults_zero_state_and_no_skip():
    x, dt, A, B, C, _, _ = ssd_inputs(1, 20, 2, 4, 1, 8, False, seed=5)
    y_ref, _ = recurrence(x, dt, A, B, C, torch.zeros(2, dtype=torch.float64))
    assert rel(ssd_chunked(x, dt, A, B, C, chunk_size=8), y_ref) < 1e-12


def test_factored_form_is_taken_when_the_decay_allows_and_shorter_chunks_before_falling_back():
    x, dt, _, B, C, D, h0 = [t.float() for t in ssd_inputs(2, 64, 4, 8, 1, 16, False, seed=8)]
    A = torch.tensor([-1.0, -3.0, -6.0, -9.0])
    gentle = torch.full_like(dt, 0.05)               # 32-bar chunks decay at most e^−14.4
    assert kernels._ssd_forward_any(x, gentle, A, B, C, D, h0, 32)[3]
    steep = torch.full_like(dt, 0.4)                 # e^−115 per 32 bars, e^−58 per 16: 16-bar chunks
    y, _, _, factored = kernels._ssd_forward_any(x, steep, A, B, C, D, h0, 32)
    assert factored
    y_ref, _ = recurrence(*(t.double() for t in (x, steep, A, B, C, D, h0)))
    assert rel(y, y_ref) < 1e-5
    cliff = torch.full_like(dt, 1.0)                 # e^−144 per 16 bars: the masked form
    assert not kernels._ssd_forward_any(x, cliff, A, B, C, D, h0, 32)[3]
    # chunks longer than 32 bars go to the masked form in float32 however gentle the decay (its
    # gradients stay precise there, the factored form's do not), not in float64
    assert not kernels._ssd_forward_any(x, gentle, A, B, C, D, h0, 64)[3]
    as64 = [t.double() for t in (x, gentle, A, B, C, D, h0)]
    assert kernels._ssd_forward_any(*as64, 64)[3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_gradients_at_long_chunks_match_the_float64_reference(seed):
    """Issue #14: at a 256-bar chunk the factored form's dt_bias gradient was 1.1e-4 off in
    float32. A DeepMamba-sized layer at init, 256 bars: every gradient within 1e-5 at chunk sizes
    64, 128 and 256 (and the CPU default)."""
    torch.manual_seed(seed)
    layer = Mamba2(64, d_state=32, headdim=16)
    u = torch.randn(2, 256, 64, requires_grad=True)
    g = torch.randn(2, 256, 64)
    layer64 = Mamba2(64, d_state=32, headdim=16).double()
    layer64.load_state_dict(layer.state_dict())
    reference = _reference_grads(layer64, u.detach().double().requires_grad_(), g.double())
    names = ["u"] + [n for n, _ in layer.named_parameters()]
    for chunk_size in (CPU_CHUNK_SIZE, 64, 128, 256):
        layer.chunk_size = chunk_size
        ours = torch.autograd.grad((layer(u) * g).sum(), [u, *layer.parameters()])
        for name, grad, grad_ref in zip(names, ours, reference):
            assert rel(grad, grad_ref) < 1e-5, (chunk_size, name)


def test_ssd_strong_decay_gives_finite_gradients():
    """dt·A of −50 per step: masked decay entries must never turn into 0·inf in a backward."""
    x, dt, A, B, C, D, _ = [t.float() for t in ssd_inputs(1, 40, 2, 4, 1, 8, False, seed=6)]
    dt = torch.full_like(dt, 5.0).requires_grad_()
    A = torch.full_like(A, -10.0).requires_grad_()
    y = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D)
    grads = torch.autograd.grad(y.square().sum(), [dt, A])
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# The whole layer against a float64 reference written from mamba2.md §3

def reference_layer(layer, u, params=None):
    """§3 step by step from the layer's parameters (or `params`, live float64 tensors to take
    gradients through), in float64, with the recurrence."""
    p = params or {k: v.detach().double() for k, v in layer.state_dict().items()}
    u = u.double()
    H, P, G, N = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    d_ssm, conv_dim, W = layer.d_ssm, layer.conv_dim, layer.d_conv
    b, L, _ = u.shape
    zxbcdt = u @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * G * N - H) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, conv_dim, H], dim=-1)
    weight = p["conv1d.weight"][:, 0, :]                        # (conv_dim, W)
    conv = torch.zeros_like(xBC) + p.get("conv1d.bias", 0.0)
    for t in range(L):
        for k in range(W):
            source = t - W + 1 + k
            if source >= 0:
                conv[:, t] += weight[:, k] * xBC[:, source]
    xBC = F.silu(conv)
    x, B, C = torch.split(xBC, [d_ssm, G * N, G * N], dim=-1)
    dt = F.softplus(dt + p["dt_bias"]).clamp(*layer.dt_limit)
    A = -torch.exp(p["A_log"])
    y, _ = recurrence(x.reshape(b, L, H, P), dt, A, B.reshape(b, L, G, N),
                      C.reshape(b, L, G, N), p["D"])
    y = y.reshape(b, L, d_ssm)

    def group_rms(v):
        v = v.reshape(b, L, G, d_ssm // G)
        return (v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-5)).reshape(b, L, d_ssm)

    if not layer.rmsnorm:
        y = y * F.silu(z)
    elif layer.norm_before_gate:
        y = p["norm.weight"] * group_rms(y) * F.silu(z)
    else:
        y = p["norm.weight"] * group_rms(y * F.silu(z))
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)


LAYER_CASES = [
    {},
    {"ngroups": 2},
    {"norm_before_gate": True, "ngroups": 2},
    {"D_has_hdim": True},
    {"rmsnorm": False},
    {"d_ssm": 32},
    {"dt_limit": (0.01, 0.05), "bias": True, "conv_bias": False},
]


def small_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = Mamba2(32, d_state=8, headdim=8, chunk_size=16, **kwargs)
    with torch.no_grad():                   # make D, norm and biases non-trivial
        layer.D.normal_()
        for name, param in layer.named_parameters():
            if name.endswith("bias") and name != "dt_bias" or name == "norm.weight":
                param.normal_(1.0 if name == "norm.weight" else 0.0, 0.3)
    return layer


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=lambda k: ",".join(k) or "defaults")
@pytest.mark.parametrize("L", [40, 3])
def test_layer_matches_the_float64_reference(kwargs, L, form):
    layer = small_layer(**kwargs)
    u = torch.randn(2, L, 32)
    expected = reference_layer(layer, u)
    assert rel(layer(u), expected) < 1e-5                        # fused training path
    assert rel(layer(u, return_state=True)[0], expected) < 1e-5  # plain-autograd path
    layer64 = small_layer(**kwargs).double()
    assert rel(layer64(u.double()), expected) < 1e-12


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=lambda k: ",".join(k) or "defaults")
def test_layer_gradients_match_the_float64_reference(kwargs, form):
    layer = small_layer(**kwargs)
    u = torch.randn(2, 21, 32, requires_grad=True)
    g = torch.randn(2, 21, 32)
    ours = torch.autograd.grad((layer(u) * g).sum(), [u, *layer.parameters()])

    layer64 = small_layer(**kwargs).double()
    u64 = u.detach().double().requires_grad_()
    reference = _reference_grads(layer64, u64, g.double())
    for name, grad, grad_ref in zip(["u"] + [n for n, _ in layer.named_parameters()], ours,
                                    reference):
        assert rel(grad, grad_ref) < 1e-5, name
    fused64 = torch.autograd.grad((layer64(u64) * g.double()).sum(), [u64, *layer64.parameters()])
    for grad, grad_ref in zip(fused64, reference):
        assert rel(grad, grad_ref) < 1e-10


def _reference_grads(layer64, u64, g):
    """Gradients of reference_layer w.r.t. u and every parameter (autograd through the loop)."""
    params = dict(layer64.named_parameters())
    out = reference_layer(layer64, u64, params)
    return torch.autograd.grad((out * g).sum(), [u64, *params.values()])


# ----------------------------------------------------------------------------------------------
# step() against forward

@pytest.mark.parametrize("kwargs", [{}, {"ngroups": 2, "D_has_hdim": True},
                                    {"dt_limit": (0.02, 0.06), "norm_before_gate": True},
                                    {"d_ssm": 32}])
def test_layer_step_equals_forward_at_every_position(kwargs):
    layer = small_layer(**kwargs)
    u = torch.randn(3, 37, 32)
    with torch.no_grad():
        full = layer(u)
        state = layer.allocate_state(3)
        stepped = []
        for t in range(u.shape[1]):
            y, state = mamba2_step(layer, u[:, t], state)
            stepped.append(y)
        assert rel(torch.stack(stepped, 1), full) < 1e-5
        # the forward's final state is the step loop's
        _, final = layer(u, return_state=True)
        assert rel(final[0], state[0]) < 1e-6 and rel(final[1], state[1]) < 1e-5


def test_layer_prefill_then_step_and_resume_on_a_warm_state():
    layer = small_layer(ngroups=2)
    u = torch.randn(2, 50, 32)
    with torch.no_grad():
        full = layer(u)
        _, state = layer(u[:, :30], return_state=True)      # prefill 30 bars (L not multiple)
        tail = []
        for t in range(30, 40):
            y, state = mamba2_step(layer, u[:, t], state)
            tail.append(y)
        assert rel(torch.stack(tail, 1), full[:, 30:40]) < 1e-5
        resumed = layer(u[:, 40:], state=state)               # a multi-bar forward on the cache
        assert rel(resumed, full[:, 40:]) < 1e-5
        _, short = layer(u[:, :2], return_state=True)          # L < d_conv
        y, _ = mamba2_step(layer, u[:, 2], short)
        assert rel(y, full[:, 2]) < 1e-5


def test_mamba2_step_leaves_the_given_state_untouched():
    layer = small_layer()
    state = layer.allocate_state(1)
    before = [s.clone() for s in state]
    with torch.no_grad():
        mamba2_step(layer, torch.randn(1, 32), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state))


@pytest.mark.parametrize("kwargs", [{}, {"ngroups": 2, "D_has_hdim": True}])
def test_a_caller_written_for_mamba_ssm_steps_our_layer(kwargs):
    """mamba_ssm.Mamba2's decoding API: allocate_inference_cache, then step(hidden_states,
    conv_state, ssm_state) per token, the states updated in place (the caller keeps using the
    tensors it allocated)."""
    layer = small_layer(**kwargs)
    u = torch.randn(3, 37, 32)
    with torch.no_grad():
        full = layer(u)
        conv_state, ssm_state = layer.allocate_inference_cache(3, max_seqlen=37)
        assert conv_state.shape == (3, layer.conv_dim, layer.d_conv)
        assert ssm_state.shape == (3, layer.nheads, layer.headdim, layer.d_state)
        assert conv_state.stride(1) == 1                    # upstream's transposed (b, W, C) buffer
        assert not conv_state.any() and not ssm_state.any()
        pointers = conv_state.data_ptr(), ssm_state.data_ptr()
        outputs = []
        for t in range(u.shape[1]):
            out, conv_out, ssm_out = layer.step(u[:, t:t + 1], conv_state, ssm_state)
            assert out.shape == (3, 1, 32)
            assert conv_out is conv_state and ssm_out is ssm_state
            outputs.append(out)
        assert (conv_state.data_ptr(), ssm_state.data_ptr()) == pointers
        assert rel(torch.cat(outputs, 1), full) < 1e-5
        _, (conv_final, ssm_final) = layer(u, return_state=True)
        assert rel(conv_state, conv_final) < 1e-6 and rel(ssm_state, ssm_final) < 1e-5
        with pytest.raises(ValueError):
            layer.step(u[:, :2], conv_state, ssm_state)


def test_inference_cache_dtypes_are_upstream_s_and_the_recurrence_stays_float32():
    layer = small_layer().to(torch.bfloat16)
    conv_state, ssm_state = layer.allocate_inference_cache(2, 10)
    assert conv_state.dtype == ssm_state.dtype == torch.bfloat16       # the weights' dtype
    as32 = layer.allocate_inference_cache(2, 10, dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in as32)
    u = torch.randn(2, 12, 32)
    with torch.no_grad():
        expected = small_layer()(u)                                  # float32 weights, same seed
        for t in range(12):
            out, _, _ = layer.step(u[:, t:t + 1].bfloat16(), *as32)
        assert rel(out[:, 0], expected[:, -1]) < 3e-2                  # bf16 weights, not state


def test_deepmamba_step_and_prefill_equal_forward():
    torch.manual_seed(0)
    model = DeepMamba(n_features=5, d_model=32, n_layers=2, d_state=8, headdim=8)
    x = torch.randn(2, 45, 5)
    strikes = torch.rand(2, 2) * 0.05
    with torch.no_grad():
        full = model(x, strike_distance=strikes)
        state = model.allocate_state(2)
        per_bar = []
        for t in range(x.shape[1]):
            out, state = model.step(x[:, t], state, strike_distance=strikes)
            per_bar.append(out)
        for name in full:
            assert rel(torch.stack([o[name] for o in per_bar], 1), full[name]) < 1e-5, name
        last, state = model.prefill(x[:, :44], strike_distance=strikes)
        for name in full:
            assert rel(last[name], full[name][:, 43]) < 1e-5, name
        out, _ = model.step(x[:, 44], state, strike_distance=strikes)
        for name in full:
            assert rel(out[name], full[name][:, 44]) < 1e-5, name
        last_only = model(x, strike_distance=strikes, last_only=True)
        for name in full:
            assert rel(last_only[name], full[name][:, -1]) < 1e-6, name


# ----------------------------------------------------------------------------------------------
# Parameters: names, shapes, init (mamba2.md §1–2)

def expected_state_dict_shapes(d_model, d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None,
                               ngroups=1, D_has_hdim=False, rmsnorm=True, bias=False,
                               conv_bias=True):
    d_inner = expand * d_model
    d_ssm = d_inner if d_ssm is None else d_ssm
    H = d_ssm // headdim
    conv_dim = d_ssm + 2 * ngroups * d_state
    d_in_proj = 2 * d_inner + 2 * ngroups * d_state + H
    shapes = {"in_proj.weight": (d_in_proj, d_model), "conv1d.weight": (conv_dim, 1, d_conv),
              "dt_bias": (H,), "A_log": (H,), "D": (d_ssm,) if D_has_hdim else (H,),
              "out_proj.weight": (d_model, d_inner)}
    if bias:
        shapes["in_proj.bias"], shapes["out_proj.bias"] = (d_in_proj,), (d_model,)
    if conv_bias:
        shapes["conv1d.bias"] = (conv_dim,)
    if rmsnorm:
        shapes["norm.weight"] = (d_ssm,)
    return shapes


@pytest.mark.parametrize("kwargs", [
    {"d_model": 768},                                              # reference example: 3352 rows
    {"d_model": 64, "d_state": 32, "headdim": 32},                 # DeepMamba's default layer
    {"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 2, "D_has_hdim": True, "bias": True,
     "conv_bias": False, "rmsnorm": False, "d_ssm": 96, "d_conv": 3, "expand": 2},
])
def test_state_dict_names_and_shapes_are_mamba_ssm_s(kwargs):
    layer = Mamba2(**kwargs)
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == expected_state_dict_shapes(**kwargs)
    assert not list(layer.buffers())
    if kwargs == {"d_model": 768}:
        assert got["in_proj.weight"] == (3352, 768) and got["conv1d.weight"][0] == 1792


def test_load_state_dict_round_trip_both_ways():
    kwargs = {"d_model": 64, "d_state": 16, "headdim": 16, "ngroups": 2}
    source = Mamba2(**kwargs)
    target = Mamba2(**kwargs)
    target.load_state_dict(source.state_dict(), strict=True)
    u = torch.randn(2, 9, 64)
    assert torch.equal(source(u), target(u))
    # a checkpoint laid out as the reference table (as mamba_ssm writes it) loads strictly
    foreign = {k: torch.randn(shape) for k, shape in expected_state_dict_shapes(**kwargs).items()}
    target.load_state_dict(foreign, strict=True)
    back = target.state_dict()
    assert back.keys() == foreign.keys()
    assert all(torch.equal(back[k], foreign[k]) for k in foreign)


def test_init_follows_upstream():
    torch.manual_seed(1)
    layer = Mamba2(64, d_state=16, headdim=16, dt_min=0.002, dt_max=0.05, A_init_range=(2, 8))
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 0.002 * 0.999) & (dt <= 0.05 * 1.001)).all()
    A = torch.exp(layer.A_log)
    assert ((A >= 2) & (A <= 8)).all()
    assert torch.equal(layer.D, torch.ones(8))
    assert all(getattr(p, "_no_weight_decay", False) for p in (layer.dt_bias, layer.A_log, layer.D))
    assert torch.equal(layer.norm.weight, torch.ones(64 * 2))
    with pytest.raises(AssertionError):
        Mamba2(16)                                  # d_ssm 32 not a multiple of headdim 64


def test_make_mixer_falls_back_to_ours_without_cuda_or_mamba_ssm():
    mixer = make_mixer(32, d_state=8, headdim=8)
    if not torch.cuda.is_available():
        assert isinstance(mixer, Mamba2)
    assert isinstance(make_mixer(32, prefer_kernels=False, d_state=8, headdim=8), Mamba2)


def test_deepmamba_defaults_and_layer_names():
    model = DeepMamba()
    assert (model.d_model, model.n_layers, model.n_features) == (64, 4, 8)
    mixer = model.layers[0].mixer
    assert (mixer.d_state, mixer.d_conv, mixer.expand, mixer.headdim) == (32, 4, 2, 32)
    assert mixer.chunk_size == CPU_CHUNK_SIZE
    keys = model.state_dict().keys()
    assert "layers.3.mixer.in_proj.weight" in keys and "layers.0.norm.weight" in keys
    assert torch.get_num_threads() >= 1                     # untouched by the module


# ----------------------------------------------------------------------------------------------
# Heads, loss, membership

def small_model(seed=0):
    torch.manual_seed(seed)
    return DeepMamba(n_features=6, d_model=32, n_layers=2, d_state=8, headdim=8)


def targets_like(b, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = {name: torch.randn(b, L, generator=g).abs()
               for name in ("realized_vol", "max_up", "max_down")}
    targets["next_return"] = torch.randn(b, L, generator=g)
    targets["pop"] = (torch.rand(b, L, generator=g) > 0.3).float()
    return targets


def test_heads_spec_has_the_six_heads_with_losses_and_weights():
    names = [h.name for h in HEADS]
    assert names == ["next_return", "realized_vol", "max_up", "max_down", "pop", "confidence"]
    assert all(h.loss in ("huber", "bce") and h.weight > 0 for h in HEADS)
    assert [h.name for h in HEADS if h.loss == "bce"] == ["pop"]


def test_forward_outputs_shapes_and_ranges():
    model = small_model()
    out = model(torch.randn(3, 17, 6))
    expected = {"next_return", "realized_vol", "max_up", "max_down", "pop_logit", "pop",
                "error_scale", "confidence"}
    assert set(out) == expected
    assert all(v.shape == (3, 17) and torch.isfinite(v).all() for v in out.values())
    assert ((out["pop"] > 0) & (out["pop"] < 1)).all()
    assert ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()
    assert all((out[k] >= 0).all() for k in ("realized_vol", "max_up", "max_down", "error_scale"))
    last = model(torch.randn(3, 17, 6), last_only=True)
    assert all(v.shape == (3,) for v in last.values())


def test_pop_reads_the_strike_distance():
    model = small_model()
    x = torch.randn(2, 10, 6)
    near = model(x, strike_distance=torch.full((2, 2), 0.001))["pop"]
    far = model(x, strike_distance=torch.full((2, 10, 2), 3.0))["pop"]
    assert not torch.allclose(near, far)


def test_loss_reports_every_head_and_trains():
    model = small_model()
    x = torch.randn(4, 24, 6)
    targets = targets_like(4, 24)
    total, per_head = loss(model(x), targets)
    assert set(per_head) == {h.name for h in HEADS}
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in per_head.values())
    weighted = sum(h.weight * per_head[h.name] for h in HEADS)
    assert torch.allclose(total, weighted)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    optimizer = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    x, targets = x[:, :12], {k: v[:, :12] for k, v in targets.items()}
    first = float(loss(model(x), targets)[0].detach())
    for _ in range(15):
        total, _ = loss(model(x), targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert float(total.detach()) < first


def test_loss_masks_missing_targets_and_takes_weights():
    model = small_model()
    out = model(torch.randn(2, 12, 6))
    targets = targets_like(2, 12)
    masked = {k: v.clone() for k, v in targets.items()}
    for v in masked.values():
        v[:, -3:] = float("nan")                             # the horizon runs out at the end
    total, per_head = loss(out, masked)
    assert torch.isfinite(total)
    cut = {k: v[:, :-3] for k, v in out.items()}
    _, per_head_cut = loss(cut, {k: v[:, :-3] for k, v in targets.items()})
    assert all(torch.allclose(per_head[k], per_head_cut[k]) for k in per_head)
    only_pop, heads = loss(out, {"pop": targets["pop"]}, weights={"pop": 2.0})
    assert set(heads) == {"pop"} and torch.allclose(only_pop, 2.0 * heads["pop"])
    with pytest.raises(ValueError):
        loss(out, {})


def test_confidence_is_trained_on_the_return_error_only():
    model = small_model()
    out = model(torch.randn(2, 12, 6))
    _, per_head = loss(out, targets_like(2, 12))
    grads = torch.autograd.grad(per_head["confidence"], out["next_return"], allow_unused=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0


def test_neural_membership_formula():
    def outputs(pop, confidence, up=0.0, down=0.0):
        return {"pop": torch.tensor([pop]), "confidence": torch.tensor([confidence]),
                "max_up": torch.tensor([up]), "max_down": torch.tensor([down])}
    assert neural_membership(outputs(0.9, 0.0)) == pytest.approx(0.5)      # no confidence
    assert neural_membership(outputs(0.5, 1.0)) == pytest.approx(0.5)      # no view
    assert neural_membership(outputs(0.9, 1.0)) == pytest.approx(0.9)
    assert neural_membership(outputs(0.9, 0.5)) == pytest.approx(0.7)
    assert neural_membership(outputs(0.1, 1.0)) == pytest.approx(0.1)
    calm = neural_membership(outputs(0.8, 1.0, 0.01, 0.01), range_scale=1.0)
    wild = neural_membership(outputs(0.8, 1.0, 5.0, 5.0), range_scale=1.0)
    assert 0.0 <= wild < calm <= 1.0
    with pytest.raises(ValueError):
        neural_membership({k: v.repeat(2) for k, v in outputs(0.8, 1.0).items()})


def test_neural_membership_of_a_model_step_is_in_the_unit_interval():
    model = small_model()
    with torch.inference_mode():
        out, _ = model.step(torch.randn(1, 6), model.allocate_state(1))
        mu = neural_membership(out)
        batch = membership_tensor(model(torch.randn(4, 9, 6)), range_scale=0.5)
    assert 0.0 <= mu <= 1.0
    assert batch.shape == (4, 9) and ((batch >= 0) & (batch <= 1)).all()


def test_bf16_autocast_trains():
    model = small_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 20, 6))
    total, _ = loss({k: v.float() for k, v in out.items()}, targets_like(2, 20))
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# mamba_ssm on a GPU (fixture recorded by scripts/record_mamba_gpu_fixture.py)

@pytest.mark.skipif(not FIXTURE.exists(),
                    reason="no CUDA fixture recorded: run scripts/record_mamba_gpu_fixture.py on a "
                           "CUDA machine with mamba_ssm to create tests/fixtures/"
                           "mamba2_gpu_parity.npz (this machine has no GPU)")
def test_cpu_layer_matches_recorded_mamba_ssm_gpu_output():
    data = np.load(FIXTURE, allow_pickle=False)
    cases = json.loads(str(data["cases"]))
    assert cases
    for case in cases:
        prefix = case["name"]
        layer = Mamba2(**case["config"])
        state = {key[len(prefix) + 7:]: torch.from_numpy(data[key])
                 for key in data.files if key.startswith(prefix + "/param/")}
        layer.load_state_dict(state, strict=True)
        u = torch.from_numpy(data[prefix + "/input"])
        expected = torch.from_numpy(data[prefix + "/output"])
        with torch.no_grad():
            got = layer(u)
        scale = expected.abs().max()
        assert float((got - expected).abs().max() / scale) < 1e-3, prefix
        assert not math.isnan(float(got.sum()))
