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
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bot.downloads import DownloadFailed, ImageDownloader
from bot.generation import GenerationRequest
from bot.guild_rules import GuildConfig, Limits, Refused, explain_refusal
from bot.imaging import ImageFile, fit_to_limit
from bot.modelslab import Answer, ApiFlavour, ErrorKind, Failure, Finished, ModelsLabClient, Pending
from bot.signing import WebhookSigner
from bot.storage import Job, JobStatus, JobStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
# Waits between tries when Discord is unavailable; the last one repeats for as long as it takes.
DISCORD_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
ETA_CHANGE_WORTH_SHOWING = 5.0  # seconds
SHUTDOWN_GRACE = 30.0  # seconds an in-flight submit call may take to finish when the bot stops


class PresentationRefused(Exception):
    """Discord refused the message for good (a 4xx other than 429): retrying the same thing cannot help."""


class JobPresenter(Protocol):
    """Shows a job to the members: implemented for Discord in `bot.delivery`."""

    async def show_progress(self, job: Job) -> None: ...

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
class JobSettings:
    flavour: ApiFlavour
    timeout: float
    webhook_base: str | None  # PUBLIC_URL, or None for polling only


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
        clock: Callable[[], float] = time.time,
        discord_retry_delays: tuple[float, ...] = DISCORD_RETRY_DELAYS,
    ) -> None:
        self._store = store
        self._client = client
        self._downloader = downloader
        self._signer = signer
        self._settings = settings
        self._guilds = guilds
        self._clock = clock
        self._discord_retry_delays = discord_retry_delays
        self._presenter: JobPresenter | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight: set[asyncio.Task[Job]] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._posted: dict[str, asyncio.Event] = {}
        self._closing = False

    @property
    def timeout(self) -> float:
        return self._settings.timeout

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
        )
        if limits is None:
            await self._store.insert(job)
        elif not await self._store.insert_within_limits(job, limits):
            usage = await self._store.usage(guild_id, user_id, now)
            log.info("Request of member %s in server %s refused by the server's limits", user_id, guild_id)
            raise Refused(explain_refusal(limits, usage, request.samples, now))
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

    async def close(self, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop every driver. A submit call under way is let finish (within `grace`) and its answer recorded:
        cut off, its job could be paid at ModelsLab and yet reported lost."""
        self._closing = True
        tasks = list(self._tasks.values())
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

    async def _fail(self, job_id: str, kind: ErrorKind, detail: str, **extra: Any) -> Job:
        await self._store.finish_failure(job_id, kind=kind, detail=detail, **extra)
        return await self._reload(job_id)

    # ------------------------------------------------------------------------------------------ submitting

    async def _submit(self, job: Job) -> Job:
        if job.message_id is None:
            # Stored, then the bot stopped before it knew whether the member saw the status message.
            presenter = self._presenter_or_fail()
            found = await self._keep_trying(job, "status message lookup", lambda: presenter.find_status_message(job))
            if found is None:
                await self.abandon(job.id, "the status message was never shown")
                return await self._reload(job.id)
            await self._store.set_message(job.id, found)

        if self._clock() >= job.deadline_at:
            return await self._fail(job.id, ErrorKind.EXPIRED, "deadline passed before submission")
        api_key = await self.api_key_for(job.guild_id)
        if api_key is None:
            return await self._fail(job.id, ErrorKind.NO_KEY, "no API key configured")
        if not await self._store.mark_submitting(job.id):
            return await self._reload(job.id)

        payload: dict[str, Any] = {**job.request.to_payload(), "track_id": job.id}
        if self._settings.webhook_base:
            payload["webhook"] = self._signer.webhook_url(self._settings.webhook_base, job.id)
        log.info("Job %s submitting to ModelsLab (%s)", job.id, job.kind)

        async def send() -> Job:
            answer = await self._client.submit("text2img" if job.kind == "text2img" else "img2img", api_key, payload)
            return await self._apply(job.id, answer, submitting=True)

        # Shielded: a shutdown must not cut the call off between ModelsLab taking the job and us recording it.
        call = asyncio.create_task(send(), name=f"submit-{job.id}")
        self._in_flight.add(call)
        call.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(call)

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
        api_key = await self.api_key_for(job.guild_id)
        if api_key is None:
            return await self._fail(job.id, ErrorKind.NO_KEY, "no API key configured")
        answer = await self._client.fetch(api_key, job.modelslab_id, job.fetch_url)
        if isinstance(answer, Failure) and answer.transient:
            log.info("Job %s: fetch failed for now (%s: %s); will retry", job.id, answer.kind, answer.detail)
            return job
        return await self._apply(job.id, answer, submitting=False)

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
                charged_images=len(answer.output_urls),
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
        if submitting and answer.http_status is None and self._settings.webhook_base:
            # No answer at all (timeout, reset): ModelsLab may have queued it. Its webhook will say.
            log.warning("Job %s: the submit call got no answer (%s); waiting for a webhook", job_id, answer.detail)
            return before
        if await self._store.finish_failure(
            job_id, kind=answer.kind, detail=answer.detail, retry_after=answer.retry_after
        ):
            log.info("Job %s failed: %s (%s)", job_id, answer.kind, answer.detail)
        return await self._reload(job_id)

    # ------------------------------------------------------------------------------------------ webhooks

    async def job_exists(self, job_id: str) -> bool:
        return await self._store.get(job_id) is not None

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
            await self._post(job)
            return
        gallery = config.gallery_channel_id if config is not None else None
        if gallery is not None and gallery != job.channel_id and not flagged and job.gallery_message_id is None:
            await self._post_to_gallery(job, images, gallery)
        await self._store.mark_posted(
            job.id, image_count=len(images), charged_images=len(images), message_id=message_id
        )
        self._announce_posted(job.id)
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
        for index, url in enumerate(job.output_urls):
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

    async def _show_progress(self, job: Job) -> None:
        if self._presenter is None:
            return
        try:
            await self._presenter.show_progress(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress is a courtesy: never let it stop the job
            log.warning("Job %s: status update failed (%s)", job.id, exc)


def _eta_moved(before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return before != after
    return abs(after - before) >= ETA_CHANGE_WORTH_SHOWING


def _as_seed(meta: Mapping[str, Any]) -> int | None:
    value = meta.get("seed")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
