"""/remix and the Remix message menu, end to end: image checks, normalisation, delivery to ModelsLab."""

from __future__ import annotations

import base64
import io

import aiohttp
from PIL import Image

from bot.jobs.housekeeping import INPUT_RETENTION
from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import FakeModelsLab


def photo(width: int, height: int, *, orientation: int | None = None, fmt: str = "JPEG") -> bytes:
    """A picture whose left half is red and right half blue (so a rotation shows), with an EXIF orientation."""
    image = Image.new("RGB", (width, height), (220, 20, 20))
    image.paste((20, 20, 220), (width // 2, 0, width, height))
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format=fmt, exif=exif)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def remix(discord_server: FakeDiscord, data: bytes, filename="photo.jpg", content_type="image/jpeg", **options):
    attachment = discord_server.add_attachment(filename, data, content_type)
    interaction = await discord_server.invoke_slash(
        "remix", {"image": attachment, "prompt": options.pop("prompt", "as a watercolour"), **options}
    )
    await interaction.wait_callback()
    return interaction


async def received_init_image(modelslab: FakeModelsLab) -> bytes:
    call = await modelslab.wait_for_submission()
    reference = call.json["init_image"]
    if reference.startswith("data:image/png;base64,"):
        return base64.b64decode(reference.partition(",")[2])
    async with aiohttp.ClientSession() as session, session.get(reference) as response:
        assert response.status == 200
        return await response.read()


async def test_remix_sends_the_normalised_image_inline_without_a_public_url(
    runner: BotRunner, discord_server, modelslab
):
    await runner.start()
    # 1500×900 landscape, but EXIF says "rotate 90°": upright it is 900×1500.
    interaction = await remix(discord_server, photo(1500, 900, orientation=6), strength=0.55)
    assert interaction.callback_type == 4 and not interaction.original.flags & 64
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED and job.kind == "img2img"

    call = modelslab.submissions()[0]
    assert call.path == "/api/v6/images/img2img"
    assert call.json["model_id"] == "fluxdev" and call.json["strength"] == 0.55
    assert "width" not in call.json and "height" not in call.json
    sent = decode(base64.b64decode(call.json["init_image"].partition(",")[2]))
    assert sent.format == "PNG" and sent.mode == "RGB"
    assert sent.size == (608, 1024)  # upright, longest side 1024, both sides multiples of 8
    # Orientation 6 means "turn 90° clockwise": the red left edge is now on top, the blue right edge below.
    top, bottom = sent.getpixel((300, 10)), sent.getpixel((300, 1000))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 150 and bottom[2] > 150
    [image] = attachments_of(interaction.original)
    assert decode(image).size == (608, 1024)  # ModelsLab's img2img keeps the input's size


async def test_with_a_public_url_modelslab_fetches_the_image_from_the_bot(runner, discord_server, modelslab):
    runner.with_webhooks()
    await runner.start()
    await remix(discord_server, photo(800, 600, fmt="PNG"), filename="drawing.png", content_type="image/png")
    call = await modelslab.wait_for_submission()
    url = call.json["init_image"]
    job = await runner.only_job()
    assert url.startswith(f"{runner.settings().public_base}/inputs/{job.id}/") and url.endswith(".png")
    assert modelslab.jobs[call.job_id].size == (800, 600)  # the fake fetched and read it
    job = await runner.wait_posted(job.id)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 404  # served only while the job is at ModelsLab
        async with session.get(url.replace(job.id, "0" * 32)) as response:
            assert response.status == 404


async def test_files_that_are_not_pictures_are_refused_before_anything_is_spent(runner, discord_server, modelslab):
    await runner.start()
    interaction = await remix(discord_server, b"hello", filename="notes.txt", content_type="text/plain")
    assert interaction.original.flags & 64
    assert "`image` must be a PNG, JPEG or WebP picture" in interaction.original.content
    assert await runner.job_count() == 0 and modelslab.requests == []


async def test_a_damaged_or_tiny_image_is_reported_and_nothing_is_sent(runner, discord_server, modelslab):
    await runner.start()
    broken = await remix(discord_server, b"\x89PNG\r\n\x1a\n not really", filename="x.png", content_type="image/png")
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "bad_image" and job.charged_images == 0
    # Found only once the picture was read (after the acknowledgement): said to the member alone, and the
    # public status message taken away.
    [private] = broken.followups
    assert private.flags & 64
    assert "This image cannot be used: the file is not an image that can be read" in private.content
    assert broken.original is None or broken.original.deleted

    tiny = await remix(discord_server, photo(40, 40, fmt="PNG"), filename="t.png", content_type="image/png")
    notice = await discord_server.wait_for_message(lambda m: "too small (40×40" in m.content)
    assert notice.flags & 64 and notice.interaction_id == tiny.id
    assert modelslab.submissions() == []


async def test_flux_cannot_remix(runner, discord_server, modelslab):
    await runner.start()
    refused = await remix(discord_server, photo(300, 300), model="flux")
    assert "`model` `flux` cannot remix images: use fluxdev or fluxschnell" in refused.original.content


async def test_the_remix_menu_opens_a_form_and_remixes_a_members_picture(runner, discord_server, modelslab):
    await runner.start()
    attachment = discord_server.add_attachment("cat.png", photo(512, 512, fmt="PNG"), "image/png")
    posted = discord_server.post_user_message(discord_server.channel_id, "my cat", attachments=[attachment])
    opened = await discord_server.invoke_message_command("Remix", posted)
    await opened.wait_callback()
    assert opened.modal is not None
    fields = {c["components"][0]["label"]: c["components"][0]["custom_id"] for c in opened.modal["components"]}
    submitted = await discord_server.submit_modal(
        opened.modal["custom_id"],
        {fields["Prompt"]: "a tiger", fields["Strength (0 keeps the image, 1 ignores it)"]: "0.4"},
    )
    await submitted.wait_callback()
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED and job.request.prompt == "a tiger" and job.request.strength == 0.4
    sent = decode(await received_init_image(modelslab))
    assert sent.size == (512, 512)
    assert len(attachments_of(submitted.original)) == 1


async def test_the_remix_menu_on_a_message_without_a_picture_says_so(runner, discord_server, modelslab):
    await runner.start()
    posted = discord_server.post_user_message(discord_server.channel_id, "just words")
    opened = await discord_server.invoke_message_command("Remix", posted)
    await opened.wait_callback()
    assert opened.modal is None and opened.original.flags & 64
    assert "This message has no picture that Discord hosts to remix" in opened.original.content


async def test_the_remix_menu_never_fetches_an_embed_image_from_elsewhere(runner, discord_server, modelslab):
    """An embed's image can point anywhere (an internal address included): only Discord's own hosts are read."""
    await runner.start()
    posted = discord_server.post_user_message(
        discord_server.channel_id, "look", embeds=[{"image": {"url": "http://169.254.169.254/latest/meta-data"}}]
    )
    opened = await discord_server.invoke_message_command("Remix", posted)
    await opened.wait_callback()
    assert opened.modal is None and "no picture that Discord hosts" in opened.original.content


async def test_remix_prompts_take_flags_and_refuse_what_image_to_image_cannot_do(runner, discord_server, modelslab):
    await runner.start()
    refused = await remix(discord_server, photo(640, 480), prompt="as a watercolour --ar 16:9")
    assert "`--ar` cannot be set when remixing: the result keeps the input image's size" in refused.original.content
    refused = await remix(discord_server, photo(640, 480), prompt="as a watercolour --panorama")
    assert "`--panorama` works only when making an image from text (/imagine)" in refused.original.content
    assert modelslab.submissions() == []

    await remix(discord_server, photo(640, 480), prompt="as a watercolour --clip_skip 2 --steps 12 --tomesd no")
    body = (await modelslab.wait_for_submission()).json
    assert body["prompt"] == "as a watercolour" and body["num_inference_steps"] == 12
    assert (body["clip_skip"], body["tomesd"]) == (2, "no")


async def test_a_remixed_picture_is_kept_a_day_then_deleted_by_the_housekeeping_of_the_running_bot(
    runner: BotRunner, discord_server, modelslab
):
    await runner.start()
    await remix(discord_server, photo(640, 480))
    job = await runner.wait_posted()
    assert await runner.store.input_image(job.id) is not None  # posting deletes nothing: Re-roll and Edit need it
    await runner.sql("UPDATE job_inputs SET created_at = created_at - ?", (INPUT_RETENTION + 60,))  # a day passes
    await runner.restart()
    housekeeping = runner.jobs.housekeeping
    await housekeeping.wait_rounds(1)  # the bot's first round, at start
    assert await runner.store.input_image(job.id) is None
    await runner.stop()
    assert not housekeeping.running  # stopped with the job service
