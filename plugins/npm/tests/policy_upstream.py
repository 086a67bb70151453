"""A small npm upstream registry for policy and retention tests: packuments whose versions carry the
publish times a test chooses (or none), and real tarballs, so a client can install what the hub
lets through; it can be taken down (503) or made slow to answer `HEAD` (retention's checks)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from npm_testdata import make_tarball

HOUR = 3600.0
DAY = 86400.0


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class UpstreamPackage:
    name: str
    versions: dict[str, float | None]
    """Version -> publish time (epoch seconds), None for a version the document gives no time."""
    tags: dict[str, str] = field(default_factory=dict)


class PolicyUpstream:
    """The registry's state and what it was asked (`requests`: method and path)."""

    def __init__(self) -> None:
        self.packages: dict[str, UpstreamPackage] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.url = ""
        self.down = False
        """Answer 503 to everything, as an upstream in an outage."""
        self.head_delay = 0.0
        """Seconds to wait before answering a `HEAD` (retention asks before it evicts)."""
        self._tarballs: dict[tuple[str, str], bytes] = {}

    def tarball(self, name: str, version: str) -> bytes:
        """The same bytes every time (gzip stamps the time it ran into each new archive)."""
        key = (name, version)
        if key not in self._tarballs:
            self._tarballs[key] = make_tarball(name, version)
        return self._tarballs[key]

    def add(self, name: str, versions: dict[str, float | None], tags: dict[str, str] | None = None) -> None:
        self.packages[name] = UpstreamPackage(name, dict(versions), dict(tags or {}))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.answer)
        return app

    def tarball_requests(self, name: str, version: str, method: str = "GET") -> int:
        basename = name.rsplit("/", 1)[-1]
        return sum(1 for m, path, _ in self.requests if m == method and path.endswith(f"/-/{basename}-{version}.tgz"))

    async def answer(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((request.method, path, request.headers.get("Accept", "")))
        if self.down:
            return web.json_response({"error": "down for maintenance"}, status=503)
        if request.method == "HEAD" and self.head_delay:
            await asyncio.sleep(self.head_delay)
        if "/-/" in path:
            name, _, filename = path.lstrip("/").partition("/-/")
            package = self.packages.get(name)
            version = filename[len(name.rsplit("/", 1)[-1]) + 1 : -len(".tgz")]
            if package is None or version not in package.versions:
                raise web.HTTPNotFound()
            return web.Response(body=self.tarball(name, version), content_type="application/octet-stream")
        name = path.lstrip("/").replace("%2f", "/").replace("%2F", "/")
        package = self.packages.get(name)
        if package is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(self.packument(package))

    def packument(self, package: UpstreamPackage) -> dict[str, Any]:
        basename = package.name.rsplit("/", 1)[-1]
        versions: dict[str, Any] = {}
        times: dict[str, str] = {}
        for version, published in package.versions.items():
            tarball = self.tarball(package.name, version)
            versions[version] = {
                "name": package.name,
                "version": version,
                "dist": {
                    "tarball": f"{self.url}/{package.name}/-/{basename}-{version}.tgz",
                    "shasum": hashlib.sha1(tarball).hexdigest(),
                    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
                },
            }
            if published is not None:
                times[version] = iso(published)
        known = [t for t in package.versions.values() if t is not None]
        times["created"] = iso(min(known) if known else time.time())
        times["modified"] = iso(max(known) if known else time.time())
        tags = package.tags or {"latest": list(package.versions)[-1]}
        return {"_id": package.name, "name": package.name, "dist-tags": tags, "versions": versions, "time": times}


@asynccontextmanager
async def running_upstream() -> AsyncIterator[PolicyUpstream]:
    """A `PolicyUpstream` listening on loopback (its `url` set) for the duration of the block."""
    registry = PolicyUpstream()
    server = TestServer(registry.app(), host="127.0.0.1")
    await server.start_server()
    registry.url = str(server.make_url("")).rstrip("/")
    try:
        yield registry
    finally:
        await server.close()
