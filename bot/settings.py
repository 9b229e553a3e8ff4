"""Every setting of the bot, read once from the environment (and `.env`) by :func:`load_settings`."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.discord.shards import ShardPlan, parse_shard_count, parse_shard_ids

DEFAULT_DISCORD_API_BASE = "https://discord.com/api/v10"
SECRET_KEY_FILE_NAME = "secret.key"


class SettingsError(Exception):
    """The settings are unusable; the message says what to fix, in plain words."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """The bot's configuration. Field names are the environment variable names, case-insensitive."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    discord_token: SecretStr = Field(description="The bot token from the Discord developer portal.")
    discord_api_base: str = Field(DEFAULT_DISCORD_API_BASE, description="Discord REST base URL (for REST proxies).")
    discord_gateway_url: str | None = Field(None, description="Discord gateway URL (for gateway proxies).")
    discord_dev_guild_id: int | None = Field(None, description="Sync commands to this guild only, at start-up.")

    modelslab_api_key: SecretStr | None = Field(None, description="The operator's default ModelsLab API key.")
    allow_default_key: bool = Field(True, description="Servers without their own key use MODELSLAB_API_KEY.")
    default_key_guild_daily: int = Field(
        0, ge=0, le=100_000, description="Images a day for each server on MODELSLAB_API_KEY; 0: no cap."
    )
    modelslab_base_url: AnyHttpUrl = Field(AnyHttpUrl("https://modelslab.com"), description="Scheme and host.")
    modelslab_api: Literal["v6", "enterprise"] = Field("v6", description="Community (v6) or enterprise endpoints.")
    modelslab_default_model: str = Field("flux", min_length=1, description="model_id used when none is given.")
    modelslab_default_remix_model: str = Field(
        "fluxdev", min_length=1, description="model_id for /remix (it must support img2img) when none is given."
    )
    modelslab_job_timeout: float = Field(600, gt=0, description="Seconds before an unfinished job is given up.")
    modelslab_max_queued: int = Field(5, ge=1, le=100, description="Jobs of one API key at ModelsLab at once.")

    database_path: Path = Field(Path("./data/bot.sqlite3"), description="The SQLite database file.")
    database_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:port/db: PostgreSQL, for several processes; unset: SQLite."
    )
    database_pool_size: int = Field(10, ge=1, le=1000, description="Connections each process keeps to PostgreSQL.")
    shard_count: int | Literal["auto"] | None = Field(
        None, description="Gateway shards of the whole bot: a number, or auto (Discord's recommendation); unset: none."
    )
    shard_ids: str | None = Field(
        None, description="This process's shards (0-3, 0,2, all); empty with SHARD_COUNT: a worker, no gateway."
    )
    worker_id: str = Field(
        default_factory=lambda: default_worker_id(),
        min_length=1,
        max_length=100,
        description="This process's name in the database's job leases (default: host and process id).",
    )
    lease_seconds: float = Field(
        30, ge=1, le=3600, description="A process that stops renewing its jobs loses them to the others after this."
    )
    webhook_host: str = Field("0.0.0.0", description="Interface the webhook receiver listens on.")
    webhook_port: int = Field(8080, ge=0, le=65535, description="Port the webhook receiver listens on (0: any).")
    public_url: AnyHttpUrl | None = Field(None, description="Public base URL of the receiver; unset: polling only.")
    download_allowed_hosts: str = Field(
        "", description="Comma list of extra hosts result images may come from, with their scheme."
    )
    secret_key: SecretStr | None = Field(None, description="Signs webhook URLs; generated into the data directory.")
    metrics_token: SecretStr | None = Field(
        None, description="GET /metrics answers only to Authorization: Bearer <this>; unset: /metrics answers 404."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="How much the bot logs.")
    log_format: Literal["text", "json"] = Field("text", description="text, or json (one object a line).")

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            return value.upper() if value.lower() in ("debug", "info", "warning", "error") else value.lower()
        return value

    @field_validator("default_key_guild_daily", mode="before")
    @classmethod
    def _blank_is_no_cap(cls, value: object) -> object:
        return 0 if isinstance(value, str) and not value.strip() else value

    @field_validator("discord_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("is empty")
        return value

    @field_validator(
        "modelslab_api_key",
        "secret_key",
        "metrics_token",
        "discord_gateway_url",
        "discord_dev_guild_id",
        "public_url",
        "database_url",
        "shard_ids",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """`.env.example` lists every key; an empty `KEY=` means "not set", not "set to nothing"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters long (or unset, to have one generated)")
        return value

    @field_validator("worker_id", mode="before")
    @classmethod
    def _blank_worker_id_is_the_default(cls, value: object) -> object:
        return default_worker_id() if isinstance(value, str) and not value.strip() else value

    @field_validator("shard_count", mode="before")
    @classmethod
    def _shard_count(cls, value: object) -> object:
        return parse_shard_count(value) if isinstance(value, str) else value

    @field_validator("shard_ids")
    @classmethod
    def _shard_ids(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shard_ids(value)
        return value

    @model_validator(mode="after")
    def _shards_fit(self) -> Settings:
        if self.shard_ids is not None and self.shard_count is None:
            raise ValueError("SHARD_IDS needs SHARD_COUNT (the shards of the whole bot)")
        if self.shard_count is not None:
            ids = parse_shard_ids(self.shard_ids) if self.shard_ids is not None else ()
            if isinstance(self.shard_count, int):
                every = self.shard_plan(self.shard_count).holds_every_shard  # (and every id is a shard of the count)
            else:
                every = ids is None  # auto: only "all" can be known to hold every shard
            if self.database_url is None and not every:
                raise ValueError(
                    "several processes can share one bot only on PostgreSQL (DATABASE_URL); on SQLite one process "
                    "holds every shard: set SHARD_IDS=all"
                )
        return self

    def shard_plan(self, count: int | None) -> ShardPlan:
        """This process's shards, once `SHARD_COUNT=auto` is resolved to `count` (None: unsharded)."""
        if self.shard_count is None:
            return ShardPlan(None)
        ids = parse_shard_ids(self.shard_ids) if self.shard_ids is not None else ()
        return ShardPlan(count, ids)

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (len(value.get_secret_value()) < 16 or not value.get_secret_value().isprintable()):
            raise ValueError("must be at least 16 printable characters (or unset, to turn /metrics off)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or be unset, for SQLite at DATABASE_PATH)")
        return value

    @model_validator(mode="after")
    def _shared_database_needs_a_shared_secret_key(self) -> Settings:
        if self.database_url is not None and self.secret_key is None:
            raise ValueError(
                "SECRET_KEY is required with DATABASE_URL, since every process must sign webhook URLs and unseal the "
                "servers' keys alike: give them all the same SECRET_KEY"
            )
        return self

    @property
    def data_directory(self) -> Path:
        return self.database_path.expanduser().resolve().parent

    @property
    def modelslab_base(self) -> str:
        """The base URL without a trailing slash, ready for path joining."""
        return str(self.modelslab_base_url).rstrip("/")

    @property
    def public_base(self) -> str | None:
        return str(self.public_url).rstrip("/") if self.public_url is not None else None


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one plain paragraph."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            if error["type"] == "missing":
                problems.append(f"{name} is required but not set")
            elif not error["loc"]:  # a rule across settings: its message names them
                problems.append(str(error["msg"]).removeprefix("Value error, "))
            else:
                problems.append(f"{name}: {error['msg']}")
        raise SettingsError(
            "The bot's settings are not usable: " + "; ".join(problems) + ". Set them in the environment or in .env "
            "(see .env.example)."
        ) from None


def private_directory(directory: Path) -> None:
    """Create the data folder readable by the bot's user only (0700). A folder that already exists is tightened
    only if it holds nothing but the bot's own files: it may be a folder the operator shares for other things."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.stat().st_mode & 0o077 and _only_bot_files(directory):
        with contextlib.suppress(PermissionError):
            directory.chmod(0o700)


def _only_bot_files(directory: Path) -> bool:
    return all(
        entry.name == SECRET_KEY_FILE_NAME or entry.name.endswith((".sqlite3", ".sqlite3-wal", ".sqlite3-shm"))
        for entry in directory.iterdir()
    )


def private_file(path: Path) -> None:
    """An existing file of the bot's (the database, its -wal and -shm, secret.key) made 0600."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def ensure_secret_key(settings: Settings) -> bytes:
    """The key that signs webhook URLs: `SECRET_KEY` if set, else one generated once into the data directory.

    Raises `SettingsError` (one plain sentence) when the folder cannot be used or the key file is empty or
    damaged: running on an empty key would sign webhook URLs with nothing."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    directory = settings.data_directory
    path = directory / SECRET_KEY_FILE_NAME
    try:
        private_directory(directory)
        try:
            return _read_secret_key(path)
        except FileNotFoundError:
            pass
        key = secrets.token_urlsafe(48).encode()
        # O_EXCL: if two processes race, one wins and the other reads the winner's key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_secret_key(path)
        with os.fdopen(fd, "wb") as file:
            file.write(key + b"\n")
        return key
    except OSError as exc:
        raise SettingsError(
            f"The generated secret key {path} cannot be read or written ({exc.strerror or exc}): give the bot's "
            "user that folder, or set SECRET_KEY."
        ) from None


def _read_secret_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    private_file(path)
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if len(text) < 16 or not text.isprintable():
        why = "it is empty" if not key else "it is not a key the bot wrote"
        raise SettingsError(
            f"The generated secret key {path} is damaged ({why}): restore it from your backup, or set SECRET_KEY. "
            "Deleting it makes the bot write a new one, and then the servers' stored API keys cannot be read "
            "(each server must run /config apikey again)."
        )
    return key
