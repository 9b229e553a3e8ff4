"""`/imagine`: a prompt in, images out. A thin adapter: the rules live in `bot.generation` and `bot.jobs`."""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import MissingApiKey
from bot.generation import SCHEDULERS, ServerDefaults, build_generation_request
from bot.guild_rules import GuildConfig, check_blocklist, check_channel, check_model, limits_for
from bot.guilds import NO_KEY, UNREADABLE_KEY
from bot.presentation import status_text

if TYPE_CHECKING:
    from bot.discord_bot import ImagineBot

log = logging.getLogger(__name__)

# Discord lets a bot use an interaction token for 15 minutes; stop a little before that.
TOKEN_LIFETIME = datetime.timedelta(minutes=15) - datetime.timedelta(seconds=30)


def default_model_for(config: GuildConfig, bot_default: str) -> str:
    """The server's default model; if the server allows only some models and its default is not one of them,
    the first allowed model (a member who names no model must not be refused for it)."""
    default = config.default_model or bot_default
    if config.allowed_models and default not in config.allowed_models:
        return config.allowed_models[0]
    return default


class Imagine(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Turn a prompt into images with ModelsLab.")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What the image should show",
        negative_prompt="What it should not show (not for the flux model)",
        model="ModelsLab model_id (default: the server's default model)",
        width="Width in pixels: a multiple of 8, at most 1024",
        height="Height in pixels: a multiple of 8, at most 1024",
        samples="How many images, 1 to 4",
        steps="Denoising steps (allowed values depend on the model)",
        guidance="How closely to follow the prompt, 1 to 20 (default 7.5)",
        seed="Seed for a reproducible result (default: random)",
        scheduler="Sampling scheduler",
        lora="LoRA model ids, separated by commas",
        lora_strength="One strength per LoRA, 0.1 to 1, separated by commas",
    )
    @app_commands.choices(scheduler=[app_commands.Choice(name=name, value=name) for name in SCHEDULERS])
    async def imagine(
        self,
        interaction: discord.Interaction[ImagineBot],
        prompt: str,
        negative_prompt: str | None = None,
        model: str | None = None,
        width: int | None = None,
        height: int | None = None,
        samples: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        scheduler: app_commands.Choice[str] | None = None,
        lora: str | None = None,
        lora_strength: str | None = None,
    ) -> None:
        settings = self.bot.settings
        assert interaction.guild_id is not None and interaction.channel_id is not None  # guild_only
        config = await self.bot.guild_admin.config(interaction.guild_id)
        channel = interaction.channel
        check_channel(config, interaction.channel_id, getattr(channel, "parent_id", None))
        channel_nsfw = bool(getattr(channel, "is_nsfw", lambda: False)())
        request = build_generation_request(
            flavour=settings.modelslab_api,
            default_model=settings.modelslab_default_model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            model=model,
            width=width,
            height=height,
            samples=samples,
            steps=steps,
            guidance=guidance,
            seed=seed,
            scheduler=scheduler.value if scheduler is not None else None,
            lora=lora,
            lora_strength=lora_strength,
            # Outside age-restricted channels the safety checker is always on.
            safety_checker=not channel_nsfw,
            defaults=ServerDefaults(
                model=default_model_for(config, settings.modelslab_default_model),
                negative_prompt=config.default_negative_prompt,
                width=config.default_width,
                height=config.default_height,
                steps=config.default_steps,
            ),
        )
        check_model(config, request.model_id)
        check_blocklist(config.blocklist, request.prompt)
        jobs = self.bot.jobs
        if await jobs.api_key_for(interaction.guild_id) is None:
            unreadable = await self.bot.guild_admin.key_is_unreadable(interaction.guild_id)
            raise MissingApiKey(UNREADABLE_KEY if unreadable else NO_KEY)
        role_ids = [role.id for role in getattr(interaction.user, "roles", [])]
        job = await jobs.create(
            kind="text2img",
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            user_id=interaction.user.id,
            request=request,
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            token_expires_at=(interaction.created_at + TOKEN_LIFETIME).timestamp(),
            attachment_size_limit=interaction.filesize_limit,
            channel_nsfw=channel_nsfw,
            limits=limits_for(config, role_ids),
        )
        try:
            response = await interaction.response.send_message(
                status_text(job), allowed_mentions=discord.AllowedMentions.none()
            )
        except Exception as exc:  # refused, timed out, connection lost: the member saw no answer
            await jobs.abandon(job.id, f"the acknowledgement failed ({type(exc).__name__})")
            raise
        await jobs.status_message_shown(job.id, response.message_id)

    @imagine.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], current: str
    ) -> list[app_commands.Choice[str]]:
        """The server's allowed models, else ModelsLab's public list (cached; never a slow answer)."""
        allowed: tuple[str, ...] = ()
        api_key = None
        if interaction.guild_id is not None:
            allowed = (await self.bot.guild_admin.config(interaction.guild_id)).allowed_models
            api_key = await self.bot.jobs.api_key_for(interaction.guild_id)
        models = await self.bot.catalog.suggestions(current, api_key, allowed)
        return [app_commands.Choice(name=model, value=model) for model in models]


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
