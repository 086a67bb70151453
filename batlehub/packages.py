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
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from batlehub import audit, metrics
from batlehub.auth import check_permission
from batlehub.coordination import FailOpenCache, SingleFlight
from batlehub.errors import BatleHubError, Forbidden, UpstreamError
from batlehub.package_model import FileRecord, NewFile, Package, PackageSummary, VersionRecord, revision_stamp
from batlehub.package_write import TAG_ORDER, PackageWrite, owners_of, replace_owners, scope_owners_of
from batlehub.upstream import like_escape

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.db import Connection, Database
    from batlehub.requests import Actor

__all__ = [
    "FileRecord",
    "NewFile",
    "Package",
    "PackageRows",
    "PackageStore",
    "PackageSummary",
    "PackageWrite",
    "VersionRecord",
    "package_of",
    "revision_stamp",
]

log = logging.getLogger(__name__)

STAMP_TTL_SECS = 300.0
"""How long a mirrored revision stamp is trusted without the database. Bounds how long a replica
could serve an old document if the cache backend lost a write's update."""
RESERVED_REFRESH_SECS = 1.0
"""How stale a process's view of the reserved names may be: a reservation made on any replica
holds everywhere within this."""
ABSENT_MEMO_SECS = 1.0
"""How long a process trusts "not published here" without the cache: a hybrid registry asks it on
every request for an upstream package. A publish on another replica shows within this; on the
replica that made it, at once."""
ABSENT_MEMO_ENTRIES = 50_000
_ABSENT = b"-"

