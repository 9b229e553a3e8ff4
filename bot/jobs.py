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
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from bot.downloads import DownloadFailed, ImageDownloader
from bot.generation import GenerationRequest
from bot.imaging import ImageFile, fit_to_limit
from bot.modelslab import Answer, ApiFlavour, ErrorKind, Failure, Finished, ModelsLabClient, Pending
from bot.signing import WebhookSigner
from bot.storage import Job, JobStatus, JobStore

log = logging.getLogger(__name__)

DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
POST_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class PresentationRefused(Exception):
    """Discord refused the message for good (a 4xx other than 429): retrying the same thing cannot help."""


class JobPresenter(Protocol):
    """Shows a job to the members: implemented for Discord in `bot.delivery`."""

    async def show_progress(self, job: Job) -> None: ...

    async def show_result(self, job: Job, images: list[ImageFile]) -> int | None:
        """Show the images; return the id of the message that shows them if it is not `job.message_id`."""
        ...

    async def show_failure(self, job: Job) -> int | None: ...

    async def find_status_message(self, job: Job) -> int | None:
        """The id of the job's status message, if the member was ever shown one."""
        ...


@dataclass(frozen=True)
class JobSettings:
    flavour: ApiFlavour
    timeout: float
    webhook_base: str | None  # PUBLIC_URL, or None for polling only
    default_api_key: str | None


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._client = client
        self._downloader = downloader
        self._signer = signer
        self._settings = settings
        self._clock = clock
        self._presenter: JobPresenter | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._posted: dict[str, asyncio.Event] = {}
        self._closing = False

    @property
    def timeout(self) -> float:
        return self._settings.timeout

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._presenter = presenter

    def api_key_for(self, guild_id: int | None) -> str | None:
        """The ModelsLab key that pays for this server's jobs."""
        return self._settings.default_api_key

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
    ) -> Job:
        """Store a new job before anything is sent anywhere."""
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
        )
        await self._store.insert(job)
        log.info("Job %s stored (%s, %d image(s), model %s)", job.id, kind, request.samples, request.model_id)
        return job

    async def status_message_shown(self, job_id: str, message_id: int | None) -> None:
        """The member saw the status message: remember it and start the job."""
        if message_id is not None:
            await self._store.set_message(job_id, message_id)
        self.start(job_id)

    async def abandon(self, job_id: str, reason: str) -> None:
        """The member was never told about this job (the acknowledgement failed): drop it unsent and unshown."""
        if await self._store.finish_failure(job_id, kind=ErrorKind.LOST, detail=reason):
            await self._store.mark_posted(job_id)
            self._announce_posted(job_id)
        log.warning("Job %s abandoned before submission: %s", job_id, reason)

    # ------------------------------------------------------------------------------------------ running

    def start(self, job_id: str) -> None:
        """Drive the job, if no driver is at it yet. The first fetch waits for ModelsLab's ETA."""
        if self._closing or job_id in self._tasks:
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
        if not task.cancelled() and task.exception() is not None:
            log.error("Job %s driver stopped on an unexpected error", job_id, exc_info=task.exception())

    async def resume(self) -> int:
        """After a start-up: carry on every job that is not finished or not yet shown."""
        jobs = await self._store.needing_work()
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

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _event(self, job_id: str) -> asyncio.Event:
        event = self._wake.get(job_id)
        if event is None:
            event = self._wake[job_id] = asyncio.Event()
        return event

    async def _drive(self, job_id: str) -> None:
        job = await self._store.get(job_id)
        if job is None:
            return
        if job.status is JobStatus.QUEUED:
            job = await self._submit(job)
        if job.status is JobStatus.SUBMITTING:
            job = await self._recover_lost_submission(job)
        if job.status is JobStatus.PROCESSING:
            job = await self._poll_until_finished(job)
        if job.needs_posting:
            await self._post(job)

    async def _reload(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        assert job is not None, "jobs are never deleted while being driven"
        return job

    # ------------------------------------------------------------------------------------------ submitting

    async def _submit(self, job: Job) -> Job:
        if job.message_id is None:
            # Stored, then the bot stopped before it knew whether the member saw the status message.
            found = await self._find_status_message(job)
            if found is None:
                await self.abandon(job.id, "the status message was never shown")
                return await self._reload(job.id)
            await self._store.set_message(job.id, found)

        api_key = self.api_key_for(job.guild_id)
        if api_key is None:
            await self._store.finish_failure(job.id, kind=ErrorKind.INVALID_KEY, detail="no API key configured")
            return await self._reload(job.id)
        if not await self._store.mark_submitting(job.id):
            return await self._reload(job.id)

        payload: dict[str, Any] = {**job.request.to_payload(), "track_id": job.id}
        if self._settings.webhook_base:
            payload["webhook"] = self._signer.webhook_url(self._settings.webhook_base, job.id)
        log.info("Job %s submitting to ModelsLab (%s)", job.id, job.kind)
        answer = await self._client.submit("text2img" if job.kind == "text2img" else "img2img", api_key, payload)
        return await self._apply(job.id, answer, submitting=True)

    async def _recover_lost_submission(self, job: Job) -> Job:
        """The bot stopped during the submit call, so whether ModelsLab got the job is unknown.

        Never submit blindly again (it could run and be paid twice). With webhooks, ModelsLab's callback
        names the job's id: wait for it until the deadline. Without, the job is reported lost.
        """
        if self._settings.webhook_base and job.modelslab_id is None:
            log.info("Job %s: submit answer lost in a restart; waiting for its webhook", job.id)
            event = self._event(job.id)
            while job.modelslab_id is None and self._clock() < job.deadline_at:
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=max(job.deadline_at - self._clock(), 0.01))
                job = await self._reload(job.id)
                if job.status is not JobStatus.SUBMITTING:
                    return job
        if job.modelslab_id is None:
            await self._store.finish_failure(job.id, kind=ErrorKind.LOST, detail="submit answer lost in a restart")
            return await self._reload(job.id)
        await self._store.mark_processing(job.id, modelslab_id=job.modelslab_id, eta_at=None, fetch_url=None, meta={})
        return await self._reload(job.id)

    # ------------------------------------------------------------------------------------------ waiting

    async def _poll_until_finished(self, job: Job) -> Job:
        eta = job.eta_at - self._clock() if job.eta_at is not None else None
        delays = poll_delays(eta)
        event = self._event(job.id)
        while True:
            remaining = job.deadline_at - self._clock()
            if remaining <= 0:
                log.warning("Job %s timed out after %.0f s", job.id, self._settings.timeout)
                await self._store.finish_failure(
                    job.id, kind=ErrorKind.TIMED_OUT, detail="no result before the deadline"
                )
                return await self._reload(job.id)
            if not event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=min(next(delays), remaining))
            event.clear()
            job = await self._reload(job.id)
            if job.status is not JobStatus.PROCESSING:
                return job
            if job.modelslab_id is None:
                continue  # only a webhook can tell us which ModelsLab job this is
            api_key = self.api_key_for(job.guild_id)
            if api_key is None:
                await self._store.finish_failure(job.id, kind=ErrorKind.INVALID_KEY, detail="no API key configured")
                return await self._reload(job.id)
            answer = await self._client.fetch(api_key, job.modelslab_id, job.fetch_url)
            if isinstance(answer, Failure) and answer.transient:
                log.info("Job %s: fetch failed for now (%s: %s); will retry", job.id, answer.kind, answer.detail)
                continue
            job = await self._apply(job.id, answer, submitting=False)
            if job.status is not JobStatus.PROCESSING:
                return job

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
                seed=seed,
                generation_time=answer.generation_time,
                charged_images=len(answer.output_urls),
            ):
                log.info("Job %s finished at ModelsLab with %d image(s)", job_id, len(answer.output_urls))
        elif isinstance(answer, Pending):
            eta_at = self._clock() + answer.eta if answer.eta is not None else before.eta_at
            changed = await self._store.mark_processing(
                job_id,
                modelslab_id=answer.request_id if before.modelslab_id is None else None,
                eta_at=eta_at,
                fetch_url=answer.fetch_url,
                meta=answer.meta if submitting else {},
            )
            job = await self._reload(job_id)
            if changed and (submitting or eta_at != before.eta_at):
                await self._show_progress(job)
            return job
        else:
            if submitting and answer.kind is ErrorKind.SERVICE_DOWN and answer.http_status is None:
                # No answer at all: ModelsLab may still have queued it. The job is failed (and not counted)
                # all the same; a webhook that comes later finds it settled and changes nothing.
                log.warning("Job %s: the submit call got no answer (%s)", job_id, answer.detail)
            if await self._store.finish_failure(
                job_id, kind=answer.kind, detail=answer.detail, retry_after=answer.retry_after
            ):
                log.info("Job %s failed: %s (%s)", job_id, answer.kind, answer.detail)
        return await self._reload(job_id)

    # ------------------------------------------------------------------------------------------ webhooks

    async def job_exists(self, job_id: str) -> bool:
        return await self._store.get(job_id) is not None

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """A callback for this job arrived (already authenticated): learn its id if needed, then look now."""
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
        if job.status is JobStatus.SUCCEEDED:
            try:
                images = await self._download_images(job)
            except DownloadFailed as exc:
                log.warning("Job %s: images could not be downloaded (%s)", job.id, exc)
                await self._store.finish_failure(
                    job.id, kind=ErrorKind.DOWNLOAD_FAILED, detail=str(exc), from_succeeded=True
                )
                job = await self._reload(job.id)
            else:
                limit = job.attachment_size_limit or DEFAULT_ATTACHMENT_LIMIT
                images = await asyncio.to_thread(fit_to_limit, images, limit)
                presenter = self._presenter_or_fail()
                try:
                    message_id = await self._with_retries(job, "result", lambda: presenter.show_result(job, images))
                except PresentationRefused as exc:
                    log.warning("Job %s: Discord refused the result (%s)", job.id, exc)
                    await self._store.finish_failure(
                        job.id, kind=ErrorKind.DELIVERY_REFUSED, detail=str(exc), from_succeeded=True
                    )
                    job = await self._reload(job.id)
                else:
                    await self._store.mark_posted(job.id, image_count=len(images), message_id=message_id)
                    self._announce_posted(job.id)
                    log.info("Job %s posted with %d image(s)", job.id, len(images))
                    return
        presenter = self._presenter_or_fail()
        try:
            message_id = await self._with_retries(job, "failure", lambda: presenter.show_failure(job))
        except PresentationRefused as exc:
            log.error("Job %s: Discord refused even the failure message (%s); giving up on showing it", job.id, exc)
            message_id = None
        await self._store.mark_posted(job.id, message_id=message_id)
        self._announce_posted(job.id)
        log.info("Job %s failure shown (%s)", job.id, job.error_kind)

    async def _download_images(self, job: Job) -> list[ImageFile]:
        candidates = []
        for index, url in enumerate(job.output_urls):
            urls = [url]
            if index < len(job.proxy_urls) and job.proxy_urls[index] != url:
                urls.append(job.proxy_urls[index])
            candidates.append(urls)
        if not candidates:
            raise DownloadFailed("no image URL in the answer")
        return list(await asyncio.gather(*(self._downloader.download(urls) for urls in candidates)))

    async def _with_retries(self, job: Job, what: str, show: Callable[[], Any]) -> int | None:
        """Discord can be briefly unavailable: keep trying, then leave the job unposted for the next start."""
        for attempt, delay in enumerate((*POST_RETRY_DELAYS, None)):
            try:
                result: int | None = await show()
                return result
            except (asyncio.CancelledError, PresentationRefused):
                raise
            except Exception as exc:
                if delay is None:
                    log.error(
                        "Job %s: could not show the %s after %d tries; will retry at next start",
                        job.id,
                        what,
                        attempt + 1,
                    )
                    raise
                log.warning("Job %s: showing the %s failed (%s); retrying in %.0f s", job.id, what, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _presenter_or_fail(self) -> JobPresenter:
        if self._presenter is None:
            raise RuntimeError("no presenter attached")
        return self._presenter

    async def _show_progress(self, job: Job) -> None:
        if self._presenter is None:
            return
        try:
            await self._presenter.show_progress(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress is a courtesy: never let it stop the job
            log.warning("Job %s: status update failed (%s)", job.id, exc)

    async def _find_status_message(self, job: Job) -> int | None:
        if self._presenter is None:
            return None
        try:
            return await self._presenter.find_status_message(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("Job %s: could not look up its status message (%s)", job.id, exc)
            return None


def _as_seed(meta: Mapping[str, Any]) -> int | None:
    value = meta.get("seed")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
