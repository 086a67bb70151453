"""Policies end to end: real `batlehub serve` processes, the real npm CLI, and a local upstream
whose versions carry chosen publish times (issue 15's "done when").

- With `min_release_age = "3d"`, npm installs the previous version rather than one published an
  hour ago, `latest` points at it, a direct tarball URL of the young version is refused with the
  reason, and the same version installs once an admin adds an exemption; a version without a time
  is hidden.
- A blocked range is refused within a second of the admin call on another replica too (two
  replicas on PostgreSQL and Redis).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_npm_testing.clients import npm_env, run_npm
from policy_upstream import DAY, HOUR, PolicyUpstream, running_upstream

from batlehub.testing.hub import HubFactory, token_auth_toml

pytestmark = [pytest.mark.npm_cli]

ADMIN = "policy-admin-token-0123456789"
AUTH = token_auth_toml({"admin": (ADMIN, "admin")})
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
async def upstream() -> AsyncIterator[PolicyUpstream]:
    async with running_upstream() as registry:
        yield registry


def config(upstream: str, extra: str = "", policy: str = 'min_release_age = "3d"') -> str:
    return f"""{AUTH}
{extra}
[[registries]]
type = "npm"
name = "npm"
mode = "proxy"
upstreams = ["{upstream}"]
[registries.policy]
{policy}
"""


async def npm(args: list[str], cwd: Path, registry: str, scratch: Path) -> Any:
    """npm off the event loop: the upstream server runs on this loop."""
    return await asyncio.to_thread(run_npm, args, cwd, npm_env(scratch, registry))


def project(root: Path, label: str) -> Path:
    folder = root / label
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": f"consumer-{label}", "version": "1.0.0"}))
    return folder


def installed(folder: Path, name: str) -> str:
    return str(json.loads((folder / "node_modules" / name / "package.json").read_text())["version"])


async def test_npm_installs_the_previous_version_until_an_exemption(
    tmp_path: Path, hub: HubFactory, upstream: PolicyUpstream
) -> None:
    now = time.time()
    upstream.add("fresh-lib", {"1.0.0": now - 30 * DAY, "1.1.0": now - HOUR}, tags={"latest": "1.1.0"})
    upstream.add("timeless-lib", {"1.0.0": now - 30 * DAY, "2.0.0": None}, tags={"latest": "2.0.0"})
    server = await hub(config(upstream.url))
    registry = f"{server.url}/registries/npm/"

    first = project(tmp_path, "first")
    result = await npm(["install", "fresh-lib", "timeless-lib"], first, registry, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(first, "fresh-lib") == "1.0.0"
    assert installed(first, "timeless-lib") == "1.0.0"  # 2.0.0 has no publish time
    view = await npm(["view", "fresh-lib", "dist-tags.latest"], first, registry, tmp_path)
    assert view.stdout.strip() == "1.0.0"

    pinned = await npm(["install", "fresh-lib@1.1.0"], first, registry, tmp_path)
    assert pinned.returncode != 0 and "1.1.0" in pinned.stderr

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{registry}fresh-lib/-/fresh-lib-1.1.0.tgz") as response:
            assert response.status == 403
            assert response.headers["X-BatleHub-Policy"] == "hidden; rule=release-age"
            assert "min_release_age is 3d" in (await response.json())["error"]
        exemption = {
            "registry": "npm",
            "package": "fresh-lib",
            "versions": "1.1.0",
            "reason": "security fix we need now",
            "expires_in_days": 2,
        }
        async with session.post(f"{server.url}/api/v1/admin/policies/exemptions", json=exemption, headers=HEADERS) as r:
            assert r.status == 201, await r.text()

    second = project(tmp_path, "second")
    result = await npm(["install", "fresh-lib@1.1.0"], second, registry, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(second, "fresh-lib") == "1.1.0"


@pytest.mark.slow
async def test_a_block_holds_on_another_replica_within_a_second(
    tmp_path: Path, hub: HubFactory, upstream: PolicyUpstream, fresh_postgres_url: str, redis_url: str
) -> None:
    now = time.time()
    upstream.add("shared-lib", {"1.0.0": now - 90 * DAY, "1.0.1": now - 30 * DAY}, tags={"latest": "1.0.1"})
    shared = f"""
[database]
type = "postgresql"
url = "{fresh_postgres_url}"
[cache]
type = "redis"
url = "{redis_url}"
"""
    first = await hub(config(upstream.url, shared, policy=""))
    second = await hub(config(upstream.url, shared, policy=""))
    tarball = f"{second.url}/registries/npm/shared-lib/-/shared-lib-1.0.1.tgz"
    packument = f"{second.url}/registries/npm/shared-lib"
    async with aiohttp.ClientSession() as session:
        async with session.get(tarball) as response:
            assert response.status == 200  # cached on the second replica before the rule
        block = {"registry": "npm", "package": "shared-lib", "versions": "1.0.1", "reason": "hijacked release"}
        async with session.post(f"{first.url}/api/v1/admin/policies/blocks", json=block, headers=HEADERS) as r:
            assert r.status == 201, await r.text()
        answered = time.monotonic()
        while True:
            async with session.get(tarball) as response:
                if response.status == 403:
                    assert "hijacked release" in (await response.json())["error"]
                    break
            assert time.monotonic() - answered < 1.0, "the block did not reach the other replica within a second"
            await asyncio.sleep(0.05)
        async with session.get(packument) as response:
            doc = await response.json()
            assert set(doc["versions"]) == {"1.0.0"} and doc["dist-tags"]["latest"] == "1.0.0"

    # And the npm CLI on the second replica resolves the version left.
    folder = project(tmp_path, "replica")
    result = await npm(["install", "shared-lib"], folder, f"{second.url}/registries/npm/", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed(folder, "shared-lib") == "1.0.0"
