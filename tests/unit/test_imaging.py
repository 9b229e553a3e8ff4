"""Pictures as a member sees them: every mode normalised to what a viewer shows, huge pictures at bounded memory,
and the cheap check of result images that never lets a broken file through."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from bot.images.processing import (
    MAX_INPUT_PIXELS,
    ImageFile,
    NotAnImage,
    fit_to_limit,
    fits,
    normalise_input,
    read_image,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[2]
RED, BLUE, WHITE, BLACK, GREY = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128)
SIZE = (64, 64)  # normalised as it is (already a multiple of 8, under 1024): the pixels compare exactly
LEFT, RIGHT = (8, 32), (56, 32)


def encode(picture: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(mode: str, left, right, size=SIZE) -> Image.Image:
    """A picture whose left half is one value and right half another, in `mode`."""
    picture = Image.new(mode, size, left)
    picture.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return picture


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, depth: int, colour_type: int, row: bytes, trns: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): every row the same, compressed as a stream, so
    even a huge canvas never exists in memory here."""
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(b"\x00" + row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def sixteen(*values: int) -> bytes:
    return b"".join(struct.pack(">H", v) for v in values)


def half_rows(left: bytes, right: bytes, width: int = SIZE[0]) -> bytes:
    return left * (width // 2) + right * (width // 2)


def seen(data: bytes) -> Image.Image:
    """The normalised picture, as ModelsLab gets it."""
    normalised = normalise_input(data)
    with Image.open(io.BytesIO(normalised.data)) as opened:
        assert opened.mode == "RGB" and opened.size == (normalised.width, normalised.height)
        return opened.copy()


def close(found, expected, tolerance: int) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(found, expected, strict=True))


def palette(*colours) -> Image.Image:
    picture = halves("P", 0, 1)
    picture.putpalette([channel for colour in colours for channel in colour])
    return picture


# ---------------------------------------------------------------------------------------------- modes


MODES = {
    # name: (file bytes, what the left half looks like, what the right half looks like, tolerance)
    "PNG 1": (encode(halves("1", 0, 1)), BLACK, WHITE, 0),
    "PNG 1, black transparent": (encode(halves("1", 0, 1), transparency=0), WHITE, WHITE, 0),
    "PNG L": (encode(halves("L", 40, 200)), (40,) * 3, (200,) * 3, 0),
    "PNG L, one grey transparent": (encode(halves("L", 40, 200), transparency=200), (40,) * 3, WHITE, 0),
    "PNG LA": (encode(halves("LA", (40, 255), (200, 0))), (40,) * 3, WHITE, 0),
    "PNG P": (encode(palette(RED, BLUE)), RED, BLUE, 0),
    "PNG P, one entry transparent": (encode(palette(RED, BLUE), transparency=1), RED, WHITE, 0),
    "PNG P, entries half transparent": (encode(palette(RED, BLUE), transparency=b"\xff\x80"), RED, (127, 127, 255), 1),
    "PNG RGB": (encode(halves("RGB", RED, BLUE)), RED, BLUE, 0),
    "PNG RGB, black transparent (tRNS)": (encode(halves("RGB", RED, BLACK), transparency=BLACK), RED, WHITE, 0),
    "PNG RGBA": (encode(halves("RGBA", (255, 0, 0, 128), (0, 0, 0, 0))), (255, 127, 127), WHITE, 1),
    "PNG 16-bit grey": (encode(halves("I;16", 0x8080, 0xFFFF)), GREY, WHITE, 0),
    "PNG 16-bit grey, dark": (encode(halves("I;16", 0, 0x1000)), BLACK, (16,) * 3, 0),
    "PNG 16-bit grey, one value transparent": (encode(halves("I;16", 0x8080, 7), transparency=7), GREY, WHITE, 0),
    "PNG 16-bit RGB": (
        raw_png(*SIZE, 16, 2, half_rows(sixteen(0xFFFF, 0, 0), sixteen(0x8080, 0x8080, 0x8080))),
        RED,
        GREY,
        0,
    ),
    "PNG 16-bit RGBA": (
        raw_png(*SIZE, 16, 6, half_rows(sixteen(0, 0, 0xFFFF, 0xFFFF), sixteen(0, 0, 0, 0))),
        BLUE,
        WHITE,
        0,
    ),
    "PNG 16-bit grey and alpha": (
        raw_png(*SIZE, 16, 4, half_rows(sixteen(0x8080, 0xFFFF), sixteen(0, 0))),
        GREY,
        WHITE,
        0,
    ),
    "PNG 2-bit grey": (raw_png(*SIZE, 2, 0, bytes([0b01010101]) * 8 + bytes([0xFF]) * 8), (85,) * 3, WHITE, 0),
    "JPEG L": (encode(halves("L", 40, 200), "JPEG", quality=95), (40,) * 3, (200,) * 3, 4),
    "JPEG RGB": (encode(halves("RGB", RED, BLUE), "JPEG", quality=95), RED, BLUE, 8),
    "JPEG CMYK": (encode(halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)), "JPEG", quality=95), RED, BLUE, 8),
    "WebP RGB": (encode(halves("RGB", RED, BLUE), "WEBP", lossless=True), RED, BLUE, 0),
    "WebP RGBA": (encode(halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)), "WEBP", lossless=True), RED, WHITE, 0),
    "GIF, one entry transparent": (encode(palette(RED, BLUE), "GIF", transparency=1), RED, WHITE, 0),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_is_normalised_to_what_a_viewer_shows(name):
    """Before: 16-bit grey became white, and a transparent colour (tRNS) kept its colour (black) where an alpha
    channel became white."""
    data, left, right, tolerance = MODES[name]
    picture = seen(data)
    assert picture.size == SIZE
    assert close(picture.getpixel(LEFT), left, tolerance), picture.getpixel(LEFT)
    assert close(picture.getpixel(RIGHT), right, tolerance), picture.getpixel(RIGHT)


