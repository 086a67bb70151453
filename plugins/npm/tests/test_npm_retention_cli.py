"""Retention end to end (issue 14): two real `batlehub serve` replicas on PostgreSQL, Redis and S3
(SeaweedFS), a proxy registry with `[registries.retention]`, the real npm CLI, and an upstream the
test can slow down or take down.

What an operator would check: a dry run lists and keeps; a run on one replica while the other is
running answers 409 (one evictor at a time); the report (reclaimed bytes) is in the admin API of
either replica and in the log; evicted tarballs leave the bucket; an evicted project installs
again, fetched from the upstream once more; with the upstream down a run evicts nothing and what
was in use still installs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_npm_testing.clients import npm_env, run_npm
from policy_upstream import DAY, PolicyUpstream, running_upstream

from batlehub.retention import DELETE_GRACE_SECS
from batlehub.testing.hub import Hub, HubFactory, shared_backends_toml, token_auth_toml
from batlehub.testing.services import s3_client

pytestmark = [pytest.mark.npm_cli, pytest.mark.slow]

ADMIN = "retention-admin-token-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
FIRST = ["ret-a", "ret-b", "ret-c"]
SECOND = ["ret-d", "ret-e", "ret-f"]


@pytest.fixture
async def upstream() -> AsyncIterator[PolicyUpstream]:
    async with running_upstream() as registry:
        for name in FIRST + SECOND:
            registry.add(name, {"1.0.0": time.time() - 30 * DAY})
        yield registry


def config(postgres_url: str, redis_url: str, s3: dict[str, Any], prefix: str, upstream: str) -> str:
    # `dry_run = true`: the periodic run only reports, so the test's own runs are the only evictions.
    return (
        shared_backends_toml(postgres_url, redis_url, s3, prefix)
        + f"""
{token_auth_toml({"admin": (ADMIN, "admin")})}

[[registries]]
type = "npm"
name = "npm"
mode = "proxy"
upstreams = ["{upstream}"]
[registries.retention]
max_bytes = 1
dry_run = true
"""
    )


async def install(root: Path, label: str, hub: Hub, names: list[str]) -> subprocess.CompletedProcess[str]:
    """`npm install` of `names` into a new project with a new npm cache (off the event loop: the
    upstream runs on this loop)."""
    folder = root / label
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": f"consumer-{label}", "version": "1.0.0"}))
    env = npm_env(root / f"{label}-npm", f"{hub.url}/registries/npm/")
    return await asyncio.to_thread(run_npm, ["install", *names], folder, env)


async def admin(session: aiohttp.ClientSession, hub: Hub, method: str, path: str, body: Any = None) -> Any:
    url = f"{hub.url}/api/v1/admin/registries/npm/{path}"
    async with session.request(method, url, json=body, headers=HEADERS) as response:
        return response.status, await response.json()


def tarball_objects(s3: Any, bucket: str, prefix: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/npm/blobs/")
    return {item["Key"] for item in listed.get("Contents", [])}


async def test_retention_across_two_replicas_on_shared_backends(
    tmp_path: Path,
    hub: HubFactory,
    upstream: PolicyUpstream,
    fresh_postgres_url: str,
    redis_url: str,
    s3_config: dict[str, Any],
) -> None:
    prefix = f"retention-{uuid.uuid4().hex[:8]}"
    text = config(fresh_postgres_url, redis_url, s3_config, prefix, upstream.url)
    a, b = await asyncio.gather(hub(text), hub(text))
    s3 = s3_client(s3_config)
    bucket = s3_config["bucket"]

    for label, replica, names in (("first", a, FIRST), ("second", b, SECOND)):
        result = await install(tmp_path, label, replica, names)
        assert result.returncode == 0, result.stdout + result.stderr
    stored = await asyncio.to_thread(tarball_objects, s3, bucket, prefix)
    assert len(stored) == 6, stored

    async with aiohttp.ClientSession() as session:
        status, state = await admin(session, b, "GET", "retention")
        assert status == 200 and state["usage"]["artifacts"]["count"] == 6
        held = state["usage"]["bytes"]
        assert held > 0

        # A dry run (the configured default) lists everything over the 1-byte cap and keeps it.
        status, preview = await admin(session, a, "POST", "retention/run", {})
        assert status == 200 and preview["dry_run"]
        assert preview["evicted_count"] == state["usage"]["artifacts"]["count"] + state["usage"]["documents"]["count"]
        status, state = await admin(session, b, "GET", "retention")
        assert state["usage"]["bytes"] == held

        # One evictor at a time: while A's run waits on the upstream's answers, B's is refused.
        upstream.head_delay = 1.0
        running = asyncio.create_task(admin(session, a, "POST", "retention/run", {"dry_run": False}))
        await asyncio.sleep(0.4)
        status, refused = await admin(session, b, "POST", "retention/run", {"dry_run": False})
        assert status == 409 and "another replica" in refused["error"]
        status, report = await running
        upstream.head_delay = 0.0
        assert status == 200 and not report["dry_run"]
        assert report["reclaimed_bytes"] == held and report["bytes_after"] == 0

        # The report is the other replica's too, and the log says what was reclaimed.
        status, state = await admin(session, b, "GET", "retention")
        assert state["usage"]["bytes"] == 0
        assert state["last_run"]["reclaimed_bytes"] == held and not state["last_run"]["dry_run"]
        assert "retention npm: evicted 12 item(s)" in a.logs()

    # The evicted tarballs leave the bucket once no replica can still be serving them.
    deadline = time.monotonic() + DELETE_GRACE_SECS + 30
    while await asyncio.to_thread(tarball_objects, s3, bucket, prefix):
        assert time.monotonic() < deadline, "evicted blobs are still in the bucket"
        await asyncio.sleep(1)

    # An evicted project installs again from a fresh npm cache, fetched from the upstream again.
    before = sum(upstream.tarball_requests(n, "1.0.0") for n in FIRST)
    result = await install(tmp_path, "again", b, FIRST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(upstream.tarball_requests(n, "1.0.0") for n in FIRST) == before + 3

    # With the upstream down nothing is evicted, and what is in use still installs.
    upstream.down = True
    async with aiohttp.ClientSession() as session:
        status, report = await admin(session, b, "POST", "retention/run", {"dry_run": False})
        assert status == 200 and report["evicted_count"] == 0 and "does not answer" in report["stopped"]
    result = await install(tmp_path, "outage", a, FIRST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(await asyncio.to_thread(tarball_objects, s3, bucket, prefix)) == 3
