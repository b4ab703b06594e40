"""Endpoint overrides given as environment variables (``APCA_API_BASE_URL``, ``IVOLATILITY_API_URL``
…): one check that a value is an http(s) origin a client can append its paths to. An empty value is
an error, never "use the default": alpaca-py treats an empty override as the real paper URL
(reference alpaca-api.md §11.1), so an unset variable in a test would reach a real server."""
from __future__ import annotations

from urllib.parse import urlsplit


def checked_origin(value: str, name: str, error: type[Exception] = ValueError) -> str:
    """``value`` as ``scheme://host[:port]``, or ``error`` saying what is wrong with it (naming the
    variable ``name``)."""
    text = value.strip()
    if not text:
        raise error(f"{name} is set but empty; unset it or give an origin such as http://127.0.0.1:8080")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error(f"{name}={value!r}: expected http(s)://host[:port]")
    try:
        parts.port
    except ValueError:
        raise error(f"{name}={value!r}: the port is not a number between 0 and 65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise error(f"{name}={value!r}: give the origin only (no path such as /v2, no query, no user)")
    return f"{parts.scheme}://{parts.netloc}"
