"""Server administration end to end: /config, /quota, keys, quotas, channels, NSFW policy, blocklist, autocomplete."""

from __future__ import annotations

import asyncio

import pytest

from bot.jobs.model import JobStatus
from bot.log import SecretFilter
from tests.e2e.conftest import BotRunner, attachments_of
from tests.fakes.discord_server import FakeDiscord, FakeInteraction
from tests.fakes.modelslab_server import ErrorAnswer, Immediate, Queued

GUILD_KEY = "ml-guild-own-key-7f3a"


async def run(discord_server: FakeDiscord, name: str, options=None, *, user_id=None, subcommand=None, **kwargs):
    interaction = await discord_server.invoke_slash(
        name, options or {}, user_id=user_id, subcommand=subcommand, **kwargs
    )
    await interaction.wait_callback()
    return interaction


async def config(discord_server: FakeDiscord, subcommand: str, options=None, *, user_id=None):
    """An admin (the moderator: Manage Server) runs /config <subcommand>."""
    return await run(
        discord_server,
        "config",
        options,
        user_id=user_id or discord_server.moderator_id,
        subcommand=subcommand,
    )


async def private_text(discord_server: FakeDiscord, interaction: FakeInteraction) -> str:
    """The ephemeral answer the member read (the reply, or the followup that replaced a "thinking" reply)."""
    message = await discord_server.wait_for_message(
        lambda m: m.interaction_id == interaction.id and not m.loading and bool(m.content)
    )
    assert message.flags & 64, "settings answers are private"
    return message.content


async def imagine(discord_server: FakeDiscord, prompt="a castle on a hill", **kwargs):
    options = {"prompt": prompt, **kwargs.pop("options", {})}
    return await run(discord_server, "imagine", options, **kwargs)


async def set_key(discord_server: FakeDiscord, key: str) -> str:
    opener = await config(discord_server, "apikey")
    assert opener.modal is not None, "/config apikey opens a form"
    [row] = opener.modal["components"]
    [field] = row["components"]
    submitted = await discord_server.submit_modal(
        opener.modal["custom_id"], {field["custom_id"]: key}, user_id=discord_server.moderator_id
    )
    await submitted.wait_callback()
    return await private_text(discord_server, submitted)


# ---------------------------------------------------------------------------------------------- permissions


async def test_config_needs_manage_server_even_when_discord_would_show_it(runner: BotRunner, discord_server):
    await runner.start()
    # Discord hides /config from members without Manage Server...
    with pytest.raises(PermissionError):
        await discord_server.invoke_slash("config", {}, subcommand="show", user_id=discord_server.member_id)
    # ...but server admins can override that in Integrations: the bot checks on its own.
    for command in discord_server.commands[discord_server.guild_id]:
        if command["name"] == "config":
            command["default_member_permissions"] = None
    attempt = await run(
        discord_server, "config", {"guild_daily": 1}, subcommand="limits", user_id=discord_server.member_id
    )
    assert "Manage Server permission" in await private_text(discord_server, attempt)
    assert (await runner.guilds.config(discord_server.guild_id)).guild_daily == 0  # nothing changed

    allowed = await config(discord_server, "limits", {"guild_daily": 5})
    assert "Limits saved" in await private_text(discord_server, allowed)
    assert (await runner.guilds.config(discord_server.guild_id)).guild_daily == 5


