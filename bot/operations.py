"""What an admin runs from a shell: `python -m bot check`, `invite-url`, `db copy` and `db record-settings`.

`check` validates the settings, opens the database, reaches ModelsLab and Discord, and says what is
wrong in plain words, one line per part. Nothing here prints a secret.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from bot import PROJECT_URL, __version__
from bot.discord.texts import failure_sentence
from bot.modelslab.client import ErrorKind, ModelsLabClient
from bot.settings import Settings, SettingsError
from bot.storage import Storage, StorageError, open_storage
from bot.storage.shared import disagreements, shared_values

# What the bot needs in a channel, no more: see the README's "Creating the Discord application".
PERMISSIONS = {
    "View Channels": 1 << 10,
    "Send Messages": 1 << 11,
    "Embed Links": 1 << 14,
    "Attach Files": 1 << 15,
    "Read Message History": 1 << 16,
    "Send Messages in Threads": 1 << 38,
}
PERMISSIONS_VALUE = sum(PERMISSIONS.values())
SCOPES = ("bot", "applications.commands")
# What Discord asks every HTTP client to send ("User-Agent" in its API reference): `DiscordBot ($url, $version)`.
USER_AGENT = f"DiscordBot ({PROJECT_URL}, {__version__})"


def invite_url(application_id: int) -> str:
    return (
        f"https://discord.com/oauth2/authorize?client_id={application_id}"
        f"&scope={'+'.join(SCOPES)}&permissions={PERMISSIONS_VALUE}"
    )


def application_id_from_token(token: str) -> int | None:
    """A bot token starts with the bot's user id in base64, which is also the application's id."""
    head = token.split(".", 1)[0]
    try:
        value = base64.b64decode(head + "=" * (-len(head) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return int(value) if value.isascii() and value.isdigit() else None


@dataclass(frozen=True)
class Finding:
    part: str
    ok: bool
    text: str
    warning: bool = False  # works, but at a risk the admin should know of (does not fail `check`)

    def line(self) -> str:
        mark = "⚠" if self.warning else "✓" if self.ok else "✗"
        return f"{mark} {self.part}: {self.text}"


@dataclass(frozen=True)
class DiscordApplication:
    finding: Finding
    application_id: int | None = None
    bot_public: bool | None = None  # the developer portal's "Public Bot" switch (None: not known)


def open_to_strangers(bot_public: bool | None, settings: Settings) -> str | None:
    """One line naming the risk when anyone may add the bot to a server and generate on the operator's key."""
    if not bot_public or not settings.allow_default_key or settings.modelslab_api_key is None:
        return None
    if settings.default_key_guild_daily:
        how_much = f"up to {settings.default_key_guild_daily} images a day per server (DEFAULT_KEY_GUILD_DAILY)"
        fix = "or set ALLOW_DEFAULT_KEY=false"
    else:
        how_much = "without limit"
        fix = "or set ALLOW_DEFAULT_KEY=false, or cap it with DEFAULT_KEY_GUILD_DAILY"
    return (
        "strangers can spend your ModelsLab credits: the application is a Public Bot and ALLOW_DEFAULT_KEY is true, "
        f"so anyone who adds the bot to a server generates on MODELSLAB_API_KEY {how_much}; turn Public Bot off "
        f"(developer portal → Bot) {fix}."
    )


async def recommended_shard_count(settings: Settings, session: aiohttp.ClientSession) -> int:
    """Discord's recommendation for `SHARD_COUNT=auto` (GET /gateway/bot)."""
    base = settings.discord_api_base.rstrip("/")
    headers = {"Authorization": f"Bot {settings.discord_token.get_secret_value()}", "User-Agent": USER_AGENT}
    try:
        async with session.get(f"{base}/gateway/bot", headers=headers) as response:
            body = await response.json(content_type=None) if response.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise SettingsError(f"SHARD_COUNT=auto: Discord could not be asked for its recommendation ({exc}).") from exc
    shards = body.get("shards") if isinstance(body, dict) else None
    if not isinstance(shards, int) or shards < 1:
        raise SettingsError(f"SHARD_COUNT=auto: Discord answered HTTP {response.status} without a shard count.")
    return shards


async def discord_application(settings: Settings, session: aiohttp.ClientSession) -> DiscordApplication:
    base = settings.discord_api_base.rstrip("/")
    headers = {"Authorization": f"Bot {settings.discord_token.get_secret_value()}", "User-Agent": USER_AGENT}
    try:
        async with session.get(f"{base}/users/@me", headers=headers) as response:
            if response.status == 401:
                return DiscordApplication(
                    Finding("Discord", False, "the bot token was refused: copy it again (Bot → Reset Token).")
                )
            if response.status != 200:
                return DiscordApplication(
                    Finding("Discord", False, f"answered HTTP {response.status} to the login check.")
                )
            user = await response.json(content_type=None)
        async with session.get(f"{base}/oauth2/applications/@me", headers=headers) as response:
            application = await response.json(content_type=None) if response.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return DiscordApplication(Finding("Discord", False, f"cannot be reached at {base} ({type(exc).__name__})."))
    app_id = int(application["id"]) if application.get("id") else None
    bot_public = application.get("bot_public")
    name = user.get("username", "?")
    return DiscordApplication(
        Finding("Discord", True, f"logged in as {name} (application {app_id})."),
        app_id,
        bot_public if isinstance(bot_public, bool) else None,
    )


