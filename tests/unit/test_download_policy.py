"""The SSRF rules for downloads, and the resolver that enforces them at connection time."""

from __future__ import annotations

import pytest
from aiohttp import web

from bot.images.downloader import DownloadFailed, ImageDownloader
from bot.images.ssrf_guard import (
    DownloadPolicy,
    DownloadRefused,
    GuardedResolver,
    check_public_link,
    discord_media_policy,
    is_public,
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


@pytest.mark.parametrize(
    ("address", "carries"),
    [
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("64:ff9b::a9fe:a9fe", "NAT64 (RFC 6052)"),
        ("64:ff9b::7f00:1", "NAT64 to loopback"),
        ("64:ff9b::a00:5", "NAT64 to 10.0.0.5"),
        ("2002:a9fe:a9fe::1", "6to4"),
        ("2002:7f00:1::", "6to4 to loopback"),
        ("2002:c0a8:101::", "6to4 to 192.168.1.1"),
        ("::a9fe:a9fe", "IPv4-compatible"),
        ("::7f00:1", "IPv4-compatible loopback"),
        ("::a00:5", "IPv4-compatible 10.0.0.5"),
        ("64:ff9b:1::808:808", "NAT64 local-use prefix (RFC 8215): never public"),
    ],
)
def test_ipv6_spellings_of_private_ipv4_addresses_are_not_public(address, carries):
    assert not is_public(address), carries
    with pytest.raises(DownloadRefused, match="not a public address"):
        DownloadPolicy(()).check(f"https://[{address}]/x.png")


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"])
def test_ipv6_spellings_of_public_addresses_stay_public(address):
    assert is_public(address)
    DownloadPolicy(()).check(f"https://[{address}]/x.png")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",  # not https, and link-local
        "https://169.254.169.254/latest/meta-data",
        "https://[::ffff:a9fe:a9fe]/x.png",
        "https://[64:ff9b::a9fe:a9fe]/x.png",
        "https://127.1/x.png",  # spellings the C library reads as addresses
        "https://2130706433/x.png",
        "https://0x7f.0.0.1/x.png",
        "https://0251.0376.0251.0376/x.png",  # 169.254.169.254 in octal
        "https://localhost/x.png",
        "https://LOCALHOST./x.png",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://printer.local/x.png",
        "https://router.lan/x.png",
        "https://intranet/x.png",  # a single label: never a public name
        "http://example.com/x.png",
    ],
)
def test_links_handed_on_to_modelslab_must_be_https_to_a_public_host(url):
    with pytest.raises(DownloadRefused):
        check_public_link(url)


@pytest.mark.parametrize(
    "url", ["https://example.com/face.png", "https://cdn.discordapp.com/a/1/x.png", "https://8.8.8.8/x"]
)
def test_public_links_are_handed_on(url):
    check_public_link(url)


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
