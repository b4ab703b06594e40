"""Access to Alpaca's APIs from any layer: the keys (environment or a JSON file outside the
repository, never logged) and the trading / market-data origins (validated overrides, paper by
default, the live-money URL only when asked). The live broker (``core.broker``) and the data
downloads (``data_factory.download_alpaca_matched``, ``intelligence/train_mamba.py --save-only``)
share it; ``data_factory`` and ``intelligence`` do not import ``core``, hence its place here.
Errors are ``AccessSetupError`` with one line saying what to do (``core.broker`` re-raises them as
``BrokerSetupError``)."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from data_factory.origins import checked_origin as _origin

PAPER_TRADING_URL = "https://paper-api.alpaca.markets"
LIVE_TRADING_URL = "https://api.alpaca.markets"
DATA_URL = "https://data.alpaca.markets"
KEY_ENV, SECRET_ENV = "APCA_API_KEY_ID", "APCA_API_SECRET_KEY"
TRADING_URL_ENV, DATA_URL_ENV = "APCA_API_BASE_URL", "APCA_API_DATA_URL"
# Where the credentials file is looked for when none is named (outside any repository).
DEFAULT_CREDENTIALS = Path("~/.config/condorbrain/alpaca.json")



class AccessSetupError(ValueError):
    """Alpaca cannot be reached as configured (keys, endpoints): nothing was sent."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    key_id: str
    secret_key: str = dataclasses.field(repr=False)      # never in a repr, a log or a run folder

    def __repr__(self) -> str:
        return f"Credentials(key_id={self.key_id[:4]}…)"


def load_credentials(environ: Mapping[str, str] = os.environ, path: str | None = None,
                     repository: Path | None = None) -> Credentials:
    """The API keys: ``APCA_API_KEY_ID`` / ``APCA_API_SECRET_KEY``, else a JSON file
    ``{"key_id": …, "secret_key": …}`` (``path``, or ``~/.config/condorbrain/alpaca.json``) that
    must lie outside the repository so keys never end up in a commit."""
    key, secret = environ.get(KEY_ENV, ""), environ.get(SECRET_ENV, "")
    if key or secret:
        if not (key and secret):
            missing = SECRET_ENV if key else KEY_ENV
            raise AccessSetupError(f"{missing} is not set (both {KEY_ENV} and {SECRET_ENV} are needed)")
        return Credentials(key, secret)
    file = Path(path).expanduser() if path else DEFAULT_CREDENTIALS.expanduser()
    if not file.is_file():
        raise AccessSetupError(f"no Alpaca keys: set {KEY_ENV} and {SECRET_ENV}, or write {{\"key_id\": …, "
                               f"\"secret_key\": …}} to {file} (outside the repository)")
    repository = (repository or Path(__file__).resolve().parent.parent).resolve()
    if file.resolve().is_relative_to(repository):
        raise AccessSetupError(f"{file}: a credentials file inside the repository ({repository}) could be "
                               f"committed; keep it outside, e.g. {DEFAULT_CREDENTIALS}")
    try:
        values = json.loads(file.read_text())
        key, secret = str(values["key_id"]), str(values["secret_key"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AccessSetupError(f"{file}: expected JSON {{\"key_id\": …, \"secret_key\": …}} ({type(error).__name__})"
                               ) from None
    if not (key and secret):
        raise AccessSetupError(f"{file}: key_id and secret_key must not be empty")
    return Credentials(key, secret)


@dataclasses.dataclass(frozen=True)
class Endpoints:
    trading_url: str
    data_url: str

    @property
    def live_money(self) -> bool:
        return self.trading_url == LIVE_TRADING_URL


def checked_origin(value: str, name: str) -> str:
    """``value`` as an origin alpaca-py can append ``/v2`` to (``data_factory.origins``)."""
    return _origin(value, name, AccessSetupError)


def endpoints_from_env(environ: Mapping[str, str] = os.environ, live_money: bool = False) -> Endpoints:
    """The trading and data origins: ``APCA_API_BASE_URL`` / ``APCA_API_DATA_URL`` when set
    (validated), else Alpaca's paper trading and data URLs; the live-money trading URL only with
    ``live_money``."""
    trading = environ.get(TRADING_URL_ENV)
    data = environ.get(DATA_URL_ENV)
    trading_url = checked_origin(trading, TRADING_URL_ENV) if trading is not None else (
        LIVE_TRADING_URL if live_money else PAPER_TRADING_URL)
    data_url = checked_origin(data, DATA_URL_ENV) if data is not None else DATA_URL
    if trading_url == LIVE_TRADING_URL and not live_money:
        raise AccessSetupError(f"{TRADING_URL_ENV} points at the live-money API ({LIVE_TRADING_URL}); "
                               f"that needs --live-money and a typed confirmation")
    if live_money and trading_url != LIVE_TRADING_URL:
        raise AccessSetupError(f"--live-money with {TRADING_URL_ENV}={trading_url}: the live-money API is "
                               f"{LIVE_TRADING_URL}")
    return Endpoints(trading_url, data_url)


# Requests

def timeout_session(seconds: float):
    """A requests Session whose every request has ``timeout=seconds`` unless one is given."""
    import requests

    class TimeoutSession(requests.Session):
        def request(self, method, url, **kwargs):
            kwargs.setdefault("timeout", seconds)
            return super().request(method, url, **kwargs)

    return TimeoutSession()


def describe_api_error(error) -> tuple[int | None, int | None, str]:
    """(HTTP status, Alpaca's numeric code, message) of an alpaca-py APIError; its ``code`` and
    ``message`` parse the body as JSON on every access and raise on an HTML error page."""
    status = getattr(error, "status_code", None)
    try:
        body = json.loads(str(error))
        return status, body.get("code"), str(body.get("message", body))
    except (ValueError, AttributeError):
        text = " ".join(str(error).split())
        return status, None, text[:200]
