"""Command line: `python -m bot [run]`, `db upgrade|current|copy|record-settings`, `check`, `invite-url`.

`run_bot` owns every resource (HTTP session, database, webhook server, Discord client) and hands
them to the parts that use them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import discord

from bot import operations
from bot.app import running_app
from bot.log import setup_logging
from bot.settings import Settings, SettingsError, load_settings
from bot.storage import StorageError, open_storage
from bot.web.connection_guard import raise_open_file_limit

log = logging.getLogger("bot")
T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (the default install on Linux and macOS), else asyncio's own.

    uvloop runs the loop, its sockets and its timers in C (libuv): on the webhook path it saves about 0.7 ms of CPU a
    job, a tenth of what a job costs (bench/README.md). The bot's code is the same on both; the tests run on both.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on the loop `new_event_loop` makes."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


async def run_bot(settings: Settings) -> None:
    log.info("Event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    async with running_app(settings) as app:
        # What start-up made (modules, the app) lives as long as the process: out of the collector's sight, so that
        # no collection walks it again (a full one took about 25 ms of the event loop).
        gc.freeze()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, lambda: asyncio.ensure_future(app.shutdown()))
        async with app.bot:
            token = settings.discord_token.get_secret_value()
            if app.bot.shards_plan.worker:
                # No gateway shard: log in for the REST calls that post results, then drive jobs until stopped.
                await app.bot.login(token)
                log.info("Logged in to Discord as %s, %s", app.bot.user, app.bot.shards_plan.describe())
                await app.bot.wait_for_close()
            else:
                await app.bot.start(token)


async def _database_command(settings: Settings, action: str, to: str | None = None) -> None:
    if action == "copy":
        await operations.copy_database(settings, to, report=print)
        return
    async with open_storage(settings, upgrade=action == "record-settings") as storage:
        if action == "record-settings":
            for line in await operations.record_shared_settings(storage, settings):
                print(line)
            return
        if action == "upgrade":
            applied = await storage.upgrade()
            if applied:
                for migration in applied:
                    print(f"applied {migration.version:04d}_{migration.name}")
            else:
                print("the database is up to date")
        print(f"schema version {await storage.current_version()} ({storage.description})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="A ModelsLab image generation bot for Discord.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the bot (the default)")
    database = commands.add_parser("db", help="database maintenance")
    database.add_argument(
        "action",
        choices=["upgrade", "current", "copy", "record-settings"],
        help="apply migrations / show the schema version / copy the SQLite data to PostgreSQL (--to) / record this "
        "process's MODELSLAB_MAX_QUEUED as every process's",
    )
    database.add_argument("--to", metavar="postgresql://…", help="db copy: the new, empty PostgreSQL database")
    commands.add_parser("check", help="check the settings, the database, Discord and ModelsLab, in plain words")
    commands.add_parser("invite-url", help="print the link that adds the bot to a server")
    args = parser.parse_args(argv)
    # Whatever the bot writes (the database, its -wal and -shm, secret.key) is for the bot's user only.
    os.umask(0o077)

    try:
        if args.command == "db":
            # The database commands need no Discord token.
            settings = load_settings(discord_token=os.environ.get("DISCORD_TOKEN") or "unused")
            run(_database_command(settings, args.action, args.to))
            return 0
        settings = load_settings()
        if args.command == "check":
            findings = run(operations.check(settings))
            for finding in findings:
                print(finding.line())
            return 0 if all(f.ok for f in findings) else 1
        if args.command == "invite-url":
            try:
                print(run(operations.find_invite_url(settings)))
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            return 0
        secrets = [settings.discord_token.get_secret_value()]
        if settings.modelslab_api_key:
            secrets.append(settings.modelslab_api_key.get_secret_value())
        if settings.secret_key:
            secrets.append(settings.secret_key.get_secret_value())
        if settings.metrics_token:
            secrets.append(settings.metrics_token.get_secret_value())
        setup_logging(settings.log_level, secrets=secrets, log_format=settings.log_format)
        raised = raise_open_file_limit()
        if raised is not None:
            log.info("Raised the limit on open files from %d to %d (the hard limit allows it)", *raised)
        run(run_bot(settings))
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
