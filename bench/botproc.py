"""`python -m bot`, exactly (same `bot.__main__.main()`), plus what the benchmark needs to see inside the process.

Run by `bench/run.py` as `python -m bench.botproc`, configured by the same environment variables as the bot, and:

* ``BENCH_STALL_FILE``: a monitor task in the bot's own event loop sleeps ``BENCH_STALL_INTERVAL`` seconds
  (default 0.005) in a loop and appends ``<time.monotonic() at wake-up> <overshoot in s>`` to this file for every
  overshoot of 1 ms or more. ``time.monotonic()`` is the system's CLOCK_MONOTONIC, so the benchmark compares these
  stamps with its own.
* ``BENCH_SLOW_CALLBACK``: ``loop.slow_callback_duration`` in seconds (asyncio logs, in debug mode, every callback
  that ran longer; set ``PYTHONASYNCIODEBUG=1`` too).
* ``BENCH_PROFILE``: write a cProfile of the main thread (the event loop) to this file when the process ends.
* ``BENCH_SQL_STATS``: count every SQL statement the bot's SQLite connections run (a trace callback, set on each
  connection as it opens), by statement; on ``SIGUSR1`` the counts so far are written to this file as JSON
  (``{"seq": <n-th dump>, "total": <statements>, "statements": {<statement, values elided>: <count>}}``), which the
  benchmark reads before and after a scenario.

The loop is created by ``asyncio.run`` inside ``main()``; an event loop policy hooks the monitor onto it, so the
bot's own code runs unchanged.
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
from typing import Any, TextIO

STALL_RECORD_THRESHOLD = 0.001  # seconds of overshoot worth writing down
_VALUES = re.compile(r"'(?:[^']|'')*'|x'[0-9a-fA-F]*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b")


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


async def _monitor(out: TextIO, interval: float) -> None:
    out.write(f"start {time.monotonic():.6f}\n")
    while True:
        before = time.monotonic()
        await asyncio.sleep(interval)
        after = time.monotonic()
        overshoot = after - before - interval
        if overshoot >= STALL_RECORD_THRESHOLD:
            out.write(f"{after:.6f} {overshoot:.6f}\n")


class _BenchPolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, stall_file: str | None, interval: float, slow_callback: float | None) -> None:
        super().__init__()
        self._stall_file = stall_file
        self._interval = interval
        self._slow_callback = slow_callback
        self._monitors: set[asyncio.Task[None]] = set()

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        if self._slow_callback is not None:
            loop.slow_callback_duration = self._slow_callback
        if self._stall_file is not None:
            out = open(self._stall_file, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - lives as long as the loop

            def done(task: asyncio.Task[None]) -> None:
                self._monitors.discard(task)
                out.close()

            def start() -> None:
                task = loop.create_task(_monitor(out, self._interval), name="bench-stall-monitor")
                self._monitors.add(task)
                task.add_done_callback(done)

            loop.call_soon(start)
        return loop


def main() -> int:
    stall_file = os.environ.get("BENCH_STALL_FILE") or None
    interval = float(os.environ.get("BENCH_STALL_INTERVAL", "0.005"))
    slow = os.environ.get("BENCH_SLOW_CALLBACK")
    asyncio.set_event_loop_policy(_BenchPolicy(stall_file, interval, float(slow) if slow else None))
    sql_stats = os.environ.get("BENCH_SQL_STATS")
    if sql_stats:
        StatementCounter(sql_stats).install()

    from bot.__main__ import main as bot_main

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
