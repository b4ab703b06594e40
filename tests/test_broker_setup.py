"""What the live driver checks before it talks to Alpaca — keys, endpoint overrides, the live-money
guard — and the order desk's pricing rules (cents toward the natural price, Alpaca's sign
convention), the circuit breaker and the API-error reading. No server here; the broker against a
local imitation of Alpaca is tested in tests/test_live_orders.py."""
from __future__ import annotations

import json

import pytest

from core.broker import (
    LIVE_TRADING_URL,
    PAPER_TRADING_URL,
    BrokerSetupError,
    CircuitBreaker,
    CircuitOpen,
    checked_origin,
    describe_api_error,
    endpoints_from_env,
    load_credentials,
)
from core.live_orders import UnitPrices, attempt_price, is_option_of, signed_limit


def test_keys_come_from_the_environment_or_a_file_outside_the_repository(tmp_path):
    keys = load_credentials({"APCA_API_KEY_ID": "AKTEST", "APCA_API_SECRET_KEY": "s3cret"})
    assert keys.key_id == "AKTEST" and "s3cret" not in repr(keys)
    with pytest.raises(BrokerSetupError, match="APCA_API_SECRET_KEY is not set"):
        load_credentials({"APCA_API_KEY_ID": "AKTEST"})
    with pytest.raises(BrokerSetupError, match="no Alpaca keys"):
        load_credentials({}, path=str(tmp_path / "missing.json"))
    outside = tmp_path / "alpaca.json"
    outside.write_text(json.dumps({"key_id": "AKFILE", "secret_key": "x"}))
    assert load_credentials({}, path=str(outside), repository=tmp_path / "repo").key_id == "AKFILE"
    inside = tmp_path / "repo" / "alpaca.json"
    inside.parent.mkdir()
    inside.write_text(outside.read_text())
    with pytest.raises(BrokerSetupError, match="inside the repository"):
        load_credentials({}, path=str(inside), repository=tmp_path / "repo")
    outside.write_text("{not json")
    with pytest.raises(BrokerSetupError, match="expected JSON"):
        load_credentials({}, path=str(outside), repository=tmp_path / "repo")


@pytest.mark.parametrize("value, problem", [
    ("", "set but empty"), ("   ", "set but empty"), ("127.0.0.1:8080", "expected http"),
    ("ftp://host", "expected http"), ("http://host/v2", "origin only"), ("http://host:99999", "port"),
    ("http://host?x=1", "origin only"),
])
def test_a_malformed_endpoint_override_is_refused_with_the_reason(value, problem):
    with pytest.raises(BrokerSetupError, match=problem):
        checked_origin(value, "APCA_API_BASE_URL")


def test_endpoints_default_to_paper_and_live_money_needs_the_flag():
    assert endpoints_from_env({}).trading_url == PAPER_TRADING_URL
    local = endpoints_from_env({"APCA_API_BASE_URL": "http://127.0.0.1:8080/", "APCA_API_DATA_URL": "http://127.0.0.1:8080"})
    assert local.trading_url == "http://127.0.0.1:8080" and not local.live_money
    with pytest.raises(BrokerSetupError, match="live-money"):
        endpoints_from_env({"APCA_API_BASE_URL": LIVE_TRADING_URL})
    assert endpoints_from_env({}, live_money=True).live_money
    with pytest.raises(BrokerSetupError, match="--live-money"):
        endpoints_from_env({"APCA_API_BASE_URL": "http://127.0.0.1:1"}, live_money=True)


def test_attempts_step_from_mid_to_natural_rounded_toward_natural():
    credit = UnitPrices(mid=1.50, natural=1.205)
    prices = [attempt_price(credit, k, 4, credit=True) for k in range(4)]
    assert prices == [1.50, 1.40, 1.30, 1.20]             # 1.4017 -> 1.40, 1.3033 -> 1.30, 1.205 -> 1.20
    debit = UnitPrices(mid=0.705, natural=0.90)
    assert [attempt_price(debit, k, 3, credit=False) for k in range(3)] == [0.71, 0.81, 0.90]
    assert attempt_price(UnitPrices(0.001, 0.004), 0, 4, credit=False) == 0.01   # bought back at a cent
    assert attempt_price(UnitPrices(1.0, 0.9), 5, 1, credit=True) == 0.90       # one step: the natural price


def test_the_limit_sign_follows_alpaca_and_bad_prices_are_not_sent():
    assert signed_limit(1.45, credit=True) == -1.45 and signed_limit(0.70, credit=False) == 0.70
    for bad in (0.0, -1.0, float("nan"), 1.234):
        with pytest.raises(ValueError):
            signed_limit(bad, credit=True)


def test_occ_symbols_of_the_underlying():
    assert is_option_of("SPY261218P00580000", "SPY")
    assert not is_option_of("SPY", "SPY") and not is_option_of("SPYG", "SPY")
    assert not is_option_of("QQQ261218P00580000", "SPY") and not is_option_of("SPY261218X00580000", "SPY")


def test_the_circuit_opens_after_repeated_failures_and_probes_after_the_cooldown():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown=60, now=lambda: now[0])
    for _ in range(2):
        breaker.failure()
    breaker.check()                                     # still closed after 2
    breaker.success()
    for _ in range(3):
        breaker.failure()
    with pytest.raises(CircuitOpen, match="3 times in a row"):
        breaker.check()
    now[0] = 59.0
    with pytest.raises(CircuitOpen):
        breaker.check()
    now[0] = 61.0
    breaker.check()                                     # half-open: one request may probe
    assert breaker.trips == 1


def test_an_html_error_body_is_read_without_raising():
    class FakeError(Exception):
        status_code = 502

    status, code, message = describe_api_error(FakeError("<html><body><h1>502 Bad Gateway</h1></body></html>"))
    assert (status, code) == (502, None) and "Bad Gateway" in message
    status, code, message = describe_api_error(FakeError('{"code": 40010001, "message": "client_order_id must be unique"}'))
    assert code == 40010001 and "unique" in message
