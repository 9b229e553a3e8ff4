"""Posting a finished job: its images downloaded and shown, or its failure explained, exactly once.

The outcome is shown by editing the job's own status message, which is idempotent: a crash between
showing and recording it shows the same message again, never a second one. Discord may be down for
a while; posting waits for it, ever more patiently, rather than losing a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bot.images.downloader import DownloadFailed, ImageDownloader
from bot.images.processing import ImageFile, fit_to_limit, fits
from bot.jobs.model import Job, JobStatus
from bot.jobs.ports import GuildDirectory, JobPresenter, PresentationDeferred, PresentationRefused
from bot.jobs.records import fail_job
from bot.modelslab.client import ErrorKind
from bot.storage.ports import JobRepository
from bot.web.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
# Waits between tries when Discord is unavailable; the last one repeats for as long as it takes.
DISCORD_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class ResultPoster:
    """Shows each finished job's outcome in its status message (and the gallery), then records it as posted."""

    def __init__(
        self,
        *,
        store: JobRepository,
        guilds: GuildDirectory,
        downloader: ImageDownloader,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        discord_retry_delays: tuple[float, ...] = DISCORD_RETRY_DELAYS,
    ) -> None:
        self._store = store
        self._guilds = guilds
        self._downloader = downloader
        self._metrics = metrics
        self._clock = clock
        self._discord_retry_delays = discord_retry_delays
        self._presenter: JobPresenter | None = None
        self._posting: set[str] = set()
        self._posting_done = asyncio.Event()
        self._posted: dict[str, asyncio.Event] = {}

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._presenter = presenter

    async def post(self, job: Job) -> None:
        """Show the finished job's outcome to the member, and record that it was shown."""
        self._posting.add(job.id)
        try:
            await self._post_outcome(job)
        finally:
            self._posting.discard(job.id)
            self._posting_done.set()

    async def find_status_message(self, job: Job) -> int | None:
        """The id of the job's status message (None if there is none), asking Discord until it can say."""
        presenter = self._presenter_or_fail()
        return await self._keep_trying(job, "status message lookup", lambda: presenter.find_status_message(job))

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

    async def finish_posting(self, *, grace: float) -> None:
        """Before a shutdown: let the results being posted finish (within `grace`); the rest wait for the next start."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._posting:
                    self._posting_done.clear()
                    await self._posting_done.wait()
        if self._posting:
            log.warning(
                "Stopping with %d result(s) still being posted: they are posted at the next start", len(self._posting)
            )

    async def _post_outcome(self, job: Job) -> None:
        presenter = self._presenter_or_fail()
        if job.status is JobStatus.SUCCEEDED:
            images = await self._download_images(job)
            if not images:
                job = await fail_job(
                    self._store, job.id, ErrorKind.DOWNLOAD_FAILED, "no image could be downloaded", from_succeeded=True
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
        self._metrics.jobs.inc(job.kind, job.error_kind or "failed")
        log.info("Job %s failure shown (%s)", job.id, job.error_kind)

    async def _show_result(self, job: Job, images: list[ImageFile]) -> None:
        presenter = self._presenter_or_fail()
        config = await self._guilds.config(job.guild_id) if job.guild_id is not None else None
        # Outside age-restricted channels the safety checker was on; what it still flags, and what is made from a
        # flagged image, follows the server policy.
        flagged = job.flagged
        withheld = flagged and config is not None and config.nsfw_policy == "withhold"
        limit = job.attachment_size_limit or DEFAULT_ATTACHMENT_LIMIT
        if not fits(images, limit):  # re-encoding is Pillow work: a thread; most results fit as they are
            images = await asyncio.to_thread(fit_to_limit, images, limit)
        shown = [] if withheld else images
        try:
            message_id = await self._keep_trying(
                job, "result", lambda: presenter.show_result(job, shown, spoiler=flagged, withheld=withheld)
            )
        except PresentationRefused as exc:
            log.warning("Job %s: Discord refused the result (%s)", job.id, exc)
            job = await fail_job(self._store, job.id, ErrorKind.DELIVERY_REFUSED, str(exc), from_succeeded=True)
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
        self._metrics.jobs.inc(job.kind, "succeeded")
        if job.finished_at is not None:
            self._metrics.ready_to_posted.observe(max(self._clock() - job.finished_at, 0.0))
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
        """Every image that can be had; the ones that cannot are left out (still counted: ModelsLab billed them)."""
        candidates = []
        for index, url in enumerate(job.output_urls[: job.request.samples]):
            urls = [url]
            if index < len(job.proxy_urls) and job.proxy_urls[index] != url:
                urls.append(job.proxy_urls[index])
            candidates.append(urls)
        results: list[ImageFile | BaseException]
        if len(candidates) == 1:  # most jobs: awaited here, without a task of its own
            try:
                results = [await self._downloader.download(candidates[0])]
            except DownloadFailed as exc:
                results = [exc]
        else:
            results = await asyncio.gather(
                *(self._downloader.download(urls) for urls in candidates), return_exceptions=True
            )
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

        `PresentationRefused` (Discord said no for good) is not retried; after `PresentationDeferred` (a rate
        limit, a ban, a timeout: "not now") the wait is at least what Discord asked for.
        """
        delays = itertools.chain(self._discord_retry_delays, itertools.repeat(self._discord_retry_delays[-1]))
        for attempt in itertools.count(1):
            try:
                return await call()
            except (asyncio.CancelledError, PresentationRefused):
                raise
            except Exception as exc:
                delay = next(delays)
                if isinstance(exc, PresentationDeferred) and exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                log.warning("Job %s: the %s failed (try %d: %s); again in %.0f s", job.id, what, attempt, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _announce_posted(self, job_id: str) -> None:
        event = self._posted.get(job_id)
        if event is not None:
            event.set()

    def _presenter_or_fail(self) -> JobPresenter:
        if self._presenter is None:
            raise RuntimeError("no presenter attached")
        return self._presenter
