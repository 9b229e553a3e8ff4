"""Several `python -m bot` processes on one PostgreSQL, against the fake Discord and the fake ModelsLab.

The harness of the multi-process tests (`tests/e2e/test_cluster.py`) and of `bench/cluster.py`:

- `RoundRobinProxy`: a TCP load balancer, in front of the processes' webhook receivers as their `PUBLIC_URL`. Each
  new connection goes to the next process in turn; a process that refuses (killed) is skipped, as a load balancer
  that checks its backends would skip it. The bot answers every webhook with `Connection: close`, so each webhook
  is a connection of its own and lands on the next process.
- `ClusterProcess`: one `python -m bot`, configured only by environment variables as an admin runs it, its JSON log
  written to a file (read with `log_entries()`, `errors()`).
- `Cluster`: adds processes (`SHARD_COUNT`, `SHARD_IDS`, `WORKER_ID`, ... per process; `DATABASE_URL`,
  `SECRET_KEY`, `PUBLIC_URL` shared), starts them together as a supervisor would, and waits until every one answers
  `/healthz` with 200 and the fake Discord has exactly the gateway sessions their settings ask for (one per shard,
  none for a worker). It kills (SIGKILL) or stops (SIGTERM) one, and reads the shared database.
- `Cluster.webhook_url(job_id, at="worker")` / `post_webhook(...)`: a job's signed webhook URL at the proxy or at one
  process (to make a webhook land on a chosen process).
- What a member would notice, checked from outside: `fair_order_problems` (round robin by member in the order jobs
  reached ModelsLab), `uploads_by_interaction` (each job's images uploaded to Discord once).

    async with Cluster(discord, modelslab, database_url, tmp_path, LEASE_SECONDS="3") as cluster:
        cluster.add("shard-0", SHARD_COUNT="2", SHARD_IDS="0")
        cluster.add("shard-1", SHARD_COUNT="2", SHARD_IDS="1")
        cluster.add("worker", SHARD_COUNT="2", SHARD_IDS="")
        await cluster.start()
        ...
        await cluster.kill("shard-1")
        await cluster.wait_until_owned_by_none("shard-1")

What the harness assumes of the bot, beyond today's settings: `/healthz` answers 200 once a process drives jobs (a
worker has no gateway: once it is logged in and its database is open), the `jobs` table names the process that
holds a job's lease in `OWNER_COLUMN` (its `WORKER_ID`), and each process logs "Webhook receiver listening on
HOST:PORT" (it does today).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from bot.web.signing import WebhookSigner
from tests.fakes.discord_server import FakeDiscord, FakeInteraction
from tests.fakes.modelslab_server import DEFAULT_KEY, FakeModelsLab

ROOT = Path(__file__).resolve().parents[1]
SECRET_KEY = "cluster-secret-key-0123456789abcdef"
#: The column of `jobs` that names the process holding a job's lease (its WORKER_ID). The lease work names it.
OWNER_COLUMN = "owner"
LISTENING = re.compile(r"Webhook receiver listening on (?P<host>[^\s:]+):(?P<port>\d+)")
START_TIMEOUT = 60.0
HARNESS = "HARNESS"  # the level of the harness's own lines in a process's log


async def eventually(
    condition: Callable[[], Any],
    what: str,
    *,
    timeout: float = 30,
    poll: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Wait until `condition()` returns something other than None (or False), checking every `poll` seconds.

    The condition may raise to fail at once (a process died, something happened that must not). On timeout the
    error says what was awaited, and `describe()` what was seen instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            seen = f"\n{describe()}" if describe is not None else ""
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{seen}")
        await asyncio.sleep(poll)


# ---------------------------------------------------------------------------------------------- the proxy


class RoundRobinProxy:
    """A TCP load balancer: each accepted connection is piped to the next backend in turn.

    A backend that refuses the connection (or does not accept it within `connect_timeout`) is skipped for this
    connection; with none left, the client's connection is closed. `routed` records, for every accepted connection,
    the backend it went to (None: none would take it).
    """

    def __init__(self, backends: Iterable[tuple[str, int]] = (), *, connect_timeout: float = 5.0) -> None:
        self.backends: list[tuple[str, int]] = list(backends)
        self.routed: list[tuple[str, int] | None] = []
        self.connect_timeout = connect_timeout
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> RoundRobinProxy:
        self._server = await asyncio.start_server(self._accept, host, port, backlog=1024)
        return self

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def add_backend(self, address: tuple[str, int]) -> None:
        if address not in self.backends:
            self.backends.append(address)

    def remove_backend(self, address: tuple[str, int]) -> None:
        with contextlib.suppress(ValueError):
            self.backends.remove(address)

    def routed_to(self, address: tuple[str, int]) -> int:
        return sum(1 for routed in self.routed if routed == address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RoundRobinProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        chosen: tuple[str, int] | None = None
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        # Each turn goes to the next backend; a backend that refuses passes the connection on to the next turn. A
        # connection tries each backend once (connections arriving meanwhile take turns too, so it may skip some).
        tried: set[tuple[str, int]] = set()
        while self.backends and len(tried) < len(set(self.backends)):
            candidate = self.backends[self._turn % len(self.backends)]
            self._turn += 1
            if candidate in tried:
                continue
            tried.add(candidate)
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(*candidate), self.connect_timeout)
            except (OSError, TimeoutError):
                continue
            chosen = candidate
            break
        self.routed.append(chosen)
        if upstream is None:
            client_writer.close()
            self._writers.discard(client_writer)
            return
        backend_reader, backend_writer = upstream
        self._writers.add(backend_writer)
        try:
            await asyncio.gather(self._pipe(client_reader, backend_writer), self._pipe(backend_reader, client_writer))
        finally:
            for writer in (client_writer, backend_writer):
                writer.close()
                self._writers.discard(writer)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until end of stream, then pass the end on (half-close), so that either side may finish first."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()


# ---------------------------------------------------------------------------------------------- one process


def parse_shard_ids(value: str | None, shard_count: int | None) -> list[int] | None:
    """`SHARD_IDS` as the bot reads it: "0-3", "0,2", "" (a worker: no shard); unset: every shard of the count."""
    if value is None:
        return list(range(shard_count)) if shard_count else None
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


class ClusterProcess:
    """One `python -m bot`, configured only by environment variables, its output (JSON log lines) in a file."""

    def __init__(self, name: str, env: dict[str, str], directory: Path) -> None:
        self.name = name
        self.env = env
        self.directory = directory
        self.log_path = directory / "bot.log"
        self.process: asyncio.subprocess.Process | None = None
        self.address: tuple[str, int] | None = None
        self.killed_at: float | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0  # where the log of the current start begins
        self._starts = 0

    @property
    def worker_id(self) -> str:
        return self.env.get("WORKER_ID", self.name)

    @property
    def shard_count(self) -> int | None:
        value = self.env.get("SHARD_COUNT", "").strip()
        return int(value) if value.isdigit() else None

    @property
    def shard_ids(self) -> list[int] | None:
        """The shards whose gateway session this process opens; None: one unsharded session; []: none (a worker)."""
        if not self.env.get("SHARD_COUNT", "").strip():
            return None
        return parse_shard_ids(self.env.get("SHARD_IDS"), self.shard_count)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError(f"{self.name} has not said where it listens yet")
        return f"http://{self.address[0]}:{self.address[1]}"

    async def start(self) -> None:
        """Start the process (as its supervisor would: again after a kill, on the same database)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        log = self._open_log()
        self.address = None
        self.killed_at = None
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            env=self.env,
            cwd=self.directory,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )

    def _open_log(self) -> IO[bytes]:
        """The log file, appended to across restarts; each start is marked, and read on its own by `this_start`."""
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop() / close()
        self._mark(f"start {self._starts}")
        self._log_offset = self.log_path.stat().st_size
        return self._log

    def _mark(self, what: str) -> None:
        """A line of the harness's own in the log: where a start begins, where the process was killed (after a line
        the kill may have cut short)."""
        if self._log is None:
            return
        cut = self.log_path.stat().st_size and not self.log_path.read_bytes().endswith(b"\n")
        self._log.write(
            ("\n" if cut else "").encode() + json.dumps({"level": HARNESS, "message": what}).encode() + b"\n"
        )
        self._log.flush()

    def log_text(self, *, this_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if this_start:
            data = data[self._log_offset :]
        return data.decode("utf-8", "replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise, with the end of its log, if the process has exited."""
        if self.process is not None and self.process.returncode is not None and self.killed_at is None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}; the end of its log:\n{self.tail()}"
            )

    def listening_address(self) -> tuple[str, int] | None:
        """Where its webhook receiver listens, from its log (WEBHOOK_PORT=0: the system chose the port)."""
        if self.address is None:
            found = LISTENING.search(self.log_text(this_start=True))
            if found:
                self.address = (found["host"], int(found["port"]))
        return self.address

    async def healthz(self, session: aiohttp.ClientSession) -> int | None:
        """The status of GET /healthz, None if it cannot be reached."""
        if self.address is None:
            return None
        try:
            async with session.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def kill(self) -> None:
        """SIGKILL: no hand-over, no clean-up, as a crash or an OOM kill."""
        assert self.process is not None
        self.killed_at = time.monotonic()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._mark("killed")

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as `docker compose stop` sends it; the exit code (-9: it had to be killed after `timeout`)."""
        assert self.process is not None
        self.killed_at = time.monotonic()  # stopped on purpose: not a crash
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.close()
        assert self.process.returncode is not None
        return self.process.returncode

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (all its threads); 0 once it has exited."""
        if not self.running:
            return 0.0
        assert self.process is not None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_entries(self) -> list[dict[str, Any]]:
        """Every line it wrote, parsed (LOG_FORMAT=json); a line that is not JSON (a traceback printed outside
        logging, a crash) becomes {"level": "RAW", "message": line}."""
        entries: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                entry = {"level": "RAW", "message": line}
            if entry == {"level": HARNESS, "message": "killed"} and entries and entries[-1]["level"] == "RAW":
                entries.pop()  # the line the kill cut short
            entries.append(entry)
        return entries

    def errors(self, expected: Iterable[str] = ()) -> list[str]:
        """Its ERROR and CRITICAL lines, and anything it wrote outside its log format, except those containing one
        of `expected`."""
        allowed = tuple(expected)
        return [
            f"{self.name}: {entry.get('level')} {entry.get('logger', '')}: {entry.get('message')}"
            for entry in self.log_entries()
            if entry.get("level") in ("ERROR", "CRITICAL", "RAW")
            and not any(words in str(entry.get("message")) for words in allowed)
        ]


