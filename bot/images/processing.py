"""Pillow work as plain bytes-in, bytes-out functions. They block: callers run them with `asyncio.to_thread`, or
`normalise_input_in_turn` for members' pictures, whose decodes take turns in a thread of their own."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Decompression bombs: refuse anything larger than this many pixels before decoding it.
MAX_PIXELS = 64 * 1024 * 1024
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
_DATA_URL = re.compile(rb"^\s*data:image/[a-z0-9.+-]+;base64,", re.I)


class NotAnImage(ValueError):
    """The bytes are not an image we can read."""


@dataclass(frozen=True)
class ImageFile:
    """An image ready to upload: its bytes, format and pixel size."""

    data: bytes
    format: str  # PNG, JPEG, WEBP
    width: int
    height: int

    @property
    def extension(self) -> str:
        return _EXTENSIONS.get(self.format, "png")

    @property
    def size_text(self) -> str:
        return f"{self.width}×{self.height}"


def read_image(data: bytes) -> ImageFile:
    """Check that `data` is a real image (or a base64 text of one, as ModelsLab's `.base64` outputs are), cheaply:
    see `_check_integrity`."""
    try:
        return _read_raw(data)
    except NotAnImage:
        decoded = _decode_base64(data)
        if decoded is None:
            raise
        return _read_raw(decoded)


def _read_raw(data: bytes) -> ImageFile:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise NotAnImage(f"image too large: {image.width}×{image.height}")
            fmt = image.format or ""
            width, height = image.size
            if fmt in _EXTENSIONS:
                _check_integrity(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, ValueError) as exc:
        raise NotAnImage(str(exc) or type(exc).__name__) from exc
    if fmt not in _EXTENSIONS:
        raise NotAnImage(f"unsupported image format {fmt or 'unknown'}")
    return ImageFile(data=data, format=fmt, width=width, height=height)


def _check_integrity(image: Image.Image) -> None:
    """Raise if the file is damaged, without decoding it in full where the format allows.

    PNG: `verify()` reads every chunk to IEND and checks each one's CRC-32, so a truncated file or any changed
    byte is caught; only a stream damaged on purpose and given fresh CRCs would pass (and fail when re-encoded).
    JPEG has no checksums: it is decoded at 1/8 of its size (`draft`), which still reads every byte of the
    compressed data through the same decoder, so it fails exactly where a full decode fails. WebP and GIF carry
    no checksums and cannot be decoded smaller: they are decoded in full.
    """
    if image.format == "PNG":
        image.verify()
    elif image.format == "JPEG":
        image.draft(None, (max(image.width // 8, 1), max(image.height // 8, 1)))
        image.load()
    else:
        image.load()


def _decode_base64(data: bytes) -> bytes | None:
    text = _DATA_URL.sub(b"", data, count=1).strip()
    if not text or len(text) > 64 * 1024 * 1024:
        return None
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def fits(images: Sequence[ImageFile], limit: int) -> bool:
    """Whether Discord takes these images as they are (together at most `limit` bytes): then `fit_to_limit` has
    nothing to do, and needs no thread."""
    return sum(len(image.data) for image in images) <= limit


def fit_to_limit(images: list[ImageFile], limit: int) -> list[ImageFile]:
    """Re-encode (WebP, then smaller) until every image is under `limit` bytes and all of them together are too.

    Discord refuses a message whose attachments exceed the upload limit it announced for the interaction. An image
    that turns out not to decode (damage the cheap check of `read_image` cannot see) is left out.
    """
    if fits(images, limit):
        return images
    share = limit // max(len(images), 1)
    fitted = []
    for image in images:
        if len(image.data) <= share:
            fitted.append(image)
            continue
        try:
            fitted.append(_shrink(image, share))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            log.warning("A result image could not be decoded to make it smaller (%s); it is left out", exc)
    return fitted


def _shrink(image: ImageFile, budget: int) -> ImageFile:
    with Image.open(io.BytesIO(image.data)) as opened:
        picture = to_rgb(opened)
    scale = 1.0
    quality = 90
    while True:
        if scale < 1.0:
            size = (max(int(picture.width * scale), 64), max(int(picture.height * scale), 64))
            resized = picture.resize(size, Image.Resampling.LANCZOS)
        else:
            resized = picture
        buffer = io.BytesIO()
        resized.save(buffer, format="WEBP", quality=quality, method=4)
        data = buffer.getvalue()
        if len(data) <= budget or (resized.width <= 64 and resized.height <= 64):
            return ImageFile(data=data, format="WEBP", width=resized.width, height=resized.height)
        if quality > 70:
            quality -= 10
        else:
            scale *= 0.75


# ---------------------------------------------------------------------------------------------- pixels as seen

BACKGROUND = (255, 255, 255)  # what transparent parts of a picture become
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # one 16-bit grey channel ("I" as PNG gives it)
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


@functools.cache
def _sixteen_to_eight_bits() -> list[int]:
    """0-65535 to 0-255, rounded (65535 is white); Pillow's own conversion clips instead, so grey becomes white."""
    return [(value * 255 + 32767) // 65535 for value in range(65536)]


@functools.lru_cache(maxsize=4)
def _opaque_but(transparent: int) -> list[int]:
    """The alpha of 16-bit grey whose one value `transparent` is see-through (a PNG's tRNS)."""
    return [0 if value == transparent else 255 for value in range(65536)]


def to_rgb(picture: Image.Image) -> Image.Image:
    """The picture as a viewer shows it, in RGB: transparent parts (an alpha channel, or the one colour or palette
    entries a PNG or GIF marks transparent) on a white background, 16-bit grey scaled to 8 bits. "F" is taken as
    Pillow takes it (0-255); CMYK, YCbCr, LAB and HSV by Pillow's conversions."""
    transparency = picture.info.get("transparency")
    if picture.mode in _SIXTEEN_BIT:
        wide = picture if picture.mode == "I" else picture.convert("I")
        grey = wide.point(_sixteen_to_eight_bits(), "L")
        if not isinstance(transparency, int):
            return grey.convert("RGB")
        alpha = wide.point(_opaque_but(transparency), "L")
        return _on_background(grey.convert("RGB"), alpha)
    if picture.mode == "La":
        picture = picture.convert("LA")
    if picture.mode in _WITH_ALPHA or transparency is not None:
        rgba = picture.convert("RGBA")
        return _on_background(rgba.convert("RGB"), rgba.getchannel("A"))
    return picture.convert("RGB")


def _on_background(picture: Image.Image, alpha: Image.Image) -> Image.Image:
    background = Image.new("RGB", picture.size, BACKGROUND)
    background.paste(picture, mask=alpha)
    return background


# ---------------------------------------------------------------------------------------------- input images

MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000  # refused before decoding: a small file can claim a huge canvas (decompression bomb)
MIN_INPUT_SIDE = 64
MAX_INPUT_SIDE = 1024
INPUT_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "MPO"}  # MPO: what some phones call their JPEGs
# A 40-megapixel picture takes up to 160 MB while decoded (Pillow keeps RGB in 4 bytes a pixel): members' pictures
# are decoded one at a time, in this thread, whatever the number of remixes at once.
MAX_DECODES_AT_ONCE = 1
_decoding = ThreadPoolExecutor(max_workers=MAX_DECODES_AT_ONCE, thread_name_prefix="picture-decode")
STRIP_PIXELS = 1 << 20  # a huge picture is converted and reduced a strip of about this many pixels at a time
# EXIF orientation -> what turns the picture upright (as ImageOps.exif_transpose does)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDEWAYS = {
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
}


