"""Midjourney-style flags typed in the prompt: `--ar 16:9 --seed 7 --no text, watermark --steps 30`.

Pure: `parse_flags` takes the prompt and returns the prompt without its flags and what they asked for
(a `Choices` layer); an unknown or invalid flag raises `InvalidOption` naming it. Besides Midjourney's
own, every ModelsLab parameter of `bot.requests.parameters` is a flag under its API name (`--clip_skip 2`,
`--panorama`; dashes work too). Whether a value fits the model is decided later, with the other layers.
Presets and the "other parameters" of `/settings` are written in the same syntax.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from bot.errors import InvalidOption
from bot.requests import parameters
from bot.requests.generation import GUIDANCE_MAX, GUIDANCE_MIN, SCHEDULERS, SEED_MAX, SIDE_MAX, Choices
from bot.requests.parameters import ParameterValue

COMMON = ("ar", "seed", "no", "steps", "style", "model", "guidance", "scheduler", "lora", "lora_strength")
KNOWN = COMMON + tuple(parameters.PARAMETERS)
_FLAG = re.compile(r"(?<!\S)--([A-Za-z][A-Za-z_-]*)")
# Phones turn "--" into a dash ("—ar 16:9"); read it as a flag when a known flag name follows.
_DASHED = re.compile(r"(?<!\S)[—–]([A-Za-z][A-Za-z_-]*)")
_RATIO = re.compile(r"^(\d{1,4})\s*:\s*(\d{1,4})$")
_SCHEDULERS = {name.lower(): name for name in SCHEDULERS}
MAX_RATIO = 4


@dataclass(frozen=True)
class PromptFlags:
    prompt: str
    choices: Choices = field(default_factory=Choices)
    given: tuple[str, ...] = ()  # the flags present, as typed names (`ar`, `clip_skip`)


def size_for_ratio(width_part: int, height_part: int, *, side_min: int, side_max: int = SIDE_MAX) -> tuple[int, int]:
    """The size nearest to `W:H` within the limits: the longer side at the maximum, both multiples of 8."""
    if width_part <= 0 or height_part <= 0:
        raise ValueError("sides must be positive")
    ratio = width_part / height_part
    if ratio >= 1:
        width = side_max
        height = max(side_min, min(side_max, round(side_max / ratio / 8) * 8))
    else:
        height = side_max
        width = max(side_min, min(side_max, round(side_max * ratio / 8) * 8))
    return width, height


def parse_ratio(value: str, *, side_min: int) -> tuple[int, int, str]:
    """`16:9` → (1024, 576, "16:9"), or `InvalidOption` naming `--ar`."""
    found = _RATIO.match(value.strip())
    if not found or int(found.group(1)) == 0 or int(found.group(2)) == 0:
        raise InvalidOption("--ar", f"must be a ratio like 16:9 (you gave {value[:20]!r}).")
    a, b = int(found.group(1)), int(found.group(2))
    if max(a, b) / min(a, b) > MAX_RATIO:
        raise InvalidOption("--ar", f"must be at most {MAX_RATIO}:1 (or 1:{MAX_RATIO}).")
    width, height = size_for_ratio(a, b, side_min=side_min)
    gcd = math.gcd(a, b)
    return width, height, f"{a // gcd}:{b // gcd}"


def parse_flags(text: str, *, side_min: int) -> PromptFlags:
    text = _DASHED.sub(lambda m: "--" + m[1] if parameters.canonical_name(m[1]) in KNOWN else m[0], text)
    matches = list(_FLAG.finditer(text))
    if not matches:
        return PromptFlags(prompt=" ".join(text.split()))
    prompt = text[: matches[0].start()]
    values: dict[str, str] = {}
    unknown = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        name = parameters.canonical_name(match.group(1))
        if name not in KNOWN:
            unknown.append(f"--{match.group(1)}")
            continue
        if name in values:
            raise InvalidOption(f"--{name}", "is given twice in the prompt: keep one.")
        values[name] = " ".join(text[match.end() : end].split())
    if unknown:
        raise InvalidOption(
            ", ".join(unknown),
            "is not a flag this bot knows: use " + ", ".join(f"--{k}" for k in COMMON) + ", or a ModelsLab "
            "parameter such as --clip_skip or --panorama (the README lists them).",
        )

    changes: dict[str, object] = {}
    advanced: dict[str, ParameterValue] = {}
    for name, value in values.items():
        if name in parameters.PARAMETERS:
            advanced[name] = parameters.parse_value(name, value)
            continue
        if not value:
            raise InvalidOption(f"--{name}", "needs a value, e.g. " + _EXAMPLES[name] + ".")
        if name == "ar":
            changes["width"], changes["height"], changes["aspect"] = parse_ratio(value, side_min=side_min)
        elif name in ("seed", "steps"):
            if not (value.isascii() and value.isdigit() and len(value) <= 12):
                raise InvalidOption(f"--{name}", f"must be a whole number (you gave {value[:20]!r}).")
            number = int(value)
            if name == "seed" and number > SEED_MAX:
                raise InvalidOption("--seed", f"must be from 0 to {SEED_MAX}.")
            changes[name] = number
        elif name == "guidance":
            changes["guidance"] = parse_guidance(value)
        elif name == "scheduler":
            if value.lower() not in _SCHEDULERS:
                raise InvalidOption("--scheduler", "must be one of: " + ", ".join(SCHEDULERS) + ".")
            changes["scheduler"] = _SCHEDULERS[value.lower()]
        elif name == "no":
            changes["no"] = value
        elif name == "style":
            changes["style"] = value.lower()
        else:  # model, lora, lora_strength: checked with the other layers
            changes[name] = value
    return PromptFlags(
        prompt=" ".join(prompt.split()),
        choices=Choices(advanced=advanced, **changes),  # type: ignore[arg-type]
        given=tuple(values),
    )


def parse_guidance(value: str, option: str = "--guidance") -> float:
    try:
        number = float(value.replace(",", "."))
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not GUIDANCE_MIN <= number <= GUIDANCE_MAX:
        raise InvalidOption(option, f"must be a number from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}.")
    return number


def flags_text(choices: Choices) -> str:
    """Choices written back as flags (how presets and settings are shown)."""
    parts = []
    if choices.aspect:
        parts.append(f"--ar {choices.aspect}")
    for name in ("model", "steps", "guidance", "seed", "scheduler", "style", "lora", "lora_strength"):
        value = getattr(choices, name)
        if value is not None:
            parts.append(f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}")
    for name, value in choices.advanced.items():
        parts.append(f"--{name} {parameters.shown(value)}")
    if choices.no:
        parts.append(f"--no {choices.no}")
    return " ".join(parts)


_EXAMPLES = {
    "ar": "--ar 16:9",
    "seed": "--seed 42",
    "no": "--no text, watermark",
    "steps": "--steps 30",
    "style": "--style watercolor",
    "model": "--model fluxdev",
    "guidance": "--guidance 7.5",
    "scheduler": "--scheduler DPMSolverMultistepScheduler",
    "lora": "--lora more_details",
    "lora_strength": "--lora_strength 0.7",
}
