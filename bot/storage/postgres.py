"""PostgreSQL storage: several bot processes on one database (`DATABASE_URL`), through an asyncpg pool.

Implements the Protocols of `bot.storage.ports` with the same behaviour as `bot.storage.sqlite` (the contract tests
run on both). asyncpg (the optional `[postgres]` extra) is imported only when a database is opened here.

Where the SQL differs from SQLite's, and why:
- **Exact quotas.** SQLite's one writer makes its single `INSERT ... SELECT ... WHERE <limits>` exact; under
  PostgreSQL's READ COMMITTED two such statements each miss the other's row. The limits are checked by the function
  `job_fits_limits` (migration 0010), which first takes a transaction-level advisory lock per server and then reads
  the sums in a fresh snapshot: exact across processes, and still one statement, one round trip.
- **`guild_id IS ?`** does not exist; `IS NOT DISTINCT FROM $1` exists but no index serves it. Such statements come
  in two variants: `guild_id = $n` and `guild_id IS NULL`.
- **Upserts** name the old row (`forgotten_usage.images + EXCLUDED.images`: a bare column is ambiguous), `INSERT OR
  REPLACE` is `ON CONFLICT ... DO UPDATE`, SQLite's two-argument `MAX(a, b)` is `GREATEST(a, b)`, and its
  `json_set`/`json_remove` are jsonb operators (the columns stay text).
- **Parameters are typed** by the statement: a parameter PostgreSQL cannot type from its place is cast (`$1::bigint`),
  Discord ids and seeds are bigint, pictures and sealed keys bytea.
- **Round trips.** Each statement is one round trip: pooled connections keep no session state (no `SET`, session
  advisory lock, `LISTEN` or cursor), so asyncpg's reset query on every release (`RESET ALL; UNLISTEN *; ...`: a
  second round trip per statement) is skipped. Code that ever needs session state takes a connection of its own.

Errors become the backend-neutral ones the command tree explains: a full disk (SQLSTATE 53100) `StorageFull`; a lock
or statement timeout, every connection busy, too many connections or a lost connection `StorageBusy`. A read whose
connection was lost is retried on a fresh one; a change is retried only when it cannot have reached the server (its
outcome is otherwise unknown: conditional updates would misreport a retried success as a lost race).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from bot.guilds.rules import GuildConfig, Limits, Usage, day_start
from bot.jobs.model import UNFINISHED, Job
from bot.log import register_secret
from bot.storage import postgres_migrations
from bot.storage.changes import FORGET_JOB_COLUMNS, Dialect, JobChanges, guild_settings_update, member_defaults_save
from bot.storage.events import PostgresEvents
from bot.storage.migrations import Migration, latest_version
from bot.storage.ports import LineState, StorageBusy, StorageError, StorageFull, WaitingJob
from bot.storage.rows import JOB_INSERT_COLUMNS, MEMBER_DEFAULT_COLUMNS, guild_config_from_row, job_from_row

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

T = TypeVar("T")

URL_SCHEMES = ("postgresql", "postgres")
# How long a statement waits for a lock (the quota lock of a busy server included) before the member is told the
# database is busy: SQLite's busy_timeout, the same 5 s.
LOCK_TIMEOUT = 5.0
# A statement that has not answered by then is given up (the server, or the network to it, is in trouble).
COMMAND_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
# The namespace of the IDENTIFY turn locks (two-int advisory keys: this, then the rate-limit bucket).
IDENTIFY_LOCK_SPACE = 0x1D3F
# Waits before trying again after a lost connection (a read, or a change that cannot have been kept) or a refused one.
RETRY_DELAYS = (0.0, 0.25, 1.0)
RUNNING = ", ".join(f"'{status.value}'" for status in UNFINISHED)
_NAMED_PARAMETER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def is_postgres_url(url: str) -> bool:
    return urlsplit(url.strip()).scheme in URL_SCHEMES


def describe_url(url: str) -> str:
    """`PostgreSQL database "bot" on db.example.org:5432`: where the data is, never who logs in or how."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2] or ",".join(query.get("host", ())) or "localhost"
    database = unquote(parts.path.lstrip("/")) or ",".join(query.get("dbname", ())) or unquote(parts.username or "")
    return f'PostgreSQL database "{database}" on {hosts}'


def url_secrets(url: str) -> list[str]:
    """The password(s) a URL carries, for the log filter."""
    parts = urlsplit(url)
    found = [unquote(parts.password)] if parts.password else []
    return found + parse_qs(parts.query).get("password", [])


def _rows_changed(status: str) -> int:
    """asyncpg's command status ("UPDATE 3", "INSERT 0 1") → 3, 1."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


@lru_cache(maxsize=256)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """`... :guild ... :user ... :guild` → `... $1 ... $2 ... $1` and the names in number order (`::casts` kept)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED_PARAMETER.sub(number, sql), tuple(names)


