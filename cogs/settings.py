"""`/settings`: each member's own defaults in this server, as a private form of menus and buttons.

A thin adapter: the rules and the form's text are in `bot.requests.member_defaults`. The menus and buttons are
persistent (their ids carry no state, everything is read back from the database), so an open form keeps
working across a restart. Only its owner can see an ephemeral form, so whoever presses it is its owner.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.intake import default_model_for, server_defaults
from bot.requests import member_defaults as rules
from bot.requests.member_defaults import MemberDefaults

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

DEFAULT = "default"
SELECTS = re.compile(r"settings:(?P<part>model|aspect|steps|guidance)")
BUTTONS = re.compile(r"settings:(?P<part>remix|more|reset)")
CHECKS: dict[str, Callable[[str], object]] = {
    "model": rules.check_model,
    "aspect": rules.check_aspect,
    "steps": rules.check_steps,
    "guidance": rules.check_guidance,
}


async def settings_panel(bot: ImagineBot, interaction: discord.Interaction) -> dict[str, Any]:
    """The form's content and menus for the member who asked, as they are now."""
    assert interaction.guild_id is not None
    settings = await bot.member_defaults.get(interaction.guild_id, interaction.user.id)
    config = await bot.guild_admin.config(interaction.guild_id)
    default_model = default_model_for(config, bot.settings.modelslab_default_model)
    flavour = bot.settings.modelslab_api
    server = server_defaults(config, bot.settings.modelslab_default_model).layer("text2img")
    model_in_use, unused = rules.unused_settings(settings, flavour=flavour, default_model=default_model, server=server)
    models = rules.model_choices(
        settings.model,
        config.allowed_models,
        (default_model, bot.settings.modelslab_default_remix_model),
    )
    view = discord.ui.View(timeout=None)
    view.add_item(
        SettingsSelect.build(
            "model",
            "Model",
            settings.model,
            [(m, m) for m in models],
            default_label=f"Server default ({default_model})",
        )
    )
    view.add_item(SettingsSelect.build("aspect", "Aspect ratio", settings.aspect, [(a, a) for a in rules.ASPECTS]))
    steps = [(f"{s} steps", str(s)) for s in rules.step_choices(flavour)]
    view.add_item(SettingsSelect.build("steps", "Steps", str(settings.steps) if settings.steps else None, steps))
    guidance = [(f"guidance {g:g}", f"{g:g}") for g in rules.GUIDANCES]
    current = f"{settings.guidance:g}" if settings.guidance is not None else None
    view.add_item(SettingsSelect.build("guidance", "Guidance", current, guidance))
    remix_label = "Remix mode: on" if settings.remix_mode else "Remix mode: off"
    remix_style = discord.ButtonStyle.success if settings.remix_mode else discord.ButtonStyle.secondary
    view.add_item(SettingsButton("remix", remix_label, remix_style))
    view.add_item(SettingsButton("more", "Negative prompt, style, model id, more…", discord.ButtonStyle.primary))
    view.add_item(SettingsButton("reset", "Reset all", discord.ButtonStyle.danger))
    content = rules.describe(settings, model_in_use=model_in_use, unused=unused)
    return {"content": content, "view": view}


