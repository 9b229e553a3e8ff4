"""The bot's own queue, end to end: the key's limit at ModelsLab, fairness, restarts, cancelling, 429 and 5xx."""

from __future__ import annotations

from bot.jobs.model import JobStatus
from bot.requests.generation import build_generation_request
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import DEFAULT_KEY, ErrorAnswer, FakeModelsLab, Queued

ALICE, BOB = 1_500_000_000_000_000_001, 1_500_000_000_000_000_002


async def imagine(discord_server: FakeDiscord, prompt: str, user_id: int | None = None):
    interaction = await discord_server.invoke_slash("imagine", {"prompt": prompt}, user_id=user_id)
    await interaction.wait_callback()
    return interaction


async def prompts_submitted(modelslab: FakeModelsLab) -> list[str]:
    return [call.json["prompt"] for call in modelslab.submissions() if call.status == 200]


async def finish_next(runner: BotRunner, modelslab: FakeModelsLab, since: int) -> tuple[str, int]:
    """Wait for the next accepted submission after index `since`, let ModelsLab finish it, and wait until posted."""
    call = await modelslab.wait_for_submission(since=since)
    job_id = call.json["track_id"]
    assert call.job_id is not None
    modelslab.complete(call.job_id)
    runner.jobs.wake(job_id)
    await runner.wait_posted(job_id)
    return call.json["prompt"], modelslab.requests.index(call) + 1


def add_members(discord_server: FakeDiscord) -> None:
    discord_server.add_member(ALICE, "alice")
    discord_server.add_member(BOB, "bob")


async def test_the_keys_limit_at_modelslab_is_never_exceeded(runner, discord_server, modelslab):
    modelslab.enforce_max_queued = False  # the fake only counts: any excess is a violation, not a 429
    modelslab.max_queued = 2
    modelslab.default_behaviour = Queued(eta=0.2, ready_after_seconds=0.3)
    add_members(discord_server)
    await runner.start(modelslab_max_queued=2)
    interactions = [await imagine(discord_server, f"picture {n}", ALICE if n % 2 else BOB) for n in range(8)]
    for interaction in interactions:
        assert not interaction.original.flags & 64
    ids = await runner.store.ids()
    for job_id in ids:
        job = await runner.wait_posted(job_id, timeout=30)
        assert job.status is JobStatus.SUCCEEDED
    assert modelslab.limit_violations == 0
    assert modelslab.peak_queued[DEFAULT_KEY] == 2  # the limit was used, never passed
    assert all(len(attachments_of(i.original)) == 1 for i in interactions)


async def test_a_member_with_many_jobs_does_not_starve_another(runner, discord_server, modelslab):
    modelslab.default_behaviour = Queued(eta=300)  # finished only when the test says so
    add_members(discord_server)
    await runner.start(modelslab_max_queued=1)
    for n in range(4):
        await imagine(discord_server, f"alice {n}", ALICE)
    bob = await imagine(discord_server, "bob 0", BOB)

    # Alice's first job runs; Bob's one job is next in line, before Alice's other three.
    status = await discord_server.wait_for_message(lambda m: m.id == bob.original.id and "next in line" in m.content)
    assert "Cancel" in str(status.components)
    order = []
    since = 0
    for _ in range(5):
        prompt, since = await finish_next(runner, modelslab, since)
        order.append(prompt)
    assert order == ["alice 0", "bob 0", "alice 1", "alice 2", "alice 3"]


async def test_waiting_members_see_their_place_in_line(runner, discord_server, modelslab):
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start(modelslab_max_queued=1)
    interactions = [await imagine(discord_server, f"picture {n}") for n in range(4)]
    last = interactions[-1]
    await discord_server.wait_for_message(lambda m: m.id == last.original.id and "position 3 in line" in m.content)
    await finish_next(runner, modelslab, 0)
    await discord_server.wait_for_message(lambda m: m.id == last.original.id and "position 2 in line" in m.content)
    # Edits are coalesced, and made only when the place changes: 3rd, then 2nd (and nothing for arrivals behind).
    for n in range(3):
        extra = await discord_server.invoke_slash("imagine", {"prompt": f"late {n}"})
        await extra.wait_callback()
    assert discord_server.messages[last.original.id].edits == 2


