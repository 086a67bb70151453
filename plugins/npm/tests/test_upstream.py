"""UpstreamProxy against a real upstream registry (Verdaccio), real storage, a real database and the
memory cache: what an npm user behind the hub would notice — how often the upstream is asked, what
happens when it is down, and that no tampered tarball is ever stored.

A few tests need an upstream that misbehaves on purpose (tampered tarballs, 404s, 500s, audit); for
those a tiny aiohttp registry is started on a loopback port, as a second upstream would be.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import logging
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from batlehub_npm.upstream import UpstreamProxy

from batlehub.artifacts import blob_key
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.builtin.cache_postgres import PostgresCache
from batlehub.builtin.storage_filesystem import FilesystemStorage
from batlehub.config import RegistrySettings, Settings
from batlehub.db import PostgresDatabase, SqliteDatabase
from batlehub.errors import IntegrityError, UpstreamError
from batlehub.interfaces import CacheBackend
from batlehub.registries import RegistryServices
from batlehub.sri import sri_to_hex
from batlehub.sweep import sweep_orphans
from batlehub.testing.registries import registry_services
from batlehub.upstream import STORED_BODY_MIN_BYTES

REGISTRY = RegistrySettings(type="npm", name="npm", rbac={}, rate_limit=None, quota=None, options={})


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    yield session
    await session.close()


@pytest.fixture
async def storage(tmp_path: Path) -> FilesystemStorage:
    backend = FilesystemStorage(tmp_path / "storage")
    await backend.open()
    return backend


@pytest.fixture(params=["sqlite"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "postgresql":
        database: Any = PostgresDatabase(request.getfixturevalue("fresh_postgres_url"), max_connections=4)
    else:
        database = SqliteDatabase(tmp_path / "hub.db")
    await database.connect()
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
def make_services(
    tmp_path: Path, db: Any, storage: FilesystemStorage, http: aiohttp.ClientSession
) -> Callable[..., RegistryServices]:
    """Services of one replica: the database and storage are shared, the cache is passed in."""

    def make(cache: CacheBackend, cache_type: str = "memory") -> RegistryServices:
        settings = Settings(data_dir=tmp_path, cache={"type": cache_type})
        return registry_services(settings, REGISTRY, db=db, cache=cache, storage=storage, http=http)

    return make


@pytest.fixture
def cache() -> MemoryCache:
    return MemoryCache()


@pytest.fixture
def services(make_services: Callable[..., RegistryServices], cache: MemoryCache) -> RegistryServices:
    return make_services(cache)


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., UpstreamProxy]]:
    made: list[UpstreamProxy] = []

    def make(
        services: RegistryServices,
        upstreams: list[str],
        *,
        ttl: float = 300,
        serve_stale: bool = True,
        warm: list[str] | None = None,
    ) -> UpstreamProxy:
        proxy = UpstreamProxy(
            services,
            upstreams=upstreams,
            metadata_ttl_secs=ttl,
            serve_stale=serve_stale,
            warm_packages=warm or [],
        )
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


def unique(prefix: str = "up") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_tarball(name: str, version: str, extra: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for path, content in (
            ("package/package.json", json.dumps({"name": name, "version": version}).encode()),
            ("package/index.js", b"module.exports = 1;\n" + extra),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def dist_for(tarball: bytes, url: str) -> dict[str, str]:
    return {
        "tarball": url,
        "shasum": hashlib.sha1(tarball).hexdigest(),
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
    }


async def publish(http: aiohttp.ClientSession, registry: Any, name: str, version: str, readme: str = "readme") -> bytes:
    """Publish to Verdaccio the way the npm CLI does (one PUT with the tarball attached)."""
    tarball = make_tarball(name, version)
    basename = name.split("/")[-1]
    filename = f"{basename}-{version}.tgz"
    document = {
        "_id": name,
        "name": name,
        "description": "upstream test package",
        "readme": readme,
        "dist-tags": {"latest": version},
        "versions": {
            version: {
                "name": name,
                "version": version,
                "description": "upstream test package",
                "readme": readme,
                "dist": dist_for(tarball, f"{registry.url}{name}/-/{filename}"),
            }
        },
        "_attachments": {
            filename: {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(tarball).decode(),
                "length": len(tarball),
            }
        },
    }
    async with http.put(
        f"{registry.url}{name.replace('/', '%2f')}",
        json=document,
        headers={"Authorization": f"Bearer {registry.token}"},
    ) as resp:
        assert resp.status in (200, 201), await resp.text()
    return tarball


class LocalUpstream:
    """A small npm-like registry on a loopback port, for upstream behaviour Verdaccio will not show."""

    def __init__(self) -> None:
        self.requests: list[web.Request] = []
        self.bodies: list[bytes] = []
        self.packuments: dict[str, dict[str, Any]] = {}
        self.tarballs: dict[str, bytes] = {}
        self.status: int | None = None
        self.delay = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        self.bodies.append(await request.read())
        await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.json_response({"error": "forced"}, status=self.status)
        path = request.path_qs.lstrip("/")
        if request.method == "POST" and path.startswith("-/npm/v1/security/"):
            return web.json_response({"echo": path}, status=200)
        if path in self.tarballs:
            return web.Response(body=self.tarballs[path], content_type="application/octet-stream")
        packument = self.packuments.get(request.raw_path.lstrip("/"))
        if packument is not None:
            # Always the full form, whatever the Accept header says, as simple registries do.
            body = json.dumps(packument).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            return web.Response(body=body, content_type="application/json", headers={"ETag": etag})
        return web.json_response({"error": "not found"}, status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def local_upstream() -> AsyncIterator[LocalUpstream]:
    server = LocalUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def dead_upstream() -> str:
    """The URL of a port nothing listens on: an upstream that is down."""
    server = LocalUpstream()
    await server.start()
    url = server.url
    await server.stop()
    return url


def data(doc: Any) -> Any:
    """What an upstream document says (documents are kept as the bytes the upstream sent)."""
    return json.loads(doc.body)


async def stored_keys(storage: FilesystemStorage) -> list[str]:
    return [stat.key async for stat in storage.list("npm/")]


# --- packuments ---------------------------------------------------------------------------------


async def test_fetch_once_then_served_from_cache(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [verdaccio.url])

    first = await proxy.packument(name)
    assert first is not None
    assert data(first)["name"] == name and "1.0.0" in data(first)["versions"]
    assert first.upstream == verdaccio.url and not first.stale and first.variant == "full"
    for _ in range(5):
        again = await proxy.packument(name)
        assert again is not None and data(again)["versions"].keys() == data(first)["versions"].keys()

    assert proxy.stats.metadata_requests == 1
    assert verdaccio.request_count(f"/{name}") == 1


async def test_scoped_package_is_requested_with_an_escaped_slash(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = f"@{unique('scope')}/pkg"
    await publish(http, verdaccio, name, "2.0.0")
    proxy = proxies(services, [verdaccio.url])

    doc = await proxy.packument(name)

    assert doc is not None and data(doc)["name"] == name
    assert verdaccio.request_count(f"/{name.replace('/', '%2f')}") == 1


async def test_abbreviated_is_asked_for_only_when_wanted(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0", readme="a long readme")
    proxy = proxies(services, [verdaccio.url])

    small = await proxy.packument(name, abbreviated=True)
    assert small is not None and small.variant == "abbreviated"
    assert "readme" not in data(small) and "dist" in data(small)["versions"]["1.0.0"]

    # The abbreviated form cannot answer a full request...
    full = await proxy.packument(name)
    assert full is not None and full.variant == "full" and data(full)["readme"] == "a long readme"
    assert proxy.stats.metadata_requests == 2
    # ...but each is cached for its own kind of request.
    assert (await proxy.packument(name, abbreviated=True)).variant == "abbreviated"  # type: ignore[union-attr]
    assert proxy.stats.metadata_requests == 2


async def test_a_cached_full_document_answers_abbreviated_requests(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [verdaccio.url])

    await proxy.packument(name)
    doc = await proxy.packument(name, abbreviated=True)

    assert doc is not None and "1.0.0" in data(doc)["versions"]
    assert proxy.stats.metadata_requests == 1


async def test_an_upstream_without_the_abbreviated_form_is_still_revalidated(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], local_upstream: LocalUpstream
) -> None:
    name = unique()
    local_upstream.packuments[name] = {"name": name, "readme": "r", "dist-tags": {}, "versions": {}}
    proxy = proxies(services, [local_upstream.url], ttl=0.1)

    first = await proxy.packument(name, abbreviated=True)
    await asyncio.sleep(0.2)
    second = await proxy.packument(name, abbreviated=True)

    assert first is not None and second is not None and second.variant == "full"
    assert proxy.stats.metadata_downloads == 1 and proxy.stats.not_modified == 1
    # The renewed full copy answers full requests too.
    assert (await proxy.packument(name)) is not None and proxy.stats.metadata_requests == 2


async def test_404_and_errors_fall_through_to_the_next_upstream(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    services: RegistryServices,
    proxies: Callable[..., UpstreamProxy],
    local_upstream: LocalUpstream,
    dead_upstream: str,
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [dead_upstream, local_upstream.url, verdaccio.url])

    doc = await proxy.packument(name)

    assert doc is not None and doc.upstream == verdaccio.url
    assert len(local_upstream.requests) == 1  # asked, answered 404, moved on
    assert proxy.stats.not_found == 1 and proxy.stats.failures == 1

    # A 5xx falls through the same way.
    local_upstream.status = 500
    assert await proxy.packument(name, revalidate=True) is not None


async def test_unknown_everywhere_is_none(
    verdaccio: Any, services: RegistryServices, proxies: Callable[..., UpstreamProxy], local_upstream: LocalUpstream
) -> None:
    proxy = proxies(services, [local_upstream.url, verdaccio.url])

    assert await proxy.packument(unique("missing")) is None
    assert proxy.stats.not_found == 2


async def test_fifty_concurrent_requests_make_one_upstream_request(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [verdaccio.url])

    docs = await asyncio.gather(*(proxy.packument(name) for _ in range(50)))

    assert all(d is not None and "1.0.0" in data(d)["versions"] for d in docs)
    assert proxy.stats.metadata_requests == 1
    assert verdaccio.request_count(f"/{name}") == 1


async def test_a_replica_that_died_holding_the_lease_delays_others_only_briefly(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    services: RegistryServices,
    cache: MemoryCache,
    proxies: Callable[..., UpstreamProxy],
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    # What a replica that crashed mid-fetch leaves behind: a lease that nobody will release.
    assert await cache.acquire_lease(f"npm:lease:up:npm:full:{name}", "crashed-replica", 0.5)
    proxy = proxies(services, [verdaccio.url])

    started = time.monotonic()
    doc = await proxy.packument(name)

    assert doc is not None and "1.0.0" in data(doc)["versions"]
    assert 0.4 < time.monotonic() - started < 3
    assert proxy.stats.metadata_requests == 1


@pytest.fixture(params=["memory", "redis", "postgres"])
async def replica_caches(
    request: pytest.FixtureRequest, make_services: Callable[..., RegistryServices]
) -> AsyncIterator[Callable[[], Awaitable[RegistryServices]]]:
    """Cache clients for several replicas that share one cache: the same memory object (replicas
    simulated in one process), or one client each on a real Redis / PostgreSQL."""
    opened: list[CacheBackend] = []
    shared = MemoryCache()
    prefix = f"t{uuid.uuid4().hex[:8]}_"

    async def make() -> RegistryServices:
        if request.param == "memory":
            return make_services(shared)
        if request.param == "redis":
            redis_backend = pytest.importorskip("batlehub_cache_redis.backend")
            cache: Any = redis_backend.RedisCache(request.getfixturevalue("redis_url"), prefix=prefix)
        else:
            cache = PostgresCache(request.getfixturevalue("postgres_url"), table_prefix=prefix)
        await cache.open()
        opened.append(cache)
        return make_services(cache, request.param)

    yield make
    for cache in opened:
        await cache.close()


async def test_replicas_sharing_a_cache_make_one_upstream_request(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    replica_caches: Callable[[], Awaitable[RegistryServices]],
    proxies: Callable[..., UpstreamProxy],
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    replicas = [proxies(await replica_caches(), [verdaccio.url]) for _ in range(3)]

    docs = await asyncio.gather(*(replicas[i % 3].packument(name) for i in range(60)))

    # Another replica's copy is read from the shared cache or the database when it is needed.
    bodies = [await replicas[i % 3].documents.read(d) for i, d in enumerate(docs) if d is not None]
    assert len(bodies) == 60 and all("1.0.0" in json.loads(b)["versions"] for b in bodies)
    assert sum(r.stats.metadata_requests for r in replicas) == 1
    assert verdaccio.request_count(f"/{name}") == 1


async def test_expired_copy_is_revalidated_without_a_download(
    verdaccio: Any, http: aiohttp.ClientSession, services: RegistryServices, proxies: Callable[..., UpstreamProxy]
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [verdaccio.url], ttl=0.3)

    first = await proxy.packument(name)
    await asyncio.sleep(0.4)
    second = await proxy.packument(name)

    assert first is not None and second is not None
    assert proxy.stats.metadata_requests == 2
    assert proxy.stats.not_modified == 1 and proxy.stats.metadata_downloads == 1
    assert second.content_id == first.content_id and second.fetched_at > first.fetched_at
    # The 304 made the copy fresh again: no request within the TTL.
    await proxy.packument(name)
    assert proxy.stats.metadata_requests == 2

    # A change upstream is seen once the copy expires.
    await publish(http, verdaccio, name, "1.1.0")
    await asyncio.sleep(0.4)
    third = await proxy.packument(name)
    assert third is not None and "1.1.0" in data(third)["versions"]
    assert third.content_id != first.content_id
    assert proxy.stats.metadata_downloads == 2


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
async def test_upstream_down_serves_the_last_good_copy_even_after_a_restart(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    make_services: Callable[..., RegistryServices],
    proxies: Callable[..., UpstreamProxy],
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(make_services(MemoryCache()), [verdaccio.url], ttl=0.2)
    good = await proxy.packument(name)
    assert good is not None

    verdaccio.stop()
    try:
        await asyncio.sleep(0.3)
        stale = await proxy.packument(name)
        assert stale is not None and stale.stale and data(stale) == data(good)

        # A restarted hub has an empty memory cache: the copy comes from the database (a clean
        # shutdown lets the copy written after answering land first).
        await proxy.settle()
        restarted = proxies(make_services(MemoryCache()), [verdaccio.url], ttl=0.2)
        from_db = await restarted.packument(name)
        assert from_db is not None and from_db.stale
        assert data(from_db)["versions"].keys() == data(good)["versions"].keys()
        assert from_db.upstream == verdaccio.url

        strict = proxies(make_services(MemoryCache()), [verdaccio.url], serve_stale=False)
        with pytest.raises(UpstreamError, match=name):
            await strict.packument(name)
    finally:
        verdaccio.start()

    # Back up: fresh again.
    await asyncio.sleep(0.3)
    fresh = await proxy.packument(name, revalidate=True)
    assert fresh is not None and not fresh.stale


@pytest.mark.parametrize("fault", ["503", "timeout"])
async def test_failing_upstream_serves_stale_and_backs_off(
    fault: str,
    services: RegistryServices,
    proxies: Callable[..., UpstreamProxy],
    local_upstream: LocalUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = unique()
    local_upstream.packuments[name] = {"name": name, "dist-tags": {}, "versions": {}}
    proxy = proxies(services, [local_upstream.url], ttl=0.1)
    proxy.documents.metadata_timeout = aiohttp.ClientTimeout(total=0.3)
    assert await proxy.packument(name) is not None

    if fault == "503":
        local_upstream.status = 503
    else:
        local_upstream.delay = 1.0
    await asyncio.sleep(0.2)
    docs = [await proxy.packument(name) for _ in range(5)]

    assert all(d is not None and d.stale and data(d)["name"] == name for d in docs)
    # One failed attempt; then the outage is remembered for a while instead of retried per request.
    assert len(local_upstream.requests) == 2
    assert proxy.stats.stale_served == 5
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "stale copy" in r.getMessage()]
    assert len(warnings) == 1 and name in warnings[0].getMessage()


async def test_a_big_document_is_kept_in_storage_not_the_database(
    db: Any,
    storage: FilesystemStorage,
    make_services: Callable[..., RegistryServices],
    proxies: Callable[..., UpstreamProxy],
    local_upstream: LocalUpstream,
) -> None:
    """A multi-MB body in the database bloats it and holds SQLite's one connection while it is
    written: it goes to storage, the row names it, and every path that reads it back still works."""
    name = unique()
    versions = {f"1.0.{i}": {"name": name, "version": f"1.0.{i}", "description": "d" * 2000} for i in range(800)}
    local_upstream.packuments[name] = {"name": name, "dist-tags": {"latest": "1.0.799"}, "versions": versions}
    proxy = proxies(make_services(MemoryCache()), [local_upstream.url], ttl=0.1)
    good = await proxy.packument(name)
    assert good is not None and len(good.body or b"") > STORED_BODY_MIN_BYTES
    await proxy.settle()

    row = await db.fetchrow("SELECT body, body_key, size FROM upstream_documents WHERE name = $1", name)
    assert row["body_key"] and row["size"] == len(good.body or b"")
    assert len(row["body"]) < 1000  # the header only
    assert await storage.stat(row["body_key"]) is not None
    assert (await sweep_orphans(db, storage, grace_secs=0)).deleted == []

    # A restarted hub, upstream failing: the stale copy is read back from storage.
    local_upstream.status = 503
    restarted = proxies(make_services(MemoryCache()), [local_upstream.url], ttl=0.1)
    stale = await restarted.packument(name)
    assert stale is not None and stale.stale
    assert await restarted.documents.read(stale) == good.body

    # New content upstream: the row names a new blob, and the old one is left to the sweep.
    local_upstream.status = None
    versions["1.0.800"] = {"name": name, "version": "1.0.800", "description": "new"}
    await asyncio.sleep(0.15)
    newer = await proxy.packument(name)
    assert newer is not None and b"1.0.800" in await proxy.documents.read(newer)
    await proxy.settle()
    assert (await sweep_orphans(db, storage, grace_secs=0)).deleted == [row["body_key"]]
    renewed = await restarted.packument(name, revalidate=True)
    assert renewed is not None and b"1.0.800" in await restarted.documents.read(renewed)


async def test_an_outage_logs_a_line_an_interval_not_a_line_a_package(
    services: RegistryServices,
    proxies: Callable[..., UpstreamProxy],
    dead_upstream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An `npm ci` during an outage asked for hundreds of packages: one warning line each."""
    proxy = proxies(services, [dead_upstream])
    caplog.set_level(logging.WARNING, logger="batlehub.upstream")
    for _ in range(20):
        with pytest.raises(UpstreamError):
            await proxy.packument(unique())
    lines = [r.getMessage() for r in caplog.records if "cannot fetch" in r.getMessage()]
    assert len(lines) == 1, lines


