"""Tests for intelligence.mamba_data: causal features, targets on a hand-built path, train-only
scaling, ordered splits with gaps, lazy windows that do not copy (10M rows), the sampler, and
one clear error per bad local-data file."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
from mamba_test_bars import make_bars

from data_factory.errors import DataError
from intelligence import mamba_data as md


def assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # NaN == NaN here


# ---------------------------------------------------------------------------------------------
# features

def test_features_have_the_documented_columns():
    bars, iv = make_bars(5)
    features = md.build_features(bars, iv)
    assert tuple(features.columns) == md.FEATURE_NAMES and len(md.FEATURE_NAMES) >= 8
    row = features.iloc[-1]
    assert row["minutes_since_open"] == pytest.approx(1.0)          # the 16:00 bar
    assert features["minutes_since_open"].iloc[0] == pytest.approx(5 / 390)
    assert row["iv_index"] == pytest.approx(iv[-1] / 100)
    assert row["log_return"] == pytest.approx(math.log(bars.close.iloc[-1] / bars.close.iloc[-2]))
    assert -0.5 <= row["rsi_centered"] <= 0.5
    assert md.warmup_rows(features.to_numpy()) == 78                 # the 78-bar realized vol


@pytest.mark.parametrize("cut", [1, 30, 79, 200, 777])
def test_features_are_causal(cut):
    bars, iv = make_bars(12, seed=3)
    full = md.build_features(bars, iv).to_numpy()
    truncated = md.build_features(bars.iloc[:cut + 1], iv[:cut + 1]).to_numpy()
    assert_same(full[:cut + 1], truncated)


def test_causal_bar_iv_index_uses_previous_close_only():
    bars, _ = make_bars(4, seed=1)
    days = pd.DatetimeIndex(sorted(set(bars.index.tz_localize(None).normalize())))
    daily = pd.Series([20.0, 22.0, 18.0, 30.0], index=days)
    iv = md.causal_bar_iv_index(bars, daily)
    assert np.isnan(iv[:78]).all()                                   # no previous session
    second = slice(78, 156)
    prev_close = bars.close.iloc[77]
    expected = 20.0 - 1.5 * (bars.close.iloc[second] / prev_close - 1) * 100
    np.testing.assert_allclose(iv[second], np.maximum(expected, 10.0))
    # the session's own IV close (22) never enters its bars; truncation changes nothing earlier
    assert_same(md.causal_bar_iv_index(bars.iloc[:200], daily), iv[:200])


# ---------------------------------------------------------------------------------------------
# targets

def hand_path():
    close = np.array([100.0, 102.0, 101.0, 99.0, 103.0, 104.0, 100.0])
    high = close.copy()
    low = close.copy()
    high[4], low[3] = 106.0, 98.0
    stamps = pd.date_range("2021-03-01 09:35", periods=len(close), freq="5min", tz=md.EXCHANGE_TZ)
    bars = pd.DataFrame({"open": close, "high": high, "low": low, "close": close,
                         "volume": np.ones(len(close))}, index=stamps)
    return bars


def test_targets_on_a_hand_built_path():
    bars = hand_path()
    c = bars.close.to_numpy()
    rules = md.TargetRules(horizon_bars=3, trailing_vol_bars=2)
    tau = 3 / (78 * 252)
    # t = 2: up excursion ln(106/101) = 0.0483, down ln(101/98) = 0.0302. IV giving a band of
    # 0.06 (inside) and of 0.04 (the high breaks it).
    iv = np.full(len(c), 0.06 / math.sqrt(tau) * 100)
    iv[2] = 0.04 / math.sqrt(tau) * 100
    t = md.build_targets(bars, iv, rules)
    r = np.log(c[1:] / c[:-1])
    sigma2 = math.sqrt((r[0] ** 2 + r[1] ** 2) / 2)                   # returns into bars 1 and 2
    assert t["sigma_bar"].iloc[2] == pytest.approx(sigma2)
    assert np.isnan(t["sigma_bar"].iloc[:2]).all()
    assert t["next_return"].iloc[2] == pytest.approx(r[2] / sigma2)
    assert t["realized_vol"].iloc[2] == pytest.approx(10 * math.sqrt(78 * 252 / 3 * (r[2:5] ** 2).sum()))
    assert t["max_up"].iloc[2] == pytest.approx(math.log(106 / 101) / (sigma2 * math.sqrt(3)))
    assert t["max_down"].iloc[2] == pytest.approx(math.log(101 / 98) / (sigma2 * math.sqrt(3)))
    assert t["pop"].iloc[2] == 0.0                                     # high 106 breaks ±0.04
    assert t["pop"].iloc[1] == 1.0                                     # 102: up 0.039, down 0.040 < 0.06
    assert t["pop"].iloc[0] == 1.0
    # t = 3: no up side below the open; max_down is 0 when the price never goes lower
    assert t["max_down"].iloc[3] == 0.0
    # horizon past the end: NaN; the last bar has no next return
    assert np.isnan(t[["realized_vol", "max_up", "max_down", "pop"]].iloc[4:].to_numpy()).all()
    assert np.isnan(t["next_return"].iloc[-1]) and np.isfinite(t["next_return"].iloc[-2])
    # baselines
    assert t["implied_vol"].iloc[0] == pytest.approx(iv[0] / 100)
    assert t["last_return"].iloc[2] == pytest.approx(r[1] / sigma2)


def test_targets_match_a_plain_loop_on_random_bars():
    bars, iv = make_bars(6, seed=7)
    rules = md.TargetRules(horizon_bars=50, trailing_vol_bars=30)
    t = md.build_targets(bars, iv, rules)
    c, h, lo = (bars[k].to_numpy() for k in ("close", "high", "low"))
    r = np.r_[np.nan, np.log(c[1:] / c[:-1])]
    for i in (40, 200, len(c) - 51):
        sigma = math.sqrt(np.mean(r[i - 29:i + 1] ** 2))
        fwd = slice(i + 1, i + 51)
        band = iv[i] / 100 * math.sqrt(50 / (78 * 252))
        up, down = np.log(h[fwd].max() / c[i]), np.log(c[i] / lo[fwd].min())
        assert t["max_up"].iloc[i] == pytest.approx(max(up, 0) / (sigma * math.sqrt(50)))
        assert t["max_down"].iloc[i] == pytest.approx(max(down, 0) / (sigma * math.sqrt(50)))
        assert t["realized_vol"].iloc[i] == pytest.approx(10 * math.sqrt(78 * 252 / 50 * np.sum(r[fwd] ** 2)))
        assert t["pop"].iloc[i] == float(up < band and down < band)
    assert np.isnan(t["pop"].iloc[len(c) - 50:]).all()


# ---------------------------------------------------------------------------------------------
# scaling and splits

def test_scaler_statistics_come_from_the_train_rows_only():
    rng = np.random.default_rng(0)
    features = rng.normal(2.0, 3.0, size=(1000, 3))
    features[:10] = np.nan                                            # warm-up
    scaler = md.Scaler.fit(features, slice(0, 600))
    np.testing.assert_allclose(scaler.mean, np.nanmean(features[:600], axis=0))
    np.testing.assert_allclose(scaler.std, np.nanstd(features[:600], axis=0))
    changed = features.copy()
    changed[600:] *= 1000.0                                           # later data cannot move it
    again = md.Scaler.fit(changed, slice(0, 600))
    assert_same(again.mean, scaler.mean)
    z = scaler.transform(changed)
    assert z.dtype == np.float32 and np.abs(z).max() <= 4.0 and (z[:10] == 0).all()
    assert md.Scaler.from_dict(scaler.to_dict()).to_dict() == scaler.to_dict()


def test_splits_are_time_ordered_with_a_horizon_gap():
    bars, iv = make_bars(60)
    horizon = 78 * 3
    splits = md.make_splits(bars.index, horizon, 0.2, 0.2)
    train, val, test = splits["train"], splits["validation"], splits["test"]
    assert 0 == train.start < train.stop <= val.start < val.stop <= test.start < test.stop == len(bars)
    assert val.start - train.stop >= horizon and test.start - val.stop >= horizon
    assert train.last < val.first and val.last < test.first
    minutes = md.build_features(bars, iv)["minutes_since_open"].to_numpy()
    assert minutes[val.start] == minutes[test.start] == pytest.approx(5 / 390)   # session starts
    targets = md.build_targets(bars, iv, md.TargetRules(horizon_bars=horizon))[list(md.TARGET_NAMES)].to_numpy()
    targets = np.array(targets)
    md.mask_targets_to_split(targets, train, horizon)
    # no train target reads a price at or after the end of the train split
    assert np.isnan(targets[train.stop - horizon:train.stop, 1:]).all()
    assert np.isfinite(targets[train.stop - horizon - 1, 1:]).all()


# ---------------------------------------------------------------------------------------------
# lazy windows

def test_window_dataset_returns_the_right_rows_without_copying():
    features = torch.arange(500 * 4, dtype=torch.float32).reshape(500, 4)
    targets = torch.arange(500 * 5, dtype=torch.float32).reshape(500, 5)
    ds = md.WindowDataset(features, targets, lookback=16, first_start=10, last_start=100)
    assert len(ds) == 91
    x, y = ds[5]
    assert torch.equal(x, features[15:31]) and torch.equal(y, targets[15:31])
    assert x.untyped_storage().data_ptr() == features.untyped_storage().data_ptr()
    assert y.untyped_storage().data_ptr() == targets.untyped_storage().data_ptr()
    assert torch.equal(ds[-1][0], features[100:116])
    with pytest.raises(IndexError):
        ds[91]
    bx, by = ds.batch([0, 90, 3])
    assert bx.shape == (3, 16, 4) and by.shape == (3, 16, 5)
    assert torch.equal(bx[1], features[100:116]) and torch.equal(by[2], targets[13:29])
    split = md.Split("validation", 200, 300, "", "")
    inside = md.WindowDataset.for_split(features, targets, 16, split, first_row=250)
    assert inside.first_start == 250 and inside.last_start + 16 == 300
    loader = torch.utils.data.DataLoader(ds, batch_sampler=md.WindowBatchSampler(len(ds), 8, 16),
                                         collate_fn=lambda batch: batch)
    lx, ly = next(iter(loader))
    assert lx.shape[1:] == (16, 4) and ly.shape[1:] == (16, 5)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_ten_million_rows_fit_in_a_few_hundred_mb_and_index_in_constant_time():
    rows, lookback = 10_000_000, 128
    features = torch.ones(rows, 8)                   # touched: the pages are really resident
    targets = torch.ones(rows, 5)
    before = _rss_bytes()
    ds = md.WindowDataset(features, targets, lookback)
    assert _rss_bytes() - before < 20e6              # building it copied nothing
    assert ds.nbytes() == rows * 13 * 4 < 600e6      # features + targets: 520 MB, nothing more
    assert len(ds) == rows - lookback + 1
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ds), 2000)
    t0 = time.perf_counter()
    for i in picks:
        x, _y = ds[int(i)]
    elapsed = time.perf_counter() - t0
    assert x.untyped_storage().data_ptr() == features.untyped_storage().data_ptr()
    assert elapsed < 1.0                             # ~µs each, wherever the window sits
    bx, _ = ds.batch([0, len(ds) - 1])
    assert bx.shape == (2, lookback, 8)
    assert _rss_bytes() - before < 40e6


def test_sampler_epochs_cover_windows_once_at_the_stride():
    sampler = md.WindowBatchSampler(1000, batch_size=7, stride=10, seed=1)
    epoch = [i for batch in sampler for i in batch]
    assert len(set(epoch)) == len(epoch) and len(epoch) in (99, 100)
    assert len({i % 10 for i in epoch}) == 1                           # one random offset
    ordered = [i for batch in md.WindowBatchSampler(1000, 7, 10, shuffle=False) for i in batch]
    assert ordered == list(range(0, 1000, 10))
    assert len(md.WindowBatchSampler(1000, 7, 10, shuffle=False)) == 15


# ---------------------------------------------------------------------------------------------
# local data

def write_csv(path, bars, iv=None):
    frame = bars.reset_index()
    frame["timestamp"] = frame["timestamp"].astype(str)
    if iv is not None:
        frame["iv_index"] = iv
    frame.to_csv(path, index=False)
    return path


def test_local_csv_and_parquet_load(tmp_path):
    bars, iv = make_bars(3)
    loaded, loaded_iv, description = md.load_local_bars(write_csv(tmp_path / "bars.csv", bars, iv))
    assert loaded.index.as_unit("ns").equals(bars.index.as_unit("ns")) and str(loaded.index.tz) == md.EXCHANGE_TZ
    np.testing.assert_allclose(loaded.to_numpy(), bars.to_numpy(), rtol=1e-14)
    np.testing.assert_allclose(loaded_iv, iv)
    assert description["rows"] == len(bars) and description["median_bar_minutes"] == 5
    naive = bars.reset_index()
    naive["timestamp"] = naive["timestamp"].dt.tz_localize(None)      # naive = New York time
    naive.to_parquet(tmp_path / "bars.parquet")
    loaded, loaded_iv, _ = md.load_local_bars(tmp_path / "bars.parquet")
    assert loaded_iv is None and loaded.index.as_unit("ns").equals(bars.index.as_unit("ns"))


BAD_FILES = {
    "missing_column": (lambda f: f.drop(columns="volume"), "missing column 'volume'"),
    "bad_timestamp": (lambda f: f.assign(timestamp=f.timestamp.where(f.index != 5, "yesterday")),
                      "row 6 (line 7), column 'timestamp': cannot read 'yesterday'"),
    "zero_price": (lambda f: f.assign(low=f.low.where(f.index != 9, 0.0)), "row 10 (line 11), column 'low'"),
    "not_a_number": (lambda f: f.assign(close=f.close.astype(object).where(f.index != 3, "abc")),
                     "row 4 (line 5), column 'close': 'abc' is not a finite number"),
    "unsorted": (lambda f: f.iloc[[0, 1, 3, 2, 4, 5]], "row 4 (line 5), column 'timestamp'"),
    "duplicated": (lambda f: f.iloc[[0, 1, 2, 2, 3]], "duplicates the previous row"),
    "high_below_close": (lambda f: f.assign(high=f.high.where(f.index != 2, f.low)),
                         "row 3 (line 4), column 'open'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_local_data_gives_one_clear_error(tmp_path, case):
    bars, _ = make_bars(1)
    frame = bars.reset_index()
    frame["timestamp"] = frame["timestamp"].astype(str)
    change, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    change(frame).to_csv(path, index=False)
    with pytest.raises(DataError) as error:
        md.load_local_bars(path)
    message = str(error.value)
    assert str(path) in message and expected in message, message


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        md.load_local_bars(tmp_path / "nope.csv")
    (tmp_path / "bars.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        md.load_local_bars(tmp_path / "bars.xlsx")


def test_local_bars_across_a_dst_switch_keep_their_offsets(tmp_path):
    """pandas 3 refuses mixed UTC offsets in one column; a file crossing a DST switch still loads."""
    path = tmp_path / "dst.csv"
    path.write_text("timestamp,open,high,low,close,volume\n"
                    "2018-11-02 16:00:00-04:00,270.5,271,270,270.8,100\n"
                    "2018-11-05 09:35:00-05:00,271,272,270,271.5,100\n")
    bars, _iv, _description = md.load_local_bars(path)
    assert [str(t) for t in bars.index] == ["2018-11-02 16:00:00-04:00", "2018-11-05 09:35:00-05:00"]
