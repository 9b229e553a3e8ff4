"""The discord.py side of the bot: the `Bot` subclass that holds shared state, and the command error tree."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.discord.intake import ACK_WINDOW, surely_too_late
from bot.discord.presenter import CancelJobButton, DiscordPresenter
from bot.discord.rate_limits import DiscordWatch
from bot.discord.shards import UNSHARDED, ShardPlan
from bot.errors import UserFacingError
from bot.guilds.admin import GuildAdmin
from bot.jobs.member_history import MemberHistory
from bot.jobs.model import Job
from bot.jobs.posting import DISCORD_RETRY_DELAYS
from bot.jobs.service import JobService
from bot.modelslab.catalog import ModelCatalog
from bot.operations import USER_AGENT, open_to_strangers
from bot.requests.member_defaults import MemberDefaultsService
from bot.settings import Settings
from bot.storage import StorageBusy, StorageFull

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.imagine", "cogs.remix", "cogs.actions", "cogs.config", "cogs.history", "cogs.settings")
STORAGE_FULL = (
    "The bot's disk is full, so nothing was stored or sent to ModelsLab: please tell the bot's admin "
    "(and try again once they have made room)."
)
STORAGE_BUSY = "The bot's database is busy for a moment, so nothing was stored or sent: please try again."
INTERNAL_ERROR = (
    "Something went wrong on the bot's side and nothing was sent to ModelsLab; please try again. "
    "If it keeps happening, tell the bot's admin (reference {ref})."
)


def point_discord_at(settings: Settings) -> None:
    """Use the configured REST and gateway URLs (REST or gateway proxies, or a test server).

    discord.py reads both from class attributes, process-wide, so they are set before logging in.
    """
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def user_agent_trace() -> aiohttp.TraceConfig:
    """Discord asks every client for a `DiscordBot (url, version)` User-Agent. discord.py sends its own on REST calls
    but none on interaction callbacks and interaction webhooks (its webhook adapter builds headers without one, so
    aiohttp's `Python/x aiohttp/y` goes out). discord.py's `http_trace` hook sees each request's headers before they
    are sent (aiohttp hands `on_request_start` the very mapping it then sends): the bot's agent fills the gap there,
    and discord.py's own agent stays where it has one."""

    async def add_user_agent(
        session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestStartParams
    ) -> None:
        params.headers.setdefault("User-Agent", USER_AGENT)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(add_user_agent)
    return trace


async def reply_privately(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer, whether or not the interaction was already acknowledged; none to an unanswered
    interaction surely past Discord's 3 s (it would be refused: there is nothing left to answer)."""
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
    elif surely_too_late(interaction):
        log.info(
            "Interaction %s: too late to answer it (Discord allows %g s): the member is not told",
            interaction.id,
            ACK_WINDOW,
        )
    else:
        await interaction.response.send_message(
            message, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )


class ImagineCommandTree(app_commands.CommandTree["ImagineBot"]):
    """Turns known errors into one ephemeral sentence; logs the rest with a reference the member can quote."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await self.report_error(interaction, error)

    async def report_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """For commands, forms and buttons alike: a known refusal as it is, anything else logged with a reference."""
        original = getattr(error, "original", error)
        if isinstance(original, UserFacingError):
            message = original.message
        elif isinstance(original, StorageFull):
            log.error("%s", original)
            message = STORAGE_FULL
        elif isinstance(original, StorageBusy):
            log.warning("%s", original)
            message = STORAGE_BUSY
        elif isinstance(error, app_commands.NoPrivateMessage):
            message = "This command works only in a server, not in direct messages."
        elif isinstance(error, app_commands.CheckFailure) and str(error):
            message = str(error)
        else:
            ref = secrets.token_hex(3)
            command = interaction.command.qualified_name if interaction.command else "a form or button"
            log.error("Command /%s failed (reference %s)", command, ref, exc_info=original)
            message = INTERNAL_ERROR.format(ref=ref)
        try:
            await reply_privately(interaction, message)
        except discord.HTTPException as exc:
            log.warning("Could not tell the member about an error: %s", exc)


class ImagineBot(commands.Bot):
    """Holds what the cogs share: settings and the job service. Owns no resources: `main` does."""

    def __init__(
        self,
        *,
        settings: Settings,
        jobs: JobService,
        guild_admin: GuildAdmin,
        catalog: ModelCatalog,
        member_defaults: MemberDefaultsService,
        history: MemberHistory,
        guild_ready_timeout: float = 2.0,
        shards: ShardPlan = UNSHARDED,
        identify_turn: Callable[[int], Awaitable[None]] | None = None,
        discord_retry_delays: tuple[float, ...] = DISCORD_RETRY_DELAYS,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        sharding: dict[str, Any] = {}
        if shards.sharded:
            sharding = {"shard_count": shards.count, "shard_ids": list(shards.ids) if shards.ids is not None else None}
        # Every answer from Discord is watched: 429s and a ban are logged and counted (/metrics), and while the bot
        # is banned its posts go one at a time, as patiently as posting retries.
        self.discord_watch = DiscordWatch(jobs.metrics, probe_delays=discord_retry_delays)
        trace = user_agent_trace()
        self.discord_watch.install(trace)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=ImagineCommandTree,
            guild_ready_timeout=guild_ready_timeout,
            allowed_mentions=discord.AllowedMentions.none(),
            http_trace=trace,
            **sharding,
        )
        self.shards_plan = shards
        self._identify_turn = identify_turn
        self._max_concurrency: int | None = None
        self._closed_event = asyncio.Event()
        self.settings = settings
        self.jobs = jobs
        self.guild_admin = guild_admin
        self.catalog = catalog
        self.member_defaults = member_defaults
        self.history = history
        # The buttons under a result belong to the actions cog, which registers them when it loads.
        self.result_view: Callable[[Job, int], discord.ui.View] | None = None

    async def report_error(self, interaction: discord.Interaction, error: Exception) -> None:
        tree = self.tree
        assert isinstance(tree, ImagineCommandTree)
        await tree.report_error(interaction, error)

    async def setup_hook(self) -> None:
        # discord.py read the application at login; its "Public Bot" switch decides who may spend the default key.
        risk = open_to_strangers(self.application.bot_public if self.application else None, self.settings)
        if risk is not None:
            log.warning("Default key: %s", risk)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(CancelJobButton)
        self.jobs.attach_presenter(
            DiscordPresenter(
                self,
                job_timeout=self.jobs.timeout,
                result_view=lambda job, n: self._result_view(job, n),
                watch=self.discord_watch,
            )
        )
        if self.shards_plan.syncs_commands:
            await self.sync_commands()
        await self.jobs.resume()

    def _result_view(self, job: Job, shown_images: int) -> discord.ui.View | None:
        return self.result_view(job, shown_images) if self.result_view is not None else None

    async def sync_commands(self) -> None:
        guild_id = self.settings.discord_dev_guild_id
        if guild_id is not None:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("Synced %d command(s) to guild %s", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("Synced %d global command(s); Discord may take a while to show them everywhere", len(synced))

    async def wait_for_close(self) -> None:
        """A worker has no gateway loop to wait on: it waits for `close()` (SIGTERM)."""
        while not self.is_closed():
            await self._closed_event.wait()

    async def close(self) -> None:
        await super().close()
        self._closed_event.set()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Discord takes `max_concurrency` IDENTIFYs per 5 s (one per bucket, `shard_id % max_concurrency`), counted
        for the whole bot: the processes of a sharded bot take turns through the database. Unsharded: discord.py's
        own spacing."""
        if self._identify_turn is None or shard_id is None:
            await super().before_identify_hook(shard_id, initial=initial)
            return
        if self._max_concurrency is None:
            limits = await self.http.get_bot_gateway()
            self._max_concurrency = max(int(limits[2].get("max_concurrency", 1)), 1)
        await self._identify_turn(shard_id % self._max_concurrency)

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info(
            "Connected to Discord as %s (%s) in %d server(s), %s",
            self.user,
            self.user.id,
            len(self.guilds),
            self.shards_plan.describe(),
        )


class ShardedImagineBot(ImagineBot, commands.AutoShardedBot):
    """The same bot on several gateway shards (`SHARD_COUNT`): each process runs the shards `SHARD_IDS` names."""


def make_bot(shards: ShardPlan, **kwargs: Any) -> ImagineBot:
    """A plain bot unsharded (as a small bot runs), an auto-sharded one with `SHARD_COUNT`."""
    if shards.sharded:
        return ShardedImagineBot(shards=shards, **kwargs)
    return ImagineBot(shards=shards, **kwargs)
