"""The package model every registry format shares: the packages, versions, files, tags and owners
of one registry, in the database.

Formats read with `load` (one consistent snapshot) and change things only through `write`, a unit
of work that, in one transaction, checks the caller's permission and ownership, bumps the
package's revision, counts or gives back quota, and records one audit entry; after the commit it
mirrors the new revision into the cache backend (every replica checks that one key before serving
bytes it rendered earlier) and fires `on_publish` / `on_unpublish`.

Ownership (DESIGN §6): the first publisher of a name owns it; only its owners, the owners of its
scope, and admins may change it. A scope belongs to whoever first publishes in it, or to whom an
admin assigns it. In a registry with upstreams, a name that an upstream has cannot be published
here unless an admin reserved it (or its scope) for local use, and a reserved name is never asked
of the upstreams.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from batlehub import audit, jsondoc, quota
from batlehub.artifacts import record_artifact
from batlehub.auth import check_permission
from batlehub.config import valid_user_id
from batlehub.coordination import FailOpenCache
from batlehub.errors import AlreadyExists, BadRequest, Conflict, Forbidden, NotFound, UpstreamError
from batlehub.interfaces import StoredBlob
from batlehub.upstream import like_escape

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.db import Connection, Database
    from batlehub.requests import Actor

log = logging.getLogger(__name__)

STAMP_TTL_SECS = 300.0
"""How long a mirrored revision stamp is trusted without the database. Bounds how long a replica
could serve an old document if the cache backend lost a write's update."""
RESERVED_REFRESH_SECS = 1.0
"""How stale a process's view of the reserved names may be: a reservation made on any replica
holds everywhere within this."""
_ABSENT = b"-"

Event = Callable[..., Awaitable[None]]
"""Fires a core event hook by name: `await fire("on_publish", registry=..., ...)`."""


def revision_stamp(created: float, revision: int) -> str:
    """Changes with every write and with every re-creation of the package (whose revision starts
    over, while its creation time does not repeat)."""
    return f"{created!r}:{revision}"


@dataclass(frozen=True)
class FileRecord:
    filename: str
    key: str
    """The artifact's storage key."""
    size: int
    created: float
    meta: dict[str, Any] = field(default_factory=dict)
    """The format's own facts about the file (e.g. a Python wheel's tags)."""


@dataclass(frozen=True)
class VersionRecord:
    version: str
    manifest: dict[str, Any]
    """The format's own metadata of the version, as it stored it."""
    created: float
    publisher: str | None = None
    size: int = 0
    files: tuple[FileRecord, ...] = ()


@dataclass(frozen=True)
class Package:
    """A package as stored: everything a format needs to build its documents."""

    name: str
    revision: int
    created: float
    modified: float
    extra: dict[str, Any]
    """Package-level metadata the format keeps (description, readme, ...)."""
    versions: tuple[VersionRecord, ...]
    """In publish order."""
    tags: dict[str, str]
    owners: tuple[str, ...]

    @property
    def stamp(self) -> str:
        return revision_stamp(self.created, self.revision)

    def version(self, version: str) -> VersionRecord | None:
        return next((v for v in self.versions if v.version == version), None)


@dataclass(frozen=True)
class PackageSummary:
    """A search hit."""

    name: str
    modified: float
    extra: dict[str, Any]
    latest: str | None
    owners: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewFile:
    """A file of a version being published: its name and the blob already in storage."""

    filename: str
    blob: StoredBlob
    meta: Mapping[str, Any] = field(default_factory=dict)


