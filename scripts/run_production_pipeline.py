"""The production data pipeline, one step after the other, resumable:

    1. bars     the underlying's 1-minute bars from Alpaca      (data_factory/download_alpaca_matched.py)
    2. options  EOD option quotes with IV and Greeks from IVolatility, the --per-day contracts nearest
                the money per session                            (data_factory/download_ivolatility_options.py)
    3. merge    ONE chain store: the EOD chains + the bars at 1, 5 and 15 minutes
                                                                 (data_factory/merge_intraday_with_greeks.py)
    4. expand   the final store: --minutes (1, 5 or 15) expanded chains (Black–Scholes model quotes
                along the real bars, labelled "expanded:") + the bars; what
                ``python core/main.py --mode backtest --options-data STORE`` runs on.

    export APCA_API_KEY_ID=... APCA_API_SECRET_KEY=... IVOLATILITY_API_KEY=...
    python scripts/run_production_pipeline.py --start 2018-01-02 --end 2018-12-31
    python scripts/run_production_pipeline.py --start 2018-01-02 --end 2018-12-31 --minutes 15 --per-day 0 \
        --dte-max 50 --out data/pipeline --force merge

Layout under ``--out`` (default ``data/pipeline``): ``alpaca/`` (month CSVs + the downloader's
manifest), ``ivolatility/`` (month CSVs + manifest), ``<SYMBOL>-eod/`` (step 3's store),
``<SYMBOL>-<N>min/`` (the final store), ``pipeline_state.json`` (what each step did, with its
parameters and the files it produced).

Resuming: each step records its parameters and outputs in the state file when it finishes. A rerun
skips a step whose recorded parameters match and whose outputs are still there (sizes unchanged);
the downloaders also skip, month by month, what they already have, so an interrupted download
resumes where it stopped. ``--force STEP`` redoes a step (repeatable; ``all`` for every step):
``options`` downloads its months again, ``bars`` deletes and fetches its month files again,
``merge``/``expand`` rebuild their store (replaced only once the new one is complete). A step whose
inputs changed (new or re-downloaded files) is redone on its own. One pipeline per ``--out`` folder
at a time (a run removes the hidden staging folders a killed merge or expansion left there).

Before any step runs, everything the steps to run need is checked, so a missing key does not
surface three hours in: the Alpaca keys (``APCA_API_KEY_ID``/``APCA_API_SECRET_KEY`` or
``--alpaca-credentials``) and ``APCA_API_DATA_URL`` when the bars must be downloaded, the
IVolatility key (``IVOLATILITY_API_KEY`` or ``--api-key-file``) and ``IVOLATILITY_API_URL`` when
the options must be, and a TCP connection to each server that will be used (refused or unknown host
→ "cannot reach …"). ``--bars DIR`` uses bar files you already have (no Alpaca step, no Alpaca
keys). Sessions: bars for ``--start … --end``; options from the session before ``--start`` (its
EOD snapshot prices the first morning, no look-ahead) to ``--end``.

Exit status 0 done; 2 anything that stopped the pipeline (one ``error:`` line; finished steps and
downloaded months are kept, so the same command resumes); 130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(_PROJECT_ROOT) not in sys.path:       # `python scripts/run_production_pipeline.py`
    sys.path.insert(0, str(_PROJECT_ROOT))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

STEPS = ("bars", "options", "merge", "expand")
STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1
DEFAULT_OUT = Path("data") / "pipeline"
BAR_MINUTES = 1
CONNECT_TIMEOUT = 10.0


class PipelineError(Exception):
    """A step cannot run or failed: one line for the user."""


# ============================================================================== helpers
def _fingerprint(paths) -> list[list]:
    """[name, size, mtime_ns] of each file: what a later step's inputs were."""
    out = []
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        out.append([str(path), stat.st_size, stat.st_mtime_ns])
    return out