async def test_the_queue_and_its_order_survive_a_restart(runner, discord_server, modelslab):
    modelslab.default_behaviour = Queued(eta=300)
    add_members(discord_server)
    await runner.start(modelslab_max_queued=1)
    await imagine(discord_server, "alice 0", ALICE)
    await imagine(discord_server, "alice 1", ALICE)
    await imagine(discord_server, "bob 0", BOB)
    await imagine(discord_server, "alice 2", ALICE)
    first = await modelslab.wait_for_submission()
    await runner.restart(modelslab_max_queued=1)
    assert len(modelslab.submissions()) == 1  # still one at ModelsLab, the rest waiting in the database
    modelslab.complete(first.job_id)
    runner.jobs.wake(first.json["track_id"])
    order = ["alice 0"]
    since = modelslab.requests.index(first) + 1
    for _ in range(3):
        prompt, since = await finish_next(runner, modelslab, since)
        order.append(prompt)
    assert order == ["alice 0", "bob 0", "alice 1", "alice 2"]  # as it would have been without the restart


async def test_a_waiting_job_can_be_cancelled_by_its_member_or_a_moderator_and_is_refunded(
    runner, discord_server, modelslab
):
    modelslab.default_behaviour = Queued(eta=300)
    add_members(discord_server)
    await runner.start(modelslab_max_queued=1)
    await imagine(discord_server, "running", ALICE)
    waiting = await imagine(discord_server, "waiting", ALICE)
    other = await imagine(discord_server, "other", ALICE)
    button = f"job:cancel:{await job_id_of(runner, 'waiting')}"
    await discord_server.wait_for_message(lambda m: m.id == waiting.original.id and bool(m.components))

    refused = await discord_server.invoke_component(waiting.original.id, button, user_id=BOB)
    await refused.wait_callback()
    assert "Only the member who asked for it, or a member with Manage Messages" in refused.original.content

    done = await discord_server.invoke_component(waiting.original.id, button, user_id=ALICE)
    await done.wait_callback()
    assert "Cancelled: it will not be sent" in done.original.content
    job = await runner.wait_posted(await job_id_of(runner, "waiting"))
    assert job.status is JobStatus.FAILED and job.error_kind == "cancelled" and job.charged_images == 0
    assert f"Cancelled by <@{ALICE}>" in waiting.original.content and waiting.original.components == []

    other_button = f"job:cancel:{await job_id_of(runner, 'other')}"
    await discord_server.wait_for_message(lambda m: m.id == other.original.id and bool(m.components))
    by_moderator = await discord_server.invoke_component(
        other.original.id, other_button, user_id=discord_server.moderator_id
    )
    await by_moderator.wait_callback()
    assert "Cancelled" in by_moderator.original.content
    await runner.wait_posted(await job_id_of(runner, "other"))
    assert await prompts_submitted(modelslab) == ["running"]
    running = await runner.store.get(await job_id_of(runner, "running"))
    assert running is not None and running.status is JobStatus.PROCESSING


async def job_id_of(runner: BotRunner, prompt: str) -> str:
    assert runner.app is not None
    row = await runner.sql_one("SELECT id FROM jobs WHERE json_extract(request_json, '$.prompt') = ?", (prompt,))
    assert row is not None
    return str(row[0])


async def test_a_429_puts_the_job_back_at_the_head_and_it_is_sent_again_later(runner, discord_server, modelslab):
    modelslab.max_queued = 1  # ModelsLab's own limit is lower than the bot was told (another app uses the key)
    modelslab.retry_after = 1
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start(modelslab_max_queued=2)
    first = await imagine(discord_server, "first")
    second = await imagine(discord_server, "second")
    refused = await modelslab.wait_for_request(r"text2img$", lambda c: c.status == 429 and c.json["prompt"] == "second")
    await discord_server.wait_for_message(
        lambda m: m.id == second.original.id and "ModelsLab is busy, trying again <t:" in m.content
    )
    first_call = await modelslab.wait_for_submission()
    modelslab.complete(first_call.job_id)
    runner.jobs.wake(first_call.json["track_id"])
    accepted = await modelslab.wait_for_request(
        r"text2img$", lambda c: c.status == 200 and c.json["prompt"] == "second", timeout=15
    )
    assert accepted.json["seed"] != refused.json["seed"]  # never the identical payload again within 30 s
    modelslab.complete(accepted.job_id)
    runner.jobs.wake(accepted.json["track_id"])
    job = await runner.wait_posted(accepted.json["track_id"])
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(second.original)) == 1 and len(attachments_of(first.original)) == 1