class PackageStore:
    """The packages of one registry (see the module docstring)."""

    def __init__(
        self,
        *,
        registry: RegistrySettings,
        format_name: str,
        db: Database,
        cache: FailOpenCache,
        fire: Event,
        scope_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.registry = registry
        self.format_name = format_name
        self.db = db
        self.cache = cache
        self.fire = fire
        self.scope_of = scope_of or (lambda name: None)
        self.upstream_has: Callable[[str], Awaitable[bool]] | None = None
        """Set by core when the registry has upstreams (mode hybrid): asked before a new name is
        published here."""
        self._reserved: tuple[float, frozenset[str]] = (float("-inf"), frozenset())

    @property
    def name(self) -> str:
        return self.registry.name

    # --- revision stamps ----------------------------------------------------------------------

    def _stamp_key(self, name: str) -> str:
        return f"{self.format_name}:rev:{self.name}:{name}"

    async def _db_stamp(self, name: str) -> str | None:
        row = await self.db.fetchrow(
            "SELECT created, revision FROM packages WHERE registry = $1 AND name = $2", self.name, name
        )
        return revision_stamp(row["created"], row["revision"]) if row else None

    async def stamp(self, name: str) -> str | None:
        """The current revision stamp of a package, or None when the name is not published here.

        One cache read; on a miss (or a cache failure) the database answers and the cache is set.
        """
        cached = await self.cache.get(self._stamp_key(name))
        if cached is not None:
            return None if cached == _ABSENT else cached.decode()
        return await self.sync_stamp(name)

    async def sync_stamp(self, name: str) -> str | None:
        """Mirror the database's stamp into the cache, and make sure it stays the newest.

        Set, then re-read the database: if another write committed in between, set again. Since
        every writer (and every reader that fills a miss) does the same, the last value written to
        the cache is always one the database confirmed afterwards.
        """
        stamp = await self._db_stamp(name)
        for _ in range(5):
            if not await self.cache.set(self._stamp_key(name), stamp.encode() if stamp else _ABSENT, STAMP_TTL_SECS):
                return stamp
            again = await self._db_stamp(name)
            if again == stamp:
                return stamp
            stamp = again
        return stamp

    # --- reading ------------------------------------------------------------------------------

    async def load(self, name: str) -> Package | None:
        """Everything about a package, read from one snapshot; None when it is not published here."""
        async with self.db.snapshot() as conn:
            row = await conn.fetchrow(
                "SELECT revision, created, modified, extra FROM packages WHERE registry = $1 AND name = $2",
                self.name,
                name,
            )
            if row is None:
                return None
            versions = await conn.fetch(
                "SELECT version, manifest, created, publisher, size FROM versions"
                " WHERE registry = $1 AND name = $2 ORDER BY created",
                self.name,
                name,
            )
            files = await conn.fetch(
                "SELECT version, filename, artifact_key, size, created, meta FROM files"
                " WHERE registry = $1 AND name = $2 ORDER BY created, filename",
                self.name,
                name,
            )
            tags = await conn.fetch(
                "SELECT tag, version FROM dist_tags WHERE registry = $1 AND name = $2", self.name, name
            )
            owners = await conn.fetch(
                "SELECT user_id FROM package_owners WHERE registry = $1 AND name = $2 ORDER BY added, user_id",
                self.name,
                name,
            )
        by_version: dict[str, list[FileRecord]] = {}
        for f in files:
            by_version.setdefault(f["version"], []).append(_file(f))
        return Package(
            name=name,
            revision=int(row["revision"]),
            created=float(row["created"]),
            modified=float(row["modified"]),
            extra=json.loads(row["extra"] or "{}"),
            versions=tuple(
                VersionRecord(
                    version=v["version"],
                    manifest=json.loads(v["manifest"]),
                    created=float(v["created"]),
                    publisher=v["publisher"],
                    size=int(v["size"] or 0),
                    files=tuple(by_version.get(v["version"], ())),
                )
                for v in versions
            ),
            tags={t["tag"]: t["version"] for t in tags},
            owners=tuple(o["user_id"] for o in owners),
        )

    async def file(self, name: str, *, version: str | None = None, filename: str | None = None) -> FileRecord | None:
        """A file of a package, by its file name, or the first file of `version`."""
        if filename is not None:
            row = await self.db.fetchrow(
                "SELECT filename, artifact_key, size, created, meta FROM files"
                " WHERE registry = $1 AND name = $2 AND filename = $3",
                self.name,
                name,
                filename,
            )
        else:
            row = await self.db.fetchrow(
                "SELECT filename, artifact_key, size, created, meta FROM files"
                " WHERE registry = $1 AND name = $2 AND version = $3 ORDER BY created, filename LIMIT 1",
                self.name,
                name,
                version,
            )
        return _file(row) if row else None

    async def search(self, text: str, limit: int, offset: int) -> tuple[list[PackageSummary], int]:
        """Packages whose name, description or keywords contain `text` (case-insensitive), by name."""
        needle = text.lower()
        if "\x00" in needle:
            return [], 0  # no name holds a NUL (and PostgreSQL refuses one in a parameter)
        rows = await self.db.fetch(
            "SELECT p.name, p.modified, p.extra, t.version AS latest FROM packages p"
            " LEFT JOIN dist_tags t ON t.registry = p.registry AND t.name = p.name AND t.tag = 'latest'"
            " WHERE p.registry = $1 AND (LOWER(p.name) LIKE $2 ESCAPE '\\' OR LOWER(p.extra) LIKE $2 ESCAPE '\\')"
            " ORDER BY p.name",
            self.name,
            "%" + like_escape(needle) + "%",
        )
        hits = []
        for row in rows:
            extra = json.loads(row["extra"] or "{}")
            if _matches(row["name"], extra, needle):  # the SQL also matched readmes and the like
                hits.append(PackageSummary(row["name"], float(row["modified"]), extra, row["latest"]))
        page = hits[offset : offset + limit]
        if page:
            marks = ", ".join(f"${i}" for i in range(2, 2 + len(page)))
            owners: dict[str, list[str]] = {}
            for row in await self.db.fetch(
                f"SELECT name, user_id FROM package_owners WHERE registry = $1 AND name IN ({marks})"
                " ORDER BY added, user_id",
                self.name,
                *(hit.name for hit in page),
            ):
                owners.setdefault(row["name"], []).append(row["user_id"])
            page = [replace(hit, owners=tuple(owners.get(hit.name, ()))) for hit in page]
        return page, len(hits)

    async def owners(self, name: str) -> list[str]:
        return await _owners(self.db, self.name, name)

    async def scope_owners(self, scope: str) -> list[str]:
        return await _scope_owners(self.db, self.name, scope)

    # --- writing ------------------------------------------------------------------------------

    @asynccontextmanager
    async def write(
        self, name: str, actor: Actor, *, permission: str = "releases:publish", create: bool = False
    ) -> AsyncIterator[PackageWrite]:
        """One change of a package, as one transaction (see the module docstring).

        `permission` is the RBAC permission the change needs; ownership is checked on top of it.
        `create=True` lets the write create a package that does not exist yet (a first publish);
        otherwise a missing package is a 404.
        """
        check_permission(actor.identity, self.registry, permission)
        if create and await self.stamp(name) is None:
            await self._check_new_name(name)
        unit: PackageWrite | None = None
        try:
            async with self.db.transaction() as conn:
                unit = PackageWrite(self, conn, name, actor)
                await unit.begin(create)
                yield unit
                await unit.finish()
        finally:
            await self.sync_stamp(name)
        await unit.announce()

    async def _check_new_name(self, name: str) -> None:
        """Dependency confusion, closed by design: a name an upstream has stays the upstream's."""
        if self.upstream_has is None or await self.is_reserved(name):
            return
        try:
            upstream = await self.upstream_has(name)
        except UpstreamError as exc:
            raise UpstreamError(
                f"cannot publish {name}: the upstream registry could not be asked whether it has that name"
                f" ({exc.message}); try again later, or have an admin reserve the name for local use"
            ) from None
        if upstream:
            raise Forbidden(
                f"{name} exists in the upstream registry of {self.name!r}: publishing it here would hide the"
                " upstream package from every client. An admin can reserve the name for local use"
                f" (PUT /api/v1/admin/registries/{self.name}/reserved/<name or scope>)"
            )

    # --- reserved names -----------------------------------------------------------------------

    async def is_reserved(self, name: str) -> bool:
        """Whether `name`, or its scope, is reserved for local use (never asked of upstreams)."""
        loaded_at, names = self._reserved
        if time.monotonic() - loaded_at > RESERVED_REFRESH_SECS:
            rows = await self.db.fetch("SELECT name FROM reserved_names WHERE registry = $1", self.name)
            names = frozenset(r["name"] for r in rows)
            self._reserved = (time.monotonic(), names)
        if not names:
            return False
        scope = self.scope_of(name)
        return name in names or (scope is not None and scope in names)

    async def reserved(self) -> list[dict[str, Any]]:
        return await self.db.fetch(
            "SELECT name, reason, reserved_by, created FROM reserved_names WHERE registry = $1 ORDER BY name",
            self.name,
        )

    async def reserve(self, name: str, reason: str, actor: Actor) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO reserved_names (registry, name, reason, reserved_by, created) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (registry, name) DO UPDATE SET reason = excluded.reason,"
                " reserved_by = excluded.reserved_by",
                self.name,
                name,
                reason,
                actor.user_id,
                time.time(),
            )
            await self._audit(conn, actor, "reserve", name, {"reason": reason})
        self._reserved = (float("-inf"), frozenset())

    async def unreserve(self, name: str, actor: Actor) -> bool:
        async with self.db.transaction() as conn:
            removed = await conn.execute(
                "DELETE FROM reserved_names WHERE registry = $1 AND name = $2", self.name, name
            )
            if removed:
                await self._audit(conn, actor, "unreserve", name, {})
        self._reserved = (float("-inf"), frozenset())
        return removed > 0

    # --- owners, as an admin sets them --------------------------------------------------------

    async def assign_owners(self, name: str, users: Sequence[str], actor: Actor) -> None:
        """Replace the owners of a package name (published or not yet): only they may publish it."""
        try:
            async with self.db.transaction() as conn:
                # Documents show the owners (npm `maintainers`): a published package gets a new revision.
                await conn.execute(
                    "UPDATE packages SET revision = revision + 1, modified = $3 WHERE registry = $1 AND name = $2",
                    self.name,
                    name,
                    time.time(),
                )
                await _replace_owners(conn, "package_owners", "name", self.name, name, users, actor.user_id)
                await self._audit(conn, actor, "owners.set", name, {"owners": list(users)})
        finally:
            await self.sync_stamp(name)

    async def assign_scope_owners(self, scope: str, users: Sequence[str], actor: Actor) -> None:
        """Replace the owners of a scope: only they may publish new names in it."""
        async with self.db.transaction() as conn:
            await _replace_owners(conn, "scope_owners", "scope", self.name, scope, users, actor.user_id)
            await self._audit(conn, actor, "scope.owners.set", scope, {"owners": list(users)})

    async def _audit(self, conn: Connection, actor: Actor, action: str, target: str, detail: Any) -> None:
        await audit.record(
            conn,
            f"{self.format_name}.{action}",
            registry=self.name,
            user_id=actor.user_id,
            target=target,
            client_ip=actor.client_ip,
            detail=detail,
        )


