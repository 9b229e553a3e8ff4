"""Waiting for ModelsLab's result: fetching at the ETA, webhooks that say "look now", and recording answers.

A webhook never finishes a job by itself: it wakes the job's driver, which confirms with a fetch, so
webhooks and polling share one code path and one outcome. Every answer, the submit call's and each
fetch's, is recorded by `AnswerRecorder`, and only the first finishing answer for a job is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from bot.guilds.keybox import KeyBox, KeyUnreadable
from bot.jobs.model import Job, JobStatus
from bot.jobs.ports import GuildDirectory
from bot.jobs.progress import ProgressReporter
from bot.jobs.records import changed_or_reloaded, fail_job, reload_job
from bot.log import register_secret
from bot.modelslab.client import Answer, ErrorKind, Failure, Finished, ModelsLabClient, Pending
from bot.storage.ports import JobRepository
from bot.web.metrics import Metrics

log = logging.getLogger(__name__)


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


class Wakeups:
    """One "look now" signal per job being driven: set by a webhook, waited for by the job's driver. It also knows
    which jobs have a driver here waiting for ModelsLab's result under a known id: a webhook for one of those needs
    no database read to be taken."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: set[str] = set()

    @contextlib.contextmanager
    def waiting(self, job_id: str) -> Iterator[None]:
        self._waiting.add(job_id)
        try:
            yield
        finally:
            self._waiting.discard(job_id)

    def is_waiting(self, job_id: str) -> bool:
        return job_id in self._waiting

    def event(self, job_id: str) -> asyncio.Event:
        event = self._events.get(job_id)
        if event is None:
            event = self._events[job_id] = asyncio.Event()
        return event

    def set(self, job_id: str) -> None:
        self.event(job_id).set()

    def forget(self, job_id: str) -> None:
        self._events.pop(job_id, None)


class SentKeys:
    """The key each job being driven was sent with, in memory for its driver's fetches.

    The row keeps it too, sealed, for a bot that restarts while the job is at ModelsLab; unsealing it again
    for every fetch would cost a database read and a decryption each time.
    """

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    def remember(self, job_id: str, api_key: str) -> None:
        self._keys[job_id] = api_key

    def get(self, job_id: str) -> str | None:
        return self._keys.get(job_id)

    def forget(self, job_id: str) -> None:
        self._keys.pop(job_id, None)


