"""What the bot needs from its database, whatever the database is: one Protocol per domain, and the errors.

The services (jobs, server administration, member defaults, history) are written against these
Protocols; a backend (`bot.storage.sqlite`, `bot.storage.postgres`) implements them all and is picked
once at start by `bot.storage.open_storage`. `tests/unit/test_storage.py` is the contract every
backend must pass.

Every state change of a job is conditional (`... WHERE status IN (...)`) and says whether it
happened, so that when the webhook and the poller race to finish the same job, exactly one wins. It says
so by returning the job as the change left it (`UPDATE ... RETURNING *`, one statement), or None: the
caller goes on with that row and need not read it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bot.guilds.rules import GuildConfig, Limits, Usage
from bot.jobs.model import Job
from bot.requests.generation import GenerationRequest

if TYPE_CHECKING:
    from bot.storage.events import Events
    from bot.storage.migrations import Migration


class StorageError(Exception):
    """The database cannot be used; the message says why in plain words."""


class StorageFull(StorageError):
    """The database cannot be written: its disk is full. Nothing of the failed change was kept."""


class StorageBusy(StorageError):
    """The database stayed locked by someone else for too long (nothing of the failed change was kept), or, on a
    database server, every connection stayed busy or the connection was lost while a change was under way."""


class JobRepository(Protocol):
    """Reads and state changes of jobs. Methods that change a job's state return it as it now is if they did,
    None if they did not (its state did not allow it, or there is no such job)."""

    async def insert(self, job: Job) -> None: ...

    async def insert_within_limits(self, job: Job, limits: Limits) -> bool:
        """Store the job only if it fits every limit, atomically: with a limit of 10 and 50 requests at once,
        exactly 10 images are admitted, whatever the interleaving and across processes. A job's charge counts from
        here until it fails (`finish_failure` gives it back)."""
        ...

    async def usage(self, guild_id: int | None, user_id: int, now: float) -> Usage: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def ids(self, *, limit: int = 1000) -> list[str]:
        """Job ids, oldest first (operations and tests)."""
        ...

    async def needing_work(self) -> list[Job]:
        """Jobs a (re)started bot must carry on: unfinished, or finished but not yet shown."""
        ...

    async def last_served(self, user_ids: list[int]) -> dict[int, float]:
        """When each member's latest job was sent to ModelsLab (the fair queue's memory)."""
        ...

    async def set_message(self, job_id: str, message_id: int) -> Job | None: ...

    async def mark_submitting(
        self,
        job_id: str,
        *,
        deadline_at: float | None = None,
        api_key_ciphertext: bytes | None = None,
        message_id: int | None = None,
    ) -> Job | None:
        """About to call ModelsLab (only from queued). The job's deadline (MODELSLAB_JOB_TIMEOUT) counts from here:
        time spent in the bot's own line is not ModelsLab's. The key it is sent with is kept, sealed, with it; and
        its status message, if it was not recorded yet (`set_message`)."""
        ...

    async def requeue(self, job_id: str, *, retry_after: float | None = None) -> Job | None:
        """ModelsLab did not take the job (a full queue, a passing fault): it leaves the line, and its slot, until
        it joins it again (first)."""
        ...

    async def update_request(self, job_id: str, request: GenerationRequest) -> Job | None:
        """Only while the job is queued."""
        ...

    async def mark_processing(
        self,
        job_id: str,
        *,
        modelslab_id: str | None,
        eta_at: float | None,
        fetch_url: str | None,
        meta: Mapping[str, Any],
    ) -> Job | None: ...

    async def adopt_modelslab_id(self, job_id: str, modelslab_id: str) -> Job | None:
        """Learn the ModelsLab id from a webhook when the submit answer never arrived."""
        ...

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
    ) -> Job | None: ...

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
        ...

    async def mark_posted(
        self,
        job_id: str,
        *,
        image_count: int | None = None,
        charged_images: int | None = None,
        message_id: int | None = None,
    ) -> None:
        """The outcome is shown. The interaction token and the job's key are no longer needed: not kept."""
        ...

    async def history(self, user_id: int, *, guild_id: int | None, offset: int = 0, limit: int = 1000) -> list[Job]:
        """A member's jobs, newest first: in one server, or (guild_id None) everywhere."""
        ...

    async def history_count(self, user_id: int, *, guild_id: int | None) -> int: ...

    async def save_input(self, job_id: str, image: bytes, width: int, height: int) -> None: ...

    async def drop_old_inputs(self, before: float, *, batch: int = 500) -> int:
        """Members' pictures are not kept forever: those of shown jobs made before `before` go, at most `batch`
        at a time (each call is short, whatever the backlog). Returns how many went."""
        ...

    async def forget_expired_tokens(self, now: float, *, batch: int = 500) -> int:
        """Interaction tokens that expired before `now` on jobs not yet shown (a shown job keeps none) are not
        kept: at most `batch` at a time. Returns how many went."""
        ...

    async def input_image(self, job_id: str) -> bytes | None: ...

    async def has_input(self, job_id: str) -> bool: ...

    async def copy_input(self, from_job_id: str, to_job_id: str) -> bool: ...

    async def sealed_key(self, job_id: str) -> bytes | None: ...

    async def set_gallery_message(self, job_id: str, message_id: int) -> None: ...

    async def forget_interaction(self, job_id: str) -> None:
        """The interaction was never answered: its token is useless, the job is shown through the channel."""
        ...


