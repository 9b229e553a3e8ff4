"""Member settings: what is accepted when saved, how they become a layer, and their storage (real SQLite)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from bot.errors import InvalidOption
from bot.jobs.history import other_parameters
from bot.requests.generation import ServerDefaults, build_generation_request, build_remix_request
from bot.requests.member_defaults import (
    MemberDefaults,
    MemberDefaultsService,
    check_aspect,
    check_flags,
    check_guidance,
    check_style,
    describe,
    unused_settings,
)
from bot.requests.parameters import ParameterValue
from bot.storage.ports import Storage
from tests.unit.test_storage import new_job


def test_the_other_parameters_are_tidied_flags_without_the_ones_that_have_their_own_control():
    assert check_flags("  --clip-skip 2   --panorama --scheduler lcmscheduler ") == (
        "--scheduler LCMScheduler --clip_skip 2 --panorama yes"
    )
    assert check_flags("") == ""
    for text, words in [
        ("--steps 20", "`--steps` has its own place in /settings: use “Steps”"),
        ("--ar 1:1", "use “Aspect ratio”"),
        ("--seed 4", "`--seed` is not kept in settings"),
        ("cinematic --tomesd", "holds only flags"),
        ("--panorama perhaps", "`--panorama` must be yes or no"),
    ]:
        with pytest.raises(InvalidOption) as refusal:
            check_flags(text)
        assert words in refusal.value.message


def test_the_form_fields_are_checked():
    assert check_aspect("16 : 9") == "16:9" and check_aspect("") is None
    assert check_guidance("7,5") == 7.5
    assert check_style("Watercolor") == "watercolor"
    for check, text in [(check_aspect, "9:1"), (check_guidance, "30"), (check_style, "vaporwave-deluxe")]:
        with pytest.raises(InvalidOption):
            check(text)


def test_settings_apply_to_imagine_and_only_what_fits_to_remix():
    member = MemberDefaults(
        model="fluxdev", aspect="2:3", steps=15, guidance=5.0, style="anime", flags="--clip_skip 3 --panorama yes"
    )
    request = build_generation_request(flavour="v6", default_model="flux", prompt="x", layers=[member.layer()])
    assert (request.model_id, request.width, request.height, request.steps) == ("fluxdev", 680, 1024, 15)
    assert request.advanced == {"clip_skip": 3, "panorama": True} and request.enhance_style == "anime"
    assert request.aspect == "2:3" and request.sources["width"] == "settings"
    remix = build_remix_request(
        flavour="v6",
        default_model="sdxl",
        prompt="x",
        source_url="https://cdn.discordapp.com/a.png",
        layers=[member.layer()],
    )
    assert remix.model_id == "fluxdev" and remix.advanced == {"clip_skip": 3}  # no panorama, no style: text only
    assert remix.enhance_style is None


def test_the_form_says_which_settings_the_model_in_use_will_not_take():
    member = MemberDefaults(steps=10, negative_prompt="blurry", flags="--enhance_prompt yes")
    model, unused = unused_settings(
        member, flavour="v6", default_model="flux", server=ServerDefaults().layer("text2img")
    )
    assert model == "flux" and unused == ["steps (it takes 20–50)", "negative prompt", "enhance_prompt"]
    text = describe(member, model_in_use="flux", unused=unused)
    assert (
        "Not used with `flux`, which does not take them: steps (it takes 20–50), negative prompt, enhance_prompt."
        in text
    )
    assert "**Remix mode:** off" in text and "**Model:** *server default*" in text


async def test_settings_are_stored_per_member_and_per_server_and_reset(storage: Storage):
    service = MemberDefaultsService(storage.member_defaults)
    await service.update(1, 10, steps=12, remix_mode=True)
    await service.update(2, 10, model="sdxl")
    fresh = MemberDefaultsService(storage.member_defaults)  # no cache: read back from the file
    assert await fresh.get(1, 10) == MemberDefaults(steps=12, remix_mode=True)
    assert await fresh.get(2, 10) == MemberDefaults(model="sdxl")
    assert await fresh.get(1, 11) == MemberDefaults()
    await fresh.reset(1, 10)
    assert await MemberDefaultsService(storage.member_defaults).get(1, 10) == MemberDefaults()
    assert (await fresh.get(2, 10)).model == "sdxl"


async def test_forgetting_a_member_deletes_their_settings_everywhere(storage: Storage):
    service = MemberDefaultsService(storage.member_defaults)
    await service.update(1, 3, steps=12)
    await service.update(2, 3, steps=13)
    await service.update(1, 4, steps=14)
    store = storage.jobs
    face: dict[str, ParameterValue] = {
        "ip_adapter_id": "ip-adapter_sd15",
        "ip_adapter_image": "https://x.io/me.png",
        "clip_skip": 2,
    }
    job = new_job()
    await store.insert(replace(job, request=replace(job.request, advanced=face)))
    await store.mark_posted(job.id)
    await storage.forget_member(3, time.time())
    await service.forget_member(3)
    assert await service.get(1, 3) == MemberDefaults() and await service.get(2, 3) == MemberDefaults()
    assert (await service.get(1, 4)).steps == 14
    forgotten = await store.get(job.id)
    assert forgotten is not None and forgotten.user_id == 0
    assert forgotten.request.advanced == {"ip_adapter_id": "ip-adapter_sd15", "clip_skip": 2}  # no link to a face


def test_the_form_says_when_the_server_does_not_allow_the_chosen_model():
    server = ServerDefaults(model="fluxdev").layer("text2img")
    member = MemberDefaults(model="sdxl")
    model, unused = unused_settings(
        member, flavour="v6", default_model="fluxdev", server=server, allowed_models=("fluxdev",)
    )
    assert model == "fluxdev" and unused == ["model (not allowed in this server)"]


def test_the_export_writes_the_other_parameters_as_the_flags_that_ask_for_them():
    request = build_generation_request(
        flavour="v6",
        default_model="sdxl",
        prompt="x",
        lora="a,b",
        lora_strength="0.3,0.9",
        scheduler="LCMScheduler",
        advanced={"clip_skip": 2, "safety_checker_type": "blur"},
        safety_checker=False,
    )
    assert other_parameters(request) == "--scheduler LCMScheduler --lora a,b --lora_strength 0.3,0.9 --clip_skip 2"