class AnswerRecorder:
    """Writes down what ModelsLab answered about a job: finished, still working (with an ETA), or failed."""

    def __init__(
        self,
        *,
        store: JobRepository,
        progress: ProgressReporter,
        metrics: Metrics,
        webhook_base: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._progress = progress
        self._metrics = metrics
        self._webhook_base = webhook_base
        self._clock = clock

    async def record(self, before: Job, answer: Answer, *, submitting: bool) -> Job:
        """Record what ModelsLab answered about `before` (the job as its driver last knew it). Only the first
        finishing answer for a job is taken. Returns the job as it now is."""
        job_id = before.id
        if isinstance(answer, Finished):
            meta = answer.meta or before.meta
            seed = answer.seed if answer.seed is not None else _as_seed(before.meta)
            finished = await self._store.finish_success(
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
            )
            if finished is not None:
                log.info("Job %s finished at ModelsLab with %d image(s)", job_id, len(answer.output_urls))
            return await changed_or_reloaded(self._store, job_id, finished)
        if isinstance(answer, Pending):
            eta_at = self._clock() + answer.eta if answer.eta is not None else before.eta_at
            changed = await self._store.mark_processing(
                job_id,
                modelslab_id=answer.request_id if before.modelslab_id is None else None,
                eta_at=eta_at,
                fetch_url=answer.fetch_url,
                meta=answer.meta if submitting else {},
            )
            if changed is None:
                return await reload_job(self._store, job_id)
            if submitting:
                await self._progress.show(changed)
            else:
                await self._progress.show_new_eta(changed, previous_eta_at=before.eta_at)
            return changed
        if not submitting:
            self._metrics.modelslab_errors.inc(answer.kind.value)
        if submitting and answer.maybe_received:
            if self._webhook_base:
                # ModelsLab may have queued it: its webhook will say (the job keeps its slot meanwhile).
                log.warning("Job %s: the submit call got no answer (%s); waiting for a webhook", job_id, answer.detail)
                return before
            log.warning("Job %s: the submit call got no answer (%s); not sent again", job_id, answer.detail)
            return await fail_job(self._store, job_id, ErrorKind.LOST, f"no answer ({answer.detail})")
        failed = await self._store.finish_failure(
            job_id, kind=answer.kind, detail=answer.detail, retry_after=answer.retry_after
        )
        if failed is not None:
            log.info("Job %s failed: %s (%s)", job_id, answer.kind, answer.detail)
        return await changed_or_reloaded(self._store, job_id, failed)


class ResultWaiter:
    """Waits for a job at ModelsLab to finish: a fetch at about its ETA, then backing off, or at once when woken."""

    def __init__(
        self,
        *,
        store: JobRepository,
        client: ModelsLabClient,
        guilds: GuildDirectory,
        keybox: KeyBox,
        answers: AnswerRecorder,
        wakeups: Wakeups,
        sent_keys: SentKeys,
        metrics: Metrics,
        timeout: float,
        webhook_base: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._client = client
        self._guilds = guilds
        self._keybox = keybox
        self._answers = answers
        self._wakeups = wakeups
        self._sent_keys = sent_keys
        self._metrics = metrics
        self._timeout = timeout
        self._webhook_base = webhook_base
        self._clock = clock

    async def wait_until_finished(self, job: Job) -> Job:
        """Fetch at about the ETA, then backing off, until finished or the deadline (with one last look at it)."""
        eta = job.eta_at - self._clock() if job.eta_at is not None else None
        delays = poll_delays(eta)
        event = self._wakeups.event(job.id)
        while True:
            if job.modelslab_id is None and not self._webhook_base:
                # Queued without an id, and no webhook can ever name it: nothing to wait for.
                return await fail_job(self._store, job.id, ErrorKind.GENERATION_FAILED, "ModelsLab gave no request id")
            remaining = job.deadline_at - self._clock()
            if remaining > 0 and not event.is_set():
                waiting = self._wakeups.waiting(job.id) if job.modelslab_id is not None else contextlib.nullcontext()
                with waiting, contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(next(delays), remaining)):  # no task of its own, as `wait_for` makes
                        await event.wait()
            event.clear()
            if job.modelslab_id is None:
                # Only a webhook changes a job at ModelsLab meanwhile, and only to name its id: read it again.
                job = await reload_job(self._store, job.id)
                if job.status is not JobStatus.PROCESSING:
                    return job
            if job.modelslab_id is not None:
                job = await self._fetch_once(job)
                if job.status is not JobStatus.PROCESSING:
                    return job
            if self._clock() >= job.deadline_at:
                log.warning("Job %s timed out after %.0f s", job.id, self._timeout)
                return await fail_job(self._store, job.id, ErrorKind.TIMED_OUT, "no result before the deadline")

    async def _fetch_once(self, job: Job) -> Job:
        assert job.modelslab_id is not None
        api_key = await self._key_sent_with(job)
        if api_key is None:
            return await fail_job(self._store, job.id, ErrorKind.NO_KEY, "no API key configured")
        answer = await self._client.fetch(api_key, job.modelslab_id, job.fetch_url)
        if isinstance(answer, Failure) and answer.transient:
            self._metrics.modelslab_errors.inc(answer.kind.value)
            log.info("Job %s: fetch failed for now (%s: %s); will retry", job.id, answer.kind, answer.detail)
            return job
        return await self._answers.record(job, answer, submitting=False)

    async def _key_sent_with(self, job: Job) -> str | None:
        """The key the job was submitted with (the server's key may have changed since); else the current one.

        Its driver keeps it in memory (`SentKeys`); a driver that did not send the job (after a restart) unseals
        it from the row, once."""
        api_key = self._sent_keys.get(job.id)
        if api_key is not None:
            return api_key
        sealed = await self._store.sealed_key(job.id)
        if sealed is not None:
            try:
                api_key = self._keybox.open_for_job(job.id, sealed)
            except KeyUnreadable:
                log.warning("Job %s: its key cannot be decrypted (was SECRET_KEY changed?)", job.id)
            else:
                register_secret(api_key)
                self._sent_keys.remember(job.id, api_key)
                return api_key
        return await self._guilds.api_key_for(job.guild_id)


class WebhookIntake:
    """What ModelsLab's callbacks reach, through the receiver: a job to look at now, and the input image."""

    def __init__(self, *, store: JobRepository, wake: Callable[[Job], Awaitable[None]], wakeups: Wakeups) -> None:
        self._store = store
        self._wake = wake
        self._wakeups = wakeups

    async def input_image(self, job_id: str) -> bytes | None:
        """The input image ModelsLab fetches, only while the job is at ModelsLab."""
        job = await self._store.get(job_id)
        if job is None or job.status not in (JobStatus.SUBMITTING, JobStatus.PROCESSING):
            return None
        return await self._store.input_image(job_id)

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> bool:
        """A callback for this job arrived (already authenticated): learn its id if needed, then look now. Returns
        whether the job exists (one read says both; none when its driver here waits for it under a known id).

        The only thing taken from the body is ModelsLab's request id, and only while the job has none (its
        submit answer was lost); the outcome itself always comes from a fetch.
        """
        if self._wakeups.is_waiting(job_id):
            log.info("Job %s: webhook received (%s)", job_id, str(payload.get("status", ""))[:20])
            self._wakeups.set(job_id)
            return True
        job = await self._store.get(job_id)
        if job is None:
            return False
        if job.status.finished:
            return True  # a repeat delivery, or one for a job already settled
        modelslab_id = payload.get("id")
        if job.modelslab_id is None and isinstance(modelslab_id, str | int) and not isinstance(modelslab_id, bool):
            text = str(modelslab_id).strip()
            if text:
                await self._store.adopt_modelslab_id(job_id, text)
        log.info("Job %s: webhook received (%s)", job_id, str(payload.get("status", ""))[:20])
        await self._wake(job)
        return True


def _as_seed(meta: Mapping[str, Any]) -> int | None:
    value = meta.get("seed")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return None
