"""The ModelsLab image API as the bot needs it: submit, fetch, and one reading of every answer variant.

`read_answer` is pure: it turns (HTTP status, body) into `Finished`, `Pending` or `Failure`, whatever
the shape the server chose (see `shared/docs/modelslab-api.md` §2): `message` or `messege`, a string
or a field->messages object, ids as int or string, `output` as a list, `""` or one string,
`proxy_links` as a list, object or string, HTML error pages. `ModelsLabClient` only moves bytes.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

log = logging.getLogger(__name__)

ApiFlavour = Literal["v6", "enterprise"]
GenerationKind = Literal["text2img", "img2img", "upscale"]

DEFAULT_QUEUE_RETRY_SECONDS = 30
_DETAIL_MAX = 200


class ErrorKind(enum.StrEnum):
    """Why a job failed, in the categories a member can act on."""

    INVALID_KEY = "invalid_key"
    NO_CREDITS = "no_credits"
    NOT_ON_PLAN = "not_on_plan"
    QUEUE_FULL = "queue_full"
    MODEL_NOT_FOUND = "model_not_found"
    PROMPT_REFUSED = "prompt_refused"
    INVALID_REQUEST = "invalid_request"
    IMAGE_UNREACHABLE = "image_unreachable"
    SERVICE_DOWN = "service_down"
    GENERATION_FAILED = "generation_failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    DOWNLOAD_FAILED = "download_failed"
    DELIVERY_REFUSED = "delivery_refused"
    UNANSWERED = "unanswered"  # the command could not be acknowledged: nothing was sent
    EXPIRED = "expired"  # the job's deadline passed before it could be sent
    BAD_IMAGE = "bad_image"  # the member's input image cannot be used: nothing was sent
    CANCELLED = "cancelled"  # by the member (or a moderator) before it was sent
    NO_KEY = "no_key"  # the server's key was removed (or cannot be read) while the job waited


@dataclass(frozen=True)
class Failure:
    """ModelsLab (or the way to it) said no. `transient` failures may succeed if simply asked again."""

    kind: ErrorKind
    detail: str = ""
    retry_after: float | None = None
    http_status: int | None = None
    # No answer, but the request may have reached ModelsLab (a timeout, a connection cut after sending):
    # sending it again could make, and bill, a second job.
    maybe_received: bool = False

    @property
    def transient(self) -> bool:
        return self.kind in (ErrorKind.SERVICE_DOWN, ErrorKind.QUEUE_FULL)


@dataclass(frozen=True)
class Pending:
    """Queued at ModelsLab: ask again later (at about `eta` seconds), at `fetch_url` when given."""

    request_id: str | None
    eta: float | None = None
    fetch_url: str | None = None
    future_links: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    """The images exist. `output_urls` first; `proxy_urls` are the CDN copies to try if those fail."""

    request_id: str | None
    output_urls: tuple[str, ...]
    proxy_urls: tuple[str, ...] = ()
    generation_time: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    nsfw_detected: bool = False

    @property
    def seed(self) -> int | None:
        return _as_int(self.meta.get("seed"))


Answer = Finished | Pending | Failure


# ---------------------------------------------------------------------------------------------- reading answers


def read_answer(http_status: int, body: bytes, *, api_key: str | None = None) -> Answer:
    """Read one answer of a generation or fetch call, whatever its shape."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        if http_status == 429:
            return classify_error(429, "rate limited (no JSON body)")
        return Failure(ErrorKind.SERVICE_DOWN, f"HTTP {http_status}, not JSON", http_status=http_status)
    if not isinstance(data, dict):
        return Failure(ErrorKind.SERVICE_DOWN, f"HTTP {http_status}, unexpected JSON", http_status=http_status)

    status = str(data.get("status", "")).strip().lower()
    request_id = _as_id(data.get("id"))
    if request_id is None and isinstance(data.get("meta"), dict):
        request_id = _as_id(data["meta"].get("id"))
    raw_meta = data.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    if api_key:  # never keep an echo of the key (meta is stored)
        meta = {k: v for k, v in meta.items() if k != "key" and not (isinstance(v, str) and api_key in v)}

    if status == "success":
        outputs = _as_url_list(data.get("output"))
        if outputs:
            return Finished(
                request_id=request_id,
                output_urls=outputs,
                proxy_urls=_as_url_list(data.get("proxy_links")),
                generation_time=_as_float(data.get("generationTime")),
                meta=meta,
                nsfw_detected=bool(data.get("nsfw_content_detected")),
            )
        # A success without images yet (seen with base64 and future_links): keep waiting for them.
        return _pending(data, request_id, meta)
    if status in ("processing", "pending", "queued", "starting", "in_progress"):
        return _pending(data, request_id, meta)

    if http_status >= 500 and status not in ("error", "failed"):
        return Failure(ErrorKind.SERVICE_DOWN, f"HTTP {http_status}", http_status=http_status)
    if status == "failed":
        return Failure(
            ErrorKind.GENERATION_FAILED, _clean(_message_of(data), api_key) or "failed", http_status=http_status
        )
    if status == "error" or http_status >= 400:
        message = _clean(_message_of(data), api_key)
        return classify_error(http_status, message, _as_float(data.get("retry_after")))
    # An unknown status with HTTP 2xx: treat like processing, the deadline bounds it.
    return _pending(data, request_id, meta)


