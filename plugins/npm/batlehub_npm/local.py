"""Local npm packages: every npm write, shaped for core's package store.

Core's `PackageStore.write` does the bookkeeping of each change in one transaction (permission,
ownership, revision, quota, audit, invalidation, events); this module says what the change is in
npm's terms: a publish with its manifest, `dist` and dist-tags, a whole-document PUT (deprecation,
tags, version unpublish, owners), a tag change, an unpublish. `_rev` is CouchDB's revision: the
package's revision number plus a hash (`documents.make_rev`), checked against the one the client
read before every `-rev` write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batlehub.api import (
    Actor,
    BadRequest,
    Conflict,
    NewFile,
    NotFound,
    Package,
    PackageStore,
    PackageWrite,
    RegistryPolicy,
    StoredBlob,
    hex_to_sri,
)
from batlehub_npm.documents import make_rev
from batlehub_npm.names import PackageName, latest_version, validate_tag
from batlehub_npm.publish import PublishRequest

_EXTRA_FROM_MANIFEST = ("description", "keywords", "license", "homepage", "repository", "bugs", "author")


class LocalPackages:
    """The local packages of one npm registry."""

    def __init__(self, store: PackageStore, policy: RegistryPolicy) -> None:
        self.store = store
        self.policy = policy
        self.registry = store.name
        self.none_here = False
        """Set by a proxy registry with nothing published: no lookup can find anything."""

    async def stamp(self, name: str) -> str | None:
        """The revision stamp of the package as clients may see it, or None when it is not
        published here (one cache read)."""
        if self.none_here:
            return None
        stamp = await self.store.stamp(name)
        return stamp if stamp is None else await self.policy.local_stamp(name, stamp)

    async def load(self, package: PackageName, *, everything: bool = False) -> Package | None:
        """The package as clients may see it (policies applied), or `everything` to edit it."""
        found = await self.store.load(package.name)
        return found if found is None or everything else await self.policy.visible_package(found)

    async def tarball_key(self, package: PackageName, version: str) -> str | None:
        found = await self.store.file(package.name, version=version)
        return found.key if found else None

    # --- publish --------------------------------------------------------------------------------

    async def publish(self, request: PublishRequest, blob: StoredBlob, actor: Actor) -> str | None:
        """Make a new version visible. Returns a quota warning for "warn" enforcement."""
        name, version = request.package.name, request.version
        manifest = dict(request.manifest)
        manifest.pop("readme", None)
        manifest.pop("readmeFilename", None)
        manifest["_id"] = f"{name}@{version}"
        if actor.user_id:
            manifest["_npmUser"] = {"name": actor.user_id}
        dist = {k: v for k, v in (manifest.get("dist") or {}).items() if k != "tarball"}
        dist["shasum"] = blob.sha1
        dist["integrity"] = hex_to_sri("sha512", blob.sha512)
        manifest["dist"] = dist
        async with self.store.write(name, actor, create=True) as tx:
            await tx.add_version(version, manifest, [NewFile(request.package.tarball_filename(version), blob)])
            for tag, target in request.dist_tags.items():
                await tx.set_tag(tag, target)
            for key in _EXTRA_FROM_MANIFEST:
                if key in manifest:
                    tx.extra[key] = manifest[key]
            if request.readme is not None and "latest" in request.dist_tags:
                tx.extra["readme"] = request.readme
                tx.extra["readmeFilename"] = request.manifest.get("readmeFilename", "README.md")
            tx.extra.pop("maintainers", None)  # owners are core's now; documents show them
            tx.describe(target=f"{name}@{version}", size=blob.size, sha512=blob.sha512, tags=sorted(request.dist_tags))
        return tx.quota_warning

    # --- whole-document PUTs --------------------------------------------------------------------

    async def update_document(
        self, package: PackageName, document: Mapping[str, Any], *, rev: str | None, actor: Actor
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
        permission = "releases:delete" if rev is not None else "releases:publish"
        async with self.store.write(name, actor, permission=permission) as tx:
            _check_rev(tx, rev)
            stored = await tx.versions()
            unknown = sorted(set(versions_doc) - set(stored))
            if unknown:
                raise BadRequest(f"version {unknown[0]} of {name} does not exist; publish it with its tarball")
            removed = sorted(set(stored) - set(versions_doc)) if rev is not None else []
            changed: list[str] = []
            for version, manifest_doc in versions_doc.items():
                if "deprecated" not in manifest_doc:
                    continue
                wanted = manifest_doc.get("deprecated")
                if wanted is not None and not isinstance(wanted, str):
                    raise BadRequest(f"versions[{version!r}].deprecated must be a string")
                manifest = dict(stored[version].manifest)
                if (manifest.get("deprecated") or "") != (wanted or ""):
                    if wanted:
                        manifest["deprecated"] = wanted
                    else:
                        manifest.pop("deprecated", None)
                    await tx.set_manifest(version, manifest)
                    changed.append(version)
            for version in removed:
                await tx.remove_version(version)
            remaining = [v for v in stored if v not in removed]
            if rev is not None:
                await tx.clear_tags()  # the -rev form carries the complete tag set
            tags = {t: v for t, v in tags_doc.items() if v in remaining}
            if "latest" not in tags and rev is not None and remaining:
                tags["latest"] = latest_version(remaining) or remaining[-1]
            for tag, version in tags.items():
                await tx.set_tag(tag, version)
            tx.describe(None if removed else "update", removed=removed, deprecation_changed=changed, tags=tags)
        return removed

    async def set_owners(self, package: PackageName, maintainers: Any, *, rev: str | None, actor: Actor) -> None:
        """`npm owner add/rm`: a `-rev` PUT whose body is `{_id, _rev, maintainers}`."""
        if not isinstance(maintainers, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("name"), str) and m["name"] for m in maintainers
        ):
            raise BadRequest('maintainers must be a list of {"name": user}')
        users = [str(m["name"]) for m in maintainers]
        async with self.store.write(package.name, actor) as tx:
            _check_rev(tx, rev)
            await tx.set_owners(users)

    # --- unpublish ------------------------------------------------------------------------------

    async def unpublish_version(self, package: PackageName, version: str, *, rev: str | None, actor: Actor) -> bool:
        """Remove one version (the tarball step of npm's version unpublish, or a direct call).
        True if a version was removed; the blob stays until the garbage sweep finds it unused."""
        if await self.store.file(package.name, version=version) is None:
            return False  # npm's last unpublish step, after the -rev PUT removed the version already
        async with self.store.write(package.name, actor, permission="releases:delete") as tx:
            _check_rev(tx, rev)
            if not await tx.remove_version(version):
                raise NotFound(f"version {version} of {package.name} does not exist")
            tx.describe(target=f"{package.name}@{version}")
            left = list(await tx.versions())
            if left and "latest" not in await tx.tags():
                await tx.set_tag("latest", latest_version(left) or left[-1])
        return True

    async def delete_package(self, package: PackageName, *, rev: str | None, actor: Actor) -> list[str]:
        """Remove a whole package; returns the versions it had."""
        async with self.store.write(package.name, actor, permission="releases:delete") as tx:
            _check_rev(tx, rev)
            return await tx.delete()

    # --- dist-tags ------------------------------------------------------------------------------

    async def set_dist_tag(self, package: PackageName, tag: str, version: str, *, actor: Actor) -> None:
        async with self.store.write(package.name, actor) as tx:
            await tx.set_tag(tag, version)
            tx.describe("dist-tag.add", target=f"{package.name}@{version}", tag=tag)

    async def remove_dist_tag(self, package: PackageName, tag: str, *, actor: Actor) -> None:
        """Owners may remove their package's tags (the publish permission is enough)."""
        if tag == "latest":
            raise BadRequest("the latest dist-tag cannot be removed; point it at another version instead")
        async with self.store.write(package.name, actor) as tx:
            if not await tx.remove_tag(tag):
                raise NotFound(f"{package.name} has no dist-tag {tag!r}")
            tx.describe("dist-tag.rm", tag=tag)


def _check_rev(tx: PackageWrite, rev: str | None) -> None:
    if rev is not None and make_rev(tx.name, tx.created, tx.previous_revision) != rev:
        raise Conflict(f"document revision {rev} of {tx.name} is out of date; fetch it again and retry")
