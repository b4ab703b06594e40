"""IVolatility end-of-day option quotes with Greeks → monthly CSV files in IVolatility's EOD raw-IV
layout (``data_factory.vendor_formats`` format ``ivolatility``, so ``--mode ingest``, the merge step
and the intraday expansion read them as they are).

    export IVOLATILITY_API_KEY=...            # or --api-key-file ~/.config/condorbrain/ivolatility.key
    python data_factory/download_ivolatility_options.py --symbol SPY --start 2018-01-02 --end 2018-12-31
    python data_factory/download_ivolatility_options.py --symbol SPY --start 2018-01-02 --end 2018-03-30 \
        --per-day 0 --dte-max 50 --out data/ivolatility

What IVolatility's REST API looks like (sources, with confidence tags as in
``shared/reference/data-formats.md``)
-------------------------------------------------------------------------------------------------
Sources: the OpenAPI document IVolatility publishes in github.com/IVolatility-com/API-docs
(``rest-api-ivlive-dev_formatted.json``, "[V]" below); the ``ivolatility`` Python package
(``setLoginParams`` / ``setMethod``; its source as vendored in several public repositories, "[S]");
third-party loaders that agree with each other ("[S]"); "[U]" = not confirmed by any source.

* Base URL ``https://restapi.ivolatility.com`` [V]. Every endpoint is a GET with query parameters [V].
* Authentication: the package sends the API key in an ``apiKey`` HTTP header [S]; some loaders send
  ``?apiKey=`` instead [S]; the OpenAPI document only shows username/password/token [V]. This module
  sends the header only (a key in a URL ends up in logs and error messages), and only to the API's
  own host or a host of the same domain (the download links of prepared files); redirects are
  followed here, so the header never travels to another site. What the server answers to a bad
  key is [U]: 401 and 403 are both read as "the key was refused".
* Endpoint used: ``GET /equities/eod/options-rawiv?symbol=SPY&from=YYYY-MM-DD&to=YYYY-MM-DD`` (or
  ``date=``), ``region`` optional (USA default) [V]: the whole EOD chain of the symbol for each
  trading date, with NBBO bid/ask, IV and Greeks [V]. It has no "nearest N contracts" parameter
  [V: its parameter list], so the chain is downloaded and the ``--per-day`` contracts nearest the
  money are kept here. (One loader reports this endpoint answers 403 on retail/trial plans and uses
  ``/equities/eod/stock-opts-by-param`` — one trade date and one side per request, with
  ``dteFrom/dteTo/moneynessFrom/moneynessTo/cp`` — instead [S]; not implemented here, but its field
  names, ``c_date, expiration_date, price_strike, call_put, Bid, Ask, underlying_price,
  openinterest`` [S], are among the aliases below.)
* Response fields of ``options-rawiv`` (schema ``EodEquityRawIv``) [V]: ``symbol, exchange, date,
  expiration, strike, style, ask, bid, iv, volume, delta, vega, gamma, theta, rho, record_no,
  adjusted_close, option_symbol, call/put, mean_price, open_interest, stock_price_for_iv, *``.
  The same document's example for ``single-stock-option-raw-iv`` spells names with spaces and
  capitals (``option symbol``, ``Call/Put``, ``Adjusted close``, ``open interest``) [V], and the
  header of the prepared CSV files is [U]. So fields are matched BY NAME after normalising
  (lower case, ``_`` and runs of spaces → one space) against ``FIELD_ALIASES``; a response without
  one of ``REQUIRED_FIELDS`` is a ``DataError`` naming the field and listing the fields it has.
  Dates come as ``yyyy-mm-dd`` [V] (``yyyy-mm-dd 00:00:00`` on other endpoints [V]); ``mm/dd/yyyy``
  is accepted too. Greek units are [U] (written through as given, as the CSV loader assumes).
* Large results are prepared asynchronously [V]: "more than 500 records" → HTTP 200 with JSON
  ``{"status": {"code": "PENDING", "recordsFound": n, "urlForDetails": URL, "queriesLeftEOD": …},
  "query": {"requestUUID": …}, "data": []}`` [V]. The package then polls ``urlForDetails`` until it
  answers ``[{"meta": {"status": "COMPLETE"}, "data": [{"urlForDownload": URL}]}]`` and downloads
  a gzip-compressed CSV [S]; a ``COMPLETE`` answer whose ``data`` is still empty is polled again
  [S]. ``urlForDetails`` may be absolute or relative to the API [V: both appear in the document].
  Smaller results come inline in ``data`` [V]; ``204`` = no data for the request [V]; ``400`` =
  parameters not valid [V]; ``500`` = server error [V]. The package also accepts ``text/csv`` and
  bzip2 bodies [S]: CSV (plain or gzip) is read here, bzip2 is [U] and refused with a message.
* Rate limits: [U] in every source. ``status.queriesLeftEOD`` counts a quota [V]; one loader waits
  1.1 s between requests for the "Builder" plan's "1 request/second" [S]. Here: at least
  ``--request-interval`` seconds (default 1.0) between any two requests (polls included); a 429
  waits its ``Retry-After`` (seconds or an HTTP date; backoff when absent), 5xx / timeouts / dropped
  connections back off (1, 2, 4 … s, at most ``MAX_WAIT``), all capped at ``--max-attempts``
  requests per call; a refused connection or an unknown host is not retried ("cannot reach …").

Output (one file per month, resumable)
--------------------------------------
``OUT/<symbol>_options_ivol_YYYY-MM.csv`` with exactly the EOD raw-IV columns ``OUTPUT_COLUMNS``
(dates ``mm/dd/yyyy``, ``call/put`` C/P, ``mean price`` = the vendor's or (bid + ask)/2, fields the
API does not send left blank), rows ordered by date, expiration, strike, type — the order the CSV
loader expects. Per session only the ``--per-day`` contracts nearest the money are kept (0 = all):
contracts with ``--dte-min ≤ expiration − date ≤ --dte-max`` calendar days, ranked by
|strike − stock price for iv|, ties by DTE, then puts before calls — the seed's "Top 100 ATM/day".
NOTE: 100 contracts across every expiration in the window is a few strikes each side of the money;
iron-condor wings (~0.15 delta, several % out of the money) need ``--per-day 0`` or a narrower DTE
window.

Each month is downloaded with one request (``from``/``to`` = its sessions in the range), written to
a hidden temporary name and renamed, then recorded in ``OUT/ivolatility_manifest.json`` (replaced
atomically). A rerun skips months the manifest records as complete for the same settings and a
range covering the request (and whose file is still there, same size); ``--force`` downloads them
again. A month with no rows at all is recorded (no file). Sessions the API returned no rows for are
listed in the manifest and the summary — never filled in; when one of them is within ``RECENT_DAYS``
of today (perhaps not published yet) the month is not recorded complete, so the next run asks
again. ``--end`` is clipped to today (New York).

Configuration: ``IVOLATILITY_API_KEY`` or ``--api-key-file PATH`` (the key as the file's text, or
JSON ``{"api_key": …}``; the file must lie outside the repository; the key is never printed or
written). ``IVOLATILITY_API_URL`` overrides the base URL: an http(s) origin (no path); an empty
value is an error, never "use the default". Exit status 0 done, 2 anything else (one ``error:``
line; completed months are kept, so a rerun resumes).
"""
from __future__ import annotations