def named(sql: str, **values: Any) -> tuple[str, list[Any]]:
    """A statement with named parameters as asyncpg takes it; parameters the statement does not use are left out
    (PostgreSQL refuses a parameter it cannot type, and one it never sees is such)."""
    text, names = _numbered(sql)
    return text, [values[name] for name in names]


def _guild_is(guild_id: int | None) -> str:
    """The two variants of SQLite's `guild_id IS ?`, both served by the indexes on guild_id."""
    return "guild_id IS NULL" if guild_id is None else "guild_id = :guild"


# ---------------------------------------------------------------------------------------------- errors


def _failure_kind(exc: BaseException) -> str | None:
    """ "full", "busy", "lost" (the connection went away: "busy" for the caller), "refused" (no connection could be
    had: nothing was sent), or None: an error of the statement itself (a bug), raised as it is."""
    import asyncpg

    if isinstance(exc, asyncpg.DiskFullError):
        return "full"
    if isinstance(
        exc,
        asyncpg.LockNotAvailableError
        | asyncpg.QueryCanceledError
        | asyncpg.DeadlockDetectedError
        | asyncpg.SerializationError
        | TimeoutError,
    ):
        return "busy"
    if isinstance(exc, asyncpg.TooManyConnectionsError | asyncpg.CannotConnectNowError):
        return "refused"
    if isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.AdminShutdownError | asyncpg.CrashShutdownError | OSError
    ):
        return "lost"
    if type(exc) is asyncpg.InterfaceError and "closed" in str(exc):  # not its subclasses: DataError is a bug
        return "lost"
    return None


def _translated(exc: BaseException, kind: str) -> StorageError:
    reason = str(exc).strip().rstrip(".") or type(exc).__name__
    if kind == "full":
        return StorageFull(f"The database cannot be written: its disk is full ({reason}).")
    if kind == "busy":
        return StorageBusy(f"The database stayed busy too long ({reason}).")
    if kind == "refused":
        return StorageBusy(f"The database server takes no more connections now ({reason}).")
    return StorageBusy(f"The connection to the database was lost ({type(exc).__name__}: {reason}).")


