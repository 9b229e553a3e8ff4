"""A member's history as text: the pages of /history show, and the files of /history export. Pure functions."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
from typing import Any

from bot.discord.markup import message_link, timestamp
from bot.discord.texts import prompt_preview
from bot.jobs.model import Job, JobStatus
from bot.requests.flags import flags_text
from bot.requests.generation import Choices, GenerationRequest

PAGE_SIZE = 5
KIND_NAMES = {"text2img": "imagine", "img2img": "remix"}
STATUS_NAMES = {
    JobStatus.QUEUED: "waiting",
    JobStatus.SUBMITTING: "sending",
    JobStatus.PROCESSING: "generating",
    JobStatus.SUCCEEDED: "done",
    JobStatus.FAILED: "failed",
}
EXPORT_FIELDS = (
    "job",
    "created_utc",
    "server",
    "kind",
    "status",
    "error",
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "samples",
    "steps",
    "guidance",
    "seed",
    "other_parameters",
    "images_posted",
    "cost_images",
    "result",
)


def page_count(total: int) -> int:
    return max(1, math.ceil(total / PAGE_SIZE))


def result_link(job: Job) -> str | None:
    if job.message_id is None or job.guild_id is None:
        return None
    return message_link(job.guild_id, job.channel_id, job.message_id)


def history_entry(job: Job) -> str:
    """One line of /history show: prompt, kind, status, cost, time and a link to the result."""
    prompt = prompt_preview(job.request.prompt, 80) if job.request.prompt else "*(forgotten)*"
    status = STATUS_NAMES.get(job.status, job.status.value)
    if job.status is JobStatus.FAILED and job.error_kind:
        status += f" ({job.error_kind.replace('_', ' ')})"
    cost = f"{job.charged_images} image{'s' if job.charged_images != 1 else ''}"
    when = timestamp(job.created_at)
    link = result_link(job)
    parts = [f"**{prompt}**", KIND_NAMES.get(job.kind, job.kind), status, cost, when]
    if link:
        parts.append(f"[result]({link})")
    return " · ".join(parts)


def history_page(jobs: list[Job], *, page: int, total: int, whose: str) -> tuple[str, str]:
    """(title, body) of one page."""
    title = f"{whose} history — page {page + 1} of {page_count(total)} ({total} job{'s' if total != 1 else ''})"
    if not jobs:
        return title, "Nothing here yet: `/imagine` something!"
    return title, "\n".join(f"{page * PAGE_SIZE + n + 1}. {history_entry(job)}" for n, job in enumerate(jobs))


def _record(job: Job) -> dict[str, Any]:
    request = job.request
    return {
        "job": job.id,
        "created_utc": datetime.datetime.fromtimestamp(job.created_at, tz=datetime.UTC).isoformat(timespec="seconds"),
        "server": job.guild_id,
        "kind": KIND_NAMES.get(job.kind, job.kind),
        "status": STATUS_NAMES.get(job.status, job.status.value),
        "error": job.error_kind,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": request.model_id,
        "width": request.width,
        "height": request.height,
        "samples": request.samples,
        "steps": request.steps,
        "guidance": request.guidance,
        "seed": job.seed if job.seed is not None else request.seed,
        "other_parameters": other_parameters(request),
        "images_posted": job.image_count,
        "cost_images": job.charged_images,
        "result": result_link(job),
    }


def other_parameters(request: GenerationRequest) -> str:
    """Everything else that was sent, written as the flags that would ask for it again."""
    lora_strength = ",".join(f"{s:g}" for s in request.lora_strengths) or None
    return flags_text(
        Choices(
            scheduler=request.scheduler,
            style=request.enhance_style,
            lora=",".join(request.lora_models) or None,
            lora_strength=lora_strength,
            advanced=request.sent_advanced(),
        )
    )


def _cell(value: object) -> object:
    """A spreadsheet runs a cell starting with = + - @ as a formula: such text is quoted."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def export_json(jobs: list[Job]) -> bytes:
    return json.dumps([_record(job) for job in jobs], indent=2, ensure_ascii=False).encode()


def export_csv(jobs: list[Job]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for job in jobs:
        writer.writerow({k: _cell(v) for k, v in _record(job).items()})
    return buffer.getvalue().encode("utf-8-sig")  # the BOM makes spreadsheet programs read UTF-8
