"""Storage for the contract tests: every backend the bot has, each a fresh, fully migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.storage.ports import Storage
from bot.storage.sqlite import SqliteStorage

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with SqliteStorage.open(tmp_path / "bot.sqlite3") as opened:
        yield opened
