"""SQLite storage: the migration runner and the job records.

Every state change of a job is a conditional UPDATE (`... WHERE status IN (...)`), so when the
webhook and the poller race to finish the same job, exactly one of them wins and goes on to post.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from bot.generation import GenerationRequest
from bot.guild_rules import GuildConfig, Limits, Usage, day_start
from bot.settings import private_directory, private_file

log = logging.getLogger(__name__)

MIGRATIONS_DIRECTORY = Path(__file__).resolve().parent.parent / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class StorageError(Exception):
    """The database cannot be used; the message says why in plain words."""


# ---------------------------------------------------------------------------------------------- the database


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def available_migrations(directory: Path = MIGRATIONS_DIRECTORY) -> list[Migration]:
    if not directory.is_dir():
        # A non-editable install leaves the migrations behind: fail loudly rather than run on no schema.
        raise StorageError(f"The migrations folder {directory} is missing: run the bot from a full checkout.")
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise StorageError(f"Migration file {path.name} is not named NNNN_reason.sql.")
        migrations.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise StorageError("Two migration files share a version number.")
    return migrations


class Database:
    """One aiosqlite connection, in autocommit mode; multi-statement changes use explicit transactions."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, upgrade: bool = True) -> AsyncIterator[Database]:
        try:
            await asyncio.to_thread(_private_database_file, path)
            connection = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, aiosqlite.Error) as exc:
            raise StorageError(f"Cannot open the database at {path}: {exc}.") from exc
        try:
            connection.row_factory = aiosqlite.Row
            await connection.execute("PRAGMA busy_timeout = 5000")
            await connection.execute("PRAGMA journal_mode = WAL")
            # NORMAL is crash-safe with WAL (a killed process loses nothing committed) and keeps writes quick,
            # which matters for the job insert made before Discord's 3-second acknowledgement.
            await connection.execute("PRAGMA synchronous = NORMAL")
            await connection.execute("PRAGMA foreign_keys = ON")
            database = cls(connection, path)
            if upgrade:
                await database.upgrade()
            yield database
        finally:
            await connection.close()

    async def current_version(self) -> int:
        await self._ensure_version_table()
        async with self.connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def upgrade(self, directory: Path = MIGRATIONS_DIRECTORY) -> list[Migration]:
        """Apply every migration newer than the database, each in its own transaction."""
        current = await self.current_version()
        applied = []
        for migration in available_migrations(directory):
            if migration.version <= current:
                continue
            script = migration.path.read_text(encoding="utf-8")
            record = (
                "INSERT INTO schema_migrations (version, name, applied_at) "
                f"VALUES ({migration.version}, '{migration.name}', {time.time()});"
            )
            try:
                await self.connection.executescript(f"BEGIN IMMEDIATE;\n{script}\n;{record}\nCOMMIT;")
            except aiosqlite.Error as exc:
                if self.connection.in_transaction:
                    await self.connection.execute("ROLLBACK")
                raise StorageError(f"Migration {migration.path.name} failed and was rolled back: {exc}.") from exc
            log.info("Applied database migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
        return applied

    async def _ensure_version_table(self) -> None:
        await self.connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )


