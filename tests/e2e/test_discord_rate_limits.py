"""Discord saying "slow down", end to end through the real discord.py: 429s of every scope, a ban, a proxy's own
429 and a 408. Nothing is lost, each result is posted once, and the operator reads what happened in the log and
in /metrics."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re

import pytest

from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner, LogCapture, attachments_of
from tests.fakes.discord_rate_limits import Scope
from tests.fakes.discord_server import NO_ANSWER, FakeDiscord, FakeInteraction, FakeMessage
from tests.fakes.modelslab_server import FakeModelsLab, Queued

CALLBACK = r"^/interactions/\d+/[^/]+/callback$"
ORIGINAL = r"^/webhooks/\d+/[^/]+/messages/@original$"


def rate_limit_lines(logs: LogCapture) -> list[str]:
    """The bot's own lines about Discord's pace (discord.py writes its own too)."""
    return [r.getMessage() for r in logs.records if r.name == "bot.discord.rate_limits" and r.levelno >= logging.INFO]


def discord_py_rate_limit_lines(logs: LogCapture) -> list[str]:
    """discord.py's own warnings about a 429 it waits out (the bot writes its own line instead)."""
    return [r.getMessage() for r in logs.records if r.name.startswith("discord.") and "rate limit" in r.getMessage()]


def results_posted(discord_server: FakeDiscord, interaction: FakeInteraction) -> int:
    """Accepted edits that put images in the interaction's message."""
    return sum(
        1
        for rec in discord_server.requests
        if rec.interaction_id == interaction.id and rec.method == "PATCH" and rec.files and 200 <= rec.status < 300
    )


def shows(message: FakeMessage, interaction: FakeInteraction, words: str) -> bool:
    return interaction.original is not None and message.id == interaction.original.id and words in message.content


def images_in(interaction: FakeInteraction) -> list[bytes]:
    assert interaction.original is not None
    return attachments_of(interaction.original)


def metric(runner: BotRunner, line_start: str) -> float:
    for line in runner.jobs.metrics.render().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("scope", ["user", "shared", "global"])
async def test_429s_on_the_acknowledgement_the_status_edit_and_the_result_are_waited_out(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture, scope: Scope
):
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start()
    discord_server.force_rate_limit("POST", CALLBACK, scope, retry_after=0.05)
    discord_server.force_rate_limit("PATCH", ORIGINAL, scope, retry_after=0.05)  # the "Generating" edit
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "slow down"})
    await interaction.wait_callback()
    job = await runner.generating(interaction)
    discord_server.force_rate_limit("PATCH", ORIGINAL, scope, retry_after=0.05)  # the result
    assert job.modelslab_id is not None
    modelslab.complete(job.modelslab_id)
    runner.jobs.wake(job.id)
    job = await runner.wait_posted(job.id)

    assert job.status is JobStatus.SUCCEEDED and len(images_in(interaction)) == 1
    assert results_posted(discord_server, interaction) == 1
    assert [a.scope for a in discord_server.rate_limited] == [scope] * 3
    lines = rate_limit_lines(logs)
    assert len(lines) == 3 and all(f"(scope {scope}" in line and "waiting 0.05 s as told" in line for line in lines)
    assert all("{token}" in line and interaction.token not in line for line in lines)
    assert metric(runner, f'imagine_discord_rate_limited_total{{scope="{scope}"}}') == 3
    assert discord_py_rate_limit_lines(logs) == []  # one line a 429: the bot's, not discord.py's as well