async def _keep_connection(connection: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to reset (pooled connections keep no session state), no round trip."""


class PostgresDatabase:
    """The pool, with PostgreSQL's errors translated and safe retries; each call takes a connection and returns it."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = LOCK_TIMEOUT) -> None:
        self.pool = pool
        self._acquire_timeout = acquire_timeout

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one change; returns how many rows it changed."""
        status = await self._run(lambda connection: connection.execute(sql, *args), read=False)
        return _rows_changed(status)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda connection: connection.fetch(sql, *args), read=True)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._run(lambda connection: connection.fetchrow(sql, *args), read=True)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._run(lambda connection: connection.fetchval(sql, *args), read=True)

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, read: bool) -> T:
        delays = iter(RETRY_DELAYS)
        while True:
            diagnosis: tuple[str | None, bool] | None = None
            try:
                async with self.pool.acquire(timeout=self._acquire_timeout) as connection:
                    try:
                        return await work(connection)
                    except Exception as exc:
                        diagnosis = _diagnosis(exc, connection)
                        raise
            except Exception as exc:
                if diagnosis is None:  # no connection could be had: nothing was sent
                    if isinstance(exc, TimeoutError):
                        raise StorageBusy(
                            f"Every connection to the database stayed busy for {self._acquire_timeout:g} s."
                        ) from exc
                    diagnosis = (_failure_kind(exc), False)
                kind, may_have_taken_effect = diagnosis
                if kind is None:
                    raise
                safe = kind == "refused" or (kind == "lost" and (read or not may_have_taken_effect))
                delay = next(delays, None) if safe else None
                if delay is None:
                    raise _translated(exc, kind) from exc
                log.warning("Database connection problem (%s: %s); trying again", type(exc).__name__, exc)
                if kind == "lost":
                    # One lost connection usually means all of them (a restart, a fail-over): replace every pooled
                    # connection at its next use rather than finding each dead one with a failed statement.
                    await self.pool.expire_connections()
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """One connection in a transaction (READ COMMITTED), committed at the end or rolled back on any error.
        Not tried again: the caller's block cannot be run twice."""
        kind: str | None = None
        try:
            async with self.pool.acquire(timeout=self._acquire_timeout) as connection:
                try:
                    async with connection.transaction():
                        yield connection
                except StorageError:
                    raise
                except Exception as exc:
                    kind = _diagnosis(exc, connection)[0]
                    raise
        except StorageError:
            raise
        except Exception as exc:
            kind = kind or _failure_kind(exc)
            if kind is None:
                raise
            raise _translated(exc, kind) from exc


def _diagnosis(exc: BaseException, connection: asyncpg.Connection) -> tuple[str | None, bool]:
    """What went wrong with a statement (a `_failure_kind`), and whether it may have taken effect anyway.

    A connection the server closed while it sat in the pool (a restart, a fail-over, an idle timeout) is found out
    only when used: asyncpg then refuses to send (`InterfaceError` "connection is closed", or `InternalClientError`
    "cannot switch to state ...") or reports the server's own goodbye (`ConnectionDoesNotExistError` caused by
    `AdminShutdownError` and kin: the server ended the session, rolling back whatever it had not committed). None of
    these took effect, so even a change is tried again on a fresh connection. A connection lost with no word from the
    server (a network fault) leaves a change's outcome unknown.
    """
    import asyncpg

    kind = _failure_kind(exc)
    if kind is None and _is_closed(connection):
        kind = "lost"
    if kind != "lost":
        return kind, True
    refused_to_send = isinstance(exc, asyncpg.InternalClientError) or (
        type(exc) is asyncpg.InterfaceError and "connection is closed" in str(exc)
    )
    ended = (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError)
    server_ended_session = isinstance(exc, ended) or isinstance(exc.__cause__, ended)
    return kind, not (refused_to_send or server_ended_session)


def _is_closed(connection: asyncpg.Connection) -> bool:
    import asyncpg

    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:  # the pool took the proxy back: its connection closed under it
        return True


# ---------------------------------------------------------------------------------------------- the storage


class PostgresStorage:
    """The `Storage` on one PostgreSQL database, shared with any number of other processes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        description: str,
        migrations: Path,
        url: str = "",
        *,
        owner: str = "local",
        lease_seconds: float = 30.0,
    ) -> None:
        self.db = PostgresDatabase(pool)
        self._description = description
        self._migrations = migrations
        self._url = url
        self._identify_pool: asyncpg.Pool | None = None
        self.events = PostgresEvents(url, pool)
        self._identify_holds: set[asyncio.Task[None]] = set()
        self.jobs = PostgresJobs(self.db, owner=owner, lease_seconds=lease_seconds)
        self.leases = PostgresLeases(self.db, owner=owner, lease_seconds=lease_seconds)
        self.queue = PostgresQueue(self.db)
        self.guilds = PostgresGuilds(self.db)
        self.member_defaults = PostgresMemberDefaults(self.db)

    @property
    def description(self) -> str:
        return self._description

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        upgrade: bool = True,
        migrations: Path = postgres_migrations.MIGRATIONS_DIRECTORY,
        lock_timeout: float = LOCK_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        application_name: str = "modelslab-imagine-bot",
        owner: str = "local",
        lease_seconds: float = 30.0,
    ) -> AsyncIterator[PostgresStorage]:
        description = describe_url(url)
        for secret in url_secrets(url):
            register_secret(secret)
        try:
            import asyncpg
        except ImportError:
            raise StorageError(
                "DATABASE_URL names a PostgreSQL database, but asyncpg is not installed: "
                "install the bot with its postgres extra (pip install -e '.[postgres]')."
            ) from None
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                max_inactive_connection_lifetime=300,
                timeout=CONNECT_TIMEOUT,
                command_timeout=command_timeout,
                reset=_keep_connection,
                server_settings={
                    "application_name": application_name,
                    "lock_timeout": str(int(lock_timeout * 1000)),
                    # A transaction left open by a process that hangs must not hold its locks for ever.
                    "idle_in_transaction_session_timeout": str(int(command_timeout * 2000)),
                },
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = str(exc).strip().rstrip(".") or type(exc).__name__
            raise StorageError(f"Cannot connect to the {description}: {reason}.") from exc
        try:
            storage = cls(pool, description, migrations, url, owner=owner, lease_seconds=lease_seconds)
            if upgrade:
                await storage.upgrade()
            yield storage
        finally:
            await storage.events.close()
            await storage._close_identify_pool()
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    async def current_version(self) -> int:
        async with self.db.transaction() as connection:
            return await postgres_migrations.current_version(connection)

    async def latest_version(self) -> int:
        return latest_version(self._migrations)

    async def upgrade(self) -> list[Migration]:
        """Apply every migration newer than the database; processes starting together wait for each other."""
        try:
            async with self.db.pool.acquire(timeout=CONNECT_TIMEOUT) as connection:
                return await postgres_migrations.upgrade(connection, self._migrations)
        except StorageError:
            raise
        except Exception as exc:
            kind = _failure_kind(exc)
            if kind is None:
                raise
            raise _translated(exc, kind) from exc

    async def shared_settings(self) -> dict[str, str]:
        if await self.db.fetchval("SELECT to_regclass('shared_settings')") is None:
            return {}  # not migrated yet (`check` before the first start)
        return {row["name"]: row["value"] for row in await self.db.fetch("SELECT name, value FROM shared_settings")}

    async def record_shared_setting(self, name: str, value: str, *, replace: bool = False) -> str:
        conflict = "DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at" if replace else "DO NOTHING"
        await self.db.execute(
            f"INSERT INTO shared_settings (name, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) {conflict}",
            name,
            value,
            time.time(),
        )
        # A statement of its own: its snapshot includes the row of a process whose insert won the conflict.
        return str(await self.db.fetchval("SELECT value FROM shared_settings WHERE name = $1", name))

    async def identify_turn(self, bucket: int, spacing: float) -> None:
        """A session advisory lock per bucket, held `spacing` seconds after the turn is taken. Its connection comes
        from a small pool of its own (no lock timeout; asyncpg's reset releases every session lock when the connection
        goes back), never the main pool, whose connections must hold no session state. A process that dies frees
        its lock with its connection."""
        if self._identify_pool is None:
            import asyncpg

            self._identify_pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=4, timeout=CONNECT_TIMEOUT, server_settings={"lock_timeout": "0"}
            )
        pool = self._identify_pool
        connection = await pool.acquire()
        try:
            await connection.execute("SELECT pg_advisory_lock($1::integer, $2::integer)", IDENTIFY_LOCK_SPACE, bucket)
        except BaseException:
            await pool.release(connection)
            raise

        async def hold() -> None:
            try:
                await asyncio.sleep(spacing)
            finally:
                await pool.release(connection)  # the reset unlocks it

        task = asyncio.create_task(hold(), name=f"identify-bucket-{bucket}")
        self._identify_holds.add(task)
        task.add_done_callback(self._identify_holds.discard)

    async def _close_identify_pool(self) -> None:
        for task in list(self._identify_holds):
            task.cancel()
        await asyncio.gather(*self._identify_holds, return_exceptions=True)
        if self._identify_pool is not None:
            await self._identify_pool.close()

    async def forget_member(self, user_id: int, now: float) -> int:
        today = day_start(now)
        async with self.db.transaction() as connection:
            await connection.execute(
                "INSERT INTO forgotten_usage (guild_id, user_id, day_start, images, last_request_at)"
                " SELECT guild_id, user_id, $1::float8, SUM(CASE WHEN created_at >= $1 THEN charged_images ELSE 0 END),"
                " MAX(created_at) FROM jobs"
                " WHERE user_id = $2 AND posted_at IS NOT NULL AND guild_id IS NOT NULL GROUP BY guild_id, user_id"
                " ON CONFLICT (guild_id, user_id, day_start) DO UPDATE"
                " SET images = forgotten_usage.images + EXCLUDED.images,"
                " last_request_at = GREATEST(COALESCE(forgotten_usage.last_request_at, 0), EXCLUDED.last_request_at)",
                today,
                user_id,
            )
            # The member's pictures go, and their links: in the member's own jobs, and in the copies that other
            # members' Re-rolls and Edits made of them (jobs still under way keep theirs until they are shown).
            await connection.execute(
                "DELETE FROM job_inputs WHERE job_id IN"
                " (SELECT id FROM jobs WHERE user_id = $1 AND posted_at IS NOT NULL"
                " UNION SELECT id FROM jobs WHERE picture_owner_id = $1 AND posted_at IS NOT NULL)",
                user_id,
            )
            await connection.execute(
                "UPDATE jobs SET request_json = (request_json::jsonb || jsonb_build_object('source_url', NULL))::text,"
                " picture_owner_id = 0 WHERE picture_owner_id = $1 AND posted_at IS NOT NULL",
                user_id,
            )
            status = await connection.execute(
                "UPDATE jobs SET user_id = 0, request_json = ((request_json::jsonb"
                " || jsonb_build_object('prompt', '', 'negative_prompt', NULL, 'source_url', NULL))"
                " #- '{advanced,ip_adapter_image}')::text,"
                f" {FORGET_JOB_COLUMNS}"
                " WHERE user_id = $1 AND posted_at IS NOT NULL",
                user_id,
            )
            await connection.execute("DELETE FROM member_settings WHERE user_id = $1", user_id)
            await connection.execute("DELETE FROM forgotten_usage WHERE day_start < $1", today)
        return _rows_changed(status)


# ---------------------------------------------------------------------------------------------- jobs


class PostgresJobs(JobChanges):
    """The `JobRepository` on PostgreSQL."""

    dialect = Dialect.POSTGRES
    _INSERT_COLUMNS = ", ".join(JOB_INSERT_COLUMNS)
    # The values are cast: in an INSERT ... SELECT the target columns do not type the parameters.
    _INSERT_WITHIN_LIMITS = (
        f"INSERT INTO jobs ({_INSERT_COLUMNS})"
        " SELECT $1::text, $2::text, $3::bigint, $4::bigint, $5::bigint, $6::text, $7::text, $8::text, $9::integer,"
        " $10::bigint, $11::text, $12::float8, $13::integer, $14::integer, $15::text, $16::float8, $17::float8,"
        " $18::float8, $19::integer, $20::bigint, $21::text, $22::float8"
        " WHERE job_fits_limits($3, $5, $9, $16, $23, $24, $25, $26, $27)"
    )

    def __init__(self, db: PostgresDatabase, *, owner: str = "local", lease_seconds: float = 30.0) -> None:
        self._db = db
        self._owner = owner
        self._lease_seconds = lease_seconds

    async def _fetch_row(self, sql: str, values: Sequence[Any]) -> asyncpg.Record | None:
        return await self._db.fetchrow(sql, *values)

    async def _execute(self, sql: str, values: Sequence[Any]) -> None:
        await self._db.execute(sql, *values)

    async def insert_within_limits(self, job: Job, limits: Limits) -> bool:
        """Store the job only if it fits every limit: one statement, exact across processes (`job_fits_limits`
        locks the server's quota until the statement commits)."""
        changed = await self._db.execute(
            self._INSERT_WITHIN_LIMITS,
            *self._insert_values(job),
            day_start(job.created_at),
            limits.guild_daily,
            limits.user_daily,
            limits.user_concurrent,
            limits.cooldown_seconds,
        )
        return changed == 1

    async def usage(self, guild_id: int | None, user_id: int, now: float) -> Usage:
        guild = _guild_is(guild_id)
        sql, args = named(
            "SELECT"
            f" (SELECT COALESCE(SUM(charged_images), 0) FROM jobs WHERE {guild} AND created_at >= :today),"
            " (SELECT COALESCE(SUM(charged_images), 0) FROM jobs"
            f"   WHERE {guild} AND user_id = :user AND created_at >= :today)"
            " + (SELECT COALESCE(SUM(images), 0) FROM forgotten_usage"
            f"   WHERE {guild} AND user_id = :user AND day_start = :today),"
            f" (SELECT COUNT(*) FROM jobs WHERE {guild} AND user_id = :user AND status IN ({RUNNING})),"
            f" GREATEST((SELECT MAX(created_at) FROM jobs WHERE {guild} AND user_id = :user),"
            f"   (SELECT MAX(last_request_at) FROM forgotten_usage WHERE {guild} AND user_id = :user))",
            guild=guild_id,
            user=user_id,
            today=day_start(now),
        )
        row = await self._db.fetchrow(sql, *args)
        assert row is not None
        return Usage(
            guild_today=int(row[0]), user_today=int(row[1]), user_running=int(row[2]), user_last_request_at=row[3]
        )

    async def get(self, job_id: str) -> Job | None:
        row = await self._db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        return job_from_row(row) if row else None

    async def ids(self, *, limit: int = 1000) -> list[str]:
        return [row[0] for row in await self._db.fetch("SELECT id FROM jobs ORDER BY created_at, id LIMIT $1", limit)]

    async def needing_work(self) -> list[Job]:
        rows = await self._db.fetch("SELECT * FROM jobs WHERE posted_at IS NULL ORDER BY created_at")
        return [job_from_row(row) for row in rows]

    async def last_served(self, user_ids: list[int]) -> dict[int, float]:
        if not user_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT user_id, MAX(submitted_at) FROM jobs WHERE user_id = ANY($1::bigint[]) AND submitted_at IS NOT NULL"
            " GROUP BY user_id",
            user_ids,
        )
        return {int(row[0]): float(row[1]) for row in rows}

    async def history(self, user_id: int, *, guild_id: int | None, offset: int = 0, limit: int = 1000) -> list[Job]:
        where = "user_id = :user" + ("" if guild_id is None else " AND guild_id = :guild")
        sql, args = named(
            f"SELECT * FROM jobs WHERE {where} ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset",
            user=user_id,
            guild=guild_id,
            limit=limit,
            offset=offset,
        )
        return [job_from_row(row) for row in await self._db.fetch(sql, *args)]

    async def history_count(self, user_id: int, *, guild_id: int | None) -> int:
        where = "user_id = :user" + ("" if guild_id is None else " AND guild_id = :guild")
        sql, args = named(f"SELECT COUNT(*) FROM jobs WHERE {where}", user=user_id, guild=guild_id)
        return int(await self._db.fetchval(sql, *args))

    async def save_input(self, job_id: str, image: bytes, width: int, height: int) -> None:
        await self._db.execute(
            "INSERT INTO job_inputs (job_id, image, width, height, created_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (job_id) DO UPDATE SET image = EXCLUDED.image, width = EXCLUDED.width,"
            " height = EXCLUDED.height, created_at = EXCLUDED.created_at",
            job_id,
            image,
            width,
            height,
            time.time(),
        )

    async def drop_old_inputs(self, before: float, *, batch: int = 500) -> int:
        return await self._db.execute(
            "DELETE FROM job_inputs WHERE job_id IN (SELECT job_inputs.job_id FROM job_inputs"
            " JOIN jobs ON jobs.id = job_inputs.job_id"
            " WHERE job_inputs.created_at < $1 AND jobs.posted_at IS NOT NULL LIMIT $2)",
            before,
            batch,
        )

    async def forget_expired_tokens(self, now: float, *, batch: int = 500) -> int:
        return await self._db.execute(
            "UPDATE jobs SET interaction_token = NULL WHERE id IN (SELECT id FROM jobs"
            " WHERE posted_at IS NULL AND interaction_token IS NOT NULL AND token_expires_at < $1 LIMIT $2)",
            now,
            batch,
        )

    async def input_image(self, job_id: str) -> bytes | None:
        image = await self._db.fetchval("SELECT image FROM job_inputs WHERE job_id = $1", job_id)
        return bytes(image) if image is not None else None

    async def has_input(self, job_id: str) -> bool:
        return await self._db.fetchval("SELECT 1 FROM job_inputs WHERE job_id = $1", job_id) is not None

    async def copy_input(self, from_job_id: str, to_job_id: str) -> bool:
        changed = await self._db.execute(
            "INSERT INTO job_inputs (job_id, image, width, height, created_at)"
            " SELECT $1::text, image, width, height, $2::float8 FROM job_inputs WHERE job_id = $3"
            " ON CONFLICT (job_id) DO UPDATE SET image = EXCLUDED.image, width = EXCLUDED.width,"
            " height = EXCLUDED.height, created_at = EXCLUDED.created_at",
            to_job_id,
            time.time(),
            from_job_id,
        )
        return changed == 1

    async def sealed_key(self, job_id: str) -> bytes | None:
        sealed = await self._db.fetchval("SELECT api_key_ciphertext FROM jobs WHERE id = $1", job_id)
        return bytes(sealed) if sealed is not None else None


# ---------------------------------------------------------------------------------------------- leases, line


class PostgresLeases:
    """The `LeaseRepository` on PostgreSQL: orphans are claimed with FOR UPDATE SKIP LOCKED, so two processes
    claiming at once never take the same job (a row locked by one is skipped by the other; a lease renewed
    meanwhile is re-checked under the row lock)."""

    def __init__(self, db: PostgresDatabase, *, owner: str, lease_seconds: float) -> None:
        self._db = db
        self._owner = owner
        self._lease_seconds = lease_seconds

    async def claim(self, *, limit: int, everything: bool = False, mine: bool = False) -> list[Job]:
        now = time.time()
        mine_too = " OR owner = $2" if mine else ""
        # ($3 is typed even when unused: everything is taken, whatever the leases.)
        free = (
            " AND $3::float8 IS NOT NULL" if everything else f" AND (owner IS NULL OR lease_expires_at < $3{mine_too})"
        )
        rows = await self._db.fetch(
            "UPDATE jobs SET owner = $2, lease_expires_at = $1 WHERE id IN (SELECT id FROM jobs"
            f" WHERE posted_at IS NULL{free} ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING *",
            now + self._lease_seconds,
            self._owner,
            now,
            limit,
        )
        return sorted((job_from_row(row) for row in rows), key=lambda job: job.created_at)

    async def renew(self) -> set[str]:
        rows = await self._db.fetch(
            "UPDATE jobs SET lease_expires_at = $1 WHERE owner = $2 AND posted_at IS NULL RETURNING id",
            time.time() + self._lease_seconds,
            self._owner,
        )
        return {row["id"] for row in rows}

    async def taken(self, job_ids: Iterable[str]) -> set[str]:
        rows = await self._db.fetch(
            "SELECT id FROM jobs WHERE id = ANY($1::text[]) AND owner IS DISTINCT FROM $2", list(job_ids), self._owner
        )
        return {row["id"] for row in rows}

    async def release(self) -> int:
        return await self._db.execute(
            "UPDATE jobs SET owner = NULL, lease_expires_at = 0 WHERE owner = $1 AND posted_at IS NULL", self._owner
        )


class PostgresQueue:
    """The `QueueRepository` on PostgreSQL. Giving slots is serialised per key by a transaction-level advisory lock,
    so the cap holds whatever number of processes give slots at once."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def enqueue(self, job_id: str, key_ref: str, *, first: bool = False) -> bool:
        async with self._db.transaction() as connection:
            row = await connection.fetchrow(
                "UPDATE jobs SET key_ref = $1, enqueued_at = COALESCE(enqueued_at, $2), first_in_line = $3"
                " WHERE id = $4 AND status = 'queued' RETURNING granted_at, user_id",
                key_ref,
                time.time(),
                int(first),
                job_id,
            )
            if row is not None and first:
                await connection.execute(
                    "INSERT INTO queue_members (key_ref, user_id, served_seq) SELECT $1::text, $2::bigint,"
                    " COALESCE((SELECT MIN(served_seq) FROM queue_members WHERE key_ref = $1), 0) - 1"
                    " ON CONFLICT (key_ref, user_id) DO UPDATE SET served_seq = EXCLUDED.served_seq",
                    key_ref,
                    row["user_id"],
                )
        return row is not None and row["granted_at"] is not None

    async def grant(self, key_ref: str, limit: int, now: float) -> list[tuple[str, str | None]]:
        granted: list[tuple[str, str | None]] = []
        async with self._db.transaction() as connection:
            await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended('queue:' || $1, 0))", key_ref)
            await connection.execute(
                "INSERT INTO queue_keys (key_ref) VALUES ($1) ON CONFLICT (key_ref) DO NOTHING", key_ref
            )
            row = await connection.fetchrow(
                "SELECT grants, paused_until,"
                " (SELECT COUNT(*) FROM jobs WHERE key_ref = $1 AND status IN ('submitting', 'processing'))"
                " + (SELECT COUNT(*) FROM jobs WHERE key_ref = $1 AND status = 'queued' AND granted_at IS NOT NULL)"
                " AS active FROM queue_keys WHERE key_ref = $1",
                key_ref,
            )
            grants, paused_until, active = int(row["grants"]), float(row["paused_until"]), int(row["active"])
            if paused_until > now:
                return []
            while active < limit:
                nxt = await connection.fetchrow(
                    "SELECT j.id, j.user_id, j.owner FROM jobs j LEFT JOIN queue_members m"
                    " ON m.key_ref = j.key_ref AND m.user_id = j.user_id"
                    " WHERE j.key_ref = $1 AND j.status = 'queued'"
                    " AND j.granted_at IS NULL AND j.enqueued_at IS NOT NULL"
                    " ORDER BY COALESCE(m.served_seq, -1), j.first_in_line DESC, j.enqueued_at, j.id LIMIT 1",
                    key_ref,
                )
                if nxt is None:
                    break
                await connection.execute("UPDATE jobs SET granted_at = $1 WHERE id = $2", now, nxt["id"])
                await connection.execute(
                    "INSERT INTO queue_members (key_ref, user_id, served_seq) VALUES ($1, $2, $3)"
                    " ON CONFLICT (key_ref, user_id) DO UPDATE SET served_seq = EXCLUDED.served_seq",
                    key_ref,
                    nxt["user_id"],
                    grants,
                )
                grants += 1
                active += 1
                granted.append((nxt["id"], nxt["owner"]))
            await connection.execute("UPDATE queue_keys SET grants = $1 WHERE key_ref = $2", grants, key_ref)
        return granted

    async def pause(self, key_ref: str, until: float) -> float:
        value = await self._db.fetchval(
            "INSERT INTO queue_keys (key_ref, paused_until) VALUES ($1, $2) ON CONFLICT (key_ref)"
            " DO UPDATE SET paused_until = GREATEST(queue_keys.paused_until, EXCLUDED.paused_until)"
            " RETURNING paused_until",
            key_ref,
            until,
        )
        return float(value)

    async def line(self, key_ref: str) -> LineState:
        paused = await self._db.fetchval("SELECT paused_until FROM queue_keys WHERE key_ref = $1", key_ref)
        rows = await self._db.fetch(
            "SELECT j.id, j.user_id, m.served_seq, j.first_in_line, j.enqueued_at FROM jobs j LEFT JOIN queue_members m"
            " ON m.key_ref = j.key_ref AND m.user_id = j.user_id"
            " WHERE j.key_ref = $1 AND j.status = 'queued' AND j.granted_at IS NULL AND j.enqueued_at IS NOT NULL",
            key_ref,
        )
        waiting = [
            WaitingJob(
                r["id"], int(r["user_id"]), r["served_seq"], bool(r["first_in_line"]), float(r["enqueued_at"] or 0)
            )
            for r in rows
        ]
        return LineState(float(paused) if paused is not None else 0.0, waiting)

    async def claim_payload(self, key_ref: str, payload_ref: str, now: float, window: float) -> float | None:
        changed = await self._db.execute(
            "INSERT INTO recent_payloads (key_ref, payload_ref, sent_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (key_ref, payload_ref) DO UPDATE SET sent_at = EXCLUDED.sent_at"
            " WHERE recent_payloads.sent_at <= $3::float8 - $4::float8",
            key_ref,
            payload_ref,
            now,
            window,
        )
        if changed:
            return None
        value = await self._db.fetchval(
            "SELECT sent_at FROM recent_payloads WHERE key_ref = $1 AND payload_ref = $2", key_ref, payload_ref
        )
        return float(value) if value is not None else None

    async def stamp_payload(self, key_ref: str, payload_ref: str, now: float) -> None:
        await self._db.execute(
            "UPDATE recent_payloads SET sent_at = GREATEST(sent_at, $1) WHERE key_ref = $2 AND payload_ref = $3",
            now,
            key_ref,
            payload_ref,
        )


# ---------------------------------------------------------------------------------------------- servers


class PostgresGuilds:
    """The `GuildRepository` on PostgreSQL."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def config(self, guild_id: int) -> GuildConfig:
        # One round trip: the row (if any), its role limits and its blocklist together.
        row = await self._db.fetchrow(
            "SELECT g.*,"
            " ARRAY(SELECT role_id FROM role_limits WHERE guild_id = $1 ORDER BY role_id) AS limit_roles,"
            " ARRAY(SELECT user_daily FROM role_limits WHERE guild_id = $1 ORDER BY role_id) AS limit_values,"
            " ARRAY(SELECT pattern FROM blocklist WHERE guild_id = $1 ORDER BY pattern) AS blocklist_patterns"
            " FROM (SELECT 1) AS one LEFT JOIN guild_settings AS g ON g.guild_id = $1",
            guild_id,
        )
        assert row is not None
        role_limits = {int(r): int(v) for r, v in zip(row["limit_roles"], row["limit_values"], strict=True)}
        blocklist = tuple(row["blocklist_patterns"])
        return guild_config_from_row(guild_id, row if row["guild_id"] is not None else None, role_limits, blocklist)

    async def any_key(self) -> bool:
        return await self._db.fetchval("SELECT 1 FROM guild_settings WHERE api_key_ciphertext IS NOT NULL LIMIT 1") == 1

    async def sealed_key(self, guild_id: int) -> bytes | None:
        sealed = await self._db.fetchval("SELECT api_key_ciphertext FROM guild_settings WHERE guild_id = $1", guild_id)
        return bytes(sealed) if sealed is not None else None

    async def update(self, guild_id: int, **changes: Any) -> None:
        sql, values = guild_settings_update(Dialect.POSTGRES, guild_id, changes, time.time())
        await self._db.execute(sql, *values)

    async def set_role_limit(self, guild_id: int, role_id: int, user_daily: int | None) -> None:
        if user_daily is None:
            await self._db.execute("DELETE FROM role_limits WHERE guild_id = $1 AND role_id = $2", guild_id, role_id)
        else:
            await self._db.execute(
                "INSERT INTO role_limits (guild_id, role_id, user_daily) VALUES ($1, $2, $3)"
                " ON CONFLICT (guild_id, role_id) DO UPDATE SET user_daily = EXCLUDED.user_daily",
                guild_id,
                role_id,
                user_daily,
            )

    async def add_blocklist_rule(self, guild_id: int, pattern: str, added_by: int) -> bool:
        changed = await self._db.execute(
            "INSERT INTO blocklist (guild_id, pattern, added_by, added_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (guild_id, pattern) DO NOTHING",
            guild_id,
            pattern,
            added_by,
            time.time(),
        )
        return changed == 1

    async def remove_blocklist_rule(self, guild_id: int, pattern: str) -> bool:
        changed = await self._db.execute(
            "DELETE FROM blocklist WHERE guild_id = $1 AND pattern = $2", guild_id, pattern
        )
        return changed == 1

    async def presets(self, guild_id: int) -> dict[str, str]:
        rows = await self._db.fetch("SELECT name, flags FROM presets WHERE guild_id = $1 ORDER BY name", guild_id)
        return {row[0]: row[1] for row in rows}

    async def save_preset(self, guild_id: int, name: str, flags: str, created_by: int) -> None:
        await self._db.execute(
            "INSERT INTO presets (guild_id, name, flags, created_by, created_at) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (guild_id, name) DO UPDATE SET flags = EXCLUDED.flags, created_by = EXCLUDED.created_by",
            guild_id,
            name,
            flags,
            created_by,
            time.time(),
        )

    async def remove_preset(self, guild_id: int, name: str) -> bool:
        return await self._db.execute("DELETE FROM presets WHERE guild_id = $1 AND name = $2", guild_id, name) == 1


class PostgresMemberDefaults:
    """The `MemberDefaultsRepository` on PostgreSQL."""

    COLUMNS = MEMBER_DEFAULT_COLUMNS

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def get(self, guild_id: int, user_id: int) -> dict[str, Any] | None:
        row = await self._db.fetchrow(
            "SELECT " + ", ".join(self.COLUMNS) + " FROM member_settings WHERE guild_id = $1 AND user_id = $2",
            guild_id,
            user_id,
        )
        return dict(zip(self.COLUMNS, row, strict=True)) if row is not None else None

    async def save(self, guild_id: int, user_id: int, values: dict[str, Any], now: float) -> None:
        sql, parameters = member_defaults_save(Dialect.POSTGRES, guild_id, user_id, values, now)
        await self._db.execute(sql, *parameters)

    async def delete(self, guild_id: int, user_id: int) -> None:
        await self._db.execute("DELETE FROM member_settings WHERE guild_id = $1 AND user_id = $2", guild_id, user_id)
