"""The changes both backends make to rows, defined once, and the statements that make them, in either dialect.

Each state change of a job is a `StateChange`: the columns it sets, the states it is allowed from, and whether it
waits for this process to own the job. `JobChanges` makes every state change of `JobRepository` from them, and
stores new jobs, the same on SQLite and PostgreSQL; a backend only runs the statements. The statements rendered
here differ between the dialects in their parameter marks alone (`?` or `$n`); SQL that each database spells its
own way stays in its backend (`bot.storage.sqlite`, `bot.storage.postgres`).
"""

from __future__ import annotations

import enum
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot.jobs.model import UNFINISHED, Job, JobStatus
from bot.requests.generation import GenerationRequest
from bot.storage.rows import (
    GUILD_SETTING_COLUMNS,
    JOB_INSERT_COLUMNS,
    MEMBER_DEFAULT_COLUMNS,
    Row,
    job_from_row,
    job_insert_values,
)


class Dialect(enum.Enum):
    """Whose SQL a statement is rendered in."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"

    def parameter(self, number: int) -> str:
        """The mark of a statement's `number`th parameter (from 1): `?` on SQLite, `$3` on PostgreSQL."""
        return "?" if self is Dialect.SQLITE else f"${number}"


class _Parameters:
    """A statement's values, in order, each bound where its mark is written."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value.value if isinstance(value, enum.Enum) else value)
        return self._dialect.parameter(len(self.values))


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class StateChange:
    """A change of one job: the columns it sets (`updated_at` too, always), and when it may happen."""

    columns: Mapping[str, Any]
    only_from: tuple[JobStatus, ...] = ()  # the states it is allowed from; none: any state
    any_owner: bool = False  # whichever process owns the job; else only while this one does
    only_unset: tuple[str, ...] = ()  # columns that must still be NULL


def update_statement(
    dialect: Dialect, change: StateChange, job_id: str, *, owner: str, now: float
) -> tuple[str, list[Any]]:
    """`UPDATE jobs SET ... WHERE id = ...` and the conditions of the change, with its values."""
    bind = _Parameters(dialect)
    assignments = ", ".join(f"{name} = {bind(value)}" for name, value in {**change.columns, "updated_at": now}.items())
    conditions = [f"id = {bind(job_id)}"]
    if not change.any_owner:
        conditions.append(f"owner = {bind(owner)}")
    conditions.extend(f"{name} IS NULL" for name in change.only_unset)
    if change.only_from:
        conditions.append(f"status IN ({', '.join(bind(status) for status in change.only_from)})")
    return f"UPDATE jobs SET {assignments} WHERE {' AND '.join(conditions)}", bind.values


def _given(**columns: Any) -> dict[str, Any]:
    """The columns whose new value is known (not None); the others keep theirs."""
    return {name: value for name, value in columns.items() if value is not None}


def _meta_json(meta: Mapping[str, Any]) -> str | None:
    return json.dumps(dict(meta)) if meta else None


AT_MODELSLAB = (JobStatus.SUBMITTING, JobStatus.PROCESSING)


class JobChanges(ABC):
    """The changes of `JobRepository` (see it for what each means) that every backend makes alike: a new job, and
    each state change, a `StateChange` made in one statement that returns the job as it now is (None: the change
    was not allowed). A backend says its dialect and runs the statements."""

    dialect: ClassVar[Dialect]
    _owner: str  # this process (WORKER_ID): it changes the jobs it owns
    _lease_seconds: float  # how long a job stays this process's without a renewal

    @abstractmethod
    async def _fetch_row(self, sql: str, values: Sequence[Any]) -> Row | None:
        """Run a statement; its first row, if any."""

    @abstractmethod
    async def _execute(self, sql: str, values: Sequence[Any]) -> None:
        """Run a statement."""

    async def _change(self, job_id: str, change: StateChange) -> Job | None:
        sql, values = update_statement(self.dialect, change, job_id, owner=self._owner, now=time.time())
        row = await self._fetch_row(sql + " RETURNING *", values)
        return job_from_row(row) if row else None

    async def _update(self, job_id: str, change: StateChange) -> None:
        """A change nobody needs the job back from."""
        sql, values = update_statement(self.dialect, change, job_id, owner=self._owner, now=time.time())
        await self._execute(sql, values)

    def _insert_values(self, job: Job) -> tuple[Any, ...]:
        """A new job is this process's to drive."""
        return job_insert_values(job, self._owner, time.time() + self._lease_seconds)

    async def insert(self, job: Job) -> None:
        values = self._insert_values(job)
        marks = ", ".join(self.dialect.parameter(number) for number in range(1, len(values) + 1))
        await self._execute(f"INSERT INTO jobs ({', '.join(JOB_INSERT_COLUMNS)}) VALUES ({marks})", values)

    async def set_message(self, job_id: str, message_id: int) -> Job | None:
        return await self._change(job_id, StateChange({"message_id": message_id}))

    async def mark_submitting(
        self,
        job_id: str,
        *,
        deadline_at: float | None = None,
        api_key_ciphertext: bytes | None = None,
        message_id: int | None = None,
    ) -> Job | None:
        columns = {"status": JobStatus.SUBMITTING, "submitted_at": time.time()}
        columns |= _given(deadline_at=deadline_at, api_key_ciphertext=api_key_ciphertext, message_id=message_id)
        return await self._change(job_id, StateChange(columns, only_from=(JobStatus.QUEUED,)))

    async def requeue(self, job_id: str, *, retry_after: float | None = None) -> Job | None:
        columns = {"status": JobStatus.QUEUED, "retry_after": retry_after, "granted_at": None, "enqueued_at": None}
        return await self._change(job_id, StateChange(columns, only_from=(JobStatus.SUBMITTING,)))

    async def update_request(self, job_id: str, request: GenerationRequest) -> Job | None:
        columns = {"request_json": json.dumps(request.to_json())}
        return await self._change(job_id, StateChange(columns, only_from=(JobStatus.QUEUED,)))

    async def mark_processing(
        self,
        job_id: str,
        *,
        modelslab_id: str | None,
        eta_at: float | None,
        fetch_url: str | None,
        meta: Mapping[str, Any],
    ) -> Job | None:
        columns = {"status": JobStatus.PROCESSING, "eta_at": eta_at}
        columns |= _given(modelslab_id=modelslab_id, fetch_url=fetch_url, meta_json=_meta_json(meta))
        return await self._change(job_id, StateChange(columns, only_from=AT_MODELSLAB))

    async def adopt_modelslab_id(self, job_id: str, modelslab_id: str) -> Job | None:
        # The webhook may reach any process, whichever owns the job.
        change = StateChange(
            {"modelslab_id": modelslab_id}, only_from=AT_MODELSLAB, any_owner=True, only_unset=("modelslab_id",)
        )
        return await self._change(job_id, change)

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
        columns = {
            "status": JobStatus.SUCCEEDED,
            "nsfw_detected": int(nsfw_detected),
            "output_json": json.dumps({"output": list(output_urls), "proxy": list(proxy_urls)}),
            "seed": seed,
            "generation_time": generation_time,
            "charged_images": charged_images,
            "finished_at": time.time(),
        }
        columns |= _given(meta_json=_meta_json(meta), modelslab_id=modelslab_id)
        return await self._change(job_id, StateChange(columns, only_from=AT_MODELSLAB))

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
        columns: dict[str, Any] = {
            "status": JobStatus.FAILED,
            "error_kind": kind,
            "error_detail": detail,
            "retry_after": retry_after,
            "finished_at": time.time(),
        }
        if not from_succeeded:
            columns["charged_images"] = 0  # the reservation is given back
        allowed: tuple[JobStatus, ...] = (*UNFINISHED, JobStatus.SUCCEEDED) if from_succeeded else UNFINISHED
        if only_queued:
            allowed = (JobStatus.QUEUED,)
        # A cancel may come from any process (the member pressed the button there): never sent, nobody else changes
        # a waiting job but to send it, which is conditional on the status too.
        return await self._change(job_id, StateChange(columns, only_from=allowed, any_owner=only_queued))

    async def mark_posted(
        self,
        job_id: str,
        *,
        image_count: int | None = None,
        charged_images: int | None = None,
        message_id: int | None = None,
    ) -> None:
        columns = {"posted_at": time.time(), "interaction_token": None, "api_key_ciphertext": None}
        columns |= _given(image_count=image_count, charged_images=charged_images, message_id=message_id)
        await self._update(job_id, StateChange(columns))

    async def set_gallery_message(self, job_id: str, message_id: int) -> None:
        await self._update(job_id, StateChange({"gallery_message_id": message_id}))

    async def forget_interaction(self, job_id: str) -> None:
        await self._update(job_id, StateChange({"interaction_token": None, "token_expires_at": None}))


