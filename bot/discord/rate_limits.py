"""Discord's answers about the bot's pace: its 429s and a ban, seen on every request, told to the operator.

What discord.py 2.7 already does (`discord/http.py`, `HTTPClient.request` and `Ratelimit`; `discord/webhook/
async_.py`, `AsyncWebhookAdapter.request`, which sends interaction callbacks and interaction-webhook edits):

- it learns each route's bucket from `X-RateLimit-Bucket` and keeps one per bucket and top-level resource, reads
  `X-RateLimit-Limit`, `-Remaining` and `-Reset-After`, and waits before sending when a bucket is empty (the
  webhook adapter: one lock per webhook token, held for `-Reset-After` once `-Remaining` is 0);
- on a 429 with a `Via` header and a JSON body it sleeps `retry_after` and tries again (5 tries in all); with
  `"global": true` it holds every request of the bot until then (the webhook adapter does not);
- it never reads `X-RateLimit-Scope`: a `shared` 429 is waited out like the others;
- a 429 without `Via`, or with a body that is not JSON, it takes for Cloudflare's ban ("Banned by Cloudflare more
  than likely") and raises `HTTPException` at once, without waiting: so does a 429 that a REST proxy made up itself
  (nirn-proxy answers `generated-by-proxy: true`, `retry-after: 1`, without `Via`, when a node of its cluster
  fails; https://github.com/germanoeich/nirn-proxy). A 408 (a proxy timed out waiting for Discord) is raised too.

What this module adds. `DiscordWatch` sees every answer through aiohttp's trace hooks (discord.py's `http_trace`,
which covers its REST session and the interaction calls alike) and, for each 429, writes one log line and counts
it in `imagine_discord_rate_limited_total{scope}`: `user`, `shared`, `global`, `proxy` (a proxy's own) or `ban`.
A ban (Discord's edge refuses every request for about an hour after 10,000 invalid requests in 10 minutes) is told
once when it starts and once when it ends, and `imagine_discord_banned` is 1 meanwhile. While it lasts, the bot's
own calls wait their turn (`wait_turn`): one at a time, ever further apart, so that its retries do not pile up.
`classify` says what an `HTTPException` means for a message the bot wanted to show: try again later, or never.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

import aiohttp

from bot.jobs.ports import PresentationDeferred, PresentationRefused
from bot.web.metrics import Metrics

log = logging.getLogger(__name__)

BAN = "ban"
PROXY = "proxy"
_TOKENS = (re.compile(r"(/webhooks/\d+/)[^/?]+"), re.compile(r"(/interactions/\d+/)[^/?]+"))
_API_PREFIX = re.compile(r"^.*?/api/v\d+")
_SCOPES = {
    "user": "scope user: the bot's own limit on this route",
    "shared": "scope shared: a limit of the resource, shared with others",
    "global": "scope global: the bot's requests a second, every request waits",
}


def route_of(method: str, path: str) -> str:
    """The request as it may be logged: the API prefix dropped, interaction and webhook tokens left out."""
    path = _API_PREFIX.sub("", path)
    for pattern in _TOKENS:
        path = pattern.sub(r"\1{token}", path)
    return f"{method} {path}"


def rate_limit_scope(status: int, headers: Mapping[str, str]) -> str | None:
    """For a 429: `user`, `shared` or `global` (Discord's scopes), `proxy` (made up by a REST proxy) or `ban`
    (Cloudflare's answer to a banned IP: no `Via`, which every answer through Discord's front carries); None for
    any other answer."""
    if status != 429:
        return None
    if headers.get("generated-by-proxy", "").lower() == "true":
        return PROXY
    if not headers.get("Via"):
        return BAN
    scope = headers.get("X-RateLimit-Scope", "").lower()
    if scope == "global" or headers.get("X-RateLimit-Global", "").lower() == "true":
        return "global"
    return "shared" if scope == "shared" else "user"


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    """How long Discord said to wait, from the headers (the body is the library's to read)."""
    for name in ("X-RateLimit-Reset-After", "Retry-After"):
        with contextlib.suppress(TypeError, ValueError):
            return max(float(headers.get(name, "")), 0.0)
    return None


def classify(status: int, headers: Mapping[str, str], text: str) -> Exception | None:
    """What a refused request means for a message the bot wanted to show: `PresentationDeferred` (try the same
    again later: any 429, including a ban or a proxy's own; a 408 timeout), `PresentationRefused` (another 4xx:
    it will never be taken), or None (a 5xx: tried again like any passing fault)."""
    scope = rate_limit_scope(status, headers)
    if scope == BAN:
        return PresentationDeferred("Discord refuses every request for now (a ban)")
    if scope is not None:
        wait = retry_after_of(headers)
        return PresentationDeferred(f"rate limited by {'a proxy' if scope == PROXY else 'Discord'}", retry_after=wait)
    if status == 408:
        return PresentationDeferred("Discord did not answer in time (408)")
    if 400 <= status < 500:
        return PresentationRefused(f"{status} {text}".strip())
    return None


ALREADY_ACKNOWLEDGED = 40060  # Discord's code for a second callback to one interaction


class AckFailure(enum.Enum):
    """What a failed acknowledgement (an interaction callback) means for the member."""

    DELIVERED = "delivered"  # Discord says the interaction is answered already: an earlier try got through
    UNKNOWN = "unknown"  # it may have got through: look for the message before saying anything
    NOT_SENT = "not sent"  # refused before it reached Discord (a proxy's own 429, a rate limit): may be sent again
    REFUSED = "refused"  # the member saw nothing, and sending it again cannot help (a ban, another 4xx)


def acknowledgement_failure(
    status: int | None, code: int | None, headers: Mapping[str, str]
) -> tuple[AckFailure, float]:
    """What a failed interaction callback means, and how long to wait before sending it again (`NOT_SENT`).

    `status` None is no answer at all (a timeout, a connection lost): like a 408 (a proxy gave up waiting for
    Discord) or a 5xx, the callback may have reached Discord. discord.py sends a callback again itself after a 5xx,
    and a second callback to an interaction that got the first is refused with `ALREADY_ACKNOWLEDGED`: the first
    one was shown.
    """
    if status is None or status == 408 or status >= 500:
        return AckFailure.UNKNOWN, 0.0
    if status == 400 and code == ALREADY_ACKNOWLEDGED:
        return AckFailure.DELIVERED, 0.0
    scope = rate_limit_scope(status, headers)
    if scope is not None and scope != BAN:
        wait = retry_after_of(headers)
        return AckFailure.NOT_SENT, wait if wait is not None else 1.0
    return AckFailure.REFUSED, 0.0


class DiscordWatch:
    """Sees every answer from Discord: counts and tells its 429s, knows when the bot is banned, and spaces the
    bot's own calls while it is."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        probe_delays: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._probe_delays = tuple(probe_delays) or (1.0,)
        self._clock = clock
        self._banned_since: float | None = None
        self._refused_while_banned = 0
        self._probes = 0
        self._next_probe_at = 0.0
        self._turns = asyncio.Lock()
        self._lifted = asyncio.Event()
        if metrics is not None:
            metrics.discord_banned = lambda: self.banned

    @property
    def banned(self) -> bool:
        """Discord's edge refuses every request of the bot (as far as the last answer says)."""
        return self._banned_since is not None

    def install(self, trace: aiohttp.TraceConfig) -> None:
        """Watch every answer of the sessions that use `trace` (discord.py's `http_trace`)."""

        async def on_request_end(
            session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
        ) -> None:
            response = params.response
            retry_after = None
            if response.status == 429 and response.content_type == "application/json":
                # The body says how long, to the millisecond (`Retry-After` is rounded up to seconds, and
                # `X-RateLimit-Reset-After` is the bucket's). aiohttp keeps what is read: discord.py reads it again.
                with contextlib.suppress(Exception):
                    body = await response.json()
                    retry_after = float(body["retry_after"])
            self.observe(params.method, params.url.path, response.status, response.headers, retry_after=retry_after)

        trace.on_request_end.append(on_request_end)

    def observe(
        self, method: str, path: str, status: int, headers: Mapping[str, str], *, retry_after: float | None = None
    ) -> None:
        """One answer from Discord (or from a proxy in front of it); `retry_after` from its body, if known."""
        scope = rate_limit_scope(status, headers)
        if scope is not None and self._metrics is not None:
            self._metrics.discord_rate_limited.inc(scope)
        if scope == BAN:
            self._ban_answer(route_of(method, path))
            return
        if scope != PROXY and headers.get("Via") and self.banned:
            self._ban_over()
        if scope is None:
            if status == 408:
                log.warning(
                    "A proxy says Discord did not answer %s in time (408): trying again", route_of(method, path)
                )
            return
        wait = retry_after if retry_after is not None else retry_after_of(headers)
        waiting = f"{wait:.2f} s" if wait is not None else "as long as it says"
        route = route_of(method, path)
        if scope == PROXY:
            log.warning("The REST proxy answered %s with a 429 of its own: trying again in %s", route, waiting)
            return
        log.warning(
            "Discord rate limit (%s) on %s: waiting %s as told, then trying again", _SCOPES[scope], route, waiting
        )

    async def wait_turn(self) -> None:
        """Returns at once unless the bot is banned. While it is, one call at a time goes, each one further apart
        than the last (the probe delays), until one is answered: the others wait for that."""
        if not self.banned:
            return
        async with self._turns:
            while self.banned:
                wait = self._next_probe_at - self._clock()
                if wait <= 0:
                    # This call is the next probe; the one after waits for its answer, or for the next delay.
                    self._next_probe_at = self._clock() + self._probe_delay()
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._lifted.wait()

    # ------------------------------------------------------------------------------------------

    def _probe_delay(self) -> float:
        return self._probe_delays[min(self._probes, len(self._probe_delays) - 1)]

    def _ban_answer(self, route: str) -> None:
        now = self._clock()
        if self._banned_since is None:
            self._banned_since = now
            self._refused_while_banned = 0
            self._probes = 0
            self._lifted.clear()
            log.warning(
                "Discord refuses every request of the bot (%s was answered 429 without Discord's headers: the ban of "
                "this IP that follows 10,000 invalid requests in 10 minutes, for about an hour). Nothing is lost: "
                "results wait and are posted once Discord answers again; until then one request at a time, "
                "%s s apart at first, then further",
                route,
                f"{self._probe_delay():g}",
            )
        else:
            self._probes += 1
            log.debug("Still banned by Discord (%s refused)", route)
        self._refused_while_banned += 1
        self._next_probe_at = now + self._probe_delay()

    def _ban_over(self) -> None:
        assert self._banned_since is not None
        log.warning(
            "Discord answers again after %.0f s of ban (%d requests refused meanwhile): posting what waited",
            self._clock() - self._banned_since,
            self._refused_while_banned,
        )
        self._banned_since = None
        self._lifted.set()
