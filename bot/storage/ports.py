"""What the bot needs from its database, whatever the database is: one Protocol per domain, and the errors.

The services (jobs, server administration, member defaults, history) are written against these
Protocols; a backend (`bot.storage.sqlite`, later PostgreSQL) implements them all and is picked
once at start by `bot.storage.open_storage`. `tests/unit/test_storage.py` is the contract every
backend must pass.

Every state change of a job is conditional (`... WHERE status IN (...)`) and says whether it
happened, so that when the webhook and the poller race to finish the same job, exactly one wins. It says
so by returning the job as the change left it (`UPDATE ... RETURNING *`, one statement), or None: the
caller goes on with that row and need not read it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bot.guilds.rules import GuildConfig, Limits, Usage
from bot.jobs.model import Job
from bot.requests.generation import GenerationRequest

if TYPE_CHECKING:
    from bot.storage.migrations import Migration


class StorageError(Exception):
    """The database cannot be used; the message says why in plain words."""


class StorageFull(StorageError):
    """The database cannot be written: its disk is full. Nothing of the failed change was kept."""


class StorageBusy(StorageError):
    """The database stayed locked by someone else for too long. Nothing of the failed change was kept."""


class JobRepository(Protocol):
    """Reads and state changes of jobs. Methods that change a job's state return it as it now is if they did,
    None if they did not (its state did not allow it, or there is no such job)."""

    async def insert(self, job: Job) -> None: ...

    async def insert_within_limits(self, job: Job, limits: Limits) -> bool:
        """Store the job only if it fits every limit, atomically: with a limit of 10 and 50 requests at once,
        exactly 10 images are admitted, whatever the interleaving and across processes."""
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
        self, job_id: str, *, deadline_at: float | None = None, api_key_ciphertext: bytes | None = None
    ) -> Job | None:
        """About to call ModelsLab (only from queued). The job's deadline counts from here; the key it is sent
        with is kept, sealed, with it."""
        ...

    async def requeue(self, job_id: str, *, retry_after: float | None = None) -> Job | None:
        """ModelsLab did not take the job (a full queue, a passing fault): it waits in line again."""
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
        at a time. Returns how many went."""
        ...

    async def forget_expired_tokens(self, now: float, *, batch: int = 500) -> int:
        """Interaction tokens that expired before `now` on jobs not yet shown (a shown job keeps none) are not
        kept: at most `batch` at a time. Returns how many went."""
        ...

    async def input_image(self, job_id: str) -> bytes | None: ...

    async def copy_input(self, from_job_id: str, to_job_id: str) -> bool: ...

    async def sealed_key(self, job_id: str) -> bytes | None: ...

    async def set_gallery_message(self, job_id: str, message_id: int) -> None: ...

    async def forget_interaction(self, job_id: str) -> None:
        """The interaction was never answered: its token is useless, the job is shown through the channel."""
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

    async def forget_member(self, user_id: int, now: float) -> int:
        """/history forget, in one transaction across the repositories: the member's finished jobs everywhere are
        anonymised (no prompt, no results, no message, user 0; the counts stay), their pictures and /settings
        deleted, and today's images carried over so that forgetting cannot reset a quota. Returns how many jobs
        were forgotten; jobs still under way keep their member until they are shown."""
        ...
