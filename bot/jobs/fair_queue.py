"""The bot's own queue in front of ModelsLab: one per API key, fair across members.

A ModelsLab account takes only a few queued requests at once (beyond that: 429). `FairQueue` lets
at most `limit` jobs of a key be at ModelsLab at once (a job holds its slot from its submit call
until ModelsLab reports it finished) and grants each free slot to the waiting member served least
recently (round robin by member), so ten requests from one member do not starve another's one.
It is in memory: the database keeps the jobs and their order, and a restart rebuilds the queue
from it (`JobService.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The waiting job was taken out of the queue (cancelled by a member)."""


@dataclass
class _Waiting:
    job_id: str
    user_id: int
    granted: asyncio.Future[None]


@dataclass
class _KeyQueue:
    active: set[str] = field(default_factory=set)
    # member -> their waiting jobs, oldest first; ties between members go to the one who came first.
    waiting: OrderedDict[int, deque[_Waiting]] = field(default_factory=OrderedDict)
    # member -> when they were last given a slot (a counter): the least recently served member goes next.
    served: dict[int, int] = field(default_factory=dict)
    grants: int = 0
    paused_until: float = 0.0
    resume_timer: asyncio.TimerHandle | None = None

    def next_member(self, served: dict[int, int]) -> int:
        return min(self.waiting, key=lambda user_id: served.get(user_id, -1))

    def order(self) -> list[_Waiting]:
        """The waiting jobs in the order they will be granted."""
        lanes = {user_id: deque(jobs) for user_id, jobs in self.waiting.items()}
        served = dict(self.served)
        grants = self.grants
        result: list[_Waiting] = []
        while lanes:
            user_id = min(lanes, key=lambda u: served.get(u, -1))
            result.append(lanes[user_id].popleft())
            served[user_id] = grants
            grants += 1
            if not lanes[user_id]:
                del lanes[user_id]
        return result

    def serve(self, user_id: int) -> None:
        self.served[user_id] = self.grants
        self.grants += 1


