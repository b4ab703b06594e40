"""Alpaca, as the live driver sees it: credentials and endpoints checked before anything is sent,
every request with a timeout, rate limits waited out, repeated failures stopping the program
instead of hammering the API, and orders as plain dicts.

Built on alpaca-py's clients (``TradingClient``), with three things the SDK does not do
(``../shared/reference/alpaca-api.md`` §8, §11):

- **Timeouts.** The SDK calls ``requests`` without one, so a hung socket blocks forever: its
  session is replaced by one with a default timeout.
- **Retries.** The SDK retries only 429 and 504, with a fixed 3 s wait that ignores the rate-limit
  headers; here its own retry is off and ``_call`` retries reads after 429 / 5xx / timeouts with a
  backoff that honours ``Retry-After`` and ``X-Ratelimit-Reset``. An order submit is never retried
  blindly: when its outcome is unknown (timeout, 5xx, dropped connection) the caller looks the
  order up by its client id (``UncertainSubmit``).
- **Endpoint overrides.** ``TradingClient(url_override="")`` silently trades on the real paper
  account; an override here must be a well-formed origin or the run does not start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from core.config import ConfigError

from data_factory.alpaca_access import (  # noqa: E402  (re-exported: the broker's callers use them)
    DATA_URL, DEFAULT_CREDENTIALS, KEY_ENV, LIVE_TRADING_URL, PAPER_TRADING_URL, SECRET_ENV, TRADING_URL_ENV,
    DATA_URL_ENV, AccessSetupError, Credentials, Endpoints, describe_api_error, timeout_session,
)
from data_factory import alpaca_access as _access  # noqa: E402


class BrokerSetupError(ConfigError):
    """The broker cannot be used as configured (keys, endpoints, account): exit 2, nothing sent."""


class BrokerError(RuntimeError):
    """A request failed after the retries this module allows."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class UncertainSubmit(BrokerError):
    """An order submit whose outcome is unknown (no answer, or a server error): the order may or
    may not be at the broker. Look it up by client id; never send it blind again."""


class CircuitOpen(BrokerError):
    """Too many consecutive failed requests: no request is made until the cool-down passes."""


# ----------------------------------------------------------------------------------------------
# Credentials and endpoints
# ----------------------------------------------------------------------------------------------

def load_credentials(environ: Mapping[str, str] = os.environ, path: str | None = None,
                     repository: Path | None = None) -> Credentials:
    """``data_factory.alpaca_access.load_credentials``, its refusals as BrokerSetupError (exit 2)."""
    try:
        return _access.load_credentials(environ, path, repository)
    except AccessSetupError as error:
        raise BrokerSetupError(str(error)) from None


def checked_origin(value: str, name: str) -> str:
    """``value`` as an origin (``scheme://host[:port]``) alpaca-py can append ``/v2`` to, or a
    BrokerSetupError saying what is wrong with it (``data_factory.origins``)."""
    from data_factory.origins import checked_origin as origin

    return origin(value, name, BrokerSetupError)


def endpoints_from_env(environ: Mapping[str, str] = os.environ, live_money: bool = False) -> Endpoints:
    """``data_factory.alpaca_access.endpoints_from_env``, its refusals as BrokerSetupError."""
    try:
        return _access.endpoints_from_env(environ, live_money)
    except AccessSetupError as error:
        raise BrokerSetupError(str(error)) from None


# ----------------------------------------------------------------------------------------------
# Requests: timeout, retries, circuit breaker
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetryPolicy:
    attempts: int = 4                 # requests in all for a read (1 + 3 retries)
    base_wait: float = 0.5            # seconds, doubled per retry
    max_wait: float = 30.0            # a rate-limit reset further away than this is not waited for
    breaker_failures: int = 5         # consecutive failed requests that open the circuit
    breaker_cooldown: float = 60.0    # seconds the circuit stays open


