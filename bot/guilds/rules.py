"""Each server's own rules, as plain data and pure checks: quotas, cooldowns, channels, blocklist, models.

The quota reservation itself is one atomic SQL statement (`JobStore.insert_within_limits`); the
functions here say *why* a request was refused, in one sentence with the time the limit resets.
Quotas count images (samples) per UTC day.
"""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from bot.discord.markup import timestamp
from bot.errors import UserFacingError
from bot.guilds.blocklist import is_word, matcher_for

NsfwPolicy = Literal["spoiler", "withhold"]
# A prompt's check costs (its length) x (the rules' total length): these caps bound it (bench/blocklist.py).
MAX_BLOCKLIST_RULES = 500
MAX_BLOCKLIST_RULE_LENGTH = 60
MAX_QUOTED = 100  # characters of the prompt quoted in a refusal
# What the blocklist reads of a prompt, once compatibility characters are spelled out (NFKC: one character can
# become 18, so a 2,000-character prompt up to 36,000): at most twice the longest prompt, or its check could hold
# the event loop for tens of milliseconds (bench/blocklist.py).
MAX_NORMALISED_PROMPT = 4000


class Refused(UserFacingError):
    """A server rule said no. Nothing is stored or sent."""


@dataclass(frozen=True)
class GuildConfig:
    """A server's settings (a server that never ran /config has these defaults)."""

    guild_id: int
    api_key_last4: str | None = None
    guild_daily: int = 0
    user_daily: int = 0
    user_concurrent: int = 0
    cooldown_seconds: int = 0
    allowed_channels: tuple[int, ...] = ()
    gallery_channel_id: int | None = None
    nsfw_policy: NsfwPolicy = "spoiler"
    default_model: str | None = None
    default_negative_prompt: str | None = None
    default_width: int | None = None
    default_height: int | None = None
    default_steps: int | None = None
    allowed_models: tuple[str, ...] = ()
    role_limits: Mapping[int, int] = field(default_factory=dict)
    blocklist: tuple[str, ...] = ()

    @property
    def has_own_key(self) -> bool:
        return self.api_key_last4 is not None


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one member's request: 0 means none."""

    guild_daily: int = 0
    user_daily: int = 0
    user_concurrent: int = 0
    cooldown_seconds: int = 0
    # The server's daily limit is the operator's DEFAULT_KEY_GUILD_DAILY (the server runs on MODELSLAB_API_KEY and
    # its own limit is higher or none): the refusal then says so.
    guild_daily_is_default_key_cap: bool = False


@dataclass(frozen=True)
class Usage:
    """What a server and a member have used, as the database says now."""

    guild_today: int = 0
    user_today: int = 0
    user_running: int = 0
    user_last_request_at: float | None = None


def limits_for(config: GuildConfig, member_role_ids: Iterable[int], *, default_key_daily: int = 0) -> Limits:
    """A role limit replaces the server's per-member limit when it is higher; a role limit of 0 means unlimited.

    `default_key_daily`: the operator's cap for a server that runs on the operator's key (0: none). The smaller of
    it and the server's own daily limit applies, in the same one-statement reservation."""
    user_daily = config.user_daily
    role_values = [config.role_limits[r] for r in member_role_ids if r in config.role_limits]
    if role_values:
        if 0 in role_values:
            user_daily = 0
        elif user_daily != 0:
            user_daily = max(user_daily, *role_values)
    guild_daily, capped = config.guild_daily, False
    if default_key_daily and (not guild_daily or default_key_daily < guild_daily):
        guild_daily, capped = default_key_daily, True
    return Limits(guild_daily, user_daily, config.user_concurrent, config.cooldown_seconds, capped)


def day_start(now: float) -> float:
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def next_reset(now: float) -> float:
    return day_start(now) + 86400


