"""Inline flags in the prompt: examples, and properties checked by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.errors import InvalidOption
from bot.requests.flags import KNOWN, parse_flags, size_for_ratio
from bot.requests.generation import FLUX_SIDE_MIN, SIDE_MAX, SIDE_MIN


def test_every_flag_is_read_and_removed_from_the_prompt():
    parsed = parse_flags(
        "a cat on a roof --ar 16:9 --seed 7 --no text, watermark --steps 15 --style watercolor --model sdxl",
        side_min=SIDE_MIN,
    )
    assert parsed.prompt == "a cat on a roof"
    flags = parsed.choices
    assert (flags.width, flags.height, flags.aspect) == (1024, 576, "16:9")
    assert (flags.seed, flags.no, flags.steps) == (7, "text, watermark", 15)
    assert (flags.style, flags.model) == ("watercolor", "sdxl")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a cat --chaos 50", "`--chaos` is not a flag this bot knows"),
        ("a cat --ar wide", "`--ar` must be a ratio like 16:9"),
        ("a cat --ar 10:1", "at most 4:1"),
        ("a cat --seed x", "`--seed` must be a whole number"),
        ("a cat --seed 99999999999", "from 0 to 4294967295"),
        ("a cat --steps", "`--steps` needs a value, e.g. --steps 30"),
        ("a cat --seed 1 --seed 2", "is given twice"),
    ],
)
def test_bad_flags_are_named(text, words):
    with pytest.raises(InvalidOption) as refusal:
        parse_flags(text, side_min=SIDE_MIN)
    assert words in refusal.value.message


def test_dashes_inside_words_are_not_flags():
    assert parse_flags("a state-of-the-art robot--friendly", side_min=SIDE_MIN).prompt == (
        "a state-of-the-art robot--friendly"
    )


@given(st.text(alphabet=st.characters(blacklist_characters="-—–"), max_size=200))
def test_a_prompt_without_flags_is_only_tidied(text):
    assert parse_flags(text, side_min=SIDE_MIN).prompt == " ".join(text.split())


@given(st.text(max_size=200))
def test_parsing_anything_either_works_or_names_the_problem(text):
    try:
        parsed = parse_flags(text, side_min=SIDE_MIN)
    except InvalidOption as refusal:
        assert refusal.message.startswith("`")
    else:
        assert "--ar" not in parsed.prompt.split()


@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from([SIDE_MIN, FLUX_SIDE_MIN]))
def test_any_ratio_maps_to_a_valid_size_close_to_it(a, b, side_min):
    if max(a, b) / min(a, b) > 4:
        return
    width, height = size_for_ratio(a, b, side_min=side_min)
    assert width % 8 == 0 and height % 8 == 0
    assert side_min <= width <= SIDE_MAX and side_min <= height <= SIDE_MAX
    assert max(width, height) == SIDE_MAX
    if min(width, height) > side_min:
        assert abs(width / height - a / b) / (a / b) < 0.02


@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 50),
    st.sampled_from(["16:9", "1:1", "2:3", "21:9"]),
    st.text(alphabet="abcdefgh ,", min_size=1, max_size=30).filter(lambda t: t.strip(" ,")),
)
def test_flags_round_trip(seed, steps, ratio, negative):
    parsed = parse_flags(f"a fox --seed {seed} --ar {ratio} --steps {steps} --no {negative}", side_min=SIDE_MIN)
    assert (parsed.prompt, parsed.choices.seed, parsed.choices.steps) == ("a fox", seed, steps)
    assert parsed.choices.no == " ".join(negative.split())


def test_common_options_and_every_modelslab_parameter_are_flags_too():
    parsed = parse_flags(
        "a tower --guidance 9.5 --scheduler eulerdiscretescheduler --lora more_details --lora-strength 0.7 "
        "--clip-skip 2 --panorama --tomesd no --ip_adapter_scale 0,5",
        side_min=SIDE_MIN,
    )
    flags = parsed.choices
    assert parsed.prompt == "a tower"
    assert (flags.guidance, flags.scheduler) == (9.5, "EulerDiscreteScheduler")
    assert (flags.lora, flags.lora_strength) == ("more_details", "0.7")
    assert flags.advanced == {"clip_skip": 2, "panorama": True, "tomesd": False, "ip_adapter_scale": 0.5}


def test_an_unknown_flag_message_points_to_the_list():
    with pytest.raises(InvalidOption) as refusal:
        parse_flags("a cat --stylize 100", side_min=SIDE_MIN)
    assert "`--stylize` is not a flag this bot knows" in refusal.value.message
    assert "--clip_skip or --panorama" in refusal.value.message


@given(st.sampled_from(sorted(KNOWN)), st.text(max_size=30))
def test_any_known_flag_with_any_value_is_read_or_named_in_the_refusal(name, value):
    try:
        parse_flags(f"a fox --{name} {value}", side_min=SIDE_MIN)
    except InvalidOption as refusal:
        assert refusal.option.startswith("--")


@pytest.mark.parametrize(
    "text", ["a cat --seed ²", "a cat --steps ١٢", "a cat --clip_skip ³", "a cat --seed " + "9" * 4400]
)
def test_odd_numbers_are_refused_not_crashed_on(text):
    with pytest.raises(InvalidOption, match="must be"):
        parse_flags(text, side_min=SIDE_MIN)


def test_a_dash_that_a_phone_made_of_two_hyphens_still_starts_a_known_flag():
    parsed = parse_flags("a cat —ar 16:9 –no text — and a dog", side_min=SIDE_MIN)
    assert parsed.prompt == "a cat" and parsed.choices.aspect == "16:9"
    assert parsed.choices.no == "text — and a dog"
    assert parse_flags("a cat —the best", side_min=SIDE_MIN).prompt == "a cat —the best"
