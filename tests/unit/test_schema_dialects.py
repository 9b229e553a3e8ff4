"""Both dialects' migrations reach the same schema: SQLite's on a fresh file, PostgreSQL's on a fresh database.

Tables, columns (in order, with type, nullability and default), primary keys and indexes (columns, uniqueness,
partial predicate) are read from each database's catalogue and compared in a dialect-neutral form. PostgreSQL's
types map to SQLite's as INTEGER = bigint or integer, REAL = double precision, TEXT = text, BLOB = bytea; Discord
ids and seeds must be bigint (they pass 2**31).

Functions have no SQLite twin (SQLite runs no stored code): PostgreSQL's are listed in `POSTGRES_ONLY_FUNCTIONS`,
each with why, and the test fails on any other, so none is added without saying what the SQLite side does instead.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from bot.storage.migrations import available_migrations, migrations_directory
from bot.storage.postgres_migrations import MIGRATIONS_DIRECTORY as POSTGRES_MIGRATIONS
from bot.storage.sqlite import SqliteStorage

ROOT = Path(__file__).resolve().parents[2]
NEUTRAL_TYPES = {"bigint": "INTEGER", "integer": "INTEGER", "double precision": "REAL", "text": "TEXT", "bytea": "BLOB"}
# name -> what SQLite does instead.
POSTGRES_ONLY_FUNCTIONS = {
    "job_fits_limits": "the quota check with a per-server lock; SQLite's one writer makes the plain statement exact",
}
BIGINT_COLUMNS = re.compile(r"^(.*_id|seed|added_by|created_by)$")


def sqlite_migrations() -> Path:
    return migrations_directory("sqlite")


def normalised_default(default: str | None) -> str | None:
    """`'[]'::text` (PostgreSQL) and `'[]'` (SQLite) alike."""
    if default is None:
        return None
    return re.sub(r"::[a-z ]+$", "", default.strip())


def normalised_predicate(predicate: str | None) -> str | None:
    """`(status = ANY (ARRAY['a'::text, 'b'::text]))` (PostgreSQL) and `status IN ('a', 'b')` (SQLite) alike."""
    if predicate is None:
        return None
    text = re.sub(r"::[a-z ]+", "", predicate)
    text = re.sub(r"(\w+) = ANY \(ARRAY\[([^\]]*)\]\)", r"\1 IN (\2)", text)
    text = " ".join(text.split())
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for character in text:
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth < 0:
            return False
    return depth == 0


async def sqlite_schema(path: Path) -> dict[str, Any]:
    async with SqliteStorage.open(path, migrations=sqlite_migrations()):
        pass
    schema: dict[str, Any] = {}
    with sqlite3.connect(path) as raw:
        tables = [row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            info = raw.execute(f"PRAGMA table_info({table})").fetchall()  # cid, name, type, notnull, default, pk
            primary_key = [row[1] for row in sorted((row for row in info if row[5]), key=lambda row: row[5])]
            indexes = {}
            for _seq, name, unique, origin, _partial in raw.execute(f"PRAGMA index_list({table})"):
                if origin == "pk":
                    continue  # the primary key's own index
                columns = [row[2] for row in raw.execute(f"PRAGMA index_info({name})")]
                (sql,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
                where = re.split(r"\bWHERE\b", sql, maxsplit=1, flags=re.IGNORECASE)
                predicate = where[1].strip().rstrip(";") if len(where) == 2 else None
                indexes[name] = (columns, bool(unique), normalised_predicate(predicate))
            schema[table] = {
                "columns": [
                    # SQLite lets a non-INTEGER primary key hold NULL (a quirk kept for compatibility); the code
                    # never stores one, and PostgreSQL refuses it, so a key column counts as NOT NULL here.
                    (name, declared.upper(), bool(notnull or pk), normalised_default(default))
                    for _cid, name, declared, notnull, default, pk in info
                ],
                "primary_key": primary_key,
                "indexes": indexes,
            }
    return schema


async def postgres_functions(url: str) -> list[str]:
    """The functions and procedures of the public schema (the bot's own: extensions live elsewhere or are none)."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' ORDER BY 1"
        )
        return [row["proname"] for row in rows]
    finally:
        await connection.close()


async def postgres_schema(url: str) -> tuple[dict[str, Any], list[str]]:
    """The neutral schema, and the columns that hold Discord ids or seeds but are not bigint."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        schema: dict[str, Any] = {}
        narrow_ids = []
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
        for (table,) in tables:
            columns = await connection.fetch(
                "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                table,
            )
            narrow_ids += [
                f"{table}.{row['column_name']} is {row['data_type']}"
                for row in columns
                if BIGINT_COLUMNS.match(row["column_name"]) and row["data_type"] == "integer"
            ]
            indexes = await connection.fetch(
                "SELECT c.relname AS name, i.indisunique AS unique, i.indisprimary AS primary,"
                " pg_get_expr(i.indpred, i.indrelid) AS predicate,"
                " ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
                "       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n) AS columns"
                " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = $1::regclass",
                f"public.{table}",
            )
            primary = [row for row in indexes if row["primary"]]
            schema[table] = {
                "columns": [
                    (
                        row["column_name"],
                        NEUTRAL_TYPES.get(row["data_type"], row["data_type"]),
                        row["is_nullable"] == "NO",
                        normalised_default(row["column_default"]),
                    )
                    for row in columns
                ],
                "primary_key": list(primary[0]["columns"]) if primary else [],
                "indexes": {
                    row["name"]: (list(row["columns"]), row["unique"], normalised_predicate(row["predicate"]))
                    for row in indexes
                    if not row["primary"]
                },
            }
        return schema, narrow_ids
    finally:
        await connection.close()


def test_the_predicates_are_compared_in_one_form():
    postgres = "(status = ANY (ARRAY['queued'::text, 'submitting'::text, 'processing'::text]))"
    sqlite = "status IN ('queued', 'submitting', 'processing')"
    assert normalised_predicate(postgres) == normalised_predicate(sqlite) == sqlite
    assert normalised_predicate("(a = 1) AND (b = 2)") == "(a = 1) AND (b = 2)"  # not one pair of parentheses
    assert normalised_default("'spoiler'::text") == normalised_default("'spoiler'") == "'spoiler'"


def test_both_dialects_have_the_same_migrations():
    sqlite = [(m.version, m.name) for m in available_migrations(sqlite_migrations())]
    postgres = [(m.version, m.name) for m in available_migrations(POSTGRES_MIGRATIONS)]
    assert postgres == sqlite
    assert len(sqlite) >= 8


async def test_both_dialects_reach_the_same_schema(tmp_path, postgres_url):
    expected = await sqlite_schema(tmp_path / "bot.sqlite3")
    actual, narrow_ids = await postgres_schema(postgres_url)

    assert sorted(actual) == sorted(expected)
    for table in expected:
        for part in ("columns", "primary_key", "indexes"):
            assert actual[table][part] == expected[table][part], f"the {part} of {table} differ"
    assert narrow_ids == []
    assert await postgres_functions(postgres_url) == sorted(POSTGRES_ONLY_FUNCTIONS)
    # The comparison saw what matters: the partial index and the key columns of every table.
    assert expected["jobs"]["indexes"]["jobs_running"][2] == "status IN ('queued', 'submitting', 'processing')"
    assert all(expected[table]["primary_key"] for table in expected)
