"""The package store every format writes through: ownership rules, the unit of work, reserved
names, and the owners of packages published before owners existed. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batlehub.auth import Identity
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.config import DEFAULT_RBAC, RegistrySettings
from batlehub.coordination import FailOpenCache
from batlehub.db import MIGRATIONS, Database, PostgresDatabase, SqliteDatabase
from batlehub.errors import BadRequest, Conflict, Forbidden, NotFound, UpstreamError
from batlehub.interfaces import StoredBlob
from batlehub.packages import NewFile, PackageStore
from batlehub.requests import Actor

REGISTRY = RegistrySettings(type="fmt", name="reg", rbac=dict(DEFAULT_RBAC), rate_limit=None, quota=None, options={})
ALICE = Actor(Identity("alice", "user"), "10.0.0.1")
BOB = Actor(Identity("bob", "user"), "10.0.0.2")
ADMIN = Actor(Identity("admin", "admin"))


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    database: Any
    if request.param == "postgresql":
        database = PostgresDatabase(request.getfixturevalue("fresh_postgres_url"), max_connections=4)
    else:
        database = SqliteDatabase(tmp_path / "hub.db")
    await database.connect()
    await database.migrate()
    yield database
    await database.close()


class Events:
    def __init__(self) -> None:
        self.fired: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, hook: str, **kwargs: Any) -> None:
        self.fired.append((hook, kwargs))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def store(db: Database, events: Events) -> PackageStore:
    return PackageStore(
        registry=REGISTRY,
        format_name="fmt",
        db=db,
        cache=FailOpenCache(MemoryCache()),
        fire=events,
        scope_of=lambda name: name.split("/", 1)[0] if name.startswith("@") and "/" in name else None,
    )


def blob(tag: str) -> StoredBlob:
    digest = (tag.encode().hex() * 128)[:128]
    return StoredBlob(
        key=f"fmt/blobs/sha512/{digest[:2]}/{digest}", size=10, sha512=digest, sha256="0" * 64, sha1="1" * 40
    )


async def publish(store: PackageStore, actor: Actor, name: str, version: str) -> None:
    async with store.write(name, actor, create=True) as tx:
        await tx.add_version(version, {"version": version}, [NewFile(f"{version}.bin", blob(name + version))])
        await tx.set_tag("latest", version)


async def test_a_write_is_one_unit_that_nothing_half_done_escapes(store: PackageStore, events: Events) -> None:
    await publish(store, ALICE, "pkg", "1.0.0")
    before = await store.load("pkg")
    assert before is not None and before.owners == ("alice",) and before.tags == {"latest": "1.0.0"}
    assert before.versions[0].files[0].filename == "1.0.0.bin"

    with pytest.raises(RuntimeError):
        async with store.write("pkg", ALICE) as tx:
            await tx.add_version("2.0.0", {"version": "2.0.0"}, [NewFile("2.0.0.bin", blob("pkg2"))])
            await tx.set_tag("latest", "2.0.0")
            raise RuntimeError("the format failed half-way")
    after = await store.load("pkg")
    assert after is not None and after.revision == before.revision and [v.version for v in after.versions] == ["1.0.0"]
    assert [hook for hook, _ in events.fired] == ["on_publish"]  # nothing announced for the failed write
    assert await store.stamp("pkg") == after.stamp  # the shared revision is the database's

    with pytest.raises(Conflict):
        await publish(store, ALICE, "pkg", "1.0.0")
    with pytest.raises(NotFound):
        async with store.write("missing", ALICE):
            pass


async def test_owners_decide_and_keep_the_name_after_an_unpublish(store: PackageStore, events: Events) -> None:
    await publish(store, ALICE, "kept", "1.0.0")
    with pytest.raises(Forbidden, match="owned by alice"):
        await publish(store, BOB, "kept", "1.1.0")
    async with store.write("kept", ALICE, permission="releases:publish") as tx:
        with pytest.raises(BadRequest, match="every owner"):
            await tx.set_owners([])
    async with store.write("kept", ADMIN, permission="releases:delete") as tx:
        assert await tx.delete() == ["1.0.0"]
    assert await store.load("kept") is None
    assert ("on_unpublish", {"registry": "reg", "package": "kept", "version": None, "user_id": "admin"}) in events.fired
    # Gone, yet still alice's: nobody else takes the name over.
    with pytest.raises(Forbidden, match="owned by alice"):
        await publish(store, BOB, "kept", "9.0.0")
    await publish(store, ALICE, "kept", "2.0.0")


async def test_rbac_is_checked_with_ownership(store: PackageStore) -> None:
    await publish(store, ALICE, "rbac", "1.0.0")
    with pytest.raises(Forbidden, match="may not unpublish"):  # users lack releases:delete by default
        async with store.write("rbac", ALICE, permission="releases:delete"):
            pass


async def test_scopes_and_their_owners(store: PackageStore) -> None:
    await publish(store, ALICE, "@team/one", "1.0.0")
    assert await store.scope_owners("@team") == ["alice"]
    with pytest.raises(Forbidden, match="scope @team belongs to alice"):
        await publish(store, BOB, "@team/two", "1.0.0")
    await store.assign_scope_owners("@team", ["alice", "bob"], ADMIN)
    await publish(store, BOB, "@team/two", "1.0.0")
    # A scope owner may change any package of the scope; a package owner only that package.
    async with store.write("@team/one", BOB) as tx:
        await tx.set_tag("stable", "1.0.0")


async def test_new_names_that_an_upstream_has_need_a_reservation(store: PackageStore) -> None:
    upstream = {"lodash", "@up/thing"}
    asked: list[str] = []

    async def upstream_has(name: str) -> bool:
        asked.append(name)
        return name in upstream

    store.upstream_has = upstream_has
    with pytest.raises(Forbidden, match="exists in the upstream registry"):
        await publish(store, ALICE, "lodash", "99.0.0")
    await publish(store, ALICE, "ours", "1.0.0")
    await store.reserve("lodash", "internal fork", ADMIN)
    await store.reserve("@up", "", ADMIN)
    assert await store.is_reserved("lodash") and await store.is_reserved("@up/other")
    asked.clear()
    await publish(store, ALICE, "lodash", "99.0.0")
    await publish(store, ALICE, "@up/thing", "1.0.0")
    await publish(store, ALICE, "ours", "1.1.0")  # not new: the upstream is not asked
    assert asked == []
    assert [r["name"] for r in await store.reserved()] == ["@up", "lodash"]
    assert await store.unreserve("@up", ADMIN) and not await store.unreserve("@up", ADMIN)

    async def upstream_down(name: str) -> bool:
        raise UpstreamError("connection failed")

    store.upstream_has = upstream_down
    with pytest.raises(UpstreamError, match="could not be asked"):
        await publish(store, ALICE, "brand-new", "1.0.0")


async def test_publishers_before_owners_existed_become_owners(tmp_path: Path) -> None:
    """Migration 3 makes everyone who published a version an owner of it, and of its npm scope."""
    db = SqliteDatabase(tmp_path / "old.db")
    await db.connect()
    try:
        async with db.transaction() as conn:
            from batlehub.db import _apply_migrations

            saved = list(MIGRATIONS)
            MIGRATIONS[:] = [m for m in saved if m[0] < 3]
            try:
                await _apply_migrations(conn, "sqlite", None)
            finally:
                MIGRATIONS[:] = saved
            now = time.time()
            for name, version, publisher in (
                ("old", "1.0.0", "alice"),
                ("old", "1.1.0", "bob"),
                ("@s/x", "1", "carol"),
            ):
                await conn.execute(
                    "INSERT INTO packages (registry, name, revision, created, modified) VALUES ('reg', $1, 1, $2, $2)"
                    " ON CONFLICT DO NOTHING",
                    name,
                    now,
                )
                await conn.execute(
                    "INSERT INTO versions (registry, name, version, manifest, artifact_key, size, publisher, created)"
                    " VALUES ('reg', $1, $2, '{}', $3, 5, $4, $5)",
                    name,
                    version,
                    f"npm/blobs/sha512/aa/{name}{version}",
                    publisher,
                    now,
                )
        assert (await db.migrate())[:2] == [3, 4]
        owners = await db.fetch("SELECT name, user_id FROM package_owners ORDER BY name, user_id")
        assert [(r["name"], r["user_id"]) for r in owners] == [("@s/x", "carol"), ("old", "alice"), ("old", "bob")]
        scopes = await db.fetch("SELECT scope, user_id FROM scope_owners")
        assert [(r["scope"], r["user_id"]) for r in scopes] == [("@s", "carol")]
        files = await db.fetch("SELECT name, filename FROM files ORDER BY name, filename")
        assert [(r["name"], r["filename"]) for r in files] == [
            ("@s/x", "x-1.tgz"),
            ("old", "old-1.0.0.tgz"),
            ("old", "old-1.1.0.tgz"),
        ]
    finally:
        await db.close()
