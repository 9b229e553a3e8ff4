"""A member's own defaults in a server (`/settings`): pure rules, and the service that stores and caches them.

Settings are standing choices: at generation time they are a lenient layer (`bot.requests.generation`), skipped where
they do not fit the chosen model, so a member is never refused for them. They are checked when saved, so
what is stored is always something the bot understands.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from bot.errors import InvalidOption
from bot.requests.flags import flags_text, parse_flags, parse_guidance, parse_ratio
from bot.requests.generation import (
    ENTERPRISE_STEPS,
    PROMPT_MAX_LENGTH,
    SIDE_MIN,
    Choices,
    Layer,
    build_request,
    check_model_id,
    step_rule,
)
from bot.requests.styles import ENHANCE_STYLES
from bot.storage.events import Events, LocalEvents
from bot.storage.ports import MemberDefaultsRepository

ASPECTS = ("1:1", "4:5", "5:4", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "1:2", "2:1", "9:21", "21:9")
# Flags with their own control in the form; --seed is left to prompts (a fixed seed makes every image alike).
OWN_CONTROLS = {
    "model": "Model",
    "ar": "Aspect ratio",
    "steps": "Steps",
    "guidance": "Guidance",
    "no": "Negative prompt",
    "style": "Style",
}
NOT_STORED = ("seed",)


@dataclass(frozen=True)
class MemberDefaults:
    model: str | None = None
    aspect: str | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    style: str | None = None
    flags: str = ""  # every other parameter, as flags: "--clip_skip 2 --panorama yes"
    remix_mode: bool = False

    def layer(self) -> Layer:
        width = height = None
        if self.aspect:
            width, height, _ = parse_ratio(self.aspect, side_min=SIDE_MIN)
        try:
            other = parse_flags(self.flags, side_min=SIDE_MIN).choices if self.flags else Choices()
        except InvalidOption:  # saved by a version that knew a flag this one does not: the rest still applies
            other = Choices()
        choices = replace(
            other,
            model=self.model,
            width=width,
            height=height,
            aspect=self.aspect,
            steps=self.steps,
            guidance=self.guidance,
            negative_prompt=self.negative_prompt,
            style=self.style,
        )
        return Layer("settings", choices, strict=False)

    def is_default(self) -> bool:
        return self == MemberDefaults()

    def to_row(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "aspect": self.aspect,
            "steps": self.steps,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            "style": self.style,
            "flags": self.flags,
            "remix_mode": int(self.remix_mode),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> MemberDefaults:
        return cls(
            model=row["model"],
            aspect=row["aspect"],
            steps=row["steps"],
            guidance=row["guidance"],
            negative_prompt=row["negative_prompt"],
            style=row["style"],
            flags=row["flags"] or "",
            remix_mode=bool(row["remix_mode"]),
        )


def check_model(text: str) -> str | None:
    text = text.strip()
    return check_model_id(text) if text else None


def check_aspect(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    return parse_ratio(text, side_min=SIDE_MIN)[2]


def check_steps(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 3) or not 1 <= int(text) <= 50:
        raise InvalidOption("Steps", "must be a whole number from 1 to 50 (each model takes its own range).")
    return int(text)


def check_guidance(text: str) -> float | None:
    return parse_guidance(text.strip(), "Guidance") if text.strip() else None


def check_negative(text: str) -> str | None:
    text = " ".join(text.split())
    if len(text) > PROMPT_MAX_LENGTH:
        raise InvalidOption("Negative prompt", f"must be at most {PROMPT_MAX_LENGTH} characters.")
    return text or None


def check_style(text: str) -> str | None:
    text = text.strip().lower()
    if not text:
        return None
    if text not in ENHANCE_STYLES:
        raise InvalidOption("Style", "must be one of ModelsLab's styles, such as watercolor, anime or cinematic.")
    return text


def check_flags(text: str) -> str:
    """The "other parameters": only flags, each valid, none that has its own control; written back tidily."""
    parsed = parse_flags(text, side_min=SIDE_MIN)
    if parsed.prompt:
        raise InvalidOption(
            "Other parameters",
            f"holds only flags (like `--clip_skip 2 --panorama`), not words: “{parsed.prompt[:40]}”.",
        )
    for name in parsed.given:
        if name in OWN_CONTROLS:
            raise InvalidOption(f"--{name}", f"has its own place in /settings: use “{OWN_CONTROLS[name]}”.")
        if name in NOT_STORED:
            raise InvalidOption(
                "--seed", "is not kept in settings (every image would look alike): type it in a prompt."
            )
    return flags_text(parsed.choices)


class MemberDefaultsService:
    """Reads (cached: every command looks them up before its 3-second acknowledgement) and saves settings."""

    CACHE_SIZE = 10_000

    def __init__(self, store: MemberDefaultsRepository, events: Events | None = None) -> None:
        self._store = store
        self._cache: OrderedDict[tuple[int, int], MemberDefaults] = OrderedDict()
        # A member's settings changed in another process (or all of them forgotten): read them afresh.
        self._events = events or LocalEvents()
        self._events.subscribe("member", self._changed_elsewhere)
        self._events.subscribe(
            "member-forgotten", lambda user: self._drop_member(int(user)) if user.isdigit() else None
        )
        self._events.on_reconnect(self._cache.clear)

    async def get(self, guild_id: int, user_id: int) -> MemberDefaults:
        key = (guild_id, user_id)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        row = await self._store.get(guild_id, user_id)
        settings = MemberDefaults.from_row(row) if row is not None else MemberDefaults()
        self._remember(key, settings)
        return settings

    async def update(self, guild_id: int, user_id: int, **changes: Any) -> MemberDefaults:
        settings = replace(await self.get(guild_id, user_id), **changes)
        await self._store.save(guild_id, user_id, settings.to_row(), time.time())
        self._remember((guild_id, user_id), settings)
        await self._events.publish("member", f"{guild_id}:{user_id}")
        return settings

    async def reset(self, guild_id: int, user_id: int) -> MemberDefaults:
        await self._store.delete(guild_id, user_id)
        self._remember((guild_id, user_id), MemberDefaults())
        await self._events.publish("member", f"{guild_id}:{user_id}")
        return MemberDefaults()

    async def forget_member(self, user_id: int) -> None:
        """After /history forget deleted their rows everywhere."""
        self._drop_member(user_id)
        await self._events.publish("member-forgotten", str(user_id))

    def _drop_member(self, user_id: int) -> None:
        for key in [k for k in self._cache if k[1] == user_id]:
            del self._cache[key]

    def _changed_elsewhere(self, detail: str) -> None:
        guild, _, user = detail.partition(":")
        if guild.isdigit() and user.isdigit():
            self._cache.pop((int(guild), int(user)), None)

    def _remember(self, key: tuple[int, int], settings: MemberDefaults) -> None:
        self._cache[key] = settings
        self._cache.move_to_end(key)
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)


KNOWN_MODELS = ("flux", "fluxdev", "fluxschnell", "sdxl", "midjourney", "realistic-vision-51", "dreamshaper-8")
GUIDANCES = (2.0, 3.5, 5.0, 7.5, 10.0, 12.0, 15.0, 20.0)


def step_choices(flavour: str) -> tuple[int, ...]:
    return ENTERPRISE_STEPS if flavour == "enterprise" else (10, 15, 20, 25, 30, 40, 50)


def model_choices(current: str | None, allowed: tuple[str, ...], defaults: tuple[str, ...]) -> list[str]:
    """The models the form offers (any other id can be typed in its "More" form): the server's allowed ones
    when it restricts them, else the bot's defaults and some well-known public models."""
    pool = list(allowed) if allowed else [*defaults, *KNOWN_MODELS]
    if current and current not in pool and not allowed:
        pool.insert(0, current)
    return list(dict.fromkeys(pool))[:24]  # Discord's 25 options, one kept for "server default"


