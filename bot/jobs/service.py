"""The life of a generation job, from the stored row to the posted images. Knows nothing of discord.py.

One driver task per job walks it through its states (see `JobStatus`)::

    queued -> submitting -> processing -> succeeded | failed -> posted

Every step is written to SQLite before the next one starts, so a restarted bot picks each job up
where it was (`JobService.resume`). A webhook never finishes a job by itself: it tells the driver
"look now", and the driver confirms with a fetch, so webhooks and polling share one code path and
one outcome. The result is shown by editing the job's own status message, which is idempotent:
a crash between showing and recording it shows the same message again, never a second one.

`JobService` creates jobs, owns their driver tasks and walks each one through its states; the
steps themselves are parts, each in its module of `bot.jobs`:

- `submission`: the turn in the fair queue (`Submitter`), the input image and payload
  (`PayloadBuilder`), the submit call shielded from shutdown (`Sender`), a lost submit
  answer (`LostSubmissions`);
- `waiting`: fetching at the ETA (`ResultWaiter`), webhooks (`WebhookIntake`, `Wakeups`), and
  ModelsLab's answers written down (`AnswerRecorder`);
- `posting`: the outcome shown to the member (`ResultPoster`);
- `progress`: the status message's place in line and ETA (`ProgressReporter`);
- `housekeeping`: old members' pictures and expired tokens deleted on a timer (`Housekeeping`);
- `ports`: what the domain needs from outside (Discord, the servers, the queue).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.guilds.keybox import KeyBox
from bot.guilds.rules import Limits, Refused, explain_refusal
from bot.images.downloader import ImageDownloader
from bot.jobs.fair_queue import FairQueue
from bot.jobs.housekeeping import Housekeeping
from bot.jobs.leases import LeaseKeeper
from bot.jobs.model import Job, JobStatus
from bot.jobs.ports import GuildDirectory, JobPresenter, JobQueue
from bot.jobs.posting import DISCORD_RETRY_DELAYS, ResultPoster
from bot.jobs.progress import ProgressReporter
from bot.jobs.records import reload_job
from bot.jobs.shared_queue import SharedQueue
from bot.jobs.submission import RETRY_BASE_DELAY, LostSubmissions, PayloadBuilder, Sender, Submitter
from bot.jobs.waiting import AnswerRecorder, ResultWaiter, SentKeys, Wakeups, WebhookIntake
from bot.modelslab.client import ApiFlavour, ErrorKind, ModelsLabClient
from bot.requests.generation import GenerationRequest
from bot.storage.events import Events, LocalEvents
from bot.storage.ports import JobRepository, LeaseRepository, QueueRepository
from bot.web.metrics import Metrics
from bot.web.signing import WebhookSigner

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0  # seconds an in-flight submit call may take to finish when the bot stops
IN_HAND_MOST = 60.0  # seconds: an acknowledgement takes at most Discord's 3 s and its patience (bot.discord.intake)


@dataclass(frozen=True)
class JobPolicy:
    flavour: ApiFlavour
    timeout: float
    webhook_base: str | None  # PUBLIC_URL, or None for polling only
    max_queued: int = 5  # MODELSLAB_MAX_QUEUED: jobs of one key at ModelsLab at once
    shared: bool = False  # several processes on one database (PostgreSQL): leases, the line in the database
    lease_seconds: float = 30.0  # LEASE_SECONDS
    worker_id: str = "local"  # WORKER_ID: this process, as the jobs' owner


class JobService:
    """Creates jobs and drives each one to a posted outcome, exactly once."""

    def __init__(
        self,
        *,
        store: JobRepository,
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
        leases: LeaseRepository | None = None,
        line: QueueRepository | None = None,
        events: Events | None = None,
    ) -> None:
        self._store = store
        self._events = events or LocalEvents()
        self._leases = leases
        self._settings = settings
        self._guilds = guilds
        self.metrics = metrics = metrics or Metrics()
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Stored, their command not yet acknowledged (no driver yet, on purpose): job id -> when (monotonic).
        self._in_hand: dict[str, float] = {}
        self._closing = False
        self.draining = False

        # The parts, in the order a job meets them; each gets what it uses, and nothing else.
        self._queue: JobQueue
        if settings.shared and line is not None:
            self._queue = SharedQueue(line, settings.max_queued, self._events, on_change=self._line_changed)
        else:
            self._queue = FairQueue(settings.max_queued, on_change=self._line_changed)
        metrics.queue_depths = self._queue.depths
        self._progress = ProgressReporter(queue=self._queue)
        self._wakeups = Wakeups()
        self._sent_keys = SentKeys()
        steps = _wire_steps(
            store=store,
            client=client,
            downloader=downloader,
            signer=signer,
            settings=settings,
            guilds=guilds,
            keybox=keybox,
            metrics=metrics,
            clock=clock,
            submit_retry_delay=submit_retry_delay,
            line=line,
            queue=self._queue,
            progress=self._progress,
            wakeups=self._wakeups,
            sent_keys=self._sent_keys,
        )
        self._sender, self._submitter, self._lost_submissions, self._waiter = steps
        self._webhooks = WebhookIntake(store=store, wake=self._webhook_arrived, wakeups=self._wakeups)
        self._keeper = (
            LeaseKeeper(
                leases,
                self._events,
                shared=settings.shared,
                lease_seconds=settings.lease_seconds,
                adopt=self._adopt,
                lose=self._lose,
                driving=lambda: set(self._tasks),
                revive=self._revive,
                in_hand=self._stored_unacknowledged,
            )
            if leases is not None
            else None
        )
        self._events.subscribe("job", self._heard_of_job)
        self._events.subscribe("cancelled", self._heard_of_cancel)
        self._poster = ResultPoster(
            store=store,
            guilds=guilds,
            downloader=downloader,
            metrics=metrics,
            clock=clock,
            discord_retry_delays=discord_retry_delays,
        )
        self.housekeeping = Housekeeping(store=store, clock=clock)

    @property
    def timeout(self) -> float:
        return self._settings.timeout

    async def get(self, job_id: str) -> Job | None:
        return await self._store.get(job_id)

    async def picture_kept(self, job: Job) -> bool:
        """Whether a job that works from a member's picture can still be made again: the picture is stored, or its
        link is (/history forget deletes both)."""
        return bool(job.request.source_url) or await self._store.has_input(job.id)

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
        source_flagged: bool = False,
        picture_owner_id: int | None = None,
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
            source_flagged=source_flagged,
            picture_owner_id=picture_owner_id,
        )
        # In hand from before its row exists: no lease beat may take it for a job whose driver stopped. If storing
        # fails half-way, the entry ages out and the job is carried on as after a restart.
        self._in_hand[job.id] = time.monotonic()
        if limits is None:
            await self._store.insert(job)
        elif not await self._store.insert_within_limits(job, limits):
            del self._in_hand[job.id]
            usage = await self._store.usage(guild_id, user_id, now)
            log.info("Request of member %s in server %s refused by the server's limits", user_id, guild_id)
            raise Refused(explain_refusal(limits, usage, request.samples, now))
        if input_from_job is not None:
            await self._store.copy_input(input_from_job, job.id)
        log.info("Job %s stored (%s, %d image(s), model %s)", job.id, kind, request.samples, request.model_id)
        return job

    async def status_message_shown(self, job: Job, message_id: int | None) -> None:
        """The member saw the status message of `job` (as `create` returned it): start the job from it, without
        reading it again. Its driver records the message (`Submitter.queue_and_submit` says when); if no driver
        starts here (the bot is stopping), it is recorded now, for the process that takes the job over."""
        self._in_hand.pop(job.id, None)
        if message_id is None:
            self.start(job.id)
            return
        shown = dataclasses.replace(job, message_id=message_id, owner=self._settings.worker_id)
        if not self.start(job.id, shown, message_unsaved=True):
            await self._store.set_message(job.id, message_id)

    async def abandon(self, job_id: str, reason: str) -> None:
        """The command could not be acknowledged: the job is dropped unsent, and a notice goes to the channel."""
        log.warning("Job %s dropped before submission: %s", job_id, reason)
        try:
            if await self._store.finish_failure(job_id, kind=ErrorKind.UNANSWERED, detail=reason):
                # The interaction was never answered, so its token cannot reach a message: post through the channel.
                await self._store.forget_interaction(job_id)
                self.start(job_id)
        finally:
            self._in_hand.pop(job_id, None)  # driven now to show the notice, or left as after a restart

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
            if job.owner == self._settings.worker_id:
                self.start(job_id)  # no driver waiting in line (e.g. between two tries): one will post the outcome
            else:
                await self._events.publish("cancelled", job_id)  # its own process takes it out of its line
        return "Cancelled: it will not be sent, and it does not count against the quota."

    # ------------------------------------------------------------------------------------------ running

    def start(self, job_id: str, job: Job | None = None, *, message_unsaved: bool = False) -> bool:
        """Drive the job, if no driver is at it yet (returns whether this started one); `job`: its row as just read
        or changed, if the caller has it (`message_unsaved`: with a status message the row does not have yet). The
        first fetch waits for ModelsLab's ETA."""
        if self._closing or self.draining or job_id in self._tasks:
            return False
        task = asyncio.create_task(self._drive(job_id, job, message_unsaved), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t, jid=job_id: self._driver_done(jid, t))  # type: ignore[misc]
        return True

    def wake(self, job_id: str) -> None:
        """Something says the job may be done (a webhook): look at it now rather than at the next poll."""
        self._wakeups.set(job_id)
        self.start(job_id)

    async def _webhook_arrived(self, job: Job) -> None:
        """A webhook reached this process: its job's driver looks now, here or in the process that owns it (a
        load balancer sends webhooks to any process; no driver is started here for another process's job)."""
        if job.owner == self._settings.worker_id:
            self.wake(job.id)
        else:
            await self._events.publish("job", job.id)

    def _driver_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._wakeups.forget(job_id)
        self._sent_keys.forget(job_id)
        self._progress.forget(job_id)
        if not task.cancelled() and task.exception() is not None:
            later = " (it is carried on from its stored state at the next lease beat)" if self._keeper else ""
            log.error("Job %s driver stopped on an unexpected error%s", job_id, later, exc_info=task.exception())

    async def resume(self) -> int:
        """After a start-up: carry on every job that is not finished or not yet shown.

        The queue is rebuilt before any driver runs (see `Submitter.restore_line`). Housekeeping starts too.
        """
        self.housekeeping.start()
        jobs = await self._keeper.claim_at_start() if self._keeper is not None else await self._store.needing_work()
        await self._adopt(jobs)
        if jobs:
            log.info("Resuming %d unfinished job(s)", len(jobs))
        return len(jobs)

    async def _adopt(self, jobs: list[Job]) -> None:
        """Carry on jobs this process now owns (at start, or taken over from a process that stopped). A job at
        ModelsLab is looked at once, not at its ETA: while no process drove it, its webhook may have gone nowhere
        (refused by a stopped bot, or told to a process that was gone, or to this one before its driver started)."""
        await self._submitter.restore_line(jobs)
        for job in jobs:
            if job.status is JobStatus.PROCESSING:
                self._wakeups.set(job.id)
            self.start(job.id)

    def _stored_unacknowledged(self) -> set[str]:
        """The jobs whose command is being acknowledged: a driver starts once the member saw the status message.
        One held longer than an acknowledgement can take (its intake stopped on an error) is no longer counted."""
        too_old = time.monotonic() - IN_HAND_MOST
        for job_id in [job_id for job_id, stored in self._in_hand.items() if stored < too_old]:
            del self._in_hand[job_id]
        return set(self._in_hand)

    async def _revive(self, job_ids: list[str]) -> None:
        """Jobs this process owns that no driver drives here (`LeaseKeeper` says which, and when): carried on as a
        start carries them on, from the state their row is in."""
        jobs = []
        for job_id in job_ids:
            job = await self._store.get(job_id)
            if job is None or job.posted_at is not None or job.owner != self._settings.worker_id:
                continue  # shown meanwhile, or no longer this process's
            if job_id not in self._tasks:
                jobs.append(job)
        if jobs:
            log.warning(
                "Carrying on %d job(s) whose driver had stopped on an error: %s",
                len(jobs),
                ", ".join(job.id for job in jobs),
            )
            await self._adopt(jobs)

    def _lose(self, job_id: str) -> None:
        """Another process may drive this job now: stop driving it here (its state stays in the database)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()

    def _heard_of_job(self, job_id: str) -> None:
        """Another process says this process's job may be done (a webhook reached it): look now."""
        if job_id in self._tasks:
            self._wakeups.set(job_id)

    def _heard_of_cancel(self, job_id: str) -> None:
        if job_id in self._tasks and not self._queue.cancel(job_id):
            self._wakeups.set(job_id)

    async def hand_over(self) -> None:
        """After `close()` at a graceful stop: this process's jobs go to the others at once (several processes)."""
        if self._keeper is not None:
            await self._keeper.hand_over()

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
        if self._keeper is not None:
            await self._keeper.stop()
        self._progress.close()
        await self.housekeeping.stop()
        drivers = list(self._tasks.values())
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, self._progress.wait_closed(), return_exceptions=True)
        if isinstance(self._queue, SharedQueue):
            await self._queue.close()
        await self._sender.wait_in_flight(grace=grace)

    async def _drive(self, job_id: str, known: Job | None, message_unsaved: bool = False) -> None:
        job = known if known is not None else await self._store.get(job_id)
        if job is None:
            return
        if job.owner != self._settings.worker_id:
            # Another process drives it (a webhook or a button reached this one): tell that process instead.
            await self._events.publish("job", job_id)
            return
        try:
            if job.status is JobStatus.QUEUED and job.message_id is None:
                job = await self._confirm_status_message(job)
            if job.status is JobStatus.QUEUED:
                job = await self._submitter.queue_and_submit(job, message_unsaved=message_unsaved)
            if job.status is JobStatus.SUBMITTING:
                job = await self._lost_submissions.recover(job)
            if job.status is JobStatus.PROCESSING:
                job = await self._waiter.wait_until_finished(job)
        finally:
            # Finished (or failed, or this process stops): the job no longer counts at ModelsLab.
            self._queue.release(job_id)
        if job.needs_posting:
            await self._poster.post(job)

    async def _confirm_status_message(self, job: Job) -> Job:
        """Stored, then the bot stopped before it knew whether the member saw the status message: ask Discord."""
        found = await self._poster.find_status_message(job)
        if found is None:
            await self.abandon(job.id, "the status message was never shown")
            return await reload_job(self._store, job.id)
        return await self._store.set_message(job.id, found) or await reload_job(self._store, job.id)

    # ------------------------------------------------------------------------------------------ webhooks

    async def input_image(self, job_id: str) -> bytes | None:
        """The input image ModelsLab fetches, only while the job is at ModelsLab."""
        return await self._webhooks.input_image(job_id)

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> bool:
        """A callback for this job arrived (already authenticated): see `WebhookIntake.on_webhook`. False if there
        is no such job."""
        return await self._webhooks.on_webhook(job_id, payload)

    def _line_changed(self, key: str) -> None:
        """The queue says a key's line changed: the places shown in its status messages may be stale."""
        self._progress.line_changed(key)


