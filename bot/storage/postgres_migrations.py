"""PostgreSQL migrations: the same numbered files as SQLite's, in `migrations/postgresql/`, over asyncpg.

Several processes may start at once against one database. Each migration is applied in its own transaction
that first takes a transaction-level advisory lock (`pg_advisory_xact_lock`), then reads the version and
applies the next file only if nobody else has: the lock is released by the commit or rollback, so a process
that dies mid-migration never leaves it held, and the others wait instead of racing. asyncpg is imported only
when a migration runs, so the default install never needs it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bot.storage.migrations import Migration, available_migrations, migrations_directory
from bot.storage.ports import StorageError

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIRECTORY = migrations_directory("postgresql")

# The advisory lock that serialises migrations: one fixed 64-bit key of this bot's own (the first 8 bytes of
# sha256(b"modelslab-imagine-bot schema_migrations"), signed), unlikely to be another application's on a shared server.
MIGRATION_LOCK_KEY = -5413670762305167880

_CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)"
)


async def current_version(connection: asyncpg.Connection) -> int:
    """The newest migration applied; 0 for an empty database (nothing is created to find out)."""
    if await connection.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    version = await connection.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(version)


async def upgrade(connection: asyncpg.Connection, directory: Path = MIGRATIONS_DIRECTORY) -> list[Migration]:
    """Apply every migration newer than the database, each in its own transaction, under the migration lock."""
    migrations = available_migrations(directory)
    applied = []
    for migration in migrations:
        if await _apply_if_newer(connection, migration):
            log.info("Applied database migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
    return applied


async def _apply_if_newer(connection: asyncpg.Connection, migration: Migration) -> bool:
    """Apply one migration unless the database already has it (or a newer one); False when it had."""
    import asyncpg

    script = migration.path.read_text(encoding="utf-8")
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1::bigint)", MIGRATION_LOCK_KEY)
            await connection.execute(_CREATE_VERSION_TABLE)
            current = await connection.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            if migration.version <= current:
                return False
            await connection.execute(script)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                time.time(),
            )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(
            f"Migration {migration.path.name} failed and was rolled back: {str(exc).rstrip('.')}."
        ) from exc
    return True
