"""Keeps the webhook receiver, an open door on the internet, from starving the bot.

aiohttp's server has no cap on connections and no deadline for a request's head, and before 3.14 it
kept a connection that never sent a request open forever: 1,100 idle sockets used up the process's
file descriptors, and the bot's own calls to Discord and ModelsLab failed with "Too many open
files". Each accepted connection therefore goes through `GuardedConnection`, which forwards
everything to aiohttp's own protocol and adds:

- a cap on connections at once: a new connection beyond it closes the oldest one that has not yet
  sent its request head (an idle or slowloris socket; any client with a real request sends its head
  at once), else the oldest one, so that a flood of idle sockets never locks out a real webhook;
- a deadline for the request head (idle and half-sent headers are closed);
- a deadline for the connection's whole life (the receiver answers every request with
  `Connection: close`, so a connection carries one request: a slow body or a client that reads the
  answer slowly is closed too). The webhook handler also bounds the time it waits for a body.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The defaults are for real use (a webhook is a small JSON POST; an input picture is at most a few MB)."""

    max_connections: int = 256
    head_timeout: float = 10.0  # from the connection to the end of its request head
    lifetime: float = 60.0  # a connection's whole life: one request, its body and the answer
    backlog: int = 512  # pending connections the kernel holds for us: a burst of webhooks is not dropped


class ConnectionGuard:
    """The connections of one listening socket, oldest first."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.closed_for_room = 0  # connections closed to make room for newer ones
        self.closed_for_time = 0  # connections closed at a deadline

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedConnection(self, inner)

    def admit(self, connection: GuardedConnection) -> None:
        while len(self._open) >= self.limits.max_connections:
            victim = next((c for c in self._open if not c.head_received), None) or next(iter(self._open))
            self.forget(victim)
            self.closed_for_room += 1
            victim.abort()
        self._open[connection] = None

    def forget(self, connection: GuardedConnection) -> None:
        self._open.pop(connection, None)


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard's deadlines. Everything else is forwarded."""

    def __init__(self, guard: ConnectionGuard, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._inner = inner_factory()
        self._transport: asyncio.Transport | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._tail = b""  # the last bytes seen, to find the end of the head across reads
        self.head_received = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's or uvloop's (whose classes do not derive from asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        self._guard.admit(self)
        loop = asyncio.get_running_loop()
        limits = self._guard.limits
        self._timers = [
            loop.call_later(limits.head_timeout, self._expire, "head"),
            loop.call_later(limits.lifetime, self._expire, "lifetime"),
        ]
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.head_received:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self.head_received = True
                self._timers[0].cancel()
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._guard.forget(self)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        """Close at once, without waiting to send what is buffered: frees the file descriptor now."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

    def _expire(self, which: str) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._guard.closed_for_time += 1
        log.debug("Closing a receiver connection at its %s deadline", which)
        self._guard.forget(self)
        self.abort()


class GuardedSite(web.BaseSite):
    """Like `web.TCPSite`, with every connection under a `ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits) -> None:
        super().__init__(runner, backlog=limits.backlog)
        self._app_runner = runner
        self._host, self._port = host, port
        self.guard = ConnectionGuard(limits)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._app_runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # BaseSite.stop() and the runner's `addresses` read the listening server from `_server`, as for TCPSite.
        self._server = await loop.create_server(
            self.guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self.guard.limits.backlog,
            reuse_address=True,
        )


def raise_open_file_limit(target: int = 65536) -> tuple[int, int] | None:
    """Raise the soft limit on open files towards `target`, as far as the hard limit allows (a process may, without
    privileges). Returns (before, after) when it changed. The default soft limit is often 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return None
        return soft, wanted
    return None
