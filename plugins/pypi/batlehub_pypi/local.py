"""Local Python projects: every PyPI write, shaped for core's package store.

Core's `PackageStore.write` does the bookkeeping of each change in one transaction (permission,
ownership, revision, quota, audit, invalidation, events); this module says what the change is in
PyPI's terms. A release is a core version whose manifest holds the release's core metadata and its
yank state; each distribution file is one core file, and a wheel's core metadata (`METADATA`,
served as `<wheel>.metadata`, PEP 658) is one more file beside it, marked `metadata_of` in its
`meta`, so the sweep, quotas and deletes treat it like the bytes it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
)
from batlehub_pypi.names import latest_release

METADATA_SUFFIX = ".metadata"


class FileExists(BadRequest):
    """PyPI's answer to a second upload of a file name: 400 "File already exists", which
    `twine upload --skip-existing` recognises."""


@dataclass(frozen=True)
class Upload:
    """A checked upload, its bytes stored already."""

    project: str
    """Normalized name."""
    display_name: str
    version: str
    metadata: dict[str, Any]
    """The release's core metadata (from the wheel's `METADATA` when there is one)."""
    filename: str
    blob: StoredBlob
    file_meta: dict[str, Any]
    core_metadata: StoredBlob | None = None


class LocalProjects:
    """The local projects of one PyPI registry."""

    def __init__(self, store: PackageStore, policy: RegistryPolicy) -> None:
        self.store = store
        self.policy = policy

    async def stamp(self, project: str) -> str | None:
        """The revision stamp of the project as clients may see it (extended by what the
        registry's policies withhold), or None when it is not published here."""
        stamp = await self.store.stamp(project)
        return stamp if stamp is None else await self.policy.local_stamp(project, stamp)

    async def load(self, project: str) -> Package | None:
        """The project as clients may see it: without the releases the policies withhold."""
        found = await self.store.load(project)
        return found if found is None else await self.policy.visible_package(found)

    async def file_key(self, project: str, filename: str) -> str | None:
        found = await self.store.file(project, filename=filename)
        return found.key if found else None

    async def has_file(self, project: str, filename: str) -> bool:
        return await self.store.file(project, filename=filename) is not None

    # --- upload ---------------------------------------------------------------------------------

    async def upload(self, upload: Upload, actor: Actor) -> str | None:
        """Add a file to its release (creating the project and the release on their first file).
        Returns a quota warning for "warn" enforcement."""
        if await self.has_file(upload.project, upload.filename):
            raise file_exists(upload.filename)
        try:
            return await self._upload(upload, actor)
        except Conflict:
            # Another upload of this release committed first: the release exists now, so this
            # file joins it, unless it was this very file.
            if await self.has_file(upload.project, upload.filename):
                raise file_exists(upload.filename) from None
            return await self._upload(upload, actor)

    async def _upload(self, upload: Upload, actor: Actor) -> str | None:
        files = [NewFile(upload.filename, upload.blob, upload.file_meta)]
        if upload.core_metadata is not None:
            files.append(
                NewFile(
                    upload.filename + METADATA_SUFFIX,
                    upload.core_metadata,
                    {"metadata_of": upload.filename, "sha256": upload.core_metadata.sha256},
                )
            )
        async with self.store.write(upload.project, actor, create=True) as tx:
            if await tx.has_version(upload.version):
                for item in files:
                    await tx.add_file(upload.version, item)
                tx.describe("file.upload", target=f"{upload.project}@{upload.version}", file=upload.filename)
            else:
                manifest = {"name": upload.display_name, "version": upload.version, "metadata": upload.metadata}
                await tx.add_version(upload.version, manifest, files)
                tx.describe(target=f"{upload.project}@{upload.version}", file=upload.filename)
            tx.extra["name"] = upload.display_name
            await _follow_latest(tx)
            tx.describe(size=upload.blob.size, sha256=upload.blob.sha256)
        return tx.quota_warning

    # --- yank, delete ---------------------------------------------------------------------------

    async def set_yanked(self, project: str, version: str, reason: str | None, actor: Actor) -> None:
        """Yank a release (PEP 592: installers skip it unless pinned exactly), or with `reason`
        None unyank it."""
        async with self.store.write(project, actor) as tx:
            stored = (await tx.versions()).get(version)
            if stored is None:
                raise NotFound(f"release {version} of {project} does not exist")
            manifest = dict(stored.manifest)
            if reason is None:
                manifest.pop("yanked", None)
                manifest.pop("yanked_reason", None)
            else:
                manifest["yanked"] = True
                manifest["yanked_reason"] = reason
            await tx.set_manifest(version, manifest)
            await _follow_latest(tx)
            tx.describe("yank" if reason is not None else "unyank", target=f"{project}@{version}", reason=reason)

    async def remove_release(self, project: str, version: str, actor: Actor) -> None:
        async with self.store.write(project, actor, permission="releases:delete") as tx:
            if not await tx.remove_version(version):
                raise NotFound(f"release {version} of {project} does not exist")
            await _follow_latest(tx)
            tx.describe(target=f"{project}@{version}")

    async def remove_file(self, project: str, filename: str, actor: Actor) -> None:
        """Delete one distribution file (and its core metadata file)."""
        async with self.store.write(project, actor, permission="releases:delete") as tx:
            if filename.endswith(METADATA_SUFFIX) or not await tx.remove_file(filename):
                raise NotFound(f"file {filename} of {project} does not exist")
            await tx.remove_file(filename + METADATA_SUFFIX)
            tx.describe("file.remove", target=project, file=filename)


async def _follow_latest(tx: PackageWrite) -> None:
    """Core's `latest` tag names the release a bare `pip install` picks, and the package's
    description is that release's summary: what the web UI's package list shows and searches."""
    versions = await tx.versions()
    latest = latest_release(versions, {v for v, r in versions.items() if r.manifest.get("yanked")})
    if latest is None:
        await tx.remove_tag("latest")
        return
    await tx.set_tag("latest", latest)
    metadata = versions[latest].manifest.get("metadata")
    summary = metadata.get("summary") if isinstance(metadata, Mapping) else None
    tx.extra["description"] = summary if isinstance(summary, str) else ""


def file_exists(filename: str) -> FileExists:
    return FileExists(f"File already exists: {filename}. A file name can be uploaded once; upload a new version")


def is_metadata_file(meta: Mapping[str, Any]) -> bool:
    return "metadata_of" in meta
