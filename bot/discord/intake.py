"""What every new job goes through, whichever command or button asked for it: the server's rules, the
quota reservation, the stored job, then the public status message. Shared by the cogs so the rules
cannot differ between /imagine, /remix, the Remix form and the result buttons."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
import discord

from bot.discord.presenter import original_message_id
from bot.discord.rate_limits import AckFailure, acknowledgement_failure
from bot.discord.texts import status_text
from bot.errors import MissingApiKey, UserFacingError
from bot.guilds.admin import NO_KEY, UNREADABLE_KEY
from bot.guilds.rules import GuildConfig, check_blocklist, check_channel, check_model
from bot.requests.generation import GenerationRequest, Layer, ServerDefaults

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

# Discord lets a bot use an interaction token for 15 minutes; stop a little before that.
TOKEN_LIFETIME = datetime.timedelta(minutes=15) - datetime.timedelta(seconds=30)
ACK_WINDOW = 3.0  # seconds: Discord refuses an interaction's callback later than this after the interaction
ACK_MARGIN = 0.5  # seconds: a callback is not sent again unless it can arrive this long before the window ends
ACK_TRIES = 3
# seconds past the window that an answer is waited for: Discord may have taken a callback just before the window
# closed, and its answer still be on its way; after that, the message is looked for (as long as that takes, at most).
ACK_PATIENCE = 2.0
_ACK_STARTED = "bot.ack_started"  # Interaction.extras: time.monotonic() when the acknowledgement was first sent
NO_MENTIONS = discord.AllowedMentions.none()


def channel_is_nsfw(interaction: discord.Interaction) -> bool:
    return bool(getattr(interaction.channel, "is_nsfw", lambda: False)())


def default_model_for(config: GuildConfig, bot_default: str) -> str:
    """The server's default model; if the server allows only some models and its default is not one of them,
    the first allowed model (a member who names no model must not be refused for it)."""
    default = config.default_model or bot_default
    if config.allowed_models and default not in config.allowed_models:
        return config.allowed_models[0]
    return default


def server_defaults(config: GuildConfig, bot_default: str) -> ServerDefaults:
    return ServerDefaults(
        model=default_model_for(config, bot_default),
        negative_prompt=config.default_negative_prompt,
        width=config.default_width,
        height=config.default_height,
        steps=config.default_steps,
    )


async def member_layer(bot: ImagineBot, interaction: discord.Interaction) -> Layer:
    """The member's /settings in this server, as the layer below presets and above the server's defaults."""
    assert interaction.guild_id is not None
    return (await bot.member_defaults.get(interaction.guild_id, interaction.user.id)).layer()


async def server_config(bot: ImagineBot, interaction: discord.Interaction) -> GuildConfig:
    """The server's settings, after checking that images may be made in this channel."""
    assert interaction.guild_id is not None and interaction.channel_id is not None  # guild_only
    config = await bot.guild_admin.config(interaction.guild_id)
    check_channel(config, interaction.channel_id, getattr(interaction.channel, "parent_id", None))
    return config


async def submit_job(
    bot: ImagineBot,
    interaction: discord.Interaction,
    *,
    kind: str,
    request: GenerationRequest,
    config: GuildConfig,
    parent_job_id: str | None = None,
    input_from_job: str | None = None,
    source_flagged: bool = False,
    picture_owner_id: int | None = None,
) -> None:
    """Check, reserve, store, acknowledge, start. Raises a `UserFacingError` (shown privately) before anything
    is stored when a rule says no."""
    assert interaction.guild_id is not None and interaction.channel_id is not None
    if bot.jobs.draining:
        raise UserFacingError("The bot is restarting for a moment, so nothing was sent: please try again in a minute.")
    if kind != "upscale":
        check_model(config, request.model_id)
        check_blocklist(config.blocklist, request.prompt)
    jobs = bot.jobs
    if await jobs.api_key_for(interaction.guild_id) is None:
        unreadable = await bot.guild_admin.key_is_unreadable(interaction.guild_id)
        raise MissingApiKey(UNREADABLE_KEY if unreadable else NO_KEY)
    role_ids = [role.id for role in getattr(interaction.user, "roles", [])]
    job = await jobs.create(
        kind=kind,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        user_id=interaction.user.id,
        request=request,
        application_id=interaction.application_id,
        interaction_token=interaction.token,
        token_expires_at=(interaction.created_at + TOKEN_LIFETIME).timestamp(),
        attachment_size_limit=interaction.filesize_limit,
        channel_nsfw=channel_is_nsfw(interaction),
        limits=bot.guild_admin.limits_for(config, role_ids),
        parent_job_id=parent_job_id,
        input_from_job=input_from_job,
        source_flagged=source_flagged,
        picture_owner_id=picture_owner_id,
    )
    try:
        message_id = await acknowledge(interaction, status_text(job))
    except Exception as exc:  # refused, or it cannot be told whether the member saw it: no job goes on unseen
        await jobs.abandon(job.id, f"the acknowledgement failed ({type(exc).__name__})")
        raise
    jobs.metrics.ack_latency.observe(seconds_since(interaction))
    await jobs.status_message_shown(job, message_id)