IN_MEMORY = {
    # Modes no accepted format stores, as Pillow gives them: the same rules.
    "I (16-bit range)": (halves("I", 0x8080, 0xFFFF), GREY, WHITE),
    "F (0-255)": (halves("F", 128.0, 255.0), GREY, WHITE),
    "YCbCr": (halves("RGB", RED, BLUE).convert("YCbCr"), RED, BLUE),
    "HSV": (halves("HSV", (0, 255, 255), (170, 255, 255)), RED, BLUE),
    "RGBX": (halves("RGBX", (255, 0, 0, 0), (0, 0, 255, 0)), RED, BLUE),
    "RGBa": (halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)).convert("RGBa"), RED, WHITE),
    "La": (halves("LA", (128, 255), (0, 0)).convert("La"), GREY, WHITE),
    "PA": (halves("PA", (0, 255), (1, 0)), BLACK, WHITE),
}


@pytest.mark.parametrize("name", IN_MEMORY)
def test_modes_pillow_gives_in_memory_follow_the_same_rules(name):
    picture, left, right = IN_MEMORY[name]
    rgb = to_rgb(picture)
    assert rgb.mode == "RGB"
    assert close(rgb.getpixel(LEFT), left, 2) and close(rgb.getpixel(RIGHT), right, 2), (
        rgb.getpixel(LEFT),
        rgb.getpixel(RIGHT),
    )


# ---------------------------------------------------------------------------------------------- huge pictures


def photo(size: tuple[int, int]) -> Image.Image:
    """Smooth gradients with grain, like a photo."""
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    blue = Image.linear_gradient("L").rotate(90).resize(size)
    grain = Image.effect_noise(size, 12)
    return Image.merge("RGB", [ImageChops.add(c, grain, 1, -128) for c in (red, green, blue)])


@pytest.mark.parametrize(
    ("fmt", "options"), [("JPEG", {"quality": 90}), ("PNG", {"compress_level": 1}), ("WEBP", {"quality": 90})]
)
def test_a_big_picture_is_reduced_while_decoding_and_looks_as_resized_in_full(fmt, options):
    original = photo((3000, 2000))
    normalised = seen(encode(original, fmt, **options))
    assert normalised.size == (1024, 680)
    reference = original.resize((1024, 680), Image.Resampling.LANCZOS)
    difference = ImageStat.Stat(ImageChops.difference(normalised, reference)).mean
    assert max(difference) < 4, difference  # of 255: the same picture


def test_a_big_transparent_picture_is_reduced_strip_by_strip_on_white():
    picture = halves("RGBA", (255, 0, 0, 255), (0, 0, 0, 0), size=(2600, 2080))
    normalised = seen(encode(picture))
    assert normalised.size == (1024, 816)
    assert normalised.getpixel((100, 400)) == RED and normalised.getpixel((900, 400)) == WHITE
    grey = halves("I;16", 0x8080, 7, size=(2600, 2080))
    normalised = seen(encode(grey, transparency=7))
    assert normalised.getpixel((100, 400)) == GREY and normalised.getpixel((900, 400)) == WHITE


def test_a_long_thin_picture_is_reduced_along_its_length_only():
    """Scaled to 1024 px long it would be 4 px wide, so it is made 64 px wide: it can be reduced while decoding
    along its length only."""
    normalised = seen(encode(Image.linear_gradient("L").resize((80, 20000))))
    assert normalised.size == (64, 1024)
    assert close(normalised.getpixel((32, 4)), BLACK, 10) and close(normalised.getpixel((32, 1019)), WHITE, 10)


