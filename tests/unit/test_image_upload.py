"""Result images go to Discord from their own bytes (`ImageUpload`), through the real discord.py and aiohttp: every
attempt carries the whole image byte for byte, however large, and a retried upload sends it all again."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import discord
import pytest
from aiohttp import web

from bot.discord.presenter import ImageUpload, ImageUploadPayload

WEBHOOK_ID = 123456789012345678


class UploadTarget:
    """A webhook endpoint that records each upload's file parts; the first `fail` uploads are answered 500."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.uploads: list[dict[str, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        files = {}
        async for part in await request.multipart():
            assert isinstance(part, aiohttp.BodyPartReader)
            if part.filename:
                files[part.filename] = bytes(await part.read())
        self.uploads.append(files)
        if len(self.uploads) <= self.fail:
            return as_json({"message": "500: fake failure", "code": 0}, status=500)
        return as_json(message_payload(files))


def as_json(body: dict[str, object], status: int = 200) -> web.Response:
    # discord.py reads a body as JSON only under exactly this content type, as Discord sends it
    return web.Response(body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


def message_payload(files: dict[str, bytes]) -> dict[str, object]:
    return {
        "id": "223456789012345678",
        "channel_id": "323456789012345678",
        "type": 0,
        "content": "",
        "author": {"id": str(WEBHOOK_ID), "username": "hook", "discriminator": "0000", "avatar": None},
        "attachments": [
            {
                "id": str(400000000000000000 + i),
                "filename": name,
                "size": len(data),
                "url": "https://cdn/x",
                "proxy_url": "https://media/x",
            }
            for i, (name, data) in enumerate(files.items())
        ],
        "embeds": [],
        "mentions": [],
        "mention_roles": [],
        "pinned": False,
        "mention_everyone": False,
        "tts": False,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "flags": 0,
        "components": [],
        "webhook_id": str(WEBHOOK_ID),
    }


@pytest.fixture
async def webhook_at(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[[UploadTarget], Awaitable[discord.Webhook]]]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(target: UploadTarget) -> discord.Webhook:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(f"/api/v10/webhooks/{WEBHOOK_ID}/{{token}}", target.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
        session = aiohttp.ClientSession()
        sessions.append(session)
        return discord.Webhook.partial(WEBHOOK_ID, "token", session=session)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def test_an_image_larger_than_a_slice_arrives_whole(webhook_at):
    image = os.urandom(ImageUploadPayload.CHUNK * 2 + 12345)  # three slices, the last one short
    small = os.urandom(1000)
    target = UploadTarget()
    webhook = await webhook_at(target)
    await webhook.send(
        files=[discord.File(ImageUpload(image), "big.png"), discord.File(ImageUpload(small), "small.png")], wait=True
    )
    assert target.uploads == [{"big.png": image, "small.png": small}]


async def test_an_upload_discord_py_tries_again_sends_the_whole_image_again(webhook_at):
    image = os.urandom(300_000)
    target = UploadTarget(fail=1)
    webhook = await webhook_at(target)
    message = await webhook.send(file=discord.File(ImageUpload(image), "retried.png"), wait=True)
    assert target.uploads == [{"retried.png": image}] * 2  # a 500, then taken
    assert [a.filename for a in message.attachments] == ["retried.png"]


def test_an_image_upload_is_an_ordinary_file_sharing_the_images_bytes():
    image = os.urandom(5000)
    upload = ImageUpload(image)
    assert upload.data is image
    assert upload.read(10) == image[:10] and upload.read() == image[10:]
    upload.seek(0)
    assert discord.File(upload, "a.png").fp.read() == image
