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
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.guilds.keybox import KeyBox
from bot.guilds.rules import Limits, Refused, explain_refusal
from bot.images.downloader import DownloadFailed, ImageDownloader
from bot.images.processing import MAX_INPUT_BYTES, BadImage, normalise_input
from bot.jobs.fair_queue import Cancelled, FairQueue
from bot.jobs.model import Job, JobStatus
from bot.jobs.ports import GuildDirectory, JobPresenter, JobQueue
from bot.jobs.posting import DISCORD_RETRY_DELAYS, INPUT_RETENTION, ResultPoster
from bot.jobs.progress import ProgressReporter
from bot.jobs.waiting import AnswerRecorder, ResultWaiter, Wakeups, WebhookIntake
from bot.modelslab.client import (
    Answer,
    ApiFlavour,
    ErrorKind,
    Failure,
    GenerationKind,
    ModelsLabClient,
)
from bot.requests.generation import GenerationRequest
from bot.storage.sqlite import JobStore
from bot.web.metrics import Metrics
from bot.web.signing import WebhookSigner

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0  # seconds an in-flight submit call may take to finish when the bot stops
QUEUE_MAX_WAIT = 3600.0  # a job not sent within an hour (a long outage, a stuck key) is given up, unsent
SUBMIT_ATTEMPTS = 3  # tries of a submit call that failed for a passing reason (5xx, no answer)
RETRY_BASE_DELAY = 2.0  # seconds, doubled each try, with jitter
SPAM_WINDOW = 30.0  # ModelsLab refuses an identical payload repeated within this many seconds
INPUT_KINDS = ("img2img", "upscale")  # jobs that work from an image


@dataclass(frozen=True)
class JobPolicy:
    flavour: ApiFlavour
    timeout: float
    webhook_base: str | None  # PUBLIC_URL, or None for polling only
    max_queued: int = 5  # MODELSLAB_MAX_QUEUED: jobs of one key at ModelsLab at once


class JobService:
    """Creates jobs and drives each one to a posted outcome, exactly once."""

    def __init__(
        self,
        *,
        store: JobStore,
        client: ModelsLabClient,
        downloader: ImageDownloader,
        signer: WebhookSigner,
        settings: JobPolicy,
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
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight: set[asyncio.Task[tuple[Job, Answer | None]]] = set()
        self._wakeups = Wakeups()
        self._closing = False
        self._queue: JobQueue = FairQueue(settings.max_queued, on_change=self._line_changed)
        self._progress = ProgressReporter(store=store, queue=self._queue)
        self._answers = AnswerRecorder(
            store=store, progress=self._progress, metrics=self.metrics, webhook_base=settings.webhook_base, clock=clock
        )
        self._waiter = ResultWaiter(
            store=store,
            client=client,
            guilds=guilds,
            keybox=keybox,
            answers=self._answers,
            wakeups=self._wakeups,
            metrics=self.metrics,
            timeout=settings.timeout,
            webhook_base=settings.webhook_base,
            clock=clock,
        )
        self._webhooks = WebhookIntake(store=store, wake=self.wake)
        self._poster = ResultPoster(
            store=store,
            guilds=guilds,
            downloader=downloader,
            metrics=self.metrics,
            clock=clock,
            discord_retry_delays=discord_retry_delays,
        )
        self.metrics.queue_depths = self._queue.depths
        self._recent_payloads: dict[tuple[str, str], float] = {}
        self.draining = False

    @property
    def timeout(self) -> float:
        return self._settings.timeout

    @property
    def store(self) -> JobStore:
        return self._store

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._progress.attach_presenter(presenter)
        self._poster.attach_presenter(presenter)

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
        self._wakeups.set(job_id)
        self.start(job_id)

    def _driver_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._wakeups.forget(job_id)
        self._progress.forget(job_id)
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
        return await self._poster.wait_until_posted(job_id)

    async def drain(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Before a shutdown: start nothing new, and let the results being posted finish (within `grace`)."""
        self.draining = True
        await self._poster.finish_posting(grace=grace)

    async def close(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop every driver. A submit call under way is let finish (within `grace`) and its answer recorded:
        cut off, its job could be paid at ModelsLab and yet reported lost."""
        self._closing = True
        self._progress.close()
        drivers = list(self._tasks.values())
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, self._progress.wait_closed(), return_exceptions=True)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=grace)

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
                job = await self._waiter.wait_until_finished(job)
        finally:
            # Finished (or failed, or this process stops): the job no longer counts at ModelsLab.
            self._queue.release(job_id)
        if job.needs_posting:
            await self._poster.post(job)

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
            found = await self._poster.find_status_message(job)
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
            self._progress.show_place_in_line_soon(job.id)
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
            image = await asyncio.to_thread(normalise_input, data)
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
            return await self._answers.record(job.id, answer, submitting=True), answer

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
            event = self._wakeups.event(job.id)
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
        self._wakeups.event(job.id).set()
        return await self._reload(job.id)

    # ------------------------------------------------------------------------------------------ webhooks

    async def job_exists(self, job_id: str) -> bool:
        return await self._webhooks.job_exists(job_id)

    async def input_image(self, job_id: str) -> bytes | None:
        """The input image ModelsLab fetches, only while the job is at ModelsLab."""
        return await self._webhooks.input_image(job_id)

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """A callback for this job arrived (already authenticated): see `WebhookIntake.on_webhook`."""
        await self._webhooks.on_webhook(job_id, payload)

    def _line_changed(self, key: str) -> None:
        self._progress.line_changed(key)


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