async def test_a_ban_while_results_are_posted_loses_nothing_and_the_retries_are_spaced(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start()
    interactions = []
    for n in range(4):
        interaction = await discord_server.invoke_slash("imagine", {"prompt": f"banned {n}"})
        await interaction.wait_callback()
        interactions.append(interaction)
    for interaction in interactions:
        await discord_server.wait_for_message(functools.partial(shows, interaction=interaction, words="Generating"))
    ids = await runner.store.ids()
    jobs = [await runner.store.get(job_id) for job_id in ids]

    discord_server.start_ban()
    for job in jobs:
        assert job is not None and job.modelslab_id is not None
        modelslab.complete(job.modelslab_id)
        runner.jobs.wake(job.id)
    # Every job tries, and is refused: then one request at a time, each further apart than the one before.
    async with asyncio.timeout(10):
        while len(discord_server.rate_limited) < 5:
            await discord_server.wait_for_request("*", ".", since=len(discord_server.requests))
    assert metric(runner, "imagine_discord_banned") == 1
    discord_server.lift_ban()
    for job_id in ids:
        job = await runner.wait_posted(job_id, timeout=20)
        assert job.status is JobStatus.SUCCEEDED

    refused = [a.at for a in discord_server.rate_limited if a.scope == "ban"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(refused)]
    # The results already on their way when the ban began are refused together; after that, one request at a time,
    # at least the first probe delay of the test's timings (0.05 s) apart.
    assert len([gap for gap in gaps if gap < 0.05 - 0.01]) <= len(jobs) - 1, gaps
    for interaction in interactions:
        assert results_posted(discord_server, interaction) == 1
        assert len(images_in(interaction)) == 1
    lines = rate_limit_lines(logs)
    assert sum(line.startswith("Discord refuses every request") for line in lines) == 1, lines
    assert sum(line.startswith("Discord answers again") for line in lines) == 1, lines
    assert metric(runner, 'imagine_discord_rate_limited_total{scope="ban"}') == len(refused)
    assert metric(runner, "imagine_discord_banned") == 0


async def test_a_proxys_own_429_and_a_408_do_not_drop_the_result(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """A REST proxy (nirn-proxy) makes up a 429 when a node of its cluster fails: no Via, `generated-by-proxy`, retry
    after 1 s; discord.py takes it for a ban and gives up at once. A 408 says Discord did not answer the proxy in
    time. Both mean "later", never "no"."""
    await runner.start()
    proxy = {"Via": "", "generated-by-proxy": "true", "Retry-After": "1", "X-RateLimit-Scope": "user"}
    discord_server.fail_next("PATCH", ORIGINAL, 429, {"retry_after": 1}, headers=proxy)
    discord_server.fail_next("PATCH", ORIGINAL, 408, {"message": "Request Timeout", "code": 0})
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "through a proxy"})
    await interaction.wait_callback()
    job = await runner.wait_posted(timeout=20)
    assert job.status is JobStatus.SUCCEEDED
    assert results_posted(discord_server, interaction) == 1
    lines = rate_limit_lines(logs)
    assert any("REST proxy answered" in line and "1.00 s" in line for line in lines)
    assert any("(408)" in line for line in lines)
    assert not any("refuses every request" in line for line in lines)  # not taken for a ban
    assert metric(runner, 'imagine_discord_rate_limited_total{scope="proxy"}') == 1


def callbacks_sent(discord_server: FakeDiscord, interaction: FakeInteraction) -> list[int]:
    """The status Discord (or a proxy) answered each of the interaction's callbacks with, in order."""
    return [
        rec.status
        for rec in discord_server.requests
        if re.match(CALLBACK, rec.path) and str(interaction.id) in rec.path
    ]


@pytest.mark.parametrize(
    ("status", "handled", "answers"),
    [
        (408, True, [408]),  # a proxy gave up waiting, after Discord had shown it: it is found, the job goes on
        (502, True, [502, 400]),  # discord.py sends it again after a 5xx: "already acknowledged" (40060)
        (408, False, [408, 200]),  # it never got through: no message to be found, so it is sent again
        (NO_ANSWER, True, [NO_ANSWER]),  # the connection was lost after Discord had shown it: found
    ],
)
async def test_an_acknowledgement_whose_answer_was_lost_is_looked_for_and_the_job_goes_on(
    runner: BotRunner,
    discord_server: FakeDiscord,
    modelslab: FakeModelsLab,
    logs: LogCapture,
    status: int,
    handled: bool,
    answers: list[int],
):
    """A 408 or a 5xx does not say whether Discord showed the acknowledgement: dropping the job then could leave a
    member with "Sending to ModelsLab…" and nothing after it. The bot looks for the message first."""
    await runner.start()
    discord_server.fail_next("POST", CALLBACK, status, handled=handled)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": f"acknowledged through a {status}"})
    job = await runner.wait_posted(await runner.first_job_id_from_db(), timeout=20)
    assert job.status is JobStatus.SUCCEEDED
    assert callbacks_sent(discord_server, interaction) == answers
    assert results_posted(discord_server, interaction) == 1 and len(images_in(interaction)) == 1
    assert len(modelslab.submissions()) == 1
    assert not [m for m in discord_server.messages_in(discord_server.channel_id) if "could not confirm" in m.content]
    if answers[-1] != 200:
        assert any(
            "the acknowledgement failed" in r.getMessage() and "was shown" in r.getMessage() for r in logs.records
        )


