"""End-to-end harness: the real bot (discord.py, aiohttp, SQLite) against the fake Discord and fake ModelsLab.

`BotRunner` starts the bot through the same `running_app` wiring as `python -m bot`, and can stop it
(as a crash would: drivers cancelled wherever they are) and start it again on the same database.
Any ERROR logged by the bot or discord.py fails the test unless the test says it expects it.

A test marked `also_on_postgresql` runs twice: on SQLite, and on a fresh PostgreSQL database (`DATABASE_URL`),
the same scenario with the same assertions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import App, Timings, running_app
from bot.jobs.model import Job
from bot.settings import Settings
from bot.storage.ports import JobRepository
from bot.storage.postgres import PostgresStorage
from bot.storage.sqlite import SqliteStorage
from tests.fakes.discord_server import FakeDiscord, FakeMessage, RateLimits
from tests.fakes.modelslab_server import DEFAULT_KEY, FakeModelsLab

BOT_TOKEN = "fake-bot-token.Xy12.secretpart"
# Real defaults would make a missing image or a Discord outage cost the test minutes.
FAST = Timings(download_rounds=2, download_first_wait=0.05, discord_retry_delays=(0.05, 0.1), submit_retry_delay=0.05)


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.expected_errors: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("tests"):
            return  # the fakes' own logs are not the bot's
        self.records.append(record)
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def unexpected_errors(self) -> list[str]:
        return [
            self.format(r)
            for r in self.records
            if r.levelno >= logging.ERROR
            and r.name.split(".")[0] in ("bot", "cogs", "discord")
            and not any(words in r.getMessage() for words in self.expected_errors)
        ]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every log line the bot and its libraries write during the scenario, at DEBUG, unfiltered."""
    from bot.log import quiet_noisy_loggers

    capture = LogCapture()
    quiet_noisy_loggers()  # the same library log levels as production, at DEBUG
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def modelslab() -> AsyncIterator[FakeModelsLab]:
    fake = FakeModelsLab()
    await fake.start()
    yield fake
    await fake.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tolerate_rate_limits(reason): the fake Discord records the 429s (and a ban) that the bot earns but does not "
        "count them as violations. Only for a named bot bug that the test is not about; say which in the reason.",
    )


@pytest.fixture
async def discord_server(request: pytest.FixtureRequest) -> AsyncIterator[FakeDiscord]:
    # Discord's limits are on in every scenario (the defaults of RateLimits: 5 messages per 5 s per channel, 5
    # interaction-webhook calls per 2 s per token, 10 per 10 s on other routes, 50 per second globally, the ban after
    # 10,000 invalid requests in 10 minutes). A 429 that the test did not force is a violation, like any other
    # broken rule, unless the test carries the tolerate_rate_limits marker.
    fake = FakeDiscord(token=BOT_TOKEN, rate_limits=RateLimits())
    fake.tolerate_rate_limits = request.node.get_closest_marker("tolerate_rate_limits") is not None
    await fake.start()
    yield fake
    await fake.stop()
    assert fake.violations == [], "the bot broke Discord's rules"