def explain_refusal(limits: Limits, usage: Usage, samples: int, now: float) -> str:
    """Why a request for `samples` images does not fit, naming the limit and when it resets."""
    resets = timestamp(next_reset(now))
    if limits.cooldown_seconds and usage.user_last_request_at is not None:
        ready_at = usage.user_last_request_at + limits.cooldown_seconds
        if ready_at > now:
            return (
                f"This server asks for {limits.cooldown_seconds} s between a member's requests "
                f"(cooldown): you can ask again {timestamp(ready_at)}."
            )
    if limits.user_concurrent and usage.user_running >= limits.user_concurrent:
        return (
            f"You already have {usage.user_running} job(s) running, the most this server allows at once "
            "(concurrent jobs): wait for one to finish."
        )
    operator_cap = limits.guild_daily_is_default_key_cap
    for limit, who in ((limits.user_daily, "a member"), (limits.guild_daily, "this server")):
        if limit and samples > limit:
            if operator_cap and who == "this server":
                return (
                    f"This server runs on the bot operator's ModelsLab key, which makes at most {limit} images a day "
                    f"for each server (the operator's daily cap): ask for {limit} or fewer."
                )
            return f"This server allows {who} at most {limit} images a day (daily limit): ask for {limit} or fewer."
    if limits.guild_daily and usage.guild_today + samples > limits.guild_daily:
        left = max(limits.guild_daily - usage.guild_today, 0)
        if operator_cap:
            return (
                f"This server runs on the bot operator's ModelsLab key, which makes at most {limits.guild_daily} "
                f"images a day for each server (the operator's daily cap); {left} are left today and this asks for "
                f"{samples}: the count resets {resets}. With its own key (`/config apikey`) the server is not capped."
            )
        return (
            f"This server has {left} of its {limits.guild_daily} images for today left (server daily limit) "
            f"and this asks for {samples}: the count resets {resets}."
        )
    if limits.user_daily and usage.user_today + samples > limits.user_daily:
        left = max(limits.user_daily - usage.user_today, 0)
        return (
            f"You have {left} of your {limits.user_daily} images for today left (daily limit per member) "
            f"and this asks for {samples}: your count resets {resets}."
        )
    return "Too many requests arrived at once and this one no longer fits the server's limits: please try again."


def check_channel(config: GuildConfig, channel_id: int, parent_id: int | None = None) -> None:
    """Generation may be restricted to some channels (a thread counts as its parent channel)."""
    if not config.allowed_channels:
        return
    if channel_id in config.allowed_channels or (parent_id is not None and parent_id in config.allowed_channels):
        return
    where = listing([f"<#{c}>" for c in config.allowed_channels])
    raise Refused(f"Images are not made in this channel on this server (channel restriction): use {where}.")


def check_model(config: GuildConfig, model_id: str) -> None:
    if config.allowed_models and model_id not in config.allowed_models:
        allowed = listing([f"`{m}`" for m in config.allowed_models])
        raise Refused(f"`model` must be one of this server's allowed models: {allowed}.")


def normalise_rule(rule: str) -> str:
    """A blocklist rule as stored and compared: lower case, single spaces."""
    text = " ".join(rule.split()).lower()
    if not any(is_word(char) for char in text):
        raise Refused("A blocklist rule needs at least one letter or digit.")
    return text


def check_new_rule(rule: str, rules: tuple[str, ...]) -> None:
    """The caps that keep every prompt's check fast (see `bot.guilds.blocklist`), for a normalised rule to be added."""
    if len(rule) > MAX_BLOCKLIST_RULE_LENGTH:
        raise Refused(f"A blocklist rule may be at most {MAX_BLOCKLIST_RULE_LENGTH} characters long.")
    if rule not in rules and len(rules) >= MAX_BLOCKLIST_RULES:
        raise Refused(
            f"This server's blocklist already holds {len(rules)} rules, the most it can: "
            "remove one before adding another."
        )


def listing(items: list[str], most: int = 10) -> str:
    """A comma list that stays short (Discord messages are at most 2000 characters)."""
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def normalise_prompt(text: str) -> str:
    """What the blocklist reads: look-alike characters folded (NFKC: fullwidth letters...), invisible ones
    (zero-width spaces, soft hyphens) removed, underscores read as spaces."""
    folded = unicodedata.normalize("NFKC", text)
    if len(folded) > MAX_NORMALISED_PROMPT:
        return folded  # refused for its length: not worth reading further
    visible = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    return visible.replace("_", " ")


def check_blocklist(rules: Iterable[str], *texts: str | None) -> None:
    """Refuse the first rule (in list order) that any of the texts contains, naming it and what matched."""
    rules = tuple(rules)
    if not rules:
        return
    matcher = matcher_for(rules)
    found: tuple[int, str] | None = None
    for text in texts:
        if not text:
            continue
        normalised = normalise_prompt(text)
        if len(normalised) > MAX_NORMALISED_PROMPT:
            raise Refused(
                f"Your prompt is too long for this server's blocklist to read once its special characters are "
                f"spelled out ({len(normalised):,} characters, at most {MAX_NORMALISED_PROMPT:,}): shorten it and "
                "try again."
            )
        index = matcher.first_rule(normalised)
        if index is not None and (found is None or index < found[0]):
            found = (index, normalised)
    if found is None:
        return
    index, normalised = found
    start, end = matcher.span(index, normalised)
    quoted = normalised[start:end]
    if len(quoted) > MAX_QUOTED:
        quoted = quoted[: MAX_QUOTED - 1] + "…"
    raise Refused(
        f"Your prompt contains “{quoted}”, which this server's blocklist does not allow "
        f"(rule: `{rules[index]}`): rephrase it and try again."
    )
