"""Retention of proxied content, on a real database, filesystem storage and a real HTTP upstream:
least recently used out first down to the cap, idle content out, and never what the upstream could
not give back (pulled there, or the upstream down), nor a blob another registry or a local package
still has. Evicted content is fetched again on demand."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from batlehub.builtin.cache_memory import MemoryCache
from batlehub.builtin.storage_filesystem import FilesystemStorage
from batlehub.config import RegistrySettings, RetentionSettings, Settings
from batlehub.db import PostgresDatabase, SqliteDatabase
from batlehub.registries import RegistryServices
from batlehub.testing.registries import registry_services
from batlehub.upstream import DocumentFormat, UpstreamDocuments

BLOB = 100_000


def check(body: bytes) -> bytes:
    json.loads(body)
    return body


FORMAT = DocumentFormat(path=lambda name: f"docs/{name}", accept={"doc": "application/json"}, check=check)


class Upstream:
    """Documents and files by name; `down` answers 503, `gone` names answer 404."""

    def __init__(self) -> None:
        self.files = {f"f{i}": bytes([i]) * BLOB for i in range(8)}
        self.docs = {f"d{i}": json.dumps({"name": f"d{i}", "pad": "x" * 20_000}).encode() for i in range(4)}
        self.gone: set[str] = set()
        self.down = False
        self.downloads: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind, name = request.match_info["kind"], request.match_info["name"]
        if self.down:
            return web.Response(status=503)
        body = (self.files if kind == "files" else self.docs).get(name)
        if body is None or name in self.gone:
            return web.Response(status=404)
        if request.method == "GET" and kind == "files":
            self.downloads.append(name)
        return web.Response(body=body, content_type="application/octet-stream")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{kind}/{name}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    yield server
    await runner.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
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
async def storage(tmp_path: Path) -> FilesystemStorage:
    backend = FilesystemStorage(tmp_path / "storage")
    await backend.open()
    return backend


class Registry:
    """One proxying registry's services, with helpers to fetch what a client would."""

    def __init__(self, services: RegistryServices, upstream: Upstream) -> None:
        self.services = services
        self.upstream = upstream
        self.documents: UpstreamDocuments = services.upstream_documents(
            FORMAT, upstreams=[upstream.url], metadata_ttl_secs=300, serve_stale=True
        )
        self.retention = services.retention
        self.retention.delete_grace_secs = 0

    async def file(self, name: str) -> str:
        body = self.upstream.files[name]
        key = await self.services.artifacts.fetch(
            f"{self.upstream.url}files/{name}", {"sha512": hashlib.sha512(body).hexdigest()}, what=name
        )
        await self.services.settle()
        return key

    async def doc(self, name: str) -> None:
        assert await self.documents.get(name) is not None
        await self.services.settle()

    async def used(self, *names: str, at: float) -> None:
        """Serve files and documents, as clients would, then date their last use to `at`."""
        for name in names:
            if name.startswith("f"):
                await self.file(name)
            else:
                await self.doc(name)
        self.services.uses._written.clear()
        await self.services.uses.flush()
        db, registry = self.services._db, self.services.registry.name
        for name in names:
            if name.startswith("f"):
                await db.execute(
                    "UPDATE cached_artifacts SET last_used = $1 WHERE registry = $2 AND what = $3", at, registry, name
                )
            else:
                await db.execute(
                    "UPDATE upstream_documents SET last_used = $1 WHERE registry = $2 AND name = $3", at, registry, name
                )

    async def run(self, **settings: Any) -> Any:
        self.retention.settings = RetentionSettings(**settings)
        report = await self.retention.run()
        await self.retention.settle()
        return report


@pytest.fixture
async def make_registry(
    tmp_path: Path, db: Any, storage: FilesystemStorage, upstream: Upstream
) -> AsyncIterator[Callable[..., Registry]]:
    made: list[RegistryServices] = []
    async with aiohttp.ClientSession() as http:

        def make(name: str = "proxy", cache: MemoryCache | None = None) -> Registry:
            settings = Settings(data_dir=tmp_path)
            registry = RegistrySettings(type="npm", name=name, rbac={}, rate_limit=None, quota=None, options={})
            services = registry_services(
                settings, registry, db=db, cache=cache or MemoryCache(), storage=storage, http=http
            )
            made.append(services)
            return Registry(services, upstream)

        yield make
        for services in made:
            await services.close()