class BotRunner:
    """Starts, crashes and restarts the real bot on one database."""

    def __init__(self, discord_server: FakeDiscord, modelslab: FakeModelsLab, data: Path, monkeypatch: Any) -> None:
        self.discord = discord_server
        self.modelslab = modelslab
        self.data = data
        self.overrides: dict[str, Any] = {}
        self.app: App | None = None
        self._context: Any = None
        self._task: asyncio.Task[None] | None = None
        self._monkeypatch = monkeypatch

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "discord_token": BOT_TOKEN,
            "discord_api_base": self.discord.api_base,
            "discord_gateway_url": self.discord.gateway_url,
            "discord_dev_guild_id": self.discord.guild_id,
            "modelslab_api_key": DEFAULT_KEY,
            "modelslab_base_url": self.modelslab.base_url,
            "database_path": self.data / "bot.sqlite3",
            "webhook_host": "127.0.0.1",
            "webhook_port": 0,
            "secret_key": "test-secret-key-0123456789abcdef",
        }
        values.update(self.overrides)
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    def with_webhooks(self) -> str:
        """Set PUBLIC_URL to a port the receiver will listen on."""
        port = free_port()
        self.overrides.update(webhook_port=port, public_url=f"http://127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    async def start(self, *, timings: Timings | None = None, **overrides: Any) -> App:
        # discord.py reads its endpoints from class attributes: restore them after the test.
        import discord

        self._monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
        self._monkeypatch.setattr(
            discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        )
        identified = self.discord.identify_count
        # A restarted bot process takes seconds where this takes milliseconds: let Discord's 5 s between two
        # IDENTIFYs (max_concurrency 1) pass, as the real restart would.
        self.discord.let_identify_window_pass()
        self._context = running_app(self.settings(**overrides), guild_ready_timeout=0.05, timings=timings or FAST)
        self.app = await self._context.__aenter__()
        self._task = asyncio.create_task(self.app.bot.start(BOT_TOKEN))
        await self.discord.wait_until_ready(after=identified)
        # discord.py fires on_ready after guild_ready_timeout; closing before that leaves its task dangling.
        await self.app.bot.wait_until_ready()
        return self.app

    async def stop(self) -> None:
        """Stop the way a crash would, from the jobs' point of view: every driver is cancelled where it is."""
        if self.app is None:
            return
        await self.app.jobs.close()
        await self.app.bot.close()
        if self._task is not None:
            await self._task
        await self._context.__aexit__(None, None, None)
        self.app = None

    async def restart(self, **overrides: Any) -> App:
        await self.stop()
        return await self.start(**overrides)

    @property
    def jobs(self) -> Any:
        assert self.app is not None
        return self.app.jobs

    @property
    def guilds(self) -> Any:
        assert self.app is not None
        return self.app.guilds

    @property
    def store(self) -> JobRepository:
        assert self.app is not None
        return self.app.storage.jobs

    async def only_job(self) -> Job:
        ids = await self.store.ids()
        assert len(ids) == 1, f"expected one job, found {len(ids)}"
        job = await self.store.get(ids[0])
        assert job is not None
        return job

    async def job_count(self) -> int:
        return len(await self.store.ids(limit=1_000_000))

    async def sql(self, statement: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        """Raw SQL on the bot's database, for what no repository offers: time passing, a row damaged, a count.
        The scenario's own reads and writes go through the repositories. Written for SQLite; on PostgreSQL each `?`
        becomes `$1`, `$2`, ..."""
        assert self.app is not None
        if isinstance(self.app.storage, PostgresStorage):
            numbered = iter(range(1, len(parameters) + 1))
            statement = re.sub(r"\?", lambda _: f"${next(numbered)}", statement)
            if statement.lstrip().upper().startswith("SELECT"):
                return list(await self.app.storage.db.fetch(statement, *parameters))
            await self.app.storage.db.execute(statement, *parameters)
            return []
        assert isinstance(self.app.storage, SqliteStorage)
        if statement.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            return await self.app.storage.db.fetch_all(statement, parameters)
        await self.app.storage.db.execute(statement, parameters)
        return []

    async def sql_one(self, statement: str, parameters: tuple[Any, ...] = ()) -> Any:
        rows = await self.sql(statement, parameters)
        return rows[0] if rows else None

    async def wait_posted(self, job_id: str | None = None, timeout: float = 10) -> Job:
        """Wait until the job's outcome has been shown (and recorded as shown)."""
        assert self.app is not None
        if job_id is None:
            job_id = (await self.only_job()).id
        async with asyncio.timeout(timeout):
            return await self.app.jobs.wait_until_posted(job_id)

    async def generating(self, interaction: Any, timeout: float = 10) -> Job:
        """Wait until the member sees "Generating" (ModelsLab queued the job), then return the job."""
        await self.discord.wait_for_message(
            lambda m: m.id == (interaction.original.id if interaction.original else -1) and "Generating" in m.content,
            timeout=timeout,
        )
        job = await self.only_job()
        assert job.modelslab_id is not None
        return job

    async def first_job_id_from_db(self, timeout: float = 5) -> str:
        """The id of the only job, once the first submission has reached ModelsLab."""
        await self.modelslab.wait_for_request(r"/text2img$", timeout=timeout)
        return (await self.only_job()).id


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("also_on_postgresql") and "database" in metafunc.fixturenames:
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str | None:
    """The `DATABASE_URL` of the scenario: None (SQLite at DATABASE_PATH), or a fresh migrated PostgreSQL
    database for a test marked `also_on_postgresql`, in its PostgreSQL run."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return None


@pytest.fixture
async def runner(discord_server, modelslab, tmp_path, logs, monkeypatch, database) -> AsyncIterator[BotRunner]:
    bot_runner = BotRunner(discord_server, modelslab, tmp_path / "data", monkeypatch)
    if database is not None:
        bot_runner.overrides["database_url"] = database
    yield bot_runner
    await bot_runner.stop()
    assert logs.unexpected_errors() == []


def attachments_of(message: FakeMessage) -> list[bytes]:
    return [a.data for a in message.attachments]
