"""`python -m bot db copy --to postgresql://…`: a grown SQLite bot's data moved to PostgreSQL, as it is.

Both databases are first brought to this bot's newest schema (as starting the bot would), so their tables are the
same. The target must hold no data. Every table is then streamed from one consistent read of the SQLite file into
PostgreSQL with binary COPY, at most `BATCH_ROWS` rows (`BATCH_PICTURES` pictures) in memory at a time, all in one
PostgreSQL transaction: a copy that fails leaves the target empty, ready for another try. Ids, times, sealed keys and
pictures are copied byte for byte; nothing is re-encrypted (the processes on PostgreSQL need the same SECRET_KEY).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bot.storage import postgres_migrations
from bot.storage.ports import StorageError
from bot.storage.postgres import describe_url, url_secrets
from bot.storage.sqlite import SqliteStorage

BATCH_ROWS = 500
BATCH_PICTURES = 16
# Any two processes copying into one database at once: the second waits, then finds it not empty.
COPY_LOCK_KEY = -5413670762305167879
# Parents before children, for whoever reads the counts.
TABLE_ORDER = (
    "shared_settings",
    "guild_settings",
    "role_limits",
    "blocklist",
    "presets",
    "member_settings",
    "forgotten_usage",
    "jobs",
    "job_inputs",
)
INTEGER_TYPES = {"bigint", "integer", "smallint"}


async def copy_sqlite_to_postgres(
    sqlite_path: Path, url: str, *, report: Callable[[str], None] = lambda line: None
) -> dict[str, int]:
    """Copy every row of the SQLite database at `sqlite_path` into the empty PostgreSQL database at `url`; returns
    the rows copied per table."""
    try:
        import asyncpg
    except ImportError:
        raise StorageError(
            "Copying to PostgreSQL needs asyncpg: install the bot with its postgres extra "
            "(pip install -e '.[postgres]')."
        ) from None
    from bot.log import register_secret

    for secret in url_secrets(url):
        register_secret(secret)
    target_name = describe_url(url)
    if not await asyncio.to_thread(sqlite_path.is_file):
        raise StorageError(f"There is no SQLite database at {sqlite_path} to copy (DATABASE_PATH).")
    async with SqliteStorage.open(sqlite_path) as source:
        version = await source.current_version()
        try:
            target = await asyncpg.connect(url, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"Cannot connect to the {target_name}: {str(exc).rstrip('.')}.") from exc
        try:
            await postgres_migrations.upgrade(target)
            if await postgres_migrations.current_version(target) != version:
                raise StorageError(
                    f"The {target_name} is at schema version {await postgres_migrations.current_version(target)}, "
                    f"the SQLite database at {version}: use a bot of the version that made them."
                )
            report(f"copying {source.description} (schema version {version}) to the {target_name}")
            return await _copy_all(source, target, target_name, report)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StorageError(
                f"The copy to the {target_name} failed and nothing was kept there: {str(exc).rstrip('.')}."
            ) from exc
        finally:
            await target.close()


async def _copy_all(
    source: SqliteStorage, target: Any, target_name: str, report: Callable[[str], None]
) -> dict[str, int]:
    reader = source.db.raw
    tables = [
        row[0]
        for row in await reader.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
            " AND name != 'schema_migrations'"
        )
    ]
    order = {name: index for index, name in enumerate(TABLE_ORDER)}
    tables.sort(key=lambda name: (order.get(name, len(order)), name))
    counts: dict[str, int] = {}
    await reader.execute("BEGIN")  # one read snapshot of the whole file, whatever a running bot writes meanwhile
    try:
        async with target.transaction():
            await target.execute("SELECT pg_advisory_xact_lock($1::bigint)", COPY_LOCK_KEY)
            filled = [table for table in tables if await target.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")')]
            if filled:
                raise StorageError(
                    f"The {target_name} already holds data (in {', '.join(filled)}): "
                    "copy only into a new, empty database."
                )
            for table in tables:
                counts[table] = await _copy_table(reader, target, table)
                report(f"{table}: {counts[table]} row(s)")
    finally:
        await reader.execute("ROLLBACK")
    return counts


async def _copy_table(reader: Any, target: Any, table: str) -> int:
    source_columns = [row[1] for row in await reader.execute_fetchall(f'PRAGMA table_info("{table}")')]
    target_types = {
        row["column_name"]: row["data_type"]
        for row in await target.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = $1",
            table,
        )
    }
    if set(source_columns) != set(target_types):
        raise StorageError(
            f"The table {table} differs between the two databases ({sorted(source_columns)} in SQLite, "
            f"{sorted(target_types)} in PostgreSQL)."
        )
    types = [target_types[column] for column in source_columns]
    batch = BATCH_PICTURES if "bytea" in types else BATCH_ROWS
    column_list = ", ".join(f'"{column}"' for column in source_columns)

    async def rows() -> AsyncIterator[tuple[Any, ...]]:
        last = None
        while True:
            where = "" if last is None else "WHERE rowid > ?"
            found = await reader.execute_fetchall(
                f'SELECT rowid, {column_list} FROM "{table}" {where} ORDER BY rowid LIMIT ?',
                (batch,) if last is None else (last, batch),
            )
            for row in found:
                yield tuple(_as_postgres(value, kind) for value, kind in zip(tuple(row)[1:], types, strict=True))
            if len(found) < batch:
                return
            last = found[-1][0]

    status = await target.copy_records_to_table(table, records=rows(), columns=source_columns)
    return int(status.rsplit(" ", 1)[-1])


def _as_postgres(value: Any, kind: str) -> Any:
    """SQLite keeps what it is given, within its column affinity: a whole REAL in an INTEGER column goes over as an
    integer, an integer in a REAL column as a float; everything else is copied as it is."""
    if value is None:
        return None
    if kind in INTEGER_TYPES and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "double precision" and isinstance(value, int):
        return float(value)
    if kind == "bytea" and isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value
