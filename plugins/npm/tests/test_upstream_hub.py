"""End to end: real `batlehub serve` processes proxying a real upstream registry (Verdaccio), used
by the real npm CLI — an outage that users do not notice, replicas that ask the upstream once
between them, and a tampered upstream tarball that npm never gets to install."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from batlehub_npm_testing.clients import make_package, npm_env, run_npm

from batlehub.testing.hub import HubFactory

pytestmark = [pytest.mark.npm_cli]


def proxy_config(upstream: str, *, ttl: float = 300, extra: str = "") -> str:
    return f"""
{extra}
[[registries]]
type = "npm"
name = "npm"
mode = "proxy"
upstreams = ["{upstream}"]
[registries.cache]
metadata_ttl_secs = {ttl}
"""


def unique(prefix: str = "e2e-up") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def npm(args: list[str], cwd: Path, registry: str, scratch: Path) -> Any:
    """Run npm off the event loop, so servers on this loop keep answering it."""
    return await asyncio.to_thread(run_npm, args, cwd, npm_env(scratch, registry))


def new_project(root: Path, label: str, dependencies: dict[str, str]) -> Path:
    project = root / label
    project.mkdir(parents=True)
    manifest = {"name": f"consumer-{label}", "version": "1.0.0", "dependencies": dependencies}
    (project / "package.json").write_text(json.dumps(manifest))
    return project


def installed_version(project: Path, name: str) -> str:
    return str(json.loads((project / "node_modules" / name / "package.json").read_text())["version"])


async def test_npm_install_keeps_working_through_an_upstream_outage_and_a_restart(
    tmp_path: Path, hub: HubFactory, verdaccio: Any
) -> None:
    base, app = unique(), f"@{unique('scope')}/app"
    await asyncio.to_thread(verdaccio.publish, make_package(tmp_path / "src", base, "1.2.3"))
    await asyncio.to_thread(
        verdaccio.publish, make_package(tmp_path / "src", app, "2.0.0", dependencies={base: "^1.0.0"})
    )
    server = await hub(proxy_config(verdaccio.url, ttl=1))
    registry = f"{server.url}/registries/npm/"

    first = new_project(tmp_path, "first", {app: "2.0.0"})
    result = await npm(["install"], first, registry, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed_version(first, base) == "1.2.3" and installed_version(first, app) == "2.0.0"

    verdaccio.stop()
    try:
        await asyncio.sleep(1.2)  # past the TTL: the hub has to ask the (dead) upstream again
        second = new_project(tmp_path, "second", {app: "2.0.0"})
        result = await npm(["install"], second, registry, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert installed_version(second, base) == "1.2.3"
        assert "serving the stale copy" in server.logs()

        # A restarted hub has lost its memory cache; the database still has the last good copies.
        await server.restart()
        third = new_project(tmp_path, "third", {app: "2.0.0"})
        result = await npm(["install"], third, registry, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert installed_version(third, app) == "2.0.0"

        # What was never fetched fails with a message that says why.
        missing = new_project(tmp_path, "missing", {unique("never-fetched"): "1.0.0"})
        result = await npm(["install", "--fetch-retries=0"], missing, registry, tmp_path)
        assert result.returncode != 0
        assert "is not cached, and its upstream registry failed: http://127.0.0.1:" in result.stdout + result.stderr
    finally:
        verdaccio.start()

    # Tarballs came from the upstream once, however many installs there were.
    assert verdaccio.request_count(f"/{base}/-/{base}-1.2.3.tgz") == 1


async def test_two_replicas_ask_the_upstream_once_between_them(
    tmp_path: Path, hub: HubFactory, verdaccio: Any, fresh_postgres_url: str
) -> None:
    name = unique()
    await asyncio.to_thread(verdaccio.publish, make_package(tmp_path / "src", name, "1.0.0"))
    shared = f"""
