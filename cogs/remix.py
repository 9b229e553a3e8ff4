"""`/remix` and the "Remix" message menu: image-to-image from an image posted in chat. Thin adapters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.intake import (
    channel_is_nsfw,
    member_layer,
    model_choices,
    server_config,
    server_defaults,
    submit_job,
)
from bot.errors import InvalidOption, UserFacingError
from bot.images.processing import MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from bot.images.ssrf_guard import DownloadRefused, discord_media_policy
from bot.requests.flags import parse_flags
from bot.requests.generation import DEFAULT_STRENGTH, SIDE_MIN, build_remix_request, flag_layer

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
NO_IMAGE = (
    "This message has no picture that Discord hosts to remix: use it on a message with an image attachment "
    "or an embed image."
)


def check_attachment(attachment: discord.Attachment) -> None:
    """What Discord tells about the file, checked before anything is spent (its content is checked once read)."""
    declared = (attachment.content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES and not attachment.filename.lower().endswith(IMAGE_ENDINGS):
        raise InvalidOption("image", "must be a PNG, JPEG or WebP picture (of a GIF, the first frame is used).")
    if attachment.size > MAX_INPUT_BYTES:
        raise InvalidOption("image", f"must be at most {MAX_INPUT_BYTES // (1024 * 1024)} MB.")
    if attachment.width and attachment.height and attachment.width * attachment.height > MAX_INPUT_PIXELS:
        raise InvalidOption("image", f"has too many pixels ({attachment.width}×{attachment.height}).")


@dataclass(frozen=True)
class Picture:
    url: str
    spoiler: bool  # posted behind a spoiler: what is made from it is shown behind one too


def image_in(message: discord.Message, api_base: str) -> Picture | None:
    """The first picture of a message that Discord hosts: an attachment (checked like /remix's), else an
    embed's image or thumbnail through Discord's media proxy. Anything else is never fetched (it could point
    anywhere, an internal address included)."""
    for attachment in message.attachments:
        declared = (attachment.content_type or "").split(";")[0].strip().lower()
        if declared in IMAGE_TYPES or attachment.filename.lower().endswith(IMAGE_ENDINGS):
            check_attachment(attachment)
            return Picture(attachment.url, attachment.is_spoiler())
    policy = discord_media_policy(api_base)
    for embed in message.embeds:
        for picture in (embed.image, embed.thumbnail):
            for url in (picture.proxy_url, picture.url) if picture else ():
                if not url:
                    continue
                try:
                    policy.check(url)
                except DownloadRefused:
                    continue
                return Picture(url, spoiler=False)
    return None


def parse_strength(text: str) -> float | None:
    text = text.strip().replace(",", ".")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidOption("strength", "must be a number from 0 to 1, such as 0.7.") from None


class RemixModal(discord.ui.Modal, title="Remix this image"):
    prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, max_length=2000, placeholder="What it should become"
    )
    negative_prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
        label="Negative prompt", required=False, max_length=2000, placeholder="What it should not show"
    )
    strength: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
        label="Strength (0 keeps the image, 1 ignores it)",
        required=False,
        max_length=5,
        default=f"{DEFAULT_STRENGTH:g}",
    )

    def __init__(self, bot: ImagineBot, source: Picture) -> None:
        super().__init__(timeout=900)
        self.bot = bot
        self.source = source

    async def on_submit(self, interaction: discord.Interaction) -> None:
        settings = self.bot.settings
        config = await server_config(self.bot, interaction)
        typed = parse_flags(self.prompt.value, side_min=SIDE_MIN)
        request = build_remix_request(
            flavour=settings.modelslab_api,
            default_model=settings.modelslab_default_remix_model,
            prompt=typed.prompt,
            negative_prompt=self.negative_prompt.value or None,
            strength=parse_strength(self.strength.value),
            source_url=self.source.url,
            safety_checker=not channel_is_nsfw(interaction),
            defaults=server_defaults(config, settings.modelslab_default_remix_model),
            layers=[flag_layer(typed.choices), await member_layer(self.bot, interaction)],
            allowed_models=config.allowed_models,
        )
        await submit_job(
            self.bot,
            interaction,
            kind="img2img",
            request=request,
            config=config,
            source_flagged=self.source.spoiler,
            picture_owner_id=interaction.user.id,
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await self.bot.report_error(interaction, error)


class Remix(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Remix", callback=self.remix_message)
        self.menu.guild_only = True
        bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    @app_commands.command(name="remix", description="Transform an image with a prompt (image to image).")
    @app_commands.guild_only()
    @app_commands.describe(
        image="The picture to start from (PNG, JPEG or WebP)",
        prompt="What it should become",
        strength="0 keeps the image, 1 ignores it (default 0.7)",
        negative_prompt="What it should not show",
        model="ModelsLab model_id that can do image to image (default: the server's remix model)",
        samples="How many images, 1 to 4",
        steps="Denoising steps (allowed values depend on the model)",
        guidance="How closely to follow the prompt, 1 to 20 (default 7.5)",
        seed="Seed for a reproducible result (default: random)",
    )
    async def remix(
        self,
        interaction: discord.Interaction[ImagineBot],
        image: discord.Attachment,
        prompt: str,
        strength: float | None = None,
        negative_prompt: str | None = None,
        model: str | None = None,
        samples: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
    ) -> None:
        check_attachment(image)
        settings = self.bot.settings
        config = await server_config(self.bot, interaction)
        typed = parse_flags(prompt, side_min=SIDE_MIN)
        request = build_remix_request(
            flavour=settings.modelslab_api,
            default_model=settings.modelslab_default_remix_model,
            prompt=typed.prompt,
            source_url=image.url,
            strength=strength,
            negative_prompt=negative_prompt,
            model=model,
            samples=samples,
            steps=steps,
            guidance=guidance,
            seed=seed,
            safety_checker=not channel_is_nsfw(interaction),
            defaults=server_defaults(config, settings.modelslab_default_remix_model),
            layers=[flag_layer(typed.choices), await member_layer(self.bot, interaction)],
            allowed_models=config.allowed_models,
        )
        await submit_job(
            self.bot,
            interaction,
            kind="img2img",
            request=request,
            config=config,
            source_flagged=image.is_spoiler(),
            picture_owner_id=interaction.user.id,
        )

    @remix.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return await model_choices(self.bot, interaction, current)

    async def remix_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        source = image_in(message, self.bot.settings.discord_api_base)
        if source is None:
            raise UserFacingError(NO_IMAGE)
        await server_config(self.bot, interaction)  # refuse here, before the form, in a channel not allowed
        await interaction.response.send_modal(RemixModal(self.bot, source))


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Remix(bot))
