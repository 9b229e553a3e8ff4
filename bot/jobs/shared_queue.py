"""The fair line in front of ModelsLab when several processes share one PostgreSQL: the same rules as `FairQueue`
(at most `limit` jobs of a key at ModelsLab at once, each free slot to the member served least recently, a 429
pauses the key), kept in the database so that they hold across processes.

The slots are given by the database (`QueueRepository.grant`, serialised per key). A job waits for its slot in the
process that drives it; a slot given by another process reaches it as a `granted` event, and a lost event is made
up for by a tick that looks at the line every few seconds. Places in line are computed from the database's line,
so a member's place is right whichever process their job waits in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from bot.jobs.fair_queue import Cancelled
from bot.storage.events import Events
from bot.storage.ports import QueueRepository, WaitingJob

log = logging.getLogger(__name__)

TICK = 2.0  # seconds between two looks at a key's line while jobs of this process wait in it


def fair_order(waiting: Iterable[WaitingJob]) -> list[str]:
    """The order in which `QueueRepository.grant` would give the slots: the member served least recently first (a
    member sent back by ModelsLab goes first), each member's jobs in the order they joined. `FairQueue`'s order."""
    lanes: dict[int, list[WaitingJob]] = {}
    for job in sorted(waiting, key=lambda j: (not j.first, j.enqueued_at, j.job_id)):
        lanes.setdefault(job.user_id, []).append(job)
    served = {user: (lane[0].served_seq if lane[0].served_seq is not None else -1) for user, lane in lanes.items()}
    next_seq = max(served.values(), default=0) + 1
    order: list[str] = []
    while lanes:
        user = min(lanes, key=lambda u: (served[u], not lanes[u][0].first, lanes[u][0].enqueued_at, lanes[u][0].job_id))
        order.append(lanes[user].pop(0).job_id)
        served[user] = next_seq
        next_seq += 1
        if not lanes[user]:
            del lanes[user]
    return order


@dataclass
class _Line:
    """What this process knows of one key's line."""

    waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)  # this process's jobs waiting
    in_line: set[str] = field(default_factory=set)  # those of them the database has in its line
    places: dict[str, int] = field(default_factory=dict)  # every waiting job's place (1 = next), all processes
    paused_until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tick: asyncio.TimerHandle | None = None
    refreshing: asyncio.Task[None] | None = None  # one read of the line at a time; asked again meanwhile: once more
    refresh_again: bool = False


