"""A small fake Discord (REST API, CDN and gateway) for end-to-end tests of a real discord.py client.

The fake listens on 127.0.0.1 (random port) and speaks the parts of Discord's HTTP API v10 and gateway that a
slash-command bot uses. It keeps the state a test wants to look at (messages with their attachment bytes, synced
commands, interactions and every request) and it holds the bot to Discord's rules: answers that break a rule are
given as Discord gives them *and* written to :attr:`FakeDiscord.violations`, which a test asserts stays empty.

Point discord.py at it with two class attributes (set before ``login()``)::

    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

Everything here was checked against discord.py 2.7.1; see ``/work/shared/docs/discord-testing.md``.

Discord's rate limits are on by default (``tests/fakes/discord_rate_limits.py`` says what they are and where that
comes from): per-route buckets with their headers, the global limit, the invalid-request limit and the Cloudflare ban
after it. A 429 that the client earns is a violation unless ``tolerate_rate_limits`` is set; a test lowers limits
through ``fake.rate_limits``, forces a 429 of a scope with :meth:`FakeDiscord.force_rate_limit` or the ban with
:meth:`FakeDiscord.start_ban`, and reads :attr:`FakeDiscord.rate_limited`, :meth:`FakeDiscord.requests_by_route`,
:meth:`FakeDiscord.invalid_requests_worst_window` and :meth:`FakeDiscord.budget`.

Several guilds and shards: ``fake.guild`` is the first guild (the single-guild attributes describe it) and
:meth:`FakeDiscord.add_guild` / :meth:`FakeDiscord.add_guilds` make more; the ``invoke_*`` methods take ``guild_id``.
``GET /gateway/bot`` recommends ``recommended_shards`` (default one per 1,000 guilds) with ``max_concurrency``; an
IDENTIFY with ``shard: [id, count]`` gets only the guilds of that shard, ``(guild_id >> 22) % count``, and each
guild's events go on its shard's connection (DMs on shard 0). As on Discord: a shard out of range is closed with 4010,
a session of more than 2,500 guilds (``max_guilds_per_shard``) with 4011, and an IDENTIFY within 5 s of another with
the same ``shard_id % max_concurrency`` gets op 9 Invalid Session (a violation while that other session is still
connected; after a restart, counted in ``identify_refusals``).

Two things that are *not* violations, because Discord does them to a correct bot as well and the bot is expected to
cope: webhook calls with an interaction token older than 15 minutes (401, code 50027; counted in
:attr:`FakeDiscord.expired_token_calls`) and requests about a message that a moderator deleted (404, code 10008).
"""

# The waiting helpers take ``timeout=`` arguments on purpose: it is the interface the tests and conftest use.

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import mimetypes
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import quote

from aiohttp import BodyPartReader, WSMsgType, web

from tests.fakes.discord_rate_limits import (
    BAN_SCOPE,
    INTERACTION_WEBHOOK,
    MESSAGE_CREATE,
    MESSAGE_EDIT,
    OTHER,
    VIA,
    DiscordBudget,
    Limit,
    RateLimitAnswer,
    RateLimiter,
    RateLimits,
    Scope,
    requests_by_route,
)

if TYPE_CHECKING:
    import discord

__all__ = [
    "ALL_PERMISSIONS",
    "DEFAULT_UPLOAD_LIMIT",
    "DiscordBudget",
    "DiscordErrorLog",
    "Dispatch",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMessage",
    "Limit",
    "Permissions",
    "RateLimitAnswer",
    "RateLimits",
    "RecordedRequest",
    "UploadedFile",
    "point_discord_py_at",
    "running_bot",
    "running_fake_discord",
    "shard_of",
]

_log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
NO_ANSWER = 0  # fail_next(): the connection is closed instead of answering
DISCORD_EPOCH_MS = 1_420_070_400_000
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
MAX_FILES_PER_MESSAGE = 10
JSON_CONTENT_TYPE = "application/json"

T = TypeVar("T")
ClientT = TypeVar("ClientT", bound="discord.Client")
Payload = dict[str, Any]


class Permissions:
    """Permission bits used by the fake (a subset of Discord's)."""

    CREATE_INSTANT_INVITE = 1 << 0
    KICK_MEMBERS = 1 << 1
    BAN_MEMBERS = 1 << 2
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    USE_EXTERNAL_EMOJIS = 1 << 18
    CONNECT = 1 << 20
    SPEAK = 1 << 21
    CHANGE_NICKNAME = 1 << 26
    USE_APPLICATION_COMMANDS = 1 << 31
    CREATE_PUBLIC_THREADS = 1 << 35
    USE_EXTERNAL_STICKERS = 1 << 37
    SEND_MESSAGES_IN_THREADS = 1 << 38


ALL_PERMISSIONS = (1 << 51) - 1

EVERYONE_PERMISSIONS = (
    Permissions.CREATE_INSTANT_INVITE
    | Permissions.ADD_REACTIONS
    | Permissions.VIEW_CHANNEL
    | Permissions.SEND_MESSAGES
    | Permissions.EMBED_LINKS
    | Permissions.ATTACH_FILES
    | Permissions.READ_MESSAGE_HISTORY
    | Permissions.USE_EXTERNAL_EMOJIS
    | Permissions.CONNECT
    | Permissions.SPEAK
    | Permissions.CHANGE_NICKNAME
    | Permissions.USE_APPLICATION_COMMANDS
    | Permissions.CREATE_PUBLIC_THREADS
    | Permissions.USE_EXTERNAL_STICKERS
    | Permissions.SEND_MESSAGES_IN_THREADS
)
MODERATOR_PERMISSIONS = Permissions.MANAGE_GUILD | Permissions.MANAGE_MESSAGES | Permissions.KICK_MEMBERS
BOT_ROLE_PERMISSIONS = (
    Permissions.VIEW_CHANNEL
    | Permissions.SEND_MESSAGES
    | Permissions.EMBED_LINKS
    | Permissions.ATTACH_FILES
    | Permissions.READ_MESSAGE_HISTORY
    | Permissions.USE_EXTERNAL_EMOJIS
    | Permissions.ADD_REACTIONS
)

# Gateway intents.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

# Interaction types and callback types.
INTERACTION_PING = 1
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
INTERACTION_MODAL_SUBMIT = 5

CALLBACK_CHANNEL_MESSAGE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE_MESSAGE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_AUTOCOMPLETE_RESULT = 8
CALLBACK_MODAL = 9

ALLOWED_CALLBACKS: dict[int, frozenset[int]] = {
    INTERACTION_APPLICATION_COMMAND: frozenset({4, 5, 9}),
    INTERACTION_COMPONENT: frozenset({4, 5, 6, 7, 9}),
    INTERACTION_AUTOCOMPLETE: frozenset({8}),
    INTERACTION_MODAL_SUBMIT: frozenset({4, 5, 6, 7}),
}

# Application command option types.
OPT_SUB_COMMAND = 1
OPT_SUB_COMMAND_GROUP = 2
OPT_STRING = 3
OPT_INTEGER = 4
OPT_BOOLEAN = 5
OPT_USER = 6
OPT_CHANNEL = 7
OPT_ROLE = 8
OPT_MENTIONABLE = 9
OPT_NUMBER = 10
OPT_ATTACHMENT = 11

_SELECT_TYPES = frozenset({3, 5, 6, 7, 8})
_COMMAND_NAME_RE = re.compile(r"^[-_'\w]{1,32}$")


# --------------------------------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class UploadedFile:
    """A file: an uploaded multipart part (in :attr:`RecordedRequest.files`) or a message attachment.

    In ``RecordedRequest.files`` the ``id`` is the ``N`` of the ``files[N]`` part and ``content_type`` is what the
    client declared (discord.py always says ``application/octet-stream``). In ``FakeMessage.attachments`` the ``id``
    is the attachment's snowflake and ``content_type`` is sniffed from the bytes, as Discord does.
    """

    filename: str
    content_type: str | None
    data: bytes
    id: int = 0
    description: str | None = None
    width: int | None = None
    height: int | None = None
    url: str = ""
    proxy_url: str = ""

    @property
    def size(self) -> int:
        return len(self.data)

    def to_payload(self) -> Payload:
        """The attachment object of the Discord API."""
        payload: Payload = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.proxy_url,
            "content_type": self.content_type,
        }
        if self.width is not None and self.height is not None:
            payload["width"] = self.width
            payload["height"] = self.height
        if self.description is not None:
            payload["description"] = self.description
        return payload


@dataclass
class RecordedRequest:
    """One HTTP request the client made to the fake (REST or CDN)."""

    method: str
    path: str  # without the "/api/v10" prefix for API calls; CDN paths as they are
    query: dict[str, str]
    json: Any | None  # the JSON body, or the parsed payload_json part of a multipart body
    files: list[UploadedFile]
    headers: dict[str, str]
    at: float  # time.monotonic() when received
    status: int = 0  # the status the fake answered with
    response: Any | None = None  # the JSON the fake answered with (None for bytes and 204)
    injected: bool = False  # answered by a fail_next() rule
    route: str = ""  # the route template ("PATCH /channels/{channel_id}/messages/{message_id}"); "" if unknown
    interaction_id: int | None = None  # the interaction whose callback or webhook token the request used


