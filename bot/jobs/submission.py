"""Getting a job to ModelsLab: its turn in the fair queue, its input image and payload, the submit call.

A ModelsLab account takes only a few jobs at once, so each job waits for a slot of its key (see
`bot.jobs.fair_queue`). A job sent back (429, a passing fault) goes back to the head of the line; a
call that may have reached ModelsLab is never repeated, since it could run, and be billed, twice.
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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from bot.guilds.keybox import KeyBox
from bot.images.downloader import DownloadFailed, ImageDownloader
from bot.images.processing import MAX_INPUT_BYTES, BadImage, normalise_input_in_turn
from bot.jobs.fair_queue import Cancelled
from bot.jobs.model import Job, JobStatus
from bot.jobs.ports import GuildDirectory, JobQueue
from bot.jobs.progress import ProgressReporter
from bot.jobs.records import changed_or_reloaded, fail_job, reload_job
from bot.jobs.waiting import AnswerRecorder, SentKeys, Wakeups
from bot.modelslab.client import Answer, ApiFlavour, ErrorKind, Failure, GenerationKind, ModelsLabClient
from bot.storage.ports import JobRepository, QueueRepository
from bot.web.metrics import Metrics
from bot.web.signing import WebhookSigner

log = logging.getLogger(__name__)

QUEUE_MAX_WAIT = 3600.0  # a job not sent within an hour (a long outage, a stuck key) is given up, unsent
SUBMIT_ATTEMPTS = 3  # tries of a submit call that failed for a passing reason (5xx, no answer)
RETRY_BASE_DELAY = 2.0  # seconds, doubled each try, with jitter
SPAM_WINDOW = 30.0  # ModelsLab refuses an identical payload repeated within this many seconds
INPUT_KINDS = ("img2img", "upscale")  # jobs that work from an image


def queue_key(api_key: str | None) -> str:
    """Which queue a key's jobs share, without keeping the key itself around."""
    return hashlib.sha256(b"modelslab-key:" + (api_key or "").encode()).hexdigest()[:16]


def sent_back(failure: Failure) -> bool:
    """Answers after which the job goes back in line rather than failing: a full queue, a passing fault.

    A call that got no answer but may have reached ModelsLab (a timeout, a connection cut after sending) is
    never sent again: it could make, and bill, a second job and pass the key's limit. With webhooks its
    callback will say (see `LostSubmissions.recover`); without, the member is told it was lost.
    """
    if failure.kind is ErrorKind.QUEUE_FULL:
        return True
    return failure.kind is ErrorKind.SERVICE_DOWN and not failure.maybe_received


class PayloadBuilder:
    """What a job sends: its input image (read and checked once) and the body of its submit call."""

    def __init__(
        self,
        *,
        store: JobRepository,
        downloader: ImageDownloader,
        signer: WebhookSigner,
        flavour: ApiFlavour,
        webhook_base: str | None,
    ) -> None:
        self._store = store
        self._downloader = downloader
        self._signer = signer
        self._flavour = flavour
        self._webhook_base = webhook_base

    async def prepare_input(self, job: Job) -> str | None:
        """Read, check and normalise the input image of a job that works from one (once: it is stored). Returns
        the problem, if any."""
        if job.kind not in INPUT_KINDS or await self._store.input_image(job.id) is not None:
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

    async def build(self, job: Job) -> dict[str, Any]:
        payload: dict[str, Any] = {**job.request.payload_for(job.kind), "track_id": job.id}
        if job.kind in INPUT_KINDS:
            if self._webhook_base:
                reference = self._signer.input_url(self._webhook_base, job.id)
            else:
                # Behind NAT ModelsLab cannot fetch from the bot: the image travels in the request.
                image = await self._store.input_image(job.id) or b""
                reference = "data:image/png;base64," + base64.b64encode(image).decode()
            field_name = "url" if job.kind == "upscale" and self._flavour == "enterprise" else "init_image"
            payload[field_name] = reference
        if self._webhook_base:
            payload["webhook"] = self._signer.webhook_url(self._webhook_base, job.id)
        return payload


