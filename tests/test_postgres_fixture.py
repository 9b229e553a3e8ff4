"""The test PostgreSQL (tests/postgres.py): each test's database is its own, fresh, and dropped afterwards."""

from __future__ import annotations

from typing import Any

from tests.postgres import PostgresServer


def database_names(server: PostgresServer) -> set[str]:
    async def names(connection: Any) -> set[str]:
        return {row["datname"] for row in await connection.fetch("SELECT datname FROM pg_database")}

    return server.run(names)


def test_a_database_is_created_empty_and_dropped(postgres_server):
    name = postgres_server.create_database()
    assert name in database_names(postgres_server)

    async def tables(connection: Any) -> int:
        return int(await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))

    assert postgres_server.run(tables, database=name) == 0
    postgres_server.drop_database(name)
    assert name not in database_names(postgres_server)


def test_a_copy_of_a_template_has_its_rows_and_is_independent(postgres_server):
    template = postgres_server.create_database(prefix="template")
    postgres_server.execute("CREATE TABLE t (x bigint)", "INSERT INTO t VALUES (2 ^ 40)", database=template)
    copy = postgres_server.create_database(template=template)
    try:
        postgres_server.execute("INSERT INTO t VALUES (1)", database=copy)

        async def values(connection: Any) -> list[int]:
            return [row["x"] for row in await connection.fetch("SELECT x FROM t ORDER BY x")]

        assert postgres_server.run(values, database=copy) == [1, 2**40]
        assert postgres_server.run(values, database=template) == [2**40]
    finally:
        postgres_server.drop_database(copy)
        postgres_server.drop_database(template)


async def test_a_test_gets_a_database_of_its_own(empty_postgres_url, postgres_server):
    import asyncpg

    connection = await asyncpg.connect(empty_postgres_url)
    try:
        name = await connection.fetchval("SELECT current_database()")
        assert empty_postgres_url.endswith("/" + name) and name.startswith("test_")
        assert await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await connection.close()
