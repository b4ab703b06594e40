"""Tests for the diffusion path head (intelligence.mamba_diffusion, intelligence.path_training):
path targets, the sampler's shapes and determinism under a seed, touch probabilities against
the reflection principle, bad inputs, and a tiny `train_mamba --diffusion-head` run whose
checkpoint loads with its head and samples paths per bar (plus `--init-from`)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from mamba_test_bars import make_bars
from scipy.stats import norm

from intelligence import train_mamba as tm
from intelligence.mamba_diffusion import (
    DiffusionHead,
    PathForecast,
    PathInputError,
    PathRules,
    delta_strikes,
    horizon_steps_for,
    path_probabilities,
    path_targets,
    realised_touches,
)
from intelligence.mamba_inference import ModelFileError, load_forecaster
from intelligence.tda import TDAInputError
from test_train_mamba import TINY, write_csv


def test_path_targets_are_iv_scaled_log_increments_and_nan_past_the_data():
    close = np.exp(np.linspace(0.0, 0.009, 10)) * 100         # +0.001 log per bar
    iv = np.full(10, 16.0)
    rules = PathRules(steps=3, step_bars=2)
    z = path_targets(close, iv, rules)
    sigma = 0.16 * math.sqrt(2 / (78 * 252))
    assert z.shape == (10, 3)
    assert np.allclose(z[:4], 0.002 / sigma, rtol=1e-5)         # rows 0..3 have t + 6 <= 9
    assert np.isnan(z[4:]).all()
    iv[1] = np.nan
    assert np.isnan(path_targets(close, iv, rules)[1]).all()
    jump = close.copy()
    jump[2:] *= 1.5                                             # a 40-σ step is clipped, not kept
    assert path_targets(jump, np.full(10, 16.0), rules)[0, 0] == pytest.approx(6.0)


def test_sampler_shapes_and_determinism_under_a_seed():
    torch.manual_seed(0)
    head = DiffusionHead(cond_dim=8, steps=5, hidden=16, depth=1).eval()
    with torch.no_grad():                  # the output layer starts at zero: give it weights
        head.output.weight.normal_(0, 0.1)
    cond = torch.randn(3, 8)
    a = head.sample(cond, 7, seed=11)
    b = head.sample(cond, 7, seed=11)
    c = head.sample(cond, 7, seed=12)
    assert a.shape == (3, 7, 5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()
    # each condition row gets its own paths: the rows differ
    assert not torch.allclose(a[0], a[1])


def test_the_ddpm_loss_falls_when_the_head_learns_a_conditional_scale():
    torch.manual_seed(0)
    head = DiffusionHead(cond_dim=2, steps=4, hidden=32, depth=1, train_steps=50)
    cond = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(256, 1)
    scale = torch.where(cond[:, :1] > 0, 0.3, 2.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    fixed = torch.Generator().manual_seed(3)
    target = torch.randn(len(cond), 4, generator=fixed) * scale
    before = head.loss(cond, target, generator=torch.Generator().manual_seed(5)).item()
    for _ in range(600):
        loss = head.loss(cond, torch.randn(len(cond), 4) * scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = head.loss(cond, target, generator=torch.Generator().manual_seed(5)).item()
    assert after < 0.8 * before
    samples = head.eval().sample(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 400, seed=0)
    calm, wild = samples[0].std().item(), samples[1].std().item()
    assert wild > 2 * calm                                      # it learned the condition


def test_the_ddim_sampler_is_exact_for_gaussian_data_given_the_ideal_noise_prediction():
    """With ε̂ the posterior mean for N(0, s²) data, DDIM must return N(0, s²) samples: checks the
    schedule, the x̂₀ / update arithmetic and the shared-condition batching, not the network."""
    head = DiffusionHead(cond_dim=2, steps=4, hidden=8, depth=1)
    variances = torch.tensor([0.09, 4.0])

    def ideal(x, tau, cond, repeat=1):
        a = head.alpha_bar[tau].repeat_interleave(repeat).unsqueeze(1)
        var = (cond @ variances).repeat_interleave(repeat).unsqueeze(1)
        return (1 - a).sqrt() * x / (a * var + 1 - a)

    head.forward = ideal
    samples = head.sample(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 4000, seed=0, sample_steps=50)
    assert samples[0].std().item() == pytest.approx(0.3, rel=0.06)
    assert samples[1].std().item() == pytest.approx(2.0, rel=0.06)
    assert abs(samples.mean().item()) < 0.05


def test_touch_probability_of_gaussian_paths_matches_the_reflection_principle():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40_000, 32))
    sigma = 0.20 / math.sqrt(252)
    probs = path_probabilities(z, sigma, -0.10, 0.10, 31)
    expected = 2 * norm.cdf(-0.10 / (0.20 * math.sqrt(31 / 252)))
    assert probs["touch_put"] == pytest.approx(expected, abs=0.01)
    assert probs["touch_call"] == pytest.approx(expected, abs=0.01)
    # observed daily points alone miss the touches between them: the bridge adds them back
    observed_only = np.mean((np.cumsum(z[:, :31] * sigma, axis=1) <= -0.10).any(axis=1))
    assert observed_only < probs["touch_put"] - 0.02
    assert probs["pop"] < 1 - max(probs["touch_put"], probs["touch_call"])
    assert probs["inside_at_expiry"] > probs["pop"]
    assert probs["expected_max_up"] > 0 and probs["expected_max_down"] > 0


def test_bad_path_inputs_are_refused_with_one_message():
    with pytest.raises(PathInputError, match="steps = 0"):
        PathRules(steps=0)
    with pytest.raises(PathInputError, match="step_bars = -1"):
        PathRules(step_bars=-1)
    with pytest.raises(PathInputError, match="n_paths = 0"):
        DiffusionHead(4, steps=3).sample(torch.zeros(1, 4), 0)
    z = np.zeros((4, 3))
    with pytest.raises(PathInputError, match="horizon_steps = 4"):
        path_probabilities(z, 0.01, -0.1, 0.1, 4)
    with pytest.raises(PathInputError, match="straddle spot"):
        path_probabilities(z, 0.01, 0.05, 0.1, 2)
    with pytest.raises(PathInputError, match="run past the paths"):
        horizon_steps_for(40, PathRules())
    assert horizon_steps_for(0.2, PathRules()) == 1 and horizon_steps_for(31.4, PathRules()) == 31


def test_delta_strikes_have_the_target_black_scholes_delta():
    put, call = delta_strikes(np.array([100.0]), np.array([20.0]), 31, 0.16)
    sigma_root = 0.20 * math.sqrt(31 / 252)
    for log_k, expected in ((put[0], -0.16), (call[0], 0.16)):
        d1 = (-log_k + 0.5 * sigma_root ** 2) / sigma_root
        delta = norm.cdf(d1) - (1 if expected < 0 else 0)
        assert delta == pytest.approx(expected, abs=1e-9)


def test_realised_touches_read_the_bars_after_the_forecast_only():
    close = np.full(10, 100.0)
    high, low = close + 0.5, close - 0.5
    low[0], high[0] = 50.0, 150.0                              # at the forecast bar: not counted
    low[3] = 90.0
    put, call = np.log(np.array([95.0, 95.0]) / 100), np.log(np.array([105.0, 105.0]) / 100)
    touched_put, touched_call = realised_touches(high, low, close, [0, 3], 4, put, call)
    assert touched_put.tolist() == [True, False] and touched_call.tolist() == [False, False]


def test_path_forecast_samples_lazily_and_per_bar_seeds_do_not_depend_on_order():
    torch.manual_seed(1)
    head = DiffusionHead(cond_dim=4, steps=6, hidden=16, depth=1)
    with torch.no_grad():
        head.output.weight.normal_(0, 0.1)
    hidden = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    hidden[0] = np.nan
    rules = PathRules(steps=6, step_bars=78)
    one = PathForecast(head, rules, hidden, np.full(5, 18.0), n_paths=32, seed=3)
    two = PathForecast(head, rules, hidden, np.full(5, 18.0), n_paths=32, seed=3)
    assert one.probabilities(0, 100.0, 95.0, 105.0, 5) is None      # no state at bar 0
    first = one.probabilities(4, 100.0, 95.0, 105.0, 5)
    two.paths(2)
    assert two.probabilities(4, 100.0, 95.0, 105.0, 5) == first
    assert set(one._paths) == {4}
    assert 0 <= first["touch_put"] <= 1 and 0 <= first["pop"] <= 1


# ---------------------------------------------------------------------------------------------
# train_mamba --diffusion-head

PATHS = ["--diffusion-head", "--diffusion-cond-dropout", "0.2", "--path-steps", "4", "--path-step-bars", "13", "--diffusion-iters", "60",
         "--diffusion-batch", "64", "--diffusion-hidden", "16", "--calibration-every", "13"]


@pytest.fixture(scope="module")
def path_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    bars, iv = make_bars(60, seed=4)
    csv = write_csv(tmp / "bars.csv", bars, iv)
    out = tmp / "model.pth"
    argv = ["--local-data", str(csv), "--out", str(out), "--log-dir", str(tmp / "tb"), "--snapshot-dir", "",
            "--epochs", "2", "--max-steps", "8", *TINY, *PATHS]
    return {"code": tm.main(argv), "out": out, "tmp": tmp, "bars": bars, "iv": iv, "csv": csv}


def test_a_diffusion_head_run_writes_the_head_its_calibration_and_the_figure(path_run):
    assert path_run["code"] == 0
    out = path_run["out"]
    forecaster = load_forecaster(out)
    assert forecaster.diffusion is not None
    assert (forecaster.path_rules.steps, forecaster.path_rules.step_bars) == (4, 13)
    meta = forecaster.metadata["diffusion"]
    assert meta["training"]["iterations"] == 60
    calibration = json.loads(out.with_name(out.name + ".eval.json").read_text())["paths"]
    assert set(calibration["coverage"]) == {"50%", "80%", "95%"}
    for row in calibration["coverage"].values():
        assert 0.0 <= row["all_steps"] <= 1.0
    assert sum(calibration["pit"]["counts"]) == calibration["forecasts"] > 0
    for row in calibration["touch"].values():
        assert set(row["brier"]) == {"diffusion", "delta"}
    assert out.with_name(out.name + ".paths.png").stat().st_size > 10_000
    assert "Path head calibration" in out.with_name(out.name + ".eval.md").read_text()
    assert list((path_run["tmp"] / "tb").glob("*-paths/events.out.tfevents.*"))


def test_the_loaded_head_samples_paths_for_the_bars_of_a_run(path_run):
    forecaster = load_forecaster(path_run["out"])
    bars, iv = path_run["bars"], path_run["iv"]
    bar_ns = bars.index.tz_convert("UTC").as_unit("ns").asi8
    targets = bar_ns[-200:]
    paths = forecaster.path_forecast(bars, iv, targets, n_paths=16, seed=5)
    assert len(paths) == 200 and paths.available(199)
    probs = paths.probabilities(199, float(bars["close"].iloc[-1]), 90.0 * bars["close"].iloc[-1] / 100,
                                110.0 * bars["close"].iloc[-1] / 100, 0.5)
    assert probs is not None and 0.0 <= probs["touch_put"] <= 1.0
    assert paths.paths(199).shape == (16, 4)
    again = forecaster.path_forecast(bars, iv, targets, n_paths=16, seed=5)
    assert np.array_equal(again.paths(199), paths.paths(199))


def test_init_from_adds_a_head_to_a_trained_model_without_changing_it(path_run, tmp_path):
    out = tmp_path / "with_head.pth"
    argv = ["--local-data", str(path_run["csv"]), "--init-from", str(path_run["out"]), "--out", str(out),
            "--log-dir", "", "--snapshot-dir", "", *TINY, *PATHS]
    assert tm.main(argv) == 0
    before = torch.load(path_run["out"], weights_only=True)["model_state"]
    after = torch.load(out, weights_only=True)["model_state"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_forecaster(out).metadata["trunk_from"] == str(path_run["out"])


def test_a_model_without_a_head_is_refused_for_path_sampling(tmp_path, path_run):
    checkpoint = torch.load(path_run["out"], weights_only=True)
    del checkpoint["metadata"]["diffusion"], checkpoint["diffusion_state"]
    plain = tmp_path / "plain.pth"
    torch.save(checkpoint, plain)
    forecaster = load_forecaster(plain)
    assert forecaster.diffusion is None
    with pytest.raises(ModelFileError, match="no diffusion path head.*--diffusion-head"):
        forecaster.path_forecast(path_run["bars"], path_run["iv"], [], n_paths=4)


def test_bad_path_flags_exit_2_with_one_message(capsys):
    for argv, expected in ((["--diffusion-head", "--path-steps", "0"], "--path-steps and --path-step-bars"),
                           (["--init-from", "x.pth"], "give --diffusion-head with it"),
                           (["--diffusion-head", "--diffusion-iters", "0"], "--diffusion-iters must be >= 1"),
                           (["--diffusion-cond-dropout", "1"], "--diffusion-cond-dropout must be in [0, 1)"),
                           (["--ema", "1"], "--ema must be in [0, 1)")):
        with pytest.raises(SystemExit) as stop:
            tm.parse_args(argv)
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err


def test_tda_inputs_train_and_the_checkpoint_rebuilds_them_at_inference(tmp_path):
    bars, iv = make_bars(60, seed=9)
    csv = write_csv(tmp_path / "bars.csv", bars, iv)
    out = tmp_path / "tda.pth"
    argv = ["--local-data", str(csv), "--out", str(out), "--log-dir", "", "--snapshot-dir", "",
            "--epochs", "1", "--max-steps", "4", "--tda-features", "--tda-window", "12", *TINY]
    assert tm.main(argv) == 0
    forecaster = load_forecaster(out)
    assert forecaster.tda == {"window": 12, "dim": 3, "tau": 1}
    assert forecaster.feature_names[-7:] == ("tda_h0_total", "tda_h1_total", "tda_h1_max", "tda_h0_entropy",
                                             "tda_h1_entropy", "tda_betti1_peak", "tda_betti1_mid")
    assert forecaster.history_sessions == 14
    bar_ns = bars.index.tz_convert("UTC").as_unit("ns").asi8
    mu = forecaster.neural_membership_per_bar(bars, iv, bar_ns[-100:])
    assert np.isfinite(mu).all() and len(set(np.round(mu, 6))) > 1


def test_a_tda_window_longer_than_the_data_exits_2(tmp_path, capsys):
    bars, iv = make_bars(20, seed=9)
    csv = write_csv(tmp_path / "bars.csv", bars, iv)
    argv = ["--local-data", str(csv), "--out", str(tmp_path / "m.pth"), "--tda-features", "--tda-window", "60", *TINY]
    assert tm.main(argv) == 2
    err = capsys.readouterr().err
    assert "--tda-window" in err and "60" in err and not (tmp_path / "m.pth").exists()


def test_earlier_daily_closes_give_the_first_sessions_their_tda_inputs():
    from intelligence import mamba_data as md

    bars, iv = make_bars(40, seed=3)
    tda = {"window": 12, "dim": 3, "tau": 1}
    full = md.build_features(bars, iv, tda=tda)
    late = 78 * 25                                              # the last 15 sessions only: alone, too
    with pytest.raises(TDAInputError):                          # few for a window of 12 to start early
        md.build_features(bars.iloc[late:late + 78 * 13], iv[late:late + 78 * 13], tda=tda)
    sessions = bars.index.tz_localize(None).normalize()
    closes = bars["close"].groupby(sessions).last()             # daily closes, as a backtest's daily bars
    cut = md.build_features(bars.iloc[late:], iv[late:], tda=tda, earlier_closes=closes)
    names = list(md.TDA_FEATURE_NAMES)
    np.testing.assert_allclose(cut[names].to_numpy(), full[names].to_numpy()[late:])
    assert np.isfinite(cut[names].to_numpy()).all()
    # closes on or after the bars' first session are not read: the bars' own closes are
    shifted = closes.copy()
    shifted[shifted.index >= sessions[late]] *= 1.5
    again = md.build_features(bars.iloc[late:], iv[late:], tda=tda, earlier_closes=shifted)
    np.testing.assert_allclose(again[names].to_numpy(), cut[names].to_numpy())
