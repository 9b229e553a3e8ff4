"""/imagine end to end: the real discord.py bot, the fake Discord, the fake ModelsLab, a real SQLite file."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.jobs.model import JobStatus
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord, FakeMessage
from tests.fakes.modelslab_server import ErrorAnswer, Hang, Immediate, Queued, RawAnswer

ETA_TIMESTAMP = re.compile(r"<t:\d+:R>")


def pixels(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def embed_fields(message: FakeMessage) -> dict[str, str]:
    assert message.embeds, "the result carries an embed with the job's details"
    return {field["name"]: field["value"] for field in message.embeds[0].get("fields", [])}


async def imagine(discord_server: FakeDiscord, **options):
    options.setdefault("prompt", "a lighthouse at dusk, oil painting")
    interaction = await discord_server.invoke_slash("imagine", options)
    await interaction.wait_callback()
    return interaction


# ---------------------------------------------------------------------------------------------- success


@pytest.mark.also_on_postgresql
async def test_imagine_posts_the_images_in_the_status_message(runner: BotRunner, discord_server, modelslab):
    modelslab.script(Immediate(generation_time=3.25))
    await runner.start()

    interaction = await imagine(discord_server, prompt="a lighthouse at dusk", width=768, height=512, seed=1234)

    assert interaction.callback_latency is not None and interaction.callback_latency < 3
    assert interaction.callback_type == 4  # a public status message, not an ephemeral reply
    job = await runner.wait_posted()
    message = interaction.original
    assert message is not None and message.flags & 64 == 0

    [image] = attachments_of(message)
    [url] = modelslab.outputs_of(job.modelslab_id)
    assert image == modelslab.image_bytes(url)  # uploaded to Discord, byte for byte
    assert pixels(image) == (768, 512)
    assert "cdn" not in message.content and "http" not in message.content  # never a ModelsLab URL
    assert "a lighthouse at dusk" in message.content

    fields = embed_fields(message)
    assert fields["Model"] == "`flux`"
    assert fields["Seed"] == "1234"
    assert fields["Size"] == "768×512"
    assert fields["Time"] == "3.2 s"

    assert job.status is JobStatus.SUCCEEDED
    assert job.seed == 1234 and job.image_count == 1 and job.charged_images == 1
    assert job.message_id == message.id
    assert str(job.user_id) == str(interaction.payload["member"]["user"]["id"])
    assert job.channel_id == discord_server.channel_id and job.guild_id == discord_server.guild_id
    submitted = modelslab.submissions()[0].json
    assert submitted["track_id"] == job.id and submitted["key"] == "ml-test-key"
    assert submitted["width"] == 768 and submitted["seed"] == 1234 and submitted["model_id"] == "flux"
    assert "webhook" not in submitted  # no PUBLIC_URL: polling only


async def test_without_a_seed_one_is_chosen_sent_and_the_real_one_shown(runner, discord_server, modelslab):
    """Slim ModelsLab answers do not report a seed they chose, so the bot chooses it and sends it."""
    modelslab.script(Queued(eta=0.1, ready_after_fetches=0, form="slim"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    sent_seed = modelslab.submissions()[0].json["seed"]
    assert isinstance(sent_seed, int)
    assert modelslab.jobs[job.modelslab_id].seed == sent_seed  # the seed ModelsLab really used
    assert embed_fields(interaction.original)["Seed"] == str(sent_seed)
    assert job.seed == sent_seed


async def test_two_identical_prompts_never_send_an_identical_payload(runner, discord_server, modelslab):
    await runner.start()
    await imagine(discord_server, prompt="same")
    await imagine(discord_server, prompt="same")
    first = await modelslab.wait_for_submission()
    second = await modelslab.wait_for_submission(since=modelslab.requests.index(first) + 1)
    assert first.json["prompt"] == second.json["prompt"] == "same"
    assert first.json["seed"] != second.json["seed"]  # ModelsLab's spam filter refuses repeats within 30 s


async def test_several_samples_arrive_as_separate_attachments(runner, discord_server, modelslab):
    await runner.start()
    interaction = await imagine(discord_server, samples=3, model="sdxl", negative_prompt="blurry", steps=12)
    job = await runner.wait_posted()
    images = attachments_of(interaction.original)
    assert len(images) == 3 and len(set(images)) == 3
    assert images == [modelslab.image_bytes(u) for u in modelslab.outputs_of(job.modelslab_id)]
    assert embed_fields(interaction.original)["Negative prompt"] == "blurry"
    body = modelslab.submissions()[0].json
    assert (body["samples"], body["negative_prompt"], body["num_inference_steps"]) == (3, "blurry", 12)


async def test_a_queued_job_shows_the_eta_then_the_images(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=40))
    await runner.start()
    interaction = await imagine(discord_server)

    status = await discord_server.wait_for_message(
        lambda m: m.id == (interaction.original.id if interaction.original else -1) and "Generating" in m.content
    )
    assert ETA_TIMESTAMP.search(status.content), status.content
    job = await runner.only_job()
    assert job.status is JobStatus.PROCESSING and job.eta_at is not None

    modelslab.complete(job.modelslab_id)
    runner.app.jobs.wake(job.id)  # the test does not wait 40 s for the first fetch: wake the poller now
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1
    assert len(modelslab.submissions()) == 1


async def test_polling_follows_the_eta_and_fetches_until_ready(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=0.2, ready_after_fetches=2, form="slim"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert len(modelslab.fetches(job.modelslab_id)) == 3
    assert len(attachments_of(interaction.original)) == 1


@pytest.mark.parametrize("flavour_paths", [("v6", "/api/v6/images/"), ("enterprise", "/api/v1/enterprise/")])
async def test_both_api_flavours_submit_and_fetch_on_their_own_paths(runner, discord_server, modelslab, flavour_paths):
    flavour, prefix = flavour_paths
    modelslab.script(Queued(eta=0.1, ready_after_fetches=1, form="slim"))
    await runner.start(modelslab_api=flavour)
    await imagine(discord_server, model="sdxl")
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    paths = [call.path for call in modelslab.requests if call.method == "POST"]
    fetch = f"/api/v6/images/fetch/{job.modelslab_id}" if flavour == "v6" else "/api/v1/enterprise/fetch"
    assert paths == [prefix + "text2img", fetch, fetch]


@pytest.mark.parametrize("id_as", ["int", "str", "uuid"])
async def test_fetch_result_urls_and_ids_of_every_shape_are_followed(runner, discord_server, modelslab, id_as):
    """The full "processing" form names a `fetch_result` URL; ids come as numbers, numeric strings or not."""
    modelslab.script(Queued(eta=0.1, ready_after_fetches=0, form="full", id_as=id_as, fetch_with_meta=True))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    [fetch] = modelslab.fetches()
    assert fetch.job_id == job.modelslab_id
    assert len(attachments_of(interaction.original)) == 1


async def test_the_cdn_copy_is_used_when_the_output_link_fails(runner, discord_server, modelslab):
    """`proxy_links` are the fallback: here the output URL points nowhere."""
    modelslab.script(Immediate(extra_fields={"output": ["http://127.0.0.1:9/gone.png"]}))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"width": 1020}, "`width` must be a multiple of 8 from 256 to 1024"),
        ({"samples": 9}, "`samples` must be from 1 to 4"),
        ({"steps": 5}, "`steps` must be a whole number from 20 to 50"),
        ({"guidance": 30.0}, "`guidance` must be from 1 to 20"),
        ({"negative_prompt": "ugly"}, "`negative_prompt` is ignored by the flux model"),
        ({"model": "fluxdev", "lora": "a,b", "lora_strength": "0.5"}, "`lora_strength` needs exactly one strength"),
    ],
)
async def test_invalid_options_are_refused_privately_and_nothing_is_sent(
    runner, discord_server, modelslab, options, words
):
    await runner.start()
    interaction = await imagine(discord_server, **options)
    message = interaction.original
    assert message is not None and message.flags & 64, "refusals are ephemeral"
    assert words in message.content
    assert modelslab.submissions() == []
    assert await runner.job_count() == 0


async def test_without_any_api_key_the_member_is_told_what_to_do(runner, discord_server, modelslab):
    await runner.start(modelslab_api_key=None)
    interaction = await imagine(discord_server)
    assert interaction.original.flags & 64
    assert "This server has no ModelsLab API key yet" in interaction.original.content
    assert "`/config apikey`" in interaction.original.content
    assert modelslab.requests == [] and await runner.job_count() == 0


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("behaviour", "kind", "words"),
    [
        (ErrorAnswer(http_status=401, message="Invalid API key"), "invalid_key", "invalid key"),
        (ErrorAnswer(http_status=402, message="Insufficient credits"), "no_credits", "out of credits"),
        (ErrorAnswer(message="Model not found"), "model_not_found", "no model called `flux` (model not found)"),
        (
            ErrorAnswer(message="Your prompt contains NSFW words", key="messege"),
            "prompt_refused",
            "refused this prompt",
        ),
        (RawAnswer(http_status=502), "service_down", "service down"),
        (ErrorAnswer(http_status=503, message="Service Unavailable"), "service_down", "service down"),
        (
            ErrorAnswer(http_status=400, message={"width": ["The width must be a number."]}, key="messege"),
            "invalid_request",
            "width: The width must be a number.",
        ),
    ],
)
async def test_each_modelslab_error_replaces_the_status_with_one_plain_sentence(
    runner, discord_server, modelslab, behaviour, kind, words
):
    # Passing faults are tried again, three times in all: make them last. (A full queue waits: test_queue.py.)
    modelslab.script(*[behaviour] * (3 if kind == "service_down" else 1))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()

    message = interaction.original
    assert words in message.content
    assert "Traceback" not in message.content and "{" not in message.content
    assert message.attachments == [] and message.embeds == []
    assert job.status is JobStatus.FAILED and job.error_kind == kind and job.charged_images == 0


async def test_a_job_that_fails_at_modelslab_after_queueing(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=0.1, ready_after_fetches=0, outcome="failed"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "generation_failed"
    assert "could not generate this image" in interaction.original.content


async def test_a_job_that_never_finishes_is_given_up_at_the_timeout(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=0.1))  # never ready
    await runner.start(modelslab_job_timeout=1.5)
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "timed_out" and job.charged_images == 0
    assert "did not finish within 1 minute" in interaction.original.content


async def test_fetch_faults_are_retried_until_the_result_comes(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=0.1, ready_after_fetches=0))
    modelslab.fail_fetches(2, RawAnswer(http_status=502))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1


# ---------------------------------------------------------------------------------------------- delivery


async def test_the_result_arrives_after_the_interaction_token_expired(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=60))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    discord_server.expire_interaction(interaction)
    # The bot's own clock says the same: 15 minutes have passed.
    await runner.sql("UPDATE jobs SET token_expires_at = 0 WHERE id = ?", (job.id,))
    modelslab.complete(job.modelslab_id)
    runner.app.jobs.wake(job.id)
    await runner.wait_posted(job.id)

    message = discord_server.messages[job.message_id]
    assert len(message.attachments) == 1
    assert any(
        r.method == "PATCH" and r.path == f"/channels/{job.channel_id}/messages/{job.message_id}"
        for r in discord_server.requests
    )


async def test_a_deleted_status_message_is_replaced_by_a_new_one(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=60))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    discord_server.delete_message(interaction.original.id)
    modelslab.complete(job.modelslab_id)
    runner.app.jobs.wake(job.id)
    job = await runner.wait_posted(job.id)

    posted = [m for m in discord_server.messages_in(job.channel_id) if m.attachments]
    assert len(posted) == 1 and posted[0].id == job.message_id != interaction.original.id


async def test_results_too_large_for_the_upload_limit_are_reencoded_to_fit(runner, discord_server, modelslab):
    await runner.start()
    interaction = await discord_server.invoke_slash(
        "imagine", {"prompt": "noise", "samples": 2, "model": "sdxl"}, attachment_size_limit=1500
    )
    await interaction.wait_callback()
    await runner.wait_posted()
    images = attachments_of(interaction.original)
    assert len(images) == 2 and sum(len(i) for i in images) <= 1500


# ---------------------------------------------------------------------------------------------- restarts


@pytest.mark.also_on_postgresql
async def test_a_restart_resumes_polling_and_posts_exactly_once(runner, discord_server, modelslab):
    modelslab.script(Queued(eta=0.5))  # not ready until complete(): every fetch before it says "processing"
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    assert job.status is JobStatus.PROCESSING

    await runner.stop()
    modelslab.complete(job.modelslab_id)
    await runner.start()
    job = await runner.wait_posted(job.id)

    assert job.status is JobStatus.SUCCEEDED
    assert len(modelslab.submissions()) == 1  # never submitted twice
    with_images = [m for m in discord_server.messages.values() if m.attachments]
    assert [m.id for m in with_images] == [interaction.original.id]


async def test_a_result_whose_webhook_came_while_the_bot_was_down_is_posted_at_the_restart_not_at_the_eta(
    runner, discord_server, modelslab
):
    """ModelsLab's webhook reached no one (the bot was stopped), and its ETA is five minutes away: the restarted bot
    looks at each job at ModelsLab at once, and the member gets the image now."""
    runner.with_webhooks()
    modelslab.script(Queued(eta=300))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    await runner.stop()
    modelslab.complete(job.modelslab_id)
    delivery = await modelslab.wait_for_webhook_delivery()
    assert delivery.status is None  # refused: nobody listening

    await runner.start()
    job = await runner.wait_posted(job.id, timeout=10)
    assert job.status is JobStatus.SUCCEEDED and len(attachments_of(interaction.original)) == 1
    assert len(modelslab.fetches(job.modelslab_id)) == 1


async def test_a_job_finished_but_not_posted_before_a_crash_is_posted_once_after(runner, discord_server, modelslab):
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    # As if the bot died between posting and recording it: the edit is simply made again.
    await runner.sql("UPDATE jobs SET posted_at = NULL WHERE id = ?", (job.id,))
    await runner.restart()
    await runner.wait_posted(job.id)
    assert len([m for m in discord_server.messages.values() if m.attachments]) == 1
    assert len(attachments_of(interaction.original)) == 1
    assert len(modelslab.submissions()) == 1


@pytest.mark.also_on_postgresql
async def test_a_job_whose_submit_answer_was_lost_is_not_submitted_again(runner, discord_server, modelslab):
    await runner.start()
    modelslab.script(Queued(eta=60))
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    await runner.stop()
    # As if the bot died during the submit call: ModelsLab's answer (and id) never recorded.
    await runner.start()
    await runner.sql(
        "UPDATE jobs SET status = 'submitting', modelslab_id = NULL, posted_at = NULL WHERE id = ?", (job.id,)
    )
    await runner.restart()
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.FAILED and job.error_kind == "lost" and job.charged_images == 0
    assert "cannot tell whether ModelsLab got it" in interaction.original.content
    assert len(modelslab.submissions()) == 1


# ---------------------------------------------------------------------------------------------- webhooks


async def test_a_webhook_finishes_the_job_at_once_after_a_confirming_fetch(runner, discord_server, modelslab):
    public_url = runner.with_webhooks()
    modelslab.script(Queued(eta=300))  # polling alone would wait minutes
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    submitted = modelslab.submissions()[0].json
    assert submitted["webhook"].startswith(f"{public_url}/webhooks/modelslab/{job.id}/")
    assert submitted["track_id"] == job.id

    modelslab.complete(job.modelslab_id)  # the fake then calls the webhook
    delivery = await modelslab.wait_for_webhook_delivery()
    assert delivery.status == 200
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert len(modelslab.fetches(job.modelslab_id)) >= 1  # confirmed before trusted
    assert len(attachments_of(interaction.original)) == 1


async def test_a_webhook_that_comes_twice_posts_once(runner, discord_server, modelslab):
    runner.with_webhooks()
    modelslab.script(Queued(eta=300, webhook="twice"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    modelslab.complete(job.modelslab_id)
    await modelslab.wait_for_webhook_delivery(lambda d: d.attempt == 2)
    await runner.wait_posted(job.id)
    await runner.app.jobs.wait_idle()
    assert [d.status for d in modelslab.webhook_deliveries] == [200, 200], [
        d.error for d in modelslab.webhook_deliveries
    ]
    assert len([m for m in discord_server.messages.values() if m.attachments]) == 1
    assert len(attachments_of(interaction.original)) == 1


async def test_a_webhook_that_comes_before_the_submit_answer(runner, discord_server, modelslab):
    runner.with_webhooks()
    modelslab.script(Queued(eta=300, webhook="before_response"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert modelslab.webhook_deliveries[0].status == 200
    assert len(attachments_of(interaction.original)) == 1
    assert len([m for m in discord_server.messages.values() if m.attachments]) == 1


async def test_a_lost_submission_is_resolved_by_its_webhook(runner, discord_server, modelslab):
    runner.with_webhooks()
    modelslab.script(Queued(eta=300))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    modelslab_id = job.modelslab_id
    await runner.stop()
    await runner.start()
    await runner.sql("UPDATE jobs SET status = 'submitting', modelslab_id = NULL WHERE id = ?", (job.id,))
    await runner.restart()
    modelslab.complete(modelslab_id)  # its webhook names the ModelsLab id
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.SUCCEEDED and job.modelslab_id == str(modelslab_id)
    assert len(modelslab.submissions()) == 1
    assert len(attachments_of(interaction.original)) == 1


async def test_the_receiver_rejects_forged_and_malformed_calls_without_changing_anything(
    runner, discord_server, modelslab, logs
):
    import aiohttp

    base = runner.with_webhooks()
    modelslab.script(Queued(eta=300, webhook="never"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    token = runner.app.signer.token_for(job.id)
    other = "f" * 32
    good = {"status": "success", "id": job.modelslab_id, "track_id": job.id, "output": ["http://x/evil.png"]}
    cases = [
        (f"/webhooks/modelslab/{job.id}/wrong-token", good, 401),
        (f"/webhooks/modelslab/{job.id}/", good, 404),
        # A signed URL (only the bot can make one) of a job that does not exist, with a body that names it.
        (f"/webhooks/modelslab/{other}/{runner.app.signer.token_for(other)}", {**good, "track_id": other}, 404),
        (f"/webhooks/modelslab/{job.id}/{token}", {**good, "track_id": other}, 409),
        (f"/webhooks/modelslab/{job.id}/{token}", {**good, "meta": {"track_id": other}}, 409),
        (f"/webhooks/modelslab/{job.id}/{token}", "not json{", 400),
        (f"/webhooks/modelslab/{job.id}/{token}", ["a list"], 400),
        (f"/webhooks/modelslab/{job.id}/{token}", {"no": "status"}, 400),
        (f"/webhooks/modelslab/{job.id}/{token}", {"status": "success", "pad": "x" * (1024 * 1024 + 10)}, 413),
    ]
    fetches_before = len(modelslab.fetches())
    async with aiohttp.ClientSession() as session:
        for path, body, expected in cases:
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
            async with session.post(base + path, data=io.BytesIO(raw), headers=headers) as response:
                assert response.status == expected, (path, response.status)
    after = await runner.store.get(job.id)
    assert after == job  # nothing changed
    assert len(modelslab.fetches()) == fetches_before
    assert token not in logs.text


async def test_no_secret_reaches_the_logs(runner, discord_server, modelslab, logs):
    runner.with_webhooks()
    modelslab.script(Queued(eta=0.1, ready_after_fetches=1), ErrorAnswer(http_status=401, message="Invalid API key"))
    await runner.start()
    interaction = await imagine(discord_server)
    first = await runner.wait_posted()
    second = await imagine(discord_server, prompt="second")
    token = runner.app.signer.token_for(first.id)
    await runner.app.jobs.wait_idle()
    secrets = ["ml-test-key", "fake-bot-token.Xy12.secretpart", token, "test-secret-key-0123456789abcdef"]
    for secret in [*secrets, interaction.token, second.token]:
        assert secret not in logs.text
    assert "Job " + first.id in logs.text  # the logs do say what happened


# ---------------------------------------------------------------------------------------------- faults on the way


async def test_discord_errors_while_posting_are_retried_and_the_result_posted_once(runner, discord_server, modelslab):
    await runner.start()
    original = r"^/webhooks/\d+/[^/]+/messages/@original$"
    discord_server.fail_next("PATCH", original, 500)  # discord.py retries this one itself
    discord_server.fail_next("PATCH", original, 429, headers={"Via": ""}, times=2)  # this one reaches the bot
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert len(attachments_of(interaction.original)) == 1
    assert len([m for m in discord_server.messages.values() if m.attachments]) == 1
    refused = [r for r in discord_server.requests if r.method == "PATCH" and r.injected]
    assert len(refused) == 3


async def test_an_interaction_token_refused_by_discord_falls_back_to_the_channel(runner, discord_server, modelslab):
    """The bot still thinks the token is valid; Discord says 401. The channel endpoint edits the same message."""
    modelslab.script(Queued(eta=60))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.generating(interaction)
    discord_server.expire_interaction(interaction)
    modelslab.complete(job.modelslab_id)
    runner.jobs.wake(job.id)
    job = await runner.wait_posted(job.id)
    assert discord_server.expired_token_calls >= 1
    assert job.message_id == interaction.original.id
    assert len(attachments_of(interaction.original)) == 1
    assert job.interaction_token is None  # not kept once shown


async def test_a_command_that_cannot_be_acknowledged_sends_nothing_and_says_so_in_the_channel(
    runner, discord_server, modelslab, logs
):
    logs.expected_errors.append("Command /imagine failed")
    await runner.start()
    discord_server.fail_next("POST", r"^/interactions/\d+/[^/]+/callback$", 400, {"code": 50035, "message": "no"})
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "never acknowledged"})
    notice = await discord_server.wait_for_message(lambda m: "could not confirm this request" in m.content)
    assert notice.channel_id == discord_server.channel_id and notice.interaction_id is None
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "unanswered" and job.charged_images == 0
    assert modelslab.submissions() == []
    assert interaction.callback_type is None or interaction.original is None or not interaction.original.attachments


async def test_a_submit_call_without_an_answer_is_resolved_by_the_webhook(runner, discord_server, modelslab):
    from bot.app import Timings

    runner.with_webhooks()
    # ModelsLab takes the job but its answer never reaches the bot (which gives up waiting after 0.3 s).
    modelslab.script(Hang(1.0, then=Queued(eta=5, ready_after_seconds=1.5)))
    await runner.start(timings=Timings(modelslab_request_timeout=0.3, discord_retry_delays=(0.05,)))
    interaction = await imagine(discord_server)
    job = await runner.wait_posted(await runner.first_job_id_from_db())
    assert job.status is JobStatus.SUCCEEDED
    assert len(modelslab.submissions()) == 1  # never sent twice
    assert len(attachments_of(interaction.original)) == 1


async def test_a_submit_call_without_an_answer_and_no_webhook_is_not_sent_again(runner, discord_server, modelslab):
    """ModelsLab may have taken it (the fake does): sending it again could make, and bill, a second job."""
    from bot.app import Timings

    modelslab.script(Hang(1.0, then=Queued(eta=5)))
    timings = Timings(modelslab_request_timeout=0.3, discord_retry_delays=(0.05,), submit_retry_delay=0.05)
    await runner.start(timings=timings)
    interaction = await imagine(discord_server)
    job = await runner.wait_posted(await runner.first_job_id_from_db())
    assert job.status is JobStatus.FAILED and job.error_kind == "lost" and job.charged_images == 0
    assert "cannot tell whether ModelsLab got it" in interaction.original.content
    assert len(modelslab.submissions()) == 1


async def test_a_connection_that_could_not_be_made_is_tried_again_then_reported(runner, discord_server, logs):
    """Nothing reached ModelsLab (connection refused): safe to try again, three times in all."""
    from tests.e2e.conftest import free_port

    await runner.start(modelslab_base_url=f"http://127.0.0.1:{free_port()}")
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "service_down"
    assert "service down" in interaction.original.content
    assert logs.text.count("submit failed (ClientConnectorError") == 2  # then the third try fails for good


async def test_images_that_cannot_be_downloaded_are_left_out_but_still_counted(runner, discord_server, modelslab):
    """ModelsLab made (and billed) both images: the quota counts both, the member sees the one that came."""
    hosted = modelslab.host_image(_png(320, 256))
    modelslab.script(Immediate(proxy_links="absent", extra_fields={"output": [hosted, "http://127.0.0.1:9/gone.png"]}))
    await runner.start()
    interaction = await imagine(discord_server, samples=2)
    job = await runner.wait_posted()
    assert attachments_of(interaction.original) == [modelslab.image_bytes(hosted)]
    assert "1 of 2 images could not be downloaded" in interaction.original.content
    assert "ModelsLab made and billed them, so they count against the quota" in interaction.original.content
    assert job.image_count == 1 and job.charged_images == 2


def test_the_readme_says_what_the_bot_does_with_images_that_could_not_be_downloaded():
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "only the posted ones count" not in readme and "could not be downloaded are not counted" not in readme
    assert "ModelsLab made and billed the missing ones too, so they count against the quota" in readme


async def test_when_no_image_can_be_downloaded_the_member_is_told(runner, discord_server, modelslab):
    modelslab.script(Immediate(proxy_links="absent", extra_fields={"output": ["http://127.0.0.1:9/gone.png"]}))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.FAILED and job.error_kind == "download_failed" and job.charged_images == 1
    assert "could not be downloaded" in interaction.original.content


async def test_a_queued_job_past_its_deadline_at_restart_is_not_sent(runner, discord_server, modelslab):
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    # As if the bot had been down since before this job was sent, for longer than MODELSLAB_JOB_TIMEOUT.
    await runner.sql(
        "UPDATE jobs SET status = 'queued', posted_at = NULL, created_at = 0, deadline_at = 0, interaction_token = ?,"
        " token_expires_at = ? WHERE id = ?",
        (interaction.token, time.time() + 600, job.id),
    )
    await runner.restart()
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.FAILED and job.error_kind == "expired"
    assert "gave up on this request before sending it" in interaction.original.content
    assert len(modelslab.submissions()) == 1


async def test_a_job_stored_before_a_crash_finds_its_status_message_after_the_restart(
    runner, discord_server, modelslab
):
    """The bot died between acknowledging the command and recording the message id."""
    modelslab.script(ErrorAnswer(http_status=503, message="Service Unavailable"))
    await runner.start()
    interaction = await imagine(discord_server)
    job = await runner.wait_posted()
    await runner.sql(
        "UPDATE jobs SET status = 'queued', message_id = NULL, posted_at = NULL, error_kind = NULL,"
        " interaction_token = ?, token_expires_at = ? WHERE id = ?",
        (interaction.token, time.time() + 600, job.id),
    )
    await runner.restart()
    job = await runner.wait_posted(job.id)
    assert job.status is JobStatus.SUCCEEDED and job.message_id == interaction.original.id
    assert len(attachments_of(interaction.original)) == 1


async def test_enterprise_fetches_fall_back_to_the_sdk_path_when_the_documented_one_is_not_found(
    runner, discord_server, modelslab
):
    modelslab.script(Queued(eta=0.1, ready_after_fetches=0, form="slim"))
    modelslab.fail_fetches(1, ErrorAnswer(http_status=404, message="Request not found"))
    await runner.start(modelslab_api="enterprise")
    interaction = await imagine(discord_server, model="sdxl")
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert [c.path for c in modelslab.fetches()] == [
        "/api/v1/enterprise/fetch",
        f"/api/v1/enterprise/images/fetch/{job.modelslab_id}",
    ]
    assert len(attachments_of(interaction.original)) == 1


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- inline flags


async def test_inline_flags_set_the_options_and_leave_the_prompt_clean(runner, discord_server, modelslab):
    await runner.start()
    await imagine(
        discord_server,
        prompt="a cat on a roof --ar 16:9 --seed 7 --no text --steps 15 --style watercolor --model sdxl",
        negative_prompt="blurry",
    )
    body = (await modelslab.wait_for_submission()).json
    assert body["prompt"] == "a cat on a roof"
    assert (body["width"], body["height"], body["seed"], body["num_inference_steps"]) == (1024, 576, 7, 15)
    assert (body["model_id"], body["enhance_style"], body["negative_prompt"]) == ("sdxl", "watercolor", "blurry, text")


async def test_an_explicit_option_wins_over_a_flag_and_unknown_flags_are_refused(runner, discord_server, modelslab):
    await runner.start()
    await imagine(discord_server, prompt="a cat --seed 7 --ar 1:1", seed=9, width=512)
    body = (await modelslab.wait_for_submission()).json
    assert (body["seed"], body["width"], body["height"]) == (9, 512, 512)  # the height follows --ar's ratio
    refused = await imagine(discord_server, prompt="a cat --chaos 80")
    assert refused.original.flags & 64 and "`--chaos` is not a flag this bot knows" in refused.original.content
    flux_style = await imagine(discord_server, prompt="a cat --style anime")
    assert "`--style` is ignored by the flux model" in flux_style.original.content


async def test_an_ip_adapter_link_to_a_private_address_is_refused_and_nothing_is_sent(
    runner, discord_server, modelslab
):
    """ModelsLab would fetch the link on the server's account: the cloud metadata address must never reach it."""
    await runner.start()
    adapter = "--model sdxl --ip_adapter_id ip-adapter_sdxl --ip_adapter_image"
    for link in ("http://169.254.169.254/latest/meta-data", "https://[64:ff9b::a9fe:a9fe]/x", "https://127.1/x.png"):
        refused = await imagine(discord_server, prompt=f"a face {adapter} {link}")
        assert refused.original.flags & 64, "refusals are private"
        assert "`--ip_adapter_image` must be an https link to a picture on a public site" in refused.original.content
    assert modelslab.submissions() == [] and await runner.job_count() == 0
    await imagine(discord_server, prompt=f"a face {adapter} https://example.com/face.png")
    assert (await modelslab.wait_for_submission()).json["ip_adapter_image"] == "https://example.com/face.png"
