"""/history end to end: pages, someone else's history, forget with confirmation, export."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import ErrorAnswer

ALICE, BOB = 1_600_000_000_000_000_001, 1_600_000_000_000_000_002


async def make_jobs(runner: BotRunner, discord_server: FakeDiscord, prompts: list[str], user_id: int) -> None:
    for prompt in prompts:
        interaction = await discord_server.invoke_slash("imagine", {"prompt": prompt}, user_id=user_id)
        await interaction.wait_callback()
    assert runner.app is not None
    await runner.jobs.wait_idle()


async def history(discord_server: FakeDiscord, subcommand: str, options=None, *, user_id: int):
    interaction = await discord_server.invoke_slash("history", options or {}, subcommand=subcommand, user_id=user_id)
    await interaction.wait_callback()
    return interaction


def button(message, way: str) -> dict:
    return next(c for row in message.components for c in row["components"] if c["custom_id"].endswith(way))


async def test_history_pages_newest_first_with_buttons(runner, discord_server, modelslab):
    discord_server.add_member(ALICE, "alice")
    modelslab.script(ErrorAnswer(message="Model not found"))
    await runner.start()
    await make_jobs(runner, discord_server, [f"picture {n}" for n in range(7)], ALICE)

    shown = await history(discord_server, "show", user_id=ALICE)
    page = shown.original
    assert page.flags & 64
    [embed] = page.embeds
    assert "page 1 of 2 (7 jobs)" in embed["title"]
    lines = embed["description"].splitlines()
    assert lines[0].startswith("1. **picture 6**") and len(lines) == 5  # newest first
    assert "imagine · done · 1 image · <t:" in lines[0] and "[result](https://discord.com/channels/" in lines[0]
    assert button(page, "prev")["disabled"] is True

    older = await discord_server.invoke_component(page.id, button(page, "next")["custom_id"], user_id=ALICE)
    await older.wait_callback()
    [embed] = discord_server.messages[page.id].embeds
    assert "page 2 of 2" in embed["title"]
    last = embed["description"].splitlines()[-1]
    assert last.startswith("7. **picture 0**") and "failed (model not found) · 0 images" in last


async def test_only_admins_see_someone_elses_history(runner, discord_server, modelslab):
    discord_server.add_member(ALICE, "alice")
    discord_server.add_member(BOB, "bob")
    await runner.start()
    await make_jobs(runner, discord_server, ["alice's secret prompt"], ALICE)
    refused = await history(discord_server, "show", {"member": ALICE}, user_id=BOB)
    assert "Manage Server permission" in refused.original.content
    seen = await history(discord_server, "show", {"member": ALICE}, user_id=discord_server.moderator_id)
    [embed] = seen.original.embeds
    assert "alice's secret prompt" in embed["description"] and f"<@{ALICE}>" in embed["description"]


@pytest.mark.also_on_postgresql
async def test_forget_asks_first_then_deletes_prompts_but_keeps_the_counts(runner, discord_server, modelslab):
    discord_server.add_member(ALICE, "alice")
    await runner.start()
    await runner_config_limit(discord_server, user_daily=3)
    await make_jobs(runner, discord_server, ["private one", "private two"], ALICE)

    asked = await history(discord_server, "forget", user_id=ALICE)
    assert "Delete your history" in asked.original.content
    keep = await discord_server.invoke_component(asked.original.id, f"history-forget:{ALICE}:no", user_id=ALICE)
    await keep.wait_callback()
    assert "Nothing was deleted" in discord_server.messages[asked.original.id].content
    assert len(await runner.store.history(ALICE, guild_id=None)) == 2

    asked = await history(discord_server, "forget", user_id=ALICE)
    sure = await discord_server.invoke_component(asked.original.id, f"history-forget:{ALICE}:yes", user_id=ALICE)
    await sure.wait_callback()
    assert "2 job(s) forgotten" in discord_server.messages[asked.original.id].content
    assert await runner.store.history(ALICE, guild_id=None) == []
    assert runner.app is not None
    rows = await runner.sql("SELECT request_json, user_id, message_id FROM jobs")
    assert len(rows) == 2 and all(r[1] == 0 and r[2] is None and "private" not in r[0] for r in rows)

    # The server's count and the member's daily limit still hold: forgetting is not a quota reset.
    usage = await runner.store.usage(discord_server.guild_id, ALICE, time.time())
    assert (usage.guild_today, usage.user_today) == (2, 2)
    second = await discord_server.invoke_slash("imagine", {"prompt": "one more"}, user_id=ALICE)
    await second.wait_callback()
    third = await discord_server.invoke_slash("imagine", {"prompt": "too many"}, user_id=ALICE)
    await third.wait_callback()
    assert "You have 0 of your 3 images for today left" in third.original.content


async def runner_config_limit(discord_server: FakeDiscord, **limits: int) -> None:
    interaction = await discord_server.invoke_slash(
        "config", limits, subcommand="limits", user_id=discord_server.moderator_id
    )
    await interaction.wait_callback()


async def test_export_sends_the_members_own_history_as_csv_or_json(runner, discord_server, modelslab):
    discord_server.add_member(ALICE, "alice")
    discord_server.add_member(BOB, "bob")
    await runner.start()
    await make_jobs(runner, discord_server, ['a, "quoted" prompt', '=HYPERLINK("http://evil")'], ALICE)
    await make_jobs(runner, discord_server, ["bob's"], BOB)

    as_csv = await history(discord_server, "export", user_id=ALICE)
    message = as_csv.original
    assert message.flags & 64
    [file] = message.attachments
    assert file.filename == "imagine-history.csv"
    rows = list(csv.DictReader(io.StringIO(file.data.decode("utf-8-sig"))))
    assert [r["prompt"] for r in rows] == ['\'=HYPERLINK("http://evil")', 'a, "quoted" prompt']  # never a formula
    assert rows[1]["status"] == "done" and rows[1]["cost_images"] == "1" and rows[1]["model"] == "flux"
    assert "ml-test-key" not in file.data.decode("utf-8-sig")

    as_json = await history(discord_server, "export", {"format": "json"}, user_id=ALICE)
    [file] = as_json.original.attachments
    [formula, record] = json.loads(file.data)
    assert formula["prompt"].startswith("=")  # JSON is data, kept as typed
    assert record["prompt"] == 'a, "quoted" prompt' and record["result"].startswith("https://discord.com/channels/")
    job = await runner.store.get(record["job"])
    assert job is not None and job.status is JobStatus.SUCCEEDED and record["seed"] == job.seed