def _pending(data: Mapping[str, Any], request_id: str | None, meta: Mapping[str, Any]) -> Pending:
    fetch_url = data.get("fetch_result")
    return Pending(
        request_id=request_id,
        eta=_as_float(data.get("eta")),
        fetch_url=fetch_url if isinstance(fetch_url, str) and fetch_url.startswith(("http://", "https://")) else None,
        future_links=_as_url_list(data.get("future_links")),
        meta=meta,
    )


_PATTERNS: tuple[tuple[ErrorKind, re.Pattern[str]], ...] = (
    (ErrorKind.QUEUE_FULL, re.compile(r"rate limit|too many|queued requests|spam|queue (is )?full", re.I)),
    (
        ErrorKind.INVALID_KEY,
        re.compile(r"(invalid|wrong|incorrect|missing|unknown).{0,20}(api )?key|key.{0,20}invalid", re.I),
    ),
    (ErrorKind.NO_CREDITS, re.compile(r"credit|balance|insufficient|out of (funds|credits)|recharge|top.?up", re.I)),
    (
        ErrorKind.NOT_ON_PLAN,
        re.compile(
            r"not (available|included|allowed) (on|in|for) (your|this) (plan|subscription)"
            r"|upgrade your (plan|subscription)",
            re.I,
        ),
    ),
    (
        ErrorKind.MODEL_NOT_FOUND,
        re.compile(
            r"model.{0,40}(not found|does not exist|doesn't exist|not exist|invalid|unknown)"
            r"|(invalid|unknown|no such) model",
            re.I,
        ),
    ),
    (
        ErrorKind.IMAGE_UNREACHABLE,
        re.compile(
            r"unable to (fetch|download|load) (the )?image|image.{0,30}(not reachable|could not be fetched)", re.I
        ),
    ),
    (
        ErrorKind.PROMPT_REFUSED,
        re.compile(
            r"nsfw|not allowed|inappropriate|prohibited|banned|blocked|violat|unsafe|prompt.{0,20}(refused|rejected)",
            re.I,
        ),
    ),
    (
        ErrorKind.SERVICE_DOWN,
        re.compile(
            r"service unavailable|internal (server )?error|server error|maintenance|try again later|overloaded", re.I
        ),
    ),
)
_STATUS_KINDS = {
    401: ErrorKind.INVALID_KEY,
    402: ErrorKind.NO_CREDITS,
    403: ErrorKind.NOT_ON_PLAN,
    429: ErrorKind.QUEUE_FULL,
    500: ErrorKind.SERVICE_DOWN,
    502: ErrorKind.SERVICE_DOWN,
    503: ErrorKind.SERVICE_DOWN,
    504: ErrorKind.SERVICE_DOWN,
}


