"""The buttons on every result: Re-roll, Vary, Upscale, Edit, Info, Delete.

Persistent: each custom id carries the job id (and the image number); everything else is read from the
database, so the buttons keep working after a restart. Anyone may press Re-roll, Vary, Upscale and
Edit: the new job belongs to, and is charged to, the member who pressed, and records its parent.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.discord.intake import channel_is_nsfw, server_config, submit_job
from bot.discord.texts import job_info
from bot.errors import UserFacingError
from bot.jobs.model import Job
from bot.requests.flags import parse_flags
from bot.requests.generation import (
    SEED_MAX,
    SIDE_MIN,
    VARY_STRENGTH,
    GenerationRequest,
    build_generation_request,
    build_remix_request,
    flag_layer,
    job_layer,
)

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

GONE = "This result's job no longer exists (its history may have been deleted), so this button cannot use it."
PICTURE_FORGOTTEN = (
    "The picture this job was made from is no longer kept (the member it came from asked the bot to forget it), "
    "so it cannot be made again: remix a picture anew."
)
NOT_YOURS = "Only the member who asked for it, or a member with Manage Messages, can delete it."
ACTION = re.compile(r"job:(?P<action>reroll|vary|upscale|edit|info|delete):(?P<job_id>[0-9a-f]{32})(?::(?P<n>[1-4]))?")


def result_view(job: Job, shown_images: int) -> discord.ui.View:
    """The buttons under a result (for a withheld or upscaled result, the ones that make sense there)."""
    view = discord.ui.View(timeout=None)
    if job.kind != "upscale":
        view.add_item(JobAction(job.id, "reroll", row=0))
        view.add_item(JobAction(job.id, "edit", row=0))
    view.add_item(JobAction(job.id, "info", row=0))
    view.add_item(JobAction(job.id, "delete", row=0))
    if job.kind != "upscale":
        for n in range(1, shown_images + 1):
            view.add_item(JobAction(job.id, "vary", n, row=1))
        for n in range(1, shown_images + 1):
            view.add_item(JobAction(job.id, "upscale", n, row=2))
    return view


LABELS = {"reroll": "🔄 Re-roll", "edit": "✏️ Edit", "info": "ℹ️ Info", "delete": "🗑️"}


class JobAction(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=ACTION.pattern):
    def __init__(self, job_id: str, action: str, n: int | None = None, *, row: int | None = None) -> None:
        label = LABELS.get(action) or f"{'V' if action == 'vary' else 'U'}{n}"
        custom_id = f"job:{action}:{job_id}" + (f":{n}" if n else "")
        style = discord.ButtonStyle.danger if action == "delete" else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=custom_id, row=row))
        self.job_id, self.action, self.n = job_id, action, n

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobAction:
        n = match["n"]
        return cls(match["job_id"], match["action"], int(n) if n else None)

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        try:
            await self._act(bot, interaction)
        except Exception as exc:
            await bot.report_error(interaction, exc)

    async def _act(self, bot: ImagineBot, interaction: discord.Interaction) -> None:
        job = await bot.jobs.get(self.job_id)
        if job is None or (not job.request.prompt and self.action != "delete"):
            raise UserFacingError(GONE)  # gone, or forgotten (a moderator can still delete what it left)
        if self.action == "info":
            await interaction.response.send_message(
                job_info(job), ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
            )
        elif self.action == "delete":
            await delete_result(interaction, job)
        elif self.action == "edit":
            await interaction.response.send_modal(EditModal(bot, job))
        elif self.action in ("reroll", "vary"):
            image_url = self._image_url(interaction) if self.action == "vary" else None
            assert interaction.guild_id is not None
            if (await bot.member_defaults.get(interaction.guild_id, interaction.user.id)).remix_mode:
                # The member's remix mode (/settings): the Edit form first, then the re-roll or variation.
                await interaction.response.send_modal(EditModal(bot, job, vary_image_url=image_url))
            elif image_url is not None:
                await vary(bot, interaction, job, image_url)
            else:
                await reroll(bot, interaction, job)
        else:
            await upscale(bot, interaction, job, self._image_url(interaction))

    def _image_url(self, interaction: discord.Interaction) -> str:
        """The picked image, as Discord hands it over with the pressed message."""
        return self._attachment(interaction).url

    def _attachment(self, interaction: discord.Interaction) -> discord.Attachment:
        attachments = interaction.message.attachments if interaction.message else []
        if self.n is None or self.n > len(attachments):
            raise UserFacingError("That image is no longer in this message.")
        return attachments[self.n - 1]


async def delete_result(interaction: discord.Interaction, job: Job) -> None:
    if interaction.user.id != job.user_id and not interaction.permissions.manage_messages:
        raise UserFacingError(NOT_YOURS)
    assert interaction.message is not None
    await interaction.response.send_message("Deleted.", ephemeral=True)
    await interaction.message.delete()
    log.info("Job %s result deleted by member %s", job.id, interaction.user.id)


def made_from_flagged(job: Job) -> bool:
    """A variation or an upscale of this job's images keeps their NSFW state."""
    return job.nsfw_detected or job.source_flagged


