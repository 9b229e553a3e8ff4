"""`python -m bot` on PostgreSQL as an admin runs it: `db upgrade|current|record-settings|copy`, a process that
refuses to start because its MODELSLAB_MAX_QUEUED differs from the other processes', and a full disk in the
member's words."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from bot.__main__ import main
from bot.guilds.rules import Limits
from bot.jobs.model import JobStatus
from bot.settings import SettingsError
from bot.storage import copy as copy_module
from bot.storage.copy import copy_sqlite_to_postgres
from bot.storage.migrations import available_migrations, migrations_directory
from bot.storage.ports import StorageError
from bot.storage.postgres import PostgresStorage
from bot.storage.sqlite import SqliteStorage
from tests.e2e.conftest import BotRunner
from tests.e2e.test_process import ROOT, bot_environment, run_module
from tests.unit.test_storage import new_job

SECRET_KEY = "test-secret-key-0123456789abcdef"
BIG = 2**62 + 11  # past 2**53, where a float would lose an id
KEEPER, FORGETTER = BIG + 11, BIG + 12  # two of the members: one keeps their history, one forgets it
PASSWORD = "s3cret-db-password"  # the throwaway server trusts everyone: a password it ignores, to look for in output


def with_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"postgres:{PASSWORD}@{parts.hostname}:{parts.port}"))


def database_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {**keep, "PYTHONPATH": str(ROOT), "DATABASE_PATH": str(tmp_path / "bot.sqlite3"), **extra}


@pytest.fixture
def database(postgres_url: str) -> str:
    """This module's scenarios run on PostgreSQL only."""
    return postgres_url


async def test_db_upgrade_and_current_serve_postgresql(tmp_path, empty_postgres_url):
    env = database_environment(tmp_path, DATABASE_URL=with_password(empty_postgres_url), SECRET_KEY=SECRET_KEY)
    latest = available_migrations(migrations_directory("postgresql"))[-1]
    database = urlsplit(empty_postgres_url).path.lstrip("/")

    code, output = await run_module("db", "upgrade", env=env, cwd=tmp_path)
    assert code == 0, output
    assert "applied 0001_jobs" in output and f"applied {latest.version:04d}_{latest.name}" in output
    code, output = await run_module("db", "current", env=env, cwd=tmp_path)
    assert code == 0, output
    assert f'schema version {latest.version} (PostgreSQL database "{database}" on 127.0.0.1:' in output
    assert PASSWORD not in output and not (tmp_path / "bot.sqlite3").exists()  # SQLite untouched


def test_without_a_secret_key_the_database_commands_refuse_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://bot:{PASSWORD}@127.0.0.1:1/imagine")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    assert main(["db", "current"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "SECRET_KEY is required with DATABASE_URL" in error
    assert PASSWORD not in error


async def test_a_process_with_another_max_queued_refuses_to_start(
    runner: BotRunner, discord_server, modelslab, tmp_path
):
    url = runner.overrides["database_url"] = with_password(runner.overrides.get("database_url") or "")
    await runner.start()  # the first process records its MODELSLAB_MAX_QUEUED (5, the default)
    await runner.stop()

    env = bot_environment(discord_server, modelslab, tmp_path, DATABASE_URL=url, SECRET_KEY=SECRET_KEY)
    code, output = await run_module(env={**env, "MODELSLAB_MAX_QUEUED": "10"}, cwd=tmp_path)
    assert code == 2, output
    assert output.strip().splitlines()[-1] == (
        "error: MODELSLAB_MAX_QUEUED is 10 here but 5 for the other processes of this bot (recorded in the "
        "database), and they must all use the same: set MODELSLAB_MAX_QUEUED=5, or, to change it, stop every "
        "process and run `python -m bot db record-settings` with the new value."
    )
    assert PASSWORD not in output and "Traceback" not in output

    code, output = await run_module("db", "record-settings", env={**env, "MODELSLAB_MAX_QUEUED": "10"}, cwd=tmp_path)
    assert code == 0 and "MODELSLAB_MAX_QUEUED=10 recorded for every process" in output, output
    await runner.start(modelslab_max_queued=10)
    with pytest.raises(SettingsError, match="MODELSLAB_MAX_QUEUED is 5 here but 10"):
        await runner.restart()


