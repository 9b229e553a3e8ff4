"""Where the bot keeps its state. The services see only the Protocols of `bot.storage.ports`;
`open_storage` picks the backend once, at start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.settings import Settings
from bot.storage.ports import Storage, StorageBusy, StorageError, StorageFull

__all__ = ["Storage", "StorageBusy", "StorageError", "StorageFull", "open_storage"]


@asynccontextmanager
async def open_storage(settings: Settings, *, upgrade: bool = True) -> AsyncIterator[Storage]:
    """The database the settings name, open (and, with `upgrade`, migrated) for as long as the block runs:
    PostgreSQL when `DATABASE_URL` is set (asyncpg is imported only then), else SQLite at `DATABASE_PATH`."""
    if settings.database_url is not None:
        from bot.storage.postgres import PostgresStorage

        async with PostgresStorage.open(
            settings.database_url.get_secret_value(),
            pool_size=settings.database_pool_size,
            upgrade=upgrade,
            application_name=f"modelslab-imagine-bot {settings.worker_id}"[:63],
            owner=settings.worker_id,
            lease_seconds=settings.lease_seconds,
        ) as storage:
            yield storage
        return
    from bot.storage.sqlite import SqliteStorage

    async with SqliteStorage.open(
        settings.database_path, upgrade=upgrade, owner=settings.worker_id, lease_seconds=settings.lease_seconds
    ) as storage:
        yield storage
