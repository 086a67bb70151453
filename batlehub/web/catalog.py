"""The package list of the web UI: every registry the caller may read, every format, local and
proxied packages together, searched, sorted by name and cut into pages.

Proxied packages are the names whose upstream documents the hub holds; what a row shows of them
(description, latest version) is the summary core keeps beside each stored document, so a page
never parses an upstream document. A page of `limit` rows asks each registry for at most
`offset + limit` of its rows in name order, which is enough to merge the registries exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from batlehub import appkeys
from batlehub.auth import has_permission
from batlehub.requests import identity


@dataclass(frozen=True)
class Listed:
    registry: str
    format: str
    name: str
    description: str
    latest: str
    proxied: bool


@dataclass(frozen=True)
class Listing:
    entries: list[Listed]
    total: int
    offset: int
    limit: int

    @property
    def next_offset(self) -> int | None:
        return self.offset + self.limit if self.offset + self.limit < self.total else None

    @property
    def previous_offset(self) -> int | None:
        return max(0, self.offset - self.limit) if self.offset > 0 else None


def readable_registries(request: web.Request) -> list[str]:
    caller = identity(request)
    return [
        r.name
        for r in request.app[appkeys.SETTINGS].registries
        if has_permission(caller, r, "releases:read") and r.name in request.app[appkeys.REGISTRY_SERVICES]
    ]


async def listing(request: web.Request, text: str, registry: str | None, offset: int, limit: int) -> Listing:
    """The page of packages matching `text` (name, description, keywords), in `registry` or in
    every registry the caller may read."""
    services = request.app[appkeys.REGISTRY_SERVICES]
    wanted = offset + limit
    candidates: list[Listed] = []
    total = 0
    for name in readable_registries(request):
        if registry and name != registry:
            continue
        service = services[name]
        fmt = service.format_type.name
        hits, local_total = await service.packages.search(text, wanted, 0)
        newest = await service.packages.newest_versions([h.name for h in hits if not h.latest])
        for hit in hits:
            description = hit.extra.get("description")
            candidates.append(
                Listed(
                    name,
                    fmt,
                    hit.name,
                    description if isinstance(description, str) else "",
                    hit.latest or newest.get(hit.name, ""),
                    proxied=False,
                )
            )
        total += local_total
        known = await service.proxied_packages(text)
        if known:
            local = await service.packages.names()
            proxied = [k for k in known if k.name not in local]
            total += len(proxied)
            candidates.extend(Listed(name, fmt, k.name, k.description, k.latest, True) for k in proxied[:wanted])
    candidates.sort(key=lambda e: (e.name.lower(), e.name, e.registry))
    if text:  # an exact name first, as npm search does
        exact = text.lower()
        candidates.sort(key=lambda e: e.name.lower() != exact)
    return Listing(candidates[offset:wanted], total, offset, limit)