async def test_no_copy_and_upstream_down_is_a_clear_error(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], dead_upstream: str
) -> None:
    name = unique()
    proxy = proxies(services, [dead_upstream])

    with pytest.raises(UpstreamError) as caught:
        await proxy.packument(name)

    assert caught.value.status == 502
    message = caught.value.message
    # Which of the configured upstreams failed, and how (by its origin: never a path or credentials).
    origin = dead_upstream.rstrip("/")
    assert message == f"package {name} is not cached, and its upstream registry failed: {origin} (connection failed)"


class BrokenCache(MemoryCache):
    """A cache backend whose service is down: every call fails the way a lost connection does."""

    def __getattribute__(self, attr: str) -> Any:
        if attr in {"get", "get_stale", "set", "acquire_lease", "release_lease", "extend_lease"}:

            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionError("cache backend is down")

            return fail
        return super().__getattribute__(attr)


async def test_a_failing_cache_backend_never_fails_a_request(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    make_services: Callable[..., RegistryServices],
    proxies: Callable[..., UpstreamProxy],
    dead_upstream: str,
) -> None:
    name = unique()
    await publish(http, verdaccio, name, "1.0.0")
    healthy = proxies(make_services(BrokenCache()), [verdaccio.url])
    assert (await healthy.packument(name)) is not None
    await healthy.settle()  # the durable copy is written after answering

    # Cache down and upstream down: the database still answers.
    outage = proxies(make_services(BrokenCache()), [dead_upstream])
    doc = await outage.packument(name)
    assert doc is not None and doc.stale and "1.0.0" in data(doc)["versions"]