async def test_config_is_synced_with_manage_server_as_its_default_permission(runner, discord_server):
    await runner.start()
    [command] = [c for c in discord_server.commands[discord_server.guild_id] if c["name"] == "config"]
    assert int(command["default_member_permissions"]) == 1 << 5  # MANAGE_GUILD
    names = {option["name"] for option in command["options"]}
    assert names == {
        "show", "apikey", "apikey-clear", "limits", "role-limit", "channels", "nsfw", "blocklist", "defaults",
        "preset",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- keys


async def test_the_key_round_trip_is_checked_encrypted_and_used(runner, discord_server, modelslab, logs):
    modelslab.valid_keys.add(GUILD_KEY)
    await runner.start(allow_default_key=False)
    refused = await imagine(discord_server)
    assert "an admin (Manage Server) must run `/config apikey`" in refused.original.content

    answer = await set_key(discord_server, GUILD_KEY)
    assert "ending in `7f3a`" in answer and GUILD_KEY not in answer
    check = modelslab.requests[-1]
    assert check.path == "/api/v6/processing/request_count" and check.json == {"key": GUILD_KEY}

    shown = await private_text(discord_server, await config(discord_server, "show"))
    assert "ending in `7f3a`" in shown and GUILD_KEY not in shown

    await imagine(discord_server)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED
    assert modelslab.submissions()[0].json["key"] == GUILD_KEY

    await runner.stop()  # the database file, at rest, whole
    data_files = b"".join(path.read_bytes() for path in (runner.data).iterdir() if path.is_file())
    assert GUILD_KEY.encode() not in data_files
    assert GUILD_KEY not in logs.text


async def test_an_invalid_key_is_refused_and_nothing_is_saved(runner, discord_server, modelslab):
    await runner.start()
    answer = await set_key(discord_server, "ml-not-a-real-key-0000")
    assert "does not accept this key (invalid key): nothing was saved" in answer
    assert (await runner.guilds.config(discord_server.guild_id)).api_key_last4 is None
    shown = await private_text(discord_server, await config(discord_server, "show"))
    assert "the bot operator's default key" in shown


async def test_only_a_key_that_was_accepted_and_stored_is_masked_in_the_logs(runner, discord_server, modelslab):
    """A member's id pasted as a "key" must not vanish from every later log line; the real key must."""
    modelslab.valid_keys.add(GUILD_KEY)
    await runner.start()
    member = str(discord_server.member_id)
    assert "invalid key" in await set_key(discord_server, member)
    assert "invalid key" in await set_key(discord_server, "ml-not-a-real-key-0000")
    line = SecretFilter().clean(f"Request of member {member} refused; ml-not-a-real-key-0000")
    assert member in line and "ml-not-a-real-key-0000" in line
    await set_key(discord_server, GUILD_KEY)
    assert SecretFilter().clean(f"key {GUILD_KEY}") == "key [redacted]"


async def test_clearing_the_key_falls_back_to_the_operator_key_only_if_allowed(runner, discord_server, modelslab):
    modelslab.valid_keys.add(GUILD_KEY)
    await runner.start(allow_default_key=False)
    await set_key(discord_server, GUILD_KEY)
    cleared = await config(discord_server, "apikey-clear")
    assert "API key was removed" in await private_text(discord_server, cleared)
    refused = await imagine(discord_server)
    assert "no ModelsLab API key yet" in refused.original.content
    assert modelslab.submissions() == []


# ---------------------------------------------------------------------------------------------- quotas


@pytest.mark.also_on_postgresql
async def test_exactly_the_quota_is_admitted_when_fifty_requests_arrive_at_once(runner, discord_server, modelslab):
    members = [int(discord_server.add_member(1_400_000_000_000_000_000 + n, f"m{n}")["id"]) for n in range(50)]
    await runner.start()
    await config(discord_server, "limits", {"guild_daily": 10})
    interactions = await asyncio.gather(
        *(
            discord_server.invoke_slash("imagine", {"prompt": f"cat {n}"}, user_id=int(uid))
            for n, uid in enumerate(members)
        )
    )
    await asyncio.gather(*(i.wait_callback() for i in interactions))
    accepted = [i for i in interactions if not i.original.flags & 64]
    refused = [i for i in interactions if i.original.flags & 64]
    assert len(accepted) == 10 and len(refused) == 40
    for interaction in refused:
        assert "of its 10 images for today left (server daily limit)" in interaction.original.content
        assert "resets <t:" in interaction.original.content
    await runner.jobs.wait_idle()
    assert tuple(await runner.sql_one("SELECT COUNT(*), SUM(charged_images) FROM jobs")) == (10, 10)
    assert len(modelslab.submissions()) == 10


async def test_default_key_guild_daily_caps_servers_on_the_operators_key_exactly(runner, discord_server, modelslab):
    """DEFAULT_KEY_GUILD_DAILY joins the server's own daily limit in the one-statement reservation: the smaller
    applies, exactly, however many requests arrive at once; a server on its own key is not capped by it."""
    members = [int(discord_server.add_member(1_400_000_000_000_000_000 + n, f"m{n}")["id"]) for n in range(20)]
    await runner.start(default_key_guild_daily=4)
    await config(discord_server, "limits", {"guild_daily": 50})  # the server's own limit is higher: the cap wins
    interactions = await asyncio.gather(
        *(discord_server.invoke_slash("imagine", {"prompt": f"cat {n}"}, user_id=uid) for n, uid in enumerate(members))
    )
    await asyncio.gather(*(i.wait_callback() for i in interactions))
    refused = [i for i in interactions if i.original.flags & 64]
    assert len(refused) == 16 and len(modelslab.submissions()) <= 4
    for interaction in refused:
        assert (
            "This server runs on the bot operator's ModelsLab key, which makes at most 4 images a day for each "
            "server (the operator's daily cap); 0 are left today"
        ) in interaction.original.content
        assert "resets <t:" in interaction.original.content and "`/config apikey`" in interaction.original.content
    quota = await private_text(discord_server, await run(discord_server, "quota"))
    assert "**This server:** 0 of 4 left (the bot operator's cap for servers on its key) today" in quota

    await config(discord_server, "limits", {"guild_daily": 2})  # now the server's own limit is the smaller
    await runner.jobs.wait_idle()
    own = await imagine(discord_server)
    assert "of its 2 images for today left (server daily limit)" in own.original.content

    modelslab.valid_keys.add(GUILD_KEY)
    await config(discord_server, "limits", {"guild_daily": 0})
    await set_key(discord_server, GUILD_KEY)  # its own key: the operator's cap no longer applies
    accepted = await imagine(discord_server)
    assert not accepted.original.flags & 64


async def test_samples_count_and_a_failed_job_gives_its_images_back(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "limits", {"user_daily": 3})
    modelslab.script(ErrorAnswer(message="Model not found"))
    failed = await imagine(discord_server, options={"samples": 3})
    await runner.wait_posted(await runner.first_job_id_from_db())
    assert "model not found" in failed.original.content

    accepted = await imagine(discord_server, options={"samples": 3})  # the failure's 3 images came back
    assert not accepted.original.flags & 64
    refused = await imagine(discord_server, options={"samples": 1})
    assert "You have 0 of your 3 images for today left (daily limit per member)" in refused.original.content
    quota = await private_text(discord_server, await run(discord_server, "quota"))
    assert "**You:** 0 of 3 left today (3 used)" in quota
    assert "reset <t:" in quota


async def test_a_role_limit_lifts_the_member_limit(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "limits", {"user_daily": 1})
    await config(discord_server, "role-limit", {"role": discord_server.moderator_role_id, "user_daily": 0})
    for n in range(3):
        done = await imagine(discord_server, f"moderator picture {n}", user_id=discord_server.moderator_id)
        assert not done.original.flags & 64
    await imagine(discord_server, "member picture one")
    second = await imagine(discord_server, "member picture two")
    assert "You have 0 of your 1 images for today left (daily limit per member)" in second.original.content


async def test_cooldown_and_concurrent_jobs(runner, discord_server, modelslab):
    modelslab.default_behaviour = Queued(eta=300)  # stays running
    await runner.start()
    await config(discord_server, "limits", {"user_concurrent": 1})
    first = await imagine(discord_server, "first")
    assert not first.original.flags & 64
    second = await imagine(discord_server, "second")
    assert "You already have 1 job(s) running, the most this server allows at once" in second.original.content

    await config(discord_server, "limits", {"user_concurrent": 0, "cooldown": 600})
    third = await imagine(discord_server, "third")
    assert "600 s between a member's requests (cooldown): you can ask again <t:" in third.original.content
    assert len(modelslab.submissions()) == 1


# ---------------------------------------------------------------------------------------------- channels, gallery


async def test_generation_can_be_restricted_to_listed_channels(runner, discord_server, modelslab):
    await runner.start()
    allowed = discord_server.second_channel_id
    await config(discord_server, "channels", {"action": "allow", "channel": allowed})
    refused = await imagine(discord_server, channel_id=discord_server.channel_id)
    assert f"use <#{allowed}>" in refused.original.content and refused.original.flags & 64
    done = await imagine(discord_server, channel_id=allowed)
    assert not done.original.flags & 64
    await config(discord_server, "channels", {"action": "everywhere"})
    again = await imagine(discord_server, "anywhere", channel_id=discord_server.channel_id)
    assert not again.original.flags & 64


async def test_finished_images_are_copied_to_the_gallery_with_credit(runner, discord_server, modelslab):
    await runner.start()
    gallery = discord_server.second_channel_id
    await config(discord_server, "channels", {"action": "gallery", "channel": gallery})
    interaction = await imagine(discord_server, "a gallery piece")
    job = await runner.wait_posted()
    [copy] = [m for m in discord_server.messages_in(gallery) if m.attachments]
    assert f"by <@{discord_server.member_id}>" in copy.content and "a gallery piece" in copy.content
    assert [a.data for a in copy.attachments] == attachments_of(interaction.original)
    assert job.gallery_message_id == copy.id


# ---------------------------------------------------------------------------------------------- content policy


async def test_flagged_results_are_hidden_behind_a_spoiler_by_default(runner, discord_server, modelslab):
    modelslab.script(Immediate(nsfw=True))
    await runner.start()
    interaction = await imagine(discord_server, "beach")
    await runner.wait_posted()
    assert modelslab.submissions()[0].json["safety_checker"] == "yes"
    [attachment] = interaction.original.attachments
    assert attachment.filename.startswith("SPOILER_")
    assert "flagged this result as NSFW" in interaction.original.content


async def test_flagged_results_can_be_withheld(runner, discord_server, modelslab):
    modelslab.script(Immediate(nsfw=True))
    await runner.start()
    await config(discord_server, "nsfw", {"policy": "withhold"})
    interaction = await imagine(discord_server, "beach")
    job = await runner.wait_posted()
    assert interaction.original.attachments == []
    assert "withholds such images outside age-restricted channels" in interaction.original.content
    assert job.status is JobStatus.SUCCEEDED


async def test_in_an_age_restricted_channel_the_checker_is_off_and_images_are_shown(runner, discord_server, modelslab):
    discord_server.channels[discord_server.second_channel_id]["nsfw"] = True
    modelslab.script(Immediate(nsfw=True))
    await runner.start()
    await config(discord_server, "nsfw", {"policy": "withhold"})
    interaction = await imagine(discord_server, "beach", channel_id=discord_server.second_channel_id)
    await runner.wait_posted()
    assert modelslab.submissions()[0].json["safety_checker"] == "no"
    [attachment] = interaction.original.attachments
    assert not attachment.filename.startswith("SPOILER_")


@pytest.mark.parametrize(
    ("rule", "prompt", "refused"),
    [
        ("gore", "GORE on the walls", True),
        ("gore", "a gory scene", False),
        ("gore", "Gorey-style ink drawing", False),
        ("blood*", "a bloody knife", True),
        ("blood*", "lifeblood of the city", False),
        ("red wine", "a glass of  Red   Wine", True),
        ("red wine", "red winery", False),
    ],
)
async def test_the_blocklist_matches_whole_words_and_names_the_rule(
    runner, discord_server, modelslab, rule, prompt, refused
):
    await runner.start()
    added = await config(discord_server, "blocklist", {"action": "add", "rule": rule})
    assert f"`{rule}` added" in await private_text(discord_server, added)
    interaction = await imagine(discord_server, prompt)
    if refused:
        assert f"(rule: `{rule}`)" in interaction.original.content and interaction.original.flags & 64
        assert modelslab.submissions() == []
    else:
        assert not interaction.original.flags & 64


async def test_a_prompt_too_long_for_the_blocklist_to_read_is_refused_privately(runner, discord_server, modelslab):
    """A prompt of 2,000 characters that NFKC spells out in 36,000 would hold the event loop for tens of
    milliseconds against a large blocklist: refused for its length, with the numbers, before anything is spent."""
    await runner.start()
    await config(discord_server, "blocklist", {"action": "add", "rule": "gore"})
    interaction = await imagine(discord_server, "\ufdfa" * 2000)
    assert "too long for this server's blocklist to read" in interaction.original.content
    assert interaction.original.flags & 64 and modelslab.submissions() == []


async def test_blocklist_list_and_remove(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "blocklist", {"action": "add", "rule": "Gore"})
    listed = await private_text(discord_server, await config(discord_server, "blocklist", {"action": "list"}))
    assert "`gore`" in listed
    removed = await config(discord_server, "blocklist", {"action": "remove", "rule": "gore"})
    assert "removed" in await private_text(discord_server, removed)
    assert not (await imagine(discord_server, "gore")).original.flags & 64


# ---------------------------------------------------------------------------------------------- defaults, models


async def test_server_defaults_apply_and_allowed_models_are_enforced(runner, discord_server, modelslab):
    await runner.start()
    saved = await config(
        discord_server,
        "defaults",
        {"model": "sdxl", "negative_prompt": "blurry", "width": 768, "steps": 15, "allowed_models": "sdxl, fluxdev"},
    )
    assert "Defaults saved" in await private_text(discord_server, saved)
    await imagine(discord_server, "defaults please")
    body = (await modelslab.wait_for_submission()).json
    assert (body["model_id"], body["negative_prompt"], body["width"], body["num_inference_steps"]) == (
        "sdxl",
        "blurry",
        768,
        15,
    )
    refused = await imagine(discord_server, "flux please", options={"model": "flux"})
    assert "`model` must be one of this server's allowed models: `sdxl`, `fluxdev`" in refused.original.content


async def test_model_autocomplete_offers_allowed_models_or_the_public_list(runner, discord_server, modelslab):
    await runner.start()
    public = await discord_server.invoke_autocomplete("imagine", {"prompt": "x", "model": "flux"}, "model")
    await public.wait_callback()
    names = [choice["value"] for choice in public.autocomplete_choices]
    assert names[:3] == ["flux", "fluxdev", "fluxschnell"]
    assert any(call.path == "/api/v4/dreambooth/model_list" for call in modelslab.requests)

    await config(discord_server, "defaults", {"allowed_models": "sdxl,midjourney"})
    limited = await discord_server.invoke_autocomplete("imagine", {"prompt": "x", "model": ""}, "model")
    await limited.wait_callback()
    assert [choice["value"] for choice in limited.autocomplete_choices] == ["sdxl", "midjourney"]


# ---------------------------------------------------------------------------------------------- review findings


async def test_a_job_is_fetched_with_the_key_it_was_sent_with_even_after_the_key_changes(
    runner, discord_server, modelslab
):
    modelslab.valid_keys |= {GUILD_KEY, "ml-guild-new-key-9b9b"}
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start()
    await set_key(discord_server, GUILD_KEY)
    interaction = await imagine(discord_server, "made with the old key")
    call = await modelslab.wait_for_submission()
    assert call.json["key"] == GUILD_KEY
    await set_key(discord_server, "ml-guild-new-key-9b9b")
    modelslab.complete(call.job_id)
    runner.jobs.wake(call.json["track_id"])
    job = await runner.wait_posted(call.json["track_id"])
    assert job.status is JobStatus.SUCCEEDED and job.charged_images == 1
    assert {c.json["key"] for c in modelslab.fetches(call.job_id)} == {GUILD_KEY}
    assert len(attachments_of(interaction.original)) == 1
    assert [row[0] for row in await runner.sql("SELECT api_key_ciphertext FROM jobs")] == [None]  # not kept once shown


async def test_the_key_form_is_refused_to_a_member_who_lost_manage_server(runner, discord_server, modelslab):
    modelslab.valid_keys.add(GUILD_KEY)
    await runner.start()
    opener = await config(discord_server, "apikey")
    [row] = opener.modal["components"]
    [field] = row["components"]
    submitted = await discord_server.submit_modal(
        opener.modal["custom_id"], {field["custom_id"]: GUILD_KEY}, permissions=0
    )
    await submitted.wait_callback()
    assert "Manage Server permission" in await private_text(discord_server, submitted)
    assert (await runner.guilds.config(discord_server.guild_id)).api_key_last4 is None
    assert not any(call.path.endswith("request_count") for call in modelslab.requests)


async def test_images_from_an_age_restricted_channel_never_reach_the_gallery(runner, discord_server, modelslab):
    discord_server.channels[discord_server.second_channel_id]["nsfw"] = True
    await runner.start()
    gallery = discord_server.channel_id
    await config(discord_server, "channels", {"action": "gallery", "channel": gallery})
    await imagine(discord_server, "after dark", channel_id=discord_server.second_channel_id)
    job = await runner.wait_posted()
    assert job.status is JobStatus.SUCCEEDED and job.gallery_message_id is None
    assert not [m for m in discord_server.messages_in(gallery) if m.attachments]


async def test_an_unreadable_key_is_said_plainly(runner, discord_server, modelslab, logs):
    logs.expected_errors.append("cannot be decrypted")  # the operator must hear of it, once
    modelslab.valid_keys.add(GUILD_KEY)
    await runner.start(allow_default_key=False)
    await set_key(discord_server, GUILD_KEY)
    await runner.restart(allow_default_key=False, secret_key="another-secret-key-entirely-000")
    refused = await imagine(discord_server)
    assert "can no longer be read" in refused.original.content and "`/config apikey` again" in refused.original.content
    shown = await private_text(discord_server, await config(discord_server, "show"))
    assert "**unreadable**" in shown
    assert logs.text.count("cannot be decrypted") == 1


async def test_a_role_limit_must_lift_the_member_limit(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "limits", {"user_daily": 5})
    lower = await config(discord_server, "role-limit", {"role": discord_server.moderator_role_id, "user_daily": 3})
    assert "must be higher" in await private_text(discord_server, lower)
    assert (await runner.guilds.config(discord_server.guild_id)).role_limits == {}


async def test_without_a_model_the_first_allowed_one_is_used(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "defaults", {"allowed_models": "sdxl,fluxdev"})
    done = await imagine(discord_server, "no model named")
    assert not done.original.flags & 64
    assert (await modelslab.wait_for_submission()).json["model_id"] == "sdxl"


async def test_asking_for_more_than_the_whole_daily_limit_says_so(runner, discord_server, modelslab):
    await runner.start()
    await config(discord_server, "limits", {"user_daily": 2})
    refused = await imagine(discord_server, options={"samples": 4})
    assert "at most 2 images a day (daily limit): ask for 2 or fewer" in refused.original.content


# ---------------------------------------------------------------------------------------------- presets


async def test_presets_are_saved_offered_and_applied_below_options_and_flags(runner, discord_server, modelslab):
    await runner.start()
    saved = await config(
        discord_server,
        "preset",
        {"action": "save", "name": "Wide", "flags": "--ar 16:9 --steps 15 --model sdxl --no text"},
    )
    assert "Preset `wide` saved" in await private_text(discord_server, saved)

    offered = await discord_server.invoke_autocomplete("imagine", {"prompt": "x", "preset": "wi"}, "preset")
    await offered.wait_callback()
    assert [c["value"] for c in offered.autocomplete_choices] == ["wide"]

    interaction = await imagine(discord_server, "a valley --steps 12", options={"preset": "wide", "seed": 5})
    body = (await modelslab.wait_for_submission()).json
    assert (body["width"], body["height"], body["model_id"]) == (1024, 576, "sdxl")  # from the preset
    assert body["num_inference_steps"] == 12 and body["seed"] == 5  # a flag, then an option, win over it
    assert body["negative_prompt"] == "text" and body["prompt"] == "a valley"
    job = await runner.wait_posted()
    info = await discord_server.invoke_component(interaction.original.id, f"job:info:{job.id}")
    await info.wait_callback()
    chosen = info.original.content.split("**Chosen by:** ")[1]
    assert chosen.startswith(
        "the command's options: seed; flags in the prompt: steps; the preset `wide`: model, negative prompt, size;"
    )


async def test_bad_presets_are_refused(runner, discord_server, modelslab):
    await runner.start()
    words = await config(discord_server, "preset", {"action": "save", "name": "x", "flags": "a cat --ar 1:1"})
    assert "only flags" in await private_text(discord_server, words)
    unknown = await config(discord_server, "preset", {"action": "save", "name": "x", "flags": "--chaos 5"})
    assert "`--chaos` is not a flag this bot knows" in await private_text(discord_server, unknown)
    unfit = await config(discord_server, "preset", {"action": "save", "name": "x", "flags": "--steps 500"})
    assert (
        "`--steps` must be a whole number from 20 to 50 for the flux model (you gave 500) (it comes from the pre"
        in (await private_text(discord_server, unfit))
    )
    flux_only = await config(discord_server, "preset", {"action": "save", "name": "x", "flags": "--model flux --no a"})
    assert "`--no` is ignored by the flux model" in await private_text(discord_server, flux_only)
    assert await runner.guilds.presets(discord_server.guild_id) == {}
    missing = await imagine(discord_server, options={"preset": "nope"})
    assert "`preset` must be one of this server's presets" in missing.original.content
    assert modelslab.submissions() == []
