"""Fixtures shared by every test folder: a real PostgreSQL (see tests/postgres.py).

A test that takes `postgres_url` gets a fresh database with every PostgreSQL migration applied (a copy of a
template migrated once per session), `empty_postgres_url` a fresh empty one; both are dropped afterwards.
Without PostgreSQL (or asyncpg) such tests are skipped with the reason; with REQUIRE_POSTGRES=1 (CI) the run
fails at its start instead.

Every test runs on the event loop `python -m bot` runs on (`bot.__main__.new_event_loop`: uvloop's where it is
installed, as it is by default on Linux and macOS); TEST_EVENT_LOOP=asyncio runs them on asyncio's own, the
bot's loop where uvloop is not installed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.__main__ import new_event_loop
from tests.postgres import PostgresServer, PostgresUnavailable, check_prerequisites, postgres_required


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    if os.environ.get("TEST_EVENT_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    return {"bot": new_event_loop}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not postgres_required():
        return
    try:
        check_prerequisites()
    except PostgresUnavailable as exc:
        pytest.exit(f"REQUIRE_POSTGRES=1, but PostgreSQL cannot be used for the tests: {exc}.", returncode=1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL: TEST_DATABASE_URL's, or a throwaway server started for this run."""
    try:
        server = PostgresServer.from_environment()
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(f"REQUIRE_POSTGRES=1, but PostgreSQL cannot be used for the tests: {exc}.", pytrace=False)
        pytest.skip(f"PostgreSQL is not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a database with every PostgreSQL migration applied, to copy; made once per session."""
    from bot.storage.postgres_migrations import upgrade

    name = postgres_server.create_database(prefix="template")
    try:
        postgres_server.run(upgrade, database=name)
        yield name
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    """A fresh, fully migrated database of its own for one test; dropped after it."""
    name = postgres_server.create_database(template=postgres_template)
    try:
        yield postgres_server.url_of(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def empty_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database without any table, for migration tests; dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url_of(name)
    finally:
        postgres_server.drop_database(name)
