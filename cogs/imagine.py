"""`/imagine`: a prompt in, images out. A thin adapter: the rules live in `bot.generation` and `bot.jobs`."""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import MissingApiKey
from bot.generation import SCHEDULERS, build_generation_request
from bot.presentation import status_text

if TYPE_CHECKING:
    from bot.discord_bot import ImagineBot

log = logging.getLogger(__name__)

# Discord lets a bot use an interaction token for 15 minutes; stop a little before that.
TOKEN_LIFETIME = datetime.timedelta(minutes=15) - datetime.timedelta(seconds=30)
NO_KEY = (
    "No ModelsLab API key is set up for this bot yet, so nothing can be generated: "
    "the bot's admin must set MODELSLAB_API_KEY."
)


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
        )
        jobs = self.bot.jobs
        if jobs.api_key_for(interaction.guild_id) is None:
            raise MissingApiKey(NO_KEY)
        assert interaction.channel_id is not None  # guild_only
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
        )
        try:
            response = await interaction.response.send_message(
                status_text(job), allowed_mentions=discord.AllowedMentions.none()
            )
        except Exception as exc:  # refused, timed out, connection lost: the member saw no answer
            await jobs.abandon(job.id, f"the acknowledgement failed ({type(exc).__name__})")
            raise
        await jobs.status_message_shown(job.id, response.message_id)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