def test_four_huge_pictures_at_once_cost_one_pictures_memory(tmp_path):
    """A 6320x6320 PNG of a few hundred kB passes the 40-megapixel check. Before: each remix decoded and copied
    it several times at full size, four at once (each in its own thread) peaked at 1.7 GB; now decodes take
    turns in one thread and are reduced strip by strip. Measured in a process of its own (its peak resident
    size, as the operator's `top` would show it)."""
    side = 6320
    assert side * side <= MAX_INPUT_PIXELS
    path = tmp_path / "huge.png"
    path.write_bytes(raw_png(side, side, 8, 2, bytes([30, 90, 160]) * side))
    script = f"""
import asyncio, pathlib
from bot.images.processing import normalise_input_in_turn
data = pathlib.Path({str(path)!r}).read_bytes()
async def remixes():
    return await asyncio.gather(*(normalise_input_in_turn(data) for _ in range(4)))
done = asyncio.run(remixes())
peak = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
print(int(peak.split()[1]) // 1024, *{{(i.width, i.height, i.data[:8]) for i in done}})
"""
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    peak_mb, *rest = found.stdout.split(maxsplit=1)
    assert rest == ["(1024, 1024, b'\\x89PNG\\r\\n\\x1a\\n')\n"]
    assert int(peak_mb) < 300, f"peak resident size {peak_mb} MB"


# ---------------------------------------------------------------------------------------------- result checks


SMALL = photo((96, 64))
RESULTS = {
    "PNG": encode(SMALL, "PNG"),
    "JPEG": encode(SMALL, "JPEG", quality=90),
    "WEBP": encode(SMALL, "WEBP", quality=90),
}


def decodes_in_full(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def passes_check(data: bytes) -> bool:
    try:
        read_image(data)
    except NotAnImage:
        return False
    return True


def compressed_part(fmt: str, data: bytes) -> tuple[int, int]:
    """Where the compressed pixels are: PNG's IDAT data, JPEG's scan, WebP's VP8 data."""
    if fmt == "PNG":
        start = data.index(b"IDAT") + 4
        return start, start + struct.unpack(">I", data[start - 8 : start - 4])[0]
    if fmt == "JPEG":
        return data.index(b"\xff\xda") + 14, data.rindex(b"\xff\xd9")
    return data.index(b"VP8 ") + 18, len(data)


def damaged_versions(fmt: str, data: bytes) -> dict[str, bytes]:
    versions = {}
    for length in range(0, len(data), max(1, len(data) // 150)):
        versions[f"cut at {length}"] = data[:length]
    for position in range(0, len(data), max(1, len(data) // 300)):
        versions[f"byte {position} flipped"] = data[:position] + bytes([data[position] ^ 0x5A]) + data[position + 1 :]
    start, end = compressed_part(fmt, data)
    for offset in range(start, end - 16, max(1, (end - start) // 20)):
        versions[f"16 bytes from {offset} zeroed"] = data[:offset] + bytes(16) + data[offset + 16 :]
    return versions


@pytest.mark.parametrize("fmt", RESULTS)
def test_a_damaged_result_never_passes_the_check_unless_it_decodes_in_full(fmt):
    """The check no longer decodes PNG (CRCs) nor JPEG in full (decoded at 1/8): whatever the damage (a cut,
    a changed byte, a damaged compressed stream), an image it lets through decodes in full. A JPEG or WebP is
    refused exactly when a full decode fails (JPEG has no checksum: some damage only changes pixels)."""
    data = RESULTS[fmt]
    assert passes_check(data)
    refused = 0
    for what, damaged in damaged_versions(fmt, data).items():
        passed, decodes = passes_check(damaged), decodes_in_full(damaged)
        assert decodes or not passed, f"{fmt}, {what}: passed the check but does not decode"
        assert passed == decodes or fmt == "PNG", f"{fmt}, {what}: refused though it decodes"
        refused += not passed
    assert refused > 100


def test_every_cut_and_every_changed_byte_of_a_png_is_caught_by_its_checksums():
    data = RESULTS["PNG"]
    for what, damaged in damaged_versions("PNG", data).items():
        assert not passes_check(damaged), what


def test_what_the_cheap_check_cannot_see_is_left_out_when_the_image_must_be_re_encoded():
    """A PNG whose compressed stream was damaged and its CRC recomputed (on purpose: no accident does that) passes
    the check. It is posted as it is if it fits; if it must be made smaller, it is left out, not crashed on."""
    good = RESULTS["PNG"]
    start, end = compressed_part("PNG", good)
    damaged_stream = good[start:end][:20] + bytes(64) + good[start:end][84:]
    forged = good[: start - 8] + chunk(b"IDAT", damaged_stream) + good[end + 4 :]
    assert passes_check(forged) and not decodes_in_full(forged)
    images = [read_image(good), read_image(forged)]
    limit = len(good) + len(forged) - 1  # both must be made smaller
    fitted = fit_to_limit(images, limit)
    assert len(fitted) == 1 and fitted[0].format == "WEBP" and decodes_in_full(fitted[0].data)


def test_fits_says_when_there_is_nothing_to_re_encode():
    images = [read_image(RESULTS["PNG"]), read_image(RESULTS["JPEG"])]
    total = sum(len(i.data) for i in images)
    assert fits(images, total) and fit_to_limit(images, total) is images
    assert not fits(images, total - 1)
    assert fits([], 0)
    assert isinstance(images[0], ImageFile) and (images[0].width, images[0].height) == (96, 64)