import sys
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python data_factory/download_ivolatility_options.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as dt  # noqa: E402
import email.utils  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from urllib.parse import urljoin, urlsplit  # noqa: E402

from data_factory.errors import DataError  # noqa: E402

DEFAULT_API_URL = "https://restapi.ivolatility.com"
API_KEY_ENV = "IVOLATILITY_API_KEY"
API_URL_ENV = "IVOLATILITY_API_URL"
ENDPOINT = "/equities/eod/options-rawiv"
DEFAULT_OUT = Path("data") / "ivolatility"
MANIFEST = "ivolatility_manifest.json"
MANIFEST_VERSION = 1
DEFAULT_PER_DAY = 100
DEFAULT_DTE_MIN, DEFAULT_DTE_MAX = 0, 60
DEFAULT_INTERVAL = 1.0            # seconds between two requests (the strictest plan's 1 request/second [S])
DEFAULT_ATTEMPTS = 5              # requests per call at most (1 + 4 retries)
BASE_WAIT = 1.0                   # first backoff, doubled per retry
MAX_WAIT = 60.0                   # a longer Retry-After is not waited out: the run stops (resumable)
RECENT_DAYS = 3                   # sessions this close to today may not be published yet
POLL_TIMEOUT = 600.0              # seconds a prepared file may take (the package's fileDownloadTimeout [S])
MAX_REDIRECTS = 5
REQUEST_TIMEOUT = 120.0           # seconds per HTTP request (the package's requestTimeout [S])

# The EOD raw-IV CSV layout (data-formats.md §2.3), in its column order.
OUTPUT_COLUMNS = ("symbol", "exchange", "date", "adjusted close", "option symbol", "expiration", "strike",
                  "call/put", "style", "ask", "bid", "mean price", "iv", "volume", "open interest",
                  "stock price for iv", "*", "delta", "vega", "gamma", "theta", "rho")
# Output column → the response names it is read from (normalised by ``_norm``), first match wins.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol", "stock symbol", "underlying symbol"),
    "exchange": ("exchange",),
    "date": ("date", "c date", "trade date", "tradedate"),
    "adjusted close": ("adjusted close",),
    "option symbol": ("option symbol", "optionsymbol"),
    "expiration": ("expiration", "expiration date", "expirationdate", "expdate"),
    "strike": ("strike", "price strike"),
    "call/put": ("call/put", "call put", "callput", "cp"),
    "style": ("style",),
    "ask": ("ask",),
    "bid": ("bid",),
    "mean price": ("mean price",),
    "iv": ("iv",),
    "volume": ("volume",),
    "open interest": ("open interest", "openinterest"),
    "stock price for iv": ("stock price for iv", "underlying price", "unadjusted close"),
    "*": ("*",),
    "delta": ("delta",),
    "vega": ("vega",),
    "gamma": ("gamma",),
    "theta": ("theta",),
    "rho": ("rho",),
}
REQUIRED_FIELDS = ("date", "expiration", "strike", "call/put", "bid", "ask", "iv", "stock price for iv",
                   "delta", "gamma", "theta", "vega")
_DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%m/%d/%Y", "%m/%d/%y",
                 "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M")


class IVolatilitySetupError(ValueError):
    """The download cannot start or was refused as configured: no key, bad URL, key refused."""


class IVolatilityDownloadError(RuntimeError):
    """The API could not be reached, kept failing, or answered something unusable."""


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name).strip().lower())


# ============================================================================== configuration
def load_api_key(environ: Mapping[str, str] = os.environ, key_file: str | os.PathLike | None = None,
                 repository: Path | None = None) -> str:
    """The API key: ``key_file`` (the key as text, or JSON ``{"api_key": …}``; must lie outside the
    repository) when given, else ``IVOLATILITY_API_KEY``. IVolatilitySetupError (never showing the
    key) when there is none."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise IVolatilitySetupError(f"--api-key-file {path}: no such file")
        repository = (repository or _PROJECT_ROOT).resolve()
        if path.resolve().is_relative_to(repository):
            raise IVolatilitySetupError(f"--api-key-file {path}: a key file inside the repository ({repository}) "
                                        f"could be committed; keep it outside, e.g. ~/.config/condorbrain/")
        try:
            text = path.read_text().strip()
        except OSError as error:
            raise IVolatilitySetupError(f"--api-key-file {path}: cannot read it ({type(error).__name__})") from None
        if text.startswith("{"):
            try:
                text = str(json.loads(text)["api_key"]).strip()
            except (ValueError, KeyError, TypeError):
                raise IVolatilitySetupError(f"--api-key-file {path}: expected the key, or JSON "
                                            f"{{\"api_key\": …}}") from None
        if not text or any(c.isspace() for c in text):
            raise IVolatilitySetupError(f"--api-key-file {path}: expected one key (no spaces, not empty)")
        return text
    value = environ.get(API_KEY_ENV)
    if value is None:
        raise IVolatilitySetupError(f"no IVolatility API key: set {API_KEY_ENV} or give --api-key-file PATH "
                                    f"(a file outside the repository)")
    if not value.strip():
        raise IVolatilitySetupError(f"{API_KEY_ENV} is set but empty")
    return value.strip()


def api_url(environ: Mapping[str, str] = os.environ) -> str:
    """The API origin: ``IVOLATILITY_API_URL`` when set (validated), else the real one."""
    value = environ.get(API_URL_ENV)
    if value is None:
        return DEFAULT_API_URL
    from data_factory.origins import checked_origin

    return checked_origin(value, API_URL_ENV, IVolatilitySetupError)


# ============================================================================== the HTTP client
def _message_of(response) -> str:
    """A short one-line reason from an error answer (JSON ``message``/``status``, or its text)."""
    text = ""
    try:
        payload = response.json()
        if isinstance(payload, dict):
            status = payload.get("status")
            text = str(payload.get("message") or payload.get("error")
                       or (status.get("message") if isinstance(status, dict) else status) or "")
    except ValueError:
        text = response.text or ""
    text = " ".join(text.split())
    if text.lstrip().startswith("<"):          # an HTML error page says nothing useful on one line
        text = ""
    return text[:200]


def _unreachable(error: BaseException) -> str | None:
    """'connection refused' / 'unknown host' when ``error`` happened before any connection was
    made (nothing to retry), else None."""
    import urllib3.exceptions as u3

    seen, stack = set(), [error]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, u3.NameResolutionError) or isinstance(item, OSError) and "resolve" in str(item).lower():
            return "unknown host"
        if isinstance(item, ConnectionRefusedError) or (isinstance(item, u3.NewConnectionError)
                                                        and "refused" in str(item).lower()):
            return "connection refused"
        stack.extend([getattr(item, "reason", None), item.__cause__, item.__context__,
                      *[a for a in getattr(item, "args", ()) if isinstance(a, BaseException)]])
    return None


def _retry_after(response, now: Callable[[], float] = time.time) -> float | None:
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


@dataclass
class RequestStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    waited_s: float = 0.0
    queries_left: int | None = None       # the last status.queriesLeftEOD seen


class IVolatilityClient:
    """GETs against the API with pacing, retries and the asynchronous-file protocol (module
    docstring). ``sleep``/``clock`` are injectable for tests."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_API_URL, request_interval: float = DEFAULT_INTERVAL,
                 attempts: int = DEFAULT_ATTEMPTS, base_wait: float = BASE_WAIT, max_wait: float = MAX_WAIT,
                 poll_timeout: float = POLL_TIMEOUT, timeout: float = REQUEST_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        import requests

        if not api_key:
            raise IVolatilitySetupError("no IVolatility API key")
        if attempts < 1:
            raise IVolatilitySetupError("--max-attempts must be at least 1")
        if request_interval < 0:
            raise IVolatilitySetupError("--request-interval must not be negative")
        self._key = api_key
        self.base_url = base_url.rstrip("/")
        self._base_host = (urlsplit(self.base_url).hostname or "").lower()
        self.request_interval = float(request_interval)
        self.attempts = int(attempts)
        self.base_wait = float(base_wait)
        self.max_wait = float(max_wait)
        self.poll_timeout = float(poll_timeout)
        self.timeout = float(timeout)
        self._sleep, self._clock = sleep, clock
        self._last_start: float | None = None
        self.stats = RequestStats()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "condorbrain-ivolatility-downloader/1"

    def __repr__(self) -> str:                       # never the key
        return f"IVolatilityClient({self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    # ---------------------------------------------------------------- plumbing
    def _same_site(self, url: str) -> bool:
        """Whether the key may be sent to ``url``: the API's host, or (for a domain name) a host of
        the same registrable-looking domain (the last two labels: cloud.ivolatility.com)."""
        host = (urlsplit(url).hostname or "").lower()
        if host == self._base_host:
            return True
        try:
            ipaddress.ip_address(host)
            return False
        except ValueError:
            pass
        tail = lambda name: ".".join(name.split(".")[-2:])
        return "." in self._base_host and tail(host) == tail(self._base_host)

    def _pace(self) -> None:
        if self._last_start is not None and self.request_interval > 0:
            wait = self._last_start + self.request_interval - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_start = self._clock()

    def _wait(self, seconds: float) -> None:
        self.stats.waited_s += seconds
        self._sleep(seconds)

    def _backoff(self, attempt: int, wait: float | None = None) -> None:
        """Before retry ``attempt + 1``: ``wait`` (a Retry-After) or base_wait·2^(attempt−1), at
        most ``max_wait``; nothing after the last attempt."""
        if attempt < self.attempts:
            self._wait(wait if wait is not None else min(self.max_wait, self.base_wait * 2 ** (attempt - 1)))

    def get(self, url: str, params: dict | None = None, what: str | None = None):
        """One GET with pacing and retries; the response (2xx) or an exception with one line."""
        import requests

        what = what or urlsplit(url).path
        problem = ""
        attempt = 0
        redirects = 0
        while attempt < self.attempts:
            attempt += 1
            if attempt > 1:
                self.stats.retries += 1
            self._pace()
            self.stats.requests += 1
            # Redirects are followed here, not by requests: the key header must not travel to
            # another site (requests only strips Authorization on a cross-host redirect).
            key_ok = self._same_site(url)
            try:
                response = self._session.get(url, params=params, headers={"apiKey": self._key} if key_ok else {},
                                             timeout=self.timeout, allow_redirects=False)
            except requests.ConnectionError as error:
                reason = _unreachable(error)
                if reason is not None:
                    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
                    raise IVolatilityDownloadError(f"cannot reach {origin} ({reason}); check the network or "
                                                   f"{API_URL_ENV}") from None
                problem = f"the connection failed ({type(error).__name__})"
                self._backoff(attempt)
                continue
            except requests.Timeout:
                problem = f"no answer within {self.timeout:g} s"
                self._backoff(attempt)
                continue
            status = response.status_code
            if status < 300:
                return response
            location = response.headers.get("Location")
            if status in (301, 302, 303, 307, 308) and location:
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise IVolatilityDownloadError(f"{what}: more than {MAX_REDIRECTS} redirects")
                url, params = urljoin(url, location), None
                attempt -= 1                         # a redirect is not a failed attempt
                continue
            message = _message_of(response)
            detail = f": {message}" if message else ""
            if status in (401, 403) and not key_ok:
                raise IVolatilityDownloadError(f"{urlsplit(url).hostname} answered HTTP {status} to {what}{detail}")
            if status in (401, 403):
                raise IVolatilitySetupError(f"IVolatility refused the API key (HTTP {status}{detail}); check "
                                            f"{API_KEY_ENV} / --api-key-file and that your plan includes {what}")
            if status == 429:
                self.stats.rate_limited += 1
                wait = _retry_after(response)
                if wait is not None and wait > self.max_wait:
                    raise IVolatilityDownloadError(f"IVolatility's rate limit asks to wait {wait:.0f} s (more than "
                                                   f"{self.max_wait:.0f} s); rerun later to resume")
                problem = f"HTTP 429 (rate limited){detail}"
                self._backoff(attempt, wait)
                continue
            if status >= 500:
                self.stats.server_errors += 1
                problem = f"HTTP {status}{detail}"
                self._backoff(attempt)
                continue
            raise IVolatilityDownloadError(f"IVolatility answered HTTP {status} to {what}{detail}")
        raise IVolatilityDownloadError(f"IVolatility {what}: {problem} on all {self.attempts} attempts; what was "
                                       f"complete is kept, rerun to resume")

    # ---------------------------------------------------------------- rows
    def fetch_rows(self, endpoint: str, params: dict, on_status: Callable[[str], None] | None = None) -> list[dict]:
        """The rows ``endpoint`` answers for ``params``: inline JSON, a prepared (async) file, a CSV
        body, or none (204)."""
        response = self.get(self.base_url + endpoint, params, what=endpoint)
        if response.status_code == 204 or not response.content.strip():
            return []
        return self._rows_of(response, endpoint, on_status)

    def _rows_of(self, response, what: str, on_status) -> list[dict]:
        content = response.content
        if content[:2] == b"\x1f\x8b":
            return _csv_rows(gzip.decompress(content), what)
        if content[:3] == b"BZh":
            raise IVolatilityDownloadError(f"{what}: a bzip2 body, which this downloader does not read")
        kind = (response.headers.get("Content-Type") or "").lower()
        stripped = content.lstrip()
        if "json" in kind or stripped[:1] in (b"{", b"["):
            try:
                payload = json.loads(content)
            except ValueError:
                raise IVolatilityDownloadError(f"{what}: the answer is not valid JSON") from None
            return self._rows_of_json(payload, what, on_status)
        return _csv_rows(content, what)

    def _rows_of_json(self, payload, what: str, on_status) -> list[dict]:
        if isinstance(payload, list):
            if payload and isinstance(payload[0], dict) and "meta" in payload[0]:
                raise IVolatilityDownloadError(f"{what}: a file-status answer where rows were expected")
            return [row for row in payload if isinstance(row, dict)]
        if not isinstance(payload, dict):
            raise IVolatilityDownloadError(f"{what}: an answer that is neither rows nor a status object")
        status = payload.get("status") if isinstance(payload.get("status"), dict) else {}
        if status.get("queriesLeftEOD") is not None:
            try:
                self.stats.queries_left = int(status["queriesLeftEOD"])
            except (TypeError, ValueError):
                pass
        code = str(status.get("code") or "").upper()
        data = payload.get("data")
        if isinstance(data, list) and data:
            return [row for row in data if isinstance(row, dict)]
        if code in ("ERROR", "FAILED"):
            reason = payload.get("message") or status.get("message") or "no reason given"
            raise IVolatilityDownloadError(f"{what}: IVolatility reports {code}: {' '.join(str(reason).split())[:200]}")
        details = status.get("urlForDetails")
        if details:
            return self._prepared_file(urljoin(self.base_url + "/", str(details)), what, on_status)
        return []

    def _prepared_file(self, details_url: str, what: str, on_status) -> list[dict]:
        started = self._clock()
        poll_wait = max(self.request_interval, 0.02)
        while True:
            response = self.get(details_url, what=f"{what} (file status)")
            try:
                info = response.json()
            except ValueError:
                raise IVolatilityDownloadError(f"{what}: the file-status answer is not JSON") from None
            entry = info[0] if isinstance(info, list) and info else info
            if not isinstance(entry, dict):
                raise IVolatilityDownloadError(f"{what}: an unreadable file-status answer")
            meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
            state = str(meta.get("status") or entry.get("status") or "").upper()
            files = entry.get("data") if isinstance(entry.get("data"), list) else []
            if state in ("ERROR", "FAILED", "CANCELED", "CANCELLED"):
                raise IVolatilityDownloadError(f"{what}: IVolatility could not prepare the file ({state})")
            if state == "COMPLETE" and files:
                link = files[0].get("urlForDownload") if isinstance(files[0], dict) else None
                if not link:
                    return []                       # complete, nothing to download (the package's reading)
                download = self.get(urljoin(details_url, str(link)), what=f"{what} (file)")
                if download.status_code == 204 or not download.content.strip():
                    return []
                return self._rows_of(download, what, None)
            if self._clock() - started > self.poll_timeout:
                raise IVolatilityDownloadError(f"{what}: IVolatility did not finish preparing the file within "
                                               f"{self.poll_timeout:.0f} s (last status {state or 'none'}); rerun to "
                                               f"resume")
            if on_status is not None:
                on_status(state or "PENDING")
            self._wait(poll_wait)


