"""Stateful DeepMamba inference and training (issue #14, item 1): one causal pass over a whole
period equals prefill + step() bar by bar and chunked passes of any chunk size; the training
streams are contiguous and the carried state is the one the next segment starts from; a
checkpoint says which inference it was trained for (old windowed checkpoints still run the
windowed way; an unknown method is refused naming the file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mamba_test_bars import make_bars

from intelligence import mamba_data as md
from intelligence import train_mamba as tm
from intelligence.mamba_engine import DeepMamba, membership_tensor
from intelligence.mamba_inference import ModelFileError, load_forecaster, run_stateful


def small_model(seed=0, n_features=5):
    torch.manual_seed(seed)
    model = DeepMamba(n_features=n_features, d_model=32, n_layers=2, d_state=16, headdim=16,
                      prefer_kernels=False).eval()
    with torch.no_grad():             # a trained-looking model: non-trivial decays and skips
        for block in model.layers:
            block.mixer.D.uniform_(-1, 1)
            block.mixer.A_log.uniform_(-2, 1)
    return model


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_stateful_pass_equals_step_by_step_and_any_chunking():
    model = small_model()
    x = torch.randn(2, 120, 5)
    with torch.inference_mode():
        whole, end_state = model.forward_stateful(x)
        state, stepped = model.allocate_state(2), []
        for t in range(x.shape[1]):
            o, state = model.step(x[:, t], state)
            stepped.append(o)
        for name in whole:
            assert rel(whole[name], torch.stack([o[name] for o in stepped], 1)) < 1e-5, name
        for got, want in zip(end_state, state):                   # the states agree too
            assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5
        # the windowed forward from a zero state is the same pass
        assert rel(model(x)["pop_logit"], whole["pop_logit"]) < 1e-5
        for chunk in (7, 32, 33, 119):
            parts, s = [], None
            for c0 in range(0, x.shape[1], chunk):
                o, s = model.forward_stateful(x[:, c0:c0 + chunk], s)
                parts.append(o["realized_vol"])
            assert rel(torch.cat(parts, 1), whole["realized_vol"]) < 1e-5, chunk
        # prefill over a prefix, then step: the same numbers as the one pass
        _, s = model.prefill(x[:, :100])
        o, _ = model.step(x[:, 100], s)
        assert rel(o["next_return"], whole["next_return"][:, 100]) < 1e-5
    # a state that was carried is not a zero state: starting over changes the forecasts
    assert rel(model.forward_stateful(x[:, 100:])[0]["pop"], whole["pop"][:, 100:]) > 1e-3


def test_run_stateful_is_causal_and_chunk_independent():
    model = small_model(1)
    features = torch.randn(700, 5)
    full, _ = run_stateful(model, features, chunk=256)
    for chunk in (1000, 97):
        other, _ = run_stateful(model, features, chunk=chunk)
        for name in full:
            np.testing.assert_allclose(other[name], full[name], rtol=1e-5, atol=1e-6)
    prefix, _ = run_stateful(model, features[:400], chunk=64)      # later bars change nothing earlier
    np.testing.assert_allclose(prefix["mu"], full["mu"][:400], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        o, _ = model.forward_stateful(features.unsqueeze(0))
    np.testing.assert_allclose(full["mu"], membership_tensor(o)[0].double().numpy(), rtol=1e-5, atol=1e-6)
    assert set(full) >= {"next_return", "realized_vol", "max_up", "max_down", "pop", "confidence", "mu"}


def test_stream_segments_are_contiguous_disjoint_and_inside_the_rows():
    seg = md.StreamSegments(100, 10_000, n_streams=8, segment=64, seed=3)
    seen_offsets = set()
    for _ in range(4):
        starts = seg.epoch()
        assert starts.shape == (len(seg), 8)
        assert (np.diff(starts, axis=0) == 64).all()                     # segment k + 1 follows k
        assert (np.diff(starts[0]) == seg.stream_length).all()           # streams back to back
        assert starts.min() >= 100 and starts.max() + 64 <= 10_000
        seen_offsets.add(int(starts[0, 0]) - 100)
    assert len(seen_offsets) > 1 and all(0 <= o < 64 for o in seen_offsets)
    short = md.StreamSegments(0, 1000, n_streams=32, segment=64, min_segments=3)
    assert short.n_streams < 32 and len(short) >= 3
    with pytest.raises(ValueError, match="no 64-bar segment"):
        md.StreamSegments(0, 100, n_streams=4, segment=64)
    table = torch.arange(40.0).view(20, 2)
    assert md.StreamSegments.gather(table.t().contiguous().t(), [3], 2)[0].tolist() == [[6.0, 7.0], [8.0, 9.0]]


def test_stateful_train_step_carries_the_state_the_next_segment_starts_from():
    model = small_model(2).train()
    optimizer = model.configure_optimizer(lr=0.0, weight_decay=0.0)     # weights stay put
    x = torch.randn(3, 64, 5)
    y = torch.randn(3, 64, 5)
    y[..., 4] = (y[..., 4] > 0).float()
    first = tm.train_step(model, optimizer, x[:, :32], y[:, :32], 0.0, burn_in=8, stateful=True)
    assert first.ok and first.state is not None
    assert all(not t.requires_grad for layer in first.state for t in layer)   # detached (TBPTT)
    second = tm.train_step(model, optimizer, x[:, 32:], y[:, 32:], 0.0, stateful=True, state=first.state)
    with torch.no_grad():
        whole, _ = model.forward_stateful(x)
        from intelligence.mamba_engine import loss
        expected, _ = loss(whole, {n: y[:, 32:, k] for k, n in enumerate(md.TARGET_NAMES)} |
                           {n: torch.cat([torch.full((3, 32), float("nan")), y[:, 32:, k]], 1)
                            for k, n in enumerate(md.TARGET_NAMES)})
    assert second.loss == pytest.approx(expected.item(), rel=1e-5)
    fresh = tm.train_step(model, optimizer, x[:, 32:], y[:, 32:], 0.0, stateful=True)
    assert abs(fresh.loss - second.loss) > 1e-4                          # the state mattered


def _checkpoint(tmp_path, bars, iv, inference):
    raw = md.build_features(bars, iv).to_numpy()
    warm = md.warmup_rows(raw)
    scaler = md.Scaler.fit(raw, slice(warm, len(raw)))
    model = small_model(4, n_features=raw.shape[1])
    config = {"n_features": raw.shape[1], "d_model": 32, "n_layers": 2, "d_state": 16, "headdim": 16}
    meta = {"model_config": config, "lookback": 16, "feature_names": list(md.FEATURE_NAMES),
            "scaler": scaler.to_dict(), "burn_in": 20}
    if inference is not None:
        meta["inference"] = inference
    path = tmp_path / f"{inference}.pth"
    tm.save_checkpoint(path, model.state_dict(), meta)
    return path, warm


def test_checkpoints_run_the_inference_they_were_trained_for(tmp_path):
    bars, iv = make_bars(4, seed=5)
    bar_ns = bars.index.tz_convert("UTC").as_unit("ns").asi8
    targets = np.array([10, 120, 200, 311])
    path, warm = _checkpoint(tmp_path, bars, iv, "stateful")
    stateful = load_forecaster(path)
    assert stateful.stateful and stateful.burn_in == 20 and "one causal pass" in stateful.method()
    heads = stateful.forecast_per_bar(bars, iv, bar_ns[targets], chunk=50)
    features = torch.from_numpy(stateful.scaled_features(bars, iv))
    with torch.inference_mode():
        state, mu = stateful.model.allocate_state(1), {}
        for t in range(warm, 312):
            o, state = stateful.model.step(features[t:t + 1], state)
            mu[t] = (float(membership_tensor(o)), float(o["realized_vol"]))
    assert heads["mu"][0] == 0.5 and np.isnan(heads["realized_vol"][0])   # before warm-up + burn-in
    assert warm + 20 <= 120
    for k, row in enumerate(targets[1:], start=1):
        assert heads["mu"][k] == pytest.approx(mu[row][0], abs=1e-5)
        assert heads["realized_vol"][k] == pytest.approx(mu[row][1], rel=1e-5)

    old, _ = _checkpoint(tmp_path, bars, iv, None)                         # written before the key
    windowed = load_forecaster(old)
    assert not windowed.stateful and windowed.burn_in == 0 and "window" in windowed.method()
    got = windowed.neural_membership_per_bar(bars, iv, bar_ns[targets])
    with torch.inference_mode():
        for k, row in enumerate(targets[1:], start=1):
            _, s = windowed.model.prefill(features[row - 15:row].unsqueeze(0))
            o, _ = windowed.model.step(features[row:row + 1], s)
            assert got[k] == pytest.approx(float(membership_tensor(o)), abs=1e-5)
    assert not np.allclose(got[1:], heads["mu"][1:], atol=1e-4)            # the two methods differ

    bad, _ = _checkpoint(tmp_path, bars, iv, "telepathic")
    with pytest.raises(ModelFileError, match="telepathic.pth: metadata names inference 'telepathic'"):
        load_forecaster(bad)
