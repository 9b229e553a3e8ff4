"""The PostgreSQL migrations and their runner, on a real PostgreSQL (skipped without one, see tests/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.storage import StorageError
from bot.storage.migrations import available_migrations
from bot.storage.postgres_migrations import MIGRATIONS_DIRECTORY, current_version, upgrade

ROOT = Path(__file__).resolve().parents[2]


async def connect(url: str) -> Any:
    import asyncpg  # the postgres fixtures skip the test when it is missing

    return await asyncpg.connect(url)


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Any]:
    connection = await connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def tables_of(connection: Any) -> set[str]:
    rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


async def recorded_versions(connection: Any) -> list[int]:
    return [row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations ORDER BY 1")]


async def test_every_migration_applies_to_an_empty_database_and_the_versions_are_recorded(empty_postgres_url):
    every = available_migrations(MIGRATIONS_DIRECTORY)
    async with connected(empty_postgres_url) as connection:
        assert await current_version(connection) == 0
        assert await tables_of(connection) == set()  # finding the version out creates nothing

        applied = await upgrade(connection)

        assert [m.version for m in applied] == [m.version for m in every] == list(range(1, len(every) + 1))
        assert await current_version(connection) == every[-1].version
        assert await recorded_versions(connection) == [m.version for m in every]
        names = await connection.fetch("SELECT name FROM schema_migrations ORDER BY version")
        assert [row["name"] for row in names] == [m.name for m in every]
        assert {"jobs", "guild_settings", "job_inputs", "member_settings", "schema_migrations"} <= await tables_of(
            connection
        )


async def test_upgrading_again_changes_nothing(postgres_url):
    async with connected(postgres_url) as connection:
        before = await connection.fetch("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")

        assert await upgrade(connection) == []

        after = await connection.fetch("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        assert after == before and len(after) == len(available_migrations(MIGRATIONS_DIRECTORY))


async def test_three_processes_starting_together_apply_each_migration_once(empty_postgres_url):
    # Three sessions at once, as three bot processes started together would be: without the lock two of them
    # would both CREATE TABLE jobs and one would fail.
    every = available_migrations(MIGRATIONS_DIRECTORY)
    connections = [await connect(empty_postgres_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(upgrade(connection) for connection in connections), return_exceptions=True)

        failures = [result for result in results if isinstance(result, BaseException)]
        assert failures == []
        applied = sorted(m.version for result in results if isinstance(result, list) for m in result)
        assert applied == [m.version for m in every]  # each applied by exactly one of them
        assert await recorded_versions(connections[0]) == [m.version for m in every]
        for connection in connections:
            assert await current_version(connection) == every[-1].version
        indexes = await connections[0].fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'jobs_running'")
        assert indexes == 1
    finally:
        for connection in connections:
            await connection.close()


async def test_a_failing_migration_is_rolled_back_whole_and_releases_the_lock(empty_postgres_url, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (x integer);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE b (x integer); INSERT INTO nowhere VALUES (1);")
    async with connected(empty_postgres_url) as connection:
        with pytest.raises(StorageError, match=r'0002_broken\.sql failed and was rolled back: relation "nowhere"'):
            await upgrade(connection, tmp_path)

        assert await current_version(connection) == 1
        assert await tables_of(connection) == {"a", "schema_migrations"}  # no table b
        assert not connection.is_in_transaction()

    # Another process is not left waiting for the lock, and applies the mended migration.
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE b (x integer);")
    async with connected(empty_postgres_url) as other:
        applied = await asyncio.wait_for(upgrade(other, tmp_path), timeout=10)
        assert [m.version for m in applied] == [2]
        assert await tables_of(other) == {"a", "b", "schema_migrations"}


def test_the_default_install_runs_without_asyncpg():
    # asyncpg is the optional [postgres] extra: the bot and this module must import (and the SQLite bot run) without.
    modules = "bot.storage.postgres_migrations, bot.storage.postgres, bot.storage.copy, bot.__main__, bot.app"
    code = f"import sys; sys.modules['asyncpg'] = None; import {modules}"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
