"""End to end on the shared backends (issue 4): two real `batlehub serve` replicas on PostgreSQL,
the Redis cache and S3 storage (SeaweedFS), with a Verdaccio upstream, driven by the real npm CLI.

Published and proxied tarballs land in the bucket, upstream metadata is cached in Redis, and each
replica serves what was published through the other at once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from batlehub_npm_testing.clients import make_package, npm_env, run_npm

from batlehub.testing.hub import Hub, HubFactory, shared_backends_toml, token_auth_toml

pytestmark = [pytest.mark.npm_cli]

ADMIN = "shared-admin-token-0123456789"
ALICE = "shared-alice-token-0123456789"


def config(postgres_url: str, redis_url: str, s3: dict[str, Any], prefix: str, upstream: str) -> str:
    return (
        shared_backends_toml(postgres_url, redis_url, s3, prefix)
        + f"""
{token_auth_toml({"admin": (ADMIN, "admin"), "alice": (ALICE, "user")})}

[[registries]]
type = "npm"
name = "npm"
mode = "hybrid"
upstreams = ["{upstream}"]
"""
    )


def npm(args: list[str], cwd: Path, hub: Hub, scratch: Path, token: str | None = None) -> str:
    result = run_npm(args, cwd=cwd, env=npm_env(scratch, f"{hub.url}/registries/npm/", token))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def project(root: Path, label: str, dependencies: dict[str, str]) -> Path:
    folder = root / label
    folder.mkdir(parents=True)
    manifest = {"name": f"consumer-{label}", "version": "1.0.0", "dependencies": dependencies}
    (folder / "package.json").write_text(json.dumps(manifest))
    return folder


def installed(folder: Path, name: str) -> str:
    return str(json.loads((folder / "node_modules" / name / "package.json").read_text())["version"])


def sha512_hex_of(integrity: str) -> str:
    return base64.b64decode(integrity.split("-", 1)[1]).hex()


async def test_two_replicas_on_postgres_redis_and_s3(
    tmp_path: Path,
    hub: HubFactory,
    fresh_postgres_url: str,
    redis_url: str,
    s3_config: dict[str, Any],
    verdaccio: Any,
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"shared-{tag}"
    upstream_pkg, local_pkg = f"e2e-upstream-{tag}", f"@e2e-{tag}/private"
    await asyncio.to_thread(verdaccio.publish, make_package(tmp_path / "src", upstream_pkg, "1.4.0"))
    published_reads = verdaccio.request_count(f"/{upstream_pkg}")  # npm publish's own reads

    text = config(fresh_postgres_url, redis_url, s3_config, prefix, verdaccio.url)
    a, b = await hub(text), await hub(text)

    # Publish through A; B serves it at once, to a client with an empty cache.
    source = make_package(tmp_path / "src", local_pkg, "1.0.0", dependencies={upstream_pkg: "^1.0.0"})
    await asyncio.to_thread(npm, ["publish"], source, a, tmp_path / "publisher", ALICE)
    consumer = project(tmp_path, "consumer", {local_pkg: "1.0.0"})
    await asyncio.to_thread(npm, ["install"], consumer, b, tmp_path / "consumer-npm")
    assert installed(consumer, local_pkg) == "1.0.0"
    assert installed(consumer, upstream_pkg) == "1.4.0"  # proxied from the upstream through B

    # A dist-tag added through B is what A answers with on the very next request.
    await asyncio.to_thread(
        npm, ["dist-tag", "add", f"{local_pkg}@1.0.0", "stable"], consumer, b, tmp_path / "t", ALICE
    )
    tags = json.loads(
        await asyncio.to_thread(npm, ["view", local_pkg, "dist-tags", "--json"], consumer, a, tmp_path / "v")
    )
    assert tags == {"latest": "1.0.0", "stable": "1.0.0"}

    # Both tarballs (published and proxied) are objects in the bucket, content-addressed.
    lock = json.loads((consumer / "package-lock.json").read_text())["packages"]
    wanted = {sha512_hex_of(lock[f"node_modules/{name}"]["integrity"]) for name in (local_pkg, upstream_pkg)}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_config["endpoint"],
        region_name=s3_config["region"],
        aws_access_key_id=s3_config["access_key_id"],
        aws_secret_access_key=s3_config["secret_access_key"],
    )
    listed = s3.list_objects_v2(Bucket=s3_config["bucket"], Prefix=prefix)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    for digest in wanted:
        matching = [key for key in keys if key.endswith(digest)]
        assert matching, (digest, keys)
        body = s3.get_object(Bucket=s3_config["bucket"], Key=matching[0])["Body"].read()
        assert hashlib.sha512(body).hexdigest() == digest

    # The upstream's metadata is cached in Redis, under this hub's prefix.
    client = redis.Redis.from_url(redis_url)
    try:
        cached = [key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    finally:
        client.close()
    assert any(upstream_pkg in key for key in cached), cached
    # One upstream packument request served every client of both replicas.
    # A client of A gets the proxied package from what B cached and stored: no new upstream request.
    second = project(tmp_path, "second", {upstream_pkg: "1.4.0"})
    await asyncio.to_thread(npm, ["install"], second, a, tmp_path / "second-npm")
    assert installed(second, upstream_pkg) == "1.4.0"
    assert verdaccio.request_count(f"/{upstream_pkg}/-/{upstream_pkg}-1.4.0.tgz") == 1
    upstream_reads = verdaccio.request_count(f"/{upstream_pkg}") - published_reads
    assert upstream_reads == 1, upstream_reads
