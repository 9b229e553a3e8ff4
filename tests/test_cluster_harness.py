"""The multi-process harness (tests/cluster.py) itself: the round-robin proxy, the fairness check, shard settings."""

from __future__ import annotations

import asyncio
import io
from collections import Counter

import pytest
from aiohttp import ClientSession, web

from tests.cluster import ClusterProcess, RoundRobinProxy, fair_order_problems, parse_shard_ids


async def backend(name: str) -> tuple[web.AppRunner, tuple[str, int]]:
    """A web server answering its name (and echoing a body), with `Connection: close` like the bot's receiver."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{name}:{len(body)}", headers={"Connection": "close"})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, (host, port)


async def test_the_proxy_takes_turns_and_skips_a_backend_that_is_gone():
    servers = [await backend(name) for name in ("a", "b", "c")]
    proxy = await RoundRobinProxy(address for _, address in servers).start()
    try:
        async with ClientSession() as session:

            async def ask(body: bytes = b"") -> str:
                async with session.post(proxy.url + "/webhooks/x", data=io.BytesIO(body)) as response:
                    return await response.text()

            assert [await ask() for _ in range(6)] == ["a:0", "b:0", "c:0", "a:0", "b:0", "c:0"]
            big = b"x" * 3_000_000  # larger than any buffer on the way: copied in full, both ways
            assert await ask(big) == "a:3000000"
            await servers[1][0].cleanup()  # b is gone (killed): its turn goes to the next one
            assert [await ask() for _ in range(4)] == ["c:0", "a:0", "c:0", "a:0"]
            assert proxy.routed.count(servers[1][1]) == 2
            # Many at once: each connection tries every backend once, whatever the others meet meanwhile.
            answers = Counter(await asyncio.gather(*(ask() for _ in range(40))))
            assert set(answers) == {"a:0", "c:0"} and answers.total() == 40
            assert None not in proxy.routed
    finally:
        await proxy.stop()
        for runner, _ in servers:
            await runner.cleanup()


async def test_the_proxy_closes_the_connection_when_no_backend_answers():
    runner, address = await backend("a")
    await runner.cleanup()
    proxy = await RoundRobinProxy([address]).start()
    try:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert proxy.routed == [None]
    finally:
        await proxy.stop()


def test_round_robin_by_member_is_recognised_and_its_breaches_named():
    assert fair_order_problems(list("abcabcabc")) == []
    assert fair_order_problems(list("abcabcacc")) == []  # b ran out of jobs: a and c alternate, then c alone
    assert fair_order_problems([]) == []
    assert fair_order_problems(list("cabcab")) == []  # whoever starts, the turns then keep their order
    assert fair_order_problems(list("abcbac")) != []  # b served again before a, who had waited longer
    assert fair_order_problems(list("aabbcc")) != []  # a served twice while b and c waited
    [problem] = fair_order_problems(list("abcabbc"))
    assert problem == "between the jobs of b at places 4 and 5, c (still waiting) got 0 job(s), not 1"
    assert fair_order_problems(list("abcacbb")) == [
        "between the jobs of c at places 2 and 4, b (still waiting) got 0 job(s), not 1"
    ]


@pytest.mark.parametrize(
    ("value", "count", "ids"),
    [
        ("0", 2, [0]),
        ("1", 2, [1]),
        ("0-3", 8, [0, 1, 2, 3]),
        ("0,2", 4, [0, 2]),
        ("0-1, 4", 6, [0, 1, 4]),
        ("", 2, []),
        (None, 3, [0, 1, 2]),
        (None, None, None),
    ],
)
def test_shard_ids_are_read_as_the_bot_reads_them(value, count, ids):
    assert parse_shard_ids(value, count) == ids


def test_error_lines_are_found_in_a_process_log_but_not_a_line_a_kill_cut_short(tmp_path):
    process = ClusterProcess("bot", {}, tmp_path)
    log = process._open_log()  # as start() does
    log.write(b'{"level": "INFO", "logger": "bot", "message": "Connected"}\n')
    log.write(b'{"level": "ERROR", "logger": "bot.jobs", "message": "Job 1 driver stopped"}\n')
    log.write(b"Traceback (most recent call last):\n")
    log.write(b'{"level": "WARNING", "logger": "bot", "mess')  # SIGKILL in the middle of a line
    log.flush()
    process._mark("killed")
    process._open_log()  # started again
    process.close()
    assert process.errors() == [
        "bot: ERROR bot.jobs: Job 1 driver stopped",
        "bot: RAW : Traceback (most recent call last):",
    ]
    assert process.errors(expected=["driver stopped", "Traceback"]) == []
