"""The fake Discord's rate limits, invalid-request limit and stricter rules, seen over raw HTTP and by the real
discord.py (the minimal bot of ``test_fake_discord.py``, against the fake over real sockets)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands

from tests.fakes.discord_server import (
    DiscordErrorLog,
    FakeDiscord,
    FakeInteraction,
    Limit,
    point_discord_py_at,
    running_bot,
    running_fake_discord,
)
from tests.test_fake_discord import MiniBot, original_of, take_violations, text_channel

pytestmark = pytest.mark.timeout(30)

MESSAGES = r"^/channels/\d+/messages$"


@pytest.fixture(autouse=True)
def discord_errors() -> Iterator[DiscordErrorLog]:
    with DiscordErrorLog() as log:
        yield log
    assert not log.records, log.formatted()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as server:
        point_discord_py_at(server, monkeypatch)
        yield server
        assert server.violations == [], server.violations


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[MiniBot]:
    async with running_bot(MiniBot(fake.guild_id), fake) as client:
        yield client


class Answer:
    def __init__(self, status: int, headers: Any, body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def call(
    fake: FakeDiscord,
    method: str,
    path: str,
    payload: Any = None,
    *,
    token: str | None = None,
    files: dict[str, bytes] | None = None,
) -> Answer:
    """One raw request to the fake's API, as any HTTP client would send it (bot token unless ``token=""``)."""
    headers = {} if token == "" else {"Authorization": f"Bot {token or fake.token}"}
    data: Any = None
    if files is not None:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("payload_json", json.dumps(payload or {}), content_type="application/json")
        for index, (name, content) in enumerate(files.items()):
            form.add_field(f"files[{index}]", content, filename=name, content_type="application/octet-stream")
        data = form
    elif payload is not None:
        data = json.dumps(payload)
        headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, fake.api_base + path, data=data, headers=headers) as response,
    ):
        raw = await response.read()
        body = json.loads(raw) if response.content_type == "application/json" else raw.decode()
        return Answer(response.status, response.headers, body)


def post_message(fake: FakeDiscord, channel_id: int, content: str) -> Any:
    return call(fake, "POST", f"/channels/{channel_id}/messages", {"content": content})


# ----------------------------------------------------------------------------------------------------------------------
# Buckets, headers, the global limit
# ----------------------------------------------------------------------------------------------------------------------


async def test_a_bucket_answers_with_its_headers_and_a_429_beyond_its_limit(fake: FakeDiscord) -> None:
    answers = [await post_message(fake, fake.channel_id, f"m{n}") for n in range(6)]

    assert [a.status for a in answers] == [200] * 5 + [429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers[:5]] == ["4", "3", "2", "1", "0"]
    assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"5"}
    assert len({a.headers["X-RateLimit-Bucket"] for a in answers}) == 1
    for answer in answers[:5]:
        reset_after = float(answer.headers["X-RateLimit-Reset-After"])
        assert 0 < reset_after <= 5
        assert abs(float(answer.headers["X-RateLimit-Reset"]) - (time.time() + reset_after)) < 5  # epoch seconds
        assert answer.headers["Via"]
    refused = answers[5]
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.body["global"] is False and refused.body["message"]
    assert 0 < refused.body["retry_after"] <= 5
    assert refused.headers["X-RateLimit-Scope"] == "user" and refused.headers["Via"]
    assert int(refused.headers["Retry-After"]) >= refused.body["retry_after"]
    assert "X-RateLimit-Global" not in refused.headers
    assert len([m for m in fake.messages_in(fake.channel_id)]) == 5

    # Another channel is another resource; an edit is another bucket.
    other = await post_message(fake, fake.second_channel_id, "elsewhere")
    assert other.status == 200 and other.headers["X-RateLimit-Remaining"] == "4"
    message_id = answers[0].body["id"]
    edited = await call(fake, "PATCH", f"/channels/{fake.channel_id}/messages/{message_id}", {"content": "e"})
    assert edited.status == 200
    assert edited.headers["X-RateLimit-Bucket"] != refused.headers["X-RateLimit-Bucket"]

    [given] = fake.rate_limited
    assert (given.route, given.scope, given.forced) == ("POST /channels/{channel_id}/messages", "user", False)
    assert len(fake.invalid_requests) == 1
    assert fake.requests_by_route()["POST /channels/{channel_id}/messages"] == 7
    [violation] = take_violations(fake)
    assert "5 per 5 s" in violation and "429" in violation


