"""`/config` (server admins) and `/quota` (everyone): thin adapters over `bot.guilds.GuildAdmin`."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.intake import default_model_for
from bot.discord.markup import timestamp
from bot.errors import UserFacingError
from bot.guilds.rules import GuildConfig, Refused, listing
from bot.requests.flags import parse_flags
from bot.requests.generation import FLUX_SIDE_MIN, SIDE_MAX, SIDE_MIN, check_preset_fits, is_model_id

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

NEEDS_MANAGE_SERVER = (
    "Only members with the Manage Server permission can change the bot's settings (missing permission)."
)


class MissingManageServer(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__(NEEDS_MANAGE_SERVER)


def require_manage_server(interaction: discord.Interaction) -> None:
    """Checked by the bot on every call, not only by Discord's default permission (admins can override that)."""
    if interaction.guild_id is None or not interaction.permissions.manage_guild:
        raise MissingManageServer()


def _limit(value: int, unit: str) -> str:
    return "none" if value == 0 else f"{value} {unit}"


def describe(config: GuildConfig, *, operator_key: bool, key_unreadable: bool = False) -> str:
    if key_unreadable:
        key = (
            f"this server's own, ending in `{config.api_key_last4}`, **unreadable** (SECRET_KEY changed): set it again"
        )
    elif config.api_key_last4 is not None:
        key = f"this server's own, ending in `{config.api_key_last4}`"
    elif operator_key:
        key = "the bot operator's default key (run `/config apikey` to use this server's own)"
    else:
        key = "none: run `/config apikey` (nothing can be generated until then)"
    roles = listing(
        [
            f"<@&{role}>: {'unlimited' if value == 0 else f'{value}/day'}"
            + (
                " (no effect: not above the member limit)"
                if value and config.user_daily and value <= config.user_daily
                else ""
            )
            for role, value in config.role_limits.items()
        ]
    )
    channels = listing([f"<#{c}>" for c in config.allowed_channels]) or "everywhere"
    gallery = f"<#{config.gallery_channel_id}>" if config.gallery_channel_id else "none"
    size = (
        f"{config.default_width or 'default'}×{config.default_height or 'default'}"
        if config.default_width or config.default_height
        else "built-in"
    )
    defaults = [
        f"model `{config.default_model}`" if config.default_model else "model: the bot's default",
        f"negative prompt “{_short(config.default_negative_prompt, 100)}”" if config.default_negative_prompt else None,
        f"size {size}",
        f"steps {config.default_steps}" if config.default_steps else None,
    ]
    allowed = listing([f"`{m}`" for m in config.allowed_models]) or "any"
    nsfw = "hidden behind a spoiler" if config.nsfw_policy == "spoiler" else "withheld"
    lines = [
        f"**ModelsLab key:** {key}",
        f"**Limits:** server {_limit(config.guild_daily, 'images/day')}"
        f" · member {_limit(config.user_daily, 'images/day')}"
        f" · at once {_limit(config.user_concurrent, 'jobs')} · cooldown {_limit(config.cooldown_seconds, 's')}",
        f"**Role limits:** {roles or 'none'}",
        f"**Channels:** {channels} · **Gallery:** {gallery}",
        f"**Flagged (NSFW) results outside age-restricted channels:** {nsfw}",
        f"**Blocklist:** {len(config.blocklist)} rule(s)",
        "**Defaults:** " + ", ".join(d for d in defaults if d) + f" · **Allowed models:** {allowed}",
    ]
    return _short("\n".join(lines), 1800)


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


