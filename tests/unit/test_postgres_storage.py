"""What only PostgreSQL has to prove: several processes at once, and its errors in the bot's words.

Each "process" is a `PostgresStorage` of its own (its own pool, its own server sessions) on one database, as
separate `python -m bot` processes would be. The contract every backend keeps is in test_storage.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

from bot.guilds.rules import Limits
from bot.jobs.model import JobStatus
from bot.storage.ports import StorageBusy, StorageFull
from bot.storage.postgres import PostgresStorage, describe_url, named
from tests.unit.test_storage import new_job

PROCESSES = 3
REQUESTS = 50


@asynccontextmanager
async def processes(url: str, count: int = PROCESSES, **options) -> AsyncIterator[list[PostgresStorage]]:
    async with AsyncExitStack() as stack:
        opened = [PostgresStorage.open(url, upgrade=False, **options) for _ in range(count)]
        yield [await stack.enter_async_context(storage) for storage in opened]


async def reserve_at_once(storages: list[PostgresStorage], limits: Limits, **job_fields) -> list[bool]:
    """REQUESTS reservations started together, spread over the processes; each one's own connection."""
    jobs = [new_job(f"{n:032x}", **{"user_id": 100 + n, **job_fields}) for n in range(REQUESTS)]
    return await asyncio.gather(
        *(storages[n % len(storages)].jobs.insert_within_limits(job, limits) for n, job in enumerate(jobs))
    )


async def test_the_server_quota_is_exact_across_processes(postgres_url):
    async with processes(postgres_url) as storages:
        admitted = await reserve_at_once(storages, Limits(guild_daily=10))
        assert admitted.count(True) == 10
        assert len(await storages[0].jobs.ids()) == 10
        assert (await storages[1].jobs.usage(1, 100, time.time())).guild_today == 10


async def test_a_member_daily_quota_is_exact_across_processes(postgres_url):
    async with processes(postgres_url) as storages:
        admitted = await reserve_at_once(storages, Limits(user_daily=10), user_id=7)
        assert admitted.count(True) == 10
        assert (await storages[2].jobs.usage(1, 7, time.time())).user_today == 10


async def test_a_member_limit_of_jobs_at_once_is_exact_across_processes(postgres_url):
    async with processes(postgres_url) as storages:
        admitted = await reserve_at_once(storages, Limits(user_concurrent=3), user_id=7)
        assert admitted.count(True) == 3
        assert (await storages[0].jobs.usage(1, 7, time.time())).user_running == 3


async def test_servers_do_not_wait_for_each_other_s_quota(postgres_url):
    # Server 1's quota lock is held (a slow reservation in another process): server 2's members are still served.
    async with processes(postgres_url, count=1, lock_timeout=0.3) as (storage,), storage.db.transaction() as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(hashtextextended('job-quota:' || $1::bigint, 0))", 1)
        assert await storage.jobs.insert_within_limits(new_job("b" * 32, guild_id=2), Limits(guild_daily=5))
        with pytest.raises(StorageBusy, match="stayed busy too long"):
            await storage.jobs.insert_within_limits(new_job("a" * 32, guild_id=1), Limits(guild_daily=5))
        assert await storage.jobs.get("a" * 32) is None


async def test_a_full_disk_is_storage_full(postgres_url, postgres_server):
    # PostgreSQL's own error for a full disk (SQLSTATE 53100), raised where a real one would be: on the write.
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.execute(
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$",
        "CREATE TRIGGER disk_full BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION disk_full()",
        database=database,
    )
    async with PostgresStorage.open(postgres_url, upgrade=False) as storage:
        with pytest.raises(StorageFull, match="disk is full"):
            await storage.jobs.insert_within_limits(new_job(), Limits(guild_daily=5))
        with pytest.raises(StorageFull):
            await storage.jobs.insert(new_job())
        assert await storage.jobs.ids() == []