async def require_picture(bot: ImagineBot, job: Job) -> None:
    """A job made again from a member's picture needs that picture still kept (/history forget deletes it)."""
    if job.kind == "img2img" and not await bot.jobs.picture_kept(job):
        raise UserFacingError(PICTURE_FORGOTTEN)


async def reroll(bot: ImagineBot, interaction: discord.Interaction, job: Job) -> None:
    """The same request with a new seed."""
    config = await server_config(bot, interaction)
    await require_picture(bot, job)
    request = dataclasses.replace(
        job.request,
        seed=secrets.randbelow(SEED_MAX + 1),
        seed_is_random=True,
        sources={name: "job" for name in job.request.sources if name != "seed"},
        safety_checker=not channel_is_nsfw(interaction),
    )
    await submit_job(
        bot,
        interaction,
        kind=job.kind,
        request=request,
        config=config,
        parent_job_id=job.id,
        input_from_job=job.id if job.kind == "img2img" else None,
        source_flagged=job.source_flagged,
        picture_owner_id=job.picture_owner_id,
    )


def remix_model(bot: ImagineBot, job: Job) -> str:
    """Vary keeps the model, unless it cannot do image to image (flux): then the server's remix model."""
    model = job.request.model_id
    return bot.settings.modelslab_default_remix_model if model.lower() == "flux" else model


async def vary(
    bot: ImagineBot,
    interaction: discord.Interaction,
    job: Job,
    image_url: str,
    prompt: str | None = None,
    negative_prompt: str | None = None,
) -> None:
    """Image to image of the picked image, with the same prompt (or the edited one, flags and all), at a
    moderate strength. The job's model is kept unless it cannot remix (then the server's remix model)."""
    config = await server_config(bot, interaction)
    layers = [job_layer(job.request)]
    if prompt is not None:
        typed = parse_flags(prompt, side_min=SIDE_MIN)
        prompt, layers = typed.prompt, [flag_layer(typed.choices), *layers]
    request = build_remix_request(
        flavour=bot.settings.modelslab_api,
        default_model=remix_model(bot, job),
        prompt=job.request.prompt if prompt is None else prompt,
        negative_prompt=job.request.negative_prompt if prompt is None else negative_prompt,
        source_url=image_url,
        strength=VARY_STRENGTH,
        samples=1,
        safety_checker=not channel_is_nsfw(interaction),
        layers=layers,
    )
    await submit_job(
        bot,
        interaction,
        kind="img2img",
        request=request,
        config=config,
        parent_job_id=job.id,
        source_flagged=made_from_flagged(job),
    )


async def upscale(bot: ImagineBot, interaction: discord.Interaction, job: Job, image_url: str) -> None:
    """ModelsLab's super resolution of the picked image; the result is its own message."""
    config = await server_config(bot, interaction)
    request = GenerationRequest(
        prompt=job.request.prompt, model_id=job.request.model_id, samples=1, source_url=image_url, upscale_scale=2
    )
    await submit_job(
        bot,
        interaction,
        kind="upscale",
        request=request,
        config=config,
        parent_job_id=job.id,
        source_flagged=made_from_flagged(job),
    )


class EditModal(discord.ui.Modal):
    """Midjourney's "remix mode": the prompt and negative prompt, prefilled, then a new job (a variation of
    `vary_image_url` when given); every other choice of the job is kept where it still fits."""

    def __init__(self, bot: ImagineBot, job: Job, *, vary_image_url: str | None = None) -> None:
        title = "Vary: edit the prompt first" if vary_image_url else "Edit and generate again"
        super().__init__(title=title, timeout=900)
        self.bot = bot
        self.job = job
        self.vary_image_url = vary_image_url
        self.prompt: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, max_length=2000, default=job.request.prompt[:2000]
        )
        self.negative: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Negative prompt", required=False, max_length=2000, default=job.request.negative_prompt or ""
        )
        self.add_item(self.prompt)
        self.add_item(self.negative)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        bot, job, old = self.bot, self.job, self.job.request
        if self.vary_image_url is not None:
            await vary(bot, interaction, job, self.vary_image_url, self.prompt.value, self.negative.value or None)
            return
        config = await server_config(bot, interaction)
        await require_picture(bot, job)
        typed = parse_flags(self.prompt.value, side_min=SIDE_MIN)  # flags typed in the form win over the job's
        common: dict[str, Any] = {
            "flavour": bot.settings.modelslab_api,
            "default_model": old.model_id,
            "prompt": typed.prompt,
            "negative_prompt": self.negative.value or None,
            "safety_checker": not channel_is_nsfw(interaction),
            "layers": [flag_layer(typed.choices), job_layer(old)],
        }
        if job.kind == "img2img":
            request = build_remix_request(source_url=old.source_url or "", strength=old.strength, **common)
        else:
            request = build_generation_request(**common)
        await submit_job(
            bot,
            interaction,
            kind=job.kind,
            request=request,
            config=config,
            parent_job_id=job.id,
            input_from_job=job.id if job.kind == "img2img" else None,
            source_flagged=job.source_flagged,
            picture_owner_id=job.picture_owner_id,
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await self.bot.report_error(interaction, error)


class Actions(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(JobAction)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(JobAction)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Actions(bot))
    bot.result_view = result_view
