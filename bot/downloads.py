"""Downloading result images from ModelsLab's CDN, with a size cap, a time cap and a real-image check."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp

from bot.imaging import ImageFile, NotAnImage, read_image

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024


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
        max_bytes: int = MAX_DOWNLOAD_BYTES,
        request_timeout: float = 30.0,
        rounds: int = 7,
        first_wait: float = 0.5,
    ) -> None:
        self._session = session
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
                    data = await self._get(url)
                    return await asyncio.to_thread(read_image, data)
                except (DownloadFailed, NotAnImage) as exc:
                    last_problem = str(exc)
            if attempt + 1 < self._rounds:
                await asyncio.sleep(wait)
                wait *= 2
        raise DownloadFailed(last_problem)

    async def fetch_bytes(self, url: str, max_bytes: int) -> bytes:
        """One try at a URL Discord gave the bot (an attachment): its bytes, within `max_bytes`."""
        saved = self._max_bytes
        self._max_bytes = max_bytes
        try:
            return await self._get(url)
        finally:
            self._max_bytes = saved

    async def _get(self, url: str) -> bytes:
        try:
            async with self._session.get(url, timeout=self._timeout) as response:
                if response.status != 200:
                    raise DownloadFailed(f"HTTP {response.status}")
                if response.content_length is not None and response.content_length > self._max_bytes:
                    raise DownloadFailed("image larger than the download cap")
                chunks = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise DownloadFailed("image larger than the download cap")
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError:
            raise DownloadFailed("download timed out") from None
        except aiohttp.ClientError as exc:
            raise DownloadFailed(type(exc).__name__) from None
