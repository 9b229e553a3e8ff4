"""Pillow work as plain bytes-in, bytes-out functions. They block: callers run them with `asyncio.to_thread`."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

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
    """Check that `data` is a real image (or a base64 text of one, as ModelsLab's `.base64` outputs are)."""
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
            image.load()  # decodes fully: truncated or corrupt files fail here
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, ValueError) as exc:
        raise NotAnImage(str(exc) or type(exc).__name__) from exc
    if fmt not in _EXTENSIONS:
        raise NotAnImage(f"unsupported image format {fmt or 'unknown'}")
    return ImageFile(data=data, format=fmt, width=width, height=height)


def _decode_base64(data: bytes) -> bytes | None:
    text = _DATA_URL.sub(b"", data, count=1).strip()
    if not text or len(text) > 64 * 1024 * 1024:
        return None
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def fit_to_limit(images: list[ImageFile], limit: int) -> list[ImageFile]:
    """Re-encode (WebP, then smaller) until every image is under `limit` bytes and all of them together are too.

    Discord refuses a message whose attachments exceed the upload limit it announced for the interaction.
    """
    if sum(len(i.data) for i in images) <= limit:
        return images
    share = limit // max(len(images), 1)
    return [image if len(image.data) <= share else _shrink(image, share) for image in images]


def _shrink(image: ImageFile, budget: int) -> ImageFile:
    with Image.open(io.BytesIO(image.data)) as opened:
        picture = opened.convert("RGB")
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


# ---------------------------------------------------------------------------------------------- input images

MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000  # refused before decoding: a small file can claim a huge canvas (decompression bomb)
MIN_INPUT_SIDE = 64
MAX_INPUT_SIDE = 1024
INPUT_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "MPO"}  # MPO: what some phones call their JPEGs


class BadImage(ValueError):
    """An input image the bot will not send; the message names the problem for the member."""


def normalise_input(data: bytes) -> ImageFile:
    """Check a member's image and make it what ModelsLab expects: upright (EXIF), RGB, longest side at most
    1024, both sides multiples of 8, as PNG. Raises `BadImage` with a plain reason."""
    from PIL import ImageOps

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
            picture = ImageOps.exif_transpose(opened)
            if picture.mode in ("RGBA", "LA", "P"):
                rgba = picture.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.getchannel("A"))
                picture = background
            else:
                picture = picture.convert("RGB")
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, ValueError) as exc:
        raise BadImage("the file is not an image that can be read (it may be damaged or in another format)") from exc
    if min(picture.size) < MIN_INPUT_SIDE:
        raise BadImage(
            f"the image is too small ({picture.width}×{picture.height}; at least {MIN_INPUT_SIDE} px a side)"
        )
    scale = min(1.0, MAX_INPUT_SIDE / max(picture.size))
    width = max(MIN_INPUT_SIDE, int(picture.width * scale) // 8 * 8)
    height = max(MIN_INPUT_SIDE, int(picture.height * scale) // 8 * 8)
    if (width, height) != picture.size:
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return ImageFile(data=buffer.getvalue(), format="PNG", width=width, height=height)