def classify_error(http_status: int, message: str, retry_after: float | None = None) -> Failure:
    """Sort an error answer into the category the member is told about."""
    kind = _STATUS_KINDS.get(http_status)
    if kind is None or kind is ErrorKind.SERVICE_DOWN:
        for candidate, pattern in _PATTERNS:
            if pattern.search(message):
                kind = candidate
                break
    if kind is None:
        kind = ErrorKind.MODEL_NOT_FOUND if http_status == 404 else ErrorKind.INVALID_REQUEST
    if kind is ErrorKind.QUEUE_FULL and retry_after is None:
        retry_after = DEFAULT_QUEUE_RETRY_SECONDS
    return Failure(kind, message, retry_after=retry_after, http_status=http_status)


def _message_of(data: Mapping[str, Any]) -> str:
    """The error text under `message` or `messege` (sic), flattening a field -> [messages] object."""
    raw = next((data[key] for key in ("message", "messege", "error") if data.get(key) not in (None, "", [], {})), "")
    if isinstance(raw, dict):
        parts = []
        for name, messages in raw.items():
            text = " ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
            parts.append(f"{name}: {text}")
        return "; ".join(parts)
    if isinstance(raw, list):
        return "; ".join(str(item) for item in raw)
    return "" if raw is None else str(raw)


def _clean(text: str, api_key: str | None) -> str:
    """Make a server message safe to store and show: no key, no markup, one short line."""
    if api_key:
        text = text.replace(api_key, "[key]")
    text = re.sub(r"<[^>]{0,200}>", " ", text)  # HTML fragments
    text = text.replace("`", "'").replace("@", "@\u200b")
    text = " ".join(text.split())
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 1] + "…"
    return text


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(int(value))
    text = str(value).strip()
    return text or None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    return int(number) if number is not None else None


