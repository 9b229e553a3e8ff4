"""A fake ModelsLab image API, served over real sockets on 127.0.0.1.

It speaks the response variants described in ``docs/modelslab-api.md`` (v6 and enterprise
flavours, immediate and queued answers, every fetch path, ``message``/``messege`` errors, HTML
gateway pages, webhooks, base64 outputs) so the bot's ModelsLab client can be tested end to end.

Typical use::

    async with running_fake_modelslab(max_queued=5) as fake:
        fake.script(Queued(ready_after_fetches=1), ErrorAnswer(http_status=503, message="Service Unavailable"))
        ...  # point the client at fake.base_url, run it
        call = await fake.wait_for_submission()
        fake.complete(call.job_id)

Scripted behaviours are consumed one per generation submission (text2img, img2img,
super_resolution, both flavours); when the script is empty ``default_behaviour`` applies.

* A scripted *answer* (``ErrorAnswer``, ``RawAnswer``, ``Hang``, ``Reset``) is given to the next
  submission whatever it contains, before any check: it stands for a gateway or server fault.
* A scripted *job* (``Immediate``, ``Queued``) is taken by the next submission that passes the
  fake's own checks (key, validation, model, queue limit, spam filter). A refused submission
  leaves it in the script, so a client's retry still meets it.

Generated images are real, solid-colour images of the requested size, one colour per
``(seed, index)`` (see :func:`colour_for`); they are rendered lazily, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import random
import re
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from aiohttp.typedefs import Handler
from PIL import Image

__all__ = [
    "DEFAULT_KEY",
    "DEFAULT_MODELS",
    "SCHEDULERS",
    "UPSCALE_MODELS",
    "Behaviour",
    "ErrorAnswer",
    "FakeJob",
    "FakeModelsLab",
    "FetchFault",
    "Hang",
    "Immediate",
    "Queued",
    "RawAnswer",
    "RecordedCall",
    "Reset",
    "WebhookDelivery",
    "colour_for",
    "render_image",
    "running_fake_modelslab",
]

log = logging.getLogger(__name__)

DEFAULT_KEY = "ml-test-key"
DEFAULT_MODELS: tuple[str, ...] = ("flux", "fluxdev", "fluxschnell", "sdxl", "realistic-vision-51", "midjourney")
UPSCALE_MODELS: tuple[str, ...] = (
    "RealESRGAN_x4plus",
    "RealESRNet_x4plus",
    "RealESRGAN_x4plus_anime_6B",
    "RealESRGAN_x2plus",
    "realesr-general-x4v3",
    "ultra_resolution",
)
SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDIMInverseScheduler",
    "DEISMultistepScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
    "LCMScheduler",
)

TIP = "Get 20x faster image generation using enterprise plan. Click here : https://modelslab.com/enterprise"
TIP_1 = (
    "Your image is processing in background, you can get this image using fetch API: "
    "here is link for fetch api : https://modelslab.com/docs/community-models-api-v6/dreambooth/fetchqueimg"
)
BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
NOT_READY_HTML = (
    "<!DOCTYPE html><html><head><title>Processing</title></head><body>Image is not ready yet.</body></html>"
)

Flavour = Literal["v6", "enterprise"]
Kind = Literal["text2img", "img2img", "super_resolution"]
Outcome = Literal["success", "failed", "error"]
JobState = Literal["queued", "success", "failed", "error"]
IdForm = Literal["int", "str", "uuid"]
ImageExt = Literal["png", "jpg", "webp"]
WebhookMode = Literal["normal", "never", "twice", "before_response"]
ErrorCodes = Literal["legacy", "modern"]

_GENERATION_PATHS: dict[str, tuple[Flavour, Kind]] = {
    "/api/v6/images/text2img": ("v6", "text2img"),
    "/api/v6/images/img2img": ("v6", "img2img"),
    "/api/v6/image_editing/super_resolution": ("v6", "super_resolution"),
    "/api/v1/enterprise/text2img": ("enterprise", "text2img"),
    "/api/v1/enterprise/img2img": ("enterprise", "img2img"),
    "/api/v1/enterprise/super_resolution": ("enterprise", "super_resolution"),
}
_FETCH_PATH = re.compile(r"^/api/(?:v6/images/fetch|v1/enterprise/fetch|v1/enterprise/images/fetch)(?:/[^/]+)?$")
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_INIT_IMAGE_TIMEOUT = ClientTimeout(total=5)
_WEBHOOK_TIMEOUT = ClientTimeout(total=30)

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _JobOptions:
    """Options shared by the behaviours that create a job (``Immediate`` and ``Queued``).

    ``output_as``: ``"auto"`` sends a list, except super resolution which sends one string.
    ``proxy_links``: the shape of ``proxy_links`` in an immediate success (``/cdn/`` URLs).
    ``id_as``: ``"int"`` (134701498), ``"str"`` ("134701498") or ``"uuid"`` (a non-numeric string).
    ``webhook``: ``"normal"`` (once when the job finishes, after ``webhook_delay`` s), ``"never"``,
    ``"twice"`` (the same body twice) or ``"before_response"`` (the job finishes at once and the
    webhook is delivered, and answered by the receiver, before the submit answer is sent).
    ``track_id_in``: where the webhook body carries ``track_id``: top level, in ``meta``, or both.
    ``base64_prefix``: ``.base64`` bodies start with ``data:image/...;base64,``.
    ``base64_html_first``: each ``.base64`` URL answers an HTML page to its first K GETs.
    ``fetch_with_meta``: a successful fetch also carries ``generationTime`` and ``meta``.
    ``extra_fields`` are merged into the submit answer (immediate success or processing).
    """

    id_as: IdForm = "int"
    output_ext: ImageExt = "png"
    output_as: Literal["auto", "list", "str"] = "auto"
    proxy_links: Literal["list", "dict", "str", "absent"] = "list"
    generation_time: float = 2.92
    nsfw: bool = False
    tip: str | None = TIP
    extra_fields: Mapping[str, Any] = field(default_factory=dict)
    webhook: WebhookMode = "normal"
    webhook_delay: float = 0.0
    track_id_in: Literal["top", "meta", "both"] = "top"
    base64_prefix: bool = False
    base64_html_first: int = 0
    fetch_with_meta: bool = False


@dataclass(frozen=True, kw_only=True)
class Immediate(_JobOptions):
    """Success in the submit answer itself."""

    with_meta: bool = True


@dataclass(frozen=True, kw_only=True)
class Queued(_JobOptions):
    """The submit answers ``processing``; fetches answer still-processing until the job is ready.

    The job becomes ready when ``FakeModelsLab.complete(job_id)`` is called, or after
    ``ready_after_seconds`` from the submit, or once ``ready_after_fetches`` fetches have been
    answered still-processing (fetch N+1 gets the outcome; 0 means ready right after the submit
    answer), whichever comes first. With neither option only ``complete()`` finishes it.
    """

    eta: float = 2.75
    ready_after_fetches: int | None = None
    ready_after_seconds: float | None = None
    form: Literal["full", "slim"] = "full"
    outcome: Outcome = "success"
    failure_message: str | None = None
    fetch_status_while_waiting: str = "processing"
    output_when_waiting: str | Sequence[str] = ""


@dataclass(frozen=True)
class ErrorAnswer:
    """A JSON error answer: ``{"status": status, key: message}`` (+ ``retry_after``, ``extra_fields``)."""

    http_status: int = 200
    message: str | Mapping[str, Sequence[str]] = "Something went wrong, please try again."
    key: Literal["message", "messege"] = "message"
    retry_after: float | None = None
    status: str = "error"
    extra_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RawAnswer:
    """An answer with an arbitrary body: a gateway's HTML page, truncated JSON, ..."""

    http_status: int = 502
    body: str = BAD_GATEWAY_HTML
    content_type: str = "text/html"