async def modelslab_status(settings: Settings, session: aiohttp.ClientSession) -> Finding:
    client = ModelsLabClient(session, base_url=settings.modelslab_base, flavour=settings.modelslab_api)
    if settings.modelslab_api_key is None:
        try:
            async with session.get(settings.modelslab_base) as response:
                reached = response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            reached = False
        if not reached:
            return Finding("ModelsLab", False, f"cannot be reached at {settings.modelslab_base}.")
        return Finding(
            "ModelsLab", True, "reachable; no MODELSLAB_API_KEY, so every server must set its own (/config apikey)."
        )
    problem = await client.check_key(settings.modelslab_api_key.get_secret_value())
    if problem is None:
        return Finding("ModelsLab", True, f"the operator's key works ({settings.modelslab_api} API).")
    if problem.kind is ErrorKind.SERVICE_DOWN and problem.http_status is None:
        return Finding("ModelsLab", False, f"cannot be reached at {settings.modelslab_base} ({problem.detail}).")
    sentence = failure_sentence(problem.kind, problem.detail, model_id="", retry_after=problem.retry_after, timeout=0)
    return Finding("ModelsLab", False, f"MODELSLAB_API_KEY: {sentence}")


async def database_status(settings: Settings) -> Finding:
    try:
        async with open_storage(settings, upgrade=False) as storage:
            current = await storage.current_version()
            latest = await storage.latest_version()
            problems = await disagreements(storage, settings)
    except StorageError as exc:
        return Finding("database", False, str(exc))
    if problems:
        return Finding("database", False, "; ".join(problems) + ".")
    pending = f"; {latest - current} migration(s) will be applied at start" if current < latest else ""
    return Finding("database", True, f"{storage.description}, schema version {current} of {latest}{pending}.")


def webhook_status(settings: Settings) -> Finding:
    if settings.public_base is None:
        return Finding("webhooks", True, "PUBLIC_URL is not set: results are fetched by polling (works behind NAT).")
    note = "" if settings.public_base.startswith("https://") else " (not https: prefer a TLS proxy in front)"
    return Finding(
        "webhooks",
        True,
        f"ModelsLab will call {settings.public_base}/webhooks/modelslab/…{note}; "
        f"the receiver listens on {settings.webhook_host}:{settings.webhook_port}.",
    )


async def check(settings: Settings) -> list[Finding]:
    findings = [
        Finding(
            "settings", True, f"read ({settings.modelslab_api} API, default model {settings.modelslab_default_model})."
        )
    ]
    findings.append(await database_status(settings))
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        discord_app = await discord_application(settings, session)
        findings.append(discord_app.finding)
        findings.append(await modelslab_status(settings, session))
    findings.append(webhook_status(settings))
    risk = open_to_strangers(discord_app.bot_public, settings)
    if risk is not None:
        findings.append(Finding("default key", True, risk, warning=True))
    return findings


async def find_invite_url(settings: Settings) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        app_id = (await discord_application(settings, session)).application_id
    if app_id is None:
        app_id = application_id_from_token(settings.discord_token.get_secret_value())
    if app_id is None:
        raise ValueError("the application id could not be found: check DISCORD_TOKEN")
    return invite_url(app_id)


async def copy_database(settings: Settings, to: str | None, *, report: Callable[[str], None]) -> dict[str, int]:
    """`db copy --to postgresql://…`: the SQLite database at DATABASE_PATH into a new PostgreSQL database."""
    from bot.storage.copy import copy_sqlite_to_postgres
    from bot.storage.postgres import is_postgres_url

    if not to or not is_postgres_url(to):
        raise StorageError("db copy needs the PostgreSQL database to fill: --to postgresql://user:password@host/db.")
    counts = await copy_sqlite_to_postgres(settings.database_path, to, report=report)
    report(f"copied {sum(counts.values())} row(s); set DATABASE_URL to this database (and keep SECRET_KEY) to use it")
    return counts


async def record_shared_settings(storage: Storage, settings: Settings) -> list[str]:
    """`db record-settings`: this environment's shared settings become every process's (run with all stopped)."""
    lines = []
    for name, value in shared_values(settings).items():
        await storage.record_shared_setting(name, value, replace=True)
        lines.append(f"{name}={value} recorded for every process of the bot ({storage.description})")
    return lines