@dataclass
class FakeMessage:
    """A message as the fake stores it. ``attachments`` carry their bytes."""

    id: int
    channel_id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[UploadedFile] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    flags: int = 0  # 64 = ephemeral, 128 = "thinking" placeholder of a deferred response
    author_id: int = 0
    interaction_id: int | None = None
    message_reference: dict[str, Any] | None = None
    deleted: bool = False
    edits: int = 0
    # Extras beyond the minimal interface.
    author: dict[str, Any] = field(default_factory=dict)
    type: int = 0
    nonce: str | None = None
    tts: bool = False
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    edited_timestamp: str | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    def to_payload(self) -> dict[str, Any]:
        """The Discord message object."""
        payload: Payload = {
            "id": str(self.id),
            "type": self.type,
            "channel_id": str(self.channel_id),
            "content": self.content,
            "author": dict(self.author) if self.author else _minimal_user(self.author_id),
            "embeds": [dict(e) for e in self.embeds],
            "attachments": [a.to_payload() for a in self.attachments],
            "components": json.loads(json.dumps(self.components)),
            "flags": self.flags,
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": self.tts,
            "timestamp": _snowflake_iso(self.id),
            "edited_timestamp": self.edited_timestamp,
        }
        if self.nonce is not None:
            payload["nonce"] = self.nonce
        if self.webhook_id is not None:
            payload["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            payload["application_id"] = str(self.application_id)
        if self.interaction_metadata is not None:
            payload["interaction_metadata"] = dict(self.interaction_metadata)
        if self.message_reference is not None:
            payload["message_reference"] = dict(self.message_reference)
        return payload


@dataclass(eq=False)
class FakeGuild:
    """A guild (server) of the fake: its roles, its members (user id -> role ids) and its text channels.

    The fake's first guild is ``fake.guild`` (its id ``fake.guild_id``; ``fake.roles`` and ``fake.member_roles`` are
    this guild's); :meth:`FakeDiscord.add_guild` makes more. Users and channels live in ``fake.users`` and
    ``fake.channels`` (each channel names its ``guild_id``).
    """

    id: int
    name: str
    owner_id: int
    bot_role_id: int
    roles: dict[int, Payload] = field(default_factory=dict)
    member_roles: dict[int, list[int]] = field(default_factory=dict)
    channel_ids: list[int] = field(default_factory=list)

    @property
    def channel_id(self) -> int:
        """The first text channel (the system channel, where interactions happen unless told otherwise)."""
        return self.channel_ids[0]

    @property
    def member_ids(self) -> list[int]:
        return list(self.member_roles)

    def shard_id(self, shard_count: int) -> int:
        """The shard whose connection gets this guild's events: ``(guild_id >> 22) % shard_count``."""
        return shard_of(self.id, shard_count)


def shard_of(guild_id: int, shard_count: int) -> int:
    """Discord's sharding formula (Gateway page, "Sharding"): ``(guild_id >> 22) % num_shards``."""
    return (guild_id >> 22) % shard_count


class FakeInteraction:
    """An interaction the fake dispatched, with what the bot did about it."""

    def __init__(
        self,
        fake: FakeDiscord,
        *,
        id: int,
        token: str,
        type: int,
        payload: Payload,
        user_id: int,
        channel_id: int,
        guild_id: int | None,
        attachment_size_limit: int,
    ) -> None:
        self._fake = fake
        self.id = id
        self.token = token
        self.type = type
        self.application_id = fake.application_id
        self.payload = payload
        self.user_id = user_id
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.attachment_size_limit = attachment_size_limit
        self.created_at: float = time.monotonic()  # reset to the moment of dispatch
        self.callback: RecordedRequest | None = None  # the first callback the bot sent (accepted or not)
        self.callback_latency: float | None = None
        self.callback_type: int | None = None
        self.acknowledged = False  # a callback was accepted
        self.callbacks: list[RecordedRequest] = []  # every callback the fake handled, refused ones included
        # (requests answered by a fail_next() rule are only in FakeDiscord.requests, unless handled=True)
        # The bot was told a callback failed (a fail_next() rule answered it): it cannot know whether Discord got it,
        # so looking for the response, or sending the callback again, is not a bug (Discord answers as it would).
        self.told_callback_failed = False
        self.expired = False  # set by FakeDiscord.expire_interaction
        self.original_message_id: int | None = None
        self.followups: list[FakeMessage] = []
        self.modal: dict[str, Any] | None = None  # data of a type-9 callback
        self.autocomplete_choices: list[dict[str, Any]] | None = None  # data.choices of a type-8 callback

    def __repr__(self) -> str:
        return f"<FakeInteraction id={self.id} type={self.type} callback_type={self.callback_type}>"

    @property
    def original(self) -> FakeMessage | None:
        """The @original response message, current state (None before a response created or chose one)."""
        if self.original_message_id is None:
            return None
        return self._fake.messages.get(self.original_message_id)

    def is_expired(self) -> bool:
        return self.expired or time.monotonic() - self.created_at > self._fake.token_lifetime

    async def wait_callback(self, timeout: float = 5) -> RecordedRequest:
        """Wait for the bot's first interaction callback (also when the fake refused it, e.g. as too late).

        Requests answered by a :meth:`FakeDiscord.fail_next` rule do not count: the retry that follows does.
        """

        def found() -> RecordedRequest | None:
            return self.callback

        return await self._fake._wait(found, timeout, f"the callback of interaction {self.id}")


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    body: Any = None  # JSON-able, bytes, or None (no body)
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_CONTENT_TYPE
    # A 429 (or the ban answer): (scope, retry_after, forced by the test, what was exceeded)
    rate_limit: tuple[str, float | None, bool, str] | None = None


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    template: str  # "POST /channels/{channel_id}/messages"
    auth: bool  # authenticated by the bot token (and so bound to the global limit)
    kind: str  # which limit of RateLimits applies
    handler: Callable[[RecordedRequest, re.Match[str]], _Reply]


@dataclass
class _HoldRule:
    method: str
    pattern: re.Pattern[str]
    seconds: float
    remaining: int


@dataclass
class _FailureRule:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Any
    headers: dict[str, str]
    remaining: int
    handled: bool = False  # the request is handled first, then answered with the failure


_Rule = TypeVar("_Rule", _HoldRule, _FailureRule)


def _take_rule(rules: list[_Rule], rec: RecordedRequest) -> _Rule | None:
    """The first rule that matches the request, used once (and dropped when used up)."""
    for rule in rules:
        if rule.remaining > 0 and rule.method in ("*", rec.method) and rule.pattern.search(rec.path):
            rule.remaining -= 1
            if rule.remaining == 0:
                rules.remove(rule)
            return rule
    return None


class Dispatch(NamedTuple):
    """A gateway dispatch the fake sent (FakeDiscord.dispatched)."""

    shard: tuple[int, int] | None  # [shard_id, shard_count] of the session, None if it did not shard
    event: str
    guild_id: int | None  # the guild it is about (GUILD_CREATE: the guild itself)
    identify_index: int  # which IDENTIFY started the session (FakeDiscord.identify_count then)


@dataclass(eq=False)
class _Session:
    session_id: str
    intents: int
    shard: list[int] | None
    identify_index: int  # FakeDiscord.identify_count right after this session's IDENTIFY
    seq: int = 0
    buffer: deque[Payload] = field(default_factory=lambda: deque(maxlen=1000))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    query: dict[str, str]
    session: _Session | None = None
    ready: bool = False
    closed: bool = False
    presence: Payload | None = None
    ready_index: int = 0  # FakeDiscord.ready_count when it became ready: the newest connection wins

    @property
    def live(self) -> bool:
        return not self.closed and not self.ws.closed and self.ready and self.session is not None

    def has_guild(self, guild_id: int | None) -> bool:
        """Whether this connection's shard gets the guild's events (DMs go to shard 0)."""
        shard = self.session.shard if self.session is not None else None
        if shard is None:
            return True
        if guild_id is None:
            return shard[0] == 0
        return shard_of(guild_id, shard[1]) == shard[0]


def _ok(body: Any, status: int = 200) -> _Reply:
    return _Reply(status, body)


def _error(status: int, code: int, message: str, errors: list[str] | None = None) -> _Reply:
    body: Payload = {"message": message, "code": code}
    if errors:
        body["errors"] = {"_errors": [{"code": "INVALID_FORM_BODY", "message": e} for e in errors]}
    return _Reply(status, body)


def _snowflake_iso(snowflake: int) -> str:
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def _now_iso() -> str:
    return datetime.now(tz=UTC).isoformat()


def _minimal_user(user_id: int) -> Payload:
    return {"id": str(user_id), "username": f"user{user_id}", "discriminator": "0", "avatar": None, "global_name": None}


def _user_payload(user_id: int, username: str, *, bot: bool = False) -> Payload:
    return {
        "id": str(user_id),
        "username": username,
        "global_name": None if bot else username.title(),
        "discriminator": "0",
        "avatar": None,
        "public_flags": 0,
        "bot": bot,
    }


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _sniff_image(data: bytes) -> tuple[str | None, int | None, int | None]:
    """Content type and size of PNG, GIF, JPEG and WebP data (what Discord reports for image attachments)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data) and data[index] == 0xFF:
            marker = data[index + 1]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                index += 2
                continue
            (length,) = struct.unpack(">H", data[index + 2 : index + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return "image/jpeg", width, height
            index += 2 + length
        return "image/jpeg", None, None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return "image/webp", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return "image/webp", width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return "image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return "image/webp", None, None
    return None, None, None


def _content_type_for(data: bytes, filename: str, declared: str | None) -> tuple[str | None, int | None, int | None]:
    sniffed, width, height = _sniff_image(data)
    if sniffed is not None:
        return sniffed, width, height
    guessed, _ = mimetypes.guess_type(filename)
    if guessed is not None:
        return guessed, None, None
    if declared and declared != "application/octet-stream":
        return declared, None, None
    return None, None, None


def _walk_components(components: Iterable[Any]) -> Iterable[dict[str, Any]]:
    for component in components:
        if not isinstance(component, dict):
            continue
        yield component
        yield from _walk_components(component.get("components") or [])
        for key in ("accessory", "component"):
            child = component.get(key)
            if isinstance(child, dict):
                yield from _walk_components([child])


def _component_errors(components: Any, *, v2: bool) -> list[str]:
    if not isinstance(components, list):
        return ["components must be a list"]
    errors: list[str] = []
    if not v2:
        if len(components) > 5:
            errors.append(f"a message has at most 5 action rows, got {len(components)}")
        for row in components:
            if not isinstance(row, dict) or row.get("type") != 1:
                errors.append("top-level components must be action rows (type 1) unless the message has flag 32768")
    custom_ids: list[str] = []
    total = 0
    for component in _walk_components(components):
        total += 1
        ctype = component.get("type")
        custom_id = component.get("custom_id")
        if custom_id is not None:
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
                errors.append(f"custom_id {custom_id!r} must be a string of 1 to 100 characters")
            else:
                custom_ids.append(custom_id)
        if ctype == 1:
            children = component.get("components") or []
            if not 1 <= len(children) <= 5:
                errors.append(f"an action row holds 1 to 5 components, got {len(children)}")
            if any(isinstance(c, dict) and c.get("type") in _SELECT_TYPES for c in children) and len(children) > 1:
                errors.append("a select menu must be alone in its action row")
        elif ctype == 2:
            style = component.get("style")
            label = component.get("label")
            if style == 5:
                if not component.get("url") or custom_id is not None:
                    errors.append("a link button (style 5) needs a url and no custom_id")
            elif style != 6 and custom_id is None:
                errors.append(f"a button of style {style} needs a custom_id")
            if isinstance(label, str) and len(label) > 80:
                errors.append(f"button label is {len(label)} characters (max 80)")
        elif ctype in _SELECT_TYPES:
            if custom_id is None:
                errors.append("a select menu needs a custom_id")
            options = component.get("options")
            if ctype == 3 and (not isinstance(options, list) or not 1 <= len(options) <= 25):
                errors.append("a string select needs 1 to 25 options")
    if v2 and total > 40:
        errors.append(f"a message has at most 40 components, got {total}")
    duplicates = sorted({c for c in custom_ids if custom_ids.count(c) > 1})
    if duplicates:
        errors.append(f"custom_id values must be unique in a message, repeated: {duplicates}")
    return errors


def _embed_errors(embeds: Any) -> list[str]:
    if not isinstance(embeds, list):
        return ["embeds must be a list"]
    errors: list[str] = []
    if len(embeds) > 10:
        errors.append(f"a message has at most 10 embeds, got {len(embeds)}")
    total = 0
    limits = {"title": 256, "description": 4096}
    for index, embed in enumerate(embeds):
        if not isinstance(embed, dict):
            errors.append(f"embeds[{index}] must be an object")
            continue
        for key, limit in limits.items():
            value = embed.get(key)
            if isinstance(value, str):
                total += len(value)
                if len(value) > limit:
                    errors.append(f"embeds[{index}].{key} is {len(value)} characters (max {limit})")
        fields = embed.get("fields") or []
        if len(fields) > 25:
            errors.append(f"embeds[{index}] has {len(fields)} fields (max 25)")
        for f_index, embed_field in enumerate(fields):
            name = str(embed_field.get("name", ""))
            value = str(embed_field.get("value", ""))
            total += len(name) + len(value)
            if not 1 <= len(name) <= 256:
                errors.append(f"embeds[{index}].fields[{f_index}].name must be 1 to 256 characters")
            if not 1 <= len(value) <= 1024:
                errors.append(f"embeds[{index}].fields[{f_index}].value must be 1 to 1024 characters")
        footer = embed.get("footer") or {}
        footer_text = footer.get("text") if isinstance(footer, dict) else None
        if isinstance(footer_text, str):
            total += len(footer_text)
            if len(footer_text) > 2048:
                errors.append(f"embeds[{index}].footer.text is {len(footer_text)} characters (max 2048)")
        author = embed.get("author") or {}
        author_name = author.get("name") if isinstance(author, dict) else None
        if isinstance(author_name, str):
            total += len(author_name)
            if len(author_name) > 256:
                errors.append(f"embeds[{index}].author.name is {len(author_name)} characters (max 256)")
    if total > 6000:
        errors.append(f"the embeds of a message hold at most 6000 characters, got {total}")
    return errors


def _number_components(components: list[Any]) -> list[dict[str, Any]]:
    """A copy with a numeric ``id`` on every component that has none, as Discord returns them."""
    copied: list[dict[str, Any]] = json.loads(json.dumps(components))
    used = {c["id"] for c in _walk_components(copied) if isinstance(c.get("id"), int)}
    next_id = 1
    for component in _walk_components(copied):
        if "id" not in component:
            while next_id in used:
                next_id += 1
            component["id"] = next_id
            used.add(next_id)
    return copied


# --------------------------------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------------------------------


class FakeDiscord:
    """A fake Discord server for one test (or a few bots started one after another)."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        application_id: int = 1_300_000_000_000_000_001,
        bot_user_id: int = 1_300_000_000_000_000_002,
        guild_id: int = 1_300_000_000_000_000_100,
        channel_ids: tuple[int, int] = (1_300_000_000_000_000_201, 1_300_000_000_000_000_202),
        owner_id: int = 1_300_000_000_000_000_301,
        moderator_id: int = 1_300_000_000_000_000_302,
        member_id: int = 1_300_000_000_000_000_303,
        other_member_id: int = 1_300_000_000_000_000_304,
        moderator_role_id: int = 1_300_000_000_000_000_401,
        bot_role_id: int = 1_300_000_000_000_000_402,
        bot_name: str = "ImagineBot",
        guild_name: str = "Fake Guild",
        channel_upload_limit: int = DEFAULT_UPLOAD_LIMIT,
        privileged_intents: int = 0,
        interaction_deadline: float = 3.0,
        token_lifetime: float = 15 * 60.0,
        heartbeat_interval: int = 41250,
        rate_limits: RateLimits | None = None,
        max_concurrency: int = 1,
        recommended_shards: int | None = None,
    ) -> None:
        self.token = token
        self.application_id = application_id
        self.bot_user_id = bot_user_id
        self.guild_id = guild_id
        self.channel_id, self.second_channel_id = channel_ids
        self.owner_id = owner_id
        self.moderator_id = moderator_id
        self.member_id = member_id
        self.other_member_id = other_member_id
        self.moderator_role_id = moderator_role_id
        self.bot_role_id = bot_role_id
        self.bot_name = bot_name
        self.guild_name = guild_name
        #: Per-file upload limit on channel routes (Discord's default for a server without boosts).
        self.channel_upload_limit = channel_upload_limit
        #: Per-channel overrides of ``channel_upload_limit``.
        self.channel_upload_limits: dict[int, int] = {}
        #: Privileged intents enabled for the application in the "developer portal"; others close with 4014.
        self.privileged_intents = privileged_intents
        self.interaction_deadline = interaction_deadline
        self.token_lifetime = token_lifetime
        self.heartbeat_interval = heartbeat_interval
        #: Users whose DMs are closed to the bot (POST to their DM channel → 403, code 50007).
        self.dm_closed_user_ids: set[int] = set()
        # Sharding (Discord's Gateway page, "Sharding" and "Rate Limiting"; session_start_limit of GET /gateway/bot).
        #: IDENTIFYs allowed per ``identify_window`` seconds, one per rate_limit_key = shard_id % max_concurrency.
        self.max_concurrency = max_concurrency
        self.identify_window = 5.0
        #: The ``shards`` of ``GET /gateway/bot`` (None: one per 1,000 guilds, at least one).
        self.recommended_shards = recommended_shards
        #: A session (a shard, or the whole bot unsharded) holding more guilds than this is closed with 4011.
        self.max_guilds_per_shard = 2500
        self.session_start_total = 1000

        # Observable state.
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.gateway_messages: list[Payload] = []  # every frame a client sent on the gateway
        #: Webhook calls refused because the interaction token expired (Discord's rule, not a violation).
        self.expired_token_calls = 0
        #: Requests or IDENTIFYs with a wrong or missing bot token (answered 401 / closed 4004).
        self.unauthorized_calls = 0
        self.identify_count = 0
        #: IDENTIFYs refused with op 9 because another one with the same rate_limit_key came less than 5 s before.
        self.identify_refusals: list[str] = []
        #: Every dispatch sent: on which shard's session (None: unsharded), which event, for which guild.
        self.dispatched: list[Dispatch] = []
        self.resume_count = 0
        self.ready_count = 0  # READY or RESUMED sent
        #: Every 429 the fake gave (and every Cloudflare ban answer, scope "ban"), in order.
        self.rate_limited: list[RateLimitAnswer] = []
        #: True: a 429 (or the ban) that the test did not force is recorded but is not a violation.
        self.tolerate_rate_limits = False
        self._limiter = RateLimiter(rate_limits or RateLimits())

        # Guild model: the first guild's roles and members are also fake.roles and fake.member_roles.
        self.users: dict[int, Payload] = {}
        self.roles: dict[int, Payload] = {}
        self.member_roles: dict[int, list[int]] = {}
        self.channels: dict[int, Payload] = {}
        self.guilds: dict[int, FakeGuild] = {}
        self._dm_channels: dict[int, int] = {}
        self._build_guild()
        self._next_guild_ms = (guild_id >> 22) + 1  # new guilds get consecutive timestamps: consecutive shards

        # Internals.
        self._ids = _Snowflakes()
        self._by_token: dict[str, FakeInteraction] = {}
        self._cdn: dict[int, UploadedFile] = {}
        self._nonces: dict[tuple[int, str], int] = {}
        self._identified_at: dict[int, float] = {}  # rate_limit_key -> time.monotonic() of its last IDENTIFY
        self._failures: list[_FailureRule] = []
        self._answer_after_handling: dict[int, _Reply] = {}  # id(RecordedRequest) -> a handled=True rule's answer
        self._holds: list[_HoldRule] = []
        self._waiters: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._sessions: dict[str, _Session] = {}
        self._connections: list[_Connection] = []
        self._current: _Connection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._build_routes()

    # ----------------------------------------------------------------------------------------------------------------
    # Lifecycle and addresses
    # ----------------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on 127.0.0.1 at a random free port."""
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        address = self._runner.addresses[0]
        self._port = int(address[1])

    async def stop(self) -> None:
        for conn in list(self._connections):
            if not conn.ws.closed:
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=1001, message=b"fake Discord is stopping")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for _, future in self._waiters:
            if not future.done():
                future.cancel()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return self._port

    @property
    def http_base(self) -> str:
        """``http://127.0.0.1:PORT`` (the CDN lives here too)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.http_base}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ----------------------------------------------------------------------------------------------------------------
    # Guild model
    # ----------------------------------------------------------------------------------------------------------------

    def _build_guild(self) -> None:
        user = _user_payload
        self.users = {
            self.bot_user_id: user(self.bot_user_id, self.bot_name, bot=True),
            self.owner_id: user(self.owner_id, "owner"),
            self.moderator_id: user(self.moderator_id, "moderator"),
            self.member_id: user(self.member_id, "member"),
            self.other_member_id: user(self.other_member_id, "other"),
        }
        self.users[self.bot_user_id].update({"verified": True, "mfa_enabled": False, "flags": 0})
        self.roles = {
            self.guild_id: self._role(self.guild_id, "@everyone", EVERYONE_PERMISSIONS, position=0),
            self.moderator_role_id: self._role(self.moderator_role_id, "Moderator", MODERATOR_PERMISSIONS, position=1),
            self.bot_role_id: self._role(self.bot_role_id, self.bot_name, BOT_ROLE_PERMISSIONS, position=2),
        }
        self.roles[self.bot_role_id].update({"managed": True, "tags": {"bot_id": str(self.bot_user_id)}})
        self.member_roles = {
            self.bot_user_id: [self.bot_role_id],
            self.owner_id: [],
            self.moderator_id: [self.moderator_role_id],
            self.member_id: [],
            self.other_member_id: [],
        }
        for position, (cid, name) in enumerate(((self.channel_id, "general"), (self.second_channel_id, "images"))):
            self.channels[cid] = self._text_channel(cid, self.guild_id, name, position)
        self.guilds[self.guild_id] = FakeGuild(
            id=self.guild_id,
            name=self.guild_name,
            owner_id=self.owner_id,
            bot_role_id=self.bot_role_id,
            roles=self.roles,
            member_roles=self.member_roles,
            channel_ids=[self.channel_id, self.second_channel_id],
        )

    @property
    def guild(self) -> FakeGuild:
        """The fake's first guild (the one the single-guild attributes describe)."""
        return self.guilds[self.guild_id]

    def add_guild(
        self, *, members: int = 2, channels: int = 1, name: str | None = None, guild_id: int | None = None
    ) -> FakeGuild:
        """A new guild with an owner, ``members`` more members, the bot (with its role) and ``channels`` text channels.

        Cheap (a few dicts), so a test can make thousands. Guild ids carry consecutive timestamps, so consecutive
        guilds fall on consecutive shards. Add guilds before the bot connects (the fake sends no GUILD_CREATE for a
        guild added later).
        """
        if guild_id is None:
            guild_id = (self._next_guild_ms << 22) | 0x100
            self._next_guild_ms += 1
        if guild_id in self.guilds:
            raise ValueError(f"guild {guild_id} exists")
        number = len(self.guilds)
        owner_id = guild_id + 1
        bot_role_id = guild_id + 2
        guild = FakeGuild(id=guild_id, name=name or f"Guild {number}", owner_id=owner_id, bot_role_id=bot_role_id)
        guild.roles[guild_id] = self._role(guild_id, "@everyone", EVERYONE_PERMISSIONS, position=0)
        guild.roles[bot_role_id] = self._role(bot_role_id, self.bot_name, BOT_ROLE_PERMISSIONS, position=1)
        guild.roles[bot_role_id].update({"managed": True, "tags": {"bot_id": str(self.bot_user_id)}})
        guild.member_roles[self.bot_user_id] = [bot_role_id]
        self.users[owner_id] = _user_payload(owner_id, f"owner{number}")
        guild.member_roles[owner_id] = []
        for index in range(members):
            member_id = guild_id + 10 + index
            self.users[member_id] = _user_payload(member_id, f"member{number}-{index}")
            guild.member_roles[member_id] = []
        for position in range(channels):
            channel_id = guild_id + 10 + members + position
            self.channels[channel_id] = self._text_channel(channel_id, guild_id, f"channel-{position}", position)
            guild.channel_ids.append(channel_id)
        self.guilds[guild_id] = guild
        return guild

    def add_guilds(self, count: int, *, members: int = 2, channels: int = 1) -> list[FakeGuild]:
        return [self.add_guild(members=members, channels=channels) for _ in range(count)]

    @staticmethod
    def _text_channel(channel_id: int, guild_id: int, name: str, position: int) -> Payload:
        return {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(guild_id),
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "nsfw": False,
            "topic": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "last_message_id": None,
            "flags": 0,
        }

    def guild_of_channel(self, channel_id: int | None) -> FakeGuild | None:
        """The guild a channel belongs to (None for a DM or an unknown channel)."""
        channel = self.channels.get(channel_id) if channel_id is not None else None
        guild_id = _as_int(channel.get("guild_id")) if channel is not None else None
        return self.guilds.get(guild_id) if guild_id is not None else None

    def _guild_or_fail(self, guild_id: int) -> FakeGuild:
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise ValueError(f"the fake has no guild {guild_id} (its guilds: {list(self.guilds)[:5]}...)")
        return guild

    @staticmethod
    def _role(role_id: int, name: str, permissions: int, *, position: int) -> Payload:
        return {
            "id": str(role_id),
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": str(permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def add_member(
        self, user_id: int, username: str, *, role_ids: Iterable[int] = (), guild_id: int | None = None
    ) -> Payload:
        """Add a guild member (before the bot connects, or it will not be in the bot's cache); default: first guild."""
        guild = self._guild_or_fail(self.guild_id if guild_id is None else guild_id)
        self.users[user_id] = _user_payload(user_id, username)
        guild.member_roles[user_id] = list(role_ids)
        return self.users[user_id]

    def set_permission_overwrite(
        self, channel_id: int, target_id: int, *, allow: int = 0, deny: int = 0, member: bool = True
    ) -> None:
        """Set a channel permission overwrite (``member=False`` for a role). Sends CHANNEL_UPDATE if connected."""
        channel = self.channels[channel_id]
        overwrites = [o for o in channel["permission_overwrites"] if int(o["id"]) != target_id]
        overwrites.append({"id": str(target_id), "type": 1 if member else 0, "allow": str(allow), "deny": str(deny)})
        channel["permission_overwrites"] = overwrites
        self._dispatch_nowait("CHANNEL_UPDATE", dict(channel))

    def set_channel_upload_limit(self, channel_id: int, limit: int) -> None:
        self.channel_upload_limits[channel_id] = limit

    def permissions_for(self, user_id: int, channel_id: int | None = None, *, guild_id: int | None = None) -> int:
        """The user's permissions in a guild (the channel's; else ``guild_id``; else the first), or in the channel
        (overwrites applied)."""
        guild = self.guild_of_channel(channel_id) or self.guilds[self.guild_id if guild_id is None else guild_id]
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        role_ids = guild.member_roles.get(user_id, [])
        perms = int(guild.roles[guild.id]["permissions"])
        for role_id in role_ids:
            if role_id in guild.roles:
                perms |= int(guild.roles[role_id]["permissions"])
        if perms & Permissions.ADMINISTRATOR:
            return ALL_PERMISSIONS
        channel = self.channels.get(channel_id) if channel_id is not None else None
        if channel is None or channel.get("type") == 1:
            return perms
        overwrites = {int(o["id"]): o for o in channel.get("permission_overwrites", [])}
        everyone = overwrites.get(guild.id)
        if everyone is not None:
            perms = (perms & ~int(everyone["deny"])) | int(everyone["allow"])
        allow = deny = 0
        for role_id in role_ids:
            overwrite = overwrites.get(role_id)
            if overwrite is not None and overwrite.get("type") == 0:
                allow |= int(overwrite["allow"])
                deny |= int(overwrite["deny"])
        perms = (perms & ~deny) | allow
        mine = overwrites.get(user_id)
        if mine is not None and mine.get("type") == 1:
            perms = (perms & ~int(mine["deny"])) | int(mine["allow"])
        return perms

    def _member_payload(
        self,
        user_id: int,
        *,
        with_user: bool = True,
        permissions: int | None = None,
        guild: FakeGuild | None = None,
    ) -> Payload:
        member_roles = (guild or self.guild).member_roles
        payload: Payload = {
            "roles": [str(r) for r in member_roles.get(user_id, [])],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "communication_disabled_until": None,
        }
        if with_user:
            payload["user"] = dict(self.users[user_id])
        if permissions is not None:
            payload["permissions"] = str(permissions)
        return payload

    def _guild_payload(self, *, full: bool, guild: FakeGuild | None = None) -> Payload:
        guild = guild or self.guild
        payload: Payload = {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 1,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "roles": [dict(r) for r in guild.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": str(guild.channel_id),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "max_members": 500000,
        }
        if full:
            members = [self._member_payload(uid, guild=guild) for uid in guild.member_roles]
            channels = [self.channels[cid] for cid in guild.channel_ids]
            payload.update(
                {
                    "joined_at": "2024-01-01T00:00:00+00:00",
                    "large": False,
                    "unavailable": False,
                    "member_count": len(members),
                    "members": members,
                    "channels": [dict(c) for c in channels],
                    "threads": [],
                    "presences": [],
                    "voice_states": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                }
            )
        return payload

    def _dm_channel(self, user_id: int) -> int:
        existing = self._dm_channels.get(user_id)
        if existing is not None:
            return existing
        cid = self._ids.next()
        self._dm_channels[user_id] = cid
        self.channels[cid] = {
            "id": str(cid),
            "type": 1,
            "recipients": [dict(self.users[user_id])],
            "last_message_id": None,
            "flags": 0,
        }
        return cid

    # ----------------------------------------------------------------------------------------------------------------
    # Waiting (event-driven: every state change calls _notify, which re-checks the pending predicates)
    # ----------------------------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        for entry in list(self._waiters):
            predicate, future = entry
            if future.done():
                continue
            try:
                result = predicate()
            except Exception as exc:
                future.set_exception(exc)
                continue
            if result is not None:
                future.set_result(result)

    async def _wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        result = predicate()
        if result is not None:
            return result
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        entry: tuple[Callable[[], Any], asyncio.Future[Any]] = (predicate, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}.\n{self.describe()}") from None
        finally:
            self._waiters.remove(entry)

    def describe(self, last: int = 12) -> str:
        """A summary of recent activity, for failure messages."""
        lines = [f"last {min(last, len(self.requests))} of {len(self.requests)} requests:"]
        for rec in self.requests[-last:]:
            lines.append(f"  {rec.method} {rec.path} -> {rec.status}")
        lines.append(f"violations: {self.violations or 'none'}")
        live = [m for m in self.messages.values() if not m.deleted][-5:]
        lines.append("recent messages: " + "; ".join(f"{m.id}: {m.content[:40]!r}" for m in live))
        return "\n".join(lines)

    async def wait_until_ready(self, timeout: float = 10, *, after: int | None = None) -> None:
        """Wait until a connected client has been sent READY + GUILD_CREATE (or RESUMED).

        ``after``: a value of :attr:`identify_count` read before starting a new client; then only a client that
        IDENTIFYed later counts (so a bot that is still closing does not satisfy the wait).
        """

        def ready() -> bool | None:
            conn = self._current
            if conn is None or conn.closed or conn.ws.closed or not conn.ready or conn.session is None:
                return None
            if after is not None and conn.session.identify_index <= after:
                return None
            return True

        await self._wait(ready, timeout, "a gateway client to be ready")

    async def wait_until_disconnected(self, timeout: float = 10) -> None:
        """Wait until no client (no shard) is connected and ready."""

        def gone() -> bool | None:
            return None if any(c.live for c in self._connections) else True

        await self._wait(gone, timeout, "every gateway client to disconnect")

    def _shard_connection(self, shard_id: int) -> _Connection:
        live = [c for c in self._connections if c.live and c.session is not None and c.session.shard is not None]
        found = [c for c in live if c.session is not None and c.session.shard and c.session.shard[0] == shard_id]
        if not found:
            raise RuntimeError(f"no ready connection of shard {shard_id}")
        return max(found, key=lambda c: c.ready_index)

    def shards_ready(self) -> dict[int, list[int]]:
        """The shards of the ready connections: ``{shard_count: [shard ids]}`` (unsharded ones under 0)."""
        found: dict[int, list[int]] = {}
        for conn in self._connections:
            if conn.live and conn.session is not None:
                shard = conn.session.shard
                count, shard_id = (shard[1], shard[0]) if shard is not None else (0, 0)
                found.setdefault(count, []).append(shard_id)
        return {count: sorted(ids) for count, ids in found.items()}

    async def wait_for_shards(
        self, shard_ids: Iterable[int], shard_count: int, timeout: float = 15, *, after: int | None = None
    ) -> None:
        """Wait until each of ``shard_ids`` (of ``shard_count``) has a ready connection (IDENTIFYed after
        ``after``, a value of :attr:`identify_count`, if given)."""
        wanted = set(shard_ids)

        def ready() -> bool | None:
            have = set()
            for conn in self._connections:
                session = conn.session
                if not conn.live or session is None or session.shard is None or session.shard[1] != shard_count:
                    continue
                if after is None or session.identify_index > after:
                    have.add(session.shard[0])
            return True if wanted <= have else None

        await self._wait(ready, timeout, f"shards {sorted(wanted)} of {shard_count} to be ready")

    def let_identify_window_pass(self) -> None:
        """Behave as if ``identify_window`` (5 s) had passed since the last IDENTIFY: a bot process restarted in a
        test starts in milliseconds, where a real one takes seconds (compare :meth:`expire_interaction`)."""
        self._identified_at.clear()

    async def wait_for_request(
        self,
        method: str,
        path_regex: str,
        predicate: Callable[[RecordedRequest], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 10,
    ) -> RecordedRequest:
        """The first request at index >= ``since`` whose method and path (``re.search``) match, once answered."""
        pattern = re.compile(path_regex)
        wanted = method.upper()

        def find() -> RecordedRequest | None:
            for rec in self.requests[since:]:
                if rec.status == 0:  # not answered yet
                    continue
                if wanted not in ("*", rec.method) or not pattern.search(rec.path):
                    continue
                if predicate is None or predicate(rec):
                    return rec
            return None

        return await self._wait(find, timeout, f"a request {wanted} {path_regex}")

    async def wait_for_message(self, predicate: Callable[[FakeMessage], bool], timeout: float = 10) -> FakeMessage:
        """The first message (in creation order; deleted ones included) that satisfies ``predicate``, now or later."""

        def find() -> FakeMessage | None:
            for message in self.messages.values():
                if predicate(message):
                    return message
            return None

        return await self._wait(find, timeout, "a message matching the predicate")

    async def wait_for_violation(self, pattern: str = "", timeout: float = 10) -> str:
        compiled = re.compile(pattern)

        def find() -> str | None:
            return next((v for v in self.violations if compiled.search(v)), None)

        return await self._wait(find, timeout, f"a violation matching {pattern!r}")

    # ----------------------------------------------------------------------------------------------------------------
    # Test controls
    # ----------------------------------------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        times: int = 1,
        handled: bool = False,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` instead of handling them (they are recorded).

        With ``handled`` the request is handled first, all its effects included, and only its answer is the failure:
        a proxy that gave up waiting (408) or an edge that failed (502) after Discord had acted on it. ``status``
        `NO_ANSWER` closes the connection without an answer (recorded with status 0).

        A 429 gets the ``Via`` header and a ``{"message", "retry_after", "global": false}`` body unless given, so
        that discord.py retries it (without ``Via`` it takes the 429 for a Cloudflare ban and gives up).
        """
        headers = dict(headers or {})
        if status == 429:
            if body is None:
                body = {}
            if isinstance(body, dict):
                body = {"message": "You are being rate limited.", "retry_after": 0.05, "global": False, **body}
            headers.setdefault("Via", "1.1 google")
            retry_after = body.get("retry_after", 0.05) if isinstance(body, dict) else 0.05
            headers.setdefault("Retry-After", str(max(1, round(float(retry_after)))))
            headers.setdefault("X-RateLimit-Scope", "user")
        elif body is None:
            body = {"message": f"{status}: fake failure", "code": 0}
        self._failures.append(
            _FailureRule(method.upper(), re.compile(path_regex), status, body, headers, times, handled)
        )

    def hold_next(self, method: str, path_regex: str, seconds: float, *, times: int = 1) -> None:
        """Handle the next ``times`` matching requests as usual but send their answers ``seconds`` later (or when the
        fake stops): Discord, or a proxy on the way back, that takes its time to answer."""
        self._holds.append(_HoldRule(method.upper(), re.compile(path_regex), seconds, times))

    # Rate limits (see tests/fakes/discord_rate_limits.py)

    @property
    def rate_limits(self) -> RateLimits:
        """The limits in force; change their fields (or assign new ones) at any time."""
        return self._limiter.limits

    @rate_limits.setter
    def rate_limits(self, limits: RateLimits) -> None:
        self._limiter.limits = limits

    def force_rate_limit(
        self, method: str, path_regex: str, scope: Scope = "user", *, retry_after: float = 0.05, times: int = 1
    ) -> None:
        """Answer the next ``times`` matching requests (of a known route, with a valid token) with a 429 of ``scope``.

        As Discord answers it: the bucket's headers (``user``, ``shared``; ``shared`` keeps the bucket's real
        remaining count) or ``X-RateLimit-Global`` (``global``), ``X-RateLimit-Scope``, ``Retry-After``, ``Via`` and
        ``{"message", "retry_after", "global"}``. Not a violation; counted as invalid unless ``shared``.
        """
        self._limiter.force(method, path_regex, scope, retry_after, times)

    def start_ban(self) -> None:
        """Cloudflare bans the bot from now on (as if it had passed the invalid-request limit); not a violation."""
        self._limiter.ban(time.monotonic(), by_test=True)

    def lift_ban(self) -> None:
        """The ban ends (as it does after about an hour): requests are answered again."""
        self._limiter.lift_ban()

    @property
    def banned_at(self) -> float | None:
        """When the last Cloudflare ban started (time.monotonic()), or None if there was none."""
        return self._limiter.banned_at

    def is_banned(self) -> bool:
        return self._limiter.is_banned(time.monotonic())

    @property
    def invalid_requests(self) -> list[float]:
        """When each invalid answer (401, 403, 429 except scope shared) was given, in order (time.monotonic())."""
        return self._limiter.invalid_at

    def invalid_requests_worst_window(self, per: float | None = None) -> int:
        """The most invalid answers within any window of ``per`` seconds (default: the limit's 10 minutes)."""
        return self._limiter.worst_invalid_window(per)

    def requests_by_route(self) -> dict[str, int]:
        """How many requests each route template received ("PATCH /channels/{channel_id}/messages/{message_id}")."""
        return dict(requests_by_route(self.requests))

    def budget(self, interactions: Iterable[FakeInteraction] | None = None) -> DiscordBudget:
        """A summary of what was spent: requests per interaction by route, 429s by scope, invalid requests."""
        jobs = self.interactions.values() if interactions is None else interactions
        return DiscordBudget.measure([(self, jobs)])

    def expire_interaction(self, interaction: FakeInteraction) -> None:
        """From now on the interaction's token behaves as if 15 minutes had passed."""
        interaction.expired = True

    def delete_message(self, message_id: int) -> None:
        """A moderator deletes the message: later GET/PATCH answer 404 (10008). Sends MESSAGE_DELETE if connected."""
        message = self.messages[message_id]
        message.deleted = True
        self._notify()
        channel = self.channels.get(message.channel_id, {})
        if message.ephemeral:
            return
        data: Payload = {"id": str(message.id), "channel_id": str(message.channel_id)}
        if channel.get("type") == 1:
            self._dispatch_nowait("MESSAGE_DELETE", data, intent=INTENT_DIRECT_MESSAGES)
        else:
            data["guild_id"] = str(channel["guild_id"])
            self._dispatch_nowait("MESSAGE_DELETE", data, intent=INTENT_GUILD_MESSAGES)

    def messages_in(self, channel_id: int) -> list[FakeMessage]:
        """Messages of the channel that are not deleted, in creation order (ephemeral ones included)."""
        return [m for m in self.messages.values() if m.channel_id == channel_id and not m.deleted]

    def add_attachment(
        self,
        filename: str,
        data: bytes,
        content_type: str,
        width: int | None = None,
        height: int | None = None,
    ) -> dict[str, Any]:
        """Register bytes on the fake's CDN, as a user's upload for an attachment option; returns the resolved dict."""
        attachment_id = self._ids.next()
        if width is None or height is None:
            _, sniffed_width, sniffed_height = _sniff_image(data)
            width = sniffed_width if width is None else width
            height = sniffed_height if height is None else height
        name = quote(filename)
        upload = UploadedFile(
            filename=filename,
            content_type=content_type,
            data=data,
            id=attachment_id,
            width=width,
            height=height,
            url=f"{self.http_base}/ephemeral-attachments/{self.application_id}/{attachment_id}/{name}",
            proxy_url=f"{self.http_base}/media/ephemeral-attachments/{self.application_id}/{attachment_id}/{name}",
        )
        self._cdn[attachment_id] = upload
        payload = upload.to_payload()
        payload["width"] = width
        payload["height"] = height
        payload["ephemeral"] = True
        return payload

    def post_user_message(
        self,
        channel_id: int,
        content: str = "",
        *,
        author_id: int | None = None,
        attachments: Iterable[dict[str, Any]] = (),
        embeds: Iterable[dict[str, Any]] = (),
    ) -> FakeMessage:
        """A message posted by a member (e.g. a context-menu target). No gateway event is sent."""
        author = author_id if author_id is not None else self.member_id
        if channel_id not in self.channels:
            raise ValueError(f"unknown channel {channel_id}")
        files: list[UploadedFile] = []
        for item in attachments:
            known = self._cdn.get(int(item["id"]))
            if known is None:
                raise ValueError(f"attachment {item['id']} was not registered with add_attachment()")
            files.append(known)
        message = FakeMessage(
            id=self._ids.next(),
            channel_id=channel_id,
            content=content,
            embeds=[dict(e) for e in embeds],
            attachments=files,
            author_id=author,
            author=dict(self.users.get(author) or _minimal_user(author)),
        )
        self._add_message(message)
        self._notify()
        return message

    async def dispatch_event(self, event: str, data: dict[str, Any]) -> None:
        """Send any gateway dispatch to the connected client (with ``data["guild_id"]``: on that guild's shard)."""
        guild_id = _as_int(data.get("guild_id"))
        conn = self._require_client(guild_id if guild_id is not None else ...)
        await self._send_dispatch(conn, event, data)

    async def request_reconnect(self, timeout: float = 10, *, shard_id: int | None = None) -> None:
        """Send op 7 RECONNECT (to the newest connection, or to shard ``shard_id``'s); returns once the client closed
        that connection (it then RESUMEs on a new one)."""
        conn = self._require_client() if shard_id is None else self._shard_connection(shard_id)
        await self._ws_send(conn, {"op": 7, "d": None})

        def closed() -> bool | None:
            return True if conn.closed else None

        await self._wait(closed, timeout, "the client to close the gateway after op 7")

    # ----------------------------------------------------------------------------------------------------------------
    # Interactions: building and dispatching
    # ----------------------------------------------------------------------------------------------------------------

    async def invoke_slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        guild_id: int | EllipsisType | None = ...,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT,
        subcommand: str | None = None,
        resolved: dict[str, Any] | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A member runs ``/name`` (``subcommand`` as ``"sub"`` or ``"group sub"``) with these option values.

        Option types come from the command the bot synced. Values: str/int/float/bool for the plain types; a user,
        role or channel id (or a user payload dict) for those types; for attachments the dict returned by
        :meth:`add_attachment` (or its id). ``resolved`` entries are added for these automatically. Raises (and
        dispatches nothing) for what a Discord client would not let a user send: unknown command or option, a
        missing required option, a value outside choices or limits, or a command hidden by its permissions.
        """
        gid = self.guild_id if isinstance(guild_id, EllipsisType) else guild_id
        uid = self._default_user(gid) if user_id is None else user_id
        command, command_guild = self._find_command(name, 1, gid)
        perms = self._invoker_permissions(uid, gid, channel_id, permissions)
        self._check_command_visible(command, uid, gid, perms)
        definitions, wrap = self._descend(command, subcommand)
        built, auto_resolved = self._build_options(definitions, options or {}, gid, uid, channel_id, focused=None)
        data: Payload = {"id": command["id"], "name": command["name"], "type": 1}
        if built or wrap is not None:
            data["options"] = wrap(built) if wrap is not None else built
        merged = self._merge_resolved(auto_resolved, resolved)
        if merged:
            data["resolved"] = merged
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        interaction = self._new_interaction(
            INTERACTION_APPLICATION_COMMAND,
            data,
            user_id=uid,
            channel_id=channel_id,
            guild_id=gid,
            permissions=perms,
            attachment_size_limit=attachment_size_limit,
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    async def invoke_autocomplete(
        self,
        name: str,
        options: dict[str, Any],
        focused: str,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        guild_id: int | EllipsisType | None = ...,
        permissions: int | None = None,
        subcommand: str | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A member types in option ``focused`` of ``/name``; ``options`` holds what is filled in so far."""
        gid = self.guild_id if isinstance(guild_id, EllipsisType) else guild_id
        uid = self._default_user(gid) if user_id is None else user_id
        command, command_guild = self._find_command(name, 1, gid)
        perms = self._invoker_permissions(uid, gid, channel_id, permissions)
        self._check_command_visible(command, uid, gid, perms)
        definitions, wrap = self._descend(command, subcommand)
        focused_def = next((d for d in definitions if d.get("name") == focused), None)
        if focused_def is None or not focused_def.get("autocomplete"):
            raise ValueError(f"option {focused!r} of /{name} was not synced with autocomplete=True")
        if focused not in options:
            raise ValueError(f"options must hold the partial value of the focused option {focused!r}")
        built, _ = self._build_options(definitions, options, gid, uid, channel_id, focused=focused)
        data: Payload = {"id": command["id"], "name": command["name"], "type": 1}
        data["options"] = wrap(built) if wrap is not None else built
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        interaction = self._new_interaction(
            INTERACTION_AUTOCOMPLETE,
            data,
            user_id=uid,
            channel_id=channel_id,
            guild_id=gid,
            permissions=perms,
            attachment_size_limit=DEFAULT_UPLOAD_LIMIT,
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    async def invoke_message_command(
        self,
        name: str,
        target: FakeMessage | dict[str, Any],
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        guild_id: int | EllipsisType | None = ...,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A member uses the message context menu ``name`` on ``target``."""
        gid = self.guild_id if isinstance(guild_id, EllipsisType) else guild_id
        uid = self._default_user(gid) if user_id is None else user_id
        command, command_guild = self._find_command(name, 3, gid)
        if isinstance(target, FakeMessage):
            if target.deleted:
                raise ValueError(f"message {target.id} is deleted")
            message_payload = target.to_payload()
            channel = target.channel_id if channel_id is None else channel_id
        else:
            message_payload = dict(target)
            channel = int(message_payload["channel_id"]) if channel_id is None else channel_id
        perms = self._invoker_permissions(uid, gid, channel, permissions)
        self._check_command_visible(command, uid, gid, perms)
        target_id = str(message_payload["id"])
        data: Payload = {
            "id": command["id"],
            "name": command["name"],
            "type": 3,
            "target_id": target_id,
            "resolved": {"messages": {target_id: message_payload}},
        }
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        interaction = self._new_interaction(
            INTERACTION_APPLICATION_COMMAND,
            data,
            user_id=uid,
            channel_id=channel,
            guild_id=gid,
            permissions=perms,
            attachment_size_limit=attachment_size_limit,
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    async def invoke_user_command(
        self,
        name: str,
        target_user_id: int,
        *,
        user_id: int | None = None,
        channel_id: int | None = None,
        guild_id: int | EllipsisType | None = ...,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A member uses the user context menu ``name`` on ``target_user_id``."""
        gid = self.guild_id if isinstance(guild_id, EllipsisType) else guild_id
        uid = self._default_user(gid) if user_id is None else user_id
        command, command_guild = self._find_command(name, 2, gid)
        perms = self._invoker_permissions(uid, gid, channel_id, permissions)
        self._check_command_visible(command, uid, gid, perms)
        resolved: Payload = {}
        self._resolve_user(target_user_id, resolved, gid, channel_id)
        data: Payload = {
            "id": command["id"],
            "name": command["name"],
            "type": 2,
            "target_id": str(target_user_id),
            "resolved": resolved,
        }
        if command_guild is not None:
            data["guild_id"] = str(command_guild)
        interaction = self._new_interaction(
            INTERACTION_APPLICATION_COMMAND,
            data,
            user_id=uid,
            channel_id=channel_id,
            guild_id=gid,
            permissions=perms,
            attachment_size_limit=attachment_size_limit,
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    async def invoke_component(
        self,
        message_id: int,
        custom_id: str,
        *,
        user_id: int | None = None,
        component_type: int = 2,
        values: list[str] | None = None,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT,
        resolved: dict[str, Any] | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A member clicks the button (or picks ``values`` in the select menu) ``custom_id`` on a stored message.

        Raises if the message does not exist, is deleted, has no such enabled component, or is an ephemeral message
        of another user: a Discord client would not let anyone click it.
        """
        message = self.messages.get(message_id)
        if message is None or message.deleted:
            raise ValueError(f"message {message_id} does not exist (or is deleted)")
        message_guild = self.guild_of_channel(message.channel_id)
        uid = self._default_user(message_guild.id if message_guild else None) if user_id is None else user_id
        component = next((c for c in _walk_components(message.components) if c.get("custom_id") == custom_id), None)
        if component is None:
            present = [c.get("custom_id") for c in _walk_components(message.components) if c.get("custom_id")]
            raise ValueError(f"message {message_id} has no component {custom_id!r} (it has {present})")
        if component.get("type") != component_type:
            raise ValueError(f"component {custom_id!r} has type {component.get('type')}, not {component_type}")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        if message.ephemeral and message.interaction_metadata is not None:
            owner = int(message.interaction_metadata["user"]["id"])
            if owner != uid:
                raise ValueError(f"message {message_id} is ephemeral and only user {owner} can see it")
        data: Payload = {"custom_id": custom_id, "component_type": component_type}
        if isinstance(component.get("id"), int):
            data["id"] = component["id"]
        if component_type in _SELECT_TYPES:
            chosen = list(values or [])
            low, high = component.get("min_values", 1), component.get("max_values", 1)
            if not low <= len(chosen) <= high:
                raise ValueError(f"select {custom_id!r} takes {low} to {high} values, got {len(chosen)}")
            if component_type == 3:
                allowed = {o.get("value") for o in component.get("options", [])}
                unknown = [v for v in chosen if v not in allowed]
                if unknown:
                    raise ValueError(f"select {custom_id!r} has no options {unknown}")
            data["values"] = chosen
            if resolved:
                data["resolved"] = resolved
        elif values:
            raise ValueError("values are for select menus only")
        guild = self.guild_of_channel(message.channel_id)
        gid = guild.id if guild is not None else None
        perms = self._invoker_permissions(uid, gid, message.channel_id, permissions)
        interaction = self._new_interaction(
            INTERACTION_COMPONENT,
            data,
            user_id=uid,
            channel_id=message.channel_id,
            guild_id=gid,
            permissions=perms,
            attachment_size_limit=attachment_size_limit,
            message=message.to_payload(),
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    async def submit_modal(
        self,
        custom_id: str,
        values: Mapping[str, str | list[str]],
        *,
        user_id: int | None = None,
        message_id: int | None = None,
        permissions: int | None = None,
        attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """The user submits the modal ``custom_id`` that the bot opened (type-9 callback) with these field values.

        ``values`` maps a text input's custom_id to its text (a select's to a list). Fields left out keep their
        pre-filled value. Raises if the bot never opened such a modal, or if a Discord client would refuse the
        input (a required field empty, a length outside min/max, an unknown field).
        """
        opener = next(
            (
                i
                for i in reversed(self.interactions.values())
                if i.modal is not None and i.modal.get("custom_id") == custom_id
            ),
            None,
        )
        if opener is None or opener.modal is None:
            raise ValueError(f"the bot never opened a modal with custom_id {custom_id!r}")
        modal = opener.modal
        uid = opener.user_id if user_id is None else user_id
        known: set[str] = set()
        submitted: list[dict[str, Any]] = []
        for top in modal.get("components", []):
            submitted.append(self._modal_submission(top, values, known))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"modal {custom_id!r} has no fields {unknown}")
        data: Payload = {"custom_id": custom_id, "components": submitted}
        message_payload: Payload | None = None
        if message_id is not None:
            message_payload = self.messages[message_id].to_payload()
        elif opener.type == INTERACTION_COMPONENT and "message" in opener.payload:
            current = self.messages.get(int(opener.payload["message"]["id"]))
            message_payload = current.to_payload() if current is not None else opener.payload["message"]
        perms = self._invoker_permissions(uid, opener.guild_id, opener.channel_id, permissions)
        interaction = self._new_interaction(
            INTERACTION_MODAL_SUBMIT,
            data,
            user_id=uid,
            channel_id=opener.channel_id,
            guild_id=opener.guild_id,
            permissions=perms,
            attachment_size_limit=attachment_size_limit,
            message=message_payload,
            locale=locale,
        )
        return await self._dispatch_interaction(interaction)

    def _modal_submission(
        self, component: dict[str, Any], values: Mapping[str, str | list[str]], known: set[str]
    ) -> dict[str, Any]:
        ctype = component.get("type")
        out: Payload = {"type": ctype}
        if "id" in component:
            out["id"] = component["id"]
        if ctype == 1:
            out["components"] = [self._modal_submission(c, values, known) for c in component.get("components", [])]
        elif ctype == 18:
            out["component"] = self._modal_submission(component["component"], values, known)
        elif ctype == 4:
            cid = component["custom_id"]
            known.add(cid)
            raw = values.get(cid, component.get("value") or "")
            if not isinstance(raw, str):
                raise ValueError(f"text input {cid!r} takes a string")
            if component.get("required", True) and not raw:
                raise ValueError(f"text input {cid!r} is required")
            low, high = component.get("min_length", 0), component.get("max_length", 4000)
            if raw and not low <= len(raw) <= high:
                raise ValueError(f"text input {cid!r} takes {low} to {high} characters, got {len(raw)}")
            out["custom_id"] = cid
            out["value"] = raw
        elif ctype in _SELECT_TYPES:
            cid = component["custom_id"]
            known.add(cid)
            chosen = values.get(cid, [])
            out["custom_id"] = cid
            out["values"] = [chosen] if isinstance(chosen, str) else list(chosen)
        return out

    def _default_user(self, guild_id: int | None) -> int:
        """Who invokes when the test does not say: ``member_id`` in the first guild (and in DMs), else the first
        member of the guild who is neither the bot nor the owner (the owner if there is none)."""
        if guild_id is None or guild_id == self.guild_id:
            return self.member_id
        guild = self._guild_or_fail(guild_id)
        plain = [uid for uid in guild.member_roles if uid not in (self.bot_user_id, guild.owner_id)]
        return plain[0] if plain else guild.owner_id

    def _find_command(self, name: str, ctype: int, guild_id: int | None) -> tuple[dict[str, Any], int | None]:
        scopes: list[int | None] = [guild_id, None] if guild_id is not None else [None]
        for scope in scopes:
            for command in self.commands.get(scope, []):
                if command.get("name") == name and command.get("type", 1) == ctype:
                    return command, scope
        synced = {scope: [c.get("name") for c in cmds] for scope, cmds in self.commands.items()}
        kind = {1: "slash command", 2: "user command", 3: "message command"}[ctype]
        raise LookupError(f"{kind} {name!r} was not synced for guild {guild_id} or globally (synced: {synced})")

    def _invoker_permissions(
        self, user_id: int, guild_id: int | None, channel_id: int | None, override: int | None
    ) -> int:
        if user_id not in self.users:
            raise ValueError(f"unknown user {user_id}; add it with add_member()")
        if override is not None:
            return override
        if guild_id is None:
            return EVERYONE_PERMISSIONS
        guild = self._guild_or_fail(guild_id)
        return self.permissions_for(user_id, channel_id if channel_id is not None else guild.channel_id)

    def _check_command_visible(
        self, command: dict[str, Any], user_id: int, guild_id: int | None, permissions: int
    ) -> None:
        contexts = command.get("contexts")
        context = 0 if guild_id is not None else 1
        if contexts is not None and context not in contexts:
            where = "in a server" if guild_id is not None else "in DMs"
            raise PermissionError(f"/{command['name']} is not available {where} (contexts={contexts})")
        if guild_id is None and command.get("guild_id") is not None:
            raise PermissionError(f"/{command['name']} is a guild command and cannot be used in DMs")
        required = command.get("default_member_permissions")
        if guild_id is None or required is None or permissions & Permissions.ADMINISTRATOR:
            return
        needed = int(required)
        if permissions & needed != needed or needed == 0:
            raise PermissionError(
                f"user {user_id} has permissions {permissions}, /{command['name']} needs {needed}: "
                "Discord would not show the command to them"
            )

    @staticmethod
    def _descend(
        command: dict[str, Any], subcommand: str | None
    ) -> tuple[list[dict[str, Any]], Callable[[list[Payload]], list[Payload]] | None]:
        definitions: list[dict[str, Any]] = command.get("options") or []
        if subcommand is None:
            if any(d.get("type") in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP) for d in definitions):
                names = [d.get("name") for d in definitions]
                raise ValueError(f"/{command['name']} needs a subcommand, one of {names}")
            return definitions, None
        path: list[tuple[str, int]] = []
        for part in subcommand.split():
            match = next(
                (
                    d
                    for d in definitions
                    if d.get("name") == part and d.get("type") in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP)
                ),
                None,
            )
            if match is None:
                raise ValueError(f"/{command['name']} has no subcommand {subcommand!r}")
            path.append((part, int(match["type"])))
            definitions = match.get("options") or []
        if not path or path[-1][1] != OPT_SUB_COMMAND:
            raise ValueError(f"{subcommand!r} is a subcommand group; name the subcommand too")

        def wrap(options: list[Payload]) -> list[Payload]:
            wrapped: list[Payload] = options
            for name, option_type in reversed(path):
                wrapped = [{"type": option_type, "name": name, "options": wrapped}]
            return wrapped

        return definitions, wrap

    def _build_options(
        self,
        definitions: list[dict[str, Any]],
        values: dict[str, Any],
        guild_id: int | None,
        user_id: int,
        channel_id: int | None,
        *,
        focused: str | None,
    ) -> tuple[list[Payload], Payload]:
        by_name = {d.get("name"): d for d in definitions}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise ValueError(f"unknown options {unknown}; the synced command has {sorted(map(str, by_name))}")
        built: list[Payload] = []
        resolved: Payload = {}
        for definition in definitions:
            name = definition["name"]
            option_type = int(definition["type"])
            if name not in values:
                if definition.get("required") and focused is None:
                    raise ValueError(f"option {name!r} is required")
                continue
            value = values[name]
            if focused is not None:
                if name == focused:
                    built.append({"type": option_type, "name": name, "value": str(value), "focused": True})
                else:
                    built.append({"type": option_type, "name": name, "value": self._plain_value(definition, value)})
                continue
            built.append(
                {"type": option_type, "name": name, "value": self._option_value(definition, value, resolved, guild_id)}
            )
        return built, resolved

    @staticmethod
    def _plain_value(definition: dict[str, Any], value: Any) -> Any:
        if isinstance(value, dict) and "id" in value:
            return str(value["id"])
        if definition["type"] in (OPT_USER, OPT_CHANNEL, OPT_ROLE, OPT_MENTIONABLE, OPT_ATTACHMENT):
            return str(value)
        return value

    def _option_value(self, definition: dict[str, Any], value: Any, resolved: Payload, guild_id: int | None) -> Any:
        name = definition["name"]
        option_type = definition["type"]
        choices = definition.get("choices")
        if option_type == OPT_STRING:
            if not isinstance(value, str):
                raise TypeError(f"option {name!r} is a string option, got {value!r}")
            low, high = definition.get("min_length", 0), definition.get("max_length", 6000)
            if not low <= len(value) <= high:
                raise ValueError(f"option {name!r} takes {low} to {high} characters, got {len(value)}")
        elif option_type in (OPT_INTEGER, OPT_NUMBER):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"option {name!r} is a number option, got {value!r}")
            if option_type == OPT_INTEGER and not isinstance(value, int):
                raise TypeError(f"option {name!r} is an integer option, got {value!r}")
            low, high = definition.get("min_value"), definition.get("max_value")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"option {name!r} takes {low} to {high}, got {value}")
        elif option_type == OPT_BOOLEAN:
            if not isinstance(value, bool):
                raise TypeError(f"option {name!r} is a boolean option, got {value!r}")
        elif option_type == OPT_USER:
            return self._resolve_user(value, resolved, guild_id, None)
        elif option_type == OPT_ROLE:
            return self._resolve_role(value, resolved, guild_id)
        elif option_type == OPT_MENTIONABLE:
            role_id = _as_int(value)
            if role_id is not None and role_id in self._guild_roles(guild_id):
                return self._resolve_role(value, resolved, guild_id)
            return self._resolve_user(value, resolved, guild_id, None)
        elif option_type == OPT_CHANNEL:
            channel_id = _as_int(value.get("id") if isinstance(value, dict) else value)
            channel = self.channels.get(channel_id) if channel_id is not None else None
            if channel is None or channel_id is None:
                raise ValueError(f"option {name!r}: unknown channel {value!r}")
            allowed_types = definition.get("channel_types")
            if allowed_types and channel["type"] not in allowed_types:
                raise ValueError(f"option {name!r} takes channel types {allowed_types}, got {channel['type']}")
            keys = ("id", "type", "name", "parent_id", "nsfw", "topic")
            entry: Payload = {k: channel[k] for k in keys if k in channel}
            entry["permissions"] = str(ALL_PERMISSIONS)
            resolved.setdefault("channels", {})[str(channel_id)] = entry
            return str(channel_id)
        elif option_type == OPT_ATTACHMENT:
            if isinstance(value, dict):
                attachment = dict(value)
            else:
                attachment_id = _as_int(value)
                known = self._cdn.get(attachment_id) if attachment_id is not None else None
                if known is None:
                    raise ValueError(f"option {name!r}: attachment {value!r} was not registered with add_attachment()")
                attachment = known.to_payload()
            resolved.setdefault("attachments", {})[str(attachment["id"])] = attachment
            return str(attachment["id"])
        else:
            raise ValueError(f"option {name!r} has unsupported type {option_type}")
        if choices is not None and value not in [c.get("value") for c in choices]:
            raise ValueError(f"option {name!r} takes one of {[c.get('value') for c in choices]}, got {value!r}")
        return value

    def _resolve_user(self, value: Any, resolved: Payload, guild_id: int | None, channel_id: int | None) -> str:
        if isinstance(value, dict):
            user = dict(value)
            user_id = int(user["id"])
        else:
            parsed = _as_int(value)
            if parsed is None or parsed not in self.users:
                raise ValueError(f"unknown user {value!r}; add it with add_member()")
            user_id = parsed
            user = dict(self.users[user_id])
        resolved.setdefault("users", {})[str(user_id)] = user
        guild = self.guilds.get(guild_id) if guild_id is not None else None
        if guild is not None and user_id in guild.member_roles:
            permissions = self.permissions_for(user_id, channel_id or guild.channel_id)
            member = self._member_payload(user_id, with_user=False, permissions=permissions, guild=guild)
            resolved.setdefault("members", {})[str(user_id)] = member
        return str(user_id)

    def _guild_roles(self, guild_id: int | None) -> dict[int, Payload]:
        guild = self.guilds.get(guild_id) if guild_id is not None else None
        return guild.roles if guild is not None else {}

    def _resolve_role(self, value: Any, resolved: Payload, guild_id: int | None) -> str:
        role_id = _as_int(value.get("id") if isinstance(value, dict) else value)
        roles = self._guild_roles(guild_id)
        if role_id is None or role_id not in roles:
            raise ValueError(f"unknown role {value!r}")
        resolved.setdefault("roles", {})[str(role_id)] = dict(roles[role_id])
        return str(role_id)

    @staticmethod
    def _merge_resolved(automatic: Payload, extra: dict[str, Any] | None) -> Payload:
        merged: Payload = {key: dict(value) for key, value in automatic.items()}
        for key, value in (extra or {}).items():
            merged.setdefault(key, {}).update(value)
        return merged

    def _new_interaction(
        self,
        interaction_type: int,
        data: Payload,
        *,
        user_id: int,
        channel_id: int | None,
        guild_id: int | None,
        permissions: int,
        attachment_size_limit: int,
        message: Payload | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        interaction_id = self._ids.next()
        token = f"fake-interaction-{secrets.token_urlsafe(48)}"
        user = dict(self.users[user_id])
        payload: Payload = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": interaction_type,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": attachment_size_limit,
        }
        if guild_id is not None:
            guild = self._guild_or_fail(guild_id)
            if user_id not in guild.member_roles:
                raise ValueError(f"user {user_id} is not a member of guild {guild_id}")
            cid = guild.channel_id if channel_id is None else channel_id
            channel = self.channels.get(cid)
            if channel is None or channel.get("type") == 1 or channel.get("guild_id") != str(guild_id):
                raise ValueError(f"{cid} is not a text channel of guild {guild_id}")
            payload.update(
                {
                    "guild_id": str(guild_id),
                    "guild": {"id": str(guild_id), "locale": "en-US", "features": []},
                    "guild_locale": "en-US",
                    "channel_id": str(cid),
                    "channel": dict(channel),
                    "member": self._member_payload(user_id, permissions=permissions, guild=guild),
                    "app_permissions": str(self.permissions_for(self.bot_user_id, cid)),
                    "context": 0,
                    "authorizing_integration_owners": {"0": str(guild_id)},
                }
            )
        else:
            cid = self._dm_channel(user_id) if channel_id is None else channel_id
            payload.update(
                {
                    "channel_id": str(cid),
                    "channel": dict(self.channels[cid]),
                    "user": user,
                    "app_permissions": str(EVERYONE_PERMISSIONS),
                    "context": 1,
                    "authorizing_integration_owners": {"0": str(user_id)},
                }
            )
        if message is not None:
            payload["message"] = message
        return FakeInteraction(
            self,
            id=interaction_id,
            token=token,
            type=interaction_type,
            payload=payload,
            user_id=user_id,
            channel_id=cid,
            guild_id=guild_id,
            attachment_size_limit=attachment_size_limit,
        )

    async def _dispatch_interaction(self, interaction: FakeInteraction) -> FakeInteraction:
        conn = self._require_client(interaction.guild_id)
        self.interactions[interaction.id] = interaction
        self._by_token[interaction.token] = interaction
        interaction.created_at = time.monotonic()
        await self._send_dispatch(conn, "INTERACTION_CREATE", interaction.payload)
        return interaction

    # ----------------------------------------------------------------------------------------------------------------
    # HTTP plumbing
    # ----------------------------------------------------------------------------------------------------------------

    def _violate(self, sentence: str) -> None:
        _log.warning("Discord rule broken: %s", sentence)
        self.violations.append(sentence)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket" and request.path.rstrip("/") in ("", "/gateway"):
            return await self._gateway_handler(request)
        at = time.monotonic()
        path = request.path
        is_api = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        relative = path[len(API_PREFIX) :] if is_api else path
        body, files, body_error = await self._read_body(request)
        rec = RecordedRequest(
            method=request.method,
            path=relative,
            query=dict(request.query),
            json=body,
            files=files,
            headers=dict(request.headers),
            at=at,
        )
        self.requests.append(rec)
        try:
            reply = self._route(rec, is_api=is_api, body_error=body_error)
        except Exception as exc:  # a bug in the fake must fail the test, not look like Discord
            _log.exception("fake Discord crashed on %s %s", rec.method, rec.path)
            self._violate(f"the fake crashed handling {rec.method} {rec.path}: {exc!r} (a bug in the fake)")
            reply = _error(400, 0, f"fake crashed: {exc!r}")
        failure = self._answer_after_handling.pop(id(rec), None)
        if failure is not None:
            reply = failure
        if rec.injected:
            self._note_callback_failure(rec)
        rec.status = reply.status
        rec.response = None if isinstance(reply.body, bytes) else reply.body
        if is_api:
            self._account(rec, reply)
            if reply.rate_limit is None or reply.rate_limit[0] != BAN_SCOPE:
                reply.headers.setdefault("Via", VIA)
        self._notify()
        await self._hold(rec)
        if reply.status == NO_ANSWER and request.transport is not None:
            request.transport.abort()  # the connection is lost before an answer; the bot reads no status
        return self._to_web(reply)

    def _account(self, rec: RecordedRequest, reply: _Reply) -> None:
        """Record a 429, count an invalid answer, and start the Cloudflare ban when the threshold is reached."""
        if reply.rate_limit is None and reply.status == 429:  # a fail_next() rule without the details
            scope = reply.headers.get("X-RateLimit-Scope", "user")
            retry_after = reply.body.get("retry_after") if isinstance(reply.body, dict) else None
            reply.rate_limit = (scope, retry_after, True, "fail_next()")
        if reply.rate_limit is not None:
            scope, retry_after, forced, exceeded = reply.rate_limit
            self.rate_limited.append(
                RateLimitAnswer(rec.at, rec.method, rec.path, rec.route, scope, retry_after, forced)
            )
            if not forced and scope != BAN_SCOPE and not self.tolerate_rate_limits:
                self._violate(
                    f"{rec.method} {rec.path}: over {exceeded}: answered 429 (scope {scope}, retry after "
                    f"{retry_after:.3f} s)"
                )
            if scope == BAN_SCOPE:
                return  # the ban's own answers are not counted again
        if reply.status in (401, 403) or (reply.status == 429 and reply.headers.get("X-RateLimit-Scope") != "shared"):
            limits = self.rate_limits.invalid_requests
            if self._limiter.count_invalid(time.monotonic()) and not self.tolerate_rate_limits:
                self._violate(
                    f"{limits.requests} invalid requests (401, 403, 429) within {limits.per:g} s: Cloudflare bans "
                    f"the bot for {self.rate_limits.ban_seconds:g} s, every request is answered 429 without Via"
                )

    @staticmethod
    def _to_web(reply: _Reply) -> web.Response:
        headers = dict(reply.headers)
        if reply.body is None:
            return web.Response(status=reply.status, headers=headers)
        if isinstance(reply.body, bytes):
            headers["Content-Type"] = reply.content_type
            return web.Response(status=reply.status, body=reply.body, headers=headers)
        headers["Content-Type"] = JSON_CONTENT_TYPE  # exactly: discord.py compares the header to this string
        return web.Response(status=reply.status, body=json.dumps(reply.body).encode(), headers=headers)

    async def _read_body(self, request: web.Request) -> tuple[Any, list[UploadedFile], str | None]:
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            payload: Any = None
            files: list[UploadedFile] = []
            error: str | None = None
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    error = "nested multipart bodies are not supported"
                    continue
                raw = bytes(await part.read(decode=False))
                name = part.name or ""
                if name == "payload_json":
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        error = "payload_json is not valid JSON"
                    continue
                match = re.fullmatch(r"files\[(\d+)\]", name)
                if match is None:
                    error = f"multipart part {name!r} is neither payload_json nor files[N]"
                    continue
                files.append(
                    UploadedFile(
                        filename=part.filename or "",
                        content_type=part.headers.get("Content-Type"),
                        data=raw,
                        id=int(match.group(1)),
                    )
                )
            return payload, files, error
        raw_body = await request.read()
        if not raw_body:
            return None, [], None
        try:
            return json.loads(raw_body), [], None
        except ValueError:
            return None, [], "the body is not valid JSON"

    def _ban_reply(self) -> _Reply:
        # Cloudflare's static page: no Via, no rate-limit headers, no Retry-After, not JSON (discord.py raises).
        reply = _Reply(429, b"error code: 1015", content_type="text/plain; charset=UTF-8")
        reply.rate_limit = (BAN_SCOPE, None, self._limiter.banned_by_test, "the invalid-request limit")
        return reply

    def _take_failure(self, rec: RecordedRequest) -> _Reply | None:
        rule = _take_rule(self._failures, rec)
        if rule is None:
            return None
        rec.injected = True
        reply = _Reply(rule.status, rule.body, dict(rule.headers))
        if rule.handled:
            self._answer_after_handling[id(rec)] = reply
            return None
        return reply

    async def _hold(self, rec: RecordedRequest) -> None:
        rule = _take_rule(self._holds, rec)
        if rule is None:
            return
        sleeper = asyncio.ensure_future(asyncio.sleep(rule.seconds))
        self._tasks.add(sleeper)  # cancelled when the fake stops
        sleeper.add_done_callback(self._tasks.discard)
        await asyncio.wait([sleeper])  # returns when it ends, cancelled or not

    def _note_callback_failure(self, rec: RecordedRequest) -> None:
        match = re.match(r"^/interactions/\d+/(?P<token>[^/]+)/callback$", rec.path)
        interaction = self._by_token.get(match["token"]) if match else None
        if interaction is not None:
            interaction.told_callback_failed = True

    def _build_routes(self) -> list[_Route]:
        snowflake = r"(?P<{}>\d+)"
        app = snowflake.format("app")
        guild = snowflake.format("guild")
        channel = snowflake.format("channel")
        message = snowflake.format("message")
        user = snowflake.format("user")
        token = r"(?P<token>[^/]+)"
        webhook_message = r"(?P<message>\d+|@original)"
        commands = "/applications/{application_id}/commands"
        guild_commands = "/applications/{application_id}/guilds/{guild_id}/commands"
        webhook = "/webhooks/{application_id}/{interaction_token}"
        messages = "/channels/{channel_id}/messages"
        Handler = Callable[[RecordedRequest, re.Match[str]], _Reply]
        # (method, path pattern, route template, bot token, limit kind, handler)
        table: list[tuple[str, str, str, bool, str, Handler]] = [
            ("GET", r"/users/@me", "/users/@me", True, OTHER, self._r_get_me),
            ("POST", r"/users/@me/channels", "/users/@me/channels", True, OTHER, self._r_create_dm),
            ("GET", rf"/users/{user}", "/users/{user_id}", True, OTHER, self._r_get_user),
            ("GET", r"/oauth2/applications/@me", "/oauth2/applications/@me", True, OTHER, self._r_application),
            ("GET", r"/applications/@me", "/applications/@me", True, OTHER, self._r_application),
            ("GET", r"/gateway", "/gateway", False, OTHER, self._r_gateway),
            ("GET", r"/gateway/bot", "/gateway/bot", True, OTHER, self._r_gateway_bot),
            ("GET", rf"/applications/{app}/commands", commands, True, OTHER, self._r_get_commands),
            ("PUT", rf"/applications/{app}/commands", commands, True, OTHER, self._r_put_commands),
            ("GET", rf"/applications/{app}/guilds/{guild}/commands", guild_commands, True, OTHER, self._r_get_commands),
            ("PUT", rf"/applications/{app}/guilds/{guild}/commands", guild_commands, True, OTHER, self._r_put_commands),
            (
                "POST",
                rf"/interactions/(?P<interaction>\d+)/{token}/callback",
                "/interactions/{interaction_id}/{interaction_token}/callback",
                False,
                OTHER,
                self._r_callback,
            ),
            ("POST", rf"/webhooks/{app}/{token}", webhook, False, INTERACTION_WEBHOOK, self._r_followup),
            (
                "GET",
                rf"/webhooks/{app}/{token}/messages/{webhook_message}",
                webhook + "/messages/{message_id}",
                False,
                INTERACTION_WEBHOOK,
                self._r_webhook_get,
            ),
            (
                "PATCH",
                rf"/webhooks/{app}/{token}/messages/{webhook_message}",
                webhook + "/messages/{message_id}",
                False,
                INTERACTION_WEBHOOK,
                self._r_webhook_edit,
            ),
            (
                "DELETE",
                rf"/webhooks/{app}/{token}/messages/{webhook_message}",
                webhook + "/messages/{message_id}",
                False,
                INTERACTION_WEBHOOK,
                self._r_webhook_delete,
            ),
            ("GET", rf"/channels/{channel}", "/channels/{channel_id}", True, OTHER, self._r_get_channel),
            ("POST", rf"/channels/{channel}/typing", "/channels/{channel_id}/typing", True, OTHER, self._r_typing),
            ("GET", rf"/channels/{channel}/messages", messages, True, OTHER, self._r_history),
            ("POST", rf"/channels/{channel}/messages", messages, True, MESSAGE_CREATE, self._r_channel_post),
            (
                "GET",
                rf"/channels/{channel}/messages/{message}",
                messages + "/{message_id}",
                True,
                OTHER,
                self._r_channel_get,
            ),
            (
                "PATCH",
                rf"/channels/{channel}/messages/{message}",
                messages + "/{message_id}",
                True,
                MESSAGE_EDIT,
                self._r_channel_edit,
            ),
            (
                "DELETE",
                rf"/channels/{channel}/messages/{message}",
                messages + "/{message_id}",
                True,
                OTHER,
                self._r_channel_delete,
            ),
            ("GET", rf"/guilds/{guild}", "/guilds/{guild_id}", True, OTHER, self._r_get_guild),
            ("GET", rf"/guilds/{guild}/channels", "/guilds/{guild_id}/channels", True, OTHER, self._r_guild_channels),
            ("GET", rf"/guilds/{guild}/roles", "/guilds/{guild_id}/roles", True, OTHER, self._r_guild_roles),
            (
                "GET",
                rf"/guilds/{guild}/members/{user}",
                "/guilds/{guild_id}/members/{user_id}",
                True,
                OTHER,
                self._r_guild_member,
            ),
        ]
        return [
            _Route(method, re.compile(pattern + r"/?"), f"{method} {template}", auth, kind, handler)
            for method, pattern, template, auth, kind, handler in table
        ]

    def _match_route(self, rec: RecordedRequest) -> tuple[_Route, re.Match[str]] | None:
        for route in self._routes:
            match = route.pattern.fullmatch(rec.path)
            if match is not None and route.method == rec.method:
                rec.route = route.template
                groups = match.groupdict()
                if groups.get("interaction") is not None:
                    rec.interaction_id = int(groups["interaction"])
                elif groups.get("token") is not None:
                    known = self._by_token.get(groups["token"])
                    rec.interaction_id = known.id if known is not None else None
                return route, match
        return None

    @staticmethod
    def _bucket_of(route: _Route, match: re.Match[str]) -> tuple[str, str]:
        """The bucket's name (shared by the routes of one bucket) and the request's top-level resource."""
        groups = match.groupdict()
        if route.kind == INTERACTION_WEBHOOK:
            return "interaction webhook", f"{groups['app']}+{groups['token']}"
        if groups.get("interaction") is not None:
            return route.template, f"{groups['interaction']}+{groups['token']}"
        major = groups.get("channel") or groups.get("guild") or ""
        return route.template, major

    def _route(self, rec: RecordedRequest, *, is_api: bool, body_error: str | None) -> _Reply:
        if is_api and self._limiter.is_banned(time.monotonic()):
            return self._ban_reply()
        found = self._match_route(rec) if is_api else None
        injected = self._take_failure(rec)
        if injected is not None:
            return injected
        if not is_api:
            return self._r_cdn(rec)
        if body_error is not None:
            self._violate(f"{rec.method} {rec.path}: {body_error}")
            return _error(400, 50109, "The request body contains invalid JSON.")
        if found is None:
            self._violate(f"{rec.method} {rec.path} is not a route the fake knows (unknown route): answered 404")
            return _error(404, 0, "404: Not Found")
        route, match = found
        if route.auth and rec.headers.get("Authorization") != f"Bot {self.token}":
            self.unauthorized_calls += 1
            return _error(401, 0, "401: Unauthorized")
        bucket, major = self._bucket_of(route, match)
        verdict = self._limiter.check(
            method=rec.method,
            path=rec.path,
            kind=route.kind,
            bucket=bucket,
            major=major,
            bot_token_route=route.auth,
            now=time.monotonic(),
        )
        if verdict.refusal is not None:
            scope, retry_after, body = verdict.refusal
            limit = self.rate_limits.for_kind(route.kind)
            if scope == "global":
                glob = self.rate_limits.global_requests
                exceeded = f"the global limit of {glob.requests} per {glob.per:g} s"
            else:
                exceeded = f"{limit.requests} per {limit.per:g} s on bucket {bucket!r} for {major or 'the bot'}"
            reply = _Reply(429, body, verdict.headers)
            reply.rate_limit = (scope, retry_after, verdict.forced, exceeded)
            return reply
        reply = route.handler(rec, match)
        for name, value in verdict.headers.items():
            reply.headers.setdefault(name, value)
        return reply

    # ----------------------------------------------------------------------------------------------------------------
    # Simple routes
    # ----------------------------------------------------------------------------------------------------------------

    def _r_get_me(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        return _ok(dict(self.users[self.bot_user_id]))

    def _r_get_user(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        user = self.users.get(int(m["user"]))
        return _ok(dict(user)) if user is not None else _error(404, 10013, "Unknown User")

    def _r_create_dm(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        recipient = _as_int((rec.json or {}).get("recipient_id"))
        if recipient is None or recipient not in self.users:
            return _error(400, 50035, "Invalid Form Body", ["recipient_id is not a known user"])
        return _ok(dict(self.channels[self._dm_channel(recipient)]))

    def _application_flags(self) -> int:
        flags = 0
        if self.privileged_intents & INTENT_GUILD_PRESENCES:
            flags |= 1 << 13
        if self.privileged_intents & INTENT_GUILD_MEMBERS:
            flags |= 1 << 15
        if self.privileged_intents & INTENT_MESSAGE_CONTENT:
            flags |= 1 << 19
        return flags

    def _r_application(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        return _ok(
            {
                "id": str(self.application_id),
                "name": self.bot_name,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": self._application_flags(),
                "owner": dict(self.users[self.owner_id]),
                "team": None,
                "bot": dict(self.users[self.bot_user_id]),
                "rpc_origins": [],
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
            }
        )

    def _r_gateway(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        return _ok({"url": self.gateway_url})

    def _r_gateway_bot(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        shards = self.recommended_shards or max(1, math.ceil(len(self.guilds) / 1000))
        limit = {
            "total": self.session_start_total,
            "remaining": max(self.session_start_total - self.identify_count, 0),
            "reset_after": 86_400_000,
            "max_concurrency": self.max_concurrency,
        }
        return _ok({"url": self.gateway_url, "shards": shards, "session_start_limit": limit})

    def _r_get_channel(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        channel = self.channels.get(int(m["channel"]))
        return _ok(dict(channel)) if channel is not None else _error(404, 10003, "Unknown Channel")

    def _r_typing(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        if int(m["channel"]) not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        return _Reply(204)

    def _r_get_guild(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        guild = self.guilds.get(int(m["guild"]))
        if guild is None:
            return _error(404, 10004, "Unknown Guild")
        return _ok(self._guild_payload(full=False, guild=guild))

    def _r_guild_channels(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        guild = self.guilds.get(int(m["guild"]))
        if guild is None:
            return _error(404, 10004, "Unknown Guild")
        return _ok([dict(self.channels[cid]) for cid in guild.channel_ids])

    def _r_guild_roles(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        guild = self.guilds.get(int(m["guild"]))
        if guild is None:
            return _error(404, 10004, "Unknown Guild")
        return _ok([dict(r) for r in guild.roles.values()])

    def _r_guild_member(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        user_id = int(m["user"])
        guild = self.guilds.get(int(m["guild"]))
        if guild is None:
            return _error(404, 10004, "Unknown Guild")
        if user_id not in guild.member_roles:
            return _error(404, 10007, "Unknown Member")
        return _ok(self._member_payload(user_id, guild=guild))

    def _r_cdn(self, rec: RecordedRequest) -> _Reply:
        match = re.fullmatch(r"(?:/media)?/(?:ephemeral-)?attachments/\d+/(?P<id>\d+)/[^/]+", rec.path)
        upload = self._cdn.get(int(match["id"])) if match is not None else None
        if rec.method != "GET" or upload is None:
            self._violate(f"{rec.method} {rec.path} is not a file the fake's CDN serves: answered 404")
            return _Reply(404, b"Not Found", content_type="text/plain")
        return _Reply(200, upload.data, content_type=upload.content_type or "application/octet-stream")

    # ----------------------------------------------------------------------------------------------------------------
    # Application commands
    # ----------------------------------------------------------------------------------------------------------------

    def _check_app(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply | None:
        if int(m["app"]) != self.application_id:
            self._violate(
                f"{rec.method} {rec.path} uses application id {m['app']}, "
                f"but the application is {self.application_id}: answered 403 Missing Access"
            )
            return _error(403, 50001, "Missing Access")
        guild = m.groupdict().get("guild")
        if guild is not None and int(guild) not in self.guilds:
            self._violate(f"{rec.method} {rec.path}: the bot is not in guild {guild}: answered 403 Missing Access")
            return _error(403, 50001, "Missing Access")
        return None

    def _r_get_commands(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        refused = self._check_app(rec, m)
        if refused is not None:
            return refused
        guild = m.groupdict().get("guild")
        return _ok(self.commands.get(int(guild) if guild else None, []))

    def _r_put_commands(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        refused = self._check_app(rec, m)
        if refused is not None:
            return refused
        guild_text = m.groupdict().get("guild")
        guild = int(guild_text) if guild_text else None
        body = rec.json
        if not isinstance(body, list):
            self._violate(f"{rec.method} {rec.path}: the body must be a list of commands")
            return _error(400, 50035, "Invalid Form Body", ["the body must be a list of commands"])
        errors = self._command_errors(body)
        if errors:
            self._violate(f"{rec.method} {rec.path}: invalid commands: " + "; ".join(errors))
            return _error(400, 50035, "Invalid Form Body", errors)
        previous = {(c["name"], c.get("type", 1)): c for c in self.commands.get(guild, [])}
        stored: list[dict[str, Any]] = []
        for command in body:
            echoed: Payload = json.loads(json.dumps(command))
            ctype = echoed.setdefault("type", 1)
            before = previous.get((echoed["name"], ctype))
            echoed["id"] = before["id"] if before is not None else str(self._ids.next())
            echoed["application_id"] = str(self.application_id)
            echoed["version"] = str(self._ids.next())
            echoed.setdefault("description", "")
            permissions = echoed.get("default_member_permissions")
            echoed["default_member_permissions"] = None if permissions is None else str(permissions)
            echoed.setdefault("nsfw", False)
            if guild is not None:
                echoed["guild_id"] = str(guild)
            else:
                echoed.setdefault("dm_permission", True)
            stored.append(echoed)
        self.commands[guild] = stored
        return _ok(stored)

    def _command_errors(self, commands: list[Any]) -> list[str]:
        errors: list[str] = []
        seen: set[tuple[str, int]] = set()
        counts = {1: 0, 2: 0, 3: 0}
        for index, command in enumerate(commands):
            where = f"commands[{index}]"
            if not isinstance(command, dict) or not isinstance(command.get("name"), str):
                errors.append(f"{where} must be an object with a name")
                continue
            name = command["name"]
            ctype = command.get("type", 1)
            counts[ctype] = counts.get(ctype, 0) + 1
            key = (name, ctype)
            if key in seen:
                errors.append(f"{where}: duplicate command name {name!r}")
            seen.add(key)
            description = command.get("description")
            if ctype == 1:
                if not _COMMAND_NAME_RE.fullmatch(name) or name != name.lower():
                    errors.append(
                        f"{where}: slash command name {name!r} must be 1-32 lowercase letters, digits, - or _"
                    )
                if not isinstance(description, str) or not 1 <= len(description) <= 100:
                    errors.append(f"{where} (/{name}): description must be 1 to 100 characters")
                errors.extend(self._option_errors(command.get("options") or [], f"{where} (/{name})", depth=0))
            else:
                if not 1 <= len(name) <= 32:
                    errors.append(f"{where}: context menu name {name!r} must be 1 to 32 characters")
                if description:
                    errors.append(f"{where}: context menu {name!r} must not have a description")
                if command.get("options"):
                    errors.append(f"{where}: context menu {name!r} cannot have options")
        if counts.get(1, 0) > 100:
            errors.append(f"at most 100 slash commands, got {counts[1]}")
        for ctype in (2, 3):
            if counts.get(ctype, 0) > 15:
                errors.append(f"at most 15 context menus of type {ctype}, got {counts[ctype]}")
        return errors

    def _option_errors(self, options: list[Any], where: str, *, depth: int) -> list[str]:
        errors: list[str] = []
        if len(options) > 25:
            errors.append(f"{where}: at most 25 options, got {len(options)}")
        names: set[str] = set()
        seen_optional = False
        for option in options:
            name = option.get("name", "")
            otype = option.get("type")
            label = f"{where} option {name!r}"
            if name in names:
                errors.append(f"{label}: duplicate option name")
            names.add(name)
            if not _COMMAND_NAME_RE.fullmatch(name) or name != name.lower():
                errors.append(f"{label}: name must be 1-32 lowercase letters, digits, - or _")
            description = option.get("description")
            if not isinstance(description, str) or not 1 <= len(description) <= 100:
                errors.append(f"{label}: description must be 1 to 100 characters")
            if otype in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP):
                if depth >= (1 if otype == OPT_SUB_COMMAND_GROUP else 2):
                    errors.append(f"{label}: subcommands nest too deep")
                errors.extend(self._option_errors(option.get("options") or [], label, depth=depth + 1))
                continue
            if option.get("required"):
                if seen_optional:
                    errors.append(f"{label}: required options must come before optional ones")
            else:
                seen_optional = True
            choices = option.get("choices")
            if choices:
                if option.get("autocomplete"):
                    errors.append(f"{label}: choices and autocomplete are exclusive")
                if len(choices) > 25:
                    errors.append(f"{label}: at most 25 choices, got {len(choices)}")
                for choice in choices:
                    if not 1 <= len(str(choice.get("name", ""))) <= 100:
                        errors.append(f"{label}: choice names must be 1 to 100 characters")
        return errors

    # ----------------------------------------------------------------------------------------------------------------
    # Messages (shared by callbacks, webhooks and channel routes)
    # ----------------------------------------------------------------------------------------------------------------

    def _add_message(self, message: FakeMessage) -> None:
        self.messages[message.id] = message
        channel = self.channels.get(message.channel_id)
        if channel is not None and not message.ephemeral:
            channel["last_message_id"] = str(message.id)

    def _message_payload(self, message: FakeMessage) -> Payload:
        payload = message.to_payload()
        reference = message.message_reference
        if reference is not None and reference.get("message_id") is not None:
            referenced = self.messages.get(int(reference["message_id"]))
            payload["referenced_message"] = (
                None if referenced is None or referenced.deleted else referenced.to_payload()
            )
        return payload

    @staticmethod
    def _files_by_index(rec: RecordedRequest) -> dict[int, UploadedFile]:
        return {f.id: f for f in rec.files}

    def _size_refusal(self, rec: RecordedRequest, limit: int, limit_name: str) -> _Reply | None:
        if len(rec.files) > MAX_FILES_PER_MESSAGE:
            self._violate(f"{rec.method} {rec.path} uploads {len(rec.files)} files (max {MAX_FILES_PER_MESSAGE})")
            return _error(400, 50035, "Invalid Form Body", [f"at most {MAX_FILES_PER_MESSAGE} files"])
        for upload in rec.files:
            if len(upload.data) > limit:
                self._violate(
                    f"{rec.method} {rec.path} uploads {upload.filename!r} of {len(upload.data)} bytes, over "
                    f"{limit_name} of {limit} bytes: answered 413 Request entity too large (40005)"
                )
                return _error(413, 40005, "Request entity too large")
        return None

    def _invalid(self, rec: RecordedRequest, errors: list[str]) -> _Reply:
        self._violate(f"{rec.method} {rec.path}: " + "; ".join(errors) + ": answered 400 Invalid Form Body")
        return _error(400, 50035, "Invalid Form Body", errors)

    def _empty(self, rec: RecordedRequest) -> _Reply:
        self._violate(f"{rec.method} {rec.path} would leave an empty message: answered 400 (50006)")
        return _error(400, 50006, "Cannot send an empty message")

    def _content_errors(self, payload: Payload, allowed_flags: int) -> list[str]:
        errors: list[str] = []
        content = payload.get("content")
        if content is not None and not isinstance(content, str):
            errors.append("content must be a string")
        elif isinstance(content, str) and len(content) > 2000:
            errors.append(f"content is {len(content)} characters (max 2000)")
        if payload.get("embeds"):
            errors.extend(_embed_errors(payload["embeds"]))
        flags = payload.get("flags") or 0
        if not isinstance(flags, int):
            errors.append("flags must be an integer")
            flags = 0
        if flags & ~allowed_flags:
            errors.append(f"flags {flags} are not allowed here (allowed bits: {allowed_flags})")
        if payload.get("components"):
            errors.extend(_component_errors(payload["components"], v2=bool(flags & FLAG_COMPONENTS_V2)))
        if flags & FLAG_COMPONENTS_V2 and (payload.get("content") or payload.get("embeds")):
            errors.append("a message with flag 32768 (components v2) cannot have content or embeds")
        return errors

    def _store_attachment(self, channel_id: int, upload: UploadedFile, entry: dict[str, Any] | None) -> UploadedFile:
        attachment_id = self._ids.next()
        filename = str((entry or {}).get("filename") or upload.filename)
        content_type, width, height = _content_type_for(upload.data, filename, upload.content_type)
        name = quote(filename)
        stored = UploadedFile(
            filename=filename,
            content_type=content_type,
            data=upload.data,
            id=attachment_id,
            description=(entry or {}).get("description"),
            width=width,
            height=height,
            url=f"{self.http_base}/attachments/{channel_id}/{attachment_id}/{name}",
            proxy_url=f"{self.http_base}/media/attachments/{channel_id}/{attachment_id}/{name}",
        )
        self._cdn[attachment_id] = stored
        return stored

    def _new_attachments(
        self, channel_id: int, payload: Payload, files: dict[int, UploadedFile]
    ) -> tuple[list[UploadedFile], list[str]]:
        """Attachments of a new message, and errors if ``attachments`` does not match the uploaded parts."""
        entries = payload.get("attachments")
        if entries is None:
            return [self._store_attachment(channel_id, f, None) for _, f in sorted(files.items())], []
        chosen: list[tuple[UploadedFile, dict[str, Any] | None]] = []
        errors: list[str] = []
        for entry in entries:
            index = _as_int(entry.get("id")) if isinstance(entry, dict) else None
            if index is None or index not in files:
                errors.append(f"attachments entry {entry!r} does not refer to an uploaded files[N] part")
                continue
            chosen.append((files[index], entry))
        if errors:
            return [], errors
        referenced = {id(f) for f, _ in chosen}
        chosen.extend((f, None) for _, f in sorted(files.items()) if id(f) not in referenced)
        if len(chosen) > MAX_FILES_PER_MESSAGE:
            return [], [f"a message has at most {MAX_FILES_PER_MESSAGE} attachments, got {len(chosen)}"]
        return [self._store_attachment(channel_id, f, e) for f, e in chosen], []

    def _edited_attachments(
        self, rec: RecordedRequest, message: FakeMessage, payload: Payload, files: dict[int, UploadedFile]
    ) -> tuple[list[UploadedFile] | None, list[str]]:
        """Attachments after an edit (None: unchanged), and errors if ``attachments`` is inconsistent.

        API v10 (Discord's "Edit Message" and "Edit Webhook Message"): "the attachments array must contain all
        attachments that should be present after edit, including retained and new attachments provided in the
        request body". So Discord keeps exactly the existing attachments whose ids are listed and adds the new files
        listed there by their ``files[N]`` index (discord.py sends ``{"id": N, "filename": ...}`` for a new File and
        the full attachment dict for a kept Attachment); an uploaded file that is not listed is dropped, which no
        bot means to do (a violation). Without ``attachments`` the message keeps the ones it has.
        """
        entries = payload.get("attachments")
        listed = {_as_int(e.get("id")) for e in entries if isinstance(e, dict)} if isinstance(entries, list) else set()
        dropped = sorted(f.filename for index, f in files.items() if index not in listed)
        if dropped:
            self._violate(
                f"{rec.method} {rec.path} uploads {dropped} without listing them in attachments: Discord (API v10) "
                "drops them from the edited message"
            )
        if entries is None:
            return None, []
        existing = {a.id: a for a in message.attachments}
        result: list[UploadedFile] = []
        errors: list[str] = []
        for entry in entries:
            entry_id = _as_int(entry.get("id")) if isinstance(entry, dict) else None
            if entry_id is not None and entry_id in existing:
                result.append(existing[entry_id])
            elif entry_id is not None and entry_id in files:
                result.append(self._store_attachment(message.channel_id, files[entry_id], entry))
            else:
                errors.append(
                    f"attachments entry {entry!r} is neither an attachment of the message nor an uploaded files[N]"
                )
        if len(result) > MAX_FILES_PER_MESSAGE:
            errors.append(f"a message has at most {MAX_FILES_PER_MESSAGE} attachments, got {len(result)}")
        return (None, errors) if errors else (result, [])

    def _create_message(
        self,
        *,
        channel_id: int,
        payload: Payload,
        attachments: list[UploadedFile],
        flags: int,
        interaction: FakeInteraction | None,
        message_type: int = 0,
        reference: dict[str, Any] | None = None,
    ) -> FakeMessage:
        message = FakeMessage(
            id=self._ids.next(),
            channel_id=channel_id,
            content=payload.get("content") or "",
            embeds=list(payload.get("embeds") or []),
            attachments=attachments,
            components=_number_components(payload.get("components") or []),
            flags=flags,
            author_id=self.bot_user_id,
            author=dict(self.users[self.bot_user_id]),
            interaction_id=interaction.id if interaction is not None else None,
            message_reference=reference,
            type=message_type,
            tts=bool(payload.get("tts")),
        )
        nonce = payload.get("nonce")
        if nonce is not None:
            message.nonce = str(nonce)
        if interaction is not None:
            message.webhook_id = self.application_id
            message.application_id = self.application_id
            metadata: Payload = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": dict(self.users[interaction.user_id]),
                "authorizing_integration_owners": dict(interaction.payload.get("authorizing_integration_owners", {})),
            }
            data = interaction.payload.get("data", {})
            if interaction.type == INTERACTION_APPLICATION_COMMAND:
                metadata["name"] = data.get("name")
                metadata["command_type"] = data.get("type", 1)
            if interaction.type == INTERACTION_COMPONENT and "message" in interaction.payload:
                metadata["interacted_message_id"] = interaction.payload["message"]["id"]
            if interaction.original_message_id is not None:
                metadata["original_response_message_id"] = str(interaction.original_message_id)
            message.interaction_metadata = metadata
        self._add_message(message)
        return message

    def _edit_message(
        self,
        rec: RecordedRequest,
        message: FakeMessage,
        payload: Payload,
        *,
        allowed_flags: int = FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2,
    ) -> _Reply | None:
        """Apply an edit (PATCH semantics: absent fields are kept). Returns an error reply or None."""
        errors = self._content_errors(payload, allowed_flags)
        attachments, attachment_errors = self._edited_attachments(rec, message, payload, self._files_by_index(rec))
        errors.extend(attachment_errors)
        if errors:
            return self._invalid(rec, errors)
        content = (payload.get("content") or "") if "content" in payload else message.content
        embeds = list(payload.get("embeds") or []) if "embeds" in payload else message.embeds
        components = (
            _number_components(payload.get("components") or []) if "components" in payload else message.components
        )
        final_attachments = attachments if attachments is not None else message.attachments
        if not (content or embeds or final_attachments or components):
            return self._empty(rec)
        message.content = content
        message.embeds = embeds
        message.components = components
        message.attachments = final_attachments
        if payload.get("flags") is not None:
            changeable = FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2
            message.flags = (message.flags & ~changeable) | (int(payload["flags"]) & changeable)
        message.flags &= ~FLAG_LOADING
        message.edits += 1
        message.edited_timestamp = _now_iso()
        return None

    # ----------------------------------------------------------------------------------------------------------------
    # Interaction callback
    # ----------------------------------------------------------------------------------------------------------------

    def _r_callback(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        interaction = self.interactions.get(int(m["interaction"]))
        if interaction is None or interaction.token != m["token"]:
            self._violate(f"POST {rec.path}: callback for an interaction the fake never dispatched")
            return _error(404, 10062, "Unknown interaction")
        interaction.callbacks.append(rec)
        body = rec.json if isinstance(rec.json, dict) else {}
        callback_type = body.get("type")
        latency = rec.at - interaction.created_at
        if interaction.callback is None:
            interaction.callback = rec
            interaction.callback_latency = latency
            interaction.callback_type = callback_type if isinstance(callback_type, int) else None
        if interaction.acknowledged:
            if not interaction.told_callback_failed:
                self._violate(
                    f"POST {rec.path}: second callback (type {callback_type}) for interaction {interaction.id}, "
                    f"already acknowledged with type {interaction.callback_type}: answered 400 (40060)"
                )
            return _error(400, 40060, "Interaction has already been acknowledged.")
        if interaction.is_expired() or latency > self.interaction_deadline:
            self._violate(
                f"POST {rec.path}: first callback for interaction {interaction.id} arrived {latency:.2f} s after "
                f"dispatch (Discord allows {self.interaction_deadline:g} s): answered 404 Unknown interaction (10062)"
            )
            return _error(404, 10062, "Unknown interaction")
        if not isinstance(callback_type, int) or callback_type not in ALLOWED_CALLBACKS.get(interaction.type, ()):
            return self._invalid(
                rec,
                [f"callback type {callback_type!r} is not valid for an interaction of type {interaction.type}"],
            )
        refused = self._size_refusal(rec, interaction.attachment_size_limit, "the interaction's attachment_size_limit")
        if refused is not None:
            return refused
        raw_data = body.get("data")
        data: Payload = raw_data if isinstance(raw_data, dict) else {}
        result: FakeMessage | _Reply | None
        if callback_type == CALLBACK_CHANNEL_MESSAGE:
            result = self._callback_message(rec, interaction, data)
        elif callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
            result = self._callback_deferred(rec, interaction, data)
        elif callback_type in (CALLBACK_DEFERRED_UPDATE_MESSAGE, CALLBACK_UPDATE_MESSAGE):
            result = self._callback_update(rec, interaction, callback_type, data)
        elif callback_type == CALLBACK_AUTOCOMPLETE_RESULT:
            result = self._callback_autocomplete(rec, interaction, data)
        else:
            result = self._callback_modal(rec, interaction, data)
        if isinstance(result, _Reply):
            return result
        interaction.acknowledged = True
        interaction.callback_type = callback_type
        if rec.query.get("with_response") not in ("1", "true", "True"):
            return _Reply(204)
        info: Payload = {"id": str(interaction.id), "type": interaction.type}
        resource: Payload = {"type": callback_type}
        if result is not None:
            info["response_message_id"] = str(result.id)
            info["response_message_loading"] = bool(result.flags & FLAG_LOADING)
            info["response_message_ephemeral"] = bool(result.flags & FLAG_EPHEMERAL)
            if callback_type in (CALLBACK_CHANNEL_MESSAGE, CALLBACK_DEFERRED_CHANNEL_MESSAGE, CALLBACK_UPDATE_MESSAGE):
                resource["message"] = self._message_payload(result)
        return _ok({"interaction": info, "resource": resource})

    def _callback_message(
        self, rec: RecordedRequest, interaction: FakeInteraction, data: Payload
    ) -> FakeMessage | _Reply:
        allowed = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
        errors = self._content_errors(data, allowed)
        files, attachment_errors = self._new_attachments(interaction.channel_id, data, self._files_by_index(rec))
        errors.extend(attachment_errors)
        if errors:
            return self._invalid(rec, errors)
        if not (data.get("content") or data.get("embeds") or files or data.get("components") or data.get("poll")):
            return self._empty(rec)
        command_type = interaction.payload.get("data", {}).get("type", 1)
        message_type = 0
        if interaction.type == INTERACTION_APPLICATION_COMMAND:
            message_type = 20 if command_type == 1 else 23
        message = self._create_message(
            channel_id=interaction.channel_id,
            payload=data,
            attachments=files,
            flags=int(data.get("flags") or 0),
            interaction=interaction,
            message_type=message_type,
        )
        interaction.original_message_id = message.id
        return message

    def _callback_deferred(
        self, rec: RecordedRequest, interaction: FakeInteraction, data: Payload
    ) -> FakeMessage | _Reply:
        flags = int(data.get("flags") or 0)
        if flags & ~FLAG_EPHEMERAL:
            return self._invalid(rec, [f"a deferred response takes only flag 64, got {flags}"])
        command_type = interaction.payload.get("data", {}).get("type", 1)
        message_type = 0
        if interaction.type == INTERACTION_APPLICATION_COMMAND:
            message_type = 20 if command_type == 1 else 23
        message = self._create_message(
            channel_id=interaction.channel_id,
            payload={},
            attachments=[],
            flags=flags | FLAG_LOADING,
            interaction=interaction,
            message_type=message_type,
        )
        interaction.original_message_id = message.id
        return message

    def _callback_update(
        self, rec: RecordedRequest, interaction: FakeInteraction, callback_type: int, data: Payload
    ) -> FakeMessage | _Reply | None:
        raw = interaction.payload.get("message")
        message = self.messages.get(int(raw["id"])) if raw else None
        if message is None:
            if callback_type == CALLBACK_DEFERRED_UPDATE_MESSAGE and interaction.type == INTERACTION_MODAL_SUBMIT:
                return None  # defer() in Modal.on_submit of a modal opened by a command: just closes the modal
            return self._invalid(rec, [f"callback type {callback_type} needs an interaction on a message"])
        if message.deleted:
            return _error(404, 10008, "Unknown Message")
        if callback_type == CALLBACK_UPDATE_MESSAGE:
            refused = self._edit_message(rec, message, data)
            if refused is not None:
                return refused
        interaction.original_message_id = message.id
        return message

    def _callback_autocomplete(
        self, rec: RecordedRequest, interaction: FakeInteraction, data: Payload
    ) -> _Reply | None:
        choices = data.get("choices")
        errors: list[str] = []
        if not isinstance(choices, list):
            errors.append("autocomplete results need a choices list")
            choices = []
        if len(choices) > 25:
            errors.append(f"at most 25 autocomplete choices, got {len(choices)}")
        for choice in choices:
            name = choice.get("name") if isinstance(choice, dict) else None
            value = choice.get("value") if isinstance(choice, dict) else None
            if not isinstance(name, str) or not 1 <= len(name) <= 100:
                errors.append(f"choice name {name!r} must be 1 to 100 characters")
            if isinstance(value, str) and len(value) > 100:
                errors.append(f"choice value {value[:20]!r}... is longer than 100 characters")
            if value is None:
                errors.append(f"choice {name!r} has no value")
        if errors:
            return self._invalid(rec, errors)
        interaction.autocomplete_choices = list(choices)
        return None

    def _callback_modal(self, rec: RecordedRequest, interaction: FakeInteraction, data: Payload) -> _Reply | None:
        errors: list[str] = []
        custom_id = data.get("custom_id")
        title = data.get("title")
        components = data.get("components")
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
            errors.append("a modal needs a custom_id of 1 to 100 characters")
        if not isinstance(title, str) or not 1 <= len(title) <= 45:
            errors.append(f"a modal title must be 1 to 45 characters, got {title!r}")
        if not isinstance(components, list) or not 1 <= len(components) <= 5:
            errors.append("a modal holds 1 to 5 top-level components")
            components = []
        for component in _walk_components(components):
            if component.get("type") == 4:
                label = component.get("label")
                if isinstance(label, str) and len(label) > 45:
                    errors.append(f"text input label {label!r} is longer than 45 characters")
                max_length = component.get("max_length", 4000)
                if not 1 <= max_length <= 4000:
                    errors.append("text input max_length must be 1 to 4000")
        if errors:
            return self._invalid(rec, errors)
        interaction.modal = data
        return None

    # ----------------------------------------------------------------------------------------------------------------
    # Interaction webhooks (followups and @original)
    # ----------------------------------------------------------------------------------------------------------------

    def _webhook_interaction(self, rec: RecordedRequest, m: re.Match[str]) -> FakeInteraction | _Reply:
        if int(m["app"]) != self.application_id:
            self._violate(f"{rec.method} {rec.path}: webhook id {m['app']} is not the application id: answered 404")
            return _error(404, 10015, "Unknown Webhook")
        interaction = self._by_token.get(m["token"])
        if interaction is None:
            self._violate(f"{rec.method} {rec.path}: a token the fake never issued: answered 401 (50027)")
            return _error(401, 50027, "Invalid Webhook Token")
        if interaction.is_expired():
            # Discord's 15-minute rule. Not a violation: a bot is expected to meet it and fall back to the channel
            # endpoints with its bot token, so tests provoke it on purpose. Counted here, recorded in requests.
            self.expired_token_calls += 1
            return _error(401, 50027, "Invalid Webhook Token")
        if not interaction.acknowledged:
            if not interaction.told_callback_failed:
                self._violate(
                    f"{rec.method} {rec.path}: webhook call before interaction {interaction.id} was acknowledged: "
                    "answered 404 Unknown Webhook (10015)"
                )
            return _error(404, 10015, "Unknown Webhook")
        return interaction

    def _webhook_message(
        self, rec: RecordedRequest, interaction: FakeInteraction, message_ref: str
    ) -> FakeMessage | None:
        """The message an interaction webhook may read, edit or delete: its response or one of its followups.

        (For a component, the response of a type 6 or 7 callback is the message the component is on.) Another
        message is not that webhook's: 404 Unknown Message, and a violation, as the bot asked for it.
        """
        message_id = interaction.original_message_id if message_ref == "@original" else int(message_ref)
        message = self.messages.get(message_id) if message_id is not None else None
        if message is None or message.deleted:
            return None
        if message.interaction_id != interaction.id and message.id != interaction.original_message_id:
            self._violate(
                f"{rec.method} {rec.path}: message {message.id} is not a message of interaction {interaction.id} "
                "(an interaction webhook reaches only its response and followups): answered 404 (10008)"
            )
            return None
        return message

    def _r_followup(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        interaction = self._webhook_interaction(rec, m)
        if isinstance(interaction, _Reply):
            return interaction
        refused = self._size_refusal(rec, interaction.attachment_size_limit, "the interaction's attachment_size_limit")
        if refused is not None:
            return refused
        payload = rec.json if isinstance(rec.json, dict) else {}
        allowed = FLAG_SUPPRESS_EMBEDS | FLAG_EPHEMERAL | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
        original = interaction.original
        if (
            original is not None
            and original.loading
            and not original.deleted
            and interaction.callback_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE
        ):
            # Discord: the first followup after a "thinking" defer replaces the loading message (it keeps the
            # defer's ephemerality), it does not create a new one.
            edit = dict(payload)
            edit.pop("flags", None)
            errors = self._content_errors(payload, allowed)
            if errors:
                return self._invalid(rec, errors)
            if "attachments" not in edit and rec.files:
                edit["attachments"] = [{"id": f.id, "filename": f.filename} for f in rec.files]
            refusal = self._edit_message(rec, original, edit)
            if refusal is not None:
                return refusal
            message = original
        else:
            errors = self._content_errors(payload, allowed)
            files, attachment_errors = self._new_attachments(interaction.channel_id, payload, self._files_by_index(rec))
            errors.extend(attachment_errors)
            if errors:
                return self._invalid(rec, errors)
            if not (payload.get("content") or payload.get("embeds") or files or payload.get("components")):
                return self._empty(rec)
            message = self._create_message(
                channel_id=interaction.channel_id,
                payload=payload,
                attachments=files,
                flags=int(payload.get("flags") or 0),
                interaction=interaction,
            )
            interaction.followups.append(message)
        if rec.query.get("wait") in ("1", "true", "True"):
            return _ok(self._message_payload(message))
        return _Reply(204)

    def _r_webhook_get(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        interaction = self._webhook_interaction(rec, m)
        if isinstance(interaction, _Reply):
            return interaction
        message = self._webhook_message(rec, interaction, m["message"])
        if message is None:
            return _error(404, 10008, "Unknown Message")
        return _ok(self._message_payload(message))

    def _r_webhook_edit(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        interaction = self._webhook_interaction(rec, m)
        if isinstance(interaction, _Reply):
            return interaction
        message = self._webhook_message(rec, interaction, m["message"])
        if message is None:
            return _error(404, 10008, "Unknown Message")
        refused = self._size_refusal(rec, interaction.attachment_size_limit, "the interaction's attachment_size_limit")
        if refused is not None:
            return refused
        payload = rec.json if isinstance(rec.json, dict) else {}
        refusal = self._edit_message(rec, message, payload)
        if refusal is not None:
            return refusal
        return _ok(self._message_payload(message))

    def _r_webhook_delete(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        interaction = self._webhook_interaction(rec, m)
        if isinstance(interaction, _Reply):
            return interaction
        message = self._webhook_message(rec, interaction, m["message"])
        if message is None:
            return _error(404, 10008, "Unknown Message")
        message.deleted = True
        return _Reply(204)

    # ----------------------------------------------------------------------------------------------------------------
    # Channel messages (bot token)
    # ----------------------------------------------------------------------------------------------------------------

    def _channel_message(self, m: re.Match[str]) -> FakeMessage | _Reply:
        channel_id = int(m["channel"])
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        message = self.messages.get(int(m["message"]))
        # Ephemeral messages exist only for their interaction's webhook: the channel endpoints do not know them.
        if message is None or message.deleted or message.channel_id != channel_id or message.ephemeral:
            return _error(404, 10008, "Unknown Message")
        return message

    def _r_channel_post(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        channel_id = int(m["channel"])
        channel = self.channels.get(channel_id)
        if channel is None:
            return _error(404, 10003, "Unknown Channel")
        if channel.get("type") == 1:
            recipient = int(channel["recipients"][0]["id"])
            if recipient in self.dm_closed_user_ids:
                return _error(403, 50007, "Cannot send messages to this user")
        else:
            perms = self.permissions_for(self.bot_user_id, channel_id)
            needed = Permissions.VIEW_CHANNEL | Permissions.SEND_MESSAGES
            if rec.files:
                needed |= Permissions.ATTACH_FILES
            if perms & needed != needed:
                return _error(403, 50013, "Missing Permissions")
        payload = rec.json if isinstance(rec.json, dict) else {}
        nonce = payload.get("nonce")
        if nonce is not None:
            if len(str(nonce)) > 25:
                return self._invalid(rec, ["nonce is longer than 25 characters"])
            earlier = self._nonces.get((channel_id, str(nonce)))
            if earlier is not None and payload.get("enforce_nonce"):
                return _ok(self._message_payload(self.messages[earlier]))
        limit = self.channel_upload_limits.get(channel_id, self.channel_upload_limit)
        refused = self._size_refusal(rec, limit, f"the upload limit of channel {channel_id}")
        if refused is not None:
            return refused
        errors = self._content_errors(payload, FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2)
        files, attachment_errors = self._new_attachments(channel_id, payload, self._files_by_index(rec))
        errors.extend(attachment_errors)
        if errors:
            return self._invalid(rec, errors)
        has_body = payload.get("content") or payload.get("embeds") or files or payload.get("components")
        if not (has_body or payload.get("sticker_ids") or payload.get("poll")):
            return self._empty(rec)
        reference: dict[str, Any] | None = None
        message_type = 0
        raw_reference = payload.get("message_reference")
        if isinstance(raw_reference, dict) and raw_reference.get("message_id") is not None:
            target = self.messages.get(int(raw_reference["message_id"]))
            if target is None or target.deleted or target.ephemeral:
                if raw_reference.get("fail_if_not_exists", True):
                    # The referenced message may have been deleted by someone else: Discord's answer, no violation.
                    return _error(
                        400,
                        50035,
                        "Invalid Form Body",
                        ["message_reference: Unknown message (REPLIES_UNKNOWN_MESSAGE)"],
                    )
            else:
                reference = {
                    "type": 0,
                    "message_id": str(target.id),
                    "channel_id": str(target.channel_id),
                }
                if "guild_id" in channel:
                    reference["guild_id"] = channel["guild_id"]
                message_type = 19
        message = self._create_message(
            channel_id=channel_id,
            payload=payload,
            attachments=files,
            flags=int(payload.get("flags") or 0),
            interaction=None,
            message_type=message_type,
            reference=reference,
        )
        if nonce is not None:
            self._nonces[(channel_id, str(nonce))] = message.id
        return _ok(self._message_payload(message))

    def _r_channel_get(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        message = self._channel_message(m)
        if isinstance(message, _Reply):
            return message
        return _ok(self._message_payload(message))

    def _r_history(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        channel_id = int(m["channel"])
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        limit = min(int(rec.query.get("limit", "50")), 100)
        before = _as_int(rec.query.get("before"))
        after = _as_int(rec.query.get("after"))
        visible = [x for x in self.messages_in(channel_id) if not x.ephemeral]
        if before is not None:
            visible = [x for x in visible if x.id < before]
        if after is not None:
            visible = [x for x in visible if x.id > after][:limit]
        return _ok([self._message_payload(x) for x in reversed(visible[-limit:])])

    def _r_channel_edit(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        message = self._channel_message(m)
        if isinstance(message, _Reply):
            return message
        if message.author_id != self.bot_user_id:
            self._violate(f"PATCH {rec.path}: the bot may only edit its own messages: answered 403 (50005)")
            return _error(403, 50005, "Cannot edit a message authored by another user")
        limit = self.channel_upload_limits.get(message.channel_id, self.channel_upload_limit)
        refused = self._size_refusal(rec, limit, f"the upload limit of channel {message.channel_id}")
        if refused is not None:
            return refused
        payload = rec.json if isinstance(rec.json, dict) else {}
        refusal = self._edit_message(rec, message, payload)
        if refusal is not None:
            return refusal
        return _ok(self._message_payload(message))

    def _r_channel_delete(self, rec: RecordedRequest, m: re.Match[str]) -> _Reply:
        message = self._channel_message(m)
        if isinstance(message, _Reply):
            return message
        if message.author_id != self.bot_user_id:
            perms = self.permissions_for(self.bot_user_id, message.channel_id)
            if not perms & Permissions.MANAGE_MESSAGES:
                return _error(403, 50013, "Missing Permissions")
        message.deleted = True
        return _Reply(204)

    # ----------------------------------------------------------------------------------------------------------------
    # Gateway
    # ----------------------------------------------------------------------------------------------------------------

    def _require_client(self, guild_id: int | EllipsisType | None = ...) -> _Connection:
        """The connection that gets the guild's events (``...``: the newest ready one, whatever its shard)."""
        conn = self._current if isinstance(guild_id, EllipsisType) else self._connection_for(guild_id)
        if conn is None or not conn.live:
            where = "" if isinstance(guild_id, EllipsisType) else f" for guild {guild_id} (its shard)"
            raise RuntimeError(
                f"no discord.py client is connected and ready{where}; await fake.wait_until_ready() first"
            )
        return conn

    def _connection_for(self, guild_id: int | None) -> _Connection | None:
        """The newest ready connection whose shard gets the guild's events (``None``: a DM, shard 0)."""
        best: _Connection | None = None
        for conn in self._connections:
            if conn.live and conn.has_guild(guild_id) and (best is None or conn.ready_index > best.ready_index):
                best = conn
        return best

    async def _ws_send(self, conn: _Connection, payload: Payload) -> None:
        if conn.ws.closed:
            return
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await conn.ws.send_str(json.dumps(payload))

    async def _send_dispatch(self, conn: _Connection, event: str, data: Payload) -> None:
        session = conn.session
        if session is None:
            raise RuntimeError("the connection has no session")
        async with session.lock:
            session.seq += 1
            frame: Payload = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.buffer.append(frame)
            guild_id = data.get("id") if event == "GUILD_CREATE" else data.get("guild_id")
            shard = (session.shard[0], session.shard[1]) if session.shard is not None else None
            self.dispatched.append(Dispatch(shard, event, _as_int(guild_id), session.identify_index))
            await self._ws_send(conn, frame)

    def _dispatch_nowait(self, event: str, data: Payload, *, intent: int = 0) -> None:
        """Send an event, if a client is connected, on the connection of the guild's shard (``data["guild_id"]``)."""
        guild_id = _as_int(data.get("guild_id"))
        conn = self._connection_for(guild_id)
        if conn is None or conn.session is None:
            return
        if intent and not conn.session.intents & intent:
            return
        task = asyncio.get_running_loop().create_task(self._send_dispatch(conn, event, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _gateway_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws=ws, query=dict(request.query))
        self._connections.append(conn)
        if conn.query.get("v") != "10" or conn.query.get("encoding", "json") != "json":
            self._violate(f"gateway connection with query {conn.query}: the fake speaks v=10, encoding=json")
        await self._ws_send(
            conn, {"op": 10, "s": None, "t": None, "d": {"heartbeat_interval": self.heartbeat_interval}}
        )
        try:
            async for frame in ws:
                if frame.type == WSMsgType.TEXT:
                    try:
                        message = json.loads(frame.data)
                    except ValueError:
                        self._violate("the client sent a gateway frame that is not JSON: closed with 4002")
                        await ws.close(code=4002, message=b"Error while decoding payload.")
                        break
                    self.gateway_messages.append(message)
                    await self._on_gateway_message(conn, message)
                elif frame.type == WSMsgType.BINARY:
                    self._violate("the client sent a binary gateway frame (expected JSON text): closed with 4002")
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
        finally:
            conn.closed = True
            if self._current is conn:
                live = [c for c in self._connections if c.live]
                self._current = max(live, key=lambda c: c.ready_index) if live else None
            self._notify()
        return ws

    async def _on_gateway_message(self, conn: _Connection, message: Payload) -> None:
        op = message.get("op")
        data = message.get("d")
        if op == 1:
            await self._ws_send(conn, {"op": 11, "s": None, "t": None, "d": None})
        elif op == 2:
            await self._identify(conn, data if isinstance(data, dict) else {})
        elif op == 6:
            await self._resume(conn, data if isinstance(data, dict) else {})
        elif conn.session is None:
            self._violate(f"the client sent gateway op {op} before IDENTIFY: closed with 4003")
            await conn.ws.close(code=4003, message=b"Not authenticated.")
        elif op == 3:
            conn.presence = data if isinstance(data, dict) else None
        elif op == 4:
            pass  # voice state updates: nothing to do
        elif op == 8:
            requested = _as_int(data.get("guild_id")) if isinstance(data, dict) else None
            guild = self.guilds.get(requested) if requested is not None else None
            guild = guild or self.guild
            members = [self._member_payload(uid, guild=guild) for uid in guild.member_roles]
            chunk: Payload = {
                "guild_id": str(guild.id),
                "members": members,
                "chunk_index": 0,
                "chunk_count": 1,
                "not_found": [],
            }
            if isinstance(data, dict) and data.get("nonce") is not None:
                chunk["nonce"] = data["nonce"]
            await self._send_dispatch(conn, "GUILD_MEMBERS_CHUNK", chunk)
        else:
            self._violate(f"the client sent unknown gateway op {op}: closed with 4001")
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    async def _identify(self, conn: _Connection, data: Payload) -> None:
        if conn.session is not None:
            self._violate("the client sent IDENTIFY twice on one connection: closed with 4005")
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        token = str(data.get("token", ""))
        if token.removeprefix("Bot ") != self.token:
            self.unauthorized_calls += 1
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int):
            self._violate("IDENTIFY without intents: closed with 4013")
            await conn.ws.close(code=4013, message=b"Invalid intent(s).")
            return
        disallowed = intents & PRIVILEGED_INTENTS & ~self.privileged_intents
        if disallowed:
            self._violate(
                f"IDENTIFY asks for privileged intents {disallowed} that the application does not have enabled "
                "(members 2, presences 256, message content 32768): closed with 4014"
            )
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = data.get("shard")
        if shard is not None and (
            not isinstance(shard, list)
            or len(shard) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shard)
            or not 0 <= shard[0] < shard[1]
        ):
            self._violate(f"IDENTIFY with invalid shard {shard!r}: closed with 4010")
            await conn.ws.close(code=4010, message=b"Invalid shard.")
            return
        # Discord's Gateway page, "Rate Limiting" and "Max Concurrency": one IDENTIFY per rate_limit_key
        # (shard_id % max_concurrency) per 5 seconds; beyond that the gateway answers op 9 Invalid Session.
        now = time.monotonic()
        shard_id = shard[0] if shard is not None else 0
        key = shard_id % self.max_concurrency
        earlier = self._identified_at.get(key)
        if earlier is not None and now - earlier < self.identify_window:
            refusal = (
                f"IDENTIFY of shard {shard_id} {now - earlier:.2f} s after another IDENTIFY with rate_limit_key {key} "
                f"(max_concurrency {self.max_concurrency}: one per key per {self.identify_window:g} s): "
                "answered op 9 Invalid Session"
            )
            self.identify_refusals.append(refusal)
            # While the other session lives, the bot's shards (or processes) did not space their IDENTIFYs: a
            # violation. A process that restarts right after its predecessor died meets the same answer from
            # Discord, and discord.py copes (it IDENTIFYs again 5 s later): counted, not a violation.
            if any(
                c.live and c.session is not None and self._identify_key(c.session) == key for c in self._connections
            ):
                self._violate(refusal + ", while that shard's other session is connected")
            await self._ws_send(conn, {"op": 9, "s": None, "t": None, "d": False})
            return
        guilds = [g for g in self.guilds.values() if shard is None or g.shard_id(shard[1]) == shard[0]]
        if len(guilds) > self.max_guilds_per_shard:
            self._violate(
                f"IDENTIFY {'without sharding' if shard is None else f'as shard {shard}'} for a session of "
                f"{len(guilds)} guilds (at most {self.max_guilds_per_shard} a shard): closed with 4011"
            )
            await conn.ws.close(code=4011, message=b"Sharding required.")
            return
        self._identified_at[key] = now  # (only IDENTIFYs that start a session are counted)
        self.identify_count += 1
        session = _Session(
            session_id=secrets.token_hex(16), intents=intents, shard=shard, identify_index=self.identify_count
        )
        self._sessions[session.session_id] = session
        conn.session = session
        ready: Payload = {
            "v": 10,
            "user": dict(self.users[self.bot_user_id]),
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": self._application_flags()},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "auth": {},
            "_trace": ['["fake-discord",{"micros":0}]'],
        }
        if shard is not None:
            ready["shard"] = shard
        await self._send_dispatch(conn, "READY", ready)
        if intents & INTENT_GUILDS:
            for guild in guilds:
                await self._send_dispatch(conn, "GUILD_CREATE", self._guild_payload(full=True, guild=guild))
        self._mark_ready(conn)

    def _identify_key(self, session: _Session) -> int:
        shard_id = session.shard[0] if session.shard is not None else 0
        return shard_id % self.max_concurrency

    async def _resume(self, conn: _Connection, data: Payload) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if session is None or str(data.get("token", "")).removeprefix("Bot ") != self.token:
            await self._ws_send(conn, {"op": 9, "s": None, "t": None, "d": False})
            return
        for other in self._connections:
            if other is not conn and other.session is session and not other.closed:
                with contextlib.suppress(Exception):
                    await other.ws.close(code=4009, message=b"Session superseded.")
        conn.session = session
        self.resume_count += 1
        seq = data.get("seq")
        since = seq if isinstance(seq, int) else 0
        async with session.lock:
            for frame in list(session.buffer):
                if frame["s"] > since:
                    await self._ws_send(conn, frame)
        await self._send_dispatch(conn, "RESUMED", {"_trace": ['["fake-discord",{"micros":0}]']})
        self._mark_ready(conn)

    def _mark_ready(self, conn: _Connection) -> None:
        self.ready_count += 1
        conn.ready_index = self.ready_count
        conn.ready = True
        self._current = conn
        self._notify()


class _Snowflakes:
    """Strictly increasing snowflakes carrying the current time (discord.py derives created_at from them)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        if candidate <= self._last:
            candidate = self._last + 1
        self._last = candidate
        return candidate


# --------------------------------------------------------------------------------------------------------------------
# Test helpers (for the project's conftest)
# --------------------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_fake_discord(**kwargs: Any) -> AsyncIterator[FakeDiscord]:
    """Start a :class:`FakeDiscord` (keyword arguments go to its constructor) and stop it afterwards."""
    fake = FakeDiscord(**kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def point_discord_py_at(fake: FakeDiscord, monkeypatch: Any) -> None:
    """Point discord.py's REST base and gateway at the fake, undone by pytest's ``monkeypatch`` afterwards."""
    import discord.gateway
    import discord.http
    import yarl

    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))


@contextlib.asynccontextmanager
async def running_bot(
    client: ClientT, fake: FakeDiscord, *, token: str | None = None, timeout: float = 10
) -> AsyncIterator[ClientT]:
    """Run ``client.start()`` against the fake until the client is ready; close it (and await it) on exit.

    Fails fast with the client's own exception if it stops before becoming ready.
    """
    seen = fake.identify_count
    task = asyncio.create_task(client.start(token or fake.token), name="fake-discord-client")

    async def ready() -> None:
        await fake.wait_until_ready(timeout, after=seen)
        await client.wait_until_ready()

    waiter = asyncio.create_task(ready())
    try:
        done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await waiter
            task.result()  # raises the client's error
            raise RuntimeError("the client stopped before it was ready")
        if waiter not in done:
            waiter.cancel()
            raise TimeoutError(f"the client was not ready after {timeout} s.\n{fake.describe()}")
        waiter.result()
        yield client
    finally:
        if not waiter.done():
            waiter.cancel()
        await client.close()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout)
            except TimeoutError:
                task.cancel()
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an error after close() is not interesting here


class DiscordErrorLog(logging.Handler):
    """Collects ERROR records of the ``discord`` logger (errors in commands and views are only logged there).

    Use as a context manager, then assert ``not log.records``.
    """

    def __init__(self, logger_name: str = "discord") -> None:
        super().__init__(level=logging.ERROR)
        self.logger_name = logger_name
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> DiscordErrorLog:
        logging.getLogger(self.logger_name).addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logging.getLogger(self.logger_name).removeHandler(self)

    def formatted(self) -> list[str]:
        formatter = logging.Formatter("%(name)s: %(message)s")
        return [formatter.format(r) for r in self.records]
