"""The numbered SQL files that build the schema, one folder per dialect (`migrations/sqlite`, `migrations/postgresql`).

Both folders hold the same versions, so that a database of either kind at version N has the same tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bot.storage.ports import StorageError

MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent.parent / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def script(self) -> str:
        return self.path.read_text(encoding="utf-8")


def migrations_directory(dialect: str) -> Path:
    """`sqlite` or `postgresql`."""
    return MIGRATIONS_ROOT / dialect


def available_migrations(directory: Path) -> list[Migration]:
    if not directory.is_dir():
        # A non-editable install leaves the migrations behind: fail loudly rather than run on no schema.
        raise StorageError(f"The migrations folder {directory} is missing: run the bot from a full checkout.")
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise StorageError(f"Migration file {path.name} is not named NNNN_reason.sql.")
        migrations.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise StorageError("Two migration files share a version number.")
    return migrations


def latest_version(directory: Path) -> int:
    return max((m.version for m in available_migrations(directory)), default=0)