async def test_connections_the_server_dropped_are_replaced_even_for_a_change(postgres_url, postgres_server):
    # A database restart or fail-over closes every pooled connection while it sits idle; the pool finds out only when
    # it uses one. The server ended those sessions itself, so nothing sent on them was kept: changes are tried again.
    def drop_connections() -> int:
        sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'dropped'"
        return int(postgres_server.run(lambda connection: connection.fetchval(sql)))

    async with PostgresStorage.open(postgres_url, pool_size=2, upgrade=False, application_name="dropped") as storage:
        await storage.jobs.insert(new_job())
        dropped = 0
        for round_ in range(6):
            dropped += drop_connections()
            if round_ % 2:
                await asyncio.sleep(0.05)  # the pool may have seen the goodbye already, or not
            assert await storage.jobs.mark_submitting("a" * 32)
            assert await storage.jobs.requeue("a" * 32)
            dropped += drop_connections()
            loaded = await storage.jobs.get("a" * 32)
            assert loaded is not None and loaded.status is JobStatus.QUEUED
        assert dropped >= 6


async def test_every_connection_busy_is_storage_busy(postgres_url):
    async with PostgresStorage.open(postgres_url, pool_size=1, upgrade=False) as storage:
        storage.db._acquire_timeout = 0.2
        async with storage.db.transaction():  # the only connection, held
            with pytest.raises(StorageBusy, match="Every connection to the database stayed busy"):
                await storage.jobs.get("a" * 32)


async def test_an_unreachable_database_is_one_sentence_without_the_password():
    pytest.importorskip("asyncpg", reason="asyncpg is the optional [postgres] extra")
    from bot.storage.ports import StorageError

    url = "postgresql://bot:hunter2-secret@127.0.0.1:1/imagine"
    with pytest.raises(StorageError) as refusal:
        async with PostgresStorage.open(url):
            pass
    assert str(refusal.value).startswith('Cannot connect to the PostgreSQL database "imagine" on 127.0.0.1:1: ')
    assert "hunter2" not in str(refusal.value)


def test_a_url_is_described_without_who_logs_in():
    assert describe_url("postgresql://bot:pw@db.example.org:5432/imagine?sslmode=require") == (
        'PostgreSQL database "imagine" on db.example.org:5432'
    )
    assert describe_url("postgresql:///imagine?host=/run/postgresql&password=pw") == (
        'PostgreSQL database "imagine" on /run/postgresql'
    )
    assert describe_url("postgres://bot:pw@h1:5432,h2:5433/x") == 'PostgreSQL database "x" on h1:5432,h2:5433'


def test_named_parameters_are_numbered_and_unused_ones_left_out():
    sql, args = named("a = :x AND b::bigint = :y AND c = :x", x=1, y=2, z=3)
    assert (sql, args) == ("a = $1 AND b::bigint = $2 AND c = $1", [1, 2])


class RoundTripCounter:
    """A TCP relay between the pool and PostgreSQL that counts round trips: each time the client speaks again after
    the server answered (a message split over several packets is still one turn)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.turns = 0
        self._last_speaker = "server"
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, speaker: str) -> None:
            try:
                while data := await reader.read(65536):
                    if speaker == "client" and self._last_speaker == "server":
                        self.turns += 1
                    self._last_speaker = speaker
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        for task in (
            asyncio.create_task(pipe(client_reader, server_writer, "client")),
            asyncio.create_task(pipe(server_reader, client_writer, "server")),
        ):
            self._pipes.add(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()


async def test_the_acknowledgement_path_makes_one_round_trip_per_statement(postgres_url):
    """Before Discord's acknowledgement a command reads the server's settings (when not cached) and reserves its
    job: one round trip each, the reservation's lock included, and none for giving the connection back."""
    parts = urlsplit(postgres_url)
    relay = RoundTripCounter(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await relay.start()
    try:
        url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
        async with PostgresStorage.open(url, pool_size=1, upgrade=False) as storage:
            # Each statement's first run on a connection also prepares it (one more round trip, once).
            await storage.jobs.insert_within_limits(new_job("0" * 32), Limits(guild_daily=100, user_concurrent=99))
            await storage.guilds.config(1)
            before = relay.turns
            for n in range(1, 21):
                job = new_job(f"{n:032x}")
                assert await storage.jobs.insert_within_limits(job, Limits(guild_daily=100, user_concurrent=99))
            assert relay.turns - before == 20
            before = relay.turns
            await storage.guilds.config(1)
            assert relay.turns - before == 1
    finally:
        await relay.stop()