Event = Callable[..., Awaitable[None]]
"""Fires a core event hook by name: `await fire("on_publish", registry=..., ...)`."""


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
        self._reserved_flight = SingleFlight()
        self._absent: dict[str, float] = {}

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
        seen = self._absent.get(name)
        if seen is not None and time.monotonic() - seen < ABSENT_MEMO_SECS:
            return None
        cached = await self.cache.get(self._stamp_key(name))
        if cached is None:
            stamp = await self.sync_stamp(name)
        elif cached == _ABSENT:
            stamp = None
        else:
            return cached.decode()
        if stamp is None:
            if len(self._absent) >= ABSENT_MEMO_ENTRIES:
                self._absent.clear()
            self._absent[name] = time.monotonic()
        return stamp

    async def sync_stamp(self, name: str) -> str | None:
        """Mirror the database's stamp into the cache, and make sure it stays the newest.

        Set, then re-read the database: if another write committed in between, set again. Since
        every writer (and every reader that fills a miss) does the same, the last value written to
        the cache is always one the database confirmed afterwards.
        """
        self._absent.pop(name, None)
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
        """Everything about a package, read from one snapshot; None when it is not published here.
        For a package whose documents may be big, `load_rows` and `package_of` in a worker."""
        rows = await self.load_rows(name)
        return package_of(rows) if rows is not None else None

    async def load_rows(self, name: str) -> PackageRows | None:
        """What `load` reads, still as the database's plain values (manifests as JSON text): cheap
        to hand to a worker process (`batlehub.offload`), where `package_of` decodes it."""
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
                "SELECT tag, version FROM dist_tags WHERE registry = $1 AND name = $2" + TAG_ORDER, self.name, name
            )
            owners = await conn.fetch(
                "SELECT user_id FROM package_owners WHERE registry = $1 AND name = $2 ORDER BY added, user_id",
                self.name,
                name,
            )
        return PackageRows(
            name=name,
            package=dict(row),
            versions=[dict(v) for v in versions],
            files=[dict(f) for f in files],
            tags=[(t["tag"], t["version"]) for t in tags],
            owners=[o["user_id"] for o in owners],
        )

    async def version_times(self, name: str) -> dict[str, float | None]:
        """Each version of a package and when it was published here (what policies read)."""
        rows = await self.db.fetch(
            "SELECT version, created FROM versions WHERE registry = $1 AND name = $2 ORDER BY created",
            self.name,
            name,
        )
        return {str(r["version"]): float(r["created"]) for r in rows}

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

    async def has_packages(self) -> bool:
        """Whether anything is published here (a proxy-only registry with nothing never needs to
        look up a revision: no publish can happen there)."""
        return (
            await self.db.fetchrow("SELECT 1 AS hit FROM packages WHERE registry = $1 LIMIT 1", self.name) is not None
        )

    async def names(self) -> set[str]:
        """Every package name published here (a listing leaves these out of the proxied ones)."""
        return {r["name"] for r in await self.db.fetch("SELECT name FROM packages WHERE registry = $1", self.name)}

    async def newest_versions(self, names: Sequence[str]) -> dict[str, str]:
        """The last published version of each of `names` (for formats without a `latest` tag)."""
        if not names:
            return {}
        marks = ", ".join(f"${i}" for i in range(2, 2 + len(names)))
        rows = await self.db.fetch(
            f"SELECT name, version FROM versions WHERE registry = $1 AND name IN ({marks}) ORDER BY created",
            self.name,
            *names,
        )
        return {r["name"]: r["version"] for r in rows}

    async def owners(self, name: str) -> list[str]:
        return await owners_of(self.db, self.name, name)

    async def scope_owners(self, scope: str) -> list[str]:
        return await scope_owners_of(self.db, self.name, scope)

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
        unit: PackageWrite | None = None
        refused: Forbidden | None = None
        try:
            check_permission(actor.identity, self.registry, permission)
            if create and await self.stamp(name) is None:
                await self._check_new_name(name)
            try:
                async with self.db.transaction() as conn:
                    unit = PackageWrite(self, conn, name, actor)
                    try:
                        await unit.begin(create)
                    except Forbidden as exc:
                        refused = exc
                        raise
                    yield unit
                    await unit.finish()
            finally:
                await self.sync_stamp(name)
                if refused is not None:
                    # After the rollback, and naming the package: a format whose writes do not name
                    # the package in their URL (an upload form) would otherwise leave an entry that
                    # says only who was refused, not what they tried to change.
                    try:
                        await self._audit(self.db, actor, "write", name, {"reason": refused.message}, result="denied")
                    except Exception:
                        log.warning("could not write a refused write of %s to the audit log", name, exc_info=True)
        except Exception as exc:
            # A publish (a write that may create the package, or one that added versions) that
            # did not happen: refused when the client was told why (4xx), failed otherwise.
            if create or (unit is not None and unit.added):
                told = isinstance(exc, BatleHubError) and exc.status < 500
                metrics.count_publish(self.registry.name, self.format_name, "refused" if told else "failed")
            raise
        for _, size in unit.added:
            metrics.count_publish(self.registry.name, self.format_name, "published", size)
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
            # One query for every request that finds the list expired: under load, each of them
            # asking the database at once queued them all behind one another (hundreds of ms).
            names = await self._reserved_flight.run("reserved", self._load_reserved)
        if not names:
            return False
        scope = self.scope_of(name)
        return name in names or (scope is not None and scope in names)

    async def _load_reserved(self) -> frozenset[str]:
        rows = await self.db.fetch("SELECT name FROM reserved_names WHERE registry = $1", self.name)
        names = frozenset(r["name"] for r in rows)
        self._reserved = (time.monotonic(), names)
        return names

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
                await replace_owners(conn, "package_owners", "name", self.name, name, users, actor.user_id)
                await self._audit(conn, actor, "owners.set", name, {"owners": list(users)})
        finally:
            await self.sync_stamp(name)

    async def assign_scope_owners(self, scope: str, users: Sequence[str], actor: Actor) -> None:
        """Replace the owners of a scope: only they may publish new names in it."""
        async with self.db.transaction() as conn:
            await replace_owners(conn, "scope_owners", "scope", self.name, scope, users, actor.user_id)
            await self._audit(conn, actor, "scope.owners.set", scope, {"owners": list(users)})

    async def _audit(
        self, conn: Connection, actor: Actor, action: str, target: str, detail: Any, result: str = "ok"
    ) -> None:
        await audit.record(
            conn,
            f"{self.format_name}.{action}",
            registry=self.name,
            user_id=actor.user_id,
            target=target,
            client_ip=actor.client_ip,
            result=result,
            detail=detail,
        )


# --- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageRows:
    """A package as the database holds it (see `PackageStore.load_rows`)."""

    name: str
    package: dict[str, Any]
    versions: list[dict[str, Any]]
    files: list[dict[str, Any]]
    tags: list[tuple[str, str]]
    owners: list[str]

    @property
    def stamp(self) -> str:
        return revision_stamp(float(self.package["created"]), int(self.package["revision"]))

    @property
    def size(self) -> int:
        """About how many bytes of JSON decoding `package_of` does (decides where it runs)."""
        return len(self.package["extra"] or "") + sum(len(v["manifest"]) for v in self.versions)


def package_of(rows: PackageRows, withheld: Collection[str] = (), view: str = "") -> Package:
    """The `Package` the rows describe (pure: runs in a worker process for a big package); with
    `withheld`, as policies let clients see it (`RegistryPolicy.local_view`: its versions and their
    tags left out, `view` its digest)."""
    by_version: dict[str, list[FileRecord]] = {}
    for f in rows.files:
        by_version.setdefault(f["version"], []).append(_file(f))
    gone = set(withheld)
    row = rows.package
    return Package(
        name=rows.name,
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
            for v in rows.versions
            if v["version"] not in gone
        ),
        tags={tag: version for tag, version in rows.tags if version not in gone},
        owners=tuple(rows.owners),
        view=view if gone else "",
    )


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
