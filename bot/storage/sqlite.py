"""SQLite storage: one file, one connection, the bot's default backend.

Implements the Protocols of `bot.storage.ports`. One aiosqlite connection serves every coroutine
(SQLite has one writer anyway); statements run in autocommit mode, each atomic, and the few changes
that span several statements run in a transaction that other coroutines' statements wait for, so a
transaction never takes in (or, on a rollback, undoes) what another coroutine writes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from bot.guilds.rules import GuildConfig, Limits, Usage, day_start
from bot.jobs.model import UNFINISHED, Job
from bot.settings import private_directory, private_file
from bot.storage.changes import FORGET_JOB_COLUMNS, Dialect, JobChanges, guild_settings_update, member_defaults_save
from bot.storage.events import LocalEvents
from bot.storage.migrations import Migration, available_migrations, latest_version, migrations_directory
from bot.storage.ports import LineState, StorageBusy, StorageError, StorageFull, WaitingJob
from bot.storage.rows import JOB_INSERT_COLUMNS, MEMBER_DEFAULT_COLUMNS, guild_config_from_row, job_from_row

log = logging.getLogger(__name__)

Parameters = Sequence[Any] | Mapping[str, Any]
SQLITE_MIGRATIONS = migrations_directory("sqlite")
_IN_TRANSACTION: contextvars.ContextVar[bool] = contextvars.ContextVar("sqlite_in_transaction", default=False)


def _translated(exc: sqlite3.Error) -> Exception:
    """SQLite's own errors as the backend-neutral ones the bot explains to members."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "full" in text:
        return StorageFull(f"The database cannot be written: the disk is full ({text}).")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return StorageBusy(f"The database stayed locked too long ({text}).")
    return exc


