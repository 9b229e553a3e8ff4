"""Downloading result images from ModelsLab's CDN, with a size cap, a time cap and a real-image check."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence

import aiohttp
from yarl import URL

from bot.images.processing import ImageFile, NotAnImage, read_image
from bot.images.ssrf_guard import DownloadPolicy, DownloadRefused

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
MAX_REDIRECTS = 3
# A PNG this small, with nothing compressed before its pixels, is checked on the event loop: `read_image` then only
# reads its chunks' CRCs (about 0.2 ms for a 512x512 result), less than the hop to a thread and back costs.
INLINE_CHECK_BYTES = 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DECOMPRESSED_WHEN_OPENED = (b"zTXt", b"iTXt", b"iCCP")  # chunks Pillow inflates while opening a PNG


def _origin(url: str) -> str:
    """Scheme and host only, for logs (paths can carry tokens)."""
    try:
        parsed = URL(url)
    except ValueError:
        return "an invalid URL"
    return f"{parsed.scheme}://{parsed.host}"


def cheap_to_check(data: bytes) -> bool:
    """Whether `read_image` takes well under a millisecond on these bytes, so that it may run on the event loop: a
    PNG of at most `INLINE_CHECK_BYTES` whose chunks before the image data hold nothing Pillow inflates when it opens
    the file (a hostile text or ICC chunk could make it inflate tens of megabytes). Anything else goes to a thread."""
    if len(data) > INLINE_CHECK_BYTES or not data.startswith(_PNG_SIGNATURE):
        return False
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            return True
        if kind in _DECOMPRESSED_WHEN_OPENED:
            return False
        position += 12 + length  # length, type, data, CRC
    return False  # no image data: let the thread find out what is wrong


class DownloadFailed(Exception):
    """No candidate URL gave an image."""


class ImageDownloader:
    """Fetches one image from a list of candidate URLs (the output link, then its CDN copy).

    Freshly finished images sometimes 404 or serve an HTML page for a moment (ModelsLab's
    `future_links`, `.base64` files), so each round tries every URL, then waits and retries, doubling
    the wait: by default about half a minute in all before an image is given up.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        policy: DownloadPolicy | None = None,
        input_policy: DownloadPolicy | None = None,
        max_bytes: int = MAX_DOWNLOAD_BYTES,
        request_timeout: float = 30.0,
        rounds: int = 7,
        first_wait: float = 0.5,
    ) -> None:
        """`session` fetches (give it a `GuardedResolver`); `policy` says where result images may come from,
        `input_policy` where pictures to remix may come from (Discord's own hosts)."""
        self._session = session
        self._policy = policy
        self._input_policy = input_policy
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._rounds = rounds
        self._first_wait = first_wait

    async def download(self, candidates: Sequence[str]) -> ImageFile:
        wait = self._first_wait
        last_problem = "no URL"
        for attempt in range(self._rounds):
            for url in candidates:
                try:
                    data = await self._get(url, self._policy, self._max_bytes)
                    if cheap_to_check(data):
                        return read_image(data)
                    return await asyncio.to_thread(read_image, data)
                except (DownloadFailed, NotAnImage) as exc:
                    last_problem = str(exc)
            if attempt + 1 < self._rounds:
                await asyncio.sleep(wait)
                wait *= 2
        raise DownloadFailed(last_problem)

    async def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        """One try at a picture to remix (Discord's hosts only): its bytes, within `max_bytes`."""
        return await self._get(url, self._input_policy, max_bytes)

    async def _get(self, url: str, policy: DownloadPolicy | None, max_bytes: int) -> bytes:
        """Follow the URL by hand, checking the policy for it and for every redirect."""
        for _ in range(MAX_REDIRECTS + 1):
            if policy is not None:
                try:
                    policy.check(url)
                except DownloadRefused as exc:
                    log.warning("Not downloading from %s: %s", _origin(url), exc)
                    raise DownloadFailed(f"refused: {exc}") from None
            location = await self._read_or_redirect(url, max_bytes)
            if isinstance(location, bytes):
                return location
            url = location
        raise DownloadFailed("too many redirects")

    async def _read_or_redirect(self, url: str, max_bytes: int) -> bytes | str:
        try:
            async with self._session.get(url, timeout=self._timeout, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    return str(response.url.join(URL(response.headers["Location"])))
                return await self._body(response, max_bytes)
        except TimeoutError:
            raise DownloadFailed("download timed out") from None
        except aiohttp.ClientError as exc:
            raise DownloadFailed(f"{type(exc).__name__}: {exc}"[:200]) from None

    @staticmethod
    async def _body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
        if response.status != 200:
            raise DownloadFailed(f"HTTP {response.status}")
        if response.content_length is not None and response.content_length > max_bytes:
            raise DownloadFailed("image larger than the download cap")
        chunks = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise DownloadFailed("image larger than the download cap")
            chunks.append(chunk)
        return b"".join(chunks)
