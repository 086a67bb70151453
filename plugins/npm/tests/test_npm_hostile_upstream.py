"""Attacks from the upstream side: a malicious upstream registry (and an anonymous client using
it) tries to make the hub reach an internal service, learn whether a port is open, store internal
content, reach other paths of the upstream host, or serve HTML from the hub's origin. None of it
works: the hub talks only to its configured upstreams (same scheme, host and port)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from npm_testdata import hub_settings

from batlehub.app import create_app


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class Server:
    """An aiohttp server on a loopback port that records what reached it."""

    def __init__(self, handler: Any) -> None:
        self.hits: list[str] = []
        self.handler = handler
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path_qs}")
        response: web.StreamResponse = await self.handler(request)
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


SECRET = os.urandom(64)
"""What the internal service answers: if its hash is announced, the bytes would verify."""


@pytest.fixture
async def internal() -> AsyncIterator[Server]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=SECRET, content_type="application/octet-stream")

    server = Server(handle)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def closed_port() -> str:
    server = Server(lambda request: None)
    await server.start()
    url = server.url
    await server.stop()
    return url


@pytest.fixture
async def upstream(internal: Server, closed_port: str) -> AsyncIterator[Server]:
    def packument(name: str, tarball: str) -> dict[str, Any]:
        return {
            "name": name,
            "dist-tags": {"latest": "1.0.0"},
            "versions": {
                "1.0.0": {"name": name, "version": "1.0.0", "dist": {"tarball": tarball, "integrity": sri(SECRET)}}
            },
        }

    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.path.strip("/")
        if request.method == "POST":
            return web.Response(text="<script>alert(document.domain)</script>", content_type="text/html")
        if name == "to-internal":
            return web.json_response(packument(name, f"{internal.url}internal/admin?delete=all"))
        if name == "to-closed":
            return web.json_response(packument(name, f"{closed_port}internal/admin"))
        if name == "redirect-tarball":
            return web.json_response(packument(name, f"{upstream_server.url}hop/x.tgz"))
        if name == "hop/x.tgz":
            raise web.HTTPFound(f"{internal.url}internal/secret")
        if name == "redirect-doc":
            raise web.HTTPFound(f"{internal.url}internal/metadata")
        return web.json_response({"error": "not found"}, status=404)

    upstream_server = Server(handle)
    await upstream_server.start()
    yield upstream_server
    await upstream_server.stop()


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, upstream: Server) -> Any:
    settings = hub_settings(
        tmp_path / "data", registries=[{"type": "npm", "name": "npm", "mode": "proxy", "upstreams": [upstream.url]}]
    )
    return await aiohttp_client(create_app(settings))


async def test_tarball_urls_pointing_elsewhere_are_never_fetched(client: Any, internal: Server) -> None:
    answers = []
    for name in ("to-internal", "to-closed"):
        doc = await client.get(f"/registries/npm/{name}")
        assert doc.status == 200
        tarball = await client.get(f"/registries/npm/{name}/-/{name}-1.0.0.tgz")
        answers.append((tarball.status, (await tarball.json())["error"].replace(name, "NAME")))
    assert internal.hits == []
    # An open and a closed internal port look exactly the same to the client: no oracle.
    assert answers[0] == answers[1] and answers[0][0] == 502, answers
    assert "outside the configured upstreams" in answers[0][1]


async def test_redirects_off_the_upstream_are_not_followed(client: Any, internal: Server) -> None:
    tarball = await client.get("/registries/npm/redirect-tarball/-/redirect-tarball-1.0.0.tgz")
    assert tarball.status == 502 and internal.hits == []
    doc = await client.get("/registries/npm/redirect-doc")
    assert doc.status == 502 and internal.hits == []
    assert "upstream" in (await doc.json())["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/registries/npm/-/npm/v1/security/..%2f..%2f..%2f..%2fadmin%3fcmd=x",
        "/registries/npm/-/npm/v1/security/advisories/..%2f..%2fx",
        "/registries/npm/-/npm/v1/security/anything-else",
    ],
)
async def test_audit_forwarding_reaches_only_the_audit_endpoints(client: Any, upstream: Server, path: str) -> None:
    response = await client.post(path, data=b"{}", headers={"Content-Type": "application/json"})
    assert response.status == 404 and response.content_type == "application/json"
    assert upstream.hits == []


async def test_an_upstream_html_answer_is_not_served_from_the_hub(client: Any, upstream: Server) -> None:
    response = await client.post(
        "/registries/npm/-/npm/v1/security/advisories/bulk",
        data=json.dumps({"left-pad": ["1.0.0"]}),
        headers={"Content-Type": "application/json"},
    )
    assert upstream.hits == ["POST /-/npm/v1/security/advisories/bulk"]
    assert response.status == 502 and response.content_type == "application/json"
    assert "<script>" not in await response.text()


async def test_a_gzip_bomb_in_an_audit_is_refused_without_inflating_it(client: Any, upstream: Server) -> None:
    import gzip

    bomb = gzip.compress(b'{"a":["' + b"0" * (200 * 1024 * 1024) + b'"]}', compresslevel=9)
    assert len(bomb) < 1024 * 1024
    response = await client.post(
        "/registries/npm/-/npm/v1/security/advisories/bulk", data=bomb, headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert upstream.hits == []
