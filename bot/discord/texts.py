"""What members read about a job: status lines, the result summary and the failure sentences.

Plain text only (Discord markdown and `<t:...:R>` timestamps are just text); the Discord adapter in
`bot.discord.presenter` puts these into messages and embeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bot.discord.markup import message_link, timestamp
from bot.images.processing import ImageFile
from bot.jobs.model import Job, JobStatus
from bot.modelslab.client import ErrorKind
from bot.requests import parameters
from bot.requests.generation import SOURCE_NAMES, GenerationRequest

PROMPT_PREVIEW = 180


def prompt_preview(prompt: str, limit: int = PROMPT_PREVIEW) -> str:
    text = " ".join(prompt.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape_markdown(text)


def escape_markdown(text: str) -> str:
    for char in ("\\", "*", "_", "~", "`", "|", ">", "#", "-", "["):
        text = text.replace(char, "\\" + char)
    return text


def status_text(
    job: Job,
    *,
    position: int | None = None,
    waiting: int | None = None,
    retry_in: float = 0.0,
    about_ahead: int | None = None,
) -> str:
    """The status message while a job is under way: its place in line, then ModelsLab's ETA.

    Exact places for the front of the line; further back a round number ("about 300 ahead"), which changes
    seldom, so that a line of a thousand does not mean a thousand edits each time it moves.
    """
    head = f"**{prompt_preview(job.request.prompt)}** — <@{job.user_id}>"
    if job.status is JobStatus.QUEUED:
        if retry_in > 0:
            return f"{head}\n⏳ Queued: ModelsLab is busy, trying again {timestamp(time.time() + retry_in)}."
        if position == 1:
            return f"{head}\n⏳ Queued: next in line."
        if position is not None:
            # Not "of N": every new arrival would change every waiting member's message.
            return f"{head}\n⏳ Queued: position {position} in line."
        if about_ahead is not None:
            return f"{head}\n⏳ Queued: about {about_ahead} requests ahead in line."
        return f"{head}\n⏳ Queued."
    if job.status is JobStatus.SUBMITTING:
        return f"{head}\n⏳ Sending to ModelsLab…"
    if job.eta_at is not None:
        return f"{head}\n🎨 Generating, ready {timestamp(job.eta_at)} (ModelsLab's estimate)."
    return f"{head}\n🎨 Generating…"


@dataclass(frozen=True)
class ResultSummary:
    content: str
    title: str
    fields: list[tuple[str, str]]
    description: str


def result_summary(
    job: Job, images: list[ImageFile], *, spoiler: bool = False, withheld: bool = False
) -> ResultSummary:
    """Prompt, model, the real seed, size and generation time, for the message that carries the images."""
    request = job.request
    seed = job.seed if job.seed is not None else request.seed
    sizes = sorted({image.size_text for image in images})
    fields = [
        ("Model", f"`{request.model_id}`"),
        ("Seed", str(seed) if seed is not None else "unknown"),
        ("Size", ", ".join(sizes) if sizes else f"{request.width}×{request.height}"),
        ("Time", _duration(job)),
    ]
    if request.negative_prompt:
        fields.append(("Negative prompt", prompt_preview(request.negative_prompt, 300)))
    if request.lora_models:
        fields.append(("LoRA", ", ".join(request.lora_models)))
    count = len(images)
    content = f"**{prompt_preview(job.request.prompt)}** — <@{job.user_id}>"
    missing = min(len(job.output_urls), job.request.samples) - count
    what = (
        "ModelsLab flagged this result as NSFW" if job.nsfw_detected else "This was made from an image flagged as NSFW"
    )
    if withheld:
        content += f"\n🔞 {what}; this server withholds such images outside age-restricted channels."
        missing = 0
    elif spoiler:
        content += f"\n🔞 {what}: it is hidden behind a spoiler."
    if missing > 0:
        content += (
            f"\n⚠️ {missing} of {len(job.output_urls)} images could not be downloaded from ModelsLab; ModelsLab made "
            "and billed them, so they count against the quota."
        )
    if withheld:
        count = len(job.output_urls)
    return ResultSummary(
        content=content,
        title=f"{count} image{'s' if count != 1 else ''}" + (" (withheld)" if withheld else ""),
        fields=fields,
        description=prompt_preview(request.prompt, 1000),
    )


def gallery_text(job: Job) -> str:
    link = message_link(job.guild_id or 0, job.channel_id, job.message_id) if job.message_id else ""
    text = f"🖼️ **{prompt_preview(job.request.prompt)}** — by <@{job.user_id}> · `{job.request.model_id}`"
    return f"{text}\n{link}" if link else text


def _duration(job: Job) -> str:
    seconds = job.generation_time
    if seconds is None and job.finished_at is not None and job.submitted_at is not None:
        seconds = job.finished_at - job.submitted_at
    return f"{seconds:.1f} s" if seconds is not None else "unknown"


def failure_sentence(
    kind: str | None, detail: str | None, *, model_id: str, retry_after: float | None, timeout: float
) -> str:
    """One plain sentence: what went wrong and what to do."""
    detail = (detail or "").strip()
    try:
        error = ErrorKind(kind) if kind else ErrorKind.GENERATION_FAILED
    except ValueError:
        error = ErrorKind.GENERATION_FAILED
    match error:
        case ErrorKind.INVALID_KEY:
            return "ModelsLab refused this server's API key (invalid key): ask the bot's admin to check the key."
        case ErrorKind.NO_CREDITS:
            return "The ModelsLab account is out of credits: ask the bot's admin to top it up, then try again."
        case ErrorKind.NOT_ON_PLAN:
            return "This feature is not part of the ModelsLab plan behind this bot: try another model or ask an admin."
        case ErrorKind.QUEUE_FULL:
            seconds = math.ceil(retry_after) if retry_after else 30
            return f"ModelsLab's queue for this key is full: try again in {seconds} s."
        case ErrorKind.MODEL_NOT_FOUND:
            return f"ModelsLab has no model called `{model_id}` (model not found): check the model id and try again."
        case ErrorKind.PROMPT_REFUSED:
            why = f" ({detail})" if detail else ""
            return f"ModelsLab refused this prompt{why}: rephrase it and try again."
        case ErrorKind.INVALID_REQUEST:
            why = f": {detail}" if detail else ""
            return f"ModelsLab rejected the request{why}. Change that option and try again."
        case ErrorKind.IMAGE_UNREACHABLE:
            return "ModelsLab could not download the source image: try again with another image."
        case ErrorKind.SERVICE_DOWN:
            return "ModelsLab is not answering properly right now (service down): try again in a few minutes."
        case ErrorKind.TIMED_OUT:
            minutes = max(1, round(timeout / 60))
            return (
                f"ModelsLab did not finish within {minutes} minute{'s' if minutes != 1 else ''}, so the bot gave up; "
                "it is not counted against you: try again later."
            )
        case ErrorKind.LOST:
            return (
                "ModelsLab's answer to this request never came, so the bot cannot tell whether ModelsLab got it; "
                "it is not counted against you: please try again."
            )
        case ErrorKind.DOWNLOAD_FAILED:
            return (
                "The images were made (and count against the quota) but could not be downloaded from ModelsLab: "
                "please try again."
            )
        case ErrorKind.BAD_IMAGE:
            why = f": {detail}" if detail else ""
            return f"This image cannot be used{why}. Nothing was sent to ModelsLab; try another image."
        case ErrorKind.CANCELLED:
            who = f"<@{detail}>" if detail.isdigit() else "a member"
            return f"Cancelled by {who} before it was sent; it does not count against the quota."
        case ErrorKind.NO_KEY:
            return (
                "This server has no usable ModelsLab API key any more: an admin must run `/config apikey`; "
                "it is not counted against you."
            )
        case ErrorKind.UNANSWERED:
            return "The bot could not confirm this request in time, so nothing was sent to ModelsLab: please try again."
        case ErrorKind.EXPIRED:
            return (
                "The bot was unavailable for too long and gave up on this request before sending it; "
                "it is not counted against you: please try again."
            )
        case ErrorKind.DELIVERY_REFUSED:
            return (
                "The images were made (and count against the quota) but Discord refused to show them: "
                "try again with fewer or smaller images."
            )
        case ErrorKind.GENERATION_FAILED:
            why = f" ({detail})" if detail else ""
            return f"ModelsLab could not generate this image{why}: try again, perhaps with other settings."
    return "Something went wrong with this job: please try again."  # pragma: no cover - every kind is matched


def failure_text(job: Job, *, timeout: float) -> str:
    sentence = failure_sentence(
        job.error_kind, job.error_detail, model_id=job.request.model_id, retry_after=job.retry_after, timeout=timeout
    )
    return f"**{prompt_preview(job.request.prompt)}** — <@{job.user_id}>\n❌ {sentence}"


_SHOWN_NAMES = {"width": "size", "height": "size", "negative_prompt": "negative prompt", "lora": "LoRA"}


def chosen_by(request: GenerationRequest) -> str:
    """Which layer chose what, in the order they win: "the command's options: samples; the preset `x`: steps; …"."""
    by_source: dict[str, list[str]] = {}
    for name, source in request.sources.items():
        shown = _SHOWN_NAMES.get(name, name)
        if shown not in by_source.setdefault(source, []):
            by_source[source].append(shown)
    parts = []
    for source in SOURCE_NAMES:  # in the order the layers win
        if source in by_source:
            label = SOURCE_NAMES[source] + (f" `{request.preset}`" if source == "preset" and request.preset else "")
            parts.append(f"{label}: {', '.join(by_source[source])}")
    if not parts:
        return ""
    return "; ".join(parts) + "; the rest built in. (Options win over prompt flags, then the preset, then /settings.)"


def job_info(job: Job) -> str:
    """Every parameter of a job, the real seed included (the Info button)."""
    request = job.request
    kind = {"text2img": "imagine", "img2img": "remix", "upscale": "upscale"}.get(job.kind, job.kind)
    seed = job.seed if job.seed is not None else request.seed
    lines = [
        f"**Prompt:** {prompt_preview(request.prompt, 900) or '(forgotten)'}",
        f"**Negative prompt:** {prompt_preview(request.negative_prompt, 300)}" if request.negative_prompt else None,
        f"**Kind:** {kind} · **Model:** `{request.model_id}` · **Status:** {job.status.value}",
    ]
    if job.kind == "upscale":
        lines.append(f"**Scale:** ×{request.upscale_scale or 2}")
    else:
        size = "the input image's" if job.kind == "img2img" else f"{request.width}×{request.height}"
        lines.append(
            f"**Size:** {size} · **Images:** {request.samples} · **Steps:** {request.steps} · "
            f"**Guidance:** {request.guidance:g} · **Seed:** {seed if seed is not None else 'unknown'}"
        )
    if request.scheduler:
        lines.append(f"**Scheduler:** {request.scheduler}")
    if request.enhance_style:
        lines.append(f"**Style:** {request.enhance_style}")
    if request.sent_advanced():
        lines.append(
            "**Other parameters:** "
            + " · ".join(f"{name} {parameters.shown(value)}" for name, value in request.sent_advanced().items())
        )
    chosen = chosen_by(request)
    if chosen:
        lines.append(f"**Chosen by:** {chosen}")
    if request.lora_models:
        strengths = ", ".join(f"{s:g}" for s in request.lora_strengths) or "default"
        lines.append(f"**LoRA:** {', '.join(request.lora_models)} (strength {strengths})")
    if request.strength is not None:
        lines.append(f"**Strength:** {request.strength:g}")
    lines.append(
        f"**Safety checker:** {'on' if request.safety_checker else 'off (age-restricted channel)'} · "
        f"**Cost:** {job.charged_images} image(s) · **Time:** {_duration(job)}"
    )
    lines.append(f"**Asked by:** <@{job.user_id}> {timestamp(job.created_at)} · **Job:** `{job.id}`")
    if job.parent_job_id:
        lines.append(f"**Made from job:** `{job.parent_job_id}`")
    text = "\n".join(line for line in lines if line)
    return text if len(text) <= 1990 else text[:1989] + "…"  # Discord's limit is 2000
