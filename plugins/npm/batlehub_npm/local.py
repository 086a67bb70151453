"""Local npm packages in the database: reading them, and every write as one transaction.

Each write (publish, deprecate, dist-tag change, unpublish) bumps the package's revision in the
same transaction and then mirrors the new revision stamp into the cache backend under
`npm:rev:{registry}:{name}`. Serving replicas check that one cache key before using bytes they
rendered earlier, so a write on any replica is seen by all of them at once.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batlehub import audit, quota
from batlehub.errors import BadRequest, Conflict, Forbidden, NotFound
from batlehub_npm.documents import LocalPackage, LocalVersion, make_rev, revision_stamp
from batlehub_npm.names import PackageName, latest_version, validate_tag, validate_version

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.db import Connection
    from batlehub.interfaces import RegistryServices, StoredBlob

log = logging.getLogger(__name__)

STAMP_TTL_SECS = 300.0
"""How long a mirrored revision stamp is trusted without the database. Bounds how long a replica
could serve an old document if the cache backend lost a write's update."""
_ABSENT = b"-"
_EXTRA_FROM_MANIFEST = ("description", "keywords", "license", "homepage", "repository", "bugs", "author")


@dataclass(frozen=True)
class PublishRequest:
    """A validated publish body: one new version and the tags that should point at it."""

    package: PackageName
    version: str
    manifest: dict[str, Any]
    dist_tags: dict[str, str]
    readme: str | None


def _is_unique_violation(exc: BaseException) -> bool:
    """A primary-key clash (asyncpg's UniqueViolationError, sqlite3's IntegrityError)."""
    name = type(exc).__name__
    return name == "UniqueViolationError" or (name == "IntegrityError" and "UNIQUE" in str(exc).upper())


def parse_publish(package: PackageName, document: Mapping[str, Any]) -> PublishRequest:
    """Check a publish body's shape; every problem is a 400 naming the field."""
    for key in ("_id", "name"):
        if key in document and document[key] != package.name:
            raise BadRequest(f"document {key} {document[key]!r} does not match the URL's package {package.name!r}")
    versions = document.get("versions")
    if not isinstance(versions, Mapping) or not versions:
        raise BadRequest("a publish needs a versions object with the new version")
    if len(versions) != 1:
        raise BadRequest("publish one version at a time")
    version, manifest = next(iter(versions.items()))
    validate_version(version)
    if not isinstance(manifest, dict):
        raise BadRequest(f"versions[{version!r}] must be an object")
    if manifest.get("name") != package.name:
        raise BadRequest(f"versions[{version!r}].name must be {package.name!r}")
    if manifest.get("version") != version:
        raise BadRequest(f"versions[{version!r}].version must be {version!r}")
    for field in ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies"):
        deps = manifest.get(field)
        if deps is not None and (not isinstance(deps, Mapping) or not all(isinstance(v, str) for v in deps.values())):
            raise BadRequest(f"versions[{version!r}].{field} must map names to version ranges")
    tags = document.get("dist-tags", {})
    if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
        raise BadRequest("dist-tags must be an object of tag -> version")
    dist_tags = {validate_tag(tag): v for tag, v in tags.items()}
    for tag, target in dist_tags.items():
        if target != version:
            raise BadRequest(f"dist-tag {tag!r} must point at the published version {version}")
    if not dist_tags:
        dist_tags = {"latest": version}
    readme = manifest.get("readme", document.get("readme"))
    return PublishRequest(package, version, manifest, dist_tags, readme if isinstance(readme, str) else None)


