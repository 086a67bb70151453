"""Tarball downloads take shortcuts for speed (a remembered artifact key per package revision, a
remembered "this proxied blob is stored", a lean sendfile response): what a user would notice if
one of them went stale — a blob deleted under the memo, a Range or conditional request."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from npm_testdata import ALICE, auth, hub_settings, make_tarball, publish_body

from batlehub import appkeys
from batlehub.app import create_app
from batlehub.db import SqliteDatabase
from batlehub.sweep import sweep_orphans


async def publish(client: Any, name: str, version: str, tarball: bytes) -> None:
    body = json.dumps(publish_body(name, version, tarball=tarball))
    response = await client.put(f"/registries/npm/{name}", data=body, headers=auth(ALICE))
    assert response.status == 201, await response.text()


async def test_whole_ranged_conditional_and_head_downloads(client: Any) -> None:
    tarball = make_tarball("paths", "1.0.0", bytes(range(256)) * 40)
    await publish(client, "paths", "1.0.0", tarball)
    url = "/registries/npm/paths/-/paths-1.0.0.tgz"

    for _ in range(2):  # the second one goes through the remembered artifact key
        whole = await client.get(url, headers={"Accept-Encoding": "gzip"})
        assert whole.status == 200 and await whole.read() == tarball
        assert whole.headers.get("Content-Encoding") is None
        assert whole.headers["Content-Disposition"] == 'attachment; filename="paths-1.0.0.tgz"'

    ranged = await client.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and await ranged.read() == tarball[10:20]

    etag = whole.headers["ETag"]
    assert (await client.get(url, headers={"If-None-Match": etag})).status == 304

    head = await client.head(url)
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(tarball)


async def test_a_local_blob_gone_from_storage_is_a_404_not_an_error(client: Any) -> None:
    tarball = make_tarball("vanishing", "1.0.0", b"soon gone")
    await publish(client, "vanishing", "1.0.0", tarball)
    url = "/registries/npm/vanishing/-/vanishing-1.0.0.tgz"
    assert await (await client.get(url)).read() == tarball  # now remembered

    storage = client.app[appkeys.STORAGE]
    key = await client.app[appkeys.DATABASE].fetchval("SELECT artifact_key FROM versions WHERE name = 'vanishing'")
    assert await storage.delete(key)

    missing = await client.get(url)
    assert missing.status == 404
    assert "missing from storage" in (await missing.json())["error"]


class Upstream:
    """A minimal upstream registry serving one package, counting tarball downloads."""

    def __init__(self, name: str, tarball: bytes) -> None:
        self.name = name
        self.tarball = tarball
        self.tarball_requests = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == f"/{self.name}":
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()
            dist = {"tarball": f"{self.url}{self.name}/-/{self.name}-1.0.0.tgz", "integrity": integrity}
            manifest = {"name": self.name, "version": "1.0.0", "dist": dist}
            return web.json_response(
                {"name": self.name, "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": manifest}}
            )
        if request.path == f"/{self.name}/-/{self.name}-1.0.0.tgz":
            self.tarball_requests += 1
            return web.Response(body=self.tarball, content_type="application/octet-stream")
        return web.json_response({"error": "not found"}, status=404)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream("proxied", make_tarball("proxied", "1.0.0", b"from upstream" * 1000))
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    yield server
    await runner.cleanup()


@pytest.fixture
async def proxy_client(aiohttp_client: Any, tmp_path: Path, upstream: Upstream) -> Any:
    registries = [{"type": "npm", "name": "npm", "mode": "proxy", "upstreams": [upstream.url]}]
    return await aiohttp_client(create_app(hub_settings(tmp_path / "data", registries=registries)))


async def test_a_proxied_blob_deleted_by_the_sweep_is_fetched_again(proxy_client: Any, upstream: Upstream) -> None:
    url = "/registries/npm/proxied/-/proxied-1.0.0.tgz"
    for _ in range(3):
        response = await proxy_client.get(url)
        assert response.status == 200 and await response.read() == upstream.tarball
    assert upstream.tarball_requests == 1  # stored once, then served from storage

    # The row goes (as when a local unpublish drops the last reference to the same bytes), and the
    # sweep deletes the blob while this process still remembers it as stored.
    db = proxy_client.app[appkeys.DATABASE]
    storage = proxy_client.app[appkeys.STORAGE]
    proxy = proxy_client.app[appkeys.REGISTRIES]["npm"].proxy
    await proxy.settle()  # the artifacts row is written after answering
    await db.execute("DELETE FROM artifacts")
    assert len((await sweep_orphans(db, storage, grace_secs=0)).deleted) == 1

    response = await proxy_client.get(url)
    assert response.status == 200 and await response.read() == upstream.tarball
    assert upstream.tarball_requests == 2
    await proxy.settle()
    assert await db.fetchval("SELECT COUNT(*) FROM artifacts") == 1  # recorded again, safe from the sweep


async def test_copies_written_after_answering_are_durable_once_the_hub_stops(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream
) -> None:
    # The durable packument copy and the artifacts row are written after the client got its
    # answer; a shutdown right after must still leave both in the database.
    registries = [{"type": "npm", "name": "npm", "mode": "proxy", "upstreams": [upstream.url]}]
    settings = hub_settings(tmp_path / "data", registries=registries)
    client = await aiohttp_client(create_app(settings))
    database = client.app[appkeys.DATABASE]
    execute = database.execute

    async def slow_insert(sql: str, *args: Any) -> int:
        if sql.startswith("INSERT"):
            await asyncio.sleep(0.3)  # still running when the hub is told to stop
        return int(await execute(sql, *args))

    database.execute = slow_insert
    assert (await client.get("/registries/npm/proxied")).status == 200
    assert (await client.get("/registries/npm/proxied/-/proxied-1.0.0.tgz")).status == 200
    await client.close()

    db = SqliteDatabase(settings.sqlite_path)
    await db.connect()
    try:
        assert await db.fetchval("SELECT COUNT(*) FROM upstream_documents WHERE name = 'proxied'") == 1
        assert await db.fetchval("SELECT size FROM artifacts") == len(upstream.tarball)
    finally:
        await db.close()