def _wire_steps(
    *,
    store: JobRepository,
    client: ModelsLabClient,
    downloader: ImageDownloader,
    signer: WebhookSigner,
    settings: JobPolicy,
    guilds: GuildDirectory,
    keybox: KeyBox,
    metrics: Metrics,
    clock: Callable[[], float],
    submit_retry_delay: float,
    line: QueueRepository | None,
    queue: JobQueue,
    progress: ProgressReporter,
    wakeups: Wakeups,
    sent_keys: SentKeys,
) -> tuple[Sender, Submitter, LostSubmissions, ResultWaiter]:
    """The steps a job goes through on its way to ModelsLab and back, in that order; each gets what it uses."""
    webhook_base = settings.webhook_base
    answers = AnswerRecorder(store=store, progress=progress, metrics=metrics, webhook_base=webhook_base, clock=clock)
    payloads = PayloadBuilder(
        store=store, downloader=downloader, signer=signer, flavour=settings.flavour, webhook_base=webhook_base
    )
    sender = Sender(
        store=store,
        client=client,
        keybox=keybox,
        payloads=payloads,
        answers=answers,
        sent_keys=sent_keys,
        metrics=metrics,
        timeout=settings.timeout,
        clock=clock,
        line=line if settings.shared else None,
    )
    submitter = Submitter(
        store=store,
        queue=queue,
        guilds=guilds,
        progress=progress,
        payloads=payloads,
        sender=sender,
        clock=clock,
        retry_delay=submit_retry_delay,
    )
    lost_submissions = LostSubmissions(store=store, wakeups=wakeups, webhook_base=webhook_base, clock=clock)
    waiter = ResultWaiter(
        store=store,
        client=client,
        guilds=guilds,
        keybox=keybox,
        answers=answers,
        wakeups=wakeups,
        sent_keys=sent_keys,
        metrics=metrics,
        timeout=settings.timeout,
        webhook_base=webhook_base,
        clock=clock,
    )
    return sender, submitter, lost_submissions, waiter
