"""Project pages and JSON API documents, from local projects and from upstream pages alike.

Either source becomes the one page shape of `simple.py`, with every file URL pointing at this hub
(`<registry>/files/<project>/<filename>`), so clients never talk to an upstream directly. The
JSON API (`/pypi/<project>/json`) is derived from the same data. The registry keeps the rendered
bytes in core's `RenderedCache`, keyed by everything they depend on (the package's revision stamp
or the upstream copy's content id, the content type, the base URL).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from batlehub.api import BadRequest, Package, PackageRows, VersionRecord, content_etag, gzipped, package_of
from batlehub_pypi.local import is_metadata_file
from batlehub_pypi.names import check_safe_filename, latest_release, parse_filename, version_key
from batlehub_pypi.simple import page_versions, parse_project_page, sorted_versions


def iso_time(ts: float) -> str:
    """PEP 700's upload-time: ISO 8601, UTC, with a Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def file_url(registry_url: str, project: str, filename: str) -> str:
    return f"{registry_url}/files/{project}/{quote(filename, safe='')}"


def _yanked(manifest: Mapping[str, Any]) -> bool | str:
    if not manifest.get("yanked"):
        return False
    return str(manifest.get("yanked_reason") or "") or True


# --- local ----------------------------------------------------------------------------------------


def local_files(package: Package, version: VersionRecord, registry_url: str) -> list[dict[str, Any]]:
    """A release's files in the page shape (its `.metadata` files only as `core-metadata`)."""
    metadata = {f.meta["metadata_of"]: f for f in version.files if is_metadata_file(f.meta)}
    yanked = _yanked(version.manifest)
    out = []
    for record in version.files:
        if is_metadata_file(record.meta):
            continue
        item: dict[str, Any] = {
            "filename": record.filename,
            "url": file_url(registry_url, package.name, record.filename),
            "hashes": {"sha256": record.meta.get("sha256", "")},
        }
        if record.meta.get("requires_python"):
            item["requires-python"] = record.meta["requires_python"]
        core = metadata.get(record.filename)
        if core is not None:
            item["core-metadata"] = {"sha256": core.meta.get("sha256", "")}
        if yanked:
            item["yanked"] = yanked
        item["size"] = record.size
        item["upload-time"] = iso_time(record.created)
        out.append(item)
    return out


def local_page(package: Package, registry_url: str) -> dict[str, Any]:
    files = []
    for version in sorted(package.versions, key=lambda v: version_key(v.version)):
        files += local_files(package, version, registry_url)
    name = str(package.extra.get("name") or package.name)
    return {"name": name, "versions": sorted_versions(v.version for v in package.versions), "files": files}


# --- upstream -------------------------------------------------------------------------------------


def _verifiable(hashes: Any) -> bool:
    return isinstance(hashes, Mapping) and any(k in hashes for k in ("sha256", "sha512", "sha1"))


def proxied_page(data: Mapping[str, Any], project: str, registry_url: str) -> dict[str, Any]:
    """An upstream page (parsed) with every URL pointing at this hub. A `.metadata` file is
    offered only when the upstream announces its digest (the hub verifies it before serving it)."""
    files = []
    for raw in data.get("files") or ():
        try:
            check_safe_filename(raw["filename"])
        except BadRequest:
            continue  # no hub URL can name it
        item = {k: v for k, v in raw.items() if k != "core-metadata"}
        item["url"] = file_url(registry_url, project, raw["filename"])
        if _verifiable(raw.get("core-metadata")):
            item["core-metadata"] = raw["core-metadata"]
        files.append(item)
    versions = data.get("versions")
    return {
        "name": data.get("name") or project,
        "versions": list(versions) if isinstance(versions, list) else page_versions(files),
        "files": files,
    }


# --- JSON API -------------------------------------------------------------------------------------