@dataclass(frozen=True)
class WaitingJob:
    """A job in a key's line, as the fair order needs it."""

    job_id: str
    user_id: int
    served_seq: int | None  # when its member was last given a slot (None: never)
    first: bool  # sent back by ModelsLab: it goes first
    enqueued_at: float


@dataclass(frozen=True)
class LineState:
    paused_until: float
    waiting: list[WaitingJob]


class LeaseRepository(Protocol):
    """Which process drives which job. A job is driven by its owner only, until its lease runs out; every state
    change of the job repository is conditional on still owning it. Lease times are the hosts' clocks: keep them
    in step (NTP), as any distributed lease needs."""

    async def claim(self, *, limit: int, everything: bool = False, mine: bool = False) -> list[Job]:
        """Take, for this process, unshown jobs nobody drives: without an owner, or whose owner's lease ran out;
        oldest first. `mine`: also those this process owns (at start: a restart with the same WORKER_ID).
        `everything`: every unshown job (the only process of the bot, at start). They come back as they now are."""
        ...

    async def renew(self) -> set[str]:
        """Extend this process's leases; the ids of the unshown jobs it still owns (one missing was lost)."""
        ...

    async def release(self) -> int:
        """Give this process's unshown jobs up at once (it is stopping): the others may claim them now."""
        ...

    async def taken(self, job_ids: Iterable[str]) -> set[str]:
        """Those of `job_ids` that another process owns now (or nobody): this one lost them."""
        ...


class QueueRepository(Protocol):
    """The fair line in front of ModelsLab, in the database, for a bot of several processes: at most `limit` jobs of
    a key at ModelsLab at once, each free slot to the member served least recently (round robin by member)."""

    async def enqueue(self, job_id: str, key_ref: str, *, first: bool = False) -> bool:
        """The job waits in its key's line (`first`: sent back by ModelsLab, it and its member go first). True if
        it already holds a slot (granted before its process stopped)."""
        ...

    async def grant(self, key_ref: str, limit: int, now: float) -> list[tuple[str, str | None]]:
        """Give the key's free slots to the next jobs in the fair order, atomically across processes; the jobs
        granted now, with their owners. Nothing while the key is paused."""
        ...

    async def pause(self, key_ref: str, until: float) -> float:
        """ModelsLab said the key's queue is full: no slot is given before `until` (a later pause wins)."""
        ...

    async def line(self, key_ref: str) -> LineState:
        """The key's waiting jobs and pause, for places in line."""
        ...

    async def claim_payload(self, key_ref: str, payload_ref: str, now: float, window: float) -> float | None:
        """Record that this payload is being sent for this key, unless an identical one was sent within `window`
        seconds (then nothing is recorded and the time it was sent comes back)."""
        ...

    async def stamp_payload(self, key_ref: str, payload_ref: str, now: float) -> None:
        """The payload's submit call was answered: the window counts from now."""
        ...


