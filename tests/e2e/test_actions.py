"""The buttons on every result, end to end, including after a restart of the bot."""

from __future__ import annotations

import base64
import io

from PIL import Image

from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord

OTHER = 1_700_000_000_000_000_001


async def first_result(runner: BotRunner, discord_server: FakeDiscord, **options):
    options.setdefault("prompt", "a red fox in the snow")
    interaction = await discord_server.invoke_slash("imagine", options)
    await interaction.wait_callback()
    job = await runner.wait_posted()
    return job, interaction.original


def button_ids(message) -> list[str]:
    return [c["custom_id"] for row in message.components for c in row["components"]]


async def press(discord_server: FakeDiscord, message, custom_id: str, user_id: int | None = None):
    interaction = await discord_server.invoke_component(message.id, custom_id, user_id=user_id)
    await interaction.wait_callback()
    return interaction


async def test_every_result_carries_the_buttons(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server, samples=2, model="sdxl")
    assert button_ids(message) == [
        f"job:reroll:{job.id}",
        f"job:edit:{job.id}",
        f"job:info:{job.id}",
        f"job:delete:{job.id}",
        f"job:vary:{job.id}:1",
        f"job:vary:{job.id}:2",
        f"job:upscale:{job.id}:1",
        f"job:upscale:{job.id}:2",
    ]


async def test_reroll_by_another_member_is_their_job_with_a_new_seed(runner, discord_server, modelslab):
    discord_server.add_member(OTHER, "other")
    await runner.start()
    job, message = await first_result(runner, discord_server)
    pressed = await press(discord_server, message, f"job:reroll:{job.id}", user_id=OTHER)
    assert not pressed.original.flags & 64  # a new public status message
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.user_id == OTHER and child.parent_job_id == job.id and child.charged_images == 1
    assert child.request.prompt == job.request.prompt and child.seed != job.seed
    assert len(attachments_of(pressed.original)) == 1


async def child_of(runner: BotRunner, parent_id: str) -> str:
    assert runner.app is not None
    row = await runner.sql_one("SELECT id FROM jobs WHERE parent_job_id = ? ORDER BY created_at DESC", (parent_id,))
    assert row is not None, "no job was made from it"
    return str(row[0])


async def test_vary_remixes_the_picked_image_with_the_same_prompt(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server, samples=2, model="sdxl")
    second_image = attachments_of(message)[1]
    pressed = await press(discord_server, message, f"job:vary:{job.id}:2")
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.kind == "img2img" and child.request.strength == 0.5 and child.request.prompt == job.request.prompt
    call = next(c for c in modelslab.submissions() if c.path.endswith("img2img"))
    assert call.json["model_id"] == "sdxl"

    sent = Image.open(io.BytesIO(base64.b64decode(call.json["init_image"].partition(",")[2])))
    picked = Image.open(io.BytesIO(second_image))
    assert sent.size == picked.size and sent.convert("RGB").getpixel((5, 5)) == picked.convert("RGB").getpixel((5, 5))
    assert len(attachments_of(pressed.original)) == 1


async def test_upscale_posts_the_bigger_image_as_its_own_message(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server, width=512, height=384)
    pressed = await press(discord_server, message, f"job:upscale:{job.id}:1")
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.kind == "upscale" and child.status is JobStatus.SUCCEEDED
    assert [c.path for c in modelslab.submissions()][-1] == "/api/v6/image_editing/super_resolution"
    [image] = attachments_of(pressed.original)
    assert Image.open(io.BytesIO(image)).size == (1024, 768)
    assert pressed.original.id != message.id and len(attachments_of(message)) == 1  # the original stays


async def test_edit_opens_a_prefilled_form_and_makes_a_new_job(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server, model="sdxl", negative_prompt="blurry")
    opened = await press(discord_server, message, f"job:edit:{job.id}")
    assert opened.modal is not None
    fields = {row["components"][0]["label"]: row["components"][0] for row in opened.modal["components"]}
    assert fields["Prompt"]["value"] == "a red fox in the snow" and fields["Negative prompt"]["value"] == "blurry"
    submitted = await discord_server.submit_modal(
        opened.modal["custom_id"], {fields["Prompt"]["custom_id"]: "a blue fox in the snow"}
    )
    await submitted.wait_callback()
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.request.prompt == "a blue fox in the snow" and child.request.negative_prompt == "blurry"
    assert child.request.model_id == "sdxl"


