"""A real, throw-away PostgreSQL server for a test module: the ``postgres_url`` fixture.

Use it like the other shared test helpers (``tests/`` is not a package; pytest puts it on
``sys.path``)::

    from postgres_server import postgres_url  # noqa: F401

    def test_something(postgres_url):
        storage = postgres_url  # "postgresql+psycopg://postgres@127.0.0.1:<port>/<db>"

The fixture ``initdb``s a cluster into a temporary folder (trust auth, superuser ``postgres``, no
fsync), starts it on a free 127.0.0.1 port with its Unix socket in that folder, creates one
database and yields an SQLAlchemy/Optuna storage URL for it; at teardown (also after a failed
test) it stops the server (``pg_ctl -m fast stop``) and removes the folder. Start-up takes about
a second.

PostgreSQL refuses to run as root. When the tests run as root, the server's commands run as an
unprivileged account instead (``postgres`` where it exists, else ``nobody``), through
``subprocess``'s ``user=``/``group=`` (setuid/setgid in the child; no sudo/su/PAM needed), with
the temporary folder owned by that account. The fixture skips, saying why, when the server
binaries are not installed or the server cannot be started (e.g. no privileges can be dropped).
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

MISSING_REASON = "PostgreSQL server binaries not found (Debian package `postgresql`)"
# Accounts the server runs as when the tests run as root, first found wins.
UNPRIVILEGED_USERS = ("postgres", "nobody")
_COMMAND_TIMEOUT_S = 60


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: from PATH, else the highest version under
    ``/usr/lib/postgresql/*/bin`` (Debian's layout, which keeps them off PATH); None if absent."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        folder = Path(initdb).parent
        if shutil.which("pg_ctl", path=str(folder)) is not None:
            return folder
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl is not None:
            # Both on PATH but in different folders: trust pg_ctl's real location.
            folder = Path(os.path.realpath(pg_ctl)).parent
            if (folder / "initdb").exists():
                return folder

    def version_key(path: Path):
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
                  if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    return max(candidates, key=version_key) if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged_account() -> pwd.struct_passwd | None:
    for name in UNPRIVILEGED_USERS:
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        if account.pw_uid != 0:
            return account
    return None


def _traversable_by_others(path: Path) -> bool:
    """Whether every folder from / down to ``path`` lets other users through (o+x)."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


class PostgresServer:
    """One initdb'd cluster in a temporary folder, run by this user or, as root, by an
    unprivileged account."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.account = None
        if os.geteuid() == 0:
            self.account = _unprivileged_account()
            if self.account is None:
                raise RuntimeError(f"running as root and none of the accounts {UNPRIVILEGED_USERS} exists "
                                   f"to run PostgreSQL as (it refuses to run as root)")
        base = Path(tempfile.gettempdir())
        if self.account is not None and not _traversable_by_others(base) and _traversable_by_others(Path("/tmp")):
            base = Path("/tmp")
        # Short path: the socket path must stay under ~100 characters.
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-", dir=base))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = None
        self.started = False
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)
        # Keep the server's environment free of the caller's PG* settings.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(LC_ALL="C", LANG="C", TZ="UTC")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.account is not None:
            kwargs = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], cwd=self.root, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=_COMMAND_TIMEOUT_S, **kwargs)

    def _check(self, what: str, done: subprocess.CompletedProcess) -> None:
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
                               + (f"\nserver log:\n{log}" if log else ""))

    def start(self, attempts: int = 3) -> None:
        as_user = f" as {self.account.pw_name}" if self.account is not None else ""
        try:
            done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                             "-E", "UTF8", "--locale=C")
        except PermissionError as exc:  # setuid/setgid refused (e.g. no CAP_SETUID)
            raise RuntimeError(f"cannot drop root privileges to run PostgreSQL{as_user}: {exc}") from exc
        self._check(f"initdb{as_user}", done)
        for attempt in range(attempts):
            self.port = _free_port()  # another process may take it before the server does: retry
            options = f"-k {self.root} -p {self.port} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
            done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                             "-o", options, "start")
            if done.returncode == 0:
                self.started = True
                return
            if attempt == attempts - 1:
                self._check(f"pg_ctl start{as_user}", done)

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        try:
            if self.started:
                done = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
                if done.returncode != 0:
                    self._kill_postmaster()
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop it: signal the postmaster named in its pid file."""
        import signal

        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)
        except (OSError, ValueError, IndexError):
            pass


def start_server() -> PostgresServer:
    """A started server; ``pytest.skip`` with the reason if that is not possible here."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip(MISSING_REASON)
    try:
        server = PostgresServer(bin_dir)
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL server cannot be started: {exc}")
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        pytest.skip(f"PostgreSQL server cannot be started: {exc}")
    return server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """An SQLAlchemy/Optuna storage URL (``postgresql+psycopg://``) for a fresh database on a real
    PostgreSQL server started for this test module and stopped (its folder removed) after it."""
    server = start_server()
    try:
        database = f"test_{uuid.uuid4().hex[:12]}"
        server.create_database(database)
        yield server.url(database)
    finally:
        server.stop()
