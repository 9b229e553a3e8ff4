"""SQLite storage: one file, one connection, the bot's default backend.

Implements the Protocols of `bot.storage.ports`. One aiosqlite connection serves every coroutine
(SQLite has one writer anyway); statements run in autocommit mode, each atomic, and the few changes
that span several statements run in a transaction that other coroutines' statements wait for, so a
transaction never takes in (or, on a rollback, undoes) what another coroutine writes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import json
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
from bot.jobs.model import UNFINISHED, Job, JobStatus
from bot.requests.generation import GenerationRequest
from bot.settings import private_directory, private_file
from bot.storage.migrations import Migration, available_migrations, latest_version, migrations_directory
from bot.storage.ports import StorageBusy, StorageError, StorageFull
from bot.storage.rows import MEMBER_DEFAULT_COLUMNS, job_from_row

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

    def __init__(self, connection: aiosqlite.Connection, path: Path, migrations: Path = SQLITE_MIGRATIONS) -> None:
        self.db = SqliteConnection(connection)
        self.path = path
        self._migrations = migrations
        self.jobs = SqliteJobs(self.db)
        self.guilds = SqliteGuilds(self.db)
        self.member_defaults = SqliteMemberDefaults(self.db)

    @property
    def description(self) -> str:
        return str(self.path)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: Path, *, upgrade: bool = True, migrations: Path = SQLITE_MIGRATIONS
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
            storage = cls(connection, path, migrations)
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
        """Apply every migration newer than the database, each in its own transaction."""
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
            forgotten = await self.db.execute(
                "UPDATE jobs SET user_id = 0, request_json = json_remove(json_set(request_json, '$.prompt', '',"
                " '$.negative_prompt', NULL, '$.source_url', NULL), '$.advanced.ip_adapter_image'),"
                " output_json = NULL, meta_json = NULL,"
                " message_id = NULL, gallery_message_id = NULL, interaction_token = NULL,"
                " api_key_ciphertext = NULL, error_detail = NULL, application_id = NULL"
                " WHERE user_id = ? AND posted_at IS NOT NULL",
                (user_id,),
            )
            await self.db.execute("DELETE FROM job_inputs WHERE job_id IN (SELECT id FROM jobs WHERE user_id = 0)")
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


class SqliteJobs:
    """The `JobRepository` on SQLite."""

    def __init__(self, db: SqliteConnection) -> None:
        self._db = db

    _INSERT_COLUMNS = (
        "id, kind, guild_id, channel_id, user_id, request_json, api_flavour, status, charged_images, application_id,"
        " interaction_token, token_expires_at, attachment_size_limit, channel_nsfw, parent_job_id, created_at,"
        " deadline_at, updated_at"
    )

    def _insert_values(self, job: Job) -> tuple[Any, ...]:
        return (
            job.id,
            job.kind,
            job.guild_id,
            job.channel_id,
            job.user_id,
            json.dumps(job.request.to_json()),
            job.api_flavour,
            job.status.value,
            job.charged_images,
            job.application_id,
            job.interaction_token,
            job.token_expires_at,
            job.attachment_size_limit,
            int(job.channel_nsfw),
            job.parent_job_id,
            job.created_at,
            job.deadline_at,
            job.updated_at,
        )

    async def insert(self, job: Job) -> None:
        placeholders = ", ".join("?" for _ in self._insert_values(job))
        await self._db.execute(
            f"INSERT INTO jobs ({self._INSERT_COLUMNS}) VALUES ({placeholders})", self._insert_values(job)
        )

    async def insert_within_limits(self, job: Job, limits: Limits) -> bool:
        """Store the job only if it fits every limit, in one statement: SQLite makes it atomic.

        With a limit of 10 and 50 requests at once, exactly 10 images are admitted, whatever the interleaving,
        and across processes too. A job's charge counts from here until it fails (which sets it to 0).
        """
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
        """Jobs a (re)started bot must carry on: unfinished, or finished but not yet shown."""
        # Unfinished jobs are never posted, so one condition covers both.
        rows = await self._db.fetch_all("SELECT * FROM jobs WHERE posted_at IS NULL ORDER BY created_at")
        return [job_from_row(row) for row in rows]

    async def last_served(self, user_ids: list[int]) -> dict[int, float]:
        """When each member's latest job was sent to ModelsLab (the fair queue's memory)."""
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

    async def set_message(self, job_id: str, message_id: int) -> Job | None:
        return await self._change(job_id, {"message_id": message_id})

    async def mark_submitting(
        self, job_id: str, *, deadline_at: float | None = None, api_key_ciphertext: bytes | None = None
    ) -> Job | None:
        """About to call ModelsLab. The job's deadline (MODELSLAB_JOB_TIMEOUT) counts from here: time spent
        waiting in the bot's own queue is not ModelsLab's. The key it is sent with is kept (sealed) with it."""
        changes: dict[str, Any] = {"status": JobStatus.SUBMITTING, "submitted_at": time.time()}
        if deadline_at is not None:
            changes["deadline_at"] = deadline_at
        if api_key_ciphertext is not None:
            changes["api_key_ciphertext"] = api_key_ciphertext
        return await self._change(job_id, changes, only_from=[JobStatus.QUEUED])

    async def requeue(self, job_id: str, *, retry_after: float | None = None) -> Job | None:
        """ModelsLab did not take the job (a full queue, a passing fault): it waits in line again."""
        return await self._change(
            job_id, {"status": JobStatus.QUEUED, "retry_after": retry_after}, only_from=[JobStatus.SUBMITTING]
        )

    async def update_request(self, job_id: str, request: GenerationRequest) -> Job | None:
        return await self._change(job_id, {"request_json": json.dumps(request.to_json())}, only_from=[JobStatus.QUEUED])

    async def mark_processing(
        self,
        job_id: str,
        *,
        modelslab_id: str | None,
        eta_at: float | None,
        fetch_url: str | None,
        meta: Mapping[str, Any],
    ) -> Job | None:
        changes: dict[str, Any] = {"status": JobStatus.PROCESSING, "eta_at": eta_at}
        if modelslab_id is not None:
            changes["modelslab_id"] = modelslab_id
        if fetch_url is not None:
            changes["fetch_url"] = fetch_url
        if meta:
            changes["meta_json"] = json.dumps(dict(meta))
        return await self._change(job_id, changes, only_from=[JobStatus.SUBMITTING, JobStatus.PROCESSING])

    async def adopt_modelslab_id(self, job_id: str, modelslab_id: str) -> Job | None:
        """Learn the ModelsLab id from a webhook when the submit answer never arrived."""
        row = await self._db.fetch_one(
            "UPDATE jobs SET modelslab_id = ?, updated_at = ?"
            " WHERE id = ? AND modelslab_id IS NULL AND status IN (?, ?) RETURNING *",
            (modelslab_id, time.time(), job_id, JobStatus.SUBMITTING.value, JobStatus.PROCESSING.value),
        )
        return job_from_row(row) if row else None

    async def finish_success(
        self,
        job_id: str,
        *,
        modelslab_id: str | None,
        output_urls: Iterable[str],
        proxy_urls: Iterable[str],
        meta: Mapping[str, Any],
        seed: int | None,
        generation_time: float | None,
        charged_images: int,
        nsfw_detected: bool = False,
    ) -> Job | None:
        changes: dict[str, Any] = {
            "status": JobStatus.SUCCEEDED,
            "nsfw_detected": int(nsfw_detected),
            "output_json": json.dumps({"output": list(output_urls), "proxy": list(proxy_urls)}),
            "seed": seed,
            "generation_time": generation_time,
            "charged_images": charged_images,
            "finished_at": time.time(),
        }
        if meta:
            changes["meta_json"] = json.dumps(dict(meta))
        if modelslab_id is not None:
            changes["modelslab_id"] = modelslab_id
        return await self._change(job_id, changes, only_from=[JobStatus.SUBMITTING, JobStatus.PROCESSING])

    async def finish_failure(
        self,
        job_id: str,
        *,
        kind: str,
        detail: str,
        retry_after: float | None = None,
        from_succeeded: bool = False,
        only_queued: bool = False,
    ) -> Job | None:
        """Fail a job. Its reservation is given back, unless `from_succeeded`: ModelsLab made (and billed) the
        images, which then could not be shown, so they still count. `only_queued`: only if never sent (cancel)."""
        allowed = [*UNFINISHED, JobStatus.SUCCEEDED] if from_succeeded else list(UNFINISHED)
        if only_queued:
            allowed = [JobStatus.QUEUED]
        changes: dict[str, Any] = {
            "status": JobStatus.FAILED,
            "error_kind": kind,
            "error_detail": detail,
            "retry_after": retry_after,
            "finished_at": time.time(),
        }
        if not from_succeeded:
            changes["charged_images"] = 0
        return await self._change(job_id, changes, only_from=allowed)

    async def mark_posted(
        self,
        job_id: str,
        *,
        image_count: int | None = None,
        charged_images: int | None = None,
        message_id: int | None = None,
    ) -> None:
        """The outcome is shown. The interaction token and the job's key are no longer needed: not kept."""
        changes: dict[str, Any] = {"posted_at": time.time(), "interaction_token": None, "api_key_ciphertext": None}
        if image_count is not None:
            changes["image_count"] = image_count
        if charged_images is not None:
            changes["charged_images"] = charged_images
        if message_id is not None:
            changes["message_id"] = message_id
        await self._update(job_id, changes)

    async def history(self, user_id: int, *, guild_id: int | None, offset: int = 0, limit: int = 1000) -> list[Job]:
        """A member's jobs, newest first: in one server, or (guild_id None) everywhere."""
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
        """Members' pictures are not kept forever: those of shown jobs made before `before` go, at most `batch` at
        a time (each call is short, whatever the backlog). Returns how many went."""
        return await self._db.execute(
            "DELETE FROM job_inputs WHERE job_id IN (SELECT job_inputs.job_id FROM job_inputs"
            " JOIN jobs ON jobs.id = job_inputs.job_id"
            " WHERE job_inputs.created_at < ? AND jobs.posted_at IS NOT NULL LIMIT ?)",
            (before, batch),
        )

    async def forget_expired_tokens(self, now: float, *, batch: int = 500) -> int:
        """Interaction tokens past their expiry on jobs not shown yet (shown jobs keep none): useless, and not kept.
        At most `batch` at a time; returns how many went. Only not-yet-shown jobs are read (a partial index)."""
        return await self._db.execute(
            "UPDATE jobs SET interaction_token = NULL WHERE id IN (SELECT id FROM jobs"
            " WHERE posted_at IS NULL AND interaction_token IS NOT NULL AND token_expires_at < ? LIMIT ?)",
            (now, batch),
        )

    async def input_image(self, job_id: str) -> bytes | None:
        row = await self._db.fetch_one("SELECT image FROM job_inputs WHERE job_id = ?", (job_id,))
        return bytes(row[0]) if row else None

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

    async def set_gallery_message(self, job_id: str, message_id: int) -> None:
        await self._update(job_id, {"gallery_message_id": message_id})

    async def forget_interaction(self, job_id: str) -> None:
        """The interaction was never answered: its token is useless, the job is shown through the channel."""
        await self._update(job_id, {"interaction_token": None, "token_expires_at": None})

    async def _change(
        self, job_id: str, changes: Mapping[str, Any], *, only_from: Iterable[JobStatus] = ()
    ) -> Job | None:
        """Change the job (only from these states, if any are given) and return it as it now is, in one statement;
        None if it did not change."""
        sql, values = self._update_statement(job_id, changes, only_from)
        row = await self._db.fetch_one(sql + " RETURNING *", values)
        return job_from_row(row) if row else None

    async def _update(self, job_id: str, changes: Mapping[str, Any]) -> None:
        """Change the job, when nobody needs it back."""
        sql, values = self._update_statement(job_id, changes, ())
        await self._db.execute(sql, values)

    @staticmethod
    def _update_statement(
        job_id: str, changes: Mapping[str, Any], only_from: Iterable[JobStatus]
    ) -> tuple[str, list[Any]]:
        columns = {**changes, "updated_at": time.time()}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        values: list[Any] = [v.value if isinstance(v, enum.Enum) else v for v in columns.values()]
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        values.append(job_id)
        states = [s.value for s in only_from]
        if states:
            sql += f" AND status IN ({', '.join('?' for _ in states)})"
            values.extend(states)
        return sql, values