class PackageWrite:
    """The unit of work `PackageStore.write` hands out; valid inside its `async with` only."""

    def __init__(self, store: PackageStore, conn: Connection, name: str, actor: Actor) -> None:
        self.store = store
        self.conn = conn
        self.name = name
        self.actor = actor
        self.created = 0.0
        self.revision = 0
        """The revision this write makes (the previous one is `revision - 1`)."""
        self.is_new = False
        """True when this write creates the package."""
        self.extra: dict[str, Any] = {}
        """Package-level metadata; changes are saved with the write."""
        self.quota_warning: str | None = None
        """Set when a version went over quota and the registry only warns."""
        self.added: list[tuple[str, int]] = []
        self.removed: list[str] = []
        self._deleted = False
        self._extra_json = "{}"
        self._owners: list[str] = []
        self._action: str | None = None
        self._target: str | None = None
        self._detail: dict[str, Any] = {}

    @property
    def _reg(self) -> str:
        return self.store.name

    @property
    def previous_revision(self) -> int:
        return self.revision - 1

    # --- begin and end --------------------------------------------------------------------------

    async def begin(self, create: bool) -> None:
        now = time.time()
        row = await self.conn.fetchrow(
            "UPDATE packages SET revision = revision + 1, modified = $3 WHERE registry = $1 AND name = $2"
            " RETURNING revision, created, extra",
            self._reg,
            self.name,
            now,
        )
        if row is None:
            if not create:
                raise NotFound(f"package {self.name} is not published in registry {self._reg!r}")
            row = await self.conn.fetchrow(
                "INSERT INTO packages (registry, name, revision, created, modified, extra)"
                " VALUES ($1, $2, 1, $3, $3, '{}')"
                " ON CONFLICT (registry, name) DO UPDATE SET revision = packages.revision + 1, modified = $3"
                " RETURNING revision, created, extra",
                self._reg,
                self.name,
                now,
            )
            assert row is not None
            self.is_new = int(row["revision"]) == 1
        self.created = float(row["created"])
        self.revision = int(row["revision"])
        self._extra_json = row["extra"] or "{}"
        self.extra = json.loads(self._extra_json)
        self._owners = await _owners(self.conn, self._reg, self.name)
        await self._authorize()

    async def _authorize(self) -> None:
        actor, owners = self.actor, self._owners
        if actor.is_admin:
            return
        user = actor.user_id
        scope = self.store.scope_of(self.name)
        if owners:
            if user in owners:
                return
            if scope is not None and user is not None and user in await _scope_owners(self.conn, self._reg, scope):
                return
            raise Forbidden(
                f"package {self.name} is owned by {', '.join(owners)}: only its owners"
                f"{' and the owners of ' + scope if scope else ''} (and admins) may change it"
            )
        if not self.is_new:
            return  # published before owners existed, or anonymously: anyone with the permission
        if scope is not None:
            scope_owners = await _scope_owners(self.conn, self._reg, scope)
            if scope_owners and user not in scope_owners:
                raise Forbidden(
                    f"scope {scope} belongs to {', '.join(scope_owners)}: only they (and admins) may publish in it"
                )
            if not scope_owners and user is not None:
                await _add_owner(self.conn, "scope_owners", "scope", self._reg, scope, user, user)

    async def finish(self) -> None:
        """Delete the package if no version is left, save metadata, write the audit entry."""
        left = await self.conn.fetchval(
            "SELECT COUNT(*) FROM versions WHERE registry = $1 AND name = $2", self._reg, self.name
        )
        if not left:
            if not self.added and not self.removed and not self._deleted and self.is_new:
                raise BadRequest(f"a first publish of {self.name} must carry a version")
            for table in ("files", "dist_tags", "versions", "packages"):
                await self.conn.execute(f"DELETE FROM {table} WHERE registry = $1 AND name = $2", self._reg, self.name)
            self._deleted = True
        else:
            jsondoc.check(self.extra, what=f"the metadata of {self.name}")
            extra_json = json.dumps(self.extra, ensure_ascii=False, sort_keys=True)
            if extra_json != self._extra_json:
                await self.conn.execute(
                    "UPDATE packages SET extra = $3 WHERE registry = $1 AND name = $2", self._reg, self.name, extra_json
                )
        if self._action is None:
            self._action = "publish" if self.added else "unpublish" if self.removed or self._deleted else "update"
        detail = dict(self._detail)
        if self.removed:
            detail.setdefault("removed", sorted(self.removed))
        await self.store._audit(self.conn, self.actor, self._action, self._target or self.name, detail)

    async def announce(self) -> None:
        """After the commit: tell the plugins (each hook's failure is logged, never undoes)."""
        for version, size in self.added:
            await self.store.fire(
                "on_publish",
                registry=self._reg,
                package=self.name,
                version=version,
                user_id=self.actor.user_id,
                size=size,
            )
        if self._deleted and not self.removed:
            await self.store.fire(
                "on_unpublish", registry=self._reg, package=self.name, version=None, user_id=self.actor.user_id
            )
        for version in self.removed:
            await self.store.fire(
                "on_unpublish", registry=self._reg, package=self.name, version=version, user_id=self.actor.user_id
            )

    def describe(self, action: str | None = None, target: str | None = None, **detail: Any) -> None:
        """What the audit entry says: `<format>.<action>` on `target` (the package by default)."""
        if action is not None:
            self._action = action
        if target is not None:
            self._target = target
        self._detail.update(detail)

    # --- versions -------------------------------------------------------------------------------

    async def versions(self) -> dict[str, VersionRecord]:
        rows = await self.conn.fetch(
            "SELECT version, manifest, created, publisher, size FROM versions"
            " WHERE registry = $1 AND name = $2 ORDER BY created",
            self._reg,
            self.name,
        )
        return {
            r["version"]: VersionRecord(
                r["version"], json.loads(r["manifest"]), float(r["created"]), r["publisher"], int(r["size"] or 0)
            )
            for r in rows
        }

    async def has_version(self, version: str) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT 1 FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
                self._reg,
                self.name,
                version,
            )
        )

    async def add_version(self, version: str, manifest: Mapping[str, Any], files: Sequence[NewFile]) -> None:
        """Publish a new version with its files. A version that exists is a 409; the files' bytes
        count against the publisher's quota."""
        jsondoc.check(manifest, what=f"the metadata of {self.name}@{version}")
        if await self.has_version(version):
            raise Conflict(f"cannot publish over existing version {version} of {self.name}")
        size = sum(f.blob.size for f in files)
        user = self.actor.user_id
        self.quota_warning = await quota.consume(self.conn, self.store.registry, user, size)
        now = time.time()
        try:
            await self.conn.execute(
                "INSERT INTO versions (registry, name, version, manifest, artifact_key, size, publisher, created)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                self._reg,
                self.name,
                version,
                json.dumps(manifest),
                files[0].blob.key if files else None,
                size,
                user,
                now,
            )
        except AlreadyExists:  # a concurrent publish of the same version won the race
            raise Conflict(f"cannot publish over existing version {version} of {self.name}") from None
        for item in files:
            await self._insert_file(version, item, now)
        if user is not None and not self._owners:
            await _add_owner(self.conn, "package_owners", "name", self._reg, self.name, user, user)
            self._owners.append(user)
        self.added.append((version, size))

    async def add_file(self, version: str, item: NewFile) -> None:
        """One more file for an existing version (its bytes count against the quota)."""
        if not await self.has_version(version):
            raise NotFound(f"version {version} of {self.name} does not exist")
        self.quota_warning = await quota.consume(
            self.conn, self.store.registry, self.actor.user_id, item.blob.size, versions=0
        )
        await self._insert_file(version, item, time.time())
        await self.conn.execute(
            "UPDATE versions SET size = size + $4 WHERE registry = $1 AND name = $2 AND version = $3",
            self._reg,
            self.name,
            version,
            item.blob.size,
        )

    async def _insert_file(self, version: str, item: NewFile, now: float) -> None:
        try:
            await self.conn.execute(
                "INSERT INTO files (registry, name, version, filename, artifact_key, size, created, meta)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                self._reg,
                self.name,
                version,
                item.filename,
                item.blob.key,
                item.blob.size,
                now,
                json.dumps(_checked(item.meta, f"the metadata of {item.filename}")),
            )
        except AlreadyExists:
            raise Conflict(f"file {item.filename} of {self.name} exists already") from None
        await record_artifact(self.conn, item.blob)

    async def set_manifest(self, version: str, manifest: Mapping[str, Any]) -> None:
        jsondoc.check(manifest, what=f"the metadata of {self.name}@{version}")
        await self.conn.execute(
            "UPDATE versions SET manifest = $4 WHERE registry = $1 AND name = $2 AND version = $3",
            self._reg,
            self.name,
            version,
            json.dumps(manifest),
        )

    async def remove_version(self, version: str) -> bool:
        """Unpublish one version: its files, its tags and its quota go with it; its blobs stay
        until the sweep finds them unreferenced. False when there is no such version."""
        row = await self.conn.fetchrow(
            "SELECT size, publisher FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
            self._reg,
            self.name,
            version,
        )
        if row is None:
            return False
        keys = [
            r["artifact_key"]
            for r in await self.conn.fetch(
                "SELECT artifact_key FROM files WHERE registry = $1 AND name = $2 AND version = $3",
                self._reg,
                self.name,
                version,
            )
        ]
        for table in ("versions", "files", "dist_tags"):
            await self.conn.execute(
                f"DELETE FROM {table} WHERE registry = $1 AND name = $2 AND version = $3",
                self._reg,
                self.name,
                version,
            )
        await quota.release(self.conn, self._reg, row["publisher"], int(row["size"] or 0))
        for key in keys:
            # No version anywhere uses these bytes any more: let the storage sweep collect them once
            # its grace period has passed (never at once: an identical publish may be in flight).
            if not await self.conn.fetchval(
                "SELECT 1 FROM files WHERE artifact_key = $1 UNION ALL"
                " SELECT 1 FROM versions WHERE artifact_key = $1 LIMIT 1",
                key,
            ):
                await self.conn.execute("DELETE FROM artifacts WHERE storage_key = $1", key)
        self.removed.append(version)
        return True

    async def delete(self) -> list[str]:
        """Unpublish the whole package; returns the versions it had. Its owners stay, so nobody
        else can take the name over."""
        versions = list(await self.versions())
        for version in versions:
            await self.remove_version(version)
        self.removed.clear()
        self._deleted = True
        self.describe(versions=sorted(versions))
        return versions

    # --- tags -----------------------------------------------------------------------------------

    async def tags(self) -> dict[str, str]:
        rows = await self.conn.fetch(
            "SELECT tag, version FROM dist_tags WHERE registry = $1 AND name = $2", self._reg, self.name
        )
        return {r["tag"]: r["version"] for r in rows}

    async def set_tag(self, tag: str, version: str) -> None:
        if not await self.has_version(version):
            raise NotFound(f"version {version} of {self.name} does not exist")
        await self.conn.execute(
            "INSERT INTO dist_tags (registry, name, tag, version) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (registry, name, tag) DO UPDATE SET version = excluded.version",
            self._reg,
            self.name,
            tag,
            version,
        )

    async def remove_tag(self, tag: str) -> bool:
        removed = await self.conn.execute(
            "DELETE FROM dist_tags WHERE registry = $1 AND name = $2 AND tag = $3", self._reg, self.name, tag
        )
        return removed > 0

    async def clear_tags(self) -> None:
        await self.conn.execute("DELETE FROM dist_tags WHERE registry = $1 AND name = $2", self._reg, self.name)

    # --- owners ---------------------------------------------------------------------------------

    @property
    def owners(self) -> list[str]:
        return list(self._owners)

    async def set_owners(self, users: Sequence[str]) -> None:
        """Replace the package's owners (what `npm owner add/rm` does). A package keeps at least one."""
        wanted = _user_ids(users)
        if not wanted:
            raise BadRequest(f"cannot remove every owner of {self.name}; add someone else first")
        await _replace_owners(self.conn, "package_owners", "name", self._reg, self.name, wanted, self.actor.user_id)
        self.describe("owners.set", owners=wanted, previous=self._owners)
        self._owners = wanted