def _json_file(item: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta = meta or {}
    packagetype, python_version = "", ""
    try:
        dist = parse_filename(item["filename"])
        packagetype, python_version = dist.packagetype, dist.python_version
    except BadRequest:
        pass
    digests = {k: v for k, v in (item.get("hashes") or {}).items()}
    for key in ("md5", "blake2b_256"):
        if meta.get(key):
            digests[key] = meta[key]
    yanked = item.get("yanked") or False
    upload_time = item.get("upload-time")
    return {
        "filename": item["filename"],
        "url": item["url"],
        "digests": digests,
        "md5_digest": digests.get("md5"),
        "size": item.get("size"),
        "packagetype": meta.get("packagetype", packagetype),
        "python_version": meta.get("python_version", python_version),
        "requires_python": item.get("requires-python"),
        "upload_time": upload_time[:19] if isinstance(upload_time, str) else None,
        "upload_time_iso_8601": upload_time,
        "yanked": bool(yanked),
        "yanked_reason": yanked if isinstance(yanked, str) else None,
        "has_sig": False,
        "comment_text": "",
    }


def json_document(
    *,
    name: str,
    project: str,
    registry_url: str,
    releases: Mapping[str, list[dict[str, Any]]],
    metadata: Mapping[str, Mapping[str, Any]],
    serial: int,
    version: str | None = None,
) -> dict[str, Any] | None:
    """The JSON API document of a project (`version` None) or one release; None when that
    release does not exist. `releases`: version -> its files in the JSON API's shape;
    `metadata`: version -> the release's core metadata, as far as known."""
    yanked = {v for v, files in releases.items() if files and all(f["yanked"] for f in files)}
    yanked |= {v for v, m in metadata.items() if m.get("yanked")}
    shown = version if version is not None else latest_release(list(releases), yanked)
    if version is not None and version not in releases:
        return None
    meta = dict((metadata.get(shown) or {}).get("metadata") or {}) if shown else {}
    release_meta = metadata.get(shown) or {} if shown else {}
    info: dict[str, Any] = {
        "name": name,
        "version": shown,
        "summary": meta.get("summary"),
        "description": meta.get("description", ""),
        "description_content_type": meta.get("description_content_type"),
        "author": meta.get("author"),
        "author_email": meta.get("author_email"),
        "maintainer": meta.get("maintainer"),
        "maintainer_email": meta.get("maintainer_email"),
        "license": meta.get("license"),
        "license_expression": meta.get("license_expression"),
        "keywords": ",".join(meta.get("keywords") or []) or None,
        "classifiers": meta.get("classifiers") or [],
        "platform": ",".join(meta.get("platforms") or []) or None,
        "home_page": meta.get("home_page"),
        "download_url": meta.get("download_url"),
        "project_urls": meta.get("project_urls"),
        "requires_dist": meta.get("requires_dist"),
        "requires_python": meta.get("requires_python"),
        "provides_extra": meta.get("provides_extra"),
        "dynamic": meta.get("dynamic"),
        "yanked": shown in yanked,
        "yanked_reason": release_meta.get("yanked_reason"),
        "package_url": f"{registry_url}/pypi/{project}/",
        "project_url": f"{registry_url}/pypi/{project}/",
        "release_url": f"{registry_url}/pypi/{project}/{shown}/" if shown else None,
        "bugtrack_url": None,
        "docs_url": None,
    }
    doc: dict[str, Any] = {
        "info": info,
        "last_serial": serial,
        "urls": list(releases.get(shown, [])) if shown else [],
        "vulnerabilities": [],
    }
    if version is None:
        doc["releases"] = {v: releases[v] for v in sorted(releases, key=version_key)}
    return doc


def local_json(package: Package, registry_url: str, version: str | None = None) -> dict[str, Any] | None:
    releases: dict[str, list[dict[str, Any]]] = {}
    metadata: dict[str, Mapping[str, Any]] = {}
    for record in package.versions:
        by_name = {f.filename: f.meta for f in record.files}
        releases[record.version] = [
            _json_file(item, by_name.get(item["filename"])) for item in local_files(package, record, registry_url)
        ]
        metadata[record.version] = record.manifest
    return json_document(
        name=str(package.extra.get("name") or package.name),
        project=package.name,
        registry_url=registry_url,
        releases=releases,
        metadata=metadata,
        serial=package.revision,
        version=version,
    )


def _proxied_releases(page: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    releases: dict[str, list[dict[str, Any]]] = {v: [] for v in page["versions"]}
    for item in page["files"]:
        try:
            releases.setdefault(parse_filename(item["filename"]).version, []).append(_json_file(item))
        except BadRequest:
            continue
    return releases


def proxied_json(
    data: Mapping[str, Any], project: str, registry_url: str, version: str | None = None
) -> dict[str, Any] | None:
    page = proxied_page(data, project, registry_url)
    releases = _proxied_releases(page)
    return json_document(
        name=page["name"],
        project=project,
        registry_url=registry_url,
        releases=releases,
        metadata={},
        serial=0,
        version=version,
    )


# --- JSON API documents as bytes ------------------------------------------------------------------
# Pure functions: core runs them in a worker process for big documents (`RegistryServices.offload`),
# and the registry keeps what they make in its `RenderedCache`, so a document is rendered once per
# upstream content id (or revision stamp) and release, never per request.


def serialize(doc: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # an upstream's lone surrogate (`\ud800`): ASCII escapes encode it
        return json.dumps(doc, separators=(",", ":")).encode()


def proxied_releases(body: bytes, project: str) -> frozenset[str]:
    """The releases the JSON API document of an upstream page lists (to answer 404 for any other
    release without rendering anything)."""
    return frozenset(_proxied_releases(proxied_page(parse_project_page(body), project, "")))


def render_proxied_json(
    body: bytes, project: str, registry_url: str, version: str | None
) -> tuple[bytes, bytes | None, str] | None:
    """The JSON API document (of the project, or of one release) of an upstream page: its bytes,
    their gzip form and their ETag; None when the page has no such release."""
    doc = proxied_json(parse_project_page(body), project, registry_url, version)
    if doc is None:
        return None
    out = serialize(doc)
    return out, gzipped(out), content_etag(out)


def render_local_json(
    rows: PackageRows, registry_url: str, version: str | None, withheld: tuple[str, ...] = (), view: str = ""
) -> tuple[bytes, bytes | None, str] | None:
    """The JSON API document of a local project as clients may see it (without the releases the
    policies withhold): its bytes, their gzip form and the stamp of what they show; None when
    there is no such release."""
    package = package_of(rows, withheld, view)
    doc = local_json(package, registry_url, version)
    if doc is None:
        return None
    out = serialize(doc)
    return out, gzipped(out), package.stamp
