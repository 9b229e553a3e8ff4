"""What a member asks for, validated against the ModelsLab rules before anything is spent.

The rules come from `shared/docs/modelslab-api.md` §4 and the vendor pages: they depend on the API
flavour (v6 community or enterprise) and on the model (FLUX has its own limits and ignores some
options). A request that passes here is sent as is; one that does not gets an `InvalidOption`
naming the option and what it accepts.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from bot.errors import InvalidOption

ApiFlavour = Literal["v6", "enterprise"]

SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDIMInverseScheduler",
    "DEISMultistepScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
    "LCMScheduler",
)

PROMPT_MAX_LENGTH = 2000
SIDE_MAX = 1024
SIDE_MIN = 64
FLUX_SIDE_MIN = 256
DEFAULT_SIDE = 512
SAMPLES_MAX = 4
GUIDANCE_MIN, GUIDANCE_MAX, DEFAULT_GUIDANCE = 1.0, 20.0, 7.5
SEED_MAX = 2**32 - 1
DEFAULT_STRENGTH = 0.7
VARY_STRENGTH = 0.5  # "moderate": the Vary button
IMG2IMG_UNSUPPORTED = ("flux",)  # the FLUX page: flux has no image-to-image
LORA_STRENGTH_MIN, LORA_STRENGTH_MAX = 0.1, 1.0
LORA_MAX = 5
ENTERPRISE_STEPS = (21, 31, 41)
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


def is_flux(model_id: str) -> bool:
    """Only `flux` itself has the FLUX page's restrictions; `fluxdev`/`fluxschnell` take LoRAs and img2img."""
    return model_id.lower() == "flux"


@dataclass(frozen=True)
class StepRule:
    """Allowed `num_inference_steps` for one flavour and model, and the default we send."""

    default: int
    minimum: int | None = None
    maximum: int | None = None
    allowed: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.allowed:
            return "must be one of " + ", ".join(str(v) for v in self.allowed)
        return f"must be a whole number from {self.minimum} to {self.maximum}"

    def accepts(self, steps: int) -> bool:
        if self.allowed:
            return steps in self.allowed
        assert self.minimum is not None and self.maximum is not None
        return self.minimum <= steps <= self.maximum


def step_rule(flavour: ApiFlavour, model_id: str) -> StepRule:
    if flavour == "enterprise":
        return StepRule(default=21, allowed=ENTERPRISE_STEPS)
    if is_flux(model_id):
        return StepRule(default=30, minimum=20, maximum=50)
    # The v6 table: 1-20, anything higher silently capped at 20. We refuse instead of letting it be capped.
    return StepRule(default=20, minimum=1, maximum=20)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated text-to-image request: exactly what is sent to ModelsLab (minus key, webhook, track_id)."""

    prompt: str
    model_id: str
    width: int = DEFAULT_SIDE
    height: int = DEFAULT_SIDE
    samples: int = 1
    steps: int = 20
    guidance: float = DEFAULT_GUIDANCE
    negative_prompt: str | None = None
    seed: int | None = None
    scheduler: str | None = None
    lora_models: tuple[str, ...] = field(default_factory=tuple)
    lora_strengths: tuple[float, ...] = field(default_factory=tuple)
    safety_checker: bool = True
    seed_is_random: bool = False  # the bot chose the seed: it may choose another (re-submissions, re-rolls)
    enhance_style: str | None = None  # one of ModelsLab's documented styles (not for flux)
    preset: str | None = None  # the server preset the member chose (shown by Info)
    strength: float | None = None  # img2img: how far from the input image (0-1)
    source_url: str | None = None  # img2img/upscale: where the input image was read (a Discord attachment)
    upscale_scale: int | None = None  # upscale: the factor

    def payload_for(self, kind: str) -> dict[str, Any]:
        """The JSON body of a job of this kind (the input image is added by the job service)."""
        if kind == "upscale":
            return {"scale": self.upscale_scale or 2, "face_enhance": False}
        payload = self.to_payload()
        if kind == "img2img":
            # img2img takes its size from the input image; width and height are ignored there.
            del payload["width"], payload["height"]
            payload["strength"] = self.strength if self.strength is not None else DEFAULT_STRENGTH
        return payload

    def to_payload(self) -> dict[str, Any]:
        """The JSON body fields as the vendor's examples send them ("yes"/"no" flags, numbers as numbers)."""
        payload: dict[str, Any] = {
            "model_id": self.model_id,
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "samples": self.samples,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "seed": self.seed,
            "safety_checker": "yes" if self.safety_checker else "no",
        }
        if self.negative_prompt:
            payload["negative_prompt"] = self.negative_prompt
        if self.scheduler:
            payload["scheduler"] = self.scheduler
        if self.enhance_style:
            payload["enhance_style"] = self.enhance_style
        if self.lora_models:
            payload["lora_model"] = ",".join(self.lora_models)
            if self.lora_strengths:
                payload["lora_strength"] = ",".join(_format_number(s) for s in self.lora_strengths)
        return payload

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_models"] = list(self.lora_models)
        data["lora_strengths"] = list(self.lora_strengths)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationRequest:
        values = dict(data)
        values["lora_models"] = tuple(values.get("lora_models") or ())
        values["lora_strengths"] = tuple(values.get("lora_strengths") or ())
        return cls(**values)


