"""Rows as both backends store them: the same columns, JSON kept as text."""

from __future__ import annotations

import json
from typing import Any, Protocol

from bot.guilds.rules import GuildConfig
from bot.jobs.model import Job, JobStatus
from bot.requests.generation import GenerationRequest


class Row(Protocol):
    """A result row read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


def job_from_row(row: Row) -> Job:
    outputs = json.loads(row["output_json"]) if row["output_json"] else {}
    return Job(
        id=row["id"],
        kind=row["kind"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        user_id=row["user_id"],
        request=GenerationRequest.from_json(json.loads(row["request_json"])),
        api_flavour=row["api_flavour"],
        status=JobStatus(row["status"]),
        created_at=row["created_at"],
        deadline_at=row["deadline_at"],
        updated_at=row["updated_at"],
        modelslab_id=row["modelslab_id"],
        fetch_url=row["fetch_url"],
        eta_at=row["eta_at"],
        output_urls=tuple(outputs.get("output", ())),
        proxy_urls=tuple(outputs.get("proxy", ())),
        meta=json.loads(row["meta_json"]) if row["meta_json"] else {},
        seed=row["seed"],
        generation_time=row["generation_time"],
        image_count=row["image_count"],
        error_kind=row["error_kind"],
        error_detail=row["error_detail"],
        retry_after=row["retry_after"],
        charged_images=row["charged_images"],
        application_id=row["application_id"],
        interaction_token=row["interaction_token"],
        token_expires_at=row["token_expires_at"],
        message_id=row["message_id"],
        attachment_size_limit=row["attachment_size_limit"],
        submitted_at=row["submitted_at"],
        finished_at=row["finished_at"],
        posted_at=row["posted_at"],
        channel_nsfw=bool(row["channel_nsfw"]),
        nsfw_detected=bool(row["nsfw_detected"]),
        gallery_message_id=row["gallery_message_id"],
        parent_job_id=row["parent_job_id"],
        source_flagged=bool(row["source_flagged"]),
        picture_owner_id=row["picture_owner_id"],
        owner=row["owner"],
    )


# The columns a new job is stored with (`job_insert_values` gives their values, in this order).
JOB_INSERT_COLUMNS = (
    "id", "kind", "guild_id", "channel_id", "user_id", "request_json", "api_flavour", "status", "charged_images",
    "application_id", "interaction_token", "token_expires_at", "attachment_size_limit", "channel_nsfw",
    "parent_job_id", "created_at", "deadline_at", "updated_at", "source_flagged", "picture_owner_id", "owner",
    "lease_expires_at",
)  # fmt: skip


def job_insert_values(job: Job, owner: str, lease_expires_at: float) -> tuple[Any, ...]:
    """A new job is driven by the process that stores it."""
    return (
        job.id,
        job.kind,
        job.guild_id,
        job.channel_id,
        job.user_id,
        json.dumps(job.request.to_json()),
        job.api_flavour,
        job.status.value,
        job.charged_images,
        job.application_id,
        job.interaction_token,
        job.token_expires_at,
        job.attachment_size_limit,
        int(job.channel_nsfw),
        job.parent_job_id,
        job.created_at,
        job.deadline_at,
        job.updated_at,
        int(job.source_flagged),
        job.picture_owner_id,
        owner,
        lease_expires_at,
    )


def guild_config_from_row(
    guild_id: int, row: Row | None, role_limits: dict[int, int], blocklist: tuple[str, ...]
) -> GuildConfig:
    """A server's /config from its `guild_settings` row (None: never configured, the defaults)."""
    if row is None:
        return GuildConfig(guild_id=guild_id, role_limits=role_limits, blocklist=blocklist)
    return GuildConfig(
        guild_id=guild_id,
        api_key_last4=row["api_key_last4"] if row["api_key_ciphertext"] is not None else None,
        guild_daily=row["guild_daily"],
        user_daily=row["user_daily"],
        user_concurrent=row["user_concurrent"],
        cooldown_seconds=row["cooldown_seconds"],
        allowed_channels=tuple(int(c) for c in json.loads(row["allowed_channels_json"])),
        gallery_channel_id=row["gallery_channel_id"],
        nsfw_policy=row["nsfw_policy"],
        default_model=row["default_model"],
        default_negative_prompt=row["default_negative_prompt"],
        default_width=row["default_width"],
        default_height=row["default_height"],
        default_steps=row["default_steps"],
        allowed_models=tuple(json.loads(row["allowed_models_json"])),
        role_limits=role_limits,
        blocklist=blocklist,
    )


# The columns of /config a server may change (`GuildRepository.update`).
GUILD_SETTING_COLUMNS = frozenset({
    "api_key_ciphertext", "api_key_last4", "guild_daily", "user_daily", "user_concurrent", "cooldown_seconds",
    "allowed_channels_json", "gallery_channel_id", "nsfw_policy", "default_model", "default_negative_prompt",
    "default_width", "default_height", "default_steps", "allowed_models_json",
})  # fmt: skip

# The columns of a member's /settings row, in the order both backends read them.
MEMBER_DEFAULT_COLUMNS = ("model", "aspect", "steps", "guidance", "negative_prompt", "style", "flags", "remix_mode")