def _outputs_intact(entry: dict) -> bool:
    for name, size, _ in entry.get("outputs", []):
        path = Path(name)
        if path.is_dir():
            if not (path / "manifest.json").is_file():
                return False
        elif not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _reachable(url: str, what: str) -> None:
    """A TCP connection to ``url``'s host and port, or PipelineError "cannot reach …"."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT):
            return
    except socket.gaierror:
        reason = "unknown host"
    except ConnectionRefusedError:
        reason = "connection refused"
    except TimeoutError:
        reason = f"no answer within {CONNECT_TIMEOUT:g} s"
    except OSError as error:
        reason = error.strerror or type(error).__name__
    raise PipelineError(f"cannot reach {what} at {parts.scheme}://{parts.netloc} ({reason}); check the network or "
                        f"the URL override")


class State:
    """``pipeline_state.json``: per step and symbol, the parameters and outputs of its last run."""

    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.data = {"version": STATE_VERSION, "steps": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and data.get("version") == STATE_VERSION and isinstance(data.get("steps"), dict):
                self.data = data

    def done(self, step: str, symbol: str, params: dict) -> dict | None:
        entry = self.data["steps"].get(f"{step}:{symbol}")
        if entry and entry.get("complete") and entry.get("params") == params and _outputs_intact(entry):
            return entry
        return None

    def record(self, step: str, symbol: str, params: dict, outputs, complete: bool, summary: dict) -> dict:
        entry = {"params": params, "outputs": _fingerprint(o for o in outputs if Path(o).is_file())
                 + [[str(o), 0, 0] for o in outputs if Path(o).is_dir()],
                 "complete": bool(complete), "summary": summary,
                 "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self.data["steps"][f"{step}:{symbol}"] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{STATE_FILE}.tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(temporary, self.path)
        return entry

    def forget(self, step: str, symbol: str) -> None:
        self.data["steps"].pop(f"{step}:{symbol}", None)


# ============================================================================== the pipeline
class Pipeline:
    def __init__(self, args, environ=os.environ, say=print):
        from data_factory.market_calendar import exchange_date, previous_session_on_or_before, trading_sessions

        self.args, self.environ, self.say = args, environ, say
        self.symbol = args.symbol.strip().upper()
        self.out = Path(args.out)
        first, last = exchange_date(args.start, "--start"), exchange_date(args.end, "--end")
        sessions = trading_sessions(first, last)
        if not len(sessions):
            raise PipelineError(f"no NYSE session between {first.date()} and {last.date()}")
        self.start, self.end = sessions[0].date(), sessions[-1].date()
        self.options_start = previous_session_on_or_before(sessions[0] - dt.timedelta(days=1)).date()
        if args.minutes not in (1, 5, 15):
            raise PipelineError(f"--minutes {args.minutes}: choose 1, 5 or 15")
        forced = set(args.force or [])
        self.forced = set(STEPS) if "all" in forced else forced
        self.state = State(self.out)
        self.alpaca_dir = self.out / "alpaca"
        self.ivol_dir = self.out / "ivolatility"
        self.merged_dir = self.out / f"{self.symbol}-eod"
        self.final_dir = self.out / f"{self.symbol}-{args.minutes}min"
        self.progress = not args.no_progress

    # ---------------------------------------------------------------- parameters of each step
    def bars_params(self) -> dict:
        return {"symbol": self.symbol, "start": str(self.start), "end": str(self.end), "minutes": BAR_MINUTES,
                "feed": self.args.feed, "bars_dir": str(self.args.bars) if self.args.bars else None}

    def options_params(self) -> dict:
        return {"symbol": self.symbol, "start": str(self.options_start), "end": str(self.end),
                "per_day": self.args.per_day, "dte_min": self.args.dte_min, "dte_max": self.args.dte_max}

    def _pending(self, step: str, params: dict) -> bool:
        return step in self.forced or self.state.done(step, self.symbol, params) is None

    # ---------------------------------------------------------------- checks before anything runs
    def preflight(self) -> dict:
        """Keys, URL overrides and reachability for the download steps that will run."""
        from data_factory import download_ivolatility_options as ivol

        need = {"bars": self.args.bars is None and self._pending("bars", self.bars_params()),
                "options": self._pending("options", self.options_params())}
        found = {}
        if need["bars"]:
            from data_factory.alpaca_access import load_credentials
            from data_factory.download_alpaca_matched import data_endpoints

            endpoints = data_endpoints(self.environ)
            found["alpaca"] = (load_credentials(self.environ, path=self.args.alpaca_credentials), endpoints)
        if need["options"]:
            found["ivolatility"] = (ivol.load_api_key(self.environ, key_file=self.args.api_key_file),
                                    ivol.api_url(self.environ))
        if need["bars"]:
            _reachable(found["alpaca"][1].data_url, "Alpaca's market-data API")
        if need["options"]:
            _reachable(found["ivolatility"][1], "IVolatility's API")
        return found

    # ---------------------------------------------------------------- the steps
    def run(self) -> dict:
        keys = self.preflight()
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        started = time.perf_counter()
        bar_files = self.step_bars(keys.get("alpaca"))
        option_files = self.step_options(keys.get("ivolatility"))
        merged = self.step_merge(option_files, bar_files)
        final = self.step_expand(merged)
        self.say(f"done in {time.perf_counter() - started:.1f} s: {final} — backtest it with "
                 f"python core/main.py --mode backtest --options-data {final}")
        return {"store": str(final), "merged_store": str(self.merged_dir)}

    def _remove_leftovers(self) -> None:
        """Hidden staging folders of a merge/expansion that was killed (they can be large); one
        pipeline per --out folder at a time."""
        import shutil

        for pattern in (f".{self.symbol}-*.merge-*", f".{self.symbol}-*.expand-*", f".expand-.{self.symbol}-*"):
            for leftover in self.out.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)

    def _skip(self, number: int, step: str, entry: dict, text: str) -> None:
        self.say(f"[{number}/4] {step}: complete ({text}), skipped")

    def step_bars(self, alpaca) -> list[str]:
        params = self.bars_params()
        if self.args.bars is not None:
            from data_factory.merge_intraday_with_greeks import input_files

            files = [str(p) for p in input_files([self.args.bars], "bar")]
            self.say(f"[1/4] bars: using your bars in {self.args.bars} ({len(files)} file(s)); no download")
            return files
        entry = None if "bars" in self.forced else self.state.done("bars", self.symbol, params)
        if entry is not None:
            self._skip(1, "bars", entry, f"{len(entry['outputs'])} month file(s) in {self.alpaca_dir}")
            return [o[0] for o in entry["outputs"]]
        from data_factory import download_alpaca_matched as alpaca_dl

        credentials, endpoints = alpaca
        if "bars" in self.forced:                  # the downloader has no force: remove the month files
            for month in sorted({f"{d:%Y-%m}" for d in (self.start, self.end)} | self._months(self.start, self.end)):
                (self.alpaca_dir / f"{self.symbol}_{BAR_MINUTES}min_{month}.csv").unlink(missing_ok=True)
        self.say(f"[1/4] bars: {self.symbol} {BAR_MINUTES}-minute bars ({self.args.feed}) {self.start} … {self.end} "
                 f"from {endpoints.data_url} → {self.alpaca_dir}")
        summary = alpaca_dl.download_stock_bars(credentials, endpoints, [self.symbol], self.start, self.end, BAR_MINUTES,
                                                self.alpaca_dir, feed=self.args.feed, progress=self.progress or None)
        files = list(summary["files"])
        complete = summary.get("in_progress", 0) == 0
        self.say(f"      {alpaca_dl.describe_summary(summary)}")
        self.state.record("bars", self.symbol, params, files, complete,
                          {k: summary.get(k) for k in ("months", "fetched", "skipped", "rows_on_disk", "requests")})
        return files

    @staticmethod
    def _months(first: dt.date, last: dt.date) -> set[str]:
        months, day = set(), first.replace(day=1)
        while day <= last:
            months.add(f"{day:%Y-%m}")
            day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return months

    def step_options(self, ivolatility) -> list[str]:
        from data_factory import download_ivolatility_options as ivol

        params = self.options_params()
        entry = None if "options" in self.forced else self.state.done("options", self.symbol, params)
        if entry is not None:
            self._skip(2, "options", entry, f"{entry['summary'].get('rows', 0):,} rows in {self.ivol_dir}")
            return [o[0] for o in entry["outputs"]]
        key, base = ivolatility
        self.say(f"[2/4] options: {self.symbol} EOD chains with Greeks {self.options_start} … {self.end} from {base}, "
                 f"{self.args.per_day or 'all'} contracts/session nearest the money, DTE {self.args.dte_min}–"
                 f"{self.args.dte_max} → {self.ivol_dir}")
        summary = ivol.download_options(key, self.symbol, self.options_start, self.end, self.ivol_dir, base_url=base,
                                        per_day=self.args.per_day, dte_min=self.args.dte_min,
                                        dte_max=self.args.dte_max, force="options" in self.forced,
                                        request_interval=self.args.request_interval, progress=self.progress,
                                        log=lambda text: self.say(f"      {text}"))
        missing = summary["missing_sessions"]
        self.say(f"      {summary['rows']:,} rows in {len(summary['files'])} file(s) ({summary['downloaded']} month(s) "
                 f"downloaded, {summary['skipped']} already complete; {summary['requests']} requests)"
                 + (f"; no rows for {len(missing)} session(s): {', '.join(missing[:5])}" if missing else ""))
        if not summary["files"]:
            raise PipelineError(f"IVolatility returned no {self.symbol} option rows for {self.options_start} … {self.end}")
        self.state.record("options", self.symbol, params, summary["files"], True,
                          {k: summary[k] for k in ("rows", "downloaded", "skipped", "requests", "missing_sessions")})
        return list(summary["files"])

    def step_merge(self, option_files: list[str], bar_files: list[str]) -> Path:
        from data_factory.merge_intraday_with_greeks import merge

        params = {"options": _fingerprint(option_files), "bars": _fingerprint(bar_files),
                  "start": str(self.options_start), "end": str(self.end), "fill_gaps": self.args.fill_gaps,
                  "on_bad_rows": self.args.on_bad_rows}
        entry = None if "merge" in self.forced else self.state.done("merge", self.symbol, params)
        if entry is not None:
            self._skip(3, "merge", entry, str(self.merged_dir))
            return self.merged_dir
        self.say(f"[3/4] merge: {len(option_files)} option file(s) + {len(bar_files)} bar file(s) → {self.merged_dir}")
        result = merge(option_files, bar_files, self.merged_dir, self.symbol, self.options_start, self.end,
                       on_bad_rows=self.args.on_bad_rows, fill_gaps=self.args.fill_gaps, replace=True)
        widths = ", ".join(f"{w} min {n:,}" for w, n in result["bar_widths"].items())
        bad = sum(sum(v.values()) for v in result["bad_rows"].values())
        self.say(f"      {result['chain_rows']:,} chain rows over {result['chain_sessions']} sessions, bars {widths}; "
                 f"{result['filled_bars']} bars filled, {result['unfilled_gaps']} longer gaps, "
                 f"{result['outside_regular_hours']:,} extended-hours bars left out, {bad} bad rows skipped")
        self.state.forget("expand", self.symbol)
        self.state.record("merge", self.symbol, params, [self.merged_dir], True,
                          {k: result[k] for k in ("chain_rows", "bar_rows", "chain_sessions", "filled_bars",
                                                  "chain_only_sessions", "bar_only_sessions")})
        return self.merged_dir

    def step_expand(self, merged: Path) -> Path:
        from data_factory.chain_store import ChainStore
        from data_factory.merge_intraday_with_greeks import expand

        stamp = ChainStore.open(merged).manifest.get("merge", {}).get("created")
        params = {"merged": str(merged), "merged_created": stamp, "minutes": self.args.minutes,
                  "start": str(self.start), "end": str(self.end), "dte_max": self.args.dte_max,
                  "strike_band": self.args.strike_band, "rate": self.args.rate}
        entry = None if "expand" in self.forced else self.state.done("expand", self.symbol, params)
        if entry is not None:
            self._skip(4, "expand", entry, str(self.final_dir))
            return self.final_dir
        self.say(f"[4/4] expand: {self.args.minutes}-minute chains (Black-Scholes model quotes along the real bars) "
                 f"{self.start} … {self.end} → {self.final_dir}")
        result = expand(merged, self.final_dir, self.args.minutes, self.symbol, str(self.start), str(self.end),
                        dte_max=self.args.dte_max, strike_band=self.args.strike_band, rate=self.args.rate,
                        replace=True)
        self.say(f"      {result['rows']:,} {self.args.minutes}-minute chain rows over {result['sessions']} sessions, "
                 f"{result['bar_rows']:,} bar rows; EXPANDED model quotes (source '{result['label']}:…')")
        self.state.record("expand", self.symbol, params, [self.final_dir], True,
                          {k: result[k] for k in ("rows", "sessions", "first_session", "last_session", "bar_rows")})
        return self.final_dir


# ============================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    from data_factory import download_ivolatility_options as ivol
    from data_factory.merge_intraday_with_greeks import DEFAULT_FILL_GAPS

    parser = argparse.ArgumentParser(
        prog="python scripts/run_production_pipeline.py",
        description="Download Alpaca 1-minute bars and IVolatility EOD option chains with Greeks, merge them into a "
                    "chain store and expand it to 1/5/15-minute chains: a store the backtest runs on. Resumable; "
                    "needs APCA_API_KEY_ID/APCA_API_SECRET_KEY and IVOLATILITY_API_KEY.")
    parser.add_argument("--start", required=True, metavar="YYYY-MM-DD", help="first session")
    parser.add_argument("--end", required=True, metavar="YYYY-MM-DD", help="last session")
    parser.add_argument("--symbol", default="SPY", help="underlying (default SPY)")
    parser.add_argument("--minutes", type=int, choices=(1, 5, 15), default=5,
                        help="bar width of the final expanded chains (default 5)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"working folder (default {DEFAULT_OUT})")
    parser.add_argument("--per-day", type=int, default=ivol.DEFAULT_PER_DAY, metavar="N",
                        help=f"option contracts kept per session, nearest the money (default {ivol.DEFAULT_PER_DAY}; "
                             f"0 = all; condor wings need more than 100)")
    parser.add_argument("--dte-min", type=int, default=ivol.DEFAULT_DTE_MIN, metavar="D",
                        help=f"shortest expiration downloaded, calendar days (default {ivol.DEFAULT_DTE_MIN})")
    parser.add_argument("--dte-max", type=int, default=ivol.DEFAULT_DTE_MAX, metavar="D",
                        help=f"longest expiration downloaded and expanded (default {ivol.DEFAULT_DTE_MAX})")
    parser.add_argument("--strike-band", type=float, default=None, metavar="F",
                        help="expansion: keep strikes within F of the spot (0.2 = ±20 %%; default all)")
    parser.add_argument("--rate", type=float, default=None, metavar="R",
                        help="expansion: risk-free rate (default: the embedded series, which ends 2019-01)")
    parser.add_argument("--bars", default=None, metavar="PATH",
                        help="use these bar files / folder instead of downloading from Alpaca")
    parser.add_argument("--feed", choices=("iex", "sip"), default="iex", help="Alpaca feed (default iex, the free one)")
    parser.add_argument("--alpaca-credentials", default=None, metavar="FILE",
                        help='Alpaca keys as JSON {"key_id": …, "secret_key": …} outside the repository (default: '
                             'the APCA_API_* variables, else ~/.config/condorbrain/alpaca.json)')
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help="IVolatility key file outside the repository (default: $IVOLATILITY_API_KEY)")
    parser.add_argument("--request-interval", type=float, default=ivol.DEFAULT_INTERVAL, metavar="S",
                        help=f"seconds between two IVolatility requests (default {ivol.DEFAULT_INTERVAL:g})")
    parser.add_argument("--fill-gaps", type=int, default=DEFAULT_FILL_GAPS, metavar="N",
                        help=f"fill runs of at most N missing minute bars, marked (default {DEFAULT_FILL_GAPS}; 0 = none)")
    parser.add_argument("--on-bad-rows", choices=("skip", "stop"), default="skip",
                        help="bad vendor rows: skip and count them (default) or stop at the first")
    parser.add_argument("--force", action="append", choices=(*STEPS, "all"), metavar="STEP",
                        help=f"redo a step even when complete: {', '.join(STEPS)} or all (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None, environ=os.environ) -> int:
    from core.config import ConfigError
    from data_factory.download_ivolatility_options import IVolatilityDownloadError, IVolatilitySetupError

    args = _parser().parse_args(argv)
    try:
        Pipeline(args, environ).run()
    except (PipelineError, ConfigError, IVolatilitySetupError, IVolatilityDownloadError, ValueError, OSError) as error:
        # ValueError: Alpaca keys, URL overrides, download settings (AccessSetupError) and DataError.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished steps and downloaded months are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
