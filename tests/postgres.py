"""A PostgreSQL for the tests: the one `TEST_DATABASE_URL` names, or a throwaway server started here.

The throwaway server is PostgreSQL's own `initdb` + `postgres` in a temporary folder, listening on 127.0.0.1 on a
free port, with the durability settings off (fsync, synchronous_commit, full_page_writes): its data is deleted
at the end anyway. PostgreSQL refuses to run as root, so as root it runs through `runuser -u postgres` in a folder
that user owns. The server is a child of the test process that is told to stop when that process dies (even by
SIGKILL), so an interrupted run leaves no server behind.

Databases are cheap: `create_database(template=...)` copies a database (`CREATE DATABASE ... TEMPLATE`), so a
database migrated once per session gives every test a fresh, fully migrated database in a tenth of a second.
Every call here is synchronous (each runs its own event loop in a worker thread), so fixtures of any scope can
use it, whatever event loop the test runs in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

TEST_DATABASE_URL = "TEST_DATABASE_URL"
REQUIRE_POSTGRES = "REQUIRE_POSTGRES"
SERVER_PROGRAMS = ("initdb", "postgres", "pg_ctl")
START_TIMEOUT = 60.0
FOLDER_PREFIX = "bot-tests-postgres-"

# Fit for a server whose data is thrown away: nothing waits for the disk.
THROWAWAY_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "lc_messages": "C",
    "log_min_messages": "warning",
    "max_connections": "200",  # the concurrency tests open a few pools at once
}

T = TypeVar("T")


class PostgresUnavailable(Exception):
    """No PostgreSQL can be had for the tests; the message says why, in one sentence."""


def postgres_required() -> bool:
    return os.environ.get(REQUIRE_POSTGRES, "").strip() not in ("", "0")


def find_server_programs() -> dict[str, Path]:
    """initdb, postgres and pg_ctl: from PATH, else from the newest Debian-style /usr/lib/postgresql/N/bin."""
    found = {name: shutil.which(name) for name in SERVER_PROGRAMS}
    if all(found.values()):
        return {name: Path(str(path)) for name, path in found.items()}
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for folder in versions:
        if all((folder / name).is_file() for name in SERVER_PROGRAMS):
            return {name: folder / name for name in SERVER_PROGRAMS}
    raise PostgresUnavailable("PostgreSQL's server programs (initdb, postgres, pg_ctl) are not installed")


def check_prerequisites() -> None:
    """Raise PostgresUnavailable unless asyncpg and a server (TEST_DATABASE_URL or the programs) are at hand."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable("asyncpg is not installed (pip install -e '.[postgres]')") from None
    if os.environ.get(TEST_DATABASE_URL):
        return
    find_server_programs()
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root, PostgreSQL needs runuser to run as another user")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root, there is no postgres user to run PostgreSQL as") from None


