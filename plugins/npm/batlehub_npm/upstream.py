"""Proxying upstream npm registries: the npm side of core's upstream machinery.

Core (`UpstreamDocuments`, `ArtifactStore.fetch`) asks the upstreams as rarely as possible, once
for every replica, and keeps answering from the last good copy when they are down. This module
says what npm's documents are (packuments, full and abbreviated), checks them, verifies tarballs
against the digests their metadata announces, forwards audit requests and warms packages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from batlehub.api import (
    BadRequest,
    DocumentFormat,
    IntegrityError,
    NotFound,
    RegistryServices,
    UpstreamDocument,
    UpstreamError,
    warm_up,
)
from batlehub_npm.documents import (
    check_packument,
    published_times,
    summarize_packument,
    upstream_dist,
    upstream_tags,
    without_versions,
)
from batlehub_npm.integrity import expected_digests
from batlehub_npm.names import split_spec

FULL = "full"
ABBREVIATED = "abbreviated"
ABBREVIATED_TYPE = "application/vnd.npm.install-v1+json"
WARMED_PINNED_SECS = 7 * 86400.0
"""A warmed `name@version` never changes, so one warm-up lasts for days across replicas..."""
WARMED_LATEST_SECS = 3600.0
"""...while a warmed `name` (its latest version) is worth checking again after an hour."""
AUDIT_PREFIX = "-/npm/v1/security/"


def upstream_path(name: str) -> str:
    """The path of a packument under an upstream base URL, `@scope%2fname` for scoped names (the
    form every npm registry understands). Refuses names that would leave that one path segment."""
    scope, slash, rest = name.partition("/")
    if name.startswith("@") and slash and rest and "/" not in rest and len(scope) > 1:
        return f"{quote(scope, safe='@')}%2f{quote(rest, safe='')}"
    if not name or "/" in name or name in (".", "..") or name.startswith("@"):
        raise BadRequest(f"invalid package name {name!r}")
    return quote(name, safe="@")


def _variant_of(requested: str, content_type: str) -> str:
    # An upstream may answer an abbreviated request with the full form: keep what it really is.
    return ABBREVIATED if content_type == ABBREVIATED_TYPE else FULL


PACKUMENT = DocumentFormat(
    path=upstream_path,
    accept={FULL: "application/json", ABBREVIATED: f"{ABBREVIATED_TYPE}; q=1.0, application/json; q=0.8, */*"},
    check=check_packument,
    variant_of=_variant_of,
    answers={ABBREVIATED: (ABBREVIATED, FULL)},  # whatever the full form says, the abbreviated one says too
    summarize=summarize_packument,
    versions=published_times,
    without=without_versions,
    timed_variant=FULL,  # only the full form has `time`
)


class UpstreamProxy:
    """Everything one npm registry fetches from its upstreams."""

    def __init__(
        self,
        services: RegistryServices,
        *,
        upstreams: list[str],
        metadata_ttl_secs: float,
        serve_stale: bool,
        warm_packages: list[str],
        guard_publishes: bool = True,
    ) -> None:
        self.registry = services.registry.name
        self.documents = services.upstream_documents(
            PACKUMENT,
            upstreams=upstreams,
            metadata_ttl_secs=metadata_ttl_secs,
            serve_stale=serve_stale,
            guard_publishes=guard_publishes,
        )
        self.artifacts = services.artifacts
        self.cache = services.cache
        self.stats = services.stats
        self.warm_packages = list(warm_packages)

    @property
    def upstreams(self) -> list[str]:
        return self.documents.upstreams

    async def settle(self) -> None:
        """Wait for the writes made after answering (durable copies, artifact rows)."""
        await self.documents.settle()
        await self.artifacts.settle()

    async def close(self) -> None:
        await self.documents.close()

    async def packument(
        self, name: str, *, abbreviated: bool = False, revalidate: bool = False
    ) -> UpstreamDocument | None:
        """The upstream packument of `name` (None when no upstream has it); see `UpstreamDocuments.get`."""
        return await self.documents.get(name, ABBREVIATED if abbreviated else FULL, revalidate=revalidate)

    async def tarball(self, name: str, version: str, dist: Mapping[str, Any]) -> str:
        """The storage key of the verified tarball of `name@version`, downloading it from
        `dist.tarball` first if it is not stored yet (once for all callers and replicas)."""
        try:
            expected = expected_digests(dist, strict=False)
        except IntegrityError as exc:
            raise IntegrityError(f"integrity check failed for {name}@{version}: {exc.message}") from None
        url = str(dist.get("tarball") or "")
        return await self.artifacts.fetch(url, expected, what=f"the tarball of {name}@{version}")

    def forget_blob(self, key: str) -> None:
        self.artifacts.forget(key)

    async def audit(self, sub: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """Forward an npm audit request (`-/npm/v1/security/<sub>`) to the first upstream and
        return its status, content type and body."""
        if not self.upstreams:
            raise NotFound("audit is not available: this registry has no upstream registry")
        forwarded = {k: v for k, v in headers.items() if k.lower() in ("content-type", "content-encoding")}
        forwarded.setdefault("Accept", "application/json")
        try:
            return await self.documents.forward(AUDIT_PREFIX + sub, body, forwarded)
        except UpstreamError as exc:
            raise UpstreamError(f"audit: {exc.message}") from None

    # --- warm-up --------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Fetch each `warm_packages` entry (packument + tarball) once across all replicas (core's
        `warm_up`: in the background after start, logging, never raising)."""
        await warm_up(self.cache, "npm", self.registry, self.warm_packages, self._warm_one)

    async def _warm_one(self, spec: str) -> tuple[str, float] | str:
        name, wanted = split_spec(spec)
        doc = await self.packument(name)
        if doc is None:
            return f"{name} is not on any upstream registry"
        tags = await self.documents.extract(doc, upstream_tags)
        version = tags.get(wanted or "latest", wanted)
        dist = await self.documents.extract(doc, upstream_dist, version) if isinstance(version, str) else None
        if not isinstance(version, str) or dist is None:
            return f"{name} has no version {wanted or 'latest'} upstream"
        await self.tarball(name, version, dist)
        return f"{name}@{version}", WARMED_PINNED_SECS if wanted and wanted not in tags else WARMED_LATEST_SECS


__all__ = ["ABBREVIATED", "FULL", "PACKUMENT", "UpstreamProxy", "upstream_path"]
