"""ModelsLab's public model list, cached, for the `model` option's autocomplete.

Autocomplete must answer within Discord's 3 seconds, so a lookup never waits long for ModelsLab:
it answers from the cache, refreshing it in the background when it is old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from bot.modelslab.client import ModelsLabClient

log = logging.getLogger(__name__)

CACHE_SECONDS = 3600.0
FIRST_LOAD_WAIT = 1.5  # seconds an autocomplete may wait for the very first list
MAX_CHOICES = 25  # Discord's limit


class ModelCatalog:
    def __init__(self, client: ModelsLabClient, *, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock
        self._models: list[str] = []
        self._loaded_at: float | None = None
        self._refresh: asyncio.Task[None] | None = None

    async def suggestions(self, typed: str, api_key: str | None, allowed: tuple[str, ...] = ()) -> list[str]:
        """Model ids matching what the member typed: the server's allowed models, else the public list."""
        if allowed:
            return _matching(allowed, typed)
        if api_key is not None and (self._loaded_at is None or self._clock() - self._loaded_at > CACHE_SECONDS):
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._load(api_key), name="model-list")
            if self._loaded_at is None:
                await asyncio.wait({self._refresh}, timeout=FIRST_LOAD_WAIT)
        return _matching(self._models, typed)

    async def _load(self, api_key: str) -> None:
        models = await self._client.model_list(api_key)
        if models:
            self._models = models
            self._loaded_at = self._clock()
            log.info("Loaded %d public ModelsLab models", len(models))


def _matching(models: tuple[str, ...] | list[str], typed: str) -> list[str]:
    typed = typed.strip().lower()
    starts = [m for m in models if m.lower().startswith(typed)]
    contains = [m for m in models if typed in m.lower() and m not in starts]
    return (starts + contains)[:MAX_CHOICES]


def read_model_list(raw: bytes) -> list[str]:
    """`/api/v4/dreambooth/model_list` answers a bare JSON array of {model_id, model_name, status, ...}."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, list):
        return []
    ids = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("model_id"), str) and item["model_id"].strip():
            ids.append(item["model_id"].strip()[:100])
    return sorted(set(ids), key=str.lower)