class BadImage(ValueError):
    """An input image the bot will not send; the message names the problem for the member."""


async def normalise_input_in_turn(data: bytes) -> ImageFile:
    """`normalise_input` off the event loop, in the decoding thread: decodes wait their turn there, so four huge
    pictures at once cost one picture's memory, and the shared thread pool stays free for everything else."""
    return await asyncio.get_running_loop().run_in_executor(_decoding, normalise_input, data)


def normalise_input(data: bytes) -> ImageFile:
    """Check a member's image and make it what ModelsLab expects: upright (EXIF), RGB, longest side at most
    1024, both sides multiples of 8, as PNG. Raises `BadImage` with a plain reason.

    A big picture is never held at full size more than once: a JPEG is decoded already reduced (`draft`: 1/2,
    1/4 or 1/8), other formats are decoded, then converted and reduced by whole factors a strip at a time
    (`reduce`), and only the result, at most twice the target each way, is resized, turned upright and encoded.
    """
    if len(data) > MAX_INPUT_BYTES:
        raise BadImage(f"the image is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in INPUT_FORMATS:
                raise BadImage(f"{opened.format or 'this'} images are not supported: use PNG, JPEG or WebP")
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise BadImage(f"the image has too many pixels ({opened.width}×{opened.height})")
            if getattr(opened, "n_frames", 1) > 1:
                opened.seek(0)  # GIF and animated WebP: the first frame
            turn = _UPRIGHT.get(opened.getexif().get(ExifTags.Base.Orientation, 1))
            sideways = turn in _SIDEWAYS
            upright = (opened.height, opened.width) if sideways else opened.size
            if min(upright) < MIN_INPUT_SIDE:
                raise BadImage(
                    f"the image is too small ({upright[0]}×{upright[1]}; at least {MIN_INPUT_SIDE} px a side)"
                )
            width, height = _input_size(*upright)
            stored = (height, width) if sideways else (width, height)  # the target, as the file stores it
            if opened.format in ("JPEG", "MPO"):
                opened.draft(None, stored)
            opened.load()
            picture = _reduced_rgb(opened, stored)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, ValueError) as exc:
        raise BadImage("the file is not an image that can be read (it may be damaged or in another format)") from exc
    if picture.size != stored:
        picture = picture.resize(stored, Image.Resampling.LANCZOS)
    if turn is not None:
        picture = picture.transpose(turn)
    picture.info.clear()  # no colour profile or transparency of the original: these are plain RGB pixels now
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return ImageFile(data=buffer.getvalue(), format="PNG", width=width, height=height)


def _input_size(width: int, height: int) -> tuple[int, int]:
    """Longest side at most 1024, both sides multiples of 8 (and at least 64)."""
    scale = min(1.0, MAX_INPUT_SIDE / max(width, height))
    return max(MIN_INPUT_SIDE, int(width * scale) // 8 * 8), max(MIN_INPUT_SIDE, int(height * scale) // 8 * 8)


def _reduced_rgb(picture: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`to_rgb(picture)`, reduced by the largest whole factors (across, down) that keep it at least `target` (box
    averages of the colours as seen, transparency already on white), a strip at a time: never a second full-size
    copy."""
    across, down = max(1, picture.width // target[0]), max(1, picture.height // target[1])
    if across == down == 1:
        return to_rgb(picture)  # at most twice the target each way: small
    reduced = Image.new("RGB", (math.ceil(picture.width / across), math.ceil(picture.height / down)))
    rows = max(1, STRIP_PIXELS // (picture.width * down)) * down
    for top in range(0, picture.height, rows):
        strip = picture.crop((0, top, picture.width, min(top + rows, picture.height)))
        reduced.paste(to_rgb(strip).reduce((across, down)), (0, top // down))
    return reduced