async def test_the_global_limit_binds_bot_token_routes_but_not_interactions(fake: FakeDiscord, bot: MiniBot) -> None:
    # The bot's own start (login, command sync) counts too: 3 more bot-token requests within a minute are allowed.
    started = sum(1 for r in fake.requests if "Authorization" in r.headers)
    fake.rate_limits.global_requests = Limit(started + 3, 60.0)
    routes = ["/users/@me", "/oauth2/applications/@me", f"/channels/{fake.channel_id}", f"/guilds/{fake.guild_id}"]
    answers = [await call(fake, "GET", route) for route in routes]

    assert [a.status for a in answers] == [200, 200, 200, 429]
    refused = answers[3]
    assert refused.body["global"] is True and 0 < refused.body["retry_after"] <= 60
    assert refused.headers["X-RateLimit-Global"] == "true"
    assert refused.headers["X-RateLimit-Scope"] == "global" and refused.headers["Via"]
    assert "X-RateLimit-Bucket" not in refused.headers
    assert take_violations(fake)  # nobody asked for it

    # Interaction callbacks and interaction webhooks are not bound to the global limit.
    since = len(fake.requests)
    interaction = await fake.invoke_slash("twice")
    note = await bot.next_note()
    assert note[0] == "twice" and original_of(interaction).content == "one"
    assert [m.content for m in interaction.followups] == ["two"]
    assert [(r.route.split()[0], r.status) for r in fake.requests[since:]] == [("POST", 200), ("POST", 200)]
    assert [a.scope for a in fake.rate_limited] == ["global"]


async def test_interaction_webhook_routes_share_one_bucket_per_token(fake: FakeDiscord, bot: MiniBot) -> None:
    fake.rate_limits.interaction_webhook = Limit(3, 60.0)
    first = await fake.invoke_slash("hello", {"name": "one"})
    second = await fake.invoke_slash("hello", {"name": "two"})
    await first.wait_callback()
    await second.wait_callback()
    webhook = f"/webhooks/{fake.application_id}"

    read = await call(fake, "GET", f"{webhook}/{first.token}/messages/@original", token="")
    edit = await call(fake, "PATCH", f"{webhook}/{first.token}/messages/@original", {"content": "e"}, token="")
    post = await call(fake, "POST", f"{webhook}/{first.token}?wait=1", {"content": "f"}, token="")
    over = await call(fake, "PATCH", f"{webhook}/{first.token}/messages/@original", {"content": "g"}, token="")
    other_token = await call(fake, "GET", f"{webhook}/{second.token}/messages/@original", token="")

    assert [a.status for a in (read, edit, post, over, other_token)] == [200, 200, 200, 429, 200]
    assert [a.headers.get("X-RateLimit-Remaining") for a in (read, edit, post)] == ["2", "1", "0"]
    assert len({a.headers["X-RateLimit-Bucket"] for a in (read, edit, post, over)}) == 1
    assert original_of(first).content == "e"
    assert all(r.interaction_id == first.id for r in fake.requests if first.token in r.path)
    [violation] = take_violations(fake)
    assert "interaction webhook" in violation


# ----------------------------------------------------------------------------------------------------------------------
# The invalid-request limit and the Cloudflare ban
# ----------------------------------------------------------------------------------------------------------------------


async def test_invalid_requests_past_the_threshold_bring_the_cloudflare_ban(fake: FakeDiscord) -> None:
    fake.rate_limits.invalid_requests = Limit(3, 600.0)
    for _ in range(3):
        assert (await call(fake, "GET", "/users/@me", token="wrong")).status == 401
    assert fake.banned_at is not None and fake.is_banned()

    banned = await call(fake, "GET", "/users/@me")
    assert banned.status == 429
    assert not banned.headers.get("Via")
    assert not any(name.lower().startswith("x-ratelimit") for name in banned.headers)
    assert "Retry-After" not in banned.headers
    assert isinstance(banned.body, str) and "1015" in banned.body
    # Every route, interaction routes included, is behind the ban.
    assert (await call(fake, "POST", "/interactions/1/t/callback", {"type": 4}, token="")).status == 429
    assert [a.scope for a in fake.rate_limited] == ["ban", "ban"]
    assert fake.invalid_requests_worst_window() == 3
    [violation] = take_violations(fake)
    assert "Cloudflare" in violation

    fake.lift_ban()
    assert (await call(fake, "GET", "/users/@me")).status == 200