# --- tarballs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
async def test_tarball_is_verified_stored_once_and_recorded(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    services: RegistryServices,
    make_services: Callable[..., RegistryServices],
    db: Any,
    storage: FilesystemStorage,
    proxies: Callable[..., UpstreamProxy],
) -> None:
    name = unique()
    tarball = await publish(http, verdaccio, name, "1.0.0")
    proxy = proxies(services, [verdaccio.url])
    doc = await proxy.packument(name)
    assert doc is not None
    dist = data(doc)["versions"]["1.0.0"]["dist"]

    keys = await asyncio.gather(*(proxy.tarball(name, "1.0.0", dist) for _ in range(10)))

    expected_key = blob_key("npm", hashlib.sha512(tarball).hexdigest())
    assert set(keys) == {expected_key}
    assert b"".join([chunk async for chunk in storage.get(expected_key)]) == tarball
    await proxy.settle()  # the artifacts row is written after answering
    row = await db.fetchrow("SELECT size, sha1 FROM artifacts WHERE storage_key = $1", expected_key)
    assert row == {"size": len(tarball), "sha1": hashlib.sha1(tarball).hexdigest()}
    assert proxy.stats.artifact_downloads == 1
    assert verdaccio.request_count(f"/{name}/-/{name}-1.0.0.tgz") == 1

    # Stored: later requests never go upstream, even with the upstream gone (another process, too).
    offline = proxies(make_services(MemoryCache()), ["http://127.0.0.1:9/"])
    assert await offline.tarball(name, "1.0.0", dist) == expected_key
    assert offline.stats.artifact_downloads == 0