# What /history forget clears in each of the member's shown jobs, besides the member (user 0) and what the request
# says of them (its prompt and picture links, edited with each dialect's JSON functions).
FORGOTTEN_JOB_COLUMNS = (
    "output_json", "meta_json", "message_id", "gallery_message_id", "interaction_token", "api_key_ciphertext",
    "error_detail", "application_id",
)  # fmt: skip
FORGET_JOB_COLUMNS = ", ".join(f"{name} = NULL" for name in FORGOTTEN_JOB_COLUMNS)


# ---------------------------------------------------------------------------------------------- settings rows


def upsert_statement(
    dialect: Dialect, table: str, key: Mapping[str, Any], values: Mapping[str, Any], *, replace: Iterable[str]
) -> tuple[str, list[Any]]:
    """`INSERT` a row of `key` and `values`; if the key has one already, set its `replace` columns to the new
    values (none: the row stays as it is)."""
    bind = _Parameters(dialect)
    row = {**key, **values}
    marks = ", ".join(bind(value) for value in row.values())
    assignments = ", ".join(f"{name} = EXCLUDED.{name}" for name in replace)
    conflict = f"DO UPDATE SET {assignments}" if assignments else "DO NOTHING"
    return (
        f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks}) ON CONFLICT ({', '.join(key)}) {conflict}",
        bind.values,
    )


def guild_settings_update(
    dialect: Dialect, guild_id: int, changes: Mapping[str, Any], now: float
) -> tuple[str, list[Any]]:
    """`GuildRepository.update`: the server's row created with the defaults if needed, and these columns set."""
    unknown = set(changes) - GUILD_SETTING_COLUMNS
    if unknown:
        raise ValueError(f"not server settings: {sorted(unknown)}")
    values = {"updated_at": now, **changes}
    replace = values if changes else {}  # nothing to set: the row is only made
    return upsert_statement(dialect, "guild_settings", {"guild_id": guild_id}, values, replace=replace)


def member_defaults_save(
    dialect: Dialect, guild_id: int, user_id: int, values: Mapping[str, Any], now: float
) -> tuple[str, list[Any]]:
    """`MemberDefaultsRepository.save`: the member's row in the server, with the settings `values` has."""
    row = {**{c: values[c] for c in MEMBER_DEFAULT_COLUMNS if c in values}, "updated_at": now}
    return upsert_statement(dialect, "member_settings", {"guild_id": guild_id, "user_id": user_id}, row, replace=row)