def _run_async(function: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a worker thread (never the test's own loop)."""

    async def main() -> T:
        return await function()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _remove_abandoned_folders() -> None:
    """Delete the folders of earlier runs that were killed (their server stopped, but nobody deleted its data).

    A folder is abandoned when no server runs in it (no postmaster.pid) and it is over ten minutes old, so a run
    that is starting at this moment is never touched.
    """
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        try:
            if time.time() - folder.stat().st_mtime > 600 and not (folder / "pg/data/postmaster.pid").exists():
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _stop_with_parent(signal_number: int) -> Callable[[], None]:
    """A preexec_fn: the child gets `signal_number` when the thread that started it dies (Linux's prctl)."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: the session fixture's stop() still stops it
            ctypes.CDLL(None, use_errno=True).prctl(1, signal_number)  # PR_SET_PDEATHSIG

    return preexec


class PostgresServer:
    """A PostgreSQL the tests may create and drop databases on.

    `admin_url` connects as a user with CREATEDB to a database that is never a template or a test database.
    """

    def __init__(self, admin_url: str, on_stop: Callable[[], None] | None = None) -> None:
        self.admin_url = admin_url
        self._on_stop = on_stop

    @classmethod
    def from_environment(cls) -> PostgresServer:
        """TEST_DATABASE_URL's server when set (used as is, never stopped), else a throwaway one started here."""
        check_prerequisites()
        url = os.environ.get(TEST_DATABASE_URL)
        if url:
            server = cls(url)
            try:
                server.execute("SELECT 1")
            except Exception as exc:
                raise PostgresUnavailable(f"TEST_DATABASE_URL cannot be reached: {exc}") from exc
            return server
        return ThrowawayCluster.start().server

    def url_of(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + database))

    def execute(self, *statements: str, database: str | None = None) -> None:
        """Run statements one by one (outside any transaction: CREATE/DROP DATABASE need that)."""
        import asyncpg

        async def run() -> None:
            connection = await asyncpg.connect(self.url_of(database) if database else self.admin_url)
            try:
                for statement in statements:
                    await connection.execute(statement)
            finally:
                await connection.close()

        _run_async(run)

    def run(self, function: Callable[[Any], Awaitable[T]], database: str | None = None) -> T:
        """Call `function(connection)` with an asyncpg connection to `database` (default: the admin one)."""
        import asyncpg

        async def run() -> T:
            connection = await asyncpg.connect(self.url_of(database) if database else self.admin_url)
            try:
                return await function(connection)
            finally:
                await connection.close()

        return _run_async(run)

    def create_database(self, template: str | None = None, prefix: str = "test") -> str:
        """A new database with a unique name, empty or a copy of `template` (which must have no connections)."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        copy = f" TEMPLATE {_identifier(template)}" if template else " TEMPLATE template0"
        self.execute(f"CREATE DATABASE {_identifier(name)}{copy}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, closing whatever connections a test left open."""
        self.execute(f"DROP DATABASE IF EXISTS {_identifier(name)} WITH (FORCE)")

    def stop(self) -> None:
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ThrowawayCluster:
    """`initdb` in a temporary folder and `postgres` on a free port of 127.0.0.1; `stop()` deletes it all."""

    def __init__(self, folder: Path, as_postgres_user: bool) -> None:
        self.folder = folder
        self.home = folder / "pg"  # owned by the user the server runs as
        self.data = self.home / "data"
        self.as_postgres_user = as_postgres_user
        self.programs = find_server_programs()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        self._log_reader: threading.Thread | None = None
        self.server = PostgresServer("", on_stop=self.stop)

    @classmethod
    def start(cls) -> ThrowawayCluster:
        """Start one (call from the main thread: the server is told to stop when the starting thread dies)."""
        _remove_abandoned_folders()
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        cluster = cls(folder, as_postgres_user=os.geteuid() == 0)
        try:
            cluster._initdb()
            for _attempt in range(3):  # a free port can be taken by someone else before the server binds it
                if cluster._start_server():
                    break
            else:
                raise PostgresUnavailable(f"PostgreSQL did not start: {cluster.log_tail()}")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _as_server_user(self, command: list[str | Path]) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres_user else []
        return prefix + [str(part) for part in command]

    def _initdb(self) -> None:
        self.home.mkdir()
        if self.as_postgres_user:
            self.folder.chmod(0o755)
            user = pwd.getpwnam("postgres")
            os.chown(self.home, user.pw_uid, user.pw_gid)
        command: list[str | Path] = [self.programs["initdb"], "-D", self.data, "-U", "postgres", "--auth=trust"]
        command += ["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        result = subprocess.run(self._as_server_user(command), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(result.stderr or result.stdout).strip()[-500:]}")

    def _start_server(self) -> bool:
        """Start postgres on a new free port and wait until it accepts connections; False if it stopped instead."""
        self.port = _free_port()
        settings = {**THROWAWAY_SETTINGS, "listen_addresses": "127.0.0.1", "port": str(self.port)}
        settings["unix_socket_directories"] = str(self.home)
        command: list[str | Path] = [self.programs["postgres"], "-D", self.data]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self._ready.clear()
        self.log.clear()
        # As root, runuser sits in between: when it gets the signal it passes it on (and kills after 2 s).
        self.process = subprocess.Popen(
            self._as_server_user(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_stop_with_parent(signal.SIGTERM if self.as_postgres_user else signal.SIGINT),
        )
        self._log_reader = threading.Thread(target=self._read_log, args=(self.process,), daemon=True)
        self._log_reader.start()
        if not self._ready.wait(START_TIMEOUT):
            raise PostgresUnavailable(f"PostgreSQL did not start within {START_TIMEOUT:.0f} s: {self.log_tail()}")
        if self.process.poll() is not None:
            self._reap()
            return False
        self.server.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return True

    def _read_log(self, process: subprocess.Popen[bytes]) -> None:
        """Keep the server's last log lines and say when it is ready (or gone). Drains the pipe until it closes."""
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            if "ready to accept connections" in line:
                self._ready.set()
        self._ready.set()  # it stopped: whoever waits must look at the process

    def log_tail(self) -> str:
        return " | ".join(list(self.log)[-8:]) or "no output"

    def _reap(self) -> None:
        """Wait for the stopped server, its log reader and its pipe."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._log_reader is not None:
            self._log_reader.join()
        if process.stderr is not None:
            process.stderr.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Immediate shutdown: nothing is kept, so nothing needs writing.
            stop: list[str | Path] = [self.programs["pg_ctl"], "-D", self.data, "-m", "immediate", "-w", "stop"]
            subprocess.run(self._as_server_user(stop), capture_output=True, check=False)
        self._reap()
        shutil.rmtree(self.folder, ignore_errors=True)