async def test_shared_scope_429s_do_not_count_and_forced_ones_are_not_violations(fake: FakeDiscord) -> None:
    fake.rate_limits.invalid_requests = Limit(2, 600.0)
    fake.force_rate_limit("GET", r"^/users/@me$", "shared", retry_after=1.5, times=3)
    shared = [await call(fake, "GET", "/users/@me") for _ in range(3)]
    assert [a.status for a in shared] == [429, 429, 429]
    assert {a.headers["X-RateLimit-Scope"] for a in shared} == {"shared"}
    assert shared[0].body == {"message": "The resource is being rate limited.", "retry_after": 1.5, "global": False}
    assert shared[0].headers["Retry-After"] == "2" and shared[0].headers["Via"]
    assert shared[0].headers["X-RateLimit-Remaining"] != "0"  # the resource, not the bot's bucket, is exhausted
    assert fake.invalid_requests == [] and not fake.is_banned()

    fake.force_rate_limit("GET", r"^/users/@me$", "global")
    global_answer = await call(fake, "GET", "/users/@me")
    assert global_answer.body["global"] is True and global_answer.headers["X-RateLimit-Global"] == "true"
    fake.force_rate_limit("GET", r"^/users/@me$", "user")
    await call(fake, "GET", "/users/@me")
    assert len(fake.invalid_requests) == 2 and fake.is_banned()
    assert [(a.scope, a.forced) for a in fake.rate_limited] == [
        ("shared", True),
        ("shared", True),
        ("shared", True),
        ("global", True),
        ("user", True),
    ]
    [violation] = take_violations(fake)  # the ban itself was earned, not forced
    assert "Cloudflare" in violation


async def test_tolerated_rate_limits_are_recorded_but_are_not_violations(fake: FakeDiscord) -> None:
    fake.tolerate_rate_limits = True
    fake.rate_limits.message_create = Limit(1, 60.0)
    fake.rate_limits.invalid_requests = Limit(2, 600.0)
    answers = [await post_message(fake, fake.channel_id, f"m{n}") for n in range(3)]
    assert [a.status for a in answers] == [200, 429, 429]
    assert fake.is_banned() and fake.violations == []
    assert [(a.scope, a.forced) for a in fake.rate_limited] == [("user", False), ("user", False)]


# ----------------------------------------------------------------------------------------------------------------------
# The real discord.py against the limits
# ----------------------------------------------------------------------------------------------------------------------


async def test_discord_py_reads_the_headers_and_paces_itself(fake: FakeDiscord, bot: MiniBot) -> None:
    fake.rate_limits.message_create = Limit(2, 0.3)
    channel = text_channel(bot, fake.channel_id)
    sent = await asyncio.gather(*(channel.send(f"burst {n}") for n in range(7)))
    assert sorted(m.content for m in sent) == sorted(f"burst {n}" for n in range(7))
    assert fake.rate_limited == []  # it waited for each window as the headers said, without a single 429


async def test_discord_py_waits_and_retries_on_a_429_of_each_scope(fake: FakeDiscord, bot: MiniBot) -> None:
    channel = text_channel(bot, fake.channel_id)
    for scope in ("user", "shared", "global"):
        since = len(fake.requests)
        fake.force_rate_limit("POST", MESSAGES, scope, retry_after=0.2)
        await channel.send(f"after a {scope} 429")
        first, second = [r for r in fake.requests[since:] if r.method == "POST"]
        assert (first.status, second.status) == (429, 200)
        assert second.at - first.at >= 0.2  # it slept retry_after before trying again
    assert [m.content for m in fake.messages_in(fake.channel_id)] == [
        "after a user 429",
        "after a shared 429",
        "after a global 429",
    ]

    # The webhook adapter (followups, @original) retries the same way.
    fake.force_rate_limit("POST", r"^/webhooks/\d+/[^/]+$", "user", retry_after=0.1)
    interaction = await fake.invoke_slash("twice")
    await bot.next_note()
    assert [m.content for m in interaction.followups] == ["two"]
    assert [a.scope for a in fake.rate_limited] == ["user", "shared", "global", "user"]