class CircuitBreaker:
    """Counts consecutive failed requests; after ``failures`` of them every call fails at once
    (``CircuitOpen``) for ``cooldown`` seconds, then one request is let through to probe."""

    def __init__(self, failures: int, cooldown: float, now: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.cooldown = cooldown
        self._now = now
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trips = 0

    def check(self) -> None:
        if self.opened_at is not None:
            left = self.cooldown - (self._now() - self.opened_at)
            if left > 0:
                raise CircuitOpen(f"the API failed {self.consecutive} times in a row; no request for another "
                                  f"{left:.0f} s")
            self.opened_at = None           # half-open: the next request probes

    def success(self) -> None:
        self.consecutive = 0

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.failures and self.opened_at is None:
            self.opened_at = self._now()
            self.trips += 1


def _retry_after(error, policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait before retrying after ``error``: a 429's ``Retry-After`` or
    ``X-Ratelimit-Reset`` (epoch seconds) when given, else exponential backoff."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    wait = None
    if headers.get("Retry-After"):
        try:
            wait = float(headers["Retry-After"])
        except ValueError:
            wait = None
    elif headers.get("X-Ratelimit-Reset"):
        try:
            wait = float(headers["X-Ratelimit-Reset"]) - time.time()
        except ValueError:
            wait = None
    if wait is None or wait < 0:
        wait = policy.base_wait * (2 ** attempt)
    return min(wait, policy.max_wait)


# ----------------------------------------------------------------------------------------------
# The broker
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LegOrder:
    symbol: str
    side: str
    position_intent: str
    ratio_qty: int = 1


class AlpacaBroker:
    """Alpaca's trading API for the live driver. ``log(kind, message)`` hears about every retry
    and failure; ``sleep`` is replaceable for tests."""

    def __init__(self, credentials: Credentials, endpoints: Endpoints, timeout: float = 10.0,
                 policy: RetryPolicy | None = None, log: Callable[[str, str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        from alpaca.trading.client import TradingClient

        self.endpoints = endpoints
        self.policy = policy or RetryPolicy()
        self.breaker = CircuitBreaker(self.policy.breaker_failures, self.policy.breaker_cooldown)
        self._log = log or (lambda kind, message: None)
        self._sleep = sleep
        self.requests = 0
        override = None if endpoints.trading_url in (PAPER_TRADING_URL, LIVE_TRADING_URL) else endpoints.trading_url
        self.trading = TradingClient(credentials.key_id, credentials.secret_key, paper=not endpoints.live_money,
                                     url_override=override, raw_data=True)
        _harden(self.trading, timeout)

    # ---------------------------------------------------------------------------- the call path
    def _call(self, what: str, function: Callable, *args, submit: bool = False, not_found_ok: bool = False, **kwargs):
        """``function(*args, **kwargs)`` with the module's retry and breaker rules. A read is
        retried after 429, 5xx, timeouts and connection errors; a submit only after a 429 (the
        order was refused, so it was not placed) and otherwise raises UncertainSubmit. Returns
        None for a 404 when ``not_found_ok``."""
        import requests
        from alpaca.common.exceptions import APIError

        attempt = 0
        while True:
            self.breaker.check()
            self.requests += 1
            try:
                result = function(*args, **kwargs)
            except APIError as error:
                status, code, message = describe_api_error(error)
                if status == 404 and not_found_ok:
                    self.breaker.success()
                    return None
                retryable = status == 429 or (status is not None and status >= 500)
                if retryable:
                    self.breaker.failure()
                if submit and status is not None and status >= 500:
                    self._log("api_error", f"{what}: HTTP {status} ({message}); the order may have been placed")
                    raise UncertainSubmit(f"{what}: HTTP {status}: {message}", status, code) from None
                if retryable and attempt + 1 < self.policy.attempts:
                    wait = _retry_after(error, self.policy, attempt)
                    self._log("api_retry", f"{what}: HTTP {status} ({message}); retry {attempt + 1} in {wait:.1f} s")
                    self._sleep(wait)
                    attempt += 1
                    continue
                if not retryable:
                    self.breaker.success()     # the API answered; the request itself was wrong
                raise BrokerError(f"{what}: HTTP {status}: {message}", status, code) from None
            except (requests.Timeout, requests.ConnectionError) as error:
                self.breaker.failure()
                kind = "timed out" if isinstance(error, requests.Timeout) else "connection failed"
                if submit:
                    self._log("api_error", f"{what}: {kind}; the order may have been placed")
                    raise UncertainSubmit(f"{what}: {kind}") from None
                if attempt + 1 < self.policy.attempts:
                    wait = _retry_after(None, self.policy, attempt)
                    self._log("api_retry", f"{what}: {kind}; retry {attempt + 1} in {wait:.1f} s")
                    self._sleep(wait)
                    attempt += 1
                    continue
                raise BrokerError(f"{what}: {kind} after {self.policy.attempts} attempts") from None
            self.breaker.success()
            return result

    # ---------------------------------------------------------------------------- account
    def clock(self) -> dict:
        """The broker's market clock: ``timestamp``, ``is_open``, ``next_open``, ``next_close``
        (tz-aware Timestamps). Live time is the broker's, never this machine's."""
        import pandas as pd

        raw = self._call("clock", self.trading.get_clock)
        return {"timestamp": pd.Timestamp(raw["timestamp"]), "is_open": bool(raw["is_open"]),
                "next_open": pd.Timestamp(raw["next_open"]), "next_close": pd.Timestamp(raw["next_close"])}

    def account(self) -> dict:
        return self._call("account", self.trading.get_account)

    def positions(self) -> dict[str, int]:
        """Signed contracts per symbol (short negative), options and shares alike."""
        out = {}
        for row in self._call("positions", self.trading.get_all_positions):
            qty = int(float(row["qty"]))
            if row.get("side") == "short" and qty > 0:
                qty = -qty
            out[row["symbol"]] = qty
        return out

    # ---------------------------------------------------------------------------- orders
    def open_orders(self) -> list[dict]:
        from alpaca.trading.enums import QueryOrderStatus
        from alpaca.trading.requests import GetOrdersRequest

        return self._call("open orders", self.trading.get_orders,
                          GetOrdersRequest(status=QueryOrderStatus.OPEN, limit=500, nested=True))

    def order(self, order_id: str) -> dict:
        return self._call(f"order {order_id}", self.trading.get_order_by_id, order_id)

    def order_by_client_id(self, client_order_id: str) -> dict | None:
        """The order with this client id, or None when the broker has none (it was never placed)."""
        return self._call(f"order {client_order_id}", self.trading.get_order_by_client_id, client_order_id,
                          not_found_ok=True)

    def submit_mleg(self, client_order_id: str, legs: Iterable[LegOrder], quantity: int, limit_price: float) -> dict:
        """One multi-leg limit order (day): ``limit_price`` < 0 is a net credit, > 0 a net debit,
        in cents. Raises UncertainSubmit when the outcome is unknown, BrokerError when refused."""
        from alpaca.trading.enums import OrderClass, OrderSide, PositionIntent, TimeInForce
        from alpaca.trading.requests import LimitOrderRequest, OptionLegRequest

        price = round(float(limit_price), 2)
        if abs(price - float(limit_price)) > 1e-9:
            raise ValueError(f"limit price {limit_price!r} is not in cents")
        if price == 0.0:
            raise ValueError("a zero limit price is neither a credit nor a debit")
        request = LimitOrderRequest(
            qty=int(quantity), order_class=OrderClass.MLEG, time_in_force=TimeInForce.DAY, limit_price=price,
            client_order_id=client_order_id,
            legs=[OptionLegRequest(symbol=leg.symbol, ratio_qty=leg.ratio_qty, side=OrderSide(leg.side),
                                   position_intent=PositionIntent(leg.position_intent)) for leg in legs])
        return self._call(f"submit {client_order_id}", self.trading.submit_order, request, submit=True)

    def cancel(self, order_id: str) -> None:
        """Ask the broker to cancel; an order that is already done is not an error here (its
        final state is read afterwards)."""
        try:
            self._call(f"cancel {order_id}", self.trading.cancel_order_by_id, order_id)
        except BrokerError as error:
            if error.status != 422:            # "not cancelable": filled or canceled already
                raise


def _harden(client, timeout: float) -> None:
    # alpaca-py 0.44.0 has no timeout or retry settings (reference §8): its private session and
    # retry count are the only levers. A timeout on every request; the SDK's own fixed-wait
    # retry off, so AlpacaBroker._call decides what is retried and how long to wait.
    client._session = timeout_session(timeout)
    client._retry = 0
