"""What a job is made from follows it: an image flagged as NSFW keeps its state in what is made of it, and a member's
own picture is forgotten everywhere it was copied."""

from __future__ import annotations

import pytest

from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner, attachments_of
from tests.e2e.test_actions import child_of, first_result, press
from tests.e2e.test_config import config
from tests.e2e.test_remix import photo, remix
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab, Immediate


async def flagged_result(runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab):
    modelslab.script(Immediate(nsfw=True))  # the first job only: what is made from it is not flagged itself
    job, message = await first_result(runner, discord_server, samples=2, model="sdxl")
    assert job.nsfw_detected and all(a.filename.startswith("SPOILER_") for a in message.attachments)
    return job, message


async def test_an_upscale_of_a_flagged_result_stays_behind_a_spoiler_and_out_of_the_gallery(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    await runner.start()
    gallery = discord_server.second_channel_id
    await config(discord_server, "channels", {"action": "gallery", "channel": gallery})
    job, message = await flagged_result(runner, discord_server, modelslab)
    pressed = await press(discord_server, message, f"job:upscale:{job.id}:1", user_id=discord_server.other_member_id)
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.kind == "upscale" and child.status is JobStatus.SUCCEEDED and not child.nsfw_detected
    [upscaled] = pressed.original.attachments
    assert upscaled.filename.startswith("SPOILER_")
    assert "made from an image flagged as NSFW: it is hidden behind a spoiler" in pressed.original.content
    assert [m for m in discord_server.messages_in(gallery) if m.attachments] == []  # neither the result nor its upscale


async def test_a_variation_of_a_flagged_result_is_withheld_where_the_server_withholds(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    await runner.start()
    job, message = await flagged_result(runner, discord_server, modelslab)
    await config(discord_server, "nsfw", {"policy": "withhold"})
    pressed = await press(discord_server, message, f"job:vary:{job.id}:2")
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.status is JobStatus.SUCCEEDED and child.source_flagged
    assert pressed.original.attachments == []
    assert "made from an image flagged as NSFW; this server withholds such images" in pressed.original.content


async def test_a_remix_of_a_picture_posted_behind_a_spoiler_is_shown_behind_one(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    await runner.start()
    interaction = await remix(discord_server, photo(640, 480), filename="SPOILER_photo.jpg")
    await runner.wait_posted()
    [result] = interaction.original.attachments
    assert result.filename.startswith("SPOILER_")


@pytest.mark.also_on_postgresql
async def test_forget_deletes_the_members_picture_in_every_copy_and_a_later_reroll_is_refused(
    runner: BotRunner, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """A Re-roll of a member's remix by someone else copies the member's picture (and its link) into the other
    member's job: /history forget must reach that copy too, or the picture would live on (and each copy restart
    the one-day retention)."""
    alice, bob = discord_server.member_id, discord_server.other_member_id
    await runner.start()
    remixed = await remix(discord_server, photo(640, 480))
    original = await runner.wait_posted()
    pressed = await press(discord_server, remixed.original, f"job:reroll:{original.id}", user_id=bob)
    copy = await runner.wait_posted(await child_of(runner, original.id))
    assert copy.user_id == bob and copy.picture_owner_id == alice and copy.request.source_url
    assert await runner.store.input_image(copy.id) is not None

    forget = await discord_server.invoke_slash("history", {}, subcommand="forget", user_id=alice)
    await forget.wait_callback()
    assert forget.original is not None
    confirmed = await discord_server.invoke_component(forget.original.id, f"history-forget:{alice}:yes", user_id=alice)
    await confirmed.wait_callback()

    kept = await runner.store.get(copy.id)
    assert kept is not None and kept.user_id == bob and kept.request.prompt  # Bob's job stays Bob's
    assert kept.request.source_url is None and await runner.store.input_image(copy.id) is None
    again = await press(discord_server, pressed.original, f"job:reroll:{copy.id}", user_id=bob)
    assert again.original.flags & 64
    assert "The picture this job was made from is no longer kept" in again.original.content
    assert await runner.job_count() == 2  # nothing new was stored, or charged
    assert len(attachments_of(pressed.original)) == 1  # what Bob was shown stays in the channel
