"""Tests for intelligence.train_mamba and intelligence.mamba_inference: a smoke run on a small
local file (checkpoint, metadata round trip, evaluation report, TensorBoard and PNG outputs),
the loss falling on an easy target, the NaN guard, the LR schedule, atomic saves, CLI errors
(bad data, --device cuda without CUDA) and per-bar inference against the recurrent step."""
from __future__ import annotations

import itertools
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mamba_test_bars import make_bars

from intelligence import mamba_data as md
from intelligence import train_mamba as tm
from intelligence.mamba_engine import DeepMamba, membership_tensor
from intelligence.mamba_inference import ModelFileError, load_forecaster

ROOT = Path(__file__).resolve().parents[1]




def write_csv(path, bars, iv):
    frame = bars.reset_index()
    frame["timestamp"] = frame["timestamp"].astype(str)
    frame["iv_index"] = iv
    frame.to_csv(path, index=False)
    return path


TINY = ["--d-model", "16", "--layers", "1", "--d-state", "8", "--headdim", "16", "--lookback", "32",
        "--batch-size", "16", "--horizon-bars", "78", "--eval-stride", "4", "--threads", "1",
        "--warmup-steps", "5", "--no-progress", "--scatter-every", "10", "--log-every", "1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One tiny training run on a 40-session local file, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("smoke")
    bars, iv = make_bars(40)
    csv = write_csv(tmp / "bars.csv", bars, iv)
    out = tmp / "model.pth"
    argv = ["--local-data", str(csv), "--out", str(out), "--log-dir", str(tmp / "tb"),
            "--snapshot-dir", str(tmp / "snap"), "--epochs", "10", "--max-steps", "25", *TINY]
    code = tm.main(argv)
    return {"code": code, "out": out, "tmp": tmp, "bars": bars, "iv": iv, "argv": argv}


def test_smoke_train_writes_a_checkpoint_whose_metadata_round_trips(smoke_run):
    assert smoke_run["code"] == 0
    out = smoke_run["out"]
    forecaster = load_forecaster(out)
    meta = forecaster.metadata
    assert meta["feature_names"] == list(md.FEATURE_NAMES)
    assert meta["model_config"]["d_model"] == 16 and meta["lookback"] == 32
    assert meta["target_rules"]["horizon_bars"] == 78
    assert meta["torch_version"] == torch.__version__ and "commit" in meta["git"]
    assert meta["data"]["source"].startswith("local file") and meta["data"]["synthetic"] is False
    assert math.isfinite(meta["metrics"]["best_val_loss"]) and meta["training"]["skipped_steps"] == 0
    assert meta["training"]["steps"] == 25 and meta["training"]["epochs_run"] >= 5
    # the scaler stored is the train-split one the data pipeline computes
    args = tm.parse_args(smoke_run["argv"])
    prep = tm.prepare_data(args)
    np.testing.assert_allclose(forecaster.scaler.mean, prep.scaler.mean)
    np.testing.assert_allclose(forecaster.scaler.std, prep.scaler.std)
    assert meta["splits"]["train"]["rows"] == [prep.splits["train"].start, prep.splits["train"].stop]
    # weights round trip bit for bit, and the model gives finite forecasts
    state = torch.load(out, weights_only=True)["model_state"]
    for name, value in forecaster.model.state_dict().items():
        assert torch.equal(value, state[name])
    with torch.inference_mode():
        outputs = forecaster.model(prep.features[:64].unsqueeze(0))
    assert all(torch.isfinite(v).all() for v in outputs.values())
    assert not list(out.parent.glob(".*tmp*"))                     # no temp file left behind


def test_smoke_train_writes_the_evaluation_and_analytics(smoke_run):
    out, tmp = smoke_run["out"], smoke_run["tmp"]
    report = json.loads(out.with_name(out.name + ".eval.json").read_text())["evaluation"]
    for key in ("next_return", "realized_vol", "pop", "max_up", "max_down"):
        assert report[key]["n"] > 0
    assert set(report["next_return"]["mse"]) == {"model", "zero", "persistence"}
    assert set(report["realized_vol"]["mae"]) == {"model", "trailing_rv", "implied_vol"}
    assert set(report["pop"]["brier"]) == {"model", "base_rate"}
    assert all(math.isfinite(v) for v in report["pop"]["log_loss"].values())
    markdown = out.with_name(out.name + ".eval.md").read_text()
    assert "Brier" in markdown and "local file" in markdown
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = (tmp / "tb").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"loss/total", "loss/pop", "loss/realized_vol", "lr", "grad_norm", "val/total"} <= scalars
    assert {"scatter/train_batch", "scatter/validation"} <= set(accumulator.Tags()["images"])
    assert (tmp / "snap" / "epoch_001.png").is_file() and (tmp / "snap" / "epoch_001_scatter.png").is_file()
    assert torch.load(out, weights_only=True)["metadata"]["metrics"]["test"]["forecasts"] == report["forecasts"]


