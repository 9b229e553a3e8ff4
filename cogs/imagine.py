"""`/imagine`: a prompt in, images out. A thin adapter: the rules live in `bot.generation` and `bot.jobs`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.generation import SCHEDULERS, build_generation_request
from cogs.job_requests import channel_is_nsfw, server_config, server_defaults, submit_job

if TYPE_CHECKING:
    from bot.discord_bot import ImagineBot

log = logging.getLogger(__name__)


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
        config = await server_config(self.bot, interaction)
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
            safety_checker=not channel_is_nsfw(interaction),
            defaults=server_defaults(config, settings.modelslab_default_model),
        )
        await submit_job(self.bot, interaction, kind="text2img", request=request, config=config)

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
