"""One owner per job, when several processes share one database.

A job is driven only by the process that owns it, until its lease runs out: every state change is conditional on
still owning it (`JobRepository`). `LeaseKeeper` renews this process's leases on a heartbeat, stops driving a job
whose lease was lost (its process was too slow: another may have it now), takes over the jobs of processes that
stopped (claimed with FOR UPDATE SKIP LOCKED, so never twice), and hands its own over when it stops. Jobs taken over
are finished exactly as a restart finishes them: each state says what to do next, and a job whose submit answer was
lost is never sent again blindly.

On SQLite (one process) it claims every unshown job at start, whoever stored it: the process before this one is
gone, and a restart carries on at once.

A job this process owns that nothing here drives (its driver stopped on an error: the database lost in the middle of
a change, a bug) is carried on at the next beat, as a start would carry it on, rather than at the next start: once
at once, then after pauses that double each time the same job needs it (`Revivals`). A job stored whose command is
still being acknowledged has no driver yet on purpose, and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bot.jobs.model import Job
from bot.storage.events import Events
from bot.storage.ports import LeaseRepository

log = logging.getLogger(__name__)

CLAIM_BATCH = 50  # jobs taken over at a time (a claim is one short statement; more follow at the next beat)
AT_START = 1_000_000  # every job a (re)started single process must carry on
REVIVE_PAUSE = 5.0  # seconds before a job is carried on a second time after its driver stopped; doubled each time
REVIVE_PAUSE_MAX = 600.0


class Revivals:
    """When a job whose driver stopped may be carried on again: at once the first time, then after `first`, 2 x
    `first`, ... up to `most` seconds, so that a job that stops its driver every time costs a log line every ten
    minutes, not every beat. Forgets a job once it is no longer among the orphans (shown, or driven again)."""

    def __init__(self, first: float = REVIVE_PAUSE, most: float = REVIVE_PAUSE_MAX) -> None:
        self._first = first
        self._most = most
        self._next: dict[str, tuple[int, float]] = {}  # job id -> (times carried on, not before)

    def due(self, orphans: set[str], now: float) -> list[str]:
        for job_id in self._next.keys() - orphans:
            del self._next[job_id]
        due = []
        for job_id in sorted(orphans):
            times, not_before = self._next.get(job_id, (0, 0.0))
            if now < not_before:
                continue
            self._next[job_id] = (times + 1, now + min(self._first * 2**times, self._most))
            due.append(job_id)
        return due


class LeaseKeeper:
    def __init__(
        self,
        leases: LeaseRepository,
        events: Events,
        *,
        shared: bool,
        lease_seconds: float,
        adopt: Callable[[list[Job]], Awaitable[None]],
        lose: Callable[[str], None],
        driving: Callable[[], set[str]],
        revive: Callable[[list[str]], Awaitable[None]],
        in_hand: Callable[[], set[str]],
    ) -> None:
        self._leases = leases
        self._events = events
        self._shared = shared
        self._beat = max(lease_seconds / 3, 0.5)
        self._adopt = adopt
        self._lose = lose
        self._driving = driving
        self._revive = revive
        self._in_hand = in_hand
        self._revivals = Revivals()
        self._task: asyncio.Task[None] | None = None
        self._claim_now = asyncio.Event()
        events.subscribe("orphans", lambda _detail: self._claim_now.set())

    async def claim_at_start(self) -> list[Job]:
        """The jobs this process carries on as it starts: every unshown one if it is the only process, else those
        nobody drives (its own from before a restart with the same WORKER_ID, and those of stopped processes)."""
        jobs = await self._leases.claim(limit=AT_START, everything=not self._shared, mine=self._shared)
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name="job-leases")
        return jobs

    async def hand_over(self) -> None:
        """A graceful stop: this process's jobs go back at once, and the others are told to take them."""
        await self.stop()
        if self._shared:
            released = await self._leases.release()
            await self._events.publish("orphans")
            if released:
                log.info("Handed %d job(s) over to the other processes", released)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _keep(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claim_now.wait(), timeout=self._beat)
            self._claim_now.clear()
            try:
                await self._beat_once()
            except Exception:
                log.warning("Renewing the jobs' leases failed; trying again at the next beat", exc_info=True)

    async def _beat_once(self) -> None:
        owned = await self._leases.renew()
        # A driver may outlive its job's showing by a moment (no longer renewed then): only a job another process
        # owns now was lost.
        for job_id in await self._leases.taken(self._driving() - owned):
            log.warning("Job %s: this process lost its lease (another process may drive it now); stopping", job_id)
            self._lose(job_id)
        due = self._revivals.due(owned - self._driving() - self._in_hand(), time.monotonic())
        if due:
            await self._revive(due)
        if self._shared:
            claimed = await self._leases.claim(limit=CLAIM_BATCH)
            fresh = [job for job in claimed if job.id not in self._driving()]
            if fresh:
                log.info("Taking over %d job(s) that no process drives", len(fresh))
                await self._adopt(fresh)
            if len(claimed) == CLAIM_BATCH:
                self._claim_now.set()  # more may be waiting: the next batch at once