def _format_number(value: float) -> str:
    return f"{value:g}"


def build_generation_request(
    *,
    flavour: ApiFlavour,
    default_model: str,
    prompt: str,
    negative_prompt: str | None = None,
    model: str | None = None,
    width: int | None = None,
    height: int | None = None,
    samples: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    scheduler: str | None = None,
    lora: str | None = None,
    lora_strength: str | None = None,
    safety_checker: bool = True,
    defaults: ServerDefaults | None = None,
    style: str | None = None,
) -> GenerationRequest:
    """Check every option of `/imagine` and build the request, or raise `InvalidOption` for the first bad one.

    Precedence: the member's option, then the server's default (`defaults`, used only where it is valid for
    the chosen model: a member is never refused for a server setting), then the built-in default.
    """
    defaults = defaults or ServerDefaults()
    prompt = (prompt or "").strip()
    if not prompt:
        raise InvalidOption("prompt", "must not be empty: describe the image you want.")
    if len(prompt) > PROMPT_MAX_LENGTH:
        raise InvalidOption("prompt", f"must be at most {PROMPT_MAX_LENGTH} characters (yours has {len(prompt)}).")

    model_id = (model or "").strip() or defaults.model or default_model
    if not _MODEL_ID.match(model_id):
        raise InvalidOption(
            "model", "must be a ModelsLab model_id: letters, digits, dots, dashes or underscores, at most 100."
        )
    flux = is_flux(model_id)

    negative = (negative_prompt or "").strip() or None
    if negative is None and defaults.negative_prompt and not flux:
        negative = defaults.negative_prompt[:PROMPT_MAX_LENGTH]
    elif negative is not None:
        if flux:
            raise InvalidOption(
                "negative_prompt", "is ignored by the flux model: leave it out, or pick another model such as fluxdev."
            )
        if len(negative) > PROMPT_MAX_LENGTH:
            raise InvalidOption("negative_prompt", f"must be at most {PROMPT_MAX_LENGTH} characters.")

    side_min = FLUX_SIDE_MIN if flux else SIDE_MIN
    checked_width = _check_side(
        "width", width if width is not None else _valid_side(defaults.width, side_min), side_min
    )
    checked_height = _check_side(
        "height", height if height is not None else _valid_side(defaults.height, side_min), side_min
    )

    if samples is None:
        samples = 1
    if not 1 <= samples <= SAMPLES_MAX:
        raise InvalidOption("samples", f"must be from 1 to {SAMPLES_MAX} (you gave {samples}).")

    rule = step_rule(flavour, model_id)
    if steps is None:
        steps = defaults.steps if defaults.steps is not None and rule.accepts(defaults.steps) else rule.default
    elif not rule.accepts(steps):
        where = "on the enterprise API" if flavour == "enterprise" else f"for the {model_id} model"
        raise InvalidOption("steps", f"{rule.describe()} {where} (you gave {steps}).")

    if guidance is None:
        guidance = DEFAULT_GUIDANCE
    if not math.isfinite(guidance) or not GUIDANCE_MIN <= guidance <= GUIDANCE_MAX:
        raise InvalidOption("guidance", f"must be from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g} (you gave {guidance:g}).")

    seed_is_random = seed is None
    if seed is None:
        # Chosen here rather than by ModelsLab: its slim answers do not report the seed it picked, and a
        # re-roll must never repeat an identical payload (ModelsLab's spam filter).
        seed = secrets.randbelow(SEED_MAX + 1)
    elif not 0 <= seed <= SEED_MAX:
        raise InvalidOption("seed", f"must be a whole number from 0 to {SEED_MAX}, or left out for a random one.")

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise InvalidOption("scheduler", "must be one of the listed schedulers: " + ", ".join(SCHEDULERS) + ".")

    if style is not None:
        from bot.styles import ENHANCE_STYLES

        if flux:
            raise InvalidOption(
                "--style", "is ignored by the flux model: leave it out, or pick another model such as fluxdev."
            )
        if style not in ENHANCE_STYLES:
            raise InvalidOption("--style", "must be one of ModelsLab's styles, such as watercolor, anime or cinematic.")

    lora_models = _split_list(lora)
    lora_strengths_text = _split_list(lora_strength)
    if lora_models and flux:
        raise InvalidOption("lora", "is not supported by the flux model: use fluxdev for LoRAs.")
    if len(lora_models) > LORA_MAX:
        raise InvalidOption("lora", f"takes at most {LORA_MAX} LoRA ids, separated by commas.")
    for lora_id in lora_models:
        if not _MODEL_ID.match(lora_id):
            raise InvalidOption("lora", f"has an id that is not valid: {lora_id[:40]!r}. Separate ids with commas.")
    lora_strengths = tuple(_parse_strength(text) for text in lora_strengths_text)
    if lora_strengths and not lora_models:
        raise InvalidOption("lora_strength", "needs `lora`: give one strength per LoRA id.")
    if lora_strengths and len(lora_strengths) != len(lora_models):
        raise InvalidOption(
            "lora_strength",
            f"needs exactly one strength per LoRA: {len(lora_models)} LoRA(s) but {len(lora_strengths)} strength(s).",
        )

    return GenerationRequest(
        prompt=prompt,
        model_id=model_id,
        width=checked_width,
        height=checked_height,
        samples=samples,
        steps=steps,
        guidance=float(guidance),
        negative_prompt=negative,
        seed=seed,
        scheduler=scheduler,
        lora_models=lora_models,
        lora_strengths=lora_strengths,
        safety_checker=safety_checker,
        seed_is_random=seed_is_random,
        enhance_style=style,
    )