async def test_info_shows_every_parameter_privately(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server, seed=777, steps=25, guidance=6.5)
    shown = await press(discord_server, message, f"job:info:{job.id}")
    text = shown.original.content
    assert shown.original.flags & 64
    for words in ("a red fox in the snow", "`flux`", "**Seed:** 777", "**Steps:** 25", "**Guidance:** 6.5", job.id):
        assert words in text


async def test_delete_is_for_the_requester_and_moderators_only(runner, discord_server, modelslab):
    discord_server.add_member(OTHER, "other")
    await runner.start()
    job, message = await first_result(runner, discord_server)
    refused = await press(discord_server, message, f"job:delete:{job.id}", user_id=OTHER)
    assert "Only the member who asked for it, or a member with Manage Messages" in refused.original.content
    assert not discord_server.messages[message.id].deleted
    done = await press(discord_server, message, f"job:delete:{job.id}", user_id=discord_server.moderator_id)
    assert done.original.content == "Deleted."
    await discord_server.wait_for_request("DELETE", rf"/messages/{message.id}$")
    assert discord_server.messages[message.id].deleted


async def test_buttons_work_after_a_restart_and_say_so_when_the_job_is_gone(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server)
    await runner.restart()
    shown = await press(discord_server, message, f"job:info:{job.id}")
    assert job.id in shown.original.content
    assert runner.app is not None
    await runner.sql("DELETE FROM jobs WHERE id = ?", (job.id,))
    gone = await press(discord_server, message, f"job:reroll:{job.id}")
    assert "no longer exists" in gone.original.content and gone.original.flags & 64


async def test_rerolling_a_remix_reuses_its_picture_and_the_menu_remixes_the_bots_own_result(
    runner, discord_server, modelslab
):
    await runner.start()
    _, message = await first_result(runner, discord_server)
    opened = await discord_server.invoke_message_command("Remix", message)  # the bot's own result
    await opened.wait_callback()
    fields = {c["components"][0]["label"]: c["components"][0]["custom_id"] for c in opened.modal["components"]}
    submitted = await discord_server.submit_modal(opened.modal["custom_id"], {fields["Prompt"]: "in winter"})
    await submitted.wait_callback()
    remix = await runner.wait_posted(await _job_with_prompt(runner, "in winter"))
    assert remix.kind == "img2img" and remix.status is JobStatus.SUCCEEDED
    first_input = next(c for c in modelslab.submissions() if c.path.endswith("img2img")).json["init_image"]

    rerolled = await press(discord_server, submitted.original, f"job:reroll:{remix.id}")
    child = await runner.wait_posted(await child_of(runner, remix.id))
    assert child.kind == "img2img" and child.status is JobStatus.SUCCEEDED
    second_input = [c for c in modelslab.submissions() if c.path.endswith("img2img")][-1].json["init_image"]
    assert second_input == first_input  # the same picture, from the stored copy
    assert len(attachments_of(rerolled.original)) == 1


async def _job_with_prompt(runner: BotRunner, prompt: str) -> str:
    assert runner.app is not None
    row = await runner.sql_one("SELECT id FROM jobs WHERE json_extract(request_json, '$.prompt') = ?", (prompt,))
    assert row is not None
    return str(row[0])


async def test_a_moderator_can_still_delete_a_result_whose_history_was_forgotten(runner, discord_server, modelslab):
    await runner.start()
    job, message = await first_result(runner, discord_server)
    asked = await discord_server.invoke_slash("history", {}, subcommand="forget")
    await asked.wait_callback()
    sure = await discord_server.invoke_component(asked.original.id, f"history-forget:{job.user_id}:yes")
    await sure.wait_callback()
    info = await press(discord_server, message, f"job:info:{job.id}")
    assert "no longer exists" in info.original.content  # the prompt is gone
    done = await press(discord_server, message, f"job:delete:{job.id}", user_id=discord_server.moderator_id)
    assert done.original.content == "Deleted."
    await discord_server.wait_for_request("DELETE", rf"/messages/{message.id}$")
    assert discord_server.messages[message.id].deleted