def _csv_rows(content: bytes, what: str) -> list[dict]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IVolatilityDownloadError(f"{what}: the CSV is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    return [row for row in reader]


# ============================================================================== rows → the CSV layout
def _parse_date(text: str, cache: dict) -> dt.date:
    if text in cache:
        return cache[text]
    for fmt in _DATE_FORMATS:
        try:
            value = dt.datetime.strptime(text, fmt).date()
            break
        except ValueError:
            continue
    else:
        raise ValueError(text)
    cache[text] = value
    return value


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value).strip()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def field_map(names, what: str) -> dict[str, str]:
    """Output column → the response field it is read from; DataError naming the first required
    field the response lacks."""
    by_norm = {}
    for name in names:
        by_norm.setdefault(_norm(name), name)
    mapping = {}
    for column, aliases in FIELD_ALIASES.items():
        for alias in aliases:
            if alias in by_norm:
                mapping[column] = by_norm[alias]
                break
    for column in REQUIRED_FIELDS:
        if column not in mapping:
            shown = ", ".join(sorted(map(str, names)))[:400]
            raise DataError(f"{what}: the response has no '{column}' field (accepted names: "
                            f"{', '.join(FIELD_ALIASES[column])}; it has: {shown})")
    return mapping


@dataclass
class MonthResult:
    rows: list[dict] = field(default_factory=list)     # output rows (OUTPUT_COLUMNS), ordered
    received: int = 0                                   # rows the API sent
    other_symbols: int = 0
    outside_dte: int = 0
    duplicates: int = 0
    sessions: list[str] = field(default_factory=list)   # ISO dates with rows kept