async def acknowledge(interaction: discord.Interaction, content: str) -> int | None:
    """Answer the interaction with `content`, publicly; returns the message's id.

    A failure does not always mean the member saw nothing (`acknowledgement_failure`): after a timeout, a 408 or
    a 5xx, or Discord's "already acknowledged", the message is looked for, and if it is there the job goes on. An
    answer is waited for until `ACK_PATIENCE` after Discord's window (not the HTTP session's minutes): a job the
    member sees goes on within seconds, and one the member never saw gives its quota back as soon. A
    callback that surely did not reach Discord (a proxy's own 429, a lookup that finds no message) is sent again
    while Discord's 3 s allow it. Raises the failure when the member surely saw nothing, or it cannot be told.
    """
    interaction.extras.setdefault(_ACK_STARTED, time.monotonic())
    for attempt in range(1, ACK_TRIES + 1):
        try:
            async with asyncio.timeout(max(ACK_WINDOW + ACK_PATIENCE - seconds_since(interaction), ACK_PATIENCE)):
                response = await interaction.response.send_message(content, allowed_mentions=NO_MENTIONS)
            return response.message_id
        except discord.HTTPException as exc:
            failure, wait = acknowledgement_failure(exc.status, exc.code, exc.response.headers)
            error: Exception = exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure, wait, error = AckFailure.UNKNOWN, 0.0, exc
        if failure is AckFailure.REFUSED:
            raise error
        if failure is not AckFailure.NOT_SENT:
            message_id = await _shown_message_id(interaction)
            if message_id is not None:
                log.info("Interaction %s: the acknowledgement failed (%s) but was shown", interaction.id, _said(error))
                return message_id
            if failure is AckFailure.DELIVERED:
                raise error  # answered, yet no message to be found: nothing to go on with
        too_late = seconds_since(interaction) + wait > ACK_WINDOW - ACK_MARGIN
        if attempt == ACK_TRIES or too_late:
            why = f"sent again it would come after Discord's {ACK_WINDOW:g} s" if too_late else f"{attempt} tries"
            log.warning(
                "Interaction %s: the acknowledgement did not reach Discord (%s), %s: the command is dropped",
                interaction.id,
                _said(error),
                why,
            )
            raise error
        log.warning(
            "Interaction %s: the acknowledgement did not reach Discord (%s); sending it again in %.1f s",
            interaction.id,
            _said(error),
            wait,
        )
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


async def _shown_message_id(interaction: discord.Interaction) -> int | None:
    """The id of the interaction's public answer, if Discord has it (looked for at most `ACK_PATIENCE`)."""
    async with asyncio.timeout(ACK_PATIENCE):
        return await original_message_id(interaction.followup)


def surely_too_late(interaction: discord.Interaction) -> bool:
    """The interaction, still unanswered, is past Discord's window for a certain: its acknowledgement began at least
    `ACK_WINDOW` ago by this machine's monotonic clock (the interaction's own time, from its id, would depend on
    this machine's wall clock being right)."""
    started = interaction.extras.get(_ACK_STARTED)
    return started is not None and time.monotonic() - started >= ACK_WINDOW


def _said(error: Exception) -> str:
    """The error's type and its text (a timeout has none)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def seconds_since(interaction: discord.Interaction) -> float:
    """How long ago the member sent the interaction (Discord's clock, in its id)."""
    return max((discord.utils.utcnow() - interaction.created_at).total_seconds(), 0.0)


async def model_choices(
    bot: ImagineBot, interaction: discord.Interaction, current: str
) -> list[discord.app_commands.Choice[str]]:
    """The `model` autocomplete of /imagine and /remix: the server's allowed models, else ModelsLab's public
    list (cached; never a slow answer)."""
    allowed: tuple[str, ...] = ()
    api_key = None
    if interaction.guild_id is not None:
        allowed = (await bot.guild_admin.config(interaction.guild_id)).allowed_models
        api_key = await bot.jobs.api_key_for(interaction.guild_id)
    models = await bot.catalog.suggestions(current, api_key, allowed)
    return [discord.app_commands.Choice(name=model, value=model) for model in models]