@dataclass(frozen=True)
class ServerDefaults:
    """A server's own defaults (`/config defaults`)."""

    model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


def _valid_side(value: int | None, minimum: int) -> int | None:
    return value if value is not None and minimum <= value <= SIDE_MAX and value % 8 == 0 else None


def _check_side(option: str, value: int | None, minimum: int) -> int:
    if value is None:
        return DEFAULT_SIDE
    if not minimum <= value <= SIDE_MAX or value % 8:
        raise InvalidOption(
            option, f"must be a multiple of 8 from {minimum} to {SIDE_MAX} pixels for this model (you gave {value})."
        )
    return value


def _split_list(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidOption(
            "lora_strength", f"must be numbers from {LORA_STRENGTH_MIN:g} to {LORA_STRENGTH_MAX:g}, comma separated."
        ) from None
    if not math.isfinite(value) or not LORA_STRENGTH_MIN <= value <= LORA_STRENGTH_MAX:
        raise InvalidOption(
            "lora_strength", f"values must be from {LORA_STRENGTH_MIN:g} to {LORA_STRENGTH_MAX:g} (you gave {text})."
        )
    return value


def build_remix_request(
    *,
    flavour: ApiFlavour,
    default_model: str,
    prompt: str,
    source_url: str,
    strength: float | None = None,
    negative_prompt: str | None = None,
    model: str | None = None,
    samples: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    safety_checker: bool = True,
    defaults: ServerDefaults | None = None,
) -> GenerationRequest:
    """The options of `/remix` (and of the Remix form), checked like /imagine's plus `strength` and the model."""
    if strength is None:
        strength = DEFAULT_STRENGTH
    if not math.isfinite(strength) or not 0 <= strength <= 1:
        raise InvalidOption(
            "strength", f"must be from 0 to 1 (you gave {strength:g}): 0 keeps the image, 1 ignores it."
        )
    server = defaults or ServerDefaults()
    chosen = (model or "").strip() or default_model
    if chosen.lower() in IMG2IMG_UNSUPPORTED:
        raise InvalidOption("model", f"`{chosen}` cannot remix images: use fluxdev or fluxschnell.")
    request = build_generation_request(
        flavour=flavour,
        default_model=chosen,
        prompt=prompt,
        negative_prompt=negative_prompt,
        model=chosen,
        samples=samples,
        steps=steps,
        guidance=guidance,
        seed=seed,
        safety_checker=safety_checker,
        defaults=ServerDefaults(negative_prompt=server.negative_prompt, steps=server.steps),
    )
    return replace(request, strength=strength, source_url=source_url)