def shape_rows(raw: list[dict], symbol: str, per_day: int, dte_min: int, dte_max: int, what: str) -> MonthResult:
    """The API's rows as OUTPUT_COLUMNS rows: mapped by name, dates ``mm/dd/yyyy``, C/P, only
    ``symbol``, the DTE window, and per date the ``per_day`` contracts nearest the money (0 = all),
    ordered by date, expiration, strike, type."""
    result = MonthResult(received=len(raw))
    if not raw:
        return result
    names = list(dict.fromkeys(name for row in raw[:50] for name in row))
    mapping = field_map(names, what)
    dates: dict = {}
    kept: dict[dt.date, list] = {}
    seen = set()
    symbol = symbol.upper()
    for number, row in enumerate(raw, start=1):
        out = {column: _text(row.get(mapping[column])) if column in mapping else "" for column in OUTPUT_COLUMNS}
        row_symbol = out["symbol"].upper()
        if row_symbol and row_symbol != symbol:
            result.other_symbols += 1
            continue
        out["symbol"] = symbol
        try:
            day = _parse_date(out["date"], dates)
        except ValueError:
            raise DataError(f"{what}: row {number}: cannot read date {out['date']!r}") from None
        try:
            expiry = _parse_date(out["expiration"], dates)
        except ValueError:
            raise DataError(f"{what}: row {number}: cannot read expiration {out['expiration']!r}") from None
        kind = out["call/put"].upper()[:1]
        if kind not in ("C", "P"):
            raise DataError(f"{what}: row {number}: call/put {out['call/put']!r} is not C/P/call/put")
        dte = (expiry - day).days
        if not dte_min <= dte <= dte_max:
            result.outside_dte += 1
            continue
        strike = _number(out["strike"])
        key = (day, expiry, strike, kind)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        out.update({"date": f"{day:%m/%d/%Y}", "expiration": f"{expiry:%m/%d/%Y}", "call/put": kind})
        if not out["mean price"]:
            bid, ask = _number(out["bid"]), _number(out["ask"])
            out["mean price"] = repr(round((bid + ask) / 2, 6)) if math.isfinite(bid + ask) else ""
        distance = abs(strike - _number(out["stock price for iv"]))
        kept.setdefault(day, []).append((math.inf if math.isnan(distance) else distance, dte,
                                         kind == "C", strike, out))
    for day in sorted(kept):
        items = kept[day]
        if per_day > 0 and len(items) > per_day:
            items = sorted(items, key=lambda item: item[:4])[:per_day]
        items = sorted(items, key=lambda item: (item[1], item[3], item[2]))
        result.rows.extend(item[4] for item in items)
        result.sessions.append(day.isoformat())
    return result


