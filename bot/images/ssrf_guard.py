"""Where the bot may download result images from: the SSRF rules.

A result URL comes from ModelsLab's answer, or from a webhook body that anyone who learns the URL can
forge, so it is never trusted to point somewhere safe. Allowed: the host of `MODELSLAB_BASE_URL` and
the hosts in `DOWNLOAD_ALLOWED_HOSTS`, each with the scheme it is configured with (plain http
included); anything else only over https and only to public addresses. The address check is made
by the connection's own DNS resolver (`GuardedResolver`), so the address checked is the address
connected to: a name cannot resolve to a public address for the check and a private one for the
connection. Redirects are followed by hand, each hop checked again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL


class DownloadRefused(Exception):
    """The URL is not one the bot downloads from; the message says why (for the log)."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int | None  # None: the scheme's default


def origin_of(url: str) -> Origin:
    parsed = URL(url)
    if not parsed.scheme or not parsed.host:
        raise ValueError(f"not a URL with a scheme and host: {url!r}")
    return Origin(parsed.scheme.lower(), parsed.host.lower(), parsed.explicit_port)


def parse_allowed_hosts(text: str) -> tuple[Origin, ...]:
    """`DOWNLOAD_ALLOWED_HOSTS`: a comma list of `https://cdn.example.com`, `http://10.0.0.5:9000` or a bare
    host (https only)."""
    origins = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        origins.append(origin_of(item if "://" in item else f"https://{item}"))
    return tuple(origins)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class DownloadPolicy:
    def __init__(self, trusted: Iterable[Origin], *, strict: bool = False) -> None:
        """`trusted`: origins allowed with their scheme and any address. `strict`: nothing else at all."""
        self.trusted = tuple(trusted)
        self.trusted_hosts = frozenset(origin.host for origin in self.trusted)
        self.strict = strict

    def check(self, url: str) -> None:
        """Raise `DownloadRefused` unless the bot may fetch this URL (before any connection is made)."""
        try:
            parsed = URL(url)
        except ValueError:
            raise DownloadRefused("not a URL") from None
        scheme = (parsed.scheme or "").lower()
        host = (parsed.host or "").lower()
        if scheme not in ("http", "https") or not host:
            raise DownloadRefused(f"only http(s) URLs are fetched, not {scheme or 'this'}")
        for origin in self.trusted:
            if (scheme, host) == (origin.scheme, origin.host) and origin.port in (None, parsed.explicit_port):
                return
        if self.strict:
            raise DownloadRefused(f"{host} is not one of the hosts this may come from")
        if scheme != "https":
            raise DownloadRefused(f"{host} is not a configured host, so only https is allowed")
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: its addresses are checked when it is resolved (GuardedResolver)
        if not is_public(str(literal)):
            raise DownloadRefused(f"{host} is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses any non-public address for untrusted hosts."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._policy.trusted_hosts:
            return results
        refused = [r["host"] for r in results if not is_public(r["host"])]
        if refused:
            raise OSError(f"{host} resolves to a non-public address; not fetched")
        return results

    async def close(self) -> None:
        await self._inner.close()


DISCORD_MEDIA_HOSTS = ("cdn.discordapp.com", "media.discordapp.net", "images-ext-1.discordapp.net")


def discord_media_policy(api_base: str) -> DownloadPolicy:
    """Input pictures are read only from Discord itself: its CDN and media proxy over https, and the configured
    Discord API host (a proxy, or a test server) with its scheme."""
    return DownloadPolicy(
        (*(Origin("https", host, None) for host in DISCORD_MEDIA_HOSTS), origin_of(api_base)), strict=True
    )