class SettingsSelect(discord.ui.DynamicItem[discord.ui.Select[discord.ui.View]], template=SELECTS.pattern):
    def __init__(self, part: str, select: discord.ui.Select[discord.ui.View] | None = None) -> None:
        super().__init__(select or discord.ui.Select(custom_id=f"settings:{part}"))
        self.part = part

    @classmethod
    def build(
        cls,
        part: str,
        label: str,
        current: str | None,
        options: list[tuple[str, str]],
        *,
        default_label: str = "Server default",
    ) -> SettingsSelect:
        row = {"model": 0, "aspect": 1, "steps": 2, "guidance": 3}[part]
        choices = [discord.SelectOption(label=f"{label}: {default_label.lower()}"[:100], value=DEFAULT)]
        choices += [
            discord.SelectOption(label=name[:100], value=value, default=value == current) for name, value in options
        ]
        if current is None:
            choices[0].default = True
        select: discord.ui.Select[discord.ui.View] = discord.ui.Select(
            custom_id=f"settings:{part}", placeholder=label[:150], options=choices[:25], row=row
        )
        return cls(part, select)

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> SettingsSelect:
        return cls(match["part"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        try:
            assert interaction.guild_id is not None
            chosen = self.item.values[0] if self.item.values else DEFAULT
            value = CHECKS[self.part]("" if chosen == DEFAULT else chosen)  # "" is "back to the server's default"
            await bot.member_defaults.update(interaction.guild_id, interaction.user.id, **{self.part: value})
            await interaction.response.edit_message(**await settings_panel(bot, interaction))
        except Exception as exc:
            await bot.report_error(interaction, exc)


class SettingsButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=BUTTONS.pattern):
    def __init__(self, part: str, label: str = "", style: discord.ButtonStyle = discord.ButtonStyle.secondary) -> None:
        super().__init__(discord.ui.Button(custom_id=f"settings:{part}", label=label or part, style=style, row=4))
        self.part = part

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> SettingsButton:
        return cls(match["part"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        try:
            assert interaction.guild_id is not None
            guild_id, user_id = interaction.guild_id, interaction.user.id
            if self.part == "more":
                await interaction.response.send_modal(
                    MoreSettings(bot, await bot.member_defaults.get(guild_id, user_id))
                )
                return
            if self.part == "remix":
                current = await bot.member_defaults.get(guild_id, user_id)
                await bot.member_defaults.update(guild_id, user_id, remix_mode=not current.remix_mode)
            else:
                await bot.member_defaults.reset(guild_id, user_id)
            await interaction.response.edit_message(**await settings_panel(bot, interaction))
        except Exception as exc:
            await bot.report_error(interaction, exc)


class MoreSettings(discord.ui.Modal, title="Your settings"):
    """What a menu cannot hold: any model id, the negative prompt, the style and every other parameter."""

    def __init__(self, bot: ImagineBot, current: MemberDefaults) -> None:
        super().__init__(timeout=900)
        self.bot = bot
        self.model: discord.ui.TextInput[MoreSettings] = discord.ui.TextInput(
            label="Model id (empty: the server's default)", required=False, max_length=100, default=current.model
        )
        self.negative: discord.ui.TextInput[MoreSettings] = discord.ui.TextInput(
            label="Negative prompt",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=2000,
            default=current.negative_prompt,
        )
        self.style: discord.ui.TextInput[MoreSettings] = discord.ui.TextInput(
            label="Style (enhance_style, e.g. watercolor)", required=False, max_length=60, default=current.style
        )
        self.flags: discord.ui.TextInput[MoreSettings] = discord.ui.TextInput(
            label="Other parameters, as flags",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=1000,
            default=current.flags,
            placeholder="--clip_skip 2 --scheduler DPMSolverMultistepScheduler --use_karras_sigmas yes",
        )
        for item in (self.model, self.negative, self.style, self.flags):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        changes = {  # every field is checked before anything is saved
            "model": rules.check_model(self.model.value),
            "negative_prompt": rules.check_negative(self.negative.value),
            "style": rules.check_style(self.style.value),
            "flags": rules.check_flags(self.flags.value),
        }
        await self.bot.member_defaults.update(interaction.guild_id, interaction.user.id, **changes)
        await interaction.response.edit_message(**await settings_panel(self.bot, interaction))

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await self.bot.report_error(interaction, error)


class Settings(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(SettingsSelect, SettingsButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(SettingsSelect, SettingsButton)

    @app_commands.command(name="settings", description="Your own defaults in this server: model, size, style, more")
    @app_commands.guild_only()
    async def settings(self, interaction: discord.Interaction[ImagineBot]) -> None:
        await interaction.response.send_message(ephemeral=True, **await settings_panel(self.bot, interaction))


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Settings(bot))
