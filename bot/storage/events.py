"""What one process changes that every process must hear of at once: a server's /config, a member's /settings, a
job another process drives (a webhook it received, a Cancel pressed there), the fair queue of a key.

On PostgreSQL the processes hear each other through LISTEN/NOTIFY on one channel, over a connection of its own (a
pooled one would lose its LISTEN when handed back). A notification is a hint, never the truth: the truth is in the
database, and whoever acts on a hint reads it there. Notifications can be lost (sent while the listening connection
was down): after every reconnect the subscribers of `on_reconnect` drop their caches and look again. On SQLite there is
one process, and events are delivered within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "imagine_events"
PING_INTERVAL = 10.0  # seconds: a silent network partition is found by a ping, not by TCP (asyncpg issue #519)
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)

Handler = Callable[[str], None]


class Events(Protocol):
    async def start(self) -> None:
        """Begin hearing the other processes (the bot does; a `db` command does not need to)."""
        ...

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call `handler(detail)` for every event of `topic`, from any process (this one included)."""
        ...

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        """Call `handler()` when events may have been missed (the listening connection was lost and is back)."""
        ...

    async def publish(self, topic: str, detail: str = "") -> None: ...


class Subscribers:
    """Who listens to what; shared by both kinds of events."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._reconnect: list[Callable[[], None]] = []

    def subscribe(self, topic: str, handler: Handler) -> None:
        if " " in topic:
            raise ValueError("a topic is one word")
        self._handlers.setdefault(topic, []).append(handler)

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        self._reconnect.append(handler)

    def deliver(self, message: str) -> None:
        topic, _, detail = message.partition(" ")
        for handler in self._handlers.get(topic, ()):
            try:
                handler(detail)
            except Exception:  # one subscriber's fault must not keep the event from the others
                log.exception("Handling the event %r failed", message[:100])

    def reconnected(self) -> None:
        for handler in self._reconnect:
            try:
                handler()
            except Exception:
                log.exception("Catching up after a reconnect failed")


class LocalEvents(Subscribers):
    """One process (SQLite): an event is delivered in this process, soon after it is published."""

    async def start(self) -> None:
        return None

    async def publish(self, topic: str, detail: str = "") -> None:
        asyncio.get_running_loop().call_soon(self.deliver, f"{topic} {detail}")


class PostgresEvents(Subscribers):
    """LISTEN/NOTIFY on `CHANNEL`, over one connection of its own, reconnected (and caches dropped) when lost."""

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        super().__init__()
        self._url = url
        self._pool = pool
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    async def start(self) -> None:
        if self._task is not None:
            return
        await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name="database-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_connection()

    async def publish(self, topic: str, detail: str = "") -> None:
        """Sent at once (its own statement: delivered when it commits, to every listening process)."""
        await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{topic} {detail}"[:7900])

    async def _listen(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self._url, timeout=10)
        await connection.add_listener(CHANNEL, self._on_notification)
        connection.add_termination_listener(lambda _connection: self._lost.set())
        self._connection = connection
        self._lost.clear()

    def _on_notification(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.deliver(payload)

    async def _keep_listening(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=PING_INTERVAL)
            if not self._lost.is_set() and await self._answers():
                continue
            log.warning("The database's event connection was lost; reconnecting (caches are dropped)")
            await self._drop_connection()
            for delay in itertools.chain(RECONNECT_DELAYS, itertools.repeat(RECONNECT_DELAYS[-1])):
                try:
                    await self._listen()
                    break
                except Exception as exc:  # whatever went wrong, the database may be back later
                    log.warning("Reconnecting the event connection failed (%s); again in %.0f s", exc, delay)
                    await asyncio.sleep(delay)
            log.info("Event connection back: catching up")
            self.reconnected()

    async def _answers(self) -> bool:
        connection = self._connection
        if connection is None or connection.is_closed():
            return False
        try:
            await connection.fetchval("SELECT 1", timeout=5)
        except Exception:  # a dead or wedged connection, whatever the error
            return False
        return True

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=5)