class FairQueue:
    def __init__(
        self,
        limit: int,
        *,
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("the queue limit must be at least 1")
        self.limit = limit
        self._keys: dict[str, _KeyQueue] = {}
        self._key_of: dict[str, str] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._turns: dict[str, asyncio.Future[None]] = {}  # every job's grant, kept until release
        self._on_change = on_change
        self._clock = clock
        self._positions: dict[str, dict[str, int]] = {}  # key -> job -> place, rebuilt after a change

    # ------------------------------------------------------------------------------------------ entering

    def hold(self, key: str, job_id: str, user_id: int) -> None:
        """A job already at ModelsLab (found at start-up) holds a slot, and counts as its member's turn."""
        self._queue(key).active.add(job_id)
        self._queue(key).serve(user_id)
        self._key_of[job_id] = key
        turn = self._turns[job_id] = asyncio.get_running_loop().create_future()
        turn.set_result(None)

    def remember_served(self, key: str, last_served: dict[int, float]) -> None:
        """At start-up: who was served when (from the database), so the round goes on where it was."""
        queue = self._queue(key)
        for user_id, _ in sorted(last_served.items(), key=lambda item: item[1]):
            queue.serve(user_id)

    grants_at_once = True

    def enqueue(self, key: str, job_id: str, user_id: int, *, first: bool = False) -> bool:
        """Add a waiting job; `first` puts it at the head (a job ModelsLab sent back with a 429). True if it holds a
        slot already (there was a free one)."""
        queue = self._queue(key)
        if job_id in self._waiting or job_id in queue.active:
            return job_id in queue.active
        entry = _Waiting(job_id, user_id, asyncio.get_running_loop().create_future())
        self._turns[job_id] = entry.granted
        lane = queue.waiting.get(user_id)
        if lane is None:
            lane = queue.waiting[user_id] = deque()
        if first:
            # Sent back by ModelsLab: first of its member's jobs, and its member goes before the others.
            lane.appendleft(entry)
            queue.waiting.move_to_end(user_id, last=False)
            queue.served[user_id] = min(queue.served.values(), default=0) - 1
        else:
            lane.append(entry)
        self._waiting[job_id] = entry
        self._key_of[job_id] = key
        self._grant(key)
        self._changed(key)
        return job_id in queue.active

    async def wait_turn(self, job_id: str) -> None:
        """Until the job holds a slot of its key. Raises `Cancelled` if it was taken out meanwhile."""
        turn = self._turns.get(job_id)
        if turn is None:
            raise KeyError(f"job {job_id} is not in the queue")
        await asyncio.shield(turn)

    # ------------------------------------------------------------------------------------------ leaving

    def release(self, job_id: str) -> None:
        """The job no longer counts at ModelsLab (finished, failed, or sent back): its slot goes to the next."""
        key = self._key_of.pop(job_id, None)
        self._turns.pop(job_id, None)
        if key is None:
            return
        queue = self._queue(key)
        queue.active.discard(job_id)
        self._drop_waiting(queue, job_id)
        self._grant(key)
        self._changed(key)

    def cancel(self, job_id: str) -> bool:
        """Take a waiting job out (never an active one). Its `wait_turn` raises `Cancelled`."""
        entry = self._waiting.get(job_id)
        key = self._key_of.get(job_id)
        if entry is None or key is None or entry.granted.done():
            return False
        self._drop_waiting(self._queue(key), job_id)
        self._key_of.pop(job_id, None)
        entry.granted.set_exception(Cancelled())
        entry.granted.exception()  # retrieved here: nobody may be waiting on it
        self._changed(key)
        return True

    def waiting_jobs(self, key: str) -> list[str]:
        return [entry.job_id for entry in self._queue(key).order()]

    def waiting_ids(self, key: str) -> list[str]:
        """The waiting jobs of a key, in no particular order (cheap)."""
        return [entry.job_id for lane in self._queue(key).waiting.values() for entry in lane]

    def pause(self, key: str, seconds: float) -> None:
        """ModelsLab said the key's queue is full: grant nothing for this key until it says to try again."""
        queue = self._queue(key)
        queue.paused_until = max(queue.paused_until, self._clock() + seconds)
        self._arm_resume(key)

    def _arm_resume(self, key: str) -> None:
        """Grant again when the pause ends (the latest pause wins: a shorter one does not cut it short)."""
        queue = self._queue(key)
        if queue.resume_timer is not None:
            queue.resume_timer.cancel()
        delay = max(queue.paused_until - self._clock(), 0.0)
        queue.resume_timer = asyncio.get_running_loop().call_later(delay + 0.001, self._grant, key)

    # ------------------------------------------------------------------------------------------ reading

    def position(self, job_id: str) -> tuple[int, int] | None:
        """(place in line, jobs waiting) for a waiting job of its key; None once it holds a slot."""
        key = self._key_of.get(job_id)
        if key is None or job_id not in self._waiting:
            return None
        places = self._positions.get(key)
        if places is None:  # the order is computed once per change, not once per waiting job
            places = self._positions[key] = {e.job_id: n for n, e in enumerate(self._queue(key).order(), start=1)}
        place = places.get(job_id)
        return (place, len(places)) if place is not None else None

    def depths(self) -> dict[str, int]:
        """Jobs waiting, by key (for /metrics)."""
        return {key: len(queue.order()) for key, queue in self._keys.items()}

    def active_count(self, key: str) -> int:
        return len(self._queue(key).active)

    def paused_for(self, job_id: str) -> float:
        key = self._key_of.get(job_id)
        return 0.0 if key is None else max(self._queue(key).paused_until - self._clock(), 0.0)

    # ------------------------------------------------------------------------------------------

    def _queue(self, key: str) -> _KeyQueue:
        queue = self._keys.get(key)
        if queue is None:
            queue = self._keys[key] = _KeyQueue()
        return queue

    def _drop_waiting(self, queue: _KeyQueue, job_id: str) -> None:
        entry = self._waiting.pop(job_id, None)
        if entry is None:
            return
        lane = queue.waiting.get(entry.user_id)
        if lane is not None:
            with contextlib.suppress(ValueError):
                lane.remove(entry)
            if not lane:
                del queue.waiting[entry.user_id]

    def _grant(self, key: str) -> None:
        queue = self._queue(key)
        if self._clock() < queue.paused_until:
            if queue.waiting:
                self._arm_resume(key)
            return
        changed = False
        while len(queue.active) < self.limit and queue.waiting:
            user_id = queue.next_member(queue.served)
            lane = queue.waiting[user_id]
            entry = lane.popleft()
            if not lane:
                del queue.waiting[user_id]
            queue.serve(user_id)
            del self._waiting[entry.job_id]
            queue.active.add(entry.job_id)
            if not entry.granted.done():
                entry.granted.set_result(None)
            changed = True
        if changed:
            self._changed(key)

    def _changed(self, key: str) -> None:
        self._positions.pop(key, None)
        if self._on_change is not None:
            self._on_change(key)
