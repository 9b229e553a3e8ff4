"""`/imagine`: a prompt in, images out. A thin adapter: the rules live in `bot.requests` and `bot.jobs`."""

from __future__ import annotations

import logging
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
from bot.errors import InvalidOption
from bot.requests.flags import parse_flags
from bot.requests.generation import (
    SCHEDULERS,
    SIDE_MIN,
    Layer,
    build_generation_request,
    flag_layer,
    preset_layer,
)

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

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
        preset="One of this server's presets (/config preset)",
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
        preset: str | None = None,
    ) -> None:
        settings = self.bot.settings
        config = await server_config(self.bot, interaction)
        chosen_preset = await self.preset_choices(interaction.guild_id, preset)
        # A ratio is at most 4:1, so its size is the same whatever the model's smallest side.
        typed = parse_flags(prompt, side_min=SIDE_MIN)
        # Precedence: an explicit option, then a flag typed in the prompt (--ar 16:9 --seed 7 ...), then the
        # preset's flags, then the member's /settings, then the server's defaults, then the built-in ones.
        layers = [flag_layer(typed.choices)]
        if chosen_preset is not None:
            layers.append(chosen_preset)
        layers.append(await member_layer(self.bot, interaction))
        request = build_generation_request(
            flavour=settings.modelslab_api,
            default_model=settings.modelslab_default_model,
            prompt=typed.prompt,
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
            layers=layers,
            allowed_models=config.allowed_models,
        )
        await submit_job(self.bot, interaction, kind="text2img", request=request, config=config)

    async def preset_choices(self, guild_id: int | None, name: str | None) -> Layer | None:
        """The chosen preset as a layer of choices, or a refusal naming the server's presets."""
        if not name or guild_id is None:
            return None
        presets = await self.bot.guild_admin.presets(guild_id)
        key = " ".join(name.split()).lower()
        if key not in presets:
            names = ", ".join(f"`{n}`" for n in presets) or "none yet (an admin adds them with `/config preset`)"
            raise InvalidOption("preset", f"must be one of this server's presets: {names}."[:1900])
        return preset_layer(key, parse_flags(presets[key], side_min=SIDE_MIN).choices)

    @imagine.autocomplete("preset")
    async def preset_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        presets = await self.bot.guild_admin.presets(interaction.guild_id)
        typed = current.strip().lower()
        return [
            app_commands.Choice(name=f"{name}: {flags}"[:100], value=name)
            for name, flags in presets.items()
            if typed in name
        ][:25]

    @imagine.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return await model_choices(self.bot, interaction, current)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
