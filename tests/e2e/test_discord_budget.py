"""Discord's requests as a budget, end to end: what the bot sends for each job, in bursts and long lines.

The fake Discord enforces Discord's rate limits in every test (an unexpected 429 fails it); these tests look at
the requests it recorded, as Discord would see them.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from typing import Any

from bot.jobs.model import JobStatus
from bot.jobs.progress import EXACT_PLACES, PROGRESS_MIN_INTERVAL, about_ahead
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord, FakeInteraction, RecordedRequest
from tests.fakes.modelslab_server import FakeModelsLab, Queued

MEMBERS = [1_500_000_000_000_000_100 + n for n in range(6)]
PLACE = re.compile(r"Queued: (?:position (\d+) in line|next in line|about (\d+) requests ahead)")


def add_members(discord_server: FakeDiscord) -> None:
    for n, user_id in enumerate(MEMBERS):
        discord_server.add_member(user_id, f"member{n}")


async def burst(discord_server: FakeDiscord, count: int) -> list[FakeInteraction]:
    """`count` /imagine at once, from the members in turn."""
    interactions = await asyncio.gather(
        *(
            discord_server.invoke_slash("imagine", {"prompt": f"burst {n}"}, user_id=MEMBERS[n % len(MEMBERS)])
            for n in range(count)
        )
    )
    for interaction in interactions:
        await interaction.wait_callback()
    return list(interactions)


def edits_of(discord_server: FakeDiscord, interaction: FakeInteraction) -> list[RecordedRequest]:
    """Every accepted edit of the interaction's status message, in the order Discord received them."""
    message_id = interaction.original.id if interaction.original else None
    edits = [
        rec
        for rec in discord_server.requests
        if rec.method == "PATCH"
        and 200 <= rec.status < 300
        and (
            (rec.interaction_id == interaction.id and rec.path.endswith("/messages/@original"))
            or rec.path.endswith(f"/messages/{message_id}")
        )
    ]
    return sorted(edits, key=lambda rec: rec.at)


def shown(payload: dict[str, Any] | None) -> tuple[Any, ...]:
    """What a member sees of a message body: its words, embeds and buttons."""
    payload = payload or {}
    return (payload.get("content"), payload.get("embeds") or [], payload.get("components") or [])


def is_outcome(rec: RecordedRequest) -> bool:
    """The result or the failure: the edits that set the attachments (progress edits leave them alone)."""
    return isinstance(rec.json, dict) and "attachments" in rec.json


def check_edits(discord_server: FakeDiscord, interactions: list[FakeInteraction]) -> dict[str, int]:
    """No edit repeats what its message shows; no two edits of one message within PROGRESS_MIN_INTERVAL, except the
    outcome, which never waits for one. Returns counts, for the caller's own checks."""
    counts: dict[str, int] = defaultdict(int)
    for interaction in interactions:
        assert interaction.callback is not None
        callback = interaction.callback.json or {}
        showing = shown(callback.get("data"))
        previous_at = None
        for rec in edits_of(discord_server, interaction):
            now = shown(rec.json)
            assert now != showing, f"an edit of interaction {interaction.id} repeats what it shows: {now[0]!r}"
            if is_outcome(rec):
                counts["outcomes"] += 1
            else:
                counts["progress"] += 1
                if previous_at is not None:
                    gap = rec.at - previous_at
                    assert gap >= PROGRESS_MIN_INTERVAL - 0.05, f"two edits of one message {gap:.2f} s apart"
            showing, previous_at = now, rec.at
    return counts


async def test_a_job_that_gets_its_turn_at_once_costs_three_requests(runner, discord_server, modelslab):
    """The acknowledgement, one status edit ("Generating, ready in ..."), the result: nothing in between."""
    modelslab.default_behaviour = Queued(eta=30)
    await runner.start()
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a lighthouse"})
    job = await runner.generating(interaction)
    assert job.modelslab_id is not None
    modelslab.complete(job.modelslab_id)
    runner.jobs.wake(job.id)
    await runner.wait_posted(job.id)
    budget = discord_server.budget([interaction])
    assert budget.per_job["all"] == [3], discord_server.describe()
    assert check_edits(discord_server, [interaction]) == {"progress": 1, "outcomes": 1}


