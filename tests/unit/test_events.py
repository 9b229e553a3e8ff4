"""Several processes on one PostgreSQL hear each other's changes: a server's /config and a member's /settings reach
every process's cache at once, and a process whose event connection was lost drops its caches when it is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from bot.guilds.admin import GuildAdmin
from bot.guilds.keybox import KeyBox
from bot.requests.member_defaults import MemberDefaultsService
from bot.storage.postgres import PostgresStorage

pytestmark = pytest.mark.usefixtures("postgres_url")


def heard(storage: PostgresStorage, topic: str | None = None) -> asyncio.Event:
    """Set once the process hears `topic` (or, with None, once it is back after losing its event connection). The
    services subscribed first, so by then they have handled it."""
    event = asyncio.Event()
    if topic is None:
        storage.events.on_reconnect(event.set)
    else:
        storage.events.subscribe(topic, lambda _detail: event.set())
    return event


@pytest.fixture
async def processes(postgres_url: str) -> AsyncIterator[list[PostgresStorage]]:
    """Two processes' storages (two pools, two event connections) on one database."""
    async with AsyncExitStack() as stack:
        storages = [await stack.enter_async_context(PostgresStorage.open(postgres_url)) for _ in range(2)]
        for storage in storages:
            await storage.events.start()
        yield storages


def admin(storage: PostgresStorage) -> GuildAdmin:
    return GuildAdmin(
        guilds=storage.guilds,
        jobs=storage.jobs,
        keybox=KeyBox(b"k" * 32),
        client=None,  # type: ignore[arg-type]  # no key is checked here
        default_api_key=None,
        allow_default_key=False,
        events=storage.events,
    )


async def test_a_config_change_reaches_the_other_processes_cache_at_once(processes: list[PostgresStorage]):
    here, there = admin(processes[0]), admin(processes[1])
    assert (await there.config(7)).guild_daily == 0  # cached there now
    changed = heard(processes[1], "guild")
    await here.set_limits(7, guild_daily=20)
    await asyncio.wait_for(changed.wait(), timeout=5)
    assert (await there.config(7)).guild_daily == 20


async def test_a_members_settings_reach_the_other_process(processes: list[PostgresStorage]):
    here = MemberDefaultsService(processes[0].member_defaults, processes[0].events)
    there = MemberDefaultsService(processes[1].member_defaults, processes[1].events)
    assert (await there.get(7, 3)).steps is None
    changed = heard(processes[1], "member")
    await here.update(7, 3, steps=12)
    await asyncio.wait_for(changed.wait(), timeout=5)
    assert (await there.get(7, 3)).steps == 12
    forgotten = heard(processes[1], "member-forgotten")
    await processes[0].member_defaults.delete(7, 3)
    await here.forget_member(3)
    await asyncio.wait_for(forgotten.wait(), timeout=5)
    assert (await there.get(7, 3)).steps is None


async def test_a_process_that_lost_its_event_connection_reads_everything_afresh(processes: list[PostgresStorage]):
    """What was changed while it could not hear (the notification is lost for good) must not stay stale."""
    there = admin(processes[1])
    assert (await there.config(7)).guild_daily == 0
    back = heard(processes[1])
    await processes[0].guilds.update(7, guild_daily=30)  # no event: as if sent while the listener was down
    listener_pid = processes[1].events._connection.get_server_pid()  # type: ignore[union-attr]
    await processes[0].db.execute("SELECT pg_terminate_backend($1)", listener_pid)
    await asyncio.wait_for(back.wait(), timeout=20)
    assert (await there.config(7)).guild_daily == 30
