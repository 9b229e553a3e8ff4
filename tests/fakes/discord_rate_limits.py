"""Discord's REST rate limits and its invalid-request limit, as the fake Discord (``discord_server.py``) enforces them.

What Discord does, and what discord.py expects of it, comes from these sources:

- Discord's "Rate Limits" page (docs.discord.com/developers/topics/rate-limits; in the repository
  discord/discord-api-docs, ``docs/topics/rate-limits.md``): per-route limits, sometimes shared by several routes
  (``X-RateLimit-Bucket``), counted per top-level resource: ``channel_id``, ``guild_id``, ``webhook_id`` or
  ``webhook_id + webhook_token``. Answers carry ``X-RateLimit-Limit``, ``-Remaining``, ``-Reset`` (epoch seconds),
  ``-Reset-After`` (seconds, with decimals) and ``-Bucket``. Beyond a limit: 429 with a JSON body
  ``{"message", "retry_after", "global"}``, a ``Retry-After`` header and ``X-RateLimit-Scope`` (``user``, ``global``
  or ``shared``, the last one a limit on the resource, not on the bot); the global limit adds
  ``X-RateLimit-Global: true``. The global limit is 50 requests per second per bot; "interaction endpoints are not
  bound to the bot's Global Rate Limit". The invalid-request limit: 10,000 answers of 401, 403 or 429 in 10 minutes
  (429s of scope ``shared`` do not count), then the IP is temporarily banned by Cloudflare.
- Discord's developer support article "My Bot is Being Rate Limited" (support-dev.discord.com, article
  6223003921559): the same scopes and numbers; the ban is a temporary Cloudflare ban.
- The Cloudflare ban as bots meet it (discord/discord-api-docs issues #1771, #5385, #5810): a 429 with a static body
  ("error code: 1015" or an HTML page) and none of the rate-limit headers, no ``Retry-After``, for about an hour.
- discord.py 2.7.1, ``discord/http.py`` (``HTTPClient.request``, ``Ratelimit``): one bucket per bucket hash
  (learnt from ``X-Ratelimit-Bucket``) and major parameters (channel_id, guild_id, webhook_id, webhook_token); reads
  ``X-Ratelimit-Limit``, ``-Remaining`` and ``-Reset-After`` (``-Reset`` with ``use_clock``) and waits pre-emptively
  when a bucket is empty. On a 429 it raises ``HTTPException`` at once when the answer has no ``Via`` header or a
  body that is not JSON ("Banned by Cloudflare more than likely"); otherwise it sleeps ``retry_after`` from the body
  and tries again (5 tries in all), and a body with ``"global": true`` holds every request until then. It never
  reads ``X-RateLimit-Scope`` or ``Retry-After``, and it does not count the global limit before meeting it.
- discord.py 2.7.1, ``discord/webhook/async_.py`` (``AsyncWebhookAdapter.request``), which sends interaction
  callbacks, followups and ``@original`` edits: one lock per (webhook_id, token); when ``X-Ratelimit-Remaining`` is
  ``"0"`` it holds the lock for ``X-Ratelimit-Reset-After`` seconds; a 429 without ``Via`` raises, any other 429 is
  slept off (``retry_after``) and retried.

Discord does not publish its per-route numbers and says not to hard-code them; the defaults here are the ones bots
observe (5 messages per 5 s per channel, 5 interaction-webhook calls per 2 s per token) and a conservative 10 per
10 s elsewhere. A test may lower any of them. Windows are fixed: a bucket's window opens with its first request and
closes ``per`` seconds later, as ``X-RateLimit-Reset-After`` describes it; the global limit is a sliding second.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tests.fakes.discord_server import FakeDiscord, FakeInteraction

__all__ = [
    "BAN_SCOPE",
    "DiscordBudget",
    "Limit",
    "RateLimitAnswer",
    "RateLimits",
]

Scope = Literal["user", "global", "shared"]
SCOPES: tuple[Scope, ...] = ("user", "global", "shared")
#: The scope under which :attr:`FakeDiscord.rate_limited` records the Cloudflare ban answers (not a Discord scope).
BAN_SCOPE = "ban"
#: Discord's answers come through Google's load balancer; discord.py takes a 429 without this header for a ban.
VIA = "1.1 google"

# Route kinds: which limit applies to a route (see RateLimits).
MESSAGE_CREATE = "message_create"
MESSAGE_EDIT = "message_edit"
INTERACTION_WEBHOOK = "interaction_webhook"
OTHER = "other"


@dataclass(frozen=True)
class Limit:
    """At most ``requests`` requests in ``per`` seconds."""

    requests: int
    per: float


@dataclass
class RateLimits:
    """The limits the fake enforces. Change them on ``fake.rate_limits`` at any time (a test lowers them to make them
    bite); the buckets already open keep their window and take the new number at once."""

    #: ``POST /channels/{channel_id}/messages``, per channel.
    message_create: Limit = Limit(5, 5.0)
    #: ``PATCH /channels/{channel_id}/messages/{message_id}``, per channel (a bucket of its own, as on Discord).
    message_edit: Limit = Limit(5, 5.0)
    #: Every ``/webhooks/{application_id}/{interaction_token}...`` route (followups, ``@original``), one bucket per
    #: token.
    interaction_webhook: Limit = Limit(5, 2.0)
    #: Any other route, per route and top-level resource (interaction callbacks: per interaction).
    other: Limit = Limit(10, 10.0)
    #: Per bot token, on the routes authenticated by it (not interaction callbacks nor interaction webhooks).
    global_requests: Limit = Limit(50, 1.0)
    #: Answers of 401, 403 and 429 (except scope ``shared``) in a sliding window; reaching it starts the ban.
    invalid_requests: Limit = Limit(10_000, 600.0)
    #: How long a Cloudflare ban lasts (about an hour on Discord: for a test, until it ends or ``lift_ban()``).
    ban_seconds: float = 3600.0
    #: False: no per-route or global limit (the invalid-request limit and forced 429s still apply).
    enabled: bool = True

    def for_kind(self, kind: str) -> Limit:
        limit: Limit = getattr(self, kind)
        return limit


@dataclass(frozen=True)
class RateLimitAnswer:
    """One 429 the fake gave (or a Cloudflare ban answer, scope ``"ban"``)."""

    at: float  # time.monotonic()
    method: str
    path: str
    route: str  # the route template, e.g. "PATCH /webhooks/{application_id}/{interaction_token}/messages/{message_id}"
    scope: str  # "user", "global", "shared" or "ban"
    retry_after: float | None
    forced: bool  # asked for by the test (force_rate_limit, fail_next, start_ban), not earned by the client


@dataclass
class _Window:
    started: float
    used: int = 0


@dataclass
class _ForcedRule:
    method: str
    pattern: re.Pattern[str]
    scope: Scope
    retry_after: float
    remaining: int


@dataclass
class _Verdict:
    """The limiter's answer: headers for the reply, or a 429 (status, body, headers)."""

    headers: dict[str, str]
    refusal: tuple[str, float, Any] | None = None  # (scope, retry_after, body) when refused
    forced: bool = False  # the refusal was asked for by the test