class LocalStore:
    """Local packages of one registry."""

    def __init__(self, registry: RegistrySettings, services: RegistryServices) -> None:
        self.registry = registry
        self.services = services
        self.db = services.db
        self.cache = services.cache
        self._warned_at = float("-inf")

    def _warn(self, message: str) -> None:
        """Log cache trouble once a minute: it would otherwise be once per request."""
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            log.warning("registry %s: %s", self.registry.name, message)

    # --- revision stamps ------------------------------------------------------------------------

    def _stamp_key(self, name: str) -> str:
        return f"npm:rev:{self.registry.name}:{name}"

    async def _db_stamp(self, name: str) -> str | None:
        row = await self.db.fetchrow(
            "SELECT created, revision FROM packages WHERE registry = $1 AND name = $2", self.registry.name, name
        )
        return revision_stamp(row["created"], row["revision"]) if row else None

    async def stamp(self, name: str) -> str | None:
        """The current revision stamp of a local package, or None when the name is not local.

        One cache read; on a miss (or a cache failure) the database answers and the cache is set.
        """
        try:
            cached = await self.cache.get(self._stamp_key(name))
        except Exception as exc:
            self._warn(f"cache backend unavailable, reading revisions from the database: {exc}")
            return await self._db_stamp(name)
        if cached is not None:
            return None if cached == _ABSENT else cached.decode()
        return await self.sync_stamp(name)

    async def sync_stamp(self, name: str) -> str | None:
        """Mirror the database's stamp into the cache, and make sure it stays the newest.

        Set, then re-read the database: if another write committed in between, set again. Since
        every writer (and every reader that fills a miss) does the same, the last value written
        to the cache is always one the database confirmed afterwards.
        """
        stamp = await self._db_stamp(name)
        for _ in range(5):
            try:
                await self.cache.set(self._stamp_key(name), stamp.encode() if stamp else _ABSENT, STAMP_TTL_SECS)
            except Exception as exc:
                self._warn(f"could not mirror revisions into the cache backend: {exc}")
                return stamp
            again = await self._db_stamp(name)
            if again == stamp:
                return stamp
            stamp = again
        return stamp

    # --- reading --------------------------------------------------------------------------------

    async def load(self, package: PackageName) -> LocalPackage | None:
        """Everything about a local package; None when it does not exist here.

        On PostgreSQL the reads share one snapshot, so a steady stream of publishes never makes a
        read fail; on SQLite a write that slipped in between the reads makes them start again.
        """
        if self.db.dialect == "postgresql":
            async with self.db.transaction() as conn:
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                loaded, _ = await self._read(conn, package)
                return loaded
        for _ in range(3):
            loaded, consistent = await self._read(self.db, package)
            if consistent:
                return loaded
        raise Conflict(f"package {package.name} is changing too fast to read; try again")

    async def _read(self, db: Any, package: PackageName) -> tuple[LocalPackage | None, bool]:
        """The package as read by a few queries, and whether its revision held still meanwhile."""
        row = await db.fetchrow(
            "SELECT revision, created, modified, extra FROM packages WHERE registry = $1 AND name = $2",
            self.registry.name,
            package.name,
        )
        if row is None:
            return None, True
        versions = await db.fetch(
            "SELECT version, manifest, created FROM versions WHERE registry = $1 AND name = $2 ORDER BY created",
            self.registry.name,
            package.name,
        )
        tags = await db.fetch(
            "SELECT tag, version FROM dist_tags WHERE registry = $1 AND name = $2",
            self.registry.name,
            package.name,
        )
        again = await db.fetchval(
            "SELECT revision FROM packages WHERE registry = $1 AND name = $2", self.registry.name, package.name
        )
        loaded = LocalPackage(
            name=package,
            revision=int(row["revision"]),
            created=float(row["created"]),
            modified=float(row["modified"]),
            extra=json.loads(row["extra"] or "{}"),
            versions=[LocalVersion(v["version"], json.loads(v["manifest"]), float(v["created"])) for v in versions],
            dist_tags={t["tag"]: t["version"] for t in tags},
        )
        return loaded, again == row["revision"]

    async def artifact_key(self, package: PackageName, version: str) -> str | None:
        return await self.db.fetchval(
            "SELECT artifact_key FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
            self.registry.name,
            package.name,
            version,
        )

    async def search(self, text: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Local packages whose name, description or keywords contain `text` (case-insensitive)."""
        needle = text.lower()
        pattern = "%" + needle.replace("\\", "").replace("%", "").replace("_", "\\_") + "%"
        rows = await self.db.fetch(
            "SELECT name, modified, extra FROM packages WHERE registry = $1"
            " AND (LOWER(name) LIKE $2 ESCAPE '\\' OR LOWER(extra) LIKE $2 ESCAPE '\\') ORDER BY name",
            self.registry.name,
            pattern,
        )
        matches = [row for row in rows if _matches(row, needle)]  # the SQL also matched readmes
        return matches[offset : offset + limit], len(matches)

    async def latest_manifest(self, name: str) -> dict[str, Any] | None:
        version = await self.db.fetchval(
            "SELECT version FROM dist_tags WHERE registry = $1 AND name = $2 AND tag = 'latest'",
            self.registry.name,
            name,
        )
        if version is None:
            return None
        raw = await self.db.fetchval(
            "SELECT manifest FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
            self.registry.name,
            name,
            version,
        )
        return json.loads(raw) if raw else None

    # --- writing --------------------------------------------------------------------------------

    async def _bump(self, conn: Connection, name: str, now: float, rev: str | None = None) -> dict[str, Any]:
        """Bump an existing package's revision, locking its row for the rest of the transaction.

        Raises `NotFound` if the package does not exist, and `Conflict` if `rev` (the `_rev` the
        client read) is no longer the current one.
        """
        row = await conn.fetchrow(
            "UPDATE packages SET revision = revision + 1, modified = $3 WHERE registry = $1 AND name = $2"
            " RETURNING revision, created, extra",
            self.registry.name,
            name,
            now,
        )
        if row is None:
            raise NotFound(f"package {name} is not published in registry {self.registry.name!r}")
        if rev is not None and make_rev(name, row["created"], row["revision"] - 1) != rev:
            raise Conflict(f"document revision {rev} of {name} is out of date; fetch it again and retry")
        return row

    async def publish(
        self, request: PublishRequest, blob: StoredBlob, user_id: str | None, client_ip: str | None
    ) -> str | None:
        """Make a new version visible: one transaction with the version, tags, artifact row,
        quota and audit entry. Returns a quota warning for "warn" enforcement."""
        name = request.package.name
        now = time.time()
        manifest = dict(request.manifest)
        manifest.pop("readme", None)
        manifest.pop("readmeFilename", None)
        manifest["_id"] = f"{name}@{request.version}"
        if user_id:
            manifest["_npmUser"] = {"name": user_id}
        dist = {k: v for k, v in (manifest.get("dist") or {}).items() if k != "tarball"}
        dist["shasum"] = blob.sha1
        dist["integrity"] = "sha512-" + _b64(blob.sha512)
        manifest["dist"] = dist
        try:
            async with self.db.transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO packages (registry, name, revision, created, modified, extra)"
                    " VALUES ($1, $2, 1, $3, $3, '{}')"
                    " ON CONFLICT (registry, name) DO UPDATE SET revision = packages.revision + 1, modified = $3"
                    " RETURNING revision, created, extra",
                    self.registry.name,
                    name,
                    now,
                )
                assert row is not None
                exists = await conn.fetchval(
                    "SELECT 1 FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
                    self.registry.name,
                    name,
                    request.version,
                )
                if exists:
                    raise Conflict(f"cannot publish over existing version {request.version} of {name}")
                warning = await quota.consume(conn, self.registry, user_id, blob.size)
                await conn.execute(
                    "INSERT INTO versions (registry, name, version, manifest, artifact_key, size, publisher, created)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    self.registry.name,
                    name,
                    request.version,
                    json.dumps(manifest),
                    blob.key,
                    blob.size,
                    user_id,
                    now,
                )
                for tag, version in request.dist_tags.items():
                    await self._set_tag(conn, name, tag, version)
                extra = json.loads(row["extra"] or "{}")
                for key in _EXTRA_FROM_MANIFEST:
                    if key in manifest:
                        extra[key] = manifest[key]
                if request.readme is not None and "latest" in request.dist_tags:
                    extra["readme"] = request.readme
                    extra["readmeFilename"] = request.manifest.get("readmeFilename", "README.md")
                maintainers = [m for m in extra.get("maintainers", []) if isinstance(m, dict)]
                if user_id and not any(m.get("name") == user_id for m in maintainers):
                    maintainers.append({"name": user_id})
                extra["maintainers"] = maintainers
                await conn.execute(
                    "UPDATE packages SET extra = $3 WHERE registry = $1 AND name = $2",
                    self.registry.name,
                    name,
                    json.dumps(extra, ensure_ascii=False),
                )
                await conn.execute(
                    "INSERT INTO artifacts (storage_key, size, sha512, sha1, created) VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (storage_key) DO NOTHING",
                    blob.key,
                    blob.size,
                    blob.sha512,
                    blob.sha1,
                    now,
                )
                await audit.record(
                    conn,
                    "npm.publish",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=f"{name}@{request.version}",
                    client_ip=client_ip,
                    detail={"size": blob.size, "sha512": blob.sha512, "tags": sorted(request.dist_tags)},
                )
        except Exception as exc:
            if _is_unique_violation(exc):  # a concurrent publish of the same version won the race
                raise Conflict(f"cannot publish over existing version {request.version} of {name}") from None
            raise
        finally:
            await self.sync_stamp(name)
        return warning

    async def _set_tag(self, conn: Connection, name: str, tag: str, version: str) -> None:
        await conn.execute(
            "INSERT INTO dist_tags (registry, name, tag, version) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (registry, name, tag) DO UPDATE SET version = excluded.version",
            self.registry.name,
            name,
            tag,
            version,
        )

    async def update_document(
        self,
        package: PackageName,
        document: Mapping[str, Any],
        *,
        rev: str | None,
        user_id: str | None,
        client_ip: str | None,
        may_delete: bool,
    ) -> list[str]:
        """Apply a whole-document PUT: deprecation messages and dist-tags; with `rev` (the
        `-rev` form, which npm uses to unpublish one version) also remove the versions the
        document no longer lists. Returns the removed versions."""
        versions_doc = document.get("versions", {})
        if not isinstance(versions_doc, Mapping) or not all(isinstance(m, Mapping) for m in versions_doc.values()):
            raise BadRequest("versions must be an object of version -> manifest")
        tags_doc = document.get("dist-tags", {})
        if not isinstance(tags_doc, Mapping) or not all(isinstance(v, str) for v in tags_doc.values()):
            raise BadRequest("dist-tags must be an object of tag -> version")
        for tag in tags_doc:
            validate_tag(tag)
        name = package.name
        now = time.time()
        removed: list[str] = []
        try:
            async with self.db.transaction() as conn:
                await self._bump(conn, name, now, rev)
                stored = {
                    r["version"]: r
                    for r in await conn.fetch(
                        "SELECT version, manifest, size, publisher, artifact_key FROM versions"
                        " WHERE registry = $1 AND name = $2",
                        self.registry.name,
                        name,
                    )
                }
                unknown = sorted(set(versions_doc) - set(stored))
                if unknown:
                    raise BadRequest(f"version {unknown[0]} of {name} does not exist; publish it with its tarball")
                if rev is not None:
                    removed = sorted(set(stored) - set(versions_doc))
                    if removed and not may_delete:
                        raise Forbidden(f"removing versions of {name} needs the releases:delete permission")
                changed: list[str] = []
                for version, manifest_doc in versions_doc.items():
                    manifest = json.loads(stored[version]["manifest"])
                    wanted = manifest_doc.get("deprecated")
                    if wanted is None and "deprecated" not in manifest_doc:
                        continue
                    if wanted is not None and not isinstance(wanted, str):
                        raise BadRequest(f"versions[{version!r}].deprecated must be a string")
                    if (manifest.get("deprecated") or "") != (wanted or ""):
                        if wanted:
                            manifest["deprecated"] = wanted
                        else:
                            manifest.pop("deprecated", None)
                        await conn.execute(
                            "UPDATE versions SET manifest = $4 WHERE registry = $1 AND name = $2 AND version = $3",
                            self.registry.name,
                            name,
                            version,
                            json.dumps(manifest),
                        )
                        changed.append(version)
                for version in removed:
                    await self._remove_version(conn, name, version, stored[version])
                remaining = [v for v in stored if v not in removed]
                if rev is not None:
                    # The -rev form carries the complete tag set (npm moved tags off the removed version).
                    await conn.execute(
                        "DELETE FROM dist_tags WHERE registry = $1 AND name = $2", self.registry.name, name
                    )
                tags = {t: v for t, v in tags_doc.items() if v in remaining}
                if "latest" not in tags and rev is not None and remaining:
                    tags["latest"] = latest_version(remaining) or remaining[-1]
                for tag, version in tags.items():
                    await self._set_tag(conn, name, tag, version)
                if not remaining:
                    await self._delete_rows(conn, name)
                await audit.record(
                    conn,
                    "npm.unpublish" if removed else "npm.update",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=name,
                    client_ip=client_ip,
                    detail={"removed": removed, "deprecation_changed": changed, "tags": tags},
                )
        finally:
            await self.sync_stamp(name)
        return removed

    async def _remove_version(self, conn: Connection, name: str, version: str, row: Mapping[str, Any]) -> None:
        await conn.execute(
            "DELETE FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
            self.registry.name,
            name,
            version,
        )
        await conn.execute(
            "DELETE FROM dist_tags WHERE registry = $1 AND name = $2 AND version = $3",
            self.registry.name,
            name,
            version,
        )
        await quota.release(conn, self.registry.name, row["publisher"], int(row["size"] or 0))
        key = row.get("artifact_key")
        if key and not await conn.fetchval("SELECT 1 FROM versions WHERE artifact_key = $1 LIMIT 1", key):
            # No version anywhere uses these bytes any more: let the storage sweep collect them once
            # its grace period has passed (never at once: an identical publish may be in flight).
            await conn.execute("DELETE FROM artifacts WHERE storage_key = $1", key)

    async def _delete_rows(self, conn: Connection, name: str) -> None:
        for table in ("versions", "dist_tags", "packages"):
            await conn.execute(f"DELETE FROM {table} WHERE registry = $1 AND name = $2", self.registry.name, name)

    async def unpublish_version(
        self, package: PackageName, version: str, *, rev: str | None, user_id: str | None, client_ip: str | None
    ) -> bool:
        """Remove one version (the tarball step of npm's version unpublish, or a direct call).
        True if a version was removed; the blob stays until the garbage sweep finds it unused."""
        name = package.name
        try:
            async with self.db.transaction() as conn:
                await self._bump(conn, name, time.time(), rev)
                stored = await conn.fetchrow(
                    "SELECT version, size, publisher, artifact_key FROM versions"
                    " WHERE registry = $1 AND name = $2 AND version = $3",
                    self.registry.name,
                    name,
                    version,
                )
                if stored is None:
                    return False
                await self._remove_version(conn, name, version, stored)
                left = [
                    r["version"]
                    for r in await conn.fetch(
                        "SELECT version FROM versions WHERE registry = $1 AND name = $2", self.registry.name, name
                    )
                ]
                if not left:
                    await self._delete_rows(conn, name)
                elif not await conn.fetchval(
                    "SELECT 1 FROM dist_tags WHERE registry = $1 AND name = $2 AND tag = 'latest'",
                    self.registry.name,
                    name,
                ):
                    await self._set_tag(conn, name, "latest", latest_version(left) or left[-1])
                await audit.record(
                    conn,
                    "npm.unpublish",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=f"{name}@{version}",
                    client_ip=client_ip,
                )
                return True
        finally:
            await self.sync_stamp(name)

    async def delete_package(
        self, package: PackageName, *, rev: str | None, user_id: str | None, client_ip: str | None
    ) -> list[str]:
        """Remove a whole package; returns the versions it had."""
        name = package.name
        try:
            async with self.db.transaction() as conn:
                await self._bump(conn, name, time.time(), rev)
                stored = await conn.fetch(
                    "SELECT version, size, publisher, artifact_key FROM versions WHERE registry = $1 AND name = $2",
                    self.registry.name,
                    name,
                )
                for item in stored:
                    await self._remove_version(conn, name, item["version"], item)
                await self._delete_rows(conn, name)
                await audit.record(
                    conn,
                    "npm.unpublish",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=name,
                    client_ip=client_ip,
                    detail={"versions": sorted(r["version"] for r in stored)},
                )
        finally:
            await self.sync_stamp(name)
        return [r["version"] for r in stored]

    async def set_dist_tag(
        self, package: PackageName, tag: str, version: str, *, user_id: str | None, client_ip: str | None
    ) -> None:
        name = package.name
        try:
            async with self.db.transaction() as conn:
                await self._bump(conn, name, time.time())
                if not await conn.fetchval(
                    "SELECT 1 FROM versions WHERE registry = $1 AND name = $2 AND version = $3",
                    self.registry.name,
                    name,
                    version,
                ):
                    raise NotFound(f"version {version} of {name} does not exist")
                await self._set_tag(conn, name, tag, version)
                await audit.record(
                    conn,
                    "npm.dist-tag.add",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=f"{name}@{version}",
                    client_ip=client_ip,
                    detail={"tag": tag},
                )
        finally:
            await self.sync_stamp(name)

    async def remove_dist_tag(
        self, package: PackageName, tag: str, *, user_id: str | None, client_ip: str | None
    ) -> None:
        if tag == "latest":
            raise BadRequest("the latest dist-tag cannot be removed; point it at another version instead")
        name = package.name
        try:
            async with self.db.transaction() as conn:
                await self._bump(conn, name, time.time())
                removed = await conn.execute(
                    "DELETE FROM dist_tags WHERE registry = $1 AND name = $2 AND tag = $3",
                    self.registry.name,
                    name,
                    tag,
                )
                if not removed:
                    raise NotFound(f"{name} has no dist-tag {tag!r}")
                await audit.record(
                    conn,
                    "npm.dist-tag.rm",
                    registry=self.registry.name,
                    user_id=user_id,
                    target=name,
                    client_ip=client_ip,
                    detail={"tag": tag},
                )
        finally:
            await self.sync_stamp(name)


def _matches(row: Mapping[str, Any], needle: str) -> bool:
    if needle in row["name"].lower():
        return True
    extra = json.loads(row["extra"] or "{}")
    keywords = extra.get("keywords") if isinstance(extra.get("keywords"), list) else []
    words = [str(extra.get("description") or ""), *(str(k) for k in keywords)]
    return any(needle in word.lower() for word in words)


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