class ApiKeyModal(discord.ui.Modal, title="ModelsLab API key"):
    key: discord.ui.TextInput[ApiKeyModal] = discord.ui.TextInput(
        label="API key", placeholder="Paste the key from modelslab.com/dashboard", min_length=8, max_length=200
    )

    def __init__(self, bot: ImagineBot) -> None:
        super().__init__(timeout=600)
        self.bot = bot

    async def on_submit(self, interaction: discord.Interaction) -> None:
        require_manage_server(interaction)
        assert interaction.guild_id is not None
        # Checking the key goes over the network: acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            ending = await self.bot.guild_admin.set_api_key(interaction.guild_id, self.key.value)
        except UserFacingError as exc:
            await interaction.followup.send(exc.message, ephemeral=True)
            return
        await interaction.followup.send(
            f"Saved: this server's jobs now use its own ModelsLab key, ending in `{ending}` (stored encrypted).",
            ephemeral=True,
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        if isinstance(error, MissingManageServer):
            message = NEEDS_MANAGE_SERVER
        else:
            log.error("The API key form failed", exc_info=error)
            message = "Something went wrong on the bot's side and the key was not saved; please try again."
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class ConfigCommands(app_commands.Group, name="config", description="Server settings for image generation"):
    def __init__(self, bot: ImagineBot) -> None:
        super().__init__()
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        require_manage_server(interaction)
        return True

    @property
    def admin(self):  # type: ignore[no-untyped-def]
        return self.bot.guild_admin

    async def _reply(self, interaction: discord.Interaction, message: str) -> None:
        await interaction.response.send_message(
            message, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )

    async def _show(self, interaction: discord.Interaction, prefix: str = "") -> None:
        assert interaction.guild_id is not None
        config = await self.admin.config(interaction.guild_id)
        unreadable = await self.admin.key_is_unreadable(interaction.guild_id)
        text = describe(config, operator_key=self.admin.uses_operator_key(config), key_unreadable=unreadable)
        await self._reply(interaction, f"{prefix}\n{text}" if prefix else text)

    @app_commands.command(name="show", description="Show this server's settings")
    async def show(self, interaction: discord.Interaction) -> None:
        await self._show(interaction)

    @app_commands.command(
        name="apikey", description="Set this server's ModelsLab API key (checked, then stored encrypted)"
    )
    async def apikey(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(ApiKeyModal(self.bot))

    @app_commands.command(name="apikey-clear", description="Remove this server's ModelsLab API key")
    async def apikey_clear(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        await self.admin.clear_api_key(interaction.guild_id)
        await self._show(interaction, "This server's API key was removed.")

    @app_commands.command(name="limits", description="Images per day and per member, jobs at once, cooldown (0 = none)")
    @app_commands.describe(
        guild_daily="Images per UTC day for the whole server (0 = no limit)",
        user_daily="Images per UTC day for each member (0 = no limit)",
        user_concurrent="Jobs a member may have running at once (0 = no limit)",
        cooldown="Seconds between a member's requests (0 = none)",
    )
    async def limits(
        self,
        interaction: discord.Interaction,
        guild_daily: int | None = None,
        user_daily: int | None = None,
        user_concurrent: int | None = None,
        cooldown: int | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        await self.admin.set_limits(
            interaction.guild_id,
            guild_daily=guild_daily,
            user_daily=user_daily,
            user_concurrent=user_concurrent,
            cooldown=cooldown,
        )
        await self._show(interaction, "Limits saved.")

    @app_commands.command(
        name="role-limit", description="A role's own images per day (0 = unlimited; leave out to remove)"
    )
    @app_commands.describe(role="The role", user_daily="Images per UTC day for its members (0 = unlimited)")
    async def role_limit(
        self, interaction: discord.Interaction, role: discord.Role, user_daily: int | None = None
    ) -> None:
        assert interaction.guild_id is not None
        await self.admin.set_role_limit(interaction.guild_id, role.id, user_daily)
        what = "removed" if user_daily is None else "saved"
        await self._show(interaction, f"Role limit for {role.mention} {what}.")

    @app_commands.command(name="channels", description="Where images may be made, and the gallery channel")
    @app_commands.describe(
        action="allow/remove a channel, allow everywhere, or set/clear the gallery",
        channel="The channel (for allow, remove and gallery)",
    )
    async def channels(
        self,
        interaction: discord.Interaction,
        action: Literal["allow", "remove", "everywhere", "gallery", "no-gallery"],
        channel: discord.TextChannel | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        guild_id = interaction.guild_id
        if action in ("allow", "remove", "gallery") and channel is None:
            raise Refused(f"`channel` is needed for `{action}`.")
        if action == "allow":
            assert channel is not None
            await self.admin.allow_channel(guild_id, channel.id, True)
            message = f"Images may now be made in {channel.mention} (and the other listed channels only)."
        elif action == "remove":
            assert channel is not None
            config = await self.admin.allow_channel(guild_id, channel.id, False)
            where = "everywhere" if not config.allowed_channels else "in the listed channels only"
            message = f"{channel.mention} removed: images may now be made {where}."
        elif action == "everywhere":
            await self.admin.allow_everywhere(guild_id)
            message = "Images may now be made in every channel."
        elif action == "gallery":
            assert channel is not None
            await self.admin.set_gallery(guild_id, channel.id)
            message = f"Every finished image will also be posted in {channel.mention}, crediting its author."
        else:
            await self.admin.set_gallery(guild_id, None)
            message = "No gallery channel any more."
        await self._show(interaction, message)

    @app_commands.command(name="nsfw", description="What to do with flagged results outside age-restricted channels")
    @app_commands.describe(policy="spoiler: hide flagged images behind a spoiler; withhold: do not post them")
    async def nsfw_policy(self, interaction: discord.Interaction, policy: Literal["spoiler", "withhold"]) -> None:
        assert interaction.guild_id is not None
        await self.admin.set_nsfw_policy(interaction.guild_id, policy)
        await self._show(
            interaction,
            "Saved. Outside age-restricted channels ModelsLab's safety checker is always on; "
            f"what it flags is now {'hidden behind a spoiler' if policy == 'spoiler' else 'withheld'}.",
        )

    @app_commands.command(name="blocklist", description="Words or phrases refused in prompts (* matches within a word)")
    @app_commands.describe(action="add, remove or list", rule="A word or phrase, e.g. gore or blood*")
    async def blocklist(
        self, interaction: discord.Interaction, action: Literal["add", "remove", "list"], rule: str | None = None
    ) -> None:
        assert interaction.guild_id is not None
        if action == "list":
            rules = (await self.admin.config(interaction.guild_id)).blocklist
            lines: list[str] = []
            for index, rule in enumerate(rules):
                line = f"• `{rule}`"
                if sum(len(x) + 1 for x in lines) + len(line) > 1800:
                    lines.append(f"…and {len(rules) - index} more")
                    break
                lines.append(line)
            await self._reply(interaction, "\n".join(lines) or "The blocklist is empty.")
            return
        if not rule:
            raise Refused(f"`rule` is needed for `{action}`.")
        if action == "add":
            pattern = await self.admin.add_blocklist_rule(interaction.guild_id, rule, interaction.user.id)
            await self._reply(interaction, f"`{pattern}` added: prompts containing it are refused.")
        else:
            pattern = await self.admin.remove_blocklist_rule(interaction.guild_id, rule)
            await self._reply(interaction, f"`{pattern}` removed from the blocklist.")

    @app_commands.command(name="preset", description="Named sets of flags members can pick in /imagine")
    @app_commands.describe(
        action="save, remove or list",
        name="The preset's name (letters, digits, - and _)",
        flags="For save: flags like --ar 16:9 --steps 30 --style anime --no text",
    )
    async def preset(
        self,
        interaction: discord.Interaction,
        action: Literal["save", "remove", "list"],
        name: str | None = None,
        flags: str | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        if action == "list":
            presets = await self.admin.presets(interaction.guild_id)
            lines = [f"• `{n}`: `{f}`" for n, f in presets.items()]
            await self._reply(interaction, _short("\n".join(lines), 1900) or "No presets yet.")
            return
        if not name:
            raise Refused(f"`name` is needed for `{action}`.")
        if action == "save":
            await self._check_preset_fits(interaction.guild_id, name, flags or "")
            saved = await self.admin.save_preset(interaction.guild_id, name, flags or "", interaction.user.id)
            await self._reply(
                interaction, f"Preset `{saved}` saved: members can pick it with `/imagine preset:{saved}`."
            )
        else:
            await self.admin.remove_preset(interaction.guild_id, name)
            await self._reply(interaction, f"Preset `{name}` removed.")

    async def _check_preset_fits(self, guild_id: int, name: str, flags: str) -> None:
        config = await self.admin.config(guild_id)
        settings = self.bot.settings
        check_preset_fits(
            parse_flags(flags, side_min=SIDE_MIN).choices,
            name=" ".join(name.split()).lower(),
            flavour=settings.modelslab_api,
            default_model=default_model_for(config, settings.modelslab_default_model),
            allowed_models=config.allowed_models,
        )

    @app_commands.command(name="defaults", description="Server defaults for /imagine, and the allowed models")
    @app_commands.describe(
        model="Default model_id",
        negative_prompt="Default negative prompt (not used with flux)",
        width="Default width (multiple of 8, at most 1024)",
        height="Default height (multiple of 8, at most 1024)",
        steps="Default steps (used where valid for the model)",
        allowed_models="Comma list of the only models members may use; * for any",
        reset="Forget every default and allow any model",
    )
    async def defaults(
        self,
        interaction: discord.Interaction,
        model: str | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        allowed_models: str | None = None,
        reset: bool = False,
    ) -> None:
        assert interaction.guild_id is not None
        changes: dict[str, object] = {}
        if reset:
            changes = dict.fromkeys(
                ("default_model", "default_negative_prompt", "default_width", "default_height", "default_steps"), None
            )
            changes["allowed_models_json"] = "[]"
        if model is not None:
            changes["default_model"] = _model_id("model", model)
        if negative_prompt is not None:
            changes["default_negative_prompt"] = negative_prompt.strip()[:2000] or None
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                if not SIDE_MIN <= value <= SIDE_MAX or value % 8:
                    raise Refused(f"`{name}` must be a multiple of 8 from {SIDE_MIN} to {SIDE_MAX}.")
                changes[f"default_{name}"] = value
        if steps is not None:
            if not 1 <= steps <= 50:
                raise Refused("`steps` must be from 1 to 50.")
            changes["default_steps"] = steps
        if allowed_models is not None:
            names = [m.strip() for m in allowed_models.split(",") if m.strip() and m.strip() != "*"]
            if len(names) > 25:
                raise Refused("`allowed_models` takes at most 25 models (Discord shows 25 suggestions).")
            changes["allowed_models_json"] = json.dumps([_model_id("allowed_models", m) for m in names])
        await self.admin.set_defaults(interaction.guild_id, **changes)
        note = ""
        if (width is not None and width < FLUX_SIDE_MIN) or (height is not None and height < FLUX_SIDE_MIN):
            note = f" (flux needs at least {FLUX_SIDE_MIN} px: for flux the built-in size is used)"
        await self._show(interaction, f"Defaults saved{note}.")


def _model_id(option: str, value: str) -> str:
    value = value.strip()
    if not is_model_id(value):
        raise Refused(f"`{option}` must be ModelsLab model ids: letters, digits, dots, dashes or underscores.")
    return value


class ServerSettings(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.config_group = ConfigCommands(bot)
        bot.tree.add_command(self.config_group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.config_group.name)

    @app_commands.command(name="quota", description="How many images you and the server have left today")
    @app_commands.guild_only()
    async def quota(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        role_ids = [role.id for role in getattr(interaction.user, "roles", [])]
        status = await self.bot.guild_admin.quota_status(interaction.guild_id, interaction.user.id, role_ids)
        you = "no daily limit" if status.user_left is None else f"{status.user_left} of {status.limits.user_daily} left"
        server = (
            "no daily limit"
            if status.guild_left is None
            else f"{status.guild_left} of {status.limits.guild_daily} left"
            + (
                " (the bot operator's cap for servers on its key)"
                if status.limits.guild_daily_is_default_key_cap
                else ""
            )
        )
        lines = [
            f"**You:** {you} today ({status.usage.user_today} used)",
            f"**This server:** {server} today ({status.usage.guild_today} used)",
            f"The counts reset {timestamp(status.resets_at)} ({timestamp(status.resets_at, 'f')}, midnight UTC).",
        ]
        if status.limits.user_concurrent:
            lines.append(f"Jobs at once: {status.usage.user_running} of {status.limits.user_concurrent}.")
        if status.limits.cooldown_seconds:
            line = f"Cooldown between requests: {status.limits.cooldown_seconds} s"
            last = status.usage.user_last_request_at
            if last is not None and last + status.limits.cooldown_seconds > time.time():
                line += f"; you can ask again {timestamp(last + status.limits.cooldown_seconds)}"
            lines.append(line + ".")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ServerSettings(bot))
