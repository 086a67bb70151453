"""High availability, proven end to end: several `batlehub serve` replicas behind nginx, sharing
PostgreSQL, Redis and SeaweedFS S3, with Verdaccio as the npm upstream (`batlehub_npm_testing.ha`).

Every test here is what an operator would see: real processes, real signals, real outages of the
backing services, and the real npm CLI as a client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from batlehub_npm_testing.clients import npm_env, run_npm
from batlehub_npm_testing.ha import REGISTRY, HaCluster, HaOptions, HaServices

from batlehub.db import MIGRATIONS
from batlehub.testing.services import s3_client

pytestmark = [pytest.mark.slow, pytest.mark.ha]

TIMEOUT = aiohttp.ClientTimeout(total=60)


# --- helpers --------------------------------------------------------------------------------------


def make_tarball(name: str, version: str, payload: bytes = b"", dependencies: dict[str, str] | None = None) -> bytes:
    manifest = {"name": name, "version": version, "main": "index.js", "dependencies": dependencies or {}}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in (
            ("package/package.json", json.dumps(manifest).encode()),
            ("package/index.js", f"module.exports = {json.dumps(f'{name}@{version}')};\n".encode()),
            ("package/payload.bin", payload),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def publish_parts(
    name: str, version: str, tarball: bytes, registry_url: str, dependencies: dict[str, str] | None = None
) -> tuple[bytes, bytes, bytes]:
    """An `npm publish` body split in three: everything up to the base64 data, the data, and the
    closing tail, so a test can stream (and interrupt) it."""
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    filename = f"{name}-{version}.tgz"
    manifest = {
        "name": name,
        "version": version,
        "main": "index.js",
        "dependencies": dependencies or {},
        "_id": f"{name}@{version}",
        "dist": {
            "integrity": integrity,
            "shasum": hashlib.sha1(tarball).hexdigest(),
            "tarball": f"{registry_url}{name}/-/{filename}",
        },
    }
    head = {
        "_id": name,
        "name": name,
        "description": f"test package {name}",
        "dist-tags": {"latest": version},
        "versions": {version: manifest},
        "access": None,
    }
    text = json.dumps(head)[:-1]
    prefix = f'{text}, "_attachments": {{"{filename}": {{"content_type": "application/octet-stream", "data": "'
    tail = f'", "length": {len(tarball)}}}}}}}'
    return prefix.encode(), base64.b64encode(tarball), tail.encode()


def publish_body(name: str, version: str, registry_url: str, **kwargs: Any) -> bytes:
    dependencies = kwargs.pop("dependencies", None)
    head, data, tail = publish_parts(
        name, version, make_tarball(name, version, dependencies=dependencies, **kwargs), registry_url, dependencies
    )
    return head + data + tail


async def put_json(session: aiohttp.ClientSession, url: str, body: bytes, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.put(url, data=body, headers=headers) as response:
        return response.status, await response.text()


async def publish_upstream(verdaccio: Any, name: str, version: str, dependencies: dict[str, str] | None = None) -> None:
    """Publish straight to Verdaccio's registry API (much faster than the npm CLI)."""
    body = publish_body(name, version, verdaccio.url, dependencies=dependencies)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, text = await put_json(session, f"{verdaccio.url}{name}", body, verdaccio.token)
    assert status in (200, 201), f"publish of {name}@{version} to Verdaccio: {status} {text}"


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.get(url, **kwargs) as response:
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body


def upstream_gets(verdaccio: Any, name: str) -> int:
    """Packument requests Verdaccio received for `name` (any query string)."""
    return verdaccio.request_count(re.compile(rf"^/{re.escape(name)}(\?.*)?$"))


