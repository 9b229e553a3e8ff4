"""Every documented ModelsLab parameter, flavour by flavour, model by model, job kind by job kind.

The rules come from the seeds: the v6 community text2img table (and its OpenAPI schema), the enterprise
text2img/img2img pages and the FLUX page ("flux does not support negative_prompt, enhance_prompt,
enhance_style, SD LoRAs, ip adapters, embeddings, upscale and highres_fix")."""

from __future__ import annotations

import dataclasses

import pytest

from bot.errors import InvalidOption
from bot.requests.flags import parse_flags
from bot.requests.generation import (
    SIDE_MIN,
    Choices,
    GenerationRequest,
    Layer,
    ServerDefaults,
    build_generation_request,
    build_remix_request,
    flag_layer,
    preset_layer,
)
from bot.requests.parameters import PARAMETERS

# A valid value for every parameter, as typed, and how the vendor's examples send it.
VALID = {
    "enhance_prompt": ("no", "no"),
    "clip_skip": ("2", 2),
    "vae": ("sd-vae-ft-mse", "sd-vae-ft-mse"),
    "embeddings_model": ("easynegative", "easynegative"),
    "panorama": ("", "yes"),
    "self_attention": ("yes", "yes"),
    "upscale": ("yes", "yes"),
    "highres_fix": ("on", "yes"),
    "tomesd": ("no", "no"),
    "use_karras_sigmas": ("yes", "yes"),
    "algorithm_type": ("none", "none"),
    "safety_checker_type": ("blur", "blur"),
    "multi_lingual": ("yes", "yes"),
    "temp": ("yes", "yes"),
}
IP_ADAPTER = "--ip_adapter_id ip-adapter_sdxl --ip_adapter_image https://example.com/face.png --ip_adapter_scale 0.6"
FLUX_IGNORED = ("enhance_prompt", "embeddings_model", "upscale", "highres_fix", "ip_adapter_id")
TEXT2IMG_ONLY = ("embeddings_model", "panorama", "self_attention", "upscale", "highres_fix", "multi_lingual")
V6_ONLY = ("multi_lingual", "ip_adapter_id")


def imagine(flags: str, *, flavour="v6", model="sdxl", **options) -> GenerationRequest:
    typed = parse_flags(f"a lighthouse {flags}", side_min=SIDE_MIN)
    return build_generation_request(
        flavour=flavour,
        default_model=model,
        prompt=typed.prompt,
        layers=[flag_layer(typed.choices)],
        **options,
    )


def remix(flags: str, *, flavour="v6", model="sdxl") -> GenerationRequest:
    typed = parse_flags(f"a lighthouse {flags}", side_min=SIDE_MIN)
    return build_remix_request(
        flavour=flavour,
        default_model=model,
        prompt=typed.prompt,
        source_url="https://cdn.discordapp.com/a.png",
        layers=[flag_layer(typed.choices)],
    )


def refused(build, flags: str, **options) -> str:
    with pytest.raises(InvalidOption) as caught:
        build(flags, **options)
    return caught.value.message


def test_the_table_covers_every_parameter_the_issue_lists():
    listed = set(VALID) | {"ip_adapter_id", "ip_adapter_scale", "ip_adapter_image"}
    assert set(PARAMETERS) == listed


@pytest.mark.parametrize("name", sorted(VALID))
def test_each_parameter_is_sent_as_the_vendor_examples_send_it_on_v6(name):
    typed, sent = VALID[name]
    assert imagine(f"--{name} {typed}").payload_for("text2img")[name] == sent


@pytest.mark.parametrize("name", sorted(set(VALID) - set(V6_ONLY)))
def test_each_parameter_documented_for_the_enterprise_api_is_sent_there(name):
    typed, sent = VALID[name]
    assert imagine(f"--{name} {typed}", flavour="enterprise").payload_for("text2img")[name] == sent


def test_the_ip_adapter_is_sent_whole():
    payload = imagine(IP_ADAPTER).payload_for("text2img")
    assert payload["ip_adapter_id"] == "ip-adapter_sdxl"
    assert payload["ip_adapter_image"] == "https://example.com/face.png"
    assert payload["ip_adapter_scale"] == 0.6


def test_dashes_work_like_underscores_and_nothing_unasked_is_sent():
    assert imagine("--clip-skip 3 --use-karras-sigmas no").advanced == {"clip_skip": 3, "use_karras_sigmas": False}
    payload = imagine("").payload_for("text2img")
    assert not set(payload) & set(PARAMETERS)