async def blob_keys(storage: FilesystemStorage) -> set[str]:
    return {stat.key async for stat in storage.list("npm/blobs/")}


async def test_least_recently_used_go_first_down_to_the_cap(make_registry: Any, storage: FilesystemStorage) -> None:
    registry = make_registry()
    keys = {name: await registry.file(name) for name in ("f0", "f1", "f2", "f3", "f4")}
    now = time.time()
    for age, name in enumerate(["f4", "f3", "f2", "f1", "f0"]):  # f0 the least recently used
        await registry.used(name, at=now - 1000 * age)

    report = await registry.run(max_bytes=3 * BLOB)

    assert [item["what"] for item in report.evicted] == ["f0", "f1"]
    assert (report.evicted_count, report.reclaimed_bytes) == (2, 2 * BLOB)
    assert (report.bytes_before, report.bytes_after) == (5 * BLOB, 3 * BLOB)
    assert await blob_keys(storage) == {keys["f2"], keys["f3"], keys["f4"]}
    assert (await registry.retention.usage())["artifacts"] == {"count": 3, "bytes": 3 * BLOB}

    # An evicted file is fetched again on demand (the memo of it as stored is forgotten).
    registry.upstream.downloads.clear()
    assert await registry.file("f0") == keys["f0"]
    assert registry.upstream.downloads == ["f0"]
    assert keys["f0"] in await blob_keys(storage)


async def test_idle_content_goes_whatever_the_size(make_registry: Any, storage: FilesystemStorage) -> None:
    registry = make_registry()
    now = time.time()
    await registry.used("f0", "d0", at=now - 40 * 86400)
    await registry.used("f1", "d1", at=now - 3600)

    report = await registry.run(max_idle_days=30)

    assert sorted(item["what"] for item in report.evicted) == ["d0 (doc)", "f0"]
    remaining = await registry.services._db.fetch("SELECT name FROM upstream_documents")
    assert [r["name"] for r in remaining] == ["d1"]
    # The evicted document is asked of the upstream again, and kept again.
    assert await registry.documents.get("d0") is not None


async def test_what_the_upstream_no_longer_has_keeps_its_last_copy(
    make_registry: Any, upstream: Upstream, storage: FilesystemStorage
) -> None:
    registry = make_registry()
    now = time.time()
    await registry.used("f0", "f1", at=now - 86400)
    upstream.gone.add("f0")

    report = await registry.run(max_bytes=1)

    assert [item["what"] for item in report.evicted] == ["f1"]
    assert [item["what"] for item in report.kept_not_upstream] == ["f0"]
    assert len(await blob_keys(storage)) == 1


async def test_an_unreachable_upstream_stops_the_run_and_nothing_goes(
    make_registry: Any, upstream: Upstream, storage: FilesystemStorage, caplog: pytest.LogCaptureFixture
) -> None:
    registry = make_registry()
    await registry.used("f0", "f1", "f2", "f3", "f4", "f5", "d0", "d1", at=time.time() - 86400)
    before = await blob_keys(storage)
    upstream.down = True

    with caplog.at_level(logging.INFO, logger="batlehub.retention"):
        report = await registry.run(max_bytes=1)

    assert report.evicted_count == 0 and report.kept_unchecked == 8
    assert "does not answer" in report.stopped
    assert await blob_keys(storage) == before
    assert "stopped early" in caplog.text


async def test_a_dry_run_lists_and_keeps(make_registry: Any, storage: FilesystemStorage) -> None:
    registry = make_registry()
    await registry.used("f0", "f1", at=time.time() - 86400)
    before = await blob_keys(storage)

    report = await registry.run(max_bytes=BLOB, dry_run=True)

    assert report.dry_run and [item["what"] for item in report.evicted] == ["f0"]
    assert report.reclaimed_bytes == BLOB
    assert await blob_keys(storage) == before
    assert (await registry.retention.usage())["artifacts"]["count"] == 2


