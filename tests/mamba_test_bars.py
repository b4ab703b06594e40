"""Random-walk 5-minute bars shared by the DeepMamba data and training tests."""
from __future__ import annotations

import numpy as np
import pandas as pd

from intelligence import mamba_data as md


def make_bars(n_sessions=20, seed=0, start="2020-01-06", vol=0.0012):
    """Random-walk 5-minute bars, 78 per weekday session, tz-aware close times, plus an IV index."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range(start, periods=n_sessions)
    offsets = pd.to_timedelta(570 + 5 * np.arange(1, 79), unit="min")
    stamps = pd.DatetimeIndex([d + o for d in days for o in offsets]).tz_localize(md.EXCHANGE_TZ)
    n = len(stamps)
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol, n)))
    open_ = np.r_[100.0, close[:-1]]
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, vol / 2, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, vol / 2, n)))
    volume = rng.integers(100_000, 1_000_000, n).astype(float)
    bars = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume},
                        index=pd.DatetimeIndex(stamps, name="timestamp"))
    iv = 15 + 5 * np.sin(np.arange(n) / 500.0)
    return bars, iv