def _named(values: tuple[Any, ...], **named: Any) -> dict[str, Any]:
    """Positional `?` values as named parameters `?1`, `?2`, ... next to the named ones (sqlite3 takes one style)."""
    return {**{str(index): value for index, value in enumerate(values, start=1)}, **named}


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
        if row is None:
            return GuildConfig(guild_id=guild_id, role_limits=role_limits, blocklist=blocklist)
        return GuildConfig(
            guild_id=guild_id,
            api_key_last4=row["api_key_last4"] if row["api_key_ciphertext"] is not None else None,
            guild_daily=row["guild_daily"],
            user_daily=row["user_daily"],
            user_concurrent=row["user_concurrent"],
            cooldown_seconds=row["cooldown_seconds"],
            allowed_channels=tuple(int(c) for c in json.loads(row["allowed_channels_json"])),
            gallery_channel_id=row["gallery_channel_id"],
            nsfw_policy=row["nsfw_policy"],
            default_model=row["default_model"],
            default_negative_prompt=row["default_negative_prompt"],
            default_width=row["default_width"],
            default_height=row["default_height"],
            default_steps=row["default_steps"],
            allowed_models=tuple(json.loads(row["allowed_models_json"])),
            role_limits=role_limits,
            blocklist=blocklist,
        )

    async def any_key(self) -> bool:
        return await self._db.fetch_one("SELECT 1 FROM guild_settings WHERE api_key_ciphertext IS NOT NULL") is not None

    async def sealed_key(self, guild_id: int) -> bytes | None:
        row = await self._db.fetch_one("SELECT api_key_ciphertext FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return bytes(row[0]) if row and row[0] is not None else None

    async def update(self, guild_id: int, **changes: Any) -> None:
        """Set some columns of the server's row, creating it with the defaults first if needed."""
        allowed = {
            "api_key_ciphertext", "api_key_last4", "guild_daily", "user_daily", "user_concurrent",
            "cooldown_seconds", "allowed_channels_json", "gallery_channel_id", "nsfw_policy", "default_model",
            "default_negative_prompt", "default_width", "default_height", "default_steps", "allowed_models_json",
        }  # fmt: skip
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"not server settings: {sorted(unknown)}")
        now = time.time()
        await self._db.execute(
            "INSERT INTO guild_settings (guild_id, updated_at) VALUES (?, ?) ON CONFLICT (guild_id) DO NOTHING",
            (guild_id, now),
        )
        if changes:
            assignments = ", ".join(f"{name} = ?" for name in changes)
            await self._db.execute(
                f"UPDATE guild_settings SET {assignments}, updated_at = ? WHERE guild_id = ?",
                (*changes.values(), now, guild_id),
            )

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
        columns = [c for c in self.COLUMNS if c in values]
        await self._db.execute(
            f"INSERT INTO member_settings (guild_id, user_id, {', '.join(columns)}, updated_at)"
            f" VALUES (?, ?, {', '.join('?' for _ in columns)}, ?)"
            " ON CONFLICT (guild_id, user_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns)
            + ", updated_at = excluded.updated_at",
            (guild_id, user_id, *(values[c] for c in columns), now),
        )

    async def delete(self, guild_id: int, user_id: int) -> None:
        await self._db.execute("DELETE FROM member_settings WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