# --- helpers ------------------------------------------------------------------------------------


def _checked(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    jsondoc.check(value, what=what)
    return dict(value)


def _file(row: Mapping[str, Any]) -> FileRecord:
    return FileRecord(
        filename=row["filename"],
        key=row["artifact_key"],
        size=int(row["size"]),
        created=float(row["created"]),
        meta=json.loads(row["meta"] or "{}"),
    )


def _matches(name: str, extra: Mapping[str, Any], needle: str) -> bool:
    if needle in name.lower():
        return True
    keywords = extra.get("keywords") if isinstance(extra.get("keywords"), list) else []
    words = [str(extra.get("description") or ""), *(str(k) for k in keywords or ())]
    return any(needle in word.lower() for word in words)


async def _owners(conn: Connection, registry: str, name: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT user_id FROM package_owners WHERE registry = $1 AND name = $2 ORDER BY added, user_id", registry, name
    )
    return [r["user_id"] for r in rows]


async def _scope_owners(conn: Connection, registry: str, scope: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT user_id FROM scope_owners WHERE registry = $1 AND scope = $2 ORDER BY added, user_id", registry, scope
    )
    return [r["user_id"] for r in rows]


async def _add_owner(
    conn: Connection, table: str, column: str, registry: str, name: str, user: str, added_by: str | None
) -> None:
    await conn.execute(
        f"INSERT INTO {table} (registry, {column}, user_id, added_by, added) VALUES ($1, $2, $3, $4, $5)"
        f" ON CONFLICT (registry, {column}, user_id) DO NOTHING",
        registry,
        name,
        user,
        added_by,
        time.time(),
    )


def _user_ids(users: Sequence[str]) -> list[str]:
    for user in users:
        if not valid_user_id(user):
            raise BadRequest(f"{user!r} is not a user id")
    return list(dict.fromkeys(users))


async def _replace_owners(
    conn: Connection, table: str, column: str, registry: str, name: str, users: Sequence[str], by: str | None
) -> None:
    await conn.execute(f"DELETE FROM {table} WHERE registry = $1 AND {column} = $2", registry, name)
    for user in _user_ids(users):
        await _add_owner(conn, table, column, registry, name, user, by)