# ============================================================================== the download
def _new_york():
    from zoneinfo import ZoneInfo

    return ZoneInfo("America/New_York")


def _day(value) -> dt.date:
    from data_factory.market_calendar import exchange_date

    return exchange_date(value, "date").date()


def _month_plan(start, end) -> list[tuple[str, list]]:
    """(YYYY-MM, its sessions in start … end) per month, in order."""
    from data_factory.market_calendar import trading_sessions

    sessions = trading_sessions(start, end)
    if not len(sessions):
        raise DataError(f"no NYSE session between {start} and {end}")
    plan: dict[str, list] = {}
    for day in sessions:
        plan.setdefault(f"{day:%Y-%m}", []).append(day.date())
    return list(plan.items())


def month_file(out_dir: Path, symbol: str, month: str) -> Path:
    return Path(out_dir) / f"{symbol.lower()}_options_ivol_{month}.csv"


def _read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return {"version": MANIFEST_VERSION, "vendor": "ivolatility", "months": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable manifest ({type(error).__name__}); move it away to start over") from None
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("months"), dict):
        raise DataError(f"{path}: not a manifest this downloader wrote (version {manifest.get('version')!r})")
    return manifest


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    path = Path(out_dir) / MANIFEST
    temporary = path.with_name(f".{MANIFEST}.tmp")
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(temporary, path)