async def test_an_acknowledgement_whose_answer_hangs_is_looked_for_after_the_window_and_the_job_goes_on(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """Discord took the callback, but its answer does not come (the HTTP session would wait minutes): two seconds
    after Discord's 3 s the bot looks for the message, finds it, and the job goes on."""
    await runner.start()
    discord_server.hold_next("POST", CALLBACK, 60)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "an answer that hangs"})
    job = await runner.wait_posted(await runner.first_job_id_from_db(timeout=15), timeout=20)
    assert job.status is JobStatus.SUCCEEDED
    assert results_posted(discord_server, interaction) == 1 and len(modelslab.submissions()) == 1
    assert any("the acknowledgement failed (TimeoutError" in r.getMessage() for r in logs.records)


async def test_an_acknowledgement_that_hangs_and_never_reached_discord_drops_the_job_within_seconds(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """A proxy holds the callback without passing it on, then gives up (408): the member saw nothing, and the job
    gives its quota back and says so in the channel seconds later, not when the HTTP session gives up."""
    logs.expected_errors.append("Command /imagine failed")
    await runner.start()
    discord_server.fail_next("POST", CALLBACK, 408)
    discord_server.hold_next("POST", CALLBACK, 60)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "an answer that never comes"})
    await discord_server.wait_for_message(lambda m: "could not confirm this request" in m.content, timeout=15)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "unanswered" and job.charged_images == 0
    assert interaction.original is None or interaction.original.flags & 64  # no public status message
    assert modelslab.submissions() == []


async def test_a_proxys_own_429_on_the_acknowledgement_is_sent_again_within_discords_3_seconds(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """nirn-proxy's 429 never reached Discord (discord.py takes it for a ban and gives up at once): the bot waits
    the second it says and sends the acknowledgement again, well within the 3 s Discord allows."""
    await runner.start()
    proxy = {"Via": "", "generated-by-proxy": "true", "Retry-After": "1", "X-RateLimit-Scope": "user"}
    discord_server.fail_next("POST", CALLBACK, 429, {"retry_after": 1}, headers=proxy)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "acknowledged after a proxy's 429"})
    job = await runner.wait_posted(await runner.first_job_id_from_db(), timeout=20)
    assert job.status is JobStatus.SUCCEEDED
    assert callbacks_sent(discord_server, interaction) == [429, 200]
    assert results_posted(discord_server, interaction) == 1
    assert any("sending it again in 1.0 s" in r.getMessage() for r in logs.records)


async def test_a_429_on_the_acknowledgement_that_would_outlast_discords_3_seconds_drops_the_job_and_says_so(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """Sent again after 5 s, the acknowledgement would be refused (Discord allows 3 s): the job is dropped unsent,
    uncharged, and the channel is told, as for any acknowledgement that surely did not reach the member."""
    logs.expected_errors.append("Command /imagine failed")
    await runner.start()
    proxy = {"Via": "", "generated-by-proxy": "true", "Retry-After": "5", "X-RateLimit-Scope": "user"}
    discord_server.fail_next("POST", CALLBACK, 429, {"retry_after": 5}, headers=proxy)
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "never acknowledged"})
    await discord_server.wait_for_message(lambda m: "could not confirm this request" in m.content)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "unanswered" and job.charged_images == 0
    # (a second callback, the error handler's private answer, may follow: it carries no job)
    assert callbacks_sent(discord_server, interaction)[0] == 429
    assert modelslab.submissions() == []
    assert any("sent again it would come after Discord's 3 s" in r.getMessage() for r in logs.records)


async def test_a_global_429_on_the_channel_route_holds_the_bot_and_the_result_is_posted_once(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab, logs: LogCapture
):
    """After the interaction token (Discord refuses it: 401), the result goes through the channel's message route,
    which discord.py's REST client sends: a global 429 there holds every request of the bot for its retry_after."""
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start()
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "late result"})
    job = await runner.generating(interaction)
    discord_server.expire_interaction(interaction)
    discord_server.force_rate_limit("PATCH", r"^/channels/\d+/messages/\d+$", "global", retry_after=0.05)
    assert job.modelslab_id is not None
    modelslab.complete(job.modelslab_id)
    runner.jobs.wake(job.id)
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.SUCCEEDED and len(images_in(interaction)) == 1
    posted = [r for r in discord_server.requests if r.method == "PATCH" and r.files and 200 <= r.status < 300]
    assert len(posted) == 1 and posted[0].path.startswith("/channels/")
    assert [a.scope for a in discord_server.rate_limited] == ["global"]
    assert any("(scope global" in line and "PATCH /channels/" in line for line in rate_limit_lines(logs))
    assert metric(runner, 'imagine_discord_rate_limited_total{scope="global"}') == 1
    assert discord_py_rate_limit_lines(logs) == []
