"""The /imagine option rules (shared/docs/modelslab-api.md §4), flavour by flavour."""

from __future__ import annotations

import pytest

from bot.errors import InvalidOption
from bot.requests.generation import SCHEDULERS, GenerationRequest, build_generation_request


def build(flavour="v6", **options):
    options.setdefault("prompt", "a red fox in the snow")
    return build_generation_request(flavour=flavour, default_model="flux", **options)


def refusal(flavour="v6", **options) -> InvalidOption:
    with pytest.raises(InvalidOption) as caught:
        build(flavour, **options)
    return caught.value


def test_defaults_use_the_configured_model_and_documented_defaults():
    request = build()
    assert request.model_id == "flux"
    assert (request.width, request.height, request.samples, request.guidance) == (512, 512, 1, 7.5)
    assert request.steps == 30  # the FLUX page's default


def test_payload_is_what_the_vendor_examples_send():
    request = build(
        model="sdxl",
        negative_prompt="blurry",
        width=768,
        height=512,
        samples=2,
        steps=15,
        guidance=9,
        seed=42,
        scheduler="UniPCMultistepScheduler",
        lora="more_details, animie",
        lora_strength="0.5,1",
    )
    assert request.to_payload() == {
        "model_id": "sdxl",
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "width": 768,
        "height": 512,
        "samples": 2,
        "num_inference_steps": 15,
        "guidance_scale": 9.0,
        "seed": 42,
        "safety_checker": "yes",
        "scheduler": "UniPCMultistepScheduler",
        "lora_model": "more_details,animie",
        "lora_strength": "0.5,1",
    }


def test_request_survives_a_round_trip_through_json():
    request = build(model="sdxl", lora="a,b", lora_strength="0.3,0.4", seed=7)
    assert GenerationRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"width": 1020}, "width", "multiple of 8 from 256 to 1024"),
        ({"height": 1032}, "height", "multiple of 8 from 256 to 1024"),
        ({"width": 128}, "width", "from 256"),  # FLUX minimum
        ({"samples": 5}, "samples", "from 1 to 4"),
        ({"samples": 0}, "samples", "from 1 to 4"),
        ({"steps": 10}, "steps", "from 20 to 50 for the flux model"),
        ({"guidance": 0.5}, "guidance", "from 1 to 20"),
        ({"guidance": 21}, "guidance", "from 1 to 20"),
        ({"seed": -1}, "seed", "from 0 to 4294967295"),
        ({"scheduler": "FooScheduler"}, "scheduler", "UniPCMultistepScheduler"),
        ({"negative_prompt": "blurry"}, "negative_prompt", "ignored by the flux model"),
        ({"lora": "more_details"}, "lora", "not supported by the flux model"),
        ({"model": "bad model!"}, "model", "model_id"),
    ],
)
def test_each_bad_option_is_named_with_its_allowed_range(options, option, words):
    error = refusal(**options)
    assert error.option == option
    assert f"`{option}`" in error.message
    assert words in error.message


def test_non_flux_models_accept_small_sides_and_v6_caps_steps_at_20():
    assert build(model="sdxl", width=64, height=1024).width == 64
    assert build(model="sdxl").steps == 20
    error = refusal(model="sdxl", steps=21)
    assert "from 1 to 20 for the sdxl model" in error.message


def test_enterprise_takes_only_21_31_or_41_steps():
    assert build("enterprise", model="sdxl").steps == 21
    assert build("enterprise", model="sdxl", steps=41).steps == 41
    error = refusal("enterprise", model="sdxl", steps=30)
    assert "one of 21, 31, 41 on the enterprise API" in error.message


@pytest.mark.parametrize(
    ("lora", "strength", "words"),
    [
        ("a,b", "0.5", "exactly one strength per LoRA: 2 LoRA(s) but 1 strength(s)"),
        (None, "0.5", "needs `lora`"),
        ("a", "1.5", "from 0.1 to 1"),
        ("a", "strong", "must be numbers"),
        ("a,b,c,d,e,f", None, "at most 5"),
    ],
)
def test_lora_lists_are_checked_together(lora, strength, words):
    error = refusal(model="fluxdev", lora=lora, lora_strength=strength)
    assert words in error.message


def test_fluxdev_takes_loras_and_a_negative_prompt():
    request = build(model="fluxdev", lora="detail", lora_strength="0.8", negative_prompt="text")
    assert request.lora_models == ("detail",) and request.lora_strengths == (0.8,)


def test_every_documented_scheduler_is_accepted():
    assert len(SCHEDULERS) == 18
    for name in SCHEDULERS:
        assert build(scheduler=name).scheduler == name