async def test_a_full_disk_on_postgresql_is_the_same_plain_sentence(runner: BotRunner, discord_server, modelslab, logs):
    logs.expected_errors.append("disk is full")
    await runner.start()
    # PostgreSQL's own error for a full disk (SQLSTATE 53100), raised where a real one would be: on the write.
    await runner.sql(
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; END $$"
    )
    await runner.sql("CREATE TRIGGER disk_full BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION disk_full()")
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a full disk"})
    await interaction.wait_callback()
    assert interaction.original.flags & 64
    assert "The bot's disk is full, so nothing was stored or sent to ModelsLab" in interaction.original.content
    assert await runner.job_count() == 0 and modelslab.submissions() == []


# ---------------------------------------------------------------------------------------------- db copy


async def grow_sqlite_bot(path: Path) -> None:
    """A SQLite bot that has lived: jobs in every state, pictures, servers' settings and keys, presets, role limits,
    blocklists, members' settings, forgotten usage, and ids past 2**53."""
    big = BIG
    now = time.time()
    async with SqliteStorage.open(path) as storage:
        jobs, guilds = storage.jobs, storage.guilds
        for guild in (1, big):
            await guilds.update(
                guild,
                api_key_ciphertext=secrets.token_bytes(60),
                api_key_last4="wxyz",
                guild_daily=50,
                allowed_channels_json=f"[{big + 1}]",
                default_model="sdxl",
            )
            await guilds.set_role_limit(guild, big + 2, 20)
            await guilds.add_blocklist_rule(guild, "gore", added_by=big + 3)
            await guilds.save_preset(guild, "wide", "--ar 16:9 --steps 30", created_by=big + 3)
        for n in range(40):
            job_guild = (1, big, None)[n % 3]
            job = new_job(f"{n:032x}", guild_id=job_guild, user_id=big + 10 + n % 4, created_at=now - 1000 + n)
            assert await jobs.insert_within_limits(job, Limits(guild_daily=50))
            state = n % 6
            if state == 0:
                continue  # queued
            await jobs.mark_submitting(job.id, api_key_ciphertext=secrets.token_bytes(48))
            if state == 1:
                continue  # submitting
            await jobs.mark_processing(job.id, modelslab_id=str(n), eta_at=now + 9, fetch_url=None, meta={"n": n})
            if state == 2:
                continue  # processing
            if state == 5:
                await jobs.finish_failure(job.id, kind="model_not_found", detail="no such model")
            else:
                await jobs.finish_success(
                    job.id,
                    modelslab_id=str(n),
                    output_urls=[f"https://cdn.example/{n}.png"],
                    proxy_urls=[],
                    meta={"seed": 4294967295},
                    seed=4294967295,
                    generation_time=2.25,
                    charged_images=1,
                )
            if state in (4, 5):
                await jobs.mark_posted(job.id, image_count=1 if state == 4 else 0, message_id=big + 100 + n)
            await jobs.save_input(job.id, secrets.token_bytes(5000 + n), 64, 64)
        for guild in (1, big):
            await storage.member_defaults.save(guild, KEEPER, {"steps": 12, "flags": "--tomesd yes"}, now)
            await storage.member_defaults.save(guild, FORGETTER, {"model": "fluxdev", "guidance": 7.5}, now)
        assert await storage.forget_member(FORGETTER, now) > 0  # forgotten jobs and today's usage carried over
        await storage.record_shared_setting("MODELSLAB_MAX_QUEUED", "5")
        # The shared line's own tables: who was served, a pause, a payload sent.
        waiting = [job for job in await jobs.needing_work() if job.status is JobStatus.QUEUED]
        await storage.queue.enqueue(waiting[0].id, "key-a", first=True)
        await storage.queue.grant("key-a", 5, now)
        await storage.queue.pause("key-a", now + 30)
        assert await storage.queue.claim_payload("key-a", "payload", now, 30) is None


def sqlite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as raw:
        tables = [
            row[0]
            for row in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('schema_migrations')"
            )
        ]
        return {table: sorted(raw.execute(f"SELECT * FROM {table}").fetchall(), key=repr) for table in tables}


