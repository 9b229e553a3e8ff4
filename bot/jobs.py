"""The life of a generation job, from the stored row to the posted images. Knows nothing of discord.py.

One driver task per job walks it through its states (see `JobStatus`)::

    queued -> submitting -> processing -> succeeded | failed -> posted

Every step is written to SQLite before the next one starts, so a restarted bot picks each job up
where it was (`JobService.resume`). A webhook never finishes a job by itself: it tells the driver
"look now", and the driver confirms with a fetch, so webhooks and polling share one code path and
one outcome. The result is shown by editing the job's own status message, which is idempotent:
a crash between showing and recording it shows the same message again, never a second one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bot.downloads import DownloadFailed, ImageDownloader
from bot.generation import GenerationRequest
from bot.guild_rules import GuildConfig, Limits, Refused, explain_refusal
from bot.imaging import MAX_INPUT_BYTES, BadImage, ImageFile, fit_to_limit, normalise_input_in_turn
from bot.keybox import KeyBox, KeyUnreadable
from bot.log import register_secret
from bot.metrics import Metrics
from bot.modelslab import (
    Answer,
    ApiFlavour,
    ErrorKind,
    Failure,
    Finished,
    GenerationKind,
    ModelsLabClient,
    Pending,
)
from bot.queueing import Cancelled, FairQueue
from bot.signing import WebhookSigner
from bot.storage import Job, JobStatus, JobStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
# Waits between tries when Discord is unavailable; the last one repeats for as long as it takes.
DISCORD_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
ETA_CHANGE_WORTH_SHOWING = 5.0  # seconds
SHUTDOWN_GRACE = 30.0  # seconds an in-flight submit call may take to finish when the bot stops
QUEUE_MAX_WAIT = 3600.0  # a job not sent within an hour (a long outage, a stuck key) is given up, unsent
SUBMIT_ATTEMPTS = 3  # tries of a submit call that failed for a passing reason (5xx, no answer)
RETRY_BASE_DELAY = 2.0  # seconds, doubled each try, with jitter
SPAM_WINDOW = 30.0  # ModelsLab refuses an identical payload repeated within this many seconds
INPUT_KINDS = ("img2img", "upscale")  # jobs that work from an image
INPUT_RETENTION = 86400.0  # members' pictures are kept a day (Re-roll, Edit), then deleted
PROGRESS_MIN_INTERVAL = 2.0  # seconds between two edits of one status message (Discord rate limits)


class PresentationRefused(Exception):
    """Discord refused the message for good (a 4xx other than 429): retrying the same thing cannot help."""


class JobPresenter(Protocol):
    """Shows a job to the members: implemented for Discord in `bot.delivery`."""

    async def show_progress(self, job: Job, progress: Progress) -> None: ...

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


@dataclass(frozen=True)
class Progress:
    """Where a job stands, for its status message."""

    position: int | None = None  # place in the bot's queue for its key (1 = next)
    waiting: int | None = None  # jobs waiting for that key
    retry_in: float = 0.0  # ModelsLab sent it back (429): seconds before it is tried again
    cancellable: bool = False


@dataclass(frozen=True)
class JobSettings:
    flavour: ApiFlavour
    timeout: float
    webhook_base: str | None  # PUBLIC_URL, or None for polling only
    max_queued: int = 5  # MODELSLAB_MAX_QUEUED: jobs of one key at ModelsLab at once


def poll_delays(
    eta: float | None, *, start: float = 1.5, factor: float = 1.5, ceiling: float = 10.0
) -> Iterator[float]:
    """Seconds to wait before each fetch: the first at about the ETA, then backing off to at most `ceiling`.

    An ETA already past (a job resumed after a restart) means: look soon.
    """
    yield start if eta is None else min(max(eta, 0.5), 120.0)
    delay = start
    while True:
        yield delay
        delay = min(delay * factor, ceiling)


class JobService:
    """Creates jobs and drives each one to a posted outcome, exactly once."""

    def __init__(
        self,
        *,
        store: JobStore,
        client: ModelsLabClient,
        downloader: ImageDownloader,
        signer: WebhookSigner,
        settings: JobSettings,
        guilds: GuildDirectory,
        keybox: KeyBox,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        discord_retry_delays: tuple[float, ...] = DISCORD_RETRY_DELAYS,
        submit_retry_delay: float = RETRY_BASE_DELAY,
    ) -> None:
        self._store = store
        self._client = client
        self._downloader = downloader
        self._signer = signer
        self._settings = settings
        self._guilds = guilds
        self._keybox = keybox
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._discord_retry_delays = discord_retry_delays
        self._submit_retry_delay = submit_retry_delay
        self._presenter: JobPresenter | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight: set[asyncio.Task[tuple[Job, Answer | None]]] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._posted: dict[str, asyncio.Event] = {}
        self._closing = False
        self._queue = FairQueue(settings.max_queued, on_change=self._queue_changed)
        self.metrics.queue_depths = self._queue.depths
        self._recent_payloads: dict[tuple[str, str], float] = {}
        self._progress_timers: dict[str, asyncio.TimerHandle] = {}
        self._progress_last: dict[str, float] = {}
        self._progress_shown: dict[str, tuple[int | None, bool]] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._posting: set[str] = set()
        self._posting_done = asyncio.Event()
        self.draining = False

    @property
    def timeout(self) -> float:
        return self._settings.timeout

    @property
    def store(self) -> JobStore:
        return self._store

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._presenter = presenter

    async def api_key_for(self, guild_id: int | None) -> str | None:
        """The ModelsLab key that pays for this server's jobs."""
        return await self._guilds.api_key_for(guild_id)

    # ------------------------------------------------------------------------------------------ creating

    async def create(
        self,
        *,
        kind: str,
        guild_id: int | None,
        channel_id: int,
        user_id: int,
        request: GenerationRequest,
        application_id: int | None,
        interaction_token: str | None,
        token_expires_at: float | None,
        attachment_size_limit: int | None,
        channel_nsfw: bool = False,
        limits: Limits | None = None,
        parent_job_id: str | None = None,
        input_from_job: str | None = None,
    ) -> Job:
        """Store a new job before anything is sent anywhere, if it fits the server's limits (else `Refused`)."""
        now = self._clock()
        job = Job(
            id=secrets.token_hex(16),
            kind=kind,
            guild_id=guild_id,
            channel_id=channel_id,
            user_id=user_id,
            request=request,
            api_flavour=self._settings.flavour,
            status=JobStatus.QUEUED,
            created_at=now,
            deadline_at=now + self._settings.timeout,
            updated_at=now,
            charged_images=request.samples,
            application_id=application_id,
            interaction_token=interaction_token,
            token_expires_at=token_expires_at,
            attachment_size_limit=attachment_size_limit,
            channel_nsfw=channel_nsfw,
            parent_job_id=parent_job_id,
        )
        if limits is None:
            await self._store.insert(job)
        elif not await self._store.insert_within_limits(job, limits):
            usage = await self._store.usage(guild_id, user_id, now)
            log.info("Request of member %s in server %s refused by the server's limits", user_id, guild_id)
            raise Refused(explain_refusal(limits, usage, request.samples, now))
        if input_from_job is not None:
            await self._store.copy_input(input_from_job, job.id)
        log.info("Job %s stored (%s, %d image(s), model %s)", job.id, kind, request.samples, request.model_id)
        return job

    async def status_message_shown(self, job_id: str, message_id: int | None) -> None:
        """The member saw the status message: remember it and start the job."""
        if message_id is not None:
            await self._store.set_message(job_id, message_id)
        self.start(job_id)

    async def abandon(self, job_id: str, reason: str) -> None:
        """The command could not be acknowledged: the job is dropped unsent, and a notice goes to the channel."""
        log.warning("Job %s dropped before submission: %s", job_id, reason)
        if await self._store.finish_failure(job_id, kind=ErrorKind.UNANSWERED, detail=reason):
            # The interaction was never answered, so its token cannot reach a message: post through the channel.
            await self._store.forget_interaction(job_id)
            self.start(job_id)

    async def cancel(self, job_id: str, *, by_user_id: int, may_manage_messages: bool) -> str:
        """Cancel a job that has not been sent yet; its quota reservation is returned. Returns what to tell."""
        job = await self._store.get(job_id)
        if job is None:
            return "This job no longer exists."
        if job.user_id != by_user_id and not may_manage_messages:
            return "Only the member who asked for it, or a member with Manage Messages, can cancel this job."
        if job.status is not JobStatus.QUEUED:
            return "This job was already sent to ModelsLab (or is finished), so it can no longer be cancelled."
        if not await self._store.finish_failure(
            job_id, kind=ErrorKind.CANCELLED, detail=str(by_user_id), only_queued=True
        ):
            return "This job was already sent to ModelsLab (or is finished), so it can no longer be cancelled."
        log.info("Job %s cancelled by member %s", job_id, by_user_id)
        if not self._queue.cancel(job_id):
            self.start(job_id)  # no driver waiting in line (e.g. between two tries): one will post the outcome
        return "Cancelled: it will not be sent, and it does not count against the quota."

    # ------------------------------------------------------------------------------------------ running

    def start(self, job_id: str) -> None:
        """Drive the job, if no driver is at it yet. The first fetch waits for ModelsLab's ETA."""
        if self._closing or self.draining or job_id in self._tasks:
            return
        task = asyncio.create_task(self._drive(job_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t, jid=job_id: self._driver_done(jid, t))  # type: ignore[misc]

    def wake(self, job_id: str) -> None:
        """Something says the job may be done (a webhook): look at it now rather than at the next poll."""
        self._event(job_id).set()
        self.start(job_id)

    def _driver_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._wake.pop(job_id, None)
        self._progress_shown.pop(job_id, None)
        self._progress_last.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("Job %s driver stopped on an unexpected error", job_id, exc_info=task.exception())

    async def resume(self) -> int:
        """After a start-up: carry on every job that is not finished or not yet shown.

        The queue is rebuilt before any driver runs: jobs already at ModelsLab hold their key's slots,
        then the waiting ones line up in the order they were made.
        """
        await self._store.drop_old_inputs(self._clock() - INPUT_RETENTION)
        jobs = await self._store.needing_work()
        for job in jobs:
            if job.status in (JobStatus.SUBMITTING, JobStatus.PROCESSING):
                key = await self.api_key_for(job.guild_id)
                self._queue.hold(_key_ref(key), job.id, job.user_id)
        waiting: list[tuple[str, Job]] = []
        for job in jobs:
            if job.status is JobStatus.QUEUED and job.message_id is not None:
                key = await self.api_key_for(job.guild_id)
                if key is not None:
                    waiting.append((_key_ref(key), job))
        for key in {key for key, _ in waiting}:
            members = sorted({job.user_id for k, job in waiting if k == key})
            self._queue.remember_served(key, await self._store.last_served(members))
        for key, job in waiting:
            self._queue.enqueue(key, job.id, job.user_id)
        for job in jobs:
            self.start(job.id)
        if jobs:
            log.info("Resuming %d unfinished job(s)", len(jobs))
        return len(jobs)

    async def wait_idle(self) -> None:
        """Wait until no job is being driven (tests and graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def wait_until_posted(self, job_id: str) -> Job:
        """Wait until the job's outcome has been shown to the member (tests, graceful shutdown)."""
        event = self._posted.setdefault(job_id, asyncio.Event())
        try:
            job = await self._store.get(job_id)
            while job is None or job.posted_at is None:
                await event.wait()
                event.clear()
                job = await self._store.get(job_id)
            return job
        finally:
            self._posted.pop(job_id, None)

    def _announce_posted(self, job_id: str) -> None:
        event = self._posted.get(job_id)
        if event is not None:
            event.set()

    async def drain(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Before a shutdown: start nothing new, and let the results being posted finish (within `grace`)."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._posting:
                    self._posting_done.clear()
                    await self._posting_done.wait()
        if self._posting:
            log.warning(
                "Stopping with %d result(s) still being posted: they are posted at the next start", len(self._posting)
            )

    async def close(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop every driver. A submit call under way is let finish (within `grace`) and its answer recorded:
        cut off, its job could be paid at ModelsLab and yet reported lost."""
        self._closing = True
        for timer in self._progress_timers.values():
            timer.cancel()
        tasks = [*self._tasks.values(), *self._side_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=grace)

    def _event(self, job_id: str) -> asyncio.Event:
        event = self._wake.get(job_id)
        if event is None:
            event = self._wake[job_id] = asyncio.Event()
        return event

    async def _drive(self, job_id: str) -> None:
        job = await self._store.get(job_id)
        if job is None:
            return
        try:
            if job.status is JobStatus.QUEUED:
                job = await self._queue_and_submit(job)
            if job.status is JobStatus.SUBMITTING:
                job = await self._recover_lost_submission(job)
            if job.status is JobStatus.PROCESSING:
                job = await self._poll_until_finished(job)
        finally:
            # Finished (or failed, or this process stops): the job no longer counts at ModelsLab.
            self._queue.release(job_id)
        if job.needs_posting:
            await self._post(job)

    async def _reload(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        assert job is not None, "jobs are never deleted while being driven"
        return job

    async def _fail(self, job_id: str, kind: ErrorKind, detail: str, **extra: Any) -> Job:
        await self._store.finish_failure(job_id, kind=kind, detail=detail, **extra)
        return await self._reload(job_id)

    # ------------------------------------------------------------------------------------------ submitting

    async def _queue_and_submit(self, job: Job) -> Job:
        """Wait for the job's turn in its key's queue, then send it; sent back (429, a passing fault), try again."""
        if job.message_id is None:
            # Stored, then the bot stopped before it knew whether the member saw the status message.
            presenter = self._presenter_or_fail()
            found = await self._keep_trying(job, "status message lookup", lambda: presenter.find_status_message(job))
            if found is None:
                await self.abandon(job.id, "the status message was never shown")
                return await self._reload(job.id)
            await self._store.set_message(job.id, found)

        if job.kind in INPUT_KINDS:
            problem = await self._prepare_input(job)
            if problem is not None:
                return await self._fail(job.id, ErrorKind.BAD_IMAGE, problem)

        failed_tries = 0
        first_in_line = False
        while True:
            if self._clock() >= job.created_at + QUEUE_MAX_WAIT:
                return await self._fail(job.id, ErrorKind.EXPIRED, "not sent within the queue's time limit")
            api_key = await self.api_key_for(job.guild_id)
            if api_key is None:
                return await self._fail(job.id, ErrorKind.NO_KEY, "no API key configured")
            key = _key_ref(api_key)
            job = await self._reload(job.id)
            if job.status is not JobStatus.QUEUED:
                return job  # cancelled (between two tries, say)
            self._queue.enqueue(key, job.id, job.user_id, first=first_in_line)
            self._schedule_progress(job.id)
            try:
                await asyncio.wait_for(
                    self._queue.wait_turn(job.id), timeout=max(job.created_at + QUEUE_MAX_WAIT - self._clock(), 0.01)
                )
            except Cancelled:
                return await self._reload(job.id)
            except TimeoutError:
                self._queue.cancel(job.id)
                log.warning("Job %s: not sent within %.0f s of waiting; given up", job.id, QUEUE_MAX_WAIT)
                return await self._fail(job.id, ErrorKind.EXPIRED, "not sent within the queue's time limit")
            job = await self._reload(job.id)
            if job.status is not JobStatus.QUEUED:
                return job  # cancelled while it waited
            job = await self._distinct_from_recent(job, key)
            job, answer = await self._send(job, api_key)
            if job.status is not JobStatus.QUEUED:
                return job  # at ModelsLab, finished, or failed for good
            # Sent back: it keeps its place at the head of the line. A full queue pauses the whole key first
            # (or its slot would go straight to the next job); after a passing fault the slot is passed on.
            first_in_line = True
            if isinstance(answer, Failure) and answer.kind is ErrorKind.QUEUE_FULL:
                wait = answer.retry_after or 30.0
                log.info("Job %s: ModelsLab's queue is full; trying again in %.0f s", job.id, wait)
                self._queue.pause(key, wait)
                self._queue.release(job.id)
                continue
            self._queue.release(job.id)
            failed_tries += 1
            detail = answer.detail if isinstance(answer, Failure) else "no answer"
            if failed_tries >= SUBMIT_ATTEMPTS:
                kind = answer.kind if isinstance(answer, Failure) else ErrorKind.SERVICE_DOWN
                return await self._fail(job.id, kind, detail)
            delay = self._submit_retry_delay * 2 ** (failed_tries - 1) * random.uniform(0.75, 1.25)
            log.info("Job %s: submit failed (%s); try %d in %.1f s", job.id, detail, failed_tries + 1, delay)
            await asyncio.sleep(delay)

    async def _prepare_input(self, job: Job) -> str | None:
        """Read, check and normalise the job's input image (once: it is stored). Returns the problem, if any."""
        if await self._store.input_image(job.id) is not None:
            return None
        if not job.request.source_url:
            return "there is no image to work from"
        try:
            data = await self._downloader.fetch_bytes(job.request.source_url, MAX_INPUT_BYTES + 1)
        except DownloadFailed as exc:
            log.info("Job %s: the input image could not be downloaded (%s)", job.id, exc)
            return "the image could not be downloaded from Discord (it may have been deleted)"
        try:
            image = await normalise_input_in_turn(data)
        except BadImage as exc:
            return str(exc)
        await self._store.save_input(job.id, image.data, image.width, image.height)
        log.info("Job %s: input image ready (%dx%d)", job.id, image.width, image.height)
        return None

    async def _payload(self, job: Job) -> dict[str, Any]:
        payload: dict[str, Any] = {**job.request.payload_for(job.kind), "track_id": job.id}
        if job.kind in INPUT_KINDS:
            if self._settings.webhook_base:
                reference = self._signer.input_url(self._settings.webhook_base, job.id)
            else:
                # Behind NAT ModelsLab cannot fetch from the bot: the image travels in the request.
                image = await self._store.input_image(job.id) or b""
                reference = "data:image/png;base64," + base64.b64encode(image).decode()
            field_name = "url" if job.kind == "upscale" and self._settings.flavour == "enterprise" else "init_image"
            payload[field_name] = reference
        if self._settings.webhook_base:
            payload["webhook"] = self._signer.webhook_url(self._settings.webhook_base, job.id)
        return payload

    async def _send(self, job: Job, api_key: str) -> tuple[Job, Answer | None]:
        """One submit call, and the record of its answer, shielded: a shutdown must not cut it off between
        ModelsLab taking the job and us writing that down."""
        sealed = self._keybox.seal_for_job(job.id, api_key)
        deadline = self._clock() + self._settings.timeout
        if not await self._store.mark_submitting(job.id, deadline_at=deadline, api_key_ciphertext=sealed):
            return await self._reload(job.id), None
        payload = await self._payload(job)
        # Stamped before the call (a twin sent meanwhile waits) and again once answered (see below).
        self._recent_payloads[(_key_ref(api_key), _payload_ref(job))] = self._clock()
        log.info("Job %s submitting to ModelsLab (%s)", job.id, job.kind)

        async def send() -> tuple[Job, Answer | None]:
            answer = await self._client.submit(_kind(job.kind), api_key, payload)
            if isinstance(answer, Failure):
                self.metrics.modelslab_errors.inc(answer.kind.value)
            # Stamped once answered: never earlier than ModelsLab saw it, so the 30 s count errs on the safe side.
            self._recent_payloads[(_key_ref(api_key), _payload_ref(job))] = self._clock()
            if isinstance(answer, Failure) and self._send_back(answer):
                await self._store.requeue(job.id, retry_after=answer.retry_after)
                return await self._reload(job.id), answer
            return await self._apply(job.id, answer, submitting=True), answer

        call = asyncio.create_task(send(), name=f"submit-{job.id}")
        self._in_flight.add(call)
        call.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(call)

    def _send_back(self, failure: Failure) -> bool:
        """Answers after which the job goes back in line rather than failing: a full queue, a passing fault.

        A call that got no answer but may have reached ModelsLab (a timeout, a connection cut after sending) is
        never sent again: it could make, and bill, a second job and pass the key's limit. With webhooks its
        callback will say (see `_recover_lost_submission`); without, the member is told it was lost.
        """
        if failure.kind is ErrorKind.QUEUE_FULL:
            return True
        return failure.kind is ErrorKind.SERVICE_DOWN and not failure.maybe_received

    async def _distinct_from_recent(self, job: Job, key: str) -> Job:
        """Never send a payload identical to one sent for this key in the last 30 s (ModelsLab's spam filter):
        a seed the bot chose is chosen again; a seed the member chose is kept, and the job waits."""
        now = self._clock()
        for stamp in [k for k, at in self._recent_payloads.items() if now - at >= SPAM_WINDOW]:
            del self._recent_payloads[stamp]
        sent_at = self._recent_payloads.get((key, _payload_ref(job)))
        if sent_at is None:
            return job
        if job.request.seed_is_random:
            request = dataclasses.replace(job.request, seed=secrets.randbelow(2**32))
            await self._store.update_request(job.id, request)
            return await self._reload(job.id)
        await asyncio.sleep(max(sent_at + SPAM_WINDOW - now, 0))
        return job

    async def _recover_lost_submission(self, job: Job) -> Job:
        """Whether ModelsLab got the job is unknown (the bot stopped during the submit call, or it went unanswered).

        Never submit blindly again: it could run and be paid twice. With webhooks, ModelsLab's callback
        names the job's id: wait for it until the deadline. Without, the job is reported lost.
        """
        if self._settings.webhook_base and job.modelslab_id is None:
            log.info("Job %s: submit answer unknown; waiting for its webhook", job.id)
            event = self._event(job.id)
            while job.modelslab_id is None and self._clock() < job.deadline_at:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=max(job.deadline_at - self._clock(), 0.01))
                event.clear()
                job = await self._reload(job.id)
                if job.status is not JobStatus.SUBMITTING:
                    return job
        if job.modelslab_id is None:
            return await self._fail(job.id, ErrorKind.LOST, "submit answer unknown")
        await self._store.mark_processing(job.id, modelslab_id=job.modelslab_id, eta_at=None, fetch_url=None, meta={})
        # The webhook that told us the id also said the job is done: look now.
        self._event(job.id).set()
        return await self._reload(job.id)

    # ------------------------------------------------------------------------------------------ waiting

    async def _poll_until_finished(self, job: Job) -> Job:
        """Fetch at about the ETA, then backing off, until finished or the deadline (with one last look at it)."""
        eta = job.eta_at - self._clock() if job.eta_at is not None else None
        delays = poll_delays(eta)
        event = self._event(job.id)
        while True:
            if job.modelslab_id is None and not self._settings.webhook_base:
                # Queued without an id, and no webhook can ever name it: nothing to wait for.
                return await self._fail(job.id, ErrorKind.GENERATION_FAILED, "ModelsLab gave no request id")
            remaining = job.deadline_at - self._clock()
            if remaining > 0 and not event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=min(next(delays), remaining))
            event.clear()
            job = await self._reload(job.id)
            if job.status is not JobStatus.PROCESSING:
                return job
            if job.modelslab_id is not None:
                job = await self._fetch_once(job)
                if job.status is not JobStatus.PROCESSING:
                    return job
            if self._clock() >= job.deadline_at:
                log.warning("Job %s timed out after %.0f s", job.id, self._settings.timeout)
                return await self._fail(job.id, ErrorKind.TIMED_OUT, "no result before the deadline")

    async def _fetch_once(self, job: Job) -> Job:
        assert job.modelslab_id is not None
        api_key = await self._key_sent_with(job)
        if api_key is None:
            return await self._fail(job.id, ErrorKind.NO_KEY, "no API key configured")
        answer = await self._client.fetch(api_key, job.modelslab_id, job.fetch_url)
        if isinstance(answer, Failure) and answer.transient:
            self.metrics.modelslab_errors.inc(answer.kind.value)
            log.info("Job %s: fetch failed for now (%s: %s); will retry", job.id, answer.kind, answer.detail)
            return job
        return await self._apply(job.id, answer, submitting=False)

    async def _key_sent_with(self, job: Job) -> str | None:
        """The key the job was submitted with (the server's key may have changed since); else the current one."""
        sealed = await self._store.sealed_key(job.id)
        if sealed is not None:
            try:
                api_key = self._keybox.open_for_job(job.id, sealed)
            except KeyUnreadable:
                log.warning("Job %s: its key cannot be decrypted (was SECRET_KEY changed?)", job.id)
            else:
                register_secret(api_key)
                return api_key
        return await self.api_key_for(job.guild_id)

    async def _apply(self, job_id: str, answer: Answer, *, submitting: bool) -> Job:
        """Record what ModelsLab answered. Only the first finishing answer for a job is taken."""
        before = await self._reload(job_id)
        if isinstance(answer, Finished):
            meta = answer.meta or before.meta
            seed = answer.seed if answer.seed is not None else _as_seed(before.meta)
            if await self._store.finish_success(
                job_id,
                modelslab_id=answer.request_id or before.modelslab_id,
                output_urls=answer.output_urls,
                proxy_urls=answer.proxy_urls,
                meta=meta,
                seed=seed if seed is not None else before.request.seed,
                generation_time=answer.generation_time,
                # Never more than was reserved: a surprise extra image is neither shown nor counted.
                charged_images=min(len(answer.output_urls), before.request.samples),
                nsfw_detected=answer.nsfw_detected,
            ):
                log.info("Job %s finished at ModelsLab with %d image(s)", job_id, len(answer.output_urls))
            return await self._reload(job_id)
        if isinstance(answer, Pending):
            eta_at = self._clock() + answer.eta if answer.eta is not None else before.eta_at
            changed = await self._store.mark_processing(
                job_id,
                modelslab_id=answer.request_id if before.modelslab_id is None else None,
                eta_at=eta_at,
                fetch_url=answer.fetch_url,
                meta=answer.meta if submitting else {},
            )
            job = await self._reload(job_id)
            if changed and (submitting or _eta_moved(before.eta_at, eta_at)):
                await self._show_progress(job)
            return job
        if not submitting:
            self.metrics.modelslab_errors.inc(answer.kind.value)
        if submitting and answer.maybe_received:
            if self._settings.webhook_base:
                # ModelsLab may have queued it: its webhook will say (the job keeps its slot meanwhile).
                log.warning("Job %s: the submit call got no answer (%s); waiting for a webhook", job_id, answer.detail)
                return before
            log.warning("Job %s: the submit call got no answer (%s); not sent again", job_id, answer.detail)
            await self._store.finish_failure(job_id, kind=ErrorKind.LOST, detail=f"no answer ({answer.detail})")
            return await self._reload(job_id)
        if await self._store.finish_failure(
            job_id, kind=answer.kind, detail=answer.detail, retry_after=answer.retry_after
        ):
            log.info("Job %s failed: %s (%s)", job_id, answer.kind, answer.detail)
        return await self._reload(job_id)

    # ------------------------------------------------------------------------------------------ webhooks

    async def job_exists(self, job_id: str) -> bool:
        return await self._store.get(job_id) is not None

    async def input_image(self, job_id: str) -> bytes | None:
        """The input image ModelsLab fetches, only while the job is at ModelsLab."""
        job = await self._store.get(job_id)
        if job is None or job.status not in (JobStatus.SUBMITTING, JobStatus.PROCESSING):
            return None
        return await self._store.input_image(job_id)

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """A callback for this job arrived (already authenticated): learn its id if needed, then look now.

        The only thing taken from the body is ModelsLab's request id, and only while the job has none (its
        submit answer was lost); the outcome itself always comes from a fetch.
        """
        job = await self._store.get(job_id)
        if job is None or job.status.finished:
            return  # a repeat delivery, or one for a job already settled
        modelslab_id = payload.get("id")
        if job.modelslab_id is None and isinstance(modelslab_id, str | int) and not isinstance(modelslab_id, bool):
            text = str(modelslab_id).strip()
            if text:
                await self._store.adopt_modelslab_id(job_id, text)
        log.info("Job %s: webhook received (%s)", job_id, str(payload.get("status", ""))[:20])
        self.wake(job_id)

    # ------------------------------------------------------------------------------------------ posting

    async def _post(self, job: Job) -> None:
        self._posting.add(job.id)
        try:
            await self._post_outcome(job)
        finally:
            self._posting.discard(job.id)
            self._posting_done.set()

    async def _post_outcome(self, job: Job) -> None:
        presenter = self._presenter_or_fail()
        if job.status is JobStatus.SUCCEEDED:
            images = await self._download_images(job)
            if not images:
                job = await self._fail(
                    job.id, ErrorKind.DOWNLOAD_FAILED, "no image could be downloaded", from_succeeded=True
                )
            else:
                await self._show_result(job, images)
                return
        try:
            message_id = await self._keep_trying(job, "failure", lambda: presenter.show_failure(job))
        except PresentationRefused as exc:
            log.error("Job %s: Discord refused even the failure message (%s); giving up on showing it", job.id, exc)
            message_id = None
        await self._store.mark_posted(job.id, message_id=message_id)
        self._announce_posted(job.id)
        self.metrics.jobs.inc(job.kind, job.error_kind or "failed")
        log.info("Job %s failure shown (%s)", job.id, job.error_kind)

    async def _show_result(self, job: Job, images: list[ImageFile]) -> None:
        presenter = self._presenter_or_fail()
        config = await self._guilds.config(job.guild_id) if job.guild_id is not None else None
        # Outside age-restricted channels the safety checker was on; what it still flags follows the server policy.
        flagged = job.nsfw_detected and not job.channel_nsfw
        withheld = flagged and config is not None and config.nsfw_policy == "withhold"
        limit = job.attachment_size_limit or DEFAULT_ATTACHMENT_LIMIT
        images = await asyncio.to_thread(fit_to_limit, images, limit)
        shown = [] if withheld else images
        try:
            message_id = await self._keep_trying(
                job, "result", lambda: presenter.show_result(job, shown, spoiler=flagged, withheld=withheld)
            )
        except PresentationRefused as exc:
            log.warning("Job %s: Discord refused the result (%s)", job.id, exc)
            job = await self._fail(job.id, ErrorKind.DELIVERY_REFUSED, str(exc), from_succeeded=True)
            await self._post_outcome(job)
            return
        gallery = config.gallery_channel_id if config is not None else None
        # Images made with the safety checker off (age-restricted channels) or flagged never go to the gallery.
        shareable = not flagged and not job.channel_nsfw
        if gallery is not None and gallery != job.channel_id and shareable and job.gallery_message_id is None:
            await self._post_to_gallery(job, images, gallery)
        # Images that could not be downloaded were still made and billed: the charge stays as recorded.
        await self._store.mark_posted(job.id, image_count=len(images), message_id=message_id)
        self._announce_posted(job.id)
        await self._store.drop_old_inputs(self._clock() - INPUT_RETENTION)
        self.metrics.jobs.inc(job.kind, "succeeded")
        if job.finished_at is not None:
            self.metrics.ready_to_posted.observe(max(self._clock() - job.finished_at, 0.0))
        log.info("Job %s posted with %d image(s)%s", job.id, len(images), " (withheld)" if withheld else "")

    async def _post_to_gallery(self, job: Job, images: list[ImageFile], channel_id: int) -> None:
        presenter = self._presenter_or_fail()
        try:
            message_id = await self._keep_trying(
                job, "gallery post", lambda: presenter.post_to_gallery(job, images, channel_id)
            )
        except PresentationRefused as exc:
            log.warning("Job %s: the gallery channel refused the copy (%s)", job.id, exc)
            return
        await self._store.set_gallery_message(job.id, message_id)

    async def _download_images(self, job: Job) -> list[ImageFile]:
        """Every image that can be had; the ones that cannot are left out (and not counted)."""
        downloads = []
        for index, url in enumerate(job.output_urls[: job.request.samples]):
            urls = [url]
            if index < len(job.proxy_urls) and job.proxy_urls[index] != url:
                urls.append(job.proxy_urls[index])
            downloads.append(self._downloader.download(urls))
        results = await asyncio.gather(*downloads, return_exceptions=True)
        images = []
        for result in results:
            if isinstance(result, DownloadFailed):
                log.warning("Job %s: an image could not be downloaded (%s)", job.id, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                images.append(result)
        return images

    async def _keep_trying(self, job: Job, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Discord can be unavailable for a while: try again, ever more patiently, until it answers.

        `PresentationRefused` (Discord said no for good) is not retried.
        """
        delays = itertools.chain(self._discord_retry_delays, itertools.repeat(self._discord_retry_delays[-1]))
        for attempt in itertools.count(1):
            try:
                return await call()
            except (asyncio.CancelledError, PresentationRefused):
                raise
            except Exception as exc:
                delay = next(delays)
                log.warning("Job %s: the %s failed (try %d: %s); again in %.0f s", job.id, what, attempt, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _presenter_or_fail(self) -> JobPresenter:
        if self._presenter is None:
            raise RuntimeError("no presenter attached")
        return self._presenter

    def _queue_changed(self, key: str) -> None:
        for job_id in self._queue.waiting_ids(key):
            self._schedule_progress(job_id)

    def _schedule_progress(self, job_id: str) -> None:
        """Show the job's new place in line soon, coalescing changes: at most one edit per message per interval."""
        if self._closing or job_id in self._progress_timers:
            return
        delay = max(self._progress_last.get(job_id, 0.0) + PROGRESS_MIN_INTERVAL - time.monotonic(), 0.0)

        def fire() -> None:
            self._progress_timers.pop(job_id, None)
            task = asyncio.create_task(self._show_queue_position(job_id), name=f"progress-{job_id}")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

        self._progress_timers[job_id] = asyncio.get_running_loop().call_later(delay, fire)

    async def _show_queue_position(self, job_id: str) -> None:
        place = self._queue.position(job_id)
        shown = (place[0] if place else None, self._queue.paused_for(job_id) > 0)
        if self._progress_shown.get(job_id) == shown:
            return  # the member already sees this: no edit, and no database read
        job = await self._store.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:
            self._progress_shown.pop(job_id, None)
            self._progress_last.pop(job_id, None)
            return
        self._progress_shown[job_id] = shown
        self._progress_last[job_id] = time.monotonic()
        progress = Progress(
            position=place[0] if place else None,
            waiting=place[1] if place else None,
            retry_in=self._queue.paused_for(job_id),
            cancellable=True,
        )
        await self._show_progress(job, progress)

    async def _show_progress(self, job: Job, progress: Progress | None = None) -> None:
        if self._presenter is None:
            return
        try:
            await self._presenter.show_progress(job, progress or Progress())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress is a courtesy: never let it stop the job
            log.warning("Job %s: status update failed (%s)", job.id, exc)


def _key_ref(api_key: str | None) -> str:
    """Which queue a key's jobs share, without keeping the key itself around."""
    return hashlib.sha256(b"modelslab-key:" + (api_key or "").encode()).hexdigest()[:16]


def _payload_ref(job: Job) -> str:
    payload = {**job.request.payload_for(job.kind), "source": job.request.source_url}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _kind(kind: str) -> GenerationKind:
    if kind in ("text2img", "img2img", "upscale"):
        return kind  # type: ignore[return-value]
    raise ValueError(f"unknown job kind {kind!r}")


def _eta_moved(before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return before != after
    return abs(after - before) >= ETA_CHANGE_WORTH_SHOWING


def _as_seed(meta: Mapping[str, Any]) -> int | None:
    value = meta.get("seed")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None
