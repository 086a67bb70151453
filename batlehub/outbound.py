"""Where the hub may send requests: the outbound-URL policy for every upstream request.

The hub sends requests only to the configured upstreams (same scheme, host and port), whatever an
upstream's documents or redirects point at: nothing an upstream sends makes the hub reach another
service, nor tells a client whether one exists (see docs/security.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from yarl import URL


def failure_reason(exc: BaseException) -> str:
    """A short, host-free description of a failed HTTP exchange, for clients."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OutsideUpstreams):
        return "it points outside the configured upstreams"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection failed"
    return "bad response"


MAX_REDIRECTS = 3


class UpstreamOrigins:
    """The origins (scheme, host, port) of a registry's upstreams, and requests limited to them."""

    def __init__(self, urls: list[str] | tuple[str, ...] = ()) -> None:
        self._origins: set[tuple[str, str, int]] = set()
        self.add(urls)

    def add(self, urls: list[str] | tuple[str, ...]) -> None:
        for url in urls:
            found = _origin(URL(url))
            if found is not None:
                self._origins.add(found)

    def allows(self, url: URL) -> bool:
        return _origin(url) in self._origins

    @asynccontextmanager
    async def request(
        self, session: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """`session.request`, refusing URLs outside the policy, and following at most
        `MAX_REDIRECTS` redirects, each of them inside it too. Raises `OutsideUpstreams` for
        a URL (or a redirect) that leaves the configured upstreams."""
        target = url if isinstance(url, URL) else URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            if not self.allows(target):
                raise OutsideUpstreams(str(target))
            async with session.request(method, target, allow_redirects=False, **kwargs) as response:
                location = response.headers.get("Location")
                if response.status not in (301, 302, 303, 307, 308) or not location:
                    yield response
                    return
                target = target.join(URL(location))
                if response.status == 303:
                    method = "GET"
        raise OutsideUpstreams(f"{target} (more than {MAX_REDIRECTS} redirects)")


class OutsideUpstreams(aiohttp.ClientError):
    """A URL outside the configured upstreams; never requested."""


def origin_of(url: str) -> str:
    """`scheme://host:port` of a configured upstream: how it is named to clients (no path, no
    credentials)."""
    parsed = URL(url)
    port = f":{parsed.explicit_port}" if parsed.explicit_port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _origin(url: URL) -> tuple[str, str, int] | None:
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return url.scheme, url.host.lower(), url.port or (443 if url.scheme == "https" else 80)
