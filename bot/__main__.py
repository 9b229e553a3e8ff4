"""Command line: `python -m bot [run]`, `python -m bot db upgrade`, `python -m bot db current`.

`run_bot` owns every resource (HTTP session, database, webhook server, Discord client) and hands
them to the parts that use them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import aiohttp
import discord
from aiohttp import web

from bot.discord_bot import ImagineBot, point_discord_at
from bot.downloads import ImageDownloader
from bot.jobs import JobService, JobSettings
from bot.log import setup_logging
from bot.modelslab import ModelsLabClient
from bot.settings import Settings, SettingsError, ensure_secret_key, load_settings
from bot.signing import WebhookSigner
from bot.storage import Database, JobStore, StorageError
from bot.webhook import create_app

log = logging.getLogger("bot")


async def run_bot(settings: Settings, *, guild_ready_timeout: float = 2.0) -> None:
    secret_key = ensure_secret_key(settings)
    point_discord_at(settings)
    signer = WebhookSigner(secret_key)
    api_key = settings.modelslab_api_key.get_secret_value() if settings.modelslab_api_key else None

    timeout = aiohttp.ClientTimeout(total=120, connect=15)
    async with aiohttp.ClientSession(timeout=timeout) as session, Database.open(settings.database_path) as database:
        log.info("Database ready at %s (schema version %d)", database.path, await database.current_version())
        jobs = JobService(
            store=JobStore(database),
            client=ModelsLabClient(session, base_url=settings.modelslab_base, flavour=settings.modelslab_api),
            downloader=ImageDownloader(session),
            signer=signer,
            settings=JobSettings(
                flavour=settings.modelslab_api,
                timeout=settings.modelslab_job_timeout,
                webhook_base=settings.public_base,
                default_api_key=api_key,
            ),
        )
        bot = ImagineBot(settings=settings, jobs=jobs, guild_ready_timeout=guild_ready_timeout)

        async def healthy() -> bool:
            return bot.is_ready() and not bot.is_closed()

        runner = web.AppRunner(create_app(jobs, signer, health=healthy), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.webhook_host, settings.webhook_port)
        await site.start()
        for address in runner.addresses:
            log.info("Webhook receiver listening on %s:%s", *address[:2])
        if settings.public_base is None:
            log.info("PUBLIC_URL is not set: results are collected by polling ModelsLab")

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, lambda: asyncio.ensure_future(bot.close()))
        try:
            async with bot:
                await bot.start(settings.discord_token.get_secret_value())
        finally:
            await jobs.close()
            await runner.cleanup()


async def _database_command(settings: Settings, action: str) -> None:
    async with Database.open(settings.database_path, upgrade=False) as database:
        if action == "upgrade":
            applied = await database.upgrade()
            if applied:
                for migration in applied:
                    print(f"applied {migration.version:04d}_{migration.name}")
            else:
                print("the database is up to date")
        print(f"schema version {await database.current_version()} ({database.path})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="A ModelsLab image generation bot for Discord.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the bot (the default)")
    database = commands.add_parser("db", help="database maintenance")
    database.add_argument("action", choices=["upgrade", "current"], help="apply migrations / show the schema version")
    args = parser.parse_args(argv)

    try:
        if args.command == "db":
            # The database commands need no Discord token.
            settings = load_settings(discord_token=os.environ.get("DISCORD_TOKEN") or "unused")
            asyncio.run(_database_command(settings, args.action))
            return 0
        settings = load_settings()
        secrets = [settings.discord_token.get_secret_value()]
        if settings.modelslab_api_key:
            secrets.append(settings.modelslab_api_key.get_secret_value())
        if settings.secret_key:
            secrets.append(settings.secret_key.get_secret_value())
        setup_logging(os.environ.get("LOG_LEVEL", "INFO"), secrets=secrets)
        asyncio.run(run_bot(settings))
        return 0
    except (SettingsError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except discord.LoginFailure:
        print(
            "error: Discord refused DISCORD_TOKEN: copy the bot token again from the developer portal.", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