def _as_url_list(value: Any) -> tuple[str, ...]:
    """`output`/`proxy_links`/`future_links` in any of their shapes: list, {"0": url}, one string, or ""."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        items = [
            value[k] for k in sorted(value, key=lambda k: (not _whole(str(k)), int(k) if _whole(str(k)) else 0, str(k)))
        ]
    else:
        return ()
    return tuple(
        item.strip() for item in items if isinstance(item, str) and item.strip().startswith(("http://", "https://"))
    )


# ---------------------------------------------------------------------------------------------- the HTTP client


def _not_found(answer: Answer) -> bool:
    return isinstance(answer, Failure) and (answer.http_status == 404 or answer.kind is ErrorKind.MODEL_NOT_FOUND)


@dataclass(frozen=True)
class Endpoints:
    """The paths of one API flavour."""

    text2img: str
    img2img: str
    fetch: str
    upscale: str

    @classmethod
    def for_flavour(cls, flavour: ApiFlavour) -> Endpoints:
        if flavour == "enterprise":
            return cls(
                "/api/v1/enterprise/text2img",
                "/api/v1/enterprise/img2img",
                "/api/v1/enterprise/fetch",
                "/api/v1/enterprise/super_resolution",
            )
        return cls(
            "/api/v6/images/text2img",
            "/api/v6/images/img2img",
            "/api/v6/images/fetch",
            "/api/v6/image_editing/super_resolution",
        )


class ModelsLabClient:
    """Sends generation and fetch calls; never raises for what the server or the network does."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        flavour: ApiFlavour,
        request_timeout: float = 60.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self.flavour = flavour
        self._endpoints = Endpoints.for_flavour(flavour)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)

    async def submit(self, kind: GenerationKind, api_key: str, payload: Mapping[str, Any]) -> Answer:
        path = {"text2img": self._endpoints.text2img, "img2img": self._endpoints.img2img}.get(
            kind, self._endpoints.upscale
        )
        return await self._post(self._base_url + path, {**payload, "key": api_key}, api_key)

    async def fetch(self, api_key: str, request_id: str, fetch_url: str | None = None) -> Answer:
        """Ask for a queued result: at the answer's `fetch_result` URL when it gave one, else the documented path.

        Enterprise docs and SDKs disagree on the fetch path: the documented one is tried first, then the SDKs'.
        A "not found" here means the request id is unknown (for now), never that a model is missing.
        """
        if fetch_url and self._same_origin(fetch_url):
            answer = await self._post(fetch_url, {"key": api_key, "request_id": request_id}, api_key)
        elif self.flavour == "v6":
            url = f"{self._base_url}{self._endpoints.fetch}/{request_id}"
            answer = await self._post(url, {"key": api_key}, api_key)
        else:
            body = {"key": api_key, "request_id": request_id}
            answer = await self._post(self._base_url + self._endpoints.fetch, body, api_key)
            if _not_found(answer):
                url = f"{self._base_url}/api/v1/enterprise/images/fetch/{request_id}"
                answer = await self._post(url, {"key": api_key}, api_key)
        if _not_found(answer):
            assert isinstance(answer, Failure)
            return Failure(
                ErrorKind.SERVICE_DOWN, f"request not found ({answer.detail})", http_status=answer.http_status
            )
        return answer

    async def check_key(self, api_key: str) -> Failure | None:
        """A cheap call that proves the key works: the queue count (v6) or the server status (enterprise)."""
        path = "/api/v6/processing/request_count" if self.flavour == "v6" else "/api/v1/enterprise/system_details"
        try:
            async with self._session.post(
                self._base_url + path, json={"key": api_key}, timeout=self._timeout
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            return Failure(ErrorKind.SERVICE_DOWN, "timed out")
        except (aiohttp.ClientError, ConnectionError) as exc:
            return Failure(ErrorKind.SERVICE_DOWN, type(exc).__name__)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and status < 400 and str(data.get("status", "")).lower() in ("success", "ok"):
            return None
        answer = read_answer(status, raw, api_key=api_key)
        if isinstance(answer, Failure):
            return answer
        return Failure(ErrorKind.SERVICE_DOWN, "unexpected answer", http_status=status)

    async def model_list(self, api_key: str) -> list[str]:
        """The public model ids (`/api/v4/dreambooth/model_list`); empty when ModelsLab cannot say."""
        from bot.modelslab.catalog import read_model_list

        try:
            url = self._base_url + "/api/v4/dreambooth/model_list"
            async with self._session.post(url, json={"key": api_key}, timeout=self._timeout) as response:
                return read_model_list(await response.read()) if response.status < 400 else []
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            return []

    def _same_origin(self, url: str) -> bool:
        """Only follow `fetch_result` to the configured host: the key travels with the request."""
        from yarl import URL

        target, base = URL(url), URL(self._base_url)
        return (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)

    async def _post(self, url: str, body: Mapping[str, Any], api_key: str) -> Answer:
        try:
            async with self._session.post(url, json=body, timeout=self._timeout) as response:
                raw = await response.read()
                return read_answer(response.status, raw, api_key=api_key)
        except TimeoutError:
            return Failure(ErrorKind.SERVICE_DOWN, "timed out", maybe_received=True)
        except aiohttp.ClientConnectorError as exc:  # no connection was made: nothing was sent
            return Failure(ErrorKind.SERVICE_DOWN, type(exc).__name__)
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            return Failure(ErrorKind.SERVICE_DOWN, type(exc).__name__, maybe_received=True)


def _whole(text: str) -> bool:
    """Digits only, ASCII ones: `int()` refuses "²" although `str.isdigit()` accepts it."""
    return text.isascii() and text.isdigit()
