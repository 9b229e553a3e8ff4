"""The status edits: what each job's status message shows while the job is on its way.

A waiting job shows its place in line (and a pause when ModelsLab sent its key back), a job at
ModelsLab its ETA. These edits are a courtesy: they are coalesced, skipped when they would show
nothing new, and never stop a job when Discord refuses one. The outcome itself is shown by
`bot.jobs.posting`, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bot.jobs.model import Job, JobStatus, Progress
from bot.jobs.ports import JobPresenter, JobQueue
from bot.storage.ports import JobRepository

log = logging.getLogger(__name__)

ETA_CHANGE_WORTH_SHOWING = 5.0  # seconds
PROGRESS_MIN_INTERVAL = 2.0  # seconds between two edits of one status message (Discord rate limits)


class ProgressReporter:
    """Owns what each job's status message shows before the outcome: the place in line, the ETA."""

    def __init__(self, *, store: JobRepository, queue: JobQueue) -> None:
        self._store = store
        self._queue = queue
        self._presenter: JobPresenter | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last_edit: dict[str, float] = {}  # job -> when its place in line was last shown (monotonic)
        self._shown: dict[str, tuple[int | None, bool]] = {}  # job -> (place, paused) its message shows
        self._edits: set[asyncio.Task[None]] = set()
        self._closed = False

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._presenter = presenter

    def line_changed(self, key: str) -> None:
        """The queue of a key changed: every job waiting in it may have a new place."""
        for job_id in self._queue.waiting_ids(key):
            self.show_place_in_line_soon(job_id)

    def show_place_in_line_soon(self, job_id: str) -> None:
        """Show the job's new place in line soon, coalescing changes: at most one edit per message per interval."""
        if self._closed or job_id in self._timers:
            return
        delay = max(self._last_edit.get(job_id, 0.0) + PROGRESS_MIN_INTERVAL - time.monotonic(), 0.0)

        def fire() -> None:
            self._timers.pop(job_id, None)
            task = asyncio.create_task(self._show_place_in_line(job_id), name=f"progress-{job_id}")
            self._edits.add(task)
            task.add_done_callback(self._edits.discard)

        self._timers[job_id] = asyncio.get_running_loop().call_later(delay, fire)

    async def show_new_eta(self, job: Job, *, previous_eta_at: float | None) -> None:
        """ModelsLab gave the job a new ETA: show it if it moved enough to be worth an edit."""
        if _eta_moved(previous_eta_at, job.eta_at):
            await self.show(job)

    async def show(self, job: Job, progress: Progress | None = None) -> None:
        """Show where the job stands now. Never raises: a failed edit is logged, and the job goes on."""
        if self._presenter is None:
            return
        try:
            await self._presenter.show_progress(job, progress or Progress())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress is a courtesy: never let it stop the job
            log.warning("Job %s: status update failed (%s)", job.id, exc)

    def forget(self, job_id: str) -> None:
        """The job's driver stopped: what its message showed no longer matters."""
        self._shown.pop(job_id, None)
        self._last_edit.pop(job_id, None)

    def close(self) -> None:
        """No more edits: the pending ones are cancelled (`wait_closed` waits for them to stop)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        for task in self._edits:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._edits, return_exceptions=True)

    async def _show_place_in_line(self, job_id: str) -> None:
        place = self._queue.position(job_id)
        shown = (place[0] if place else None, self._queue.paused_for(job_id) > 0)
        if self._shown.get(job_id) == shown:
            return  # the member already sees this: no edit, and no database read
        job = await self._store.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:
            self.forget(job_id)
            return
        self._shown[job_id] = shown
        self._last_edit[job_id] = time.monotonic()
        progress = Progress(
            position=place[0] if place else None,
            waiting=place[1] if place else None,
            retry_in=self._queue.paused_for(job_id),
            cancellable=True,
        )
        await self.show(job, progress)


def _eta_moved(before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return before != after
    return abs(after - before) >= ETA_CHANGE_WORTH_SHOWING
