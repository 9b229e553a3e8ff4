"""A generation job as the bot keeps it, and where it stands. Plain data: no storage, no Discord."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.requests.generation import GenerationRequest


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
    source_flagged: bool = False  # made from an image flagged NSFW (or posted behind a spoiler)
    picture_owner_id: int | None = None  # the member whose own picture it works from
    owner: str | None = None  # the process that drives it (WORKER_ID), until its lease runs out

    @property
    def flagged(self) -> bool:
        """Shown behind a spoiler, or withheld, by the server's policy. In age-restricted channels ModelsLab's
        checker is off and nothing is hidden."""
        return (self.nsfw_detected or self.source_flagged) and not self.channel_nsfw

    @property
    def needs_posting(self) -> bool:
        return self.status.finished and self.posted_at is None


@dataclass(frozen=True)
class Progress:
    """Where a job stands, for its status message."""

    position: int | None = None  # place in the bot's queue for its key (1 = next), for the first few in line
    about_ahead: int | None = None  # further back: roughly how many jobs are ahead (a round number)
    waiting: int | None = None  # jobs waiting for that key
    retry_in: float = 0.0  # ModelsLab sent it back (429): seconds before it is tried again
    cancellable: bool = False