def unused_settings(
    settings: MemberDefaults, *, flavour: str, default_model: str, server: Layer, allowed_models: tuple[str, ...] = ()
) -> tuple[str, list[str]]:
    """The model an /imagine with no options would use, and which settings it would skip (they do not fit)."""
    layer = settings.layer()
    try:
        request = build_request(
            flavour=flavour,  # type: ignore[arg-type]
            kind="text2img",
            default_model=default_model,
            prompt="-",
            layers=[layer, server],
            allowed_models=allowed_models,
        )
    except InvalidOption:
        return settings.model or default_model, []
    used = {name for name, source in request.sources.items() if source == "settings"}
    wanted = {
        "model": settings.model,
        "width": settings.aspect,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "negative_prompt": settings.negative_prompt,
        "style": settings.style,
    }
    names = [name for name, value in wanted.items() if value is not None and name not in used]
    names += [name for name in layer.choices.advanced if name not in used]
    if (layer.choices.lora or layer.choices.lora_strength) and "lora" not in used:
        names.append("lora")
    if layer.choices.scheduler and "scheduler" not in used:
        names.append("scheduler")
    rule = step_rule(flavour, request.model_id)  # type: ignore[arg-type]
    takes = ", ".join(map(str, rule.allowed)) if rule.allowed else f"{rule.minimum}–{rule.maximum}"
    shown = {
        "width": "aspect ratio",
        "negative_prompt": "negative prompt",
        "steps": f"steps (it takes {takes})",
        "model": "model (not allowed in this server)",
    }
    return request.model_id, [shown.get(n, n) for n in names]


def describe(settings: MemberDefaults, *, model_in_use: str, unused: list[str]) -> str:
    """The text of the /settings form."""

    def value(text: object | None) -> str:
        return f"`{text}`" if text is not None and text != "" else "*server default*"

    guidance = f"{settings.guidance:g}" if settings.guidance is not None else None
    lines = [
        "**Your settings in this server.** They apply when you do not choose otherwise: a command option, a flag "
        "in your prompt or a preset wins over them, and they win over the server's defaults.",
        f"**Model:** {value(settings.model)} · **Aspect ratio:** {value(settings.aspect)} · "
        f"**Steps:** {value(settings.steps)} · **Guidance:** {value(guidance)}",
        f"**Negative prompt:** {value(settings.negative_prompt and settings.negative_prompt[:300])} · "
        f"**Style:** {value(settings.style)}",
        f"**Other parameters:** {value(settings.flags or None)}",
        "**Remix mode:** "
        + (
            "on: Re-roll and Vary open the Edit form first."
            if settings.remix_mode
            else "off: Re-roll and Vary start at once."
        ),
    ]
    if unused:
        lines.append(f"⚠️ Not used with `{model_in_use}`, which does not take them: {', '.join(unused)}.")
    return "\n".join(lines)[:1990]
