"""/settings end to end through the real discord.py: the form, what it stores, what it changes, remix mode,
and the precedence shown by Info; plus the ModelsLab parameters reached by flags in a real /imagine."""

from __future__ import annotations

import csv
import io

from tests.e2e.conftest import BotRunner
from tests.e2e.test_actions import child_of, press
from tests.e2e.test_config import config, imagine, private_text
from tests.fakes.discord_server import FakeDiscord, FakeMessage

OTHER = 1_700_000_000_000_000_001


async def open_settings(discord_server: FakeDiscord, user_id: int | None = None) -> FakeMessage:
    opened = await discord_server.invoke_slash("settings", {}, user_id=user_id)
    await opened.wait_callback()
    assert opened.original is not None and opened.original.flags & 64, "the form is private"
    return opened.original


def components(message: FakeMessage) -> dict[str, dict]:
    return {c["custom_id"]: c for row in message.components for c in row["components"]}


async def pick(discord_server: FakeDiscord, form: FakeMessage, part: str, value: str, user_id=None) -> FakeMessage:
    chosen = await discord_server.invoke_component(
        form.id, f"settings:{part}", component_type=3, values=[value], user_id=user_id
    )
    await chosen.wait_callback()
    assert chosen.original is not None and chosen.original.id == form.id, "the form itself is updated"
    return chosen.original


async def fill_more(discord_server: FakeDiscord, form: FakeMessage, fields: dict[str, str], user_id=None):
    opened = await discord_server.invoke_component(form.id, "settings:more", user_id=user_id)
    await opened.wait_callback()
    assert opened.modal is not None
    by_label = {row["components"][0]["label"].split(" ")[0]: row["components"][0] for row in opened.modal["components"]}
    submitted = await discord_server.submit_modal(
        opened.modal["custom_id"], {by_label[label]["custom_id"]: text for label, text in fields.items()}
    )
    await submitted.wait_callback()
    return submitted, by_label


async def test_the_form_shows_every_setting_and_what_is_picked_is_used_by_imagine(runner, discord_server, modelslab):
    await runner.start()
    form = await open_settings(discord_server)
    parts = components(form)
    assert set(parts) == {f"settings:{p}" for p in ("model", "aspect", "steps", "guidance", "remix", "more", "reset")}
    assert parts["settings:remix"]["label"] == "Remix mode: off"
    assert "**Model:** *server default*" in form.content

    await pick(discord_server, form, "model", "sdxl")
    await pick(discord_server, form, "aspect", "16:9")
    await pick(discord_server, form, "steps", "15")
    form = await pick(discord_server, form, "guidance", "5")
    assert "**Model:** `sdxl`" in form.content and "**Aspect ratio:** `16:9`" in form.content
    assert "**Steps:** `15`" in form.content and "**Guidance:** `5`" in form.content
    picked = [o["value"] for o in components(form)["settings:aspect"]["options"] if o.get("default")]
    assert picked == ["16:9"]  # the menu shows the current choice

    done = await imagine(discord_server, "a lighthouse")
    body = (await modelslab.wait_for_submission()).json
    assert (body["model_id"], body["width"], body["height"]) == ("sdxl", 1024, 576)
    assert (body["num_inference_steps"], body["guidance_scale"]) == (15, 5)
    job = await runner.wait_posted()
    info = await press(discord_server, done.original, f"job:info:{job.id}")
    assert (
        "**Chosen by:** the member's /settings: model, size, steps, guidance; the rest built in."
        in info.original.content
    )


async def test_settings_belong_to_one_member_and_a_reset_clears_them(runner, discord_server, modelslab):
    discord_server.add_member(OTHER, "other")
    await runner.start()
    form = await open_settings(discord_server)
    await pick(discord_server, form, "steps", "10")
    await pick(discord_server, form, "model", "sdxl")

    await imagine(discord_server, "a lighthouse", user_id=OTHER)
    other = (await modelslab.wait_for_submission()).json
    assert other["model_id"] == "flux" and other["num_inference_steps"] == 30  # the other member's built-ins

    reset = await discord_server.invoke_component(form.id, "settings:reset")
    await reset.wait_callback()
    assert "**Steps:** *server default*" in reset.original.content
    await imagine(discord_server, "a lighthouse")
    mine = modelslab.submissions()[-1].json
    assert mine["model_id"] == "flux" and mine["num_inference_steps"] == 30


