"""The npm HTTP surface, in process: `create_app` with local npm registries, driven through
aiohttp's test client with the exact requests the npm CLI sends."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from npm_testdata import ADMIN, ALICE, BOB, auth, make_tarball, publish_body

from batlehub import appkeys
from batlehub.app import create_app
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.config import Settings
from batlehub.interfaces import CacheBackendType
from batlehub.plugins import get_plugin_manager, hookimpl
from batlehub.sweep import sweep_orphans

ABBREVIATED = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"


async def publish(client: Any, name: str, version: str, token: str = ALICE, **kw: Any) -> Any:
    body = json.dumps(publish_body(name, version, **kw))
    return await client.put(f"/registries/npm/{name.replace('/', '%2f')}", data=body, headers=auth(token))


async def error_of(response: Any) -> str:
    return (await response.json())["error"]


async def test_publish_then_read_every_document_form(client: Any) -> None:
    tarball = make_tarball("@s/lib", "1.0.0", b"payload")
    response = await publish(client, "@s/lib", "1.0.0", tarball=tarball)
    assert response.status == 201, await response.text()

    full = await client.get("/registries/npm/@s%2flib")
    assert full.status == 200 and full.content_type == "application/json"
    doc = await full.json()
    assert doc["_rev"].startswith("1-") and doc["dist-tags"] == {"latest": "1.0.0"}
    tarball_url = doc["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball_url == f"http://{client.host}:{client.port}/registries/npm/@s/lib/-/lib-1.0.0.tgz"
    assert doc["versions"]["1.0.0"]["dist"]["shasum"] == hashlib.sha1(tarball).hexdigest()
    assert doc["readme"] == "# @s/lib" and doc["maintainers"] == [{"name": "alice", "email": ""}]

    short = await client.get("/registries/npm/@s/lib", headers={"Accept": ABBREVIATED})
    assert short.content_type == "application/vnd.npm.install-v1+json"
    assert set(await short.json()) == {"name", "modified", "dist-tags", "versions", "time"}  # pnpm reads time
    assert short.headers["ETag"] != full.headers["ETag"]

    by_tag = await client.get("/registries/npm/@s%2flib/latest")
    assert (await by_tag.json())["version"] == "1.0.0"
    assert (await client.get("/registries/npm/@s%2flib/2.0.0")).status == 404

    download = await client.get("/registries/npm/@s/lib/-/lib-1.0.0.tgz")
    assert download.status == 200 and await download.read() == tarball
    head = await client.head("/registries/npm/@s%2flib/-/lib-1.0.0.tgz")
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(tarball)
    assert (await client.get("/registries/npm/@s/lib/-/lib-9.0.0.tgz")).status == 404


async def test_etag_304_gzip_and_write_true(client: Any) -> None:
    await publish(client, "etagged", "1.0.0", readme="x" * 5000)
    first = await client.get("/registries/npm/etagged", headers={"Accept-Encoding": "gzip"})
    assert first.headers["Content-Encoding"] == "gzip"
    etag = first.headers["ETag"]
    assert etag.startswith('"')  # strong
    again = await client.get("/registries/npm/etagged", headers={"If-None-Match": etag})
    assert again.status == 304

    await publish(client, "etagged", "1.1.0")
    changed = await client.get("/registries/npm/etagged", headers={"If-None-Match": etag})
    assert changed.status == 200 and "1.1.0" in (await changed.json())["versions"]

    write = await client.get("/registries/npm/etagged?write=true", headers={"Accept": ABBREVIATED})
    assert write.headers["Cache-Control"] == "no-store"
    assert (await write.json())["_rev"].startswith("2-")  # the full document, even when asked abbreviated


async def test_conflict_integrity_and_malformed_publishes(client: Any) -> None:
    assert (await publish(client, "strict", "1.0.0")).status == 201
    again = await publish(client, "strict", "1.0.0")
    assert again.status == 409
    assert await error_of(again) == "cannot publish over existing version 1.0.0 of strict"

    lying = await publish(client, "strict", "1.0.1", integrity_of=b"other bytes")
    assert lying.status == 422 and "integrity" in await error_of(lying)
    assert "1.0.1" not in (await (await client.get("/registries/npm/strict")).json())["versions"]

    bad_json = await client.put("/registries/npm/strict", data=b'{"versions": {', headers=auth(ALICE))
    assert bad_json.status == 400 and "malformed package document" in await error_of(bad_json)

    wrong_types = publish_body("strict", "1.0.2")
    wrong_types["dist-tags"] = {"latest": 5}
    response = await client.put("/registries/npm/strict", data=json.dumps(wrong_types), headers=auth(ALICE))
    assert response.status == 400 and "dist-tags" in await error_of(response)

    mismatch = publish_body("other-name", "1.0.0")
    response = await client.put("/registries/npm/strict", data=json.dumps(mismatch), headers=auth(ALICE))
    assert response.status == 400 and "does not match" in await error_of(response)

    uppercase = await client.put(
        "/registries/npm/Upper", data=json.dumps(publish_body("Upper", "1.0.0")), headers=auth(ALICE)
    )
    assert uppercase.status == 400


async def test_size_limits(aiohttp_client: Any, settings_factory: Callable[..., Settings]) -> None:
    client = await aiohttp_client(create_app(settings_factory(limits={"max_artifact_size_bytes": 2000})))
    big = make_tarball("big", "1.0.0", os.urandom(5000))
    response = await publish(client, "big", "1.0.0", tarball=big)
    assert response.status == 413
    assert (await client.get("/registries/npm/big")).status == 404

    async def huge_body() -> Any:
        yield b"{"

    declared = await client.put(
        "/registries/npm/big", data=huge_body(), headers={**auth(ALICE), "Content-Length": str(10**9)}
    )
    assert declared.status == 413


async def raw_request(client: Any, method: str, path: str, token: str = ADMIN) -> tuple[int, dict[str, Any]]:
    """Send `path` byte for byte: HTTP client libraries normalize `..` and `%2e%2e` away."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: {client.host}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
    )
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    "path",
    [
        "/registries/npm/%2e%2e",
        "/registries/npm/../../etc/passwd",
        "/registries/npm/..%2f..%2fetc",
        "/registries/npm/a%00b",
        "/registries/npm/a%5cb",
        "/registries/npm/pkg/-/pkg-..%2f..%2fx.tgz",
        "/registries/npm/@s%2f..%2fx/-/x-1.0.0.tgz",
        "/registries/npm/-/package/%2e%2e/dist-tags/latest",
    ],
)
async def test_traversal_is_400_before_any_storage(client: Any, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, body = await raw_request(client, method, path)
        assert status == 400, (method, path, body)
        assert "not allowed" in body["error"]


async def test_permissions_per_route(client: Any) -> None:
    anonymous = await client.put("/registries/npm/x", data=json.dumps(publish_body("x", "1.0.0")))
    assert anonymous.status == 401 and "authentication required to publish" in await error_of(anonymous)
    readonly = await client.put(
        "/registries/readonly/x", data=json.dumps(publish_body("x", "1.0.0")), headers=auth(BOB)
    )
    assert readonly.status == 403 and "may not publish" in await error_of(readonly)
    assert (await publish(client, "perm", "1.0.0")).status == 201
    doc = await (await client.get("/registries/npm/perm?write=true")).json()
    delete = await client.delete(f"/registries/npm/perm/-rev/{doc['_rev']}", headers=auth(ALICE))
    assert delete.status == 403  # users publish; deleting needs releases:delete
    delete = await client.delete(f"/registries/npm/perm/-rev/{doc['_rev']}", headers=auth(ADMIN))
    assert delete.status == 200
    assert (await client.get("/registries/npm/perm")).status == 404


async def test_deprecate_dist_tags_and_unpublish_like_the_cli(client: Any) -> None:
    for version in ("1.0.0", "1.1.0", "2.0.0"):
        assert (await publish(client, "flow", version)).status == 201
    doc = await (await client.get("/registries/npm/flow?write=true")).json()
    doc["versions"]["1.0.0"]["deprecated"] = "too old"
    assert (await client.put("/registries/npm/flow", data=json.dumps(doc), headers=auth(ALICE))).status == 200
    short = await (await client.get("/registries/npm/flow", headers={"Accept": ABBREVIATED})).json()
    assert short["versions"]["1.0.0"]["deprecated"] == "too old"

    tag = await client.put(
        "/registries/npm/-/package/flow/dist-tags/stable",
        data=json.dumps("1.1.0"),
        headers={**auth(ALICE), "Content-Type": "application/json"},
    )
    assert tag.status == 201
    bad = await client.put("/registries/npm/-/package/flow/dist-tags/stable", data=b"{}", headers=auth(ALICE))
    assert bad.status == 400
    tags = await (await client.get("/registries/npm/-/package/flow/dist-tags")).json()
    assert tags == {"latest": "2.0.0", "stable": "1.1.0"}
    latest = await client.delete("/registries/npm/-/package/flow/dist-tags/latest", headers=auth(ADMIN))
    assert latest.status == 400

    db = client.app[appkeys.DATABASE]
    key = await db.fetchval("SELECT artifact_key FROM versions WHERE name = 'flow' AND version = '2.0.0'")
    # npm unpublish flow@2.0.0: PUT the document minus the version, then DELETE the tarball.
    doc = await (await client.get("/registries/npm/flow?write=true")).json()
    del doc["versions"]["2.0.0"]
    doc["dist-tags"] = {"stable": "1.1.0", "latest": "1.1.0"}
    stale_rev = doc["_rev"]
    put = await client.put(f"/registries/npm/flow/-rev/{doc['_rev']}", data=json.dumps(doc), headers=auth(ADMIN))
    assert put.status == 200
    again = await client.put(f"/registries/npm/flow/-rev/{stale_rev}", data=json.dumps(doc), headers=auth(ADMIN))
    assert again.status == 409  # the revision moved on
    rev = (await (await client.get("/registries/npm/flow?write=true")).json())["_rev"]
    gone = await client.delete(f"/registries/npm/flow/-/flow-2.0.0.tgz/-rev/{rev}", headers=auth(ADMIN))
    assert gone.status == 200
    doc = await (await client.get("/registries/npm/flow")).json()
    assert sorted(doc["versions"]) == ["1.0.0", "1.1.0"] and doc["dist-tags"]["latest"] == "1.1.0"
    assert (await client.get("/registries/npm/flow/-/flow-2.0.0.tgz")).status == 404
    # No row references the bytes any more, so the storage sweep removes them.
    assert await db.fetchval("SELECT COUNT(*) FROM artifacts WHERE storage_key = $1", key) == 0
    storage = client.app[appkeys.STORAGE]
    assert await storage.stat(key) is not None
    await sweep_orphans(db, storage, grace_secs=0)
    assert await storage.stat(key) is None
    assert (await client.get("/registries/npm/flow/-/flow-1.1.0.tgz")).status == 200


async def test_identity_endpoints(client: Any) -> None:
    assert (await client.get("/registries/npm/-/ping")).status == 200
    assert (await client.get("/registries/npm/-/whoami")).status == 401
    assert await (await client.get("/registries/npm/-/whoami", headers=auth(BOB))).json() == {"username": "bob"}
    web = await (await client.post("/registries/npm/-/v1/login", data=b"{}")).json()
    assert "/login/cli/" in web["loginUrl"] and "/registries/npm/-/v1/done?authId=" in web["doneUrl"]
    done = web["doneUrl"][web["doneUrl"].index("/registries/") :]
    waiting = await client.get(done)
    assert waiting.status == 202 and waiting.headers["Retry-After"] == "1"
    assert (await client.get("/registries/npm/-/v1/done?authId=made-up")).status == 403

    login = {"_id": "org.couchdb.user:bob", "name": "bob", "password": BOB, "type": "user", "roles": []}
    accepted = await client.put("/registries/npm/-/user/org.couchdb.user:bob", data=json.dumps(login))
    assert accepted.status == 201 and (await accepted.json())["token"] == BOB
    wrong_user = await client.put("/registries/npm/-/user/org.couchdb.user:alice", data=json.dumps(login))
    assert wrong_user.status == 401
    password = await client.put(
        "/registries/npm/-/user/org.couchdb.user:bob", data=json.dumps({**login, "password": "hunter2"})
    )
    assert password.status == 401 and "access token" in await error_of(password)

    others = await client.delete(f"/registries/npm/-/user/token/{ALICE}", headers=auth(BOB))
    assert others.status == 403
    # A config token cannot be revoked by logging out: say so, rather than a 200 while it keeps working.
    own = await client.delete(f"/registries/npm/-/user/token/{BOB}", headers=auth(BOB))
    assert own.status == 403 and "configuration" in await error_of(own)
    assert (await client.get("/registries/npm/-/whoami", headers=auth(BOB))).status == 200


async def test_search_and_local_audit(client: Any) -> None:
    await publish(client, "search-me", "1.0.0", description="a needle in here", keywords=["k"], readme="zebra")
    await publish(client, "@s/search-me-too", "2.0.0")
    result = await (await client.get("/registries/npm/-/v1/search?text=search-me&size=20")).json()
    names = [o["package"]["name"] for o in result["objects"]]
    assert names == ["search-me", "@s/search-me-too"] and result["total"] == 2
    first = result["objects"][0]
    assert first["package"]["version"] == "1.0.0" and first["package"]["keywords"] == ["k"]
    assert set(first["score"]["detail"]) == {"quality", "popularity", "maintenance"}
    by_description = await (await client.get("/registries/npm/-/v1/search?text=needle")).json()
    assert [o["package"]["name"] for o in by_description["objects"]] == ["search-me"]
    by_readme = await (await client.get("/registries/npm/-/v1/search?text=zebra")).json()
    assert by_readme["objects"] == [] and by_readme["total"] == 0  # readmes are not searched

    bulk = await client.post(
        "/registries/npm/-/npm/v1/security/advisories/bulk",
        data=gzip.compress(b'{"search-me": ["1.0.0"]}'),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert bulk.status == 200 and await bulk.json() == {}


async def test_banner_is_sent_as_npm_notice(client: Any) -> None:
    assert "npm-notice" not in (await client.get("/registries/npm/-/ping")).headers
    put = await client.put("/api/v1/admin/banner", json={"message": "maintenance at 18:00"}, headers=auth(ADMIN))
    assert put.status in (200, 201, 204), await put.text()
    assert (await client.get("/registries/npm/-/ping")).headers["npm-notice"] == "maintenance at 18:00"
    missing = await client.get("/registries/npm/nope")
    assert missing.status == 404 and missing.headers["npm-notice"] == "maintenance at 18:00"


async def test_modes(aiohttp_client: Any, settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        registries=[
            {"type": "npm", "name": "mirror", "mode": "proxy", "upstreams": ["http://127.0.0.1:9/"]},
            {"type": "npm", "name": "npm", "mode": "local"},
        ]
    )
    client = await aiohttp_client(create_app(settings))
    refused = await client.put("/registries/mirror/x", data=json.dumps(publish_body("x", "1.0.0")), headers=auth(ALICE))
    assert refused.status == 405 and "read-only proxy" in await error_of(refused)
    assert (await client.get("/registries/npm/unknown-package")).status == 404


async def test_on_publish_hook_and_quota(aiohttp_client: Any, settings_factory: Callable[..., Settings]) -> None:
    seen: list[tuple[str, str, str, str | None, int]] = []

    class Recorder:
        @hookimpl
        async def on_publish(self, registry: str, package: str, version: str, user_id: str | None, size: int) -> None:
            seen.append((registry, package, version, user_id, size))

    pm = get_plugin_manager()
    pm.register(Recorder(), name="recorder")
    settings = settings_factory(
        registries=[
            {"type": "npm", "name": "npm", "mode": "local", "quota": {"max_versions_per_user": 1}},
            {
                "type": "npm",
                "name": "warned",
                "mode": "local",
                "quota": {"max_versions_per_user": 1, "enforcement": "warn"},
            },
        ]
    )
    client = await aiohttp_client(create_app(settings, pm=pm))
    tarball = make_tarball("q", "1.0.0")
    assert (await publish(client, "q", "1.0.0", tarball=tarball)).status == 201
    assert seen == [("npm", "q", "1.0.0", "alice", len(tarball))]
    over = await publish(client, "q", "1.0.1")
    assert over.status == 403 and "quota exceeded" in await error_of(over)
    assert "1.0.1" not in (await (await client.get("/registries/npm/q")).json())["versions"]
    assert len(seen) == 1

    for version in ("1.0.0", "1.0.1"):
        body = json.dumps(publish_body("w", version))
        response = await client.put("/registries/warned/w", data=body, headers=auth(ALICE))
        assert response.status == 201
    assert "quota exceeded" in response.headers["X-Quota-Warning"]


async def test_a_write_on_one_replica_is_seen_at_once_by_another(
    aiohttp_client: Any, settings_factory: Callable[..., Settings], fresh_postgres_url: str
) -> None:
    def replica() -> Settings:
        return settings_factory(database={"type": "postgresql", "url": fresh_postgres_url}, cache={"type": "postgres"})

    first = await aiohttp_client(create_app(replica()))
    second = await aiohttp_client(create_app(replica()))
    assert (await publish(first, "shared", "1.0.0")).status == 201
    for _ in range(2):  # the second replica now holds serialized bytes of revision 1
        doc = await (await second.get("/registries/npm/shared")).json()
        assert list(doc["versions"]) == ["1.0.0"]
    assert (await publish(first, "shared", "1.1.0")).status == 201
    doc = await (await second.get("/registries/npm/shared")).json()
    assert sorted(doc["versions"]) == ["1.0.0", "1.1.0"]
    conflict = await publish(second, "shared", "1.1.0")
    assert conflict.status == 409


@pytest.mark.parametrize("redirect", [False, True])
async def test_tarballs_from_s3_streamed_or_redirected(
    aiohttp_client: Any, settings_factory: Callable[..., Settings], s3_config: dict[str, Any], redirect: bool
) -> None:
    storage = {
        "type": "s3",
        **{k: s3_config[k] for k in ("bucket", "region", "endpoint", "access_key_id", "secret_access_key")},
        "force_path_style": True,
        "prefix": f"npm-test-{os.urandom(4).hex()}",
        "redirect_downloads": redirect,
    }
    client = await aiohttp_client(create_app(settings_factory(storage=storage)))
    tarball = make_tarball("s3pkg", "1.0.0", os.urandom(200_000))
    assert (await publish(client, "s3pkg", "1.0.0", tarball=tarball)).status == 201
    response = await client.get("/registries/npm/s3pkg/-/s3pkg-1.0.0.tgz", allow_redirects=False)
    if redirect:
        assert response.status == 302
        assert response.headers["Location"].startswith(s3_config["endpoint"])
        async with aiohttp.ClientSession() as session, session.get(response.headers["Location"]) as direct:
            assert await direct.read() == tarball
    else:
        assert response.status == 200 and await response.read() == tarball
        head = await client.head("/registries/npm/s3pkg/-/s3pkg-1.0.0.tgz")
        assert int(head.headers["Content-Length"]) == len(tarball)


class FlakyCache(MemoryCache):
    """A cache backend that has gone away for metadata, banners and leases (rate limits and IP
    blocks keep working, so the core's own middlewares are not what this test is about)."""

    broken = False

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        if FlakyCache.broken:
            raise ConnectionError("cache backend unreachable")

    async def get(self, key: str) -> bytes | None:
        await self._fail()
        return await super().get(key)

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> None:
        await self._fail()
        await super().set(key, value, ttl_secs, stale_retention_secs)

    async def get_banner(self) -> Any:
        await self._fail()
        return await super().get_banner()


async def test_a_failing_cache_backend_never_fails_npm_requests(
    aiohttp_client: Any, settings_factory: Callable[..., Settings]
) -> None:
    class FlakyCachePlugin:
        @hookimpl
        def register_cache_backends(self) -> list[CacheBackendType]:
            return [CacheBackendType(name="flaky", description="test", factory=lambda section, settings: FlakyCache())]

    pm = get_plugin_manager()
    pm.register(FlakyCachePlugin(), name="flaky-cache")
    client = await aiohttp_client(create_app(settings_factory(cache={"type": "flaky"}), pm=pm))
    assert (await publish(client, "sturdy", "1.0.0")).status == 201
    assert (await client.get("/registries/npm/sturdy")).status == 200
    FlakyCache.broken = True
    try:
        assert (await publish(client, "sturdy", "1.1.0")).status == 201
        doc = await (await client.get("/registries/npm/sturdy")).json()
        assert sorted(doc["versions"]) == ["1.0.0", "1.1.0"]  # the database answered
        assert (await client.get("/registries/npm/sturdy/-/sturdy-1.1.0.tgz")).status == 200
    finally:
        FlakyCache.broken = False
