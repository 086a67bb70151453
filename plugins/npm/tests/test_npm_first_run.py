"""A newcomer's first run, with the real clients: `batlehub serve` with no config at all, in a
HOME whose npm is configured for some registry (here a local Verdaccio), proxies that registry;
the two `.npmrc` lines printed in the log are all npm, pnpm and yarn need. And the details real
clients trip on: tag order, search through the upstream, stars, maintainers, clear errors."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from batlehub_npm_testing.clients import make_package, npm_env, ok, output, run_npm
from batlehub_npm_testing.services import NodeTools

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml
from batlehub.testing.services import free_port

pytestmark = [pytest.mark.npm_cli]

ALICE = "first-run-alice-token-0123456789"


def user_home(tmp_path: Path, registry: str) -> Path:
    """A HOME whose npm is configured for `registry`, the way a developer's is."""
    home = tmp_path / f"home-{uuid.uuid4().hex[:6]}"
    home.mkdir()
    (home / ".npmrc").write_text(f"registry={registry}\n")
    return home


def hub_env(home: Path) -> dict[str, str]:
    # Only the HOME tells the hub where npm points (the test harness's default is unset here).
    return {"HOME": str(home), "NPM_CONFIG_REGISTRY": "", "npm_config_userconfig": str(home / ".npmrc")}


def pasted_npmrc(logs: str) -> list[str]:
    """The `.npmrc` lines the start-up log tells the user to paste."""
    lines = [line.split(": ", 2)[-1].strip() for line in logs.splitlines()]
    return [line for line in lines if line.startswith(("registry=", "//"))]


def project(tmp_path: Path, label: str) -> Path:
    folder = tmp_path / label
    folder.mkdir()
    (folder / "package.json").write_text(json.dumps({"name": f"consumer-{label}", "version": "1.0.0"}))
    return folder


@pytest.mark.slow
async def test_the_embedded_default_proxies_what_npm_already_uses(
    tmp_path: Path, hub: HubFactory, verdaccio: Any, node_tools: NodeTools
) -> None:
    public = f"first-run-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path / "src", public, "1.2.3"))

    server: Hub = await hub(None, env=hub_env(user_home(tmp_path, verdaccio.url)))
    logs = server.logs()
    assert f"registry npm: proxying {verdaccio.url}, the registry your npm client uses" in logs
    pasted = pasted_npmrc(logs)
    registry = f"{server.url}/registries/npm/"
    assert pasted[0] == f"registry={registry}", logs
    assert pasted[1].startswith(f"//127.0.0.1:{server.port}/registries/npm/:_authToken="), logs

    for client, binary, args in (
        ("npm", node_tools.npm, ["install", public]),
        ("pnpm", node_tools.pnpm, ["add", public]),
        ("yarn", node_tools.yarn, ["add", public, "--non-interactive"]),
    ):
        folder = project(tmp_path, client)
        env = npm_env(tmp_path, registry)  # only the pasted registry line: reading needs no token
        ok(await asyncio.to_thread(run_npm, args, cwd=folder, env=env, npm=binary))
        installed = json.loads((folder / "node_modules" / public / "package.json").read_text())
        assert installed["version"] == "1.2.3", client


async def test_an_npmrc_that_points_at_the_hub_does_not_make_it_loop(tmp_path: Path, hub: HubFactory) -> None:
    port = free_port()
    home = user_home(tmp_path, f"http://127.0.0.1:{port}/registries/npm/")
    server: Hub = await hub(None, env=hub_env(home), port=port)
    assert "your npm client already uses this hub" in server.logs()
    assert "no upstream: only packages published here are served" in server.logs()
    result = await asyncio.to_thread(
        run_npm, ["view", "anything-at-all"], cwd=tmp_path, env=npm_env(tmp_path, f"{server.url}/registries/npm/")
    )
    assert result.returncode != 0
    assert "which has no upstream registry to ask: set upstreams" in output(result)


def hybrid(upstream: str) -> str:
    return f"""
{token_auth_toml({"alice": (ALICE, "user")})}
[[registries]]
type = "npm"
name = "npm"
mode = "hybrid"
upstreams = ["{upstream}"]
"""


