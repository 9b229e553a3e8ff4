"""Storage for the contract tests: every backend the bot has, each a fresh, fully migrated database.

On PostgreSQL the contract tests share one migrated database, emptied (TRUNCATE) before each test: the same
fresh start as a database of its own, at a tenth of the cost. Tests that change the schema or need several
databases take `postgres_url` themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.storage.ports import Storage
from bot.storage.sqlite import SqliteStorage
from tests.postgres import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def contract_postgres_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    name = postgres_server.create_database(template=postgres_template, prefix="contract")
    try:
        yield postgres_server.url_of(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "postgresql":
        from bot.storage.postgres import PostgresStorage

        url = request.getfixturevalue("contract_postgres_url")  # skipped without PostgreSQL (fails in CI)
        async with PostgresStorage.open(url, pool_size=4, upgrade=False) as opened:
            tables = await opened.db.fetchval(
                "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
                " WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
            )
            await opened.db.execute(f"TRUNCATE {tables}")
            yield opened
        return
    async with SqliteStorage.open(tmp_path / "bot.sqlite3") as opened:
        yield opened