def upstream_tarball_gets(verdaccio: Any, name: str) -> int:
    return verdaccio.request_count(re.compile(rf"^/{re.escape(name)}/-/"))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> float:
    """Poll `check` until it is true; returns how long it took."""
    began = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - began
        if time.monotonic() - began > within:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await asyncio.sleep(0.25)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def npm_install(
    cluster: HaCluster, scratch: Path, dependencies: dict[str, str], *, retries: int = 0
) -> tuple[int, str]:
    """`npm install` with a fresh npm cache in a fresh project; (exit code, output).

    `fetch-retries=0`: npm would otherwise retry a failed request and hide it from the test.
    """
    project = scratch / uuid.uuid4().hex[:8]
    project.mkdir(parents=True)
    (project / "package.json").write_text(
        json.dumps({"name": "ha-consumer", "version": "1.0.0", "private": True, "dependencies": dependencies})
    )
    env = npm_env(project, cluster.registry_url, cluster.user_token)
    env.update({"npm_config_fetch_retries": str(retries), "npm_config_package_lock": "false"})
    result = await asyncio.to_thread(
        run_npm, ["install", "--no-audit", "--no-fund", "--loglevel=warn"], project, env, timeout=120
    )
    shutil.rmtree(project, ignore_errors=True)
    return result.returncode, result.stdout + result.stderr


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder other users can traverse (nginx workers may run unprivileged when we are root)."""
    root = Path(tempfile.mkdtemp(prefix="batlehub-ha-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def services(fresh_postgres_url: str, redis_url: str, s3_config: dict[str, Any], verdaccio: Any) -> HaServices:
    return HaServices(database_url=fresh_postgres_url, redis_url=redis_url, s3=s3_config, upstream_url=verdaccio.url)


@pytest.fixture
async def ha(scratch: Path, services: HaServices) -> AsyncIterator[Callable[..., Awaitable[HaCluster]]]:
    """`await ha(replicas=3, **HaOptions fields)`: a started cluster, stopped after the test."""
    clusters: list[HaCluster] = []

    async def make(replicas: int = 3, *, start: bool = True, **options: Any) -> HaCluster:
        cluster = HaCluster(scratch / f"cluster{len(clusters)}", services, replicas, HaOptions(**options))
        clusters.append(cluster)
        if start:
            await cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        await cluster.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


# --- 1. rolling restart under load ----------------------------------------------------------------


@dataclass
class Load:
    """Counts of client requests made while replicas are restarted, and every failure."""

    requests: int = 0
    installs: int = 0
    publishes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def test_rolling_restart_under_load_loses_nothing(
    ha: Any, verdaccio: Any, scratch: Path, session: aiohttp.ClientSession
) -> None:
    cluster = await ha(3)
    base = cluster.registry_url
    dep, top = unique("ha-dep"), unique("ha-top")
    await publish_upstream(verdaccio, dep, "1.0.0")
    await publish_upstream(verdaccio, top, "1.0.0", dependencies={dep: "^1.0.0"})
    local = unique("ha-local")
    status, text = await put_json(session, base + local, publish_body(local, "0.0.1", base), cluster.user_token)
    assert status == 201, text
    load = Load()
    load.publishes.append("0.0.1")

    async def reader(index: int) -> None:
        urls = [
            base + top,
            base + local,
            f"{base}{local}/-/{local}-0.0.1.tgz",
            f"{base}{dep}/-/{dep}-1.0.0.tgz",
            f"{base}{dep}",
        ]
        abbreviated = {"Accept": "application/vnd.npm.install-v1+json"}
        n = index
        while not load.stop.is_set():
            url = urls[n % len(urls)]
            n += 1
            try:
                async with session.get(url, headers=abbreviated if n % 2 else {}) as response:
                    await response.read()
                    if response.status != 200:
                        load.failures.append(f"GET {url}: {response.status} {response.headers.get('X-Upstream')}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.failures.append(f"GET {url}: {exc!r}")
            load.requests += 1

    async def publisher() -> None:
        n = 0
        while not load.stop.is_set():
            n += 1
            version = f"1.0.{n}"
            try:
                status, text = await put_json(
                    session, base + local, publish_body(local, version, base), cluster.user_token
                )
                if status == 201:
                    load.publishes.append(version)
                else:
                    load.failures.append(f"publish {version}: {status} {text[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.failures.append(f"publish {version}: {exc!r}")
            load.requests += 1
            await asyncio.sleep(0.05)

    big = unique("ha-big")
    big_payload = os.urandom(4 * 1024 * 1024)
    status, text = await put_json(
        session, base + big, publish_body(big, "0.0.1", base, payload=big_payload), cluster.user_token
    )
    assert status == 201, text
    big_publishes = ["0.0.1"]

    async def slow_publisher() -> None:
        """Publishes that take a second to stream: one is in flight whenever a replica gets SIGTERM,
        and nginx cannot retry a body it already started to send."""
        n = 0
        while not load.stop.is_set():
            n += 1
            version = f"1.0.{n}"
            body = publish_body(big, version, base, payload=big_payload)

            async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
                for start in range(0, len(body), 128 * 1024):
                    yield body[start : start + 128 * 1024]
                    await asyncio.sleep(0.02)

            headers = {**cluster.auth(), "Content-Type": "application/json"}
            try:
                async with session.put(base + big, data=chunks(), headers=headers) as response:
                    text = await response.text()
                    if response.status == 201:
                        big_publishes.append(version)
                    else:
                        load.failures.append(f"streamed publish {version}: {response.status} {text[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.failures.append(f"streamed publish {version}: {exc!r}")
            load.requests += 1

    async def slow_reader() -> None:
        """Downloads read slowly, so a transfer is under way whenever a replica gets SIGTERM."""
        url = f"{base}{big}/-/{big}-0.0.1.tgz"
        while not load.stop.is_set():
            try:
                async with session.get(url) as response:
                    size = 0
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        await asyncio.sleep(0.02)
                    if response.status != 200 or size < len(big_payload):
                        load.failures.append(f"slow GET {url}: {response.status}, {size} bytes")
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.failures.append(f"slow GET {url}: {exc!r}")
            load.requests += 1

    async def installer() -> None:
        while not load.stop.is_set():
            code, output = await npm_install(cluster, scratch, {top: "^1.0.0", local: "0.0.1"})
            load.installs += 1
            if code != 0:
                load.failures.append(f"npm install exited {code}:\n{output[-1500:]}")

    workers = [asyncio.create_task(reader(i)) for i in range(4)]
    workers += [asyncio.create_task(publisher()), asyncio.create_task(installer()), asyncio.create_task(installer())]
    workers += [asyncio.create_task(slow_publisher()), asyncio.create_task(slow_reader())]
    began = time.monotonic()
    timings = []
    try:
        await asyncio.sleep(2)
        for index in range(3):
            drain, start = await cluster.replace(index)
            timings.append((drain, start))
            await asyncio.sleep(1)
        await asyncio.sleep(1)
    finally:
        load.stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.monotonic() - began
    print(
        f"\nrolling restart: {load.requests} requests, {load.installs} npm installs,"
        f" {len(load.publishes) + len(big_publishes)} publishes"
        f" in {elapsed:.1f}s; failures: {len(load.failures)}; (drain, start) secs per replica:"
        f" {[(round(d, 1), round(s, 1)) for d, s in timings]}"
    )
    assert load.failures == [], "\n".join(load.failures[:20]) + "\n" + cluster.logs()
    assert load.installs >= 2 and len(load.publishes) >= 5

    # Every acknowledged publish is there, on every (new) replica, with its tarball.
    for replica in cluster.replicas:
        status, doc = await get(session, f"{replica.url}/registries/{REGISTRY}/{local}")
        assert status == 200, doc
        assert set(load.publishes) <= set(doc["versions"]), sorted(set(load.publishes) - set(doc["versions"]))
    for version in load.publishes:
        status, _ = await get(session, f"{base}{local}/-/{local}-{version}.tgz")
        assert status == 200, f"tarball of acknowledged {local}@{version}: {status}"
    status, doc = await get(session, base + big)
    assert status == 200 and set(big_publishes) <= set(doc["versions"]), doc
    assert len(big_publishes) >= 3
    for version in big_publishes:
        status, _ = await get(session, f"{base}{big}/-/{big}-{version}.tgz")
        assert status == 200, f"tarball of acknowledged {big}@{version}: {status}"


# --- 2. concurrent first start --------------------------------------------------------------------


async def test_concurrent_first_start_applies_each_migration_once(ha: Any, services: HaServices) -> None:
    began = time.monotonic()
    cluster = await ha(3)  # all three start at once on the empty database
    print(f"\nthree replicas healthy on an empty database after {time.monotonic() - began:.1f}s")
    for index in range(3):
        status, body = await cluster.health(index)
        assert status == 200 and body["status"] == "ok", body
        assert "warnings" not in body, body  # shared cache and storage: nothing to warn about
    conn = await asyncpg.connect(services.database_url)
    try:
        rows = await conn.fetch("SELECT version, COUNT(*) AS n FROM schema_migrations GROUP BY version")
    finally:
        await conn.close()
    assert {r["version"]: r["n"] for r in rows} == {m[0]: 1 for m in MIGRATIONS}


# --- 3. warm-up once -------------------------------------------------------------------------------


async def test_warm_up_fetches_each_package_once_across_replicas(
    ha: Any, verdaccio: Any, services: HaServices, session: aiohttp.ClientSession
) -> None:
    first, second = unique("ha-warm"), unique("ha-warm")
    await publish_upstream(verdaccio, first, "1.0.0")
    await publish_upstream(verdaccio, second, "1.0.0")
    await publish_upstream(verdaccio, second, "2.0.0")
    cluster = await ha(3, warm_packages=[first, f"{second}@1.0.0"])

    async def warmed() -> bool:
        conn = await asyncpg.connect(services.database_url)
        try:
            stored = await conn.fetchval("SELECT COUNT(*) FROM artifacts")
        finally:
            await conn.close()
        return bool(stored == 2) and all("warm-up done" in h.logs() for h in cluster.replicas)

    took = await eventually(warmed, "every replica finished its warm-up", within=60)
    print(f"\nwarm-up of 2 packages on 3 replicas done {took:.1f}s after they were healthy")
    assert upstream_gets(verdaccio, first) == 1
    assert upstream_gets(verdaccio, second) == 1
    assert upstream_tarball_gets(verdaccio, first) == 1
    assert upstream_tarball_gets(verdaccio, second) == 1
    # The warmed tarballs are served from storage by every replica, without asking the upstream.
    for replica in cluster.replicas:
        status, _ = await get(session, f"{replica.url}/registries/{REGISTRY}/{first}/-/{first}-1.0.0.tgz")
        assert status == 200
    assert upstream_tarball_gets(verdaccio, first) == 1


# --- 4. single flight ------------------------------------------------------------------------------


async def test_single_flight_across_replicas(ha: Any, verdaccio: Any, session: aiohttp.ClientSession) -> None:
    name = unique("ha-flight")
    await publish_upstream(verdaccio, name, "1.0.0")
    cluster = await ha(3)
    # Both through nginx (round robin) and straight at each replica, all at once.
    urls = [cluster.registry_url + name] * 35
    urls += [f"{cluster.replicas[i % 3].url}/registries/{REGISTRY}/{name}" for i in range(15)]
    results = await asyncio.gather(*(get(session, url) for url in urls))
    assert [status for status, _ in results] == [200] * 50
    assert {doc["dist-tags"]["latest"] for _, doc in results} == {"1.0.0"}
    assert upstream_gets(verdaccio, name) == 1


# --- 5. upstream down ------------------------------------------------------------------------------


async def test_upstream_down_serves_what_was_fetched(
    ha: Any, verdaccio: Any, scratch: Path, session: aiohttp.ClientSession
) -> None:
    dep, top, never = unique("ha-dep"), unique("ha-top"), unique("ha-never")
    await publish_upstream(verdaccio, dep, "1.0.0")
    await publish_upstream(verdaccio, top, "1.0.0", dependencies={dep: "^1.0.0"})
    await publish_upstream(verdaccio, never, "1.0.0")
    cluster = await ha(3, metadata_ttl_secs=1)
    code, output = await npm_install(cluster, scratch, {top: "^1.0.0"})
    assert code == 0, output

    verdaccio.stop()
    try:
        await asyncio.sleep(1.5)  # every cached document is past its TTL now
        # Each install is a fresh project with a fresh npm cache; installs hit every replica.
        for _ in range(3):
            code, output = await npm_install(cluster, scratch, {top: "^1.0.0"})
            assert code == 0, output + cluster.logs()
        code, output = await npm_install(cluster, scratch, {never: "^1.0.0"})
        assert code != 0
        assert "upstream" in output.lower() and re.search(r"\b50[23]\b", output), output
    finally:
        verdaccio.start()

    await publish_upstream(verdaccio, top, "1.1.0", dependencies={dep: "^1.0.0"})

    async def fresh() -> bool:
        docs = await asyncio.gather(*(get(session, f"{r.url}/registries/{REGISTRY}/{top}") for r in cluster.replicas))
        return all(status == 200 and doc["dist-tags"]["latest"] == "1.1.0" for status, doc in docs)

    await eventually(fresh, "every replica serves the version published upstream after it came back")
    code, output = await npm_install(cluster, scratch, {never: "^1.0.0", top: "1.1.0"})
    assert code == 0, output


# --- 6. Redis down ---------------------------------------------------------------------------------


async def test_redis_down_degrades_and_recovers(
    ha: Any, verdaccio: Any, redis_server: Any, session: aiohttp.ClientSession
) -> None:
    proxied = unique("ha-proxied")
    await publish_upstream(verdaccio, proxied, "1.0.0")
    cluster = await ha(3)
    base = cluster.registry_url
    local = unique("ha-local")
    status, text = await put_json(session, base + local, publish_body(local, "1.0.0", base), cluster.user_token)
    assert status == 201, text
    reads = [
        base + local,
        f"{base}{local}/-/{local}-1.0.0.tgz",
        base + proxied,
        f"{base}{proxied}/-/{proxied}-1.0.0.tgz",
    ]
    for url in reads:
        assert (await get(session, url))[0] == 200

    redis_server.stop()
    try:
        for index in range(3):
            status, body = await cluster.health(index)
            assert status == 200 and body["status"] == "degraded", body
        for _ in range(3):  # every replica, through nginx
            for url in reads:
                status, body = await get(session, url)
                assert status == 200, (url, body)
        status, text = await put_json(session, base + local, publish_body(local, "1.1.0", base), cluster.user_token)
        assert status == 201, text
        for replica in cluster.replicas:
            status, doc = await get(session, f"{replica.url}/registries/{REGISTRY}/{local}")
            assert status == 200 and "1.1.0" in doc["versions"], doc
    finally:
        redis_server.start()

    async def recovered() -> bool:
        healths = await asyncio.gather(*(cluster.health(i) for i in range(3)))
        return all(status == 200 and body["status"] == "ok" for status, body in healths)

    took = await eventually(recovered, "health is ok again on every replica after Redis came back")
    print(f"\nRedis back: every replica healthy again after {took:.1f}s")
    status, text = await put_json(session, base + local, publish_body(local, "1.2.0", base), cluster.user_token)
    assert status == 201, text
    for replica in cluster.replicas:
        status, doc = await get(session, f"{replica.url}/registries/{REGISTRY}/{local}")
        assert {"1.0.0", "1.1.0", "1.2.0"} <= set(doc["versions"]), doc


# --- 7. S3 down ------------------------------------------------------------------------------------


async def test_storage_down_fails_clearly_and_recovers(ha: Any, seaweedfs: Any, session: aiohttp.ClientSession) -> None:
    cluster = await ha(3)
    base = cluster.registry_url
    local = unique("ha-local")
    status, text = await put_json(session, base + local, publish_body(local, "1.0.0", base), cluster.user_token)
    assert status == 201, text
    tarball = f"{base}{local}/-/{local}-1.0.0.tgz"

    seaweedfs.stop()
    try:
        status, body = await get(session, tarball)
        assert status == 503 and "storage unavailable" in body["error"], body
        status, text = await put_json(session, base + local, publish_body(local, "1.1.0", base), cluster.user_token)
        assert status == 503 and "storage unavailable" in json.loads(text)["error"], text
        for index, replica in enumerate(cluster.replicas):
            status, body = await cluster.health(index)
            assert status == 503 and body["checks"]["storage"] != "ok", body
            status, doc = await get(session, f"{replica.url}/registries/{REGISTRY}/{local}")
            assert status == 200 and set(doc["versions"]) == {"1.0.0"}, doc
    finally:
        seaweedfs.start()

    async def recovered() -> bool:
        healths = await asyncio.gather(*(cluster.health(i) for i in range(3)))
        return all(status == 200 for status, _ in healths)

    took = await eventually(recovered, "health is ok again on every replica after S3 came back")
    print(f"\nS3 back: every replica healthy again after {took:.1f}s")
    assert (await get(session, tarball))[0] == 200
    status, text = await put_json(session, base + local, publish_body(local, "1.1.0", base), cluster.user_token)
    assert status == 201, text
    assert (await get(session, f"{base}{local}/-/{local}-1.1.0.tgz"))[0] == 200


# --- 8. database down ------------------------------------------------------------------------------


async def test_database_down_fails_health_and_recovers(
    ha: Any, postgres_server: Any, session: aiohttp.ClientSession
) -> None:
    cluster = await ha(3)
    base = cluster.registry_url
    local = unique("ha-local")
    status, text = await put_json(session, base + local, publish_body(local, "1.0.0", base), cluster.user_token)
    assert status == 201, text

    postgres_server.stop()
    try:
        for index in range(3):
            status, body = await cluster.health(index)
            assert status == 503 and body["checks"]["database"] != "ok", body
        for replica in cluster.replicas:
            status, text = await put_json(
                session,
                f"{replica.url}/registries/{REGISTRY}/{local}",
                publish_body(local, "1.1.0", base),
                cluster.user_token,
            )
            assert status == 503 and "database unavailable" in json.loads(text)["error"], text
            other = unique("ha-unknown")
            status, body = await get(session, f"{replica.url}/registries/{REGISTRY}/{other}")
            assert status == 503 and "database unavailable" in body["error"], body
    finally:
        postgres_server.start()

    async def recovered() -> bool:
        healths = await asyncio.gather(*(cluster.health(i) for i in range(3)))
        return all(status == 200 for status, _ in healths)

    took = await eventually(recovered, "health is ok again on every replica after PostgreSQL came back")
    print(f"\nPostgreSQL back: every replica healthy again after {took:.1f}s")
    for replica in cluster.replicas:
        status, doc = await get(session, f"{replica.url}/registries/{REGISTRY}/{local}")
        assert status == 200 and set(doc["versions"]) == {"1.0.0"}, doc
    status, text = await put_json(session, base + local, publish_body(local, "1.1.0", base), cluster.user_token)
    assert status == 201, text


# --- 9. crash mid-publish --------------------------------------------------------------------------


def _blob_keys(s3: dict[str, Any], prefix: str) -> set[str]:
    client = s3_client(s3)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=f"{prefix}/npm/blobs/")
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


async def test_crash_mid_publish_leaves_no_version_and_the_sweep_removes_the_blob(
    ha: Any, services: HaServices, session: aiohttp.ClientSession
) -> None:
    cluster = await ha(3, sweep_interval_secs=1, sweep_grace_secs=3)
    base = cluster.registry_url
    kept = unique("ha-kept")
    status, text = await put_json(session, base + kept, publish_body(kept, "1.0.0", base), cluster.user_token)
    assert status == 201, text
    referenced = _blob_keys(services.s3, cluster.name)
    assert len(referenced) == 1

    name = unique("ha-crash")
    tarball = make_tarball(name, "1.0.0", payload=os.urandom(12 * 1024 * 1024))
    head, data, tail = publish_parts(name, "1.0.0", tarball, base)

    async def interrupted_publish(index: int, send_whole_attachment: bool) -> None:
        """Stream the publish to replica `index`, and SIGKILL it while the body still streams."""
        sent = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield head
            cut = len(data) if send_whole_attachment else len(data) // 2
            for start in range(0, cut, 256 * 1024):
                yield data[start : min(cut, start + 256 * 1024)]
            if send_whole_attachment:
                yield tail[:-3]  # the attachment ends; only the document's closing braces are missing
            sent.set()
            await asyncio.sleep(3600)  # the rest never comes: the client is still "sending"
            yield tail[-3:]

        url = f"{cluster.replicas[index].url}/registries/{REGISTRY}/{name}"
        headers = {**cluster.auth(), "Content-Type": "application/json"}
        request = asyncio.create_task(session.put(url, data=body(), headers=headers))
        await asyncio.wait_for(sent.wait(), 30)
        if send_whole_attachment:
            # The attachment is complete: the blob is stored, its rows are not committed yet.
            await eventually(
                lambda: asyncio.to_thread(lambda: len(_blob_keys(services.s3, cluster.name)) == 2),
                "the streamed tarball is in storage",
            )
        else:
            await asyncio.sleep(0.5)
        await cluster.kill(index)
        with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
            response = await request
            response.release()

    await interrupted_publish(0, send_whole_attachment=False)
    assert _blob_keys(services.s3, cluster.name) == referenced  # half a tarball is never an object
    await interrupted_publish(1, send_whole_attachment=True)
    orphans = _blob_keys(services.s3, cluster.name) - referenced
    assert len(orphans) == 1

    for replica in cluster.replicas[2:]:
        status, body = await get(session, f"{replica.url}/registries/{REGISTRY}/{name}")
        assert status == 404, body  # no version, not even a package, is visible
    status, body = await get(session, f"{base}{name}/-/{name}-1.0.0.tgz")
    assert status == 404, body

    took = await eventually(
        lambda: asyncio.to_thread(lambda: _blob_keys(services.s3, cluster.name) == referenced),
        "the sweep deleted the orphaned blob",
    )
    print(f"\norphaned blob swept {took:.1f}s after the crash (grace 3s)")
    status, _ = await get(session, f"{cluster.replicas[2].url}/registries/{REGISTRY}/{kept}/-/{kept}-1.0.0.tgz")
    assert status == 200  # the referenced blob survives the sweep


# --- 10. misconfiguration guard --------------------------------------------------------------------


async def test_replicas_with_per_process_backends_warn(ha: Any) -> None:
    cluster = await ha(2, cache="memory", storage="filesystem")

    async def both_warn() -> bool:
        healths = await asyncio.gather(*(cluster.health(i) for i in range(2)))
        return all(any("other live replica" in w for w in body.get("warnings", [])) for _, body in healths)

    took = await eventually(both_warn, "both replicas report the unsafe set-up in health", within=30)
    print(f"\nboth replicas warned within {took:.1f}s")
    status, body = await cluster.health(0)
    assert status == 200  # a warning, not an outage
    warning = next(w for w in body["warnings"] if "other live replica" in w)
    assert '[cache] type "memory"' in warning and '[storage] type "filesystem"' in warning
    for replica in cluster.replicas:
        assert "UNSAFE REPLICA SET-UP" in replica.logs()
