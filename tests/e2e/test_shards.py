"""Gateway shards: one process with every shard, `SHARD_COUNT=auto`, processes taking turns to IDENTIFY, and a worker
with no shard. Through the real discord.py (`AutoShardedBot`) against the fake Discord, which delivers each server's
events on its shard's connection and refuses IDENTIFYs closer than Discord allows."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import aiohttp
import pytest

from bot.app import running_app
from bot.discord.shards import shard_of
from bot.jobs.model import JobStatus
from tests.e2e.conftest import BOT_TOKEN, FAST, BotRunner, free_port
from tests.e2e.test_process import bot_environment
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab


def two_guilds_on_two_shards(discord_server: FakeDiscord) -> list[int]:
    second = discord_server.add_guild(members=1)
    guilds = [discord_server.guild_id, second.id]
    assert sorted(shard_of(g, 2) for g in guilds) == [0, 1], "the fake's guilds should fall on both shards"
    return guilds


async def test_one_process_holds_every_shard_and_answers_in_every_server(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    guilds = two_guilds_on_two_shards(discord_server)
    discord_server.max_concurrency = 2  # two IDENTIFY buckets: the shards need not wait 5 s for each other
    await runner.start(shard_count=2, shard_ids="all", discord_dev_guild_id=None)
    assert discord_server.shards_ready() == {2: [0, 1]}
    for guild_id in guilds:
        interaction = await discord_server.invoke_slash(
            "imagine", {"prompt": f"a fox in {guild_id}"}, guild_id=guild_id
        )
        await interaction.wait_callback()
        assert interaction.acknowledged
    for job_id in await runner.store.ids():
        job = await runner.wait_posted(job_id)
        assert job.status is JobStatus.SUCCEEDED
    assert {job.guild_id for job in [await runner.store.get(i) for i in await runner.store.ids()] if job} == set(guilds)


async def test_auto_takes_discords_recommendation_once_for_every_process(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, postgres_url: str
):
    two_guilds_on_two_shards(discord_server)
    discord_server.recommended_shards = 2
    discord_server.max_concurrency = 2
    await runner.start(database_url=postgres_url, shard_count="auto", shard_ids="all", discord_dev_guild_id=None)
    assert discord_server.shards_ready() == {2: [0, 1]}
    assert runner.app is not None and (await runner.app.storage.shared_settings())["SHARD_COUNT"] == "2"
    # Discord recommends more later: the bot keeps the count its processes agreed on (changing it is an operator's
    # decision: `db record-settings`), so that every process routes servers to the same shards.
    discord_server.recommended_shards = 3
    await runner.restart(database_url=postgres_url, shard_count="auto", shard_ids="all", discord_dev_guild_id=None)
    assert discord_server.shards_ready() == {2: [0, 1]}


async def test_two_processes_take_turns_to_identify_when_discord_allows_one_at_a_time(
    discord_server: FakeDiscord, modelslab: FakeModelsLab, postgres_url: str, tmp_path, monkeypatch, logs
):
    """`max_concurrency` 1: Discord takes one IDENTIFY per 5 s for the whole bot, whichever process sends it. The
    fake refuses a second one within 5 s (op 9), and reports it as a violation while the first session is alive."""
    import discord

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    )
    two_guilds_on_two_shards(discord_server)
    discord_server.max_concurrency = 1
    processes = []
    async with contextlib.AsyncExitStack() as stack:
        for shard in ("0", "1"):
            runner = BotRunner(discord_server, modelslab, tmp_path / f"data-{shard}", monkeypatch)
            settings = runner.settings(
                database_url=postgres_url, shard_count=2, shard_ids=shard, discord_dev_guild_id=None, worker_id=shard
            )
            app = await stack.enter_async_context(running_app(settings, guild_ready_timeout=0.05, timings=FAST))
            processes.append((app, asyncio.create_task(app.bot.start(BOT_TOKEN))))
        await discord_server.wait_for_shards([0, 1], 2, timeout=20)
        assert discord_server.identify_refusals == []
        for app, task in processes:
            await app.jobs.close()
            await app.bot.close()
            await task
    assert logs.unexpected_errors() == []


async def test_a_worker_logs_in_without_a_gateway_session_and_is_healthy(
    discord_server: FakeDiscord, modelslab: FakeModelsLab, postgres_url: str, tmp_path
):
    port = free_port()
    env = bot_environment(
        discord_server,
        modelslab,
        tmp_path / "data",
        DATABASE_URL=postgres_url,
        SECRET_KEY="test-secret-key-0123456789abcdef",
        SHARD_COUNT="2",
        SHARD_IDS="",
        WORKER_ID="worker",
        WEBHOOK_PORT=str(port),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while not any("Logged in to Discord as" in line for line in output):
                line = await process.stdout.readline()
                assert line, "the worker stopped:\n" + "".join(output)
                output.append(line.decode())
        assert "a worker (no gateway shard of 2" in output[-1]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        assert discord_server.shards_ready() == {}  # no gateway session at all
        assert not any(r.method == "PUT" and "/commands" in r.path for r in discord_server.requests)  # no sync
    finally:
        process.terminate()
        remaining, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = "".join(output) + remaining.decode()
    assert process.returncode == 0, text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        ({"SHARD_IDS": "0"}, "SHARD_IDS needs SHARD_COUNT"),
        ({"SHARD_COUNT": "2"}, "on SQLite one process holds every shard: set SHARD_IDS=all"),
        ({"SHARD_COUNT": "2", "SHARD_IDS": "0-3"}, "shard 2 does not exist with SHARD_COUNT=2"),
        ({"SHARD_COUNT": "lots"}, "must be a number of shards from 1 to 4096, or auto"),
    ],
)
async def test_impossible_shard_settings_are_one_plain_sentence(
    discord_server: FakeDiscord, modelslab: FakeModelsLab, tmp_path, env: dict[str, Any], sentence: str
):
    from tests.e2e.test_process import run_module

    code, output = await run_module(
        env=bot_environment(discord_server, modelslab, tmp_path / "data", **env), cwd=tmp_path
    )
    assert code == 2 and sentence in output and "Traceback" not in output
