"""How many SQL statements a job costs on the webhook path: each state written once, the row read back never.

Every statement runs on the one database thread, and each is a round trip that wakes the event loop, so a job
that reads back the row it has just written pays for it in CPU and in latency for every other job (issue 16:
19 statements a job, 11 of them `SELECT * FROM jobs WHERE id = ?`).
"""

from __future__ import annotations

from tests.e2e.conftest import BotRunner, attachments_of
from tests.e2e.test_query_plans import LEADING_COMMENTS, command, shape, traced  # noqa: F401 - `traced` is a fixture
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab, Queued


async def test_a_job_finished_by_webhook_costs_five_statements(
    runner: BotRunner,
    discord_server: FakeDiscord,
    modelslab: FakeModelsLab,
    traced: list[str],  # noqa: F811 - the fixture imported above
):
    runner.with_webhooks()
    modelslab.default_behaviour = Queued(eta=300)  # only the webhook can finish it in time
    await runner.start()
    # A first job: the server's settings and the member's /settings are then in memory, as in a running bot.
    warm_up = await runner.generating(await command(discord_server, "imagine", {"prompt": "warm-up"}))
    assert warm_up.modelslab_id is not None
    modelslab.complete(warm_up.modelslab_id)
    await runner.wait_posted(warm_up.id)
    await runner.jobs.wait_idle()

    traced.clear()  # from here on the test reads nothing from the database itself: it would be counted
    interaction = await command(discord_server, "imagine", {"prompt": "a fox"})
    await discord_server.wait_for_message(lambda m: m.id == interaction.original.id and "Generating" in m.content)
    submitted = modelslab.submissions()[-1].job_id
    assert submitted is not None
    modelslab.complete(submitted)
    await runner.jobs.wait_idle()
    statements = [shape(LEADING_COMMENTS.sub("", s, count=1)) for s in traced]
    assert len(attachments_of(interaction.original)) == 1

    kinds = [" ".join(s.split()[:3]) for s in statements]
    assert kinds == [
        "INSERT INTO jobs",  # stored, within the server's limits
        "UPDATE jobs SET",  # submitting: the key it is sent with (sealed), and the status message it is shown in
        "UPDATE jobs SET",  # processing, with ModelsLab's id and ETA
        "UPDATE jobs SET",  # succeeded, from the confirming fetch
        "UPDATE jobs SET",  # posted
    ], "\n".join(statements)
    # The driver started from the job as stored, with its status message; the webhook read nothing: the job's
    # driver was waiting for it here, under ModelsLab's id.
    assert all(s.endswith("RETURNING *") for s in statements[1:4])
    assert "message_id" in statements[1], statements[1]
    row = await runner.sql_one("SELECT message_id FROM jobs WHERE modelslab_id = ?", (str(submitted),))
    assert row[0] == interaction.original.id