class SqliteConnection:
    """The one aiosqlite connection, with SQLite's errors translated and transactions kept apart.

    Reads take one round trip to the database thread (`execute_fetchall`), not three (execute, fetch, close).
    """

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self.raw = connection
        self._transaction_lock = asyncio.Lock()
        self._no_transaction = asyncio.Event()
        self._no_transaction.set()

    async def execute(self, sql: str, parameters: Parameters = ()) -> int:
        """Run one statement; returns how many rows it changed."""
        await self._outside_others_transaction()
        try:
            cursor = await self.raw.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise _translated(exc) from exc
        return cursor.rowcount

    async def fetch_all(self, sql: str, parameters: Parameters = ()) -> list[sqlite3.Row]:
        await self._outside_others_transaction()
        try:
            return list(await self.raw.execute_fetchall(sql, parameters))
        except sqlite3.Error as exc:
            raise _translated(exc) from exc

    async def fetch_one(self, sql: str, parameters: Parameters = ()) -> sqlite3.Row | None:
        rows = await self.fetch_all(sql, parameters)
        return rows[0] if rows else None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error). Statements of other coroutines wait until it ends;
        those already handed to the database thread before it began run before it."""
        async with self._transaction_lock:
            self._no_transaction.clear()
            token = _IN_TRANSACTION.set(True)
            try:
                await self.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    await self.raw.execute("ROLLBACK")
                    raise
                await self.execute("COMMIT")
            finally:
                _IN_TRANSACTION.reset(token)
                self._no_transaction.set()

    async def _outside_others_transaction(self) -> None:
        while not self._no_transaction.is_set() and not _IN_TRANSACTION.get():
            await self._no_transaction.wait()


class SqliteStorage:
    """The `Storage` on one SQLite file."""

    def __init__(
        self,
        connection: aiosqlite.Connection,
        path: Path,
        migrations: Path = SQLITE_MIGRATIONS,
        *,
        owner: str = "local",
        lease_seconds: float = 30.0,
    ) -> None:
        self.db = SqliteConnection(connection)
        self.path = path
        self._migrations = migrations
        self._identify_locks: dict[int, asyncio.Lock] = {}
        self.events = LocalEvents()
        self.jobs = SqliteJobs(self.db, owner=owner, lease_seconds=lease_seconds)
        self.leases = SqliteLeases(self.db, owner=owner, lease_seconds=lease_seconds)
        self.queue = SqliteQueue(self.db)
        self.guilds = SqliteGuilds(self.db)
        self.member_defaults = SqliteMemberDefaults(self.db)

    @property
    def description(self) -> str:
        return str(self.path)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: Path,
        *,
        upgrade: bool = True,
        migrations: Path = SQLITE_MIGRATIONS,
        owner: str = "local",
        lease_seconds: float = 30.0,
    ) -> AsyncIterator[SqliteStorage]:
        try:
            await asyncio.to_thread(_private_database_file, path)
            connection = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"Cannot open the database at {path}: {exc}.") from exc
        try:
            connection.row_factory = aiosqlite.Row
            await connection.execute("PRAGMA busy_timeout = 5000")
            await connection.execute("PRAGMA journal_mode = WAL")
            # NORMAL is crash-safe with WAL (a killed process loses nothing committed) and keeps writes quick,
            # which matters for the job insert made before Discord's 3-second acknowledgement.
            await connection.execute("PRAGMA synchronous = NORMAL")
            await connection.execute("PRAGMA foreign_keys = ON")
            storage = cls(connection, path, migrations, owner=owner, lease_seconds=lease_seconds)
            if upgrade:
                await storage.upgrade()
            yield storage
        finally:
            await connection.close()

    async def current_version(self) -> int:
        await self._ensure_version_table()
        row = await self.db.fetch_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row else 0

    async def latest_version(self) -> int:
        return latest_version(self._migrations)

    async def upgrade(self) -> list[Migration]:
        current = await self.current_version()
        applied = []
        for migration in available_migrations(self._migrations):
            if migration.version <= current:
                continue
            record = (
                "INSERT INTO schema_migrations (version, name, applied_at) "
                f"VALUES ({migration.version}, '{migration.name}', {time.time()});"
            )
            connection = self.db.raw
            try:
                await connection.executescript(f"BEGIN IMMEDIATE;\n{migration.script()}\n;{record}\nCOMMIT;")
            except sqlite3.Error as exc:
                if connection.in_transaction:
                    await connection.execute("ROLLBACK")
                raise StorageError(f"Migration {migration.path.name} failed and was rolled back: {exc}.") from exc
            log.info("Applied database migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
        return applied

    async def _ensure_version_table(self) -> None:
        await self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )

    async def shared_settings(self) -> dict[str, str]:
        return {row[0]: row[1] for row in await self.db.fetch_all("SELECT name, value FROM shared_settings")}

    async def record_shared_setting(self, name: str, value: str, *, replace: bool = False) -> str:
        conflict = "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at" if replace else "DO NOTHING"
        await self.db.execute(
            f"INSERT INTO shared_settings (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) {conflict}",
            (name, value, time.time()),
        )
        row = await self.db.fetch_one("SELECT value FROM shared_settings WHERE name = ?", (name,))
        assert row is not None
        return str(row[0])

    async def identify_turn(self, bucket: int, spacing: float) -> None:
        # One process on SQLite: its own shards take turns.
        lock = self._identify_locks.setdefault(bucket, asyncio.Lock())
        await lock.acquire()
        asyncio.get_running_loop().call_later(spacing, lock.release)

    async def forget_member(self, user_id: int, now: float) -> int:
        today = day_start(now)
        async with self.db.transaction():
            await self.db.execute(
                "INSERT INTO forgotten_usage (guild_id, user_id, day_start, images, last_request_at)"
                " SELECT guild_id, user_id, ?, SUM(CASE WHEN created_at >= ? THEN charged_images ELSE 0 END),"
                " MAX(created_at) FROM jobs"
                " WHERE user_id = ? AND posted_at IS NOT NULL AND guild_id IS NOT NULL GROUP BY guild_id"
                " ON CONFLICT (guild_id, user_id, day_start) DO UPDATE SET images = images + excluded.images,"
                " last_request_at = MAX(COALESCE(last_request_at, 0), excluded.last_request_at)",
                (today, today, user_id),
            )
            # The member's pictures go, and their links: in the member's own jobs, and in the copies that other
            # members' Re-rolls and Edits made of them (jobs still under way keep theirs until they are shown).
            await self.db.execute(
                "DELETE FROM job_inputs WHERE job_id IN"
                " (SELECT id FROM jobs WHERE user_id = ? AND posted_at IS NOT NULL"
                " UNION SELECT id FROM jobs WHERE picture_owner_id = ? AND posted_at IS NOT NULL)",
                (user_id, user_id),
            )
            await self.db.execute(
                "UPDATE jobs SET request_json = json_set(request_json, '$.source_url', NULL), picture_owner_id = 0"
                " WHERE picture_owner_id = ? AND posted_at IS NOT NULL",
                (user_id,),
            )
            forgotten = await self.db.execute(
                "UPDATE jobs SET user_id = 0, request_json = json_remove(json_set(request_json, '$.prompt', '',"
                " '$.negative_prompt', NULL, '$.source_url', NULL), '$.advanced.ip_adapter_image'),"
                f" {FORGET_JOB_COLUMNS}"
                " WHERE user_id = ? AND posted_at IS NOT NULL",
                (user_id,),
            )
            await self.db.execute("DELETE FROM member_settings WHERE user_id = ?", (user_id,))
            await self.db.execute("DELETE FROM forgotten_usage WHERE day_start < ?", (today,))
        return forgotten


def _private_database_file(path: Path) -> None:
    """The folder 0700, the database 0600 before SQLite opens it: SQLite gives the -wal and -shm files it creates
    later the database file's own mode, whatever the umask."""
    private_directory(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        private_file(file)


# ---------------------------------------------------------------------------------------------- jobs


class SqliteJobs(JobChanges):
    """The `JobRepository` on SQLite. State changes are this process's only while it owns the job (`owner`)."""

    dialect = Dialect.SQLITE

    def __init__(self, db: SqliteConnection, *, owner: str = "local", lease_seconds: float = 30.0) -> None:
        self._db = db
        self._owner = owner
        self._lease_seconds = lease_seconds

    async def _fetch_row(self, sql: str, values: Sequence[Any]) -> sqlite3.Row | None:
        return await self._db.fetch_one(sql, values)

    async def _execute(self, sql: str, values: Sequence[Any]) -> None:
        await self._db.execute(sql, values)

    _INSERT_COLUMNS = ", ".join(JOB_INSERT_COLUMNS)

    async def insert_within_limits(self, job: Job, limits: Limits) -> bool:
        """In one statement: SQLite's one writer makes it atomic, across processes too."""
        values = self._insert_values(job)
        placeholders = ", ".join(f"?{index}" for index in range(1, len(values) + 1))
        today = day_start(job.created_at)
        running = ", ".join(f"'{s.value}'" for s in UNFINISHED)
        changed = await self._db.execute(
            f"INSERT INTO jobs ({self._INSERT_COLUMNS}) SELECT {placeholders} WHERE"
            " (:guild_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs"
            "   WHERE guild_id IS :guild AND created_at >= :today) + :n <= :guild_daily)"
            " AND (:user_daily = 0 OR (SELECT COALESCE(SUM(charged_images), 0) FROM jobs"
            "   WHERE guild_id IS :guild AND user_id = :user AND created_at >= :today)"
            "   + (SELECT COALESCE(SUM(images), 0) FROM forgotten_usage"
            "     WHERE guild_id IS :guild AND user_id = :user AND day_start = :today) + :n <= :user_daily)"
            " AND (:concurrent = 0 OR (SELECT COUNT(*) FROM jobs"
            f"   WHERE guild_id IS :guild AND user_id = :user AND status IN ({running})) < :concurrent)"
            " AND (:cooldown = 0 OR (NOT EXISTS (SELECT 1 FROM jobs"
            "   WHERE guild_id IS :guild AND user_id = :user AND created_at > :now - :cooldown)"
            "   AND NOT EXISTS (SELECT 1 FROM forgotten_usage"
            "   WHERE guild_id IS :guild AND user_id = :user AND last_request_at > :now - :cooldown)))",
            # sqlite3 takes either positional or named parameters: the values come first, numbered, then named.
            _named(
                values,
                guild_daily=limits.guild_daily,
                user_daily=limits.user_daily,
                concurrent=limits.user_concurrent,
                cooldown=limits.cooldown_seconds,
                guild=job.guild_id,
                user=job.user_id,
                today=today,
                now=job.created_at,
                n=job.charged_images,
            ),
        )
        return changed == 1

    async def usage(self, guild_id: int | None, user_id: int, now: float) -> Usage:
        today = day_start(now)
        running = ", ".join(f"'{s.value}'" for s in UNFINISHED)
        row = await self._db.fetch_one(
            "SELECT"
            " (SELECT COALESCE(SUM(charged_images), 0) FROM jobs WHERE guild_id IS ? AND created_at >= ?),"
            " (SELECT COALESCE(SUM(charged_images), 0) FROM jobs"
            "   WHERE guild_id IS ? AND user_id = ? AND created_at >= ?)"
            " + (SELECT COALESCE(SUM(images), 0) FROM forgotten_usage"
            "   WHERE guild_id IS ? AND user_id = ? AND day_start = ?),"
            f" (SELECT COUNT(*) FROM jobs WHERE guild_id IS ? AND user_id = ? AND status IN ({running})),"
            " (SELECT MAX(t) FROM (SELECT MAX(created_at) AS t FROM jobs WHERE guild_id IS ? AND user_id = ?"
            "   UNION ALL SELECT MAX(last_request_at) FROM forgotten_usage WHERE guild_id IS ? AND user_id = ?))",
            (
                *(guild_id, today, guild_id, user_id, today, guild_id, user_id, today),
                *(guild_id, user_id, guild_id, user_id, guild_id, user_id),
            ),
        )
        assert row is not None
        return Usage(guild_today=row[0], user_today=row[1], user_running=row[2], user_last_request_at=row[3])

    async def get(self, job_id: str) -> Job | None:
        row = await self._db.fetch_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(row) if row else None

    async def ids(self, *, limit: int = 1000) -> list[str]:
        return [
            row[0] for row in await self._db.fetch_all("SELECT id FROM jobs ORDER BY created_at, id LIMIT ?", (limit,))
        ]

    async def needing_work(self) -> list[Job]:
        # Unfinished jobs are never posted, so one condition covers both.
        rows = await self._db.fetch_all("SELECT * FROM jobs WHERE posted_at IS NULL ORDER BY created_at")
        return [job_from_row(row) for row in rows]

    async def last_served(self, user_ids: list[int]) -> dict[int, float]:
        if not user_ids:
            return {}
        marks = ", ".join("?" for _ in user_ids)
        return {
            int(row[0]): float(row[1])
            for row in await self._db.fetch_all(
                f"SELECT user_id, MAX(submitted_at) FROM jobs WHERE user_id IN ({marks}) AND submitted_at IS NOT NULL"
                " GROUP BY user_id",
                user_ids,
            )
        }

    async def history(self, user_id: int, *, guild_id: int | None, offset: int = 0, limit: int = 1000) -> list[Job]:
        return [
            job_from_row(row)
            for row in await self._db.fetch_all(
                "SELECT * FROM jobs WHERE user_id = ? AND (? IS NULL OR guild_id = ?)"
                " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (user_id, guild_id, guild_id, limit, offset),
            )
        ]

    async def history_count(self, user_id: int, *, guild_id: int | None) -> int:
        row = await self._db.fetch_one(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND (? IS NULL OR guild_id = ?)", (user_id, guild_id, guild_id)
        )
        return int(row[0]) if row else 0

    async def save_input(self, job_id: str, image: bytes, width: int, height: int) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO job_inputs (job_id, image, width, height, created_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, image, width, height, time.time()),
        )

    async def drop_old_inputs(self, before: float, *, batch: int = 500) -> int:
        return await self._db.execute(
            "DELETE FROM job_inputs WHERE job_id IN (SELECT job_inputs.job_id FROM job_inputs"
            " JOIN jobs ON jobs.id = job_inputs.job_id"
            " WHERE job_inputs.created_at < ? AND jobs.posted_at IS NOT NULL LIMIT ?)",
            (before, batch),
        )

    async def forget_expired_tokens(self, now: float, *, batch: int = 500) -> int:
        # Only jobs not yet shown are read (a partial index).
        return await self._db.execute(
            "UPDATE jobs SET interaction_token = NULL WHERE id IN (SELECT id FROM jobs"
            " WHERE posted_at IS NULL AND interaction_token IS NOT NULL AND token_expires_at < ? LIMIT ?)",
            (now, batch),
        )

    async def input_image(self, job_id: str) -> bytes | None:
        row = await self._db.fetch_one("SELECT image FROM job_inputs WHERE job_id = ?", (job_id,))
        return bytes(row[0]) if row else None

    async def has_input(self, job_id: str) -> bool:
        return await self._db.fetch_one("SELECT 1 FROM job_inputs WHERE job_id = ?", (job_id,)) is not None

    async def copy_input(self, from_job_id: str, to_job_id: str) -> bool:
        changed = await self._db.execute(
            "INSERT OR REPLACE INTO job_inputs (job_id, image, width, height, created_at)"
            " SELECT ?, image, width, height, ? FROM job_inputs WHERE job_id = ?",
            (to_job_id, time.time(), from_job_id),
        )
        return changed == 1

    async def sealed_key(self, job_id: str) -> bytes | None:
        row = await self._db.fetch_one("SELECT api_key_ciphertext FROM jobs WHERE id = ?", (job_id,))
        return bytes(row[0]) if row and row[0] is not None else None