async def test_discord_py_raises_on_the_ban_answer(fake: FakeDiscord, bot: MiniBot) -> None:
    fake.start_ban()
    since = len(fake.requests)
    with pytest.raises(discord.HTTPException) as banned:
        await text_channel(bot, fake.channel_id).send("banned")
    assert banned.value.status == 429
    assert len(fake.requests[since:]) == 1  # no retry: discord.py knows a ban when it sees one
    assert fake.messages_in(fake.channel_id) == []
    fake.lift_ban()
    await text_channel(bot, fake.channel_id).send("free again")
    assert [m.content for m in fake.messages_in(fake.channel_id)] == ["free again"]


# ----------------------------------------------------------------------------------------------------------------------
# The leniencies closed: callback types, attachments, interaction webhooks
# ----------------------------------------------------------------------------------------------------------------------


class QuietModal(discord.ui.Modal, title="Quiet"):
    text: discord.ui.TextInput[QuietModal] = discord.ui.TextInput(label="Text", custom_id="quiet:text")

    def __init__(self) -> None:
        super().__init__(custom_id="quiet:modal")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        return None  # the test answers


class QuietBot(discord.Client):
    """Commands that leave the answer to the test, which sends it over raw HTTP."""

    def __init__(self) -> None:
        super().__init__(intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.tree = app_commands.CommandTree(self)

        @self.tree.command(name="quiet", description="Leave the answer to the test")
        async def quiet(interaction: discord.Interaction) -> None:
            return None

        @self.tree.command(name="ask", description="Open a modal")
        async def ask(interaction: discord.Interaction) -> None:
            await interaction.response.send_modal(QuietModal())

    async def setup_hook(self) -> None:
        await self.tree.sync()


async def callback(fake: FakeDiscord, interaction: FakeInteraction, body: dict[str, Any]) -> int:
    path = f"/interactions/{interaction.id}/{interaction.token}/callback?with_response=1"
    return (await call(fake, "POST", path, body, token="")).status


async def test_a_callback_type_that_does_not_fit_the_interaction_gets_400(fake: FakeDiscord) -> None:
    async with running_bot(QuietBot(), fake):
        command = await fake.invoke_slash("quiet")
        for wrong in (7, 6, 8, 1, 12):
            assert await callback(fake, command, {"type": wrong, "data": {"content": "x"}}) == 400
        assert not command.acknowledged
        assert await callback(fake, command, {"type": 4, "data": {"content": "fits"}}) == 200
        assert original_of(command).content == "fits"
        assert len(take_violations(fake)) == 5

        opened = await fake.invoke_slash("ask")
        await opened.wait_callback()
        submitted = await fake.submit_modal("quiet:modal", {"quiet:text": "hi"})
        modal = {"custom_id": "again", "title": "Again", "components": []}
        assert await callback(fake, submitted, {"type": 9, "data": modal}) == 400  # no modal for a modal
        assert await callback(fake, submitted, {"type": 7, "data": {"content": "x"}}) == 400  # no message to update
        assert await callback(fake, submitted, {"type": 4, "data": {"content": "thanks"}}) == 200
        violations = take_violations(fake)
        assert len(violations) == 2 and "type 9" in violations[0] and "on a message" in violations[1]


async def test_an_edit_keeps_only_the_files_listed_in_attachments(fake: FakeDiscord, bot: MiniBot) -> None:
    sent = await text_channel(bot, fake.channel_id).send("files", file=discord.File(io.BytesIO(b"a"), "a.txt"))
    stored = fake.messages[sent.id]
    path = f"/channels/{fake.channel_id}/messages/{sent.id}"

    unlisted = await call(fake, "PATCH", path, {"content": "unlisted"}, files={"b.txt": b"b"})
    assert unlisted.status == 200
    assert [a.filename for a in stored.attachments] == ["a.txt"] and stored.content == "unlisted"
    [violation] = take_violations(fake)
    assert "b.txt" in violation and "attachments" in violation

    listed = [{"id": str(stored.attachments[0].id)}, {"id": 1, "filename": "c.txt"}]
    answer = await call(fake, "PATCH", path, {"attachments": listed}, files={"b.txt": b"b", "c.txt": b"c"})
    assert answer.status == 200
    assert [a.filename for a in stored.attachments] == ["a.txt", "c.txt"]
    [violation] = take_violations(fake)
    assert "b.txt" in violation


async def test_more_than_ten_attachments_are_refused(fake: FakeDiscord, bot: MiniBot) -> None:
    files = [discord.File(io.BytesIO(bytes([n])), f"{n}.bin") for n in range(8)]
    sent = await text_channel(bot, fake.channel_id).send("eight", files=files)
    more = [discord.File(io.BytesIO(b"x"), f"more{n}.bin") for n in range(3)]
    with pytest.raises(discord.HTTPException) as refused:
        await sent.edit(attachments=[*sent.attachments, *more])
    assert (refused.value.status, refused.value.code) == (400, 50035)
    assert len(fake.messages[sent.id].attachments) == 8
    [violation] = take_violations(fake)
    assert "at most 10 attachments" in violation


async def test_an_interaction_webhook_reaches_only_its_own_messages(fake: FakeDiscord, bot: MiniBot) -> None:
    first = await fake.invoke_slash("twice")
    await bot.next_note()
    [followup] = first.followups
    second = await fake.invoke_slash("hello", {"name": "two"})
    await second.wait_callback()
    webhook = f"/webhooks/{fake.application_id}/{second.token}/messages"

    foreign = [
        await call(fake, "PATCH", f"{webhook}/{followup.id}", {"content": "hijacked"}, token=""),
        await call(fake, "PATCH", f"{webhook}/{original_of(first).id}", {"content": "hijacked"}, token=""),
        await call(fake, "GET", f"{webhook}/{followup.id}", token=""),
        await call(fake, "DELETE", f"{webhook}/{followup.id}", token=""),
    ]
    assert [(a.status, a.body["code"]) for a in foreign] == [(404, 10008)] * 4
    assert followup.content == "two" and not followup.deleted
    assert len(take_violations(fake)) == 4

    own = await call(fake, "PATCH", f"{webhook}/@original", {"content": "mine"}, token="")
    assert own.status == 200 and original_of(second).content == "mine"


# ----------------------------------------------------------------------------------------------------------------------
# The summary for the benchmark
# ----------------------------------------------------------------------------------------------------------------------


async def test_the_budget_sums_requests_per_interaction_by_route(fake: FakeDiscord, bot: MiniBot) -> None:
    jobs = [await fake.invoke_slash("twice") for _ in range(3)]
    for _ in jobs:
        await bot.next_note()
    fake.force_rate_limit("POST", MESSAGES, "shared", retry_after=0.05)
    await text_channel(bot, fake.channel_id).send("untied")

    budget = fake.budget(jobs)
    assert budget.jobs == 3
    assert budget.per_job["all"] == [2, 2, 2]
    assert budget.per_job["POST /interactions/{interaction_id}/{interaction_token}/callback"] == [1, 1, 1]
    assert budget.per_job["POST /webhooks/{application_id}/{interaction_token}"] == [1, 1, 1]
    assert budget.untied["POST /channels/{channel_id}/messages"] == 2
    assert budget.untied["GET /users/@me"] == 1
    assert budget.rate_limited == {"shared": 1} and budget.unasked_rate_limited == 0
    assert budget.worst_invalid_window == 0
    text = "\n".join(budget.lines())
    assert "Discord requests per job (3 jobs): p50 2 / p99 2 / max 2" in text
    assert "429s by scope: shared 1 (0 not asked for" in text
    assert budget.as_dict()["requests_per_job"]["all"] == {"p50": 2.0, "p99": 2.0, "max": 2}
