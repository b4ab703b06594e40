"""Canonical chain tables for the user-data tests, cut from the synthetic provider: realistic
quotes and Greeks of every listed contract, at one snapshot time per session (an EOD vendor
file) or several, without shipping vendor data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from data_factory.canonical import CHAIN_SCHEMA, EXCHANGE_TZ
from data_factory.option_chain import SyntheticChainProvider


def canonical_from_slices(slices, source: str = "synthetic-fixture", underlying: str = "SPY",
                          drop_greeks: bool = False) -> pa.Table:
    """CHAIN_SCHEMA rows of ``ChainSlice`` objects (``drop_greeks``: IV and Greeks left empty, as
    a vendor without calcs)."""
    parts = []
    for chain in slices:
        n = len(chain)
        nan = np.full(n, np.nan)
        parts.append({
            "quote_time": np.full(n, chain.quote_time_ns, dtype=np.int64),
            "underlying": np.full(n, underlying, dtype=object),
            "underlying_price": np.full(n, chain.spot),
            "expiration": chain.expiration.astype("datetime64[D]"),
            "settlement": np.full(n, "PM", dtype=object),
            "strike": chain.strike, "option_type": np.where(chain.is_call, "C", "P").astype(object),
            "bid": chain.bid, "ask": chain.ask, "last": nan,
            "volume": np.zeros(n, dtype=np.int64), "open_interest": np.zeros(n, dtype=np.int64),
            "iv": nan if drop_greeks else chain.iv, "delta": nan if drop_greeks else chain.delta,
            "gamma": nan if drop_greeks else chain.gamma, "theta": nan if drop_greeks else chain.theta,
            "vega": nan if drop_greeks else chain.vega, "source": np.full(n, source, dtype=object),
        })
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    arrays = []
    for field in CHAIN_SCHEMA:
        values = columns[field.name]
        if field.name == "quote_time":
            arrays.append(pa.array(values, pa.timestamp("ns", tz="UTC")).cast(field.type))
        elif field.name == "expiration":
            arrays.append(pa.array(values, pa.date32()))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=CHAIN_SCHEMA)


def synthetic_eod_chain(start: str, end: str, time: str = "15:45", dte_max: int = 60, seed: int = 42,
                        drop_greeks: bool = False) -> tuple[pa.Table, SyntheticChainProvider]:
    """One snapshot per session at ``time`` (America/New_York) from ``start`` to ``end``: the
    chain rows with 0 … dte_max DTE, and the provider they came from."""
    provider = SyntheticChainProvider.from_embedded(start=start, end=end, seed=seed)
    times = provider.bar_times
    wanted = [stamp for stamp in times if stamp.strftime("%H:%M") == time]
    bars = [int(times.get_loc(stamp)) for stamp in wanted]
    slices = [provider.slice_at(bar, dte_min=0, dte_max=dte_max) for bar in bars]
    return canonical_from_slices(slices, drop_greeks=drop_greeks), provider


def snapshot_times(table: pa.Table) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.unique(table.column("quote_time").to_numpy())).tz_convert(EXCHANGE_TZ)


OPTIONSDX_HEADER = ("QUOTE_UNIXTIME", "QUOTE_READTIME", "QUOTE_DATE", "QUOTE_TIME_HOURS", "UNDERLYING_LAST",
                    "EXPIRE_DATE", "EXPIRE_UNIX", "DTE", "C_DELTA", "C_GAMMA", "C_VEGA", "C_THETA", "C_RHO", "C_IV",
                    "C_VOLUME", "C_LAST", "C_SIZE", "C_BID", "C_ASK", "STRIKE", "P_BID", "P_ASK", "P_SIZE", "P_LAST",
                    "P_DELTA", "P_GAMMA", "P_VEGA", "P_THETA", "P_RHO", "P_IV", "P_VOLUME", "STRIKE_DISTANCE",
                    "STRIKE_DISTANCE_PCT")


def write_optionsdx(slices, path) -> int:
    """An OptionsDX EOD text file (wide: one line per expiration and strike with the call and the
    put, ``", "`` separated, bracketed headers) of ``ChainSlice`` snapshots; returns its lines."""
    lines = [", ".join(f"[{name}]" for name in OPTIONSDX_HEADER)]
    for chain in slices:
        stamp = chain.quote_time
        unix = int(chain.quote_time_ns // 10**9)
        by_key = {}
        for i in range(len(chain)):
            by_key.setdefault((str(chain.expiration[i]), float(chain.strike[i])), {})[bool(chain.is_call[i])] = i
        for (expiry, strike), pair in sorted(by_key.items()):
            if len(pair) != 2:
                continue
            c, p = pair[True], pair[False]
            expire = pd.Timestamp(expiry).tz_localize(EXCHANGE_TZ) + pd.Timedelta(hours=16)
            row = {"QUOTE_UNIXTIME": unix, "QUOTE_READTIME": f"{stamp:%Y-%m-%d %H:%M}", "QUOTE_DATE": f"{stamp:%Y-%m-%d}",
                   "QUOTE_TIME_HOURS": f"{stamp.hour + stamp.minute / 60:.6f}", "UNDERLYING_LAST": f"{chain.spot:.2f}",
                   "EXPIRE_DATE": expiry, "EXPIRE_UNIX": int(expire.timestamp()), "DTE": f"{chain.dte[c]:.2f}",
                   "C_RHO": "", "P_RHO": "", "C_VOLUME": "", "P_VOLUME": "", "C_LAST": "", "P_LAST": "",
                   "C_SIZE": "1 x 1", "P_SIZE": "1 x 1", "STRIKE": f"{strike:.1f}",
                   "STRIKE_DISTANCE": f"{abs(strike - chain.spot):.1f}",
                   "STRIKE_DISTANCE_PCT": f"{abs(strike - chain.spot) / chain.spot:.3f}"}
            for side, i in (("C", c), ("P", p)):
                row.update({f"{side}_BID": f"{chain.bid[i]:.2f}", f"{side}_ASK": f"{chain.ask[i]:.2f}",
                            f"{side}_IV": f"{chain.iv[i]:.5f}", f"{side}_DELTA": f"{chain.delta[i]:.5f}",
                            f"{side}_GAMMA": f"{chain.gamma[i]:.5f}", f"{side}_VEGA": f"{chain.vega[i]:.5f}",
                            f"{side}_THETA": f"{chain.theta[i]:.5f}"})
            lines.append(", ".join(str(row[name]) for name in OPTIONSDX_HEADER))
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")
    return len(lines) - 1