@functools.lru_cache(maxsize=256)
def bucket_hash(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def _seconds(value: float) -> str:
    """Seconds with millisecond precision, rounded up (a client that waits this long is never early)."""
    return f"{math.ceil(max(value, 0.0) * 1000) / 1000:.3f}"


class RateLimiter:
    """Per-route buckets, the global limit, forced 429s and the invalid-request counter of one fake Discord."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._buckets: dict[tuple[str, str], _Window] = {}
        self._global: deque[float] = deque()
        self._forced: list[_ForcedRule] = []
        self.invalid_at: list[float] = []  # time.monotonic() of every invalid answer, in order
        self._recent_invalid: deque[float] = deque()
        self.banned_at: float | None = None
        self.banned_until: float | None = None
        self.banned_by_test = False

    # -- forcing ----------------------------------------------------------------------------------------------------

    def force(self, method: str, path_regex: str, scope: Scope, retry_after: float, times: int) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        self._forced.append(_ForcedRule(method.upper(), re.compile(path_regex), scope, retry_after, times))

    def _take_forced(self, method: str, path: str) -> _ForcedRule | None:
        for rule in self._forced:
            if rule.remaining > 0 and rule.method in ("*", method) and rule.pattern.search(path):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._forced.remove(rule)
                return rule
        return None

    # -- the limits -------------------------------------------------------------------------------------------------

    def check(
        self, *, method: str, path: str, kind: str, bucket: str, major: str, bot_token_route: bool, now: float
    ) -> _Verdict:
        """Count one request on its bucket (and the global limit); a refusal when it is over a limit or forced."""
        limit = self.limits.for_kind(kind)
        window = self._buckets.get((bucket, major))
        if window is not None and now >= window.started + limit.per:
            window = None
        forced = self._take_forced(method, path)
        if forced is not None:
            return self._forced_refusal(forced, bucket, limit, window, now)
        if not self.limits.enabled:
            return _Verdict({})
        if bot_token_route:
            per = self.limits.global_requests.per
            while self._global and self._global[0] <= now - per:
                self._global.popleft()
            if len(self._global) >= self.limits.global_requests.requests:
                retry_after = self._global[0] + per - now
                return self._refusal("global", retry_after, bucket, limit, window, now, forced=False)
            self._global.append(now)
        if window is None:
            window = _Window(started=now)
            self._buckets[(bucket, major)] = window
        if window.used >= limit.requests:
            return self._refusal("user", window.started + limit.per - now, bucket, limit, window, now, forced=False)
        window.used += 1
        return _Verdict(self._bucket_headers(bucket, limit, window, now))

    def _bucket_headers(self, bucket: str, limit: Limit, window: _Window | None, now: float) -> dict[str, str]:
        used = window.used if window is not None else 0
        reset_after = (window.started + limit.per - now) if window is not None else limit.per
        return {
            "X-RateLimit-Limit": str(limit.requests),
            "X-RateLimit-Remaining": str(max(limit.requests - used, 0)),
            "X-RateLimit-Reset": _seconds(time.time() + reset_after),
            "X-RateLimit-Reset-After": _seconds(reset_after),
            "X-RateLimit-Bucket": bucket_hash(bucket),
        }

    def _forced_refusal(
        self, rule: _ForcedRule, bucket: str, limit: Limit, window: _Window | None, now: float
    ) -> _Verdict:
        return self._refusal(rule.scope, rule.retry_after, bucket, limit, window, now, forced=True)

    def _refusal(
        self,
        scope: Scope,
        retry_after: float,
        bucket: str,
        limit: Limit,
        window: _Window | None,
        now: float,
        *,
        forced: bool,
    ) -> _Verdict:
        retry_after = max(retry_after, 0.001)
        headers = {"Retry-After": str(max(1, math.ceil(retry_after))), "X-RateLimit-Scope": scope}
        message = "You are being rate limited."
        if scope == "global":
            headers["X-RateLimit-Global"] = "true"
        else:
            headers.update(self._bucket_headers(bucket, limit, window, now))
            if scope == "user":
                headers["X-RateLimit-Remaining"] = "0"
                if forced:
                    headers["X-RateLimit-Reset-After"] = _seconds(retry_after)
                    headers["X-RateLimit-Reset"] = _seconds(time.time() + retry_after)
            else:
                message = "The resource is being rate limited."
        body = {"message": message, "retry_after": round(retry_after, 3), "global": scope == "global"}
        return _Verdict(headers, (scope, retry_after, body), forced)

    # -- invalid requests and the ban ------------------------------------------------------------------------------

    def count_invalid(self, now: float) -> bool:
        """Count one invalid answer; True when it starts the ban."""
        self.invalid_at.append(now)
        window = self.limits.invalid_requests
        self._recent_invalid.append(now)
        while self._recent_invalid and self._recent_invalid[0] <= now - window.per:
            self._recent_invalid.popleft()
        if self.banned_until is None and len(self._recent_invalid) >= window.requests:
            self.ban(now, by_test=False)
            return True
        return False

    def ban(self, now: float, *, by_test: bool) -> None:
        self.banned_by_test = by_test
        self.banned_at = now
        self.banned_until = now + self.limits.ban_seconds

    def lift_ban(self) -> None:
        self.banned_until = None
        self._recent_invalid.clear()

    def is_banned(self, now: float) -> bool:
        if self.banned_until is None:
            return False
        if now >= self.banned_until:
            self.lift_ban()
            return False
        return True

    def worst_invalid_window(self, per: float | None = None) -> int:
        """The most invalid answers that fell within any window of ``per`` seconds (default: the limit's window)."""
        span = self.limits.invalid_requests.per if per is None else per
        worst = start = 0
        times = self.invalid_at
        for end, at in enumerate(times):
            while times[start] <= at - span:
                start += 1
            worst = max(worst, end - start + 1)
        return worst


# --------------------------------------------------------------------------------------------------------------------
# What the fake recorded, summed up (for the benchmark)
# --------------------------------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), as bench/run.py computes its own."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class DiscordBudget:
    """What one or more fake Discords recorded: requests per job by route, 429s by scope, invalid requests.

    A job is an interaction (a command or a click): every request on its callback or its webhook token is the
    job's. Requests that name no interaction (login, command sync, channel posts) are counted apart by route.
    """

    jobs: int = 0
    per_job: dict[str, list[int]] = field(default_factory=dict)  # route -> requests of each job ("all": every route)
    untied: Counter[str] = field(default_factory=Counter)  # route -> requests tied to no interaction
    rate_limited: Counter[str] = field(default_factory=Counter)  # scope -> 429s given (and "ban" answers)
    unasked_rate_limited: int = 0  # of those, the ones no test asked for
    worst_invalid_window: int = 0  # invalid requests in the worst 10-minute window (max over the fakes)
    invalid_limit: int = 10_000
    banned: bool = False

    @classmethod
    def measure(
        cls, sources: Iterable[tuple[FakeDiscord, Iterable[FakeInteraction]]], *, since: float = 0.0
    ) -> DiscordBudget:
        """Sum up each fake Discord with the interactions that count as its jobs (requests from ``since`` on)."""
        budget = cls()
        job_counts: list[Counter[str]] = []
        for fake, interactions in sources:
            counts: dict[int, Counter[str]] = {i.id: Counter() for i in interactions}
            for rec in fake.requests:
                if rec.at < since or not rec.route:
                    continue
                owner = rec.interaction_id
                if owner is None:
                    budget.untied[rec.route] += 1
                elif owner in counts:
                    counts[owner][rec.route] += 1
            job_counts.extend(counts.values())
            for answer in fake.rate_limited:
                if answer.at >= since:
                    budget.rate_limited[answer.scope] += 1
                    budget.unasked_rate_limited += 0 if answer.forced else 1
            budget.worst_invalid_window = max(budget.worst_invalid_window, fake.invalid_requests_worst_window())
            budget.invalid_limit = fake.rate_limits.invalid_requests.requests
            budget.banned = budget.banned or fake.banned_at is not None
        budget.jobs = len(job_counts)
        budget.per_job = {"all": [sum(c.values()) for c in job_counts]}
        for route in sorted({route for c in job_counts for route in c}):
            budget.per_job[route] = [c.get(route, 0) for c in job_counts]
        return budget

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "requests_per_job": {
                route: {"p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99), "max": max(v, default=0)}
                for route, v in self.per_job.items()
            },
            "untied_requests": dict(self.untied),
            "rate_limited": dict(self.rate_limited),
            "unasked_rate_limited": self.unasked_rate_limited,
            "worst_invalid_window": self.worst_invalid_window,
            "invalid_limit": self.invalid_limit,
            "banned": self.banned,
        }

    def lines(self) -> list[str]:
        """A few lines of text: requests per job (p50/p99/max) overall and by route, 429s, invalid requests."""

        def spread(values: Sequence[int]) -> str:
            if not values:
                return "n/a"
            return f"p50 {_percentile(values, 0.5):g} / p99 {_percentile(values, 0.99):g} / max {max(values)}"

        lines = [f"Discord requests per job ({self.jobs} jobs): {spread(self.per_job.get('all', []))}"]
        for route, values in sorted(self.per_job.items(), key=lambda item: -sum(item[1])):
            if route != "all" and any(values):
                lines.append(f"  {route}: {spread(values)}")
        if self.untied:
            untied = ", ".join(f"{route} x{n}" for route, n in self.untied.most_common())
            lines.append(f"  not tied to a job: {untied}")
        scopes = ", ".join(f"{scope} {n}" for scope, n in sorted(self.rate_limited.items())) or "none"
        lines.append(f"429s by scope: {scopes} ({self.unasked_rate_limited} not asked for by the scenario)")
        share = 100 * self.worst_invalid_window / self.invalid_limit if self.invalid_limit else 0.0
        ban = "; BANNED by the invalid-request limit" if self.banned else ""
        lines.append(
            f"invalid requests (401/403/429) in the worst 10-minute window: {self.worst_invalid_window} "
            f"({share:.2f}% of Discord's ban threshold of {self.invalid_limit}){ban}"
        )
        return lines


def requests_by_route(requests: Iterable[Any]) -> Mapping[str, int]:
    """How many requests each route template received."""
    return Counter(rec.route for rec in requests if rec.route)
