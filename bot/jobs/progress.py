"""The status edits: what each job's status message shows while the job is on its way.

A waiting job shows its place in line (and a pause when ModelsLab sent its key back), a job at ModelsLab its
ETA. These edits are a courtesy, and Discord's requests are a budget, so:

- A status message is never edited to show what it already shows, and at most once every
  `PROGRESS_MIN_INTERVAL` seconds. Each message has one wanted state (the latest wins) and at most one edit in
  flight; what is sent is decided and recorded before any await, so racing tasks cannot both pass the check.
- The place in line is exact for the first `EXACT_PLACES` jobs; further back the member reads a round number
  (`about_ahead`: "about 300 requests ahead"), which changes only every 10 or 100 places. When the head of a line
  of a thousand moves, a few dozen messages change, not a thousand.
- Edits come out of budgets: per key, `FRONT_EDITS` a second for the front of the line and `FAR_EDITS` for the
  rest, the front first; an edit that goes through a rate limit shared with other messages (the channel's, once
  the interaction token has expired) also spends from that lane (`LANE_EDITS`) and from all lanes together
  (`ALL_LANES_EDITS`), which leaves most of Discord's 5 edits per 5 s per channel to the results.
- A job's own news ("Generating, ready in 12 s") goes before any place in line.

The outcome itself is shown by `bot.jobs.posting`, never here, and never waits for any of this: the presenter
drops a progress edit that comes after the outcome. Edits fail quietly (a log line): the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from bot.jobs.model import Job, JobStatus, Progress
from bot.jobs.ports import JobPresenter, JobQueue, PresentationDeferred

log = logging.getLogger(__name__)

ETA_CHANGE_WORTH_SHOWING = 5.0  # seconds
PROGRESS_MIN_INTERVAL = 2.0  # seconds between two edits of one status message (Discord rate limits)
EXACT_PLACES = 20  # the first jobs in line read their exact place; the others a round number
LINE_SETTLE = 0.25  # seconds: the changes of a key's line within this are shown together
PUMP_TICK = 0.05  # seconds: the least time between two looks at the edits waiting for their turn
# (edits, seconds): the budgets edits are spent from.
FRONT_EDITS = (10, 1.0)  # per key, places 1..EXACT_PLACES
FAR_EDITS = (20, 1.0)  # per key, the places behind
LANE_EDITS = (2, 5.0)  # per shared lane (a channel: Discord allows 5 edits per 5 s there, the results need the rest)
ALL_LANES_EDITS = (10, 1.0)  # every shared lane together (Discord's global limit is 50 requests a second)


def about_ahead(ahead: int) -> int:
    """The round number shown for `ahead` jobs ahead: to the nearest 10 below 100, to the nearest 100 above."""
    step = 10 if ahead < 100 else 100
    return max(int(ahead / step + 0.5) * step, step)


class EditBudget:
    """At most `edits` edits in any `per` seconds."""

    def __init__(self, edits: int, per: float) -> None:
        self.edits, self.per = edits, per
        self._spent: deque[float] = deque()

    def free_at(self, now: float) -> float:
        """When the next edit may go (`now` if it may go now)."""
        while self._spent and self._spent[0] <= now - self.per:
            self._spent.popleft()
        return now if len(self._spent) < self.edits else self._spent[0] + self.per

    def spend(self, now: float) -> None:
        self._spent.append(now)

    def idle(self, now: float) -> bool:
        """Nothing spent within the last `per` seconds: the budget is as good as new."""
        self.free_at(now)
        return not self._spent


@dataclass(frozen=True)
class _Display:
    """What a status message should show: `shows` is what the member reads (compared), the rest how to say it."""

    shows: Hashable
    job: Job
    progress: Progress
    priority: float  # lower goes first: the job's own news (0), then places, front first
    region: str | None  # "front" or "far" for a place in line (the key's budget it spends from), else None


@dataclass(eq=False)
class _StatusMessage:
    job_id: str
    order: int  # ties in priority go to the oldest
    job: Job | None = None  # the job as last known, for the words of its status
    key: str | None = None  # the line it waits in
    shows: Hashable | None = None  # what its message shows, as far as this process knows (None: unknown)
    wanted: _Display | None = None  # what it should show, when that differs from `shows`
    last_edit: float = -math.inf  # time.monotonic() of the last edit sent
    sending: asyncio.Task[None] | None = field(default=None, repr=False)


class ProgressReporter:
    """Owns what each job's status message shows before the outcome: the place in line, the ETA."""

    def __init__(self, *, queue: JobQueue) -> None:
        self._queue = queue
        self._presenter: JobPresenter | None = None
        self._messages: dict[str, _StatusMessage] = {}
        self._pending: dict[str, _StatusMessage] = {}  # messages with a wanted state not sent yet
        self._budgets: dict[tuple[str, ...], EditBudget] = {}
        self._line_timers: dict[str, asyncio.TimerHandle] = {}
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._closed = False

    def attach_presenter(self, presenter: JobPresenter) -> None:
        self._presenter = presenter

    # ------------------------------------------------------------------------------------------ what happened

    def joined_line(self, job: Job) -> None:
        """The job waits in its key's line (`line_changed` follows): its place will be shown."""
        if not self._closed:
            self._message(job.id).job = job

    def line_changed(self, key: str) -> None:
        """The queue of a key changed: the places of the jobs waiting in it are looked at shortly, together."""
        if self._closed or key in self._line_timers:
            return
        self._line_timers[key] = asyncio.get_running_loop().call_later(LINE_SETTLE, self._look_at_line, key)

    async def show_new_eta(self, job: Job, *, previous_eta_at: float | None) -> None:
        """ModelsLab gave the job a new ETA: show it if it moved enough to be worth an edit."""
        if _eta_moved(previous_eta_at, job.eta_at):
            await self.show(job)

    async def show(self, job: Job, progress: Progress | None = None) -> None:
        """Show where the job stands now (at ModelsLab: its ETA), as soon as its message may be edited again.
        Returns at once; never raises."""
        if self._closed:
            return
        message = self._message(job.id)
        message.job = job
        shows = ("job", job.status.value, round(job.eta_at) if job.eta_at is not None else None, progress)
        self._want(message, _Display(shows, job, progress or Progress(), priority=0, region=None))

    def forget(self, job_id: str) -> None:
        """The job's driver stopped: nothing more is shown for it, and what its message showed no longer matters."""
        message = self._messages.pop(job_id, None)
        self._pending.pop(job_id, None)
        if message is not None and message.sending is not None:
            message.sending.cancel()
        if self._presenter is not None:
            self._presenter.forget(job_id)

    def close(self) -> None:
        """No more edits: the pending ones are dropped, the ones under way cancelled (`wait_closed` waits)."""
        self._closed = True
        for timer in self._line_timers.values():
            timer.cancel()
        self._line_timers.clear()
        self._pending.clear()
        for task in self._tasks():
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks(), return_exceptions=True)

    # ------------------------------------------------------------------------------------------ deciding

    def _message(self, job_id: str) -> _StatusMessage:
        message = self._messages.get(job_id)
        if message is None:
            message = self._messages[job_id] = _StatusMessage(job_id, next(self._order))
        return message

    def _look_at_line(self, key: str) -> None:
        self._line_timers.pop(key, None)
        for job_id in self._queue.waiting_ids(key):
            message = self._messages.get(job_id)
            if message is None or message.job is None:
                continue  # not shown by this process (yet)
            message.key = key
            display = self._place_display(message)
            if display is not None:
                self._want(message, display)

    def _place_display(self, message: _StatusMessage) -> _Display | None:
        """The job's place in line as the member should read it now; None once it no longer waits."""
        place = self._queue.position(message.job_id)
        if place is None or message.job is None or message.job.status is not JobStatus.QUEUED:
            return None
        position, waiting = place
        if position > EXACT_PLACES:
            about = about_ahead(position - 1)
            progress = Progress(about_ahead=about, waiting=waiting, cancellable=True)
            return _Display(("about", about), message.job, progress, priority=position, region="far")
        paused = self._queue.paused_for(message.job_id)
        shows: tuple[object, ...] = ("place", position)
        if paused > 0:  # the moment it will be tried again: the same moment, whenever it is computed
            shows = ("paused", position, round(time.time() + paused))
        progress = Progress(position=position, waiting=waiting, retry_in=paused, cancellable=True)
        return _Display(shows, message.job, progress, priority=position, region="front")

    def _want(self, message: _StatusMessage, display: _Display) -> None:
        if display.shows == message.shows:
            message.wanted = None  # it shows that already (or is being edited to)
            self._pending.pop(message.job_id, None)
            return
        message.wanted = display
        self._pending[message.job_id] = message
        self._wake()

    # ------------------------------------------------------------------------------------------ sending

    def _wake(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump(), name="progress-edits")
        self._wakeup.set()

    async def _pump(self) -> None:
        """Sends the wanted edits whose turn it is, most urgent first, as each message's interval and the budgets
        allow; sleeps until the next one may go."""
        while self._pending and not self._closed:
            self._wakeup.clear()
            wake_at = self._send_due(time.monotonic())
            await asyncio.sleep(PUMP_TICK)
            delay = wake_at - time.monotonic()
            if delay > 0 and not self._wakeup.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay if math.isfinite(delay) else None):
                        await self._wakeup.wait()
        self._drop_idle_budgets()

    def _send_due(self, now: float) -> float:
        """Start every edit that may go now; returns when the next one may."""
        wake_at = math.inf
        spent: set[int] = set()  # budgets found empty in this pass (their next edit waits)
        for message in sorted(self._pending.values(), key=_urgency):
            display = message.wanted
            if display is None or message.sending is not None:
                continue  # the edit under way is answered first; then this one is looked at again
            ready_at = message.last_edit + PROGRESS_MIN_INTERVAL
            if ready_at > now:
                wake_at = min(wake_at, ready_at)
                continue
            budgets = self._budgets_for(message, display)
            if any(id(budget) in spent for budget in budgets):
                continue
            free_at = max((budget.free_at(now) for budget in budgets), default=now)
            if free_at > now:
                spent.update(id(budget) for budget in budgets if budget.free_at(now) > now)
                wake_at = min(wake_at, free_at)
                continue
            if display.region is not None:
                current = self._place_display(message)  # the place now, not when the line last changed
                if current is None or current.shows == message.shows:
                    message.wanted = None
                    self._pending.pop(message.job_id, None)
                    continue
                message.wanted = current
                if current.region != display.region:
                    wake_at = now  # it spends from the other budget: looked at again in the next pass
                    continue
                display = current
            for budget in budgets:
                budget.spend(now)
            # Recorded before anything is awaited: a task that looks next sees this edit as sent.
            message.shows, message.wanted, message.last_edit = display.shows, None, now
            self._pending.pop(message.job_id, None)
            message.sending = asyncio.get_running_loop().create_task(
                self._send(message, display), name=f"progress-{message.job_id}"
            )
        return wake_at

    def _budgets_for(self, message: _StatusMessage, display: _Display) -> list[EditBudget]:
        budgets = []
        if display.region is not None and message.key is not None:
            edits, per = FRONT_EDITS if display.region == "front" else FAR_EDITS
            budgets.append(self._budget((display.region, message.key), edits, per))
        lane = self._presenter.edit_lane(display.job) if self._presenter is not None else None
        if lane is not None:
            budgets.append(self._budget(("lane", lane), *LANE_EDITS))
            budgets.append(self._budget(("all lanes",), *ALL_LANES_EDITS))
        return budgets

    def _budget(self, name: tuple[str, ...], edits: int, per: float) -> EditBudget:
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = EditBudget(edits, per)
        return budget

    def _drop_idle_budgets(self) -> None:
        now = time.monotonic()
        for name in [name for name, budget in self._budgets.items() if budget.idle(now)]:
            del self._budgets[name]

    async def _send(self, message: _StatusMessage, display: _Display) -> None:
        try:
            if self._presenter is not None:
                await self._presenter.show_progress(display.job, display.progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress is a courtesy: never let it stop the job
            level = logging.DEBUG if isinstance(exc, PresentationDeferred) else logging.WARNING
            log.log(level, "Job %s: status update failed (%s)", message.job_id, exc)
            if message.shows == display.shows:
                message.shows = None  # what the message shows is unknown now: the next change is sent
        finally:
            # The interval counts from Discord's answer too: an edit held up on its way (a busy loop, discord.py's
            # own pacing) must not arrive less than the interval before the next.
            message.last_edit = max(message.last_edit, time.monotonic())
            message.sending = None
            if message.wanted is not None and not self._closed and self._messages.get(message.job_id) is message:
                self._pending[message.job_id] = message
                self._wake()

    def _tasks(self) -> list[asyncio.Task[None]]:
        tasks = [m.sending for m in self._messages.values() if m.sending is not None]
        if self._pump_task is not None:
            tasks.append(self._pump_task)
        return tasks


def _urgency(message: _StatusMessage) -> tuple[float, int]:
    return (message.wanted.priority if message.wanted is not None else math.inf, message.order)


def _eta_moved(before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return before != after
    return abs(after - before) >= ETA_CHANGE_WORTH_SHOWING