@pytest.mark.parametrize("name", FLUX_IGNORED)
def test_flux_refuses_what_it_ignores(name):
    flags = IP_ADAPTER if name == "ip_adapter_id" else f"--{name} {VALID[name][0]}"
    message = refused(imagine, flags, model="flux")
    assert f"`--{name}` is ignored by the flux model" in message


def test_flux_takes_what_it_does_not_ignore_and_clip_skip_only_up_to_4():
    request = imagine("--clip_skip 4 --vae v1 --tomesd no --temp yes", model="flux")
    assert request.payload_for("text2img")["clip_skip"] == 4
    assert "`--clip_skip` must be from 1 to 4 for the flux model" in refused(imagine, "--clip_skip 5", model="flux")
    assert imagine("--clip_skip 8").advanced["clip_skip"] == 8  # other models: 1-8
    assert "from 1 to 8" in refused(imagine, "--clip_skip 9")  # out of range for every model
    assert imagine("--enhance_prompt yes --highres_fix", model="fluxdev").advanced["highres_fix"] is True


@pytest.mark.parametrize("name", V6_ONLY)
def test_the_enterprise_api_refuses_what_only_v6_documents(name):
    flags = IP_ADAPTER if name == "ip_adapter_id" else f"--{name} yes"
    assert "not available on the enterprise API" in refused(imagine, flags, flavour="enterprise")


def test_enhance_style_is_v6_text_to_image_only():
    assert imagine("--style watercolor").payload_for("text2img")["enhance_style"] == "watercolor"
    assert "not available on the enterprise API" in refused(imagine, "--style watercolor", flavour="enterprise")
    assert "only when making an image from text" in refused(remix, "--style watercolor")


def test_upscale_takes_a_factor_on_v6_and_yes_or_no_on_enterprise():
    assert imagine("--upscale 3").payload_for("text2img")["upscale"] == 3
    assert imagine("--upscale no", flavour="enterprise").payload_for("text2img")["upscale"] == "no"
    assert "yes or no on the enterprise API" in refused(imagine, "--upscale 2", flavour="enterprise")
    assert "must be yes or no, or 1, 2 or 3" in refused(imagine, "--upscale 4")
    assert imagine("--upscale 1").payload_for("text2img")["upscale"] == 1  # factor 1, not "yes"


@pytest.mark.parametrize("name", TEXT2IMG_ONLY)
def test_remixing_refuses_the_text_to_image_only_parameters(name):
    assert "only when making an image from text" in refused(remix, f"--{name} {VALID[name][0]}")


def test_remixing_sends_the_parameters_img2img_documents():
    payload = remix(
        "--clip_skip 2 --vae v1 --tomesd no --use_karras_sigmas yes --enhance_prompt no --safety_checker_type pixelate"
    ).payload_for("img2img")
    assert (payload["clip_skip"], payload["vae"], payload["tomesd"]) == (2, "v1", "no")
    assert (payload["enhance_prompt"], payload["safety_checker_type"]) == ("no", "pixelate")
    assert "width" not in payload and payload["strength"] == 0.7
    assert "`--ar` cannot be set when remixing" in refused(remix, "--ar 16:9")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--panorama maybe", "`--panorama` must be yes or no"),
        ("--clip_skip 0", "`--clip_skip` must be a whole number from 1 to 8"),
        ("--clip_skip two", "`--clip_skip` must be a whole number from 1 to 8"),
        ("--algorithm_type fast", "`--algorithm_type` must be one of none, dpmsolver+++"),
        ("--safety_checker_type red", "must be one of blur, sensitive_content_text, pixelate, black"),
        ("--ip_adapter_id ip-adapter_xl", "`--ip_adapter_id` must be one of ip-adapter_sdxl"),
        ("--ip_adapter_scale 1.5", "`--ip_adapter_scale` must be a number from 0 to 1"),
        ("--ip_adapter_image ftp://x/y.png", "`--ip_adapter_image` must be an https link"),
        (
            "--ip_adapter_image http://169.254.169.254/latest/meta-data",
            "must be an https link to a picture on a public",
        ),
        ("--ip_adapter_image https://[64:ff9b::a9fe:a9fe]/x.png", "not a local or private address"),
        ("--ip_adapter_image https://localhost/x.png", "not a local or private address"),
        ("--vae bad id!", "`--vae` must be a ModelsLab model id"),
        ("--embeddings_model", "`--embeddings_model` needs a value, e.g. --embeddings_model"),
        ("--ip_adapter_id ip-adapter_sd15", "needs `--ip_adapter_image` too"),
        ("--ip_adapter_image https://x.io/a.png", "needs `--ip_adapter_id` too"),
        ("--ip_adapter_scale 0.5", "needs `--ip_adapter_id` and `--ip_adapter_image` too"),
        ("--algorithm_type dpmsolver+++", "works only with the DPMSolverMultistepScheduler scheduler"),
    ],
)
def test_bad_values_are_refused_with_the_flag_and_what_it_takes(flags, words):
    assert words in refused(imagine, flags)