async def test_the_more_form_checks_everything_before_saving_and_its_parameters_are_sent(
    runner, discord_server, modelslab
):
    await runner.start()
    form = await open_settings(discord_server)
    refused, _ = await fill_more(
        discord_server, form, {"Model": "sdxl", "Style": "not-a-style", "Other": "--clip_skip 2"}
    )
    assert "`Style` must be one of ModelsLab's styles" in await private_text(discord_server, refused)
    assert "**Model:** *server default*" in discord_server.messages[form.id].content  # nothing was saved

    refused, _ = await fill_more(discord_server, form, {"Other": "--steps 20"})
    assert "`--steps` has its own place in /settings" in await private_text(discord_server, refused)

    await fill_more(
        discord_server,
        form,
        {
            "Model": "sdxl",
            "Negative": "blurry",
            "Style": "watercolor",
            "Other": "--clip-skip 2 --scheduler DPMSolverMultistepScheduler --algorithm_type dpmsolver+++",
        },
    )
    text = discord_server.messages[form.id].content
    assert "`--scheduler DPMSolverMultistepScheduler --clip_skip 2 --algorithm_type dpmsolver+++`" in text

    await imagine(discord_server, "a lighthouse --no text --clip_skip 3")
    body = (await modelslab.wait_for_submission()).json
    assert body["model_id"] == "sdxl" and body["enhance_style"] == "watercolor"
    assert body["negative_prompt"] == "blurry, text"  # --no adds to the settings' negative prompt
    assert body["clip_skip"] == 3  # the prompt's flag wins over the settings
    assert (body["scheduler"], body["algorithm_type"]) == ("DPMSolverMultistepScheduler", "dpmsolver+++")


async def test_settings_that_the_chosen_model_does_not_take_are_skipped_not_refused(runner, discord_server, modelslab):
    await runner.start()
    form = await open_settings(discord_server)
    await fill_more(discord_server, form, {"Negative": "blurry", "Other": "--enhance_prompt yes"})
    form = await pick(discord_server, form, "steps", "10")
    assert (
        "Not used with `flux`, which does not take them: steps (it takes 20–50), negative prompt, enhance_prompt."
        in form.content
    )

    done = await imagine(discord_server, "a lighthouse")  # flux, the built-in default
    assert not done.original.flags & 64
    body = (await modelslab.wait_for_submission()).json
    assert body["num_inference_steps"] == 30 and "negative_prompt" not in body and "enhance_prompt" not in body

    refused = await imagine(discord_server, "a lighthouse --enhance_prompt yes")
    assert "`--enhance_prompt` is ignored by the flux model" in refused.original.content
    assert len(modelslab.submissions()) == 1


