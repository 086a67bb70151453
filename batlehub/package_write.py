"""One write to a package: the unit of work `PackageStore.write` hands a format.

Inside one transaction it has checked the caller's permission and ownership and bumped the
package's revision; the format's changes go through its methods, which keep quota, files and
tags consistent; `finish` deletes an emptied package, saves the metadata and writes the one audit
entry; after the commit `announce` fires the events. See `batlehub.packages`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batlehub import jsondoc, quota
from batlehub.artifacts import record_artifact
from batlehub.config import valid_user_id
from batlehub.errors import AlreadyExists, BadRequest, Conflict, Forbidden, NotFound
from batlehub.package_model import FileRecord, NewFile, VersionRecord

TAG_ORDER = " ORDER BY created, CASE WHEN tag = 'latest' THEN 0 ELSE 1 END, tag"
"""Tags in the order they were created (clients print them so), `latest` first among equals."""

if TYPE_CHECKING:
    from batlehub.db import Connection
    from batlehub.packages import PackageStore
    from batlehub.requests import Actor


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
        self._owners = await owners_of(self.conn, self._reg, self.name)
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
            if scope is not None and user is not None and user in await scope_owners_of(self.conn, self._reg, scope):
                return
            raise Forbidden(
                f"package {self.name} is owned by {', '.join(owners)}: only its owners"
                f"{' and the owners of ' + scope if scope else ''} (and admins) may change it"
            )
        if not self.is_new:
            return  # published before owners existed, or anonymously: anyone with the permission
        if scope is not None:
            scope_owners = await scope_owners_of(self.conn, self._reg, scope)
            if scope_owners and user not in scope_owners:
                raise Forbidden(
                    f"scope {scope} belongs to {', '.join(scope_owners)}: only they (and admins) may publish in it"
                )
            if not scope_owners and user is not None:
                await add_owner(self.conn, "scope_owners", "scope", self._reg, scope, user, user)

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
            await add_owner(self.conn, "package_owners", "name", self._reg, self.name, user, user)
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

    async def files(self, version: str | None = None) -> list[FileRecord]:
        """The package's files (of `version` only, when given), oldest first."""
        sql = "SELECT version, filename, artifact_key, size, created, meta FROM files WHERE registry = $1 AND name = $2"
        args: list[Any] = [self._reg, self.name]
        if version is not None:
            sql += " AND version = $3"
            args.append(version)
        rows = await self.conn.fetch(sql + " ORDER BY created, filename", *args)
        return [
            FileRecord(
                r["filename"], r["artifact_key"], int(r["size"]), float(r["created"]), json.loads(r["meta"] or "{}")
            )
            for r in rows
        ]

    async def remove_file(self, filename: str) -> bool:
        """Remove one file of a version (formats whose versions have several files, such as a
        Python release's wheels and sdist); the version stays, even without files. Its bytes are
        given back to the publisher's quota; the blob stays until the sweep finds it unreferenced.
        False when there is no such file."""
        row = await self.conn.fetchrow(
            "SELECT version, artifact_key, size FROM files WHERE registry = $1 AND name = $2 AND filename = $3",
            self._reg,
            self.name,
            filename,
        )
        if row is None:
            return False
        version, key, size = row["version"], row["artifact_key"], int(row["size"])
        await self.conn.execute(
            "DELETE FROM files WHERE registry = $1 AND name = $2 AND filename = $3", self._reg, self.name, filename
        )
        owner = await self.conn.fetchrow(
            "SELECT publisher, artifact_key FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
            self._reg,
            self.name,
            version,
        )
        if owner is not None:
            first = await self.conn.fetchval(
                "SELECT artifact_key FROM files WHERE registry = $1 AND name = $2 AND version = $3"
                " ORDER BY created, filename LIMIT 1",
                self._reg,
                self.name,
                version,
            )
            await self.conn.execute(
                "UPDATE versions SET size = CASE WHEN size > $4 THEN size - $4 ELSE 0 END, artifact_key = $5"
                " WHERE registry = $1 AND name = $2 AND version = $3",
                self._reg,
                self.name,
                version,
                size,
                first,
            )
            await quota.release(self.conn, self._reg, owner["publisher"], size, versions=0)
        if not await self.conn.fetchval(
            "SELECT 1 FROM files WHERE artifact_key = $1 UNION ALL"
            " SELECT 1 FROM versions WHERE artifact_key = $1 LIMIT 1",
            key,
        ):
            await self.conn.execute("DELETE FROM artifacts WHERE storage_key = $1", key)
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
            "SELECT tag, version FROM dist_tags WHERE registry = $1 AND name = $2" + TAG_ORDER, self._reg, self.name
        )
        return {r["tag"]: r["version"] for r in rows}

    async def set_tag(self, tag: str, version: str) -> None:
        if not await self.has_version(version):
            raise NotFound(f"version {version} of {self.name} does not exist")
        await self.conn.execute(
            "INSERT INTO dist_tags (registry, name, tag, version, created) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (registry, name, tag) DO UPDATE SET version = excluded.version",
            self._reg,
            self.name,
            tag,
            version,
            time.time(),
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
        await replace_owners(self.conn, "package_owners", "name", self._reg, self.name, wanted, self.actor.user_id)
        self.describe("owners.set", owners=wanted, previous=self._owners)
        self._owners = wanted


def _checked(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    jsondoc.check(value, what=what)
    return dict(value)


async def owners_of(conn: Connection, registry: str, name: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT user_id FROM package_owners WHERE registry = $1 AND name = $2 ORDER BY added, user_id", registry, name
    )
    return [r["user_id"] for r in rows]


async def scope_owners_of(conn: Connection, registry: str, scope: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT user_id FROM scope_owners WHERE registry = $1 AND scope = $2 ORDER BY added, user_id", registry, scope
    )
    return [r["user_id"] for r in rows]


async def add_owner(
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


async def replace_owners(
    conn: Connection, table: str, column: str, registry: str, name: str, users: Sequence[str], by: str | None
) -> None:
    await conn.execute(f"DELETE FROM {table} WHERE registry = $1 AND {column} = $2", registry, name)
    for user in _user_ids(users):
        await add_owner(conn, table, column, registry, name, user, by)
