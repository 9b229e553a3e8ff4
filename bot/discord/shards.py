"""Which gateway shards this process runs, read from `SHARD_COUNT` and `SHARD_IDS`. Pure: no discord.py.

Discord closes an unsharded gateway session of a bot in more than 2,500 servers (4011), and routes each server's
events to shard `(guild_id >> 22) % shard_count`. One bot may be several processes, each with some of the shards,
and workers with none (they drive jobs and answer webhooks; interactions reach the process whose shard got them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SHARDS = 4096
IDENTIFY_SPACING = 5.0  # seconds: Discord takes `max_concurrency` IDENTIFYs per 5 s, one per rate-limit bucket
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_shard_count(text: str) -> int | str | None:
    """`4`, `auto` (Discord's recommendation), or blank (unsharded)."""
    text = text.strip().lower()
    if not text:
        return None
    if text == "auto":
        return "auto"
    if not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        raise ValueError(f"must be a number of shards from 1 to {MAX_SHARDS}, or auto")
    return int(text)


def parse_shard_ids(text: str) -> tuple[int, ...] | None:
    """`0-3`, `0,2`, `0-1,4`, `all` (None: every shard), or blank (no shard: a worker)."""
    text = text.strip().lower()
    if text == "all":
        return None
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        span = _RANGE.match(part)
        if span is not None:
            first, last = int(span.group(1)), int(span.group(2))
            if first > last or last >= MAX_SHARDS:
                raise ValueError(f"{part!r} is not a range of shard ids (like 0-3)")
            ids.update(range(first, last + 1))
        elif part.isdigit() and int(part) < MAX_SHARDS:
            ids.add(int(part))
        else:
            raise ValueError(f"{part!r} is not a shard id: write ids and ranges, like 0-3 or 0,2, or all")
    return tuple(sorted(ids))


@dataclass(frozen=True)
class ShardPlan:
    """This process's part of the bot's gateway connection."""

    count: int | None  # None: unsharded (one session, as a small bot runs)
    ids: tuple[int, ...] | None = None  # None: every shard of `count`; (): none, a worker

    def __post_init__(self) -> None:
        if self.count is not None and self.ids is not None:
            outside = [shard for shard in self.ids if shard >= self.count]
            if outside:
                raise ValueError(
                    f"shard {outside[0]} does not exist with SHARD_COUNT={self.count} (0 to {self.count - 1})"
                )

    @property
    def sharded(self) -> bool:
        return self.count is not None

    @property
    def worker(self) -> bool:
        """No gateway shard: it drives jobs and answers webhooks, but receives no commands."""
        return self.count is not None and self.ids == ()

    @property
    def holds_every_shard(self) -> bool:
        return self.count is None or self.ids is None or set(self.ids) == set(range(self.count))

    @property
    def syncs_commands(self) -> bool:
        """One process syncs the slash commands: the one with shard 0 (or the only one)."""
        return not self.worker and (self.ids is None or 0 in self.ids)

    def describe(self) -> str:
        if self.count is None:
            return "unsharded"
        if self.worker:
            return f"a worker (no gateway shard of {self.count}: it drives jobs and answers webhooks)"
        ids = "every shard" if self.ids is None else "shard " + ", ".join(str(i) for i in self.ids)
        return f"{ids} of {self.count}"


UNSHARDED = ShardPlan(None)


def shard_of(guild_id: int, count: int) -> int:
    """The shard Discord delivers a server's events on."""
    return (guild_id >> 22) % count
