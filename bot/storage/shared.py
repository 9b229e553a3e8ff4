"""Settings every process of one bot must share, recorded in the database by the first process that starts.

On PostgreSQL several processes run one bot: the per-key cap `MODELSLAB_MAX_QUEUED` is global, so two processes that
disagree on it would each hold the other to a different limit. A process whose value differs from the recorded one
refuses to start. A single SQLite process is not checked: its settings are the only ones, and changing
`MODELSLAB_MAX_QUEUED` between two starts is how a new ModelsLab plan is applied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bot.settings import Settings, SettingsError
from bot.storage.ports import Storage


def shared_values(settings: Settings) -> dict[str, str]:
    """This process's values of the shared settings, by environment name."""
    values = {"MODELSLAB_MAX_QUEUED": str(settings.modelslab_max_queued)}
    if isinstance(settings.shard_count, int):  # SHARD_COUNT=auto is resolved once, by `shard_count_of_the_bot`
        values["SHARD_COUNT"] = str(settings.shard_count)
    return values


def disagreement(name: str, mine: str, recorded: str) -> str:
    return (
        f"{name} is {mine} here but {recorded} for the other processes of this bot (recorded in the database), and "
        f"they must all use the same: set {name}={recorded}, or, to change it, stop every process and run "
        "`python -m bot db record-settings` with the new value"
    )


async def agree_on_shared_settings(storage: Storage, settings: Settings) -> None:
    """Record this process's shared settings if none are recorded; raise `SettingsError` if they differ."""
    if settings.database_url is None:
        return
    for name, mine in shared_values(settings).items():
        recorded = await storage.record_shared_setting(name, mine)
        if recorded != mine:
            raise SettingsError(disagreement(name, mine, recorded) + ".")


async def shard_count_of_the_bot(
    storage: Storage, settings: Settings, ask_discord: Callable[[], Awaitable[int]]
) -> int | None:
    """`SHARD_COUNT` for this process: its own number, or with `auto` the one the bot's processes agreed on (the
    first process asks Discord and records the answer, so that every process routes servers to the same shards)."""
    if settings.shard_count is None:
        return None
    if isinstance(settings.shard_count, int):
        return settings.shard_count
    recorded = (await storage.shared_settings()).get("SHARD_COUNT")
    if recorded is None:
        recommended = str(await ask_discord())
        recorded = (
            await storage.record_shared_setting("SHARD_COUNT", recommended) if settings.database_url else recommended
        )
    return int(recorded)


async def disagreements(storage: Storage, settings: Settings) -> list[str]:
    """What `agree_on_shared_settings` would refuse, without recording anything (for `python -m bot check`)."""
    if settings.database_url is None:
        return []
    recorded = await storage.shared_settings()
    return [
        disagreement(name, mine, recorded[name])
        for name, mine in shared_values(settings).items()
        if recorded.get(name, mine) != mine
    ]
