"""`--mode live` refuses to start — one line, exit 2, no run folder, nothing sent — on every input it
cannot use: missing keys, a malformed or empty endpoint override, the live-money API without the
flag, settings the live driver cannot act on, live flags outside the live mode."""
from __future__ import annotations

import pytest

from core.main import main


def run_failing(args, tmp_path, capsys):
    """The CLI in-process in ``tmp_path``: (status, the 'error:' lines, all output), after checking
    that nothing was created there (no run folder, no journal)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    status = main([*args, "--out", str(tmp_path / "live")])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was left behind"
    return status, [line for line in text.splitlines() if "error:" in line], text

KEYS = {"APCA_API_KEY_ID": "AKTEST", "APCA_API_SECRET_KEY": "s3cr3t-value"}


@pytest.fixture
def clean_env(monkeypatch, tmp_path, tmp_path_factory):
    for name in ("APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "APCA_API_BASE_URL", "APCA_API_DATA_URL"):
        monkeypatch.delenv(name, raising=False)
    # No ~/.config/condorbrain/alpaca.json (a home of its own: libraries may write into it).
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.mark.parametrize("env, args, expected", [
    ({}, ["--mode", "live"], "no Alpaca keys"),
    ({}, ["--alpaca"], "no Alpaca keys"),                          # the seed's spelling alone
    ({"APCA_API_KEY_ID": "AKTEST"}, ["--mode", "live"], "APCA_API_SECRET_KEY is not set"),
    ({**KEYS, "APCA_API_BASE_URL": ""}, ["--mode", "live"], "set but empty"),
    ({**KEYS, "APCA_API_BASE_URL": "http://127.0.0.1:8080/v2"}, ["--mode", "live"], "origin only"),
    ({**KEYS, "APCA_API_DATA_URL": "127.0.0.1:8080"}, ["--mode", "live"], "expected http"),
    ({**KEYS, "APCA_API_BASE_URL": "https://api.alpaca.markets"}, ["--mode", "live"], "needs --live-money"),
    (KEYS, ["--mode", "live", "--live-money"], "typed confirmation"),        # no terminal to type on
    (KEYS, ["--mode", "live", "--enable-hedge"], "share hedges are not traded live"),
    (KEYS, ["--mode", "live", "--max-bars", "0"], "--max-bars 0"),
    (KEYS, ["--mode", "live", "--use-optimizer"], "--use-optimizer"),
    (KEYS, ["--mode", "live", "--fees", "ibkr"], "--fees shapes a backtest"),
    (KEYS, ["--mode", "live", "--bt-start", "2018-01-02"], "--bt-start shapes a backtest"),
    (KEYS, ["--dry-run"], "--dry-run is a live-mode flag"),
    (KEYS, ["--mode", "optimize", "--max-bars", "3"], "--max-bars is a live-mode flag"),
])
def test_the_live_mode_refuses_what_it_cannot_use_before_anything_is_sent(clean_env, tmp_path, capsys, env, args,
                                                                          expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    status, errors, text = run_failing(args, tmp_path, capsys)
    assert status == 2, text
    assert len(errors) == 1 and expected in errors[0], text
    assert "Traceback" not in text and "s3cr3t-value" not in text   # the secret is never printed


def test_holding_to_expiry_is_refused_live(clean_env, tmp_path, capsys):
    for name, value in KEYS.items():
        clean_env.setenv(name, value)
    config = tmp_path.parent / f"{tmp_path.name}-expiry.yaml"        # outside tmp_path: nothing left there
    config.write_text("exits: {dte_exit: 0}\n")
    status, errors, text = run_failing(["--mode", "live", "--config", str(config)], tmp_path, capsys)
    assert status == 2 and len(errors) == 1, text
    assert "exits.dte_exit = 0 (hold to expiry)" in errors[0] and "exercised into shares" in errors[0]
