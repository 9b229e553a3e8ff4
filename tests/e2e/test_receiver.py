"""The webhook receiver under attack from the internet: idle, half-sent and slow connections, and floods of them."""

from __future__ import annotations

import asyncio
import dataclasses
import resource

import pytest

from bot.web.connection_guard import ConnectionLimits, raise_open_file_limit
from tests.e2e.conftest import FAST, BotRunner
from tests.fakes.modelslab_server import Queued

QUICK = dataclasses.replace(FAST, receiver=ConnectionLimits(max_connections=8, head_timeout=0.3, lifetime=1.0))


async def until_closed(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything the server sent before it closed the connection (the test fails if it never does)."""
    received = b""
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def receiver_port(runner: BotRunner) -> int:
    assert runner.app is not None
    return int(runner.app.webhook_runner.addresses[0][1])


async def test_idle_half_sent_slow_and_kept_alive_connections_are_closed(runner, discord_server, modelslab):
    await runner.start(timings=QUICK)
    port = await receiver_port(runner)
    idle = await asyncio.open_connection("127.0.0.1", port)
    half_head = await asyncio.open_connection("127.0.0.1", port)
    half_head[1].write(b"POST /webhooks/modelslab/x/y HTTP/1.1\r\nHost: bot\r\nContent-Type: appl")
    slow_body = await asyncio.open_connection("127.0.0.1", port)
    slow_body[1].write(b"POST /webhooks/modelslab/x/y HTTP/1.1\r\nHost: bot\r\nContent-Length: 1000\r\n\r\n{")
    kept_alive = await asyncio.open_connection("127.0.0.1", port)
    kept_alive[1].write(b"GET /healthz HTTP/1.1\r\nHost: bot\r\nConnection: keep-alive\r\n\r\n")

    assert await until_closed(idle[0]) == b""
    assert await until_closed(half_head[0]) == b""
    await until_closed(slow_body[0])
    answer = await until_closed(kept_alive[0])
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in answer  # one request a connection
    for _, writer in (idle, half_head, slow_body, kept_alive):
        writer.close()


async def test_a_flood_of_idle_connections_does_not_lock_out_a_real_webhook(runner, discord_server, modelslab):
    """Beyond the cap, each new connection closes the oldest one that has sent nothing: a real webhook gets in."""
    runner.with_webhooks()
    lasting = dataclasses.replace(QUICK, receiver=dataclasses.replace(QUICK.receiver, head_timeout=60, lifetime=60))
    await runner.start(timings=lasting)
    port = await receiver_port(runner)
    flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
    await until_closed(flood[30 - 8 - 1][0])  # the 22 oldest made room for the newer ones

    modelslab.script(Queued(eta=300, ready_after_seconds=0.2))
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "through the flood"})
    await interaction.wait_callback()
    delivery = await modelslab.wait_for_webhook_delivery(timeout=10)
    assert delivery.status == 200, delivery.error
    job = await runner.wait_posted()
    assert job.image_count == 1
    for _, writer in flood:
        writer.close()


def test_the_soft_limit_on_open_files_is_raised_as_far_as_the_hard_limit_allows():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert raise_open_file_limit() == (256, 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 256
        assert raise_open_file_limit() is None  # nothing more to do
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