class RecentPayloads:
    """The payloads sent per key in the last `SPAM_WINDOW` seconds: ModelsLab refuses an identical one."""

    def __init__(
        self, *, store: JobRepository, clock: Callable[[], float] = time.time, line: QueueRepository | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self._sent_at: OrderedDict[tuple[str, str], float] = OrderedDict()  # the oldest stamp first
        # Several processes: the payloads are recorded in the database, so that the rule holds whoever sends.
        self._line = line
        self._stamping: set[asyncio.Task[None]] = set()

    def stamp(self, key: str, payload_ref: str) -> None:
        self._sent_at[(key, payload_ref)] = self._clock()
        self._sent_at.move_to_end((key, payload_ref))
        if self._line is not None:
            task = asyncio.create_task(self._line.stamp_payload(key, payload_ref, self._clock()))
            self._stamping.add(task)
            task.add_done_callback(self._stamping.discard)

    async def make_distinct(self, job: Job, key: str) -> tuple[Job, str]:
        """Never send a payload identical to one sent for this key in the last 30 s (ModelsLab's spam filter):
        a seed the bot chose is chosen again; a seed the member chose is kept, and the job waits. Returns the job
        and what names its payload (for `stamp`)."""
        if self._line is not None:
            return await self._make_distinct_everywhere(job, key, self._line)
        now = self._clock()
        while self._sent_at:  # the stamps that have expired go, oldest first: no scan of them all
            oldest, at = next(iter(self._sent_at.items()))
            if now - at < SPAM_WINDOW:
                break
            del self._sent_at[oldest]
        ref = _payload_ref(job)
        sent_at = self._sent_at.get((key, ref))
        if sent_at is None or now - sent_at >= SPAM_WINDOW:
            return job, ref
        if job.request.seed_is_random:
            request = dataclasses.replace(job.request, seed=secrets.randbelow(2**32))
            job = await changed_or_reloaded(self._store, job.id, await self._store.update_request(job.id, request))
            return job, _payload_ref(job)
        await asyncio.sleep(max(sent_at + SPAM_WINDOW - now, 0))
        return job, ref

    async def _make_distinct_everywhere(self, job: Job, key: str, line: QueueRepository) -> tuple[Job, str]:
        while True:
            ref = _payload_ref(job)
            sent_at = await line.claim_payload(key, ref, self._clock(), SPAM_WINDOW)
            if sent_at is None:
                return job, ref  # recorded as being sent now: a twin in another process waits for this one
            if job.request.seed_is_random:
                request = dataclasses.replace(job.request, seed=secrets.randbelow(2**32))
                job = await changed_or_reloaded(self._store, job.id, await self._store.update_request(job.id, request))
            else:
                await asyncio.sleep(max(sent_at + SPAM_WINDOW - self._clock(), 0.01))


class Sender:
    """Sends a job whose turn it is: one submit call, and the record of its answer, shielded from shutdown."""

    def __init__(
        self,
        *,
        store: JobRepository,
        client: ModelsLabClient,
        keybox: KeyBox,
        payloads: PayloadBuilder,
        answers: AnswerRecorder,
        sent_keys: SentKeys,
        metrics: Metrics,
        timeout: float,
        clock: Callable[[], float] = time.time,
        line: QueueRepository | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self._keybox = keybox
        self._payloads = payloads
        self._answers = answers
        self._sent_keys = sent_keys
        self._metrics = metrics
        self._timeout = timeout
        self._clock = clock
        self._recent = RecentPayloads(store=store, clock=clock, line=line)
        self._in_flight: set[asyncio.Task[tuple[Job, Answer | None]]] = set()

    async def send(self, job: Job, api_key: str, *, record_message: bool = False) -> tuple[Job, Answer | None]:
        """Send the job (a twin of one sent in the last 30 s is made distinct, or waits, first). Returns the job
        as it then is, and ModelsLab's answer (None if the job was no longer queued). `record_message`: the job's
        status message (`job.message_id`) is not in its row yet; the submission's write records it too."""
        key = queue_key(api_key)
        job, payload_ref = await self._recent.make_distinct(job, key)
        return await self._submit(job, api_key, key, payload_ref, record_message)

    async def wait_in_flight(self, *, grace: float) -> None:
        """Let the submit calls under way finish (within `grace`) and their answers be recorded."""
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=grace)

    async def _submit(
        self, job: Job, api_key: str, key: str, payload_ref: str, record_message: bool
    ) -> tuple[Job, Answer | None]:
        """One submit call, and the record of its answer, shielded: a shutdown must not cut it off between
        ModelsLab taking the job and us writing that down."""
        sealed = self._keybox.seal_for_job(job.id, api_key)
        deadline = self._clock() + self._timeout
        message_id = job.message_id if record_message else None
        submitting = await self._store.mark_submitting(
            job.id, deadline_at=deadline, api_key_ciphertext=sealed, message_id=message_id
        )
        if submitting is None:  # no longer queued (cancelled, say)
            if message_id is not None:
                await self._store.set_message(job.id, message_id)
            return await reload_job(self._store, job.id), None
        job = submitting
        self._sent_keys.remember(job.id, api_key)  # for the fetches of this job's driver
        payload = await self._payloads.build(job)
        # Stamped before the call (a twin sent meanwhile waits) and again once answered (see below).
        self._recent.stamp(key, payload_ref)
        log.info("Job %s submitting to ModelsLab (%s)", job.id, job.kind)

        async def send() -> tuple[Job, Answer | None]:
            answer = await self._client.submit(_kind(job.kind), api_key, payload)
            if isinstance(answer, Failure):
                self._metrics.modelslab_errors.inc(answer.kind.value)
            # Stamped once answered: never earlier than ModelsLab saw it, so the 30 s count errs on the safe side.
            self._recent.stamp(key, payload_ref)
            if isinstance(answer, Failure) and sent_back(answer):
                requeued = await self._store.requeue(job.id, retry_after=answer.retry_after)
                return await changed_or_reloaded(self._store, job.id, requeued), answer
            return await self._answers.record(job, answer, submitting=True), answer

        call = asyncio.create_task(send(), name=f"submit-{job.id}")
        self._in_flight.add(call)
        call.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(call)


class Submitter:
    """Waits for each job's turn in its key's line, then has it sent; sent back, it tries again (or gives up)."""

    def __init__(
        self,
        *,
        store: JobRepository,
        queue: JobQueue,
        guilds: GuildDirectory,
        progress: ProgressReporter,
        payloads: PayloadBuilder,
        sender: Sender,
        clock: Callable[[], float] = time.time,
        retry_delay: float = RETRY_BASE_DELAY,
    ) -> None:
        self._store = store
        self._queue = queue
        self._guilds = guilds
        self._progress = progress
        self._payloads = payloads
        self._sender = sender
        self._clock = clock
        self._retry_delay = retry_delay

    async def restore_line(self, jobs: Sequence[Job]) -> None:
        """After a start-up, before any driver runs: jobs already at ModelsLab hold their key's slots, then the
        waiting ones (whose status message was shown) line up in the order they were made."""
        for job in jobs:
            if job.status in (JobStatus.SUBMITTING, JobStatus.PROCESSING):
                key = await self._guilds.api_key_for(job.guild_id)
                self._queue.hold(queue_key(key), job.id, job.user_id)
        waiting: list[tuple[str, Job]] = []
        for job in jobs:
            if job.status is JobStatus.QUEUED and job.message_id is not None:
                key = await self._guilds.api_key_for(job.guild_id)
                if key is not None:
                    waiting.append((queue_key(key), job))
        for key in {key for key, _ in waiting}:
            members = sorted({job.user_id for k, job in waiting if k == key})
            self._queue.remember_served(key, await self._store.last_served(members))
        for key, job in waiting:
            self._queue.enqueue(key, job.id, job.user_id)

    async def queue_and_submit(self, job: Job, *, message_unsaved: bool = False) -> Job:
        """Wait for the job's turn in its key's queue, then send it; sent back (429, a passing fault), try again.

        `message_unsaved`: the member was shown the job's status message (`job.message_id`), which its row does not
        say yet. When the job's turn comes at once in a line kept in memory, the write that marks it submitting
        records the message too (a statement fewer). Otherwise it is recorded first: before a job's input image is
        fetched (that takes a while), before a job joins a line kept in the database (where recording it later let
        a second job reach the line first), or before it waits. (A bot that stops in between finds the message
        through Discord, as after a stop between the insert and the acknowledgement.)"""
        if message_unsaved and (job.kind in INPUT_KINDS or not self._queue.grants_at_once):
            job = await self._record_message(job)
            message_unsaved = False
        problem = await self._payloads.prepare_input(job)
        if problem is not None:
            return await fail_job(self._store, job.id, ErrorKind.BAD_IMAGE, problem)

        failed_tries = 0
        first_in_line = False
        # The caller has just read the job, unless its input image was being fetched meanwhile.
        stale = job.kind in INPUT_KINDS
        while True:
            if self._clock() >= job.created_at + QUEUE_MAX_WAIT:
                return await fail_job(self._store, job.id, ErrorKind.EXPIRED, "not sent within the queue's time limit")
            api_key = await self._guilds.api_key_for(job.guild_id)
            if api_key is None:
                if message_unsaved:
                    job = await self._record_message(job)
                return await fail_job(self._store, job.id, ErrorKind.NO_KEY, "no API key configured")
            key = queue_key(api_key)
            if stale:
                job = await reload_job(self._store, job.id)
                if job.status is not JobStatus.QUEUED:
                    return job  # cancelled (between two tries, say)
            holds_slot = self._queue.enqueue(key, job.id, job.user_id, first=first_in_line)
            if message_unsaved and not holds_slot:
                job = await self._record_message(job)
                message_unsaved = False
            self._progress.joined_line(job)
            not_sent = await self._wait_turn(job)
            if not_sent is not None:
                return not_sent
            # Cancelled while it waited, it was taken out of the line (`_wait_turn` says so); cancelled in the
            # instant its turn came, `mark_submitting` (only from queued) finds out.
            job, answer = await self._sender.send(job, api_key, record_message=message_unsaved)
            message_unsaved = False
            if job.status is not JobStatus.QUEUED:
                return job  # at ModelsLab, finished, or failed for good
            # Sent back: it keeps its place at the head of the line. A full queue pauses the whole key first
            # (or its slot would go straight to the next job); after a passing fault the slot is passed on.
            first_in_line = stale = True
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
                return await fail_job(self._store, job.id, kind, detail)
            delay = self._retry_delay * 2 ** (failed_tries - 1) * random.uniform(0.75, 1.25)
            log.info("Job %s: submit failed (%s); try %d in %.1f s", job.id, detail, failed_tries + 1, delay)
            await asyncio.sleep(delay)

    async def _record_message(self, job: Job) -> Job:
        assert job.message_id is not None
        return await self._store.set_message(job.id, job.message_id) or await reload_job(self._store, job.id)

    async def _wait_turn(self, job: Job) -> Job | None:
        """Until the job holds a slot of its key (then None). If it was cancelled meanwhile, or waited past
        `QUEUE_MAX_WAIT` (it is then failed), it will not be sent: returns the job as it now is."""
        try:
            async with asyncio.timeout(max(job.created_at + QUEUE_MAX_WAIT - self._clock(), 0.01)):
                await self._queue.wait_turn(job.id)  # a timeout, not `wait_for`: no second task per waiting job
        except Cancelled:
            return await reload_job(self._store, job.id)
        except TimeoutError:
            self._queue.cancel(job.id)
            log.warning("Job %s: not sent within %.0f s of waiting; given up", job.id, QUEUE_MAX_WAIT)
            return await fail_job(self._store, job.id, ErrorKind.EXPIRED, "not sent within the queue's time limit")
        return None


class LostSubmissions:
    """What becomes of a job whose submit call may or may not have reached ModelsLab."""

    def __init__(
        self,
        *,
        store: JobRepository,
        wakeups: Wakeups,
        webhook_base: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._wakeups = wakeups
        self._webhook_base = webhook_base
        self._clock = clock

    async def recover(self, job: Job) -> Job:
        """Whether ModelsLab got the job is unknown (the bot stopped during the submit call, or it went unanswered).

        Never submit blindly again: it could run and be paid twice. With webhooks, ModelsLab's callback
        names the job's id: wait for it until the deadline. Without, the job is reported lost.
        """
        if self._webhook_base and job.modelslab_id is None:
            log.info("Job %s: submit answer unknown; waiting for its webhook", job.id)
            event = self._wakeups.event(job.id)
            while job.modelslab_id is None and self._clock() < job.deadline_at:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(job.deadline_at - self._clock(), 0.01)):
                        await event.wait()
                event.clear()
                job = await reload_job(self._store, job.id)
                if job.status is not JobStatus.SUBMITTING:
                    return job
        if job.modelslab_id is None:
            return await fail_job(self._store, job.id, ErrorKind.LOST, "submit answer unknown")
        processing = await self._store.mark_processing(
            job.id, modelslab_id=job.modelslab_id, eta_at=None, fetch_url=None, meta={}
        )
        # The webhook that told us the id also said the job is done: look now.
        self._wakeups.set(job.id)
        return await changed_or_reloaded(self._store, job.id, processing)


def _payload_ref(job: Job) -> str:
    payload = {**job.request.payload_for(job.kind), "source": job.request.source_url}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _kind(kind: str) -> GenerationKind:
    if kind in ("text2img", "img2img", "upscale"):
        return kind  # type: ignore[return-value]
    raise ValueError(f"unknown job kind {kind!r}")
