"""Faults: the webhook receiver under fuzzing, SQLite locked or full, and the bot process killed at each stage."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import threading
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.jobs.model import JobStatus
from bot.storage import StorageFull
from tests.cluster import eventually
from tests.e2e.conftest import BotRunner, attachments_of, free_port
from tests.e2e.test_process import bot_environment
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab, Hang, Queued

CALLBACK = r"^/interactions/\d+/[^/]+/callback$"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"status": st.sampled_from(["success", "failed", "processing", "", "x"])},
        optional={"id": JSON_VALUES, "track_id": JSON_VALUES, "output": JSON_VALUES, "meta": JSON_VALUES},
    ).map(lambda v: json.dumps(v).encode()),
)
PATH_PARTS = st.text(alphabet="abcdef0123456789-_%./", min_size=0, max_size=40)
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


async def test_the_webhook_receiver_never_errors_and_never_changes_state_under_fuzzing(
    runner: BotRunner, discord_server, modelslab
):
    base = runner.with_webhooks()
    modelslab.script(Queued(eta=300, webhook="never"))
    await runner.start()
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "fuzzed"})
    await interaction.wait_callback()
    job = await runner.generating(interaction)
    assert runner.app is not None
    good_path = f"/webhooks/modelslab/{job.id}/{runner.app.signer.token_for(job.id)}"
    fetches = len(modelslab.fetches())
    statuses: list[int] = []

    async with aiohttp.ClientSession() as session:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            path=st.one_of(
                PATH_PARTS.map(lambda p: f"/webhooks/modelslab/{p}"),
                PATH_PARTS.map(lambda p: f"/webhooks/modelslab/{job.id}/{p}"),
                PATH_PARTS.map(lambda p: "/" + p),
            ),
            body=BODIES,
            method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
            header=HEADER_VALUES,
        )
        def attack(path: str, body: bytes, method: str, header: str) -> None:
            future = asyncio.run_coroutine_threadsafe(send(method, path, body, header), loop)
            statuses.append(future.result(timeout=10))

        async def send(method: str, path: str, body: bytes, header: str) -> int:
            headers = {"Content-Type": header or "application/json", "X-Anything": header}
            async with session.request(method, base + path, data=body, headers=headers) as response:
                return response.status

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(attack)
        # Bodies on the job's own signed URL with another job's track_id, or no status: refused, no change.
        for body in (b'{"status": "success", "track_id": "' + b"f" * 32 + b'"}', b"[]", b"{}"):
            statuses.append(await send("POST", good_path, body, "application/json"))

    assert statuses and all(status < 500 for status in statuses), sorted(set(statuses))
    assert await runner.store.get(job.id) == job  # nothing changed
    assert len(modelslab.fetches()) == fetches  # and nothing was fetched on a forged call


@asynccontextmanager
async def sqlite_locked(path: Path) -> AsyncIterator[threading.Event]:
    """Another connection holds SQLite's write lock (`BEGIN EXCLUSIVE`) until the block ends, or until the event it
    gives is set."""
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with sqlite3.connect(path, timeout=5) as other:
            other.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(30)
            other.rollback()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 5)
        yield release
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 5)


@asynccontextmanager
async def job_row_locked(runner: BotRunner, database: str | None, job_id: str) -> AsyncIterator[None]:
    """Another connection holds the job's row (SQLite: the whole database) until the block ends, so that the bot's
    next write of it fails: on SQLite its connection is made to give up on a lock after 50 ms, on PostgreSQL its
    `lock_timeout` (5 s) runs out."""
    if database is None:
        await runner.sql("PRAGMA busy_timeout = 50")
        async with sqlite_locked(runner.data / "bot.sqlite3"):
            yield
        return
    import asyncpg

    other = await asyncpg.connect(database)
    try:
        async with other.transaction():
            await other.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            yield
    finally:
        await other.close()


async def test_a_database_locked_by_another_process_for_a_moment_only_delays(
    runner, discord_server, modelslab, tmp_path
):
    await runner.start()
    async with sqlite_locked(runner.data / "bot.sqlite3") as release:
        asyncio.get_running_loop().call_later(0.8, release.set)
        interaction = await discord_server.invoke_slash("imagine", {"prompt": "patience"})
        await interaction.wait_callback()
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1  # within Discord's 3 s all the same (the fake checks)


@pytest.mark.also_on_postgresql
async def test_a_job_whose_driver_stopped_on_a_database_error_is_carried_on_without_a_restart(
    runner, discord_server, modelslab, logs, database
):
    """The database refuses the write that records a finished result (locked too long; on PostgreSQL a lock timeout
    or a connection lost in the middle of a change do the same): that job's driver stops, the process goes on. At
    the next lease beat the job is carried on from its row, as a restart would: the image is posted, once, and
    nothing is sent twice."""
    logs.expected_errors.append("driver stopped on an unexpected error")
    modelslab.script(Queued(eta=300, webhook="never"))
    await runner.start(lease_seconds=1.5)  # a beat every 0.5 s
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a lighthouse, patiently"})
    await interaction.wait_callback()
    job = await runner.generating(interaction)
    assert runner.app is not None and job.modelslab_id is not None
    fetches = len(modelslab.fetches())
    async with job_row_locked(runner, database, job.id):
        modelslab.complete(job.modelslab_id)
        runner.app.jobs.wake(job.id)  # as a webhook would: the driver fetches now, then cannot record the result
        await eventually(lambda: "driver stopped on an unexpected error" in logs.text, "the driver to stop", timeout=15)
    posted = await runner.wait_posted(job.id, timeout=15)
    assert posted.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1
    assert "whose driver had stopped on an error" in logs.text
    assert len(modelslab.submissions()) == 1  # carried on from its row: never sent again
    # One look by the driver that stopped, one by the job carried on: at once, not at its ETA five minutes away.
    assert len(modelslab.fetches()) == fetches + 2


async def test_lease_beats_during_an_acknowledgement_leave_the_job_to_its_command(
    runner, discord_server, modelslab, logs
):
    """A job is stored before its command is acknowledged and has no driver until then, on purpose: the lease beats
    that come meanwhile (three here, while Discord takes 1.6 s to answer) do not take it for a job whose driver
    stopped, which would look for its status message and start a second line of work on it."""
    await runner.start(lease_seconds=1.5)  # a beat every 0.5 s
    discord_server.hold_next("POST", CALLBACK, 1.6)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a slow answer"})
    job = await runner.wait_posted(await runner.first_job_id_from_db(timeout=10), timeout=10)
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1 and len(modelslab.submissions()) == 1
    assert "whose driver had stopped" not in logs.text
    lookups = [r for r in discord_server.requests if r.method == "GET" and r.path.endswith("/messages/@original")]
    assert lookups == []


async def test_a_full_disk_is_a_clear_error_and_leaves_no_half_written_job(runner, discord_server, modelslab, logs):
    logs.expected_errors.append("disk is full")
    await runner.start()
    assert runner.app is not None
    row = await runner.sql_one("PRAGMA page_count")
    assert row is not None
    # As if the disk were full: the file may not grow past a few more pages, and those are filled up.
    await runner.sql(f"PRAGMA max_page_count = {row[0] + 4}")
    with pytest.raises(StorageFull):
        while True:  # old, anonymous job rows fill every page the jobs table can still use
            await runner.sql(
                "INSERT INTO jobs (id, kind, channel_id, user_id, request_json, api_flavour, status, created_at,"
                " deadline_at, updated_at, posted_at) VALUES (hex(randomblob(16)), 'text2img', 0, 0,"
                " '{\"filler\": \"' || hex(zeroblob(300)) || '\"}', 'v6', 'failed', 0, 0, 0, 0)"
            )
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a" + "x" * 1900})
    await interaction.wait_callback()
    assert interaction.original.flags & 64
    assert "The bot's disk is full, so nothing was stored or sent to ModelsLab" in interaction.original.content
    await runner.sql("PRAGMA max_page_count = 1073741823")
    row = await runner.sql_one("SELECT COUNT(*) FROM jobs WHERE user_id != 0")
    assert row is not None and row[0] == 0  # no half-written job
    assert modelslab.submissions() == []


# ---------------------------------------------------------------------------------------------- SIGKILL


class BotProcess:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, discord_server: FakeDiscord) -> None:
        identified = discord_server.identify_count
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", env=self.env, cwd=self.cwd, stdout=PIPE, stderr=STDOUT
        )
        await discord_server.wait_until_ready(after=identified, timeout=30)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> str:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(self.process.communicate(), timeout=60)
        return output.decode() if output else ""


async def generating(discord_server: FakeDiscord, interaction) -> None:
    await discord_server.wait_for_message(
        lambda m: m.id == (interaction.original.id if interaction.original else -1) and "Generating" in m.content,
        timeout=15,
    )


def rows(data: Path) -> list[tuple]:
    with sqlite3.connect(data / "bot.sqlite3") as database:
        return database.execute("SELECT status, charged_images, posted_at IS NOT NULL FROM jobs").fetchall()


async def killed_and_restarted(
    discord_server: FakeDiscord, modelslab: FakeModelsLab, tmp_path: Path, stage: str
) -> tuple[list[tuple], int]:
    port = free_port()
    env = bot_environment(
        discord_server, modelslab, tmp_path / "data", WEBHOOK_PORT=str(port), PUBLIC_URL=f"http://127.0.0.1:{port}"
    )
    bot = BotProcess(env, tmp_path)
    await bot.start(discord_server)
    try:
        if stage == "after the acknowledgement":
            modelslab.script(Hang(2.0, then=Queued(eta=1, ready_after_seconds=1)))
            interaction = await discord_server.invoke_slash("imagine", {"prompt": stage})
            await interaction.wait_callback()
            await modelslab.wait_for_request(r"text2img$")  # the submit call is under way, unanswered
            await bot.kill()
        elif stage == "after the submission":
            modelslab.script(Queued(eta=1))
            interaction = await discord_server.invoke_slash("imagine", {"prompt": stage})
            await interaction.wait_callback()
            call = await modelslab.wait_for_submission()
            await generating(discord_server, interaction)  # the bot has recorded ModelsLab's answer
            await bot.kill()
            assert call.job_id is not None
            modelslab.complete(call.job_id)  # its webhook finds nobody: the poll after the restart must do
        else:  # after the webhook arrived, before the post
            modelslab.script(Queued(eta=300))
            interaction = await discord_server.invoke_slash("imagine", {"prompt": stage})
            await interaction.wait_callback()
            call = await modelslab.wait_for_submission()
            await generating(discord_server, interaction)
            discord_server.fail_next("PATCH", r"/messages/@original$", 500, times=5)  # the post keeps failing
            assert call.job_id is not None
            modelslab.complete(call.job_id)
            await modelslab.wait_for_webhook_delivery(lambda d: d.status == 200)
            await discord_server.wait_for_request("PATCH", r"/messages/@original$", lambda r: r.injected)
            await bot.kill()
        await bot.start(discord_server)
        message = await discord_server.wait_for_message(
            lambda m: (
                m.id == (interaction.original.id if interaction.original else -1)
                and (bool(m.attachments) or "❌" in m.content)
            ),
            timeout=30,
        )
        posted = len(message.attachments)
    finally:
        output = await bot.stop()
        print(output[-3000:])  # shown if the test fails
    return rows(tmp_path / "data"), posted


async def test_killed_after_the_acknowledgement_the_job_is_resolved_by_its_webhook(discord_server, modelslab, tmp_path):
    table, images = await killed_and_restarted(discord_server, modelslab, tmp_path, "after the acknowledgement")
    assert table == [("succeeded", 1, 1)] and images == 1
    assert len(modelslab.submissions()) == 1  # never sent blindly again


async def test_killed_after_the_submission_the_job_is_polled_and_posted_once(discord_server, modelslab, tmp_path):
    table, images = await killed_and_restarted(discord_server, modelslab, tmp_path, "after the submission")
    assert table == [("succeeded", 1, 1)] and images == 1
    assert len(modelslab.submissions()) == 1


async def test_killed_before_the_post_the_result_is_posted_once(discord_server, modelslab, tmp_path):
    table, images = await killed_and_restarted(discord_server, modelslab, tmp_path, "before the post")
    assert table == [("succeeded", 1, 1)] and images == 1
    assert len([m for m in discord_server.messages.values() if m.attachments]) == 1
