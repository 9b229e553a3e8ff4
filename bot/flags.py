"""Midjourney-style flags typed in the prompt: `--ar 16:9 --seed 7 --no text, watermark --steps 30`.

Pure: `parse_flags` takes the prompt and returns the prompt without its flags and what they asked for;
an unknown or invalid flag raises `InvalidOption` naming it. The caller decides precedence (an explicit
command option wins over a flag).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bot.errors import InvalidOption
from bot.generation import SEED_MAX, SIDE_MAX

KNOWN = ("ar", "seed", "no", "steps", "style", "model")
_FLAG = re.compile(r"(?<!\S)--([A-Za-z][A-Za-z_-]*)")
_RATIO = re.compile(r"^(\d{1,4})\s*:\s*(\d{1,4})$")


@dataclass(frozen=True)
class PromptFlags:
    prompt: str
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    seed: int | None = None
    negative: str | None = None
    steps: int | None = None
    style: str | None = None
    model: str | None = None


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


def parse_flags(text: str, *, side_min: int) -> PromptFlags:
    matches = list(_FLAG.finditer(text))
    if not matches:
        return PromptFlags(prompt=" ".join(text.split()))
    prompt = text[: matches[0].start()]
    values: dict[str, str] = {}
    unknown = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        name = match.group(1).lower()
        if name not in KNOWN:
            unknown.append(f"--{match.group(1)}")
            continue
        if name in values:
            raise InvalidOption(f"--{name}", "is given twice in the prompt: keep one.")
        values[name] = " ".join(text[match.end() : end].split())
    if unknown:
        known = ", ".join(f"--{k}" for k in KNOWN)
        raise InvalidOption(", ".join(unknown), f"is not a flag this bot knows: use {known}.")

    result = PromptFlags(prompt=" ".join(prompt.split()))
    changes: dict[str, object] = {}
    for name, value in values.items():
        if not value:
            raise InvalidOption(f"--{name}", "needs a value, e.g. " + _EXAMPLES[name] + ".")
        if name == "ar":
            found = _RATIO.match(value)
            if not found or int(found.group(1)) == 0 or int(found.group(2)) == 0:
                raise InvalidOption("--ar", f"must be a ratio like 16:9 (you gave {value[:20]!r}).")
            a, b = int(found.group(1)), int(found.group(2))
            if max(a, b) / min(a, b) > 4:
                raise InvalidOption("--ar", "must be at most 4:1 (or 1:4).")
            changes["width"], changes["height"] = size_for_ratio(a, b, side_min=side_min)
            gcd = math.gcd(a, b)
            changes["aspect"] = f"{a // gcd}:{b // gcd}"
        elif name in ("seed", "steps"):
            if not value.isdigit():
                raise InvalidOption(f"--{name}", f"must be a whole number (you gave {value[:20]!r}).")
            number = int(value)
            if name == "seed" and number > SEED_MAX:
                raise InvalidOption("--seed", f"must be from 0 to {SEED_MAX}.")
            changes[name] = number
        elif name == "no":
            changes["negative"] = value
        elif name == "style":
            changes["style"] = value.lower()
        else:
            changes["model"] = value
    return PromptFlags(**{**result.__dict__, **changes})


_EXAMPLES = {
    "ar": "--ar 16:9",
    "seed": "--seed 42",
    "no": "--no text, watermark",
    "steps": "--steps 30",
    "style": "--style watercolor",
    "model": "--model fluxdev",
}


def with_preset(inline: PromptFlags, preset: PromptFlags | None) -> PromptFlags:
    """A flag typed in the prompt wins over the preset's; negative words add up."""
    if preset is None:
        return inline
    negatives = [text for text in (preset.negative, inline.negative) if text]
    sized = inline.width is not None
    return PromptFlags(
        prompt=inline.prompt,
        width=inline.width if sized else preset.width,
        height=inline.height if sized else preset.height,
        aspect=inline.aspect if sized else preset.aspect,
        seed=inline.seed if inline.seed is not None else preset.seed,
        negative=", ".join(negatives) or None,
        steps=inline.steps if inline.steps is not None else preset.steps,
        style=inline.style or preset.style,
        model=inline.model or preset.model,
    )