def test_the_dpmsolver_algorithm_goes_with_its_scheduler():
    request = imagine("--algorithm_type dpmsolver+++ --scheduler dpmsolvermultistepscheduler")
    payload = request.payload_for("text2img")
    assert (payload["algorithm_type"], payload["scheduler"]) == ("dpmsolver+++", "DPMSolverMultistepScheduler")


def test_the_safety_checker_type_is_not_sent_when_the_checker_is_off():
    assert imagine("--safety_checker_type black").payload_for("text2img")["safety_checker_type"] == "black"
    payload = imagine("--safety_checker_type black", safety_checker=False).payload_for("text2img")
    assert "safety_checker_type" not in payload and payload["safety_checker"] == "no"


def test_a_request_with_every_kind_of_value_survives_json():
    flags = "--clip_skip 2 --panorama --ip_adapter_scale 0.25 " + IP_ADAPTER.replace(" --ip_adapter_scale 0.6", "")
    request = imagine(flags)
    assert GenerationRequest.from_json(request.to_json()) == request


# ------------------------------------------------------------------------------------------- precedence


def settings(**values) -> Layer:
    return Layer("settings", Choices(**values), strict=False)


def layered(*, options=None, flags="", preset="", member=None, server=None, model="sdxl") -> GenerationRequest:
    typed = parse_flags(f"a lighthouse {flags}", side_min=SIDE_MIN)
    layers = [flag_layer(typed.choices)]
    if preset:
        layers.append(preset_layer("p", parse_flags(preset, side_min=SIDE_MIN).choices))
    layers.append(member or settings())
    return build_generation_request(
        flavour="v6",
        default_model=model,
        prompt=typed.prompt,
        layers=layers,
        defaults=server or ServerDefaults(),
        **(options or {}),
    )


def test_each_layer_wins_over_the_ones_below_it():
    member = settings(steps=12, guidance=4.0, advanced={"clip_skip": 3})
    server = ServerDefaults(steps=11)
    full = layered(options={"steps": 15}, flags="--steps 14", preset="--steps 13", member=member, server=server)
    assert full.steps == 15 and full.sources["steps"] == "option"
    assert layered(flags="--steps 14", preset="--steps 13", member=member, server=server).steps == 14
    assert layered(preset="--steps 13 --clip_skip 5", member=member, server=server).sources["steps"] == "preset"
    assert layered(member=member, server=server).steps == 12
    assert layered(server=server).sources["steps"] == "server"
    bare = layered()
    assert bare.steps == 20 and "steps" not in bare.sources  # built in
    mixed = layered(preset="--clip_skip 5", member=member, server=server)
    assert mixed.advanced["clip_skip"] == 5 and mixed.sources["clip_skip"] == "preset"
    assert mixed.guidance == 4.0 and mixed.sources["guidance"] == "settings"


def test_settings_that_do_not_fit_the_model_are_skipped_but_the_same_flag_is_refused():
    member = settings(steps=10, negative_prompt="blur", advanced={"enhance_prompt": True}, style="anime")
    request = layered(member=member, model="flux")
    assert request.steps == 30 and request.negative_prompt is None  # flux: 20-50 steps, no negative prompt
    assert request.advanced == {} and request.enhance_style is None
    assert layered(member=member, model="sdxl").steps == 10
    with pytest.raises(InvalidOption, match="`--steps` must be a whole number from 20 to 50"):
        layered(flags="--steps 10", member=member, model="flux")
    with pytest.raises(InvalidOption, match="it comes from the preset `p`"):
        layered(preset="--enhance_prompt yes", model="flux")


def test_a_settings_model_the_server_does_not_allow_is_skipped():
    request = build_generation_request(
        flavour="v6",
        default_model="sdxl",
        prompt="x",
        layers=[settings(model="midjourney")],
        allowed_models=("sdxl",),
    )
    assert request.model_id == "sdxl" and "model" not in request.sources


def test_no_words_are_added_to_whichever_negative_prompt_applies():
    member = settings(negative_prompt="blurry")
    assert layered(flags="--no text", member=member).negative_prompt == "blurry, text"
    assert layered(flags="--no text", preset="--no logo", member=member).negative_prompt == "blurry, logo, text"
    explicit = layered(options={"negative_prompt": "dark"}, flags="--no text", member=member)
    assert explicit.negative_prompt == "dark, text"  # the option replaces the settings' own, --no still adds