class GuildRepository(Protocol):
    """The per-server settings of /config. The API key is stored only as the ciphertext the caller sealed."""

    async def config(self, guild_id: int) -> GuildConfig: ...

    async def any_key(self) -> bool: ...

    async def sealed_key(self, guild_id: int) -> bytes | None: ...

    async def update(self, guild_id: int, **changes: Any) -> None:
        """Set some columns of the server's row, creating it with the defaults first if needed."""
        ...

    async def set_role_limit(self, guild_id: int, role_id: int, user_daily: int | None) -> None: ...

    async def add_blocklist_rule(self, guild_id: int, pattern: str, added_by: int) -> bool: ...

    async def remove_blocklist_rule(self, guild_id: int, pattern: str) -> bool: ...

    async def presets(self, guild_id: int) -> dict[str, str]: ...

    async def save_preset(self, guild_id: int, name: str, flags: str, created_by: int) -> None: ...

    async def remove_preset(self, guild_id: int, name: str) -> bool: ...


class MemberDefaultsRepository(Protocol):
    """Each member's /settings in each server, one row per member and server."""

    async def get(self, guild_id: int, user_id: int) -> dict[str, Any] | None: ...

    async def save(self, guild_id: int, user_id: int, values: dict[str, Any], now: float) -> None: ...

    async def delete(self, guild_id: int, user_id: int) -> None: ...


class Storage(Protocol):
    """One open database: its repositories, its schema, and the changes that span repositories."""

    @property
    def jobs(self) -> JobRepository: ...

    @property
    def guilds(self) -> GuildRepository: ...

    @property
    def member_defaults(self) -> MemberDefaultsRepository: ...

    @property
    def leases(self) -> LeaseRepository: ...

    @property
    def queue(self) -> QueueRepository: ...

    @property
    def events(self) -> Events:
        """What this process changes that the others must hear of at once (and what they change)."""
        ...

    @property
    def description(self) -> str:
        """Where the data is, for logs and `db current` (a path; never a password)."""
        ...

    async def current_version(self) -> int: ...

    async def latest_version(self) -> int:
        """The newest version the migrations of this backend reach."""
        ...

    async def upgrade(self) -> list[Migration]:
        """Apply every migration newer than the database, each in its own transaction; returns those applied."""
        ...

    async def shared_settings(self) -> dict[str, str]:
        """The settings every process of the bot must share (`bot.storage.shared`), as recorded, by name."""
        ...

    async def record_shared_setting(self, name: str, value: str, *, replace: bool = False) -> str:
        """Record `value` for `name` if nothing is recorded yet (or, with `replace`, whatever is); returns the value
        recorded now. Processes starting together agree on the first one's."""
        ...

    async def identify_turn(self, bucket: int, spacing: float) -> None:
        """Wait until this IDENTIFY rate-limit bucket is free across every process of the bot, and keep it for
        `spacing` seconds after returning (Discord takes one IDENTIFY per bucket per 5 s)."""
        ...

    async def forget_member(self, user_id: int, now: float) -> int:
        """/history forget, in one transaction across the repositories: the member's finished jobs everywhere are
        anonymised (no prompt, no results, no message, user 0; the counts stay), their pictures and /settings
        deleted, and today's images carried over so that forgetting cannot reset a quota. Returns how many jobs
        were forgotten; jobs still under way keep their member until they are shown."""
        ...
