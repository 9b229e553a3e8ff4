"""The ModelsLab parameters no slash command has room for, as the vendor pages document them.

Each one is reached by name as an inline flag (`--clip_skip 2`, `--panorama`), in a preset, or in a
member's `/settings`. Reading a value (`parse_value`) checks only what holds everywhere (a switch is
yes/no, `clip_skip` is 1-8); whether it may be sent depends on the API flavour, the model and the kind
of job (`refusal`): `flux` ignores several of them, some exist only on v6, some only for text to image.
A parameter the API would ignore is refused with a sentence saying why, never sent silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from bot.errors import InvalidOption
from bot.images.ssrf_guard import DownloadRefused, check_public_link

ParameterValue = bool | int | float | str
Kind = Literal["switch", "int", "float", "choice", "id", "url", "upscale"]

TEXT2IMG_ONLY = frozenset({"text2img"})
BOTH_JOBS = frozenset({"text2img", "img2img"})
BOTH_FLAVOURS = frozenset({"v6", "enterprise"})
V6_ONLY = frozenset({"v6"})
IP_ADAPTERS = (
    "ip-adapter_sdxl",
    "ip-adapter_sd15",
    "ip-adapter-plus-face_sd15",
    "ip-adapter-plus_sdxl_vit-h",
    "ip-adapter-plus-face_sdxl_vit-h",
)
SAFETY_CHECKER_TYPES = ("blur", "sensitive_content_text", "pixelate", "black")
ALGORITHM_TYPES = ("none", "dpmsolver+++")
URL_MAX = 500
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,99}$")
_URL = re.compile(r"^https?://[^\s/]+\S*$")


@dataclass(frozen=True)
class Parameter:
    name: str  # the API's name, also the flag (`--clip_skip`, or `--clip-skip`)
    kind: Kind
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    flavours: frozenset[str] = BOTH_FLAVOURS
    jobs: frozenset[str] = BOTH_JOBS
    flux_ignores: bool = False  # the vendor's list of what `model_id: "flux"` does not support
    flux_maximum: float | None = None


PARAMETERS: dict[str, Parameter] = {
    p.name: p
    for p in (
        Parameter("enhance_prompt", "switch", "let ModelsLab enrich the prompt", flux_ignores=True),
        Parameter("clip_skip", "int", "CLIP layers to skip", minimum=1, maximum=8, flux_maximum=4),
        Parameter("vae", "id", "a custom VAE model id"),
        Parameter("embeddings_model", "id", "an embeddings model id", jobs=TEXT2IMG_ONLY, flux_ignores=True),
        Parameter("panorama", "switch", "make a panorama", jobs=TEXT2IMG_ONLY),
        Parameter("self_attention", "switch", "higher quality, slower", jobs=TEXT2IMG_ONLY),
        Parameter("upscale", "upscale", "upscale the result", jobs=TEXT2IMG_ONLY, flux_ignores=True),
        Parameter("highres_fix", "switch", "high-resolution fix", jobs=TEXT2IMG_ONLY, flux_ignores=True),
        Parameter("tomesd", "switch", "ToMeSD, faster generation"),
        Parameter("use_karras_sigmas", "switch", "Karras sigmas"),
        Parameter("algorithm_type", "choice", "DPMSolverMultistepScheduler's algorithm", choices=ALGORITHM_TYPES),
        Parameter("safety_checker_type", "choice", "what the safety checker does", choices=SAFETY_CHECKER_TYPES),
        Parameter("multi_lingual", "switch", "prompts not in English", flavours=V6_ONLY, jobs=TEXT2IMG_ONLY),
        Parameter("ip_adapter_id", "choice", "IP adapter", choices=IP_ADAPTERS, flavours=V6_ONLY, flux_ignores=True),
        Parameter(
            "ip_adapter_scale", "float", "IP adapter scale", minimum=0, maximum=1, flavours=V6_ONLY, flux_ignores=True
        ),
        Parameter("ip_adapter_image", "url", "IP adapter image URL", flavours=V6_ONLY, flux_ignores=True),
        Parameter("temp", "switch", "temporary (24 h) result links"),
    )
}
_YES = {"yes", "y", "on", "true", "1"}
_NO = {"no", "n", "off", "false", "0"}


def canonical_name(text: str) -> str:
    """`--clip-skip` and `--clip_skip` are the same flag."""
    return text.strip().lower().replace("-", "_")


def parse_value(name: str, text: str) -> ParameterValue:
    """The value of parameter `name` typed as `text`, checked against what the vendor pages allow anywhere.

    An empty value turns a switch on (`--panorama` alone means yes)."""
    parameter = PARAMETERS[name]
    flag = f"--{name}"
    value = " ".join(text.split())
    lowered = value.lower()
    if parameter.kind == "upscale" and lowered in ("1", "2", "3"):
        return int(lowered)  # the v6 page's factors (1: none); "yes" is the others' way to say 2x
    if parameter.kind in ("switch", "upscale"):
        if not value or lowered in _YES:
            return True
        if lowered in _NO:
            return False
        extra = ", or 1, 2 or 3 (the factor, v6 API)" if parameter.kind == "upscale" else ""
        raise InvalidOption(flag, f"must be yes or no{extra} (you gave {value[:20]!r}).")
    if not value:
        raise InvalidOption(flag, f"needs a value, e.g. {example(name)}.")
    if parameter.kind == "int":
        low, high = parameter.minimum or 0, parameter.maximum or 0
        if not (value.isascii() and value.isdigit() and len(value) <= 6) or not low <= int(value) <= high:
            raise InvalidOption(flag, f"must be a whole number from {_range(parameter)} (you gave {value[:20]!r}).")
        return int(value)
    if parameter.kind == "float":
        try:
            number = float(value.replace(",", "."))
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or not parameter.minimum <= number <= parameter.maximum:  # type: ignore[operator]
            raise InvalidOption(flag, f"must be a number from {_range(parameter)} (you gave {value[:20]!r}).")
        return number
    if parameter.kind == "choice":
        if lowered not in parameter.choices:
            raise InvalidOption(flag, "must be one of " + ", ".join(parameter.choices) + ".")
        return lowered
    if parameter.kind == "id":
        if not _ID.match(value):
            raise InvalidOption(flag, "must be a ModelsLab model id: letters, digits, dots, dashes or underscores.")
        return value
    if len(value) > URL_MAX or not _URL.match(value):
        raise InvalidOption(flag, f"must be an https link to an image, at most {URL_MAX} characters.")
    problem = link_problem(value)
    if problem is not None:
        raise InvalidOption(flag, problem)
    return value


def link_problem(url: str) -> str | None:
    """ModelsLab fetches a link parameter on the server's account, so it is held to the download rules: https, a
    public host, no private, loopback or link-local address."""
    try:
        check_public_link(url)
    except DownloadRefused:
        return "must be an https link to a picture on a public site (not a local or private address)."
    return None


def refusal(name: str, value: ParameterValue, *, flavour: str, model_id: str, kind: str, flux: bool) -> str | None:
    """Why `name` cannot be sent with this flavour, model and kind of job, or None when it can."""
    parameter = PARAMETERS[name]
    if flux and parameter.flux_ignores:
        return "is ignored by the flux model: leave it out, or pick another model such as fluxdev."
    if flavour not in parameter.flavours:
        return "is not available on the enterprise API this bot uses."
    if kind not in parameter.jobs:
        return "works only when making an image from text (/imagine), not when remixing one."
    if flux and parameter.flux_maximum is not None and isinstance(value, int) and value > parameter.flux_maximum:
        return f"must be from {parameter.minimum:g} to {parameter.flux_maximum:g} for the flux model."
    if name == "upscale" and flavour == "enterprise" and not isinstance(value, bool):
        return "is yes or no on the enterprise API (1, 2 or 3 are v6 factors)."
    if parameter.kind == "url" and isinstance(value, str):
        return link_problem(value)  # a link saved in /settings or a preset before this rule is checked again
    return None


def payload_value(value: ParameterValue) -> ParameterValue:
    """As the vendor's examples send it: switches as "yes"/"no", numbers as numbers."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def shown(value: ParameterValue) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def example(name: str) -> str:
    parameter = PARAMETERS[name]
    sample = {
        "switch": "yes",
        "upscale": "yes",
        "int": f"{parameter.minimum:g}" if parameter.minimum is not None else "1",
        "float": "0.5",
        "choice": parameter.choices[-1] if parameter.choices else "",
        "id": "sd-vae-ft-mse" if name == "vae" else "an-embedding-id",
        "url": "https://example.com/face.png",
    }[parameter.kind]
    return f"--{name} {sample}"


def _range(parameter: Parameter) -> str:
    return f"{parameter.minimum:g} to {parameter.maximum:g}"
