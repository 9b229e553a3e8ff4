"""No statement the bot runs for a job, a command or its housekeeping reads the whole history.

Every statement the real bot sends to SQLite while it serves jobs of every kind (imagine by webhook and by
polling, a remix and its re-roll, a cancel, a restart with work pending, /history, /quota, /config) is traced,
then asked for its plan: a full scan of `jobs` or `job_inputs` would cost time that grows with every job ever
made (1,000,000 jobs of history made one such statement take 387 ms on the single database thread).
"""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

import aiosqlite
import pytest

import bot.storage.sqlite
from tests.e2e.conftest import BotRunner
from tests.e2e.test_remix import photo, remix
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab, Queued

GROWING_TABLES = ("jobs", "job_inputs")
FULL_SCAN = re.compile(r"^SCAN (\w+)")
LEADING_COMMENTS = re.compile(r"^(\s*--[^\n]*\n)*\s*")
QUERY = re.compile(r"^(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.I)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the bot's SQLite connection runs, values inlined (as SQLite expands them)."""
    statements: list[str] = []
    connect = aiosqlite.connect

    def tracing_connect(*args: Any, **kwargs: Any) -> Any:
        connection = connect(*args, **kwargs)
        original = connection._connect

        async def connect_and_trace() -> Any:
            opened = await original()
            await opened.set_trace_callback(statements.append)
            return opened

        connection._connect = connect_and_trace  # type: ignore[method-assign]
        return connection

    monkeypatch.setattr(bot.storage.sqlite.aiosqlite, "connect", tracing_connect)
    return statements


def shape(statement: str) -> str:
    """The statement with its values taken out, so that one shape is reported once."""
    return re.sub(r"'(?:[^']|'')*'|X'[0-9A-F]*'|\b\d+(?:\.\d+)?\b", "?", statement)


def full_scans(database: sqlite3.Connection, statement: str) -> list[str]:
    """The plan's steps that read a growing table whole. Two scans are bounded, and allowed: a scan of a partial
    index (it holds only the work under way, e.g. the jobs not yet shown), and a scan in index order that a
    LIMIT stops (no sort of the whole table first)."""
    partial = {
        row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%WHERE%'")
    }
    plan = [row[3] for row in database.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()]
    sorts = any("TEMP B-TREE" in step for step in plan)
    scans = []
    for step in plan:
        match = FULL_SCAN.match(step)
        if match is None or match.group(1) not in GROWING_TABLES:
            continue
        index = re.search(r"USING (?:COVERING )?INDEX (\w+)", step)
        if index is not None and index.group(1) in partial:
            continue
        if index is not None and re.search(r"\bLIMIT\b", statement) and not sorts:
            continue
        scans.append(step)
    return scans


async def command(discord_server: FakeDiscord, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    interaction = await discord_server.invoke_slash(name, options or {}, **kwargs)
    await interaction.wait_callback()
    return interaction


async def test_no_statement_scans_the_history(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, traced: list[str]
):
    runner.with_webhooks()
    await runner.start()
    # Imagine, finished by a webhook; a remix and a re-roll of it (its stored picture is copied).
    await command(discord_server, "imagine", {"prompt": "a fox"})
    await runner.wait_posted()
    remixed = await remix(discord_server, photo(640, 480))
    remix_job = await runner.wait_posted((await runner.store.ids())[-1])
    pressed = await discord_server.invoke_component(remixed.original.id, f"job:reroll:{remix_job.id}")
    await pressed.wait_callback()
    await runner.jobs.wait_idle()
    # A job still at ModelsLab and one waiting in line, a cancel, then a restart that picks them up.
    modelslab.default_behaviour = Queued(eta=300)
    await runner.restart(modelslab_max_queued=1)
    await command(discord_server, "imagine", {"prompt": "running"})
    waiting = await command(discord_server, "imagine", {"prompt": "waiting"})
    await command(discord_server, "imagine", {"prompt": "also waiting"})
    waiting_id = (await runner.store.ids())[-2]
    await discord_server.wait_for_message(lambda m: m.id == waiting.original.id and bool(m.components))
    cancel = await discord_server.invoke_component(waiting.original.id, f"job:cancel:{waiting_id}")
    await cancel.wait_callback()
    await runner.restart(modelslab_max_queued=1)
    # What members and admins read: their history, their quota, the server's settings; and forgetting.
    await command(discord_server, "history", subcommand="show")
    await command(discord_server, "history", subcommand="export")
    await command(discord_server, "quota")
    await command(discord_server, "config", subcommand="show", user_id=discord_server.moderator_id)
    await runner.app.bot.history.forget(discord_server.member_id, time.time())  # type: ignore[union-attr]
    await runner.stop()

    statements = (LEADING_COMMENTS.sub("", s, count=1) for s in traced)
    queries = sorted({s for s in statements if QUERY.match(s) and "schema_migrations" not in s})
    assert any(s.startswith("INSERT INTO jobs") for s in queries)
    assert any("job_inputs" in s for s in queries)
    with sqlite3.connect(runner.data / "bot.sqlite3") as database:
        scanning = {shape(statement): scans for statement in queries if (scans := full_scans(database, statement))}
    assert scanning == {}, "\n".join(f"{statement}: {scans}" for statement, scans in scanning.items())
