"""What a member asks for, validated against the ModelsLab rules before anything is spent.

The rules come from `shared/docs/modelslab-api.md` §4 and the vendor pages: they depend on the API
flavour (v6 community or enterprise) and on the model (FLUX has its own limits and ignores some
options). A request that passes here is sent as is; one that does not gets an `InvalidOption`
naming the option and what it accepts.

What a member asks for arrives in layers, highest first: the command's own options, flags typed in the
prompt, the chosen server preset, the member's `/settings`, the server's `/config defaults`; anything none
of them sets takes the built-in default. The first three are the member's request for this one job and are
refused when invalid; settings and server defaults are standing choices, skipped where they do not fit the
model (a member is never refused for them). Which layer gave each value is kept for the Info button.

Each parameter is one row of `RULES` (how a layer's value is read and checked for the flavour, kind of job and
model, and its default), then `NEEDS` says which parameters only make sense together; `build_request` walks
both. A new parameter is a new row (or, for the ModelsLab extras, an entry in `bot.requests.parameters`).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from bot.errors import InvalidOption
from bot.modelslab.client import ApiFlavour
from bot.requests import parameters
from bot.requests.parameters import ParameterValue
from bot.requests.styles import ENHANCE_STYLES

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


MODEL_ID_RULE = "must be a ModelsLab model_id: letters, digits, dots, dashes or underscores, at most 100."


def is_model_id(text: str) -> bool:
    """Whether `text` has the shape of a ModelsLab `model_id` (also LoRA and other model ids)."""
    return _MODEL_ID.match(text) is not None


def check_model_id(text: str) -> str:
    if not is_model_id(text):
        raise InvalidOption("model", MODEL_ID_RULE)
    return text


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
    """A validated request: exactly what is sent to ModelsLab (minus key, webhook, track_id)."""

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
    advanced: dict[str, ParameterValue] = field(default_factory=dict)  # bot.requests.parameters, by API name
    sources: dict[str, str] = field(default_factory=dict)  # which layer chose each value (Info); absent = built-in
    aspect: str | None = None  # "16:9" when the size came from a ratio

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
        for name, value in self.sent_advanced().items():
            payload[name] = parameters.payload_value(value)
        return payload

    def sent_advanced(self) -> dict[str, ParameterValue]:
        """The `parameters` that are sent (the checker's action is not, with the checker off).

        The IP adapter is left out if its link breaks the download rules: a job stored before the rule (a Re-roll
        of it, or one queued across an upgrade) never has ModelsLab fetch a private address."""
        advanced = dict(self.advanced)
        if not self.safety_checker:
            advanced.pop("safety_checker_type", None)
        link = advanced.get("ip_adapter_image")
        if isinstance(link, str) and parameters.link_problem(link) is not None:
            advanced = {name: value for name, value in advanced.items() if not name.startswith("ip_adapter")}
        return advanced

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


@dataclass(frozen=True)
class Choices:
    """What one layer asks for; None (or absent) means "not set here"."""

    model: str | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    samples: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None  # replaces the negative prompt of the layers below
    no: str | None = None  # `--no` words: added to the negative prompt
    seed: int | None = None
    scheduler: str | None = None
    lora: str | None = None
    lora_strength: str | None = None
    style: str | None = None
    advanced: Mapping[str, ParameterValue] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return self == Choices()


SOURCE_NAMES = {  # Info is read by whoever presses it, not only by the member who asked: no "your"
    "option": "the command's options",
    "flag": "flags in the prompt",
    "preset": "the preset",
    "settings": "the member's /settings",
    "server": "the server's defaults",
    "job": "the original job",
}
_FLAG_SPELLING = {"width": "--ar", "height": "--ar", "negative_prompt": "--no", "no": "--no"}


@dataclass(frozen=True)
class Layer:
    """One source of choices. A strict layer's bad value is refused; a lenient one's is skipped."""

    source: str  # a key of SOURCE_NAMES
    choices: Choices
    strict: bool
    label: str | None = None  # the preset's name

    def refuse(self, name: str, reason: str) -> InvalidOption:
        if self.source == "option":
            return InvalidOption(name, reason)
        spelled = _FLAG_SPELLING.get(name, f"--{name}")
        if self.source == "flag":
            return InvalidOption(spelled, reason)
        where = f"the preset `{self.label}`" if self.source == "preset" else SOURCE_NAMES.get(self.source, self.source)
        return InvalidOption(spelled, f"{reason.rstrip('.')} (it comes from {where}).")


def option_layer(choices: Choices) -> Layer:
    return Layer("option", choices, strict=True)


def flag_layer(choices: Choices) -> Layer:
    return Layer("flag", choices, strict=True)


def preset_layer(name: str, choices: Choices) -> Layer:
    return Layer("preset", choices, strict=True, label=name)


def check_preset_fits(
    choices: Choices, *, name: str, flavour: ApiFlavour, default_model: str, allowed_models: Sequence[str]
) -> None:
    """A preset is used as it is saved: refuse now one that /imagine would refuse with any model (steps no model
    takes, a parameter this API flavour lacks, a model the server does not allow...). One that names no model
    is tried on the server's default model, then on flux and on any other model, since members may pick one;
    the default model's reason is the one given."""
    if choices.model and allowed_models and choices.model not in allowed_models:
        raise InvalidOption(f"--model {choices.model}", "is not one of this server's allowed models.")
    reasons = []
    for model in [choices.model] if choices.model else [default_model, "flux", "any-other-model"]:
        try:
            build_request(
                flavour=flavour,
                kind="text2img",
                default_model=model,
                prompt="(checking the preset)",
                layers=[preset_layer(name, choices)],
            )
            return
        except InvalidOption as refusal:
            reasons.append(refusal)
    raise reasons[0]


def job_layer(request: GenerationRequest) -> Layer:
    """An earlier job's choices, for Edit and Vary: kept where they still fit (a Vary may change the model)."""
    choices = Choices(
        model=request.model_id,
        width=request.width,
        height=request.height,
        aspect=request.aspect,
        samples=request.samples,
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
        lora=",".join(request.lora_models) or None,
        lora_strength=",".join(_format_number(s) for s in request.lora_strengths) or None,
        style=request.enhance_style,
        advanced=dict(request.advanced),
    )
    return Layer("job", choices, strict=False)


class _Bad(Exception):
    """A value does not fit; the layer decides between refusing it and skipping it."""

    def __init__(self, reason: str, name: str | None = None) -> None:
        super().__init__(reason)
        self.name = name  # the option at fault, when not the one being checked


FLUX_IGNORES = "is ignored by the flux model: leave it out, or pick another model such as fluxdev."
REMIX_KEEPS_SIZE = "cannot be set when remixing: the result keeps the input image's size."


@dataclass(frozen=True)
class Fit:
    """What a value is checked against: the API flavour, the kind of job and the model (the default one while the
    model itself is chosen), and for standing choices the models the server allows."""

    flavour: ApiFlavour
    kind: str
    model_id: str
    allowed_models: Sequence[str] = ()

    @property
    def flux(self) -> bool:
        return is_flux(self.model_id)

    @property
    def side_min(self) -> int:
        return FLUX_SIDE_MIN if self.flux else SIDE_MIN

    @property
    def steps(self) -> StepRule:
        return step_rule(self.flavour, self.model_id)


@dataclass(frozen=True)
class Chosen:
    """A parameter's value and the layer that chose it; no layer: built in."""

    value: Any
    layer: Layer | None = None


def _nothing(fit: Fit) -> None:
    return None


def _always(value: Any, fit: Fit) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """How one parameter is chosen: the first layer whose value fits wins. A value that does not fit is refused
    when the member asked for it this job (a strict layer) and skipped when it is a standing choice."""

    name: str  # the key of `sources`; the `Choices` field read, unless `read` says otherwise
    check: Callable[[Any, Fit], Any]  # the value to send (None: none from here), or `_Bad` saying why it does not fit
    default: Callable[[Fit], Any] = _nothing  # when no layer sets a value that fits
    read: Callable[[Choices], Any] | None = None  # what one layer sets; None when it sets nothing
    standing: Callable[[Any, Fit], bool] = _always  # a standing choice is also skipped when this is false
    adds_to: str | None = None  # every layer's value is added to that parameter's (lowest layer first) instead

    def fitting_value(self, layer: Layer, fit: Fit) -> Any:
        """This layer's value, checked; None when it sets none or it is a standing choice that does not fit."""
        value = self.read(layer.choices) if self.read else getattr(layer.choices, self.name)
        if value is None or not (layer.strict or self.standing(value, fit)):
            return None
        try:
            return self.check(value, fit)
        except _Bad as bad:
            if layer.strict:
                raise layer.refuse(bad.name or self.name, str(bad)) from None
            return None


@dataclass(frozen=True)
class Needs:
    """A parameter that makes sense only with another: without it, refused from a strict layer, else dropped."""

    name: str
    met: Callable[[Mapping[str, Chosen]], bool]
    reason: str


def _check_model(value: str, fit: Fit) -> str:
    value = value.strip()
    if not is_model_id(value):
        raise _Bad(MODEL_ID_RULE)
    if fit.kind == "img2img" and value.lower() in IMG2IMG_UNSUPPORTED:
        raise _Bad(f"`{value}` cannot remix images: use fluxdev or fluxschnell.")
    return value


def _allowed_in_server(value: str, fit: Fit) -> bool:
    return not fit.allowed_models or value.strip() in fit.allowed_models


def _default_model(fit: Fit) -> str:
    if fit.kind == "img2img" and fit.model_id.lower() in IMG2IMG_UNSUPPORTED:
        raise InvalidOption("model", f"`{fit.model_id}` cannot remix images: use fluxdev or fluxschnell.")
    return fit.model_id


def _check_negative(value: str, fit: Fit) -> str:
    if fit.flux:
        raise _Bad(FLUX_IGNORES)
    value = value.strip()
    if len(value) > PROMPT_MAX_LENGTH:
        raise _Bad(f"must be at most {PROMPT_MAX_LENGTH} characters.")
    return value


def _read_size(choices: Choices) -> tuple[int | None, int | None] | None:
    return None if choices.width is None and choices.height is None else (choices.width, choices.height)


def _refuse_size_on_remix(value: tuple[int | None, int | None], fit: Fit) -> None:
    """A rule that only refuses: a remix keeps the input image's size, whichever side a layer sets."""
    if fit.kind == "img2img":
        raise _Bad(REMIX_KEEPS_SIZE, "width")


def _check_side(value: int, fit: Fit) -> int:
    if fit.kind == "img2img":  # standing sizes are skipped (strict ones were refused as the size)
        raise _Bad(REMIX_KEEPS_SIZE, "width")
    if not fit.side_min <= value <= SIDE_MAX or value % 8:
        raise _Bad(
            f"must be a multiple of 8 from {fit.side_min} to {SIDE_MAX} pixels for this model (you gave {value})."
        )
    return value


def _check_samples(value: int, fit: Fit) -> int:
    if not 1 <= value <= SAMPLES_MAX:
        raise _Bad(f"must be from 1 to {SAMPLES_MAX} (you gave {value}).")
    return value


def _check_steps(value: int, fit: Fit) -> int:
    if not fit.steps.accepts(value):
        where = "on the enterprise API" if fit.flavour == "enterprise" else f"for the {fit.model_id} model"
        raise _Bad(f"{fit.steps.describe()} {where} (you gave {value}).")
    return value


def _check_guidance(value: float, fit: Fit) -> float:
    if not math.isfinite(value) or not GUIDANCE_MIN <= value <= GUIDANCE_MAX:
        raise _Bad(f"must be from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g} (you gave {value:g}).")
    return float(value)


def _check_seed(value: int, fit: Fit) -> int:
    if not 0 <= value <= SEED_MAX:
        raise _Bad(f"must be a whole number from 0 to {SEED_MAX}, or left out for a random one.")
    return value


def _random_seed(fit: Fit) -> int:
    """Chosen here rather than by ModelsLab: its slim answers do not report the seed it picked, and a re-roll must
    never repeat an identical payload (ModelsLab's spam filter)."""
    return secrets.randbelow(SEED_MAX + 1)


def _check_scheduler(value: str, fit: Fit) -> str:
    if value not in SCHEDULERS:
        raise _Bad("must be one of the listed schedulers: " + ", ".join(SCHEDULERS) + ".")
    return value


def _check_style(value: str, fit: Fit) -> str:
    if fit.flux:
        raise _Bad(FLUX_IGNORES)
    if fit.flavour == "enterprise":
        raise _Bad("is not available on the enterprise API this bot uses.")
    if fit.kind != "text2img":
        raise _Bad("works only when making an image from text (/imagine), not when remixing one.")
    if value not in ENHANCE_STYLES:
        raise _Bad("must be one of ModelsLab's styles, such as watercolor, anime or cinematic.")
    return value


def _read_loras(choices: Choices) -> tuple[str | None, str | None] | None:
    """`lora` and `lora_strength` come together, from the first layer that sets either."""
    if choices.lora is None and choices.lora_strength is None:
        return None
    return choices.lora, choices.lora_strength


def _check_loras(value: tuple[str | None, str | None], fit: Fit) -> tuple[tuple[str, ...], tuple[float, ...]]:
    models = _split_list(value[0])
    texts = _split_list(value[1])
    if models and fit.flux:
        raise _Bad("is not supported by the flux model: use fluxdev for LoRAs.")
    if len(models) > LORA_MAX:
        raise _Bad(f"takes at most {LORA_MAX} LoRA ids, separated by commas.")
    for lora_id in models:
        if not is_model_id(lora_id):
            raise _Bad(f"has an id that is not valid: {lora_id[:40]!r}. Separate ids with commas.")
    strengths = tuple(_parse_strength(text) for text in texts)
    if strengths and not models:
        raise _Bad("needs `lora`: give one strength per LoRA id.", "lora_strength")
    if strengths and len(strengths) != len(models):
        raise _Bad(
            f"needs exactly one strength per LoRA: {len(models)} LoRA(s) but {len(strengths)} strength(s).",
            "lora_strength",
        )
    return models, strengths


def _read_parameter(name: str, choices: Choices) -> ParameterValue | None:
    return choices.advanced.get(name)


def _check_parameter(name: str, value: ParameterValue, fit: Fit) -> ParameterValue:
    reason = parameters.refusal(name, value, flavour=fit.flavour, model_id=fit.model_id, kind=fit.kind, flux=fit.flux)
    if reason is not None:
        raise _Bad(reason)
    return value


def _parameter_rule(name: str) -> Rule:
    """One of `bot.requests.parameters`: read from `Choices.advanced`, refused where `parameters.refusal` says."""
    return Rule(name, partial(_check_parameter, name), read=partial(_read_parameter, name))


# The model first: every other rule checks against it.
MODEL_RULE = Rule("model", _check_model, default=_default_model, standing=_allowed_in_server)
# The others in the order they are checked, which decides the refusal given for a request with several faults.
RULES: tuple[Rule, ...] = (
    Rule("negative_prompt", _check_negative, default=lambda fit: ""),
    Rule("no", _check_negative, adds_to="negative_prompt"),  # `--no` words: added to the negative prompt that won
    Rule("size", _refuse_size_on_remix, read=_read_size),  # chooses nothing: refuses any size in a remix
    Rule("width", _check_side, default=lambda fit: DEFAULT_SIDE),
    Rule("height", _check_side, default=lambda fit: DEFAULT_SIDE),
    Rule("samples", _check_samples, default=lambda fit: 1),
    Rule("steps", _check_steps, default=lambda fit: fit.steps.default),
    Rule("guidance", _check_guidance, default=lambda fit: DEFAULT_GUIDANCE),
    Rule("seed", _check_seed, default=_random_seed),
    Rule("scheduler", _check_scheduler),
    Rule("style", _check_style),
    Rule("lora", _check_loras, default=lambda fit: ((), ()), read=_read_loras),
    *(_parameter_rule(name) for name in parameters.PARAMETERS),
)


def _chosen(chosen: Mapping[str, Chosen], name: str) -> bool:
    return chosen[name].layer is not None


# Checked once every rule has chosen, in this order; a standing value dropped here is not replaced by a lower layer's.
NEEDS: tuple[Needs, ...] = (
    Needs(
        "ip_adapter_id",
        lambda chosen: _chosen(chosen, "ip_adapter_image"),
        "needs `--ip_adapter_image` too: a link to the picture the adapter follows.",
    ),
    Needs(
        "ip_adapter_image",
        lambda chosen: _chosen(chosen, "ip_adapter_id"),
        "needs `--ip_adapter_id` too: " + ", ".join(parameters.IP_ADAPTERS) + ".",
    ),
    Needs(
        "ip_adapter_scale",
        lambda chosen: _chosen(chosen, "ip_adapter_id"),
        "needs `--ip_adapter_id` and `--ip_adapter_image` too.",
    ),
    Needs(
        "algorithm_type",
        lambda chosen: (
            chosen["algorithm_type"].value == "none" or chosen["scheduler"].value == "DPMSolverMultistepScheduler"
        ),
        "works only with the DPMSolverMultistepScheduler scheduler: choose it too.",
    ),
)


def _choose(rule: Rule, layers: Sequence[Layer], fit: Fit) -> Chosen:
    for layer in layers:
        value = rule.fitting_value(layer, fit)
        if value is not None:
            return Chosen(value, layer)
    return Chosen(rule.default(fit), None)


def _add_words(rule: Rule, layers: Sequence[Layer], fit: Fit, base: Chosen) -> Chosen:
    """Every layer's words (the preset's, then the prompt's...) after the value that won; Info credits the highest
    layer that added some."""
    texts, layer_shown = [base.value], base.layer
    for layer in reversed(layers):
        words = rule.fitting_value(layer, fit)
        if words is not None:
            texts.append(words)
            layer_shown = layer
    joined = ", ".join(text for text in texts if text)
    if len(joined) > PROMPT_MAX_LENGTH:
        raise InvalidOption(
            rule.adds_to or rule.name, f"with the `--no` words must be at most {PROMPT_MAX_LENGTH} characters."
        )
    return Chosen(joined, layer_shown)


def _apply_needs(chosen: dict[str, Chosen]) -> None:
    for need in NEEDS:
        layer = chosen[need.name].layer
        if layer is not None and not need.met(chosen):
            if layer.strict:
                raise layer.refuse(need.name, need.reason)
            chosen[need.name] = Chosen(None)


def _follow_ratio(
    width: Chosen, height: Chosen, layers: Sequence[Layer], side_min: int
) -> tuple[Chosen, Chosen, str | None]:
    """The size and its ratio ("16:9") when one layer chose both sides. One side set on its own (`width:768`) over a
    lower layer's ratio (`--ar 16:9`, settings): the other side follows that ratio rather than a size nobody asked
    for, credited to the layer that set the one side."""
    if width.layer is None or height.layer is None:
        return width, height, None
    if width.layer is height.layer:
        return width, height, width.layer.choices.aspect
    rank = {id(layer): index for index, layer in enumerate(layers)}
    width_is_higher = rank[id(width.layer)] < rank[id(height.layer)]
    lower = (height if width_is_higher else width).layer
    assert lower is not None
    if not (lower.choices.aspect and lower.choices.width and lower.choices.height):
        return width, height, None
    ratio = lower.choices.width / lower.choices.height
    if width_is_higher:
        return width, Chosen(_side(width.value / ratio, side_min), width.layer), None
    return Chosen(_side(height.value * ratio, side_min), height.layer), height, None


def build_request(
    *,
    flavour: ApiFlavour,
    kind: str,
    default_model: str,
    prompt: str,
    layers: Sequence[Layer],
    safety_checker: bool = True,
    allowed_models: Sequence[str] = (),
) -> GenerationRequest:
    """Check every choice of every layer and build the request, or raise `InvalidOption` for the first bad one:
    the model first, then each row of `RULES` checked for that model, then `NEEDS`."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise InvalidOption("prompt", "must not be empty: describe the image you want.")
    if len(prompt) > PROMPT_MAX_LENGTH:
        raise InvalidOption("prompt", f"must be at most {PROMPT_MAX_LENGTH} characters (yours has {len(prompt)}).")
    fit = Fit(flavour, kind, default_model, allowed_models)
    chosen = {"model": _choose(MODEL_RULE, layers, fit)}
    fit = replace(fit, model_id=chosen["model"].value)
    for rule in RULES:
        if rule.adds_to:
            chosen[rule.adds_to] = _add_words(rule, layers, fit, chosen[rule.adds_to])
        else:
            chosen[rule.name] = _choose(rule, layers, fit)
    _apply_needs(chosen)
    chosen["width"], chosen["height"], aspect = _follow_ratio(chosen["width"], chosen["height"], layers, fit.side_min)
    lora_models, lora_strengths = chosen["lora"].value
    return GenerationRequest(
        prompt=prompt,
        model_id=fit.model_id,
        width=chosen["width"].value,
        height=chosen["height"].value,
        samples=chosen["samples"].value,
        steps=chosen["steps"].value,
        guidance=chosen["guidance"].value,
        negative_prompt=chosen["negative_prompt"].value or None,
        seed=chosen["seed"].value,
        scheduler=chosen["scheduler"].value,
        lora_models=lora_models,
        lora_strengths=lora_strengths,
        safety_checker=safety_checker,
        seed_is_random=chosen["seed"].layer is None,
        enhance_style=chosen["style"].value,
        preset=next((layer.label for layer in layers if layer.source == "preset"), None),
        advanced={name: chosen[name].value for name in parameters.PARAMETERS if chosen[name].layer is not None},
        sources={name: value.layer.source for name, value in chosen.items() if value.layer is not None},
        aspect=aspect,
    )


def _side(length: float, side_min: int) -> int:
    """The nearest valid side: a multiple of 8 within the limits."""
    return max(side_min, min(SIDE_MAX, round(length / 8) * 8))


def _format_number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class ServerDefaults:
    """A server's own defaults (`/config defaults`)."""

    model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    def layer(self, kind: str) -> Layer:
        """Standing choices: skipped where they do not fit. Remixing keeps the input's size and uses the bot's
        remix model, so only the negative prompt and the steps apply there."""
        if kind == "img2img":
            return Layer("server", Choices(negative_prompt=self.negative_prompt, steps=self.steps), strict=False)
        choices = Choices(
            model=self.model,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
        )
        return Layer("server", choices, strict=False)


def _split_list(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Bad(
            f"must be numbers from {LORA_STRENGTH_MIN:g} to {LORA_STRENGTH_MAX:g}, comma separated.", "lora_strength"
        ) from None
    if not math.isfinite(value) or not LORA_STRENGTH_MIN <= value <= LORA_STRENGTH_MAX:
        raise _Bad(
            f"values must be from {LORA_STRENGTH_MIN:g} to {LORA_STRENGTH_MAX:g} (you gave {text}).", "lora_strength"
        )
    return value


def _options(
    model: str | None, negative_prompt: str | None, advanced: Mapping[str, ParameterValue] | None, **values: Any
) -> Layer:
    """A command's own options, the strictest layer; an empty text option counts as not given."""
    return option_layer(
        Choices(
            model=(model or "").strip() or None,
            negative_prompt=(negative_prompt or "").strip() or None,
            advanced=dict(advanced or {}),
            **values,
        )
    )


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
    advanced: Mapping[str, ParameterValue] | None = None,
    layers: Sequence[Layer] = (),
    allowed_models: Sequence[str] = (),
) -> GenerationRequest:
    """/imagine: its options (the strictest layer), then `layers` (flags, preset, member settings), then the
    server's `defaults`, then the built-in defaults."""
    options = _options(
        model,
        negative_prompt,
        advanced,
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance=guidance,
        seed=seed,
        scheduler=scheduler,
        lora=lora,
        lora_strength=lora_strength,
        style=style,
    )
    return build_request(
        flavour=flavour,
        kind="text2img",
        default_model=default_model,
        prompt=prompt,
        layers=[options, *layers, (defaults or ServerDefaults()).layer("text2img")],
        safety_checker=safety_checker,
        allowed_models=allowed_models,
    )


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
    scheduler: str | None = None,
    lora: str | None = None,
    lora_strength: str | None = None,
    safety_checker: bool = True,
    defaults: ServerDefaults | None = None,
    advanced: Mapping[str, ParameterValue] | None = None,
    layers: Sequence[Layer] = (),
    allowed_models: Sequence[str] = (),
) -> GenerationRequest:
    """/remix and the Remix form: /imagine's rules for image to image, plus `strength`."""
    if strength is None:
        strength = DEFAULT_STRENGTH
    if not math.isfinite(strength) or not 0 <= strength <= 1:
        raise InvalidOption(
            "strength", f"must be from 0 to 1 (you gave {strength:g}): 0 keeps the image, 1 ignores it."
        )
    options = _options(
        model,
        negative_prompt,
        advanced,
        samples=samples,
        steps=steps,
        guidance=guidance,
        seed=seed,
        scheduler=scheduler,
        lora=lora,
        lora_strength=lora_strength,
    )
    request = build_request(
        flavour=flavour,
        kind="img2img",
        default_model=default_model,
        prompt=prompt,
        layers=[options, *layers, (defaults or ServerDefaults()).layer("img2img")],
        safety_checker=safety_checker,
        allowed_models=allowed_models,
    )
    return replace(request, strength=strength, source_url=source_url)