[database]
type = "postgresql"
url = "{fresh_postgres_url}"
[cache]
type = "postgres"
[storage]
type = "filesystem"
path = "{tmp_path / "shared-storage"}"
"""
    config = proxy_config(verdaccio.url, extra=shared)
    replicas = [await hub(config), await hub(config)]
    before = verdaccio.request_count(f"/{name}")  # npm publish reads the document too

    async with aiohttp.ClientSession() as session:

        async def get(url: str) -> bytes:
            async with session.get(url, headers={"Accept": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.read()

        documents = await asyncio.gather(*(get(f"{replicas[i % 2].url}/registries/npm/{name}") for i in range(40)))
        tarball_url = json.loads(documents[0])["versions"]["1.0.0"]["dist"]["tarball"]
        assert tarball_url.startswith(replicas[0].url)  # clients never see the upstream
        path = tarball_url.removeprefix(replicas[0].url)
        tarballs = await asyncio.gather(*(get(f"{replicas[i % 2].url}{path}") for i in range(20)))

    assert len(set(tarballs)) == 1
    assert verdaccio.request_count(f"/{name}") == before + 1
    assert verdaccio.request_count(f"/{name}/-/{name}-1.0.0.tgz") == 1


def _tarball(name: str, version: str, note: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for path, content in (
            ("package/package.json", json.dumps({"name": name, "version": version}).encode()),
            ("package/index.js", b"module.exports = 1;\n" + note),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buf.getvalue()


async def test_npm_never_installs_a_tampered_upstream_tarball(tmp_path: Path, hub: HubFactory) -> None:
    name = unique("tampered")
    genuine = _tarball(name, "1.0.0", b"")
    served = _tarball(name, "1.0.0", b"// a backdoor\n")
    requests: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        requests.append(request.path)
        if request.path == f"/{name}":
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(genuine).digest()).decode()
            dist = {"tarball": f"{upstream_url}{name}/-/{name}-1.0.0.tgz", "integrity": integrity}
            manifest = {"name": name, "version": "1.0.0", "dist": dist}
            return web.json_response({"name": name, "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": manifest}})
        if request.path == f"/{name}/-/{name}-1.0.0.tgz":
            return web.Response(body=served, content_type="application/octet-stream")
        return web.json_response({"error": "not found"}, status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        server = await hub(proxy_config(upstream_url))
        project = new_project(tmp_path, "victim", {name: "1.0.0"})
        result = await npm(["install"], project, f"{server.url}/registries/npm/", tmp_path)
    finally:
        await runner.cleanup()

    assert result.returncode != 0
    assert f"integrity check failed for the tarball of {name}@1.0.0" in result.stdout + result.stderr
    assert not (project / "node_modules" / name).exists()
    assert f"/{name}/-/{name}-1.0.0.tgz" in requests
    stored = [p for p in (server.data_dir / "storage").rglob("*") if p.is_file() and ".tmp" not in p.parts]
    assert stored == []


async def test_npm_search_during_an_outage_lists_cached_upstream_packages_as_the_upstream_described_them(
    tmp_path: Path, hub: HubFactory, verdaccio: Any
) -> None:
    """With the upstream's search unreachable, the packages the hub holds are found, with the
    description, version, date and maintainers their upstream document gives (never 1970 and ???)."""
    name = unique("e2e-search")
    folder = make_package(tmp_path / "src", name, "3.1.4", description="a findable needle")
    await asyncio.to_thread(verdaccio.publish, folder)
    server = await hub(proxy_config(verdaccio.url))
    registry = f"{server.url}/registries/npm/"
    viewed = await npm(["view", name, "version"], tmp_path, registry, tmp_path)
    assert viewed.stdout.strip() == "3.1.4", viewed.stdout + viewed.stderr
    upstream = await asyncio.to_thread(verdaccio.packument, name)
    people = upstream.get("maintainers") or upstream["versions"]["3.1.4"].get("maintainers") or []

    verdaccio.stop()
    try:
        result = await npm(["search", "findable", "--json"], tmp_path, registry, tmp_path)
    finally:
        verdaccio.start()
    assert result.returncode == 0, result.stdout + result.stderr
    (hit,) = [h for h in json.loads(result.stdout) if h["name"] == name]
    assert (hit["version"], hit["description"]) == ("3.1.4", "a findable needle")
    assert hit["date"] == upstream["time"]["modified"]
    assert [m["username"] for m in hit["maintainers"]] == [m["name"] for m in people]