def test_a_half_fitting_ip_adapter_from_settings_is_dropped_not_refused():
    member = settings(advanced={"ip_adapter_scale": 0.5, "clip_skip": 2})
    request = layered(member=member)
    assert request.advanced == {"clip_skip": 2}


def test_one_side_given_alone_keeps_the_ratio_a_lower_layer_chose():
    member = Layer("settings", Choices(width=1024, height=576, aspect="16:9"), strict=False)
    request = layered(options={"width": 768}, member=member)
    assert (request.width, request.height) == (768, 432)
    assert request.sources["width"] == request.sources["height"] == "option"
    tall = layered(options={"height": 512}, flags="--ar 2:1")
    assert (tall.width, tall.height) == (1024, 512)
    both = layered(options={"width": 512, "height": 512}, member=member)
    assert (both.width, both.height) == (512, 512)


# ------------------------------------------------------------------------------- the rules, row by row

# Every row of the request rules that the flux model refuses, typed as a flag, and the payload field it fills.
FLUX_ROWS = {
    "no": ("--no text", "negative_prompt"),
    "style": ("--style anime", "enhance_style"),
    "lora": ("--lora detail", "lora_model"),
    **{name: (f"--{name} {VALID[name][0]}", name) for name in VALID if PARAMETERS[name].flux_ignores},
    "ip_adapter_id": ("--ip_adapter_id ip-adapter_sdxl", "ip_adapter_id"),
    "ip_adapter_scale": ("--ip_adapter_scale 0.6", "ip_adapter_scale"),
    "ip_adapter_image": ("--ip_adapter_image https://example.com/face.png", "ip_adapter_image"),
}


def test_the_flux_rows_are_the_flux_pages_list():
    listed = {"no", "style", "lora"} | {name for name, parameter in PARAMETERS.items() if parameter.flux_ignores}
    assert set(FLUX_ROWS) == listed


@pytest.mark.parametrize("name", sorted(FLUX_ROWS))
def test_each_row_flux_ignores_is_refused_as_a_flag_and_skipped_as_a_setting(name):
    flag, field = FLUX_ROWS[name]
    assert f"`--{name}` is" in refused(imagine, flag, model="flux")
    assert "flux model" in refused(imagine, flag, model="flux")
    if name.startswith("ip_adapter"):
        flag = IP_ADAPTER  # alone, each would be dropped for want of the others
    member = Layer("settings", parse_flags(flag, side_min=SIDE_MIN).choices, strict=False)
    skipped = layered(member=member, model="flux")
    assert field not in skipped.payload_for("text2img") and "settings" not in skipped.sources.values()
    assert field in layered(member=member, model="fluxdev").payload_for("text2img")


def test_the_no_words_count_towards_the_negative_prompts_2000_characters():
    with pytest.raises(InvalidOption) as caught:
        layered(options={"negative_prompt": "a" * 1500}, flags="--no " + "b" * 600)
    assert caught.value.option == "negative_prompt"
    assert "with the `--no` words must be at most 2000 characters" in caught.value.message


def test_a_remix_refuses_a_default_model_that_cannot_remix_and_ignores_a_standing_size():
    assert "`model` `flux` cannot remix images: use fluxdev or fluxschnell" in refused(remix, "", model="flux")
    request = build_remix_request(
        flavour="v6",
        default_model="fluxdev",
        prompt="a lighthouse",
        source_url="https://cdn.discordapp.com/a.png",
        layers=[Layer("settings", Choices(width=1024, height=576, aspect="16:9"), strict=False)],
    )
    assert request.aspect is None and "width" not in request.sources and "height" not in request.sources


def test_a_standing_algorithm_type_is_dropped_without_its_scheduler_from_any_layer():
    algorithm = {"algorithm_type": "dpmsolver+++"}
    assert layered(member=settings(advanced=algorithm)).advanced == {}
    with_flag = layered(flags="--scheduler DPMSolverMultistepScheduler", member=settings(advanced=algorithm))
    assert with_flag.advanced == algorithm and with_flag.sources["algorithm_type"] == "settings"


def test_a_stored_request_with_a_private_ip_adapter_link_never_sends_it():
    """A job saved before the link rule (re-rolled, or queued across the upgrade) leaves the adapter out."""
    stored = dataclasses.replace(
        imagine(IP_ADAPTER), advanced={"ip_adapter_id": "ip-adapter_sdxl", "ip_adapter_image": "http://10.0.0.5/a.png"}
    )
    payload = stored.payload_for("text2img")
    assert "ip_adapter_image" not in payload and "ip_adapter_id" not in payload
