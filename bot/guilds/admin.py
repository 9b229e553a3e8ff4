"""Server administration as a service: keys, limits, channels, policy and defaults. Knows nothing of discord.py."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bot.discord.texts import failure_sentence
from bot.errors import UserFacingError
from bot.guilds.keybox import KeyBox, KeyUnreadable, last4
from bot.guilds.rules import (
    GuildConfig,
    Limits,
    NsfwPolicy,
    Refused,
    Usage,
    check_new_rule,
    limits_for,
    next_reset,
    normalise_rule,
)
from bot.log import register_secret
from bot.modelslab.client import ErrorKind, ModelsLabClient
from bot.requests.flags import parse_flags
from bot.requests.generation import SIDE_MIN
from bot.storage.events import Events, LocalEvents
from bot.storage.ports import GuildRepository, JobRepository

log = logging.getLogger(__name__)

NO_KEY = (
    "This server has no ModelsLab API key yet, so nothing can be generated: "
    "an admin (Manage Server) must run `/config apikey`."
)
UNREADABLE_KEY = (
    "This server's stored ModelsLab key can no longer be read (the bot's SECRET_KEY changed), so nothing can "
    "be generated: an admin (Manage Server) must run `/config apikey` again."
)
MAX_LIMIT = 100_000
MAX_ROLE_LIMITS = 25
MAX_PRESETS = 25  # Discord shows 25 autocomplete suggestions
PRESET_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
MAX_ALLOWED_CHANNELS = 25


@dataclass(frozen=True)
class QuotaStatus:
    limits: Limits
    usage: Usage
    resets_at: float

    @property
    def user_left(self) -> int | None:
        return None if not self.limits.user_daily else max(self.limits.user_daily - self.usage.user_today, 0)

    @property
    def guild_left(self) -> int | None:
        return None if not self.limits.guild_daily else max(self.limits.guild_daily - self.usage.guild_today, 0)


class GuildAdmin:
    """Reads and changes a server's settings; resolves the key that pays for its jobs."""

    def __init__(
        self,
        *,
        guilds: GuildRepository,
        jobs: JobRepository,
        keybox: KeyBox,
        client: ModelsLabClient,
        default_api_key: str | None,
        allow_default_key: bool,
        default_key_guild_daily: int = 0,
        events: Events | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._guilds = guilds
        self._jobs = jobs
        self._keybox = keybox
        self._client = client
        self._default_api_key = default_api_key
        self._allow_default_key = allow_default_key
        self._default_key_guild_daily = default_key_guild_daily
        self._clock = clock
        self._unreadable_reported: set[int] = set()
        # Read before every acknowledgement, changed only through this class (in this process or another, which
        # says so through the database's events): kept in memory.
        self._configs: dict[int, GuildConfig] = {}
        self._keys: dict[int, str | None] = {}
        self._events = events or LocalEvents()
        self._events.subscribe("guild", self._on_changed_elsewhere)
        self._events.on_reconnect(self.forget_every_cached)

    async def config(self, guild_id: int) -> GuildConfig:
        config = self._configs.get(guild_id)
        if config is None:
            config = self._configs[guild_id] = await self._guilds.config(guild_id)
        return config

    async def _changed(self, guild_id: int) -> None:
        """This process changed the server's settings: its own cache goes now, every other process's too."""
        self._forget_cached(guild_id)
        await self._events.publish("guild", str(guild_id))

    def _on_changed_elsewhere(self, detail: str) -> None:
        if detail.isdigit():
            self._forget_cached(int(detail))

    def forget_every_cached(self) -> None:
        """Events may have been missed (the database's event connection was lost): read everything afresh."""
        self._configs.clear()
        self._keys.clear()

    def _forget_cached(self, guild_id: int) -> None:
        self._configs.pop(guild_id, None)
        self._keys.pop(guild_id, None)

    # ------------------------------------------------------------------------------------------ keys

    async def api_key_for(self, guild_id: int | None) -> str | None:
        """The server's own key; else the operator's, if the operator allows that; else none."""
        if guild_id is not None and guild_id in self._keys:
            return self._keys[guild_id] or (self._default_api_key if self._allow_default_key else None)
        if guild_id is not None:
            sealed = await self._guilds.sealed_key(guild_id)
            if sealed is None:
                self._keys[guild_id] = None
            if sealed is not None:
                try:
                    api_key = self._keybox.open(guild_id, sealed)
                except KeyUnreadable:
                    if guild_id not in self._unreadable_reported:
                        self._unreadable_reported.add(guild_id)
                        log.error(
                            "The stored API key of server %s cannot be decrypted (was SECRET_KEY changed?)", guild_id
                        )
                    return None
                register_secret(api_key)
                self._keys[guild_id] = api_key
                return api_key
        return self._default_api_key if self._allow_default_key else None

    async def set_api_key(self, guild_id: int, api_key: str) -> str:
        """Check the key with a cheap ModelsLab call, then store it encrypted. Returns its last 4 characters."""
        api_key = api_key.strip()
        if not 8 <= len(api_key) <= 200 or any(c.isspace() for c in api_key):
            raise UserFacingError("That does not look like a ModelsLab API key: paste the key exactly as shown.")
        problem = await self._client.check_key(api_key)
        if problem is not None:
            if problem.kind is ErrorKind.INVALID_KEY:
                raise UserFacingError("ModelsLab does not accept this key (invalid key): nothing was saved.")
            sentence = failure_sentence(
                problem.kind, problem.detail, model_id="", retry_after=problem.retry_after, timeout=0
            )
            raise UserFacingError(f"The key could not be checked, so it was not saved. {sentence}")
        await self._guilds.update(
            guild_id, api_key_ciphertext=self._keybox.seal(guild_id, api_key), api_key_last4=last4(api_key)
        )
        register_secret(api_key)  # accepted and stored: from now on a real secret (never before: see register_secret)
        await self._changed(guild_id)
        self._unreadable_reported.discard(guild_id)
        log.info("Server %s set its ModelsLab API key", guild_id)
        return last4(api_key)

    async def clear_api_key(self, guild_id: int) -> None:
        await self._guilds.update(guild_id, api_key_ciphertext=None, api_key_last4=None)
        await self._changed(guild_id)
        log.info("Server %s removed its ModelsLab API key", guild_id)

    def uses_operator_key(self, config: GuildConfig) -> bool:
        return not config.has_own_key and self._allow_default_key and self._default_api_key is not None

    async def any_server_key(self) -> bool:
        return await self._guilds.any_key()

    async def key_is_unreadable(self, guild_id: int) -> bool:
        sealed = await self._guilds.sealed_key(guild_id)
        if sealed is None:
            return False
        try:
            self._keybox.open(guild_id, sealed)
        except KeyUnreadable:
            return True
        return False

    # ------------------------------------------------------------------------------------------ limits

    async def set_limits(self, guild_id: int, **limits: int | None) -> GuildConfig:
        columns = {"guild_daily": "guild_daily", "user_daily": "user_daily"}
        columns |= {"user_concurrent": "user_concurrent", "cooldown": "cooldown_seconds"}
        changes = {}
        for name, value in limits.items():
            if value is None:
                continue
            if not 0 <= value <= MAX_LIMIT:
                raise Refused(f"`{name}` must be from 0 (no limit) to {MAX_LIMIT}.")
            changes[columns[name]] = value
        await self._guilds.update(guild_id, **changes)
        await self._changed(guild_id)
        return await self.config(guild_id)

    async def set_role_limit(self, guild_id: int, role_id: int, user_daily: int | None) -> None:
        if user_daily is not None and not 0 <= user_daily <= MAX_LIMIT:
            raise Refused(f"`user_daily` must be from 0 (unlimited) to {MAX_LIMIT}.")
        config = await self.config(guild_id)
        if user_daily and config.user_daily and user_daily <= config.user_daily:
            raise Refused(
                f"A role limit lifts the member limit ({config.user_daily} images a day), so it must be higher, "
                "or 0 for unlimited."
            )
        if user_daily is not None and role_id not in config.role_limits and len(config.role_limits) >= MAX_ROLE_LIMITS:
            raise Refused(f"A server can have at most {MAX_ROLE_LIMITS} role limits: remove one first.")
        await self._guilds.set_role_limit(guild_id, role_id, user_daily)
        await self._changed(guild_id)

    def limits_for(self, config: GuildConfig, role_ids: Iterable[int]) -> Limits:
        """The limits of a member's request: the server's, and DEFAULT_KEY_GUILD_DAILY if it runs on the operator's
        key (the smaller daily limit applies)."""
        operator_cap = self._default_key_guild_daily if self.uses_operator_key(config) else 0
        return limits_for(config, role_ids, default_key_daily=operator_cap)

    async def quota_status(self, guild_id: int, user_id: int, role_ids: Iterable[int]) -> QuotaStatus:
        now = self._clock()
        config = await self.config(guild_id)
        usage = await self._jobs.usage(guild_id, user_id, now)
        return QuotaStatus(self.limits_for(config, role_ids), usage, next_reset(now))

    # ------------------------------------------------------------------------------------------ channels, policy

    async def allow_channel(self, guild_id: int, channel_id: int, allowed: bool) -> GuildConfig:
        config = await self.config(guild_id)
        channels = [c for c in config.allowed_channels if c != channel_id]
        if allowed:
            if len(channels) >= MAX_ALLOWED_CHANNELS:
                raise Refused(f"At most {MAX_ALLOWED_CHANNELS} channels can be listed: remove one first.")
            channels.append(channel_id)
        await self._guilds.update(guild_id, allowed_channels_json=json.dumps(channels))
        await self._changed(guild_id)
        return await self.config(guild_id)

    async def allow_everywhere(self, guild_id: int) -> None:
        await self._guilds.update(guild_id, allowed_channels_json="[]")
        await self._changed(guild_id)

    async def set_gallery(self, guild_id: int, channel_id: int | None) -> None:
        await self._guilds.update(guild_id, gallery_channel_id=channel_id)
        await self._changed(guild_id)

    async def set_nsfw_policy(self, guild_id: int, policy: NsfwPolicy) -> None:
        await self._guilds.update(guild_id, nsfw_policy=policy)
        await self._changed(guild_id)

    async def add_blocklist_rule(self, guild_id: int, rule: str, added_by: int) -> str:
        pattern = normalise_rule(rule)
        check_new_rule(pattern, (await self.config(guild_id)).blocklist)
        if not await self._guilds.add_blocklist_rule(guild_id, pattern, added_by):
            raise Refused(f"`{pattern}` is already on the blocklist.")
        await self._changed(guild_id)
        return pattern

    async def remove_blocklist_rule(self, guild_id: int, rule: str) -> str:
        pattern = normalise_rule(rule)
        if not await self._guilds.remove_blocklist_rule(guild_id, pattern):
            raise Refused(f"`{pattern}` is not on the blocklist.")
        await self._changed(guild_id)
        return pattern

    async def presets(self, guild_id: int) -> dict[str, str]:
        return await self._guilds.presets(guild_id)

    async def save_preset(self, guild_id: int, name: str, flags_text: str, created_by: int) -> str:
        """A named set of flags; checked now (only flags, each valid), so using it later cannot surprise."""
        name = " ".join(name.split()).lower()
        if not PRESET_NAME.match(name):
            raise Refused("A preset name is 1 to 32 letters, digits, dashes or underscores.")
        parsed = parse_flags(flags_text, side_min=SIDE_MIN)
        if parsed.prompt:
            raise Refused(
                f"A preset holds only flags (like `--ar 16:9 --steps 30`), not prompt words: “{parsed.prompt[:40]}”."
            )
        if not flags_text.strip():
            raise Refused("A preset needs at least one flag, like `--ar 16:9`.")
        presets = await self._guilds.presets(guild_id)
        if name not in presets and len(presets) >= MAX_PRESETS:
            raise Refused(f"A server can have at most {MAX_PRESETS} presets: remove one first.")
        normalised = " ".join(flags_text.split())
        await self._guilds.save_preset(guild_id, name, normalised, created_by)
        return name

    async def remove_preset(self, guild_id: int, name: str) -> None:
        if not await self._guilds.remove_preset(guild_id, " ".join(name.split()).lower()):
            raise Refused(f"There is no preset called `{name[:32]}`.")

    async def set_defaults(self, guild_id: int, **changes: object) -> GuildConfig:
        await self._guilds.update(guild_id, **changes)
        await self._changed(guild_id)
        return await self.config(guild_id)