async def postgres_rows(url: str, tables: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return {
            table: sorted((tuple(row) for row in await connection.fetch(f"SELECT * FROM {table}")), key=repr)
            for table in tables
        }
    finally:
        await connection.close()


async def test_db_copy_moves_every_row_byte_for_byte_in_small_batches(tmp_path, empty_postgres_url, monkeypatch):
    source = tmp_path / "bot.sqlite3"
    await grow_sqlite_bot(source)
    monkeypatch.setattr(copy_module, "BATCH_ROWS", 7)  # many batches, and a last one that is full or not
    monkeypatch.setattr(copy_module, "BATCH_PICTURES", 3)
    lines: list[str] = []

    counts = await copy_sqlite_to_postgres(source, empty_postgres_url, report=lines.append)

    expected = sqlite_rows(source)
    assert counts == {table: len(rows) for table, rows in expected.items()}
    assert counts["jobs"] == 40
    assert all(counts[table] for table in expected)  # every table had something to copy
    assert await postgres_rows(empty_postgres_url, list(expected)) == expected  # ids, times, bytes: all equal
    assert f"jobs: {counts['jobs']} row(s)" in lines

    # The copy is a working bot's database: the same jobs to carry on, the same servers, the same quotas.
    async with SqliteStorage.open(source) as before, PostgresStorage.open(empty_postgres_url) as after:
        assert [j.id for j in await after.jobs.needing_work()] == [j.id for j in await before.jobs.needing_work()]
        ids = await after.jobs.ids()
        assert [await after.jobs.get(i) for i in ids] == [await before.jobs.get(i) for i in ids]
        assert {job.status for job in [await after.jobs.get(i) for i in ids] if job} == set(JobStatus)
        assert await after.jobs.sealed_key(ids[1]) == await before.jobs.sealed_key(ids[1]) is not None
        assert await after.guilds.config(BIG) == await before.guilds.config(BIG)
        for member in (KEEPER, FORGETTER):
            assert await after.jobs.usage(BIG, member, time.time()) == await before.jobs.usage(BIG, member, time.time())
            assert await after.member_defaults.get(1, member) == await before.member_defaults.get(1, member)
        assert await after.shared_settings() == {"MODELSLAB_MAX_QUEUED": "5"}

    with pytest.raises(StorageError, match=r"already holds data \(in shared_settings, guild_settings, "):
        await copy_sqlite_to_postgres(source, empty_postgres_url)


def test_db_copy_from_the_command_line_prints_the_counts_and_refuses_a_filled_database(
    tmp_path, empty_postgres_url, monkeypatch, capsys
):
    asyncio.run(grow_sqlite_bot(tmp_path / "bot.sqlite3"))
    expected = sqlite_rows(tmp_path / "bot.sqlite3")
    target = with_password(empty_postgres_url)
    env = database_environment(tmp_path)

    copied = subprocess.run(
        [sys.executable, "-m", "bot", "db", "copy", "--to", target],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = copied.stdout + copied.stderr
    assert copied.returncode == 0, output
    for table, rows in expected.items():
        assert f"\n{table}: {len(rows)} row(s)\n" in output
    assert f"copied {sum(len(rows) for rows in expected.values())} row(s)" in output
    assert PASSWORD not in output

    # The refusals, through the same entry point in this process (a process each would only cost time).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_PATH", env["DATABASE_PATH"])
    for argv, words in [
        (["db", "copy", "--to", target], "already holds data (in shared_settings, guild_settings, "),
        (["db", "copy"], "db copy needs the PostgreSQL database to fill: --to postgresql://"),
        (["db", "copy", "--to", "sqlite:///x.db"], "--to postgresql://"),
    ]:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and words in error and PASSWORD not in error, error
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "nowhere" / "bot.sqlite3"))
    assert main(["db", "copy", "--to", target]) == 2
    assert "There is no SQLite database at" in capsys.readouterr().err


async def test_check_names_the_database_without_its_password_and_a_disagreeing_process(tmp_path, postgres_url):
    from bot.operations import database_status
    from bot.settings import Settings

    def settings(**values: Any) -> Settings:
        values.update(discord_token="t", secret_key=SECRET_KEY, database_url=with_password(postgres_url))
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    finding = await database_status(settings())
    assert finding.ok and finding.text.startswith('PostgreSQL database "test_') and PASSWORD not in finding.text
    async with PostgresStorage.open(postgres_url) as storage:
        await storage.record_shared_setting("MODELSLAB_MAX_QUEUED", "5")
    assert (await database_status(settings(modelslab_max_queued=5))).ok
    finding = await database_status(settings(modelslab_max_queued=15))
    assert not finding.ok and "MODELSLAB_MAX_QUEUED is 15 here but 5" in finding.text
