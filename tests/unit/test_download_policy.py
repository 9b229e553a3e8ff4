"""The SSRF rules for downloads, and the resolver that enforces them at connection time."""

from __future__ import annotations

import pytest
from aiohttp import web

from bot.images.downloader import DownloadFailed, ImageDownloader
from bot.images.ssrf_guard import (
    DownloadPolicy,
    DownloadRefused,
    GuardedResolver,
    discord_media_policy,
    origin_of,
    parse_allowed_hosts,
)

POLICY = DownloadPolicy(
    (origin_of("http://modelslab.internal:8000"), *parse_allowed_hosts("http://10.0.0.5:9000,cdn.example.com"))
)


@pytest.mark.parametrize(
    "url",
    [
        "https://pub-123.r2.dev/generations/x.png",  # public https (the address is checked on resolving)
        "http://modelslab.internal:8000/generations/x.png",  # MODELSLAB_BASE_URL, with its scheme
        "http://10.0.0.5:9000/a.png",  # listed in DOWNLOAD_ALLOWED_HOSTS with http
        "https://cdn.example.com/a.png",  # listed bare: https
    ],
)
def test_allowed(url):
    POLICY.check(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://pub-123.r2.dev/x.png", "only https"),
        ("https://127.0.0.1/x.png", "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "not a public address"),
        ("https://[::1]/x.png", "not a public address"),
        ("https://10.0.0.5:9000/a.png", "not a public address"),  # listed with http only
        ("http://cdn.example.com/a.png", "only https"),
        ("file:///etc/passwd", "only http(s)"),
        ("ftp://example.com/x", "only http(s)"),
        ("http://modelslab.internal:9999/x.png", "only https"),  # another port of the configured host
    ],
)
def test_refused(url, why):
    with pytest.raises(DownloadRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        POLICY.check(url)


def test_pictures_to_remix_come_only_from_discord():
    policy = discord_media_policy("https://discord.com/api/v10")
    policy.check("https://cdn.discordapp.com/attachments/1/2/cat.png")
    policy.check("https://media.discordapp.net/external/abc/https/example.com/x.png")
    with pytest.raises(DownloadRefused):
        policy.check("https://example.com/x.png")


async def test_names_resolving_to_private_addresses_are_refused_when_connecting():
    resolver = GuardedResolver(DownloadPolicy(()))
    with pytest.raises(OSError, match="non-public address"):
        await resolver.resolve("localhost", 443)
    await resolver.close()


async def test_redirects_are_checked_hop_by_hop(aiohttp_unused_port=None):
    import aiohttp

    app = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    app.router.add_get("/x.png", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    policy = DownloadPolicy((origin_of(f"http://127.0.0.1:{port}"),))
    try:
        async with aiohttp.ClientSession() as session:
            downloader = ImageDownloader(session, policy=policy, rounds=1)
            with pytest.raises(DownloadFailed, match="refused"):
                await downloader.download([f"http://127.0.0.1:{port}/x.png"])
    finally:
        await runner.cleanup()