def _private_database_file(path: Path) -> None:
    """The folder 0700, the database 0600 before SQLite opens it: SQLite gives the -wal and -shm files it creates
    later the database file's own mode, whatever the umask."""
    private_directory(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        private_file(file)


# ---------------------------------------------------------------------------------------------- jobs


class JobStatus(enum.StrEnum):
    QUEUED = "queued"  # stored, not yet sent to ModelsLab
    SUBMITTING = "submitting"  # the submit call is (or was, before a crash) under way
    PROCESSING = "processing"  # ModelsLab has it and gave us its id
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


UNFINISHED = (JobStatus.QUEUED, JobStatus.SUBMITTING, JobStatus.PROCESSING)


@dataclass(frozen=True)
class Job:
    """A generation job as stored."""

    id: str
    kind: str
    guild_id: int | None
    channel_id: int
    user_id: int
    request: GenerationRequest
    api_flavour: str
    status: JobStatus
    created_at: float
    deadline_at: float
    updated_at: float
    modelslab_id: str | None = None
    fetch_url: str | None = None
    eta_at: float | None = None
    output_urls: tuple[str, ...] = ()
    proxy_urls: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    generation_time: float | None = None
    image_count: int | None = None
    error_kind: str | None = None
    error_detail: str | None = None
    retry_after: float | None = None
    charged_images: int = 0
    application_id: int | None = None
    interaction_token: str | None = None
    token_expires_at: float | None = None
    message_id: int | None = None
    attachment_size_limit: int | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    posted_at: float | None = None
    channel_nsfw: bool = False
    nsfw_detected: bool = False
    gallery_message_id: int | None = None
    parent_job_id: str | None = None

    @property
    def needs_posting(self) -> bool:
        return self.status.finished and self.posted_at is None

    @classmethod
    def from_row(cls, row: aiosqlite.Row) -> Job:
        outputs = json.loads(row["output_json"]) if row["output_json"] else {}
        return cls(
            id=row["id"],
            kind=row["kind"],
            guild_id=row["guild_id"],
            channel_id=row["channel_id"],
            user_id=row["user_id"],
            request=GenerationRequest.from_json(json.loads(row["request_json"])),
            api_flavour=row["api_flavour"],
            status=JobStatus(row["status"]),
            created_at=row["created_at"],
            deadline_at=row["deadline_at"],
            updated_at=row["updated_at"],
            modelslab_id=row["modelslab_id"],
            fetch_url=row["fetch_url"],
            eta_at=row["eta_at"],
            output_urls=tuple(outputs.get("output", ())),
            proxy_urls=tuple(outputs.get("proxy", ())),
            meta=json.loads(row["meta_json"]) if row["meta_json"] else {},
            seed=row["seed"],
            generation_time=row["generation_time"],
            image_count=row["image_count"],
            error_kind=row["error_kind"],
            error_detail=row["error_detail"],
            retry_after=row["retry_after"],
            charged_images=row["charged_images"],
            application_id=row["application_id"],
            interaction_token=row["interaction_token"],
            token_expires_at=row["token_expires_at"],
            message_id=row["message_id"],
            attachment_size_limit=row["attachment_size_limit"],
            submitted_at=row["submitted_at"],
            finished_at=row["finished_at"],
            posted_at=row["posted_at"],
            channel_nsfw=bool(row["channel_nsfw"]),
            nsfw_detected=bool(row["nsfw_detected"]),
            gallery_message_id=row["gallery_message_id"],
            parent_job_id=row["parent_job_id"],
        )


class JobStore:
    """Reads and state changes of job rows. Methods that change state return whether they did."""

    def __init__(self, database: Database) -> None:
        self._db = database.connection
        self._database = database

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
        cursor = await self._db.execute(
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
        return cursor.rowcount == 1

    async def usage(self, guild_id: int | None, user_id: int, now: float) -> Usage:
        today = day_start(now)
        running = ", ".join(f"'{s.value}'" for s in UNFINISHED)
        async with self._db.execute(
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
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return Usage(guild_today=row[0], user_today=row[1], user_running=row[2], user_last_request_at=row[3])

    async def get(self, job_id: str) -> Job | None:
        async with self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return Job.from_row(row) if row else None

    async def needing_work(self) -> list[Job]:
        """Jobs a (re)started bot must carry on: unfinished, or finished but not yet shown."""
        # Unfinished jobs are never posted, so one condition covers both.
        async with self._db.execute("SELECT * FROM jobs WHERE posted_at IS NULL ORDER BY created_at") as cursor:
            rows = await cursor.fetchall()
        return [Job.from_row(row) for row in rows]

    async def last_served(self, user_ids: list[int]) -> dict[int, float]:
        """When each member's latest job was sent to ModelsLab (the fair queue's memory)."""
        if not user_ids:
            return {}
        marks = ", ".join("?" for _ in user_ids)
        async with self._db.execute(
            f"SELECT user_id, MAX(submitted_at) FROM jobs WHERE user_id IN ({marks}) AND submitted_at IS NOT NULL"
            " GROUP BY user_id",
            user_ids,
        ) as cursor:
            return {int(row[0]): float(row[1]) for row in await cursor.fetchall()}

    async def set_message(self, job_id: str, message_id: int) -> None:
        await self._update(job_id, {"message_id": message_id})

    async def mark_submitting(
        self, job_id: str, *, deadline_at: float | None = None, api_key_ciphertext: bytes | None = None
    ) -> bool:
        """About to call ModelsLab. The job's deadline (MODELSLAB_JOB_TIMEOUT) counts from here: time spent
        waiting in the bot's own queue is not ModelsLab's. The key it is sent with is kept (sealed) with it."""
        changes: dict[str, Any] = {"status": JobStatus.SUBMITTING, "submitted_at": time.time()}
        if deadline_at is not None:
            changes["deadline_at"] = deadline_at
        if api_key_ciphertext is not None:
            changes["api_key_ciphertext"] = api_key_ciphertext
        return await self._update(job_id, changes, only_from=[JobStatus.QUEUED])

    async def requeue(self, job_id: str, *, retry_after: float | None = None) -> bool:
        """ModelsLab did not take the job (a full queue, a passing fault): it waits in line again."""
        return await self._update(
            job_id, {"status": JobStatus.QUEUED, "retry_after": retry_after}, only_from=[JobStatus.SUBMITTING]
        )

    async def update_request(self, job_id: str, request: GenerationRequest) -> None:
        await self._update(job_id, {"request_json": json.dumps(request.to_json())}, only_from=[JobStatus.QUEUED])

    async def mark_processing(
        self,
        job_id: str,
        *,
        modelslab_id: str | None,
        eta_at: float | None,
        fetch_url: str | None,
        meta: Mapping[str, Any],
    ) -> bool:
        changes: dict[str, Any] = {"status": JobStatus.PROCESSING, "eta_at": eta_at}
        if modelslab_id is not None:
            changes["modelslab_id"] = modelslab_id
        if fetch_url is not None:
            changes["fetch_url"] = fetch_url
        if meta:
            changes["meta_json"] = json.dumps(dict(meta))
        return await self._update(job_id, changes, only_from=[JobStatus.SUBMITTING, JobStatus.PROCESSING])

    async def adopt_modelslab_id(self, job_id: str, modelslab_id: str) -> bool:
        """Learn the ModelsLab id from a webhook when the submit answer never arrived."""
        cursor = await self._db.execute(
            "UPDATE jobs SET modelslab_id = ?, updated_at = ?"
            " WHERE id = ? AND modelslab_id IS NULL AND status IN (?, ?)",
            (modelslab_id, time.time(), job_id, JobStatus.SUBMITTING.value, JobStatus.PROCESSING.value),
        )
        return cursor.rowcount == 1

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
    ) -> bool:
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
        return await self._update(job_id, changes, only_from=[JobStatus.SUBMITTING, JobStatus.PROCESSING])

    async def finish_failure(
        self,
        job_id: str,
        *,
        kind: str,
        detail: str,
        retry_after: float | None = None,
        from_succeeded: bool = False,
        only_queued: bool = False,
    ) -> bool:
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
        return await self._update(job_id, changes, only_from=allowed)

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
        async with self._db.execute(
            "SELECT * FROM jobs WHERE user_id = ? AND (? IS NULL OR guild_id = ?)"
            " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            (user_id, guild_id, guild_id, limit, offset),
        ) as cursor:
            return [Job.from_row(row) for row in await cursor.fetchall()]

    async def history_count(self, user_id: int, *, guild_id: int | None) -> int:
        async with self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND (? IS NULL OR guild_id = ?)", (user_id, guild_id, guild_id)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def forget_user(self, user_id: int, now: float) -> int:
        """Anonymise a member's finished jobs everywhere: no prompt, no results, no message, user 0. Counts stay.

        Returns how many jobs were forgotten. Jobs still under way keep their member until they are shown.
        """
        today = day_start(now)
        # Its own connection: a transaction on the shared one would take in (and, on a rollback, undo) whatever
        # other coroutines write meanwhile. WAL and busy_timeout let the two connections take turns.
        async with aiosqlite.connect(self._database.path, isolation_level=None) as own:
            await own.execute("PRAGMA busy_timeout = 5000")
            await own.execute("BEGIN IMMEDIATE")
            try:
                await own.execute(
                    "INSERT INTO forgotten_usage (guild_id, user_id, day_start, images, last_request_at)"
                    " SELECT guild_id, user_id, ?, SUM(CASE WHEN created_at >= ? THEN charged_images ELSE 0 END),"
                    " MAX(created_at) FROM jobs"
                    " WHERE user_id = ? AND posted_at IS NOT NULL AND guild_id IS NOT NULL GROUP BY guild_id"
                    " ON CONFLICT (guild_id, user_id, day_start) DO UPDATE SET images = images + excluded.images,"
                    " last_request_at = MAX(COALESCE(last_request_at, 0), excluded.last_request_at)",
                    (today, today, user_id),
                )
                cursor = await own.execute(
                    "UPDATE jobs SET user_id = 0, request_json = json_remove(json_set(request_json, '$.prompt', '',"
                    " '$.negative_prompt', NULL, '$.source_url', NULL), '$.advanced.ip_adapter_image'),"
                    " output_json = NULL, meta_json = NULL,"
                    " message_id = NULL, gallery_message_id = NULL, interaction_token = NULL,"
                    " api_key_ciphertext = NULL, error_detail = NULL, application_id = NULL"
                    " WHERE user_id = ? AND posted_at IS NOT NULL",
                    (user_id,),
                )
                forgotten = cursor.rowcount
                await own.execute("DELETE FROM job_inputs WHERE job_id IN (SELECT id FROM jobs WHERE user_id = 0)")
                await own.execute("DELETE FROM member_settings WHERE user_id = ?", (user_id,))
                await own.execute("DELETE FROM forgotten_usage WHERE day_start < ?", (today,))
                await own.execute("COMMIT")
            except BaseException:
                await own.execute("ROLLBACK")
                raise
        return forgotten

    async def save_input(self, job_id: str, image: bytes, width: int, height: int) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO job_inputs (job_id, image, width, height, created_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, image, width, height, time.time()),
        )

    async def drop_old_inputs(self, before: float) -> None:
        """Members' pictures are not kept forever: those of finished jobs made before `before` go."""
        await self._db.execute(
            "DELETE FROM job_inputs WHERE created_at < ?"
            " AND job_id IN (SELECT id FROM jobs WHERE posted_at IS NOT NULL)",
            (before,),
        )

    async def input_image(self, job_id: str) -> bytes | None:
        async with self._db.execute("SELECT image FROM job_inputs WHERE job_id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return bytes(row[0]) if row else None

    async def copy_input(self, from_job_id: str, to_job_id: str) -> bool:
        cursor = await self._db.execute(
            "INSERT OR REPLACE INTO job_inputs (job_id, image, width, height, created_at)"
            " SELECT ?, image, width, height, ? FROM job_inputs WHERE job_id = ?",
            (to_job_id, time.time(), from_job_id),
        )
        return cursor.rowcount == 1

    async def sealed_key(self, job_id: str) -> bytes | None:
        async with self._db.execute("SELECT api_key_ciphertext FROM jobs WHERE id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    async def set_gallery_message(self, job_id: str, message_id: int) -> None:
        await self._update(job_id, {"gallery_message_id": message_id})

    async def forget_interaction(self, job_id: str) -> None:
        """The interaction was never answered: its token is useless, the job is shown through the channel."""
        await self._update(job_id, {"interaction_token": None, "token_expires_at": None})

    async def _update(self, job_id: str, changes: Mapping[str, Any], *, only_from: Iterable[JobStatus] = ()) -> bool:
        columns = {**changes, "updated_at": time.time()}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        values: list[Any] = [v.value if isinstance(v, enum.Enum) else v for v in columns.values()]
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        values.append(job_id)
        states = [s.value for s in only_from]
        if states:
            sql += f" AND status IN ({', '.join('?' for _ in states)})"
            values.extend(states)
        cursor = await self._db.execute(sql, values)
        return cursor.rowcount == 1


def _named(values: tuple[Any, ...], **named: Any) -> dict[str, Any]:
    """Positional `?` values as named parameters `?1`, `?2`, ... next to the named ones (sqlite3 takes one style)."""
    return {**{str(index): value for index, value in enumerate(values, start=1)}, **named}


# ---------------------------------------------------------------------------------------------- servers


class GuildStore:
    """The per-server settings of /config. The API key is stored only as the ciphertext the caller sealed."""

    def __init__(self, database: Database) -> None:
        self._db = database.connection

    async def config(self, guild_id: int) -> GuildConfig:
        async with self._db.execute("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,)) as cursor:
            row = await cursor.fetchone()
        async with self._db.execute(
            "SELECT role_id, user_daily FROM role_limits WHERE guild_id = ?", (guild_id,)
        ) as cursor:
            role_limits = {int(r[0]): int(r[1]) for r in await cursor.fetchall()}
        async with self._db.execute(
            "SELECT pattern FROM blocklist WHERE guild_id = ? ORDER BY pattern", (guild_id,)
        ) as cursor:
            blocklist = tuple(r[0] for r in await cursor.fetchall())
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
        async with self._db.execute("SELECT 1 FROM guild_settings WHERE api_key_ciphertext IS NOT NULL") as cursor:
            return await cursor.fetchone() is not None

    async def sealed_key(self, guild_id: int) -> bytes | None:
        async with self._db.execute(
            "SELECT api_key_ciphertext FROM guild_settings WHERE guild_id = ?", (guild_id,)
        ) as cursor:
            row = await cursor.fetchone()
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
        cursor = await self._db.execute(
            "INSERT INTO blocklist (guild_id, pattern, added_by, added_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (guild_id, pattern) DO NOTHING",
            (guild_id, pattern, added_by, time.time()),
        )
        return cursor.rowcount == 1

    async def presets(self, guild_id: int) -> dict[str, str]:
        async with self._db.execute(
            "SELECT name, flags FROM presets WHERE guild_id = ? ORDER BY name", (guild_id,)
        ) as cursor:
            return {row[0]: row[1] for row in await cursor.fetchall()}

    async def save_preset(self, guild_id: int, name: str, flags: str, created_by: int) -> None:
        await self._db.execute(
            "INSERT INTO presets (guild_id, name, flags, created_by, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (guild_id, name) DO UPDATE SET flags = excluded.flags, created_by = excluded.created_by",
            (guild_id, name, flags, created_by, time.time()),
        )

    async def remove_preset(self, guild_id: int, name: str) -> bool:
        cursor = await self._db.execute("DELETE FROM presets WHERE guild_id = ? AND name = ?", (guild_id, name))
        return cursor.rowcount == 1

    async def remove_blocklist_rule(self, guild_id: int, pattern: str) -> bool:
        cursor = await self._db.execute("DELETE FROM blocklist WHERE guild_id = ? AND pattern = ?", (guild_id, pattern))
        return cursor.rowcount == 1


class MemberSettingsStore:
    """Each member's /settings in each server, one row per member and server."""

    COLUMNS = ("model", "aspect", "steps", "guidance", "negative_prompt", "style", "flags", "remix_mode")

    def __init__(self, database: Database) -> None:
        self._db = database.connection

    async def get(self, guild_id: int, user_id: int) -> dict[str, Any] | None:
        async with self._db.execute(
            "SELECT " + ", ".join(self.COLUMNS) + " FROM member_settings WHERE guild_id = ? AND user_id = ?",
            (guild_id, user_id),
        ) as cursor:
            row = await cursor.fetchone()
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