@pytest.mark.parametrize("announce", ["integrity", "shasum"])
async def test_tampered_tarball_is_refused_and_nothing_is_stored(
    announce: str,
    services: RegistryServices,
    db: Any,
    storage: FilesystemStorage,
    proxies: Callable[..., UpstreamProxy],
    local_upstream: LocalUpstream,
) -> None:
    name = unique("tampered")
    genuine = make_tarball(name, "1.0.0")
    path = f"{name}/-/{name}-1.0.0.tgz"
    dist = dist_for(genuine, local_upstream.url + path)
    dist.pop("shasum" if announce == "integrity" else "integrity")
    local_upstream.packuments[name] = {
        "name": name,
        "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {"name": name, "version": "1.0.0", "dist": dist}},
    }
    local_upstream.tarballs[path] = make_tarball(name, "1.0.0", extra=b"// a backdoor\n")
    proxy = proxies(services, [local_upstream.url])
    doc = await proxy.packument(name)
    assert doc is not None

    with pytest.raises(IntegrityError) as caught:
        await proxy.tarball(name, "1.0.0", data(doc)["versions"]["1.0.0"]["dist"])

    assert caught.value.status == 422
    assert (
        f"integrity check failed for the tarball of {name}@1.0.0: upstream bytes do not match" in caught.value.message
    )
    assert await stored_keys(storage) == []
    await proxy.settle()
    assert await db.fetchval("SELECT COUNT(*) FROM artifacts") == 0