@dataclass(frozen=True)
class Hang:
    """Hold the answer for ``seconds``, then answer as ``then``.

    ``then=None`` means what the fake would normally do: for a submission the fake's
    ``default_behaviour`` at that moment (never the script), for a fetch the normal fetch
    answer. The fake does not notice a client that gave up meanwhile: like the real service, it
    still creates the job, which counts towards the key's queue until it finishes.
    """

    seconds: float
    then: Behaviour | None = None


@dataclass(frozen=True)
class Reset:
    """Close the connection without an answer (TCP RST)."""


Behaviour: TypeAlias = "Immediate | Queued | ErrorAnswer | RawAnswer | Hang | Reset"
FetchFault: TypeAlias = "ErrorAnswer | RawAnswer | Hang | Reset"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RecordedCall:
    """One HTTP request the fake received, and how it was answered.

    ``job_id`` is the job a submission created, or the job a fetch asked for (as a string).
    ``status`` and ``response`` (parsed JSON or text) are filled in once the answer is made;
    ``aborted`` is true when the connection was reset instead.
    """

    method: str
    path: str
    json: Any
    at: float
    query: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    status: int | None = None
    response: Any = None
    job_id: str | None = None
    aborted: bool = False
    matched: bool = True
    answered_at: float | None = None

    @property
    def answered(self) -> bool:
        return self.answered_at is not None


@dataclass(eq=False)
class WebhookDelivery:
    """One webhook POST the fake made. ``status`` is the receiver's HTTP status (None on error)."""

    url: str
    job_id: str
    body: dict[str, Any]
    attempt: int
    at: float
    status: int | None = None
    error: str | None = None
    response_text: str = ""
    finished_at: float | None = None


@dataclass(eq=False)
class FakeJob:
    """A generation the fake accepted."""

    id: str
    answer_id: int | str
    key: str
    flavour: Flavour
    kind: Kind
    behaviour: Immediate | Queued
    request: dict[str, Any]
    seed: int
    size: tuple[int, int]
    outputs: list[str]
    proxy_outputs: list[str]
    meta: dict[str, Any]
    webhook: str | None
    track_id: Any
    submitted_at: float
    state: JobState = "queued"
    fetch_count: int = 0
    finished_at: float | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def finished(self) -> bool:
        return self.state != "queued"

    @property
    def outcome(self) -> Outcome:
        return self.behaviour.outcome if isinstance(self.behaviour, Queued) else "success"

    def output_field(self) -> str | list[str]:
        """``output`` as the job's behaviour shapes it."""
        shape = self.behaviour.output_as
        if shape == "str" or (shape == "auto" and self.kind == "super_resolution"):
            return self.outputs[0]
        return list(self.outputs)


@dataclass
class _FetchFaultEntry:
    remaining: int
    behaviour: FetchFault
    job_id: str | None