async def test_remix_mode_makes_reroll_and_vary_open_the_edit_form_first(runner, discord_server, modelslab):
    await runner.start()
    form = await open_settings(discord_server)
    toggled = await discord_server.invoke_component(form.id, "settings:remix")
    await toggled.wait_callback()
    assert components(toggled.original)["settings:remix"]["label"] == "Remix mode: on"

    done = await imagine(discord_server, "a red fox --clip_skip 2", options={"model": "sdxl"})
    job = await runner.wait_posted()
    rerolled = await press(discord_server, done.original, f"job:reroll:{job.id}")
    assert rerolled.modal is not None, "remix mode: the form comes first"
    assert len(modelslab.submissions()) == 1
    prompt_field = rerolled.modal["components"][0]["components"][0]
    assert prompt_field["value"] == "a red fox"
    submitted = await discord_server.submit_modal(rerolled.modal["custom_id"], {prompt_field["custom_id"]: "a fox"})
    await submitted.wait_callback()
    child = await runner.wait_posted(await child_of(runner, job.id))
    assert child.request.prompt == "a fox" and child.request.advanced == {"clip_skip": 2}
    assert modelslab.submissions()[-1].json["clip_skip"] == 2

    edited = await press(discord_server, done.original, f"job:reroll:{job.id}")  # flags typed in the form count
    field = edited.modal["components"][0]["components"][0]
    submitted = await discord_server.submit_modal(
        edited.modal["custom_id"], {field["custom_id"]: "a fox --seed 7 --ar 1:1"}
    )
    await submitted.wait_callback()
    body = (await modelslab.wait_for_request(r"/text2img$", lambda call: call.json.get("seed") == 7)).json
    assert (body["prompt"], body["seed"], body["width"], body["height"]) == ("a fox", 7, 1024, 1024)

    varied = await press(discord_server, done.original, f"job:vary:{job.id}:1")
    assert varied.modal is not None and varied.modal["title"] == "Vary: edit the prompt first"
    field = varied.modal["components"][0]["components"][0]
    submitted = await discord_server.submit_modal(varied.modal["custom_id"], {field["custom_id"]: "a fox at night"})
    await submitted.wait_callback()
    await _wait_for_img2img(runner, modelslab)
    body = modelslab.submissions()[-1].json
    assert body["prompt"] == "a fox at night" and body["strength"] == 0.5 and body["clip_skip"] == 2


async def _wait_for_img2img(runner: BotRunner, modelslab) -> None:
    await modelslab.wait_for_request(r"/img2img$")


async def test_the_form_works_after_a_restart_and_settings_stay(runner, discord_server, modelslab):
    await runner.start()
    form = await open_settings(discord_server)
    await pick(discord_server, form, "aspect", "2:3")
    await runner.restart()
    form = await pick(discord_server, form, "guidance", "10")
    assert "**Aspect ratio:** `2:3`" in form.content and "**Guidance:** `10`" in form.content
    await imagine(discord_server, "a tower")
    body = (await modelslab.wait_for_submission()).json
    assert (body["width"], body["height"], body["guidance_scale"]) == (680, 1024, 10)


async def test_presets_reach_every_parameter_and_win_over_settings(runner, discord_server, modelslab):
    await runner.start()
    saved = await config(
        discord_server, "preset", {"action": "save", "name": "detail", "flags": "--steps 12 --self_attention yes"}
    )
    assert "Preset `detail` saved" in await private_text(discord_server, saved)
    form = await open_settings(discord_server)
    await pick(discord_server, form, "model", "sdxl")
    await pick(discord_server, form, "steps", "20")
    done = await imagine(discord_server, "a tower", options={"preset": "detail"})
    body = (await modelslab.wait_for_submission()).json
    assert body["num_inference_steps"] == 12 and body["self_attention"] == "yes" and body["model_id"] == "sdxl"
    job = await runner.wait_posted()
    info = await press(discord_server, done.original, f"job:info:{job.id}")
    assert "the preset `detail`: steps, self_attention; the member's /settings: model;" in info.original.content
    assert "**Other parameters:** self_attention yes" in info.original.content


async def test_the_export_lists_the_other_parameters_and_forget_deletes_the_settings(runner, discord_server, modelslab):
    await runner.start()
    form = await open_settings(discord_server)
    await fill_more(discord_server, form, {"Model": "sdxl", "Other": "--clip_skip 2"})
    await imagine(discord_server, "a lighthouse --tomesd no")
    await runner.wait_posted()

    exported = await discord_server.invoke_slash("history", {"format": "csv"}, subcommand="export")
    await exported.wait_callback()
    [file] = exported.original.attachments
    [row] = list(csv.DictReader(io.StringIO(file.data.decode("utf-8-sig"))))
    assert row["other_parameters"] == "'--clip_skip 2 --tomesd no"  # quoted: a leading "-" starts a formula

    asked = await discord_server.invoke_slash("history", {}, subcommand="forget")
    await asked.wait_callback()
    sure = await discord_server.invoke_component(asked.original.id, f"history-forget:{discord_server.member_id}:yes")
    await sure.wait_callback()
    assert "so are your /settings" in sure.original.content
    form = await open_settings(discord_server)
    assert "**Model:** *server default*" in form.content and "**Other parameters:** *server default*" in form.content