async def test_tarball_without_any_digest_is_refused(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], local_upstream: LocalUpstream
) -> None:
    proxy = proxies(services, [local_upstream.url])

    with pytest.raises(IntegrityError, match=r"cannot verify the tarball of x@1\.0\.0"):
        await proxy.tarball("x", "1.0.0", {"tarball": local_upstream.url + "x/-/x-1.0.0.tgz"})

    assert local_upstream.requests == []


def test_sri_to_hex_reads_every_algorithm_and_skips_garbage() -> None:
    data = b"hello"
    sri = (
        f"sha512-{base64.b64encode(hashlib.sha512(data).digest()).decode()}?opt "
        f"sha1-{base64.b64encode(hashlib.sha1(data).digest()).decode()} sha256-!!notbase64"
    )
    assert sri_to_hex(sri) == {"sha512": hashlib.sha512(data).hexdigest(), "sha1": hashlib.sha1(data).hexdigest()}
    with pytest.raises(ValueError):
        blob_key("npm", "../../etc")


# --- audit --------------------------------------------------------------------------------------


async def test_audit_is_forwarded_to_the_first_upstream_as_is(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], local_upstream: LocalUpstream, verdaccio: Any
) -> None:
    proxy = proxies(services, [local_upstream.url, verdaccio.url])
    plain = json.dumps({"lodash": ["4.17.20"]}).encode()
    body = gzip.compress(plain)

    status, content_type, answer = await proxy.audit(
        "advisories/bulk",
        body,
        {"Content-Type": "application/json", "Content-Encoding": "gzip", "Authorization": "Bearer secret"},
    )

    assert status == 200 and json.loads(answer) == {"echo": "-/npm/v1/security/advisories/bulk"}
    assert content_type.startswith("application/json")
    sent = local_upstream.requests[0]
    assert sent.headers["Content-Encoding"] == "gzip" and "Authorization" not in sent.headers
    # The upstream got the gzip bytes with their encoding, so it could decode them.
    assert local_upstream.bodies[0] == plain


