"""`python -m bot`, exactly (same `bot.__main__.main()`), plus what the benchmark needs to see inside the process.

Run by `bench/run.py` as `python -m bench.botproc`, configured by the same environment variables as the bot, and:

* ``BENCH_STALL_FILE``: a monitor in the bot's own event loop, a timer callback every ``BENCH_STALL_INTERVAL``
  seconds (default 0.005), appends ``<time.monotonic() when it ran> <how late, in s>`` to this file whenever it ran
  1 ms or more late. ``time.monotonic()`` is the system's CLOCK_MONOTONIC, so the benchmark compares these
  stamps with its own.
  ``SIGUSR2`` pauses the monitor or resumes it, as the file ``<BENCH_STALL_FILE>.want`` says (``pause`` or
  ``resume``; the file then says ``paused <time>`` or ``resumed <time>``). Asking twice does no harm, so the
  benchmark asks again when no answer comes.
* ``BENCH_SLOW_CALLBACK``: ``loop.slow_callback_duration`` in seconds (asyncio logs, in debug mode, every callback
  that ran longer; set ``PYTHONASYNCIODEBUG=1`` too).
* ``BENCH_PROFILE``: write a cProfile of the main thread (the event loop) to this file when the process ends.
* ``BENCH_SQL_STATS``: count every SQL statement the bot's SQLite connections run (a trace callback, set on each
  connection as it opens), by statement; on ``SIGUSR1`` the counts so far are written to this file as JSON
  (``{"seq": <n-th dump>, "total": <statements>, "statements": {<statement, values elided>: <count>}}``), which the
  benchmark reads before and after a scenario.

The loop is made by ``bot.__main__.new_event_loop`` (uvloop's where installed; asyncio's with
``BENCH_EVENT_LOOP=asyncio``); this script wraps that function to hook the monitor onto the loop, so the bot's own
code runs unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

STALL_RECORD_THRESHOLD = 0.001  # seconds of overshoot worth writing down
# Values as SQLite expands them: strings and blobs (maybe cut short by the 200 characters kept), numbers.
_VALUES = re.compile(r"[xX]?'(?:[^']|'')*(?:'|$)|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b")


class StatementCounter:
    """Counts the statements SQLite runs, by their text with the values elided (the trace callback may see them
    expanded). Counted in the database thread; read from the main thread on a signal."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._counts: collections.Counter[str] = collections.Counter()
        self._dumps = 0

    def install(self) -> None:
        original = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            connection = original(*args, **kwargs)
            connection.set_trace_callback(self._count)
            return connection

        sqlite3.connect = connect  # aiosqlite looks it up when it opens a connection
        signal.signal(signal.SIGUSR1, lambda signum, frame: self.dump())

    def _count(self, statement: str) -> None:
        self._counts[statement[:200]] += 1  # the values are elided only when dumped: the callback stays cheap

    def dump(self) -> None:
        self._dumps += 1
        while True:
            try:  # the database thread may add a statement meanwhile
                counts = list(self._counts.items())
                break
            except RuntimeError:
                continue
        merged: collections.Counter[str] = collections.Counter()
        for statement, count in counts:
            merged[" ".join(_VALUES.sub("?", statement).split())[:160]] += count
        text = json.dumps({"seq": self._dumps, "total": sum(merged.values()), "statements": dict(merged)})
        temporary = self._path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, self._path)


class _StallMonitor:
    """Every `interval` a timer callback on the loop notes how late it ran; lateness of 1 ms or more is written down.

    A plain timer callback, not a task that sleeps: no future and no task step per tick. Even so, waking the loop
    200 times a second costs the bot CPU, more than the idle rate suggests (bench/README.md), so the benchmark
    pauses the monitor while it measures the bot's CPU: ``SIGUSR2`` applies what `want` says (``pause`` or
    ``resume``), and the file says ``paused <time>`` / ``resumed <time>``. Not a toggle: a signal sent again (when an
    answer seemed late) must not undo the first.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, out: TextIO, want: Path, interval: float) -> None:
        self._loop = loop
        self._out = out
        self._want = want
        self._interval = interval
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        now = time.monotonic()
        self._out.write(f"start {now:.6f}\n")
        self._loop.add_signal_handler(signal.SIGUSR2, self._toggle)
        self._schedule(now)

    def _toggle(self) -> None:
        try:
            want = self._want.read_text(encoding="ascii").strip()
        except OSError:
            return
        if want == "pause":
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._out.write(f"paused {time.monotonic():.6f}\n")
        elif want == "resume":
            if self._timer is None:
                self._schedule(time.monotonic())
            self._out.write(f"resumed {time.monotonic():.6f}\n")

    def _schedule(self, now: float) -> None:
        self._due = now + self._interval
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        overshoot = now - self._due
        if overshoot >= STALL_RECORD_THRESHOLD:
            self._out.write(f"{now:.6f} {overshoot:.6f}\n")
        self._schedule(now)


def _hooked_loop_factory(
    make_loop: Callable[[], asyncio.AbstractEventLoop],
    stall_file: str | None,
    interval: float,
    slow_callback: float | None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    def new_event_loop() -> asyncio.AbstractEventLoop:
        loop = make_loop()
        if slow_callback is not None:
            loop.slow_callback_duration = slow_callback
        if stall_file is not None:
            out = open(stall_file, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - lives as long as the process
            want = Path(stall_file + ".want")
            loop.call_soon(_StallMonitor(loop, out, want, interval).start)
        return loop

    return new_event_loop


def main() -> int:
    stall_file = os.environ.get("BENCH_STALL_FILE") or None
    interval = float(os.environ.get("BENCH_STALL_INTERVAL", "0.005"))
    slow = os.environ.get("BENCH_SLOW_CALLBACK")
    sql_stats = os.environ.get("BENCH_SQL_STATS")
    if sql_stats:
        StatementCounter(sql_stats).install()

    import bot.__main__
    from bot.__main__ import main as bot_main

    # The bot's own choice of loop (uvloop where installed), or asyncio's with BENCH_EVENT_LOOP=asyncio.
    make_loop = bot.__main__.new_event_loop
    if os.environ.get("BENCH_EVENT_LOOP") == "asyncio":
        make_loop = asyncio.new_event_loop
    bot.__main__.new_event_loop = _hooked_loop_factory(make_loop, stall_file, interval, float(slow) if slow else None)

    profile_path = os.environ.get("BENCH_PROFILE")
    if not profile_path:
        return bot_main([])
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return bot_main([])
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    sys.exit(main())
