"""The values of the package model that every format reads and writes (`batlehub.packages`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batlehub.interfaces import StoredBlob


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
    view: str = ""
    """Empty for the package as stored; for the package as a registry's policies let clients see
    it (`RegistryPolicy.visible_package`), a digest of what they withhold, so that `stamp`, and
    every ETag and cache key derived from it, differ from the whole package's."""

    @property
    def stamp(self) -> str:
        stamp = revision_stamp(self.created, self.revision)
        return f"{stamp}~{self.view}" if self.view else stamp

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
