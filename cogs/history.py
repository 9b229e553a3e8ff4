"""`/history show`, `/history forget`, `/history export`: thin adapters over `bot.jobs.member_history`.

Discord does not let a command with subcommands be run on its own, so the listing is `/history show`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.guilds.rules import Refused
from bot.jobs.history import export_csv, export_json, history_page

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

HISTORY_COLOUR = discord.Colour(0x5865F2)


async def render_page(
    bot: ImagineBot, guild_id: int, viewer_id: int, target_id: int, page: int
) -> tuple[discord.Embed, discord.ui.View]:
    found = await bot.history.page(target_id, guild_id=guild_id, page=page)
    page, pages = found.page, found.pages
    # Embed titles do not show mentions: someone else's history names them in the description.
    whose = "Your" if target_id == viewer_id else "Member's"
    title, body = history_page(found.jobs, page=page, total=found.total, whose=whose)
    if target_id != viewer_id:
        body = f"<@{target_id}>\n{body}"
    embed = discord.Embed(title=title, description=body, colour=HISTORY_COLOUR)
    view = discord.ui.View(timeout=None)
    view.add_item(HistoryPageButton(viewer_id, target_id, max(page - 1, 0), "prev", disabled=page == 0))
    view.add_item(HistoryPageButton(viewer_id, target_id, min(page + 1, pages - 1), "next", disabled=page >= pages - 1))
    return embed, view


class HistoryPageButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"history:(?P<viewer>\d+):(?P<target>\d+):(?P<page>\d+):(?P<way>prev|next)",
):
    """◀ / ▶ on a history page. Persistent: who looks, at whom, and which page are in the custom id."""

    def __init__(self, viewer_id: int, target_id: int, page: int, way: str, *, disabled: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label="◀ Newer" if way == "prev" else "Older ▶",
                style=discord.ButtonStyle.secondary,
                custom_id=f"history:{viewer_id}:{target_id}:{page}:{way}",
                disabled=disabled,
            )
        )
        self.viewer_id, self.target_id, self.page = viewer_id, target_id, page

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> HistoryPageButton:
        return cls(int(match["viewer"]), int(match["target"]), int(match["page"]), match["way"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        if interaction.user.id != self.viewer_id or interaction.guild_id is None:
            await interaction.response.send_message("This list belongs to someone else.", ephemeral=True)
            return
        if self.target_id != self.viewer_id and not interaction.permissions.manage_guild:
            await interaction.response.send_message(MEMBER_NEEDS_MANAGE_SERVER, ephemeral=True)
            return
        embed, view = await render_page(bot, interaction.guild_id, self.viewer_id, self.target_id, self.page)
        await interaction.response.edit_message(embed=embed, view=view)


class ForgetButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"history-forget:(?P<user>\d+):(?P<choice>yes|no)",
):
    def __init__(self, user_id: int, choice: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Delete my history" if choice == "yes" else "Keep it",
                style=discord.ButtonStyle.danger if choice == "yes" else discord.ButtonStyle.secondary,
                custom_id=f"history-forget:{user_id}:{choice}",
            )
        )
        self.user_id, self.choice = user_id, choice

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ForgetButton:
        return cls(int(match["user"]), match["choice"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("Only the member whose history it is can do that.", ephemeral=True)
            return
        if self.choice == "no":
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
            return
        forgotten = await bot.history.forget(self.user_id, time.time())
        log.info("A member's history was forgotten at their request (%d job(s))", forgotten)
        await interaction.response.edit_message(
            content=(
                f"Done: {forgotten} job(s) forgotten in every server: their prompts and result links are deleted, "
                "so are your /settings, and only anonymous counts stay for the quotas. Jobs still under way are "
                "forgotten once you run this again after they finish."
            ),
            view=None,
        )


MEMBER_NEEDS_MANAGE_SERVER = "Only members with the Manage Server permission can see someone else's history."


class History(commands.Cog):
    history = app_commands.Group(name="history", description="Your past generations", guild_only=True)

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(HistoryPageButton, ForgetButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(HistoryPageButton, ForgetButton)

    @history.command(name="show", description="Your recent jobs here, newest first")
    @app_commands.describe(member="Someone else's history (needs Manage Server)")
    async def show(self, interaction: discord.Interaction, member: discord.Member | None = None) -> None:
        assert interaction.guild_id is not None
        target = member.id if member is not None else interaction.user.id
        if target != interaction.user.id and not interaction.permissions.manage_guild:
            raise Refused(MEMBER_NEEDS_MANAGE_SERVER)
        embed, view = await render_page(self.bot, interaction.guild_id, interaction.user.id, target, 0)
        await interaction.response.send_message(
            embed=embed, view=view, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )

    @history.command(name="forget", description="Delete your history (prompts and results), after a confirmation")
    async def forget(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(ForgetButton(interaction.user.id, "yes"))
        view.add_item(ForgetButton(interaction.user.id, "no"))
        await interaction.response.send_message(
            "Delete your history in every server where this bot runs? Your prompts and the links to your results "
            "are deleted for good; the servers keep only anonymous image counts for their quotas.",
            view=view,
            ephemeral=True,
        )

    @history.command(name="export", description="Your whole history as a file (only you see it)")
    @app_commands.describe(format="csv (spreadsheets) or json")
    async def export(self, interaction: discord.Interaction, format: Literal["csv", "json"] = "csv") -> None:
        jobs = await self.bot.history.everything(interaction.user.id)
        # Up to every job a member ever made: written in a thread, not on the event loop.
        data = await asyncio.to_thread(export_csv if format == "csv" else export_json, jobs)
        file = discord.File(io.BytesIO(data), filename=f"imagine-history.{format}")
        await interaction.response.send_message(
            f"Your history: {len(jobs)} job(s), in every server where this bot runs.", file=file, ephemeral=True
        )


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(History(bot))