@dataclass
class _ImageEntry:
    job_id: str | None
    ext: ImageExt
    size: tuple[int, int]
    colour: tuple[int, int, int]
    source: bytes | None = None
    as_base64: bool = False
    base64_prefix: bool = False
    html_first: int = 0
    gets: int = 0
    data: bytes | None = None

    def render(self) -> bytes:
        if self.data is None:
            self.data = render_image(self.size, self.colour, self.ext, source=self.source)
        return self.data


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def colour_for(seed: int, index: int) -> tuple[int, int, int]:
    """The solid colour of image ``index`` of a generation with ``seed`` (never near-black)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=3).digest()
    r, g, b = digest
    if max(r, g, b) < 64:
        r |= 0x80
    return r, g, b


def render_image(
    size: tuple[int, int], colour: tuple[int, int, int], ext: ImageExt = "png", *, source: bytes | None = None
) -> bytes:
    """Encode a solid ``colour`` image of ``size`` (or ``source`` resized to ``size``) as ``ext``."""
    if source is not None:
        with Image.open(io.BytesIO(source)) as original:
            image = original.convert("RGB").resize(size, Image.Resampling.NEAREST)
    else:
        image = Image.new("RGB", size, colour)
    buffer = io.BytesIO()
    if ext == "jpg":
        image.save(buffer, "JPEG", quality=95)
    elif ext == "webp":
        image.save(buffer, "WEBP", lossless=True)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        with contextlib.suppress(ValueError):
            number = float(text)
            if number.is_integer():
                return int(number)
    return None


def _to_float(value: Any, default: float) -> float:
    if isinstance(value, bool) or value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _yes(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("yes", "true", "1"))


def _is_submission(call: RecordedCall, track_id: Any = None) -> bool:
    if call.method != "POST" or call.path not in _GENERATION_PATHS:
        return False
    if track_id is None:
        return True
    return isinstance(call.json, dict) and str(call.json.get("track_id")) == str(track_id)


def _is_job_behaviour(behaviour: Behaviour) -> bool:
    return isinstance(behaviour, Immediate | Queued)


def _upscale_factor(value: Any) -> int:
    if value is None or value is False:
        return 1
    if _yes(value):
        return 2
    number = _to_int(value)
    return number if number is not None and 1 <= number <= 3 else 1


def _response_payload(resp: web.StreamResponse) -> Any:
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return None
    content_type = resp.content_type
    if content_type.startswith("image/"):
        return None
    text = resp.body.decode("utf-8", "replace")
    if content_type == "application/json":
        with contextlib.suppress(ValueError):
            return json.loads(text)
    return text


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class FakeModelsLab:
    """A scriptable fake of the ModelsLab image API. See the module docstring."""

    def __init__(
        self,
        *,
        valid_keys: Iterable[str] = (DEFAULT_KEY,),
        broke_keys: Iterable[str] = (),
        known_models: Iterable[str] = DEFAULT_MODELS,
        max_queued: int | None = None,
        enforce_max_queued: bool = True,
        spam_filter: bool = False,
        spam_window: float = 30.0,
        retry_after: int = 30,
        error_codes: ErrorCodes = "legacy",
        validate: bool = True,
        request_count_per_minute: int = 30,
        default_behaviour: Behaviour | None = None,
    ) -> None:
        self.valid_keys: set[str] = set(valid_keys)
        self.broke_keys: set[str] = set(broke_keys)
        self.known_models: list[str] = list(known_models)
        self.max_queued = max_queued
        self.enforce_max_queued = enforce_max_queued
        self.spam_filter = spam_filter
        self.spam_window = spam_window
        self.retry_after = retry_after
        #: "legacy": model-not-found, validation, unknown-id and spam errors come with HTTP 200, as
        #: older servers send them; "modern": 404, 400, 404 and 429. Key (401/402) and queue-limit
        #: (429) errors always carry their status.
        self.error_codes: ErrorCodes = error_codes
        self.validate = validate
        self.request_count_per_minute = request_count_per_minute
        self.default_behaviour: Behaviour = default_behaviour if default_behaviour is not None else Immediate()

        self.requests: list[RecordedCall] = []
        self.webhook_deliveries: list[WebhookDelivery] = []
        self.jobs: dict[str, FakeJob] = {}
        self.peak_queued: dict[str, int] = {}
        self.limit_violations = 0

        self._script: deque[Behaviour] = deque()
        self._fetch_faults: list[_FetchFaultEntry] = []
        self._queued: dict[str, int] = {}
        self._spam_seen: dict[tuple[str, str, str], float] = {}
        self._request_count_calls: dict[str, deque[float]] = {}
        self._images: dict[str, _ImageEntry] = {}
        self._calls: dict[int, RecordedCall] = {}
        self._waiters: set[asyncio.Event] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 134701497
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._closing = asyncio.Event()
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeModelsLab is not started")
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        self._closing = asyncio.Event()
        self._session = ClientSession()
        try:
            self._runner = web.AppRunner(self._build_app(), access_log=None, shutdown_timeout=1.0)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop serving; cancel timers, pending webhooks and hanging answers."""
        self._closing.set()
        for job in self.jobs.values():
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
        await self._cancel_tasks()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._cancel_tasks()  # any spawned by answers that finished during the shutdown
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024**2)
        router = app.router
        for path, (flavour, kind) in _GENERATION_PATHS.items():
            router.add_post(path, self._generation_handler(flavour, kind))
        router.add_post("/api/v6/images/fetch/{id}", self._fetch_handler("v6"))
        router.add_post("/api/v6/images/fetch", self._fetch_handler("v6"))
        router.add_post("/api/v1/enterprise/fetch", self._fetch_handler("enterprise"))
        router.add_post("/api/v1/enterprise/images/fetch/{id}", self._fetch_handler("enterprise"))
        router.add_post("/api/v4/dreambooth/model_list", self._model_list)
        router.add_post("/api/v6/processing/request_count", self._request_count)
        router.add_post("/api/v1/enterprise/system_details", self._system_details)
        router.add_get("/generations/{name}", self._image)
        router.add_get("/cdn/generations/{name}", self._image)
        router.add_route("*", "/{tail:.*}", self._unmatched)
        return app

    # ---------------------------------------------------------------- scripting

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next generation submissions, one each (see module docstring)."""
        self._script.extend(behaviours)

    def clear_script(self) -> None:
        self._script.clear()

    @property
    def pending_script(self) -> tuple[Behaviour, ...]:
        return tuple(self._script)

    def fail_fetches(self, n: int, behaviour: FetchFault | None = None, *, job_id: int | str | None = None) -> None:
        """Make the next ``n`` fetches (of ``job_id`` only, if given) answer with ``behaviour``.

        Default: a gateway's HTML 502 page. Faulted fetches do not count for ``ready_after_fetches``.
        """
        if n <= 0:
            return
        fault: FetchFault = behaviour if behaviour is not None else RawAnswer()
        if isinstance(fault, Hang) and fault.then is not None and _is_job_behaviour(fault.then):
            raise TypeError("a fetch fault cannot create a job")
        self._fetch_faults.append(_FetchFaultEntry(n, fault, None if job_id is None else str(job_id)))

    def complete(self, job_id: int | str, outcome: Outcome | None = None) -> None:
        """Finish a queued job now, with the outcome of its behaviour (or ``outcome``).

        Unknown ids raise KeyError; finishing a finished job does nothing.
        """
        self._finish(self._job(job_id), outcome)

    def complete_all(self) -> None:
        """Finish every queued job now."""
        for job in list(self.jobs.values()):
            self._finish(job)

    def queued(self, key: str = DEFAULT_KEY) -> int:
        """How many jobs of ``key`` currently count as queued at ModelsLab."""
        return self._queued.get(key, 0)

    def host_image(self, data: bytes, *, ext: ImageExt = "png") -> str:
        """Serve ``data`` at a fake URL (e.g. as an ``init_image``) and return the URL."""
        size = _image_size(data) or (0, 0)
        name = f"hosted-{uuid.uuid4()}.{ext}"
        self._images[name] = _ImageEntry(job_id=None, ext=ext, size=size, colour=(0, 0, 0), data=data)
        return f"{self.base_url}/generations/{name}"

    # ---------------------------------------------------------------- inspection

    def submissions(self, track_id: Any = None) -> list[RecordedCall]:
        """Every generation submission (any flavour), optionally only those with ``track_id``."""
        return [c for c in self.requests if _is_submission(c, track_id)]

    def fetches(self, job_id: int | str | None = None) -> list[RecordedCall]:
        """Every fetch call (any path), optionally only those asking for ``job_id``."""
        calls = [c for c in self.requests if c.method == "POST" and _FETCH_PATH.match(c.path)]
        if job_id is None:
            return calls
        return [c for c in calls if c.job_id == str(job_id)]

    @property
    def unmatched(self) -> list[RecordedCall]:
        """Requests to routes the real API does not have (answered 404)."""
        return [c for c in self.requests if not c.matched]

    def outputs_of(self, job_id: int | str) -> list[str]:
        """The ``output`` URLs of a job, in order (``.base64`` URLs for base64 jobs)."""
        return list(self._job(job_id).outputs)

    def image_bytes(self, url: str) -> bytes:
        """The image behind an output, proxy, future or hosted URL, ready or not.

        For a ``.base64`` URL this is the decoded image, not the base64 text.
        """
        name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        entry = self._images.get(name)
        if entry is None:
            raise KeyError(f"no image of the fake at {url!r}")
        return entry.render()

    async def wait_for_request(
        self,
        path_regex: str | re.Pattern[str],
        predicate: Callable[[RecordedCall], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 10,
    ) -> RecordedCall:
        """The first request from index ``since`` on whose path matches and ``predicate`` holds.

        Re-checked on every arrival and every answer: a predicate may look at ``status``.
        """
        pattern = re.compile(path_regex) if isinstance(path_regex, str) else path_regex

        def find() -> RecordedCall | None:
            for call in self.requests[since:]:
                if pattern.search(call.path) and (predicate is None or predicate(call)):
                    return call
            return None

        def describe() -> str:
            seen = ", ".join(f"{c.method} {c.path} -> {c.status}" for c in self.requests[since:][-10:])
            return f"no request matching {pattern.pattern!r} within {timeout} s; last seen: [{seen}]"

        return await self._wait(find, timeout, describe)

    async def wait_for_submission(
        self,
        track_id: Any = None,
        *,
        since: int = 0,
        timeout: float = 10,
    ) -> RecordedCall:
        """The first generation submission from index ``since`` that has been answered (or reset)."""

        def find() -> RecordedCall | None:
            for call in self.requests[since:]:
                if call.answered and _is_submission(call, track_id):
                    return call
            return None

        return await self._wait(find, timeout, lambda: f"no answered submission within {timeout} s")

    async def wait_for_webhook_delivery(
        self,
        predicate: Callable[[WebhookDelivery], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 10,
    ) -> WebhookDelivery:
        """The first finished webhook delivery from index ``since`` for which ``predicate`` holds."""

        def find() -> WebhookDelivery | None:
            for delivery in self.webhook_deliveries[since:]:
                if predicate is None or predicate(delivery):
                    return delivery
            return None

        return await self._wait(
            find, timeout, lambda: f"no webhook delivery within {timeout} s (seen {len(self.webhook_deliveries)})"
        )

    async def _wait(self, find: Callable[[], _T | None], limit: float, describe: Callable[[], str]) -> _T:
        try:
            async with asyncio.timeout(limit):
                while True:
                    found = find()
                    if found is not None:
                        return found
                    event = asyncio.Event()
                    self._waiters.add(event)
                    try:
                        await event.wait()
                    finally:
                        self._waiters.discard(event)
        except TimeoutError:
            raise TimeoutError(describe()) from None

    def _notify(self) -> None:
        for event in self._waiters:
            event.set()

    # ---------------------------------------------------------------- plumbing

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        parsed: Any = None
        if raw:
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
        call = RecordedCall(
            method=request.method,
            path=request.path,
            json=parsed,
            at=time.monotonic(),
            query=dict(request.query),
            body=raw,
        )
        self.requests.append(call)
        self._calls[id(request)] = call
        self._notify()
        try:
            resp = await handler(request)
            if not call.aborted:
                call.status = resp.status
                call.response = _response_payload(resp)
            return resp
        finally:
            self._calls.pop(id(request), None)
            call.answered_at = time.monotonic()
            self._notify()

    def _call(self, request: web.Request) -> RecordedCall:
        return self._calls[id(request)]

    def _json(self, body: Any, status: int = 200) -> web.Response:
        return web.json_response(body, status=status)

    def _error(self, message: str | Mapping[str, Any], status: int, key: str = "message") -> web.Response:
        return self._json({"status": "error", key: message}, status)

    def _soft_status(self, modern: int) -> int:
        return modern if self.error_codes == "modern" else 200

    async def _send(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Write ``resp`` now, so that work done afterwards happens after the client has it."""
        with contextlib.suppress(ConnectionError):
            await resp.prepare(request)
            await resp.write_eof()
        return resp

    def _abort(self, request: web.Request) -> web.StreamResponse:
        self._call(request).aborted = True
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=499)  # never reaches the client

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the fake stops first; False when it stopped."""
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return True
        return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closing.is_set():
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fake ModelsLab background task failed", exc_info=exc)

    def _job(self, job_id: int | str) -> FakeJob:
        try:
            return self.jobs[str(job_id)]
        except KeyError:
            raise KeyError(f"the fake has no job {job_id!r}") from None

    def _key_error(self, key: Any, *, billable: bool) -> web.Response | None:
        if not isinstance(key, str) or (key not in self.valid_keys and key not in self.broke_keys):
            return self._error("Invalid API key", 401)
        if billable and key in self.broke_keys:
            return self._error("Insufficient credits. Please recharge your wallet to continue.", 402)
        return None

    async def _plain_answer(
        self, request: web.Request, behaviour: ErrorAnswer | RawAnswer | Reset
    ) -> web.StreamResponse:
        if isinstance(behaviour, Reset):
            return self._abort(request)
        if isinstance(behaviour, RawAnswer):
            return web.Response(
                status=behaviour.http_status,
                body=behaviour.body.encode(),
                headers={"Content-Type": behaviour.content_type},
            )
        body: dict[str, Any] = {"status": behaviour.status, behaviour.key: behaviour.message}
        if behaviour.retry_after is not None:
            body["retry_after"] = behaviour.retry_after
        body.update(behaviour.extra_fields)
        return self._json(body, behaviour.http_status)

    # ---------------------------------------------------------------- generation

    def _generation_handler(self, flavour: Flavour, kind: Kind) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            head = self._script[0] if self._script else None
            if head is not None and not _is_job_behaviour(head):
                self._script.popleft()
                return await self._answer_submission(request, flavour, kind, head)
            if head is None and not _is_job_behaviour(self.default_behaviour):
                return await self._answer_submission(request, flavour, kind, self.default_behaviour)
            return await self._run_job(request, flavour, kind, None)

        return handler

    async def _answer_submission(
        self, request: web.Request, flavour: Flavour, kind: Kind, behaviour: Behaviour
    ) -> web.StreamResponse:
        if isinstance(behaviour, Hang):
            if not await self._sleep(behaviour.seconds):
                return self._abort(request)
            then = behaviour.then
            if then is None:
                then = self.default_behaviour if not isinstance(self.default_behaviour, Hang) else Immediate()
            return await self._answer_submission(request, flavour, kind, then)
        if isinstance(behaviour, Immediate | Queued):
            return await self._run_job(request, flavour, kind, behaviour)
        return await self._plain_answer(request, behaviour)

    async def _run_job(
        self, request: web.Request, flavour: Flavour, kind: Kind, explicit: Immediate | Queued | None
    ) -> web.StreamResponse:
        call = self._call(request)
        body = call.json
        if not isinstance(body, dict):
            return self._error("Invalid JSON body", 400)
        if (refusal := self._key_error(body.get("key"), billable=True)) is not None:
            return refusal
        key = str(body["key"])
        if self.validate and (errors := self._validate(flavour, kind, body)):
            return self._error(errors, self._soft_status(400), key="messege")
        model_id = body.get("model_id")
        if kind != "super_resolution" or model_id not in (None, ""):
            allowed = self.known_models if kind != "super_resolution" else [*self.known_models, *UPSCALE_MODELS]
            if model_id not in allowed:
                return self._error("Model not found", self._soft_status(404))
        fingerprint = self._fingerprint(request.path, key, body)
        if self.spam_filter and self._is_spam(fingerprint):
            return self._error(
                "Rate limit exceeded, the same request was sent again too soon (spam filter).",
                self._soft_status(429),
            )
        current = self._queued.get(key, 0)
        if self.max_queued is not None and current >= self.max_queued:
            if self.enforce_max_queued:
                message = f"Rate limit exceeded. Maximum {self.max_queued} queued requests allowed."
                return self._json({"status": "error", "message": message, "retry_after": self.retry_after}, 429)
            self.limit_violations += 1
        self._spam_seen[fingerprint] = time.monotonic()

        behaviour: Immediate | Queued
        if explicit is not None:
            behaviour = explicit
        else:
            head = self._script[0] if self._script else None
            if isinstance(head, Immediate | Queued):
                self._script.popleft()
                behaviour = head
            elif isinstance(self.default_behaviour, Immediate | Queued):
                behaviour = self.default_behaviour
            else:  # pragma: no cover - the handler routes these elsewhere
                behaviour = Immediate()

        self._reserve(key)
        try:
            job = await self._create_job(flavour, kind, key, body, behaviour)
        except BaseException:
            self._release(key)
            raise
        call.job_id = job.id
        if isinstance(behaviour, Immediate):
            return await self._answer_immediate(request, job, behaviour)
        return await self._answer_queued(request, job, behaviour)

    def _validate(self, flavour: Flavour, kind: Kind, body: dict[str, Any]) -> dict[str, list[str]]:
        errors: dict[str, list[str]] = {}

        def add(name: str, message: str) -> None:
            errors.setdefault(name, []).append(message)

        def missing(name: str) -> bool:
            value = body.get(name)
            return value is None or (isinstance(value, str) and not value.strip())

        if kind in ("text2img", "img2img"):
            for name in ("prompt", "model_id"):
                if missing(name):
                    add(name, f"The {name.replace('_', ' ')} field is required.")
        image_field = "url" if (kind == "super_resolution" and flavour == "enterprise") else "init_image"
        if kind != "text2img" and missing(image_field):
            add(image_field, f"The {image_field.replace('_', ' ')} field is required.")
        for name, low, high in (("width", 1, 1024), ("height", 1, 1024), ("samples", 1, 4)):
            value = body.get(name)
            if value is None or value == "":
                continue
            number = _to_int(value)
            if number is None:
                add(name, f"The {name} must be a number.")
            elif number > high:
                add(name, f"The {name} may not be greater than {high}.")
            elif number < low:
                add(name, f"The {name} must be at least {low}.")
        seed = body.get("seed")
        if seed not in (None, "") and _to_int(seed) is None:
            add("seed", "The seed must be an integer.")
        scheduler = body.get("scheduler")
        if scheduler not in (None, "") and scheduler not in SCHEDULERS:
            add("scheduler", "The selected scheduler is invalid.")
        return errors

    @staticmethod
    def _fingerprint(path: str, key: str, body: dict[str, Any]) -> tuple[str, str, str]:
        payload = {k: v for k, v in body.items() if k not in ("key", "webhook", "track_id")}
        return key, path, json.dumps(payload, sort_keys=True, default=str)

    def _is_spam(self, fingerprint: tuple[str, str, str]) -> bool:
        """Whether the same payload was accepted from the same key within ``spam_window`` seconds."""
        last = self._spam_seen.get(fingerprint)
        return last is not None and time.monotonic() - last < self.spam_window

    def _reserve(self, key: str) -> None:
        count = self._queued.get(key, 0) + 1
        self._queued[key] = count
        self.peak_queued[key] = max(self.peak_queued.get(key, 0), count)

    def _release(self, key: str) -> None:
        self._queued[key] = max(0, self._queued.get(key, 0) - 1)

    async def _create_job(
        self, flavour: Flavour, kind: Kind, key: str, body: dict[str, Any], behaviour: Immediate | Queued
    ) -> FakeJob:
        self._next_id += 1
        number = self._next_id
        answer_id: int | str
        if behaviour.id_as == "int":
            answer_id = number
        elif behaviour.id_as == "str":
            answer_id = str(number)
        else:
            answer_id = f"req-{uuid.uuid4().hex[:16]}"
        job_id = str(answer_id)

        seed = _to_int(body.get("seed"))
        if seed is None:
            seed = random.randrange(2**32)
        samples = 1 if kind == "super_resolution" else min(4, max(1, _to_int(body.get("samples")) or 1))
        source: bytes | None = None
        meta: dict[str, Any]
        if kind == "super_resolution":
            image_ref = body.get("url") if flavour == "enterprise" else body.get("init_image")
            scale = min(4, max(1, _to_int(body.get("scale")) or 4))
            loaded = await self._load_image(image_ref)
            base_size = loaded[1] if loaded else (512, 512)
            source = loaded[0] if loaded else None
            size = (base_size[0] * scale, base_size[1] * scale)
            meta = {
                "model_id": body.get("model_id") or "RealESRGAN_x4plus",
                "scale": scale,
                "face_enhance": body.get("face_enhance", False),
                "init_image": image_ref,
                "W": size[0],
                "H": size[1],
                "seed": seed,
            }
        else:
            width = _to_int(body.get("width")) or 512
            height = _to_int(body.get("height")) or 512
            if kind == "img2img":
                loaded = await self._load_image(body.get("init_image"))
                width, height = loaded[1] if loaded else (512, 512)
            factor = 1 if body.get("model_id") == "flux" else _upscale_factor(body.get("upscale"))
            size = (width * factor, height * factor)
            default_steps = 21 if flavour == "enterprise" else 20
            meta = {
                "prompt": body.get("prompt"),
                "model_id": body.get("model_id"),
                "negative_prompt": body.get("negative_prompt"),
                "scheduler": body.get("scheduler") or "UniPCMultistepScheduler",
                "safetychecker": body.get("safety_checker", "no"),
                "W": width,
                "H": height,
                "guidance_scale": _to_float(body.get("guidance_scale"), 7.5),
                "seed": seed,
                "steps": _to_int(body.get("num_inference_steps")) or default_steps,
                "n_samples": samples,
                "full_url": "no",
                "instant_response": "no",
                "tomesd": body.get("tomesd", "yes"),
                "upscale": body.get("upscale", "no"),
                "multi_lingual": body.get("multi_lingual", "no"),
                "panorama": body.get("panorama", "no"),
                "self_attention": body.get("self_attention", "no"),
                "use_karras_sigmas": body.get("use_karras_sigmas", "yes"),
                "algorithm_type": body.get("algorithm_type", "none"),
                "safety_checker_type": body.get("safety_checker_type", "sensitive_content_text"),
                "embeddings": body.get("embeddings_model"),
                "vae": body.get("vae"),
                "lora": body.get("lora_model"),
                "lora_strength": body.get("lora_strength"),
                "clip_skip": _to_int(body.get("clip_skip")) or 1,
                "temp": body.get("temp", "no"),
                "base64": body.get("base64", "no"),
            }
            if kind == "img2img":
                meta["init_image"] = body.get("init_image")
                meta["strength"] = _to_float(body.get("strength"), 0.7)
        prefix = str(uuid.uuid4())
        meta["file_prefix"] = prefix
        meta["outdir"] = "out"

        as_base64 = _yes(body.get("base64"))
        outputs: list[str] = []
        proxies: list[str] = []
        for index in range(samples):
            name = f"{prefix}-{index}.{'base64' if as_base64 else behaviour.output_ext}"
            self._images[name] = _ImageEntry(
                job_id=job_id,
                ext=behaviour.output_ext,
                size=size,
                colour=(0, 0, 0) if behaviour.nsfw else colour_for(seed, index),
                source=source,
                as_base64=as_base64,
                base64_prefix=behaviour.base64_prefix,
                html_first=behaviour.base64_html_first,
            )
            outputs.append(f"{self.base_url}/generations/{name}")
            proxies.append(f"{self.base_url}/cdn/generations/{name}")

        webhook = body.get("webhook")
        job = FakeJob(
            id=job_id,
            answer_id=answer_id,
            key=key,
            flavour=flavour,
            kind=kind,
            behaviour=behaviour,
            request=dict(body),
            seed=seed,
            size=size,
            outputs=outputs,
            proxy_outputs=proxies,
            meta=meta,
            webhook=webhook if isinstance(webhook, str) and webhook else None,
            track_id=body.get("track_id"),
            submitted_at=time.monotonic(),
        )
        self.jobs[job_id] = job
        return job

    async def _load_image(self, ref: Any) -> tuple[bytes, tuple[int, int]] | None:
        """Fetch an init image the way the service would: URL, data URI or bare base64."""
        if not isinstance(ref, str) or not ref.strip():
            return None
        data: bytes | None = None
        if ref.startswith("data:"):
            with contextlib.suppress(binascii.Error, ValueError):
                data = base64.b64decode(ref.partition(",")[2], validate=True)
        elif not ref.startswith(("http://", "https://")):
            with contextlib.suppress(binascii.Error, ValueError):
                data = base64.b64decode(ref, validate=True)
        elif ref.startswith(self.base_url + "/"):
            name = ref.split("?", 1)[0].rsplit("/", 1)[-1]
            entry = self._images.get(name)
            if entry is not None and self._ready(entry):
                data = await asyncio.to_thread(entry.render)
        elif self._session is not None:
            try:
                async with self._session.get(ref, timeout=_INIT_IMAGE_TIMEOUT) as resp:
                    if resp.status == 200:
                        data = await resp.read()
            except (ClientError, TimeoutError) as exc:
                log.info("fake ModelsLab could not fetch init image %s: %r", ref, exc)
        if data is None:
            return None
        size = _image_size(data)
        return (data, size) if size is not None else None

    def _submit_success_body(self, job: FakeJob, behaviour: Immediate) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "success",
            "generationTime": behaviour.generation_time,
            "id": job.answer_id,
            "output": job.output_field(),
        }
        if behaviour.proxy_links == "list":
            body["proxy_links"] = list(job.proxy_outputs)
        elif behaviour.proxy_links == "dict":
            body["proxy_links"] = {str(i): url for i, url in enumerate(job.proxy_outputs)}
        elif behaviour.proxy_links == "str":
            body["proxy_links"] = job.proxy_outputs[0]
        body["nsfw_content_detected"] = behaviour.nsfw
        body["webhook_status"] = ""
        if behaviour.with_meta:
            body["meta"] = dict(job.meta)
        if behaviour.tip is not None:
            body["tip"] = behaviour.tip
        body.update(behaviour.extra_fields)
        return body

    def _fetch_result_url(self, job: FakeJob) -> str:
        if job.flavour == "enterprise":
            return f"{self.base_url}/api/v1/enterprise/images/fetch/{job.id}"
        return f"{self.base_url}/api/v6/images/fetch/{job.id}"

    def _processing_body(self, job: FakeJob, behaviour: Queued) -> dict[str, Any]:
        if behaviour.form == "slim":
            body: dict[str, Any] = {
                "status": "processing",
                "id": job.answer_id,
                "eta": behaviour.eta,
                "message": "Your request is being processed",
            }
        else:
            body = {"status": "processing"}
            if behaviour.tip is not None:
                body["tip"] = behaviour.tip
                body["tip_1"] = TIP_1
            body.update(
                {
                    "eta": behaviour.eta,
                    "messege": "Try to fetch request after seconds estimated",
                    "fetch_result": self._fetch_result_url(job),
                    "id": job.answer_id,
                    "output": [],
                    "meta": {**job.meta, "id": job.id},
                    "future_links": list(job.outputs),
                    "webhook_status": "",
                }
            )
        body.update(behaviour.extra_fields)
        return body

    async def _answer_immediate(self, request: web.Request, job: FakeJob, behaviour: Immediate) -> web.StreamResponse:
        self._finish(job, deliver=False)
        if behaviour.webhook == "before_response":
            await self._deliver_webhooks(job, times=1)
        resp = await self._send(request, self._json(self._submit_success_body(job, behaviour)))
        if behaviour.webhook != "before_response":
            self._schedule_webhooks(job)
        return resp

    async def _answer_queued(self, request: web.Request, job: FakeJob, behaviour: Queued) -> web.StreamResponse:
        if behaviour.webhook == "before_response":
            self._finish(job, deliver=False)
            await self._deliver_webhooks(job, times=1)
        elif behaviour.ready_after_seconds is not None:
            loop = asyncio.get_running_loop()
            job.timer = loop.call_later(behaviour.ready_after_seconds, self._finish, job)
        resp = await self._send(request, self._json(self._processing_body(job, behaviour)))
        if behaviour.ready_after_fetches == 0:
            self._finish(job)
        return resp

    def _finish(self, job: FakeJob, outcome: Outcome | None = None, *, deliver: bool = True) -> None:
        if job.finished:
            return
        job.state = outcome or job.outcome
        job.finished_at = time.monotonic()
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        self._release(job.key)
        self._notify()
        if deliver:
            self._schedule_webhooks(job)

    # ---------------------------------------------------------------- webhooks

    def _schedule_webhooks(self, job: FakeJob) -> None:
        mode = job.behaviour.webhook
        if job.webhook is None or mode in ("never", "before_response"):
            return
        self._spawn(self._deliver_webhooks(job, times=2 if mode == "twice" else 1))

    def _webhook_body(self, job: FakeJob) -> dict[str, Any]:
        behaviour = job.behaviour
        top = behaviour.track_id_in in ("top", "both")
        in_meta = behaviour.track_id_in in ("meta", "both")
        if job.state == "success":
            meta = {**job.meta, "track_id": job.track_id} if in_meta else dict(job.meta)
            body: dict[str, Any] = {
                "status": "success",
                "id": job.answer_id,
                "output": job.output_field(),
                "generationTime": behaviour.generation_time,
            }
            if top:
                body["track_id"] = job.track_id
            body["meta"] = meta
            return body
        reason = behaviour.failure_message if isinstance(behaviour, Queued) else None
        reason = reason or "the model could not be loaded"
        body = {"status": "failed", "id": job.answer_id, "message": f"Processing failed: {reason}"}
        if top:
            body["track_id"] = job.track_id
        if in_meta:
            body["meta"] = {**job.meta, "track_id": job.track_id}
        return body

    async def _deliver_webhooks(self, job: FakeJob, *, times: int) -> None:
        if job.webhook is None:
            return
        if job.behaviour.webhook_delay > 0 and not await self._sleep(job.behaviour.webhook_delay):
            return
        body = self._webhook_body(job)
        for attempt in range(1, times + 1):
            await self._post_webhook(job, job.webhook, body, attempt)

    async def _post_webhook(self, job: FakeJob, url: str, body: dict[str, Any], attempt: int) -> None:
        delivery = WebhookDelivery(url=url, job_id=job.id, body=body, attempt=attempt, at=time.monotonic())
        try:
            if self._session is None:
                raise RuntimeError("fake ModelsLab is stopped")
            async with self._session.post(url, json=body, timeout=_WEBHOOK_TIMEOUT) as resp:
                delivery.status = resp.status
                delivery.response_text = await resp.text(errors="replace")
        except (ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            delivery.error = repr(exc)
        delivery.finished_at = time.monotonic()
        self.webhook_deliveries.append(delivery)
        self._notify()

    # ---------------------------------------------------------------- fetch

    def _fetch_handler(self, flavour: Flavour) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            call = self._call(request)
            body = call.json if isinstance(call.json, dict) else {}
            raw_id = request.match_info.get("id") or body.get("request_id")
            job_id = None if raw_id in (None, "") else str(raw_id)
            call.job_id = job_id
            fault = self._take_fetch_fault(job_id)
            if fault is not None:
                return await self._answer_fetch_fault(request, flavour, job_id, fault)
            return await self._answer_fetch(request, flavour, job_id)

        return handler

    def _take_fetch_fault(self, job_id: str | None) -> FetchFault | None:
        for fault in self._fetch_faults:
            if fault.job_id is None or fault.job_id == job_id:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fetch_faults.remove(fault)
                return fault.behaviour
        return None

    async def _answer_fetch_fault(
        self, request: web.Request, flavour: Flavour, job_id: str | None, fault: Behaviour
    ) -> web.StreamResponse:
        if isinstance(fault, Hang):
            if not await self._sleep(fault.seconds):
                return self._abort(request)
            if fault.then is None:
                return await self._answer_fetch(request, flavour, job_id)
            return await self._answer_fetch_fault(request, flavour, job_id, fault.then)
        if isinstance(fault, Immediate | Queued):  # pragma: no cover - refused by fail_fetches
            raise TypeError("a fetch fault cannot create a job")
        return await self._plain_answer(request, fault)

    async def _answer_fetch(self, request: web.Request, flavour: Flavour, job_id: str | None) -> web.StreamResponse:
        call = self._call(request)
        body = call.json
        if not isinstance(body, dict):
            return self._error("Invalid JSON body", 400)
        if (refusal := self._key_error(body.get("key"), billable=False)) is not None:
            return refusal
        if job_id is None:
            return self._error({"request_id": ["The request id field is required."]}, self._soft_status(400), "messege")
        job = self.jobs.get(job_id)
        if job is None or job.flavour != flavour or job.key != body.get("key"):
            return self._error("Request not found", self._soft_status(404), "messege")
        behaviour = job.behaviour
        if job.state == "queued":
            job.fetch_count += 1
            waiting = behaviour.output_when_waiting if isinstance(behaviour, Queued) else ""
            status = behaviour.fetch_status_while_waiting if isinstance(behaviour, Queued) else "processing"
            answer = {
                "status": status,
                "messege": "try again later.",
                "output": waiting if isinstance(waiting, str) else list(waiting),
            }
            resp = await self._send(request, self._json(answer))
            if isinstance(behaviour, Queued):
                threshold = behaviour.ready_after_fetches
                if threshold is not None and job.fetch_count >= threshold:
                    self._finish(job)
            return resp
        if job.state == "success":
            success: dict[str, Any] = {"status": "success", "id": job.answer_id, "output": job.output_field()}
            if behaviour.fetch_with_meta:
                success["generationTime"] = behaviour.generation_time
                success["meta"] = dict(job.meta)
            return self._json(success)
        failure = behaviour.failure_message if isinstance(behaviour, Queued) else None
        if job.state == "failed":
            return self._json({"status": "failed", "id": "", "message": failure or "Failed, Try Again", "output": ""})
        return self._json({"status": "error", "messege": failure or "Something went wrong, please try again."})

    # ---------------------------------------------------------------- other endpoints

    async def _model_list(self, request: web.Request) -> web.StreamResponse:
        body = self._call(request).json
        if (
            refusal := self._key_error(body.get("key") if isinstance(body, dict) else None, billable=False)
        ) is not None:
            return refusal
        models = []
        for model_id in self.known_models:
            name = f"screenshot-{hashlib.sha1(model_id.encode()).hexdigest()[:12]}.jpg"
            if name not in self._images:
                self._images[name] = _ImageEntry(job_id=None, ext="jpg", size=(64, 64), colour=colour_for(0, len(name)))
            models.append(
                {
                    "model_id": model_id,
                    "model_name": model_id.replace("-", " ").title(),
                    "status": "model_ready",
                    "description": f"Fake model {model_id}",
                    "screenshots": f"{self.base_url}/generations/{name}",
                    "model_category": "stable_diffusion",
                    "is_nsfw": "0",
                    "featured": "yes",
                    "api_calls": "1000",
                }
            )
        return self._json(models)

    async def _request_count(self, request: web.Request) -> web.StreamResponse:
        body = self._call(request).json
        key = body.get("key") if isinstance(body, dict) else None
        if (refusal := self._key_error(key, billable=False)) is not None:
            return refusal
        assert isinstance(key, str)
        now = time.monotonic()
        recent = self._request_count_calls.setdefault(key, deque())
        while recent and now - recent[0] >= 60:
            recent.popleft()
        if len(recent) >= self.request_count_per_minute:
            limit = self.request_count_per_minute
            return self._json(
                {
                    "status": "error",
                    "message": f"Rate limit exceeded. Maximum {limit} requests per minute allowed.",
                    "retry_after": max(1, round(60 - (now - recent[0]))),
                },
                429,
            )
        recent.append(now)
        return self._json({"status": "success", "processing_count": self.queued(key)})

    async def _system_details(self, request: web.Request) -> web.StreamResponse:
        body = self._call(request).json
        key = body.get("key") if isinstance(body, dict) else None
        if (refusal := self._key_error(key, billable=False)) is not None:
            return refusal
        assert isinstance(key, str)
        return self._json({"model_count": len(self.known_models), "queue_time": 2.5 * self.queued(key), "status": "ok"})

    def _ready(self, entry: _ImageEntry) -> bool:
        if entry.job_id is None:
            return True
        job = self.jobs.get(entry.job_id)
        return job is not None and job.state == "success"

    async def _image(self, request: web.Request) -> web.StreamResponse:
        entry = self._images.get(request.match_info["name"])
        if entry is None:
            return web.Response(status=404, text="Not Found")
        entry.gets += 1
        if entry.as_base64 and entry.gets <= entry.html_first:
            return web.Response(text=NOT_READY_HTML, content_type="text/html")
        if not self._ready(entry):
            return web.Response(status=404, text="Not Found")
        data = entry.data if entry.data is not None else await asyncio.to_thread(entry.render)
        if entry.as_base64:
            text = base64.b64encode(data).decode("ascii")
            if entry.base64_prefix:
                text = f"data:{_CONTENT_TYPES[entry.ext]};base64,{text}"
            return web.Response(text=text, content_type="text/plain")
        return web.Response(body=data, content_type=_CONTENT_TYPES[entry.ext])

    async def _unmatched(self, request: web.Request) -> web.StreamResponse:
        self._call(request).matched = False
        return self._error("Not Found", 404)


@contextlib.asynccontextmanager
async def running_fake_modelslab(**kwargs: Any) -> AsyncIterator[FakeModelsLab]:
    """Start a :class:`FakeModelsLab` (same keyword arguments) and stop it afterwards."""
    fake = FakeModelsLab(**kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