async def test_audit_with_the_upstream_down_is_a_502(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], dead_upstream: str
) -> None:
    proxy = proxies(services, [dead_upstream])

    with pytest.raises(UpstreamError, match="audit"):
        await proxy.audit("audits/quick", b"{}", {"Content-Type": "application/json"})


# --- warm-up ------------------------------------------------------------------------------------


async def test_warm_up_runs_once_across_replicas(
    verdaccio: Any,
    http: aiohttp.ClientSession,
    make_services: Callable[..., RegistryServices],
    storage: FilesystemStorage,
    proxies: Callable[..., UpstreamProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    latest, pinned = unique("warm"), unique("warm")
    await publish(http, verdaccio, latest, "1.0.0")
    await publish(http, verdaccio, latest, "2.0.0")
    old = await publish(http, verdaccio, pinned, "1.0.0")
    await publish(http, verdaccio, pinned, "1.1.0")
    specs = [latest, f"{pinned}@1.0.0", unique("absent")]
    shared = MemoryCache()
    replicas = [proxies(make_services(shared), [verdaccio.url], warm=specs) for _ in range(2)]

    caplog.set_level("INFO", logger="batlehub.coordination")
    await asyncio.gather(*(r.warm() for r in replicas))

    assert sum(r.stats.artifact_downloads for r in replicas) == 2
    assert verdaccio.request_count(f"/{latest}/-/{latest}-2.0.0.tgz") == 1
    assert verdaccio.request_count(f"/{pinned}/-/{pinned}-1.0.0.tgz") == 1
    assert verdaccio.request_count(f"/{latest}/-/{latest}-1.0.0.tgz") == 0
    assert blob_key("npm", hashlib.sha512(old).hexdigest()) in await stored_keys(storage)
    assert f"warm-up 2/3: {pinned}@1.0.0" in caplog.text

    # A replica started later finds the work done.
    late = proxies(make_services(shared), [verdaccio.url], warm=specs)
    await late.warm()
    assert late.stats.artifact_downloads == 0 and late.stats.metadata_requests <= 1


async def test_warm_up_never_raises_when_the_upstream_is_down(
    services: RegistryServices, proxies: Callable[..., UpstreamProxy], dead_upstream: str
) -> None:
    proxy = proxies(services, [dead_upstream], warm=["left-pad", "@s/x@1.0.0"])

    started = time.monotonic()
    await proxy.warm()

    assert proxy.stats.failures == 2 and time.monotonic() - started < 10