def test_loss_falls_on_an_easy_target():
    torch.manual_seed(0)
    model = DeepMamba(n_features=3, d_model=16, n_layers=1, d_state=8, headdim=16)
    optimizer = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    x = torch.randn(16, 24, 3)
    y = torch.full((16, 24, 5), float("nan"))
    y[..., 0] = 2.0 * x[..., 0]                          # next_return: read off the input
    y[..., 1] = 1.0 + x[..., 1].abs()                    # realized_vol
    y[..., 4] = (x[..., 2] > 0).float()                  # pop
    losses = [tm.train_step(model, optimizer, x, y, 3e-3).loss for _ in range(80)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_nan_guard_skips_a_poisoned_batch_and_aborts_after_a_run_of_them():
    torch.manual_seed(0)
    model = DeepMamba(n_features=3, d_model=16, n_layers=1, d_state=8, headdim=16)
    optimizer = model.configure_optimizer(lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8, 3)
    x[1, 3, 0] = float("nan")                            # the poison
    y = torch.zeros(4, 8, 5)
    result = tm.train_step(model, optimizer, x, y, 1e-3)
    assert not result.ok
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    guard = tm.NanGuard(limit=3)
    guard.record(False, 0)
    guard.record(True, 1)                                # a good step resets the run
    guard.record(False, 2)
    guard.record(False, 3)
    with pytest.raises(tm.TrainingError, match="3 consecutive"):
        guard.record(False, 4)
    assert guard.skipped == 4
    clean = tm.train_step(model, optimizer, torch.randn(4, 8, 3), y, 1e-3)
    assert clean.ok and math.isfinite(clean.grad_norm)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    lrs = [tm.cosine_lr(s, 100, 1e-3, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_checkpoint_save_is_atomic(tmp_path):
    path = tmp_path / "m.pth"
    tm.save_checkpoint(path, {"w": torch.ones(2)}, {"a": 1})
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        tm.save_checkpoint(path, {"w": torch.zeros(2)}, {"a": lambda: 0})   # not picklable
    saved = torch.load(path, weights_only=True)
    assert saved["metadata"] == {"a": 1} and torch.equal(saved["model_state"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_cli_bad_data_exits_non_zero_with_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,open,high,low,close\n2020-01-06 09:35,1,1,1,1\n")
    assert tm.main(["--local-data", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing column 'volume'" in err[0] and str(bad) in err[0]


def test_user_bars_with_both_dst_offsets_in_one_file_are_read(tmp_path):
    # A US intraday export across the March switch: -05:00 rows, then -04:00 rows.
    bars, iv = make_bars(30, start="2021-03-01")
    csv = write_csv(tmp_path / "dst.csv", bars, iv)
    text = csv.read_text()
    assert "-05:00" in text and "-04:00" in text
    args = tm.parse_args(["--local-data", str(csv), "--out", str(tmp_path / "m.pth"), *TINY])
    prep = tm.prepare_data(args)
    assert prep.index_first == str(bars.index[0]) and prep.index_last == str(bars.index[-1])
    assert len(prep.features) == len(bars)


def test_bars_of_another_width_are_refused_naming_the_width(tmp_path, capsys):
    bars, iv = make_bars(30)
    every_third = bars.iloc[2::3].copy()                   # 15-minute closes (09:45, 10:00, ...)
    csv = write_csv(tmp_path / "bars15.csv", every_third, iv[2::3])
    assert tm.main(["--local-data", str(csv), "--out", str(tmp_path / "m.pth"), "--no-progress", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the bars are 15 minutes apart (median)" in err[0]
    assert "trained on 5-minute bars" in err[0] and not (tmp_path / "m.pth").exists()


def test_the_shipped_model_is_replaced_only_on_request(capsys):
    assert tm.parse_args([]).out == "models/mamba_trained.pth"
    with pytest.raises(SystemExit) as stop:
        tm.parse_args(["--out", "models/mamba_active.pth"])
    assert stop.value.code == 2
    assert "is the shipped model every backtest uses by default" in capsys.readouterr().err
    assert tm.parse_args(["--out", str(ROOT / "models" / ".." / "models" / "mamba_active.pth"),
                          "--replace-shipped"]).replace_shipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cli_device_cuda_without_cuda_is_a_clear_error():
    done = subprocess.run([sys.executable, "intelligence/train_mamba.py", "--device", "cuda"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--device cuda: CUDA is not available" in done.stderr


def test_module_entry_point_shows_help():
    done = subprocess.run([sys.executable, "-m", "intelligence.train_mamba", "--help"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--local-data" in done.stdout and "--sweep" in done.stdout


# ---------------------------------------------------------------------------------------------
# inference

def test_per_bar_membership_equals_the_recurrent_step(smoke_run):
    forecaster = load_forecaster(smoke_run["out"])
    assert forecaster.stateful and forecaster.metadata["inference"] == "stateful"
    assert forecaster.burn_in == 32                                  # default burn-in = lookback
    bars, iv = smoke_run["bars"], smoke_run["iv"]
    bars, iv = bars.iloc[:600], iv[:600]
    bar_ns = bars.index.tz_convert("UTC").as_unit("ns").asi8
    targets = np.array([5, 100, 109, 110, 350, 599])
    mu = forecaster.neural_membership_per_bar(bars, iv, bar_ns[targets], chunk=7)
    warm = md.warmup_rows(md.build_features(bars, iv).to_numpy())
    assert warm + 32 == 110 and (mu[:3] == 0.5).all()                # warm-up, then burn-in
    # one pass from the first fully-defined row, stepped bar by bar from a zero state
    features = torch.from_numpy(forecaster.scaled_features(bars, iv))
    model = forecaster.model
    state, expected = model.allocate_state(1), {}
    with torch.inference_mode():
        for t in range(warm, 600):
            outputs, state = model.step(features[t:t + 1], state)
            expected[t] = float(membership_tensor(outputs))
    for k, row in enumerate(targets[3:], start=3):
        assert mu[k] == pytest.approx(expected[row], abs=1e-5)
    assert len({round(float(v), 6) for v in mu[3:]}) == 3             # not one constant
    assert ((0 <= mu) & (mu <= 1)).all()
    with pytest.raises(ValueError, match="no bar of bars_5min closes at"):
        forecaster.neural_membership_per_bar(bars, iv, bar_ns[[3]] + 1)


def test_load_forecaster_errors_name_the_file(smoke_run, tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load_forecaster(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(smoke_run["out"].read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="corrupt.pth: not a readable DeepMamba checkpoint"):
        load_forecaster(corrupt)
    checkpoint = torch.load(smoke_run["out"], weights_only=True)
    checkpoint["metadata"]["model_config"]["d_model"] = 32
    mismatched = tmp_path / "mismatched.pth"
    torch.save(checkpoint, mismatched)
    with pytest.raises(ModelFileError, match="mismatched.pth: weights do not fit"):
        load_forecaster(mismatched)
    del checkpoint["metadata"]["scaler"]
    torch.save(checkpoint, mismatched)
    with pytest.raises(ModelFileError, match="lacks"):
        load_forecaster(mismatched)