async def test_a_blob_another_registry_still_has_stays(make_registry: Any, storage: FilesystemStorage) -> None:
    first, second = make_registry("first"), make_registry("second")
    key = await first.file("f0")
    assert await second.file("f0") == key
    now = time.time()
    await first.used("f0", at=now - 86400)
    await second.used("f0", at=now)

    report = await first.run(max_bytes=1)

    assert report.evicted_count == 1
    assert key in await blob_keys(storage)
    assert (await first.retention.usage())["artifacts"]["count"] == 0
    assert (await second.retention.usage())["artifacts"]["count"] == 1
    # Once the second lets it go too, it is deleted.
    await second.run(max_bytes=1)
    assert key not in await blob_keys(storage)


async def test_a_local_package_file_is_never_evicted(make_registry: Any, db: Any, storage: FilesystemStorage) -> None:
    """A published file with the same bytes as a proxied one shares its blob: the proxied claim
    goes, the blob stays for the local package."""
    registry = make_registry()
    key = await registry.file("f0")
    await db.execute(
        "INSERT INTO files (registry, name, version, filename, artifact_key, size, created)"
        " VALUES ('proxy', 'mine', '1.0.0', 'mine-1.0.0.tgz', $1, $2, $3)",
        key,
        BLOB,
        time.time(),
    )
    await registry.used("f0", at=time.time() - 86400)

    report = await registry.run(max_bytes=1)

    assert report.evicted_count == 1
    assert key in await blob_keys(storage)
    assert await db.fetchrow("SELECT 1 AS hit FROM artifacts WHERE storage_key = $1", key) is not None


async def test_content_used_during_the_run_stays(make_registry: Any, storage: FilesystemStorage) -> None:
    registry = make_registry()
    await registry.used("f0", at=time.time() - 86400)
    victims = await registry.retention._candidates()
    await registry.used("f0", at=time.time())  # a client downloads it while the upstream is asked

    assert await registry.retention._evict(victims[0]) is False
    assert (await registry.retention.usage())["artifacts"]["count"] == 1


async def test_what_was_served_a_moment_ago_is_in_use(make_registry: Any) -> None:
    """A use not yet written (uses are written at most once a minute per item) still counts: the
    run writes what this replica has first. Here d0 was used last, d1 only before it."""
    registry = make_registry()
    now = time.time()
    await registry.used("d0", at=now - 2000)
    await registry.used("d1", at=now - 1000)
    await registry.doc("d0")  # a client asks again; the use waits for the next write

    report = await registry.run(max_bytes=25_000)

    assert [item["what"] for item in report.evicted] == ["d1 (doc)"]


async def test_a_use_within_the_precision_waits_and_is_not_lost(make_registry: Any) -> None:
    registry = make_registry()
    await registry.used("d0", at=time.time() - 1000)
    uses, db = registry.services.uses, registry.services._db
    await registry.doc("d0")
    await uses.flush()  # written less than USE_PRECISION_SECS ago: not now
    row = await db.fetchrow("SELECT last_used FROM upstream_documents WHERE name = 'd0'")
    assert row["last_used"] < time.time() - 900
    uses._written.clear()  # the precision has passed
    await uses.flush()
    row = await db.fetchrow("SELECT last_used FROM upstream_documents WHERE name = 'd0'")
    assert row["last_used"] > time.time() - 60


async def test_one_replica_runs_it_at_a_time(make_registry: Any) -> None:
    cache = MemoryCache()
    first, second = make_registry(cache=cache), make_registry(cache=cache)
    assert await cache.acquire_lease("batlehub:lease:retention:proxy", "someone", 60)
    assert await second.run(max_bytes=1) is None
    await cache.release_lease("batlehub:lease:retention:proxy", "someone")
    assert await first.run(max_bytes=1) is not None
    # The report of the last run is there for every replica.
    assert (await second.retention.stored_report())["max_bytes"] == 1
