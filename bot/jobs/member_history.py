"""A member's own jobs: the pages of /history show, the export, and /history forget. Knows nothing of discord.py."""

from __future__ import annotations

from dataclasses import dataclass

from bot.jobs.history import PAGE_SIZE, page_count
from bot.jobs.model import Job
from bot.requests.member_defaults import MemberDefaultsService
from bot.storage.ports import Storage

EXPORT_MOST = 100_000


@dataclass(frozen=True)
class HistoryPage:
    jobs: list[Job]
    page: int  # from 0, within the pages there are
    total: int  # the member's jobs in all

    @property
    def pages(self) -> int:
        return page_count(self.total)


class MemberHistory:
    def __init__(self, storage: Storage, member_defaults: MemberDefaultsService) -> None:
        self._storage = storage
        self._member_defaults = member_defaults

    async def page(self, user_id: int, *, guild_id: int, page: int) -> HistoryPage:
        """One page of the member's jobs in a server, newest first (a page past the end shows the last one)."""
        total = await self._storage.jobs.history_count(user_id, guild_id=guild_id)
        page = max(0, min(page, page_count(total) - 1))
        jobs = await self._storage.jobs.history(user_id, guild_id=guild_id, offset=page * PAGE_SIZE, limit=PAGE_SIZE)
        return HistoryPage(jobs, page, total)

    async def everything(self, user_id: int) -> list[Job]:
        """Every job of the member in every server, for the export."""
        return await self._storage.jobs.history(user_id, guild_id=None, limit=EXPORT_MOST)

    async def forget(self, user_id: int, now: float) -> int:
        """/history forget: see `Storage.forget_member`. Returns how many jobs were forgotten."""
        forgotten = await self._storage.forget_member(user_id, now)
        await self._member_defaults.forget_member(user_id)
        return forgotten
