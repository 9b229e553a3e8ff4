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


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, for local use: never a public address
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated `::a.b.c.d`, still routed by some stacks


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 spelling carries, if any: IPv4-mapped, NAT64, 6to4, IPv4-compatible.

    Such an address reaches that IPv4 host (through the host's stack, a NAT64 gateway or a 6to4 relay), so it
    is judged by the IPv4 address's own class, not by the IPv6 prefix's."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(ip.packed[-4:])
    return None


def is_public(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        ip = embedded_ipv4(ip) or ip
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


# Top-level names that never lead to a public host: special-use names (RFC 6761, RFC 8375, RFC 7686) and
# the ones networks use internally by habit.
PRIVATE_NAME_SUFFIXES = frozenset(
    {"localhost", "local", "internal", "intranet", "lan", "home", "corp", "localdomain", "arpa", "onion", "test"}
    | {"invalid", "example"}
)


def check_public_link(url: str) -> None:
    """A link the bot hands on for someone else to fetch (ModelsLab fetches `--ip_adapter_image` on the server's
    account): only https, to a public host. No resolver of the bot's guards that fetch, so what can be judged
    from the link itself is refused here: literal addresses outside the public ranges (in any spelling the C
    library accepts: `127.1`, `2130706433`, `0x7f.0.0.1`), and names that can only be internal. Raises
    `DownloadRefused`."""
    DownloadPolicy(()).check(url)  # https, and a literal address must be a public one
    host = (URL(url).raw_host or "").lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return  # a literal address: judged above
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(host)
    except OSError:
        packed = None
    if packed is not None:
        if not is_public(str(ipaddress.IPv4Address(packed))):
            raise DownloadRefused(f"{host} is not a public address")
        return
    labels = host.split(".")
    if len(labels) < 2 or labels[-1] in PRIVATE_NAME_SUFFIXES or labels[-1].isdigit():
        raise DownloadRefused(f"{host} is not a public host name")


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