def month_complete(out_dir: Path, manifest: dict, symbol: str, month: str, first: dt.date, last: dt.date,
                   settings: dict) -> bool:
    """Whether the manifest records ``month`` as downloaded with ``settings`` over a range covering
    ``first … last``, with its file (if any) still there at the recorded size."""
    entry = manifest.get("months", {}).get(f"{symbol.upper()}:{month}")
    if not entry or entry.get("settings") != settings or not entry.get("complete", False):
        return False
    if not (entry.get("first") <= first.isoformat() and entry.get("last") >= last.isoformat()):
        return False
    if entry.get("file"):
        path = Path(out_dir) / entry["file"]
        return path.is_file() and path.stat().st_size == entry.get("bytes")
    return True


def _write_month(path: Path, rows: list[dict]) -> int:
    temporary = path.with_name(f".{path.name}.part")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(OUTPUT_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
    return path.stat().st_size


class _Progress:
    """A rich progress bar over sessions (stderr), or nothing."""

    def __init__(self, enabled: bool, total: int, symbol: str):
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total} sessions"),
                                      TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task(f"IVolatility {symbol}", total=total, note="")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def note(self, text: str, advance: int = 0) -> None:
        if self._progress is not None:
            self._progress.update(self._task, note=text, advance=advance)

    def log(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)


