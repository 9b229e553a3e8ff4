"""Job rows as both backends store them: the same columns, JSON kept as text."""

from __future__ import annotations

import json
from typing import Any, Protocol

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
    )


# The columns of a member's /settings row, in the order both backends read them.
MEMBER_DEFAULT_COLUMNS = ("model", "aspect", "steps", "guidance", "negative_prompt", "style", "flags", "remix_mode")
