"""Wiring: opens every resource the bot needs, in order, and closes them in reverse.

`python -m bot` and the end-to-end tests both start the bot through `running_app`, so the tests
exercise the same wiring a server admin runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from bot.discord.client import ImagineBot, make_bot, point_discord_at
from bot.discord.shards import IDENTIFY_SPACING, ShardPlan
from bot.guilds.admin import GuildAdmin
from bot.guilds.keybox import KeyBox
from bot.images.downloader import ImageDownloader
from bot.images.ssrf_guard import (
    DownloadPolicy,
    GuardedResolver,
    discord_media_policy,
    origin_of,
    parse_allowed_hosts,
)
from bot.jobs.member_history import MemberHistory
from bot.jobs.service import DISCORD_RETRY_DELAYS, RETRY_BASE_DELAY, JobPolicy, JobService
from bot.modelslab.catalog import ModelCatalog
from bot.modelslab.client import ModelsLabClient
from bot.operations import recommended_shard_count
from bot.requests.member_defaults import MemberDefaultsService
from bot.settings import Settings, SettingsError, ensure_secret_key
from bot.storage import Storage, open_storage
from bot.storage.shared import agree_on_shared_settings, shard_count_of_the_bot
from bot.web.connection_guard import ConnectionLimits, GuardedSite
from bot.web.receiver import create_app
from bot.web.signing import WebhookSigner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    """How patient the bot is with the services it calls. The defaults are for real use; tests shorten them."""

    modelslab_request_timeout: float = 60.0
    download_rounds: int = 7
    download_first_wait: float = 0.5
    discord_retry_delays: tuple[float, ...] = DISCORD_RETRY_DELAYS
    submit_retry_delay: float = RETRY_BASE_DELAY
    receiver: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass
class App:
    settings: Settings
    bot: ImagineBot
    jobs: JobService
    guilds: GuildAdmin
    storage: Storage
    signer: WebhookSigner
    webhook_runner: web.AppRunner

    async def shutdown(self) -> None:
        """SIGTERM: stop taking commands, finish posting what is ready, keep the rest for the next start."""
        log.info("Shutting down: no new jobs; finishing the results being posted")
        await self.jobs.drain()
        await self.jobs.close()
        await self.jobs.hand_over()
        await self.bot.close()
        log.info("Stopped; waiting jobs stay queued for the next start")


@asynccontextmanager
async def running_app(
    settings: Settings, *, guild_ready_timeout: float = 2.0, timings: Timings = Timings()
) -> AsyncIterator[App]:
    """Everything but the Discord connection itself: the caller runs `app.bot.start(token)`."""
    secret_key = await _secret_key(settings)
    point_discord_at(settings)
    signer = WebhookSigner(secret_key)
    api_key = settings.modelslab_api_key.get_secret_value() if settings.modelslab_api_key else None

    timeout = aiohttp.ClientTimeout(total=120, connect=15)
    policy = DownloadPolicy((origin_of(settings.modelslab_base), *parse_allowed_hosts(settings.download_allowed_hosts)))
    input_policy = discord_media_policy(settings.discord_api_base)
    # One resolver for both: the configured hosts of either policy may resolve to private addresses.
    guarded = aiohttp.TCPConnector(resolver=GuardedResolver(DownloadPolicy((*policy.trusted, *input_policy.trusted))))
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout, connector=guarded) as download_session,
        open_storage(settings) as storage,
    ):
        log.info("Database ready at %s (schema version %d)", storage.description, await storage.current_version())
        await agree_on_shared_settings(storage, settings)
        await storage.events.start()
        shards = await _shard_plan(settings, storage, session)
        client = ModelsLabClient(
            session,
            base_url=settings.modelslab_base,
            flavour=settings.modelslab_api,
            request_timeout=timings.modelslab_request_timeout,
        )
        keybox = KeyBox(secret_key)
        guilds = GuildAdmin(
            guilds=storage.guilds,
            jobs=storage.jobs,
            keybox=keybox,
            client=client,
            default_api_key=api_key,
            allow_default_key=settings.allow_default_key,
            default_key_guild_daily=settings.default_key_guild_daily,
            events=storage.events,
        )
        if settings.secret_key is None and await guilds.any_server_key():
            log.warning(
                "Servers' API keys are encrypted with the generated secret.key, which sits next to the database: "
                "a copy of the data folder can read them. Set SECRET_KEY in the environment (and back it up apart)."
            )
        catalog = ModelCatalog(client)
        jobs = JobService(
            store=storage.jobs,
            client=client,
            guilds=guilds,
            keybox=keybox,
            downloader=ImageDownloader(
                download_session,
                policy=policy,
                input_policy=input_policy,
                rounds=timings.download_rounds,
                first_wait=timings.download_first_wait,
            ),
            signer=signer,
            settings=JobPolicy(
                flavour=settings.modelslab_api,
                timeout=settings.modelslab_job_timeout,
                webhook_base=settings.public_base,
                max_queued=settings.modelslab_max_queued,
                shared=settings.database_url is not None,
                lease_seconds=settings.lease_seconds,
                worker_id=settings.worker_id,
            ),
            discord_retry_delays=timings.discord_retry_delays,
            submit_retry_delay=timings.submit_retry_delay,
            leases=storage.leases,
            line=storage.queue,
            events=storage.events,
        )
        member_defaults = MemberDefaultsService(storage.member_defaults, storage.events)
        bot = make_bot(
            shards,
            identify_turn=(lambda bucket: storage.identify_turn(bucket, IDENTIFY_SPACING)) if shards.sharded else None,
            settings=settings,
            jobs=jobs,
            guild_admin=guilds,
            catalog=catalog,
            member_defaults=member_defaults,
            history=MemberHistory(storage, member_defaults),
            guild_ready_timeout=guild_ready_timeout,
            discord_retry_delays=timings.discord_retry_delays,
        )

        async def healthy() -> bool:
            if shards.worker:  # no gateway: logged in (REST) is all it needs
                return bot.user is not None and not bot.is_closed()
            return bot.is_ready() and not bot.is_closed()

        # access_log=None: the access log would print webhook URLs, and their tokens, in full.
        metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        receiver = create_app(jobs, signer, health=healthy, metrics=jobs.metrics.render, metrics_token=metrics_token)
        # lingering_time: after an early answer (413, 408), how long the rest of a body is read and dropped.
        runner = web.AppRunner(receiver, access_log=None, lingering_time=2.0)
        await runner.setup()
        try:
            site = GuardedSite(runner, settings.webhook_host, settings.webhook_port, timings.receiver)
            await site.start()
            for address in runner.addresses:
                log.info("Webhook receiver listening on %s:%s", *address[:2])
            if settings.public_base is None:
                log.info("PUBLIC_URL is not set: results are collected by polling ModelsLab")
            try:
                yield App(settings, bot, jobs, guilds, storage, signer, runner)
            finally:
                if not bot.is_closed():
                    await bot.close()
                await jobs.close()
        finally:
            await runner.cleanup()


async def _shard_plan(settings: Settings, storage: Storage, session: aiohttp.ClientSession) -> ShardPlan:
    count = await shard_count_of_the_bot(storage, settings, lambda: recommended_shard_count(settings, session))
    try:
        plan = settings.shard_plan(count)
    except ValueError as exc:
        raise SettingsError(f"SHARD_IDS: {exc}.") from None
    log.info("Gateway: %s", plan.describe())
    return plan


async def _secret_key(settings: Settings) -> bytes:
    return await asyncio.to_thread(ensure_secret_key, settings)
