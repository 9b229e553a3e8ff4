"""The webhook receiver: a small aiohttp app that ModelsLab calls when a job is done.

It is an open door on the internet, so it authenticates every call by the job's own URL token,
refuses anything that is not a small JSON object naming that same job, changes nothing itself,
and hands the job to `JobService.on_webhook`, which confirms with a fetch before trusting anything.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from bot.web.signing import INPUT_PATH_PREFIX, INPUT_PURPOSE, WEBHOOK_PATH_PREFIX, WebhookSigner

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT = 10.0  # seconds for a webhook's whole body (at most 1 MiB of JSON) once its head has come
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class WebhookJobs(Protocol):
    """What the receiver needs from the job service."""

    async def input_image(self, job_id: str) -> bytes | None: ...

    async def on_webhook(self, job_id: str, payload: Mapping[str, Any]) -> bool:
        """Take the (authenticated, well-formed) callback; False if there is no such job."""
        ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ModelsLabWebhookHandler:
    def __init__(self, jobs: WebhookJobs, signer: WebhookSigner) -> None:
        self._jobs = jobs
        self._signer = signer

    async def receive(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        token = request.match_info["token"]
        if not _JOB_ID.match(job_id) or not self._signer.verify(job_id, token):
            return _error(401, "invalid token")
        # Whether the job exists is asked once the body is read, in the same read that takes the callback: only
        # the bot can sign a job's URL, and it signs only jobs it stored.
        try:
            async with asyncio.timeout(BODY_TIMEOUT):  # a body sent a byte at a time does not hold the receiver
                body = await request.read()  # the whole body, however it was split; client_max_size caps it
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "body too large")
        except TimeoutError:
            return _error(408, "body too slow")
        except ConnectionError:
            return _error(400, "unreadable body")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body is not JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
            return _error(400, "body must be a JSON object with a status")
        named = _named_track_ids(payload)
        if named and any(track_id != job_id for track_id in named):
            return _error(409, "track_id does not match this URL's job")
        if not await self._jobs.on_webhook(job_id, payload):
            return _error(404, "unknown job")
        return web.json_response({"ok": True})


def _named_track_ids(payload: Mapping[str, Any]) -> list[str]:
    """`track_id` may sit at the top level or inside `meta`; a body may name none."""
    found = []
    for where in (payload, payload.get("meta")):
        if isinstance(where, dict) and where.get("track_id") not in (None, ""):
            found.append(str(where["track_id"]))
    return found


class InputImageHandler:
    """Serves a job's normalised input image to ModelsLab, at the job's own unguessable URL."""

    def __init__(self, jobs: WebhookJobs, signer: WebhookSigner) -> None:
        self._jobs = jobs
        self._signer = signer

    async def serve(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        token = request.match_info["token"]
        if not _JOB_ID.match(job_id) or not self._signer.verify(job_id, token, INPUT_PURPOSE):
            return _error(404, "not found")
        image = await self._jobs.input_image(job_id)
        if image is None:
            return _error(404, "not found")
        return web.Response(body=image, content_type="image/png", headers={"Cache-Control": "no-store"})


@web.middleware
async def one_request_per_connection(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """`Connection: close` on every answer (set before the headers are written, so the client knows): no kept-alive
    socket to hold open, and the connection guard's deadlines (bot.web.connection_guard) cover a connection's one
    request from its first byte to its answer."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.force_close()
        raise
    response.force_close()
    return response


def create_app(
    jobs: WebhookJobs,
    signer: WebhookSigner,
    *,
    health: Callable[[], Awaitable[bool]] | None = None,
    metrics: Callable[[], str] | None = None,
    metrics_token: str | None = None,
) -> web.Application:
    """The receiver. `/metrics` exists only with a `metrics_token`, and answers only to `Authorization: Bearer
    <metrics_token>`; `/healthz` is public (it says only whether the bot is up)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[one_request_per_connection])
    handler = ModelsLabWebhookHandler(jobs, signer)
    app.router.add_post(WEBHOOK_PATH_PREFIX + "/{job_id}/{token}", handler.receive)
    app.router.add_get(INPUT_PATH_PREFIX + "/{job_id}/{token}.png", InputImageHandler(jobs, signer).serve)

    async def healthz(request: web.Request) -> web.Response:
        ok = await health() if health is not None else True
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    app.router.add_get("/healthz", healthz)

    if metrics_token:
        expected = f"Bearer {metrics_token}".encode()

        async def metrics_page(request: web.Request) -> web.Response:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):  # in constant time: the token cannot be guessed bytewise
                return web.json_response(
                    {"error": "send Authorization: Bearer <METRICS_TOKEN>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
            text = metrics() if metrics is not None else ""
            return web.Response(
                text=text,
                content_type="text/plain",
                charset="utf-8",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
            )

        app.router.add_get("/metrics", metrics_page)
    return app