def download_options(api_key: str, symbol: str, start, end, out_dir=DEFAULT_OUT, *, base_url: str = DEFAULT_API_URL,
                     per_day: int = DEFAULT_PER_DAY, dte_min: int = DEFAULT_DTE_MIN, dte_max: int = DEFAULT_DTE_MAX,
                     force: bool = False, request_interval: float = DEFAULT_INTERVAL,
                     attempts: int = DEFAULT_ATTEMPTS, base_wait: float = BASE_WAIT, poll_timeout: float = POLL_TIMEOUT,
                     progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Download ``symbol``'s EOD option chains for the sessions ``start … end`` into monthly CSV
    files under ``out_dir`` (module docstring); returns a summary dict. Months already complete
    are skipped (``force``: downloaded again). Raises IVolatilitySetupError,
    IVolatilityDownloadError or DataError with one line; months finished before the error stay."""
    symbol = symbol.strip().upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9.\-]{0,9}", symbol):
        raise DataError(f"--symbol {symbol!r}: expected a ticker such as SPY")
    if per_day < 0:
        raise DataError(f"--per-day {per_day}: give 0 (all) or a positive number of contracts")
    if dte_min < 0 or dte_max < dte_min:
        raise DataError(f"--dte-min {dte_min} / --dte-max {dte_max}: need 0 ≤ dte-min ≤ dte-max")
    today = dt.datetime.now(dt.timezone.utc).astimezone(_new_york()).date()
    if _day(start) > today:
        raise DataError(f"--start {_day(start)} is after today ({today}, New York): no EOD data yet")
    plan = _month_plan(start, min(_day(end), today))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir)
    settings = {"endpoint": ENDPOINT, "per_day": int(per_day), "dte_min": int(dte_min), "dte_max": int(dte_max)}
    started = time.perf_counter()
    summary = {"symbol": symbol, "out": str(out_dir), "first": plan[0][1][0].isoformat(),
               "last": plan[-1][1][-1].isoformat(), "months": len(plan), "downloaded": 0, "skipped": 0,
               "rows": 0, "files": [], "missing_sessions": [], "settings": settings}
    say = log or (lambda text: None)
    client = IVolatilityClient(api_key, base_url, request_interval=request_interval, attempts=attempts,
                               base_wait=base_wait, poll_timeout=poll_timeout)
    total = sum(len(days) for _, days in plan)
    try:
        with _Progress(progress, total, symbol) as bar:
            for month, days in plan:
                first, last = days[0], days[-1]
                key = f"{symbol}:{month}"
                if not force and month_complete(out_dir, manifest, symbol, month, first, last, settings):
                    entry = manifest["months"][key]
                    summary["skipped"] += 1
                    summary["rows"] += int(entry.get("rows", 0))
                    if entry.get("file"):
                        summary["files"].append(str(out_dir / entry["file"]))
                    summary["missing_sessions"].extend(d for d in entry.get("missing_sessions", [])
                                                       if first.isoformat() <= d <= last.isoformat())
                    bar.note(f"{month} already downloaded", advance=len(days))
                    say(f"{month}: already downloaded ({int(entry.get('rows', 0)):,} rows), skipped")
                    continue
                what = f"{ENDPOINT} {symbol} {first} … {last}"
                bar.note(f"{month}: requesting")
                month_started = time.perf_counter()
                raw = client.fetch_rows(ENDPOINT, {"symbol": symbol, "from": first.isoformat(), "to": last.isoformat()},
                                        on_status=lambda state, month=month: bar.note(f"{month}: IVolatility "
                                                                                       f"preparing ({state})"))
                shaped = shape_rows(raw, symbol, per_day, dte_min, dte_max, what)
                wanted = {d.isoformat() for d in days}
                outside = sorted(set(shaped.sessions) - wanted)
                if outside:
                    raise DataError(f"{what}: the answer holds rows for {outside[0]}, outside the dates asked for")
                missing = sorted(wanted - set(shaped.sessions))
                path = month_file(out_dir, symbol, month)
                # A session without rows that may simply not be published yet: the month is done
                # again next time instead of being recorded complete.
                recent = [d for d in missing if d >= (today - dt.timedelta(days=RECENT_DAYS)).isoformat()]
                entry = {"file": None, "bytes": 0, "rows": len(shaped.rows), "received": shaped.received,
                         "complete": not recent,
                         "first": first.isoformat(), "last": last.isoformat(), "sessions": len(shaped.sessions),
                         "missing_sessions": missing, "other_symbols": shaped.other_symbols,
                         "outside_dte": shaped.outside_dte, "duplicates": shaped.duplicates, "settings": settings,
                         "downloaded": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
                if shaped.rows:
                    entry["bytes"] = _write_month(path, shaped.rows)
                    entry["file"] = path.name
                    summary["files"].append(str(path))
                elif path.exists():
                    path.unlink()                     # an older download of the month that no longer applies
                manifest["months"][key] = entry
                _write_manifest(out_dir, manifest)
                summary["downloaded"] += 1
                summary["rows"] += len(shaped.rows)
                summary["missing_sessions"].extend(missing)
                seconds = time.perf_counter() - month_started
                note = f", no rows for {len(missing)} session(s): {', '.join(missing[:3])}" if missing else ""
                bar.note(f"{month}: {len(shaped.rows):,} rows", advance=len(days))
                say(f"{month}: {len(shaped.rows):,} rows kept of {shaped.received:,} received, "
                    f"{len(shaped.sessions)} sessions ({seconds:.1f} s){note}")
    finally:
        client.close()
    summary.update({"requests": client.stats.requests, "retries": client.stats.retries,
                    "rate_limited": client.stats.rate_limited, "server_errors": client.stats.server_errors,
                    "queries_left": client.stats.queries_left, "seconds": round(time.perf_counter() - started, 2)})
    return summary


# ============================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data_factory/download_ivolatility_options.py",
        description="Download EOD option quotes with IV and Greeks from IVolatility's REST API "
                    f"({ENDPOINT}) into monthly CSV files in IVolatility's EOD raw-IV layout, keeping per "
                    "session the contracts nearest the money. Resumable: completed months are skipped.")
    parser.add_argument("--symbol", default="SPY", help="underlying (default SPY)")
    parser.add_argument("--start", required=True, metavar="YYYY-MM-DD", help="first session")
    parser.add_argument("--end", required=True, metavar="YYYY-MM-DD", help="last session")
    parser.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--per-day", type=int, default=DEFAULT_PER_DAY, metavar="N",
                        help=f"contracts kept per session, nearest the money first (default {DEFAULT_PER_DAY}; 0 = all)")
    parser.add_argument("--dte-min", type=int, default=DEFAULT_DTE_MIN, metavar="D",
                        help=f"shortest expiration kept, calendar days (default {DEFAULT_DTE_MIN})")
    parser.add_argument("--dte-max", type=int, default=DEFAULT_DTE_MAX, metavar="D",
                        help=f"longest expiration kept, calendar days (default {DEFAULT_DTE_MAX})")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help=f"file holding the API key, outside the repository (default: ${API_KEY_ENV})")
    parser.add_argument("--request-interval", type=float, default=DEFAULT_INTERVAL, metavar="S",
                        help=f"seconds between two requests (default {DEFAULT_INTERVAL:g})")
    parser.add_argument("--max-attempts", type=int, default=DEFAULT_ATTEMPTS, metavar="N",
                        help=f"requests per call before giving up on 429/5xx/timeouts (default {DEFAULT_ATTEMPTS})")
    parser.add_argument("--force", action="store_true", help="download months again even when complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        base = api_url()
        key = load_api_key(key_file=args.api_key_file)
        summary = download_options(key, args.symbol, args.start, args.end, args.out, base_url=base,
                                   per_day=args.per_day, dte_min=args.dte_min, dte_max=args.dte_max, force=args.force,
                                   request_interval=args.request_interval, attempts=args.max_attempts,
                                   progress=not args.no_progress, log=print)
    except (IVolatilitySetupError, IVolatilityDownloadError, DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = summary["missing_sessions"]
    print(f"IVolatility {summary['symbol']} {summary['first']} … {summary['last']}: {summary['rows']:,} rows in "
          f"{len(summary['files'])} file(s) under {summary['out']} ({summary['downloaded']} month(s) downloaded, "
          f"{summary['skipped']} already complete; {summary['requests']} requests, {summary['retries']} retries)")
    if missing:
        print(f"warning: no rows for {len(missing)} session(s): {', '.join(missing[:5])}"
              f"{' …' if len(missing) > 5 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