def _named(values: tuple[Any, ...], **named: Any) -> dict[str, Any]:
    """Positional `?` values as named parameters `?1`, `?2`, ... next to the named ones (sqlite3 takes one style)."""
    return {**{str(index): value for index, value in enumerate(values, start=1)}, **named}


# ---------------------------------------------------------------------------------------------- leases, line


class SqliteLeases:
    """The `LeaseRepository` on SQLite (one process: it claims everything at start; the rest is the same)."""

    def __init__(self, db: SqliteConnection, *, owner: str, lease_seconds: float) -> None:
        self._db = db
        self._owner = owner
        self._lease_seconds = lease_seconds

    async def claim(self, *, limit: int, everything: bool = False, mine: bool = False) -> list[Job]:
        now = time.time()
        free = (
            "" if everything else " AND (owner IS NULL OR lease_expires_at < ?3" + (" OR owner = ?2)" if mine else ")")
        )
        rows = await self._db.fetch_all(
            "UPDATE jobs SET owner = ?2, lease_expires_at = ?1 WHERE id IN (SELECT id FROM jobs"
            f" WHERE posted_at IS NULL{free} ORDER BY created_at LIMIT ?4) RETURNING *",
            (now + self._lease_seconds, self._owner, now, limit),
        )
        return sorted((job_from_row(row) for row in rows), key=lambda job: job.created_at)

    async def renew(self) -> set[str]:
        rows = await self._db.fetch_all(
            "UPDATE jobs SET lease_expires_at = ? WHERE owner = ? AND posted_at IS NULL RETURNING id",
            (time.time() + self._lease_seconds, self._owner),
        )
        return {row[0] for row in rows}

    async def taken(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        marks = ", ".join("?" for _ in ids)
        rows = await self._db.fetch_all(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND (owner IS NULL OR owner != ?)", (*ids, self._owner)
        )
        return {row[0] for row in rows}

    async def release(self) -> int:
        return await self._db.execute(
            "UPDATE jobs SET owner = NULL, lease_expires_at = 0 WHERE owner = ? AND posted_at IS NULL", (self._owner,)
        )


class SqliteQueue:
    """The `QueueRepository` on SQLite (one process uses the in-memory line; this keeps the dialects alike)."""

    def __init__(self, db: SqliteConnection) -> None:
        self._db = db

    async def enqueue(self, job_id: str, key_ref: str, *, first: bool = False) -> bool:
        async with self._db.transaction():
            rows = await self._db.fetch_all(
                "UPDATE jobs SET key_ref = ?, enqueued_at = COALESCE(enqueued_at, ?), first_in_line = ?"
                " WHERE id = ? AND status = 'queued' RETURNING granted_at, user_id",
                (key_ref, time.time(), int(first), job_id),
            )
            if rows and first:
                await self._db.execute(
                    "INSERT INTO queue_members (key_ref, user_id, served_seq) SELECT ?1, ?2,"
                    " COALESCE((SELECT MIN(served_seq) FROM queue_members WHERE key_ref = ?1), 0) - 1"
                    " ON CONFLICT (key_ref, user_id) DO UPDATE SET served_seq = excluded.served_seq",
                    (key_ref, rows[0][1]),
                )
        return bool(rows) and rows[0][0] is not None

    async def grant(self, key_ref: str, limit: int, now: float) -> list[tuple[str, str | None]]:
        granted: list[tuple[str, str | None]] = []
        async with self._db.transaction():
            await self._db.execute("INSERT INTO queue_keys (key_ref) VALUES (?) ON CONFLICT DO NOTHING", (key_ref,))
            row = await self._db.fetch_one(
                "SELECT grants, paused_until,"
                " (SELECT COUNT(*) FROM jobs WHERE key_ref = ?1 AND status IN ('submitting', 'processing'))"
                " + (SELECT COUNT(*) FROM jobs WHERE key_ref = ?1 AND status = 'queued' AND granted_at IS NOT NULL)"
                " FROM queue_keys WHERE key_ref = ?1",
                (key_ref,),
            )
            assert row is not None
            grants, paused_until, active = int(row[0]), float(row[1]), int(row[2])
            if paused_until > now:
                return []
            while active < limit:
                nxt = await self._db.fetch_one(
                    "SELECT j.id, j.user_id, j.owner FROM jobs j LEFT JOIN queue_members m"
                    " ON m.key_ref = j.key_ref AND m.user_id = j.user_id"
                    " WHERE j.key_ref = ? AND j.status = 'queued'"
                    " AND j.granted_at IS NULL AND j.enqueued_at IS NOT NULL"
                    " ORDER BY COALESCE(m.served_seq, -1), j.first_in_line DESC, j.enqueued_at, j.id LIMIT 1",
                    (key_ref,),
                )
                if nxt is None:
                    break
                await self._db.execute("UPDATE jobs SET granted_at = ? WHERE id = ?", (now, nxt[0]))
                await self._db.execute(
                    "INSERT INTO queue_members (key_ref, user_id, served_seq) VALUES (?, ?, ?)"
                    " ON CONFLICT (key_ref, user_id) DO UPDATE SET served_seq = excluded.served_seq",
                    (key_ref, nxt[1], grants),
                )
                grants += 1
                active += 1
                granted.append((nxt[0], nxt[2]))
            await self._db.execute("UPDATE queue_keys SET grants = ? WHERE key_ref = ?", (grants, key_ref))
        return granted

    async def pause(self, key_ref: str, until: float) -> float:
        rows = await self._db.fetch_all(
            "INSERT INTO queue_keys (key_ref, paused_until) VALUES (?1, ?2) ON CONFLICT (key_ref)"
            " DO UPDATE SET paused_until = MAX(paused_until, ?2) RETURNING paused_until",
            (key_ref, until),
        )
        return float(rows[0][0])

    async def line(self, key_ref: str) -> LineState:
        key = await self._db.fetch_one("SELECT paused_until FROM queue_keys WHERE key_ref = ?", (key_ref,))
        rows = await self._db.fetch_all(
            "SELECT j.id, j.user_id, m.served_seq, j.first_in_line, j.enqueued_at FROM jobs j LEFT JOIN queue_members m"
            " ON m.key_ref = j.key_ref AND m.user_id = j.user_id"
            " WHERE j.key_ref = ? AND j.status = 'queued' AND j.granted_at IS NULL AND j.enqueued_at IS NOT NULL",
            (key_ref,),
        )
        waiting = [WaitingJob(r[0], int(r[1]), r[2], bool(r[3]), float(r[4] or 0)) for r in rows]
        return LineState(float(key[0]) if key else 0.0, waiting)

    async def claim_payload(self, key_ref: str, payload_ref: str, now: float, window: float) -> float | None:
        changed = await self._db.execute(
            "INSERT INTO recent_payloads (key_ref, payload_ref, sent_at) VALUES (?1, ?2, ?3)"
            " ON CONFLICT (key_ref, payload_ref) DO UPDATE SET sent_at = excluded.sent_at"
            " WHERE recent_payloads.sent_at <= ?3 - ?4",
            (key_ref, payload_ref, now, window),
        )
        if changed:
            return None
        row = await self._db.fetch_one(
            "SELECT sent_at FROM recent_payloads WHERE key_ref = ? AND payload_ref = ?", (key_ref, payload_ref)
        )
        return float(row[0]) if row else None

    async def stamp_payload(self, key_ref: str, payload_ref: str, now: float) -> None:
        await self._db.execute(
            "UPDATE recent_payloads SET sent_at = MAX(sent_at, ?) WHERE key_ref = ? AND payload_ref = ?",
            (now, key_ref, payload_ref),
        )


# ---------------------------------------------------------------------------------------------- servers


class SqliteGuilds:
    """The `GuildRepository` on SQLite."""

    def __init__(self, db: SqliteConnection) -> None:
        self._db = db

    async def config(self, guild_id: int) -> GuildConfig:
        row = await self._db.fetch_one("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,))
        role_limits = {
            int(r[0]): int(r[1])
            for r in await self._db.fetch_all(
                "SELECT role_id, user_daily FROM role_limits WHERE guild_id = ?", (guild_id,)
            )
        }
        blocklist = tuple(
            r[0]
            for r in await self._db.fetch_all(
                "SELECT pattern FROM blocklist WHERE guild_id = ? ORDER BY pattern", (guild_id,)
            )
        )
        return guild_config_from_row(guild_id, row, role_limits, blocklist)

    async def any_key(self) -> bool:
        return await self._db.fetch_one("SELECT 1 FROM guild_settings WHERE api_key_ciphertext IS NOT NULL") is not None

    async def sealed_key(self, guild_id: int) -> bytes | None:
        row = await self._db.fetch_one("SELECT api_key_ciphertext FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return bytes(row[0]) if row and row[0] is not None else None

    async def update(self, guild_id: int, **changes: Any) -> None:
        await self._db.execute(*guild_settings_update(Dialect.SQLITE, guild_id, changes, time.time()))

    async def set_role_limit(self, guild_id: int, role_id: int, user_daily: int | None) -> None:
        if user_daily is None:
            await self._db.execute("DELETE FROM role_limits WHERE guild_id = ? AND role_id = ?", (guild_id, role_id))
        else:
            await self._db.execute(
                "INSERT INTO role_limits (guild_id, role_id, user_daily) VALUES (?, ?, ?)"
                " ON CONFLICT (guild_id, role_id) DO UPDATE SET user_daily = excluded.user_daily",
                (guild_id, role_id, user_daily),
            )

    async def add_blocklist_rule(self, guild_id: int, pattern: str, added_by: int) -> bool:
        changed = await self._db.execute(
            "INSERT INTO blocklist (guild_id, pattern, added_by, added_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (guild_id, pattern) DO NOTHING",
            (guild_id, pattern, added_by, time.time()),
        )
        return changed == 1

    async def presets(self, guild_id: int) -> dict[str, str]:
        return {
            row[0]: row[1]
            for row in await self._db.fetch_all(
                "SELECT name, flags FROM presets WHERE guild_id = ? ORDER BY name", (guild_id,)
            )
        }

    async def save_preset(self, guild_id: int, name: str, flags: str, created_by: int) -> None:
        await self._db.execute(
            "INSERT INTO presets (guild_id, name, flags, created_by, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (guild_id, name) DO UPDATE SET flags = excluded.flags, created_by = excluded.created_by",
            (guild_id, name, flags, created_by, time.time()),
        )

    async def remove_preset(self, guild_id: int, name: str) -> bool:
        changed = await self._db.execute("DELETE FROM presets WHERE guild_id = ? AND name = ?", (guild_id, name))
        return changed == 1

    async def remove_blocklist_rule(self, guild_id: int, pattern: str) -> bool:
        changed = await self._db.execute(
            "DELETE FROM blocklist WHERE guild_id = ? AND pattern = ?", (guild_id, pattern)
        )
        return changed == 1


class SqliteMemberDefaults:
    """The `MemberDefaultsRepository` on SQLite."""

    COLUMNS = MEMBER_DEFAULT_COLUMNS

    def __init__(self, db: SqliteConnection) -> None:
        self._db = db

    async def get(self, guild_id: int, user_id: int) -> dict[str, Any] | None:
        row = await self._db.fetch_one(
            "SELECT " + ", ".join(self.COLUMNS) + " FROM member_settings WHERE guild_id = ? AND user_id = ?",
            (guild_id, user_id),
        )
        return dict(zip(self.COLUMNS, row, strict=True)) if row is not None else None

    async def save(self, guild_id: int, user_id: int, values: dict[str, Any], now: float) -> None:
        await self._db.execute(*member_defaults_save(Dialect.SQLITE, guild_id, user_id, values, now))

    async def delete(self, guild_id: int, user_id: int) -> None:
        await self._db.execute("DELETE FROM member_settings WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