async def test_passing_server_errors_are_tried_again_with_a_fresh_payload(runner, discord_server, modelslab):
    modelslab.script(
        ErrorAnswer(http_status=503, message="Service Unavailable"), ErrorAnswer(http_status=500, message="Oops")
    )
    await runner.start()
    interaction = await imagine(discord_server, "third time lucky")
    job = await runner.wait_posted(await runner.first_job_id_from_db())
    assert job.status is JobStatus.SUCCEEDED
    seeds = [call.json["seed"] for call in modelslab.submissions()]
    assert len(seeds) == 3 and len(set(seeds)) == 3
    assert embed_seed(interaction) == str(job.seed) == str(seeds[-1])


def embed_seed(interaction) -> str:
    [embed] = interaction.original.embeds
    return {f["name"]: f["value"] for f in embed["fields"]}["Seed"]


async def test_a_members_own_seed_is_kept_and_the_retry_waits_out_the_spam_window(
    runner, discord_server, modelslab, monkeypatch
):
    import bot.jobs.submission

    monkeypatch.setattr(bot.jobs.submission, "SPAM_WINDOW", 0.6)  # ModelsLab's is 30 s; the rule is the same
    modelslab.script(ErrorAnswer(http_status=503, message="Service Unavailable"))
    await runner.start()
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "same seed", "seed": 42})
    await interaction.wait_callback()
    job = await runner.wait_posted(await runner.first_job_id_from_db())
    first, second = modelslab.submissions()
    assert first.json["seed"] == second.json["seed"] == 42
    assert second.at - first.at >= 0.6
    assert job.status is JobStatus.SUCCEEDED


async def test_the_fair_order_is_the_same_after_a_restart(runner, discord_server, modelslab):
    """Alice was served twice, Bob once, Carol never: whatever the restart, Carol is next, then Bob."""
    carol = 1_500_000_000_000_000_003
    modelslab.default_behaviour = Queued(eta=300)
    add_members(discord_server)
    discord_server.add_member(carol, "carol")
    await runner.start(modelslab_max_queued=1)
    await imagine(discord_server, "alice 0", ALICE)
    await imagine(discord_server, "bob 0", BOB)
    await imagine(discord_server, "alice 1", ALICE)
    since = 0
    for _ in range(2):  # alice 0, then bob 0
        _, since = await finish_next(runner, modelslab, since)
    await modelslab.wait_for_submission(since=since)  # alice 1 runs now
    await imagine(discord_server, "alice 2", ALICE)
    await imagine(discord_server, "bob 1", BOB)
    await imagine(discord_server, "carol 0", carol)
    await runner.restart(modelslab_max_queued=1)
    order = []
    for _ in range(4):
        prompt, since = await finish_next(runner, modelslab, since)
        order.append(prompt)
    assert order == ["alice 1", "carol 0", "bob 1", "alice 2"]


async def test_a_job_that_waits_in_line_has_its_status_message_recorded_before_it_waits(
    runner, discord_server, modelslab
):
    """A job sent at once records its status message with the write that marks it submitting (a statement fewer);
    one that waits records it first, so that a bot stopped meanwhile still knows where the member looks."""
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start(modelslab_max_queued=1)
    first = await imagine(discord_server, "first")
    await discord_server.wait_for_message(lambda m: m.id == first.original.id and "Generating" in m.content)
    second = await imagine(discord_server, "second")
    await discord_server.wait_for_message(lambda m: m.id == second.original.id and "next in line" in m.content)
    rows = await runner.sql("SELECT status, message_id FROM jobs ORDER BY created_at")
    assert [tuple(row) for row in rows] == [("processing", first.original.id), ("queued", second.original.id)]


async def test_a_job_acknowledged_as_the_bot_stops_has_its_status_message_recorded_for_the_next_process(
    runner, discord_server, modelslab
):
    """Shutdown began between the acknowledgement and the job's start: no driver starts here, so the status message
    is written at once, and the process that takes the job over edits that message instead of looking for it."""
    await runner.start()
    job = await runner.jobs.create(
        kind="text2img",
        guild_id=discord_server.guild.id,
        channel_id=2,
        user_id=discord_server.member_id,
        request=build_generation_request(flavour="v6", default_model="flux", prompt="a cat", seed=5),
        application_id=None,
        interaction_token=None,
        token_expires_at=None,
        attachment_size_limit=None,
    )
    runner.jobs.draining = True
    await runner.jobs.status_message_shown(job, 4242)
    row = await runner.sql_one("SELECT status, message_id FROM jobs WHERE id = ?", (job.id,))
    assert tuple(row) == ("queued", 4242)
    assert modelslab.submissions() == []
