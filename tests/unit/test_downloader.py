"""Downloaded results are checked before they are posted: small plain PNGs on the event loop, the rest in a thread,
and a damaged image is never returned either way."""

from __future__ import annotations

import io
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from PIL import Image, ImageCms, PngImagePlugin

from bot.images.downloader import INLINE_CHECK_BYTES, DownloadFailed, ImageDownloader, cheap_to_check


def png(size=(64, 64), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "PNG", **options)
    return buffer.getvalue()


def text_chunk(compressed: bool) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 1000, zip=compressed)
    return info


def test_a_small_plain_png_is_cheap_to_check():
    assert cheap_to_check(png())
    assert cheap_to_check(png(pnginfo=text_chunk(compressed=False)))  # plain text is read as it is


@pytest.mark.parametrize(
    "data",
    [
        png(pnginfo=text_chunk(compressed=True)),  # a zTXt chunk: inflated when the file is opened
        png(icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),  # iCCP: inflated too
        png()[:40],  # cut before its image data
        b"\x89PNG\r\n\x1a\n" + zlib.compress(b"x" * 100),  # no chunks at all
    ],
    ids=["ztxt", "iccp", "cut", "garbage"],
)
def test_a_png_that_pillow_would_inflate_or_cannot_read_goes_to_a_thread(data: bytes):
    assert not cheap_to_check(data)


def test_other_formats_and_big_pngs_go_to_a_thread():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "JPEG")
    assert not cheap_to_check(buffer.getvalue())
    big = png((1200, 1200), compress_level=0)
    assert len(big) > INLINE_CHECK_BYTES and not cheap_to_check(big)


@pytest.fixture
async def served() -> AsyncIterator[tuple[dict[str, bytes], str]]:
    """A web server serving whatever bytes the test puts in the dict, at /<name>."""
    files: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=files[request.match_info["name"]], content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield files, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_damaged_small_png_is_never_returned_though_checked_on_the_loop(served):
    files, base = served
    good = png()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x01  # one bit of the compressed pixels
    files["good.png"], files["damaged.png"] = good, bytes(damaged)
    assert cheap_to_check(files["damaged.png"])
    async with aiohttp.ClientSession() as session:
        downloader = ImageDownloader(session, rounds=1)
        image = await downloader.download([f"{base}/good.png"])
        assert (image.data, image.format, image.width, image.height) == (good, "PNG", 64, 64)
        with pytest.raises(DownloadFailed):
            await downloader.download([f"{base}/damaged.png"])
