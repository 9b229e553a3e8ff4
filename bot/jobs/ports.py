"""What the jobs domain needs from outside it: a way to show jobs, the servers' keys and rules, a queue.

Each is a Protocol, implemented elsewhere (Discord, the guild service, `FairQueue`), so the job
service's parts know none of them by name and another implementation can take a place without them
changing.
"""

from __future__ import annotations

from typing import Protocol

from bot.guilds.rules import GuildConfig
from bot.images.processing import ImageFile
from bot.jobs.model import Job, Progress


class PresentationRefused(Exception):
    """Discord refused the message for good (a 4xx other than 408 and 429): retrying the same thing cannot help."""


class PresentationDeferred(Exception):
    """Discord (or a proxy in front of it) said "not now": a rate limit, a ban, a timeout. Try the same thing again,
    no sooner than `retry_after` seconds if it is given."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class JobPresenter(Protocol):
    """Shows a job to the members: implemented for Discord in `bot.discord.presenter`."""

    async def show_progress(self, job: Job, progress: Progress) -> None:
        """Show where the job stands. Sends nothing if the message already shows exactly that, or its outcome."""
        ...

    def edit_lane(self, job: Job) -> str | None:
        """The rate limit an edit of the job's message spends from, if it shares one with other messages (say, its
        channel's); None if the message has a limit of its own (an interaction's token)."""
        ...

    def forget(self, job_id: str) -> None:
        """The job is done with: whatever was remembered of its message may go."""
        ...

    async def show_result(self, job: Job, images: list[ImageFile], *, spoiler: bool, withheld: bool) -> int | None:
        """Show the images (behind spoilers, or not at all if withheld); return the id of the message that shows
        them if it is not `job.message_id`."""
        ...

    async def post_to_gallery(self, job: Job, images: list[ImageFile], channel_id: int) -> int:
        """Post a copy of the images, crediting their author, in the server's gallery channel."""
        ...

    async def show_failure(self, job: Job) -> int | None: ...

    async def find_status_message(self, job: Job) -> int | None:
        """The id of the job's status message; None if there is none. Raises if Discord cannot say now."""
        ...


class GuildDirectory(Protocol):
    """What the job service needs to know of a server: implemented by `bot.guilds.GuildAdmin`."""

    async def api_key_for(self, guild_id: int | None) -> str | None: ...

    async def config(self, guild_id: int) -> GuildConfig: ...


class JobQueue(Protocol):
    """Where jobs wait for a slot at ModelsLab: a line per API key (named by `submission.queue_key`), at most
    a few jobs of a key at ModelsLab at once. Implemented in memory by `bot.jobs.fair_queue.FairQueue`."""

    def hold(self, key: str, job_id: str, user_id: int) -> None:
        """A job already at ModelsLab (found at start-up) holds a slot."""
        ...

    def remember_served(self, key: str, last_served: dict[int, float]) -> None:
        """At start-up: who was served when, so the round goes on where it was."""
        ...

    def enqueue(self, key: str, job_id: str, user_id: int, *, first: bool = False) -> bool:
        """Add a waiting job (`first`: at the head). True if it holds a slot already, which only a queue that
        `grants_at_once` can say."""
        ...

    async def wait_turn(self, job_id: str) -> None:
        """Until the job holds a slot. Raises `fair_queue.Cancelled` if it was taken out meanwhile."""
        ...

    @property
    def grants_at_once(self) -> bool:
        """Whether `enqueue` gives a free slot before it returns (a line in memory), rather than later."""
        ...

    def release(self, job_id: str) -> None:
        """The job no longer counts at ModelsLab: its slot goes to the next."""
        ...

    def cancel(self, job_id: str) -> bool:
        """Take a waiting job out (never one holding a slot); False if it was not waiting."""
        ...

    def pause(self, key: str, seconds: float) -> None:
        """ModelsLab said the key's queue is full: grant nothing for this key for a while."""
        ...

    def position(self, job_id: str) -> tuple[int, int] | None:
        """(place in line, jobs waiting) for a waiting job; None once it holds a slot."""
        ...

    def paused_for(self, job_id: str) -> float: ...

    def waiting_ids(self, key: str) -> list[str]: ...

    def depths(self) -> dict[str, int]: ...
