"""TDA features of returns (intelligence/tda.py): known shapes, causality, invariances, bad inputs."""
import numpy as np
import pandas as pd
import pytest

from intelligence.tda import (
    TDA_COLUMNS,
    TDAInputError,
    delay_embedding,
    persistence_diagrams,
    rolling_tda_features,
    session_log_returns,
    session_tda_features,
    tda_features_at,
)


def _noise(n, seed=0, scale=0.01):
    return np.random.default_rng(seed).normal(0.0, scale, n)


def test_delay_embedding_shape_and_values():
    points = delay_embedding(np.arange(10.0), dim=3, tau=2)
    assert points.shape == (6, 3)
    np.testing.assert_array_equal(points[0], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(points[-1], [5.0, 7.0, 9.0])


def test_square_has_known_diagrams():
    # Unit square: three components merge at 1, one loop is born at 1 and filled at sqrt(2).
    h0, h1 = persistence_diagrams(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    finite = h0[np.isfinite(h0[:, 1]), 1]
    np.testing.assert_allclose(np.sort(finite), [1.0, 1.0, 1.0])
    assert np.isinf(h0[:, 1]).sum() == 1
    np.testing.assert_allclose(h1, [[1.0, np.sqrt(2.0)]])


def test_fast_path_matches_public_simplex_tree():
    for seed in range(3):
        cloud = np.random.default_rng(seed).normal(size=(40, 3))
        fast, slow = persistence_diagrams(cloud), persistence_diagrams(cloud, fast=False)
        for a, b in zip(fast, slow):
            key = lambda d: d[np.lexsort((d[:, 1], d[:, 0]))]  # noqa: E731
            np.testing.assert_allclose(key(a), key(b), rtol=1e-9)
        assert len(fast[1]) > 0


def test_sine_loop_has_one_dominant_h1_feature_unlike_noise():
    n, window, period = 200, 60, 20
    t = np.arange(n)
    sine = 0.01 * np.sin(2 * np.pi * t / period)
    noise = _noise(n, seed=1, scale=sine.std())
    kwargs = dict(window=window, dim=2, tau=period // 4)
    loop = rolling_tda_features(sine, **kwargs).iloc[window - 1:]
    random = rolling_tda_features(noise, **kwargs).iloc[window - 1:]
    # A circle of radius ~sqrt(2) in normalised units: its loop lives for ~1.5; noise loops are short.
    assert loop["tda_h1_max"].min() > 1.0
    assert loop["tda_h1_max"].min() > 3 * random["tda_h1_max"].max()
    # ... and it is the only loop that matters: most of the H1 persistence is in that one bar.
    assert (loop["tda_h1_max"] / loop["tda_h1_total"]).min() > 0.8
    assert (random["tda_h1_max"] / random["tda_h1_total"]).median() < 0.5
    assert loop["tda_h1_entropy"].median() < random["tda_h1_entropy"].median()


def test_warmup_rows_are_nan_and_the_rest_finite():
    returns = pd.Series(_noise(120), index=pd.date_range("2020-01-01", periods=120))
    frame = rolling_tda_features(returns, window=40)
    assert list(frame.columns) == list(TDA_COLUMNS)
    assert frame.index.equals(returns.index)
    assert frame.iloc[:39].isna().all().all()
    assert np.isfinite(frame.iloc[39:].to_numpy()).all()
    assert (frame.iloc[39:]["tda_h0_total"] > 0).all()


def test_constant_returns_give_zero_features():
    for value in (0.0, 0.003):
        frame = rolling_tda_features(np.full(50, value), window=30)
        assert (frame.iloc[29:].to_numpy() == 0.0).all()


def test_features_at_t_ignore_later_data():
    returns = _noise(150, seed=3)
    changed = returns.copy()
    changed[100:] = _noise(50, seed=4, scale=0.05)
    a, b = rolling_tda_features(returns, window=50), rolling_tda_features(changed, window=50)
    pd.testing.assert_frame_equal(a.iloc[:100], b.iloc[:100])
    assert not np.allclose(a.iloc[100:].to_numpy(), b.iloc[100:].to_numpy())


def test_scale_and_shift_invariance():
    returns = _noise(120, seed=5)
    base = rolling_tda_features(returns, window=40)
    for transformed in (returns * 10.0, returns * 0.01, returns + 0.002):
        np.testing.assert_allclose(rolling_tda_features(transformed, window=40).to_numpy(), base.to_numpy(),
                                   rtol=1e-7, atol=1e-9)


def test_features_at_selected_ends_match_the_rolling_rows():
    returns = _noise(100, seed=6)
    rolling = rolling_tda_features(returns, window=30)
    picked = tda_features_at(returns, [10, 29, 64, 99], window=30)
    assert picked.iloc[0].isna().all()
    np.testing.assert_allclose(picked.iloc[1:].to_numpy(), rolling.iloc[[29, 64, 99]].to_numpy())


def test_session_features_one_row_per_session_at_its_close():
    sessions = np.repeat(np.array(["d1", "d2", "d3", "d4"]), 30)
    close = 100 * np.exp(np.cumsum(_noise(120, seed=7, scale=0.001)))
    open_ = close * (1 + _noise(120, seed=8, scale=0.0005))
    returns = session_log_returns(open_, close, sessions)
    # The first bar of each session is measured from its own open, never across the overnight gap.
    np.testing.assert_allclose(returns[30], np.log(close[30] / open_[30]))
    np.testing.assert_allclose(returns[31], np.log(close[31] / close[30]))
    frame = session_tda_features(returns, sessions, window=45)
    assert list(frame.index) == ["d1", "d2", "d3", "d4"]
    assert frame.loc["d1"].isna().all()
    expected = tda_features_at(returns, [59, 89, 119], window=45)
    np.testing.assert_allclose(frame.iloc[1:].to_numpy(), expected.to_numpy())


@pytest.mark.parametrize("kwargs, name", [
    (dict(window=500), "window"),
    (dict(window=11, dim=3, tau=1), "window"),
    (dict(dim=1), "dim"),
    (dict(tau=0), "tau"),
    (dict(window=20.5), "window"),
])
def test_bad_parameters_raise_one_clear_error(kwargs, name):
    with pytest.raises(TDAInputError, match=rf"\b{name}\b"):
        rolling_tda_features(_noise(100), **{"window": 30, **kwargs})


def test_window_longer_than_data_says_so():
    with pytest.raises(ValueError, match="longer than the data"):
        rolling_tda_features(_noise(59), window=60)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_returns_are_rejected_with_their_position(bad):
    returns = _noise(100)
    returns[17] = bad
    with pytest.raises(TDAInputError, match="log_returns.*position 17"):
        rolling_tda_features(returns, window=30)


def test_lagged_close_tda_row_k_ends_at_close_k_minus_1():
    from intelligence.tda import lagged_close_tda, min_lagged_closes
    close = 100.0 * np.exp(np.cumsum(_noise(40, seed=4)))
    lagged = lagged_close_tda(close, window=12, dim=3, tau=1)
    rolling = rolling_tda_features(np.diff(np.log(close)), window=12, dim=3, tau=1).to_numpy()
    assert lagged.shape == (40, len(TDA_COLUMNS)) and min_lagged_closes(12) == 13
    assert np.isnan(lagged[:13]).all() and np.isfinite(lagged[13:]).all()
    np.testing.assert_array_equal(lagged[2:], rolling[:-1])        # returns row k-2 ends at close k-1
    # The last close belongs to no row; changing it changes nothing, changing the one before does.
    bumped = close.copy()
    bumped[-1] *= 1.5
    np.testing.assert_array_equal(lagged_close_tda(bumped, window=12, dim=3, tau=1), lagged)
    bumped[-2] *= 1.5
    assert not np.array_equal(lagged_close_tda(bumped, window=12, dim=3, tau=1)[-1], lagged[-1])


def test_lagged_close_tda_short_or_bad_input():
    from intelligence.tda import lagged_close_tda
    assert np.isnan(lagged_close_tda(np.linspace(100, 110, 13), window=12)).all()
    with pytest.raises(TDAInputError, match="window=8 is too short"):
        lagged_close_tda(np.linspace(100, 110, 5), window=8)          # bad parameters still raise
    with pytest.raises(TDAInputError, match="first at position 3"):
        lagged_close_tda(np.r_[100.0, 101.0, 102.0, np.nan, 103.0], window=12)
