"""The fake Discord's shards and guilds: GET /gateway/bot, IDENTIFY with a shard, each guild's events on its shard's
connection, 4010 and 4011, the IDENTIFY concurrency limit; and the real discord.py AutoShardedClient through it.

Discord's rules come from its Gateway page ("Sharding", "Max Concurrency", "Rate Limiting", the close codes 4010
Invalid shard and 4011 Sharding required) and "Get Gateway Bot" (session_start_limit).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands

from tests.fakes.discord_server import (
    DiscordErrorLog,
    FakeDiscord,
    FakeGuild,
    point_discord_py_at,
    running_bot,
    running_fake_discord,
    shard_of,
)
from tests.test_fake_discord import MiniBot, original_of, take_violations

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def discord_errors() -> Iterator[DiscordErrorLog]:
    with DiscordErrorLog() as log:
        yield log
    assert not log.records, log.formatted()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as server:
        point_discord_py_at(server, monkeypatch)
        yield server
        assert server.violations == [], server.violations


def on_shard(fake: FakeDiscord, shard_id: int, shard_count: int) -> list[int]:
    return [g for g in fake.guilds if shard_of(g, shard_count) == shard_id]


class ShardedBot(discord.AutoShardedClient):
    """A small sharded bot: one slash command that says which client answered, in which guild."""

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05, **options)
        self.name = name
        self.tree = app_commands.CommandTree(self)
        self.notes: asyncio.Queue[tuple[str, int | None]] = asyncio.Queue()

        @self.tree.command(name="where", description="Say who answers")
        async def where(interaction: discord.Interaction) -> None:
            await self.notes.put((self.name, interaction.guild_id))
            await interaction.response.send_message(f"{self.name} in {interaction.guild_id}")

    async def setup_hook(self) -> None:
        await self.tree.sync()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py waits 5 s before every IDENTIFY but the first; the fake's max_concurrency is raised instead so
        # that these shards have different rate_limit_keys and may IDENTIFY together, as Discord allows.
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Raw gateway sessions
# ----------------------------------------------------------------------------------------------------------------------


class RawSession:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def identify(self, fake: FakeDiscord, shard: list[int] | None) -> dict[str, Any] | int:
        """IDENTIFY; the READY dispatch, the op 9 frame, or the close code."""
        data: dict[str, Any] = {"token": fake.token, "intents": 1, "properties": {}}
        if shard is not None:
            data["shard"] = shard
        await self.ws.send_str(json.dumps({"op": 2, "d": data}))
        while True:
            message = await self.ws.receive(timeout=5)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code or 0
            frame = json.loads(message.data)
            self.frames.append(frame)
            if frame["op"] == 9 or frame.get("t") == "READY":
                return frame

    async def until(self, event: str, guild_id: int) -> dict[str, Any]:
        while True:
            frame = json.loads((await self.ws.receive(timeout=5)).data)
            self.frames.append(frame)
            if frame.get("t") == event and frame["d"].get("guild_id") == str(guild_id):
                return frame


async def raw_sessions(fake: FakeDiscord, count: int) -> AsyncIterator[list[RawSession]]:
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(fake.gateway_url + "?v=10&encoding=json") for _ in range(count)]
        for ws in sockets:
            hello = json.loads((await ws.receive(timeout=5)).data)
            assert hello["op"] == 10
        try:
            yield [RawSession(ws) for ws in sockets]
        finally:
            for ws in sockets:
                await ws.close()


def guild_creates(session: RawSession) -> list[int]:
    return [int(f["d"]["id"]) for f in session.frames if f.get("t") == "GUILD_CREATE"]


# ----------------------------------------------------------------------------------------------------------------------
# Guilds and GET /gateway/bot
# ----------------------------------------------------------------------------------------------------------------------


async def test_guilds_are_cheap_and_spread_over_shards(fake: FakeDiscord) -> None:
    made = fake.add_guilds(6, members=3, channels=2)
    assert len(fake.guilds) == 7 and fake.guild.id == fake.guild_id
    guild = made[0]
    assert len(guild.member_ids) == 5  # the bot, the owner, 3 members
    assert fake.bot_user_id in guild.member_roles and guild.owner_id in fake.users
    assert [fake.channels[c]["guild_id"] for c in guild.channel_ids] == [str(guild.id)] * 2
    assert fake.guild_of_channel(guild.channel_id) is guild
    assert {shard_of(g.id, 3) for g in made} == {0, 1, 2}  # consecutive guilds, consecutive shards
    assert fake.permissions_for(guild.owner_id, guild.channel_id) > fake.permissions_for(guild.member_ids[2])
    # The first guild's attributes are what they were.
    assert fake.roles is fake.guild.roles and fake.member_roles is fake.guild.member_roles
    assert fake.guild.channel_ids == [fake.channel_id, fake.second_channel_id]


async def test_gateway_bot_gives_the_url_the_shard_count_and_the_session_start_limit(fake: FakeDiscord) -> None:
    async def gateway_bot() -> dict[str, Any]:
        headers = {"Authorization": f"Bot {fake.token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{fake.api_base}/gateway/bot", headers=headers) as response,
        ):
            assert response.status == 200
            answer: dict[str, Any] = await response.json()
            return answer

    answer = await gateway_bot()
    assert answer["url"] == fake.gateway_url and answer["shards"] == 1
    assert answer["session_start_limit"] == {
        "total": 1000,
        "remaining": 1000,
        "reset_after": 86_400_000,
        "max_concurrency": 1,
    }
    fake.add_guilds(1500, members=0)
    fake.max_concurrency = 16
    answer = await gateway_bot()
    assert answer["shards"] == 2  # one per 1,000 guilds
    assert answer["session_start_limit"]["max_concurrency"] == 16
    fake.recommended_shards = 5
    assert (await gateway_bot())["shards"] == 5


# ----------------------------------------------------------------------------------------------------------------------
# IDENTIFY with a shard, over raw websockets
# ----------------------------------------------------------------------------------------------------------------------


async def test_each_shard_gets_its_guilds_and_their_events(fake: FakeDiscord) -> None:
    fake.add_guilds(5, members=0)
    fake.max_concurrency = 2
    async for zero, one in raw_sessions(fake, 2):
        ready = [await zero.identify(fake, [0, 2]), await one.identify(fake, [1, 2])]
        for shard_id, frame in enumerate(ready):
            assert isinstance(frame, dict) and frame["d"]["shard"] == [shard_id, 2]
            assert [int(g["id"]) for g in frame["d"]["guilds"]] == on_shard(fake, shard_id, 2)
        await asyncio.sleep(0)
        assert fake.shards_ready() == {2: [0, 1]}
        await fake.wait_for_shards([0, 1], 2)

        guild = on_shard(fake, 1, 2)[0]
        fake.set_permission_overwrite(fake.guilds[guild].channel_id, fake.guilds[guild].owner_id, allow=1)
        update = await one.until("CHANNEL_UPDATE", guild)
        assert update["d"]["id"] == str(fake.guilds[guild].channel_id)
        await fake.dispatch_event("GUILD_UPDATE", {"guild_id": str(on_shard(fake, 0, 2)[0]), "id": "x"})
        await zero.until("GUILD_UPDATE", on_shard(fake, 0, 2)[0])
    assert not any(f.get("t") == "CHANNEL_UPDATE" for f in zero.frames)
    assert guild_creates(zero) == on_shard(fake, 0, 2) and guild_creates(one) == on_shard(fake, 1, 2)
    assert {(d.shard, d.guild_id) for d in fake.dispatched if d.event == "GUILD_CREATE"} == {
        ((shard_of(g, 2), 2), g) for g in fake.guilds
    }


async def test_a_shard_out_of_range_is_closed_with_4010(fake: FakeDiscord) -> None:
    async for (session,) in raw_sessions(fake, 1):
        assert await session.identify(fake, [2, 2]) == 4010
    [violation] = take_violations(fake)
    assert "4010" in violation


async def test_too_many_guilds_on_one_session_is_closed_with_4011(fake: FakeDiscord) -> None:
    fake.max_guilds_per_shard = 3
    fake.add_guilds(3, members=0)  # 4 guilds
    fake.max_concurrency = 4
    async for unsharded, single, half, other_half in raw_sessions(fake, 4):
        assert await unsharded.identify(fake, None) == 4011
        assert await single.identify(fake, [0, 1]) == 4011
        assert isinstance(await half.identify(fake, [0, 2]), dict)
        assert isinstance(await other_half.identify(fake, [1, 2]), dict)
    violations = take_violations(fake)
    assert len(violations) == 2 and all("4011" in v for v in violations)


async def test_identifies_beyond_max_concurrency_get_invalid_session(fake: FakeDiscord) -> None:
    # max_concurrency 1: shards 0 and 1 share rate_limit_key 0, so one IDENTIFY per 5 s between them.
    async for zero, one, zero_again in raw_sessions(fake, 3):
        assert isinstance(await zero.identify(fake, [0, 2]), dict)
        refused = await one.identify(fake, [1, 2])
        assert isinstance(refused, dict) and refused == {"op": 9, "s": None, "t": None, "d": False}
        [violation] = take_violations(fake)  # shard 0 is connected: the bot did not space its shards
        assert "op 9" in violation and "rate_limit_key 0" in violation
        await zero.ws.close()
        await fake.wait_until_disconnected()
        # A process restarted at once meets the same answer, but it is not the bot's fault: counted, no violation.
        assert isinstance(await zero_again.identify(fake, [0, 2]), dict) and zero_again.frames[-1]["op"] == 9
    assert len(fake.identify_refusals) == 2 and fake.violations == []

    fake.max_concurrency = 2  # rate_limit_keys 0 and 1: both at once is allowed
    fake.let_identify_window_pass()
    async for zero, one in raw_sessions(fake, 2):
        assert isinstance(await zero.identify(fake, [0, 2]), dict)
        ready = await one.identify(fake, [1, 2])
        assert isinstance(ready, dict) and ready.get("t") == "READY"
    assert fake.identify_count == 3  # refused IDENTIFYs start no session


# ----------------------------------------------------------------------------------------------------------------------
# discord.py's AutoShardedClient
# ----------------------------------------------------------------------------------------------------------------------


async def test_an_auto_sharded_client_runs_two_shards_in_one_process(fake: FakeDiscord) -> None:
    guilds = fake.add_guilds(5)
    fake.recommended_shards = 2
    fake.max_concurrency = 2
    async with running_bot(ShardedBot("one-process"), fake) as bot:
        assert ("GET", "/gateway/bot") in [(r.method, r.path) for r in fake.requests]
        assert bot.shard_count == 2 and sorted(bot.shards) == [0, 1]
        assert fake.shards_ready() == {2: [0, 1]}
        assert sorted(g.id for g in bot.guilds) == sorted(fake.guilds)
        assert all(g.shard_id == shard_of(g.id, 2) for g in bot.guilds)

        for guild in (guilds[0], guilds[1], fake.guild):
            interaction = await fake.invoke_slash("where", guild_id=guild.id)
            assert await asyncio.wait_for(bot.notes.get(), 5) == ("one-process", guild.id)
            await interaction.wait_callback()
            assert original_of(interaction).content == f"one-process in {guild.id}"
            assert interaction.user_id in guild.member_ids and interaction.channel_id == guild.channel_id
            [sent] = [d for d in fake.dispatched if d.event == "INTERACTION_CREATE" and d.guild_id == guild.id]
            assert sent.shard == (shard_of(guild.id, 2), 2)


async def test_two_processes_each_with_one_shard_receive_only_their_guilds(fake: FakeDiscord) -> None:
    guilds = fake.add_guilds(4)
    fake.max_concurrency = 2  # shards 0 and 1 have different rate_limit_keys: they may start together
    first = ShardedBot("first", shard_count=2, shard_ids=[0])
    second = ShardedBot("second", shard_count=2, shard_ids=[1])
    async with running_bot(first, fake), running_bot(second, fake):
        await fake.wait_for_shards([0, 1], 2)
        assert ("GET", "/gateway/bot") not in [(r.method, r.path) for r in fake.requests]  # shard_count was given
        assert sorted(g.id for g in first.guilds) == on_shard(fake, 0, 2)
        assert sorted(g.id for g in second.guilds) == on_shard(fake, 1, 2)
        for guild in [*guilds, fake.guild]:
            owner, expected = (first, "first") if shard_of(guild.id, 2) == 0 else (second, "second")
            interaction = await fake.invoke_slash("where", guild_id=guild.id)
            assert await asyncio.wait_for(owner.notes.get(), 5) == (expected, guild.id)
            await interaction.wait_callback()
        assert first.notes.empty() and second.notes.empty()
    assert fake.identify_refusals == []


async def test_a_plain_client_in_more_than_2500_guilds_must_shard(fake: FakeDiscord) -> None:
    fake.add_guilds(2500, members=0)  # 2,501 guilds with the first one
    with pytest.raises(discord.ConnectionClosed) as closed:
        async with running_bot(MiniBot(fake.guild_id), fake):
            pass
    assert closed.value.code == 4011
    [violation] = take_violations(fake)
    assert "2501 guilds" in violation and "4011" in violation

    fake.let_identify_window_pass()
    fake.max_concurrency = 2
    async with running_bot(ShardedBot("sharded", shard_count=2), fake) as bot:
        assert len(bot.guilds) == 2501
        counts = {shard_id: len(on_shard(fake, shard_id, 2)) for shard_id in (0, 1)}
        assert all(count <= 2500 for count in counts.values())


def test_guild_of_channel_and_shard_of() -> None:
    assert shard_of(0, 3) == 0 and shard_of(5 << 22, 3) == 2
    guild = FakeGuild(id=7 << 22, name="g", owner_id=1, bot_role_id=2, channel_ids=[9])
    assert guild.shard_id(4) == 3 and guild.channel_id == 9
