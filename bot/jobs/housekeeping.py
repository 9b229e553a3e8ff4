"""Housekeeping: what the database no longer needs goes, on a timer, a batch at a time.

- Members' pictures (`job_inputs`) of jobs shown more than `INPUT_RETENTION` ago: kept a day for Re-roll and
  Edit, then deleted.
- Interaction tokens past their expiry on jobs not shown yet (a shown job keeps none): useless, so not kept.

It runs once when the job service starts, then every `HOUSEKEEPING_INTERVAL`, never on a job's own path:
posting a result costs no delete. Each statement handles at most `batch` rows, so it stays short on the one
database thread whatever the backlog; a round stops after `max_batches` and the next one goes on. A failure is
logged and the next round tries again: housekeeping never stops the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bot.storage.ports import JobRepository

log = logging.getLogger(__name__)

INPUT_RETENTION = 86400.0  # members' pictures are kept a day (Re-roll, Edit), then deleted
HOUSEKEEPING_INTERVAL = 600.0  # seconds between two rounds
HOUSEKEEPING_BATCH = 500  # rows a statement handles at most
HOUSEKEEPING_MAX_BATCHES = 20  # statements of each kind a round runs at most


class Housekeeping:
    """Deletes old members' pictures and expired interaction tokens, in batches, on a timer."""

    def __init__(
        self,
        *,
        store: JobRepository,
        clock: Callable[[], float] = time.time,
        interval: float = HOUSEKEEPING_INTERVAL,
        batch: int = HOUSEKEEPING_BATCH,
        max_batches: int = HOUSEKEEPING_MAX_BATCHES,
        retention: float = INPUT_RETENTION,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._batch = batch
        self._max_batches = max_batches
        self._retention = retention
        self._task: asyncio.Task[None] | None = None
        self._round_done = asyncio.Condition()
        self.rounds = 0  # rounds finished (tests wait for them)

    def start(self) -> None:
        """A round now, then one every interval, until `stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="housekeeping")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> tuple[int, int]:
        """One round: returns (pictures deleted, tokens forgotten). A failing kind of work is logged, and the
        other is still done."""
        now = self._clock()
        pictures = await self._in_batches(
            "old members' pictures", lambda: self._store.drop_old_inputs(now - self._retention, batch=self._batch)
        )
        tokens = await self._in_batches(
            "expired interaction tokens", lambda: self._store.forget_expired_tokens(now, batch=self._batch)
        )
        if pictures or tokens:
            log.info("Housekeeping: %d old picture(s) deleted, %d expired token(s) forgotten", pictures, tokens)
        return pictures, tokens

    async def wait_rounds(self, count: int) -> None:
        """Until `count` rounds have finished since the start (tests)."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= count)

    async def _run(self) -> None:
        while True:
            await self.run_once()
            async with self._round_done:
                self.rounds += 1
                self._round_done.notify_all()
            await asyncio.sleep(self._interval)

    async def _in_batches(self, what: str, batch: Callable[[], Awaitable[int]]) -> int:
        done = 0
        try:
            for _ in range(self._max_batches):
                count = await batch()
                done += count
                if count < self._batch:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Housekeeping: deleting %s failed; trying again in %.0f s", what, self._interval)
        return done