async def test_what_real_clients_tripped_on(tmp_path: Path, hub: HubFactory, verdaccio: Any) -> None:
    server: Hub = await hub(hybrid(verdaccio.url))
    registry = f"{server.url}/registries/npm/"
    reader = npm_env(tmp_path, registry)
    alice = npm_env(tmp_path, registry, ALICE)
    mine = f"tags-{uuid.uuid4().hex[:8]}"
    upstream_only = f"found-upstream-{uuid.uuid4().hex[:8]}"
    verdaccio.publish(make_package(tmp_path / "src", upstream_only, "4.5.6", description="from the upstream"))

    def npm(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return run_npm(args, cwd=tmp_path, env=env)

    def steps() -> None:
        ok(run_npm(["publish"], cwd=make_package(tmp_path / "src", mine, "1.0.0"), env=alice))
        ok(run_npm(["publish", "--tag", "beta"], cwd=make_package(tmp_path / "src", mine, "2.0.0-b"), env=alice))
        ok(npm(["dist-tag", "add", f"{mine}@1.0.0", "another"], alice))
        # Tags in the order they were made, latest first, as the public registries keep them.
        tags = json.loads(ok(npm(["view", mine, "dist-tags", "--json"], reader)))
        assert list(tags) == ["latest", "beta", "another"], tags
        # Maintainers print as names, not "alice <undefined>".
        assert "undefined" not in ok(npm(["view", mine, "maintainers"], reader))
        # npm search asks the upstream too, and shows its description, not "???".
        found = ok(npm(["search", upstream_only, "--json"], reader))
        hits = {p["name"]: p for p in json.loads(found)}
        assert hits[upstream_only]["version"] == "4.5.6" and hits[upstream_only]["description"] == "from the upstream"
        # A star would be thrown away: it is refused, clearly; so is the list of stars.
        starred = npm(["star", mine], alice)
        assert starred.returncode != 0 and "stars are not kept by this registry" in output(starred)
        stars = npm(["stars", "alice"], alice)
        assert stars.returncode != 0 and "stars are not kept by this registry" in output(stars)

    await asyncio.to_thread(steps)


async def test_npm6_unpublish_with_the_registry_path_doubled(tmp_path: Path, hub: HubFactory) -> None:
    """npm 6 sends the tarball DELETE of `npm unpublish pkg@version` with the registry's path
    twice when the registry URL has one (as ours does): `/registries/npm/registries/npm/pkg/-/...`."""
    local = hybrid("http://127.0.0.1:9/").replace('mode = "hybrid"', 'mode = "local"')
    rbac = '[registries.rbac]\nuser = ["releases:read", "source:read", "releases:publish", "releases:delete"]\n'
    server: Hub = await hub(local + rbac)
    registry = f"{server.url}/registries/npm/"
    env = npm_env(tmp_path, registry, ALICE)
    name = f"npm6-{uuid.uuid4().hex[:8]}"
    for version in ("1.0.0", "1.1.0"):
        await asyncio.to_thread(
            lambda v=version: ok(run_npm(["publish"], cwd=make_package(tmp_path / v, name, v), env=env))
        )

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            server.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    status, doc = call("GET", f"/registries/npm/{name}?write=true")
    assert status == 200
    rev = doc["_rev"]
    # The -rev PUT first (as npm 6 sends it), then the doubled tarball DELETE.
    doc["versions"].pop("1.0.0")
    status, _ = call("PUT", f"/registries/npm/{name}/-rev/{rev}", doc)
    assert status == 200
    rev = call("GET", f"/registries/npm/{name}?write=true")[1]["_rev"]
    status, body = call("DELETE", f"/registries/npm/registries/npm/{name}/-/{name}-1.0.0.tgz/-rev/{rev}")
    assert status == 200, body
    assert list(call("GET", f"/registries/npm/{name}")[1]["versions"]) == ["1.1.0"]
    assert re.search(r"DELETE /registries/npm/registries/npm/\S+ 200", server.logs())
