"""npm in the web UI: proxied packages listed from the summaries kept beside their cached
packuments, and their pages read from the cached packument (README included), never merged with
local data."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from npm_testdata import ALICE, auth, hub_settings, publish_body

from batlehub import appkeys
from batlehub.app import create_app

UPSTREAM_PACKUMENT = {
    "_id": "chalk-ish",
    "name": "chalk-ish",
    "description": "terminal colours, upstream",
    "dist-tags": {"latest": "5.0.1"},
    "readme": "# chalk-ish\n\nColours <script>alert(1)</script> for **terminals**.",
    "maintainers": [{"name": "sindre"}],
    "time": {"5.0.0": "2024-01-02T03:04:05.000Z", "5.0.1": "2024-02-03T04:05:06.000Z"},
    "versions": {
        v: {
            "name": "chalk-ish",
            "version": v,
            "license": "MIT",
            "dependencies": {"ansi-ish": "^1.0.0"},
            "dist": {"tarball": f"http://upstream.invalid/chalk-ish/-/chalk-ish-{v}.tgz", "integrity": "sha512-AAAA"},
        }
        for v in ("5.0.0", "5.0.1")
    },
}


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.mark.parametrize("readme_padding", [0, 400_000], ids=["small", "big-enough-for-the-worker-process"])
async def test_proxied_packages_are_listed_and_shown_from_the_cached_packument(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, readme_padding: int
) -> None:
    served = {
        **UPSTREAM_PACKUMENT,
        "readme": UPSTREAM_PACKUMENT["readme"] + "\n\n" + "padding " * (readme_padding // 8),
    }

    async def packument(request: web.Request) -> web.Response:
        if request.match_info["name"] != "chalk-ish":
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(served)

    upstream_app = web.Application()
    upstream_app.router.add_get("/{name}", packument)
    upstream = await aiohttp_server(upstream_app)
    settings = hub_settings(
        tmp_path / "data",
        registries=[{"type": "npm", "name": "npm", "mode": "hybrid", "upstreams": [str(upstream.make_url("/"))]}],
    )
    client = await aiohttp_client(create_app(settings))
    # What `npm install` asks for first: the abbreviated form, which has no description.
    fetched = await client.get("/registries/npm/chalk-ish", headers={"Accept": "application/vnd.npm.install-v1+json"})
    assert fetched.status == 200
    await client.app[appkeys.REGISTRY_SERVICES]["npm"].settle()
    published = await client.put("/registries/npm/mine", json=publish_body("mine", "0.1.0"), headers=auth(ALICE))
    assert published.status == 201

    listed = text_of(await (await client.get("/")).text())
    assert "2 packages" in listed
    assert "chalk-ish terminal colours, upstream 5.0.1 npm npm proxied" in listed
    assert "mine test package mine 0.1.0 npm npm local" in listed
    assert "1 package" in text_of(await (await client.get("/?q=colours")).text())

    page = await client.get("/packages/npm/chalk-ish")
    assert page.status == 200
    body = await page.text()
    seen = text_of(body)
    assert "chalk-ish 5.0.1" in seen and "proxied from upstream" in seen
    assert "Owners sindre" in seen and "License MIT" in seen and "ansi-ish ^1.0.0" in seen
    assert "<strong>terminals</strong>" in body and "<script>alert" not in body
    # Download links point at the hub, never at the upstream.
    assert f"{client.make_url('/registries/npm/chalk-ish/-/chalk-ish-5.0.1.tgz')}" in body
    assert "upstream.invalid" not in body
    assert "2024-01-02 03:04 UTC" in text_of(await (await client.get("/packages/npm/chalk-ish?version=5.0.0")).text())
