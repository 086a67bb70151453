"""Proxying upstream Python package indexes: the PyPI side of core's upstream machinery.

Core (`UpstreamDocuments`, `ArtifactStore.fetch`) asks the upstreams as rarely as possible, once
for every replica, and keeps answering from the last good copy when they are down. This module
says what a project page is (PEP 691 JSON or PEP 503 HTML, whichever the upstream serves), and
finds a file's upstream URL and announced digests in it, so every file (and every `.metadata`
file) is verified against the page before it is stored or served.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from packaging.version import InvalidVersion, Version
from yarl import URL

from batlehub.api import (
    VERIFIABLE,
    DocumentFormat,
    IntegrityError,
    NotFound,
    RegistryServices,
    UpstreamDocument,
    epoch_of,
)
from batlehub_pypi.names import file_version, normalize_name, version_id
from batlehub_pypi.simple import UPSTREAM_ACCEPT, parse_project_page, render_html

PAGE = "page"


def page_path(name: str) -> str:
    """A project's page under an upstream simple-index URL (PEP 503: normalized, trailing slash)."""
    return normalize_name(name) + "/"


def check_project_page(body: bytes) -> bytes:
    """Core's check of an upstream answer: a project page in either form, kept as it came."""
    parse_project_page(body)
    return body


def published_times(body: bytes) -> dict[str, float | None]:
    """Policies: the versions a project page names (by its files' names, and PEP 700's `versions`),
    each published at the earliest `upload-time` of its files; None for a version none of whose
    files tells a time (an HTML page never does). Files whose names tell no version count for none.

    A release written in several equal forms (`2.0` and `2.0.0`) is one release: each form is
    listed, with the release's time, so that every form gets the same decision and a download
    names its version as its file name writes it."""
    page = parse_project_page(body)
    times: dict[str, float | None] = {version_id(v): None for v in page.get("versions") or ()}
    for item in page["files"]:
        version = file_version(item["filename"])
        if version is None:
            continue
        times[version] = _earliest(times.get(version), epoch_of(item.get("upload-time")))
    releases: dict[Version, float | None] = {}
    for form, published in times.items():
        try:
            release = Version(form)
        except InvalidVersion:
            continue
        releases[release] = _earliest(releases.get(release), published)
    for form in times:
        try:
            times[form] = releases[Version(form)]
        except InvalidVersion:
            pass
    return times


def _earliest(known: float | None, other: float | None) -> float | None:
    return other if known is None else known if other is None else min(known, other)


def without_versions(body: bytes, withheld: tuple[str, ...]) -> bytes:
    """Policies: the project page without the files of the `withheld` versions (and without them
    in PEP 700's `versions`), in the form it came in. A JSON page keeps everything else as the
    upstream wrote it (`upload-time` too); an HTML page is written back with every link
    attribute this hub reads. Files whose names tell no version stay: installers skip them too."""
    gone = set(withheld)

    def kept(filename: Any) -> bool:
        return not isinstance(filename, str) or file_version(filename) not in gone

    if body.lstrip()[:1] == b"{":
        data = json.loads(body)
        data["files"] = [f for f in data["files"] if not isinstance(f, Mapping) or kept(f.get("filename"))]
        if isinstance(data.get("versions"), list):
            data["versions"] = [v for v in data["versions"] if not isinstance(v, str) or version_id(v) not in gone]
        # ASCII escapes: an upstream's lone surrogate (`\ud800`) must not break the encoding.
        return json.dumps(data, separators=(",", ":")).encode()
    page = parse_project_page(body)
    page["files"] = [f for f in page["files"] if kept(f["filename"])]
    return render_html(page, any_digest=True)


PROJECT_PAGE = DocumentFormat(
    path=page_path,
    accept={PAGE: UPSTREAM_ACCEPT},
    check=check_project_page,
    # One variant: the hub asks for PEP 691 JSON (which carries `upload-time`) first anyway.
    versions=published_times,
    without=without_versions,
)


class UpstreamIndex:
    """Everything one PyPI registry fetches from its upstream indexes."""

    def __init__(
        self,
        services: RegistryServices,
        *,
        upstreams: list[str],
        files_hosts: list[str],
        metadata_ttl_secs: float,
        serve_stale: bool,
        guard_publishes: bool,
    ) -> None:
        self.documents = services.upstream_documents(
            PROJECT_PAGE,
            upstreams=upstreams,
            metadata_ttl_secs=metadata_ttl_secs,
            serve_stale=serve_stale,
            guard_publishes=guard_publishes,
        )
        # Indexes often serve files from a host of their own: the operator names those hosts.
        services.origins.add(files_hosts)
        self.artifacts = services.artifacts

    async def page(self, project: str, *, revalidate: bool = False) -> UpstreamDocument | None:
        """The upstream page of `project` (None when no upstream has it, or it is reserved)."""
        return await self.documents.get(project, PAGE, revalidate=revalidate)

    async def data(self, doc: UpstreamDocument) -> dict[str, Any]:
        """The page parsed (once per content, shared: read-only)."""
        return await self.documents.extract(doc, parse_project_page)

    async def _find(self, project: str, filename: str) -> tuple[UpstreamDocument, Mapping[str, Any]]:
        doc = await self.page(project)
        found = find_file(await self.data(doc), filename) if doc is not None else None
        if found is None and doc is not None and not doc.stale:
            doc = await self.page(project, revalidate=True)  # maybe uploaded upstream since
            found = find_file(await self.data(doc), filename) if doc is not None else None
        if doc is None or found is None:
            raise NotFound(f"file {filename} of {project} not found")
        return doc, found

    async def file_key(self, project: str, filename: str) -> str:
        """The storage key of the verified upstream file, downloading it first if need be."""
        doc, item = await self._find(project, filename)
        # Only what `ArtifactStore.fetch` can check: an md5 alone proves nothing against a hostile upstream.
        expected = {k: v for k, v in (item.get("hashes") or {}).items() if k in VERIFIABLE}
        if not expected:
            raise IntegrityError(
                f"cannot verify {filename}: the upstream index announces no sha256 for it, so it is not served"
            )
        return await self.artifacts.fetch(file_url(doc.upstream, project, item), expected, what=f"the file {filename}")

    async def metadata_key(self, project: str, filename: str) -> str:
        """The storage key of the verified upstream `.metadata` file of `filename`."""
        doc, item = await self._find(project, filename)
        hashes = item.get("core-metadata")
        expected = {k: v for k, v in hashes.items() if k in VERIFIABLE} if isinstance(hashes, Mapping) else {}
        if not expected:
            raise NotFound(f"the upstream index has no verifiable core metadata file for {filename}")
        url = file_url(doc.upstream, project, item) + ".metadata"
        return await self.artifacts.fetch(url, expected, what=f"the core metadata of {filename}")

    async def settle(self) -> None:
        await self.documents.settle()
        await self.artifacts.settle()


def find_file(data: Mapping[str, Any], filename: str) -> Mapping[str, Any] | None:
    for item in data.get("files") or ():
        if item.get("filename") == filename:
            return item
    return None


def file_url(upstream: str, project: str, item: Mapping[str, Any]) -> str:
    """The absolute URL of a file link, resolved against the page it was on under the `upstream`
    index URL (links may be relative, as pypiserver's and devpi's are)."""
    page = URL(upstream + page_path(project), encoded=True)
    return str(page.join(URL(str(item["url"]))))
