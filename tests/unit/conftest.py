"""Storage for the contract tests: every backend the bot has, each a fresh, fully migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.storage.ports import Storage
from bot.storage.sqlite import SqliteStorage

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "postgresql":
        from bot.storage.postgres import PostgresStorage

        url = request.getfixturevalue("postgres_url")  # skipped without PostgreSQL (failed with REQUIRE_POSTGRES=1)
        async with PostgresStorage.open(url, pool_size=4) as opened:
            yield opened
        return
    async with SqliteStorage.open(tmp_path / "bot.sqlite3") as opened:
        yield opened