async def test_a_burst_against_a_small_queue_never_repeats_an_edit_nor_edits_faster_than_every_two_seconds(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """60 /imagine at once from 6 members, 3 at ModelsLab at a time: the line moves all the time, and several
    tasks want to edit the same messages at once (places, "Generating", the results)."""
    runner.with_webhooks()
    modelslab.default_behaviour = Queued(eta=60, ready_after_seconds=0.3)  # done 0.3 s after it is sent; a webhook
    add_members(discord_server)
    await runner.start(modelslab_max_queued=3)
    interactions = await burst(discord_server, 60)
    for job_id in await runner.store.ids():
        job = await runner.wait_posted(job_id, timeout=60)
        assert job.status is JobStatus.SUCCEEDED
    assert all(len(attachments_of(i.original)) == 1 for i in interactions if i.original)
    counts = check_edits(discord_server, interactions)
    assert counts["outcomes"] == 60  # each result once
    # Members waiting in line were shown their place; nobody's message was edited for nothing.
    assert counts["progress"] >= 60
    budget = discord_server.budget(interactions)
    assert sum(budget.per_job["all"]) / budget.jobs <= 6


async def test_a_move_at_the_head_of_a_long_line_edits_only_the_messages_whose_words_change(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """A line of 60 behind one job at ModelsLab: the first 20 read their exact place, the others a round number
    ("about 30 requests ahead"). When the head moves, the 20 exact places change, and of the others only those
    whose round number changes: not 59 edits."""
    modelslab.default_behaviour = Queued(eta=300)
    add_members(discord_server)
    await runner.start(modelslab_max_queued=1)
    interactions = []
    for n in range(61):  # one at a time: the line is in the order they came (one member after the other)
        interaction = await discord_server.invoke_slash(
            "imagine", {"prompt": f"line {n}"}, user_id=MEMBERS[n % len(MEMBERS)]
        )
        await interaction.wait_callback()
        interactions.append(interaction)
    waiting = interactions[1:]

    def reads(interaction: FakeInteraction) -> str | None:
        match = PLACE.search(interaction.original.content if interaction.original else "")
        if match is None:
            return None
        return match.group(0)

    def expected(place: int) -> str:
        if place == 1:
            return "Queued: next in line"
        if place <= EXACT_PLACES:
            return f"Queued: position {place} in line"
        return f"Queued: about {about_ahead(place - 1)} requests ahead"

    async def until_every_place_reads(offset: int) -> None:
        async with asyncio.timeout(30):
            while any(reads(i) != expected(n + 1 - offset) for n, i in enumerate(waiting) if n >= offset):
                await discord_server.wait_for_request("PATCH", "/messages/", since=len(discord_server.requests))

    await until_every_place_reads(0)
    before = {i.id: len(edits_of(discord_server, i)) for i in waiting}
    far = [reads(i) for i in waiting[EXACT_PLACES:]]
    assert all("about" in text for text in far if text)

    first = await modelslab.wait_for_submission()
    assert first.job_id is not None
    modelslab.complete(first.job_id)
    runner.jobs.wake(first.json["track_id"])
    await until_every_place_reads(1)  # waiting[0] has its turn now; everybody behind moved up one
    edited = [i for i in waiting[1:] if len(edits_of(discord_server, i)) > before[i.id]]
    changed = [i for n, i in enumerate(waiting[1:], start=2) if expected(n) != expected(n - 1)]
    assert edited == changed  # the messages whose words changed, and no other
    assert EXACT_PLACES <= len(edited) < EXACT_PLACES + 6
    assert all(len(edits_of(discord_server, i)) == before[i.id] + 1 for i in edited)
    check_edits(discord_server, interactions)