class SharedQueue:
    """`JobQueue` over the database. Its methods return at once; the database work runs in tasks it keeps."""

    def __init__(
        self,
        repository: QueueRepository,
        limit: int,
        events: Events,
        *,
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._repository = repository
        self.limit = limit
        self._events = events
        self._on_change = on_change
        self._clock = clock
        self._lines: dict[str, _Line] = {}
        self._key_of: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        events.subscribe("granted", self._granted_elsewhere)
        events.subscribe("queue", lambda key: self._refresh_soon(key) if key in self._lines else None)
        events.on_reconnect(self._look_at_every_line)

    # ------------------------------------------------------------------------------------------ entering

    def hold(self, key: str, job_id: str, user_id: int) -> None:
        """A job at ModelsLab holds its slot in the database already; when it is released, its key's next job
        gets the slot."""
        self._line(key)
        self._key_of[job_id] = key

    def remember_served(self, key: str, last_served: dict[int, float]) -> None:
        """Who was served when is in the database already."""

    grants_at_once = False  # the line is in the database: a slot is given by a statement, after `enqueue` returns

    def enqueue(self, key: str, job_id: str, user_id: int, *, first: bool = False) -> bool:
        line = self._line(key)
        if job_id not in line.waiters:
            line.waiters[job_id] = asyncio.get_running_loop().create_future()
            self._key_of[job_id] = key
            self._spawn(lambda: self._enqueue(key, job_id, first))
            self._arm_tick(key)
        return False

    async def wait_turn(self, job_id: str) -> None:
        key = self._key_of.get(job_id)
        future = self._lines[key].waiters.get(job_id) if key is not None else None
        if future is None:
            raise KeyError(f"job {job_id} is not in the queue")
        await asyncio.shield(future)

    # ------------------------------------------------------------------------------------------ leaving

    def release(self, job_id: str) -> None:
        key = self._key_of.pop(job_id, None)
        if key is None:
            return
        self._lines[key].waiters.pop(job_id, None)
        self._lines[key].in_line.discard(job_id)
        self._spawn(lambda: self._grant(key))

    def cancel(self, job_id: str) -> bool:
        key = self._key_of.get(job_id)
        future = self._lines[key].waiters.get(job_id) if key is not None else None
        if key is None or future is None or future.done():
            return False
        del self._lines[key].waiters[job_id]
        self._lines[key].in_line.discard(job_id)
        del self._key_of[job_id]
        future.set_exception(Cancelled())
        future.exception()  # retrieved here: nobody may be waiting on it
        self._refresh_soon(key)
        return True

    def pause(self, key: str, seconds: float) -> None:
        self._line(key).paused_until = max(self._line(key).paused_until, self._clock() + seconds)
        until = self._clock() + seconds
        self._spawn(lambda: self._pause(key, until))

    # ------------------------------------------------------------------------------------------ reading

    def position(self, job_id: str) -> tuple[int, int] | None:
        key = self._key_of.get(job_id)
        if key is None:
            return None
        line = self._lines[key]
        place = line.places.get(job_id)
        return (place, len(line.places)) if place is not None else None

    def paused_for(self, job_id: str) -> float:
        key = self._key_of.get(job_id)
        return 0.0 if key is None else max(self._lines[key].paused_until - self._clock(), 0.0)

    def waiting_ids(self, key: str) -> list[str]:
        line = self._lines.get(key)
        return [job_id for job_id, future in line.waiters.items() if not future.done()] if line else []

    def depths(self) -> dict[str, int]:
        return {key: len(line.places) for key, line in self._lines.items()}

    async def close(self) -> None:
        self._closed = True
        for line in self._lines.values():
            if line.tick is not None:
                line.tick.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------ the database

    async def _enqueue(self, key: str, job_id: str, first: bool) -> None:
        if await self._repository.enqueue(job_id, key, first=first):
            self._resolve(key, job_id)  # it held a slot already (its process stopped before sending it)
        elif job_id in self._line(key).waiters:
            self._line(key).in_line.add(job_id)
        await self._grant(key)
        await self._events.publish("queue", key)  # a new place in line: the others' places may move

    async def _grant(self, key: str) -> None:
        line = self._line(key)
        async with line.lock:  # one giving of slots at a time per key in this process: the others would find none
            granted = await self._repository.grant(key, self.limit, self._clock())
        for job_id, _owner in granted:
            if not self._resolve(key, job_id):
                await self._events.publish("granted", job_id)
        if granted:
            await self._events.publish("queue", key)
        self._refresh_soon(key)

    async def _pause(self, key: str, until: float) -> None:
        self._line(key).paused_until = await self._repository.pause(key, until)
        await self._events.publish("queue", key)
        asyncio.get_running_loop().call_later(max(until - self._clock(), 0.0) + 0.01, self._spawn_grant, key)

    def _refresh_soon(self, key: str) -> None:
        line = self._line(key)
        if line.refreshing is not None:
            line.refresh_again = True
        else:
            line.refreshing = self._spawn(lambda: self._refresh_while_asked(key))

    async def _refresh_while_asked(self, key: str) -> None:
        line = self._line(key)
        try:
            while True:
                line.refresh_again = False
                await self._refresh(key)
                if not line.refresh_again:
                    return
        finally:
            line.refreshing = None

    async def _refresh(self, key: str) -> None:
        """Places in line and the pause, as the database has them."""
        line = self._line(key)
        # Only a job the database had in its line before this read can have left it: granted (or cancelled).
        was_in_line = set(line.in_line)
        state = await self._repository.line(key)
        line.places = {job_id: place for place, job_id in enumerate(fair_order(state.waiting), start=1)}
        line.paused_until = max(line.paused_until, state.paused_until)
        for job_id in was_in_line - line.places.keys():
            self._resolve(key, job_id)
        if self._on_change is not None:
            self._on_change(key)

    def _look_at_every_line(self) -> None:
        """Events may have been missed: give slots and read places afresh for every line known here."""
        for key in list(self._lines):
            self._spawn(functools.partial(self._grant, key))

    def _granted_elsewhere(self, job_id: str) -> None:
        key = self._key_of.get(job_id)
        if key is not None:
            self._resolve(key, job_id)

    def _resolve(self, key: str, job_id: str) -> bool:
        line = self._line(key)
        line.in_line.discard(job_id)
        future = line.waiters.get(job_id)
        if future is None:
            return False
        if not future.done():
            future.set_result(None)
        return True

    # ------------------------------------------------------------------------------------------

    def _line(self, key: str) -> _Line:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        return line

    def _arm_tick(self, key: str) -> None:
        line = self._line(key)
        if line.tick is None:
            line.tick = asyncio.get_running_loop().call_later(TICK, self._on_tick, key)

    def _on_tick(self, key: str) -> None:
        line = self._line(key)
        line.tick = None
        if any(not future.done() for future in line.waiters.values()):
            self._spawn(lambda: self._grant(key))
            self._arm_tick(key)

    def _spawn_grant(self, key: str) -> None:
        self._spawn(lambda: self._grant(key))

    def _spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run `work()` in a task kept here (made inside the task: one cancelled before it starts leaves nothing)."""
        task = asyncio.create_task(self._logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _logged(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._closed:  # an event heard while closing: nothing new starts
            return
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await work()
            except Exception:
                log.warning("The shared queue could not reach the database; it looks again soon", exc_info=True)