# ---------------------------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class JobRow:
    """What the shared `jobs` table says of a job."""

    id: str
    guild_id: int | None
    user_id: int
    prompt: str
    status: str
    charged_images: int
    posted: bool
    created_at: float


class Cluster:
    """Bot processes sharing one PostgreSQL database, the fakes, and a round-robin proxy as their `PUBLIC_URL`."""

    def __init__(
        self,
        discord: FakeDiscord,
        modelslab: FakeModelsLab,
        database_url: str,
        workdir: Path,
        **common: str,
    ) -> None:
        self.discord = discord
        self.modelslab = modelslab
        self.database_url = database_url
        self.workdir = workdir
        self.common = common
        self.proxy = RoundRobinProxy()
        self.processes: dict[str, ClusterProcess] = {}
        self._connection: Any = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Cluster:
        await self.proxy.start()
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop_all()
        finally:
            await self.proxy.stop()
            if self._session is not None:
                await self._session.close()
            if self._connection is not None:
                await self._connection.close()
                self._connection = None

    def environment(self, name: str, **env: str) -> dict[str, str]:
        keep = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
        return {
            **keep,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "DISCORD_TOKEN": self.discord.token,
            "DISCORD_API_BASE": self.discord.api_base,
            "DISCORD_GATEWAY_URL": self.discord.gateway_url,
            "MODELSLAB_API_KEY": DEFAULT_KEY,
            "MODELSLAB_BASE_URL": self.modelslab.base_url,
            "DATABASE_URL": self.database_url,
            "DATABASE_PATH": str(self.workdir / name / "unused.sqlite3"),  # never opened with DATABASE_URL
            "SECRET_KEY": SECRET_KEY,
            "WEBHOOK_HOST": "127.0.0.1",
            "WEBHOOK_PORT": "0",
            "PUBLIC_URL": self.proxy.url,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "WORKER_ID": name,
            **self.common,
            **env,
        }

    def add(self, name: str, **env: str) -> ClusterProcess:
        """A process (not started): the shared settings, `WORKER_ID=name`, and `env` (SHARD_COUNT, SHARD_IDS, ...).
        An empty value stays in the environment as an empty setting (`SHARD_IDS=`: a worker)."""
        if name in self.processes:
            raise ValueError(f"there is a process {name} already")
        process = ClusterProcess(name, self.environment(name, **env), self.workdir / name)
        self.processes[name] = process
        return process

    def __getitem__(self, name: str) -> ClusterProcess:
        return self.processes[name]

    # ------------------------------------------------------------------------------------------ starting

    async def start(self, *names: str, timeout: float = START_TIMEOUT, check_gateway: bool = True) -> None:
        """Start the processes (all added ones by default; again after a kill, on the same database) together, and
        wait until each is healthy and the fake Discord has exactly the gateway sessions their settings ask for.
        Fails at once, saying why, when a process exits or a session appears that none of them should have opened
        (an unsharded one among sharded processes, a worker's, a second one for a shard). `check_gateway=False`:
        only wait until each process is healthy (to watch a bot whose processes do not shard as they should)."""
        chosen = [self.processes[n] for n in names] if names else list(self.processes.values())
        if any(process.process is not None for process in chosen):
            # A process restarted by a supervisor comes back after seconds, where this takes milliseconds: let
            # Discord's 5 s between two IDENTIFYs of one rate-limit key pass, as they would have.
            self.discord.let_identify_window_pass()
        identified = self.discord.identify_count
        await asyncio.gather(*(process.start() for process in chosen))
        assert self._session is not None
        session = self._session

        async def ready() -> bool:
            for process in chosen:
                process.check_alive()
                address = process.listening_address()
                if address is not None:
                    self.proxy.add_backend(address)
            if check_gateway:
                self.check_gateway_sessions(chosen, after=identified)
                if self.expected_sessions(chosen) - self.live_sessions(after=identified):
                    return False
            statuses = await asyncio.gather(*(process.healthz(session) for process in chosen))
            if any(status != 200 for status in statuses):
                return False
            if check_gateway:
                self.check_gateway_sessions(chosen, after=identified)  # a worker connected before it was healthy
            return True

        def describe() -> str:
            lines = [f"gateway sessions (shard count: ids): {self.discord.shards_ready()}"]
            lines += [f"--- {p.name} (healthz {p.address}):\n{p.tail(12)}" for p in chosen]
            return "\n".join(lines)

        await eventually(
            ready,
            "every process to be healthy, with its gateway sessions",
            timeout=timeout,
            poll=0.1,
            describe=describe,
        )

    @staticmethod
    def expected_sessions(processes: Iterable[ClusterProcess]) -> Counter[tuple[int, int]]:
        """The gateway sessions these processes should open: (shard count, shard id) each, (0, 0) unsharded."""
        expected: Counter[tuple[int, int]] = Counter()
        for process in processes:
            ids = process.shard_ids
            if ids is None:
                expected[(0, 0)] += 1
            else:
                expected.update((process.shard_count or 0, shard) for shard in ids)
        return expected

    def live_sessions(self, *, after: int = 0) -> Counter[tuple[int, int]]:
        """The fake's ready, connected sessions that IDENTIFYed after `after` (a value of `identify_count`)."""
        sessions: Counter[tuple[int, int]] = Counter()
        for conn in self.discord._connections:  # the fake's own record of its websockets
            session = conn.session
            if not conn.live or session is None or session.identify_index <= after:
                continue
            sessions[(session.shard[1], session.shard[0]) if session.shard is not None else (0, 0)] += 1
        return sessions

    def check_gateway_sessions(self, processes: Sequence[ClusterProcess], *, after: int = 0) -> None:
        """Raise if a session opened since `after` is one that none of these processes should have opened."""
        extra = self.live_sessions(after=after) - self.expected_sessions(processes)
        if extra:
            described = ", ".join(
                ("unsharded" if count == 0 else f"shard {shard} of {count}") + (f" x{n}" if n > 1 else "")
                for (count, shard), n in sorted(extra.items())
            )
            wanted = {p.name: p.shard_ids for p in processes}
            raise AssertionError(
                f"unexpected gateway session(s): {described}; the processes' shards (None: unsharded, []: a worker, "
                f"no gateway): {wanted}"
            )

    # ------------------------------------------------------------------------------------------ stopping

    async def kill(self, name: str) -> ClusterProcess:
        """SIGKILL one process (its webhook port stays behind the proxy, which then skips it)."""
        process = self.processes[name]
        await process.kill()
        return process

    async def stop(self, name: str, timeout: float = 60) -> int:
        """SIGTERM one process and wait for it; its exit code."""
        return await self.processes[name].stop(timeout)

    async def stop_all(self) -> dict[str, int]:
        """SIGTERM every process still running, together; their exit codes."""
        running = [p for p in self.processes.values() if p.running]
        codes = await asyncio.gather(*(p.stop() for p in running))
        for process in self.processes.values():
            process.close()
        return {p.name: code for p, code in zip(running, codes, strict=True)}

    def webhook_url(self, job_id: str, at: str | None = None) -> str:
        """The job's signed webhook URL, at the proxy (as ModelsLab calls it) or at one process's receiver."""
        base = self.proxy.url if at is None else self.processes[at].url
        return WebhookSigner(SECRET_KEY.encode()).webhook_url(base, job_id)

    async def post_webhook(self, job_id: str, body: dict[str, Any], at: str | None = None) -> int:
        """POST a webhook body for the job as ModelsLab would, to the proxy or to one process; the HTTP status."""
        assert self._session is not None
        async with self._session.post(self.webhook_url(job_id, at), json=body) as response:
            return response.status

    def errors(self, expected: Iterable[str] = ()) -> list[str]:
        """Every process's unexpected ERROR lines (see `ClusterProcess.errors`)."""
        allowed = list(expected)
        return [line for process in self.processes.values() for line in process.errors(allowed)]

    # ------------------------------------------------------------------------------------------ the database

    async def connection(self) -> Any:
        if self._connection is None or self._connection.is_closed():
            import asyncpg

            self._connection = await asyncpg.connect(self.database_url)
        return self._connection

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        connection = await self.connection()
        return list(await connection.fetch(sql, *args))

    async def jobs(self) -> list[JobRow]:
        rows = await self.fetch(
            "SELECT id, guild_id, user_id, request_json::jsonb ->> 'prompt' AS prompt, status, charged_images,"
            " posted_at IS NOT NULL AS posted, created_at FROM jobs ORDER BY created_at"
        )
        return [JobRow(**dict(row)) for row in rows]

    async def job(self, prompt: str) -> JobRow | None:
        return next((row for row in await self.jobs() if row.prompt == prompt), None)

    async def wait_job(
        self, prompt: str, predicate: Callable[[JobRow], bool], what: str, timeout: float = 15
    ) -> JobRow:
        async def found() -> JobRow | None:
            self.check_processes()
            row = await self.job(prompt)
            return row if row is not None and predicate(row) else None

        row: JobRow = await eventually(found, f"the job {prompt!r} to be {what}", timeout=timeout)
        return row

    async def owners(self) -> dict[str, str | None]:
        """Job id -> the WORKER_ID holding its lease, for jobs not yet shown."""
        rows = await self.fetch(f"SELECT id, {OWNER_COLUMN} AS owner FROM jobs WHERE posted_at IS NULL")
        return {row["id"]: row["owner"] for row in rows}

    async def unposted_owned_by(self, worker_id: str) -> Counter[str]:
        """The statuses of the jobs not yet shown whose lease `worker_id` holds."""
        rows = await self.fetch(f"SELECT status FROM jobs WHERE posted_at IS NULL AND {OWNER_COLUMN} = $1", worker_id)
        return Counter(row["status"] for row in rows)

    async def wait_until_owned_by_none(self, worker_id: str, timeout: float = 60) -> float:
        """Wait until no job still to show is held by `worker_id` (its jobs were taken over); the seconds it took."""
        started = time.monotonic()

        async def taken_over() -> bool:
            self.check_processes()
            return not await self.unposted_owned_by(worker_id)

        async def left() -> str:
            return f"still held by {worker_id}: {dict(await self.unposted_owned_by(worker_id))}"

        try:
            await eventually(taken_over, f"the jobs of {worker_id} to be taken over", timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {await left()}") from None
        return time.monotonic() - started

    def check_processes(self) -> None:
        """Raise if a process that was not killed on purpose has exited."""
        for process in self.processes.values():
            process.check_alive()


# ---------------------------------------------------------------------------------------------- what members see


def uploads_by_interaction(discord: FakeDiscord) -> Counter[int]:
    """Interaction id -> how many requests made with its token uploaded images and were accepted (a job's result
    posted twice shows up as 2, even when the second upload replaced the first in the same message)."""
    counts: Counter[int] = Counter()
    for request in discord.requests:
        if request.files and 200 <= request.status < 300 and request.interaction_id is not None:
            counts[request.interaction_id] += 1
    return counts


def images_shown(interaction: FakeInteraction) -> int:
    message = interaction.original
    return len(message.attachments) if message is not None else 0


def fair_order_problems(members: Sequence[Any]) -> list[str]:
    """Where the order in which jobs reached ModelsLab is not round robin by member.

    `members` is the member of each job, in the order the jobs were submitted, all of them waiting before the first
    was. Round robin (the least recently served member goes next) means: between two consecutive jobs of one member,
    every other member who still had jobs waiting (who has a job later on) got exactly one. Returns one sentence per
    breach; empty when the order is fair.
    """
    positions: dict[Any, list[int]] = {}
    for index, member in enumerate(members):
        positions.setdefault(member, []).append(index)
    last = {member: spots[-1] for member, spots in positions.items()}
    problems: list[str] = []
    for member, spots in positions.items():
        for first, second in itertools.pairwise(spots):
            for other, other_spots in positions.items():
                if other == member or last[other] < second:
                    continue
                served = sum(1 for spot in other_spots if first < spot < second)
                if served != 1:
                    problems.append(
                        f"between the jobs of {member} at places {first} and {second}, {other} (still waiting) got "
                        f"{served} job(s), not 1"
                    )
    return problems


def lift_failures(discord: FakeDiscord, path_regex: str) -> int:
    """Take back `fail_next` rules of the fake Discord with exactly this path pattern (those not used up yet);
    how many there were."""
    rules = [rule for rule in discord._failures if rule.pattern.pattern == path_regex]
    for rule in rules:
        discord._failures.remove(rule)
    return len(rules)
